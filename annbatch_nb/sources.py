"""Open and scan AnnData inputs.

One small class per storage format (:class:`H5adSource`, :class:`ZarrSource`), all behind the
:class:`Source` interface the planner and the engine use:

- metadata read once when the source is opened (:class:`SourceInfo`: shape, X kind, dtype, nnz, obs schema,
  var names, obs names, file size and mtime);
- :meth:`Source.read_csr_into` / :meth:`Source.read_dense` / :meth:`Source.read_obs` read the rows of a
  sorted list of row runs, coalescing adjacent runs into single reads.

Sources pickle by path (the open handle is dropped and reopened lazily), so a plan can be shipped to
another process.
"""

from __future__ import annotations

import contextlib
import glob
import multiprocessing
import os
import time
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import h5py
import numpy as np
import pandas as pd

from .errors import InputError
from .stores import (
    S3URL,
    describe_store_error,
    glob_keys,
    is_not_found,
    is_url,
    list_children,
    list_keys,
    object_store,
    parse_url,
    store_env,
    zarr_store,
)

__all__ = [
    "ColumnSpec",
    "H5adSource",
    "InputSpec",
    "Source",
    "SourceInfo",
    "VirtualH5adSource",
    "VirtualizationFallback",
    "Virtualize",
    "ZarrSource",
    "coalesce_runs",
    "input_exists",
    "open_source",
    "open_sources",
    "resolve_inputs",
]

XKind = Literal["csr", "dense"]
#: How ``.h5ad`` inputs are read: ``"auto"`` (per file, whichever is faster), ``True`` (virtualized through a
#: virtualizarr manifest, h5py where that is impossible) or ``False`` (h5py).
Virtualize = Literal["auto"] | bool
ColumnKind = Literal["categorical", "numeric", "bool", "string", "nullable-integer", "nullable-boolean"]

_GLOB_CHARS = set("*?[")


# --------------------------------------------------------------------------------------------------
# Resolving what the user typed into a list of inputs
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class InputSpec:
    """One resolved input.

    Attributes
    ----------
    path
        Absolute path used to open the input.
    display
        The path as the user gave it (relative where they gave it relative); recorded in ``src_path``.
    """

    path: str
    display: str


def _is_zarr_dir(path: Path) -> bool:
    return (path / "zarr.json").is_file() or (path / ".zgroup").is_file()


def _url_error(item: str, e: BaseException) -> InputError:
    return InputError(item, f"cannot be read from the object store ({describe_store_error(e)})")


def _url_kind(store: Any, url: S3URL) -> tuple[str, list[str]]:
    """What a bucket location is: ``file``, ``zarr``, ``dir`` (with its input children) or ``missing``."""
    import obstore

    if url.key:
        try:
            obstore.head(store, url.key)
            return "file", []
        except Exception as e:
            if not is_not_found(e):
                raise
    dirs, objects = list_children(store, f"{url.key}/" if url.key else "")
    names = {str(o["path"]).rsplit("/", 1)[-1] for o in objects}
    if names & {"zarr.json", ".zgroup"}:
        return "zarr", []
    children = sorted(
        {n for n in names if n.endswith(".h5ad")} | {d for d in dirs if d.endswith((".zarr", ".h5ad"))}
    )
    if dirs or objects:
        return "dir", [c for c in children if not c.startswith(".")]
    return "missing", []


def _expand_url(item: str) -> list[InputSpec]:
    url = parse_url(item, InputError)
    store = object_store(url, InputError)
    try:
        if _GLOB_CHARS & set(url.key):
            matches = glob_keys(store, url.key)
            if not matches:
                raise InputError(item, "the pattern matches no object")
            out: list[InputSpec] = []
            for m in matches:
                out.extend(_expand_url(S3URL(url.bucket, m).url))
            return out
        kind, children = _url_kind(store, url)
    except InputError:
        raise
    except Exception as e:
        raise _url_error(item, e) from None
    if kind == "missing":
        raise InputError(item, "no such object or prefix in the bucket")
    if kind == "dir" and url.name.endswith(".zarr"):
        raise InputError(item, "is a prefix but not a zarr store (no zarr.json or .zgroup)")
    if kind == "dir":
        if not children:
            raise InputError(item, "the prefix contains no .h5ad or .zarr inputs")
        base = item.rstrip("/")
        return [InputSpec(url.child(c).url, f"{base}/{c}") for c in children]
    return [InputSpec(url.url, item)]


def _expand_one(item: str) -> list[InputSpec]:
    if is_url(item):
        return _expand_url(item)
    p = Path(item)
    if not p.exists() and _GLOB_CHARS & set(item):
        matches = sorted(glob.glob(item))
        if not matches:
            raise InputError(item, "the pattern matches no file")
        out: list[InputSpec] = []
        for m in matches:
            out.extend(_expand_one(m))
        return out
    if not p.exists():
        raise InputError(item, "no such file or directory")
    if p.is_dir() and not _is_zarr_dir(p) and p.suffix != ".zarr":
        children = sorted(
            c for c in p.iterdir() if c.suffix in {".h5ad", ".zarr"} and not c.name.startswith(".")
        )
        if not children:
            raise InputError(item, "the directory contains no .h5ad or .zarr inputs")
        return [InputSpec(str(c.resolve()), os.path.join(item, c.name)) for c in children]
    return [InputSpec(str(p.resolve()), item)]


def resolve_inputs(inputs: str | os.PathLike[str] | Iterable[str | os.PathLike[str]]) -> list[InputSpec]:
    """Expand files, directories and glob patterns into a list of inputs, in the order given.

    Parameters
    ----------
    inputs
        Paths to ``.h5ad`` files or AnnData ``.zarr`` stores, directories (every ``.h5ad``/``.zarr`` directly
        inside, sorted by name) or glob patterns (matches sorted by name). Each may also be an ``s3://bucket/key``
        URL of an object, a zarr store, a prefix or a pattern (credentials from the environment).

    Returns
    -------
    list[InputSpec]
        The resolved inputs.

    Raises
    ------
    InputError
        If a path does not exist, a pattern or directory yields nothing, an input is listed twice, or no
        input is given at all.
    """
    items = [inputs] if isinstance(inputs, str | os.PathLike) else list(inputs)
    if not items:
        raise InputError("<inputs>", "no input files were given")
    resolved: list[InputSpec] = []
    seen: dict[str, str] = {}
    for item in items:
        for spec in _expand_one(os.fspath(item)):
            if spec.path in seen:
                raise InputError(
                    spec.display, f"is listed twice (also as {seen[spec.path]}); give each input once"
                )
            seen[spec.path] = spec.display
            resolved.append(spec)
    return resolved


# --------------------------------------------------------------------------------------------------
# Metadata
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ColumnSpec:
    """The type of one obs column in one input.

    Attributes
    ----------
    kind
        ``categorical``, ``numeric``, ``bool``, ``string``, ``nullable-integer`` or ``nullable-boolean``.
    dtype
        The numpy dtype string of the values (of the codes' categories for categoricals).
    categories
        The categories of a categorical column, in order.
    ordered
        Whether a categorical is ordered.
    """

    kind: ColumnKind
    dtype: str
    categories: tuple[Any, ...] | None = None
    ordered: bool = False


@dataclass
class SourceInfo:
    """Metadata of one input, read when it is opened (no X data is read).

    Attributes
    ----------
    path, display
        See :class:`InputSpec`.
    format
        ``h5ad`` or ``zarr``.
    n_obs, n_vars
        Shape of X.
    x_kind
        ``csr`` or ``dense``.
    dtype
        dtype of X.
    nnz
        Stored entries of X (``n_obs * n_vars`` for dense X).
    var_names
        Gene names, in file order.
    obs_names
        Cell names, in file order.
    obs_columns
        The type of each obs column, in column order.
    size_bytes
        Bytes on disk (the whole store for zarr).
    mtime
        Modification time (newest file for zarr), seconds since the epoch.
    reader
        How the input is read: ``h5py``, ``virtual`` (an ``.h5ad`` through a virtualizarr manifest) or
        ``zarr``. Not part of the input's identity: every reader gives the same values.
    x_chunk
        Length of one stored chunk of X along its first axis (entries of CSR ``data``, rows of dense X; the
        inner chunk of a sharded zarr array); 0 where X is stored contiguously (unchunked HDF5).
    x_compression
        X's compressor (``zstd``, ``blosc``, ``gzip``, ``lzf``, ...; ``none``; several joined by ``+``).
    x_direct
        Whether the engine decodes X's chunks itself (a local zarr store in a layout it knows, see
        :class:`_ZarrChunks`) rather than through zarr-python; the planner's memory model depends on it.
    """

    path: str
    display: str
    format: str
    n_obs: int
    n_vars: int
    x_kind: XKind
    dtype: np.dtype
    nnz: int
    var_names: pd.Index
    obs_names: pd.Index
    obs_columns: dict[str, ColumnSpec] = field(default_factory=dict)
    size_bytes: int = 0
    mtime: float = 0.0
    reader: str = ""
    x_chunk: int = 0
    x_compression: str = ""
    x_direct: bool = False

    @property
    def raw_x_bytes(self) -> int:
        """Uncompressed bytes of X (data + indices + indptr for CSR)."""
        if self.x_kind == "dense":
            return self.n_obs * self.n_vars * self.dtype.itemsize
        return self.nnz * (self.dtype.itemsize + 4) + (self.n_obs + 1) * 8


def coalesce_runs(runs: np.ndarray) -> np.ndarray:
    """Merge runs that touch into single ranges.

    Parameters
    ----------
    runs
        ``(m, 2)`` array of ``[start, stop)`` row ranges sorted by start, not overlapping.

    Returns
    -------
    numpy.ndarray
        ``(k, 2)`` array of merged ranges, ``k <= m``.
    """
    runs = np.asarray(runs, dtype=np.int64).reshape(-1, 2)
    if len(runs) <= 1:
        return runs.copy()
    breaks = np.flatnonzero(runs[1:, 0] != runs[:-1, 1]) + 1
    starts = runs[np.concatenate([[0], breaks]), 0]
    stops = runs[np.concatenate([breaks - 1, [len(runs) - 1]]), 1]
    return np.stack([starts, stops], axis=1)


# --------------------------------------------------------------------------------------------------
# The source interface
# --------------------------------------------------------------------------------------------------
class Source(ABC):
    """An opened AnnData input.

    Subclasses implement the format hooks (how to open, how to tell arrays from groups, how to read a slice);
    the AnnData layout logic (encodings of X and obs) is shared here.

    Parameters
    ----------
    spec
        The input to open.
    """

    format: ClassVar[str]
    reader: ClassVar[str]

    def __init__(self, spec: InputSpec, info: SourceInfo | None = None) -> None:
        self.spec = spec
        self._root: Any = None
        self._indptr: np.ndarray | None = None
        if info is None:
            try:
                info = self._scan()
            except (OSError, KeyError) as e:  # how h5py and zarr report damaged files
                self.close()
                reason = str(e).strip("'\"").split("\n")[0] or type(e).__name__
                raise self._fail(f"cannot be read ({reason}); the file is corrupt") from e
        self.info = info

    # -- format hooks ---------------------------------------------------------------------------------
    @abstractmethod
    def _open(self) -> Any:
        """Open the store and return its root group."""

    @abstractmethod
    def _is_array(self, node: Any) -> bool:
        """Whether ``node`` is an array (as opposed to a group)."""

    @abstractmethod
    def _read_range(self, arr: Any, lo: int, hi: int) -> np.ndarray:
        """Read ``arr[lo:hi]`` as a numpy array (strings as str objects)."""

    @abstractmethod
    def _disk_stat(self) -> tuple[int, float]:
        """Return bytes on disk and newest modification time."""

    def _read_range_into(self, arr: Any, lo: int, hi: int, out: np.ndarray) -> None:
        out[...] = self._read_range(arr, lo, hi)

    def _storage(self, arr: Any) -> tuple[int, str]:
        """Chunk length along the first axis (0: contiguous) and compressor name of a zarr-like array."""
        chunks = getattr(arr, "chunks", None)
        names = [_codec_name(c) for c in getattr(arr, "compressors", ()) or ()]
        return (int(chunks[0]) if chunks else 0), "+".join(names) or "none"

    # -- lifecycle ------------------------------------------------------------------------------------
    def stat(self) -> tuple[int, float]:
        """Bytes on disk and newest modification time, as now."""
        return self._disk_stat()

    @property
    def root(self) -> Any:
        """The open root group (opened on first use)."""
        if self._root is None:
            self._root = self._open()
        return self._root

    def close(self) -> None:
        """Close the underlying file, if any."""
        self._root = None

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_root"] = None
        return state

    def __repr__(self) -> str:
        i = self.info
        name = type(self).__name__
        return f"{name}({i.display!r}, n_obs={i.n_obs}, n_vars={i.n_vars}, X={i.x_kind}/{i.dtype})"

    def _fail(self, problem: str) -> InputError:
        return InputError(self.spec.display, problem)

    # -- scanning -------------------------------------------------------------------------------------
    def _scan(self) -> SourceInfo:
        root = self.root
        for key in ("X", "obs", "var"):
            if key not in root:
                raise self._fail(f"not an AnnData file: it has no '{key}' element")
        x = root["X"]
        enc = str(x.attrs.get("encoding-type", ""))
        if self._is_array(x):
            if enc not in ("", "array"):
                raise self._fail(f"X has unsupported encoding {enc!r}")
            if len(x.shape) != 2:
                raise self._fail(f"X must be 2-dimensional, found shape {tuple(x.shape)}")
            x_kind: XKind = "dense"
            n_obs, n_vars = (int(s) for s in x.shape)
            dtype = np.dtype(x.dtype)
            nnz = n_obs * n_vars
        else:
            legacy = x.attrs.get("h5sparse_format")
            if enc == "csc_matrix" or legacy == "csc":
                raise self._fail(
                    "X is a CSC sparse matrix; annbatch collections are row-major, convert it with "
                    "adata.X = adata.X.tocsr() and save again"
                )
            if enc != "csr_matrix" and legacy != "csr":
                raise self._fail(
                    f"X has unsupported encoding {enc or 'unknown'!r} (need a dense array or CSR)"
                )
            for key in ("data", "indices", "indptr"):
                if key not in x:
                    raise self._fail(f"X is a CSR matrix without '{key}'; the file is incomplete")
            shape = x.attrs.get("shape", x.attrs.get("h5sparse_shape"))
            if shape is None or len(shape) != 2:
                raise self._fail("X is a CSR matrix without a valid 'shape' attribute")
            x_kind = "csr"
            n_obs, n_vars = int(shape[0]), int(shape[1])
            dtype = np.dtype(x["data"].dtype)
            nnz = int(x["data"].shape[0])
            if int(x["indptr"].shape[0]) != n_obs + 1:
                raise self._fail(
                    f"X/indptr has {x['indptr'].shape[0]} entries for {n_obs} rows; the file is corrupt"
                )
        if dtype.kind not in "biuf":
            raise self._fail(
                f"X has non-numeric dtype {dtype}; only integer, float and bool X can be shuffled"
            )
        if n_obs == 0:
            raise self._fail("has 0 cells; remove it from the inputs")
        if n_vars == 0:
            raise self._fail("has 0 genes; remove it from the inputs")
        var_names = self._read_index(root["var"], "var")
        if len(var_names) != n_vars:
            raise self._fail(f"var has {len(var_names)} rows but X has {n_vars} columns; the file is corrupt")
        if var_names.has_duplicates:
            dup = var_names[var_names.duplicated()][0]
            raise self._fail(
                f"duplicate gene name {dup!r} in var; make them unique (adata.var_names_make_unique())"
            )
        obs_names = self._read_index(root["obs"], "obs")
        if len(obs_names) != n_obs:
            raise self._fail(f"obs has {len(obs_names)} rows but X has {n_obs}; the file is corrupt")
        obs_columns = self._scan_obs(root["obs"])
        x_chunk, x_compression = self._storage(x if x_kind == "dense" else x["data"])
        size, mtime = self._disk_stat()
        return SourceInfo(
            path=self.spec.path,
            display=self.spec.display,
            format=self.format,
            n_obs=n_obs,
            n_vars=n_vars,
            x_kind=x_kind,
            dtype=dtype,
            nnz=nnz,
            var_names=var_names,
            obs_names=obs_names,
            obs_columns=obs_columns,
            size_bytes=size,
            mtime=mtime,
            reader=self.reader,
            x_chunk=x_chunk,
            x_compression=x_compression,
        )

    def _read_index(self, df_group: Any, what: str) -> pd.Index:
        if self._is_array(df_group):
            raise self._fail(f"{what} is not an AnnData dataframe (unsupported legacy layout)")
        key = df_group.attrs.get("_index", "_index")
        if key not in df_group:
            raise self._fail(f"{what} has no index column {key!r}; not an AnnData file")
        arr = df_group[key]
        if not self._is_array(arr):
            # anndata >= 0.12 with pandas' string dtype writes the index as a nullable-string-array group
            enc = str(arr.attrs.get("encoding-type", ""))
            if enc != "nullable-string-array" or "values" not in arr:
                raise self._fail(f"{what} index has unsupported encoding {enc or 'unknown'!r}")
            arr = arr["values"]
        values = self._read_range(arr, 0, int(arr.shape[0]))
        return pd.Index(np.asarray(values).astype(str), dtype=object)

    def _column_order(self, obs: Any) -> list[str]:
        order = obs.attrs.get("column-order", [])
        if isinstance(order, str):
            order = [order]
        return [str(c) for c in order]

    def _scan_obs(self, obs: Any) -> dict[str, ColumnSpec]:
        specs: dict[str, ColumnSpec] = {}
        for name in self._column_order(obs):
            if name not in obs:
                raise self._fail(f"obs column {name!r} is listed but missing; the file is corrupt")
            specs[name] = self._column_spec(obs[name], name)
        return specs

    def _column_spec(self, node: Any, name: str) -> ColumnSpec:
        enc = str(node.attrs.get("encoding-type", ""))
        if self._is_array(node):
            dt = np.dtype(node.dtype) if not _is_string_dtype(node.dtype) else np.dtype(object)
            if enc == "string-array" or dt.kind in "OSUT":
                return ColumnSpec("string", "object")
            if dt.kind == "b":
                return ColumnSpec("bool", "bool")
            if dt.kind in "iuf":
                return ColumnSpec("numeric", dt.str)
            raise self._fail(f"obs column {name!r} has unsupported dtype {dt}")
        if enc == "categorical":
            cats = self._read_range(node["categories"], 0, int(node["categories"].shape[0]))
            cats_arr = np.asarray(cats)
            if cats_arr.dtype.kind in "SUT" or cats_arr.dtype == object:
                cats_arr = cats_arr.astype(str).astype(object)
            ordered = bool(node.attrs.get("ordered", False))
            return ColumnSpec("categorical", cats_arr.dtype.str, tuple(cats_arr.tolist()), ordered)
        if enc == "nullable-integer":
            return ColumnSpec("nullable-integer", np.dtype(node["values"].dtype).str)
        if enc == "nullable-boolean":
            return ColumnSpec("nullable-boolean", "bool")
        if enc == "nullable-string-array":
            return ColumnSpec("string", "object")
        raise self._fail(f"obs column {name!r} has unsupported encoding {enc or 'unknown'!r}")

    # -- reading X ------------------------------------------------------------------------------------
    @property
    def indptr(self) -> np.ndarray:
        """Row pointers of a CSR X as int64 (read once, then cached)."""
        if self.info.x_kind != "csr":
            raise TypeError("indptr exists only for CSR X")
        if self._indptr is None:
            arr = self.root["X"]["indptr"]
            indptr = np.asarray(self._read_range(arr, 0, int(arr.shape[0])), dtype=np.int64)
            if indptr[0] != 0 or indptr[-1] != self.info.nnz or np.any(np.diff(indptr) < 0):
                raise self._fail("X/indptr is not a valid CSR row pointer; the file is corrupt")
            self._indptr = indptr
        return self._indptr

    def run_nnz(self, runs: np.ndarray) -> np.ndarray:
        """Stored entries in each of ``runs`` (``(m, 2)`` row ranges)."""
        runs = np.asarray(runs, dtype=np.int64).reshape(-1, 2)
        if self.info.x_kind == "dense":
            return (runs[:, 1] - runs[:, 0]) * self.info.n_vars
        ip = self.indptr
        return ip[runs[:, 1]] - ip[runs[:, 0]]

    def read_csr_into(self, runs: np.ndarray, data_out: np.ndarray, indices_out: np.ndarray) -> int:
        """Read the CSR entries of sorted row runs into preallocated buffers.

        Parameters
        ----------
        runs
            ``(m, 2)`` row ranges sorted by start.
        data_out, indices_out
            Buffers of at least ``run_nnz(runs).sum()`` elements; values are cast to their dtypes.

        Returns
        -------
        int
            Number of entries written.
        """
        x = self.root["X"]
        data, indices = x["data"], x["indices"]  # looked up once: an h5py lookup costs ~0.1 ms
        ip = self.indptr
        ranges = [(int(ip[lo]), int(ip[hi])) for lo, hi in coalesce_runs(runs)]
        gap = self._merge_gap(data)
        pos = 0
        for group in _group_ranges(ranges, gap):
            if len(group) == 1:  # one read straight into place
                a, b = group[0]
                n = b - a
                if n:
                    self._read_range_into(data, a, b, data_out[pos : pos + n])
                    self._read_range_into(indices, a, b, indices_out[pos : pos + n])
                pos += n
                continue
            # ranges close together inside compressed chunks: read the span once, keep the ranges
            lo, hi = group[0][0], group[-1][1]
            span_data = self._read_range(data, lo, hi)
            span_idx = self._read_range(indices, lo, hi)
            for a, b in group:
                n = b - a
                data_out[pos : pos + n] = span_data[a - lo : b - lo]
                indices_out[pos : pos + n] = span_idx[a - lo : b - lo]
                pos += n
        return pos

    def _merge_gap(self, arr: Any) -> int:
        """Largest gap (in elements) between ranges worth reading through rather than reading apart.

        0 where a read costs only its bytes; about one compressed chunk where every read decodes whole chunks.
        """
        return 0

    def read_dense_into(self, runs: np.ndarray, out: np.ndarray) -> None:
        """Read the rows of sorted row runs of a dense X into ``out`` (cast to its dtype)."""
        x = self.root["X"]
        pos = 0
        for lo, hi in coalesce_runs(runs):
            self._read_range_into(x, int(lo), int(hi), out[pos : pos + hi - lo])
            pos += int(hi - lo)

    def read_dense(self, runs: np.ndarray) -> np.ndarray:
        """Read the rows of sorted row runs of X as a dense array (CSR X is densified)."""
        runs = np.asarray(runs, dtype=np.int64).reshape(-1, 2)
        n = int((runs[:, 1] - runs[:, 0]).sum())
        out = np.zeros((n, self.info.n_vars), dtype=self.info.dtype)
        if self.info.x_kind == "dense":
            self.read_dense_into(runs, out)
            return out
        nnz = self.run_nnz(runs)
        data = np.empty(int(nnz.sum()), dtype=self.info.dtype)
        indices = np.empty(int(nnz.sum()), dtype=np.int64)
        self.read_csr_into(runs, data, indices)
        row_nnz = np.concatenate([np.diff(self.indptr[lo : hi + 1]) for lo, hi in runs]) if len(runs) else []
        rows = np.repeat(np.arange(n), row_nnz)
        out[rows, indices] = data
        return out

    # -- reading obs ----------------------------------------------------------------------------------
    def read_obs(self, runs: np.ndarray) -> dict[str, Any]:
        """Read the obs columns of sorted row runs.

        Returns
        -------
        dict
            Column name to values: a numpy array, or for categoricals a ``(codes, categories)`` tuple with the
            codes in this file's category order, or for nullable columns a ``(values, mask)`` tuple.
        """
        obs = self.root["obs"]
        ranges = coalesce_runs(runs)
        out: dict[str, Any] = {}
        for name, spec in self.info.obs_columns.items():
            node = obs[name]
            if spec.kind == "categorical":
                codes = self._gather(node["codes"], ranges)
                out[name] = (codes, spec.categories)
            elif spec.kind in ("nullable-integer", "nullable-boolean") or (
                spec.kind == "string" and not self._is_array(node)
            ):
                out[name] = (
                    self._gather(node["values"], ranges),
                    self._gather(node["mask"], ranges).astype(bool),
                )
            else:
                out[name] = self._gather(node, ranges)
        return out

    def _gather(self, arr: Any, ranges: np.ndarray) -> np.ndarray:
        parts = [np.asarray(self._read_range(arr, int(lo), int(hi))) for lo, hi in ranges]
        if not parts:
            return np.asarray(self._read_range(arr, 0, 0))
        return parts[0] if len(parts) == 1 else np.concatenate(parts)


#: Bytes of an obs array an ``.h5ad`` read passes through rather than making another read call: about what
#: one h5py call costs (15-40 us) at the rate of copying from the page cache.
OBS_SPAN_BYTES = 32 << 10


def obs_merge_gap(dtype: np.dtype | str) -> int:
    """Largest gap (elements) between row ranges of an ``.h5ad`` obs array of ``dtype`` read as one span.

    Numbers and booleans only (0 for the rest: strings are decoded one by one, so what lies between the
    ranges is not cheap to pass through).
    """
    dt = np.dtype(dtype)
    return OBS_SPAN_BYTES // dt.itemsize if dt.kind in "biuf" else 0


def _read_spans(ranges: np.ndarray, gap: int, read: Callable[[int, int], Any]) -> np.ndarray:
    """The values of sorted ``ranges``, concatenated: ranges within ``gap`` of each other read as one span."""
    parts: list[np.ndarray] = []
    for group in _group_ranges([(int(lo), int(hi)) for lo, hi in ranges], gap):
        lo, hi = group[0][0], group[-1][1]
        span = np.asarray(read(lo, hi))
        parts += [span[a - lo : b - lo] for a, b in group]
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def _group_ranges(ranges: list[tuple[int, int]], gap: int) -> list[list[tuple[int, int]]]:
    """Group sorted, disjoint ranges whose gaps are at most ``gap`` (and whose span stays bounded)."""
    groups: list[list[tuple[int, int]]] = []
    limit = max(gap * 64, 1 << 24)  # never read more than ~16M elements at once
    for r in ranges:
        if groups and gap and r[0] - groups[-1][-1][1] <= gap and r[1] - groups[-1][0][0] <= limit:
            groups[-1].append(r)
        else:
            groups.append([r])
    return groups


def _is_string_dtype(dtype: Any) -> bool:
    try:
        dt = np.dtype(dtype)
    except TypeError:
        return True
    if dt.kind in "OSUT":
        return True
    return h5py.check_string_dtype(dt) is not None


# --------------------------------------------------------------------------------------------------
# Formats
# --------------------------------------------------------------------------------------------------
def _remote_stat(spec: InputSpec) -> tuple[int, float]:
    """Size and modification time of one object (``s3://`` URL)."""
    import obstore

    url = parse_url(spec.path, InputError)
    try:
        meta = obstore.head(object_store(url, InputError), url.key)
    except Exception as e:
        if is_not_found(e):
            raise InputError(spec.display, "no such object in the bucket") from None
        raise _url_error(spec.display, e) from None
    return int(meta["size"]), float(meta["last_modified"].timestamp())


#: HDF5 filter names by h5py's key (registered plugin ids for the common compressors).
_H5_FILTERS = {"32001": "blosc", "32015": "zstd", "32004": "lz4", "307": "bzip2", "32008": "bitshuffle"}
#: HDF5 filters that do not compress.
_H5_NOT_COMPRESSION = {"shuffle", "fletcher32", "scaleoffset", "nbit"}


def _codec_name(codec: Any) -> str:
    """``zstd``, ``blosc``, ``gzip``, ... of a zarr v3 codec or a numcodecs codec."""
    name = getattr(codec, "codec_id", None)
    if name is None:
        name = type(codec).__name__.removesuffix("Codec")
    name = str(name).lower()
    return "gzip" if name == "zlib" else name  # HDF5's deflate, as zarr's manifest names it


def _file_stat(spec: InputSpec) -> tuple[int, float]:
    if is_url(spec.path):
        return _remote_stat(spec)
    st = os.stat(spec.path)
    return st.st_size, st.st_mtime


class H5adSource(Source):
    """An ``.h5ad`` file read with h5py (opened once, read-only); on an object store through a file object."""

    format = "h5ad"
    reader = "h5py"

    def _open(self) -> Any:
        target: Any = self.spec.path
        if is_url(self.spec.path):
            from obspec_utils.readers import BlockStoreReader

            url = parse_url(self.spec.path, InputError)
            target = BlockStoreReader(
                object_store(url, InputError), url.key, block_size=4 << 20, max_cached_blocks=16
            )
        try:
            return h5py.File(target, "r")
        except OSError as e:
            reason = str(e).split("(")[0].strip().rstrip(".") or "unreadable"
            raise InputError(
                self.spec.display, f"cannot be read as HDF5 ({reason}); is it a truncated or corrupt .h5ad?"
            ) from None

    def close(self) -> None:  # noqa: D102
        if self._root is not None:
            with contextlib.suppress(Exception):  # closing a broken handle
                self._root.close()
        self._root = None
        fd = self.__dict__.pop("_fd", None)
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.__dict__.pop("_layouts", None)

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.pop("_fd", None)
        state.pop("_layouts", None)
        return state

    def _is_array(self, node: Any) -> bool:
        return isinstance(node, h5py.Dataset)

    def _storage(self, arr: Any) -> tuple[int, str]:
        # h5py names its built-in filters in ``_filters`` and gives plugins (Blosc, zstd) by id;
        # ``compression`` would name only gzip, lzf and szip
        names = [_H5_FILTERS.get(str(f), str(f)) for f in arr._filters if str(f) not in _H5_NOT_COMPRESSION]
        return (int(arr.chunks[0]) if arr.chunks else 0), "+".join(names) or "none"

    def _layout(self, arr: Any) -> _RawLayout | None:
        """Byte layout of an uncompressed numeric dataset of a local file (cached), else None.

        Such a dataset's rows are exact byte ranges of the file: they are read with ``os.preadv`` straight
        into the destination, without HDF5's chunk-by-chunk path and without h5py's global lock (so reads can
        run on several threads).
        """
        layouts: dict[str, _RawLayout | None] = self.__dict__.setdefault("_layouts", {})
        name = arr.name
        if name not in layouts:
            layouts[name] = None if is_url(self.spec.path) else _h5_layout(self.spec.path, arr)
        return layouts[name]

    def _read_range_into(self, arr: Any, lo: int, hi: int, out: np.ndarray) -> None:
        layout = self._layout(arr) if hi > lo and out.flags.c_contiguous else None
        if layout is not None and out.dtype == layout.dtype and out.shape[0] == hi - lo:
            fd = self.__dict__.get("_fd")
            if fd is None:
                fd = self.__dict__["_fd"] = os.open(self.spec.path, os.O_RDONLY)
            view = memoryview(out.reshape(-1).view(np.uint8))
            pos = 0
            for a, b in layout.pieces(lo, hi):
                while a < b:  # preadv may return short reads
                    n = os.preadv(fd, [view[pos : pos + b - a]], a)
                    if n <= 0:
                        raise self._fail("ended early while reading X; the file is truncated")
                    a += n
                    pos += n
            return
        if out.flags.c_contiguous and h5py.check_string_dtype(arr.dtype) is None and hi > lo:
            arr.read_direct(out, source_sel=np.s_[lo:hi])
        else:
            out[...] = self._read_range(arr, lo, hi)

    def _read_range(self, arr: Any, lo: int, hi: int) -> np.ndarray:
        if h5py.check_string_dtype(arr.dtype) is not None:
            return arr.asstr()[lo:hi] if arr.ndim else np.asarray([arr.asstr()[()]])
        return arr[lo:hi]

    def _gather(self, arr: Any, ranges: np.ndarray) -> np.ndarray:
        # an h5py read costs ~15-40 us whatever its size: ranges of a numeric obs array within
        # OBS_SPAN_BYTES of each other are read as one span (see obs_merge_gap)
        gap = obs_merge_gap(arr.dtype) if arr.ndim == 1 else 0
        if len(ranges) <= 1 or not gap:
            return super()._gather(arr, ranges)
        return _read_spans(ranges, gap, lambda lo, hi: arr[lo:hi])

    def _disk_stat(self) -> tuple[int, float]:
        return _file_stat(self.spec)


def _h5_layout(path: str, arr: h5py.Dataset) -> _RawLayout | None:
    """Byte layout of an HDF5 dataset stored uncompressed in ``path`` itself, chunked along axis 0 only."""
    dtype = arr.dtype
    if dtype.kind not in "biuf" or arr.ndim == 0 or arr.shape[0] == 0 or arr.external:
        return None
    dcpl = arr.id.get_create_plist()
    if dcpl.get_nfilters() > 0:
        return None
    row_bytes = int(np.prod(arr.shape[1:], dtype=np.int64)) * dtype.itemsize
    if row_bytes == 0:
        return None
    layout = dcpl.get_layout()
    if layout == h5py.h5d.CONTIGUOUS:
        offset = arr.id.get_offset()
        if offset is None:  # never written
            return None
        offsets = np.asarray([offset], dtype=np.int64)
        return _RawLayout(path, offsets, arr.shape[0], row_bytes, dtype, arr.shape)
    if layout != h5py.h5d.CHUNKED or not hasattr(arr.id, "chunk_iter"):
        return None
    chunk = arr.chunks
    if any(c < s for c, s in zip(chunk[1:], arr.shape[1:], strict=True)):
        return None
    n_chunks = -(-arr.shape[0] // chunk[0])
    found: list[tuple[int, int, int]] = []
    arr.id.chunk_iter(lambda info: found.append((info.chunk_offset[0], info.byte_offset, info.size)))
    if len(found) != n_chunks:  # chunks never written read as the fill value: leave them to HDF5
        return None
    found.sort()
    table = np.asarray(found, dtype=np.int64)
    if np.any(table[:, 0] != np.arange(n_chunks) * chunk[0]) or np.any(table[:, 2] < chunk[0] * row_bytes):
        return None
    return _RawLayout(path, table[:, 1].copy(), chunk[0], row_bytes, dtype, arr.shape)


class ZarrSource(Source):
    """An AnnData ``.zarr`` store (zarr format 2 or 3) read with zarr-python, local or on an object store."""

    format = "zarr"
    reader = "zarr"

    def _open(self) -> Any:
        import zarr

        store: Any = self.spec.path
        if is_url(self.spec.path):
            store = zarr_store(parse_url(self.spec.path, InputError), InputError, read_only=True)
        try:
            root = zarr.open_group(store, mode="r")
        except Exception as e:  # zarr raises several types for broken metadata
            reason = f"{type(e).__name__}: {e}".splitlines()[0]
            raise InputError(self.spec.display, f"cannot be opened as a zarr group ({reason})") from None
        return root

    def _is_array(self, node: Any) -> bool:
        import zarr

        return isinstance(node, zarr.Array)

    def _scan(self) -> SourceInfo:
        info = super()._scan()
        # whether read_csr_into will decode X's chunks itself (what the planner's memory model needs to know)
        if type(self) is ZarrSource and info.x_kind == "csr":
            x = self.root["X"]
            info.x_direct = all(self._chunk_reader(x[k]) is not None for k in ("data", "indices"))
        return info

    def _merge_gap(self, arr: Any) -> int:
        # zarr decodes whole (inner) chunks per read: ranges within a chunk or two of each other are read
        # together, so each chunk is decoded about once instead of once per run
        chunks = getattr(arr, "chunks", None)
        return int(chunks[0]) if chunks else 0

    def _read_range(self, arr: Any, lo: int, hi: int) -> np.ndarray:
        values = arr[lo:hi]
        if values.dtype.kind == "T":
            values = values.astype(object)
        return values

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.pop("_chunk_readers", None)
        return state

    def _chunk_reader(self, arr: Any) -> _ZarrChunks | None:
        """A direct reader of ``arr``'s chunks when it is a 1-D array of a local store (cached), else None."""
        readers: dict[str, _ZarrChunks | None] = self.__dict__.setdefault("_chunk_readers", {})
        key = str(arr.path)
        if key not in readers:
            readers[key] = _ZarrChunks.of(arr) if type(self) is ZarrSource else None
        return readers[key]

    def read_csr_into(self, runs: np.ndarray, data_out: np.ndarray, indices_out: np.ndarray) -> int:
        """Read the CSR entries of sorted row runs into buffers (see :meth:`Source.read_csr_into`).

        On a local store, the chunks holding the runs are read and decoded here, each once, on a few threads
        (zstd, Blosc and gzip release the GIL), and copied straight into the buffers; otherwise zarr-python
        reads them.
        """
        x = self.root["X"]
        data, indices = self._chunk_reader(x["data"]), self._chunk_reader(x["indices"])
        if data is None or indices is None:
            return super().read_csr_into(runs, data_out, indices_out)
        ip = self.indptr
        ranges = np.asarray([(int(ip[lo]), int(ip[hi])) for lo, hi in coalesce_runs(runs)], dtype=np.int64)
        ranges = ranges.reshape(-1, 2)
        data.read_into(ranges, data_out)
        indices.read_into(ranges, indices_out)
        return int((ranges[:, 1] - ranges[:, 0]).sum())

    def _gather(self, arr: Any, ranges: np.ndarray) -> np.ndarray:
        # every read decodes whole chunks: ranges within a chunk of each other are read as one span (an obs
        # column chunked as one piece is then read once, not once per run)
        gap = self._merge_gap(arr)
        if len(ranges) <= 1 or not gap:
            return super()._gather(arr, ranges)
        return _read_spans(ranges, gap, lambda lo, hi: self._read_range(arr, lo, hi))

    def _disk_stat(self) -> tuple[int, float]:
        size, mtime = 0, 0.0
        if is_url(self.spec.path):
            url = parse_url(self.spec.path, InputError)
            try:
                objects = list_keys(object_store(url, InputError, prefix=True))
            except Exception as e:
                raise _url_error(self.spec.display, e) from None
            for o in objects:
                size += int(o["size"])
                mtime = max(mtime, float(o["last_modified"].timestamp()))
            return size, mtime
        for dirpath, _, files in os.walk(self.spec.path):
            for f in files:
                st = os.stat(os.path.join(dirpath, f))
                size += st.st_size
                mtime = max(mtime, st.st_mtime)
        return size, mtime


class _ZarrChunks:
    """Read element ranges of a 1-D zarr array of a local store by decoding its chunks directly.

    zarr-python decodes a selection's chunks well, but every call has a fixed cost and a run's edge chunks are
    decoded again by the next call. Here the chunks under all the ranges of one read are each read (one
    ``pread``) and decoded once, on a small thread pool, and copied into place. Supported: zarr v3 arrays,
    sharded (``sharding_indexed``, inner ``bytes`` + one compressor, index ``bytes`` + ``crc32c``) or not,
    and zarr v2 arrays with one compressor and no filters; compressors zstd, Blosc, gzip or none.
    """

    _pool: ClassVar[Any] = None

    def __init__(
        self, root: Path, meta: Any, codec: Any, chunk: int, per_shard: int | None, index_end: bool
    ) -> None:
        self.root = root
        self.meta = meta
        self.codec = codec
        self.chunk = chunk
        self.per_shard = per_shard or 1  # inner chunks per stored object
        self.sharded = per_shard is not None
        self.index_end = index_end
        self.dtype = (
            np.dtype(meta.dtype.to_native_dtype()) if hasattr(meta.dtype, "to_native_dtype") else None
        )
        self.fill = meta.fill_value if meta.fill_value is not None else 0
        self.size = int(meta.shape[0])
        self._indexes: dict[int, np.ndarray | None] = {}

    @classmethod
    def of(cls, arr: Any) -> _ZarrChunks | None:
        """The reader for ``arr``, or None where zarr-python must read it."""
        try:
            from zarr.codecs import BloscCodec as ZBlosc
            from zarr.codecs import BytesCodec, Crc32cCodec, GzipCodec, ShardingCodec, ZstdCodec
            from zarr.storage import LocalStore
        except ImportError:  # pragma: no cover - zarr moved them
            return None
        store = arr.store_path.store
        if not isinstance(store, LocalStore) or arr.ndim != 1 or arr.shape[0] == 0:
            return None
        meta = arr.metadata
        root = Path(store.root)
        dtype = np.dtype(arr.dtype) if not isinstance(arr.dtype, str) else None
        if dtype is None or dtype.kind not in "biuf" or not dtype.isnative:
            return None

        def numcodec(c: Any) -> Any:
            import numcodecs

            if isinstance(c, ZstdCodec):
                return numcodecs.Zstd(level=c.level)
            if isinstance(c, ZBlosc):
                return numcodecs.Blosc()
            if isinstance(c, GzipCodec):
                return numcodecs.GZip()
            return False

        def plain(codecs: Any) -> Any:
            """The compressor of ``[bytes(little) (+ one compressor)]`` (None: uncompressed), else False."""
            if not codecs or not isinstance(codecs[0], BytesCodec):
                return False
            endian = str(getattr(codecs[0].endian, "value", codecs[0].endian))
            if endian not in ("little", "None") or len(codecs) > 2:
                return False
            return None if len(codecs) == 1 else numcodec(codecs[1])

        if int(arr.metadata.zarr_format) == 2:
            if meta.filters or meta.order != "C":
                return None
            comp = meta.compressor
            if comp is not None and comp.codec_id not in ("zstd", "blosc", "gzip", "zlib"):
                return None
            reader = cls(root / arr.store_path.path, meta, comp, int(meta.chunks[0]), None, True)
            reader.dtype = dtype
            return reader
        codecs = meta.codecs
        chunk = int(meta.chunk_grid.chunk_shape[0])
        if len(codecs) == 1 and isinstance(codecs[0], ShardingCodec):
            sc = codecs[0]
            comp = plain(sc.codecs)
            idx = sc.index_codecs
            if (
                comp is False
                or len(idx) != 2
                or not isinstance(idx[0], BytesCodec)
                or not isinstance(idx[1], Crc32cCodec)
            ):
                return None
            inner = int(sc.chunk_shape[0])
            if chunk % inner:
                return None
            loc = str(getattr(sc.index_location, "value", sc.index_location))
            reader = cls(root / arr.store_path.path, meta, comp, inner, chunk // inner, loc == "end")
        else:
            comp = plain(codecs)
            if comp is False:
                return None
            reader = cls(root / arr.store_path.path, meta, comp, chunk, None, True)
        reader.dtype = dtype
        return reader

    def _file(self, shard: int) -> Path:
        return self.root / self.meta.encode_chunk_key((shard,))

    def _index(self, shard: int) -> np.ndarray | None:
        """``(per_shard, 2)`` offsets and lengths of a shard's inner chunks; None if the shard is absent."""
        if shard not in self._indexes:
            path = self._file(shard)
            n = self.per_shard * 16 + 4
            try:
                with open(path, "rb") as f:
                    if self.index_end:
                        f.seek(-n, os.SEEK_END)
                    raw = f.read(n)
            except FileNotFoundError:
                self._indexes[shard] = None
                return None
            import google_crc32c

            if len(raw) != n or google_crc32c.value(raw[:-4]) != int.from_bytes(raw[-4:], "little"):
                raise OSError(f"shard index of {path} fails its checksum")
            self._indexes[shard] = np.frombuffer(raw[:-4], dtype="<u8").reshape(-1, 2)
        return self._indexes[shard]

    def _chunk(self, k: int) -> np.ndarray | None:
        """Decoded inner chunk ``k`` (None: never written, reads as the fill value)."""
        if not self.sharded:
            try:
                raw = self._file(k).read_bytes()
            except FileNotFoundError:
                return None
        else:
            index = self._index(k // self.per_shard)
            if index is None:
                return None
            off, n = (int(v) for v in index[k % self.per_shard])
            if off == 2**64 - 1:
                return None
            with open(self._file(k // self.per_shard), "rb") as f:
                raw = os.pread(f.fileno(), n, off)
            if len(raw) != n:
                raise OSError(f"{self._file(k // self.per_shard)} is truncated")
        dec = raw if self.codec is None else self.codec.decode(raw)
        return np.frombuffer(dec, dtype=self.dtype)

    def read_into(self, ranges: np.ndarray, out: np.ndarray) -> None:
        """Copy elements ``[a, b)`` of every range, one after another, into ``out``.

        Parameters
        ----------
        ranges
            ``(m, 2)`` sorted, disjoint element ranges.
        out
            Destination of at least the ranges' total length (values are cast to its dtype).
        """
        c = self.chunk
        work: dict[int, list[tuple[int, int, int]]] = {}  # chunk -> (chunk start, chunk end, out position)
        pos = 0
        for a, b in ranges.tolist():
            for k in range(a // c, (b - 1) // c + 1) if b > a else ():
                lo, hi = max(a, k * c), min(b, (k + 1) * c)
                work.setdefault(k, []).append((lo - k * c, hi - k * c, pos + lo - a))
            pos += b - a

        def one(k: int) -> None:
            values = self._chunk(k)
            for lo, hi, p in work[k]:
                if values is None:
                    out[p : p + hi - lo] = self.fill
                else:
                    out[p : p + hi - lo] = values[lo:hi]

        if len(work) <= 1:
            for k in work:
                one(k)
            return
        for _ in _ZarrChunks.pool().map(one, sorted(work)):
            pass

    @classmethod
    def pool(cls) -> Any:
        """Threads decoding chunks (one per CPU, at most 4), shared by every reader of the process."""
        if cls._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            cls._pool = ThreadPoolExecutor(cls.n_threads(), thread_name_prefix="zarr-read")
        return cls._pool

    @staticmethod
    def n_threads() -> int:
        """Threads of :meth:`pool`: one per CPU, at most 4."""
        return max(1, min(os.cpu_count() or 1, 4))


# --------------------------------------------------------------------------------------------------
# HDF5 virtualization
# --------------------------------------------------------------------------------------------------
class VirtualizationFallback(UserWarning):
    """An ``.h5ad`` input could not be virtualized and is read with h5py instead (a filter or layout)."""


class VirtualizationError(Exception):
    """Internal: virtualizarr could not describe this file (the caller falls back to h5py)."""


#: Top-level AnnData elements never read (their encodings, e.g. string datasets in uns, may not virtualize).
_DROP = ("uns", "obsm", "varm", "obsp", "varp", "layers", "raw")


@dataclass(frozen=True)
class _RawLayout:
    """An uncompressed array chunked along axis 0 only, every chunk stored in full in one object.

    Row ``r`` starts at byte ``offsets[r // chunk_rows] + (r % chunk_rows) * row_bytes``; a contiguous HDF5
    dataset is a single chunk. Reads of any row range are then exact byte ranges, whatever the chunk size.
    """

    url: str
    offsets: np.ndarray
    chunk_rows: int
    row_bytes: int
    dtype: np.dtype
    shape: tuple[int, ...]

    def pieces(self, lo: int, hi: int) -> list[tuple[int, int]]:
        """Byte ranges ``[start, end)`` holding rows ``[lo, hi)``, in order."""
        c, rb = self.chunk_rows, self.row_bytes
        out = []
        for k in range(lo // c, (hi - 1) // c + 1):
            a, b = max(lo, k * c) - k * c, min(hi, (k + 1) * c) - k * c
            base = int(self.offsets[k])
            if out and out[-1][1] == base + a * rb:  # chunks stored back to back: one piece
                out[-1] = (out[-1][0], base + b * rb)
            else:
                out.append((base + a * rb, base + b * rb))
        return out


def _raw_layout(arr: Any) -> _RawLayout | None:
    """The byte layout of a virtual array, when reads can bypass zarr (uncompressed, axis-0 chunks)."""
    meta = arr.metadata.to_dict()
    codecs = meta.get("codecs", ())
    if len(codecs) != 1 or codecs[0].get("name") != "bytes":
        return None
    shape = tuple(int(s) for s in meta["shape"])
    chunk = tuple(int(c) for c in meta["chunk_grid"]["configuration"]["chunk_shape"])
    if not shape or shape[0] == 0 or any(c < s for c, s in zip(chunk[1:], shape[1:], strict=True)):
        return None  # chunked along an axis other than the first
    try:
        dtype = np.dtype(str(meta["data_type"]))
    except TypeError:
        return None
    if dtype.kind not in "biuf":
        return None
    endian = (codecs[0].get("configuration") or {}).get("endian") or "little"
    dtype = dtype.newbyteorder("<" if endian == "little" else ">")
    manifest = arr.manifest
    if manifest._inlined:
        return None
    paths = np.asarray(manifest._paths).reshape(-1)
    offsets = np.asarray(manifest._offsets, dtype=np.int64).reshape(-1)
    lengths = np.asarray(manifest._lengths, dtype=np.int64).reshape(-1)
    row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
    n_chunks = -(-shape[0] // chunk[0])
    if len(paths) != n_chunks or row_bytes == 0 or len(set(paths.tolist())) != 1:
        return None  # missing (never written) chunks, or chunks in several files
    single = n_chunks == 1 and lengths[0] >= shape[0] * row_bytes  # contiguous: as long as the data
    if np.any(lengths < chunk[0] * row_bytes) and not single:
        return None
    return _RawLayout(str(paths[0]), offsets, chunk[0], row_bytes, dtype, shape)


def _walk_layouts(group: Any, prefix: str, out: dict[str, _RawLayout]) -> None:
    for name, arr in group.arrays.items():
        layout = _raw_layout(arr)
        if layout is not None:
            out[f"{prefix}{name}"] = layout
    for name, sub in group.groups.items():
        _walk_layouts(sub, f"{prefix}{name}/", out)


def _registry_for(spec: InputSpec) -> tuple[Any, str]:
    """An obspec_utils registry that resolves this input's URL, and the URL."""
    from obspec_utils.registry import ObjectStoreRegistry

    if is_url(spec.path):
        url = parse_url(spec.path, InputError)
        store = object_store(S3URL(url.bucket, ""), InputError)
        return ObjectStoreRegistry({f"s3://{url.bucket}": store}), url.url
    from obstore.store import LocalStore

    directory = os.path.dirname(os.path.abspath(spec.path))
    return (
        ObjectStoreRegistry({f"file://{directory}/": LocalStore(prefix=directory)}),
        f"file://{os.path.abspath(spec.path)}",
    )


def build_manifest_store(spec: InputSpec) -> Any:
    """Parse an ``.h5ad`` file's HDF5 metadata into a virtualizarr ``ManifestStore`` (X, obs and var).

    Dense X is an HDF5 dataset, not a group, so the root is parsed with every other top-level element dropped.

    Raises
    ------
    VirtualizationError
        If virtualizarr cannot describe the file (a filter without a zarr codec such as LZF, object
        references, an unusual layout); the message says why.
    """
    from virtualizarr.parsers import HDFParser

    registry, url = _registry_for(spec)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return HDFParser(group=None, drop_variables=list(_DROP))(url, registry)
    except InputError:
        raise
    except Exception as e:  # the parser raises many types (codec lookups, NotImplementedError, ValueError)
        raise VirtualizationError(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e


#: Manifests built in this process, so that a plan's execution does not parse its inputs again.
_MANIFESTS: dict[tuple[str, int, float], Any] = {}
_MANIFEST_CACHE_SIZE = 4096


def manifests_of(infos: Sequence[SourceInfo]) -> dict[tuple[str, int, float], Any]:
    """The manifests this process built for local ``infos`` read virtualized, to ship to workers.

    Manifests of objects on a store are left out: their store client does not pickle (obstore panics), so a
    worker parses those itself.
    """
    keys = [(i.path, i.size_bytes, i.mtime) for i in infos if i.reader == "virtual" and not is_url(i.path)]
    return {k: _MANIFESTS[k] for k in keys if k in _MANIFESTS}


def remember_manifests(manifests: dict[tuple[str, int, float], Any]) -> None:
    """Make manifests built elsewhere (:func:`manifests_of`) known here; those inputs open unparsed."""
    for key, store in manifests.items():
        _MANIFESTS.setdefault(key, store)


class _Clearing:
    """Context manager that drops a store's prefetched chunks on exit."""

    def __init__(self, store: Any) -> None:
        self.store = store

    def __enter__(self) -> Any:
        return self.store

    def __exit__(self, *exc: object) -> None:
        self.store.clear()


class VirtualH5adSource(ZarrSource):
    """An ``.h5ad`` file read through zarr on a virtualizarr ``ManifestStore``, without h5py.

    The file's HDF5 metadata (X, obs, var) is parsed once into a manifest of byte ranges; values are then read
    by zarr (compressed chunks: gzip, ...) or, for uncompressed arrays whose rows lie back to back (anndata's
    default layout for sparse and dense X and for obs columns), by exact byte-range reads, batched and
    concurrent, so that a contiguous dataset is never fetched whole. The manifest pickles, so the source can
    be shipped to another process without parsing again.
    """

    format = "h5ad"
    reader = "virtual"

    def __init__(self, spec: InputSpec, info: SourceInfo | None = None, manifest: Any = None) -> None:
        self._store = manifest
        if manifest is None and info is not None:  # reopened for a plan: reuse the scan's manifest
            self._store = _MANIFESTS.get((spec.path, info.size_bytes, info.mtime))
        self._layouts: dict[str, _RawLayout] | None = None
        self._obstores: dict[str, tuple[Any, str]] = {}
        super().__init__(spec, info)
        self.remember()

    def remember(self) -> None:
        """Keep this file's manifest for reopening it in this process (keyed by path, size and mtime)."""
        if self._store is not None:
            _MANIFESTS[(self.spec.path, self.info.size_bytes, self.info.mtime)] = self._store
            while len(_MANIFESTS) > _MANIFEST_CACHE_SIZE:
                _MANIFESTS.pop(next(iter(_MANIFESTS)))

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_obstores"] = {}
        state["_nodes"] = {}
        return state

    def close(self) -> None:  # noqa: D102
        self._nodes: dict[str, Any] = {}
        super().close()

    def _node(self, path: str) -> Any:
        """The zarr node at ``path`` (cached: each lookup on a manifest costs a metadata round trip)."""
        nodes = self.__dict__.setdefault("_nodes", {})
        node = nodes.get(path)
        if node is None:
            node = nodes[path] = self.root[path]
        return node

    @property
    def manifest_store(self) -> Any:
        """The virtualizarr ``ManifestStore`` (built on first use), with a chunk cache for prefetching."""
        from ._manifest import PrefetchingManifestStore

        if self._store is None:
            self._store = build_manifest_store(self.spec)
        if not isinstance(self._store, PrefetchingManifestStore):
            self._store = PrefetchingManifestStore.wrap(self._store)
        return self._store

    def _prefetched_chunks(self, jobs: Sequence[tuple[Any, Sequence[tuple[int, int]]]]) -> Any:
        """Context: the compressed chunks of these (array, row ranges) are fetched at once, then dropped."""
        store = self.manifest_store
        try:
            store.prefetch([(arr, ranges) for arr, ranges in jobs if self._layout(arr) is None])
        except Exception as e:
            store.clear()
            raise InputError(self.spec.display, f"read failed ({describe_store_error(e)})") from None
        return _Clearing(store)

    def _open(self) -> Any:
        import zarr

        store = self.manifest_store
        if self._layouts is None:
            layouts: dict[str, _RawLayout] = {}
            _walk_layouts(store._group, "", layouts)
            self._layouts = layouts
        try:
            return zarr.open_group(store, mode="r", zarr_format=3)
        except Exception as e:
            raise VirtualizationError(f"zarr cannot open the manifest ({type(e).__name__}: {e})") from e

    def _scan(self) -> SourceInfo:
        info = super()._scan()
        self._probe()
        return info

    def _probe(self) -> None:
        """Decode the first element of every X array, so a codec zarr lacks shows now, not mid-run."""
        x = self.root["X"]
        arrays = [x] if self._is_array(x) else [x["data"], x["indices"], x["indptr"]]
        for arr in arrays:
            if arr.shape[0] and arr.path not in (self._layouts or {}):
                try:
                    arr[:1]
                except Exception as e:
                    raise VirtualizationError(f"X cannot be decoded ({type(e).__name__}: {e})") from e

    def _disk_stat(self) -> tuple[int, float]:
        return _file_stat(self.spec)

    # -- exact byte-range reads of uncompressed arrays ---------------------------------------------------
    def _layout(self, arr: Any) -> _RawLayout | None:
        if self._layouts is None:
            _ = self.root
        return (self._layouts or {}).get(str(getattr(arr, "path", "")).strip("/"))

    def _obstore(self, url: str) -> tuple[Any, str]:
        hit = self._obstores.get(url)
        if hit is None:
            store, path = self.manifest_store._registry.resolve(url)
            hit = (store, str(path).lstrip("/"))
            if hasattr(store, "prefix") and store.prefix and not is_url(url):
                hit = (store, os.path.relpath(url[len("file://") :], str(store.prefix)))
            self._obstores[url] = hit
        return hit

    def _fetch(self, layout: _RawLayout, ranges: Sequence[tuple[int, int]]) -> list[np.ndarray]:
        """Rows ``[lo, hi)`` of each range, read with one batched, concurrent request set."""
        return self._fetch_all([(layout, ranges)])[0]

    def _fetch_all(
        self, jobs: Sequence[tuple[_RawLayout, Sequence[tuple[int, int]]]]
    ) -> list[list[np.ndarray]]:
        """:meth:`_fetch` for several arrays at once: every range of every array is requested concurrently."""
        import asyncio

        import obstore
        from zarr.core.sync import sync

        pieces = [[layout.pieces(lo, hi) if hi > lo else [] for lo, hi in ranges] for layout, ranges in jobs]

        async def one(layout: _RawLayout, per_range: list[list[tuple[int, int]]]) -> list[Any]:
            flat = [p for ps in per_range for p in ps]
            if not flat:
                return []
            store, path = self._obstore(layout.url)
            return await obstore.get_ranges_async(
                store, path, starts=[a for a, _ in flat], ends=[b for _, b in flat]
            )

        async def run() -> list[list[Any]]:
            return list(
                await asyncio.gather(*(one(job[0], ps) for job, ps in zip(jobs, pieces, strict=True)))
            )

        try:
            results = sync(run())
        except Exception as e:
            raise InputError(self.spec.display, f"read failed ({describe_store_error(e)})") from None
        out: list[list[np.ndarray]] = []
        for (layout, ranges), per_range, blobs_list in zip(jobs, pieces, results, strict=True):
            blobs = iter(blobs_list)
            arrays = []
            for (lo, hi), ps in zip(ranges, per_range, strict=True):
                parts = [np.frombuffer(memoryview(next(blobs)), dtype=layout.dtype) for _ in ps]
                if not parts:
                    arr = np.empty(0, dtype=layout.dtype)
                else:
                    arr = parts[0] if len(parts) == 1 else np.concatenate(parts)
                arrays.append(arr.reshape(max(hi - lo, 0), *layout.shape[1:]))
            out.append(arrays)
        return out

    def read_obs(self, runs: np.ndarray) -> dict[str, Any]:
        """Read the obs columns of sorted row runs (see :meth:`Source.read_obs`).

        Every uncompressed column array is fetched at once, concurrently, before the columns are assembled.
        """
        _ = self.root
        ranges = [(int(lo), int(hi)) for lo, hi in coalesce_runs(runs)]
        wanted = [
            key
            for key in (self._layouts or {})
            if key.startswith("obs/") and key.split("/")[1] in self.info.obs_columns
        ]
        layouts = self._layouts or {}
        fetched = self._fetch_all([(layouts[k], ranges) for k in wanted])
        self._prefetched = {
            k: (parts[0] if len(parts) == 1 else np.concatenate(parts)) if parts else np.empty(0)
            for k, parts in zip(wanted, fetched, strict=True)
        }
        obs = self.root["obs"]
        compressed = []
        for name, spec in self.info.obs_columns.items():
            node = obs[name]  # (a ManifestStore answers "k in group" for any k: go by the encoding)
            if self._is_array(node):
                arrays = [node]
            else:
                arrays = [node["codes"]] if spec.kind == "categorical" else [node["values"], node["mask"]]
            compressed += [(a, ranges) for a in arrays if self._is_array(a) and self._layout(a) is None]
        try:
            with self._prefetched_chunks(compressed):
                return super().read_obs(runs)
        finally:
            self._prefetched = {}

    def _gather(self, arr: Any, ranges: np.ndarray) -> np.ndarray:
        hit = getattr(self, "_prefetched", {}).get(str(arr.path).strip("/"))
        if hit is not None:
            return hit.astype(hit.dtype.newbyteorder("="), copy=False)
        if len(ranges) > 1 and self._layout(arr) is None:  # compressed: one zarr call, chunks concurrently
            rows = np.concatenate([np.arange(lo, hi) for lo, hi in ranges])
            values = arr.get_orthogonal_selection(rows)
            return values.astype(object) if values.dtype.kind == "T" else values
        return Source._gather(self, arr, ranges)  # uncompressed: exact ranges, no spans

    def _read_range(self, arr: Any, lo: int, hi: int) -> np.ndarray:
        layout = self._layout(arr)
        if layout is None:
            return super()._read_range(arr, lo, hi)
        hi = min(hi, layout.shape[0])
        return self._fetch(layout, [(lo, max(lo, hi))])[0].astype(layout.dtype.newbyteorder("="))

    def _read_range_into(self, arr: Any, lo: int, hi: int, out: np.ndarray) -> None:
        layout = self._layout(arr)
        if layout is None:
            out[...] = super()._read_range(arr, lo, hi)
            return
        out[...] = self._fetch(layout, [(lo, hi)])[0]

    def read_csr_into(self, runs: np.ndarray, data_out: np.ndarray, indices_out: np.ndarray) -> int:
        """Read the CSR entries of sorted row runs into buffers (see :meth:`Source.read_csr_into`).

        Uncompressed ``data`` and ``indices`` are fetched with one batch of concurrent range requests each.
        """
        data, indices = self._node("X/data"), self._node("X/indices")
        d_layout, i_layout = self._layout(data), self._layout(indices)
        ip = self.indptr
        ranges = [(int(ip[lo]), int(ip[hi])) for lo, hi in coalesce_runs(runs)]
        if d_layout is None or i_layout is None:
            with self._prefetched_chunks([(data, ranges), (indices, ranges)]):
                return super().read_csr_into(runs, data_out, indices_out)
        pos = 0
        data_parts, index_parts = self._fetch_all([(d_layout, ranges), (i_layout, ranges)])
        for (a, b), d, i in zip(ranges, data_parts, index_parts, strict=True):
            n = b - a
            data_out[pos : pos + n] = d
            indices_out[pos : pos + n] = i
            pos += n
        return pos

    def read_dense_into(self, runs: np.ndarray, out: np.ndarray) -> None:
        """Read the rows of sorted row runs of a dense X into ``out`` (one batch of range requests)."""
        layout = self._layout(self._node("X"))
        ranges = [(int(lo), int(hi)) for lo, hi in coalesce_runs(runs)]
        if layout is None:
            with self._prefetched_chunks([(self._node("X"), ranges)]):
                super().read_dense_into(runs, out)
            return
        pos = 0
        for (lo, hi), block in zip(ranges, self._fetch(layout, ranges), strict=True):
            out[pos : pos + hi - lo] = block
            pos += hi - lo


# --------------------------------------------------------------------------------------------------
# Choosing and opening sources
# --------------------------------------------------------------------------------------------------
def _check_virtualize(virtualize: Any) -> Virtualize:
    if virtualize in ("auto", True, False):
        return virtualize  # type: ignore[no-any-return]
    from .errors import ParameterError

    raise ParameterError(f"virtualize must be 'auto', True or False, got {virtualize!r}")


#: h5py on an object store reads through a file object with this many bytes of 4 MiB blocks cached.
_H5PY_REMOTE_CACHE = 16 * (4 << 20)


def wants_virtual(spec: InputSpec, virtualize: Virtualize, size: int | None = None) -> bool:
    """Whether ``virtualize`` asks to read this ``.h5ad`` input through a manifest.

    ``"auto"`` picks the faster reader for the file and its store (measurements in ``benchmarks/README.md``):
    h5py for a local file (h5py's C reads from the page cache beat a manifest's range reads); on an object
    store, h5py through a block-cached file object when the whole object fits that cache (it then arrives in
    a few 4 MiB requests), and the manifest for larger objects (exact, concurrent range requests instead of
    re-fetching 4 MiB blocks for every scattered run).

    Parameters
    ----------
    spec
        The input.
    virtualize
        ``"auto"``, True or False.
    size
        Object size in bytes, if known (``"auto"`` on an object store); unknown counts as large.
    """
    if virtualize == "auto":
        return is_url(spec.path) and (size is None or size > _H5PY_REMOTE_CACHE)
    return bool(virtualize)


def _note_fallback(display: str, reason: str) -> None:
    warnings.warn(
        f"{display}: read with h5py, not virtualized ({reason})", VirtualizationFallback, stacklevel=3
    )


def _open_h5ad(spec: InputSpec, info: SourceInfo | None, virtual: bool) -> tuple[Source, str | None]:
    """Open an ``.h5ad`` input, virtualized if asked and possible; return the source and a fallback note."""
    if not virtual:
        return H5adSource(spec, info), None
    try:
        return VirtualH5adSource(spec, info), None
    except VirtualizationError as e:
        reason = str(e).replace("''", "'")
        if "lzf" in reason.lower():
            reason = f"LZF-compressed data has no zarr codec: {reason}"
        return H5adSource(spec, info), reason


def _looks_like_h5ad(spec: InputSpec) -> bool:
    if is_url(spec.path):
        import obstore

        url = parse_url(spec.path, InputError)
        try:
            head = bytes(obstore.get_range(object_store(url, InputError), url.key, start=0, length=8))
        except Exception as e:
            raise _url_error(spec.display, e) from None
        return head == b"\x89HDF\r\n\x1a\n"
    return bool(h5py.is_hdf5(spec.path))


def _open_one(spec: InputSpec, info: SourceInfo | None, virtualize: Virtualize) -> tuple[Source, str | None]:
    if info is not None and info.format == "h5ad":
        return _open_h5ad(spec, info, info.reader == "virtual")
    if info is not None and info.format == "zarr":
        return ZarrSource(spec, info), None
    if is_url(spec.path):
        url = parse_url(spec.path, InputError)
        try:
            kind, _ = _url_kind(object_store(url, InputError), url)
        except InputError:
            raise
        except Exception as e:
            raise _url_error(spec.display, e) from None
        if kind == "zarr":
            return ZarrSource(spec, info), None
        if kind != "file":
            raise InputError(spec.display, "no such object or zarr store in the bucket")
    else:
        p = Path(spec.path)
        if p.is_dir():
            if not _is_zarr_dir(p):
                raise InputError(
                    spec.display, "is a directory but not a zarr store (no zarr.json or .zgroup)"
                )
            return ZarrSource(spec, info), None
    if _looks_like_h5ad(spec):
        size = _remote_stat(spec)[0] if is_url(spec.path) and virtualize == "auto" else None
        return _open_h5ad(spec, info, wants_virtual(spec, virtualize, size))
    if spec.path.endswith(".h5ad"):
        raise InputError(spec.display, "cannot be read as HDF5; is it a truncated or corrupt .h5ad?")
    raise InputError(spec.display, "is neither an .h5ad file nor a .zarr store")


def open_source(
    spec: InputSpec | str, info: SourceInfo | None = None, *, virtualize: Virtualize = "auto"
) -> Source:
    """Open one input with the class for its format.

    Parameters
    ----------
    spec
        A resolved input, or a path or ``s3://`` URL.
    info
        Metadata from an earlier scan of the same input; skips the scan and reopens it with the same reader.
    virtualize
        How to read an ``.h5ad`` input: ``"auto"`` (see :func:`wants_virtual`), ``True`` (a virtualizarr
        manifest) or ``False`` (h5py). A file that cannot be virtualized is read
        with h5py, with a :class:`VirtualizationFallback` warning saying why.

    Returns
    -------
    Source
        The opened source, metadata scanned.

    Raises
    ------
    InputError
        If the format is not recognised or the file is not a readable AnnData file.
    """
    if isinstance(spec, str):
        (spec,) = resolve_inputs([spec])
    source, note = _open_one(spec, info, _check_virtualize(virtualize))
    if note:
        _note_fallback(spec.display, note)
    return source


def input_exists(path: str) -> bool:
    """Whether an input (local path or ``s3://`` URL of an object or zarr store) still exists."""
    if not is_url(path):
        return os.path.exists(path)
    url = parse_url(path, InputError)
    try:
        kind, _ = _url_kind(object_store(url, InputError), url)
    except InputError:
        raise
    except Exception as e:
        raise _url_error(path, e) from None
    return kind in ("file", "zarr")


def _open_in_worker(
    spec: InputSpec, virtualize: Virtualize, env: dict[str, str]
) -> tuple[Source, str | None]:
    os.environ.update(env)  # a forkserver's workers have the environment it started with
    source, note = _open_one(spec, None, virtualize)
    source.close()
    return source, note


#: Zarr inputs opened at once by :func:`open_sources` (threads).
_OPEN_THREADS = 8
#: Parse files in a process pool only when parsing them one by one would take longer than this (seconds):
#: a worker process needs a few seconds to start and import.
_POOL_WORTH_SECONDS = 4.0


def _pool_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def open_sources(
    inputs: Sequence[InputSpec], *, virtualize: Virtualize = "auto", workers: int | None = None
) -> list[Source]:
    """Open every input, closing those already opened if one fails.

    ``.h5ad`` inputs to be virtualized are parsed in a process pool sized to the machine (at most one worker
    per core) when timing the first one shows that one by one would take longer than starting the pool.

    Parameters
    ----------
    inputs
        Resolved inputs.
    virtualize
        See :func:`open_source`.
    workers
        Size of the parsing pool (default: the cores available; 1 parses in this process).

    Returns
    -------
    list[Source]
        Opened sources, in input order.
    """
    virtualize = _check_virtualize(virtualize)
    opened: dict[int, Source] = {}
    virtual = [i for i, s in enumerate(inputs) if _may_virtualize(s, virtualize)]
    workers = _pool_workers() if workers is None else max(1, int(workers))
    try:
        t0 = time.perf_counter()
        for i in virtual[:1]:
            opened[i] = open_source(inputs[i], virtualize=virtualize)
        first = time.perf_counter() - t0
        rest = virtual[1:]
        if rest and workers > 1 and first * len(rest) > _POOL_WORTH_SECONDS:
            ctx = multiprocessing.get_context("forkserver")
            ctx.set_forkserver_preload(["annbatch_nb.sources"])
            with ProcessPoolExecutor(max_workers=min(workers, len(rest)), mp_context=ctx) as pool:
                env = store_env()
                futures = {i: pool.submit(_open_in_worker, inputs[i], virtualize, env) for i in rest}
                for i, fut in futures.items():
                    opened[i], note = fut.result()
                    if isinstance(opened[i], VirtualH5adSource):
                        opened[i].remember()
                    if note:
                        _note_fallback(inputs[i].display, note)
        # zarr stores (local or on an object store) spend their opening waiting for metadata reads: a few at
        # once; h5py serialises on its global lock, so .h5ad files are opened one by one
        threaded = [i for i, spec in enumerate(inputs) if i not in opened and not spec.path.endswith(".h5ad")]
        if len(threaded) > 1:
            with ThreadPoolExecutor(max_workers=min(_OPEN_THREADS, len(threaded))) as threads:
                futures = {i: threads.submit(open_source, inputs[i], virtualize=virtualize) for i in threaded}
                errors: list[BaseException] = []
                for i, fut in futures.items():  # every one finished or failed: none left open unseen
                    try:
                        opened[i] = fut.result()
                    except BaseException as e:
                        errors.append(e)
                if errors:
                    raise errors[0]  # the first failing input in input order
        for i, spec in enumerate(inputs):
            if i not in opened:
                opened[i] = open_source(spec, virtualize=virtualize)
    except BaseException:
        for s in opened.values():
            s.close()
        raise
    return [opened[i] for i in range(len(inputs))]


def _may_virtualize(spec: InputSpec, virtualize: Virtualize) -> bool:
    """Cheap guess (no I/O) whether ``spec`` is an ``.h5ad`` that will be parsed into a manifest."""
    return wants_virtual(spec, virtualize) and spec.path.endswith(".h5ad")

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
import os
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import h5py
import numpy as np
import pandas as pd

from .errors import InputError

__all__ = [
    "ColumnSpec",
    "H5adSource",
    "InputSpec",
    "Source",
    "SourceInfo",
    "ZarrSource",
    "coalesce_runs",
    "open_source",
    "resolve_inputs",
]

XKind = Literal["csr", "dense"]
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


def _expand_one(item: str) -> list[InputSpec]:
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
        inside, sorted by name) or glob patterns (matches sorted by name).

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
        ip = self.indptr
        pos = 0
        for lo, hi in coalesce_runs(runs):
            a, b = int(ip[lo]), int(ip[hi])
            n = b - a
            if n:
                self._read_range_into(x["data"], a, b, data_out[pos : pos + n])
                self._read_range_into(x["indices"], a, b, indices_out[pos : pos + n])
            pos += n
        return pos

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
class H5adSource(Source):
    """An ``.h5ad`` file read with h5py (opened once, read-only)."""

    format = "h5ad"

    def _open(self) -> Any:
        try:
            return h5py.File(self.spec.path, "r")
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

    def _is_array(self, node: Any) -> bool:
        return isinstance(node, h5py.Dataset)

    def _read_range(self, arr: Any, lo: int, hi: int) -> np.ndarray:
        if h5py.check_string_dtype(arr.dtype) is not None:
            return arr.asstr()[lo:hi] if arr.ndim else np.asarray([arr.asstr()[()]])
        return arr[lo:hi]

    def _read_range_into(self, arr: Any, lo: int, hi: int, out: np.ndarray) -> None:
        if out.flags.c_contiguous and h5py.check_string_dtype(arr.dtype) is None and hi > lo:
            arr.read_direct(out, source_sel=np.s_[lo:hi])
        else:
            out[...] = self._read_range(arr, lo, hi)

    def _disk_stat(self) -> tuple[int, float]:
        st = os.stat(self.spec.path)
        return st.st_size, st.st_mtime


class ZarrSource(Source):
    """An AnnData ``.zarr`` store (zarr format 2 or 3) read with zarr-python."""

    format = "zarr"

    def _open(self) -> Any:
        import zarr

        try:
            root = zarr.open_group(self.spec.path, mode="r")
        except Exception as e:  # zarr raises several types for broken metadata
            reason = f"{type(e).__name__}: {e}".splitlines()[0]
            raise InputError(self.spec.display, f"cannot be opened as a zarr group ({reason})") from None
        return root

    def _is_array(self, node: Any) -> bool:
        import zarr

        return isinstance(node, zarr.Array)

    def _read_range(self, arr: Any, lo: int, hi: int) -> np.ndarray:
        values = arr[lo:hi]
        if values.dtype.kind == "T":
            values = values.astype(object)
        return values

    def _disk_stat(self) -> tuple[int, float]:
        size, mtime = 0, 0.0
        for dirpath, _, files in os.walk(self.spec.path):
            for f in files:
                st = os.stat(os.path.join(dirpath, f))
                size += st.st_size
                mtime = max(mtime, st.st_mtime)
        return size, mtime


def open_source(spec: InputSpec | str, info: SourceInfo | None = None) -> Source:
    """Open one input with the class for its format.

    Parameters
    ----------
    spec
        A resolved input, or a path.
    info
        Metadata from an earlier scan of the same input; skips the scan.

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
    p = Path(spec.path)
    if p.is_dir():
        if not _is_zarr_dir(p):
            raise InputError(spec.display, "is a directory but not a zarr store (no zarr.json or .zgroup)")
        return ZarrSource(spec, info)
    if h5py.is_hdf5(spec.path):
        return H5adSource(spec, info)
    if p.suffix == ".h5ad":
        raise InputError(spec.display, "cannot be read as HDF5; is it a truncated or corrupt .h5ad?")
    raise InputError(spec.display, "is neither an .h5ad file nor a .zarr store")


def open_sources(inputs: Sequence[InputSpec]) -> list[Source]:
    """Open every input, closing those already opened if one fails."""
    opened: list[Source] = []
    try:
        for spec in inputs:
            opened.append(open_source(spec))
    except BaseException:
        for s in opened:
            s.close()
        raise
    return opened

"""The pure model of a preshuffle: which rows go where, computed from input metadata alone.

A :class:`Plan` is built from scanned :class:`~annbatch_nb.sources.SourceInfo` records and the shuffle
parameters; it performs no I/O. Everything the engine does is derived from it:

- the output var (outer or inner join) and, per input, the map from its gene columns to output columns;
- the unified obs schema (categories united across inputs, missing columns filled);
- the cut of every input into runs of ``shuffle_chunk_size`` rows and the random assignment of runs to
  output datasets;
- each output dataset's row permutation, drawn from its own random stream, so that every dataset is an
  independent unit of work that needs only the plan.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import math
import os
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
from dask.utils import format_bytes, parse_bytes

from .errors import InputError, ParameterError
from .predict import (
    DEFAULT_CALIBRATION,
    Calibration,
    MemoryPrediction,
    TimePrediction,
    cached_calibration,
    predict_memory,
    predict_output_bytes,
    predict_time,
    rows_for_memory,
)
from .quality import Quality, shuffle_quality
from .sources import ColumnSpec, SourceInfo, Virtualize, open_sources, resolve_inputs

if TYPE_CHECKING:
    from .engine import ShuffleResult

__all__ = [
    "DEFAULT_DATASET_SIZE",
    "PLAN_FORMAT_VERSION",
    "Parameters",
    "Plan",
    "build_plan",
    "make_unique",
    "plan",
    "scan",
    "scan_table",
    "sweep",
    "var_overlap",
]

#: Default dataset size: the largest dataset whose predicted peak memory fits ``memory_fraction`` of the
#: machine's memory.
DEFAULT_DATASET_SIZE = "auto"
#: Fraction of the machine's total memory that ``dataset_size="auto"`` plans for.
DEFAULT_MEMORY_FRACTION = 0.5
#: Bumped whenever the same parameters would produce a different assignment or different bytes.
PLAN_FORMAT_VERSION = 1

VarJoin = Literal["outer", "inner"]
#: Inputs as scanned records (:func:`scan`) or as paths, directories and globs.
ScannedOrPaths = list[SourceInfo] | str | os.PathLike[str] | Iterable[str | os.PathLike[str]]
Assignment = Literal["balanced", "uniform"]


# --------------------------------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------------------------------
def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ParameterError(f"{name} must be a positive whole number, got {value!r}")
    if value <= 0:
        raise ParameterError(f"{name} must be positive, got {value}")
    return int(value)


def _parse_size(name: str, value: int | str) -> int | str:
    """Return a positive row count (int), ``"auto"``, or a normalised byte string."""
    if isinstance(value, str):
        text = value.strip()
        if text.lower() == "auto":
            return "auto"
        if text.isdigit():
            return _positive_int(name, int(text))
        try:
            nbytes = parse_bytes(text)
        except (ValueError, TypeError):
            raise ParameterError(f"{name} {value!r} is neither a row count nor a size like '2GB'") from None
        if nbytes <= 0:
            raise ParameterError(f"{name} must be positive, got {value!r}")
        return text
    return _positive_int(name, value)


def check_seed(seed: Any) -> int:
    """``seed`` as an int, or a :class:`ParameterError` if it is not a non-negative whole number."""
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ParameterError(f"seed must be a non-negative whole number, got {seed!r}")
    return int(seed)


def _parse_bytes_param(name: str, value: int | str) -> int:
    if isinstance(value, str):
        try:
            nbytes = parse_bytes(value)
        except (ValueError, TypeError):
            raise ParameterError(f"{name} {value!r} is not a size like '1GB'") from None
    else:
        nbytes = _positive_int(name, value)
    if nbytes <= 0:
        raise ParameterError(f"{name} must be positive, got {value!r}")
    return int(nbytes)


@dataclass(frozen=True)
class Parameters:
    """Validated shuffle parameters (same meaning as annbatch's).

    Attributes
    ----------
    shuffle_chunk_size
        Rows per contiguous run cut from the inputs.
    dataset_size
        Rows per output dataset (int), a byte size string of uncompressed X + obs, or ``"auto"`` (the largest
        dataset whose predicted peak memory fits ``memory_fraction`` of the machine's memory).
    n_obs_per_chunk
        Rows per zarr chunk of the output.
    shard_size
        Target bytes per zarr shard of the output.
    seed
        Seed of every random choice.
    var_join
        ``outer`` (union of genes, missing genes are zeros) or ``inner`` (genes in every input).
    dtype
        dtype of the output X, or None for the numpy result type of the inputs.
    assignment
        ``balanced``: every dataset receives runs of every input in proportion to its size (randomised
        within); ``uniform``: runs are permuted and cut into datasets (annbatch's scheme).
    memory_fraction
        Fraction of the machine's memory ``dataset_size="auto"`` plans for.
    seed_drawn
        The seed was drawn because none was given: re-running the same call on an unfinished output adopts
        the seed recorded there, so it resumes (not part of the plan's identity).
    """

    shuffle_chunk_size: int = 1000
    dataset_size: int | str = DEFAULT_DATASET_SIZE
    n_obs_per_chunk: int = 64
    shard_size: int | str = "1GB"
    seed: int = 0
    var_join: VarJoin = "outer"
    dtype: str | None = None
    assignment: Assignment = "balanced"
    memory_fraction: float = DEFAULT_MEMORY_FRACTION
    seed_drawn: bool = field(default=False, compare=False)

    @classmethod
    def validated(
        cls,
        *,
        shuffle_chunk_size: int = 1000,
        dataset_size: int | str = DEFAULT_DATASET_SIZE,
        n_obs_per_chunk: int = 64,
        shard_size: int | str = "1GB",
        seed: int | None = None,
        var_join: str = "outer",
        dtype: Any = None,
        assignment: str = "balanced",
        memory_fraction: float = DEFAULT_MEMORY_FRACTION,
    ) -> Parameters:
        """Check every parameter and draw a seed if none is given.

        Raises
        ------
        ParameterError
            With a message naming the parameter.
        """
        drawn = seed is None
        seed = int(np.random.SeedSequence().entropy % (2**63)) if seed is None else check_seed(seed)
        if var_join not in ("outer", "inner"):
            raise ParameterError(f"var_join must be 'outer' or 'inner', got {var_join!r}")
        if assignment not in ("balanced", "uniform"):
            raise ParameterError(f"assignment must be 'balanced' or 'uniform', got {assignment!r}")
        if not isinstance(memory_fraction, int | float) or not 0 < memory_fraction <= 1:
            raise ParameterError(f"memory_fraction must be in (0, 1], got {memory_fraction!r}")
        dtype_str: str | None = None
        if dtype is not None:
            try:
                dt = np.dtype(dtype)
            except TypeError:
                raise ParameterError(f"dtype {dtype!r} is not a numpy dtype") from None
            if dt.kind not in "biuf":
                raise ParameterError(f"dtype must be numeric, got {dt}")
            dtype_str = dt.name
        return cls(
            shuffle_chunk_size=_positive_int("shuffle_chunk_size", shuffle_chunk_size),
            dataset_size=_parse_size("dataset_size", dataset_size),
            n_obs_per_chunk=_positive_int("n_obs_per_chunk", n_obs_per_chunk),
            shard_size=_parse_bytes_param("shard_size", shard_size),
            seed=int(seed),
            var_join=var_join,  # type: ignore[arg-type]
            dtype=dtype_str,
            assignment=assignment,  # type: ignore[arg-type]
            memory_fraction=float(memory_fraction),
            seed_drawn=drawn,
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return {
            "shuffle_chunk_size": self.shuffle_chunk_size,
            "dataset_size": self.dataset_size,
            "n_obs_per_chunk": self.n_obs_per_chunk,
            "shard_size": self.shard_size,
            "seed": self.seed,
            "var_join": self.var_join,
            "dtype": self.dtype,
            "assignment": self.assignment,
            "memory_fraction": self.memory_fraction,
        }


# --------------------------------------------------------------------------------------------------
# Joining metadata across inputs
# --------------------------------------------------------------------------------------------------
def make_unique(names: pd.Index) -> pd.Index:
    """Make names unique the way anndata does: later duplicates get ``-1``, ``-2``, ... suffixes.

    Parameters
    ----------
    names
        Names in global input order.

    Returns
    -------
    pandas.Index
        Unique names; the first occurrence of each name is unchanged.
    """
    values = np.asarray(names, dtype=object)
    s = pd.Series(values)
    dup = s.duplicated(keep="first").to_numpy()
    if not dup.any():
        return pd.Index(values, dtype=object)
    taken = set(values.tolist())
    counters: dict[str, int] = {}
    out = values.copy()
    for i in np.flatnonzero(dup):
        base = values[i]
        k = counters.get(base, 0)
        while True:
            k += 1
            candidate = f"{base}-{k}"
            if candidate not in taken:
                break
        counters[base] = k
        taken.add(candidate)
        out[i] = candidate
    return pd.Index(out, dtype=object)


def _ordered_union(names: list[pd.Index]) -> pd.Index:
    """Union of gene lists in an order consistent with every list, when one exists.

    Genes are ordered topologically over "comes before" edges between consecutive genes of each input
    (ties broken by first appearance), so inputs that are subsets of one reference gene order merge into
    that order and every input's columns map to increasing output columns: CSR rows need no re-sorting.
    When the inputs disagree on the order (a cycle), the first-appearance order is used.
    """
    first = pd.Index(pd.unique(np.concatenate([np.asarray(n, dtype=object) for n in names])), dtype=object)
    n = len(first)
    codes = [first.get_indexer(v).astype(np.int64) for v in names]
    if all(np.all(np.diff(c) > 0) for c in codes):
        return first
    pairs = np.concatenate([c[:-1] * n + c[1:] for c in codes if len(c) > 1])
    pairs = np.unique(pairs)
    src, dst = pairs // n, pairs % n
    indegree = np.bincount(dst, minlength=n)
    order_by_src = np.argsort(src, kind="stable")
    starts = np.searchsorted(src[order_by_src], np.arange(n + 1))
    targets = dst[order_by_src]
    heap = [int(i) for i in np.flatnonzero(indegree == 0)]
    heapq.heapify(heap)
    out: list[int] = []
    while heap:
        node = heapq.heappop(heap)
        out.append(node)
        for t in targets[starts[node] : starts[node + 1]]:
            indegree[t] -= 1
            if indegree[t] == 0:
                heapq.heappush(heap, int(t))
    if len(out) < n:  # the inputs order their genes differently
        return first
    return pd.Index(np.asarray(first)[np.asarray(out)], dtype=object)


def _distinct_lists(names: list[pd.Index]) -> tuple[list[pd.Index], list[int]]:
    """The distinct gene lists among ``names`` (first occurrences, in order) and which one each list is.

    Atlases of thousands of files use a handful of gene lists: joining and mapping each distinct list once
    keeps planning time, and the size of the plan's column maps, independent of the number of files.
    """
    distinct: list[pd.Index] = []
    values: list[np.ndarray] = []
    by_key: dict[tuple[Any, ...], list[int]] = {}
    which: list[int] = []
    for v in names:
        arr = np.asarray(v, dtype=object)
        key = (len(arr), arr[0], arr[len(arr) // 2], arr[-1]) if len(arr) else (0,)
        candidates = by_key.setdefault(key, [])
        for d in candidates:
            if distinct[d] is v or np.array_equal(values[d], arr):
                which.append(d)
                break
        else:
            candidates.append(len(distinct))
            which.append(len(distinct))
            distinct.append(v)
            values.append(arr)
    return distinct, which


def _join_var(infos: list[SourceInfo], var_join: VarJoin, lists: list[pd.Index]) -> pd.Index:
    """The output genes of ``infos``, whose distinct gene lists are ``lists``."""
    if var_join == "outer":
        return _ordered_union(lists)  # repeating a list adds no gene and no order constraint
    common = lists[0]
    for names in lists[1:]:
        common = common[common.isin(names)]
    if len(common) == 0:
        raise InputError(
            infos[0].display, "shares no gene with every other input; var_join='inner' would be empty"
        )
    return pd.Index(common, dtype=object)


def _unify_column(name: str, present: list[tuple[SourceInfo, ColumnSpec]], missing: bool) -> ColumnSpec:
    kinds = {spec.kind for _, spec in present}
    first_info, first = present[0]

    def conflict() -> InputError:
        other_info, other = next((i, s) for i, s in present if s.kind != first.kind or s.dtype != first.dtype)
        return InputError(
            other_info.display,
            f"obs column {name!r} is {other.kind} ({other.dtype}) here but {first.kind} ({first.dtype}) in "
            f"{first_info.display}; make the column the same type in every input",
        )

    if kinds == {"categorical"}:
        cats: list[Any] = []
        seen: set[Any] = set()
        cat_kinds = {np.dtype(s.dtype).kind for _, s in present}
        as_str = len(cat_kinds) > 1
        for _, spec in present:
            for c in spec.categories or ():
                c = str(c) if as_str else c
                if c not in seen:
                    seen.add(c)
                    cats.append(c)
        same = all(s.categories == first.categories for _, s in present)
        ordered = same and all(s.ordered for _, s in present)
        dtype = "object" if as_str else np.asarray(cats).dtype.str if cats else first.dtype
        if not as_str and cat_kinds & set("OSUT"):
            dtype = "object"
        return ColumnSpec("categorical", dtype, tuple(cats), ordered)
    if kinds <= {"string", "categorical"}:  # anndata stores repetitive strings as categoricals
        return ColumnSpec("string", "object")
    if kinds <= {"numeric", "nullable-integer"}:
        dt = np.result_type(*[np.dtype(s.dtype) for _, s in present])
        if dt.kind == "f":
            return ColumnSpec("numeric", dt.str)
        if dt.kind == "b":
            raise conflict()
        if missing or "nullable-integer" in kinds:
            return ColumnSpec("nullable-integer", dt.str)
        return ColumnSpec("numeric", dt.str)
    if kinds <= {"bool", "nullable-boolean"}:
        if missing or "nullable-boolean" in kinds:
            return ColumnSpec("nullable-boolean", "bool")
        return ColumnSpec("bool", "bool")
    raise conflict()


def _join_obs(infos: list[SourceInfo]) -> dict[str, ColumnSpec]:
    names: list[str] = []
    for info in infos:
        names.extend(n for n in info.obs_columns if n not in names)
    schema: dict[str, ColumnSpec] = {}
    for name in names:
        if name == "src_path":
            continue
        present = [(i, i.obs_columns[name]) for i in infos if name in i.obs_columns]
        schema[name] = _unify_column(name, present, missing=len(present) < len(infos))
    schema["src_path"] = ColumnSpec("categorical", "object", tuple(i.display for i in infos), False)
    return schema


def _smallest_unsigned(n: int) -> np.dtype:
    for dt in (np.uint8, np.uint16, np.uint32):
        if n - 1 <= np.iinfo(dt).max:
            return np.dtype(dt)
    return np.dtype(np.uint64)


# --------------------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------------------
@dataclass
class Plan:
    """Everything needed to write a collection, computed from metadata.

    Build one with :func:`plan` (scans the inputs) or :func:`build_plan` (from scanned metadata).

    Attributes
    ----------
    inputs
        Scanned metadata of every input, in input order.
    params
        The validated parameters (the seed is always set).
    var_names
        Output genes.
    var_maps
        Per input, the output column of each of its genes (-1 where an inner join drops it).
    x_kind
        ``csr`` if any input is sparse, else ``dense``.
    dtype
        Output X dtype.
    index_dtype
        dtype of the output CSR ``indices``.
    obs_schema
        The output obs columns and their types (``src_path`` last).
    runs
        ``(n_runs, 3)`` int64: input index, first row, stop row; in input order.
    run_dataset
        Output dataset of each run.
    n_datasets
        Number of output datasets.
    dataset_rows
        Target rows per dataset (after converting a byte size or resolving ``"auto"``).
    calibration
        Machine rates behind the predictions (see :func:`annbatch_nb.predict.calibrate`).
    uncached
        Per input, the fraction of its bytes the page cache did not hold when the plan was made
        (:func:`annbatch_nb.pagecache.uncached_fraction`): the time prediction charges reading them from the
        disk. None (from :func:`build_plan` without it): all cached.
    """

    inputs: list[SourceInfo]
    params: Parameters
    var_names: pd.Index
    var_maps: list[np.ndarray]
    x_kind: Literal["csr", "dense"]
    dtype: np.dtype
    index_dtype: np.dtype
    obs_schema: dict[str, ColumnSpec]
    runs: np.ndarray
    run_dataset: np.ndarray
    n_datasets: int
    dataset_rows: int
    calibration: Calibration = field(default_factory=lambda: DEFAULT_CALIBRATION, repr=False)
    uncached: np.ndarray | None = field(default=None, repr=False)
    _cache: dict[str, Any] = field(default_factory=dict, repr=False)
    #: Parsed manifests of virtualized inputs, filled when the plan is executed, so that worker processes
    #: (local or on a cluster) open those inputs without parsing them again.
    manifests: dict[tuple[str, int, float], Any] = field(default_factory=dict, repr=False)

    # -- sizes ----------------------------------------------------------------------------------------
    @cached_property
    def n_obs(self) -> int:
        """Cells this plan writes (every input row, unless it takes some runs only, as an append does)."""
        return int((self.runs[:, 2] - self.runs[:, 1]).sum())

    @cached_property
    def input_rows(self) -> np.ndarray:
        """Rows this plan takes from each input."""
        lengths = self.runs[:, 2] - self.runs[:, 1]
        return np.bincount(self.runs[:, 0], weights=lengths, minlength=len(self.inputs)).astype(np.int64)

    @property
    def n_vars(self) -> int:
        """Output genes."""
        return len(self.var_names)

    @property
    def nnz(self) -> int:
        """Stored entries of all inputs (an upper bound of the output's for an inner join)."""
        if self.x_kind == "dense":
            return self.n_obs * self.n_vars
        rows = self.input_rows
        return int(
            sum(
                i.nnz if r == i.n_obs else round(i.nnz * r / max(i.n_obs, 1))
                for i, r in zip(self.inputs, rows.tolist(), strict=True)
            )
        )

    @cached_property
    def rows_per_dataset(self) -> np.ndarray:
        """Rows of each output dataset."""
        lengths = self.runs[:, 2] - self.runs[:, 1]
        return np.bincount(self.run_dataset, weights=lengths, minlength=self.n_datasets).astype(np.int64)

    @cached_property
    def input_offsets(self) -> np.ndarray:
        """Global row number of each input's first row (input order), plus the total at the end."""
        return np.concatenate([[0], np.cumsum([i.n_obs for i in self.inputs])]).astype(np.int64)

    @property
    def mean_nnz_per_row(self) -> float:
        """Mean stored entries per row over all inputs."""
        return self.nnz / max(self.n_obs, 1)

    def raw_bytes_per_row(self) -> float:
        """Uncompressed bytes of one output row of X (CSR: data + indices + indptr)."""
        if self.x_kind == "dense":
            return float(self.n_vars * self.dtype.itemsize)
        return self.mean_nnz_per_row * (self.dtype.itemsize + self.index_dtype.itemsize) + 8

    @property
    def x_chunk_elems(self) -> int:
        """Elements per zarr chunk of CSR ``data``/``indices`` (``n_obs_per_chunk`` mean rows)."""
        return max(1, round(self.params.n_obs_per_chunk * self.mean_nnz_per_row))

    # -- what each dataset gets -----------------------------------------------------------------------
    def dataset_runs(self, k: int) -> np.ndarray:
        """Runs of dataset ``k``, sorted by input then row: the order rows are read in.

        Returns
        -------
        numpy.ndarray
            ``(m, 3)``: input index, start, stop.
        """
        if not 0 <= k < self.n_datasets:
            raise IndexError(f"dataset {k} out of range 0..{self.n_datasets - 1}")
        return self.runs[self.run_dataset == k]  # runs are stored in input order, so this is sorted

    def dataset_permutation(self, k: int) -> np.ndarray:
        """Row permutation of dataset ``k``: output row ``j`` is read-order row ``perm[j]``."""
        n = int(self.rows_per_dataset[k])
        rng = np.random.default_rng(np.random.SeedSequence(self.params.seed, spawn_key=(1, k)))
        return rng.permutation(n)

    def dataset_source_rows(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Input index and input row of every output row of dataset ``k``, in output order."""
        runs = self.dataset_runs(k)
        lengths = runs[:, 2] - runs[:, 1]
        src = np.repeat(runs[:, 0], lengths)
        starts = np.repeat(runs[:, 1] - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)
        rows = starts + np.arange(int(lengths.sum()))
        perm = self.dataset_permutation(k)
        return src[perm], rows[perm]

    @cached_property
    def obs_names(self) -> pd.Index:
        """Unique cell names in global input order (duplicates suffixed as anndata does)."""
        return make_unique(
            pd.Index(np.concatenate([np.asarray(i.obs_names, dtype=object) for i in self.inputs]))
        )

    # -- predictions ----------------------------------------------------------------------------------
    @property
    def memory(self) -> MemoryPrediction:
        """Predicted peak memory and its parts."""
        if "memory" not in self._cache:
            self._cache["memory"] = predict_memory(self, self.calibration)
        return self._cache["memory"]

    @property
    def time(self) -> TimePrediction:
        """Predicted wall time and its parts."""
        if "time" not in self._cache:
            self._cache["time"] = predict_time(self, self.calibration)
        return self._cache["time"]

    @property
    def peak_memory_bytes(self) -> int:
        """Predicted peak resident memory of running this plan."""
        return self.memory.peak_bytes

    @property
    def seconds(self) -> float:
        """Predicted wall time of running this plan."""
        return self.time.seconds

    @property
    def output_bytes(self) -> int:
        """Predicted size of the written collection."""
        return predict_output_bytes(self, self.calibration)

    def quality_for(self, block: int = 512) -> Quality:
        """Exact shuffle quality for blocks of ``block`` consecutive rows (see :mod:`annbatch_nb.quality`)."""
        key = f"quality-{block}"
        if key not in self._cache:
            self._cache[key] = shuffle_quality(
                self.runs, self.run_dataset, self.n_datasets, len(self.inputs), block=block
            )
        return self._cache[key]

    @property
    def quality(self) -> Quality:
        """Exact shuffle quality for annbatch Loader chunks (512 consecutive rows, its default)."""
        return self.quality_for(512)

    # -- identity -------------------------------------------------------------------------------------
    def inputs_record(self) -> list[dict[str, Any]]:
        """What identifies each input: path, size, mtime, shape, kind."""
        return [
            {
                "path": i.display,
                "abspath": i.path,
                "format": i.format,
                "size_bytes": i.size_bytes,
                "mtime": i.mtime,
                "n_obs": i.n_obs,
                "n_vars": i.n_vars,
                "nnz": i.nnz,
                "x_kind": i.x_kind,
                "dtype": i.dtype.name,
            }
            for i in self.inputs
        ]

    @cached_property
    def fingerprint(self) -> str:
        """Hash of everything that determines the output bytes (inputs' identity, parameters, seed)."""
        payload = {
            "format": PLAN_FORMAT_VERSION,
            "dataset_rows": self.dataset_rows,
            "params": self.params.to_dict(),
            "inputs": [
                {k: v for k, v in r.items() if k != "path"} | {"display": r["path"]}
                for r in self.inputs_record()
            ],
            # the assignment itself: plans that take some runs only (appends) differ here
            "assignment": hashlib.sha256(
                np.ascontiguousarray(self.runs, dtype=np.int64).tobytes()
                + np.ascontiguousarray(self.run_dataset, dtype=np.int64).tobytes()
            ).hexdigest(),
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

    @property
    def uncached_fraction(self) -> float:
        """The fraction of the inputs' X (raw bytes) that the page cache did not hold when planned."""
        if self.uncached is None:
            return 0.0
        weights = np.array([float(i.raw_x_bytes) for i in self.inputs])
        return float(np.average(self.uncached, weights=weights)) if weights.sum() else 0.0

    def summary(self) -> dict[str, Any]:
        """A JSON-able summary of the plan."""
        return {
            "n_inputs": len(self.inputs),
            "n_obs": self.n_obs,
            "n_vars": self.n_vars,
            "x_kind": self.x_kind,
            "dtype": self.dtype.name,
            "nnz": self.nnz,
            "n_runs": len(self.runs),
            "n_datasets": self.n_datasets,
            "dataset_rows": self.dataset_rows,
            "rows_per_dataset": self.rows_per_dataset.tolist(),
            "raw_bytes": int(self.raw_bytes_per_row() * self.n_obs),
            "peak_memory_bytes": self.peak_memory_bytes,
            "seconds": self.seconds,
            "output_bytes": self.output_bytes,
            "uncached_fraction": self.uncached_fraction,
            "quality": self.quality.score,
            "quality_details": self.quality.to_dict(),
            "memory": self.memory.to_dict(),
            "time": self.time.to_dict(),
            "calibration": self.calibration.source,
            "params": self.params.to_dict(),
            "var_overlap": var_overlap(self.inputs).to_dict(),
            "inputs": [
                {k: (v.item() if isinstance(v, np.generic) else v) for k, v in r.items()}
                for r in scan_table(self.inputs).reset_index().to_dict("records")
            ],
        }

    def describe(self) -> str:
        """One human-readable line."""
        raw = format_bytes(int(self.raw_bytes_per_row() * self.n_obs))
        mean_rows = int(self.rows_per_dataset.mean())
        procs = f" with {self.time.workers} processes" if self.time.workers > 1 else ""
        if self.time.disk >= 0.1 * self.seconds:
            procs += (
                f" ({self.time.disk:.0f} s of it reading the {self.uncached_fraction:.0%} of X not in the "
                "page cache)"
            )
        return (
            f"{self.n_obs:,} cells x {self.n_vars:,} genes ({self.x_kind}, {self.dtype.name}, {raw} raw) "
            f"from {len(self.inputs)} input(s) -> {self.n_datasets} dataset(s) of ~{mean_rows:,} rows, "
            f"runs of {self.params.shuffle_chunk_size:,}, seed {self.params.seed}; predicted peak "
            f"{format_bytes(self.peak_memory_bytes)}, ~{self.seconds:.0f} s{procs}, "
            f"quality {self.quality.score:.2f}"
        )

    def run(self, output: str | os.PathLike[str], *, progress: bool = True, **kwargs: Any) -> ShuffleResult:
        """Execute exactly this plan (same assignment, same seed) into ``output``.

        Parameters
        ----------
        output
            Path of the collection to write (``.zarr``).
        progress
            Show progress bars.
        **kwargs
            Passed to :func:`annbatch_nb.engine.execute`.

        Returns
        -------
        ShuffleResult
            What was written.
        """
        from .engine import execute

        return execute(self, output, progress=progress, **kwargs)


def _dataset_rows(params: Parameters, bytes_per_row: float) -> int:
    size = params.dataset_size
    if isinstance(size, int):
        return size
    return max(1, int(parse_bytes(size) // max(bytes_per_row, 1.0)))


def _obs_bytes_per_row(schema: dict[str, ColumnSpec]) -> float:
    total = 0.0
    for spec in schema.values():
        if spec.kind == "categorical":
            total += 1 if len(spec.categories or ()) < 128 else 2 if len(spec.categories or ()) < 32768 else 4
        elif spec.kind == "string":
            total += 8 + 16  # pointer + a short string
        elif spec.kind in ("nullable-integer", "nullable-boolean"):
            total += np.dtype(spec.dtype).itemsize + 1
        else:
            total += np.dtype(spec.dtype).itemsize
    return total


def cut_runs(infos: list[SourceInfo], chunk: int, first_input: int = 0) -> np.ndarray:
    """Each input's rows cut into runs of ``chunk`` rows (the last of an input may be shorter).

    Returns
    -------
    numpy.ndarray
        ``(n_runs, 3)`` int64: input index (counted from ``first_input``), start, stop; in input order.
    """
    parts = []
    for j, info in enumerate(infos):
        starts = np.arange(0, info.n_obs, chunk, dtype=np.int64)
        stops = np.minimum(starts + chunk, info.n_obs)
        parts.append(np.stack([np.full_like(starts, first_input + j), starts, stops], axis=1))
    return np.concatenate(parts) if parts else np.zeros((0, 3), dtype=np.int64)


def _assign_runs(runs: np.ndarray, n_datasets: int, rng: np.random.Generator) -> np.ndarray:
    """Permute the runs, then cut the permuted sequence into ``n_datasets`` groups of about equal rows."""
    n_runs = len(runs)
    order = rng.permutation(n_runs)
    lengths = (runs[:, 2] - runs[:, 1])[order]
    start_rows = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    total = int(lengths.sum())
    # dataset of a run = which 1/n_datasets slice of all rows its first row falls in
    ds_in_order = np.minimum((start_rows * n_datasets) // max(total, 1), n_datasets - 1)
    assignment = np.empty(n_runs, dtype=np.int64)
    assignment[order] = ds_in_order
    return assignment


def _assign_balanced(runs: np.ndarray, n_datasets: int, rng: np.random.Generator) -> np.ndarray:
    """Deal each input's runs, in random order, round-robin over the datasets.

    Every dataset receives ``floor`` or ``ceil`` of ``runs_of_input / n_datasets`` runs of every input, so its
    composition matches the inputs' global shares; dealing continues across inputs (from a random start), so
    datasets also get equal run counts (+-1).
    """
    n_runs = len(runs)
    order = np.empty(n_runs, dtype=np.int64)
    pos = 0
    for i in np.unique(runs[:, 0]):
        sel = np.flatnonzero(runs[:, 0] == i)
        order[pos : pos + len(sel)] = rng.permutation(sel)
        pos += len(sel)
    start = int(rng.integers(n_datasets))
    assignment = np.empty(n_runs, dtype=np.int64)
    assignment[order] = (start + np.arange(n_runs)) % n_datasets
    return assignment


_JOIN_CACHE: OrderedDict[tuple[Any, ...], tuple[Any, ...]] = OrderedDict()


def _joined(
    infos: list[SourceInfo], var_join: VarJoin
) -> tuple[pd.Index, list[np.ndarray], dict[str, ColumnSpec]]:
    """Output var, per-input column maps and obs schema of the inputs.

    Memoised per set of scanned input records (the same objects): sweeps and the widget re-plan the same
    inputs with other parameters many times. Entries keep their records alive, so an ``id`` is never reused
    while it is a key.
    """
    key = (var_join, *(id(i) for i in infos))
    hit = _JOIN_CACHE.get(key)
    if hit is None or any(a is not b for a, b in zip(hit[0], infos, strict=True)):
        lists, which = _distinct_lists([i.var_names for i in infos])
        var_names = _join_var(infos, var_join, lists)
        maps = [var_names.get_indexer(v).astype(np.int64) for v in lists]
        var_maps = [maps[w] for w in which]  # inputs with the same genes share one map
        hit = (tuple(infos), var_names, var_maps, _join_obs(infos))
        _JOIN_CACHE[key] = hit
        while len(_JOIN_CACHE) > 8:
            _JOIN_CACHE.popitem(last=False)
    else:
        _JOIN_CACHE.move_to_end(key)
    return hit[1], hit[2], hit[3]


def build_plan(
    infos: list[SourceInfo],
    params: Parameters,
    calibration: Calibration | None = None,
    uncached: np.ndarray | None = None,
) -> Plan:
    """Compute a plan from scanned metadata (no I/O).

    Parameters
    ----------
    infos
        Scanned inputs, in input order.
    params
        Validated parameters.
    calibration
        Machine rates for the predictions and for ``dataset_size="auto"`` (default: the reference machine's).
    uncached
        Per input, the fraction of its bytes not in the page cache (:func:`uncached_fractions`); default 0.

    Returns
    -------
    Plan
        The plan.

    Raises
    ------
    InputError
        If the inputs cannot be joined (no shared gene for an inner join, conflicting obs column types).
    ParameterError
        If ``shuffle_chunk_size`` exceeds the dataset size.
    """
    if not infos:
        raise InputError("<inputs>", "no input files were given")
    var_names, var_maps, obs_schema = _joined(infos, params.var_join)
    x_kind: Literal["csr", "dense"] = "csr" if any(i.x_kind == "csr" for i in infos) else "dense"
    dtype = np.dtype(params.dtype) if params.dtype else np.result_type(*[i.dtype for i in infos])
    index_dtype = _smallest_unsigned(len(var_names))

    c = params.shuffle_chunk_size
    runs = cut_runs(infos, c)
    n_obs = int(sum(i.n_obs for i in infos))

    stub = Plan(
        inputs=infos,
        params=params,
        var_names=var_names,
        var_maps=var_maps,
        x_kind=x_kind,
        dtype=np.dtype(dtype),
        index_dtype=index_dtype,
        obs_schema=obs_schema,
        runs=runs,
        run_dataset=np.zeros(len(runs), dtype=np.int64),
        n_datasets=1,
        dataset_rows=n_obs,
        calibration=calibration or DEFAULT_CALIBRATION,
        uncached=None if uncached is None else np.asarray(uncached, dtype=np.float64),
    )
    if params.dataset_size == "auto":
        import psutil

        budget = psutil.virtual_memory().total * params.memory_fraction
        dataset_rows = rows_for_memory(stub, budget, stub.calibration)
        if dataset_rows < min(c, n_obs):
            raise ParameterError(
                f"dataset_size='auto': not even {c:,} rows fit in {format_bytes(int(budget))} "
                f"(memory_fraction={params.memory_fraction}); lower shuffle_chunk_size or raise "
                "memory_fraction"
            )
        dataset_rows = max(min(dataset_rows, n_obs), c)
    else:
        dataset_rows = _dataset_rows(params, stub.raw_bytes_per_row() + _obs_bytes_per_row(obs_schema))
    if c > dataset_rows:
        raise ParameterError(
            f"shuffle_chunk_size ({c:,} rows) is larger than dataset_size ({dataset_rows:,} rows); "
            "lower shuffle_chunk_size or raise dataset_size"
        )
    n_datasets = max(1, math.ceil(n_obs / dataset_rows))
    rng = np.random.default_rng(np.random.SeedSequence(params.seed, spawn_key=(0,)))
    assign = _assign_balanced if params.assignment == "balanced" else _assign_runs
    stub.run_dataset = assign(runs, n_datasets, rng)
    stub.n_datasets = n_datasets
    stub.dataset_rows = dataset_rows
    return stub


def uncached_fractions(infos: list[SourceInfo]) -> np.ndarray:
    """Per input, the fraction of its bytes the page cache does not hold now (0 for remote inputs).

    Queried in parallel (a directory store's files are many); see
    :func:`annbatch_nb.pagecache.uncached_fraction`.
    """
    from concurrent.futures import ThreadPoolExecutor

    from .pagecache import uncached_fraction

    with ThreadPoolExecutor(8) as ex:
        return np.array(list(ex.map(lambda i: uncached_fraction(i.path), infos)), dtype=np.float64)


def scan(
    inputs: str | os.PathLike[str] | Iterable[str | os.PathLike[str]], *, virtualize: Virtualize = "auto"
) -> list[SourceInfo]:
    """Resolve and open every input and read its metadata (no X data is read).

    Parameters
    ----------
    inputs
        Files, directories or glob patterns (see :func:`~annbatch_nb.sources.resolve_inputs`).
    virtualize
        How ``.h5ad`` inputs are read (see :func:`~annbatch_nb.sources.open_source`).

    Returns
    -------
    list[SourceInfo]
        One record per input.
    """
    sources = open_sources(resolve_inputs(inputs), virtualize=virtualize)
    try:
        return [s.info for s in sources]
    finally:
        for s in sources:
            s.close()


def _infos(inputs: ScannedOrPaths, *, virtualize: Virtualize = "auto") -> list[SourceInfo]:
    """Scanned records as given, or the scan of paths (``virtualize`` applies only to a scan)."""
    if isinstance(inputs, list) and inputs and all(isinstance(i, SourceInfo) for i in inputs):
        return inputs  # type: ignore[return-value]
    return scan(inputs, virtualize=virtualize)  # type: ignore[arg-type]


def _incidence(infos: list[SourceInfo]) -> tuple[Any, np.ndarray, int]:
    """The inputs' distinct gene lists (sparse lists x genes), which list each input has, the union's size.

    Each distinct gene list is handled once: an atlas of thousands of files has a handful of lists.
    """
    import scipy.sparse as sp

    distinct, which = _distinct_lists([i.var_names for i in infos])
    codes, union = pd.factorize(pd.Index(np.concatenate([np.asarray(v, dtype=object) for v in distinct])))
    rows = np.repeat(np.arange(len(distinct)), [len(v) for v in distinct])
    m = sp.csr_matrix((np.ones(len(codes), dtype=np.int64), (rows, codes)), shape=(len(distinct), len(union)))
    return m, np.asarray(which, dtype=np.int64), len(union)


def _gene_counts(m: Any, which: np.ndarray) -> np.ndarray:
    """Inputs that have each gene."""
    weights = np.bincount(which, minlength=m.shape[0])
    return np.asarray(m.T @ weights).ravel()


def scan_table(
    inputs: ScannedOrPaths,
) -> pd.DataFrame:
    """One row per input: shape, sparsity, storage and how its genes overlap the other inputs'.

    Parameters
    ----------
    inputs
        Scanned inputs (:func:`scan`) or paths.

    Returns
    -------
    pandas.DataFrame
        Indexed by input (as given), columns ``format``, ``reader``, ``n_obs``, ``n_vars``, ``x_kind``,
        ``dtype``, ``nnz``, ``density`` (stored entries / cells x genes), ``x_chunk`` (stored chunk length
        along X's first axis: CSR entries or dense rows; 0 contiguous), ``x_compression``, ``size_bytes`` (on
        disk), ``raw_x_bytes`` (uncompressed X), ``genes_in_all`` (its genes that every input has),
        ``genes_only_here`` (its genes that no other input has) and ``union_share`` (its genes / all inputs'
        genes).
    """
    infos = _infos(inputs)
    m, which, n_union = _incidence(infos)
    counts = _gene_counts(m, which)
    in_all = (m @ (counts == len(infos)).astype(np.int64))[which]
    only_here = (m @ (counts == 1).astype(np.int64))[which]
    return pd.DataFrame(
        {
            "format": [i.format for i in infos],
            "reader": [i.reader for i in infos],
            "n_obs": [i.n_obs for i in infos],
            "n_vars": [i.n_vars for i in infos],
            "x_kind": [i.x_kind for i in infos],
            "dtype": [i.dtype.name for i in infos],
            "nnz": [i.nnz for i in infos],
            "density": [i.nnz / max(i.n_obs * i.n_vars, 1) for i in infos],
            "x_chunk": [i.x_chunk for i in infos],
            "x_compression": [i.x_compression for i in infos],
            "size_bytes": [i.size_bytes for i in infos],
            "raw_x_bytes": [i.raw_x_bytes for i in infos],
            "genes_in_all": np.asarray(in_all, dtype=np.int64),
            "genes_only_here": np.asarray(only_here, dtype=np.int64),
            "union_share": [i.n_vars / max(n_union, 1) for i in infos],
        },
        index=pd.Index([i.display for i in infos], name="input"),
    )


@dataclass(frozen=True)
class VarOverlap:
    """How the inputs' gene sets overlap.

    Attributes
    ----------
    n_union
        Genes in any input (the output's var with ``var_join="outer"``).
    n_intersection
        Genes in every input (the output's var with ``var_join="inner"``).
    inputs
        The inputs, as given.
    lists
        Sparse matrix of the inputs' distinct gene lists x genes: 1 where a list has a gene.
    which
        Which of ``lists`` each input has.
    """

    n_union: int
    n_intersection: int
    inputs: pd.Index
    lists: Any = field(repr=False)
    which: np.ndarray = field(repr=False)

    @cached_property
    def shared(self) -> pd.DataFrame:
        """Inputs x inputs: genes two inputs have in common (the diagonal: each input's genes)."""
        pairs = (self.lists @ self.lists.T).toarray().astype(np.int64)
        return pd.DataFrame(pairs[np.ix_(self.which, self.which)], index=self.inputs, columns=self.inputs)

    def jaccard(self) -> pd.DataFrame:
        """Inputs x inputs: shared genes / genes in either of the two."""
        s = self.shared.to_numpy(dtype=np.float64)
        n = np.diag(s)
        return pd.DataFrame(
            s / (n[:, None] + n[None, :] - s), index=self.shared.index, columns=self.shared.columns
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (without the pairwise tables)."""
        return {"n_union": self.n_union, "n_intersection": self.n_intersection}


def var_overlap(
    inputs: ScannedOrPaths,
) -> VarOverlap:
    """The genes the inputs share: union, intersection and (on demand) every pair's shared count.

    Parameters
    ----------
    inputs
        Scanned inputs (:func:`scan`) or paths.

    Returns
    -------
    VarOverlap
        The overlap.
    """
    infos = _infos(inputs)
    m, which, n_union = _incidence(infos)
    n_all = int((_gene_counts(m, which) == len(infos)).sum())
    names = pd.Index([i.display for i in infos], name="input")
    return VarOverlap(n_union, n_all, names, m, which)


def plan(
    inputs: ScannedOrPaths,
    *,
    shuffle_chunk_size: int = 1000,
    dataset_size: int | str = DEFAULT_DATASET_SIZE,
    n_obs_per_chunk: int = 64,
    shard_size: int | str = "1GB",
    seed: int | None = None,
    var_join: VarJoin = "outer",
    dtype: Any = None,
    assignment: Assignment = "balanced",
    memory_fraction: float = DEFAULT_MEMORY_FRACTION,
    calibration: Calibration | bool | None = None,
    virtualize: Virtualize = "auto",
) -> Plan:
    """Scan the inputs and plan a preshuffle.

    Parameters
    ----------
    inputs
        ``.h5ad`` files, AnnData ``.zarr`` stores, directories of them, or glob patterns; or the records
        :func:`scan` returned for them (not scanned again: ``virtualize`` was the scan's).
    shuffle_chunk_size
        Rows per contiguous run cut from the inputs.
    dataset_size
        Rows per output dataset, a size string (``"2GB"``) of uncompressed X + obs per dataset, or ``"auto"``:
        the largest dataset whose predicted peak memory fits ``memory_fraction`` of this machine's memory.
    n_obs_per_chunk
        Rows per zarr chunk in the output.
    shard_size
        Target bytes per zarr shard.
    seed
        Random seed; None draws one (recorded in the plan, so the run is still reproducible).
    var_join
        ``outer``: union of genes (missing genes are zeros); ``inner``: genes present in every input.
    dtype
        Output X dtype; default is the numpy result type of the inputs.
    assignment
        ``balanced`` (every dataset gets every input's share) or ``uniform`` (annbatch's random cut).
    memory_fraction
        Fraction of the machine's memory that ``dataset_size="auto"`` plans for.
    calibration
        Rates for the predictions: a :class:`~annbatch_nb.predict.Calibration`, ``True`` to measure now
        (:func:`~annbatch_nb.predict.calibrate`, a few seconds, cached), or None for a cached calibration of
        these inputs on this machine if there is one, else the reference machine's rates.
    virtualize
        How ``.h5ad`` inputs are read: ``"auto"`` (h5py for local files and small ``s3://`` objects, a
        virtualizarr manifest for larger ones), ``True`` (the manifest, h5py with a warning where
        impossible) or ``False`` (h5py). Only the reading changes, never the output bytes.

    Returns
    -------
    Plan
        The plan; ``plan.run(output)`` executes it.
    """
    params = Parameters.validated(
        shuffle_chunk_size=shuffle_chunk_size,
        dataset_size=dataset_size,
        n_obs_per_chunk=n_obs_per_chunk,
        shard_size=shard_size,
        seed=seed,
        var_join=var_join,
        dtype=dtype,
        assignment=assignment,
        memory_fraction=memory_fraction,
    )
    infos = _infos(inputs, virtualize=virtualize)
    if calibration is True:
        from .predict import calibrate

        calibration = calibrate(infos)
    elif calibration is None or calibration is False:
        calibration = cached_calibration(infos)
    return build_plan(infos, params, calibration, uncached_fractions(infos))


def sweep(
    inputs: Plan | list[SourceInfo] | str | os.PathLike[str] | Iterable[str | os.PathLike[str]],
    *,
    shuffle_chunk_size: Iterable[int] = (100, 250, 500, 1000, 2000),
    dataset_size: Iterable[int | str] = ("auto",),
    **params: Any,
) -> pd.DataFrame:
    """Predict memory, time and quality over a grid of ``shuffle_chunk_size`` x ``dataset_size``.

    Parameters
    ----------
    inputs
        A plan (its inputs, calibration and other parameters are reused), scanned inputs, or paths.
    shuffle_chunk_size, dataset_size
        The values to try.
    **params
        Other parameters of :func:`plan` (``seed``, ``var_join``, ``assignment``, ...).

    Returns
    -------
    pandas.DataFrame
        One row per combination: the parameters, ``dataset_rows``, ``n_datasets``, ``peak_memory_bytes``,
        ``seconds``, ``output_bytes``, ``quality`` and its parts; combinations that are invalid (chunk larger
        than dataset) are left out.
    """
    calibration = params.pop("calibration", None)
    if isinstance(inputs, Plan):
        base = inputs.params.to_dict()
        infos = inputs.inputs
        calibration = calibration or inputs.calibration
        uncached = inputs.uncached
    else:
        base = {}
        infos = _infos(inputs)
        calibration = calibration or cached_calibration(infos)
        uncached = uncached_fractions(infos)
    base.update(params)
    rows = []
    for size in dataset_size:
        for chunk in shuffle_chunk_size:
            try:
                p = build_plan(
                    infos,
                    Parameters.validated(**{**base, "shuffle_chunk_size": chunk, "dataset_size": size}),
                    calibration,
                    uncached,
                )
            except ParameterError:
                continue
            q = p.quality
            rows.append(
                {
                    "shuffle_chunk_size": chunk,
                    "dataset_size": size,
                    "dataset_rows": p.dataset_rows,
                    "n_datasets": p.n_datasets,
                    "peak_memory_bytes": p.peak_memory_bytes,
                    "seconds": p.seconds,
                    "output_bytes": p.output_bytes,
                    "quality": q.score,
                    "run_mixing": q.run_mixing,
                    "file_mixing": q.file_mixing,
                    "composition": q.composition,
                }
            )
    return pd.DataFrame(rows)

"""Execute a plan: read each output dataset's runs, permute, write sharded zarr, commit.

Each output dataset is an independent unit of work (:func:`write_dataset`) that needs only the plan, the
opened sources and the output group. Memory per dataset is one dataset's X in a read buffer (CSR: data in
the output dtype + int32 column indices + row pointers; dense: the rows) plus one shard being written.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import inspect
import os
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .collection import (
    DatasetWriter,
    commit,
    mark_complete,
    open_output,
    open_root,
    read_manifest,
    release_lock,
)
from .errors import CancelledError, InputError, OutputError, ParameterError
from .plan import DEFAULT_DATASET_SIZE, Assignment, Plan, VarJoin, build_plan, plan
from .shards import ShardedArray
from .sources import (
    ColumnSpec,
    InputSpec,
    Source,
    Virtualize,
    input_exists,
    manifests_of,
    open_source,
    remember_manifests,
)
from .stores import WRITE_ERRORS, describe_store_error, store_env

if TYPE_CHECKING:
    from .append import AppendResult

__all__ = ["ShuffleResult", "execute", "read_order_rows", "shuffle", "write_dataset"]

try:  # scipy's compiled kernels (row gather, in-place row sort); numpy fallbacks below
    from scipy.sparse._sparsetools import csr_has_sorted_indices as _csr_has_sorted_indices
    from scipy.sparse._sparsetools import csr_row_index as _csr_row_index
    from scipy.sparse._sparsetools import csr_sort_indices as _csr_sort_indices
except ImportError:  # pragma: no cover - scipy moved them
    _csr_row_index = _csr_sort_indices = _csr_has_sorted_indices = None


ProgressCallback = Callable[[str, int], None]

#: Environment variable naming points where the process kills itself (SIGKILL), for crash tests:
#: ``start``, ``dataset-read:K``, ``shard:K``, ``dataset-written:K``, ``before-commit`` (comma separated).
STOP_ENV = "ANNBATCH_NB_STOP_AT"
#: With this set to a file path, a stop point kills only once: the first process to create the file dies,
#: later ones (a retried task on a dask worker) pass.
STOP_ONCE_ENV = "ANNBATCH_NB_STOP_ONCE"


def stop_point(name: str) -> None:
    """Die here like ``kill -9`` if ``$ANNBATCH_NB_STOP_AT`` names this point (crash-safety tests).

    In a worker process of the local pool the whole run dies: the parent is killed first. With
    ``$ANNBATCH_NB_STOP_ONCE`` naming a file, only the process that creates that file dies.
    """
    wanted = os.environ.get(STOP_ENV)
    if wanted and name in wanted.split(","):
        once = os.environ.get(STOP_ONCE_ENV)
        if once:
            try:
                os.close(os.open(once, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
            except FileExistsError:
                return  # someone already died here
        if _WORKER.get("parent"):
            os.kill(_WORKER["parent"], signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)


@dataclass
class ShuffleResult:
    """What a shuffle wrote.

    Attributes
    ----------
    output
        Path of the collection.
    plan
        The plan that was executed.
    datasets_written
        Datasets written by this call.
    datasets_resumed
        Datasets found complete from an earlier, interrupted run and kept.
    already_complete
        The output was already a finished collection of this plan; nothing was written.
    seconds
        Wall time of this call.
    dataset_seconds
        Wall time of each dataset written.
    workers
        Processes that wrote datasets (on a cluster: dask workers that ran a dataset task).
    dashboard_link
        The dask dashboard of the cluster that wrote the datasets, if any.
    """

    output: str
    plan: Plan
    datasets_written: int = 0
    datasets_resumed: int = 0
    already_complete: bool = False
    seconds: float = 0.0
    dataset_seconds: list[float] = field(default_factory=list)
    workers: int = 1
    dashboard_link: str | None = None

    @property
    def n_obs(self) -> int:
        """Cells in the collection."""
        return self.plan.n_obs

    @property
    def n_datasets(self) -> int:
        """Datasets in the collection."""
        return self.plan.n_datasets

    def __str__(self) -> str:
        if self.already_complete:
            return f"{self.output}: already complete ({self.n_datasets} datasets, {self.n_obs:,} cells)"
        rate = self.n_obs / self.seconds if self.seconds else float("nan")
        return (
            f"{self.output}: {self.n_datasets} datasets, {self.n_obs:,} cells in {self.seconds:.1f} s "
            f"({rate:,.0f} cells/s)"
        )


# --------------------------------------------------------------------------------------------------
# Progress
# --------------------------------------------------------------------------------------------------
class _Progress:
    """tqdm.auto bars: bytes read and cells written (rate and ETA included), and datasets on a cluster."""

    def __init__(
        self, plan: Plan, enabled: bool, done_rows: int, done_bytes: int, tasks: tuple[int, int] | None = None
    ) -> None:
        self.bars: list[Any] = []
        self.tasks: Any = None
        if not enabled:
            return
        from tqdm.auto import tqdm

        total_bytes = int(sum(i.raw_x_bytes for i in plan.inputs))
        if tasks is not None:  # a cluster run: one task per dataset
            self.tasks = tqdm(
                total=tasks[1], initial=tasks[0], unit=" datasets", desc="tasks  ", dynamic_ncols=True
            )
            self.bars.append(self.tasks)
        self.read = tqdm(
            total=total_bytes,
            initial=done_bytes,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc="read   ",
            dynamic_ncols=True,
        )
        self.write = tqdm(
            total=plan.n_obs,
            initial=done_rows,
            unit=" cells",
            unit_scale=True,
            desc="written",
            dynamic_ncols=True,
        )
        self.bars += [self.read, self.write]

    def __call__(self, what: str, n: int) -> None:
        if not self.bars:
            return
        if what == "datasets":
            if self.tasks is not None:
                self.tasks.update(n)
        else:
            (self.read if what == "bytes" else self.write).update(n)

    def note(self, text: str) -> None:
        """Print a line above the bars (or to stderr without bars)."""
        if self.bars:
            from tqdm.auto import tqdm

            tqdm.write(text, file=sys.stderr)

    def close(self) -> None:
        for b in self.bars:
            b.close()


def _raw_input_bytes(plan: Plan, k: int) -> int:
    runs = plan.dataset_runs(k)
    total = 0
    for i, info in enumerate(plan.inputs):
        sel = runs[runs[:, 0] == i]
        rows = int((sel[:, 2] - sel[:, 1]).sum())
        total += int(info.raw_x_bytes * rows / max(info.n_obs, 1))
    return total


# --------------------------------------------------------------------------------------------------
# Building one dataset in memory
# --------------------------------------------------------------------------------------------------
def _check_cancel(cancel: threading.Event | None) -> None:
    if cancel is not None and cancel.is_set():
        raise CancelledError("cancelled; re-run the same command to resume")


class BufferPool:
    """Reusable scratch arrays, kept across datasets.

    Touching freshly mapped memory is expensive (page faults); reusing the same buffers for every dataset
    keeps that cost to the first dataset and keeps peak memory flat.
    """

    def __init__(self) -> None:
        self._arrays: dict[str, np.ndarray] = {}

    def get(self, name: str, n: int, dtype: np.dtype | type) -> np.ndarray:
        """A 1-D array of ``n`` elements of ``dtype`` (contents undefined), grown when too small."""
        dtype = np.dtype(dtype)
        nbytes = n * dtype.itemsize  # may be 0 (an all-zero CSR dataset has no entries)
        cur = self._arrays.get(name)
        if cur is None or cur.nbytes < nbytes:
            self._arrays.pop(name, None)
            del cur
            cur = np.empty(int(nbytes * 1.1) + 64, dtype=np.uint8)
            self._arrays[name] = cur
        return cur[:nbytes].view(dtype)[:n]

    def clear(self) -> None:
        """Release every buffer."""
        self._arrays.clear()

    def touch(self) -> int:
        """Write every page of every buffer (their first touch, page faults, paid now); the bytes touched."""
        for a in self._arrays.values():
            a.fill(0)
        return sum(a.nbytes for a in self._arrays.values())


@dataclass
class CSRBuffer:
    """A dataset's rows in read order, in the output gene space; one index dtype for indptr and indices."""

    data: np.ndarray
    indices: np.ndarray
    indptr: np.ndarray

    @property
    def n_rows(self) -> int:
        """Rows held."""
        return len(self.indptr) - 1


def _index_dtype(nnz: int, n_vars: int) -> np.dtype:
    return np.dtype(np.int32) if max(nnz, n_vars) < 2**31 - 1 else np.dtype(np.int64)


def _read_csr(
    plan: Plan,
    sources: list[Source],
    runs: np.ndarray,
    pool: BufferPool,
    progress: ProgressCallback,
    cancel: threading.Event | None,
    executor: ThreadPoolExecutor | None = None,
) -> CSRBuffer:
    """Read the runs (sorted by input) into the pool's CSR buffers, in the output gene space, read order.

    With an ``executor``, an input's gene indices are remapped there while the next input is read.
    """
    by_source = [(int(i), runs[runs[:, 0] == i][:, 1:]) for i in np.unique(runs[:, 0])]
    counts: list[np.ndarray] = []
    dense_parts: dict[int, sp.csr_matrix] = {}
    capacity = 0
    for i, r in by_source:
        src = sources[i]
        if src.info.x_kind == "csr":
            rows = np.concatenate([np.arange(a, b) for a, b in r])
            capacity += int(src.run_nnz(r).sum())
            counts.append(src.indptr[rows + 1] - src.indptr[rows])
        else:  # a dense input in a sparse collection: convert its rows now
            _check_cancel(cancel)
            block = _remap_dense(plan, i, src.read_dense(r))
            progress("bytes", block.nbytes)
            part = sp.csr_matrix(block)
            dense_parts[i] = part
            capacity += part.nnz
            counts.append(np.diff(part.indptr))
    idx_dtype = _index_dtype(capacity, plan.n_vars)
    data = pool.get("data", capacity, plan.dtype)
    indices = pool.get("indices", capacity, idx_dtype)
    pos = 0
    needs_sort = False
    remaps: list[Future[None]] = []
    for j, (i, r) in enumerate(by_source):
        _check_cancel(cancel)
        src = sources[i]
        if i in dense_parts:
            part = dense_parts.pop(i)
            data[pos : pos + part.nnz] = part.data
            indices[pos : pos + part.nnz] = part.indices
            pos += part.nnz
            continue
        n = src.read_csr_into(r, data[pos:], indices[pos:])
        if n and (
            int(indices[pos : pos + n].min()) < 0 or int(indices[pos : pos + n].max()) >= src.info.n_vars
        ):
            raise InputError(
                src.info.display, "X/indices holds column numbers outside 0..n_vars-1; the file is corrupt"
            )
        progress("bytes", n * (src.info.dtype.itemsize + 4) + len(counts[j]) * 8)
        vmap = plan.var_maps[i]
        if not _is_identity(vmap):
            if bool((vmap >= 0).all()):
                seg, vm = indices[pos : pos + n], vmap.astype(indices.dtype)
                if executor is None:
                    _remap_in_place(seg, vm)
                else:
                    remaps.append(executor.submit(_remap_in_place, seg, vm))
            else:  # inner join: drop entries of genes not in the output
                seg = indices[pos : pos + n]
                mapped = vmap[seg]
                keep = mapped >= 0
                row_starts = np.concatenate([[0], np.cumsum(counts[j])[:-1]])
                kept_cum = np.concatenate([[0], np.cumsum(keep)])
                counts[j] = kept_cum[row_starts + counts[j]] - kept_cum[row_starts]
                m = int(keep.sum())
                data[pos : pos + m] = data[pos : pos + n][keep]
                indices[pos : pos + m] = mapped[keep]
                n = m
            kept = vmap[vmap >= 0]
            needs_sort |= bool(np.any(np.diff(kept) < 0))
        pos += n
    for f in remaps:
        f.result()
    row_nnz = np.concatenate(counts) if counts else np.zeros(0, dtype=np.int64)
    indptr = pool.get("indptr", len(row_nnz) + 1, idx_dtype)
    indptr[0] = 0
    np.cumsum(row_nnz, out=indptr[1:])
    buf = CSRBuffer(data[:pos], indices[:pos], indptr)
    if needs_sort or not _rows_sorted(buf):  # remapped columns, or an input that stores rows unsorted
        _sort_rows(buf, plan.n_vars)
    return buf


def _remap_in_place(indices: np.ndarray, vmap: np.ndarray, step: int = 1 << 20) -> None:
    """``indices[:] = vmap[indices]`` a block at a time (no dataset-sized temporary)."""
    for a in range(0, len(indices), step):
        seg = indices[a : a + step]
        seg[...] = vmap[seg]


def _rows_sorted(buf: CSRBuffer) -> bool:
    """Whether column indices never decrease within a row (one pass, no temporaries with scipy's kernel)."""
    if _csr_has_sorted_indices is not None and buf.indptr.dtype == buf.indices.dtype:
        return bool(_csr_has_sorted_indices(buf.n_rows, buf.indptr, buf.indices))
    steps = np.diff(buf.indices.astype(np.int64)) >= 0
    row_ends = buf.indptr[1:-1] - 1  # a step from a row's last entry into the next row does not count
    steps[row_ends[(row_ends >= 0) & (row_ends < len(steps))]] = True
    return bool(steps.all())


def _sort_rows(buf: CSRBuffer, n_vars: int) -> None:
    """Sort column indices within each row, in place (inputs whose gene order differs from the output's)."""
    if _csr_sort_indices is not None and buf.indptr.dtype == buf.indices.dtype:
        _csr_sort_indices(buf.n_rows, buf.indptr, buf.indices, buf.data)
        return
    mat = sp.csr_matrix((buf.data, buf.indices, buf.indptr), shape=(buf.n_rows, n_vars), copy=False)
    mat.has_sorted_indices = False
    mat.sort_indices()
    if not np.shares_memory(mat.indices, buf.indices):  # scipy converted the index dtype: copy back
        buf.indices[...] = mat.indices
        buf.data[...] = mat.data


def _gather_rows(buf: CSRBuffer, rows: np.ndarray, out_data: np.ndarray, out_indices: np.ndarray) -> None:
    """Copy rows ``rows`` of ``buf``, in that order, into ``out_data``/``out_indices`` (sized exactly)."""
    if _csr_row_index is not None:
        _csr_row_index(
            len(rows),
            rows.astype(buf.indptr.dtype, copy=False),
            buf.indptr,
            buf.indices,
            buf.data,
            out_indices,
            out_data,
        )
        return
    starts = buf.indptr[rows]
    lengths = buf.indptr[rows + 1] - starts
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    src = np.repeat(starts - offsets, lengths) + np.arange(int(lengths.sum()))
    np.take(buf.data, src, out=out_data)
    np.take(buf.indices, src, out=out_indices)


def _is_identity(vmap: np.ndarray) -> bool:
    return bool(np.array_equal(vmap, np.arange(len(vmap))))


def _remap_dense(plan: Plan, i: int, block: np.ndarray) -> np.ndarray:
    vmap = plan.var_maps[i]
    if _is_identity(vmap) and block.shape[1] == plan.n_vars:
        return block.astype(plan.dtype, copy=False)
    out = np.zeros((block.shape[0], plan.n_vars), dtype=plan.dtype)
    keep = vmap >= 0
    out[:, vmap[keep]] = block[:, keep]
    return out


def _read_dense(
    plan: Plan,
    sources: list[Source],
    runs: np.ndarray,
    pool: BufferPool,
    progress: ProgressCallback,
    cancel: threading.Event | None,
) -> np.ndarray:
    n = int((runs[:, 2] - runs[:, 1]).sum())
    out = pool.get("dense", n * plan.n_vars, plan.dtype).reshape(n, plan.n_vars)
    pos = 0
    for i in np.unique(runs[:, 0]):
        _check_cancel(cancel)
        r = runs[runs[:, 0] == i][:, 1:]
        m = int((r[:, 1] - r[:, 0]).sum())
        src = sources[i]
        vmap = plan.var_maps[i]
        if _is_identity(vmap) and src.info.n_vars == plan.n_vars and src.info.x_kind == "dense":
            src.read_dense_into(r, out[pos : pos + m])
        else:
            out[pos : pos + m] = _remap_dense(plan, int(i), src.read_dense(r))
        progress("bytes", m * src.info.n_vars * src.info.dtype.itemsize)
        pos += m
    return out


def _obs_column(spec: ColumnSpec, pieces: list[tuple[int, Any, int]], n: int) -> Any:
    """Assemble one output obs column (read order) from per-input pieces ``(input, values|None, rows)``."""
    if spec.kind == "categorical":
        cats = pd.Index(list(spec.categories or ()))
        codes = np.full(n, -1, dtype=np.int64)
        pos = 0
        for _, val, m in pieces:
            if val is not None:
                src_codes, src_cats = val
                src_codes = np.asarray(src_codes, dtype=np.int64)
                cat_map = cats.get_indexer(pd.Index(list(src_cats or ())).astype(cats.dtype, copy=False))
                cat_map = np.append(cat_map, -1)  # code -1 (missing) maps to -1
                codes[pos : pos + m] = cat_map[src_codes]
            pos += m
        return pd.Categorical.from_codes(codes, categories=cats, ordered=spec.ordered)
    if spec.kind == "string":
        out = np.full(n, None, dtype=object)
        pos = 0
        for _, val, m in pieces:
            if val is not None:
                if isinstance(val, tuple):
                    values, mask = val
                    values = np.asarray(values, dtype=object)
                    values[mask] = None
                    val = values
                out[pos : pos + m] = np.asarray(val, dtype=object)
            pos += m
        return pd.array(out, dtype="string")
    if spec.kind in ("nullable-integer", "nullable-boolean"):
        dt = np.dtype(spec.dtype)
        values = np.zeros(n, dtype=dt)
        mask = np.ones(n, dtype=bool)
        pos = 0
        for _, val, m in pieces:
            if val is not None:
                if isinstance(val, tuple):
                    values[pos : pos + m], mask[pos : pos + m] = val[0], val[1]
                else:
                    values[pos : pos + m], mask[pos : pos + m] = val, False
            pos += m
        arr_type = pd.arrays.BooleanArray if spec.kind == "nullable-boolean" else pd.arrays.IntegerArray
        return arr_type(values, mask)
    dt = np.dtype(spec.dtype)
    out = np.full(n, np.nan, dtype=dt) if dt.kind == "f" else np.zeros(n, dtype=dt)
    pos = 0
    for _, val, m in pieces:
        if val is not None:
            out[pos : pos + m] = val
        pos += m
    return out


def _as_target(target: ColumnSpec, source: ColumnSpec | None, val: Any) -> Any:
    """Turn a categorical input column into plain strings where the output column is a string column."""
    if val is None or source is None or target.kind != "string" or source.kind != "categorical":
        return val
    codes, cats = val
    cats_arr = np.asarray([str(c) for c in cats or ()] + [None], dtype=object)
    return cats_arr[np.where(np.asarray(codes) >= 0, codes, len(cats_arr) - 1)]


def read_order_rows(plan: Plan, runs: np.ndarray) -> np.ndarray:
    """Global row numbers (input order) of ``runs`` (sorted by input, then row), in read order."""
    lengths = runs[:, 2] - runs[:, 1]
    starts = runs[:, 1] + plan.input_offsets[runs[:, 0]]
    run_first = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    return np.repeat(starts - run_first, lengths) + np.arange(int(lengths.sum()), dtype=np.int64)


def _build_obs(
    plan: Plan, sources: list[Source], runs: np.ndarray, obs_names: pd.Index | None = None
) -> pd.DataFrame:
    """Obs of the runs in read order, in the unified schema, with src_path and unique names.

    ``obs_names``: the unique names of these rows in read order, when the caller has them (a cluster task
    gets its slice instead of every cell's name); by default they come from ``plan.obs_names``.
    """
    n = int((runs[:, 2] - runs[:, 1]).sum())
    per_input: list[tuple[int, dict[str, Any], int]] = []
    for i in np.unique(runs[:, 0]):
        r = runs[runs[:, 0] == i][:, 1:]
        m = int((r[:, 1] - r[:, 0]).sum())
        per_input.append((int(i), sources[i].read_obs(r), m))
    columns: dict[str, Any] = {}
    for name, spec in plan.obs_schema.items():
        if name == "src_path":
            codes = np.concatenate([np.full(m, i, dtype=np.int64) for i, _, m in per_input])
            columns[name] = pd.Categorical.from_codes(codes, categories=pd.Index(list(spec.categories or ())))
            continue
        pieces = [
            (i, _as_target(spec, plan.inputs[i].obs_columns.get(name), cols.get(name)), m)
            for i, cols, m in per_input
        ]
        columns[name] = _obs_column(spec, pieces, n)
    if obs_names is None:
        obs_names = plan.obs_names[read_order_rows(plan, runs)] if n else pd.Index([])
    elif len(obs_names) != n:
        raise ValueError(f"{len(obs_names)} obs names given for {n} rows")
    names = obs_names
    return pd.DataFrame(columns, index=pd.Index(np.asarray(names, dtype=object), dtype=object))


#: Elements gathered per step when streaming a CSR dataset out (a few MB of scratch per thread).
_GATHER_ELEMS = 1 << 21


def _gather_block(chunk: int) -> int:
    """Entries per encoding task of a CSR dataset: about :data:`_GATHER_ELEMS`, whole inner chunks."""
    return max(chunk, (_GATHER_ELEMS // chunk) * chunk)


#: Blocks (gather + compress tasks) in flight per encoding thread: enough to keep every thread busy, few
#: enough that the compressed results waiting their turn stay small.
_BLOCKS_IN_FLIGHT = 2


def encode_threads() -> int:
    """Threads that gather and compress a dataset's chunks (and help read it): one per CPU, at most 4.

    ``$ANNBATCH_NB_THREADS`` overrides it (worker processes set it to their share of the CPUs).
    """
    env = os.environ.get(THREADS_ENV)
    if env:
        return max(1, int(env))
    return max(1, min(os.cpu_count() or 1, 4))


#: Environment variable fixing the threads per process (see :func:`encode_threads`).
THREADS_ENV = "ANNBATCH_NB_THREADS"


def worker_threads(n_workers: int) -> int:
    """Threads of each of ``n_workers`` local worker processes: ``$ANNBATCH_NB_THREADS``, else a CPU share.

    Parameters
    ----------
    n_workers
        Worker processes running side by side.

    Returns
    -------
    int
        The user's setting, or ``cpu_count // n_workers`` (at least 1).
    """
    env = os.environ.get(THREADS_ENV)
    if env:
        return max(1, int(env))
    return cpu_share(n_workers)


def cpu_share(n_processes: int) -> int:
    """CPUs each of ``n_processes``, side by side on this machine, gets: at least 1."""
    return max(1, (os.cpu_count() or 1) // max(1, n_processes))


class _Slots:
    """Scratch buffers for the encoding tasks: one set per task running at once, named ``<name>:<slot>``."""

    def __init__(self, n: int) -> None:
        self._free: queue.SimpleQueue[int] = queue.SimpleQueue()
        for i in range(n):
            self._free.put(i)

    def take(self) -> int:
        """A free slot number (blocks until one is free)."""
        return self._free.get()

    def give(self, slot: int) -> None:
        """Return a slot."""
        self._free.put(slot)


def _ordered(
    executor: ThreadPoolExecutor,
    fn: Callable[..., Any],
    jobs: Iterable[tuple[Any, ...]],
    window: int,
    cancel: threading.Event | None,
) -> Iterable[Any]:
    """``fn(*job)`` for every job on ``executor``, yielded in job order, at most ``window`` in flight."""
    pending: collections.deque[Future[Any]] = collections.deque()
    try:
        for job in jobs:
            _check_cancel(cancel)
            pending.append(executor.submit(fn, *job))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            _check_cancel(cancel)
            yield pending.popleft().result()
    finally:
        for f in pending:
            f.cancel()
        for f in pending:  # let running tasks finish before their buffers are reused or released
            if not f.cancelled():
                with contextlib.suppress(BaseException):
                    f.result()


def _write_csr_x(
    plan: Plan,
    writer: DatasetWriter,
    buf: CSRBuffer,
    perm: np.ndarray,
    out_indptr: np.ndarray,
    pool: BufferPool,
    progress: ProgressCallback,
    cancel: threading.Event | None,
    executor: ThreadPoolExecutor | None = None,
) -> None:
    """Stream the permuted rows out, shard by shard.

    The output is cut into blocks of about :data:`_GATHER_ELEMS` entries (whole inner chunks); each block is
    a task that gathers its rows into scratch and compresses its inner chunks. Tasks run on ``executor``'s
    threads (scipy's gather and Blosc release the GIL), a few in flight, their results added to the shard in
    order; every shard is stored with one write. Scratch is one block per running task, not one shard.
    """
    data_arr = ShardedArray(writer.data)
    idx_arr = ShardedArray(writer.indices)
    chunk = data_arr.chunk_shape[0]
    shard = data_arr.shard_shape[0]
    nnz = int(out_indptr[-1])
    n_rows = len(perm)
    perm = perm.astype(buf.indptr.dtype, copy=False)
    block = _gather_block(chunk)
    max_row = int(np.diff(buf.indptr).max()) if n_rows else 0
    n_threads = encode_threads() if executor is not None else 1
    slots = _Slots(n_threads)
    for slot in range(n_threads):  # allocate up front (not from the tasks): the pool is not thread-safe
        pool.get(f"gather_data:{slot}", block + 2 * max_row, plan.dtype)
        pool.get(f"gather_indices:{slot}", block + 2 * max_row, buf.indices.dtype)

    def encode_block(e0: int, e1: int) -> tuple[list[bytes], list[bytes]]:
        r0 = int(np.searchsorted(out_indptr, e0, side="right")) - 1
        r1 = int(np.searchsorted(out_indptr, e1, side="left"))
        lo = int(out_indptr[r0])
        m = int(out_indptr[r1]) - lo
        slot = slots.take()
        try:
            g_data = pool.get(f"gather_data:{slot}", block + 2 * max_row, plan.dtype)
            g_idx = pool.get(f"gather_indices:{slot}", block + 2 * max_row, buf.indices.dtype)
            _gather_rows(buf, perm[r0:r1], g_data[:m], g_idx[:m])
            off = e0 - lo
            d_parts, i_parts = [], []
            for c0 in range(off, off + e1 - e0, chunk):
                c1 = min(c0 + chunk, off + e1 - e0)
                d_parts.append(data_arr.encode(g_data[c0:c1]))
                i_parts.append(idx_arr.encode(g_idx[c0:c1].astype(plan.index_dtype)))
            return d_parts, i_parts
        finally:
            slots.give(slot)

    rows_done = 0
    for s0 in range(0, nnz, shard):
        _check_cancel(cancel)
        b_data, b_idx = data_arr.builder(), idx_arr.builder()
        s1 = min(s0 + shard, nnz)
        jobs = [(e0, min(e0 + block, s1)) for e0 in range(s0, s1, block)]
        if executor is None:
            results: Iterable[tuple[list[bytes], list[bytes]]] = (encode_block(*j) for j in jobs)
        else:
            results = _ordered(executor, encode_block, jobs, _BLOCKS_IN_FLIGHT * n_threads, cancel)
        for d_parts, i_parts in results:
            for d in d_parts:
                b_data.add_encoded(d)
            for i in i_parts:
                b_idx.add_encoded(i)
        while b_data.n_added < data_arr.n_chunks:  # chunks past the end of the array
            b_data.add_encoded(None)
            b_idx.add_encoded(None)
        coords = (s0 // shard,)
        _check_cancel(cancel)
        data_arr.put(coords, b_data.finish_parts())
        del b_data
        stop_point(f"shard:{writer.k}")
        idx_arr.put(coords, b_idx.finish_parts())
        del b_idx
        finished = int(np.searchsorted(out_indptr, s1, side="right")) - 1 if s1 < nnz else n_rows
        progress("rows", finished - rows_done)
        rows_done = finished
    progress("rows", n_rows - rows_done)


def _write_dense_x(
    writer: DatasetWriter,
    dense: np.ndarray,
    perm: np.ndarray,
    pool: BufferPool,
    progress: ProgressCallback,
    cancel: threading.Event | None,
    executor: ThreadPoolExecutor | None = None,
) -> None:
    """Stream permuted dense rows out, a few inner chunks per task (see :func:`_write_csr_x`)."""
    arr = ShardedArray(writer.x)
    chunk = arr.chunk_shape[0]
    shard = arr.shard_shape[0]
    n_rows = len(perm)
    row_bytes = max(dense.shape[1] * dense.dtype.itemsize, 1)
    per_task = max(1, (_GATHER_ELEMS * 4) // (row_bytes * chunk))  # inner chunks per task (~8 MB)
    n_threads = encode_threads() if executor is not None else 1
    slots = _Slots(n_threads)
    for slot in range(n_threads):
        pool.get(f"gather_dense:{slot}", chunk * dense.shape[1], dense.dtype)

    def encode_chunks(c0: int, c1: int) -> list[bytes | None]:
        slot = slots.take()
        try:
            scratch = pool.get(f"gather_dense:{slot}", chunk * dense.shape[1], dense.dtype)
            scratch = scratch.reshape(chunk, dense.shape[1])
            out: list[bytes | None] = []
            for a in range(c0, c1, chunk):
                if a >= n_rows:
                    out.append(None)
                    continue
                b = min(a + chunk, n_rows)
                np.take(dense, perm[a:b], axis=0, out=scratch[: b - a])
                out.append(arr.encode(scratch[: b - a]))
            return out
        finally:
            slots.give(slot)

    for s0 in range(0, n_rows, shard):
        _check_cancel(cancel)
        builder = arr.builder()
        jobs = [
            (c0, min(c0 + per_task * chunk, s0 + shard)) for c0 in range(s0, s0 + shard, per_task * chunk)
        ]
        if executor is None:
            results: Iterable[list[bytes | None]] = (encode_chunks(*j) for j in jobs)
        else:
            results = _ordered(executor, encode_chunks, jobs, _BLOCKS_IN_FLIGHT * n_threads, cancel)
        for parts in results:
            for part in parts:
                builder.add_encoded(part)
        _check_cancel(cancel)
        arr.put((s0 // shard, 0), builder.finish_parts())
        del builder
        stop_point(f"shard:{writer.k}")
        progress("rows", min(s0 + shard, n_rows) - s0)


# --------------------------------------------------------------------------------------------------
# Writing one dataset
# --------------------------------------------------------------------------------------------------
def reserve_buffers(plan: Plan, k: int, sources: list[Source], pool: BufferPool) -> int:
    """Grow ``pool`` to the buffers writing dataset ``k`` reuses and touch them; the bytes touched.

    The read buffers (CSR ``data``/``indices``/``indptr`` for the dataset's entries, or the dense block)
    and each encoding thread's gather scratch, sized as :func:`write_dataset` sizes them (a dense input in a
    sparse collection is not counted; the scratch allows rows as long as ``n_vars``). For a caller that
    times datasets (the planner's calibration): a run pays these page faults once, not per dataset.
    """
    runs = plan.dataset_runs(k)
    n_rows = int((runs[:, 2] - runs[:, 1]).sum())
    threads = encode_threads()
    if plan.x_kind == "csr":
        capacity = 0
        for i in np.unique(runs[:, 0]):
            if sources[i].info.x_kind == "csr":
                capacity += int(sources[i].run_nnz(runs[runs[:, 0] == i][:, 1:]).sum())
        idx_dtype = _index_dtype(capacity, plan.n_vars)
        pool.get("data", capacity, plan.dtype)
        pool.get("indices", capacity, idx_dtype)
        pool.get("indptr", n_rows + 1, idx_dtype)
        block = _gather_block(plan.x_chunk_elems)
        for slot in range(threads):
            pool.get(f"gather_data:{slot}", block + 2 * plan.n_vars, plan.dtype)
            pool.get(f"gather_indices:{slot}", block + 2 * plan.n_vars, idx_dtype)
    else:
        pool.get("dense", n_rows * plan.n_vars, plan.dtype)
    return pool.touch()


def write_dataset(
    plan: Plan,
    k: int,
    sources: list[Source],
    root: Any,
    *,
    progress: ProgressCallback | None = None,
    cancel: threading.Event | None = None,
    pool: BufferPool | None = None,
    obs_names: pd.Index | None = None,
) -> dict[str, Any]:
    """Read, permute and write output dataset ``k``; record it complete.

    Parameters
    ----------
    plan
        The plan.
    k
        Dataset number.
    sources
        Opened sources, in plan input order.
    root
        Output root zarr group.
    progress
        Called with ``("bytes", n)`` after reads and ``("rows", n)`` after writes.
    cancel
        Checked between reads and shard writes; when set, :class:`CancelledError` is raised and the dataset is
        left incomplete (a resume rewrites it).
    pool
        Scratch buffers to reuse across datasets.
    obs_names
        Unique cell names of the dataset's rows in read order (``plan.obs_names[read_order_rows(plan,
        plan.dataset_runs(k))]``); by default taken from ``plan.obs_names``. A cluster task receives them so
        that its plan need not carry every cell's name.

    Returns
    -------
    dict
        The completion record (rows, nnz).
    """
    progress = progress or (lambda what, n: None)
    runs = plan.dataset_runs(k)
    perm = plan.dataset_permutation(k)
    n_rows = len(perm)
    pool = pool if pool is not None else BufferPool()
    n_threads = encode_threads()
    executor = ThreadPoolExecutor(n_threads, thread_name_prefix=f"annbatch-nb-{k}") if n_threads > 1 else None
    frames_thread = ThreadPoolExecutor(1, thread_name_prefix=f"annbatch-nb-{k}-frames") if executor else None
    try:
        writer = DatasetWriter(root, k, plan, n_rows, nnz=None)
        frames: Future[None] | None = None

        def start_frames() -> None:
            # obs (read, assembled, permuted) and the dataset's obs/var are written on a helper thread while X
            # is written (frames.write_frames: mostly Python and zarr's event loop), not while X is read: X's
            # many short reads each give up the GIL and wait to get it back from the helper thread (measured:
            # 500 runs of 100 rows took 0.24 s to read beside it, 0.15 s alone; writing X compresses in
            # threads that release the GIL). On a thread of its own: the encoding threads stay X's.
            nonlocal frames
            if frames_thread is None:
                writer.write_frames(_build_obs(plan, sources, runs, obs_names).iloc[perm])
            else:
                frames = frames_thread.submit(
                    lambda: writer.write_frames(_build_obs(plan, sources, runs, obs_names).iloc[perm])
                )

        if plan.x_kind == "csr":
            buf = _read_csr(plan, sources, runs, pool, progress, cancel, executor)
            start_frames()
            stop_point(f"dataset-read:{k}")
            out_nnz = np.diff(buf.indptr)[perm]
            out_indptr = np.zeros(n_rows + 1, dtype=np.int64)
            np.cumsum(out_nnz, out=out_indptr[1:])
            del out_nnz
            nnz = int(out_indptr[-1])
            writer.create_x(nnz)
            writer.indptr[...] = out_indptr
            _write_csr_x(plan, writer, buf, perm, out_indptr, pool, progress, cancel, executor)
        else:
            dense = _read_dense(plan, sources, runs, pool, progress, cancel)
            start_frames()
            stop_point(f"dataset-read:{k}")
            nnz = n_rows * plan.n_vars
            _write_dense_x(writer, dense, perm, pool, progress, cancel, executor)
        if frames is not None:
            frames.result()
    finally:
        for threads in (executor, frames_thread):
            if threads is not None:
                threads.shutdown(wait=True, cancel_futures=True)
    stop_point(f"dataset-written:{k}")
    record = {"n_obs": n_rows, "nnz": nnz}
    mark_complete(root, k, record)
    return record


# --------------------------------------------------------------------------------------------------
# Running a whole plan
# --------------------------------------------------------------------------------------------------
def _close_all(sources: list[Source]) -> None:
    for s in sources:
        s.close()


def _open_for_plan(plan: Plan) -> list[Source]:
    sources: list[Source] = []
    try:
        for info in plan.inputs:
            if not input_exists(info.path):
                raise InputError(info.display, "no longer exists; it was there when the plan was made")
            src = open_source(InputSpec(info.path, info.display), info=info)
            sources.append(src)
            if src.stat() != (info.size_bytes, info.mtime):
                raise InputError(info.display, "changed since the plan was made (size or mtime); plan again")
    except BaseException:
        for s in sources:
            s.close()
        raise
    return sources


# --------------------------------------------------------------------------------------------------
# Several processes
# --------------------------------------------------------------------------------------------------
#: State of a worker process (set by its initializer).
_WORKER: dict[str, Any] = {}


def resolve_workers(workers: int | str, plan: Plan, n_todo: int) -> int:
    """How many processes write datasets (see :func:`execute`).

    Raises
    ------
    ParameterError
        For anything but a positive whole number or ``"auto"``.
    """
    if workers == "auto":  # the planner's rule, so that its predictions assume what runs
        from .predict import auto_workers

        return auto_workers(plan, n_todo)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ParameterError(f"workers must be a positive whole number or 'auto', got {workers!r}")
    return min(workers, max(n_todo, 1))


class _StopFlag:
    """A multiprocessing event seen as the ``cancel`` argument of :func:`write_dataset`."""

    def __init__(self, event: Any) -> None:
        self._event = event

    def is_set(self) -> bool:
        return bool(self._event.is_set())


def _worker_init(
    plan: Plan, output: str, messages: Any, stop: Any, parent: int, env: dict[str, str] | None = None
) -> None:
    os.environ.update(env or {})  # object-store settings as the parent has them now (forkserver env is older)
    _WORKER.update(
        plan=plan,
        root=open_root(output, mode="r+"),  # a local path or an s3:// URL
        sources=None,
        messages=messages,
        stop=_StopFlag(stop),
        pool=BufferPool(),
        parent=parent,
    )


def _worker_write(k: int) -> tuple[int, float]:
    w = _WORKER
    if w["sources"] is None:
        remember_manifests(w["plan"].manifests)
        w["sources"] = [open_source(InputSpec(i.path, i.display), info=i) for i in w["plan"].inputs]
    messages = w["messages"]
    t = time.perf_counter()
    write_dataset(
        w["plan"],
        k,
        w["sources"],
        w["root"],
        progress=lambda what, n: messages.put((what, n)),
        cancel=w["stop"],
        pool=w["pool"],
    )
    return k, time.perf_counter() - t


def _run_in_processes(
    plan: Plan,
    output: str,
    todo: list[int],
    n_workers: int,
    report: ProgressCallback,
    cancel: threading.Event | None,
    result: ShuffleResult,
) -> None:
    """Write datasets ``todo`` in ``n_workers`` processes; progress flows back through a queue."""
    import multiprocessing as mp
    import queue as queue_mod
    from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait

    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["annbatch_nb.engine"])
    messages = ctx.Queue()
    stop = ctx.Event()

    def drain(timeout: float) -> None:
        try:
            what, n = messages.get(timeout=timeout)
            report(what, n)
            while True:
                what, n = messages.get_nowait()
                report(what, n)
        except queue_mod.Empty:
            pass

    env = dict(store_env() or {})
    env.setdefault(THREADS_ENV, str(worker_threads(n_workers)))  # threads per worker
    with ProcessPoolExecutor(
        n_workers,
        mp_context=ctx,
        initializer=_worker_init,
        initargs=(plan, output, messages, stop, os.getpid(), env),
    ) as pool:
        pending = {pool.submit(_worker_write, k) for k in todo}
        try:
            while pending:
                drain(0.1)
                if cancel is not None and cancel.is_set():
                    stop.set()
                done, pending = wait(pending, timeout=0, return_when=FIRST_EXCEPTION)
                for f in done:
                    _, seconds = f.result()  # re-raises a worker's error here
                    result.dataset_seconds.append(seconds)
                    result.datasets_written += 1
                    report("datasets", 1)
        except BaseException:
            stop.set()
            for f in pending:
                f.cancel()
            raise
        finally:
            drain(0)


def _with_recorded_seed(plan: Plan, output: str | os.PathLike[str]) -> Plan:
    """The plan an earlier run at ``output`` was started with, when ``plan`` differs only by a drawn seed.

    A call without a seed draws one; re-running it after an interruption must resume, not refuse.
    """
    if not plan.params.seed_drawn:
        return plan
    manifest = read_manifest(output)
    if manifest is None or manifest.get("fingerprint") == plan.fingerprint:
        return plan
    seed = manifest.get("params", {}).get("seed")
    if not isinstance(seed, int) or seed == plan.params.seed:
        return plan
    candidate = build_plan(plan.inputs, dataclasses.replace(plan.params, seed=seed), plan.calibration)
    return candidate if candidate.fingerprint == manifest.get("fingerprint") else plan


def execute(
    plan: Plan,
    output: str | os.PathLike[str],
    *,
    progress: bool = True,
    cancel: threading.Event | None = None,
    on_progress: ProgressCallback | None = None,
    restart: bool = False,
    workers: int | Literal["auto"] = "auto",
    client: Any = None,
    retries: int = 2,
) -> ShuffleResult:
    """Write ``plan`` as a collection at ``output`` (resuming an interrupted run of the same plan).

    Parameters
    ----------
    plan
        The plan to execute.
    output
        Collection path (``.zarr``).
    progress
        Show tqdm.auto progress bars (bytes read, cells written; datasets too on a cluster).
    cancel
        Set it (from another thread) to stop; the output stays resumable.
    on_progress
        Extra callback receiving ``("bytes", n)``, ``("rows", n)`` and ``("datasets", n)`` increments; a
        resumed run first reports the rows and bytes of the datasets earlier runs completed.
    restart
        Remove what an earlier annbatch-nb run wrote at ``output`` (only that) and start over.
    workers
        Processes writing datasets side by side (each holds one dataset in memory, and uses its share of the
        CPUs with threads). ``"auto"``: one process per :func:`encode_threads` CPUs (one on a machine with
        up to 4 CPUs: its threads already keep them busy), at most the datasets left, within the plan's memory
        budget, and one for runs predicted to take only a few seconds. Leave it at ``"auto"`` with
        ``client``: the cluster's workers are used.
    client
        A :class:`dask.distributed.Client`: every dataset is a task on its cluster (see
        :mod:`annbatch_nb.distributed`). The workers must see ``output`` and the inputs at the same paths (a
        shared filesystem) or use ``s3://`` URLs. The bytes are the same as a local run's.
    retries
        With ``client``: times a failed dataset task is run again (a killed worker's task is rescheduled by
        dask in any case).

    Returns
    -------
    ShuffleResult
        What was written.

    Raises
    ------
    OutputError
        If the output cannot be used or written (the run stays resumable).
    CancelledError
        If ``cancel`` was set (the run stays resumable).
    ParameterError
        For a bad ``workers`` or ``retries`` value, or ``workers`` given together with ``client``.
    """
    t0 = time.perf_counter()
    if client is not None:
        from .distributed import check_client

        check_client(client, workers=workers, retries=retries)  # fails before anything is opened
    else:
        resolve_workers(workers, plan, 1)  # a bad value fails before anything is opened
    plan = _with_recorded_seed(plan, output)
    sources = _open_for_plan(plan)  # inputs first: a vanished or changed input creates no output
    plan.manifests.update(manifests_of(plan.inputs))  # workers receive the parsed manifests with the plan
    try:
        state = open_output(output, plan, restart=restart)
    except BaseException:
        _close_all(sources)
        raise
    result = ShuffleResult(output=str(output), plan=plan, datasets_resumed=len(state.complete))
    if state.committed:
        release_lock(state.lock)
        _close_all(sources)
        result.already_complete = True
        result.seconds = time.perf_counter() - t0
        return result
    done_rows = int(sum(plan.rows_per_dataset[k] for k in state.complete))
    done_bytes = int(sum(_raw_input_bytes(plan, k) for k in state.complete))
    tasks = (len(state.complete), plan.n_datasets) if client is not None else None
    bars = _Progress(plan, progress, done_rows, done_bytes, tasks)
    if on_progress is not None and done_rows:  # a resumed run: first what earlier runs did
        on_progress("rows", done_rows)
        on_progress("bytes", done_bytes)
        on_progress("datasets", len(state.complete))

    def report(what: str, n: int) -> None:
        bars(what, n)
        if on_progress is not None:
            on_progress(what, n)

    pool = BufferPool()
    todo = [k for k in range(plan.n_datasets) if k not in state.complete]
    n_workers = 0 if client is not None else resolve_workers(workers, plan, len(todo))
    result.workers = n_workers
    try:
        stop_point("start")
        if client is not None:
            from .distributed import run_on_cluster

            _close_all(sources)  # the workers open their own
            run_on_cluster(client, plan, state, todo, report, cancel, result, retries=retries, note=bars.note)
        elif n_workers > 1:
            _close_all(sources)  # the workers open their own
            _run_in_processes(plan, state.path, todo, n_workers, report, cancel, result)
        else:
            for k in todo:
                t = time.perf_counter()
                write_dataset(plan, k, sources, state.root, progress=report, cancel=cancel, pool=pool)
                result.dataset_seconds.append(time.perf_counter() - t)
                result.datasets_written += 1
                report("datasets", 1)
        stop_point("before-commit")
        commit(state.root, plan)
    except WRITE_ERRORS as e:  # OSError locally, obstore's errors on an object store
        reason = getattr(e, "strerror", None) or describe_store_error(e)
        raise OutputError(
            output,
            f"writing failed ({reason}); nothing was committed: fix that and re-run the same command "
            "to resume",
        ) from e
    finally:
        pool.clear()
        bars.close()
        _close_all(sources)
        release_lock(state.lock)
    result.seconds = time.perf_counter() - t0
    return result


def shuffle(
    inputs: str | os.PathLike[str] | Iterable[str | os.PathLike[str]],
    output: str | os.PathLike[str],
    *,
    shuffle_chunk_size: int = 1000,
    dataset_size: int | str = DEFAULT_DATASET_SIZE,
    n_obs_per_chunk: int = 64,
    shard_size: int | str = "1GB",
    seed: int | None = None,
    var_join: VarJoin = "outer",
    dtype: Any = None,
    assignment: Assignment = "balanced",
    progress: bool = True,
    cancel: threading.Event | None = None,
    restart: bool = False,
    virtualize: Virtualize = "auto",
    workers: int | Literal["auto"] = "auto",
    client: Any = None,
    retries: int = 2,
    mode: Literal["write", "append"] = "write",
    rewrite: float | Literal["auto"] = "auto",
) -> ShuffleResult | AppendResult:
    """Preshuffle AnnData files into an annbatch collection, or add them to one.

    Rows of the inputs (in input order) are cut into runs of ``shuffle_chunk_size``; the runs are spread at
    random over output datasets of about ``dataset_size``; each dataset's rows are fully permuted and written
    as sharded zarr v3 (Blosc lz4), readable by ``annbatch.Loader.use_collection``. Re-running the same call
    after an interruption resumes it.

    Parameters
    ----------
    inputs
        ``.h5ad`` files, AnnData ``.zarr`` stores, directories of them, or glob patterns.
    output
        Collection path (``.zarr``); must not exist, be empty, or be an unfinished run of the same plan.
    shuffle_chunk_size
        Rows per contiguous run cut from the inputs.
    dataset_size
        Rows per output dataset, a size string (``"2GB"``) of uncompressed X + obs, or ``"auto"`` (the largest
        dataset whose predicted peak memory fits half of this machine's memory).
    n_obs_per_chunk
        Rows per zarr chunk.
    shard_size
        Target bytes per zarr shard.
    seed
        Random seed; None draws one (recorded in the manifest).
    var_join
        ``outer`` (union of genes, missing genes are zeros) or ``inner`` (genes in every input).
    dtype
        Output X dtype (default: numpy result type of the inputs).
    assignment
        ``balanced`` (every dataset gets every input's share of runs) or ``uniform`` (annbatch's random cut).
    progress
        Show progress bars.
    cancel
        A :class:`threading.Event`; setting it stops the run, leaving it resumable.
    restart
        Remove what an earlier annbatch-nb run wrote at ``output`` (only that) and start over.
    virtualize
        How ``.h5ad`` inputs are read: ``"auto"``, ``True`` or ``False`` (see :func:`annbatch_nb.plan`).
    workers
        Processes writing datasets side by side (see :func:`execute`).
    client
        A :class:`dask.distributed.Client`: write the datasets as tasks on its cluster (see :func:`execute`).
    retries
        With ``client``: times a failed dataset task is run again.
    mode
        ``write`` a new collection (or resume one), or ``append`` ``inputs`` to the finished collection
        ``output`` (see :func:`annbatch_nb.append.append`; the collection's own parameters are kept, so only
        ``seed``, ``rewrite``, ``progress``, ``cancel``, ``workers`` and ``virtualize`` apply).
    rewrite
        With ``mode="append"``: share of the existing datasets reshuffled with the new cells, or ``"auto"``.

    Returns
    -------
    ShuffleResult or AppendResult
        What was written.
    """
    if mode == "append":
        given = {
            "shuffle_chunk_size": shuffle_chunk_size,
            "dataset_size": dataset_size,
            "n_obs_per_chunk": n_obs_per_chunk,
            "shard_size": shard_size,
            "var_join": var_join,
            "dtype": dtype,
            "assignment": assignment,
        }
        defaults = inspect.signature(shuffle).parameters
        ignored = [k for k, v in given.items() if v != defaults[k].default]
        if ignored:
            raise ParameterError(
                f"{', '.join(ignored)} cannot be set when appending: the collection keeps its own parameters"
            )
        from .append import append

        return append(
            inputs,
            output,
            rewrite=rewrite,
            seed=seed,
            progress=progress,
            cancel=cancel,
            workers=workers,
            virtualize=virtualize,
            client=client,
            retries=retries,
        )
    if mode != "write":
        raise ParameterError(f"mode must be 'write' or 'append', got {mode!r}")
    p = plan(
        inputs,
        shuffle_chunk_size=shuffle_chunk_size,
        dataset_size=dataset_size,
        n_obs_per_chunk=n_obs_per_chunk,
        shard_size=shard_size,
        seed=seed,
        var_join=var_join,
        dtype=dtype,
        assignment=assignment,
        virtualize=virtualize,
    )
    return execute(
        p,
        output,
        progress=progress,
        cancel=cancel,
        restart=restart,
        workers=workers,
        client=client,
        retries=retries,
    )

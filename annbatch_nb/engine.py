"""Execute a plan: read each output dataset's runs, permute, write sharded zarr, commit.

Each output dataset is an independent unit of work (:func:`write_dataset`) that needs only the plan, the
opened sources and the output group. Memory per dataset is one dataset's X in a read buffer (CSR: data in
the output dtype + int32 column indices + row pointers; dense: the rows) plus one shard being written.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .collection import DatasetWriter, commit, mark_complete, open_output
from .errors import CancelledError, InputError
from .plan import DEFAULT_DATASET_SIZE, Plan, VarJoin, plan
from .sources import ColumnSpec, InputSpec, Source, open_source

__all__ = ["ShuffleResult", "execute", "shuffle", "write_dataset"]

ProgressCallback = Callable[[str, int], None]


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
    """

    output: str
    plan: Plan
    datasets_written: int = 0
    datasets_resumed: int = 0
    already_complete: bool = False
    seconds: float = 0.0
    dataset_seconds: list[float] = field(default_factory=list)

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
    """Two tqdm.auto bars: bytes read and cells written (rate and ETA included)."""

    def __init__(self, plan: Plan, enabled: bool, done_rows: int, done_bytes: int) -> None:
        self.bars: list[Any] = []
        if not enabled:
            return
        from tqdm.auto import tqdm

        total_bytes = int(sum(i.raw_x_bytes for i in plan.inputs))
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
        self.bars = [self.read, self.write]

    def __call__(self, what: str, n: int) -> None:
        if self.bars:
            (self.read if what == "bytes" else self.write).update(n)

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


def _read_csr(
    plan: Plan,
    sources: list[Source],
    runs: np.ndarray,
    progress: ProgressCallback,
    cancel: threading.Event | None,
) -> sp.csr_matrix:
    """Read the runs (sorted by input) into one CSR matrix in the output gene space, read order."""
    index_dtype = np.int32 if plan.n_vars < 2**31 else np.int64
    by_source = [(i, runs[runs[:, 0] == i][:, 1:]) for i in np.unique(runs[:, 0])]
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
            dense_parts[int(i)] = part
            capacity += part.nnz
            counts.append(np.diff(part.indptr))
    data = np.empty(capacity, dtype=plan.dtype)
    indices = np.empty(capacity, dtype=index_dtype)
    pos = 0
    needs_sort = False
    for j, (i, r) in enumerate(by_source):
        _check_cancel(cancel)
        src = sources[i]
        if int(i) in dense_parts:
            part = dense_parts.pop(int(i))
            data[pos : pos + part.nnz] = part.data
            indices[pos : pos + part.nnz] = part.indices
            pos += part.nnz
            continue
        n = src.read_csr_into(r, data[pos:], indices[pos:])
        progress("bytes", n * (src.info.dtype.itemsize + 4) + len(counts[j]) * 8)
        vmap = plan.var_maps[i]
        if not _is_identity(vmap):
            seg = indices[pos : pos + n]
            mapped = vmap[seg]
            keep = mapped >= 0
            if not keep.all():  # inner join: drop entries of genes not in the output
                row_starts = np.concatenate([[0], np.cumsum(counts[j])[:-1]])
                kept_cum = np.concatenate([[0], np.cumsum(keep)])
                counts[j] = kept_cum[row_starts + counts[j]] - kept_cum[row_starts]
                m = int(keep.sum())
                data[pos : pos + m] = data[pos : pos + n][keep]
                indices[pos : pos + m] = mapped[keep]
                n = m
            else:
                seg[...] = mapped
            kept = vmap[vmap >= 0]
            needs_sort |= bool(np.any(np.diff(kept) < 0))
        pos += n
    row_nnz = np.concatenate(counts) if counts else np.zeros(0, dtype=np.int64)
    indptr = np.concatenate([[0], np.cumsum(row_nnz, dtype=np.int64)])
    mat = sp.csr_matrix((data[:pos], indices[:pos], indptr), shape=(len(row_nnz), plan.n_vars), copy=False)
    if needs_sort:
        mat.has_sorted_indices = False
        mat.sort_indices()
    return mat


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
    progress: ProgressCallback,
    cancel: threading.Event | None,
) -> np.ndarray:
    n = int((runs[:, 2] - runs[:, 1]).sum())
    out = np.empty((n, plan.n_vars), dtype=plan.dtype)
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


def _build_obs(plan: Plan, sources: list[Source], runs: np.ndarray) -> pd.DataFrame:
    """Obs of the runs in read order, in the unified schema, with src_path and unique names."""
    n = int((runs[:, 2] - runs[:, 1]).sum())
    per_input: list[tuple[int, dict[str, Any], int]] = []
    global_rows = []
    for i in np.unique(runs[:, 0]):
        r = runs[runs[:, 0] == i][:, 1:]
        m = int((r[:, 1] - r[:, 0]).sum())
        per_input.append((int(i), sources[i].read_obs(r), m))
        global_rows.append(np.concatenate([np.arange(a, b) for a, b in r]) + plan.input_offsets[i])
    columns: dict[str, Any] = {}
    for name, spec in plan.obs_schema.items():
        if name == "src_path":
            codes = np.concatenate([np.full(m, i, dtype=np.int64) for i, _, m in per_input])
            columns[name] = pd.Categorical.from_codes(codes, categories=pd.Index(list(spec.categories or ())))
            continue
        pieces = [(i, cols.get(name), m) for i, cols, m in per_input]
        columns[name] = _obs_column(spec, pieces, n)
    names = plan.obs_names[np.concatenate(global_rows)] if global_rows else pd.Index([])
    return pd.DataFrame(columns, index=pd.Index(np.asarray(names, dtype=object), dtype=object))


# --------------------------------------------------------------------------------------------------
# Writing one dataset
# --------------------------------------------------------------------------------------------------
def write_dataset(
    plan: Plan,
    k: int,
    sources: list[Source],
    root: Any,
    *,
    progress: ProgressCallback | None = None,
    cancel: threading.Event | None = None,
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

    Returns
    -------
    dict
        The completion record (rows, nnz).
    """
    progress = progress or (lambda what, n: None)
    runs = plan.dataset_runs(k)
    perm = plan.dataset_permutation(k)
    n_rows = len(perm)
    obs = _build_obs(plan, sources, runs).iloc[perm]
    if plan.x_kind == "csr":
        mat = _read_csr(plan, sources, runs, progress, cancel)
        out_nnz = np.diff(mat.indptr)[perm]
        out_indptr = np.concatenate([[0], np.cumsum(out_nnz, dtype=np.int64)])
        writer = DatasetWriter(root, k, plan, n_rows, int(out_indptr[-1]))
        writer.indptr[...] = out_indptr
        nnz = int(out_indptr[-1])
        step = writer.shard_elems
        rows_done = 0
        for e0 in range(0, nnz, step):
            _check_cancel(cancel)
            e1 = min(e0 + step, nnz)
            r0 = int(np.searchsorted(out_indptr, e0, side="right")) - 1
            r1 = int(np.searchsorted(out_indptr, e1, side="left"))
            block = mat[perm[r0:r1]]
            off = e0 - int(out_indptr[r0])
            writer.data[e0:e1] = block.data[off : off + e1 - e0]
            writer.indices[e0:e1] = block.indices[off : off + e1 - e0].astype(plan.index_dtype, copy=False)
            del block
            finished = int(np.searchsorted(out_indptr, e1, side="right")) - 1 if e1 < nnz else n_rows
            progress("rows", finished - rows_done)
            rows_done = finished
        progress("rows", n_rows - rows_done)
        del mat
    else:
        buf = _read_dense(plan, sources, runs, progress, cancel)
        writer = DatasetWriter(root, k, plan, n_rows)
        step = writer.shard_rows
        nnz = n_rows * plan.n_vars
        for r0 in range(0, n_rows, step):
            _check_cancel(cancel)
            r1 = min(r0 + step, n_rows)
            writer.x[r0:r1] = buf[perm[r0:r1]]
            progress("rows", r1 - r0)
        del buf
    writer.write_frames(obs)
    record = {"n_obs": n_rows, "nnz": nnz}
    mark_complete(root, k, record)
    return record


# --------------------------------------------------------------------------------------------------
# Running a whole plan
# --------------------------------------------------------------------------------------------------
def _open_for_plan(plan: Plan) -> list[Source]:
    sources: list[Source] = []
    try:
        for info in plan.inputs:
            if not os.path.exists(info.path):
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


def execute(
    plan: Plan,
    output: str | os.PathLike[str],
    *,
    progress: bool = True,
    cancel: threading.Event | None = None,
    on_progress: ProgressCallback | None = None,
) -> ShuffleResult:
    """Write ``plan`` as a collection at ``output`` (resuming an interrupted run of the same plan).

    Parameters
    ----------
    plan
        The plan to execute.
    output
        Collection path (``.zarr``).
    progress
        Show tqdm.auto progress bars (bytes read, cells written).
    cancel
        Set it (from another thread) to stop; the output stays resumable.
    on_progress
        Extra callback receiving ``("bytes", n)`` and ``("rows", n)`` increments.

    Returns
    -------
    ShuffleResult
        What was written.
    """
    t0 = time.perf_counter()
    state = open_output(output, plan)
    result = ShuffleResult(output=str(output), plan=plan, datasets_resumed=len(state.complete))
    if state.committed:
        result.already_complete = True
        result.seconds = time.perf_counter() - t0
        return result
    done_rows = int(sum(plan.rows_per_dataset[k] for k in state.complete))
    done_bytes = int(sum(_raw_input_bytes(plan, k) for k in state.complete))
    bars = _Progress(plan, progress, done_rows, done_bytes)

    def report(what: str, n: int) -> None:
        bars(what, n)
        if on_progress is not None:
            on_progress(what, n)

    sources = _open_for_plan(plan)
    try:
        for k in range(plan.n_datasets):
            if k in state.complete:
                continue
            t = time.perf_counter()
            write_dataset(plan, k, sources, state.root, progress=report, cancel=cancel)
            result.dataset_seconds.append(time.perf_counter() - t)
            result.datasets_written += 1
        commit(state.root, plan)
    finally:
        bars.close()
        for s in sources:
            s.close()
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
    progress: bool = True,
    cancel: threading.Event | None = None,
) -> ShuffleResult:
    """Preshuffle AnnData files into an annbatch collection.

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
        Rows per output dataset, or a size string (``"2GB"``) of uncompressed X + obs.
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
    progress
        Show progress bars.
    cancel
        A :class:`threading.Event`; setting it stops the run, leaving it resumable.

    Returns
    -------
    ShuffleResult
        What was written.
    """
    p = plan(
        inputs,
        shuffle_chunk_size=shuffle_chunk_size,
        dataset_size=dataset_size,
        n_obs_per_chunk=n_obs_per_chunk,
        shard_size=shard_size,
        seed=seed,
        var_join=var_join,
        dtype=dtype,
    )
    return execute(p, output, progress=progress, cancel=cancel)

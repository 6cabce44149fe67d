"""Predicted peak memory, wall time and output size of a plan, and the calibration behind them.

Memory mirrors the engine's own buffer accounting (:func:`dataset_memory`: the buffers that
:func:`annbatch_nb.engine.write_dataset` allocates for one output dataset, reused across datasets), plus what
a run holds throughout (:func:`run_memory`: scanned inputs and plan, per cell), plus the interpreter's
baseline; with several worker processes, the processes' sum. Time is a sum of counted costs
(:func:`predict_time`): per byte of X streamed through the engine, per read call, per obs row, per dataset,
per input a dataset reads, per input opened, per run; with worker processes, their start and the datasets
dealt over them. The costs (:class:`Calibration`) are fitted by :func:`calibrate` to datasets the engine
writes from the user's own files (a few seconds, cached per machine and inputs); without a calibration,
typical values of a 2-core reference machine are used. Predictions assume the workers ``workers="auto"`` will
use (:func:`auto_workers`, which the engine calls).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import tempfile
import time
from collections.abc import Callable, Generator, Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from .plan import Plan
    from .sources import SourceInfo

__all__ = [
    "DEFAULT_CALIBRATION",
    "Calibration",
    "MemoryPrediction",
    "TimePrediction",
    "auto_workers",
    "cached_calibration",
    "calibrate",
    "dataset_memory",
    "dataset_seconds",
    "peak_rss_bytes",
    "predict_memory",
    "predict_output_bytes",
    "predict_time",
    "rows_for_memory",
    "run_memory",
]

#: zarr's decode buffers while reading an input (several compressed chunks fetched and decoded at once): an
#: estimate from measured peaks (zarr inputs' peaks were 20-40 MB above h5ad inputs' of the same data).
ZARR_READ_BYTES = 20_000_000
#: While one worker process is at its peak, the others are elsewhere in their datasets (reading, writing): on
#: average at this share of their dataset's buffers (measured with two workers: the processes' summed peak
#: was 8-13 % below the sum of their peaks).
OTHER_WORKERS_DATASET_SHARE = 0.6
#: Python's per-object cost of a short ``str`` (header), plus one pointer to it.
_STR_OVERHEAD = 49 + 8


@dataclass(frozen=True)
class Calibration:
    """Costs of this machine on these inputs: what the time and memory models multiply their counts by.

    Per-format entries are keyed by input format (``h5ad``, ``zarr``); an unknown format uses the slowest.

    Attributes
    ----------
    x_bytes_per_s
        Streaming rate of one dataset's X through the engine (read, column remap, row gather, compression,
        write), per uncompressed input byte of X (CSR: data + indices), by input format.
    read_call_s
        Fixed cost of one read call on one array (X ``data``/``indices``, an obs column), by input format.
        The engine reads each contiguous range of rows once per array.
    decode_bytes_per_s
        Reading and decoding whole compressed chunks of X, per uncompressed byte, by input format: what the
        bytes of a chunk that a dataset does not keep cost (a run that covers part of a chunk decodes all of
        it; see :func:`_extra_decoded_bytes`).
    obs_rows_per_s
        Reading, assembling and writing obs and cell names, per row.
    dataset_s
        Fixed cost per output dataset (arrays and frames created, completion record).
    dataset_input_s
        Fixed cost per input a dataset reads from (obs nodes looked up, per-input bookkeeping).
    input_open_s
        Opening one input for a run, by input format.
    run_s
        Fixed cost per run: output opened and locked, manifest, commit.
    first_dataset_s
        One-time costs of a process's first dataset (code run for the first time: zarr's array and group
        creation, codecs, thread pools), paid after its X is read into the freshly touched buffers.
    fault_bytes_per_s
        First touch of freshly allocated memory (page faults), paid once per run for the reused buffers.
    cold_read_s
        Latency of one read of X that the page cache does not hold (the disk's seek and request), measured on
        the user's largest input by :func:`~annbatch_nb.pagecache.cold_read_costs`.
    cold_bytes_per_s
        Reading bytes of X that the page cache does not hold, on top of ``x_bytes_per_s`` (which
        :func:`calibrate` times with the samples' bytes cached). A plan charges both for the fraction of each
        input the cache does not hold when it is made (:attr:`~annbatch_nb.plan.Plan.uncached`).
    quick_touch_bytes
        The part of a process's first touch that typically comes from memory freed moments before (its own
        start, other programs), quick to touch again: not charged at ``fault_bytes_per_s``. A reference
        value, not measured by :func:`calibrate`: it changes from one start of a process to the next
        (see :func:`_touch_seconds`); where every page is quick to touch it makes no difference.
    compression_ratio
        Compressed / raw bytes of X.
    process_start_s
        Starting one worker process (interpreter and imports).
    parallel_efficiency
        Speed of each of ``n`` worker processes relative to one process alone (memory bandwidth, caches).
    baseline_rss_bytes
        Peak resident memory of a fresh process that imported annbatch-nb and ran a tiny shuffle.
    import_rss_bytes
        Resident memory of a fresh process with annbatch-nb imported (the forkserver, an idle worker).
    cell_bytes
        Resident memory a run holds per cell for its whole length (scanned inputs, plan, open inputs),
        measured on these inputs; 0: estimated from the cell names (see :func:`run_memory`).
    source
        ``"default"`` (reference machine) or ``"measured"``.
    """

    # per read path (:func:`rate_key`); "h5ad-virtual" defaults scaled from bench_virtualize's local reads
    # (0.6x h5py's bytes/s, ~4x its cost per read call), until calibrate() measures them on the user's files.
    # Reference machine: 2 cores, the threaded engine (bench_planner's calibrations, 2026-11-27)
    x_bytes_per_s: dict[str, float] = field(
        default_factory=lambda: {"h5ad": 4.5e8, "h5ad-virtual": 2.7e8, "zarr": 3.5e8}
    )
    read_call_s: dict[str, float] = field(
        default_factory=lambda: {"h5ad": 2.5e-4, "h5ad-virtual": 1e-3, "zarr": 2e-3}
    )
    decode_bytes_per_s: dict[str, float] = field(
        default_factory=lambda: {"h5ad": 4e8, "h5ad-virtual": 4e8, "zarr": 8e8}
    )
    obs_rows_per_s: float = 1.0e6
    dataset_s: float = 0.25
    dataset_input_s: dict[str, float] = field(
        default_factory=lambda: {"h5ad": 0.02, "h5ad-virtual": 0.02, "zarr": 0.02}
    )
    input_open_s: dict[str, float] = field(
        default_factory=lambda: {"h5ad": 0.002, "h5ad-virtual": 0.01, "zarr": 0.01}
    )
    run_s: float = 0.02
    first_dataset_s: float = 0.03
    fault_bytes_per_s: float = 1.0e9
    cold_read_s: float = 2.0e-4
    cold_bytes_per_s: float = 8.0e8
    quick_touch_bytes: float = 8 << 20
    compression_ratio: float = 0.48
    process_start_s: float = 2.0
    parallel_efficiency: float = 0.85
    baseline_rss_bytes: int = 170_000_000
    import_rss_bytes: int = 163_000_000
    cell_bytes: float = 0.0
    source: str = "default"

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Calibration:
        """Inverse of :meth:`to_dict` (unknown keys ignored; a dict of another layout gives the defaults)."""
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        default = cls()
        for k, v in list(known.items()):  # a cache written by an older version: keep only what fits
            if isinstance(getattr(default, k), dict) != isinstance(v, dict):
                del known[k]
        return cls(**known)

    def per_format(self, name: str, fmt: str) -> float:
        """The entry of per-format field ``name`` for ``fmt`` (for an unknown format, the slowest)."""
        table: dict[str, float] = getattr(self, name)
        if fmt in table:
            return table[fmt]
        worst = min if name.endswith("_per_s") else max
        return worst(table.values())


DEFAULT_CALIBRATION = Calibration()


def rate_key(info: SourceInfo) -> str:
    """Which rates price reading ``info``: its format, and for ``.h5ad`` its read path.

    ``"h5ad"`` (h5py), ``"h5ad-virtual"`` (through a virtualizarr manifest) or ``"zarr"``: the two ``.h5ad``
    read paths cost differently (see ``benchmarks/README.md``), and the plan knows which one each input takes.
    """
    if info.format == "h5ad" and info.reader == "virtual":
        return "h5ad-virtual"
    return info.format


# --------------------------------------------------------------------------------------------------
# Per-dataset quantities from the plan (no I/O)
# --------------------------------------------------------------------------------------------------
def _obs_read_gaps(info: SourceInfo) -> list[int]:
    """The obs arrays the engine reads from ``info`` per contiguous row range: each one's merge gap.

    The gap is the engine's (``sources.obs_merge_gap``): ranges of a numeric array of a ``.h5ad`` read with
    h5py that lie within it of each other are read as one span, one call; 0 means one call per range. A
    categorical's codes are assumed of pandas' smallest integer type for its number of categories.
    """
    from .sources import obs_merge_gap

    merge = rate_key(info) == "h5ad"
    gaps: list[int] = []
    for spec in info.obs_columns.values():
        if spec.kind == "categorical":
            n = len(spec.categories or ())
            dtypes = ["i1" if n < 2**7 else "i2" if n < 2**15 else "i4"]
        elif spec.kind == "nullable-integer":
            dtypes = [spec.dtype, "?"]
        elif spec.kind == "nullable-boolean":
            dtypes = ["?", "?"]
        elif spec.kind in ("numeric", "bool"):
            dtypes = [spec.dtype]
        else:
            dtypes = ["O"]
        for dt in dtypes:
            try:
                gaps.append(obs_merge_gap(dt) if merge else 0)
            except TypeError:  # not a numpy dtype string: read per range
                gaps.append(0)
    return gaps


def _range_calls(
    infos: list[SourceInfo],
    range_input: np.ndarray,
    range_lo: np.ndarray,
    range_hi: np.ndarray,
    first: np.ndarray,
) -> np.ndarray:
    """Read calls of each contiguous row range, the ranges of a dataset's input sorted (``first``: its first).

    X's arrays are read once per range; an obs array once per range, or once per span of ranges within its
    merge gap (:func:`_obs_read_gaps`).
    """
    calls = np.array([2.0 if i.x_kind == "csr" else 1.0 for i in infos])[range_input]
    gap_before = np.full(len(range_lo), np.inf)
    gap_before[1:] = (range_lo[1:] - range_hi[:-1]).astype(np.float64)
    gap_before[first] = np.inf
    signatures: dict[tuple[int, ...], list[int]] = {}
    for j, info in enumerate(infos):
        signatures.setdefault(tuple(_obs_read_gaps(info)), []).append(j)
    for gaps, members in signatures.items():
        if not gaps:
            continue
        sel = np.isin(range_input, members)
        g = gap_before[sel]
        calls[sel] += sum((g > gap) if gap else np.ones(len(g)) for gap in gaps)
    return calls


def _dataset_table(plan: Plan) -> dict[str, np.ndarray]:
    """Per dataset: rows, estimated entries, inputs read, and per input format the raw X bytes and read calls.

    Read calls count each contiguous row range of one input (runs that touch coalesce) once per array read
    from it, or an obs array once per span of nearby ranges (see :func:`_range_calls`).
    """
    if "dataset_table" in plan._cache:
        return plan._cache["dataset_table"]
    runs = plan.runs
    lengths = (runs[:, 2] - runs[:, 1]).astype(np.float64)
    infos = plan.inputs
    nnz_per_row = np.array([i.nnz / max(i.n_obs, 1) for i in infos])
    bytes_per_row = np.array([i.raw_x_bytes / max(i.n_obs, 1) for i in infos])
    k = plan.run_dataset
    kd = plan.n_datasets
    nnz = np.bincount(k, weights=lengths * nnz_per_row[runs[:, 0]], minlength=kd)
    # reads: runs of one dataset that touch in their input coalesce into one range
    order = np.lexsort((runs[:, 1], runs[:, 0], k))
    r = runs[order]
    ks = k[order]
    new_range = np.ones(len(r), dtype=bool)
    new_range[1:] = ~((ks[1:] == ks[:-1]) & (r[1:, 0] == r[:-1, 0]) & (r[1:, 1] == r[:-1, 2]))
    new_input = np.ones(len(r), dtype=bool)
    new_input[1:] = (ks[1:] != ks[:-1]) | (r[1:, 0] != r[:-1, 0])
    table: dict[str, np.ndarray] = {
        "rows": plan.rows_per_dataset.astype(np.float64),
        "nnz": nnz,
        "inputs": np.bincount(ks[new_input], minlength=kd).astype(np.float64),
    }
    formats = np.array([rate_key(i) for i in infos])
    for fmt in sorted(set(formats.tolist())):
        sel = formats[runs[:, 0]] == fmt
        table[f"bytes_{fmt}"] = np.bincount(
            k[sel], weights=lengths[sel] * bytes_per_row[runs[sel, 0]], minlength=kd
        )
        table[f"inputs_{fmt}"] = np.bincount(ks[new_input & (formats[r[:, 0]] == fmt)], minlength=kd).astype(
            np.float64
        )
    # largest contiguous range read from an input whose reader returns a new array (zarr-python, virtual
    # h5ad), which the engine then copies into its buffer: a temporary of the range's data and indices, plus
    # zarr's decode buffers. Where the engine decodes X's chunks itself (``x_direct``), only the chunks being
    # decoded are held: per reading thread one compressed and one decoded chunk.
    copies = [
        (i.reader in ("zarr", "virtual") or (not i.reader and i.format == "zarr")) and not i.x_direct
        for i in infos
    ]
    temp_row = np.array(
        [
            (i.nnz / max(i.n_obs, 1)) * (i.dtype.itemsize + 4) if c else 0.0
            for i, c in zip(infos, copies, strict=True)
        ]
    )
    if i_dense := [j for j, i in enumerate(infos) if i.x_kind == "dense" and copies[j]]:
        temp_row[i_dense] = [infos[j].n_vars * infos[j].dtype.itemsize for j in i_dense]
    range_id = np.cumsum(new_range) - 1
    range_rows = np.bincount(range_id, weights=(r[:, 2] - r[:, 1]).astype(np.float64))
    range_input = r[new_range, 0]
    range_lo = r[new_range, 1]
    range_ds = ks[new_range]
    extra = _extra_decoded_bytes(infos, range_ds, range_input, range_lo, range_lo + range_rows)
    first = new_input[new_range]
    calls = _range_calls(infos, range_input, range_lo, range_lo + range_rows, first)
    for fmt in sorted(set(formats.tolist())):
        sel = formats[range_input] == fmt
        table[f"decode_{fmt}"] = np.bincount(range_ds[sel], weights=extra[sel], minlength=kd)
        table[f"calls_{fmt}"] = np.bincount(range_ds[sel], weights=calls[sel], minlength=kd)
    # bytes of X not in the page cache, read from the disk (whole compressed chunks, at their stored size),
    # and the reads that wait for it (one per range and X array); apart for the inputs whose chunks the
    # engine's decoding threads read (``x_direct``), with the bytes those threads decode meanwhile
    cold = plan.uncached if plan.uncached is not None else np.zeros(len(infos))
    for key in ("cold_bytes", "cold_calls", "cold_direct_bytes", "cold_direct_calls"):
        table[key] = np.zeros(kd)
    if np.any(cold > 0):
        stored = np.array(
            [
                min(i.size_bytes / max(i.raw_x_bytes, 1), 1.0) if _chunk_geometry(i)[0] > 0 else 1.0
                for i in infos
            ]
        )
        arrays = np.array([2.0 if i.x_kind == "csr" else 1.0 for i in infos])
        direct = np.array([i.x_direct for i in infos])[range_input]
        u = cold[range_input]
        raw = range_rows * bytes_per_row[range_input] + extra
        for prefix, sel in (("cold_", ~direct), ("cold_direct_", direct)):
            w = u * sel
            table[prefix + "bytes"] = np.bincount(
                range_ds, weights=w * raw * stored[range_input], minlength=kd
            )
            table[prefix + "calls"] = np.bincount(range_ds, weights=w * arrays[range_input], minlength=kd)
        for fmt in sorted(set(formats.tolist())):
            w = u * direct * (formats[range_input] == fmt)
            table[f"cold_direct_work_{fmt}"] = np.bincount(range_ds, weights=w * raw, minlength=kd)
    range_bytes = range_rows * temp_row[r[new_range, 0]]
    table["read_temp"] = np.zeros(kd)
    np.maximum.at(table["read_temp"], ks[new_range], range_bytes)
    decode = np.array(
        [
            _direct_read_bytes(i) if i.x_direct else min(ZARR_READ_BYTES, 0.5 * i.raw_x_bytes) if c else 0.0
            for i, c in zip(infos, copies, strict=True)
        ]
    )
    table["read_decode"] = np.zeros(kd)
    np.maximum.at(table["read_decode"], ks[new_range], decode[r[new_range, 0]])
    plan._cache["dataset_table"] = table
    return table


def _extra_decoded_bytes(
    infos: list[SourceInfo], ds: np.ndarray, inp: np.ndarray, lo: np.ndarray, hi: np.ndarray
) -> np.ndarray:
    """Bytes of X decoded but not kept, per range: compressed chunks are decoded whole.

    The ranges (``[lo, hi)`` rows of input ``inp`` read for dataset ``ds``) are sorted by dataset, input and
    row, and disjoint. Chunks are placed at ``x_chunk`` entries (rows of dense X), with each input's mean
    entries per row; a chunk that two ranges of one dataset share is decoded once (the engine reads one
    input's ranges for a dataset in one call). Inputs stored uncompressed, or contiguously, decode nothing.
    """
    out = np.zeros(len(lo))
    if not len(lo):
        return out
    chunk_rows, row_bytes = np.array([_chunk_geometry(i) for i in infos], dtype=np.float64).reshape(-1, 2).T
    n_obs = np.array([i.n_obs for i in infos], dtype=np.float64)
    c = chunk_rows[inp]
    chunked = c > 0
    if not chunked.any():
        return out
    safe = np.where(chunked, c, 1.0)
    first = np.floor(lo / safe)
    last = np.floor((hi - 1) / safe)
    chunks = last - first + 1
    same = np.zeros(len(lo), dtype=bool)
    same[1:] = (ds[1:] == ds[:-1]) & (inp[1:] == inp[:-1]) & (first[1:] == last[:-1])
    chunks -= same  # a chunk the previous range of this dataset and input already decoded
    # the decoded rows, the input's last chunk cut at its end
    decoded = np.minimum(chunks * safe, n_obs[inp])
    out[chunked] = (np.maximum(decoded - (hi - lo), 0.0) * row_bytes[inp])[chunked]
    return out


def _chunk_geometry(info: SourceInfo) -> tuple[float, float]:
    """Rows of X per compressed chunk (0 when X is uncompressed or contiguous) and decoded bytes per row."""
    per_row = info.nnz / max(info.n_obs, 1) if info.x_kind == "csr" else 1.0
    compressed = info.x_chunk and info.x_compression not in ("", "none")
    chunk_rows = info.x_chunk / max(per_row, 1e-12) if compressed else 0.0
    if info.x_kind == "csr":
        return chunk_rows, per_row * (info.dtype.itemsize + 4)
    return chunk_rows, float(info.n_vars * info.dtype.itemsize)


def _direct_read_bytes(info: SourceInfo) -> float:
    """Held while the engine decodes ``info``'s X chunks itself: a compressed and a decoded chunk per thread.

    Mirrors ``sources._ZarrChunks.read_into`` (``data``, then ``indices``, on its pool of one thread per CPU,
    at most 4). The compressed chunk is counted at full size (an upper bound).
    """
    from .sources import _ZarrChunks

    threads = _ZarrChunks.n_threads()
    itemsize = max(info.dtype.itemsize, 4)  # data, then int32 indices
    return float(threads * 2 * info.x_chunk * itemsize)


def _obs_row_bytes(plan: Plan) -> float:
    total = 0.0
    for spec in plan.obs_schema.values():
        if spec.kind == "categorical":
            total += 8  # codes as int64 while assembling
        elif spec.kind == "string":
            total += 8 + _STR_OVERHEAD + 16
        elif spec.kind in ("nullable-integer", "nullable-boolean"):
            total += np.dtype(spec.dtype).itemsize + 1
        else:
            total += np.dtype(spec.dtype).itemsize
    return total


def _mean_name_len(infos: list[SourceInfo]) -> float:
    lengths = [np.mean([len(str(n)) for n in i.obs_names[:100]]) for i in infos if len(i.obs_names)]
    return float(np.mean(lengths)) if lengths else 8.0


# --------------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MemoryPrediction:
    """Predicted peak resident memory of a run, with its parts.

    With one process (``workers == 1``) the peak is ``baseline + run + dataset``. With ``n`` worker processes
    it is the sum over the processes: the parent and the forkserver (``import_bytes + run_bytes`` and
    ``import_bytes``), one worker at its peak ``baseline + run + dataset`` and ``n - 1`` others at ``baseline
    + run`` plus :data:`OTHER_WORKERS_DATASET_SHARE` of ``dataset`` (their datasets are at other stages);
    shared library pages count once per process, as the processes' resident sizes add up.

    Attributes
    ----------
    peak_bytes
        The prediction.
    baseline_bytes
        Interpreter and libraries after a tiny shuffle (per process that writes datasets).
    run_bytes
        Held for the whole run by each process: cell names, each CSR input's row pointers.
    dataset_bytes
        The largest dataset's buffers (read buffer, permutation, obs, gather scratch, one compressed shard).
    worst_dataset
        Which dataset that is.
    workers
        Processes writing datasets that the prediction assumes (what ``workers="auto"`` will use).
    process_bytes
        Peak of one process writing datasets: ``baseline + run + dataset``.
    """

    peak_bytes: int
    baseline_bytes: int
    run_bytes: int
    dataset_bytes: int
    worst_dataset: int
    workers: int = 1
    process_bytes: int = 0

    def to_dict(self) -> dict[str, int]:
        """JSON-able form."""
        return asdict(self)


def dataset_memory(plan: Plan, calibration: Calibration = DEFAULT_CALIBRATION) -> np.ndarray:
    """Bytes the engine holds while writing each dataset (the buffers of ``engine.write_dataset``).

    Mirrors, per dataset of ``rows`` rows and ``nnz`` entries (``it``: output itemsize):

    - CSR read buffer (``BufferPool`` ``data``/``indices``/``indptr``): ``nnz * (it + 4) + (rows + 1) * 4``;
      dense: ``rows * n_vars * it``.
    - gather scratch (``gather_data:<slot>``/``gather_indices:<slot>``), one set per encoding thread
      (:func:`~annbatch_nb.engine.encode_threads`) that gets a block to encode (blocks of about 2M entries,
      whole output chunks, :func:`_gather_block`): the touched part, ``min(block, nnz)`` plus two of the
      longest rows, ``* (it + 4)``; dense: one zarr chunk of rows per thread.
    - one shard's compressed chunks, held until the shard is stored (no joined copy; the blocks in flight are
      the shard's own): ``shard entries * (it + index itemsize) * ratio``.
    - obs: three row-sized copies of the columns (pieces, frame, permuted frame) and the names' pointers.
    - five int64 row vectors (counts, row nnz, permutation, output nnz, output indptr).
    - reading a zarr (or virtual h5ad) input through zarr-python: the largest contiguous range's data and
      indices as a temporary array (``Source._read_range`` returns new arrays; h5py reads straight into the
      buffer), plus zarr's decode buffers (:data:`ZARR_READ_BYTES`, at most half the input's raw X); a local
      zarr input whose chunks the engine decodes itself (``SourceInfo.x_direct``): a compressed and a decoded
      chunk per reading thread (:func:`_direct_read_bytes`).
    """
    t = _dataset_table(plan)
    rows, nnz = t["rows"], t["nnz"]
    it = plan.dtype.itemsize
    obs = rows * _obs_row_bytes(plan) * 3 + rows * 8
    perm_and_pointers = rows * 8 * 5
    from .engine import encode_threads  # imported here: the engine imports this module

    threads = encode_threads()
    if plan.x_kind == "csr":
        buffer = nnz * (it + 4) + (rows + 1) * 4
        max_row = max((i.n_vars for i in plan.inputs), default=0)
        block = _gather_block(plan)
        scratch = _encode_slots(threads, nnz, block) * (np.minimum(block, nnz) + 2 * max_row) * (it + 4)
        entry = (it + plan.index_dtype.itemsize) * calibration.compression_ratio
        shard = np.minimum(_shard_elems(plan), nnz) * entry  # blocks in flight belong to it
    else:
        row_bytes = plan.n_vars * it
        buffer = rows * row_bytes
        scratch = threads * plan.params.n_obs_per_chunk * row_bytes
        shard_rows = np.minimum(_shard_rows(plan), rows)
        shard = shard_rows * row_bytes * calibration.compression_ratio
    read = t["read_temp"] + t["read_decode"]
    return buffer + scratch + shard + obs + perm_and_pointers + read


def _touched_bytes(plan: Plan) -> float:
    """Memory a process touches for the first time in a run: the engine's reused buffers at their largest.

    The ``BufferPool`` (CSR read buffer and gather scratch, or the dense block) grows to the largest
    dataset's size once and is reused; the rest of a dataset's memory (obs frames, compressed chunks,
    temporaries) comes and goes, mostly in memory freed a moment before, which is quick to touch again (see
    :func:`_fault_rate`). The plan itself (cell names) is built before the run starts.
    """
    from .engine import encode_threads  # imported here: the engine imports this module

    t = _dataset_table(plan)
    it = plan.dtype.itemsize
    if not len(t["rows"]):
        return 0.0
    if plan.x_kind == "csr":
        nnz = float(t["nnz"].max())
        block = _gather_block(plan)
        slots = float(_encode_slots(encode_threads(), max(nnz, 1.0), block))
        return (nnz + slots * min(block, nnz)) * (it + 4)
    return float(t["rows"].max()) * plan.n_vars * it


def _touch_seconds(plan: Plan, c: Calibration) -> float:
    """Wall seconds of first touching the engine's reused buffers (:func:`_touched_bytes`).

    Page faults cost CPU time on the thread that touches the page, and threads fault side by side (measured
    here: 1 GiB from two threads took half the wall time of one, the same CPU time). A CSR read buffer is
    filled by the thread that reads (``os.preadv`` or an h5py/zarr-python call: one), except from inputs
    whose chunks the engine decodes itself (``SourceInfo.x_direct``), copied into place by the decoding
    pool's threads; each encoding thread touches its own gather scratch.

    The first ``quick_touch_bytes`` (wall-equivalent) are not charged. On a virtual machine that hands free
    memory back to its host, a fresh process's first pages come quick (freed moments before, by its own
    start or another program) or slow (see :func:`_fault_rate`), and how many come quick changes from one
    start to the next: measured here after 20 s of quiet, 0-4 MiB in some processes, 20-50 in most, over 80
    in a few. The engine's first read of 16-20 MiB took about half the time of touching it all slow (the
    median of three processes each, dense and sparse), which is what an 8 MiB allowance charges. A
    measurement of one start in :func:`calibrate` would be one draw of that spread, so the allowance is a
    reference value.
    """
    from .sources import _ZarrChunks

    t = _dataset_table(plan)
    if not len(t["rows"]):
        return 0.0
    if plan.x_kind != "csr":
        return max(_touched_bytes(plan) - c.quick_touch_bytes, 0.0) / c.fault_bytes_per_s
    it = plan.dtype.itemsize
    nnz = float(t["nnz"].max())
    total = sum(float(i.raw_x_bytes) for i in plan.inputs)
    direct = sum(float(i.raw_x_bytes) for i in plan.inputs if i.x_direct) / max(total, 1.0)
    readers = (1.0 - direct) + direct / _ZarrChunks.n_threads()
    scratch = min(_gather_block(plan), nnz)  # one slot's worth: the slots in use fault side by side
    return max((nnz * readers + scratch) * (it + 4) - c.quick_touch_bytes, 0.0) / c.fault_bytes_per_s


def _encode_slots(threads: int, nnz: Any, block: int) -> Any:
    """Encoding slots whose gather scratch gets touched: a slot is used only by a task, one per block."""
    return np.minimum(threads, np.ceil(nnz / block))


def _gather_block(plan: Plan) -> int:
    """Entries per encoding task of a CSR dataset (the engine's rule, ``engine._gather_block``)."""
    from .engine import _gather_block as engine_block  # imported here: the engine imports this module

    return engine_block(plan.x_chunk_elems)


def _shard_elems(plan: Plan) -> int:
    itemsize = max(plan.dtype.itemsize, plan.index_dtype.itemsize)
    chunk = plan.x_chunk_elems
    return max(1, int(plan.params.shard_size) // (itemsize * chunk)) * chunk


def _shard_rows(plan: Plan) -> int:
    chunk_rows = plan.params.n_obs_per_chunk
    row_bytes = plan.n_vars * plan.dtype.itemsize
    return max(1, int(plan.params.shard_size) // max(row_bytes * chunk_rows, 1)) * chunk_rows


def run_memory(plan: Plan, calibration: Calibration | None = None) -> int:
    """Bytes held for the whole run: the scanned inputs and the plan (cell names above all), open inputs.

    Measured per cell on the user's inputs by :func:`calibrate` (``cell_bytes``); otherwise estimated as
    each cell name's string object and its pointers in the inputs' and the plan's name lists, plus each CSR
    input's row pointers.
    """
    c = calibration or plan.calibration
    if c.cell_bytes > 0:
        return int(c.cell_bytes * plan.n_obs)
    n = plan.n_obs
    names = n * (2 * 8 + _STR_OVERHEAD + _mean_name_len(plan.inputs))
    indptr = sum((i.n_obs + 1) * 8 for i in plan.inputs if i.x_kind == "csr")
    return int(names + indptr)


def predict_memory(
    plan: Plan, calibration: Calibration = DEFAULT_CALIBRATION, workers: int | None = None
) -> MemoryPrediction:
    """Predict the peak resident memory of executing ``plan``.

    Parameters
    ----------
    plan
        The plan.
    calibration
        Rates and baseline of this machine.
    workers
        Processes writing datasets; default: what ``workers="auto"`` resolves to (:func:`auto_workers`).

    Returns
    -------
    MemoryPrediction
        The peak and its parts.
    """
    per_dataset = dataset_memory(plan, calibration)
    worst = int(np.argmax(per_dataset)) if len(per_dataset) else 0
    ds = int(per_dataset[worst]) if len(per_dataset) else 0
    run = run_memory(plan, calibration)
    base = int(calibration.baseline_rss_bytes)
    n = auto_workers(plan, plan.n_datasets, calibration) if workers is None else max(1, int(workers))
    n = min(n, max(plan.n_datasets, 1))
    process = base + run + ds
    others = (n - 1) * (base + run + OTHER_WORKERS_DATASET_SHARE * ds)
    peak = process if n == 1 else int(2 * calibration.import_rss_bytes + run + process + others)
    return MemoryPrediction(
        peak_bytes=peak,
        baseline_bytes=base,
        run_bytes=run,
        dataset_bytes=ds,
        worst_dataset=worst,
        workers=n,
        process_bytes=process,
    )


def rows_for_memory(
    infos_plan: Plan, budget_bytes: float, calibration: Calibration = DEFAULT_CALIBRATION
) -> int:
    """Largest rows per dataset whose predicted peak stays within ``budget_bytes`` (linear in rows).

    Parameters
    ----------
    infos_plan
        A plan of the same inputs and parameters (any dataset size).
    budget_bytes
        Memory allowed for the whole process.
    calibration
        Rates and baseline.

    Returns
    -------
    int
        Rows per dataset the budget allows (0 if not even the fixed part fits); not capped at the input size.
    """
    from .engine import encode_threads  # imported here: the engine imports this module

    p = infos_plan
    threads = encode_threads()
    base = calibration.baseline_rss_bytes + run_memory(p, calibration)
    it = p.dtype.itemsize
    per_row = _obs_row_bytes(p) * 3 + 8 + 40
    if p.x_kind == "csr":  # as dataset_memory, for a dataset of more than one gather block
        nnz_row = p.mean_nnz_per_row
        entry = (it + p.index_dtype.itemsize) * calibration.compression_ratio
        per_row += nnz_row * (it + 4) + 4
        per_row += nnz_row * entry
        fixed = threads * (_gather_block(p) + 2 * max(i.n_vars for i in p.inputs)) * (it + 4)
    else:
        row_bytes = p.n_vars * it
        per_row += row_bytes * (1 + calibration.compression_ratio)
        fixed = threads * p.params.n_obs_per_chunk * row_bytes
    rows = (budget_bytes - base - fixed) / per_row
    return int(max(0, min(rows, 2**62)))


# --------------------------------------------------------------------------------------------------
# Time and size
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TimePrediction:
    """Predicted wall time, with its parts (seconds).

    The parts are serial seconds (one process). With ``workers > 1`` the datasets run side by side:
    ``seconds = startup + makespan`` (see :func:`predict_time`), less than ``serial_seconds``.

    Attributes
    ----------
    seconds
        The prediction for ``workers`` processes.
    x
        Streaming X through the engine (per byte).
    calls
        Read calls (per contiguous row range and array).
    obs
        obs and cell names (per row).
    decode
        Decoding the parts of compressed chunks that datasets do not keep (per byte).
    disk
        Reading the bytes of X that the page cache did not hold when the plan was made (per read and byte).
    overhead
        Fixed costs: per run, per input opened, per dataset, per input a dataset reads, buffers' first touch.
    serial_seconds
        The prediction for one process (the sum of the parts).
    workers
        Processes writing datasets that ``seconds`` assumes (what ``workers="auto"`` will use).
    """

    seconds: float
    x: float
    calls: float
    obs: float
    overhead: float
    serial_seconds: float = 0.0
    workers: int = 1
    decode: float = 0.0
    disk: float = 0.0

    def to_dict(self) -> dict[str, float]:
        """JSON-able form."""
        return asdict(self)


#: Seconds below which a run is predicted too short to pay for starting worker processes.
PARALLEL_MIN_SECONDS = 4.0


def dataset_seconds(plan: Plan, calibration: Calibration = DEFAULT_CALIBRATION) -> np.ndarray:
    """Serial seconds of writing each dataset (fixed, per input read, per read call, per row, per byte).

    Bytes of X the page cache did not hold when the plan was made also pay the disk (:func:`_disk_seconds`).
    """
    t = _dataset_table(plan)
    c = calibration
    sec = c.dataset_s + t["rows"] / c.obs_rows_per_s + _disk_seconds(t, c)
    for key, v in t.items():
        if key.startswith("inputs_"):
            sec = sec + v * c.per_format("dataset_input_s", key[len("inputs_") :])
        elif key.startswith("bytes_"):
            sec = sec + v / c.per_format("x_bytes_per_s", key[len("bytes_") :])
        elif key.startswith("calls_"):
            sec = sec + v * c.per_format("read_call_s", key[len("calls_") :])
        elif key.startswith("decode_"):
            sec = sec + v / c.per_format("decode_bytes_per_s", key[len("decode_") :])
    return np.asarray(sec, dtype=np.float64)


def _disk_seconds(t: dict[str, np.ndarray], c: Calibration) -> np.ndarray:
    """Per dataset: reading the bytes of X the page cache does not hold (see :func:`_dataset_table`).

    ``cold_calls * cold_read_s + cold_bytes / cold_bytes_per_s``, read by one thread between the dataset's
    other steps. The chunks of inputs the engine decodes itself (``x_direct``) are read by the decoding
    threads, side by side and while the others decode: their reads cost only what they take beyond that
    decoding (measured on zarr-large, 364 MB stored, 1.1 GB raw: a start with nothing cached took 10.9-11.2 s,
    one with everything cached 11.5 s).
    """
    from .sources import _ZarrChunks

    serial = t["cold_calls"] * c.cold_read_s + t["cold_bytes"] / c.cold_bytes_per_s
    direct = t["cold_direct_calls"] * c.cold_read_s / _ZarrChunks.n_threads()
    direct = direct + t["cold_direct_bytes"] / c.cold_bytes_per_s
    work = sum(
        v / c.per_format("decode_bytes_per_s", k[len("cold_direct_work_") :])
        for k, v in t.items()
        if k.startswith("cold_direct_work_")
    )
    return serial + np.maximum(direct - work, 0.0)


def _process_fixed_seconds(plan: Plan, c: Calibration) -> float:
    """Once per process: inputs opened, CSR row pointers read, buffers first touched, one-time costs.

    A dataset's X is read first (into the engine's buffers: their first touch lengthens the first dataset's
    read, by 0.04-0.07 s for 16-40 MiB here), then written while its obs and var are written on a helper
    thread; the one-time costs (``first_dataset_s``: creating zarr arrays and groups, codecs, thread pools
    for the first time, 0.003-0.023 s in calibrate's tiny runs here) come after the read.
    """
    opens = sum(c.per_format("input_open_s", rate_key(i)) for i in plan.inputs)
    indptr = sum(
        (i.n_obs + 1) * 8 / c.per_format("x_bytes_per_s", rate_key(i))
        for i in plan.inputs
        if i.x_kind == "csr"
    )
    return opens + indptr + _touch_seconds(plan, c) + c.first_dataset_s


def _serial_seconds(plan: Plan, c: Calibration) -> float:
    if c is not plan.calibration:
        return c.run_s + _process_fixed_seconds(plan, c) + float(dataset_seconds(plan, c).sum())
    if "serial_seconds" not in plan._cache:
        plan._cache["serial_seconds"] = _serial_seconds(plan, replace(c))  # a copy: computed, not cached
    return plan._cache["serial_seconds"]


def auto_workers(plan: Plan, n_todo: int, calibration: Calibration | None = None) -> int:
    """How many processes ``workers="auto"`` writes ``n_todo`` datasets of ``plan`` with.

    One when there is at most one dataset or the run is predicted (for one process) to take less than
    :data:`PARALLEL_MIN_SECONDS`; else one per :func:`~annbatch_nb.engine.encode_threads` CPUs (a process's
    threads already use that many), at most the datasets left, within ``memory_fraction`` of this machine's
    memory (each worker holds one dataset).

    Parameters
    ----------
    plan
        The plan.
    n_todo
        Datasets left to write.
    calibration
        Rates (default: the plan's).

    Returns
    -------
    int
        Worker processes.
    """
    c = calibration or plan.calibration
    if n_todo <= 1 or _serial_seconds(plan, c) < PARALLEL_MIN_SECONDS:
        return 1
    import psutil

    per_dataset = dataset_memory(plan, c)
    ds = float(per_dataset.max()) if len(per_dataset) else 0.0
    base, run = float(c.baseline_rss_bytes), float(run_memory(plan, c))
    budget = psutil.virtual_memory().total * plan.params.memory_fraction - base - run
    by_memory = max(1, int(budget // max(base + run + ds, 1)))
    from .engine import encode_threads  # imported here: the engine imports this module

    # each process already keeps encode_threads() CPUs busy within its dataset (reads, gather, Blosc): more
    # processes only pay on machines with CPUs to spare, and each holds one more dataset
    by_cpus = max(1, (os.cpu_count() or 1) // encode_threads())
    return max(1, min(by_cpus, n_todo, by_memory))


def worker_slowdown(n: int) -> float:
    """How much longer each of ``n`` worker processes takes over a dataset than one process alone, by threads.

    The calibration times datasets written with :func:`~annbatch_nb.engine.encode_threads` threads; each of
    ``n`` workers gets :func:`~annbatch_nb.engine.worker_threads` (its share of the CPUs, or
    ``$ANNBATCH_NB_THREADS``). With fewer threads than the calibrated process had, a dataset is counted as
    taking that many times longer (its threads kept their CPUs busy): two workers on two CPUs write two
    datasets at a time, each on one thread, no faster than one process writes them one at a time on two.

    Parameters
    ----------
    n
        Worker processes.

    Returns
    -------
    float
        ``max(1, threads of one process / threads of a worker)``.
    """
    from .engine import encode_threads, worker_threads  # imported here: the engine imports this module

    return max(1.0, encode_threads() / worker_threads(n))


def _makespan(seconds: np.ndarray, n: int) -> float:
    """Finish time of tasks handed, in order, to the first free of ``n`` workers (as a process pool does)."""
    free = np.zeros(n)
    for s in seconds:
        j = int(np.argmin(free))
        free[j] += s
    return float(free.max()) if n else 0.0


def predict_output_bytes(plan: Plan, calibration: Calibration = DEFAULT_CALIBRATION) -> int:
    """Predicted bytes of the written collection (compressed X plus uncompressed indptr and obs)."""
    t = _dataset_table(plan)
    if plan.x_kind == "csr":
        raw = t["nnz"].sum() * (plan.dtype.itemsize + plan.index_dtype.itemsize)
        extra = (t["rows"].sum() + plan.n_datasets) * 8 * 0.5
    else:
        raw = t["rows"].sum() * plan.n_vars * plan.dtype.itemsize
        extra = 0.0
    obs = t["rows"].sum() * _obs_row_bytes(plan) * 0.5
    return int(raw * calibration.compression_ratio + extra + obs)


def predict_time(
    plan: Plan, calibration: Calibration = DEFAULT_CALIBRATION, workers: int | None = None
) -> TimePrediction:
    """Predict the wall time of executing ``plan`` on this machine.

    One process: ``run_s + opens + buffers' first touch + first_dataset_s + dataset seconds`` where a
    dataset costs ``dataset_s + dataset_input_s * inputs + calls * read_call_s + rows / obs_rows_per_s +
    bytes / x_bytes_per_s``, plus the disk for the bytes of X the page cache does not hold
    (:func:`dataset_seconds`). With ``n`` workers: the parent's ``run_s + opens``, one process start (the
    forkserver), each worker's opens, first touch and one-time costs, and the datasets,
    slowed by ``parallel_efficiency`` and by the threads a worker gives up (:func:`worker_slowdown`), dealt
    in order to the first free worker.

    Parameters
    ----------
    plan
        The plan.
    calibration
        Rates measured by :func:`calibrate` (or the reference machine's).
    workers
        Processes writing datasets; default: what ``workers="auto"`` resolves to (:func:`auto_workers`).

    Returns
    -------
    TimePrediction
        Seconds, and their parts.
    """
    t = _dataset_table(plan)
    c = calibration
    x = sum(
        float(v.sum()) / c.per_format("x_bytes_per_s", k[len("bytes_") :])
        for k, v in t.items()
        if k.startswith("bytes_")
    )
    calls = sum(
        float(v.sum()) * c.per_format("read_call_s", k[len("calls_") :])
        for k, v in t.items()
        if k.startswith("calls_")
    )
    obs = float(t["rows"].sum()) / c.obs_rows_per_s
    decode = sum(
        float(v.sum()) / c.per_format("decode_bytes_per_s", k[len("decode_") :])
        for k, v in t.items()
        if k.startswith("decode_")
    )
    disk = float(_disk_seconds(t, c).sum())
    per_ds = dataset_seconds(plan, c)
    fixed = _process_fixed_seconds(plan, c)
    serial = _serial_seconds(plan, c)
    overhead = serial - x - calls - obs - decode - disk
    n = auto_workers(plan, plan.n_datasets, c) if workers is None else max(1, int(workers))
    n = min(n, max(plan.n_datasets, 1))
    if n == 1:
        return TimePrediction(serial, x, calls, obs, overhead, serial, 1, decode, disk)
    opens = sum(c.per_format("input_open_s", rate_key(i)) for i in plan.inputs)
    slow = worker_slowdown(n) / c.parallel_efficiency
    seconds = c.run_s + opens + c.process_start_s + fixed + _makespan(per_ds * slow, n)
    return TimePrediction(seconds, x, calls, obs, overhead, serial, n, decode, disk)


# --------------------------------------------------------------------------------------------------
# Calibration
# --------------------------------------------------------------------------------------------------
def _cache_dir() -> Path:
    root = os.environ.get("ANNBATCH_NB_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "annbatch-nb"
    )
    return Path(root)


def _cache_key(infos: list[SourceInfo]) -> str:
    ident: list[Any] = [CALIBRATION_VERSION, socket.gethostname(), os.cpu_count()]
    ident += [[i.path, i.size_bytes, i.mtime, rate_key(i)] for i in infos]
    return hashlib.sha256(json.dumps(ident).encode()).hexdigest()[:20]


def cached_calibration(infos: list[SourceInfo]) -> Calibration | None:
    """The cached calibration of these inputs on this machine, if any."""
    path = _cache_dir() / f"calibration-{_cache_key(infos)}.json"
    try:
        return Calibration.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None


#: Bumped when the calibration's fields or their meaning change (old cache entries are then not used).
CALIBRATION_VERSION = 10


def _vm_kib(field_name: str) -> int | None:
    """A ``/proc/self/status`` field in bytes (Linux), else None."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_rss_bytes() -> int:
    """Peak resident memory of this process since it started (exec).

    ``VmHWM`` where Linux has it: unlike ``ru_maxrss``, which a process inherits from its parent across
    ``fork``/``exec`` (a child of a big process reports the parent's peak), it is this program's own.
    """
    hwm = _vm_kib("VmHWM")
    if hwm is not None:
        return hwm
    import resource
    import sys

    scale = 1 if sys.platform == "darwin" else 1024
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale)


_CHILD = """
import json, os, sys, tempfile, time
from annbatch_nb.predict import peak_rss_bytes, _vm_kib
import numpy as np, scipy.sparse as sp, anndata as ad, pandas as pd
import annbatch_nb as abn
import annbatch_nb.engine
out = {"imported": time.time(), "import_cpu": time.process_time(),
       "import_rss": _vm_kib("VmRSS") or peak_rss_bytes()}
task = json.loads(sys.stdin.readline())  # sent once calibrate has scanned the inputs (meanwhile: imports)
if task["baseline"]:
    datasets = []
    write_dataset = annbatch_nb.engine.write_dataset
    def timed(*args, **kwargs):  # each dataset of the tiny run, as the run is timed
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            return write_dataset(*args, **kwargs)
        finally:
            datasets.append(min(time.perf_counter() - t0, time.process_time() - c0))
    annbatch_nb.engine.write_dataset = timed
    d = tempfile.mkdtemp(prefix="annbatch-nb-baseline-")
    x = sp.random(200, 50, density=0.1, format="csr", dtype=np.float32, random_state=0)
    ad.AnnData(X=x, obs=pd.DataFrame(index=[f"c{i}" for i in range(200)]),
               var=pd.DataFrame(index=[f"g{i}" for i in range(50)])).write_h5ad(os.path.join(d, "a.h5ad"))
    p = abn.plan([os.path.join(d, "a.h5ad")], shuffle_chunk_size=10, dataset_size=100, seed=0)
    t0, c0 = time.perf_counter(), time.process_time()  # the run alone, as Plan.run is timed
    p.run(os.path.join(d, "o.zarr"), progress=False, workers=1)
    out["tiny"] = min(time.perf_counter() - t0, time.process_time() - c0)
    out["tiny_datasets"] = datasets
    annbatch_nb.engine.write_dataset = write_dataset
    import shutil; shutil.rmtree(d, ignore_errors=True)
    out["baseline"] = peak_rss_bytes()
if task["inputs"]:
    before = _vm_kib("VmRSS")
    p = abn.plan(task["inputs"], seed=0, dataset_size=10**12, calibration=abn.predict.DEFAULT_CALIBRATION)
    _ = p.obs_names
    sources = annbatch_nb.engine._open_for_plan(p)
    for s in sources:
        if s.info.x_kind == "csr":
            _ = s.indptr
    if before is not None:
        out["cell_bytes"] = (_vm_kib("VmRSS") - before) / max(p.n_obs, 1)
print(json.dumps(out))
"""

#: Inputs the fresh process scans to measure the memory a run holds per cell (a sample of them, if more),
#: and the cells that suffice (the sample is cut once it has that many: its scan is on calibrate's clock).
_CELL_SAMPLE = 200
_CELL_SAMPLE_ROWS = 200_000


def _cell_sample(infos: list[SourceInfo]) -> list[SourceInfo]:
    """The inputs the fresh process plans to measure a run's memory per cell.

    Up to :data:`_CELL_SAMPLE` of them, spread over the list, cut after the one that brings the sample to
    :data:`_CELL_SAMPLE_ROWS` cells.
    """
    step = max(1, -(-len(infos) // _CELL_SAMPLE))
    sample = infos[::step]
    enough = int(np.searchsorted(np.cumsum([i.n_obs for i in sample]), _CELL_SAMPLE_ROWS)) + 1
    return sample[:enough]


def _start_child() -> tuple[Any, float]:
    """Start a fresh process (in the background) that imports annbatch-nb, then waits for its task.

    Started before calibrate scans the inputs, so that its imports overlap the scan; :func:`_send_child_task`
    hands it the task.
    """
    import subprocess
    import sys

    env = {**os.environ, "ANNBATCH_NB_CACHE": tempfile.gettempdir()}
    started = time.time()
    proc = subprocess.Popen(
        [sys.executable, "-c", _CHILD],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    return proc, started


def _send_child_task(proc: Any, baseline: bool, infos: list[SourceInfo]) -> None:
    """The fresh process's task: (``baseline``) run a tiny shuffle; plan a sample of the inputs.

    The sample (:func:`_cell_sample`) is planned and opened as a run does (its scan as a run's, on several
    threads: their memory counts too). Where the process is gone, :func:`_finish_child` keeps the reference
    values.
    """
    task = {"baseline": baseline, "inputs": [i.path for i in _cell_sample(infos)]}
    with contextlib.suppress(OSError):
        proc.stdin.write(json.dumps(task) + "\n")
        proc.stdin.flush()


def _lowest_priority(pid: int) -> bool:
    """Lower process ``pid`` to the lowest CPU priority (nice 19); False where that is not possible."""
    try:
        os.setpriority(os.PRIO_PROCESS, pid, 19)
    except (AttributeError, OSError):  # not on this platform, or the process is gone
        return False
    return True


def _machine_cache_path() -> Path:
    import platform
    import sys

    from . import __version__

    ident = [
        CALIBRATION_VERSION,
        socket.gethostname(),
        os.cpu_count(),
        sys.version,
        platform.machine(),
        __version__,
    ]
    return _cache_dir() / f"machine-{hashlib.sha256(json.dumps(ident).encode()).hexdigest()[:20]}.json"


#: What the fresh process measures once per machine (cached): not the inputs' costs.
_MACHINE_KEYS = (
    "process_start_s",
    "import_rss_bytes",
    "baseline_rss_bytes",
    "run_s",
    "first_dataset_s",
    "fault_bytes_per_s",
)


def _cached_machine() -> dict[str, float] | None:
    try:
        d = json.loads(_machine_cache_path().read_text())
        return {k: d[k] for k in _MACHINE_KEYS}
    except (OSError, ValueError, TypeError, KeyError):
        return None


def _finish_child(proc: Any, started: float) -> dict[str, float]:
    """What the fresh process measured (nothing where it failed).

    Process start seconds, import and baseline resident bytes, the tiny shuffle's fixed costs (see
    :func:`_tiny_run_costs`), resident bytes per cell of a run.
    """
    try:
        out, _ = proc.communicate(timeout=120)
        d = json.loads(out.strip().splitlines()[-1])
    except Exception:  # best effort: keep the reference values
        proc.kill()
        proc.wait()
        return {}
    # the smaller of wall and CPU time, as for the samples: the process runs beside calibrate's own work
    start_s = min(float(d["imported"] - started), float(d.get("import_cpu", np.inf)))
    got = {"process_start_s": start_s, "import_rss_bytes": int(d["import_rss"])}
    if "baseline" in d:
        got["baseline_rss_bytes"] = int(d["baseline"])
        got |= _tiny_run_costs(float(d["tiny"]), [float(v) for v in d["tiny_datasets"]])
    if "cell_bytes" in d:
        got["cell_bytes"] = max(float(d["cell_bytes"]), 0.0)
    return got


def _tiny_run_costs(run_s: float, datasets: list[float]) -> dict[str, float]:
    """The run's fixed cost and the first dataset's one-time costs, from the fresh process's tiny run.

    The run writes two datasets of the same size: what the run took besides its datasets is ``run_s``, and
    what the first took more than the second, ``first_dataset_s``.
    """
    if len(datasets) != 2:  # not the run it was meant to be: keep the reference values
        return {}
    return {"run_s": max(run_s - sum(datasets), 0.0), "first_dataset_s": max(datasets[0] - datasets[1], 0.0)}


def _fault_rate(
    total: int = 256 << 20, piece: int = 32 << 20, most: int = 512 << 20, slow: float = 1e9
) -> float:
    """Bytes per second of first touching memory the process has not used before.

    Allocates and fills pieces of ``piece`` bytes (each above glibc's largest mmap threshold, so new pages),
    ``total`` of them, timing each. Pages freed a moment ago (by this or another process) are quick to touch
    again; on a virtual machine that hands free memory back to its host (virtio-balloon free page reporting),
    pages free for more than a few seconds cost a fault on the host too, several times slower (measured here:
    0.25-0.35 GB/s against 3-6 GB/s). A run's buffers are mostly the latter, and the kernel hands out the
    recently freed pages first: after a free the first pieces are quick, the rest slow. The rate is the
    median of the slow pieces (those within twice the slowest); while no piece is slower than ``slow``, more
    are touched, up to ``most`` bytes (on a machine without the slow kind that is quick).
    """
    pieces: list[np.ndarray] = []
    rates: list[float] = []
    while True:
        t = _clock()
        pieces.append(np.ones(piece, dtype=np.uint8))
        rates.append(piece / max(_busy_seconds(t), 1e-6))  # the guest's CPU time includes the host's faults
        done = len(pieces) * piece
        if done >= total and (min(rates) < slow or done >= most):
            break
    del pieces
    r = np.array(rates)
    return float(np.median(r[r <= 2 * r.min()]))


def _clock() -> tuple[float, float]:
    """Wall and CPU (user + system, all threads) seconds of this process."""
    return time.perf_counter(), time.process_time()


def _busy_seconds(start: tuple[float, float]) -> float:
    """Seconds since ``start`` as an otherwise idle machine would show them: the smaller of wall and CPU time.

    Other programs' load stretches the wall time but not this process's CPU time; waiting for I/O (or work on
    several threads) does the opposite. The calibration is meant for a machine the run has to itself.
    """
    wall, cpu = _clock()
    return min(wall - start[0], cpu - start[1])


@dataclass
class _Trial:
    """One sample dataset written by the engine, and its counts (as the model counts them)."""

    seconds: float
    rows: float
    bytes: float
    calls: float
    inputs: float
    x_out_bytes: float = 0.0
    x_disk_bytes: float = 0.0
    decoded: float = 0.0


def _repeated(write: Callable[[], _Trial], *, least: int, most: int, within_s: float) -> list[_Trial]:
    """``least`` writes of a sample, and more, up to ``most``, while one more fits in ``within_s`` seconds.

    Quick samples (small inputs: tens of ms) are the noisiest relative to the runs they predict (single
    writes of one vary by a factor of two), and cost little to repeat: their mean is what a run's many
    datasets pay. On inputs with tens of thousands of genes each takes over 0.1 s, and calibrate's budget
    has no room for more than ``least``.
    """
    start = time.perf_counter()
    trials = [write() for _ in range(least)]
    while len(trials) < most:
        spent = time.perf_counter() - start
        if spent + spent / len(trials) > within_s:  # the next one would overrun
            break
        trials.append(write())
    return trials


def _mean_trial(trials: list[_Trial]) -> _Trial:
    """Writes of one sample as one, of their mean time.

    A small dataset's time is skewed: most writes are typical, and some pay a few ms-long stalls (threads
    waiting for the GIL or for zarr's event loop, a garbage collection). A run's datasets pay them as often,
    so their mean is what a run pays per dataset: over 15 writes, 10 % more than the median.
    """
    return replace(trials[0], seconds=float(np.mean([t.seconds for t in trials])))


def _call_seconds(probe: _Trial, x_bytes_per_s: float, decode_bytes_per_s: float) -> float:
    """Seconds per read call, from the timed one-row reads of :meth:`_Sampler.measure_calls`.

    What the bytes read (at ``x_bytes_per_s``) and the chunks decoded (at ``decode_bytes_per_s``) do not
    explain, per call.
    """
    spent = probe.bytes / x_bytes_per_s + probe.decoded / decode_bytes_per_s
    return max(probe.seconds - spent, 0.0) / max(probe.calls, 1.0)


def _fit_costs(
    trials: list[_Trial], obs_rows_per_s: float, call_s: float, decode_bytes_per_s: float
) -> tuple[float, float, float]:
    """Per-byte, per-dataset and per-input seconds that explain the trials' seconds.

    ``seconds - rows / obs_rows_per_s - decoded / decode_bytes_per_s - calls * call_s = bytes * per_byte +
    dataset_s + inputs * per_input`` for each trial (``decoded``: the bytes of chunks it decodes but does not
    keep; the decode rate and ``call_s``, the cost of a read call, are measured apart), each equation scaled
    by its seconds (relative errors weigh the same), solved for non-negative costs (exactly, when three
    independent trials fit).
    """
    from scipy.optimize import nnls

    a = np.array([[t.bytes, 1.0, t.inputs] for t in trials])
    y = np.array(
        [
            max(t.seconds - t.rows / obs_rows_per_s - t.decoded / decode_bytes_per_s - t.calls * call_s, 0.0)
            for t in trials
        ]
    )
    w = 1 / np.maximum(np.array([t.seconds for t in trials]), 1e-3)
    scale = np.maximum(np.abs(a).max(axis=0), 1e-12)  # columns of similar size, for a well-posed solve
    x, _ = nnls(a * w[:, None] / scale, y * w)
    per_byte, dataset_s, per_input = (float(v) for v in x / scale)
    return per_byte, dataset_s, per_input


class _Sampler:
    """Writes single datasets of small plans over some of the user's inputs with the engine, timed."""

    def __init__(self, infos: list[SourceInfo], tmp: Path) -> None:
        from .engine import BufferPool
        from .sources import InputSpec, open_source

        self.infos = infos
        self.tmp = Path(tempfile.mkdtemp(dir=tmp))
        self.pool = BufferPool()
        self.n = 0
        t = _clock()
        self.sources = [open_source(InputSpec(i.path, i.display), info=i) for i in infos]
        for src in self.sources:
            _ = src.root  # opened lazily, by the first dataset that reads the input
        self.open_s = _busy_seconds(t) / max(len(infos), 1)
        for src in self.sources:  # read once per run: not part of a dataset's cost
            if src.info.x_kind == "csr":
                _ = src.indptr

    def measure_decode(self, nbytes: float = 32e6) -> float:
        """Bytes per second of decoding compressed chunks of X for one row each (0 if no input has them).

        What a dataset pays for the part of a chunk it does not keep: reads one row from the middle of each
        of the first chunks (up to ``nbytes`` decoded) of the largest chunked, compressed input, as the
        engine reads runs, twice, and keeps the faster; the rate is per decoded byte.
        """
        chunked = [s for s in self.sources if _chunk_geometry(s.info)[0] > 0]
        if not chunked:
            return 0.0
        src = max(chunked, key=lambda s: s.info.raw_x_bytes)
        info = src.info
        chunk_rows, row_bytes = _chunk_geometry(info)
        chunk_bytes = chunk_rows * row_bytes
        k = int(max(1, min(info.n_obs / max(chunk_rows, 1), nbytes / max(chunk_bytes, 1))))
        rows = np.unique(np.minimum((np.arange(k) + 0.5) * chunk_rows, info.n_obs - 1).astype(np.int64))
        best = _best_read_seconds(src, np.stack([rows, rows + 1], axis=1))
        return len(rows) * chunk_bytes / max(best, 1e-6)

    def measure_calls(self, ranges: int = 2000, enough_s: float = 0.02) -> _Trial:
        """The engine's reads of X and obs over one-row ranges, timed: what a read call costs.

        Reads rows 0, 2, 4, ... of the sampled input with the most rows, as a dataset reads its runs (X,
        then obs), twice, and keeps the faster: a tenth of ``ranges`` of them when one read of those takes
        ``enough_s`` (slow calls, as through h5py: enough to time them), else ``ranges``. The result counts
        the bytes read, the bytes of chunks decoded but not kept, and the calls (ranges times arrays read per
        range); see :func:`_call_seconds`.
        """
        src = max(self.sources, key=lambda s: s.info.n_obs)
        info = src.info
        m = max(1, min(ranges // 10, info.n_obs // 2))
        best = _best_read_seconds(src, _one_row_runs(m), obs=True, times=1)
        if best < enough_s and m < info.n_obs // 2:
            m = max(1, min(ranges, info.n_obs // 2))
            best = _best_read_seconds(src, _one_row_runs(m), obs=True)
        else:
            best = min(best, _best_read_seconds(src, _one_row_runs(m), obs=True, times=1))
        extra = _extra_decoded_bytes(
            [info], np.zeros(1, dtype=np.int64), np.zeros(1, dtype=np.int64), np.zeros(1), np.array([2.0 * m])
        )[0]
        return _Trial(
            seconds=best,
            rows=float(m),
            bytes=m * info.raw_x_bytes / max(info.n_obs, 1),
            calls=float(_range_calls([info], *_probe_ranges(m)).sum()),
            inputs=1.0,
            decoded=float(extra),
        )

    def close(self) -> None:
        for s in self.sources:
            s.close()
        self.pool.clear()

    def plan(self, chunk: int, rows: int, inputs: int | None = None) -> Plan:
        from .plan import Parameters, build_plan

        infos = self.infos[: inputs or len(self.infos)]
        params = Parameters.validated(shuffle_chunk_size=chunk, dataset_size=rows, seed=0)
        return build_plan(infos, params, DEFAULT_CALIBRATION)

    def reserve(self, plan: Plan) -> None:
        """Grow and first-touch the engine's buffers for writing dataset 0 of ``plan``."""
        from .engine import reserve_buffers

        reserve_buffers(plan, 0, self.sources[: len(plan.inputs)], self.pool)

    def run(self, plan: Plan, *, disk: bool = False) -> _Trial:
        from .collection import open_output, release_lock
        from .engine import write_dataset

        self.n += 1
        out = self.tmp / f"sample-{self.n}.zarr"
        state = open_output(out, plan)
        try:
            t = _clock()
            write_dataset(plan, 0, self.sources[: len(plan.inputs)], state.root, pool=self.pool)
            seconds = _busy_seconds(t)
        finally:
            release_lock(state.lock)
        tab = _dataset_table(plan)
        decoded = float(sum(v[0] for k, v in tab.items() if k.startswith("decode_")))
        trial = _Trial(
            seconds=seconds,
            rows=float(tab["rows"][0]),
            bytes=float(sum(v[0] for k, v in tab.items() if k.startswith("bytes_"))),
            calls=float(sum(v[0] for k, v in tab.items() if k.startswith("calls_"))),
            inputs=float(tab["inputs"][0]),
            decoded=decoded,
        )
        if disk:
            x_dir = out / "dataset_0" / "X"
            names = ("data", "indices") if plan.x_kind == "csr" else ("",)
            trial.x_disk_bytes = float(
                sum(f.stat().st_size for n in names for f in (x_dir / n).rglob("*") if f.is_file())
            )
            if plan.x_kind == "csr":
                trial.x_out_bytes = float(tab["nnz"][0]) * (plan.dtype.itemsize + plan.index_dtype.itemsize)
            else:
                trial.x_out_bytes = trial.rows * plan.n_vars * plan.dtype.itemsize
        return trial


def _one_row_runs(m: int) -> np.ndarray:
    """Rows 0, 2, 4, ... (``m`` of them) as runs of one row."""
    rows = np.arange(m, dtype=np.int64) * 2
    return np.stack([rows, rows + 1], axis=1)


def _probe_ranges(m: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The ranges of :func:`_one_row_runs` as :func:`_range_calls` takes them (one input, one dataset)."""
    lo = _one_row_runs(m)[:, 0]
    first = np.zeros(m, dtype=bool)
    first[:1] = True
    return np.zeros(m, dtype=np.int64), lo, lo + 1, first


def _best_read_seconds(src: Any, runs: np.ndarray, *, obs: bool = False, times: int = 2) -> float:
    """The fastest of ``times`` reads of ``runs`` of ``src``'s X (and obs), as a dataset reads them, in s."""
    info = src.info
    if info.x_kind == "csr":
        n = int(src.run_nnz(runs).sum())
        data, indices = np.empty(n, dtype=info.dtype), np.empty(n, dtype=np.int32)
    else:
        out = np.empty((int((runs[:, 1] - runs[:, 0]).sum()), info.n_vars), dtype=info.dtype)
    best = float("inf")
    for _ in range(times):
        t = _clock()
        if info.x_kind == "csr":
            src.read_csr_into(runs, data, indices)
        else:
            src.read_dense_into(runs, out)
        if obs:
            src.read_obs(runs)
        best = min(best, _busy_seconds(t))
    return best


#: Seconds from calibrate's start within which its extra rounds of samples end (:func:`_calibrate_format`).
EXTRA_SAMPLES_UNTIL_S = 4.0


def _calibrate_format(
    infos: list[SourceInfo],
    tmp: Path,
    budget_s: float,
    base: Calibration,
    more: Callable[[float], bool] = lambda seconds: False,
) -> Generator[None, None, dict[str, float]]:
    """Rates of one input format from datasets the engine writes from up to four of its inputs.

    Datasets written: ten rows from each input, ten rows from one input (with the previous, the per-dataset
    and per-input fixed costs) and a large one (mostly per-byte cost). Measured apart: the cost of decoding
    chunks a dataset keeps only part of (:meth:`_Sampler.measure_decode`) and of a read call
    (:meth:`_Sampler.measure_calls`). The model's counts of each dataset are known; the three costs are their
    non-negative least-squares fit, in relative error.

    A generator: the first pass runs beside other work (the fresh process of :func:`calibrate`) and pauses;
    it writes the many-input dataset (paying one-time costs), grows and first-touches the engine's buffers to
    the large one's size (a run pays that once, not per dataset) and runs the probes. The caller then lowers
    that work's priority, and the second pass writes the datasets: the many-input one three to ten times and
    the one-input one up to six times (their means kept, :func:`_mean_trial`; more of them when they are
    quick, see :func:`_repeated`), and the large one twice (the better kept; the per-byte cost is the
    difference of the large and the many-input one). Unless the first pass took over twice the
    budget: then it finishes the samples once. The decode and call probes run in both passes, the faster
    kept: competing for the cores only slows them.

    Then, while ``more(seconds)`` says there is time for another round of that many seconds (the fresh
    process of :func:`calibrate` has not finished: calibrate would wait for it), rounds of one more write of
    each of the three datasets: the many- and one-input means take them in, and the large one is the lower
    median of all its writes (of two, the better, as without them).
    """
    sample = sorted(infos, key=lambda i: -i.raw_x_bytes)[:4]
    s = _Sampler(sample, tmp)
    try:
        rows_total = sum(i.n_obs for i in sample)
        bytes_per_row = sum(i.raw_x_bytes for i in sample) / max(rows_total, 1)
        fmt = rate_key(sample[0])
        rate = base.per_format("x_bytes_per_s", fmt)
        tiny = min(10, min(i.n_obs for i in sample))
        many, one = s.plan(tiny, tiny * len(sample)), s.plan(tiny, tiny, inputs=1)
        started = time.perf_counter()
        # the first pass runs beside the fresh process: its sample pays the process's one-time costs (and is
        # kept only if there is no second pass)
        t_many = s.run(many)
        # the large dataset's bytes should cost more than its fixed costs, or its per-byte rate is lost in
        # them
        target = 0.12 * budget_s * rate
        big = int(min(rows_total, max(400, target / max(bytes_per_row, 1))))
        chunk = max(1, min(1000, big // 32))
        large = s.plan(chunk, big)
        # the engine's buffers grown and first touched (a run pays that once, not per dataset)
        s.reserve(large)
        # the probes beside the other process too: competing for the cores can only make them slower, and
        # the faster of the two passes is kept (one short probe alone can hit a slow moment)
        decode_rate, calls = s.measure_decode(), s.measure_calls()
        first_pass = time.perf_counter() - started
        yield
        if first_pass < 2 * budget_s:  # alone now: these are the samples kept (beside the fresh process,
            # CPU time misses the engine's waits and wall time counts the other process's work); the per-byte
            # cost is the difference of the large one and the many-input one: the mean of three to ten of
            # the latter and of up to six of the one-input one (a real dataset's fixed costs are what
            # datasets pay on average, not the best), the better of two of the large one (one hiccup in it
            # would skew every prediction)
            manys = _repeated(lambda: s.run(many), least=3, most=10, within_s=0.5)
            ones = _repeated(lambda: s.run(one), least=1, most=6, within_s=0.3)
            on_disk = s.run(large, disk=True)
            bigs = [on_disk, s.run(large)]
            decode_rate = max(decode_rate, s.measure_decode())
            calls = min(calls, s.measure_calls(), key=lambda t: t.seconds)
            # while calibrate would otherwise only wait for its fresh process, more writes of each sample
            # (they slow that process down, and calibrate with it, by less than they take)
            while more(bigs[-1].seconds + ones[-1].seconds + manys[-1].seconds):
                bigs.append(s.run(large))
                ones.append(s.run(one))
                manys.append(s.run(many))
            t_many, t_one = _mean_trial(manys), _mean_trial(ones)
            t_big = sorted(bigs, key=lambda t: t.seconds)[(len(bigs) - 1) // 2]
        else:
            t_one, t_big = s.run(one), s.run(large, disk=True)
            on_disk = t_big
        ratio = on_disk.x_disk_bytes / on_disk.x_out_bytes if on_disk.x_out_bytes else 0.0
        open_s = s.open_s
    finally:
        s.close()
    decode_rate = decode_rate or base.per_format("decode_bytes_per_s", fmt)
    call_s = _call_seconds(calls, rate, decode_rate)
    per_byte, dataset_s, per_input = _fit_costs(
        [t_big, t_many, t_one], base.obs_rows_per_s, call_s, decode_rate
    )
    if per_byte <= 0:
        per_byte = 1 / base.per_format("x_bytes_per_s", fmt)
    if t_many.inputs <= t_one.inputs:  # one input: the per-input cost cannot be told from the fixed cost
        per_input = base.per_format("dataset_input_s", fmt)
    return {
        "x_bytes_per_s": 1 / per_byte,
        "read_call_s": call_s,
        "decode_bytes_per_s": decode_rate,
        "input_open_s": open_s,
        "dataset_s": dataset_s,
        "dataset_input_s": per_input,
        "compression_ratio": ratio,
        "weight": t_big.bytes,
    }


def _cold_read_costs(infos: list[SourceInfo]) -> dict[str, float]:
    """``cold_read_s`` and ``cold_bytes_per_s`` on the inputs' disk (two probes), or nothing.

    See :func:`~annbatch_nb.pagecache.cold_read_costs` (about 30-60 ms a probe here). Nothing when the inputs
    are remote or the platform cannot drop pages: the reference values stay.
    """
    from . import pagecache

    costs = pagecache.cold_read_costs([i.path for i in infos], probes=2)
    return {} if costs is None else {"cold_read_s": costs[0], "cold_bytes_per_s": costs[1]}


def calibrate(
    inputs: str | os.PathLike[str] | Iterable[str | os.PathLike[str]] | list[SourceInfo],
    *,
    budget_s: float = 3.0,
    cache: bool = True,
) -> Calibration:
    """Measure this machine's costs on a sample of the user's own files (a few seconds), and cache them.

    For each input format, up to four of the inputs of that format are read as the engine reads them (one-row
    ranges: the cost of a read call; one row of each of a few compressed chunks: the cost of decoding what a
    dataset does not keep), and the engine itself writes a few datasets of small plans over them into a
    temporary directory, each timed (see :func:`_calibrate_format`); the counts of the time model (bytes,
    read calls, decoded bytes, rows, inputs, datasets) are known for each, so its per-byte and fixed costs
    follow. Meanwhile a fresh process (started before the scan) imports annbatch-nb, runs a tiny shuffle
    (once per machine: cached) and scans and plans a sample of the inputs: its start time and resident
    memory after each step are the worker start cost, the memory baseline and the memory a run holds per
    cell. The engine's samples warm up beside that process, which then goes on at the lowest CPU priority
    while the samples kept are written (its own times are CPU times), and more of them while it has not
    finished (until :data:`EXTRA_SAMPLES_UNTIL_S` from calibrate's start: it would only wait). Once
    per machine (cached), before all that, the first touch of new memory is timed (:func:`_fault_rate`): the
    cost of a run's new buffers.
    Last, reads of the largest input that the page cache does not hold are timed (:func:`_cold_read_costs`).
    Times are the smaller of wall and CPU time, so that other programs' load does not count.

    Parameters
    ----------
    inputs
        The inputs (paths, or scanned :class:`~annbatch_nb.sources.SourceInfo` records).
    budget_s
        Seconds to spend on one pass over the engine samples, about. The first pass runs alongside the fresh
        process and warms up; a second, alone, follows and is the one kept (unless the first took more than
        twice the budget: then the first is kept).
    cache
        Store the result under ``~/.cache/annbatch-nb`` (or ``$ANNBATCH_NB_CACHE``), keyed by host and inputs.

    Returns
    -------
    Calibration
        Measured costs (``source="measured"``).
    """
    from .plan import _infos  # imported here: the plan imports this module

    base = DEFAULT_CALIBRATION
    begun = time.time()
    machine = _cached_machine() if cache else None  # what does not depend on the inputs, measured once
    # first touch of new memory, before anything here allocates and frees (memory freed a moment ago is
    # quick to touch again and would hide the cost a run's new buffers pay), and before the fresh process
    # starts (starting it can free memory: then the probe measures the quick kind)
    fault = _fault_rate() if machine is None else None
    child, started = _start_child()  # on another core meanwhile: its imports overlap the scan
    per_fmt: dict[str, dict[str, float]] = {}
    steps: dict[str, Generator[None, None, dict[str, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="annbatch-nb-calibrate-") as tmp:
        try:
            infos = _infos(inputs)
            _send_child_task(child, machine is None, infos)
            formats = sorted({rate_key(i) for i in infos})

            def more(seconds: float) -> bool:  # another round of samples fits before the fresh process ends
                # (it still runs) and within the time calibrate may take
                return child.poll() is None and time.time() - begun + seconds <= EXTRA_SAMPLES_UNTIL_S

            steps = {
                fmt: _calibrate_format(
                    [i for i in infos if rate_key(i) == fmt],
                    Path(tmp),
                    budget_s / len(formats),
                    base,
                    more,
                )
                for fmt in formats
            }
            for step in steps.values():  # a first pass, while the fresh process runs
                next(step)
            # a second without it competing for the cores: it goes on at the lowest priority, on what the
            # second pass leaves idle (its own times are CPU times: they do not count the waits)
            yielded = _lowest_priority(child.pid)
            measured = {} if yielded else _finish_child(child, started)
            for fmt, step in steps.items():
                try:
                    next(step)
                except StopIteration as done:
                    per_fmt[fmt] = done.value
            if yielded:
                measured = _finish_child(child, started)
        finally:
            for step in steps.values():
                step.close()
            if child.poll() is None:  # a bad input or a failed sample: the fresh process is not left behind
                child.kill()
                child.wait()
    weights = np.array([max(v["weight"], 1.0) for v in per_fmt.values()])

    def mean(key: str) -> float:
        return float(np.average([v[key] for v in per_fmt.values()], weights=weights))

    ratios = [v["compression_ratio"] for v in per_fmt.values() if v["compression_ratio"] > 0]
    cell_bytes = measured.pop("cell_bytes", 0.0)
    if machine is None:
        keys = _MACHINE_KEYS
        machine = {k: measured[k] for k in keys if k in measured}
        if fault is not None:
            machine["fault_bytes_per_s"] = fault
        if cache and len(machine) == len(keys):
            with contextlib.suppress(OSError):
                _machine_cache_path().parent.mkdir(parents=True, exist_ok=True)
                _machine_cache_path().write_text(json.dumps(machine))
    cold = _cold_read_costs(infos)
    cal = replace(
        base,
        **cold,
        x_bytes_per_s={**base.x_bytes_per_s, **{f: v["x_bytes_per_s"] for f, v in per_fmt.items()}},
        read_call_s={**base.read_call_s, **{f: v["read_call_s"] for f, v in per_fmt.items()}},
        decode_bytes_per_s={
            **base.decode_bytes_per_s,
            **{f: v["decode_bytes_per_s"] for f, v in per_fmt.items()},
        },
        input_open_s={**base.input_open_s, **{f: v["input_open_s"] for f, v in per_fmt.items()}},
        dataset_s=mean("dataset_s"),
        dataset_input_s={**base.dataset_input_s, **{f: v["dataset_input_s"] for f, v in per_fmt.items()}},
        compression_ratio=float(np.median(ratios)) if ratios else base.compression_ratio,
        **{k: v for k, v in machine.items() if k in Calibration.__dataclass_fields__},
        cell_bytes=cell_bytes,
        source="measured",
    )
    if cache:
        d = _cache_dir()
        try:
            d.mkdir(parents=True, exist_ok=True)
            (d / f"calibration-{_cache_key(infos)}.json").write_text(json.dumps(cal.to_dict()))
        except OSError:
            pass
    return cal

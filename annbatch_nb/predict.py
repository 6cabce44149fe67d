"""Predicted peak memory, wall time and output size of a plan, and the calibration behind them.

The memory model is the engine's own buffer accounting (:mod:`annbatch_nb.engine` allocates exactly these
buffers, per output dataset, reused across datasets), plus what the plan and the open sources hold for the
whole run, plus the interpreter's baseline. The time model is a throughput model whose rates
(:class:`Calibration`) are measured on the user's own files by :func:`calibrate` (a few seconds) and cached
per machine and inputs; without a calibration, rates measured on a 2-core reference machine are used.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import tempfile
import time
from collections.abc import Iterable
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
    "cached_calibration",
    "calibrate",
    "predict_memory",
    "predict_output_bytes",
    "predict_time",
]

#: Elements the engine gathers per step (mirrors ``engine._GATHER_ELEMS``).
GATHER_ELEMS = 1 << 21
#: Python's per-object cost of a short ``str`` (header), plus one pointer to it.
_STR_OVERHEAD = 49 + 8


@dataclass(frozen=True)
class Calibration:
    """Rates of this machine on these inputs.

    Attributes
    ----------
    read_bytes_per_s
        Reading X from inputs, by input format (``h5ad``, ``zarr``).
    read_call_s
        Fixed cost of one coalesced read call.
    gather_elems_per_s
        Permuting CSR entries (row gather).
    compress_bytes_per_s
        Blosc lz4 compression of X.
    compression_ratio
        Compressed / raw bytes of X.
    write_bytes_per_s
        Writing compressed bytes to the output store.
    dataset_overhead_s
        Fixed cost per output dataset (metadata, obs/var encoding, completion record).
    obs_rows_per_s
        Reading, assembling and writing obs, per row.
    baseline_rss_bytes
        Resident memory of a Python process with annbatch-nb imported.
    source
        ``"default"`` (reference machine) or ``"measured"``.
    """

    read_bytes_per_s: dict[str, float] = field(default_factory=lambda: {"h5ad": 1.2e9, "zarr": 3.0e8})
    read_call_s: float = 6e-5
    gather_elems_per_s: float = 2.5e8
    compress_bytes_per_s: float = 5.0e8
    compression_ratio: float = 0.45
    write_bytes_per_s: float = 6.0e8
    dataset_overhead_s: float = 0.35
    obs_rows_per_s: float = 2.0e6
    baseline_rss_bytes: int = 230_000_000
    source: str = "default"

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Calibration:
        """Inverse of :meth:`to_dict` (unknown keys ignored)."""
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)

    def read_rate(self, fmt: str) -> float:
        """Read rate for an input format (the slowest known rate for an unknown format)."""
        return self.read_bytes_per_s.get(fmt, min(self.read_bytes_per_s.values()))


DEFAULT_CALIBRATION = Calibration()


# --------------------------------------------------------------------------------------------------
# Per-dataset quantities from the plan (no I/O)
# --------------------------------------------------------------------------------------------------
def _dataset_table(plan: Plan) -> dict[str, np.ndarray]:
    """Rows, estimated entries, input bytes and read calls of every dataset."""
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
    in_bytes = np.bincount(k, weights=lengths * bytes_per_row[runs[:, 0]], minlength=kd)
    # reads: runs of one dataset that touch in their input coalesce into one call
    order = np.lexsort((runs[:, 1], runs[:, 0], k))
    r = runs[order]
    ks = k[order]
    new_call = np.ones(len(r), dtype=bool)
    new_call[1:] = ~((ks[1:] == ks[:-1]) & (r[1:, 0] == r[:-1, 0]) & (r[1:, 1] == r[:-1, 2]))
    calls = np.bincount(ks[new_call], minlength=kd).astype(np.float64)
    fmt_bytes: dict[str, np.ndarray] = {}
    for j, info in enumerate(infos):
        sel = runs[:, 0] == j
        w = np.bincount(k[sel], weights=lengths[sel] * bytes_per_row[j], minlength=kd)
        fmt_bytes[info.format] = fmt_bytes.get(info.format, np.zeros(kd)) + w
    max_row = max((i.n_vars for i in infos), default=0)
    table = {
        "rows": plan.rows_per_dataset.astype(np.float64),
        "nnz": nnz,
        "in_bytes": in_bytes,
        "calls": calls,
        "max_row": np.array([float(max_row)]),
        **{f"bytes_{f}": v for f, v in fmt_bytes.items()},
    }
    plan._cache["dataset_table"] = table
    return table


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

    Attributes
    ----------
    peak_bytes
        The prediction.
    baseline_bytes
        Interpreter and libraries.
    run_bytes
        Held for the whole run: cell names, each CSR input's row pointers.
    dataset_bytes
        The largest dataset's buffers (read buffer, permutation, obs, gather scratch, one compressed shard).
    worst_dataset
        Which dataset that is.
    """

    peak_bytes: int
    baseline_bytes: int
    run_bytes: int
    dataset_bytes: int
    worst_dataset: int

    def to_dict(self) -> dict[str, int]:
        """JSON-able form."""
        return asdict(self)


def dataset_memory(plan: Plan, calibration: Calibration = DEFAULT_CALIBRATION) -> np.ndarray:
    """Bytes the engine holds while writing each dataset (the buffers of ``engine.write_dataset``)."""
    t = _dataset_table(plan)
    rows, nnz = t["rows"], t["nnz"]
    it = plan.dtype.itemsize
    obs = rows * _obs_row_bytes(plan) * 3 + rows * 8  # pieces, assembled frame, permuted copy; names
    perm_and_pointers = rows * 8 * 5  # counts, row nnz, permutation, output nnz, output indptr
    if plan.x_kind == "csr":
        buffer = nnz * (it + 4) + (rows + 1) * 4
        # the gather block is allocated once but only the part a dataset uses is ever touched (resident)
        scratch = (np.minimum(GATHER_ELEMS, nnz) + 2 * t["max_row"][0]) * (it + 4)
        shard_elems = np.minimum(_shard_elems(plan), nnz)
        shard = shard_elems * (it + plan.index_dtype.itemsize) * calibration.compression_ratio * 1.5
    else:
        row_bytes = plan.n_vars * it
        buffer = rows * row_bytes
        scratch = plan.params.n_obs_per_chunk * row_bytes
        shard_rows = np.minimum(_shard_rows(plan), rows)
        shard = shard_rows * row_bytes * calibration.compression_ratio * 1.5
    return buffer + scratch + shard + obs + perm_and_pointers


def _shard_elems(plan: Plan) -> int:
    itemsize = max(plan.dtype.itemsize, plan.index_dtype.itemsize)
    chunk = plan.x_chunk_elems
    return max(1, int(plan.params.shard_size) // (itemsize * chunk)) * chunk


def _shard_rows(plan: Plan) -> int:
    chunk_rows = plan.params.n_obs_per_chunk
    row_bytes = plan.n_vars * plan.dtype.itemsize
    return max(1, int(plan.params.shard_size) // max(row_bytes * chunk_rows, 1)) * chunk_rows


def run_memory(plan: Plan) -> int:
    """Bytes held for the whole run: cell names (plan and sources) and CSR inputs' row pointers."""
    n = plan.n_obs
    names = n * (2 * 8 + _STR_OVERHEAD + _mean_name_len(plan.inputs))
    indptr = sum((i.n_obs + 1) * 8 for i in plan.inputs if i.x_kind == "csr")
    return int(names + indptr)


def predict_memory(plan: Plan, calibration: Calibration = DEFAULT_CALIBRATION) -> MemoryPrediction:
    """Predict the peak resident memory of executing ``plan``.

    Parameters
    ----------
    plan
        The plan.
    calibration
        Rates and baseline of this machine.

    Returns
    -------
    MemoryPrediction
        The peak and its parts.
    """
    per_dataset = dataset_memory(plan, calibration)
    worst = int(np.argmax(per_dataset)) if len(per_dataset) else 0
    ds = int(per_dataset[worst]) if len(per_dataset) else 0
    run = run_memory(plan)
    base = int(calibration.baseline_rss_bytes)
    return MemoryPrediction(
        peak_bytes=base + run + ds, baseline_bytes=base, run_bytes=run, dataset_bytes=ds, worst_dataset=worst
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
    p = infos_plan
    base = calibration.baseline_rss_bytes + run_memory(p)
    it = p.dtype.itemsize
    per_row = _obs_row_bytes(p) * 3 + 8 + 40
    if p.x_kind == "csr":
        nnz_row = p.mean_nnz_per_row
        per_row += nnz_row * (it + 4) + 4
        per_row += nnz_row * (it + p.index_dtype.itemsize) * calibration.compression_ratio * 1.5
        fixed = (GATHER_ELEMS + 2 * max(i.n_vars for i in p.inputs)) * (it + 4)
    else:
        row_bytes = p.n_vars * it
        per_row += row_bytes * (1 + calibration.compression_ratio * 1.5)
        fixed = p.params.n_obs_per_chunk * row_bytes
    rows = (budget_bytes - base - fixed) / per_row
    return int(max(0, min(rows, 2**62)))


# --------------------------------------------------------------------------------------------------
# Time and size
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TimePrediction:
    """Predicted wall time, with its parts (seconds).

    Attributes
    ----------
    seconds
        The prediction.
    read, gather, compress, write, obs, overhead
        Its parts.
    """

    seconds: float
    read: float
    gather: float
    compress: float
    write: float
    obs: float
    overhead: float

    def to_dict(self) -> dict[str, float]:
        """JSON-able form."""
        return asdict(self)


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


def predict_time(plan: Plan, calibration: Calibration = DEFAULT_CALIBRATION) -> TimePrediction:
    """Predict the wall time of executing ``plan`` on this machine.

    Parameters
    ----------
    plan
        The plan.
    calibration
        Rates measured by :func:`calibrate` (or the reference machine's).

    Returns
    -------
    TimePrediction
        Seconds, and their parts.
    """
    t = _dataset_table(plan)
    c = calibration
    read = sum(
        float(v.sum()) / c.read_rate(k[len("bytes_") :]) for k, v in t.items() if k.startswith("bytes_")
    )
    read += float(t["calls"].sum()) * c.read_call_s * (2 if plan.x_kind == "csr" else 1)
    if plan.x_kind == "csr":
        elems = float(t["nnz"].sum())
        raw_out = elems * (plan.dtype.itemsize + plan.index_dtype.itemsize)
        gather = elems / c.gather_elems_per_s
    else:
        raw_out = float(t["rows"].sum()) * plan.n_vars * plan.dtype.itemsize
        gather = raw_out / (c.gather_elems_per_s * 4)
    compress = raw_out / c.compress_bytes_per_s
    write = raw_out * c.compression_ratio / c.write_bytes_per_s
    obs = float(t["rows"].sum()) / c.obs_rows_per_s
    overhead = plan.n_datasets * c.dataset_overhead_s + 0.2
    total = read + gather + compress + write + obs + overhead
    return TimePrediction(total, read, gather, compress, write, obs, overhead)


# --------------------------------------------------------------------------------------------------
# Calibration
# --------------------------------------------------------------------------------------------------
def _cache_dir() -> Path:
    root = os.environ.get("ANNBATCH_NB_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "annbatch-nb"
    )
    return Path(root)


def _cache_key(infos: list[SourceInfo]) -> str:
    ident = [socket.gethostname(), os.cpu_count()] + [[i.path, i.size_bytes, i.mtime] for i in infos]
    return hashlib.sha256(json.dumps(ident).encode()).hexdigest()[:20]


def cached_calibration(infos: list[SourceInfo]) -> Calibration | None:
    """The cached calibration of these inputs on this machine, if any."""
    path = _cache_dir() / f"calibration-{_cache_key(infos)}.json"
    try:
        return Calibration.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None


def _timed(fn: Any, *args: Any) -> tuple[float, Any]:
    t = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - t, out


@dataclass
class _Sample:
    """What the read measurements brought back, for the later steps."""

    read_rates: dict[str, list[float]] = field(default_factory=dict)
    call_costs: list[float] = field(default_factory=list)
    data: list[np.ndarray] = field(default_factory=list)
    indices: list[np.ndarray] = field(default_factory=list)


def _sample_runs(n_obs: int, rng: np.random.Generator, run: int = 1000, count: int = 8) -> np.ndarray:
    """Up to ``count`` non-overlapping runs of ``run`` rows at random places, sorted."""
    run = max(1, min(n_obs, run))
    slots = max(n_obs // run, 1)
    picks = np.sort(rng.choice(slots, size=min(count, slots), replace=False)) * run
    return np.stack([picks, np.minimum(picks + run, n_obs)], axis=1)


def _measure_reads(infos: list[SourceInfo], rng: np.random.Generator, budget_s: float) -> _Sample:
    """Read sampled runs from up to three inputs per format, as the engine reads them."""
    from .sources import InputSpec, open_source

    sample = _Sample()
    formats = sorted({i.format for i in infos})
    for fmt in formats:
        deadline = time.perf_counter() + budget_s / len(formats)
        for info in sorted((i for i in infos if i.format == fmt), key=lambda i: -i.raw_x_bytes)[:3]:
            if time.perf_counter() > deadline:
                break
            src = open_source(InputSpec(info.path, info.display), info=info)
            try:
                runs = _sample_runs(info.n_obs, rng)
                if info.x_kind == "csr":
                    _ = src.indptr  # read once, as the engine does
                    nnz = int(src.run_nnz(runs).sum())
                    data, idx = np.empty(nnz, dtype=info.dtype), np.empty(nnz, dtype=np.int32)
                    dt, _ = _timed(src.read_csr_into, runs, data, idx)
                    nbytes = nnz * (info.dtype.itemsize + 4)
                    sample.data.append(data)
                    sample.indices.append(idx)
                    single = np.stack([np.arange(0, 50, 2), np.arange(1, 51, 2)], axis=1)  # 25 separate rows
                    single = single[single[:, 1] <= info.n_obs]
                    m = int(src.run_nnz(single).sum())
                    dt1, _ = _timed(src.read_csr_into, single, np.empty(m, info.dtype), np.empty(m, np.int32))
                    sample.call_costs.append(dt1 / max(2 * len(single), 1))
                else:
                    dt, block = _timed(src.read_dense, runs)
                    nbytes = block.nbytes
                    sample.data.append(block.ravel())
                if dt > 0 and nbytes > 0:
                    sample.read_rates.setdefault(fmt, []).append(nbytes / dt)
            finally:
                src.close()
    return sample


def _measure_compression(data: np.ndarray, indices: np.ndarray | None) -> tuple[float, float, bytes]:
    """Compress like the writer (Blosc lz4, byte shuffle, chunks of ~22k entries): rate, ratio, bytes."""
    from numcodecs import Blosc

    arrays = [data]
    if indices is not None and len(indices):
        arrays.append(indices.astype(np.uint16 if indices.max() < 65536 else np.uint32))
    chunk = 22_000
    parts: list[bytes] = []
    raw = 0
    t0 = time.perf_counter()
    for arr in arrays:
        codec = Blosc(cname="lz4", clevel=3, shuffle=1, blocksize=0, typesize=arr.dtype.itemsize)
        parts.extend(codec.encode(arr[a : a + chunk]) for a in range(0, len(arr), chunk))
        raw += arr.nbytes
    dt = max(time.perf_counter() - t0, 1e-6)
    blob = b"".join(parts)
    return raw / dt, len(blob) / max(raw, 1), blob


def _measure_gather(data: np.ndarray, indices: np.ndarray, rng: np.random.Generator) -> float | None:
    """Entries per second of the engine's random row gather over the sample."""
    from .engine import CSRBuffer, _gather_rows

    if len(indices) < 1000:
        return None
    rows = max(1, len(indices) // 300)
    ptr = np.linspace(0, len(indices), rows + 1).astype(np.int32)
    buf = CSRBuffer(data[: len(indices)], indices, ptr)
    out_d, out_i = np.zeros_like(buf.data), np.zeros_like(indices)  # touched, as the engine's reused scratch
    dt, _ = _timed(_gather_rows, buf, rng.permutation(rows).astype(np.int32), out_d, out_i)
    return len(indices) / max(dt, 1e-6)


def _measure_writes(blob: bytes, rng: np.random.Generator) -> tuple[float, float, float]:
    """Write rate, fixed per-dataset metadata cost, and obs rows per second, in a temporary directory."""
    import anndata as ad
    import pandas as pd
    import zarr

    with tempfile.TemporaryDirectory(prefix="annbatch-nb-calibrate-") as tmp:
        dt, _ = _timed(Path(tmp, "shard").write_bytes, blob)
        write_rate = len(blob) / max(dt, 1e-6)
        root = zarr.open_group(os.path.join(tmp, "c.zarr"), mode="w", zarr_format=3)
        t0 = time.perf_counter()
        g = root.create_group(
            "dataset_0", attributes={"encoding-type": "anndata", "encoding-version": "0.1.0"}
        )
        for key in ("uns", "obsm", "varm", "obsp", "varp", "layers"):
            ad.io.write_elem(g, key, {})
        ad.io.write_elem(g, "var", pd.DataFrame(index=pd.Index([f"g{i}" for i in range(100)], dtype=object)))
        meta = time.perf_counter() - t0
        costs = []
        for i, n in enumerate((10_000, 100_000)):  # cost = fixed + n * per_row
            obs = pd.DataFrame(
                {"a": pd.Categorical(rng.choice(["x", "y", "z"], n)), "b": rng.random(n)},
                index=pd.Index([f"cell{j}" for j in range(n)], dtype=object),
            )
            dt, _ = _timed(ad.io.write_elem, g, f"obs{i}", obs)
            costs.append(dt)
    per_row = max((costs[1] - costs[0]) / 90_000, 1e-8)
    fixed = max(costs[0] - 10_000 * per_row, 0.0)
    # obs is also read and assembled before it is written: count that as much again as the write
    return write_rate, meta + fixed + 0.05, 1.0 / (2 * per_row)


_BASELINE_CHILD = """
import resource, sys, tempfile, os
import numpy as np, scipy.sparse as sp, anndata as ad, pandas as pd
import annbatch_nb as abn
d = tempfile.mkdtemp(prefix="annbatch-nb-baseline-")
x = sp.random(200, 50, density=0.1, format="csr", dtype=np.float32, random_state=0)
ad.AnnData(X=x, obs=pd.DataFrame(index=[f"c{i}" for i in range(200)]),
           var=pd.DataFrame(index=[f"g{i}" for i in range(50)])).write_h5ad(os.path.join(d, "a.h5ad"))
abn.shuffle([os.path.join(d, "a.h5ad")], os.path.join(d, "o.zarr"), shuffle_chunk_size=10, dataset_size=100,
            seed=0, progress=False, workers=1)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


def _start_baseline() -> Any:
    """Start measuring the resident memory of a fresh process that runs a tiny shuffle (in the background)."""
    import subprocess
    import sys

    env = {**os.environ, "ANNBATCH_NB_CACHE": tempfile.gettempdir()}
    return subprocess.Popen(
        [sys.executable, "-c", _BASELINE_CHILD],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )


def _finish_baseline(proc: Any, default: int) -> int:
    try:
        out, _ = proc.communicate(timeout=60)
        return int(out.strip().splitlines()[-1])
    except Exception:  # best effort: keep the reference value
        proc.kill()
        return default


def calibrate(
    inputs: str | os.PathLike[str] | Iterable[str | os.PathLike[str]] | list[SourceInfo],
    *,
    budget_s: float = 3.0,
    cache: bool = True,
) -> Calibration:
    """Measure this machine's rates on a sample of the user's own files (a few seconds), and cache them.

    Reads sampled row runs from up to three inputs of each format (as the engine does), compresses what it
    read like the writer, gathers it in random row order, writes it and a small dataset's metadata to a
    temporary directory; meanwhile a fresh process runs a tiny shuffle to measure the interpreter's baseline
    resident memory.

    Parameters
    ----------
    inputs
        The inputs (paths, or scanned :class:`~annbatch_nb.sources.SourceInfo` records).
    budget_s
        Time budget of the read measurements.
    cache
        Store the result under ``~/.cache/annbatch-nb`` (or ``$ANNBATCH_NB_CACHE``), keyed by host and inputs.

    Returns
    -------
    Calibration
        Measured rates (``source="measured"``).
    """
    from .sources import SourceInfo

    if isinstance(inputs, list) and inputs and all(isinstance(i, SourceInfo) for i in inputs):
        infos: list[SourceInfo] = inputs  # type: ignore[assignment]
    else:
        from .plan import scan

        infos = scan(inputs)  # type: ignore[arg-type]
    rng = np.random.default_rng(0)
    base = DEFAULT_CALIBRATION
    baseline = _start_baseline()  # runs on the other core meanwhile
    sample = _measure_reads(infos, rng, budget_s)
    data = np.concatenate(sample.data) if sample.data else np.zeros(1 << 16, dtype=np.float32)
    indices = np.concatenate(sample.indices) if sample.indices else None
    compress_rate, ratio, blob = _measure_compression(data, indices)
    gather = _measure_gather(data, indices, rng) if indices is not None else None
    write_rate, overhead, obs_rate = _measure_writes(blob, rng)
    cal = replace(
        base,
        read_bytes_per_s={
            **base.read_bytes_per_s,
            **{k: float(np.median(v)) for k, v in sample.read_rates.items()},
        },
        read_call_s=float(np.median(sample.call_costs)) if sample.call_costs else base.read_call_s,
        gather_elems_per_s=gather or base.gather_elems_per_s,
        compress_bytes_per_s=compress_rate,
        compression_ratio=ratio,
        write_bytes_per_s=write_rate,
        dataset_overhead_s=overhead,
        obs_rows_per_s=obs_rate,
        baseline_rss_bytes=_finish_baseline(baseline, base.baseline_rss_bytes),
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

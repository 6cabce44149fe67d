"""The planner's predictions: exact arithmetic of the memory, time and size models on a hand-checked case,
dataset_size="auto", sweeps, calibration and its cache, and the CLI's JSON."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import annbatch_nb as abn
from annbatch_nb.cli import main
from annbatch_nb.demo import make_demo_data
from annbatch_nb.plan import Parameters, build_plan, sweep
from annbatch_nb.predict import Calibration, cached_calibration, calibrate
from annbatch_nb.sources import SourceInfo


def _one_input(n: int = 1000, nnz_per_row: int = 10, genes: int = 10) -> list[SourceInfo]:
    return [
        SourceInfo(
            path="/x/a.h5ad",
            display="a.h5ad",
            format="h5ad",
            n_obs=n,
            n_vars=genes,
            x_kind="csr",
            dtype=np.dtype(np.float32),
            nnz=n * nnz_per_row,
            var_names=pd.Index([f"g{i}" for i in range(genes)], dtype=object),
            obs_names=pd.Index([f"0-{i}" for i in range(n)], dtype=object),
        )
    ]


CAL = Calibration(
    x_bytes_per_s={"h5ad": 1e6, "zarr": 1e6},
    read_call_s={"h5ad": 0.001, "zarr": 0.01},
    obs_rows_per_s=1000,
    dataset_s=0.5,
    dataset_input_s={"h5ad": 0.1, "zarr": 0.2},
    input_open_s={"h5ad": 0.01, "zarr": 0.05},
    run_s=0.2,
    first_dataset_s=0.01,
    fault_bytes_per_s=1e7,
    quick_touch_bytes=40_000,
    compression_ratio=0.5,
    process_start_s=2.0,
    parallel_efficiency=0.8,
    baseline_rss_bytes=230_000_000,
    import_rss_bytes=200_000_000,
)


def test_memory_model_by_hand(monkeypatch) -> None:
    monkeypatch.setenv("ANNBATCH_NB_THREADS", "2")  # two encoding threads
    p = build_plan(_one_input(), Parameters.validated(shuffle_chunk_size=100, dataset_size=1000, seed=0), CAL)
    assert p.n_datasets == 1 and p.index_dtype == np.uint8
    buffer = 10_000 * (4 + 4) + 1001 * 4  # data (float32) + int32 column numbers + int32 row pointers
    # gather scratch: the touched block plus two rows, in one of the two threads' slots (one block of
    # 640-entry chunks holds all 10,000 entries: the other slot is never touched)
    scratch = 1 * (10_000 + 2 * 10) * (4 + 4)
    shard = (
        10_000 * (4 + 1) * 0.5
    )  # one compressed shard (the whole dataset here), its chunks held until stored
    obs = 1000 * 8 * 3 + 1000 * 8  # src_path codes, three copies; the names
    pointers = 1000 * 8 * 5  # counts, row nnz, permutation, output nnz, output indptr
    names = 1000 * (2 * 8 + 57 + 3.9)  # "0-0".."0-99": 3.9 characters on average
    indptr = 1001 * 8
    m = p.memory
    assert m.workers == 1
    assert m.dataset_bytes == int(buffer + scratch + shard + obs + pointers)
    assert m.run_bytes == int(names + indptr)
    assert m.peak_bytes == m.process_bytes == 230_000_000 + m.run_bytes + m.dataset_bytes
    assert p.peak_memory_bytes == m.peak_bytes


def test_time_and_size_models_by_hand(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANNBATCH_NB_THREADS", "2")  # as in test_memory_model_by_hand
    p = build_plan(_one_input(), Parameters.validated(shuffle_chunk_size=100, dataset_size=1000, seed=0), CAL)
    t = p.time
    raw_in = 10_000 * 8 + 1001 * 8  # data + indices + row pointers of the input's 1000 rows
    assert t.x == pytest.approx(raw_in / 1e6)
    assert t.calls == pytest.approx(1 * 2 * 0.001)  # the ten runs coalesce: one range, two arrays (no obs)
    assert t.obs == pytest.approx(1000 / 1000)
    opened = 0.01 + 1001 * 8 / 1e6  # the input opened and its row pointers read, once
    # read buffer and gather block, first touch; the first 40,000 bytes come quick (not charged)
    touched = (10_000 * 8 + 10_000 * 8 - 40_000) / 1e7
    # run, process (opens, first touch, one-time costs), dataset, input
    assert t.overhead == pytest.approx(0.2 + opened + touched + 0.01 + 0.5 + 0.1)
    assert t.workers == 1
    assert p.seconds == t.seconds == t.serial_seconds == pytest.approx(t.x + t.calls + t.obs + t.overhead)
    assert p.seconds == pytest.approx(1.930016)
    assert p.output_bytes == int(10_000 * 5 * 0.5 + 1001 * 8 * 0.5 + 1000 * 8 * 0.5)
    # the first dataset's one-time costs come after its X is read into the freshly touched buffers: both count
    slow_start = dataclasses.replace(CAL, first_dataset_s=0.05)
    later = build_plan(_one_input(), p.params, slow_start).time
    assert later.overhead == pytest.approx(0.2 + opened + touched + 0.05 + 0.5 + 0.1)
    assert later.seconds - t.seconds == pytest.approx(0.05 - 0.01)


def test_bytes_the_page_cache_does_not_hold_pay_the_disk_by_hand() -> None:
    from annbatch_nb.predict import _dataset_table, dataset_seconds

    two = [*_one_input(), dataclasses.replace(_one_input()[0], path="/x/b.h5ad", display="b.h5ad")]
    params = Parameters.validated(shuffle_chunk_size=100, dataset_size=1000, seed=0, assignment="balanced")
    cal = dataclasses.replace(CAL, cold_read_s=0.002, cold_bytes_per_s=1e5)
    warm = build_plan(two, params, cal)
    cold = build_plan(two, params, cal, uncached=np.array([1.0, 0.25]))
    assert warm.n_datasets == 2
    t = _dataset_table(cold)
    # each dataset reads 500 rows of each input (balanced) as five runs of 100; runs of one input that touch
    # coalesce, the rest are ranges of their own: one read per range and X array (data, indices)
    runs = cold.runs
    for k in range(2):
        mine = runs[cold.run_dataset == k]
        ranges = {i: 0 for i in (0, 1)}
        for i in (0, 1):
            lo = np.sort(mine[mine[:, 0] == i][:, 1])
            ranges[i] = int(1 + np.count_nonzero(np.diff(lo) != 100))
        assert t["cold_calls"][k] == pytest.approx(2 * ranges[0] * 1.0 + 2 * ranges[1] * 0.25)
        # 500 rows from each input at its raw X bytes per row (10 entries of 4 + 4 bytes, and the row
        # pointers' share), uncompressed: stored as they are
        per_row = (10_000 * 8 + 1001 * 8) / 1000
        assert t["cold_bytes"][k] == pytest.approx(500 * per_row * 1.0 + 500 * per_row * 0.25)
    extra = dataset_seconds(cold, cal) - dataset_seconds(warm, cal)
    assert extra == pytest.approx(t["cold_calls"] * 0.002 + t["cold_bytes"] / 1e5)
    assert cold.time.disk == pytest.approx(float(extra.sum()))
    assert cold.seconds - warm.seconds == pytest.approx(float(extra.sum()))
    assert warm.time.disk == 0.0
    # an input whose chunks the decoding threads read: its reads overlap them and each other, and cost only
    # what they take beyond the decoding of the same bytes
    from annbatch_nb.sources import _ZarrChunks

    (z,) = _one_input()
    z = dataclasses.replace(
        z, path="/x/c.zarr", format="zarr", x_direct=True, x_chunk=1000, x_compression="zstd"
    )
    z.size_bytes = z.raw_x_bytes // 2  # stored at half size
    zp = build_plan([z], params, cal, uncached=np.array([1.0]))
    zt = _dataset_table(zp)
    assert zt["cold_calls"].sum() == zt["cold_bytes"].sum() == 0.0
    disk = zt["cold_direct_calls"] * 0.002 / _ZarrChunks.n_threads() + zt["cold_direct_bytes"] / 1e5
    work = zt["cold_direct_work_zarr"] / cal.per_format("decode_bytes_per_s", "zarr")
    assert np.all(disk > work)
    assert zp.time.disk == pytest.approx(float((disk - work).sum()))
    # ... and nothing where the decoding takes longer
    slow_decode = dataclasses.replace(cal, decode_bytes_per_s={"zarr": 1.0})
    assert build_plan([z], params, slow_decode, uncached=np.array([1.0])).time.disk == 0.0
    # a sweep over a plan keeps its inputs' cache state
    table = sweep(cold, shuffle_chunk_size=[100], dataset_size=[1000])
    assert table["seconds"].iloc[0] == pytest.approx(cold.seconds)


def test_tiny_run_costs() -> None:
    from annbatch_nb.predict import _tiny_run_costs

    # 0.30 s run of two datasets, 0.12 s and 0.10 s: 0.08 s besides them, the first 0.02 s more
    assert _tiny_run_costs(0.30, [0.12, 0.10]) == pytest.approx({"run_s": 0.08, "first_dataset_s": 0.02})
    assert _tiny_run_costs(0.20, [0.09, 0.12]) == pytest.approx({"run_s": 0.0, "first_dataset_s": 0.0})
    assert _tiny_run_costs(0.30, [0.1]) == {}  # not the two-dataset run: keep the reference values


def test_read_calls_count_ranges_times_arrays() -> None:
    from annbatch_nb.sources import ColumnSpec

    (info,) = _one_input(n=10_000)
    info.obs_columns = {
        "cell_type": ColumnSpec("categorical", "<U1", ("a", "b")),  # codes: one array
        "n_genes": ColumnSpec("nullable-integer", "<i8"),  # values and mask: two
    }
    # runs of 1000 rows, one per dataset: one range each, of 2 + 1 + 2 arrays
    p = build_plan([info], Parameters.validated(shuffle_chunk_size=1000, dataset_size=1000, seed=0), CAL)
    assert p.n_datasets == 10
    assert p.time.calls == pytest.approx(10 * 5 * 0.001)


def test_obs_read_calls_of_nearby_ranges_merge_as_the_engine_reads_them() -> None:
    from annbatch_nb.predict import _range_calls
    from annbatch_nb.sources import OBS_SPAN_BYTES, ColumnSpec

    (h5ad,) = _one_input(n=100_000)
    h5ad.obs_columns = {
        "cell_type": ColumnSpec("categorical", "<U1", ("a", "b")),  # int8 codes
        "n_genes": ColumnSpec("nullable-integer", "<i8"),  # int64 values, bool mask
        "label": ColumnSpec("string", "<U5"),  # decoded one by one: per range
    }
    zarr = dataclasses.replace(h5ad, path="/x/b.zarr", format="zarr")
    wide = OBS_SPAN_BYTES // 8  # rows an int64 read passes through; one-byte arrays pass eight times more
    lo = np.array([0, 200, 300 + wide, 400 + 3 * wide, 0])
    hi = lo + 100
    first = np.array([True, False, False, False, True])  # the last range starts another dataset's input
    calls = _range_calls([h5ad, zarr], np.array([0, 0, 0, 0, 1]), lo, hi, first)
    # X data and indices per range; codes and mask: a new read where the gap exceeds 8 * wide (never here);
    # values: where it exceeds wide (the fourth range); strings per range
    assert calls.tolist() == [
        2 + 1 + 1 + 1 + 1,
        2 + 0 + 0 + 0 + 1,
        2 + 0 + 0 + 0 + 1,
        2 + 0 + 1 + 0 + 1,
        2 + 4,
    ]
    # a plan counts them the same way: 100-row runs, one per dataset, each its own first range
    p = build_plan([h5ad], Parameters.validated(shuffle_chunk_size=100, dataset_size=100, seed=0), CAL)
    assert p.time.calls == pytest.approx(p.n_datasets * (2 + 4) * 0.001)


def test_more_datasets_cost_more_fixed_time() -> None:
    infos = _one_input(n=10_000)
    one = build_plan(infos, Parameters.validated(shuffle_chunk_size=100, dataset_size=10_000, seed=0), CAL)
    ten = build_plan(infos, Parameters.validated(shuffle_chunk_size=100, dataset_size=1000, seed=0), CAL)
    assert ten.time.calls > one.time.calls
    # nine more datasets, each reading the one input; first touch is of a tenth of the buffers
    touch_saved = (100_000 - 10_000) * 16 / 1e7
    assert ten.time.overhead - one.time.overhead == pytest.approx(9 * (0.5 + 0.1) - touch_saved)
    assert ten.memory.process_bytes < one.memory.process_bytes  # per process: a tenth of the buffers


def test_workers_time_and_memory_by_hand(monkeypatch: pytest.MonkeyPatch) -> None:
    import psutil

    from annbatch_nb.engine import resolve_workers

    class VM:
        total = 10**12

    monkeypatch.setattr(psutil, "virtual_memory", lambda: VM)
    monkeypatch.setattr("os.cpu_count", lambda: 4)
    monkeypatch.setenv("ANNBATCH_NB_THREADS", "1")  # one encoding thread per process: a process per CPU
    infos = _one_input(n=10_000)
    # runs of 1000 rows, one per dataset: ten equal datasets of 1000 rows, 10,000 entries
    p = build_plan(infos, Parameters.validated(shuffle_chunk_size=1000, dataset_size=1000, seed=0), CAL)
    per_dataset = 0.5 + 0.1 + 1000 / 1000 + 1000 * 88.0008 / 1e6 + 2 * 0.001
    # open, row pointers, first touch beyond the quick 40,000 bytes (per process)
    fixed = 0.01 + 10_001 * 8 / 1e6 + (10_000 * 16 - 40_000) / 1e7 + 0.01  # and one-time costs
    serial = 0.2 + fixed + 10 * per_dataset
    assert serial > 4  # long enough for worker processes
    t = p.time
    assert t.serial_seconds == pytest.approx(serial)
    assert t.workers == resolve_workers("auto", p, p.n_datasets) == 4  # the engine's choice is the planner's
    # the parent opens the input, starts the forkserver; each worker opens and touches its own; ten datasets
    # at 80 % speed over four workers finish in three rounds
    assert t.seconds == pytest.approx(0.2 + 0.01 + 2.0 + fixed + 3 * per_dataset / 0.8)
    m = p.memory
    assert m.workers == 4
    assert m.process_bytes == 230_000_000 + m.run_bytes + m.dataset_bytes
    others = 3 * (230_000_000 + m.run_bytes + 0.6 * m.dataset_bytes)  # at 60 % of their dataset's buffers
    assert m.peak_bytes == int(2 * 200_000_000 + m.run_bytes + m.process_bytes + others)
    single = abn.predict.predict_time(p, CAL, workers=1)
    assert single.seconds == pytest.approx(serial) and single.workers == 1
    assert abn.predict.predict_memory(p, CAL, workers=1).peak_bytes == m.process_bytes


def test_workers_with_fewer_threads_take_longer_per_dataset(monkeypatch: pytest.MonkeyPatch) -> None:
    from annbatch_nb.predict import _process_fixed_seconds, dataset_seconds, predict_time, worker_slowdown

    monkeypatch.delenv("ANNBATCH_NB_THREADS", raising=False)
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    # one thread each where one process had two
    assert worker_slowdown(1) == 1.0 and worker_slowdown(2) == 2.0
    monkeypatch.setattr("os.cpu_count", lambda: 16)
    assert worker_slowdown(4) == 1.0  # four threads each, as many as one process uses (at most four)
    assert worker_slowdown(8) == 2.0
    monkeypatch.setenv("ANNBATCH_NB_THREADS", "2")  # the user's setting, for one process and each worker
    assert worker_slowdown(8) == 1.0
    monkeypatch.delenv("ANNBATCH_NB_THREADS")
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    p = build_plan(
        _one_input(n=10_000), Parameters.validated(shuffle_chunk_size=1000, dataset_size=1000, seed=0), CAL
    )
    per_ds = dataset_seconds(p, CAL)
    assert len(per_ds) == 10 and np.allclose(per_ds, per_ds[0])
    # two workers on two CPUs, one thread each: five rounds of two datasets, each taking twice as long (and
    # at 80 % speed), after the parent's run and open, the forkserver's start and a worker's own fixed costs
    two = predict_time(p, CAL, workers=2)
    assert two.seconds == pytest.approx(
        0.2 + 0.01 + 2.0 + _process_fixed_seconds(p, CAL) + 5 * per_ds[0] * 2 / 0.8
    )
    assert two.seconds > predict_time(p, CAL, workers=1).seconds


def test_fit_recovers_the_costs_that_made_the_trials() -> None:
    from annbatch_nb.predict import _call_seconds, _fit_costs, _Trial

    per_byte, call_s, dataset_s, per_input, decode_rate = 1e-8, 2e-4, 0.15, 0.03, 5e8
    trials = [
        _Trial(
            seconds=b * per_byte + c * call_s + dataset_s + i * per_input + r / 1e6 + d / decode_rate,
            rows=r,
            bytes=b,
            calls=c,
            inputs=i,
            decoded=d,
        )
        for b, c, i, r, d in [(5e7, 150, 4, 18_000, 1e8), (1e5, 20, 4, 40, 0.0), (3e4, 5, 1, 10, 5e6)]
    ]
    # the call and decode costs are measured apart: the rest is solved exactly
    fit = _fit_costs(trials, 1e6, call_s, decode_rate)
    assert fit == pytest.approx((per_byte, dataset_s, per_input), rel=1e-9)
    # a read call: one-row reads whose bytes and decoded chunks are priced at the given rates
    probe = _Trial(
        seconds=4000 * 2e-5 + 2e6 / 4e8 + 3e7 / decode_rate,
        rows=2000,
        bytes=2e6,
        calls=4000,
        inputs=1,
        decoded=3e7,
    )
    assert _call_seconds(probe, 4e8, decode_rate) == pytest.approx(2e-5, rel=1e-9)
    assert _call_seconds(probe, 1e3, decode_rate) == 0.0  # never negative


def test_busy_seconds_is_the_smaller_of_wall_and_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    from annbatch_nb import predict

    monkeypatch.setattr(predict, "_clock", lambda: (10.0, 4.0))
    assert predict._busy_seconds((7.0, 2.5)) == 1.5  # loaded machine: cpu 1.5 s in 3 s of wall
    assert predict._busy_seconds((9.0, 1.0)) == 1.0  # waiting for I/O: wall 1 s, cpu 3 s on threads
    assert predict.peak_rss_bytes() > 10_000_000


def test_an_old_cache_layout_gives_the_defaults() -> None:
    old = {
        "read_bytes_per_s": {"h5ad": 1.0},
        "read_call_s": 6e-5,
        "dataset_overhead_s": 0.3,
        "source": "measured",
    }
    cal = Calibration.from_dict(old)
    assert cal.read_call_s == Calibration().read_call_s  # a float where a per-format table is expected
    assert cal.source == "measured"


def test_auto_dataset_size_fits_the_memory_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    import psutil

    class VM:
        total = 800_000_000

    monkeypatch.setattr(psutil, "virtual_memory", lambda: VM)
    infos = _one_input(n=500_000, nnz_per_row=20, genes=2000)
    p = build_plan(infos, Parameters.validated(shuffle_chunk_size=1000, seed=0, memory_fraction=0.5), CAL)
    assert 1000 <= p.dataset_rows < 500_000 and p.n_datasets > 1
    assert p.peak_memory_bytes <= 4e8
    r = p.dataset_rows  # one dataset of r rows fits, one of 1.3 r rows does not
    fits = build_plan(
        _one_input(n=r, nnz_per_row=20, genes=2000), Parameters.validated(dataset_size=r, seed=0), CAL
    )
    big = int(r * 1.3)
    over = build_plan(
        _one_input(n=big, nnz_per_row=20, genes=2000), Parameters.validated(dataset_size=big, seed=0), CAL
    )
    assert fits.n_datasets == over.n_datasets == 1
    assert fits.peak_memory_bytes <= 4e8 < over.peak_memory_bytes
    with pytest.raises(abn.ParameterError, match="memory_fraction"):
        build_plan(infos, Parameters.validated(shuffle_chunk_size=1000, seed=0, memory_fraction=0.01), CAL)


def test_sweep_grid_and_skipped_combinations() -> None:
    infos = _one_input(n=20_000)
    df = sweep(
        infos, shuffle_chunk_size=[100, 1000, 5000], dataset_size=[2000, 10_000], seed=0, calibration=CAL
    )
    assert len(df) == 5  # 5000 > 2000 is not a valid combination
    assert {"peak_memory_bytes", "seconds", "output_bytes", "quality", "n_datasets"} <= set(df.columns)
    small = df[(df.dataset_size == 2000)].set_index("shuffle_chunk_size")
    assert small.loc[100, "quality"] > small.loc[1000, "quality"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    return [str(p) for p in make_demo_data(tmp_path_factory.mktemp("predict"), scale=0.1)]


def test_calibration_is_measured_cached_and_used(demo: list[str], tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("ANNBATCH_NB_CACHE", str(tmp_path / "cache"))
    infos = abn.scan(demo)
    assert cached_calibration(infos) is None
    cal = calibrate(demo, budget_s=1.0)
    assert cal.source == "measured"
    assert set(cal.x_bytes_per_s) >= {"h5ad", "zarr"}
    assert all(v > 0 for v in cal.x_bytes_per_s.values())
    assert all(v >= 0 for v in cal.read_call_s.values()) and cal.dataset_s >= 0
    assert 0 < cal.compression_ratio < 1.5 and cal.fault_bytes_per_s > 0
    assert 50e6 < cal.import_rss_bytes <= cal.baseline_rss_bytes < 2e9
    assert cached_calibration(infos) == cal
    assert list((tmp_path / "cache").glob("machine-*.json"))  # the fresh process's numbers, kept per machine
    assert abn.plan(demo, seed=0).calibration == cal  # picked up from the cache


def test_a_failed_calibration_leaves_no_process_behind(
    demo: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from annbatch_nb import predict

    monkeypatch.setenv("ANNBATCH_NB_CACHE", str(tmp_path / "cache"))
    # this machine's times cached: the fresh process only measures memory, and runs on during the second pass
    predict._machine_cache_path().parent.mkdir(parents=True)
    predict._machine_cache_path().write_text(json.dumps(dict.fromkeys(predict._MACHINE_KEYS, 1.0)))
    started = []
    start = predict._start_child
    monkeypatch.setattr(predict, "_start_child", lambda *a: started.append(start(*a)) or started[-1])
    run = predict._Sampler.run

    def fails_in_the_second_pass(self, plan, **kwargs):
        if self.n >= 3:
            raise RuntimeError("disk full")
        return run(self, plan, **kwargs)

    monkeypatch.setattr(predict._Sampler, "run", fails_in_the_second_pass)
    with pytest.raises(RuntimeError, match="disk full"):
        calibrate(demo, budget_s=60.0)  # a budget that the first pass cannot overrun: a second pass
    proc = started[0][0]
    assert proc.poll() is not None  # killed and reaped, not left running


def test_a_calibration_waiting_for_its_fresh_process_writes_more_samples(
    demo: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from annbatch_nb import predict

    infos = [i for i in abn.scan(demo) if predict.rate_key(i) == "h5ad"]
    runs: dict[int, list[float]] = {}
    run = predict._Sampler.run

    def counted(self, plan, **kwargs):
        trial = run(self, plan, **kwargs)
        runs.setdefault(plan.dataset_rows, []).append(trial.seconds)
        return trial

    fitted = []
    fit = predict._fit_costs
    monkeypatch.setattr(predict._Sampler, "run", counted)
    monkeypatch.setattr(predict, "_fit_costs", lambda trials, *a: fitted.append(trials) or fit(trials, *a))
    asked: list[float] = []

    def more(seconds: float) -> bool:  # room for two more rounds
        asked.append(seconds)
        return len(asked) <= 2

    step = predict._calibrate_format(infos, tmp_path, 60.0, predict.DEFAULT_CALIBRATION, more)
    next(step)
    with pytest.raises(StopIteration):
        next(step)
    large = max(runs)
    assert len(runs[large]) == 4 and len(asked) == 3 and all(s > 0 for s in asked)
    # the large sample kept is the lower median of its four writes; the small ones' means take the extras
    assert fitted[0][0].seconds == sorted(runs[large])[1]
    many, one = sorted(runs)[1], sorted(runs)[0]  # ten rows from each input, ten from one
    assert len(infos) > 1 and len(runs) == 3
    assert fitted[0][1].seconds == pytest.approx(np.mean(runs[many][1:]))  # the first pass's is not kept
    assert fitted[0][2].seconds == pytest.approx(np.mean(runs[one])) and len(runs[one]) >= 3


def test_cli_plan_json_has_predictions(demo: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", *demo, "--dataset-size", "600", "--shuffle-chunk-size", "50", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("n_obs", "n_datasets", "peak_memory_bytes", "seconds", "output_bytes", "quality"):
        assert key in out
    assert out["peak_memory_bytes"] > 0 and out["seconds"] > 0 and 0 <= out["quality"] <= 1


def test_zarr_reads_hold_their_largest_range() -> None:
    from annbatch_nb.predict import ZARR_READ_BYTES

    h5ad = _one_input()
    zarr = _one_input()
    zarr[0].format, zarr[0].reader = "zarr", "zarr"
    params = Parameters.validated(shuffle_chunk_size=100, dataset_size=1000, seed=0)
    a, b = build_plan(h5ad, params, CAL), build_plan(zarr, params, CAL)
    # ten runs of 100 rows coalesce into one range of 1000 rows: its data (float32) and int32 indices are
    # read into a new array, then copied into the buffer; h5py reads straight into the buffer. zarr's decode
    # buffers: at most half the input's raw X (data, indices, row pointers), here less than ZARR_READ_BYTES
    decode = (10_000 * 8 + 1001 * 8) / 2
    assert decode < ZARR_READ_BYTES
    assert b.memory.dataset_bytes - a.memory.dataset_bytes == int(1000 * 10 * (4 + 4) + decode)


def test_the_two_h5ad_read_paths_are_priced_apart() -> None:
    """An .h5ad read through a virtualizarr manifest is priced with its own rates, h5py with h5ad's."""
    import dataclasses

    from annbatch_nb.predict import predict_time, rate_key

    cal = dataclasses.replace(
        CAL,
        x_bytes_per_s={"h5ad": 1e6, "h5ad-virtual": 5e5, "zarr": 1e6},
        read_call_s={"h5ad": 0.001, "h5ad-virtual": 0.001, "zarr": 0.01},
        dataset_input_s={"h5ad": 0.1, "h5ad-virtual": 0.1, "zarr": 0.2},
        input_open_s={"h5ad": 0.01, "h5ad-virtual": 0.01, "zarr": 0.05},
    )
    params = Parameters.validated(shuffle_chunk_size=100, dataset_size=1000, seed=0)
    h5py_info = _one_input()
    virtual_info = [dataclasses.replace(h5py_info[0], reader="virtual")]
    assert [rate_key(i) for i in h5py_info + virtual_info] == ["h5ad", "h5ad-virtual"]
    t_h5py = predict_time(build_plan(h5py_info, params, cal), cal)
    t_virtual = predict_time(build_plan(virtual_info, params, cal), cal)
    # X bytes cost twice as much through the manifest here; every other part is the same
    assert t_virtual.x == pytest.approx(2 * t_h5py.x) and t_virtual.x > 0
    assert (t_virtual.calls, t_virtual.obs) == pytest.approx((t_h5py.calls, t_h5py.obs))


def test_direct_zarr_reads_hold_only_their_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the engine decodes a zarr input's chunks itself, no range temporary: a chunk pair per thread."""
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    h5ad = _one_input()
    direct = _one_input()
    direct[0].format, direct[0].reader, direct[0].x_direct, direct[0].x_chunk = "zarr", "zarr", True, 500
    params = Parameters.validated(shuffle_chunk_size=100, dataset_size=1000, seed=0)
    a, b = build_plan(h5ad, params, CAL), build_plan(direct, params, CAL)
    # two reading threads, each holding one compressed and one decoded chunk of 500 4-byte values
    assert b.memory.dataset_bytes - a.memory.dataset_bytes == 2 * 2 * 500 * 4


def test_scan_table_and_var_overlap_by_hand() -> None:
    infos = [_one_input(n=10, nnz_per_row=2, genes=4)[0] for _ in range(3)]
    genes = [["g0", "g1", "g2", "g3"], ["g1", "g2", "g4", "g5"], ["g2", "g1", "g6", "g7"]]
    for j, (info, names) in enumerate(zip(infos, genes, strict=True)):
        info.display, info.path = f"f{j}.h5ad", f"/x/f{j}.h5ad"
        info.var_names = pd.Index(names, dtype=object)
        info.x_chunk, info.x_compression = 64, "gzip"
    table = abn.scan_table(infos)
    assert list(table.index) == ["f0.h5ad", "f1.h5ad", "f2.h5ad"]
    assert table["genes_in_all"].tolist() == [2, 2, 2]  # g1, g2
    assert table["genes_only_here"].tolist() == [2, 2, 2]  # g0 g3 | g4 g5 | g6 g7
    assert table["union_share"].tolist() == pytest.approx([4 / 8] * 3)
    assert table["density"].tolist() == pytest.approx([0.5] * 3)  # 2 entries per row of 4 genes
    assert table["x_chunk"].tolist() == [64] * 3 and set(table["x_compression"]) == {"gzip"}
    overlap = abn.var_overlap(infos)
    assert (overlap.n_union, overlap.n_intersection) == (8, 2)
    assert overlap.shared.to_numpy().tolist() == [[4, 2, 2], [2, 4, 2], [2, 2, 4]]
    assert overlap.jaccard().loc["f0.h5ad", "f1.h5ad"] == pytest.approx(2 / 6)
    # inputs with the same gene list are counted once per input, not once per list
    twin = dataclasses.replace(infos[0], display="f0-twin.h5ad", path="/x/f0-twin.h5ad")
    four = abn.var_overlap([*infos, twin])
    assert (four.n_union, four.n_intersection) == (8, 2)
    assert four.shared.loc["f0-twin.h5ad"].tolist() == [4, 2, 2, 4]
    assert abn.scan_table([*infos, twin])["genes_only_here"].tolist() == [0, 2, 2, 0]  # g0, g3 now in two
    # the CLI's JSON carries both
    p = build_plan(infos, Parameters.validated(shuffle_chunk_size=5, dataset_size=10, seed=0), CAL)
    s = p.summary()
    assert s["var_overlap"] == {"n_union": 8, "n_intersection": 2}
    assert [r["genes_only_here"] for r in s["inputs"]] == [2, 2, 2]
    json.dumps(s)  # JSON-able


def test_decoding_whole_compressed_chunks_by_hand() -> None:
    """Runs that cover part of a compressed chunk decode all of it; a chunk shared by two ranges, once."""
    from annbatch_nb.predict import _extra_decoded_bytes

    (info,) = _one_input(n=1000, nnz_per_row=10)  # 80 bytes per row (float32 data + int32 indices)
    info.x_chunk, info.x_compression = 1000, "zstd"  # 100 rows per chunk
    ds, inp = np.array([0, 0, 0, 1]), np.array([0, 0, 0, 0])
    lo, hi = np.array([0, 60, 250, 0]), np.array([50, 120, 260, 1000])
    # dataset 0 decodes chunks 0, 1 (0 already, for the first range) and 2: 300 rows for the 120 it keeps;
    # dataset 1 keeps every row it decodes
    extra = _extra_decoded_bytes([info], ds, inp, lo, hi)
    assert extra.tolist() == [50 * 80, 40 * 80, 90 * 80, 0]
    assert extra[:3].sum() == (300 - 120) * 80
    info.x_compression = "none"  # stored uncompressed: read exactly
    assert _extra_decoded_bytes([info], ds, inp, lo, hi).tolist() == [0, 0, 0, 0]
    # in the time model: per byte at the decode rate, per format
    info.x_compression = "zstd"
    cal = Calibration(**{**CAL.to_dict(), "decode_bytes_per_s": {"h5ad": 1e5, "zarr": 1e6}})
    p = build_plan([info], Parameters.validated(shuffle_chunk_size=50, dataset_size=1000, seed=0), cal)
    assert p.n_datasets == 1 and p.time.decode == 0  # one dataset reads the whole input: nothing wasted
    p = build_plan([info], Parameters.validated(shuffle_chunk_size=50, dataset_size=100, seed=0), cal)
    table = abn.predict._dataset_table(p)
    assert table["decode_h5ad"].sum() > 0
    assert p.time.decode == pytest.approx(table["decode_h5ad"].sum() / 1e5)
    assert p.time.serial_seconds == pytest.approx(
        p.time.x + p.time.calls + p.time.obs + p.time.decode + p.time.overhead
    )


def test_the_fresh_process_plans_enough_cells_from_a_spread_of_inputs() -> None:
    import dataclasses

    from annbatch_nb.predict import _CELL_SAMPLE, _CELL_SAMPLE_ROWS, _cell_sample

    one = _one_input(n=10)[0]
    many = [dataclasses.replace(one, path=f"/x/{j}.h5ad", n_obs=90_000) for j in range(8)]
    # 90,000 cells each: the third brings the sample to 200,000 cells
    assert _CELL_SAMPLE_ROWS == 200_000
    assert [i.path for i in _cell_sample(many)] == ["/x/0.h5ad", "/x/1.h5ad", "/x/2.h5ad"]
    small = [dataclasses.replace(one, path=f"/x/{j}.h5ad", n_obs=100) for j in range(1000)]
    # 1,000 small inputs: every fifth, 200 of them (20,000 cells), all kept
    assert [i.path for i in _cell_sample(small)] == [f"/x/{j}.h5ad" for j in range(0, 1000, 5)]
    assert len(_cell_sample(small)) == _CELL_SAMPLE
    assert _cell_sample(many[:1]) == many[:1]


def test_the_fresh_process_can_be_lowered_to_the_lowest_priority() -> None:
    import subprocess
    import sys

    from annbatch_nb.predict import _lowest_priority

    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert _lowest_priority(proc.pid)
        assert os.getpriority(os.PRIO_PROCESS, proc.pid) == 19
    finally:
        proc.kill()
        proc.wait()
    assert not _lowest_priority(proc.pid)  # gone: nothing to lower, and no error


def test_first_touch_of_a_directly_decoded_input_is_shared_by_the_decoding_threads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from annbatch_nb.predict import _touch_seconds
    from annbatch_nb.sources import _ZarrChunks

    monkeypatch.setenv("ANNBATCH_NB_THREADS", "2")
    monkeypatch.setattr(_ZarrChunks, "n_threads", staticmethod(lambda: 4))
    (info,) = _one_input()
    direct = dataclasses.replace(info, path="/x/a.zarr", format="zarr", x_direct=True)
    params = Parameters.validated(shuffle_chunk_size=100, dataset_size=1000, seed=0)
    # read through one thread (h5py, preadv): the read buffer and one gather block, as in the time model
    # (the first 40,000 bytes come quick)
    assert _touch_seconds(build_plan([info], params, CAL), CAL) == pytest.approx(
        (10_000 * 8 + 10_000 * 8 - 40_000) / 1e7
    )
    # decoded by the engine on four threads, which copy into the read buffer side by side
    assert _touch_seconds(build_plan([direct], params, CAL), CAL) == pytest.approx(
        (10_000 * 8 / 4 + 10_000 * 8 - 40_000) / 1e7
    )
    # buffers within the quick allowance cost nothing to touch
    roomy = dataclasses.replace(CAL, quick_touch_bytes=10**6)
    assert _touch_seconds(build_plan([info], params, roomy), roomy) == 0.0


def test_first_touch_probe_keeps_the_slow_pieces(monkeypatch: pytest.MonkeyPatch) -> None:
    from annbatch_nb import predict

    def timed(seconds: list[float]) -> list[float]:
        left = list(seconds)
        monkeypatch.setattr(predict, "_busy_seconds", lambda start: left.pop(0))
        return left

    mib = 1 << 20
    # recently freed pages first (0.01 s per MiB piece), then the slow kind (0.1, 0.12, 0.1 s)
    left = timed([0.01] * 5 + [0.1, 0.12, 0.1])
    rate = predict._fault_rate(total=8 * mib, piece=mib, most=16 * mib, slow=50 * mib)
    assert rate == pytest.approx(mib / 0.1) and not left
    # every piece quick: more are touched, up to ``most``, and their rate is kept
    left = timed([0.01] * 16 + [1.0])
    assert predict._fault_rate(total=8 * mib, piece=mib, most=16 * mib, slow=50 * mib) == pytest.approx(
        mib / 0.01
    )
    assert left == [1.0]


def test_a_calibration_of_a_missing_input_leaves_no_process_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from annbatch_nb import predict

    monkeypatch.setenv("ANNBATCH_NB_CACHE", str(tmp_path / "cache"))
    predict._machine_cache_path().parent.mkdir(parents=True)  # no fault probe: straight to the scan
    predict._machine_cache_path().write_text(json.dumps(dict.fromkeys(predict._MACHINE_KEYS, 1.0)))
    started = []
    start = predict._start_child
    monkeypatch.setattr(predict, "_start_child", lambda *a: started.append(start(*a)) or started[-1])
    with pytest.raises(Exception, match=r"missing\.h5ad"):
        calibrate([str(tmp_path / "missing.h5ad")])
    assert started[0][0].poll() is not None  # started before the scan, killed and reaped when it failed

"""The planner's predictions: exact arithmetic of the memory, time and size models on a hand-checked case,
dataset_size="auto", sweeps, calibration and its cache, and the CLI's JSON."""

from __future__ import annotations

import json
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
    read_bytes_per_s={"h5ad": 1e6, "zarr": 1e6},
    read_call_s=0.001,
    gather_elems_per_s=1e6,
    compress_bytes_per_s=1e6,
    compression_ratio=0.5,
    write_bytes_per_s=1e6,
    dataset_overhead_s=0.5,
    obs_rows_per_s=1000,
    baseline_rss_bytes=230_000_000,
)


def test_memory_model_by_hand() -> None:
    p = build_plan(_one_input(), Parameters.validated(shuffle_chunk_size=100, dataset_size=1000, seed=0), CAL)
    assert p.n_datasets == 1 and p.index_dtype == np.uint8
    buffer = 10_000 * (4 + 4) + 1001 * 4  # data (float32) + int32 column numbers + int32 row pointers
    scratch = (10_000 + 2 * 10) * (4 + 4)  # the touched part of the gather block, plus two rows
    shard = 10_000 * (4 + 1) * 0.5 * 1.5  # one compressed shard (the whole dataset here), joined once
    obs = 1000 * 8 * 3 + 1000 * 8  # src_path codes, three copies; the names
    pointers = 1000 * 8 * 5  # counts, row nnz, permutation, output nnz, output indptr
    names = 1000 * (2 * 8 + 57 + 3.9)  # "0-0".."0-99": 3.9 characters on average
    indptr = 1001 * 8
    m = p.memory
    assert m.dataset_bytes == int(buffer + scratch + shard + obs + pointers)
    assert m.run_bytes == int(names + indptr)
    assert m.peak_bytes == 230_000_000 + m.run_bytes + m.dataset_bytes
    assert p.peak_memory_bytes == m.peak_bytes


def test_time_and_size_models_by_hand() -> None:
    p = build_plan(_one_input(), Parameters.validated(shuffle_chunk_size=100, dataset_size=1000, seed=0), CAL)
    t = p.time
    raw_in = 10_000 * 8 + 1001 * 8
    assert t.read == pytest.approx(raw_in / 1e6 + 1 * 2 * 0.001)  # the ten runs coalesce: one call per array
    assert t.gather == pytest.approx(10_000 / 1e6)
    assert t.compress == pytest.approx(10_000 * 5 / 1e6)
    assert t.write == pytest.approx(10_000 * 5 * 0.5 / 1e6)
    assert t.obs == pytest.approx(1000 / 1000)
    assert t.overhead == pytest.approx(0.5 + 0.2)
    assert p.seconds == pytest.approx(t.read + t.gather + t.compress + t.write + t.obs + t.overhead)
    assert p.output_bytes == int(10_000 * 5 * 0.5 + 1001 * 8 * 0.5 + 1000 * 8 * 0.5)


def test_more_datasets_cost_more_read_calls() -> None:
    infos = _one_input(n=10_000)
    one = build_plan(infos, Parameters.validated(shuffle_chunk_size=100, dataset_size=10_000, seed=0), CAL)
    ten = build_plan(infos, Parameters.validated(shuffle_chunk_size=100, dataset_size=1000, seed=0), CAL)
    assert ten.time.read > one.time.read
    assert ten.time.overhead == pytest.approx(10 * 0.5 + 0.2)
    assert ten.peak_memory_bytes < one.peak_memory_bytes


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
    cal = calibrate(demo)
    assert cal.source == "measured"
    assert set(cal.read_bytes_per_s) >= {"h5ad", "zarr"}
    assert all(v > 0 for v in cal.read_bytes_per_s.values())
    assert 0 < cal.compression_ratio < 1.5 and cal.compress_bytes_per_s > 0 and cal.write_bytes_per_s > 0
    assert cached_calibration(infos) == cal
    assert abn.plan(demo, seed=0).calibration == cal  # picked up from the cache


def test_cli_plan_json_has_predictions(demo: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", *demo, "--dataset-size", "600", "--shuffle-chunk-size", "50", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("n_obs", "n_datasets", "peak_memory_bytes", "seconds", "output_bytes", "quality"):
        assert key in out
    assert out["peak_memory_bytes"] > 0 and out["seconds"] > 0 and 0 <= out["quality"] <= 1

"""Shuffle quality: exact arithmetic on hand-checked cases, and balanced vs uniform assignment."""

from __future__ import annotations

import math

import numpy as np
import pytest

import annbatch_nb as abn
from annbatch_nb.plan import Parameters, build_plan
from annbatch_nb.quality import expected_distinct, shuffle_quality
from annbatch_nb.sources import SourceInfo


def test_expected_distinct_small_cases_by_hand() -> None:
    # two groups of two rows, draw two: P(same group) = 2 / C(4, 2) = 1/3 -> E = 1 * 1/3 + 2 * 2/3 = 5/3
    assert expected_distinct(np.array([2, 2]), 2) == pytest.approx(5 / 3)
    # one row drawn: always exactly one group
    assert expected_distinct(np.array([5, 1, 7]), 1) == pytest.approx(1.0)
    # drawing everything sees every group
    assert expected_distinct(np.array([3, 1, 4]), 8) == pytest.approx(3.0)
    # groups of 1, 2, 3 (n = 6), draw 3: sum_g 1 - C(6 - c, 3) / C(6, 3)
    want = sum(1 - math.comb(6 - c, 3) / math.comb(6, 3) for c in (1, 2, 3))
    assert expected_distinct(np.array([1, 2, 3]), 3) == pytest.approx(want)
    assert expected_distinct(np.array([0, 0]), 4) == 0.0


def _runs(spec: list[tuple[int, int, int]]) -> np.ndarray:
    return np.array(spec, dtype=np.int64)


def test_one_dataset_is_a_global_shuffle() -> None:
    runs = _runs([(0, 0, 10), (0, 10, 20), (1, 0, 10), (1, 10, 20)])
    q = shuffle_quality(runs, np.zeros(4, dtype=np.int64), 1, 2, block=4)
    assert q.score == pytest.approx(1.0)
    assert q.run_mixing == pytest.approx(1.0) and q.composition == pytest.approx(1.0)


def test_datasets_made_of_one_input_each_have_composition_one_half() -> None:
    runs = _runs([(0, 0, 10), (0, 10, 20), (1, 0, 10), (1, 10, 20)])
    q = shuffle_quality(runs, np.array([0, 0, 1, 1]), 2, 2, block=4)
    # global shares are 1/2, 1/2; each dataset is all one input: TV = 1/2
    np.testing.assert_allclose(q.dataset_tv, [0.5, 0.5])
    assert q.composition == pytest.approx(0.5)
    # each dataset holds two runs of ten: E[distinct runs in 4 of 20] = 2 * (1 - C(10, 4) / C(20, 4))
    e = 2 * (1 - math.comb(10, 4) / math.comb(20, 4))
    ideal = 4 * (1 - math.comb(30, 4) / math.comb(40, 4))
    assert q.expected_runs_per_block == pytest.approx(e)
    assert q.ideal_runs_per_block == pytest.approx(ideal)
    assert q.run_mixing == pytest.approx(e / ideal)
    assert q.score == pytest.approx(e / ideal * 0.5)
    np.testing.assert_allclose(q.share_min, [0, 0])
    np.testing.assert_allclose(q.share_max, [1, 1])


def _infos(sizes: list[int]) -> list[SourceInfo]:
    import pandas as pd

    genes = pd.Index([f"g{i}" for i in range(10)], dtype=object)
    return [
        SourceInfo(
            path=f"/x/{j}.h5ad",
            display=f"{j}.h5ad",
            format="h5ad",
            n_obs=n,
            n_vars=10,
            x_kind="csr",
            dtype=np.dtype(np.float32),
            nnz=n * 3,
            var_names=genes,
            obs_names=pd.Index([f"{j}-{i}" for i in range(n)], dtype=object),
        )
        for j, n in enumerate(sizes)
    ]


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_balanced_is_at_least_as_good_as_uniform_on_every_metric(seed: int) -> None:
    infos = _infos([20_000, 5_000, 12_000, 3_000, 8_000, 30_000, 7_000, 15_000])
    kw = {"shuffle_chunk_size": 200, "dataset_size": 10_000, "seed": seed}
    balanced = build_plan(infos, Parameters.validated(**kw, assignment="balanced"))
    uniform = build_plan(infos, Parameters.validated(**kw, assignment="uniform"))
    assert balanced.n_datasets == uniform.n_datasets
    qb, qu = balanced.quality, uniform.quality
    assert qb.composition >= qu.composition
    assert qb.file_mixing >= qu.file_mixing - 1e-9
    assert qb.run_mixing >= qu.run_mixing - 0.01
    assert qb.score >= qu.score
    # balanced: each input's share of every dataset stays within one run of its global share
    one_run = 200 / balanced.rows_per_dataset.min()
    assert np.all(qb.share_max - qb.share_global <= one_run + 1e-9)
    assert np.all(qb.share_global - qb.share_min <= one_run + 1e-9)
    # and datasets are equally sized to within one run
    assert balanced.rows_per_dataset.max() - balanced.rows_per_dataset.min() <= 200


def test_smaller_runs_and_larger_datasets_mix_better() -> None:
    infos = _infos([50_000] * 4)
    q = {
        (c, d): build_plan(
            infos, Parameters.validated(shuffle_chunk_size=c, dataset_size=d, seed=0)
        ).quality.score
        for c in (100, 1000)
        for d in (20_000, 100_000)
    }
    assert q[(100, 20_000)] > q[(1000, 20_000)]
    assert q[(1000, 100_000)] > q[(1000, 20_000)]


def test_plan_reports_quality_in_its_summary(tmp_path) -> None:
    from annbatch_nb.demo import make_demo_data

    paths = [str(p) for p in make_demo_data(tmp_path, scale=0.1)]
    p = abn.plan(paths, shuffle_chunk_size=50, dataset_size=500, seed=0)
    s = p.summary()
    assert 0 <= s["quality"] <= 1
    assert s["quality"] == pytest.approx(p.quality.score)
    assert len(s["quality_details"]["dataset_tv"]) == p.n_datasets

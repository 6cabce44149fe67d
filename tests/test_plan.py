"""The pure plan: parameters, joins, the run assignment, sizes and identity, from metadata alone (no I/O)."""

from __future__ import annotations

import json
import math
import pickle
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from conftest import GENES

import annbatch_nb as abn
from annbatch_nb.plan import make_unique
from annbatch_nb.sources import ColumnSpec, SourceInfo


def info(
    name: str,
    n_obs: int,
    genes=GENES[:50],
    *,
    x_kind: str = "csr",
    dtype=np.float32,
    nnz_per_row: int = 10,
    columns: dict[str, ColumnSpec] | None = None,
) -> SourceInfo:
    """Metadata of an imaginary input."""
    genes = pd.Index(list(genes), dtype=object)
    return SourceInfo(
        path=f"/data/{name}",
        display=name,
        format="h5ad",
        n_obs=n_obs,
        n_vars=len(genes),
        x_kind=x_kind,  # type: ignore[arg-type]
        dtype=np.dtype(dtype),
        nnz=n_obs * (nnz_per_row if x_kind == "csr" else len(genes)),
        var_names=genes,
        obs_names=pd.Index([f"{name}-{i}" for i in range(n_obs)], dtype=object),
        obs_columns=columns or {},
        size_bytes=1000,
        mtime=1.0,
    )


def params(**kwargs) -> abn.Parameters:
    return abn.Parameters.validated(**{"seed": 0, **kwargs})


# --------------------------------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------------------------------
def test_parameters_defaults_and_normalisation() -> None:
    p = abn.Parameters.validated(seed=1)
    assert (p.shuffle_chunk_size, p.n_obs_per_chunk, p.var_join, p.dtype) == (1000, 64, "outer", None)
    assert p.shard_size == 1_000_000_000
    assert params(dataset_size="300").dataset_size == 300  # digits are a row count
    assert params(dataset_size=" 2GB ").dataset_size == "2GB"
    assert params(dtype=np.float32).dtype == "float32"
    json.dumps(p.to_dict())


def test_seed_is_drawn_and_recorded() -> None:
    a, b = abn.Parameters.validated(), abn.Parameters.validated()
    assert isinstance(a.seed, int) and a.seed >= 0 and a.seed != b.seed
    assert abn.build_plan([info("a", 100)], a).params.seed == a.seed


# --------------------------------------------------------------------------------------------------
# Names
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "names",
    [
        ["a", "b", "c"],
        ["a", "a", "a", "b", "b"],
        ["a", "a-1", "a", "a"],  # a suffix that is already taken is skipped
        ["x-1", "x", "x", "x-1"],
    ],
)
def test_make_unique_matches_anndata(names: list[str]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        expected = ad.utils.make_index_unique(pd.Index(names, dtype=object))
    assert list(make_unique(pd.Index(names, dtype=object))) == list(expected)


# --------------------------------------------------------------------------------------------------
# Joins
# --------------------------------------------------------------------------------------------------
def test_var_outer_and_inner_join_and_maps() -> None:
    infos = [info("a", 10, GENES[:20]), info("b", 10, GENES[30:10:-1]), info("c", 10, GENES[5:25])]
    outer = abn.build_plan(infos, params())
    assert set(outer.var_names) == set(GENES[:31]) and outer.var_names.is_unique
    inner = abn.build_plan(infos, params(var_join="inner"))
    assert set(inner.var_names) == set(GENES[11:20])
    for p in (outer, inner):
        for i, vmap in zip(infos, p.var_maps, strict=True):
            kept = vmap >= 0
            assert list(p.var_names[vmap[kept]]) == list(i.var_names[kept])
            assert set(i.var_names[~kept]).isdisjoint(p.var_names)


@pytest.mark.parametrize(
    ("n_genes", "expected"),
    [(2, np.uint8), (256, np.uint8), (257, np.uint16), (65536, np.uint16), (65537, np.uint32)],
)
def test_index_dtype_is_the_smallest_that_fits(n_genes: int, expected) -> None:
    genes = [f"g{i}" for i in range(n_genes)]
    assert abn.build_plan([info("a", 10, genes)], params()).index_dtype == np.dtype(expected)


def test_x_kind_and_dtype() -> None:
    dense = info("a", 10, x_kind="dense", dtype=np.int16)
    sparse = info("b", 10, dtype=np.float32)
    assert (
        abn.build_plan([dense, dense.__class__(**{**dense.__dict__, "path": "/x"})], params()).x_kind
        == "dense"
    )
    mixed = abn.build_plan([dense, sparse], params())
    assert (mixed.x_kind, mixed.dtype) == ("csr", np.dtype(np.float32))
    assert abn.build_plan([dense, sparse], params(dtype="float64")).dtype == np.dtype(np.float64)


def cols(**specs: ColumnSpec) -> dict[str, ColumnSpec]:
    return specs


def test_obs_schema_unification() -> None:
    a = info(
        "a",
        10,
        columns=cols(
            ct=ColumnSpec("categorical", "|O", ("T", "B")),
            lvl=ColumnSpec("categorical", "|O", ("lo", "hi"), ordered=True),
            n=ColumnSpec("numeric", "<i8"),
            x=ColumnSpec("numeric", "<i4"),
            ok=ColumnSpec("bool", "bool"),
            s=ColumnSpec("string", "object"),
        ),
    )
    b = info(
        "b",
        10,
        columns=cols(
            ct=ColumnSpec("categorical", "|O", ("NK", "T")),
            lvl=ColumnSpec("categorical", "|O", ("lo", "hi"), ordered=True),
            x=ColumnSpec("numeric", "<f4"),
        ),
    )
    schema = abn.build_plan([a, b], params()).obs_schema
    assert list(schema) == ["ct", "lvl", "n", "x", "ok", "s", "src_path"]
    assert schema["ct"].kind == "categorical" and set(schema["ct"].categories) == {"T", "B", "NK"}
    assert schema["lvl"].ordered and schema["lvl"].categories == ("lo", "hi")
    assert schema["n"].kind == "nullable-integer"  # missing in b
    assert (schema["x"].kind, np.dtype(schema["x"].dtype)) == ("numeric", np.dtype(np.float64))
    assert schema["ok"].kind == "nullable-boolean"
    assert schema["s"].kind == "string"
    assert schema["src_path"].categories == ("a", "b")


def test_conflicting_obs_types_name_the_file() -> None:
    a = info("a", 10, columns=cols(batch=ColumnSpec("categorical", "|O", ("x",))))
    b = info("b", 10, columns=cols(batch=ColumnSpec("numeric", "<f8")))
    with pytest.raises(abn.InputError, match="'batch'") as e:
        abn.build_plan([a, b], params())
    assert e.value.path == "b"


# --------------------------------------------------------------------------------------------------
# The assignment
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("sizes", "chunk", "dataset_size"),
    [((100_000, 37_001, 5), 100, 7_000), ((999,), 1000, 1000), ((10, 10, 10), 1, 3), ((5_000,), 7, 100)],
)
def test_assignment_covers_every_row_once(sizes, chunk: int, dataset_size: int) -> None:
    infos = [info(f"f{i}", n) for i, n in enumerate(sizes)]
    p = abn.build_plan(infos, params(shuffle_chunk_size=chunk, dataset_size=dataset_size, seed=4))
    n = sum(sizes)
    assert p.n_obs == n and p.n_datasets == math.ceil(n / dataset_size)
    # runs: consecutive, at most `chunk` rows, never crossing an input
    lengths = p.runs[:, 2] - p.runs[:, 1]
    assert lengths.max() <= chunk and lengths.sum() == n
    assert p.rows_per_dataset.sum() == n
    assert p.rows_per_dataset.max() <= dataset_size + chunk
    assert p.rows_per_dataset.min() >= n / p.n_datasets - chunk
    seen = np.zeros(n, dtype=np.int64)
    for k in range(p.n_datasets):
        src, rows = p.dataset_source_rows(k)
        assert len(src) == p.rows_per_dataset[k]
        np.add.at(seen, p.input_offsets[src] + rows, 1)
        assert np.array_equal(np.sort(p.dataset_permutation(k)), np.arange(len(src)))
        runs = p.dataset_runs(k)
        assert np.all(np.diff(runs[:, 0] * n + runs[:, 1]) > 0), "runs are read in input order"
    assert np.all(seen == 1)


def test_dataset_size_in_bytes() -> None:
    # dense float32, 250 genes: 1,000 bytes of X per row plus ~1 byte of src_path codes
    p = abn.build_plan(
        [info("a", 10_000, GENES[:250], x_kind="dense")], params(dataset_size="100kB", shuffle_chunk_size=10)
    )
    assert p.dataset_rows == 100_000 // 1001
    assert p.n_datasets == math.ceil(10_000 / p.dataset_rows)
    # CSR: bytes follow the stored values per row
    sparse = [info("a", 10_000, GENES[:250], nnz_per_row=n) for n in (10, 40)]
    rows = [
        abn.build_plan([s], params(dataset_size="1MB", shuffle_chunk_size=10)).dataset_rows for s in sparse
    ]
    assert rows[0] > 3 * rows[1]


def test_chunk_equal_to_dataset_size_is_allowed() -> None:
    p = abn.build_plan([info("a", 1000)], params(shuffle_chunk_size=100, dataset_size=100))
    assert p.n_datasets == 10 and set(p.rows_per_dataset.tolist()) == {100}


def test_plan_is_deterministic_and_fingerprinted() -> None:
    infos = [info("a", 5000), info("b", 3000)]
    p1 = abn.build_plan(infos, params(shuffle_chunk_size=50, dataset_size=1000, seed=9))
    p2 = abn.build_plan(infos, params(shuffle_chunk_size=50, dataset_size=1000, seed=9))
    assert np.array_equal(p1.run_dataset, p2.run_dataset)
    assert all(
        np.array_equal(p1.dataset_permutation(k), p2.dataset_permutation(k)) for k in range(p1.n_datasets)
    )
    assert p1.fingerprint == p2.fingerprint
    changed = [
        abn.build_plan(infos, params(shuffle_chunk_size=50, dataset_size=1000, seed=10)),
        abn.build_plan(infos, params(shuffle_chunk_size=51, dataset_size=1000, seed=9)),
        abn.build_plan(infos[::-1], params(shuffle_chunk_size=50, dataset_size=1000, seed=9)),
        abn.build_plan(
            [infos[0], info("b", 3000, dtype=np.float64)],
            params(shuffle_chunk_size=50, dataset_size=1000, seed=9),
        ),
    ]
    assert len({p1.fingerprint, *(p.fingerprint for p in changed)}) == 1 + len(changed)
    touched = info("a", 5000)
    touched.mtime = 2.0
    assert abn.build_plan([touched, infos[1]], p1.params).fingerprint != p1.fingerprint


def test_plan_takes_scanned_inputs_without_scanning_again(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    plan_module = sys.modules["annbatch_nb.plan"]  # the package's ``plan`` is the function
    infos = [info("a", 5000), info("b", 3000)]

    def no_scan(*args, **kwargs):
        raise AssertionError("scanned again")

    monkeypatch.setattr(plan_module, "scan", no_scan)
    p = abn.plan(infos, shuffle_chunk_size=50, dataset_size=1000, seed=9, calibration=abn.Calibration())
    assert p.inputs == infos
    assert (
        p.fingerprint
        == abn.build_plan(infos, params(shuffle_chunk_size=50, dataset_size=1000, seed=9)).fingerprint
    )


def test_plan_pickles_and_describes_itself() -> None:
    p = abn.build_plan(
        [info("a", 5000), info("b", 3000, x_kind="dense")], params(shuffle_chunk_size=50, dataset_size=1000)
    )
    clone = pickle.loads(pickle.dumps(p))
    assert clone.fingerprint == p.fingerprint and np.array_equal(clone.run_dataset, p.run_dataset)
    summary = json.loads(json.dumps(p.summary()))
    assert summary["n_obs"] == 8000 and summary["n_datasets"] == p.n_datasets == 8
    assert sum(summary["rows_per_dataset"]) == 8000
    text = p.describe()
    assert "8,000 cells" in text and "\n" not in text

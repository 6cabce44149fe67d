"""End-to-end behaviour of the engine on small real inputs, checked against anndata's reading of them."""

from __future__ import annotations

import math
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import zarr
from conftest import (
    GENES,
    categorical,
    check_collection,
    dataset_keys,
    ints,
    make_adata,
    mixed_adatas,
    read_adata,
    read_collection,
    shuffle,
    tree_digest,
)

import annbatch_nb as abn


# --------------------------------------------------------------------------------------------------
# Every cell exactly once, X and obs equal
# --------------------------------------------------------------------------------------------------
def test_mixed_inputs_every_cell_once_and_equal(mixed) -> None:
    check = check_collection(mixed.output, mixed.inputs)
    assert sum(check.rows_per_dataset) == 600 + 500 + 400 + 300
    assert len(check.var_names) == 300  # union of genes 0..299
    # CSR + dense inputs -> CSR; float32 + int64 -> float64
    assert all(sp.issparse(d.X) for d in check.datasets)
    assert {d.X.dtype for d in check.datasets} == {np.dtype(np.float64)}
    assert mixed.result.n_datasets == len(check.datasets) == len(dataset_keys(mixed.output))
    # every input contributes to more than one dataset (it was shuffled, not copied)
    for i in range(len(mixed.inputs)):
        assert len(set(check.dataset[check.source == i])) > 1


def test_duplicate_cell_names_get_anndata_suffixes(mixed) -> None:
    names = pd.Index(np.concatenate([np.asarray(d.obs_names) for d in read_collection(mixed.output)]))
    assert names.is_unique
    # a.h5ad, b.zarr and d.h5ad all name their cells cell0, cell1, ...: first kept, then -1, -2
    assert {"cell0", "cell0-1", "cell0-2", "cell299-2", "cell499-1", "cell599"} <= set(names)
    assert "cell300-2" not in names  # d.h5ad has only 300 cells
    assert "ccell0" in names and "ccell0-1" not in names


def test_obs_columns_are_unified(mixed) -> None:
    datasets = read_collection(mixed.output)
    obs = pd.concat([d.obs for d in datasets])
    src = obs["src_path"].astype(str).map(lambda p: Path(p).name)

    # categoricals: union of categories, identical (and complete) in every dataset
    for col, expected in {"cell_type": {"T", "B", "NK", "mono", "DC"}, "batch": {"b1", "b2"}}.items():
        for d in datasets:
            assert isinstance(d.obs[col].dtype, pd.CategoricalDtype)
            assert set(d.obs[col].cat.categories) == expected
        assert len({tuple(d.obs[col].cat.categories) for d in datasets}) == 1
    assert obs["batch"][src != "b.zarr"].isna().all()
    assert obs["batch"][src == "b.zarr"].notna().all()

    # float column missing in c -> NaN there
    assert obs["score"].dtype == np.float64
    assert obs["score"][src == "c.zarr"].isna().all() and obs["score"][src != "c.zarr"].notna().all()

    # int column missing in b -> nullable integer, missing exactly there
    assert isinstance(obs["count"].dtype, pd.Int64Dtype)
    assert obs["count"][src == "b.zarr"].isna().all() and obs["count"][src != "b.zarr"].notna().all()

    # bool column missing in b -> nullable boolean
    assert isinstance(obs["flag"].dtype, pd.BooleanDtype)
    assert obs["flag"][src == "b.zarr"].isna().all()

    # unique strings stay strings; missing in c and d
    assert pd.api.types.is_string_dtype(obs["barcode"].dtype)
    assert not isinstance(obs["barcode"].dtype, pd.CategoricalDtype)
    assert obs["barcode"][src.isin(["c.zarr", "d.h5ad"])].isna().all()
    assert obs["barcode"][src.isin(["a.h5ad", "b.zarr"])].notna().all()

    # src_path: a categorical listing every input, in input order, in every dataset
    for d in datasets:
        assert list(d.obs["src_path"].cat.categories) == mixed.inputs


def test_categorical_obs_missing_in_some_files_is_nan(inputs, tmp_path: Path) -> None:
    a = inputs.add("a.h5ad", make_adata(200, GENES[:20], seed=1, obs={"tissue": categorical(["lung"])}))
    b = inputs.add("b.h5ad", make_adata(200, GENES[:20], seed=2, prefix="b"))
    shuffle([a, b], tmp_path / "out.zarr", shuffle_chunk_size=20, dataset_size=100)
    check = check_collection(tmp_path / "out.zarr", [a, b])
    obs = pd.concat([d.obs for d in check.datasets])
    assert obs["tissue"].isna().sum() == 200
    assert (obs["tissue"] == "lung").sum() == 200
    assert all(list(d.obs["tissue"].cat.categories) == ["lung"] for d in check.datasets)


def test_obs_with_missing_values_and_ordered_categories(inputs, tmp_path: Path) -> None:
    a = make_adata(
        150,
        GENES[:20],
        seed=1,
        obs={
            "n": lambda rng, n: pd.array(
                np.where(rng.random(n) < 0.3, None, rng.integers(0, 9, n)), dtype="Int64"
            ),
            "ok": lambda rng, n: pd.array(
                np.where(rng.random(n) < 0.3, None, rng.random(n) < 0.5), dtype="boolean"
            ),
            "level": lambda rng, n: pd.Categorical(
                np.where(rng.random(n) < 0.2, None, rng.choice(["lo", "hi"], n)),
                categories=["lo", "hi"],
                ordered=True,
            ),
            "ratio": lambda rng, n: rng.random(n).astype(np.float32),
        },
    )
    b = make_adata(
        150,
        GENES[:20],
        seed=2,
        prefix="b",
        obs={
            "n": ints,
            "ok": lambda rng, n: rng.random(n) < 0.5,
            "level": lambda rng, n: pd.Categorical(
                rng.choice(["lo", "hi"], n), categories=["lo", "hi"], ordered=True
            ),
            "ratio": lambda rng, n: rng.integers(0, 100, n).astype(np.int16),
        },
    )
    paths = [inputs.add("a.h5ad", a), inputs.add("b.zarr", b)]
    shuffle(paths, tmp_path / "out.zarr", shuffle_chunk_size=15, dataset_size=100)
    check = check_collection(tmp_path / "out.zarr", paths)
    obs = pd.concat([d.obs for d in check.datasets])
    assert isinstance(obs["n"].dtype, pd.Int64Dtype) and obs["n"].isna().sum() == a.obs["n"].isna().sum()
    assert isinstance(obs["ok"].dtype, pd.BooleanDtype) and obs["ok"].isna().sum() == a.obs["ok"].isna().sum()
    assert obs["level"].cat.ordered and list(obs["level"].cat.categories) == ["lo", "hi"]
    assert obs["level"].isna().sum() == a.obs["level"].isna().sum() > 0
    assert obs["ratio"].dtype == np.float32  # float32 + int16


# --------------------------------------------------------------------------------------------------
# var join
# --------------------------------------------------------------------------------------------------
def test_var_join_inner_keeps_shared_genes(inputs, tmp_path: Path) -> None:
    paths = [inputs.add(name, adata, fmt) for name, (adata, fmt) in mixed_adatas().items()]
    shuffle(paths, tmp_path / "out.zarr", var_join="inner", shuffle_chunk_size=50, dataset_size=400)
    check = check_collection(tmp_path / "out.zarr", paths, var_join="inner")
    assert set(check.var_names) == set(GENES[100:200])


def test_var_join_outer_fills_missing_genes_with_zeros(inputs, tmp_path: Path) -> None:
    a = inputs.add("a.h5ad", make_adata(150, GENES[:10], seed=1, density=1.0))
    b = inputs.add("b.zarr", make_adata(150, GENES[5:15][::-1], seed=2, density=1.0, prefix="b"))
    shuffle([a, b], tmp_path / "out.zarr", shuffle_chunk_size=10, dataset_size=100)
    check = check_collection(tmp_path / "out.zarr", [a, b])
    x = np.vstack([d.X.toarray() for d in check.datasets])
    from_a = check.source == 0
    only_b = check.var_names.isin(GENES[10:15])
    only_a = check.var_names.isin(GENES[:5])
    assert (x[np.ix_(from_a, only_b)] == 0).all() and (x[np.ix_(from_a, only_a)] > 0).all()
    assert (x[np.ix_(~from_a, only_a)] == 0).all() and (x[np.ix_(~from_a, only_b)] > 0).all()


def test_input_rows_stored_unsorted_come_out_sorted(inputs, tmp_path: Path) -> None:
    adata = make_adata(120, GENES[:30], seed=1, density=0.4)
    x = adata.X
    for r in range(x.shape[0]):  # reverse every row's entries: valid CSR, but not canonical
        lo, hi = x.indptr[r], x.indptr[r + 1]
        x.indices[lo:hi], x.data[lo:hi] = x.indices[lo:hi][::-1].copy(), x.data[lo:hi][::-1].copy()
    x.has_sorted_indices = False
    path = inputs.add("unsorted.h5ad", adata)
    assert not sp.csr_matrix(read_adata(path).X).has_sorted_indices
    shuffle([path], tmp_path / "out.zarr", shuffle_chunk_size=10, dataset_size=60)
    check_collection(tmp_path / "out.zarr", [path])  # asserts sorted rows and equal values


@pytest.mark.parametrize("index_dtype", [np.int64, np.int32], ids=["scipy-kernel", "numpy-fallback"])
def test_row_order_check(index_dtype) -> None:
    from annbatch_nb.engine import CSRBuffer, _rows_sorted

    indptr = np.array([0, 2, 2, 3, 5], dtype=np.int64)  # an empty row, and row ends that step down
    cases = {(0, 7, 5, 1, 2): True, (7, 0, 5, 1, 2): False, (0, 7, 5, 2, 1): False, (3, 3, 0, 0, 9): True}
    for indices, expected in cases.items():
        buf = CSRBuffer(np.ones(5), np.array(indices, dtype=index_dtype), indptr)
        assert _rows_sorted(buf) is expected, indices


@pytest.mark.parametrize("x", ["csr", "dense"])
def test_inputs_without_any_stored_value(inputs, tmp_path: Path, x: str) -> None:
    paths = [
        inputs.add("zeros.h5ad", make_adata(80, GENES[:10], seed=1, density=0.0, x=x)),
        inputs.add("sparse_zeros.zarr", make_adata(80, GENES[:10], seed=2, density=0.0, prefix="b")),
    ]
    shuffle(paths, tmp_path / "out.zarr", shuffle_chunk_size=10, dataset_size=60)
    check = check_collection(tmp_path / "out.zarr", paths)
    assert all(d.X.nnz == 0 for d in check.datasets)
    assert abn.validate(tmp_path / "out.zarr", inputs=paths).ok


# --------------------------------------------------------------------------------------------------
# src_path, dtypes and X kinds
# --------------------------------------------------------------------------------------------------
def test_src_path_is_recorded_as_given(inputs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a = inputs.add("a.h5ad", make_adata(100, GENES[:20], seed=1))
    b = inputs.add("b.zarr", make_adata(100, GENES[:20], seed=2, prefix="b"))
    monkeypatch.chdir(tmp_path)
    given = ["inputs/a.h5ad", b]  # one relative, one absolute
    shuffle(given, "out.zarr", shuffle_chunk_size=10, dataset_size=50)
    check = check_collection(tmp_path / "out.zarr", [a, b], displays=given)
    for d in check.datasets:
        assert list(d.obs["src_path"].cat.categories) == given


@pytest.mark.parametrize(
    ("dtypes", "override", "expected"),
    [
        ((np.float32, np.int64), None, np.float64),
        ((np.float32, np.float32), None, np.float32),
        ((np.int32, np.int64), None, np.int64),
        ((np.uint16, np.int8), None, np.int32),
        ((np.int64, np.float64), "float32", np.float32),
        ((np.float64, np.float64), "int32", np.int32),
        ((np.bool_, np.bool_), None, np.bool_),
    ],
)
def test_output_dtype(inputs, tmp_path: Path, dtypes, override, expected) -> None:
    paths = [
        inputs.add(f"in{i}.h5ad", make_adata(120, GENES[:30], seed=i, dtype=dt, prefix=f"f{i}_"))
        for i, dt in enumerate(dtypes)
    ]
    result = shuffle(paths, tmp_path / "out.zarr", shuffle_chunk_size=20, dataset_size=80, dtype=override)
    assert result.plan.dtype == np.dtype(expected)
    check = check_collection(tmp_path / "out.zarr", paths)  # values are small integers: exact in every dtype
    assert {d.X.dtype for d in check.datasets} == {np.dtype(expected)}


@pytest.mark.parametrize(
    ("kinds", "expected"),
    [(("dense", "dense"), "dense"), (("dense", "csr"), "csr"), (("csr", "csr"), "csr")],
)
def test_x_kind(inputs, tmp_path: Path, kinds, expected) -> None:
    paths = [
        inputs.add(f"in{i}.zarr", make_adata(150, GENES[i * 5 : 40 + i * 5], seed=i, x=kind, prefix=f"f{i}_"))
        for i, kind in enumerate(kinds)
    ]
    shuffle(paths, tmp_path / "out.zarr", shuffle_chunk_size=25, dataset_size=100)
    check = check_collection(tmp_path / "out.zarr", paths)
    root = zarr.open_group(str(tmp_path / "out.zarr"), mode="r")
    for key, d in zip(dataset_keys(tmp_path / "out.zarr"), check.datasets, strict=True):
        x = root[key]["X"]
        if expected == "dense":
            assert isinstance(d.X, np.ndarray) and isinstance(x, zarr.Array)
            assert x.attrs["encoding-type"] == "array"
        else:
            assert sp.issparse(d.X) and isinstance(x, zarr.Group)
            assert x.attrs["encoding-type"] == "csr_matrix"
            assert x["indices"].dtype == np.uint8  # 40 genes: the smallest unsigned type


# --------------------------------------------------------------------------------------------------
# Reproducibility
# --------------------------------------------------------------------------------------------------
def test_same_seed_gives_byte_identical_output(mixed, tmp_path: Path) -> None:
    again = tmp_path / "again.zarr"
    shuffle(mixed.inputs, again, **mixed.kwargs)
    first, second = tree_digest(mixed.output), tree_digest(again)
    assert first.keys() == second.keys()
    assert first == second


def test_different_seed_gives_different_assignment(mixed) -> None:
    kwargs = {k: v for k, v in mixed.kwargs.items() if k != "seed"}
    p1 = abn.plan(mixed.inputs, seed=mixed.kwargs["seed"], **kwargs)
    p2 = abn.plan(mixed.inputs, seed=mixed.kwargs["seed"] + 1, **kwargs)
    assert p1.fingerprint == mixed.result.plan.fingerprint != p2.fingerprint
    assert not np.array_equal(p1.run_dataset, p2.run_dataset)
    # not merely a different order within datasets: dataset_0 gets different cells
    rows1 = {(int(i), int(r)) for i, r in zip(*p1.dataset_source_rows(0), strict=True)}
    rows2 = {(int(i), int(r)) for i, r in zip(*p2.dataset_source_rows(0), strict=True)}
    assert rows1 != rows2
    # and the written output follows the plan: dataset_0 of the output holds p1's cells
    names = p1.obs_names[p1.input_offsets[p1.dataset_source_rows(0)[0]] + p1.dataset_source_rows(0)[1]]
    assert list(read_collection(mixed.output)[0].obs_names) == list(names)


# --------------------------------------------------------------------------------------------------
# Shuffling quality
# --------------------------------------------------------------------------------------------------
def test_shuffle_spreads_runs_and_mixes_rows(inputs, tmp_path: Path) -> None:
    chunk, size, n_per_input = 25, 400, 1000
    paths = [
        inputs.add("a.h5ad", make_adata(n_per_input, GENES[:16], seed=1, density=0.3)),
        inputs.add("b.zarr", make_adata(n_per_input, GENES[:16], seed=2, density=0.3, prefix="b")),
    ]
    shuffle(paths, tmp_path / "out.zarr", shuffle_chunk_size=chunk, dataset_size=size, seed=11)
    check = check_collection(tmp_path / "out.zarr", paths)
    n_runs = 2 * n_per_input // chunk  # 80 runs of 25 rows
    run_id = check.source * (n_per_input // chunk) + check.source_row // chunk
    dataset = check.dataset
    assert check.rows_per_dataset == [size] * 5

    # 1. a run is never split: all its rows land in one dataset, so each dataset holds 16 whole runs
    run_dataset = np.full(n_runs, -1)
    for r in range(n_runs):
        ds = np.unique(dataset[run_id == r])
        assert len(ds) == 1 and (run_id == r).sum() == chunk
        run_dataset[r] = ds[0]

    # 2. runs are spread at random over datasets. With 16 runs per dataset, two given runs share a dataset
    #    with probability (16 - 1) / (n_runs - 1), so about 15 of the n_runs - 1 neighbouring pairs (in input
    #    order) do; a contiguous, unshuffled assignment would give n_runs - 5 = 75.
    same = int((run_dataset[1:] == run_dataset[:-1]).sum())
    expected = (n_runs - 1) * (size // chunk - 1) / (n_runs - 1)
    assert abs(same - expected) <= 4 * math.sqrt(expected), (same, expected)
    for k in range(5):  # and every dataset mixes both inputs
        assert set(check.source[dataset == k]) == {0, 1}

    # 3. within a dataset, rows are fully permuted. For a random permutation of R rows made of runs of lengths
    #    l_i, an adjacent pair comes from the same run with probability sum l_i (l_i - 1) / (R (R - 1)), so
    #    the expected count over R - 1 pairs is sum l_i (l_i - 1) / R = 16 * 25 * 24 / 400 = 24 per dataset.
    #    Unpermuted runs would give R - 16 = 384.
    observed = expected_total = 0.0
    for k in range(5):
        runs_k = run_id[dataset == k]
        observed += int((runs_k[1:] == runs_k[:-1]).sum())
        lengths = np.unique(runs_k, return_counts=True)[1]
        expected_total += float((lengths * (lengths - 1)).sum()) / len(runs_k)
    assert expected_total == pytest.approx(5 * 24)
    assert abs(observed - expected_total) <= 4 * math.sqrt(expected_total), (observed, expected_total)


# --------------------------------------------------------------------------------------------------
# Dataset sizes
# --------------------------------------------------------------------------------------------------
def test_dataset_size_in_rows(inputs, tmp_path: Path) -> None:
    sizes = (700, 450, 333)
    paths = [
        inputs.add(f"in{i}.h5ad", make_adata(n, GENES[:20], seed=i, prefix=f"f{i}_"))
        for i, n in enumerate(sizes)
    ]
    chunk, size = 50, 200
    result = shuffle(paths, tmp_path / "out.zarr", shuffle_chunk_size=chunk, dataset_size=size)
    rows = check_collection(tmp_path / "out.zarr", paths).rows_per_dataset
    assert sum(rows) == sum(sizes)
    assert len(rows) == result.n_datasets >= math.ceil(sum(sizes) / (size + chunk))
    assert max(rows) <= size + chunk
    assert min(rows) >= size // 2  # no tiny leftover datasets
    assert result.plan.rows_per_dataset.tolist() == rows


@pytest.mark.parametrize("size", ["230kB", "460kB"])
def test_dataset_size_in_bytes_follows_bytes_per_row(inputs, tmp_path: Path, size: str) -> None:
    # dense float32 X with 250 genes: 1,000 bytes per row (+ about a byte of obs); "kB" is 1,000 bytes, so
    # "230kB" is ~230 rows per dataset: 2,000 cells make ceil(2000 / 230) = 9 datasets of ~222 rows
    n_genes, chunk, n_obs = 250, 20, 1000
    paths = [
        inputs.add(f"in{i}.zarr", make_adata(n_obs, GENES[:n_genes], seed=i, x="dense", prefix=f"f{i}_"))
        for i in range(2)
    ]
    shuffle(paths, tmp_path / "out.zarr", shuffle_chunk_size=chunk, dataset_size=size)
    rows = check_collection(tmp_path / "out.zarr", paths).rows_per_dataset
    target = int(size.removesuffix("kB")) * 1000 / (n_genes * 4)
    assert sum(rows) == 2 * n_obs
    assert len(rows) == math.ceil(2 * n_obs / target)
    assert all(2 * n_obs / len(rows) - chunk <= r <= target + chunk for r in rows), rows


def test_dataset_size_in_bytes_sparse(inputs, tmp_path: Path) -> None:
    # CSR float32 with ~30 stored values per row: between 4 bytes (data only) and 4 + 8 + 8/30 bytes per
    # stored value: a "60kB" dataset holds between 60000 / (30 * 12.3) ~ 163 and 60000 / (30 * 4) = 500 rows
    paths = [inputs.add("in.h5ad", make_adata(2000, GENES[:100], seed=3, density=0.3))]
    nnz_per_row = ad.read_h5ad(paths[0]).X.nnz / 2000
    shuffle(paths, tmp_path / "out.zarr", shuffle_chunk_size=10, dataset_size="60kB")
    rows = [d.n_obs for d in read_collection(tmp_path / "out.zarr")]
    low, high = 60_000 / (nnz_per_row * 12.3) - 10, 60_000 / (nnz_per_row * 4) + 10
    assert sum(rows) == 2000
    assert all(low <= r <= high for r in rows), (rows, low, high)


# --------------------------------------------------------------------------------------------------
# Input forms
# --------------------------------------------------------------------------------------------------
def test_directory_glob_and_list_order(inputs, tmp_path: Path) -> None:
    # names chosen so that sorted order differs from the order we give them in
    c = inputs.add("c.h5ad", make_adata(60, GENES[:10], seed=1, prefix="c"))
    a = inputs.add("a.zarr", make_adata(60, GENES[:10], seed=2, prefix="a"))
    b = inputs.add("b.h5ad", make_adata(60, GENES[:10], seed=3, prefix="b"))
    (inputs.directory / "notes.txt").write_text("ignored")
    kwargs = {"shuffle_chunk_size": 10, "dataset_size": 60}

    r_list = shuffle([c, a, b], tmp_path / "list.zarr", **kwargs)
    assert [i.path for i in r_list.plan.inputs] == [c, a, b]
    check_collection(tmp_path / "list.zarr", [c, a, b])

    directory = str(inputs.directory)
    r_dir = shuffle(directory, tmp_path / "dir.zarr", **kwargs)
    assert [i.path for i in r_dir.plan.inputs] == [a, b, c]
    displays = [f"{directory}/{Path(p).name}" for p in (a, b, c)]
    check_collection(tmp_path / "dir.zarr", [a, b, c], displays=displays)

    pattern = f"{directory}/*.h5ad"
    r_glob = shuffle([pattern, a], tmp_path / "glob.zarr", **kwargs)
    assert [i.path for i in r_glob.plan.inputs] == [b, c, a]
    check_collection(tmp_path / "glob.zarr", [b, c, a])


def test_string_column_stored_as_categorical_in_one_file_becomes_strings(inputs, tmp_path: Path) -> None:
    # anndata stores a string column as a categorical when its values repeat; the same column may therefore be
    # categorical in one file and plain strings in another
    genes = [f"g{i}" for i in range(12)]
    a = make_adata(40, genes, seed=1, obs={"barcode_group": pd.Categorical(["AA", "CC"] * 20)})
    b = make_adata(
        30, genes, seed=2, obs={"barcode_group": np.array([f"B{i}" for i in range(30)], dtype=object)}
    )
    paths = [inputs.add("a.h5ad", a), inputs.add("b.zarr", b)]
    out = tmp_path / "out.zarr"
    shuffle(paths, out, shuffle_chunk_size=10, dataset_size=35)
    got = pd.concat([d.obs for d in read_collection(out)])
    assert not isinstance(got["barcode_group"].dtype, pd.CategoricalDtype)
    expected = dict(zip([f"cell{i}" for i in range(40)], ["AA", "CC"] * 20, strict=True))
    expected |= {f"cell{i}-1" if i < 40 else f"cell{i}": f"B{i}" for i in range(30)}
    assert {k: str(v) for k, v in got["barcode_group"].items()} == expected
    assert abn.validate(out, inputs=paths).ok


def test_column_numbers_out_of_range_are_reported_with_the_file(inputs, tmp_path: Path) -> None:
    import h5py

    path = inputs.add("a.h5ad", make_adata(20, [f"g{i}" for i in range(8)], seed=3))
    broken = tmp_path / "broken.h5ad"
    broken.write_bytes(Path(path).read_bytes())
    with h5py.File(broken, "r+") as f:
        f["X/indices"][0] = 99
    with pytest.raises(abn.InputError, match=r"outside 0\.\.n_vars-1") as e:
        shuffle([str(broken)], tmp_path / "out.zarr", shuffle_chunk_size=5, dataset_size=10)
    assert e.value.path == str(broken)


def test_two_worker_processes_write_the_same_bytes_as_one(inputs, tmp_path: Path) -> None:
    genes = [f"g{i}" for i in range(40)]
    paths = [inputs.add(f"in{j}.h5ad", make_adata(300, genes, seed=j, prefix=f"c{j}-")) for j in range(3)]
    kw = {"shuffle_chunk_size": 20, "dataset_size": 200, "seed": 4}
    one = abn.plan(paths, **kw).run(tmp_path / "one.zarr", progress=False, workers=1)
    rows: list[int] = []
    two = abn.plan(paths, **kw).run(
        tmp_path / "two.zarr",
        progress=False,
        workers=2,
        on_progress=lambda w, n: rows.append(n) if w == "rows" else None,
    )
    assert (one.workers, two.workers) == (1, 2) and two.datasets_written == 5
    assert sum(rows) == 900  # progress crosses the process boundary
    assert tree_digest(tmp_path / "one.zarr") == tree_digest(tmp_path / "two.zarr")


def test_workers_must_be_positive(inputs, tmp_path: Path) -> None:
    path = inputs.add("a.h5ad", make_adata(50, ["g0", "g1"], seed=0))
    with pytest.raises(abn.ParameterError, match="workers"):
        abn.plan([path], shuffle_chunk_size=10, dataset_size=20, seed=0).run(tmp_path / "o.zarr", workers=0)
    assert not (tmp_path / "o.zarr").exists()


def test_reserved_buffers_are_the_ones_a_dataset_then_uses(mixed, tmp_path: Path) -> None:
    from annbatch_nb.collection import open_output, release_lock
    from annbatch_nb.engine import BufferPool, _close_all, _open_for_plan, reserve_buffers, write_dataset

    csr = [p for p in mixed.inputs if not p.endswith("c.zarr")]  # the sparse inputs (c.zarr is dense)
    p = abn.plan(csr, **mixed.kwargs)
    sources = _open_for_plan(p)
    try:
        pool = BufferPool()
        touched = reserve_buffers(p, 0, sources, pool)
        held = dict(pool._arrays)
        assert {"data", "indices", "indptr", "gather_data:0", "gather_indices:0"} <= held.keys()
        assert touched == sum(a.nbytes for a in held.values()) > 0
        assert all(not a.any() for a in held.values())  # every page written
        state = open_output(tmp_path / "out.zarr", p)
        try:
            write_dataset(p, 0, sources, state.root, pool=pool)
        finally:
            release_lock(state.lock)
    finally:
        _close_all(sources)
    assert all(pool._arrays[k] is a for k, a in held.items())  # none grown: the dataset used those

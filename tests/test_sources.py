"""Resolving what the user typed into inputs, and reading AnnData files (h5ad, zarr v3, zarr v2)."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from conftest import GENES, barcodes, bools, categorical, floats, ints, make_adata, read_adata

import annbatch_nb as abn
from annbatch_nb.sources import coalesce_runs, open_source, resolve_inputs

FORMATS = ["h5ad", "zarr3", "zarr2"]


def suffix(fmt: str) -> str:
    return ".h5ad" if fmt == "h5ad" else ".zarr"


# --------------------------------------------------------------------------------------------------
# Resolving inputs
# --------------------------------------------------------------------------------------------------
@pytest.fixture
def folder(inputs) -> Path:
    """inputs/ with b.h5ad, a.zarr, c.h5ad, plus files that are not inputs."""
    for name, seed in (("b.h5ad", 1), ("a.zarr", 2), ("c.h5ad", 3)):
        inputs.add(name, make_adata(10, GENES[:5], seed=seed))
    (inputs.directory / "notes.txt").write_text("not an input")
    (inputs.directory / ".hidden.h5ad").write_text("skipped: hidden")
    return inputs.directory


def test_list_order_is_kept(folder: Path) -> None:
    given = [str(folder / "c.h5ad"), str(folder / "a.zarr"), str(folder / "b.h5ad")]
    specs = resolve_inputs(given)
    assert [s.display for s in specs] == given
    assert [s.path for s in specs] == [str(Path(p).resolve()) for p in given]


def test_directory_expands_to_sorted_inputs(folder: Path) -> None:
    specs = resolve_inputs(str(folder))
    assert [Path(s.path).name for s in specs] == ["a.zarr", "b.h5ad", "c.h5ad"]
    assert [s.display for s in specs] == [
        os.path.join(str(folder), n) for n in ("a.zarr", "b.h5ad", "c.h5ad")
    ]


def test_glob_expands_sorted_and_mixes_with_paths(folder: Path) -> None:
    specs = resolve_inputs([str(folder / "a.zarr"), str(folder / "*.h5ad")])
    assert [Path(s.path).name for s in specs] == ["a.zarr", "b.h5ad", "c.h5ad"]


def test_relative_paths_stay_relative(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(folder.parent)
    specs = resolve_inputs(["inputs/b.h5ad", "inputs/*.zarr"])
    assert [s.display for s in specs] == ["inputs/b.h5ad", "inputs/a.zarr"]
    assert all(os.path.isabs(s.path) for s in specs)
    assert resolve_inputs("inputs")[0].display == os.path.join("inputs", "a.zarr")


def test_zarr_store_is_an_input_not_a_directory(folder: Path) -> None:
    specs = resolve_inputs(str(folder / "a.zarr"))
    assert len(specs) == 1 and specs[0].display == str(folder / "a.zarr")


def test_same_file_twice_is_refused_even_by_two_routes(folder: Path) -> None:
    with pytest.raises(abn.InputError, match="listed twice") as info:
        resolve_inputs([str(folder / "b.h5ad"), str(folder)])
    assert str(folder / "b.h5ad") in str(info.value)


# --------------------------------------------------------------------------------------------------
# Scanning metadata
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("x", ["csr", "dense"])
@pytest.mark.parametrize("index_dtype", [None, object], ids=["str-index", "object-index"])
def test_scan_reads_metadata(inputs, fmt: str, x: str, index_dtype) -> None:
    adata = make_adata(
        120,
        GENES[30:5:-1],
        seed=1,
        x=x,
        dtype=np.int32,
        index_dtype=index_dtype,
        obs={
            "ct": categorical(["z", "a", "m"]),
            "score": floats,
            "n": ints,
            "flag": bools,
            "barcode": barcodes,
            "nullable": lambda rng, n: pd.array(np.where(rng.random(n) < 0.3, None, 1), dtype="Int64"),
        },
    )
    path = inputs.add(f"in{suffix(fmt)}", adata, fmt)
    with open_source(path) as src:
        info = src.info
    assert info.format == ("h5ad" if fmt == "h5ad" else "zarr")
    assert (info.n_obs, info.n_vars, info.x_kind, info.dtype) == (120, 25, x, np.dtype(np.int32))
    assert info.nnz == (adata.X.nnz if x == "csr" else 120 * 25)
    assert list(info.var_names) == list(GENES[30:5:-1])
    assert list(info.obs_names) == [f"cell{i}" for i in range(120)]
    kinds = {name: spec.kind for name, spec in info.obs_columns.items()}
    assert kinds == {
        "ct": "categorical",
        "score": "numeric",
        "n": "numeric",
        "flag": "bool",
        "barcode": "string",
        "nullable": "nullable-integer",
    }
    assert info.obs_columns["ct"].categories == ("z", "a", "m")
    assert info.size_bytes > 0 and info.mtime > 0


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("x", ["csr", "dense"])
def test_reading_row_runs_matches_anndata(inputs, fmt: str, x: str) -> None:
    path = inputs.add(f"in{suffix(fmt)}", make_adata(200, GENES[:40], seed=2, x=x, dtype=np.float64), fmt)
    expected = read_adata(path).X
    expected = expected.toarray() if sp.issparse(expected) else expected
    runs = np.array([[0, 10], [10, 25], [40, 41], [100, 200]])  # the first two touch and are read as one
    rows = np.concatenate([np.arange(a, b) for a, b in runs])
    with open_source(path) as src:
        np.testing.assert_array_equal(src.read_dense(runs), expected[rows])
        if x == "csr":
            nnz = src.run_nnz(runs)
            data = np.empty(int(nnz.sum()), dtype=np.float32)  # values are cast to the buffer's dtype
            indices = np.empty(int(nnz.sum()), dtype=np.int64)
            assert src.read_csr_into(runs, data, indices) == nnz.sum()
            indptr = np.concatenate([[0], np.cumsum(np.diff(src.indptr)[rows])])
            got = sp.csr_matrix((data, indices, indptr), shape=(len(rows), 40))
            np.testing.assert_array_equal(got.toarray(), expected[rows])


def test_source_pickles_by_path(inputs) -> None:
    path = inputs.add("in.h5ad", make_adata(50, GENES[:10], seed=3))
    src = open_source(path)
    before = src.read_dense(np.array([[5, 9]]))
    clone = pickle.loads(pickle.dumps(src))
    src.close()
    np.testing.assert_array_equal(clone.read_dense(np.array([[5, 9]])), before)
    assert clone.info.n_obs == 50
    clone.close()


def test_scan_reads_no_x_data_and_writes_nothing(inputs) -> None:
    path = inputs.add("in.zarr", make_adata(100, GENES[:10], seed=4))
    infos = abn.scan([path])
    assert len(infos) == 1 and infos[0].n_obs == 100
    # the inputs fixture asserts the store is byte-identical afterwards


@pytest.mark.parametrize(
    ("runs", "expected"),
    [
        ([], np.zeros((0, 2))),
        ([[0, 5]], [[0, 5]]),
        ([[0, 5], [5, 7], [9, 10], [10, 12], [20, 21]], [[0, 7], [9, 12], [20, 21]]),
        ([[3, 4], [6, 7]], [[3, 4], [6, 7]]),
    ],
)
def test_coalesce_runs(runs, expected) -> None:
    np.testing.assert_array_equal(coalesce_runs(np.array(runs, dtype=np.int64)), np.array(expected))


def test_ranges_close_together_are_grouped_and_far_ones_are_not() -> None:
    from annbatch_nb.sources import _group_ranges

    ranges = [(0, 10), (15, 20), (100, 120), (121, 130)]
    assert _group_ranges(ranges, 5) == [[(0, 10), (15, 20)], [(100, 120), (121, 130)]]
    assert _group_ranges(ranges, 0) == [[r] for r in ranges]  # h5py: every range read apart
    assert _group_ranges(ranges, 1000) == [ranges]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("x", ["csr", "dense"])
def test_scan_reports_storage(inputs, fmt: str, x: str) -> None:
    """X's chunk length and compressor as stored, and whether the engine decodes its chunks itself."""
    import h5py
    import zarr

    path = inputs.add(f"in{suffix(fmt)}", make_adata(300, GENES[:40], seed=5, x=x), fmt)
    with open_source(path) as src:
        info = src.info
    if fmt == "h5ad":
        with h5py.File(path) as f:
            arr = f["X"] if x == "dense" else f["X"]["data"]
            assert info.x_chunk == (arr.chunks[0] if arr.chunks else 0)
            assert info.x_compression == (arr.compression or "none")
    else:
        g = zarr.open_group(path, mode="r")
        arr = g["X"] if x == "dense" else g["X"]["data"]
        assert info.x_chunk == arr.chunks[0] > 0
        expected = {"zarr3": "zstd", "zarr2": "blosc"}[fmt]  # zarr-python's defaults
        assert info.x_compression == expected
    # the engine's own chunk reader serves local zarr CSR X; h5py reads h5ad, zarr-python dense zarr X
    assert info.x_direct == (fmt != "h5ad" and x == "csr")


def test_scan_reports_hdf5_compression(inputs) -> None:
    adata = make_adata(300, GENES[:40], seed=6)
    path = inputs.directory / "gz.h5ad"
    adata.write_h5ad(path, compression="gzip")
    (info,) = abn.scan([str(path)])
    assert info.x_compression == "gzip" and info.x_chunk > 0 and not info.x_direct
    (virtual,) = abn.scan([str(path)], virtualize=True)  # read through a manifest: same storage facts
    assert (virtual.reader, virtual.x_compression, virtual.x_chunk) == ("virtual", "gzip", info.x_chunk)


def test_h5ad_obs_ranges_close_together_are_read_as_one_span(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import anndata as ad
    import h5py

    from annbatch_nb.sources import OBS_SPAN_BYTES, open_source

    n = 20_000
    rng = np.random.default_rng(0)
    obs = pd.DataFrame(
        {
            "kind": pd.Categorical(rng.choice(["a", "b", "c"], n)),
            "score": rng.normal(size=n),
            "count": pd.array(rng.integers(0, 9, n), dtype="Int64"),
            "label": [f"l{i}" for i in range(n)],
        },
        index=[f"c{i}" for i in range(n)],
    )
    path = tmp_path / "a.h5ad"
    ad.AnnData(X=np.zeros((n, 2), dtype=np.float32), obs=obs).write_h5ad(path)
    src = open_source(str(path))
    gap = OBS_SPAN_BYTES // 8  # float64 "score" and Int64 "count" values pass through at most this many rows
    runs = np.array([[0, 10], [20, 30], [30 + gap, 40 + gap], [60 + 3 * gap, 70 + 3 * gap]])
    calls: list[tuple[str, int, int]] = []
    getitem = h5py.Dataset.__getitem__

    def counted(self: h5py.Dataset, key: object) -> object:
        if isinstance(key, slice):
            calls.append((self.name, key.start, key.stop))
        return getitem(self, key)

    monkeypatch.setattr(h5py.Dataset, "__getitem__", counted)
    got = src.read_obs(runs)
    rows = np.concatenate([np.arange(a, b) for a, b in runs])
    np.testing.assert_array_equal(got["score"], obs["score"].to_numpy()[rows])
    codes, cats = got["kind"]
    assert list(pd.Categorical.from_codes(codes, categories=list(cats))) == list(obs["kind"].iloc[rows])
    values, mask = got["count"]
    np.testing.assert_array_equal(values[~mask.astype(bool)], obs["count"].to_numpy()[rows].astype(np.int64))
    labels = got["label"][0] if isinstance(got["label"], tuple) else got["label"]  # (values, mask) or array
    assert list(labels) == list(obs["label"].iloc[rows])
    reads = {name: [(a, b) for nm, a, b in calls if nm == name] for name in {c[0] for c in calls}}
    # float64 values: the first three ranges lie within the gap of each other, the fourth does not
    assert reads["/obs/score"] == [(0, 40 + gap), (60 + 3 * gap, 70 + 3 * gap)]
    assert reads["/obs/count/values"] == reads["/obs/score"]
    # one-byte codes and mask pass through eight times as many rows: one span
    assert reads["/obs/kind/codes"] == [(0, 70 + 3 * gap)]
    assert reads["/obs/count/mask"] == [(0, 70 + 3 * gap)]
    # strings are decoded one by one: read per range
    assert len(reads.get("/obs/label/values", reads.get("/obs/label", []))) == len(runs)

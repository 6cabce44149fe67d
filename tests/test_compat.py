"""annbatch's own Loader reads our collections and serves exactly the rows on disk, each once."""

from __future__ import annotations

from pathlib import Path

import annbatch
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import zarr
from conftest import GENES, categorical, check_collection, make_adata, read_collection, shuffle


def assert_loader_serves_collection(
    output: Path, *, batch_size: int, chunk_size: int, preload_nchunks: int
) -> int:
    """Iterate annbatch's shuffled Loader over ``output``; every batch must equal the reference rows."""
    datasets = read_collection(output)
    sparse = sp.issparse(datasets[0].X)
    ref = sp.vstack([d.X for d in datasets]).tocsr() if sparse else np.vstack([d.X for d in datasets])
    ref_obs = pd.concat([d.obs for d in datasets])

    coll = annbatch.DatasetCollection(str(output), mode="r")
    assert not coll.is_empty
    loader = annbatch.Loader(
        batch_size=batch_size,
        chunk_size=chunk_size,
        preload_nchunks=preload_nchunks,
        shuffle=True,
        return_index=True,
        rng=np.random.default_rng(0),
        preload_to_gpu=False,
    ).use_collection(coll)

    served = []
    for batch in loader:
        index = np.asarray(batch["index"])
        x = batch["X"]
        assert sp.issparse(x) == sparse
        expected = ref[index]
        assert x.shape == expected.shape and x.dtype == expected.dtype
        if sparse:
            assert (sp.csr_matrix(x) != expected).nnz == 0
        else:
            np.testing.assert_array_equal(np.asarray(x), expected)
        np.testing.assert_array_equal(
            np.asarray(batch["obs"]["src_path"].astype(str)),
            np.asarray(ref_obs["src_path"].astype(str))[index],
        )
        served.append(index)
    served = np.concatenate(served)
    assert np.array_equal(np.sort(served), np.arange(ref.shape[0])), "rows not served exactly once"
    assert not np.array_equal(served, np.arange(ref.shape[0])), "the loader did not shuffle"
    return len(served)


def test_loader_reads_sparse_collection(mixed) -> None:
    n = assert_loader_serves_collection(mixed.output, batch_size=64, chunk_size=16, preload_nchunks=8)
    assert n == 1800
    indices = zarr.open_group(str(mixed.output), mode="r")["dataset_0/X/indices"]
    assert indices.dtype == np.uint16  # 300 genes


def test_loader_reads_dense_collection(inputs, tmp_path: Path) -> None:
    obs = {"cell_type": categorical(["a", "b", "c"])}
    paths = [
        inputs.add("a.h5ad", make_adata(400, GENES[:50], seed=1, x="dense", obs=obs)),
        inputs.add("b.zarr", make_adata(300, GENES[10:60], seed=2, x="dense", prefix="b", obs=obs)),
    ]
    out = tmp_path / "dense.zarr"
    shuffle(paths, out, shuffle_chunk_size=30, dataset_size=250, n_obs_per_chunk=32)
    assert all(isinstance(d.X, np.ndarray) for d in check_collection(out, paths).datasets)
    assert assert_loader_serves_collection(out, batch_size=40, chunk_size=10, preload_nchunks=4) == 700


def test_loader_accepts_uint8_indices(inputs, tmp_path: Path) -> None:
    paths = [
        inputs.add("a.h5ad", make_adata(300, GENES[:100], seed=1)),
        inputs.add("b.zarr", make_adata(300, GENES[50:200], seed=2, prefix="b")),
    ]
    out = tmp_path / "tiny.zarr"
    shuffle(paths, out, shuffle_chunk_size=25, dataset_size=200)
    check_collection(out, paths)
    root = zarr.open_group(str(out), mode="r")
    assert {root[f"dataset_{k}/X/indices"].dtype for k in range(3)} == {np.dtype(np.uint8)}  # 200 genes
    assert assert_loader_serves_collection(out, batch_size=32, chunk_size=8, preload_nchunks=4) == 600


@pytest.mark.parametrize(("chunk_size", "preload_nchunks", "batch_size"), [(13, 3, 39), (7, 10, 35)])
def test_loader_with_chunks_that_cross_datasets(
    mixed, chunk_size: int, preload_nchunks: int, batch_size: int
) -> None:
    # chunk sizes that do not divide the dataset sizes make chunks and batches span dataset boundaries
    assert any(n % chunk_size for n in mixed.result.plan.rows_per_dataset)
    n = assert_loader_serves_collection(
        mixed.output, batch_size=batch_size, chunk_size=chunk_size, preload_nchunks=preload_nchunks
    )
    assert n == 1800

"""HDF5 virtualization: .h5ad inputs read through virtualizarr manifests give exactly what h5py gives.

Every layout anndata writes is covered (sparse X chunked uncompressed, gzip-chunked; dense X contiguous,
gzip-chunked), plus the fallbacks: LZF (no zarr codec) is read with h5py after a note.
"""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
from conftest import GENES, categorical, check_collection, floats, labels, make_adata, tree_digest

import annbatch_nb as abn
from annbatch_nb.cli import main
from annbatch_nb.sources import (
    H5adSource,
    InputSpec,
    VirtualH5adSource,
    VirtualizationFallback,
    open_source,
    open_sources,
    resolve_inputs,
    wants_virtual,
)

OBS = {"cell_type": categorical(["T", "B", "NK"]), "score": floats, "label": labels}

#: name -> (X kind, h5py compression)
LAYOUTS = {
    "sparse.h5ad": ("csr", None),
    "sparse_gzip.h5ad": ("csr", "gzip"),
    "dense.h5ad": ("dense", None),
    "dense_gzip.h5ad": ("dense", "gzip"),
    "sparse_lzf.h5ad": ("csr", "lzf"),
}


@pytest.fixture(scope="module")
def h5ads(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("virtual")
    out = {}
    for i, (name, (kind, compression)) in enumerate(LAYOUTS.items()):
        adata = make_adata(300 + 50 * i, GENES[:120], seed=i, x=kind, prefix=f"c{i}_", obs=OBS)
        if name == "dense.h5ad":
            adata.uns["note"] = "strings in uns are dropped, not parsed"
            adata.obsm["emb"] = np.zeros((adata.n_obs, 2))
        path = d / name
        adata.write_h5ad(path, compression=compression)
        out[name] = str(path)
    return out


def _same_reads(a, b) -> None:
    runs = np.array([[0, 17], [40, 90], [91, 92], [a.info.n_obs - 5, a.info.n_obs]])
    np.testing.assert_array_equal(a.read_dense(runs), b.read_dense(runs))
    if a.info.x_kind == "csr":
        n = int(b.run_nnz(runs).sum())
        d1, d2 = np.empty(n, np.float64), np.empty(n, np.float64)
        i1, i2 = np.empty(n, np.int64), np.empty(n, np.int64)
        assert a.read_csr_into(runs, d1, i1) == b.read_csr_into(runs, d2, i2) == n
        np.testing.assert_array_equal(d1, d2)
        np.testing.assert_array_equal(i1, i2)
    oa, ob = a.read_obs(runs), b.read_obs(runs)
    assert oa.keys() == ob.keys()
    for k in ob:
        va, vb = (oa[k], ob[k]) if isinstance(ob[k], tuple) else ((oa[k],), (ob[k],))
        for x, y in zip(va, vb, strict=True):
            np.testing.assert_array_equal(np.asarray(x, dtype=object), np.asarray(y, dtype=object), err_msg=k)


@pytest.mark.parametrize("name", [n for n in LAYOUTS if "lzf" not in n])
def test_virtual_source_reads_what_h5py_reads(h5ads: dict[str, str], name: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", VirtualizationFallback)
        virtual = open_source(h5ads[name], virtualize=True)
    plain = open_source(h5ads[name], virtualize=False)
    assert isinstance(virtual, VirtualH5adSource) and type(plain) is H5adSource
    assert virtual.info.reader == "virtual" and plain.info.reader == "h5py"
    vi, pi = virtual.info, plain.info
    assert (vi.format, vi.n_obs, vi.n_vars, vi.x_kind, vi.dtype, vi.nnz) == (
        pi.format,
        pi.n_obs,
        pi.n_vars,
        pi.x_kind,
        pi.dtype,
        pi.nnz,
    )
    assert vi.var_names.equals(pi.var_names) and vi.obs_names.equals(pi.obs_names)
    assert vi.obs_columns == pi.obs_columns
    assert (vi.size_bytes, vi.mtime) == (pi.size_bytes, pi.mtime)
    _same_reads(virtual, plain)


def test_uncompressed_arrays_are_read_by_exact_byte_ranges(h5ads: dict[str, str]) -> None:
    """anndata's default layouts (contiguous dense X, chunked uncompressed CSR) bypass zarr's chunking."""
    dense = open_source(h5ads["dense.h5ad"], virtualize=True)
    layout = dense._layout(dense.root["X"])
    assert layout is not None and layout.row_bytes == dense.info.n_vars * dense.info.dtype.itemsize
    sparse = open_source(h5ads["sparse.h5ad"], virtualize=True)
    assert sparse._layout(sparse.root["X"]["data"]) is not None
    gz = open_source(h5ads["dense_gzip.h5ad"], virtualize=True)
    assert gz._layout(gz.root["X"]) is None  # compressed chunks go through zarr


def test_lzf_falls_back_to_h5py_with_a_note(h5ads: dict[str, str]) -> None:
    with pytest.warns(VirtualizationFallback, match=r"sparse_lzf\.h5ad: read with h5py.*LZF"):
        src = open_source(h5ads["sparse_lzf.h5ad"], virtualize=True)
    assert type(src) is H5adSource and src.info.reader == "h5py"
    _same_reads(src, open_source(h5ads["sparse_lzf.h5ad"], virtualize=False))


def test_auto_reads_local_files_with_h5py(h5ads: dict[str, str]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", VirtualizationFallback)
        sources = open_sources(resolve_inputs(list(h5ads.values())), virtualize="auto")
    assert all(type(s) is H5adSource for s in sources)
    assert wants_virtual(InputSpec("s3://bucket/a.h5ad", "a"), "auto")
    assert not wants_virtual(InputSpec("/data/a.h5ad", "a"), "auto")
    with pytest.raises(abn.ParameterError, match="virtualize"):
        open_source(h5ads["sparse.h5ad"], virtualize="sometimes")  # type: ignore[arg-type]


def test_virtual_source_pickles_with_its_manifest(h5ads: dict[str, str]) -> None:
    src = open_source(h5ads["sparse_gzip.h5ad"], virtualize=True)
    clone = pickle.loads(pickle.dumps(src))
    assert clone._root is None and clone._store is not None  # reopened from the manifest, not re-parsed
    _same_reads(clone, open_source(h5ads["sparse_gzip.h5ad"], virtualize=False))


def test_manifests_are_built_in_a_process_pool(h5ads: dict[str, str], monkeypatch) -> None:
    import annbatch_nb.sources as sources_mod

    monkeypatch.setattr(sources_mod, "_POOL_WORTH_SECONDS", 0.0)
    used = []
    real = sources_mod.ProcessPoolExecutor

    def spy(*args, **kwargs):
        used.append(kwargs.get("max_workers"))
        return real(*args, **kwargs)

    monkeypatch.setattr(sources_mod, "ProcessPoolExecutor", spy)
    specs = resolve_inputs(list(h5ads.values()))
    with pytest.warns(VirtualizationFallback, match="LZF"):
        pooled = open_sources(specs, virtualize=True, workers=2)
    assert used == [2], "a pool of the machine's size (2 here), never one process per file"
    assert [type(s).__name__ for s in pooled] == [
        "VirtualH5adSource",
        "VirtualH5adSource",
        "VirtualH5adSource",
        "VirtualH5adSource",
        "H5adSource",
    ]
    for src, spec in zip(pooled, specs, strict=True):
        _same_reads(src, open_source(spec, virtualize=False))


def test_virtualized_shuffle_is_byte_identical(h5ads: dict[str, str], tmp_path: Path, inputs) -> None:
    zarr_input = inputs.add("z.zarr", make_adata(200, GENES[60:180], seed=9, prefix="z", obs=OBS))
    paths = [*h5ads.values(), zarr_input]
    kwargs = {"shuffle_chunk_size": 40, "dataset_size": 500, "shard_size": "16KB", "n_obs_per_chunk": 16}
    with pytest.warns(VirtualizationFallback):
        virtual = abn.shuffle(paths, tmp_path / "v.zarr", seed=5, progress=False, virtualize=True, **kwargs)
    plain = abn.shuffle(paths, tmp_path / "h.zarr", seed=5, progress=False, virtualize=False, **kwargs)
    assert [i.reader for i in virtual.plan.inputs] == ["virtual"] * 4 + ["h5py", "zarr"]
    assert virtual.plan.fingerprint == plain.plan.fingerprint  # the reader is not part of the plan
    assert tree_digest(tmp_path / "v.zarr") == tree_digest(tmp_path / "h.zarr")
    check_collection(tmp_path / "v.zarr", paths)
    # a run started virtualized resumes (or is found complete) when re-run with h5py, and vice versa
    again = abn.shuffle(paths, tmp_path / "v.zarr", seed=5, progress=False, virtualize=False, **kwargs)
    assert again.already_complete


def test_cli_virtualize_flag_and_note(h5ads: dict[str, str], tmp_path: Path, capsys) -> None:
    out = tmp_path / "cli.zarr"
    args = [h5ads["sparse.h5ad"], h5ads["sparse_lzf.h5ad"], "-o", str(out), "--seed", "1"]
    args += ["--shuffle-chunk-size", "50"]
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        code = main(["shuffle", *args, "--dataset-size", "400", "--no-progress", "-q", "--virtualize", "yes"])
    assert code == 0
    err = capsys.readouterr().err
    notes = [line for line in err.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "sparse_lzf.h5ad: read with h5py" in notes[0], err
    assert main(["validate", str(out), "--inputs", h5ads["sparse.h5ad"], h5ads["sparse_lzf.h5ad"]]) == 0
    with pytest.raises(SystemExit):
        main(["shuffle", *args, "--virtualize", "maybe"])


def test_workers_get_the_parsed_manifests_with_the_plan(
    h5ads: dict[str, str], tmp_path: Path, monkeypatch
) -> None:
    import annbatch_nb.sources as sources_mod

    paths = [h5ads["sparse.h5ad"], h5ads["sparse_gzip.h5ad"]]
    result = abn.shuffle(paths, tmp_path / "v.zarr", seed=5, progress=False, virtualize=True, workers=1)
    plan = pickle.loads(pickle.dumps(result.plan))  # what a worker process receives
    assert len(plan.manifests) == 2
    # a fresh worker: no manifest cache, and parsing would fail
    monkeypatch.setattr(sources_mod, "_MANIFESTS", {})
    monkeypatch.setattr(sources_mod, "build_manifest_store", lambda spec: pytest.fail("parsed again"))
    sources_mod.remember_manifests(plan.manifests)
    for info in plan.inputs:
        src = sources_mod.open_source(sources_mod.InputSpec(info.path, info.display), info=info)
        assert type(src).__name__ == "VirtualH5adSource"
        _same_reads(src, open_source(info.path, virtualize=False))

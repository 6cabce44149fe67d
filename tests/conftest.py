"""Shared builders and checks for the annbatch-nb test suite.

Inputs are small, real AnnData files written with anndata (``.h5ad``, zarr v3 and zarr v2 stores). The
checks here read outputs and inputs with anndata/zarr directly, independently of ``annbatch_nb.validate``.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import zarr

import annbatch_nb as abn

GENES = np.array([f"gene{i:04d}" for i in range(400)], dtype=object)

MARKER = {"encoding-type": "annbatch-preshuffled", "encoding-version": "0.1.0"}


# --------------------------------------------------------------------------------------------------
# Building inputs
# --------------------------------------------------------------------------------------------------
def make_adata(
    n_obs: int,
    var_names: Any,
    *,
    seed: int,
    x: str = "csr",
    dtype: Any = np.float32,
    density: float = 0.15,
    prefix: str = "cell",
    obs: dict[str, Any] | None = None,
    index_dtype: Any = None,
) -> ad.AnnData:
    """A counts-like AnnData; ``obs`` maps column names to values or to ``callable(rng, n_obs)``.

    ``index_dtype=None`` gives pandas' default string index (anndata writes a nullable-string-array);
    ``object`` gives an object index (a plain string-array).
    """
    rng = np.random.default_rng(seed)
    var_names = pd.Index(list(var_names), dtype=index_dtype)
    mask = rng.random((n_obs, len(var_names))) < density
    values = np.where(mask, rng.integers(1, 100, size=mask.shape), 0).astype(dtype)
    matrix = sp.csr_matrix(values) if x == "csr" else values
    columns = {k: (v(rng, n_obs) if callable(v) else v) for k, v in (obs or {}).items()}
    obs_df = pd.DataFrame(columns, index=pd.Index([f"{prefix}{i}" for i in range(n_obs)], dtype=index_dtype))
    return ad.AnnData(X=matrix, obs=obs_df, var=pd.DataFrame(index=var_names))


def categorical(categories: list[str]) -> Any:
    """Obs column builder: a categorical drawn from (and declaring) ``categories``."""
    return lambda rng, n: pd.Categorical(rng.choice(categories, size=n), categories=categories)


def floats(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.normal(size=n)


def ints(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(0, 1000, size=n).astype(np.int64)


def labels(rng: np.random.Generator, n: int) -> np.ndarray:
    """Repeated strings: anndata stores them as a categorical."""
    return np.array([f"s{v}" for v in rng.integers(0, 50, size=n)], dtype=object)


def barcodes(rng: np.random.Generator, n: int) -> np.ndarray:
    """Unique strings: anndata stores them as a string column."""
    return np.array([f"{v}-{i}" for i, v in enumerate(rng.integers(0, 10**6, size=n))], dtype=object)


def bools(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.random(n) < 0.5


def write_adata(adata: ad.AnnData, path: Path, fmt: str) -> Path:
    """Write ``adata`` as ``h5ad``, ``zarr3`` or ``zarr2``."""
    if fmt == "h5ad":
        adata.write_h5ad(path)
    elif fmt in ("zarr3", "zarr2"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # zarr_write_format is deprecated in 0.13
            with ad.settings.override(zarr_write_format=int(fmt[-1])):
                adata.write_zarr(path)
    else:  # pragma: no cover - test bug
        raise ValueError(fmt)
    return path


def read_adata(path: str | Path) -> ad.AnnData:
    """Read an input fully into memory with anndata."""
    path = Path(path)
    return ad.read_h5ad(path) if path.suffix == ".h5ad" else ad.read_zarr(path)


def tree_digest(path: str | Path) -> dict[str, str]:
    """sha256 of every file under ``path`` (or of ``path`` itself), keyed by relative POSIX path."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {
        (p.relative_to(path).as_posix() if p != path else "."): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in files
    }


class InputFactory:
    """Writes inputs into a directory and remembers their bytes, to prove they are never modified."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.digests: dict[Path, dict[str, str]] = {}

    def add(self, name: str, adata: ad.AnnData, fmt: str | None = None) -> str:
        """Write ``adata`` to ``directory/name`` (format from the suffix unless given); return the path."""
        fmt = fmt or ("h5ad" if name.endswith(".h5ad") else "zarr3")
        path = write_adata(adata, self.directory / name, fmt)
        self.digests[path] = tree_digest(path)
        return str(path)

    def assert_unchanged(self) -> None:
        for path, digest in self.digests.items():
            assert tree_digest(path) == digest, f"input {path} was modified"


@pytest.fixture
def inputs(tmp_path: Path):
    """An :class:`InputFactory` under ``tmp_path/inputs``; fails the test if any input changes."""
    factory = InputFactory(tmp_path / "inputs")
    yield factory
    factory.assert_unchanged()


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``annbatch-nb ARGS`` in a fresh interpreter (a real process: crash tests kill it)."""
    return subprocess.run(
        [sys.executable, "-m", "annbatch_nb.cli", *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
        env={**os.environ, **(env or {})},
    )


def shuffle(inputs: Any, output: str | Path, **kwargs: Any) -> abn.ShuffleResult:
    """:func:`annbatch_nb.shuffle` without progress bars, with a fixed seed unless given."""
    kwargs.setdefault("seed", 0)
    return abn.shuffle(inputs, output, progress=False, **kwargs)


# --------------------------------------------------------------------------------------------------
# A standard set of heterogeneous inputs (formats, gene sets and orders, dtypes, X kinds, obs columns)
# --------------------------------------------------------------------------------------------------
def mixed_adatas() -> dict[str, tuple[ad.AnnData, str]]:
    """Four inputs exercising joins, dtype promotion, obs unification and duplicate cell names.

    - ``a.h5ad``: CSR float32, genes 0..199 in order.
    - ``b.zarr`` (v3): CSR int64, genes 100..299 *reversed*; no ``count``/``flag``; has ``batch``.
    - ``c.zarr`` (v2): dense float32, genes 50..249 in random order; no ``score``/``label``/``barcode``.
    - ``d.h5ad``: CSR float32, genes 0..299 shuffled; no ``batch``/``barcode``.

    ``a``, ``b`` and ``d`` use the same cell names, so later copies get ``-1``/``-2`` suffixes.
    """
    perm = np.random.default_rng(7).permutation
    g_c = GENES[50:250][perm(200)]
    g_d = GENES[:300][perm(300)]
    return {
        "a.h5ad": (
            make_adata(
                600,
                GENES[:200],
                seed=1,
                obs={
                    "cell_type": categorical(["T", "B"]),
                    "score": floats,
                    "count": ints,
                    "label": labels,
                    "barcode": barcodes,
                    "flag": bools,
                },
            ),
            "h5ad",
        ),
        "b.zarr": (
            make_adata(
                500,
                GENES[100:300][::-1],
                seed=2,
                dtype=np.int64,
                obs={
                    "cell_type": categorical(["B", "NK", "mono"]),
                    "score": floats,
                    "label": labels,
                    "barcode": barcodes,
                    "batch": categorical(["b1", "b2"]),
                },
            ),
            "zarr3",
        ),
        "c.zarr": (
            make_adata(
                400,
                g_c,
                seed=3,
                x="dense",
                prefix="ccell",
                index_dtype=object,
                obs={"cell_type": categorical(["NK", "DC"]), "count": ints, "flag": bools},
            ),
            "zarr2",
        ),
        "d.h5ad": (
            make_adata(
                300,
                g_d,
                seed=4,
                density=0.05,
                obs={
                    "cell_type": categorical(["T"]),
                    "score": floats,
                    "count": ints,
                    "label": labels,
                    "flag": bools,
                },
            ),
            "h5ad",
        ),
    }


@dataclass
class Shuffled:
    """Inputs and the collection written from them."""

    inputs: list[str]
    output: Path
    result: abn.ShuffleResult
    kwargs: dict[str, Any]


MIXED_KWARGS: dict[str, Any] = {"shuffle_chunk_size": 40, "dataset_size": 450, "seed": 3}


@pytest.fixture(scope="session")
def mixed(tmp_path_factory: pytest.TempPathFactory):
    """The :func:`mixed_adatas` inputs shuffled once (outer join); shared, never to be modified."""
    root = tmp_path_factory.mktemp("mixed")
    factory = InputFactory(root / "inputs")
    paths = [factory.add(name, adata, fmt) for name, (adata, fmt) in mixed_adatas().items()]
    out = root / "out.zarr"
    result = shuffle(paths, out, **MIXED_KWARGS)
    digest = tree_digest(out)
    yield Shuffled(paths, out, result, dict(MIXED_KWARGS))
    factory.assert_unchanged()
    assert tree_digest(out) == digest, "a test modified the shared output; copy it first"


# --------------------------------------------------------------------------------------------------
# Reading and checking a collection (independently of annbatch_nb.validate)
# --------------------------------------------------------------------------------------------------
def dataset_keys(output: str | Path) -> list[str]:
    root = zarr.open_group(str(output), mode="r")
    keys = [k for k in root.group_keys() if k.startswith("dataset_")]
    return sorted(keys, key=lambda k: int(k.split("_")[1]))


def read_collection(output: str | Path) -> list[ad.AnnData]:
    """Every ``dataset_<n>`` of a collection, in numeric order, fully in memory."""
    root = zarr.open_group(str(output), mode="r")
    with ad.settings.override(remove_unused_categories=False):
        return [ad.io.read_elem(root[k]) for k in dataset_keys(output)]


def to_dense(x: Any) -> np.ndarray:
    return x.toarray() if sp.issparse(x) else np.asarray(x)


def assert_sorted_csr(x: sp.csr_matrix, what: str) -> None:
    """Column indices strictly increase within every row."""
    indptr = np.asarray(x.indptr)
    rows = np.repeat(np.arange(x.shape[0]), np.diff(indptr))
    same_row = rows[1:] == rows[:-1]
    steps = np.diff(np.asarray(x.indices, dtype=np.int64))
    assert np.all(steps[same_row] > 0), f"{what}: CSR column indices are not sorted within rows"


def unique_names(adatas: list[ad.AnnData]) -> pd.Index:
    """Cell names of the inputs concatenated, made unique by anndata's own algorithm."""
    names = pd.Index(np.concatenate([np.asarray(a.obs_names, dtype=object) for a in adatas]), dtype=object)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return pd.Index(np.asarray(ad.utils.make_index_unique(names), dtype=object), dtype=object)


def values_equal(expected: pd.Series, got: pd.Series) -> bool:
    """Equal value by value, missing where missing (categories/nullable types compared as values)."""
    e = np.asarray(expected.astype(object), dtype=object)
    g = np.asarray(got.astype(object), dtype=object)
    e_na, g_na = pd.isna(e), pd.isna(g)
    if not np.array_equal(e_na, g_na):
        return False
    return all(a == b for a, b in zip(e[~e_na], g[~g_na], strict=True))


@dataclass
class CollectionCheck:
    """What :func:`check_collection` established about an output."""

    datasets: list[ad.AnnData]
    var_names: pd.Index
    source: np.ndarray  # input index of every output row (collection order)
    source_row: np.ndarray  # row within that input
    rows_per_dataset: list[int]

    @property
    def dataset(self) -> np.ndarray:
        """Dataset number of every output row (collection order)."""
        return np.repeat(np.arange(len(self.rows_per_dataset)), self.rows_per_dataset)


def check_collection(
    output: str | Path,
    input_paths: list[str],
    *,
    var_join: str = "outer",
    displays: list[str] | None = None,
) -> CollectionCheck:
    """Assert the collection holds every input cell exactly once, with X rows and obs values equal.

    Parameters
    ----------
    output
        The collection.
    input_paths
        Input paths, in input order (read with anndata).
    var_join
        Expected gene set: union (``outer``) or intersection (``inner``) of the inputs' genes.
    displays
        The ``src_path`` value expected for each input (default: the paths as given).
    """
    displays = displays or [str(p) for p in input_paths]
    adatas = [read_adata(p) for p in input_paths]
    datasets = read_collection(output)
    assert datasets, "the collection has no datasets"

    root = zarr.open_group(str(output), mode="r")
    assert MARKER.items() <= dict(root.attrs).items(), "the collection marker is missing"

    # var: identical in every dataset, the union / intersection of the inputs' genes
    var_names = pd.Index(datasets[0].var_names, dtype=object)
    for k, d in enumerate(datasets):
        assert list(d.var_names) == list(var_names), f"dataset_{k} has a different var"
        assert d.var.shape[1] == 0
    gene_sets = [set(a.var_names) for a in adatas]
    expected_genes = set.union(*gene_sets) if var_join == "outer" else set.intersection(*gene_sets)
    assert set(var_names) == expected_genes
    assert not var_names.has_duplicates

    # X kind and dtype are the same everywhere
    kinds = {type(d.X) for d in datasets}
    dtypes = {d.X.dtype for d in datasets}
    assert len(kinds) == 1 and len(dtypes) == 1, (kinds, dtypes)
    for k, d in enumerate(datasets):
        if sp.issparse(d.X):
            assert_sorted_csr(d.X, f"dataset_{k}")

    # every input cell exactly once: names made unique as anndata does, traced through src_path
    names = unique_names(adatas)
    offsets = np.concatenate([[0], np.cumsum([a.n_obs for a in adatas])])
    out_obs = pd.concat([d.obs for d in datasets])
    out_names = pd.Index(np.asarray(out_obs.index, dtype=object), dtype=object)
    assert out_names.is_unique, "obs_names are not unique across the collection"
    glob = names.get_indexer(out_names)
    assert np.all(glob >= 0), f"unknown cell names, e.g. {out_names[glob < 0][:3].tolist()}"
    assert np.array_equal(np.sort(glob), np.arange(len(names))), "some cells are missing or repeated"
    source = np.searchsorted(offsets, glob, side="right") - 1
    source_row = glob - offsets[source]
    src_path = out_obs["src_path"]
    assert isinstance(src_path.dtype, pd.CategoricalDtype)
    assert np.array_equal(np.asarray(src_path.astype(str)), np.asarray(displays, dtype=object)[source])

    # X rows equal, gene by gene (missing genes are zeros)
    out_x = np.vstack([to_dense(d.X) for d in datasets])
    for i, a in enumerate(adatas):
        sel = np.flatnonzero(source == i)
        expected = np.zeros((a.n_obs, len(var_names)), dtype=np.float64)
        cols = var_names.get_indexer(a.var_names)
        keep = cols >= 0
        expected[:, cols[keep]] = to_dense(a.X)[:, keep]
        np.testing.assert_array_equal(out_x[sel], expected[source_row[sel]], err_msg=f"X of {input_paths[i]}")

    # obs values equal (missing columns are missing values)
    columns = {c for a in adatas for c in a.obs.columns}
    assert set(out_obs.columns) == columns | {"src_path"}
    for c in columns:
        expected = pd.Series(
            np.concatenate(
                [
                    np.asarray(a.obs[c].astype(object))
                    if c in a.obs
                    else np.full(a.n_obs, None, dtype=object)
                    for a in adatas
                ]
            )
        )
        assert values_equal(expected[glob].reset_index(drop=True), out_obs[c].reset_index(drop=True)), c
        cat_lists = {
            tuple(d.obs[c].cat.categories)
            for d in datasets
            if isinstance(d.obs[c].dtype, pd.CategoricalDtype)
        }
        assert len(cat_lists) <= 1, f"obs column {c!r} has different categories across datasets"

    return CollectionCheck(
        datasets=datasets,
        var_names=var_names,
        source=source,
        source_row=source_row,
        rows_per_dataset=[d.n_obs for d in datasets],
    )


def pytest_configure(config: pytest.Config) -> None:
    # anndata 0.13 under pandas 3 warns about a pandas option on every string column it writes
    config.addinivalue_line("filterwarnings", "ignore:The 'future.infer_string' option is deprecated")

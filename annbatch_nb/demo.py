"""The embedded demo: synthetic single-cell-like inputs, shuffled and validated end to end.

The data are generated (seeded) rather than downloaded: several ``.h5ad`` files and AnnData ``.zarr`` stores
(zarr format 3 and 2) with counts-like sparse X, gene sets that overlap only partly, and categorical obs whose
categories differ between files.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

__all__ = ["DEMO_FILES", "make_demo_data", "run_demo"]

#: name, format, cells
DEMO_FILES: tuple[tuple[str, str, int], ...] = (
    ("pbmc_donor1.h5ad", "h5ad", 4000),
    ("pbmc_donor2.h5ad", "h5ad", 3000),
    ("lung_donor3.h5ad", "h5ad", 2500),
    ("lung_donor4.zarr", "zarr3", 3500),
    ("gut_donor5.zarr", "zarr3", 2000),
    ("gut_donor6.zarr", "zarr2", 1500),
)
N_GENES = 2000
CELL_TYPES = ("T cell", "B cell", "NK cell", "monocyte", "epithelial", "fibroblast", "endothelial")


def _demo_adata(name: str, n_obs: int, rng: np.random.Generator) -> ad.AnnData:
    tissue = name.split("_")[0]
    genes_all = np.array([f"GENE{i:05d}" for i in range(N_GENES)], dtype=object)
    # each file measures ~90% of the common gene set (a different 90%)
    keep = np.sort(rng.choice(N_GENES, size=int(N_GENES * 0.9), replace=False))
    genes = genes_all[keep]
    density = rng.uniform(0.03, 0.08)
    nnz_per_row = rng.poisson(density * len(genes), size=n_obs).clip(1, len(genes))
    indptr = np.concatenate([[0], np.cumsum(nnz_per_row)])
    indices = np.concatenate([np.sort(rng.choice(len(genes), size=k, replace=False)) for k in nnz_per_row])
    data = (rng.geometric(0.3, size=int(indptr[-1]))).astype(np.float32)
    x = sp.csr_matrix((data, indices.astype(np.int32), indptr), shape=(n_obs, len(genes)))
    types = [c for c in CELL_TYPES if rng.random() < 0.75] or list(CELL_TYPES[:2])
    obs = pd.DataFrame(
        {
            "cell_type": pd.Categorical(rng.choice(types, size=n_obs), categories=types),
            "tissue": pd.Categorical([tissue] * n_obs),
            "donor": pd.Categorical([name.split("_")[1].split(".")[0]] * n_obs),
            "n_counts": np.asarray(x.sum(axis=1)).ravel().astype(np.float32),
            "n_genes": nnz_per_row.astype(np.int32),
        },
        index=pd.Index([f"{name.split('.')[0]}-{i:06d}" for i in range(n_obs)], dtype=object),
    )
    return ad.AnnData(X=x, obs=obs, var=pd.DataFrame(index=pd.Index(genes, dtype=object)))


def make_demo_data(directory: str | os.PathLike[str], *, seed: int = 0, scale: float = 1.0) -> list[Path]:
    """Write the demo inputs into ``directory/inputs`` (kept if already there).

    Parameters
    ----------
    directory
        Where to put them.
    seed
        Seed of the generator.
    scale
        Multiplies every file's cell count.

    Returns
    -------
    list[pathlib.Path]
        The input paths, in order.
    """
    out = Path(directory) / "inputs"
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for j, (name, fmt, n_obs) in enumerate(DEMO_FILES):
        path = out / name
        paths.append(path)
        if path.exists():
            continue
        rng = np.random.default_rng([seed, j])
        adata = _demo_adata(name, max(1, int(n_obs * scale)), rng)
        tmp = path.with_name(path.name + ".partial")
        if fmt == "h5ad":
            adata.write_h5ad(tmp)
            tmp.rename(path)
        else:
            fmt_version = 3 if fmt == "zarr3" else 2
            with warnings.catch_warnings():  # anndata deprecates choosing the zarr format
                warnings.simplefilter("ignore", DeprecationWarning)
                with ad.settings.override(zarr_write_format=fmt_version):
                    adata.write_zarr(tmp)
            tmp.rename(path)
    return paths


@dataclass
class DemoResult:
    """Paths and outcomes of :func:`run_demo`."""

    inputs: list[Path]
    output: Path
    result: object
    report: object


def run_demo(directory: str | os.PathLike[str] = "demo-data", *, progress: bool = True) -> DemoResult:
    """Make the demo data, shuffle it into ``directory/collection.zarr`` and validate it.

    Parameters
    ----------
    directory
        Working directory of the demo.
    progress
        Show progress bars.

    Returns
    -------
    DemoResult
        The inputs, the collection path, the shuffle result and the validation report.
    """
    from .collection import validate
    from .engine import shuffle

    directory = Path(directory)
    inputs = make_demo_data(directory)
    output = directory / "collection.zarr"
    result = shuffle(
        [str(p) for p in inputs],
        output,
        shuffle_chunk_size=100,
        dataset_size=5000,
        n_obs_per_chunk=64,
        seed=0,
        progress=progress,
    )
    report = validate(output, inputs=[str(p) for p in inputs])
    return DemoResult(inputs=inputs, output=output, result=result, report=report)

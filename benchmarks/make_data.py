"""Generate the seeded benchmark data set: many AnnData files with counts-like sparse X.

Default sizes follow the tracker issue: 8 files x 50,000 cells, a common set of 20,000 genes of which each
file holds a different random 90%, ~2% density (~144 M stored entries, ~1.2 GB of uncompressed h5ad).

Every file gets a ``<name>.params.json`` beside it; a file whose json matches the requested parameters is
kept, so a second call costs nothing. Files are seeded by ``(seed, file index)``, so file ``j`` is the same
whatever ``--files`` is.

Usage::

    python benchmarks/make_data.py                       # the default data set (h5ad)
    python benchmarks/make_data.py --format zarr
    python benchmarks/make_data.py --files 4 --cells 5000 --genes 2000 --out /tmp/small
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

#: Bump when the generated content changes, so cached files are regenerated.
GENERATOR_VERSION = 1
#: Default sizes (the tracker issue's data set).
DEFAULTS: dict[str, Any] = {
    "files": 8,
    "cells": 50_000,
    "genes": 20_000,
    "density": 0.02,
    "gene_fraction": 0.9,
    "format": "h5ad",
    "seed": 0,
}
CELL_TYPES = (
    "T cell",
    "B cell",
    "NK cell",
    "monocyte",
    "dendritic cell",
    "macrophage",
    "epithelial",
    "fibroblast",
    "endothelial",
    "pericyte",
    "smooth muscle",
    "plasma cell",
)
DATA_ROOT = Path(__file__).resolve().parent / "data"
ROWS_PER_BLOCK = 8192


def dataset_dir_name(
    cells: int, genes: int, density: float, fmt: str, seed: int, gene_fraction: float
) -> str:
    """Directory name that identifies a data set's per-file parameters (the file count is not part of it)."""
    return f"{fmt}-c{cells}-g{genes}-d{density:g}-f{gene_fraction:g}-s{seed}"


def default_dir(
    cells: int, genes: int, density: float, fmt: str, seed: int, gene_fraction: float = 0.9
) -> Path:
    """Default location of a data set under ``benchmarks/data``."""
    return DATA_ROOT / dataset_dir_name(cells, genes, density, fmt, seed, gene_fraction)


def _file_params(
    j: int, cells: int, genes: int, density: float, fmt: str, seed: int, gene_fraction: float
) -> dict:
    return {
        "generator_version": GENERATOR_VERSION,
        "index": j,
        "cells": cells,
        "genes": genes,
        "density": density,
        "gene_fraction": gene_fraction,
        "format": fmt,
        "seed": seed,
    }


def _random_csr(
    rng: np.random.Generator, n_obs: int, n_var: int, density: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Counts-like float32 CSR ``(data, indices, indptr)`` with about ``density`` of entries stored.

    Row depths vary (log-normal size factors); columns are uniform and distinct within a row (drawn with
    replacement, then de-duplicated, with the draw count corrected for the expected duplicates).
    """
    size_factor = rng.lognormal(0.0, 0.35, size=n_obs)
    size_factor /= size_factor.mean()
    target = np.clip(density * n_var * size_factor, 1, 0.95 * n_var)
    draws = np.maximum(1, np.rint(-n_var * np.log1p(-target / n_var))).astype(np.int64)
    data_parts: list[np.ndarray] = []
    index_parts: list[np.ndarray] = []
    counts = np.zeros(n_obs, dtype=np.int64)
    for r0 in range(0, n_obs, ROWS_PER_BLOCK):
        r1 = min(r0 + ROWS_PER_BLOCK, n_obs)
        d = draws[r0:r1]
        rows = np.repeat(np.arange(r1 - r0, dtype=np.int64), d)
        keys = rows * n_var
        keys += rng.integers(0, n_var, size=rows.size, dtype=np.int32)
        keys.sort()  # row-major, columns ascending
        distinct = np.empty(keys.size, dtype=bool)
        distinct[:1] = True
        np.not_equal(keys[1:], keys[:-1], out=distinct[1:])
        keys = keys[distinct]
        row_of = keys // n_var
        counts[r0:r1] = np.bincount(row_of, minlength=r1 - r0)
        index_parts.append((keys - row_of * n_var).astype(np.int32))
        # counts: geometric (p=0.45; mostly 1-3) by inverse CDF, plus a tail of larger values on ~3%
        u = rng.random(keys.size, dtype=np.float32)
        np.subtract(np.float32(1), u, out=u)  # (0, 1]: log is finite
        np.log(u, out=u)
        u *= np.float32(1 / np.log(0.55))
        values = np.floor(u, out=u)
        values += 1
        hi = np.flatnonzero(rng.random(keys.size, dtype=np.float32) < 0.03)
        values[hi] += rng.integers(5, 40, size=hi.size).astype(np.float32)
        data_parts.append(values)
    indptr = np.zeros(n_obs + 1, dtype=np.int64)
    np.cumsum(counts, out=indptr[1:])
    return np.concatenate(data_parts), np.concatenate(index_parts), indptr


def make_adata(j: int, cells: int, genes: int, density: float, seed: int, gene_fraction: float = 0.9) -> Any:
    """Build file ``j``'s AnnData in memory."""
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    rng = np.random.default_rng([seed, j])
    n_var = max(1, round(genes * gene_fraction))
    keep = np.sort(rng.choice(genes, size=n_var, replace=False))
    data, indices, indptr = _random_csr(rng, cells, n_var, density)
    x = sp.csr_matrix((data, indices, indptr), shape=(cells, n_var))
    n_types = int(rng.integers(6, len(CELL_TYPES) + 1))
    types = list(rng.choice(CELL_TYPES, size=n_types, replace=False))
    weights = rng.dirichlet(np.ones(n_types))
    obs = pd.DataFrame(
        {
            "cell_type": pd.Categorical.from_codes(
                rng.choice(n_types, size=cells, p=weights), categories=types
            ),
            "donor": pd.Categorical.from_codes(
                rng.integers(0, 4, size=cells), categories=[f"donor{j}_{k}" for k in range(4)]
            ),
            "n_counts": np.add.reduceat(data, indptr[:-1]).astype(np.float32)
            if data.size
            else np.zeros(cells, np.float32),
        },
        index=pd.Index(np.char.add(f"f{j:03d}-", np.arange(cells).astype(str)).astype(object), dtype=object),
    )
    var = pd.DataFrame(index=pd.Index(np.char.add("GENE", np.char.zfill(keep.astype(str), 5)).astype(object)))
    return ad.AnnData(X=x, obs=obs, var=var)


def _write(adata: Any, path: Path, fmt: str) -> None:
    import anndata as ad

    tmp = path.with_name(path.name + ".partial")
    if tmp.is_dir():
        shutil.rmtree(tmp)
    elif tmp.exists():
        tmp.unlink()
    if fmt == "h5ad":
        adata.write_h5ad(tmp)
    else:
        with ad.settings.override(zarr_write_format=3):
            adata.write_zarr(tmp)
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
    tmp.rename(path)


def make_dataset(
    out: str | os.PathLike[str] | None = None,
    *,
    files: int = DEFAULTS["files"],
    cells: int = DEFAULTS["cells"],
    genes: int = DEFAULTS["genes"],
    density: float = DEFAULTS["density"],
    fmt: str = DEFAULTS["format"],
    seed: int = DEFAULTS["seed"],
    gene_fraction: float = DEFAULTS["gene_fraction"],
    verbose: bool = True,
) -> list[Path]:
    """Write (or reuse) the data set and return its file paths in order.

    Parameters
    ----------
    out
        Directory of the files; default ``benchmarks/data/<name from the parameters>``.
    files, cells, genes, density
        Number of files, cells per file, size of the common gene set, fraction of stored entries.
    fmt
        ``h5ad`` or ``zarr`` (AnnData zarr, format 3, anndata's default codecs).
    seed
        Seed; file ``j`` uses ``default_rng([seed, j])``.
    gene_fraction
        Fraction of the common gene set each file holds (a different random subset per file).
    verbose
        Print one line per file.
    """
    if fmt not in ("h5ad", "zarr"):
        raise ValueError(f"format must be h5ad or zarr, not {fmt!r}")
    out_dir = Path(out) if out is not None else default_dir(cells, genes, density, fmt, seed, gene_fraction)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for j in range(files):
        path = out_dir / f"file_{j:03d}.{fmt}"
        meta = path.with_name(path.name + ".params.json")
        params = _file_params(j, cells, genes, density, fmt, seed, gene_fraction)
        paths.append(path)
        if path.exists() and meta.is_file():
            try:
                if json.loads(meta.read_text()).get("params") == params:
                    continue
            except (OSError, ValueError):
                pass
        t0 = time.perf_counter()
        adata = make_adata(j, cells, genes, density, seed, gene_fraction)
        t1 = time.perf_counter()
        _write(adata, path, fmt)
        t2 = time.perf_counter()
        record = {"params": params, "n_obs": adata.n_obs, "n_vars": adata.n_vars, "nnz": int(adata.X.nnz)}
        meta.write_text(json.dumps(record, indent=1) + "\n")
        if verbose:
            print(
                f"  {path.name}: {adata.n_obs:,} x {adata.n_vars:,}, nnz {adata.X.nnz:,} "
                f"(generated {t1 - t0:.1f} s, written {t2 - t1:.1f} s)",
                file=sys.stderr,
            )
        del adata
    return paths


def dataset_summary(paths: list[Path]) -> dict[str, Any]:
    """Totals of a data set from its params json files (cells, nnz, bytes on disk)."""
    n_obs = nnz = size = 0
    for p in paths:
        rec = json.loads(p.with_name(p.name + ".params.json").read_text())
        n_obs += rec["n_obs"]
        nnz += rec["nnz"]
        size += disk_bytes(p)
    return {"files": len(paths), "n_obs": n_obs, "nnz": nnz, "bytes": size}


def disk_bytes(path: str | os.PathLike[str]) -> int:
    """Apparent size of a file, or the sum over a directory tree."""
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    total = 0
    for root, _, names in os.walk(p):
        for n in names:
            with contextlib.suppress(OSError):
                total += os.stat(os.path.join(root, n)).st_size
    return total


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=DEFAULTS["files"])
    ap.add_argument("--cells", type=int, default=DEFAULTS["cells"], help="cells per file")
    ap.add_argument("--genes", type=int, default=DEFAULTS["genes"], help="size of the common gene set")
    ap.add_argument("--density", type=float, default=DEFAULTS["density"])
    ap.add_argument("--gene-fraction", type=float, default=DEFAULTS["gene_fraction"])
    ap.add_argument("--format", choices=("h5ad", "zarr"), default=DEFAULTS["format"])
    ap.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    ap.add_argument("--out", default=None, help="directory (default benchmarks/data/<parameters>)")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    paths = make_dataset(
        args.out,
        files=args.files,
        cells=args.cells,
        genes=args.genes,
        density=args.density,
        fmt=args.format,
        seed=args.seed,
        gene_fraction=args.gene_fraction,
    )
    s = dataset_summary(paths)
    print(
        f"{s['files']} files, {s['n_obs']:,} cells, nnz {s['nnz']:,}, {s['bytes'] / 2**30:.2f} GiB on disk "
        f"in {paths[0].parent} ({time.perf_counter() - t0:.1f} s)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

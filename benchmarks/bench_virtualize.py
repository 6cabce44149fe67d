"""HDF5 read paths compared: h5py vs a virtualizarr manifest, on local disk and on S3 (moto on 127.0.0.1).

For each .h5ad layout anndata writes (CSR chunked uncompressed = anndata's default, CSR gzip, dense
contiguous = anndata's default, dense gzip) and each read path

- ``h5py-local``: h5py on the local file (``virtualize=False``; what ``auto`` picks for local files)
- ``virtual-local``: the manifest over obstore's LocalStore (``virtualize=True``)
- ``virtual-s3``: the manifest over S3 (moto server; what ``auto`` picks for ``s3://`` inputs)
- ``h5py-s3``: h5py through a file object over S3 (``virtualize=False`` on ``s3://``)

it measures (medians of ``--reps``):

- ``open``: scanning the inputs (parsing the HDF5 metadata into a manifest for the virtual paths);
- ``read``: reading every row of X in runs of ``--chunk`` rows, in shuffled order (the engine's access
  pattern), in MB/s of raw X;
- ``shuffle``: the whole ``annbatch_nb.shuffle`` into a local collection.

moto is a Python server on this machine: its per-request cost stands in for a real object store's latency,
its bandwidth does not (it is far lower than S3's). Read the S3 numbers as "many small requests hurt";
the relative order of the paths is what carries over.

Usage::

    python benchmarks/bench_virtualize.py                       # small default sizes, ~1-2 minutes
    python benchmarks/bench_virtualize.py --cells 100000 --genes 5000 --reps 5
    python benchmarks/bench_virtualize.py --layouts csr dense --no-s3 --json results/virt.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

LAYOUTS = {
    "csr": ("csr", None),
    "csr-gzip": ("csr", "gzip"),
    "dense": ("dense", None),
    "dense-gzip": ("dense", "gzip"),
}
PATHS = ("h5py-local", "virtual-local", "virtual-s3", "h5py-s3")


def make_files(
    d: Path, layout: str, files: int, cells: int, genes: int, density: float, seed: int
) -> list[Path]:
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    kind, compression = LAYOUTS[layout]
    out = []
    for j in range(files):
        path = d / f"{layout}_{j}.h5ad"
        out.append(path)
        if path.exists():
            continue
        rng = np.random.default_rng((seed, j))
        x = sp.random(cells, genes, density=density, format="csr", dtype=np.float32, random_state=rng)
        x.data = np.ceil(x.data * 20)
        obs = pd.DataFrame(
            {
                "cell_type": pd.Categorical(rng.choice(["T", "B", "NK", "mono"], cells)),
                "n": rng.random(cells),
            },
            index=[f"f{j}c{i}" for i in range(cells)],
        )
        var = pd.DataFrame(index=[f"g{i}" for i in range(genes)])
        adata = ad.AnnData(X=x if kind == "csr" else x.toarray(), obs=obs, var=var)
        adata.write_h5ad(path, compression=compression)
    return out


def _raw_bytes(sources: list[Any]) -> int:
    return int(sum(s.info.raw_x_bytes for s in sources))


def read_all(sources: list[Any], chunk: int, seed: int) -> None:
    """Read every row of X in runs of ``chunk`` rows, runs in shuffled order."""
    rng = np.random.default_rng(seed)
    runs = [
        (k, a, min(a + chunk, s.info.n_obs))
        for k, s in enumerate(sources)
        for a in range(0, s.info.n_obs, chunk)
    ]
    for i in rng.permutation(len(runs)):
        k, a, b = runs[i]
        src = sources[k]
        r = np.array([[a, b]])
        if src.info.x_kind == "csr":
            n = int(src.run_nnz(r).sum())
            src.read_csr_into(r, np.empty(n, np.float32), np.empty(n, np.int32))
        else:
            src.read_dense_into(r, np.empty((b - a, src.info.n_vars), np.float32))


def bench_path(inputs: list[str], virtualize: Any, args: argparse.Namespace, out_dir: Path) -> dict[str, Any]:
    import annbatch_nb as abn
    from annbatch_nb.sources import open_sources, resolve_inputs

    opens, reads, shuffles = [], [], []
    readers: list[str] = []
    raw = 0
    for rep in range(args.reps):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t = time.perf_counter()
            sources = open_sources(resolve_inputs(inputs), virtualize=virtualize)
            opens.append(time.perf_counter() - t)
        readers = [s.info.reader for s in sources]
        raw = _raw_bytes(sources)
        t = time.perf_counter()
        read_all(sources, args.chunk, rep)
        reads.append(time.perf_counter() - t)
        for s in sources:
            s.close()
        if not args.no_shuffle:
            out = out_dir / f"out-{rep}.zarr"
            shutil.rmtree(out, ignore_errors=True)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                t = time.perf_counter()
                abn.shuffle(
                    inputs,
                    out,
                    shuffle_chunk_size=args.chunk,
                    dataset_size=args.dataset_size,
                    seed=0,
                    progress=False,
                    virtualize=virtualize,
                )
                shuffles.append(time.perf_counter() - t)
            shutil.rmtree(out, ignore_errors=True)
    med_read = statistics.median(reads)
    return {
        "readers": sorted(set(readers)),
        "open_s": statistics.median(opens),
        "read_s": med_read,
        "read_MBps": raw / med_read / 1e6 if med_read else float("nan"),
        "shuffle_s": statistics.median(shuffles) if shuffles else None,
        "raw_bytes": raw,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layouts", nargs="+", choices=list(LAYOUTS), default=list(LAYOUTS))
    p.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS))
    p.add_argument("--files", type=int, default=2)
    p.add_argument("--cells", type=int, default=20_000, help="cells per file (default 20000)")
    p.add_argument("--genes", type=int, default=2_000, help="genes (default 2000)")
    p.add_argument("--dense-cells", type=int, default=None, help="cells per dense file (default cells / 4)")
    p.add_argument("--density", type=float, default=0.02)
    p.add_argument("--chunk", type=int, default=1000, help="shuffle_chunk_size (rows per run, default 1000)")
    p.add_argument("--dataset-size", default="64MB")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--no-s3", action="store_true", help="skip the S3 (moto) paths")
    p.add_argument("--no-shuffle", action="store_true", help="only open and read, no full shuffle")
    p.add_argument("--data-dir", type=Path, default=None, help="where to keep the generated files")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    args = p.parse_args(argv)
    paths = [x for x in args.paths if not (args.no_s3 and x.endswith("-s3"))]

    data_dir = args.data_dir or Path(tempfile.gettempdir()) / "annbatch-nb-bench-virtualize"
    tag = f"c{args.cells}-g{args.genes}-d{args.density:g}-f{args.files}"
    data_dir = data_dir / tag
    data_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-virt-"))
    results: list[dict[str, Any]] = []
    server_cm = None
    try:
        if any(x.endswith("-s3") for x in paths):
            from annbatch_nb.testing import moto_server

            server_cm = moto_server()
            server = server_cm.__enter__()
            os.environ.update(server.env())
            server.create_bucket("bench")
        for layout in args.layouts:
            cells = args.cells if LAYOUTS[layout][0] == "csr" else (args.dense_cells or args.cells // 4)
            files = make_files(data_dir, layout, args.files, cells, args.genes, args.density, 0)
            remote = []
            if server_cm is not None:
                from annbatch_nb.testing import upload

                for f in files:
                    url = f"s3://bench/{tag}/{f.name}"
                    upload(f, url)
                    remote.append(url)
            for path in paths:
                inputs = remote if path.endswith("-s3") else [str(f) for f in files]
                virtualize = path.startswith("virtual")
                r = bench_path(inputs, virtualize, args, work)
                r.update(layout=layout, path=path, cells_per_file=cells, files=len(files))
                results.append(r)
                shuffle = f"{r['shuffle_s']:8.2f}" if r["shuffle_s"] is not None else "       -"
                print(
                    f"{layout:11s} {path:14s} open {r['open_s']:6.2f} s  read {r['read_s']:7.2f} s "
                    f"({r['read_MBps']:7.1f} MB/s)  shuffle {shuffle} s  [{'/'.join(r['readers'])}]",
                    flush=True,
                )
    finally:
        if server_cm is not None:
            server_cm.__exit__(None, None, None)
        shutil.rmtree(work, ignore_errors=True)

    print("\nratios to h5py-local (time; < 1 is faster):")
    for layout in args.layouts:
        base = next((r for r in results if r["layout"] == layout and r["path"] == "h5py-local"), None)
        if base is None:
            continue
        for r in results:
            if r["layout"] != layout or r is base:
                continue
            sh = (
                f"shuffle x{r['shuffle_s'] / base['shuffle_s']:.2f}"
                if r["shuffle_s"] and base["shuffle_s"]
                else ""
            )
            print(f"  {layout:11s} {r['path']:14s} read x{r['read_s'] / base['read_s']:.2f}  {sh}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results}, indent=2)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

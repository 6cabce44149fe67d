"""How long does ``annbatch_nb.plan.scan`` take on many small inputs? Target: 1,000 files in 10 s or less.

Writes (once, then reuses) ``--files`` small AnnData inputs: most ``.h5ad``, every ``--zarr-every``-th an
AnnData ``.zarr`` store (zarr format 3), each with ``--cells`` cells, 200 genes, sparse X and a categorical
and a numeric obs column. Then times ``scan`` of the whole directory in a fresh process (interpreter start and
imports excluded: they are reported separately), ``--repeat`` times, and prints each time, the median and the
load.

Usage::

    python benchmarks/bench_scan.py                      # 1,000 inputs (950 h5ad, 50 zarr), 3 repeats
    python benchmarks/bench_scan.py --files 200 --repeat 5
    python benchmarks/bench_scan.py --profile            # one run under cProfile, top functions
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = """
import json, sys, time
t0 = time.perf_counter()
from annbatch_nb.plan import scan
t1, c1 = time.perf_counter(), time.process_time()
infos = scan(sys.argv[1])
t2, c2 = time.perf_counter(), time.process_time()
print(json.dumps({"import_s": t1 - t0, "scan_s": t2 - t1, "cpu_s": c2 - c1, "n": len(infos),
                  "n_obs": sum(i.n_obs for i in infos)}))
"""

PROFILE_CHILD = """
import cProfile, pstats, sys
from annbatch_nb.plan import scan
cProfile.run("scan(sys.argv[1])", "/tmp/bench_scan.prof")
pstats.Stats("/tmp/bench_scan.prof").sort_stats("cumulative").print_stats(35)
"""


def make_inputs(directory: Path, files: int, cells: int, zarr_every: int) -> Path:
    """Write the inputs (seeded), unless a previous call wrote the same set."""
    import anndata as ad
    import numpy as np
    import pandas as pd
    import scipy.sparse as sp

    spec = {"files": files, "cells": cells, "zarr_every": zarr_every, "version": 1}
    stamp = directory / "spec.json"
    if stamp.exists() and json.loads(stamp.read_text()) == spec:
        return directory / "inputs"
    inputs = directory / "inputs"
    inputs.mkdir(parents=True, exist_ok=True)
    genes = 200
    var = pd.DataFrame(index=[f"G{i:04d}" for i in range(genes)])
    for j in range(files):
        rng = np.random.default_rng([11, j])
        x = sp.random(cells, genes, density=0.05, format="csr", dtype=np.float32, random_state=rng)
        obs = pd.DataFrame(
            {
                "cell_type": pd.Categorical(rng.choice(["T", "B", "NK"], cells)),
                "n_counts": rng.random(cells),
            },
            index=[f"f{j}-c{i}" for i in range(cells)],
        )
        a = ad.AnnData(X=x, obs=obs, var=var)
        if zarr_every and j % zarr_every == zarr_every - 1:
            a.write_zarr(inputs / f"in_{j:05d}.zarr")
        else:
            a.write_h5ad(inputs / f"in_{j:05d}.h5ad")
    stamp.write_text(json.dumps(spec))
    return inputs


def main(argv: list[str] | None = None) -> int:
    """Make the inputs, time ``scan`` in fresh processes, print the median."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=1000)
    parser.add_argument("--cells", type=int, default=100)
    parser.add_argument("--zarr-every", type=int, default=20, help="every n-th input is a .zarr store")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where the inputs are kept (default: a fixed temp dir)")
    parser.add_argument("--profile", action="store_true", help="profile one scan instead of timing")
    args = parser.parse_args(argv)
    directory = Path(args.dir or Path(tempfile.gettempdir()) / f"annbatch-nb-bench-scan-{args.files}")
    inputs = make_inputs(directory, args.files, args.cells, args.zarr_every)
    if args.profile:
        subprocess.run([sys.executable, "-c", PROFILE_CHILD, str(inputs)], check=True)
        return 0
    runs, cpus = [], []
    for r in range(args.repeat):
        load = os.getloadavg()[0]
        proc = subprocess.run(
            [sys.executable, "-c", CHILD, str(inputs)], capture_output=True, text=True, check=True
        )
        m = json.loads(proc.stdout.strip().splitlines()[-1])
        runs.append(m["scan_s"])
        cpus.append(m["cpu_s"])
        print(
            f"run {r}: scan of {m['n']} inputs ({m['n_obs']:,} cells) {m['scan_s']:.2f} s "
            f"(CPU {m['cpu_s']:.2f} s) "
            f"(imports {m['import_s']:.2f} s), load {load:.2f}",
            flush=True,
        )
    print(
        f"median scan {statistics.median(runs):.2f} s (CPU {statistics.median(cpus):.2f} s) for {args.files} "
        "inputs (target 10 s), "
        f"load now {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

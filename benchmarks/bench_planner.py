"""How good are the planner's predictions? Predicted vs measured peak memory and wall time over a grid.

For sparse (CSR) and dense inputs, every combination of ``shuffle_chunk_size`` and ``dataset_size`` is run
through the engine in a fresh process (one worker, so the run's peak resident memory is that process's
``ru_maxrss``), after the planner predicted it with a calibration measured on the same files. Prints each
prediction, the measurement and the error, then the worst errors (targets: memory within 15 %, time within
30 %).

Usage::

    python benchmarks/bench_planner.py          # sparse 4 x 50,000 x 20,000 and dense 4 x 20,000 x 1,000
    python benchmarks/bench_planner.py --small         # a quick run (< 1 minute)
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

CHILD = """
import json, resource, sys, time
import annbatch_nb as abn
from annbatch_nb.predict import Calibration
spec = json.loads(sys.argv[1])
p = abn.plan(spec["inputs"], seed=0, shuffle_chunk_size=spec["chunk"], dataset_size=spec["size"],
             calibration=Calibration.from_dict(spec["calibration"]))
start = time.perf_counter()
p.run(spec["output"], progress=False, workers=1)
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def make_dense(directory: Path, files: int, cells: int, genes: int) -> list[str]:
    """Dense float32 h5ad inputs (counts-like, seeded), reused when present."""
    import anndata as ad
    import pandas as pd

    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for j in range(files):
        path = directory / f"dense_{j:03d}_{cells}x{genes}.h5ad"
        paths.append(str(path))
        if path.exists():
            continue
        rng = np.random.default_rng([7, j])
        x = rng.poisson(0.3, size=(cells, genes)).astype(np.float32)
        obs = pd.DataFrame(
            {"batch": pd.Categorical([f"b{j}"] * cells)}, index=[f"d{j}-{i}" for i in range(cells)]
        )
        var = pd.DataFrame(index=[f"G{i:05d}" for i in range(genes)])
        ad.AnnData(X=x, obs=obs, var=var).write_h5ad(path)
    return paths


def run_grid(
    kind: str, inputs: list[str], chunks: list[int], sizes: list[int], scratch: Path
) -> list[dict[str, Any]]:
    """Predict, then measure, every combination."""
    import annbatch_nb as abn
    from annbatch_nb.predict import calibrate

    cal = calibrate(inputs, cache=False)
    rows = []
    for size in sizes:
        for chunk in chunks:
            p = abn.plan(inputs, seed=0, shuffle_chunk_size=chunk, dataset_size=size, calibration=cal)
            out = scratch / f"{kind}-{chunk}-{size}.zarr"
            spec = {
                "inputs": inputs,
                "chunk": chunk,
                "size": size,
                "output": str(out),
                "calibration": cal.to_dict(),
            }
            proc = subprocess.run(
                [sys.executable, "-c", CHILD, json.dumps(spec)], capture_output=True, text=True, check=True
            )
            m = json.loads(proc.stdout.strip().splitlines()[-1])
            shutil.rmtree(out, ignore_errors=True)
            rows.append(
                {
                    "kind": kind,
                    "shuffle_chunk_size": chunk,
                    "dataset_rows": p.dataset_rows,
                    "n_datasets": p.n_datasets,
                    "predicted_peak": p.peak_memory_bytes,
                    "measured_peak": m["peak"],
                    "memory_error": p.peak_memory_bytes / m["peak"] - 1,
                    "predicted_s": p.seconds,
                    "measured_s": m["seconds"],
                    "time_error": p.seconds / m["seconds"] - 1,
                }
            )
            r = rows[-1]
            print(
                f"{kind:6} chunk={chunk:<5} rows/dataset={r['dataset_rows']:<7} "
                f"datasets={r['n_datasets']:<3} "
                f"memory {r['predicted_peak'] / 2**20:7.0f} vs {r['measured_peak'] / 2**20:7.0f} MiB "
                f"({r['memory_error']:+.0%})   time {r['predicted_s']:6.2f} vs {r['measured_s']:6.2f} s "
                f"({r['time_error']:+.0%})",
                flush=True,
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    """Run the grid and print the worst errors."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="small data for a quick check")
    parser.add_argument("--json", default=None, help="write the rows here")
    args = parser.parse_args(argv)
    from make_data import make_dataset

    if args.small:
        sparse = [str(p) for p in make_dataset(files=4, cells=10_000, genes=5000, verbose=False)]
        dense = make_dense(HERE / "data" / "dense-small", 2, 5000, 500)
        sparse_sizes, dense_sizes = [5000, 20_000], [2000, 10_000]
    else:
        sparse = [str(p) for p in make_dataset(files=4, verbose=False)]
        dense = make_dense(HERE / "data" / "dense", 4, 20_000, 1000)
        sparse_sizes, dense_sizes = [25_000, 100_000], [10_000, 40_000]
    scratch = Path(tempfile.mkdtemp(prefix="bench-planner-"))
    try:
        rows = run_grid("sparse", sparse, [100, 1000], sparse_sizes, scratch)
        rows += run_grid("dense", dense, [100, 1000], dense_sizes, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    mem = max(abs(r["memory_error"]) for r in rows)
    tim = max(abs(r["time_error"]) for r in rows)
    print(f"\nworst memory error {mem:.0%} (target 15%), worst time error {tim:.0%} (target 30%)")
    print(
        f"median memory error {np.median([abs(r['memory_error']) for r in rows]):.0%}, "
        f"median time error {np.median([abs(r['time_error']) for r in rows]):.0%}"
    )
    if args.json:
        meta = {"date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")}
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

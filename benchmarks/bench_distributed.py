"""annbatch-nb on dask.distributed: 1 vs 2 local workers, and planning a 100M-cell atlas from metadata.

Part 1 (``--cluster``): the same plan executed with ``client=`` on a ``LocalCluster`` of 1 and of 2 worker
processes (one thread each), alternating the order within each repeat, plus the local engine in this process
(``workers=1``) as the reference. The clusters are started and warmed up (annbatch_nb imported on every
worker) before timing; a run's time is the ``execute`` call (plan scattered, tasks run, marker committed).
Each run writes a fresh output that is deleted afterwards; the first run's bytes are compared with every
other run's.

Part 2 (``--plan``): a synthetic atlas of ``--atlas-files`` x ``--atlas-cells`` CSR inputs (metadata records
only: no files, cell names as a range, a few shared gene panels) is planned in a fresh subprocess:
``build_plan`` (``dataset_size="auto"``) and every prediction the planner shows (quality, memory, time, output
bytes, summary); wall time and the subprocess' peak RSS (``ru_maxrss``) are printed.

Example (about 5 minutes on 2 cores)::

    python benchmarks/bench_distributed.py --repeats 3
    python benchmarks/bench_distributed.py --plan-only
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE / "data" / "h5ad-c50000-g20000-d0.02-f0.9-s0"


# --------------------------------------------------------------------------------------------------
# Part 1: 1 vs 2 workers
# --------------------------------------------------------------------------------------------------
def _digest(path: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(q for q in path.rglob("*") if q.is_file()):
        h.update(p.relative_to(path).as_posix().encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _warm(module: str) -> str:
    import importlib

    importlib.import_module(module)
    return module


def bench_workers(args: argparse.Namespace) -> dict[str, Any]:
    from distributed import Client, LocalCluster

    import annbatch_nb as abn

    inputs = sorted(str(p) for p in Path(args.data).glob("*.h5ad")) or sorted(
        str(p) for p in Path(args.data).glob("*.zarr")
    )
    if not inputs:
        raise SystemExit(f"no .h5ad or .zarr inputs in {args.data}; make them with benchmarks/make_data.py")
    plan = abn.plan(
        inputs, shuffle_chunk_size=args.shuffle_chunk_size, dataset_size=args.dataset_size, seed=0
    )
    print(f"plan: {plan.describe()}", flush=True)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    clusters: dict[int, tuple[Any, Any]] = {}
    for n in args.workers:
        cluster = LocalCluster(
            n_workers=n, threads_per_worker=1, processes=True, dashboard_address=":0", memory_limit=0
        )
        client = Client(cluster)
        client.run(_warm, "annbatch_nb.distributed")
        clusters[n] = (cluster, client)
    configs: list[str] = ["local", *(f"dask-{n}" for n in args.workers)]
    times: dict[str, list[float]] = {c: [] for c in configs}
    reference: str | None = None
    try:
        # read every input once so that every configuration sees a warm page cache
        for p in inputs:
            with open(p, "rb") as f:
                while f.read(1 << 24):
                    pass
        for r in range(args.repeats):
            order = configs[r % len(configs) :] + configs[: r % len(configs)]
            for config in order:
                out = work / f"{config}-{r}.zarr"
                shutil.rmtree(out, ignore_errors=True)
                load = os.getloadavg()[0]
                t = time.perf_counter()
                if config == "local":
                    result = plan.run(out, progress=False, workers=1)
                else:
                    result = plan.run(out, progress=False, client=clusters[int(config.split("-")[1])][1])
                seconds = time.perf_counter() - t
                digest = _digest(out)
                reference = reference or digest
                same = "same bytes" if digest == reference else "DIFFERENT BYTES"
                print(
                    f"repeat {r} {config:>7}: {seconds:6.2f} s  ({result.workers} worker(s), {same}, "
                    f"load before {load:.2f})",
                    flush=True,
                )
                times[config].append(seconds)
                shutil.rmtree(out, ignore_errors=True)
        worker_rss = {
            n: sorted(v / 1024 for v in client.run(_worker_peak_kb).values())
            for n, (_, client) in clusters.items()
        }
    finally:
        for cluster, client in clusters.values():
            client.close()
            cluster.close()
    med = {c: statistics.median(v) for c, v in times.items()}
    summary = {
        "data": str(args.data),
        "n_obs": plan.n_obs,
        "n_datasets": plan.n_datasets,
        "dataset_rows": plan.dataset_rows,
        "predicted_peak_bytes": plan.peak_memory_bytes,
        "times": times,
        "medians": med,
        "worker_peak_rss_mb": worker_rss,
    }
    print()
    print("| configuration | runs | median s | min-max s |")
    print("| --- | --- | --- | --- |")
    for c in configs:
        print(f"| {c} | {len(times[c])} | {med[c]:.2f} | {min(times[c]):.2f}-{max(times[c]):.2f} |")
    if 1 in args.workers and 2 in args.workers:
        ratio = med["dask-2"] / med["dask-1"]
        summary["ratio_2_over_1"] = ratio
        print(f"\n2 workers / 1 worker (medians): {ratio:.2f}  (speed-up {1 / ratio:.2f}x)")
    if 1 in args.workers:
        summary["ratio_dask1_over_local"] = med["dask-1"] / med["local"]
        print(f"dask 1 worker / local engine (medians): {med['dask-1'] / med['local']:.2f}")
    print(f"worker peak RSS MB by cluster size: {worker_rss}")
    return summary


def _worker_peak_kb() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


# --------------------------------------------------------------------------------------------------
# Part 2: planning a synthetic 100M-cell atlas
# --------------------------------------------------------------------------------------------------
def synthetic_atlas(n_files: int, cells: int, n_genes: int, panels: int = 4) -> list[Any]:
    """Scanned-input records of an atlas (no files): CSR float32, ~2,000 stored values per cell, a few
    gene panels that are shifted windows of one reference gene list, two obs columns."""
    import numpy as np
    import pandas as pd

    from annbatch_nb.sources import ColumnSpec, SourceInfo

    genes = pd.Index([f"ENSG{i:011d}" for i in range(n_genes + 500 * panels)], dtype=object)
    obs = {
        "cell_type": ColumnSpec("categorical", "object", tuple(f"type{i}" for i in range(50)), False),
        "n_counts": ColumnSpec("numeric", "<f4"),
    }
    infos = []
    for f in range(n_files):
        start = (f % panels) * 500
        var = pd.Index(np.asarray(genes[start : start + n_genes]).copy(), dtype=object)
        infos.append(
            SourceInfo(
                path=f"/atlas/file_{f:04d}.h5ad",
                display=f"file_{f:04d}.h5ad",
                format="h5ad",
                n_obs=cells,
                n_vars=n_genes,
                x_kind="csr",
                dtype=np.dtype(np.float32),
                nnz=cells * 2000,
                var_names=var,
                obs_names=pd.RangeIndex(cells),
                obs_columns=obs,
                size_bytes=cells * 2000 * 6,
                mtime=1.7e9 + f,
                reader="h5py",
            )
        )
    return infos


def plan_child(args: argparse.Namespace) -> None:
    """In a fresh process: build the records, plan, compute every prediction; print JSON."""
    import pickle

    from annbatch_nb.distributed import worker_plan
    from annbatch_nb.plan import Parameters, build_plan

    t0 = time.perf_counter()
    infos = synthetic_atlas(args.atlas_files, args.atlas_cells, args.atlas_genes)
    t1 = time.perf_counter()
    rss_records = _peak_rss_mb()
    plan = build_plan(infos, Parameters.validated(shuffle_chunk_size=1000, dataset_size="auto", seed=0))
    t2 = time.perf_counter()
    summary = plan.summary()  # quality, memory, time, output bytes
    plan.describe()
    t3 = time.perf_counter()
    shipped = len(pickle.dumps(worker_plan(plan), protocol=5))
    print(
        json.dumps(
            {
                "files": args.atlas_files,
                "n_obs": plan.n_obs,
                "n_vars": plan.n_vars,
                "n_runs": len(plan.runs),
                "n_datasets": plan.n_datasets,
                "dataset_rows": plan.dataset_rows,
                "records_seconds": t1 - t0,
                "build_plan_seconds": t2 - t1,
                "predictions_seconds": t3 - t2,
                "plan_seconds": t3 - t1,
                "peak_rss_mb": _peak_rss_mb(),
                "peak_rss_after_records_mb": rss_records,
                "worker_plan_pickled_mb": shipped / 2**20,
                "predicted_peak_memory_bytes": summary["peak_memory_bytes"],
                "predicted_seconds_one_process": summary["seconds"],
                "quality": summary["quality"],
            }
        )
    )


def bench_plan(args: argparse.Namespace) -> dict[str, Any]:
    cmd = [
        sys.executable,
        __file__,
        "--plan-child",
        "--atlas-files",
        str(args.atlas_files),
        "--atlas-cells",
        str(args.atlas_cells),
        "--atlas-genes",
        str(args.atlas_genes),
    ]
    t = time.perf_counter()
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    wall = time.perf_counter() - t
    res = json.loads(out.stdout.strip().splitlines()[-1])
    res["process_seconds"] = wall
    print(
        f"\nplan of a synthetic atlas: {res['files']:,} files, {res['n_obs']:,} cells x "
        f"{res['n_vars']:,} genes -> {res['n_datasets']} datasets of {res['dataset_rows']:,} rows "
        f"({res['n_runs']:,} runs)"
    )
    print(
        f"  records {res['records_seconds']:.2f} s; build_plan {res['build_plan_seconds']:.2f} s; "
        f"predictions {res['predictions_seconds']:.2f} s; plan total {res['plan_seconds']:.2f} s "
        f"(process incl. imports {wall:.1f} s)"
    )
    print(
        f"  peak RSS {res['peak_rss_mb']:.0f} MB (after building the records "
        f"{res['peak_rss_after_records_mb']:.0f} MB); plan shipped to each worker "
        f"{res['worker_plan_pickled_mb']:.1f} MB pickled"
    )
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(DEFAULT_DATA), help="directory of .h5ad (or .zarr) inputs")
    ap.add_argument("--workdir", default=str(HERE / "work-distributed"), help="where outputs are written")
    ap.add_argument("--dataset-size", type=int, default=50_000, help="rows per dataset (default 50000)")
    ap.add_argument("--shuffle-chunk-size", type=int, default=1000)
    ap.add_argument("--workers", default="1,2", help="cluster sizes to compare (default 1,2)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--plan-only", action="store_true", help="only the synthetic atlas plan")
    ap.add_argument("--no-plan", action="store_true", help="skip the synthetic atlas plan")
    ap.add_argument("--atlas-files", type=int, default=2000)
    ap.add_argument("--atlas-cells", type=int, default=50_000, help="cells per file (default 50000)")
    ap.add_argument("--atlas-genes", type=int, default=20_000)
    ap.add_argument("--json", default=None, help="also write the results to this file")
    ap.add_argument("--plan-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.plan_child:
        plan_child(args)
        return 0
    args.workers = [int(w) for w in args.workers.split(",")]
    results: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "load_at_start": os.getloadavg()}}
    if not args.plan_only:
        results["workers"] = bench_workers(args)
    if not args.no_plan:
        results["plan"] = bench_plan(args)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

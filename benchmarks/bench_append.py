"""Appending cells to a finished collection: annbatch-nb's append vs a full rewrite vs annbatch's append.

Setup (not timed): a collection of the first ``--old`` input files, written once by annbatch-nb and once by
annbatch. Then, per repeat, each engine works on a fresh copy of its base collection (copy not timed) in a
fresh subprocess (wall time of the call, peak RSS via ``wait4``):

nb-append-auto   ``annbatch_nb.append(new, copy)``: rewrite="auto" (quality >= 95 % of a full rewrite's)
nb-append-0      ``annbatch_nb.append(new, copy, rewrite=0)``: new cells into new datasets only
nb-rewrite       ``annbatch_nb.shuffle(old + new, fresh)``: the full rewrite an append avoids
annbatch-append  annbatch 0.3.1 ``DatasetCollection(copy).add_adatas(new, ...)`` (its own venv)

Also printed: bytes written by each (files of the output created or rewritten by the run), rows of the
largest dataset after the append (annbatch's grow past ``dataset_size``; ours stay within it), and
annbatch-nb's stated cost ratio and exact quality of each append.

Default data: the 8 x 50,000-cell h5ad files of ``bench_shuffle.py`` (``make data``), 6 old + 2 new.
Smoke run::

    python benchmarks/bench_append.py --data benchmarks/data/h5ad-c10000-g5000-d0.02-f0.9-s0 --old 3 \
        --dataset-size 5000 --repeats 1
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ENGINES = ("nb-append-auto", "nb-append-0", "nb-rewrite", "annbatch-append")


def _worker(spec: dict[str, Any]) -> dict[str, Any]:
    p = spec["params"]
    engine = spec["engine"]
    if engine in ("annbatch-base", "annbatch-append"):
        import numpy as np
        from annbatch import DatasetCollection

        t0 = time.perf_counter()
        DatasetCollection(spec["output"]).add_adatas(
            spec["inputs"],
            shuffle_chunk_size=p["shuffle_chunk_size"],
            dataset_size=p["dataset_size"],
            n_obs_per_chunk=p["n_obs_per_chunk"],
            rng=np.random.default_rng(p["seed"]),
        )
        return {"seconds": time.perf_counter() - t0}
    import annbatch_nb as abn

    t0 = time.perf_counter()
    if engine in ("nb-base", "nb-rewrite"):
        abn.shuffle(
            spec["inputs"],
            spec["output"],
            shuffle_chunk_size=p["shuffle_chunk_size"],
            dataset_size=p["dataset_size"],
            n_obs_per_chunk=p["n_obs_per_chunk"],
            seed=p["seed"],
            progress=False,
        )
        return {"seconds": time.perf_counter() - t0}
    rewrite = "auto" if engine == "nb-append-auto" else 0
    plan = abn.plan_append(spec["inputs"], spec["output"], rewrite=rewrite, new_genes="drop")
    res = plan.run(progress=False)
    return {
        "seconds": time.perf_counter() - t0,
        "cost_ratio": plan.cost_ratio,
        "quality": plan.quality.score,
        "full_rewrite_quality": plan.full_rewrite_quality.score,
        "rewritten": len(plan.rewritten),
        "old_datasets": plan.n_old_datasets,
        "added": plan.n_added,
        "summary": str(res),
    }


def _written_bytes(path: Path, since: float) -> int:
    """Bytes of the files under ``path`` created or rewritten after ``since`` (what a run wrote)."""
    if not path.exists():
        return 0
    return sum(st.st_size for f in path.rglob("*") if f.is_file() and (st := f.stat()).st_mtime >= since)


def _max_rows(path: Path) -> int:
    rows = []
    for d in path.iterdir():
        if d.name.startswith("dataset_"):
            meta = json.loads((d / "X" / "zarr.json").read_text())
            shape = meta.get("attributes", {}).get("shape") or meta["shape"]
            rows.append(int(shape[0]))
    return max(rows)


def _run(
    engine: str, python: str, inputs: list[str], output: Path, params: dict[str, Any], tmp: Path
) -> dict:
    from bench_shuffle import spawn

    spec = {"engine": engine, "inputs": inputs, "output": str(output), "params": params}
    spec_path = tmp / f"{engine}.json"
    result_path = tmp / f"{engine}.result.json"
    spec["result"] = str(result_path)
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ, TQDM_DISABLE="1")
    env.pop("PYTHONPATH", None)
    since = time.time() - 1.0  # mtime granularity
    sp = spawn(
        [python, str(Path(__file__).resolve()), "--worker", str(spec_path)], env, tmp / "log.txt", 3600
    )
    if sp.code != 0 or not result_path.exists():
        raise SystemExit(f"{engine} failed:\n{(tmp / 'log.txt').read_text()[-3000:]}")
    res = json.loads(result_path.read_text())
    res.update(peak_rss=sp.maxrss, written=_written_bytes(output, since), max_rows=_max_rows(output))
    res["other_cpu_share"] = sp.other_cpu_share
    return res


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark (see the module docstring)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--data", default=str(HERE / "data" / "h5ad-c50000-g20000-d0.02-f0.9-s0"))
    ap.add_argument("--old", type=int, default=6, help="files in the base collection (the rest are appended)")
    ap.add_argument("--dataset-size", type=int, default=50_000)
    ap.add_argument("--shuffle-chunk-size", type=int, default=1000)
    ap.add_argument("--n-obs-per-chunk", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workdir", default=str(HERE / "scratch" / "append"))
    ap.add_argument("--engines", default=",".join(ENGINES))
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)
    if args.worker:
        spec = json.loads(Path(args.worker).read_text())
        Path(spec["result"]).write_text(json.dumps(_worker(spec)))
        return 0

    sys.path.insert(0, str(HERE))
    from bench_shuffle import ensure_annbatch_venv

    files = sorted(str(p) for p in Path(args.data).iterdir() if p.suffix in (".h5ad", ".zarr"))
    old, new = files[: args.old], files[args.old :]
    if not new:
        raise SystemExit(f"{args.data} has {len(files)} files; --old must leave some to append")
    params = {
        "shuffle_chunk_size": args.shuffle_chunk_size,
        "dataset_size": args.dataset_size,
        "n_obs_per_chunk": args.n_obs_per_chunk,
        "seed": 0,
    }
    engines = args.engines.split(",")
    pythons = {"nb": sys.executable}
    if "annbatch-append" in engines:
        pythons["annbatch"] = ensure_annbatch_venv()
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    bases = {"nb": work / "base-nb.zarr", "annbatch": work / "base-annbatch.zarr"}
    print(f"base: {len(old)} files -> {bases['nb'].name} / {bases['annbatch'].name}; append {len(new)} files")
    _run("nb-base", pythons["nb"], old, bases["nb"], params, work)
    if "annbatch" in pythons:
        _run("annbatch-base", pythons["annbatch"], old, bases["annbatch"], params, work)
    for f in old + new:  # warm cache for everyone
        subprocess.run(["cat", f], stdout=subprocess.DEVNULL, check=False)

    results: dict[str, list[dict[str, Any]]] = {e: [] for e in engines}
    for r in range(args.repeats):
        for i in range(len(engines)):
            engine = engines[(i + r) % len(engines)]  # rotate the order
            out = work / f"{engine}.zarr"
            shutil.rmtree(out, ignore_errors=True)
            if engine == "nb-rewrite":
                res = _run(engine, pythons["nb"], old + new, out, params, work)
            else:
                base = bases["annbatch" if engine == "annbatch-append" else "nb"]
                shutil.copytree(base, out)
                py = pythons["annbatch" if engine == "annbatch-append" else "nb"]
                res = _run(engine, py, new, out, params, work)
            shutil.rmtree(out, ignore_errors=True)
            results[engine].append(res)
            print(
                f"  repeat {r} {engine:16s} {res['seconds']:7.2f} s  "
                f"peak {res['peak_rss'] / 2**30:5.2f} GiB  "
                f"wrote {res['written'] / 2**20:8.1f} MiB  largest dataset {res['max_rows']:,} rows  "
                f"(other load {res['other_cpu_share']:.0%})",
                flush=True,
            )
    print()
    med = {e: statistics.median(x["seconds"] for x in results[e]) for e in engines}
    print(
        f"{'engine':18s} {'median s':>9s} {'peak GiB':>9s} {'written MiB':>12s} {'max rows':>9s}  vs rewrite"
    )
    for e in engines:
        rows = results[e]
        rss = statistics.median(x["peak_rss"] for x in rows) / 2**30
        written = statistics.median(x["written"] for x in rows) / 2**20
        ratio = med[e] / med["nb-rewrite"] if "nb-rewrite" in med else float("nan")
        print(f"{e:18s} {med[e]:9.2f} {rss:9.2f} {written:12.1f} {rows[0]['max_rows']:9,d}  {ratio:8.2f}x")
        if "cost_ratio" in rows[0]:
            x = rows[0]
            print(
                f"{'':18s} rewrote {x['rewritten']} of {x['old_datasets']} datasets, added {x['added']}; "
                f"stated I/O {x['cost_ratio']:.0%} of a rewrite; quality {x['quality']:.3f} "
                f"(full rewrite {x['full_rewrite_quality']:.3f})"
            )
    if "annbatch-append" in med:
        for e in ("nb-append-auto", "nb-append-0"):
            if e in med:
                print(f"{e} / annbatch-append: {med[e] / med['annbatch-append']:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"params": params, "old": old, "new": new, "results": results}))
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Where annbatch-nb's wall time goes: one run under py-spy, main-thread samples grouped into stages.

py-spy samples every thread (``--idle``, so waits count: wall time, not CPU time) without stopping the
process (``--nonblocking``); the main thread's samples inside ``annbatch_nb.shuffle`` are assigned to the
first stage rule that matches their stack (function names, so it survives line-number changes). py-spy
itself takes some CPU, so the run is slower than in ``bench_shuffle.py``; read the shares, not the seconds.

Usage::

    python benchmarks/profile_stages.py                          # default data set, h5ad, warm cache
    python benchmarks/profile_stages.py --format zarr --nb-rev HEAD
    python benchmarks/profile_stages.py --raw run.txt            # summarise an existing py-spy raw file

py-spy is taken from PATH, else installed into ``benchmarks/.venv-annbatch`` (``pip install py-spy``).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

#: (stage, functions any of which in the stack selects it); the first matching rule wins, so specific
#: sub-steps come before the step that contains them.
STAGES: list[tuple[str, tuple[str, ...]]] = [
    ("plan: scan inputs, join var/obs, assign runs", ("plan",)),
    ("open inputs / output, locks", ("_open_for_plan", "open_output", "acquire_lock", "release_lock")),
    ("write obs/var (anndata write_elem)", ("DatasetWriter.write_frames",)),
    ("build obs (read columns, names, permute)", ("_build_obs", "_LocationIndexer.__getitem__")),
    ("read X: remap gene indices", ("_remap_in_place", "_remap_dense")),
    ("read X: check / sort rows", ("_rows_sorted", "_sort_rows")),
    ("read X: h5py / zarr reads", ("_read_csr", "_read_dense")),
    ("write X: compress inner chunks (blosc)", ("ShardBuilder.add",)),
    ("write X: assemble shards (join, index, crc32c)", ("ShardBuilder.finish",)),
    ("write X: store shard files", ("ShardedArray.put",)),
    ("write X: gather / permute rows", ("_write_csr_x", "_write_dense_x", "_gather_rows")),
    (
        "metadata: create arrays, indptr, manifest, completion, commit",
        ("DatasetWriter.__init__", "mark_complete", "commit", "_write_manifest", "Array.__setitem__"),
    ),
]
OTHER = "other (permutation, out indptr, glue)"


def _function(frame: str) -> str:
    """``name (file:line)`` -> ``name``."""
    return frame.rsplit(" (", 1)[0]


def classify(frames: list[str]) -> str:
    """The stage of one main-thread stack (frames outermost first, already cut at ``shuffle``)."""
    names = {_function(f) for f in frames}
    for stage, functions in STAGES:
        if names.intersection(functions):
            return stage
    return OTHER


def summarise(raw: Path, rate: float) -> list[tuple[str, int, float]]:
    """Stage, samples and seconds of the main thread inside ``annbatch_nb.shuffle`` from a py-spy raw file."""
    counts: collections.Counter[str] = collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        frames = stack.split(";")
        if not frames or ("MainThread" not in frames[0] and not re.fullmatch(r"thread \(\d+\)", frames[0])):
            continue
        starts = [i for i, f in enumerate(frames) if f.startswith("shuffle (") and "annbatch_nb" in f]
        if not starts:
            continue
        counts[classify(frames[starts[0] + 1 :])] += int(n)
    order = [s for s, _ in STAGES] + [OTHER]
    return [(s, counts[s], counts[s] / rate) for s in order if counts[s]]


def print_table(rows: list[tuple[str, int, float]], title: str) -> None:
    """Markdown table of the stages with their share of the sampled wall time."""
    total = sum(n for _, n, _ in rows) or 1
    print(f"\n{title}\n")
    print("| stage | s (sampled) | share |")
    print("|---|---|---|")
    for stage, n, secs in sorted(rows, key=lambda r: -r[1]):
        print(f"| {stage} | {secs:.2f} | {100 * n / total:.0f}% |")
    print(f"| total in shuffle() | {sum(s for _, _, s in rows):.2f} | 100% |")


def find_py_spy() -> str:
    """py-spy on PATH, else installed into annbatch's venv."""
    found = shutil.which("py-spy")
    if found:
        return found
    from bench_shuffle import ensure_annbatch_venv

    python = Path(ensure_annbatch_venv())
    exe = python.parent / "py-spy"
    if not exe.exists():
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", "py-spy"], check=True)
    return str(exe)


def main(argv: list[str] | None = None) -> int:
    """Record (or read) a py-spy profile of one annbatch-nb run and print the stage table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--raw", type=Path, help="summarise this py-spy raw file instead of running")
    ap.add_argument("--format", choices=("h5ad", "zarr"), default="h5ad")
    ap.add_argument("--cache", choices=("cold", "warm"), default="warm")
    ap.add_argument("--files", type=int, default=8)
    ap.add_argument("--cells", type=int, default=50_000)
    ap.add_argument("--genes", type=int, default=20_000)
    ap.add_argument("--density", type=float, default=0.02)
    ap.add_argument("--shuffle-chunk-size", type=int, default=1000)
    ap.add_argument("--dataset-size", type=int, default=100_000)
    ap.add_argument("--n-obs-per-chunk", type=int, default=64)
    ap.add_argument("--shard-size", default="1GB")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rate", type=float, default=100, help="py-spy samples per second")
    ap.add_argument("--nb-rev", default=None, help="profile annbatch_nb/ at this git revision")
    ap.add_argument("--keep", type=Path, help="also save the raw py-spy file here")
    args = ap.parse_args(argv)
    if args.raw:
        print_table(summarise(args.raw, args.rate), f"{args.raw}")
        return 0

    sys.path.insert(0, str(HERE))
    from bench_shuffle import export_revision, prepare_cache
    from make_data import make_dataset

    inputs = [
        str(p)
        for p in make_dataset(
            files=args.files,
            cells=args.cells,
            genes=args.genes,
            density=args.density,
            fmt=args.format,
            seed=args.seed,
        )
    ]
    py_spy = find_py_spy()
    env = dict(os.environ, TQDM_DISABLE="1")
    env.pop("PYTHONPATH", None)
    label = "working tree"
    if args.nb_rev:
        workdir = HERE / "scratch"
        workdir.mkdir(parents=True, exist_ok=True)
        snapshot, commit = export_revision(args.nb_rev, workdir)
        env["PYTHONPATH"] = str(snapshot)
        label = commit[:7]
    python = str(REPO / ".venv" / "bin" / "python")
    with tempfile.TemporaryDirectory(dir=HERE / "scratch" if (HERE / "scratch").is_dir() else None) as tmp:
        spec = {
            "engine": "annbatch-nb",
            "inputs": inputs,
            "output": str(Path(tmp) / "collection.zarr"),
            "result": str(Path(tmp) / "result.json"),
            "params": {
                "shuffle_chunk_size": args.shuffle_chunk_size,
                "dataset_size": args.dataset_size,
                "n_obs_per_chunk": args.n_obs_per_chunk,
                "shard_size": args.shard_size,
                "seed": args.seed,
            },
        }
        (Path(tmp) / "spec.json").write_text(json.dumps(spec))
        raw = Path(tmp) / "profile.txt"
        prepare_cache(args.cache, inputs)
        cmd = [py_spy, "record", "--nonblocking", "--idle", "--threads", "--rate", str(int(args.rate))]
        cmd += ["--format", "raw", "-o", str(raw), "--", python, str(HERE / "bench_shuffle.py")]
        subprocess.run([*cmd, "--worker", str(Path(tmp) / "spec.json")], env=env, check=True)
        result = json.loads((Path(tmp) / "result.json").read_text())
        if not result.get("ok"):
            print(result.get("traceback", result), file=sys.stderr)
            return 1
        if args.keep:
            shutil.copy(raw, args.keep)
        per_dataset = [round(s, 2) for s in result["dataset_seconds"]]
        title = (
            f"annbatch-nb {label}, {args.format} inputs, {args.cache} cache: shuffle() took "
            f"{result['seconds']:.2f} s under py-spy; per dataset {per_dataset} s"
        )
        print_table(summarise(raw, args.rate), title)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Command line: ``annbatch-nb plan|shuffle|validate|demo``, thin shells over the Python API.

Errors a user can cause print one line (``error: <file>: <problem>``) and exit with status 2; ``--debug``
shows the traceback. A failed validation exits with status 1.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import traceback
from collections.abc import Iterator, Sequence
from typing import Any

from dask.utils import format_bytes

from . import __version__
from .errors import AnnbatchNBError, CancelledError, ParameterError

__all__ = ["main"]

EXIT_INVALID = 1
EXIT_USAGE = 2
EXIT_CANCELLED = 130


def _size(text: str) -> int | str:
    """Rows (digits) or a byte size string; validated later by the planner."""
    return int(text) if text.strip().isdigit() else text


def _add_plan_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "inputs", nargs="+", metavar="INPUT", help=".h5ad files, .zarr stores, directories or globs"
    )
    p.add_argument(
        "--shuffle-chunk-size", type=int, default=1000, metavar="N", help="rows per run (default 1000)"
    )
    p.add_argument(
        "--dataset-size",
        type=_size,
        default=None,
        metavar="ROWS|SIZE",
        help="rows per output dataset, a size like 2GB of uncompressed X+obs, or auto (default: the largest "
        "dataset whose predicted peak fits --memory-fraction of this machine's memory)",
    )
    p.add_argument(
        "--n-obs-per-chunk", type=int, default=64, metavar="N", help="rows per zarr chunk (default 64)"
    )
    p.add_argument("--shard-size", default="1GB", metavar="SIZE", help="bytes per zarr shard (default 1GB)")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: drawn and recorded)")
    p.add_argument(
        "--var-join", choices=["outer", "inner"], default="outer", help="gene join (default outer)"
    )
    p.add_argument("--dtype", default=None, help="output X dtype (default: result type of the inputs)")
    p.add_argument(
        "--assignment",
        choices=["balanced", "uniform"],
        default="balanced",
        help="runs to datasets: balanced (every dataset gets every input's share; default) or uniform",
    )
    p.add_argument(
        "--memory-fraction",
        type=float,
        default=0.5,
        help="memory share for --dataset-size auto (default 0.5)",
    )
    p.add_argument("--calibrate", action="store_true", help="measure this machine on the inputs first (~3 s)")
    _add_virtualize_arg(p)


_VIRTUALIZE = {"auto": "auto", "yes": True, "no": False}


def _add_rewrite_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--rewrite",
        type=_rewrite,
        default="auto",
        metavar="SHARE|auto",
        help="appending: share of the existing datasets reshuffled with the new cells (0 = new datasets "
        "only, 1 = everything); auto (default): the least whose quality is >= 95%% of a full rewrite's",
    )
    p.add_argument(
        "--drop-new-genes",
        action="store_true",
        help="appending: leave out genes of INPUTs that the collection lacks (default: refuse)",
    )


def _add_virtualize_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--virtualize",
        choices=list(_VIRTUALIZE),
        default="auto",
        help="read .h5ad inputs through a virtualizarr manifest: auto (h5py for local files and s3:// "
        "objects up to 64 MiB, the manifest for larger ones; default), yes, or no (h5py)",
    )


def _plan_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    from .plan import DEFAULT_DATASET_SIZE

    return {
        "shuffle_chunk_size": args.shuffle_chunk_size,
        "dataset_size": args.dataset_size if args.dataset_size is not None else DEFAULT_DATASET_SIZE,
        "n_obs_per_chunk": args.n_obs_per_chunk,
        "shard_size": args.shard_size,
        "seed": args.seed,
        "var_join": args.var_join,
        "dtype": args.dtype,
        "assignment": args.assignment,
        "memory_fraction": args.memory_fraction,
        "calibration": True if args.calibrate else None,
        "virtualize": _VIRTUALIZE[args.virtualize],
    }


def _rewrite(text: str) -> float | str:
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a share in [0, 1] or auto, got {text!r}") from None


def _append_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The options an append takes; the collection keeps its own shuffle parameters."""
    from .errors import ParameterError

    extra = ["-o", "x"] if args.command == "shuffle" else []
    defaults = build_parser().parse_args([args.command, "x", *extra])
    names = ["shuffle_chunk_size", "dataset_size", "n_obs_per_chunk", "shard_size", "var_join", "dtype"]
    names += ["assignment", "memory_fraction", "calibrate"]
    changed = [n for n in names if getattr(args, n) != getattr(defaults, n)]
    if changed:
        flags = ", ".join("--" + n.replace("_", "-") for n in changed)
        raise ParameterError(f"{flags} cannot be set when appending: the collection keeps its own parameters")
    return {
        "rewrite": args.rewrite,
        "seed": args.seed,
        "new_genes": "drop" if args.drop_new_genes else "error",
        "virtualize": _VIRTUALIZE[args.virtualize],
    }


def _cmd_plan(args: argparse.Namespace) -> int:
    from .plan import plan, scan_table, var_overlap

    if args.append_to:
        from .append import plan_append

        ap = plan_append(args.inputs, args.append_to, **_append_kwargs(args))
        print(json.dumps(ap.summary(), indent=2) if args.json else ap.describe())
        return 0
    p = plan(args.inputs, **_plan_kwargs(args))
    if args.json:
        print(json.dumps(p.summary(), indent=2))
    else:
        print(p.describe())
        table = scan_table(p.inputs)
        for info, row in zip(p.inputs, table.itertuples(), strict=True):
            chunk = f"chunks of {info.x_chunk:,}" if info.x_chunk else "contiguous"
            print(
                f"  {info.display}: {info.n_obs:,} cells x {info.n_vars:,} genes, "
                f"{info.x_kind} {info.dtype.name} ({row.density:.1%} stored), "
                f"{format_bytes(info.size_bytes)} on disk, {chunk}, {info.x_compression}; "
                f"{row.genes_only_here:,} genes in no other input"
            )
        overlap = var_overlap(p.inputs)
        print(f"  genes: {overlap.n_union:,} in any input, {overlap.n_intersection:,} in every input")
    return 0


@contextlib.contextmanager
def _executor(args: argparse.Namespace) -> Iterator[dict[str, Any]]:
    """How datasets are written: local worker processes or a dask cluster (``--scheduler``, ``--cluster``)."""
    if args.scheduler is None and args.cluster is None:
        yield {"workers": args.workers}
        return
    from .distributed import cluster_client

    n_workers = None if args.workers == "auto" else args.workers
    with cluster_client(args.scheduler, n_workers) as client:
        if args.no_progress and not args.quiet:  # the progress bars print it otherwise
            print(f"dask: dashboard {client.dashboard_link}", file=sys.stderr)
        yield {"client": client, "retries": args.retries}


def _cmd_shuffle(args: argparse.Namespace) -> int:
    from .plan import plan

    if args.scheduler is not None and args.workers != "auto":  # before anything is planned or opened
        raise ParameterError(
            "--workers sizes a local cluster (--cluster local) or the local process pool; a running "
            "scheduler (--scheduler) brings its own workers"
        )
    if args.append:
        from .append import already_appended, append, pending_commit, plan_append

        kwargs = _append_kwargs(args)
        if args.restart:
            raise ParameterError("--restart cannot be combined with --append")
        with _executor(args) as run:
            if pending_commit(args.output) or already_appended(args.inputs, args.output):
                res = append(args.inputs, args.output, progress=not args.no_progress, **run, **kwargs)
            else:
                ap = plan_append(args.inputs, args.output, **kwargs)
                if not args.quiet:
                    print(f"plan: {ap.describe()}", file=sys.stderr)
                res = ap.run(progress=not args.no_progress, **run)
        if res.finished_interrupted:
            print("finished the commit of an interrupted append")
        already = "the inputs are already in the collection, nothing to do"
        return _report(args, res, already)

    p = plan(args.inputs, **_plan_kwargs(args))
    if not args.quiet:
        print(f"plan: {p.describe()}", file=sys.stderr)
    with _executor(args) as run:
        result = p.run(args.output, progress=not args.no_progress, restart=args.restart, **run)
    return _report(args, result, "already complete, nothing to do")


def _report(args: argparse.Namespace, result: Any, already: str) -> int:
    """Print what a shuffle or an append did."""
    if result.already_complete:
        print(f"{args.output}: {already}")
        return 0
    if result.datasets_resumed:
        print(f"resumed: {result.datasets_resumed} of {result.n_datasets} datasets already complete")
    print(f"wrote {result}")
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    from .collection import validate

    if args.recorded and args.inputs:
        from .errors import ParameterError

        raise ParameterError("give --inputs or --recorded-inputs, not both")
    report = validate(
        args.output,
        inputs="recorded" if args.recorded else args.inputs,
        sample=args.sample,
        virtualize=_VIRTUALIZE[args.virtualize],
    )
    print(report)
    return 0 if report.ok else EXIT_INVALID


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    demo = run_demo(args.dir, progress=not args.no_progress)
    print(f"inputs:     {len(demo.inputs)} files in {demo.inputs[0].parent}")
    print(f"collection: {demo.output}")
    print(f"shuffle:    {demo.result}")
    print(f"validate:   {demo.report}")
    print()
    print("Stream it:  annbatch.Loader(batch_size=256, chunk_size=32, preload_nchunks=8)")
    print(f"              .use_collection(annbatch.DatasetCollection({str(demo.output)!r}, mode='r'))")
    print(f"Plan yours: annbatch-nb plan {demo.inputs[0].parent} --calibrate")
    return 0 if demo.report.ok else EXIT_INVALID


def _notes_as_lines() -> None:
    """Print annbatch-nb's notes (an input read with h5py instead of virtualized) as ``note: ...`` lines."""
    import warnings

    from .sources import VirtualizationFallback

    default = warnings.showwarning
    if getattr(default, "_annbatch_nb", False):
        return

    def show(message: Any, category: type[Warning], *args: Any, **kwargs: Any) -> None:
        if issubclass(category, VirtualizationFallback):
            print(f"note: {message}", file=sys.stderr)
        else:
            default(message, category, *args, **kwargs)

    show._annbatch_nb = True  # type: ignore[attr-defined]
    warnings.showwarning = show


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``annbatch-nb``."""
    parser = argparse.ArgumentParser(
        prog="annbatch-nb", description="Preshuffle AnnData files into annbatch collections."
    )
    parser.add_argument("--version", action="version", version=f"annbatch-nb {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("plan", help="describe what a shuffle would do, without moving data")
    _add_plan_args(p)
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument(
        "--append-to",
        metavar="COLLECTION",
        default=None,
        help="plan adding INPUTs to this finished collection: cost (I/O vs a rewrite) and mixing quality",
    )
    _add_rewrite_arg(p)
    p.set_defaults(func=_cmd_plan)

    p = sub.add_parser("shuffle", help="write an annbatch collection (resumes an interrupted run)")
    _add_plan_args(p)
    p.add_argument("-o", "--output", required=True, help="collection path (.zarr)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("-q", "--quiet", action="store_true", help="do not print the plan")
    p.add_argument(
        "--workers",
        type=lambda v: v if v == "auto" else int(v),
        default="auto",
        metavar="N|auto",
        help="processes writing datasets side by side (default auto: cores, datasets and memory allow); "
        "with --cluster local: the local dask cluster's worker processes (default: one per core)",
    )
    dask = p.add_argument_group(
        "dask.distributed",
        "write every output dataset as a task on a dask cluster; the workers need the inputs and the output "
        "at the same paths (a shared filesystem) or s3:// URLs; same bytes as a local run",
    )
    where = dask.add_mutually_exclusive_group()
    where.add_argument(
        "--scheduler",
        default=None,
        metavar="ADDRESS",
        help="a running dask scheduler, e.g. tcp://10.0.0.5:8786",
    )
    where.add_argument(
        "--cluster",
        choices=["local"],
        default=None,
        help="start a dask LocalCluster on this machine (--workers processes, one thread each)",
    )
    dask.add_argument(
        "--retries",
        type=int,
        default=2,
        metavar="N",
        help="times a failed dataset task is run again (default 2; a killed worker's task is rerun anyway)",
    )
    p.add_argument(
        "--restart",
        action="store_true",
        help="discard an earlier annbatch-nb run at OUTPUT (only what it wrote)",
    )
    p.add_argument(
        "--append",
        action="store_true",
        help="add INPUTs to the finished collection OUTPUT, mixed in, datasets kept <= its dataset size "
        "(re-run to resume; the collection's parameters are kept)",
    )
    _add_rewrite_arg(p)
    p.set_defaults(func=_cmd_shuffle)

    p = sub.add_parser("validate", help="check a collection (and, with --inputs, its content)")
    p.add_argument("output", help="collection path")
    p.add_argument("--inputs", nargs="+", default=None, metavar="INPUT", help="compare every cell with these")
    p.add_argument(
        "--recorded-inputs",
        dest="recorded",
        action="store_true",
        help="compare every cell with the inputs the collection's manifest lists (after appends too)",
    )
    p.add_argument("--sample", type=int, default=None, metavar="N", help="compare N cells per dataset")
    _add_virtualize_arg(p)
    p.set_defaults(func=_cmd_validate)

    p = sub.add_parser("demo", help="make demo data, shuffle and validate it")
    p.add_argument("--dir", default="demo-data", help="working directory (default demo-data)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line.

    Parameters
    ----------
    argv
        Arguments (default: ``sys.argv[1:]``).

    Returns
    -------
    int
        Exit status: 0 success, 1 invalid collection, 2 bad input or usage, 130 cancelled.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    _notes_as_lines()
    try:
        return int(args.func(args))
    except CancelledError as e:
        print(f"cancelled: {e}", file=sys.stderr)
        return EXIT_CANCELLED
    except BrokenPipeError:  # output piped into head & co.
        return 0
    except KeyboardInterrupt:
        print("interrupted; re-run the same command to resume", file=sys.stderr)
        return EXIT_CANCELLED
    except AnnbatchNBError as e:
        if args.debug:
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as e:
        if args.debug:
            raise
        print(
            f"error: unexpected {type(e).__name__}: {e} (run with --debug for the traceback)", file=sys.stderr
        )
        return EXIT_USAGE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

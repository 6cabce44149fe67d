"""Adding cells to a finished collection without rewriting it.

annbatch appends by rewriting every dataset and lets datasets grow without bound. Here an append moves the
new cells, together with the cells of a random share of the existing datasets, into freshly shuffled datasets
no larger than the collection's ``dataset_size``; the other datasets keep their X and only get their obs
rewritten (new categories, e.g. the new ``src_path`` values). The share is the one knob:

- ``rewrite=0`` writes the new cells into new datasets of their own (cheapest; those datasets hold new cells
  only, which the composition score shows);
- ``rewrite=1`` reshuffles everything (the cost of a full rewrite, quality of a full rewrite);
- ``rewrite="auto"`` (default) rewrites the smallest share whose exact shuffle quality is at least
  ``1 - AUTO_QUALITY_SLACK`` (95 %) of a full rewrite's. Adding few cells then moves few old ones; adding a
  large share moves most of them, because only a rewrite mixes them into the existing datasets.

The cells that move are re-read from the original inputs (recorded in the manifest, checked unchanged), so the
result is exactly what :func:`annbatch_nb.validate` can trace back to every input.

Crash safety: the moved and new datasets are first written as a complete collection of their own in a staging
area inside the collection (``annbatch_nb/append/staging``; the engine's resume applies), the rewritten obs
beside it. Then a journal is written and the commit swaps the staged datasets and obs into place by renames,
updates the manifest and writes the marker back. The marker is removed while the swap runs, so a half-swapped
collection is never loadable; running the append again after a crash finishes the swap from the journal.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import threading
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import anndata as ad
import numpy as np
import pandas as pd
import zarr
from dask.utils import format_bytes

from .collection import (
    MARKER,
    META_KEY,
    acquire_lock,
    dataset_key,
    is_committed,
    mark_complete,
    release_lock,
    write_runs_table,
)
from .engine import (
    ProgressCallback,
    ShuffleResult,
    _as_target,
    _check_cancel,
    _obs_column,
    execute,
    stop_point,
)
from .errors import InputError, OutputError, ParameterError
from .plan import (
    Parameters,
    Plan,
    Virtualize,
    _assign_balanced,
    _assign_runs,
    _join_obs,
    _obs_bytes_per_row,
    check_seed,
    cut_runs,
    make_unique,
)
from .predict import DEFAULT_CALIBRATION, Calibration
from .quality import Quality, shuffle_quality
from .sources import ColumnSpec, InputSpec, SourceInfo, input_exists, open_sources, resolve_inputs
from .stores import is_url

__all__ = ["AUTO_QUALITY_SLACK", "AppendPlan", "AppendResult", "append", "plan_append"]

#: ``rewrite="auto"``: the smallest share of datasets whose quality is >= (1 - this) x a full rewrite's.
AUTO_QUALITY_SLACK = 0.05
#: Loader chunk the quality figures refer to (annbatch's default ``chunk_size``).
QUALITY_BLOCK = 512

_WORK = "append"  # under annbatch_nb/: staging/, obs/<d>/, next-runs.npy, journal.json, trash/


def _work_dir(out: Path) -> Path:
    return out / META_KEY / _WORK


# --------------------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------------------
@dataclass
class AppendPlan:
    """What an append will do, computed from metadata (nothing is written).

    Build one with :func:`plan_append`.

    Attributes
    ----------
    output
        The collection appended to.
    manifest
        The collection's manifest (``annbatch_nb`` attributes) before the append.
    old_inputs
        Scanned inputs already in the collection (checked unchanged).
    new_inputs
        Scanned new inputs.
    old_table
        ``(n_runs, 4)`` int64 of the collection: input, start, stop, dataset.
    rewritten
        Existing datasets whose cells are reshuffled together with the new cells (sorted).
    pool
        The engine plan writing the rewritten and the new datasets (into the staging area): its inputs are
        the old then the new inputs, its runs the rewritten datasets' runs and every new run.
    rewrite
        The share of existing datasets rewritten, as asked (``"auto"`` or a number).
    reference
        The append that rewrites every dataset (the yardstick of ``rewrite="auto"`` and of the cost); None
        when this is that append.
    dropped_genes
        Per new input, genes left out because the collection lacks them (``new_genes="drop"``).
    """

    output: str
    manifest: dict[str, Any]
    old_inputs: list[SourceInfo]
    new_inputs: list[SourceInfo]
    old_table: np.ndarray
    rewritten: np.ndarray
    pool: Plan
    rewrite: float | str
    reference: AppendPlan | None = None
    dropped_genes: dict[str, int] = field(default_factory=dict)
    _cache: dict[str, Any] = field(default_factory=dict, repr=False)

    # -- shape ----------------------------------------------------------------------------------------
    @property
    def n_old_datasets(self) -> int:
        """Datasets in the collection before the append."""
        return int(self.manifest["n_datasets"])

    @property
    def n_datasets(self) -> int:
        """Datasets in the collection after the append."""
        return self.n_old_datasets + self.n_added

    @property
    def n_added(self) -> int:
        """New datasets (numbered after the existing ones)."""
        return self.pool.n_datasets - len(self.rewritten)

    @property
    def untouched(self) -> np.ndarray:
        """Existing datasets whose X is kept (their obs is rewritten: new categories)."""
        return np.setdiff1d(np.arange(self.n_old_datasets), self.rewritten)

    @property
    def targets(self) -> np.ndarray:
        """Final dataset number of each dataset of :attr:`pool`."""
        return np.concatenate(
            [self.rewritten, self.n_old_datasets + np.arange(self.n_added, dtype=np.int64)]
        ).astype(np.int64)

    @property
    def dataset_rows(self) -> int:
        """The collection's rows per dataset: no dataset exceeds it."""
        return self.pool.dataset_rows

    @property
    def n_obs_old(self) -> int:
        """Cells already in the collection."""
        return int(self.manifest["n_obs"])

    @property
    def n_obs_new(self) -> int:
        """Cells added."""
        return int(sum(i.n_obs for i in self.new_inputs))

    @property
    def n_obs(self) -> int:
        """Cells in the collection after the append."""
        return self.n_obs_old + self.n_obs_new

    @property
    def moved_cells(self) -> int:
        """Existing cells that are rewritten."""
        return self.pool.n_obs - self.n_obs_new

    @property
    def rewrite_fraction(self) -> float:
        """Share of the existing datasets rewritten."""
        return len(self.rewritten) / max(self.n_old_datasets, 1)

    @cached_property
    def combined_table(self) -> np.ndarray:
        """``(n_runs, 4)`` runs of the collection after the append (input, start, stop, dataset)."""
        keep = self.old_table[~np.isin(self.old_table[:, 3], self.rewritten)]
        moved = np.concatenate([self.pool.runs, self.targets[self.pool.run_dataset][:, None]], axis=1)
        table = np.concatenate([keep, moved]).astype(np.int64)
        return table[np.lexsort((table[:, 1], table[:, 0]))]

    @property
    def rows_per_dataset(self) -> np.ndarray:
        """Rows of every dataset after the append."""
        t = self.combined_table
        return np.bincount(t[:, 3], weights=t[:, 2] - t[:, 1], minlength=self.n_datasets).astype(np.int64)

    @property
    def quality(self) -> Quality:
        """Exact shuffle quality of the collection after the append (Loader chunks of 512 rows)."""
        if "quality" not in self._cache:
            t = self.combined_table
            self._cache["quality"] = shuffle_quality(
                t[:, :3], t[:, 3], self.n_datasets, len(self.pool.inputs), block=QUALITY_BLOCK
            )
        return self._cache["quality"]

    @property
    def full_rewrite_quality(self) -> Quality:
        """The quality a rewrite of every dataset would reach."""
        return (self.reference or self).quality

    # -- cost -----------------------------------------------------------------------------------------
    @cached_property
    def io(self) -> dict[str, int]:
        """Predicted bytes: ``read``/``write`` of this append, ``full_read``/``full_write`` of a rewrite."""
        full = self.reference.io if self.reference is not None else None
        rows = self.pool.input_rows
        read = sum(
            round(info.size_bytes * r / max(info.n_obs, 1))
            for info, r in zip(self.pool.inputs, rows.tolist(), strict=True)
        )
        write = self.pool.output_bytes
        untouched_rows = int(self.rows_per_dataset[self.untouched].sum()) if len(self.untouched) else 0
        obs = round(untouched_rows * _obs_bytes_per_row(self.pool.obs_schema))
        return {
            "read": int(read + obs),
            "write": int(write + obs),
            "full_read": full["read"] if full else int(read + obs),
            "full_write": full["write"] if full else int(write + obs),
        }

    @property
    def cost_ratio(self) -> float:
        """Bytes read and written by this append relative to a full rewrite."""
        io = self.io
        return (io["read"] + io["write"]) / max(io["full_read"] + io["full_write"], 1)

    @property
    def peak_memory_bytes(self) -> int:
        """Predicted peak memory (the engine's, for the rewritten datasets)."""
        return self.pool.peak_memory_bytes

    @property
    def seconds(self) -> float:
        """Predicted wall time (the engine's, for the rewritten datasets)."""
        return self.pool.seconds

    def summary(self) -> dict[str, Any]:
        """A JSON-able summary."""
        q = self.quality
        return {
            "output": self.output,
            "n_obs_old": self.n_obs_old,
            "n_obs_new": self.n_obs_new,
            "n_obs": self.n_obs,
            "n_datasets_old": self.n_old_datasets,
            "n_datasets": self.n_datasets,
            "datasets_rewritten": self.rewritten.tolist(),
            "datasets_added": self.n_added,
            "rewrite": self.rewrite,
            "rewrite_fraction": self.rewrite_fraction,
            "moved_cells": self.moved_cells,
            "dataset_rows": self.dataset_rows,
            "rows_per_dataset": self.rows_per_dataset.tolist(),
            "io_bytes": self.io,
            "cost_ratio": self.cost_ratio,
            "peak_memory_bytes": self.peak_memory_bytes,
            "seconds": self.seconds,
            "quality": q.score,
            "quality_details": q.to_dict(),
            "full_rewrite_quality": self.full_rewrite_quality.score,
            "seed": self.pool.params.seed,
            "dropped_genes": self.dropped_genes,
        }

    def describe(self) -> str:
        """A few human-readable lines: what moves, what it costs, how well it mixes."""
        io = self.io
        q = self.quality
        return (
            f"append {self.n_obs_new:,} cells from {len(self.new_inputs)} input(s) to {self.output} "
            f"({self.n_obs_old:,} cells, {self.n_old_datasets} datasets): rewrite {len(self.rewritten)} of "
            f"{self.n_old_datasets} datasets ({self.moved_cells:,} cells move), add {self.n_added}; "
            f"every dataset <= {self.dataset_rows:,} rows\n"
            f"  I/O: reads {format_bytes(io['read'])}, writes {format_bytes(io['write'])} = "
            f"{self.cost_ratio:.0%} of a full rewrite ({format_bytes(io['full_read'])} + "
            f"{format_bytes(io['full_write'])})\n"
            f"  quality {q.score:.2f} (run mixing {q.run_mixing:.2f}, composition {q.composition:.2f}); "
            f"a full rewrite: {self.full_rewrite_quality.score:.2f}"
            + "".join(
                f"\n  {name}: {n:,} gene(s) not in the collection are dropped"
                for name, n in self.dropped_genes.items()
            )
        )

    def run(
        self,
        *,
        progress: bool = True,
        cancel: threading.Event | None = None,
        on_progress: ProgressCallback | None = None,
        workers: int | Literal["auto"] = "auto",
        client: Any = None,
        retries: int = 2,
    ) -> AppendResult:
        """Execute this append (resuming an interrupted one).

        Parameters
        ----------
        progress
            Show progress bars.
        cancel
            Set it to stop; the append stays resumable (the collection stays as it was).
        on_progress
            Extra callback receiving ``("bytes", n)`` and ``("rows", n)`` increments.
        workers
            Processes writing datasets side by side (see :func:`annbatch_nb.engine.execute`).
        client
            A :class:`dask.distributed.Client`: write the datasets as tasks on its cluster.
        retries
            With ``client``: times a failed dataset task is run again.

        Returns
        -------
        AppendResult
            What was done.
        """
        return _run(
            self,
            progress=progress,
            cancel=cancel,
            on_progress=on_progress,
            workers=workers,
            client=client,
            retries=retries,
        )


@dataclass
class AppendResult:
    """What an append did.

    Attributes
    ----------
    output
        The collection.
    plan
        The executed append plan (None when there was nothing to do).
    staged
        The engine's result for the rewritten and new datasets.
    already_complete
        The new inputs were already in the collection; nothing was written.
    finished_interrupted
        A commit interrupted by an earlier crash was finished first.
    seconds
        Wall time of this call.
    """

    output: str
    plan: AppendPlan | None = None
    staged: ShuffleResult | None = None
    already_complete: bool = False
    finished_interrupted: bool = False
    seconds: float = 0.0

    @property
    def datasets_resumed(self) -> int:
        """Staged datasets found complete from an interrupted earlier run."""
        return self.staged.datasets_resumed if self.staged else 0

    @property
    def n_datasets(self) -> int:
        """Datasets written by the append (rewritten plus new)."""
        return self.plan.pool.n_datasets if self.plan else 0

    def __str__(self) -> str:
        if self.plan is None:
            return f"{self.output}: the inputs are already in the collection; nothing to do"
        p = self.plan
        return (
            f"{self.output}: appended {p.n_obs_new:,} cells; rewrote {len(p.rewritten)} and added "
            f"{p.n_added} datasets ({p.n_datasets} now, {p.n_obs:,} cells) in {self.seconds:.1f} s; "
            f"quality {p.quality.score:.2f}"
        )


# --------------------------------------------------------------------------------------------------
# Planning
# --------------------------------------------------------------------------------------------------
def _read_collection(out: Path) -> tuple[zarr.Group, dict[str, Any], np.ndarray]:
    if is_url(os.fspath(out)):
        raise OutputError(
            out, "appending to a collection on an object store is not supported; append locally"
        )
    if not out.is_dir():
        raise OutputError(out, "does not exist; appending needs a finished annbatch-nb collection")
    try:
        root = zarr.open_group(str(out), mode="r")
        manifest = dict(root[META_KEY].attrs)
        table = np.asarray(root[META_KEY]["runs"][...], dtype=np.int64)
    except Exception:
        raise OutputError(
            out, "is not a collection written by annbatch-nb (no manifest); only those can be appended to"
        ) from None
    if manifest.get("tool") != "annbatch-nb":
        raise OutputError(out, "was not written by annbatch-nb; only its collections can be appended to")
    if (_work_dir(out) / "journal.json").exists():
        raise OutputError(
            out, "an earlier append was interrupted while committing; run the append again to finish it"
        )
    if not is_committed(root):
        raise OutputError(
            out, "is not a finished collection (an interrupted shuffle?); finish it before appending to it"
        )
    return root, manifest, table


def _old_infos(manifest: dict[str, Any], virtualize: Virtualize) -> list[SourceInfo]:
    records = manifest["inputs"]
    for r in records:
        if not input_exists(r["abspath"]):
            raise InputError(
                r["path"],
                "is in the collection but no longer exists; an append re-reads the cells it moves from the "
                "original inputs (use rewrite=0 only moves new cells, but the inputs are still checked)",
            )
    sources = open_sources([InputSpec(r["abspath"], r["path"]) for r in records], virtualize=virtualize)
    try:
        infos = [s.info for s in sources]
        for r, s in zip(records, sources, strict=True):
            if s.stat() != (r["size_bytes"], r["mtime"]):
                raise InputError(
                    r["path"],
                    "changed since the collection was written (size or mtime); an append re-reads the cells "
                    "it moves from the original inputs, so write a new collection instead",
                )
        return infos
    finally:
        for s in sources:
            s.close()


def _append_seed(manifest: dict[str, Any], new: list[SourceInfo]) -> int:
    """The default seed of an append, fixed by what the append is.

    From the collection's seed, its number of appends and the new inputs (as given, with their shapes):
    re-running the same append resumes it, wherever the files sit.
    """
    payload = json.dumps(
        [
            manifest.get("params", {}).get("seed"),
            len(manifest.get("appends", [])),
            [(i.display, i.n_obs, i.n_vars, i.nnz) for i in new],
        ]
    )
    return int.from_bytes(hashlib.sha256(payload.encode()).digest()[:8], "little") % (2**63)


def _check_compatible(
    manifest: dict[str, Any],
    var_names: pd.Index,
    new: list[SourceInfo],
    params: Parameters,
    new_genes: Literal["error", "drop"],
) -> dict[str, int]:
    """Refuse new inputs that cannot join; return the genes dropped per new input (``new_genes="drop"``)."""
    dropped: dict[str, int] = {}
    for info in new:
        if manifest["x_kind"] == "dense" and info.x_kind == "csr":
            raise InputError(
                info.display, "has a sparse X but the collection is dense; write a new collection instead"
            )
        if not np.can_cast(info.dtype, np.dtype(manifest["dtype"]), "same_kind"):
            raise InputError(
                info.display,
                f"has X of {info.dtype} which does not fit the collection's {manifest['dtype']}; write a new "
                "collection instead",
            )
        extra = info.var_names[~info.var_names.isin(var_names)]
        if len(extra):
            dropped[info.display] = len(extra)
        if params.var_join == "outer":
            if len(extra) and new_genes != "drop":
                raise InputError(
                    info.display,
                    f"has {len(extra):,} gene(s) the collection lacks (e.g. {extra[0]!r}); every dataset "
                    "would need them: drop them (new_genes='drop', --drop-new-genes) or write a new "
                    "collection",
                )
        else:
            lacking = var_names[~var_names.isin(info.var_names)]
            if len(lacking):
                raise InputError(
                    info.display,
                    f"lacks {len(lacking):,} of the collection's genes (e.g. {lacking[0]!r}) and the "
                    "collection uses var_join='inner'; write a new collection with all inputs instead",
                )
    return dropped


def _check_names(old: list[SourceInfo], new: list[SourceInfo]) -> None:
    """The collection's cell names must stay what they are when the new names are made unique after them."""
    old_names = np.concatenate([np.asarray(i.obs_names, dtype=object) for i in old])
    all_names = np.concatenate([old_names, *[np.asarray(i.obs_names, dtype=object) for i in new]])
    if not np.array_equal(
        np.asarray(make_unique(pd.Index(old_names))),
        np.asarray(make_unique(pd.Index(all_names))[: len(old_names)]),
    ):
        raise InputError(
            new[0].display,
            "has cell names equal to names the collection made unique with a suffix (e.g. 'x-1'); rename "
            "those cells or write a new collection",
        )


def _pool(
    old_table: np.ndarray, rewritten: np.ndarray, new_runs: np.ndarray, dataset_rows: int, params: Parameters
) -> tuple[np.ndarray, np.ndarray, int]:
    """The rewritten datasets' runs plus the new runs, dealt over the fewest datasets of <= dataset_rows."""
    moved = old_table[np.isin(old_table[:, 3], rewritten)][:, :3]
    runs = np.concatenate([moved, new_runs]).astype(np.int64)
    runs = runs[np.lexsort((runs[:, 1], runs[:, 0]))]
    total = int((runs[:, 2] - runs[:, 1]).sum())
    n_out = max(len(rewritten), math.ceil(total / dataset_rows), 1)
    assign = _assign_balanced if params.assignment == "balanced" else _assign_runs
    lengths = runs[:, 2] - runs[:, 1]
    while True:
        rng = np.random.default_rng(np.random.SeedSequence(params.seed, spawn_key=(0,)))
        run_dataset = assign(runs, n_out, rng)
        if np.bincount(run_dataset, weights=lengths, minlength=n_out).max() <= dataset_rows:
            return runs, run_dataset, n_out
        n_out += 1


def plan_append(
    new_inputs: Any,
    output: str | os.PathLike[str],
    *,
    rewrite: float | Literal["auto"] = "auto",
    seed: int | None = None,
    new_genes: Literal["error", "drop"] = "error",
    virtualize: Virtualize = "auto",
    calibration: Calibration | None = None,
) -> AppendPlan:
    """Plan adding ``new_inputs`` to the finished collection ``output`` (reads metadata only).

    Parameters
    ----------
    new_inputs
        ``.h5ad`` files, AnnData ``.zarr`` stores, directories or globs, none of them in the collection.
    output
        A finished collection written by annbatch-nb (local path).
    rewrite
        Share of the existing datasets whose cells are reshuffled with the new ones, in [0, 1], or ``"auto"``:
        the smallest share whose quality is at least ``1 - AUTO_QUALITY_SLACK`` of a full rewrite's.
    seed
        Seed of the random choices; default: derived from the collection and the new inputs (so re-running the
        same append resumes it).
    new_genes
        What to do with genes of the new inputs that the collection lacks: ``"error"`` (default), or
        ``"drop"`` them (their values are left out; the counts are in :attr:`AppendPlan.dropped_genes`).
        Keeping them would change every dataset's var, i.e. a full rewrite.
    virtualize
        How ``.h5ad`` inputs are read (see :func:`annbatch_nb.plan`).
    calibration
        Machine rates for the time and memory predictions.

    Returns
    -------
    AppendPlan
        The plan; :meth:`AppendPlan.run` executes it.

    Raises
    ------
    OutputError
        If ``output`` is not a finished annbatch-nb collection.
    InputError
        If a new input cannot join the collection (new genes, other X kind, conflicting obs types), is already
        in it, or an input of the collection is gone or changed.
    ParameterError
        For a bad ``rewrite`` or ``seed``.
    """
    out = Path(output)
    if new_genes not in ("error", "drop"):
        raise ParameterError(f"new_genes must be 'error' or 'drop', got {new_genes!r}")
    if rewrite != "auto" and (
        isinstance(rewrite, bool) or not isinstance(rewrite, int | float) or not 0 <= rewrite <= 1
    ):
        raise ParameterError(f"rewrite must be a share in [0, 1] or 'auto', got {rewrite!r}")
    root, manifest, old_table = _read_collection(out)
    specs = resolve_inputs(new_inputs)
    have = {r["abspath"] for r in manifest["inputs"]}
    already = [s for s in specs if s.path in have]
    if already:
        raise InputError(
            already[0].display,
            "is already in the collection" + ("" if len(already) < len(specs) else " (every input is)"),
        )
    old = _old_infos(manifest, virtualize)
    sources = open_sources(specs, virtualize=virtualize)
    try:
        new = [s.info for s in sources]
    finally:
        for s in sources:
            s.close()

    base = Parameters(**manifest["params"])
    seed = _append_seed(manifest, new) if seed is None else check_seed(seed)
    dataset_rows = int(manifest.get("dataset_rows") or max(manifest["rows_per_dataset"]))
    params = dataclasses.replace(base, seed=int(seed), dataset_size=dataset_rows, dtype=manifest["dtype"])
    first = root[dataset_key(0)]
    var_names = pd.Index(ad.io.read_elem(first["var"]).index, dtype=object)
    index_dtype = (
        np.dtype(first["X"]["indices"].dtype) if manifest["x_kind"] == "csr" else np.dtype(np.uint32)
    )
    dropped = _check_compatible(manifest, var_names, new, params, new_genes)
    _check_names(old, new)
    infos = old + new
    obs_schema = _join_obs(infos)  # raises on conflicting column types, naming the file

    n_old = int(manifest["n_datasets"])
    new_runs = cut_runs(new, params.shuffle_chunk_size, first_input=len(old))
    order = np.random.default_rng(np.random.SeedSequence(params.seed, spawn_key=(2,))).permutation(n_old)

    def make(k: int) -> Plan:
        rewritten = np.sort(order[:k]).astype(np.int64)
        runs, run_dataset, n_out = _pool(old_table, rewritten, new_runs, dataset_rows, params)
        p = Plan(
            inputs=infos,
            params=params,
            var_names=var_names,
            var_maps=[var_names.get_indexer(i.var_names).astype(np.int64) for i in infos],
            x_kind=manifest["x_kind"],
            dtype=np.dtype(manifest["dtype"]),
            index_dtype=index_dtype,
            obs_schema=obs_schema,
            runs=runs,
            run_dataset=run_dataset,
            n_datasets=n_out,
            dataset_rows=dataset_rows,
            calibration=calibration or DEFAULT_CALIBRATION,
        )
        p._cache["rewritten"] = rewritten
        return p

    def build(k: int, reference: AppendPlan | None) -> AppendPlan:
        p = make(k)
        return AppendPlan(
            output=str(out),
            manifest=manifest,
            old_inputs=old,
            new_inputs=new,
            old_table=old_table,
            rewritten=p._cache["rewritten"],
            pool=p,
            rewrite=rewrite,
            reference=reference,
            dropped_genes=dropped,
        )

    full = build(n_old, None)  # every dataset rewritten: the yardstick
    if rewrite == "auto":
        # quality grows with the share rewritten: bisect for the smallest k within the slack
        target = (1 - AUTO_QUALITY_SLACK) * full.quality.score
        lo, hi = 0, n_old
        while lo < hi:
            mid = (lo + hi) // 2
            if build(mid, full).quality.score >= target:
                hi = mid
            else:
                lo = mid + 1
        k = lo
    else:
        k = round(float(rewrite) * n_old)
    return full if k == n_old else build(k, full)


# --------------------------------------------------------------------------------------------------
# Executing
# --------------------------------------------------------------------------------------------------
def _conform(series: pd.Series, spec: ColumnSpec) -> Any:
    """One obs column of an existing dataset as the engine would build it in the new schema."""
    n = len(series)
    dtype = series.dtype
    if isinstance(dtype, pd.CategoricalDtype):
        source = ColumnSpec("categorical", "object", tuple(dtype.categories), bool(dtype.ordered))
        val: Any = (np.asarray(series.cat.codes, dtype=np.int64), list(dtype.categories))
    elif isinstance(series.array, pd.arrays.IntegerArray | pd.arrays.BooleanArray):
        boolean = isinstance(series.array, pd.arrays.BooleanArray)
        np_dtype = np.dtype(bool) if boolean else np.dtype(series.array.dtype.numpy_dtype)
        source = ColumnSpec("nullable-boolean" if boolean else "nullable-integer", np_dtype.str)
        val = (series.array.to_numpy(dtype=np_dtype, na_value=0), series.isna().to_numpy())
    elif pd.api.types.is_string_dtype(dtype) or dtype is np.dtype(object):
        source = ColumnSpec("string", "object")
        val = np.asarray(series.astype(object).where(series.notna(), None), dtype=object)
    else:
        source = ColumnSpec("numeric", np.dtype(dtype).str)
        val = np.asarray(series)
    return _obs_column(spec, [(0, _as_target(spec, source, val), n)], n)


def _rewrite_obs(out: Path, plan: AppendPlan, cancel: threading.Event | None) -> None:
    """Write the obs of every untouched dataset in the new schema into the staging area."""
    root = zarr.open_group(str(out), mode="r")
    for d in plan.untouched.tolist():
        _check_cancel(cancel)
        dest = _work_dir(out) / "obs" / str(d)
        if (dest / "done").exists():
            continue
        shutil.rmtree(dest, ignore_errors=True)
        with ad.settings.override(remove_unused_categories=False):
            old = ad.io.read_elem(root[dataset_key(d)]["obs"])
        cols = {
            name: (
                _conform(old[name], spec)
                if name in old.columns
                else _obs_column(spec, [(0, None, len(old))], len(old))
            )
            for name, spec in plan.pool.obs_schema.items()
        }
        frame = pd.DataFrame(cols, index=old.index)
        group = zarr.open_group(str(dest), mode="w", zarr_format=3)
        with ad.settings.override(remove_unused_categories=False):
            ad.io.write_elem(group, "obs", frame)
        (dest / "done").write_text("")


def _new_manifest(plan: AppendPlan) -> dict[str, Any]:
    m = dict(plan.manifest)
    pool = plan.pool
    history = list(m.get("appends", []))
    history.append(
        {
            "inputs": [i.display for i in plan.new_inputs],
            "seed": pool.params.seed,
            "rewritten": plan.rewritten.tolist(),
            "added": list(range(plan.n_old_datasets, plan.n_datasets)),
            "moved_cells": plan.moved_cells,
            "quality": plan.quality.score,
        }
    )
    m.update(
        inputs=pool.inputs_record(),
        n_obs=plan.n_obs,
        n_datasets=plan.n_datasets,
        rows_per_dataset=plan.rows_per_dataset.tolist(),
        dataset_rows=plan.dataset_rows,
        fingerprint=hashlib.sha256(f"{m.get('fingerprint')}+{pool.fingerprint}".encode()).hexdigest(),
        appends=history,
    )
    return m


def _write_journal(out: Path, plan: AppendPlan, staging: Path) -> None:
    work = _work_dir(out)
    records = []
    sroot = zarr.open_group(str(staging), mode="r")
    for j in range(plan.pool.n_datasets):
        records.append(dict(sroot[META_KEY]["complete"][str(j)].attrs))
    np.save(work / "next-runs.npy", plan.combined_table)
    journal = {
        "targets": plan.targets.tolist(),
        "untouched": plan.untouched.tolist(),
        "records": records,
        "manifest": _new_manifest(plan),
    }
    tmp = work / "journal.json.tmp"
    tmp.write_text(json.dumps(journal))
    os.replace(tmp, work / "journal.json")  # from here on the append is committed, whatever happens


def _move(src: Path, dst: Path, trash: Path) -> None:
    """Put ``src`` at ``dst``, moving what is at ``dst`` to ``trash``; a no-op once done."""
    if not src.exists():
        return
    if dst.exists():
        if trash.exists():
            shutil.rmtree(trash)
        os.rename(dst, trash)
    os.rename(src, dst)


def finish_commit(output: str | os.PathLike[str]) -> bool:
    """Finish an append's commit from its journal (idempotent); return whether there was one.

    Called by :func:`append` before anything else, so re-running an append after a crash completes it.
    """
    out = Path(output)
    work = _work_dir(out)
    journal_path = work / "journal.json"
    if not journal_path.exists():
        return False
    journal = json.loads(journal_path.read_text())
    root = zarr.open_group(str(out), mode="r+")
    for key in MARKER:  # not loadable while datasets are swapped
        if key in root.attrs:
            del root.attrs[key]
    trash = work / "trash"
    trash.mkdir(exist_ok=True)
    staging = work / "staging"
    for j, t in enumerate(journal["targets"]):
        _move(staging / dataset_key(j), out / dataset_key(t), trash / dataset_key(t))
        stop_point(f"append-move:{j}")
    for d in journal["untouched"]:
        _move(work / "obs" / str(d) / "obs", out / dataset_key(d) / "obs", trash / f"obs_{d}")
    meta = root[META_KEY]
    write_runs_table(meta, np.load(work / "next-runs.npy"))
    for t, record in zip(journal["targets"], journal["records"], strict=True):
        mark_complete(root, t, record)
    meta.attrs.update(journal["manifest"])
    stop_point("append-before-marker")
    root.attrs.update(dict(MARKER))
    journal_path.unlink()
    shutil.rmtree(work, ignore_errors=True)
    return True


def _run(
    plan: AppendPlan,
    *,
    progress: bool,
    cancel: threading.Event | None,
    on_progress: ProgressCallback | None,
    workers: int | Literal["auto"],
    client: Any = None,
    retries: int = 2,
) -> AppendResult:
    t0 = time.perf_counter()
    out = Path(plan.output)
    lock = acquire_lock(out)
    try:
        work = _work_dir(out)
        staging = work / "staging"
        if (
            staging.exists()
        ):  # an interrupted append: resume it if it is this plan, else start the staging over
            try:
                fp = zarr.open_group(str(staging), mode="r")[META_KEY].attrs.get("fingerprint")
            except Exception:
                fp = None
            if fp != plan.pool.fingerprint:
                shutil.rmtree(work)
        work.mkdir(parents=True, exist_ok=True)
        extra: dict[str, Any] = {"client": client, "retries": retries} if client is not None else {}
        staged = execute(
            plan.pool,
            staging,
            progress=progress,
            cancel=cancel,
            on_progress=on_progress,
            workers=workers,
            **extra,
        )
        _rewrite_obs(out, plan, cancel)
        stop_point("append-staged")
        _write_journal(out, plan, staging)
        finish_commit(out)
    finally:
        release_lock(lock)
    return AppendResult(str(out), plan=plan, staged=staged, seconds=time.perf_counter() - t0)


def pending_commit(output: str | os.PathLike[str]) -> bool:
    """Whether an append's commit was interrupted at ``output`` (the next :func:`append` finishes it)."""
    return (_work_dir(Path(output)) / "journal.json").exists()


def already_appended(new_inputs: Any, output: str | os.PathLike[str]) -> bool:
    """Whether every one of ``new_inputs`` is already in the collection ``output`` (an earlier append)."""
    try:
        manifest = dict(zarr.open_group(str(output), mode="r")[META_KEY].attrs)
    except Exception:
        return False  # plan_append says what is wrong
    have = {r.get("abspath") for r in manifest.get("inputs", [])}
    return all(s.path in have for s in resolve_inputs(new_inputs))


def append(
    new_inputs: Any,
    output: str | os.PathLike[str],
    *,
    rewrite: float | Literal["auto"] = "auto",
    seed: int | None = None,
    progress: bool = True,
    cancel: threading.Event | None = None,
    on_progress: ProgressCallback | None = None,
    workers: int | Literal["auto"] = "auto",
    new_genes: Literal["error", "drop"] = "error",
    virtualize: Virtualize = "auto",
    client: Any = None,
    retries: int = 2,
) -> AppendResult:
    """Add the cells of ``new_inputs`` to the finished collection ``output``, mixed in.

    Re-running the same call after an interruption resumes it (or finishes its commit); once done, it does
    nothing. See :mod:`annbatch_nb.append` for what moves and why.

    Parameters
    ----------
    new_inputs
        ``.h5ad`` files, AnnData ``.zarr`` stores, directories or globs, none of them in the collection.
    output
        A finished collection written by annbatch-nb (local path).
    rewrite
        Share of existing datasets reshuffled with the new cells, or ``"auto"`` (see :func:`plan_append`).
    seed
        Seed (default: derived from the collection and the new inputs).
    progress
        Show progress bars.
    cancel
        A :class:`threading.Event`; setting it stops the append, leaving the collection as it was and the
        append resumable.
    on_progress
        Extra callback receiving ``("bytes", n)`` and ``("rows", n)`` increments.
    workers
        Processes writing datasets side by side.
    new_genes
        ``"error"`` (default) or ``"drop"``: genes of the new inputs the collection lacks (see
        :func:`plan_append`).
    virtualize
        How ``.h5ad`` inputs are read.
    client
        A :class:`dask.distributed.Client`: write the datasets as tasks on its cluster.
    retries
        With ``client``: times a failed dataset task is run again.

    Returns
    -------
    AppendResult
        What was done.
    """
    t0 = time.perf_counter()
    out = Path(output)
    finished = False
    if pending_commit(out):
        lock = acquire_lock(out)
        try:
            finished = finish_commit(out)
        finally:
            release_lock(lock)
    if already_appended(new_inputs, out):
        return AppendResult(
            str(out), already_complete=True, finished_interrupted=finished, seconds=time.perf_counter() - t0
        )
    p = plan_append(new_inputs, out, rewrite=rewrite, seed=seed, new_genes=new_genes, virtualize=virtualize)
    result = p.run(
        progress=progress,
        cancel=cancel,
        on_progress=on_progress,
        workers=workers,
        client=client,
        retries=retries,
    )
    result.finished_interrupted = finished
    return result

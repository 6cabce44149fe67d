"""Shuffle quality, computed exactly from a plan's run assignment (no sampling).

Within an output dataset every row order is equally likely (the engine permutes each dataset fully), so
``B`` consecutive rows of dataset ``k`` are a uniform sample without replacement of its ``n_k`` rows. The
number of distinct input files, or distinct runs, among them therefore follows hypergeometric laws whose
expectations have closed forms; we compare them with an ideal, uniform shuffle of all ``N`` cells.

- **run mixing**: E[distinct runs in a block] / ideal. Cells of one run are neighbours in their input (same
  plate, same donor, similar state); a block drawn from few runs holds correlated cells. Driven by
  ``shuffle_chunk_size`` (smaller is better) and ``dataset_size`` (larger is better).
- **file mixing**: E[distinct input files in a block] / ideal.
- **composition**: each dataset's share of every input vs the input's global share, as total variation
  distance; ``1 - mean TV`` is the composition score. Driven by the assignment (``balanced`` is better).

The headline score is ``run_mixing * composition`` in [0, 1]; 1 means indistinguishable from a global shuffle
at block size ``B``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.special import gammaln

__all__ = ["Quality", "expected_distinct", "shuffle_quality"]


def _log_choose_ratio(n: np.ndarray, c: np.ndarray, b: int) -> np.ndarray:
    """log( C(n - c, b) / C(n, b) ), -inf where n - c < b."""
    n = np.asarray(n, dtype=np.float64)
    c = np.asarray(c, dtype=np.float64)
    out = np.full(np.broadcast(n, c).shape, -np.inf)
    ok = (n - c) >= b
    n_ok = np.broadcast_to(n, out.shape)[ok]
    c_ok = np.broadcast_to(c, out.shape)[ok]
    out[ok] = (
        gammaln(n_ok - c_ok + 1) - gammaln(n_ok - c_ok - b + 1) - gammaln(n_ok + 1) + gammaln(n_ok - b + 1)
    )
    return out


def expected_distinct(counts: np.ndarray, block: int) -> float:
    """Expected number of distinct groups among ``block`` rows drawn without replacement.

    Parameters
    ----------
    counts
        Rows of each group (e.g. each input file, or each run) in the population.
    block
        Rows drawn (clipped to the population size).

    Returns
    -------
    float
        ``sum_g 1 - C(n - c_g, B) / C(n, B)``.
    """
    counts = np.asarray(counts, dtype=np.float64)
    counts = counts[counts > 0]
    n = counts.sum()
    if n == 0:
        return 0.0
    b = int(min(block, n))
    return float(np.sum(1.0 - np.exp(_log_choose_ratio(np.full_like(counts, n), counts, b))))


@dataclass(frozen=True)
class Quality:
    """Exact shuffle quality of a plan.

    Attributes
    ----------
    score
        Headline in [0, 1]: ``run_mixing * composition``.
    run_mixing
        E[distinct runs per block] relative to a uniform shuffle of all cells, row-weighted over datasets.
    file_mixing
        E[distinct input files per block] relative to a uniform shuffle.
    composition
        ``1 - mean`` total variation distance between a dataset's input shares and the global shares.
    block_rows
        The block size ``B`` the mixing figures refer to.
    expected_runs_per_block, ideal_runs_per_block
        The expectations behind ``run_mixing`` (row-weighted mean over datasets, and ideal).
    expected_files_per_block, ideal_files_per_block
        The expectations behind ``file_mixing``.
    dataset_tv
        Total variation distance of each dataset's composition.
    share_min, share_max
        Per input, its smallest and largest share of any dataset (its global share is ``share_global``).
    share_global
        Per input, its share of all cells.
    """

    score: float
    run_mixing: float
    file_mixing: float
    composition: float
    block_rows: int
    expected_runs_per_block: float
    ideal_runs_per_block: float
    expected_files_per_block: float
    ideal_files_per_block: float
    dataset_tv: np.ndarray = field(repr=False)
    share_min: np.ndarray = field(repr=False)
    share_max: np.ndarray = field(repr=False)
    share_global: np.ndarray = field(repr=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (per-dataset and per-input arrays as lists)."""
        return {
            "score": self.score,
            "run_mixing": self.run_mixing,
            "file_mixing": self.file_mixing,
            "composition": self.composition,
            "block_rows": self.block_rows,
            "expected_runs_per_block": self.expected_runs_per_block,
            "ideal_runs_per_block": self.ideal_runs_per_block,
            "expected_files_per_block": self.expected_files_per_block,
            "ideal_files_per_block": self.ideal_files_per_block,
            "max_dataset_tv": float(self.dataset_tv.max()) if len(self.dataset_tv) else 0.0,
            "dataset_tv": self.dataset_tv.tolist(),
            "share_min": self.share_min.tolist(),
            "share_max": self.share_max.tolist(),
            "share_global": self.share_global.tolist(),
        }


def shuffle_quality(
    runs: np.ndarray, run_dataset: np.ndarray, n_datasets: int, n_inputs: int, *, block: int = 64
) -> Quality:
    """Compute :class:`Quality` for an assignment of runs to datasets.

    Parameters
    ----------
    runs
        ``(n_runs, 3)``: input index, start, stop.
    run_dataset
        Dataset of each run.
    n_datasets
        Number of datasets.
    n_inputs
        Number of inputs.
    block
        Rows per block (a loader chunk or batch).

    Returns
    -------
    Quality
        The figures.
    """
    lengths = (runs[:, 2] - runs[:, 1]).astype(np.float64)
    inputs = runs[:, 0].astype(np.int64)
    total = lengths.sum()
    rows = np.bincount(run_dataset, weights=lengths, minlength=n_datasets)
    weights = rows / total

    # ideal: a uniform shuffle of all cells
    file_rows = np.bincount(inputs, weights=lengths, minlength=n_inputs)
    ideal_files = expected_distinct(file_rows, block)
    ideal_runs = expected_distinct(lengths, block)

    # per dataset, by sorting runs by dataset once
    order = np.argsort(run_dataset, kind="stable")
    bounds = np.searchsorted(run_dataset[order], np.arange(n_datasets + 1))
    exp_runs = np.zeros(n_datasets)
    exp_files = np.zeros(n_datasets)
    shares = np.zeros((n_datasets, n_inputs))
    for k in range(n_datasets):
        sel = order[bounds[k] : bounds[k + 1]]
        if not len(sel):
            continue
        exp_runs[k] = expected_distinct(lengths[sel], block)
        per_file = np.bincount(inputs[sel], weights=lengths[sel], minlength=n_inputs)
        exp_files[k] = expected_distinct(per_file, block)
        shares[k] = per_file / per_file.sum()
    share_global = file_rows / total
    tv = 0.5 * np.abs(shares - share_global[None, :]).sum(axis=1)

    e_runs = float(np.dot(weights, exp_runs))
    e_files = float(np.dot(weights, exp_files))
    run_mixing = min(1.0, e_runs / ideal_runs) if ideal_runs else 1.0
    file_mixing = min(1.0, e_files / ideal_files) if ideal_files else 1.0
    composition = float(1.0 - np.dot(weights, tv))
    return Quality(
        score=float(np.clip(run_mixing * composition, 0.0, 1.0)),
        run_mixing=run_mixing,
        file_mixing=file_mixing,
        composition=composition,
        block_rows=block,
        expected_runs_per_block=e_runs,
        ideal_runs_per_block=ideal_runs,
        expected_files_per_block=e_files,
        ideal_files_per_block=ideal_files,
        dataset_tv=tv,
        share_min=shares.min(axis=0) if n_datasets else np.zeros(n_inputs),
        share_max=shares.max(axis=0) if n_datasets else np.zeros(n_inputs),
        share_global=share_global,
    )

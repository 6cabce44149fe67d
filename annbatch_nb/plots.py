"""Matplotlib figures of a plan's predictions, rendered off-screen (Agg) to PNG.

Used by the widget planner (:class:`annbatch_nb.Planner`) but free of any widget code: each plot owns a
:class:`matplotlib.figure.Figure` with an Agg canvas (no pyplot, no global state, any backend), exposes its
axes for inspection (``plot.ax.lines[0].get_ydata()`` is always the predicted curve), and renders to PNG
bytes.

Rendering is incremental: the markers that follow the current choice (and measured values) are *animated*
artists blitted over a cached background, so moving a marker costs a few milliseconds; the whole figure is
redrawn only when a curve or an axis limit changes.

The data helpers (:func:`memory_line`, :func:`chunk_grid`, :func:`dataset_grid`) compute what the curves show
from a :class:`~annbatch_nb.plan.Plan` without any I/O.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullLocator

from .predict import rows_for_memory

if TYPE_CHECKING:
    from matplotlib.artist import Artist
    from matplotlib.axes import Axes

    from .plan import Plan

__all__ = [
    "MemoryPlot",
    "PlotPanel",
    "QualityPlot",
    "RunPlot",
    "ThroughputPlot",
    "chunk_grid",
    "dataset_grid",
    "memory_curve",
]

_PREDICTED = "#1f77b4"
_CURRENT = "#d62728"
_MEASURED = "#2ca02c"
_MACHINE = "#7f7f7f"


def _bytes(n: float) -> str:
    """Bytes with binary units and at most three significant digits (``256 MiB``, ``1.5 GiB``)."""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.3g} {unit}"
        n /= 1024
    return f"{n:.3g} TiB"  # pragma: no cover


def _count(n: float) -> str:
    n = float(n)
    if n >= 1e6:
        return f"{n / 1e6:.3g}M"
    if n >= 1e3:
        return f"{n / 1e3:.3g}k"
    return f"{n:.3g}"


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------
def memory_curve(plan: Plan, rows: np.ndarray) -> np.ndarray:
    """Predicted peak memory of the plan's inputs and parameters at other dataset sizes.

    The planner's memory model is linear in rows per dataset: the slope is read off
    :func:`annbatch_nb.predict.rows_for_memory` at two large budgets, and the line goes through the plan's own
    prediction (``plan.peak_memory_bytes`` at ``plan.dataset_rows``), so no further plan is built.

    Parameters
    ----------
    plan
        A plan of the inputs and parameters.
    rows
        Rows per dataset to predict for.

    Returns
    -------
    numpy.ndarray
        Predicted peak bytes, never below the part that does not depend on the dataset size.
    """
    b1, b2 = 1e15, 2e15
    r1 = rows_for_memory(plan, b1, plan.calibration)
    r2 = rows_for_memory(plan, b2, plan.calibration)
    slope = (b2 - b1) / max(r2 - r1, 1)
    floor = plan.memory.baseline_bytes + plan.memory.run_bytes
    peak = plan.peak_memory_bytes + slope * (np.asarray(rows, dtype=float) - plan.dataset_rows)
    return np.maximum(peak, floor)


def chunk_grid(max_chunk: int, *, min_chunk: int = 1, points: int = 7) -> list[int]:
    """Log-spaced ``shuffle_chunk_size`` values from ``min_chunk`` to ``max_chunk`` (distinct integers).

    Parameters
    ----------
    max_chunk
        Largest value (included).
    min_chunk
        Smallest value (included).
    points
        How many values at most.

    Returns
    -------
    list[int]
        Increasing values.
    """
    max_chunk = max(1, int(max_chunk))
    min_chunk = max(1, min(int(min_chunk), max_chunk))
    grid = np.unique(np.round(np.geomspace(min_chunk, max_chunk, max(points, 2))).astype(np.int64))
    return [int(v) for v in grid]


def dataset_grid(min_rows: int, max_rows: int, *, points: int = 48) -> np.ndarray:
    """Log-spaced dataset sizes (rows) for the memory curve.

    Parameters
    ----------
    min_rows, max_rows
        The range (both included).
    points
        Number of points.

    Returns
    -------
    numpy.ndarray
        Increasing row counts (float).
    """
    lo = max(1.0, float(min_rows))
    hi = max(lo, float(max_rows))
    return np.geomspace(lo, hi, points) if hi > lo else np.array([lo])


# --------------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------------
def _point(xy: tuple[float, float] | None) -> tuple[list[float], list[float]]:
    """A one-point line's data, or an empty one."""
    return ([xy[0]], [xy[1]]) if xy else ([], [])


class PlotPanel:
    """A figure rendered with Agg to PNG, with blitted (animated) artists for fast marker updates.

    Parameters
    ----------
    width, height
        Size in inches.
    dpi
        Pixels per inch of the PNG.
    ncols
        Number of side-by-side axes.
    """

    #: Whether the y axis is logarithmic (the measured marker widens it accordingly).
    log_y = False

    def __init__(self, width: float = 4.3, height: float = 2.9, dpi: int = 90, ncols: int = 1) -> None:
        self.figure = Figure(figsize=(width, height), dpi=dpi)
        self.canvas = FigureCanvasAgg(self.figure)
        self.axes: list[Axes] = [self.figure.add_subplot(1, ncols, i + 1) for i in range(ncols)]
        self._animated: list[Artist] = []
        self._background: Any = None
        self._static_dirty = True
        self._layout_done = False

    @property
    def ax(self) -> Axes:
        """The first (for single-axes plots, the only) axes."""
        return self.axes[0]

    def _animate(self, artist: Artist) -> Artist:
        artist.set_animated(True)
        self._animated.append(artist)
        return artist

    def _mark_static_changed(self) -> None:
        self._static_dirty = True

    def _set_ylim(self, ax: Axes, lo: float, hi: float) -> None:
        if (lo, hi) != tuple(ax.get_ylim()):
            ax.set_ylim(lo, hi)
            self._static_dirty = True

    def _set_xlim(self, ax: Axes, lo: float, hi: float) -> None:
        if (lo, hi) != tuple(ax.get_xlim()):
            ax.set_xlim(lo, hi)
            self._static_dirty = True

    def _cover_y(self, ax: Axes, y: float, *, log: bool) -> None:
        lo, hi = ax.get_ylim()
        if y > hi:
            self._set_ylim(ax, lo, _pow2_ceil(y * 1.5) if log else _nice_ceiling(y * 1.15))
        elif log and 0 < y < lo:
            self._set_ylim(ax, _pow2_floor(y / 1.5), hi)

    def _mark(
        self, current: tuple[float, float] | None, measured: tuple[float, float] | None, text: str
    ) -> None:
        """Place the current-choice marker with its label ``text``, and the measured marker (None hides)."""
        self.current.set_data(*_point(current))
        self.measured.set_data(*_point(measured))
        if current:
            self._place_label(self.label, self.ax, current, text)
        else:
            self.label.set_visible(False)

    def set_measured(self, measured: tuple[float, float] | None) -> None:
        """Only move the measured marker (``(x, measured value)``), e.g. while a run goes on.

        Parameters
        ----------
        measured
            The point, or None to hide it.
        """
        self.measured.set_data(*_point(measured))
        if measured:
            self._cover_y(self.ax, measured[1], log=self.log_y)

    def _place_label(self, label: Any, ax: Axes, xy: tuple[float, float], text: str) -> None:
        """Put a marker's label beside it, on the side with room."""
        lo, hi = ax.get_xlim()
        frac = (math.log(xy[0] / lo) / math.log(hi / lo)) if xy[0] > 0 and lo > 0 and hi > lo else 0.0
        right = frac > 0.6
        label.xy = xy
        label.set_text(text)
        label.set_position((-8 if right else 8, 6))
        label.set_horizontalalignment("right" if right else "left")
        label.set_visible(True)

    def render(self) -> bytes:
        """Draw (incrementally when only animated artists changed) and return PNG bytes.

        Returns
        -------
        bytes
            The PNG image.
        """
        if self._static_dirty or self._background is None:
            if not self._layout_done:
                self.figure.tight_layout(pad=0.6)
                self._layout_done = True
            self.canvas.draw()  # animated artists are left out
            self._background = self.canvas.copy_from_bbox(self.figure.bbox)
            self._static_dirty = False
        else:
            self.canvas.restore_region(self._background)
        for artist in self._animated:
            if artist.get_visible():
                self.figure.draw_artist(artist)
        return self._png()

    def _png(self) -> bytes:
        from PIL import Image

        rgba = np.asarray(self.canvas.buffer_rgba())
        out = io.BytesIO()
        Image.fromarray(rgba[..., :3]).save(out, format="png", compress_level=1)
        return out.getvalue()

    def _style(self, ax: Axes, *, logx: bool = True, logy: bool = False) -> None:
        if logx:
            ax.set_xscale("log")
            ax.xaxis.set_major_locator(LogLocator(numticks=6))
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: _count(v)))
        ax.xaxis.set_minor_locator(NullLocator())
        if logy:
            ax.set_yscale("log")
            ax.yaxis.set_major_locator(LogLocator(numticks=5))
        else:
            ax.yaxis.set_major_locator(MaxNLocator(5))
        ax.yaxis.set_minor_locator(NullLocator())
        ax.grid(True, alpha=0.25)
        ax.tick_params(labelsize=7)
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)


def _nice_ceiling(value: float) -> float:
    """The next of 1, 2, 5 x 10^k at or above ``value``."""
    if value <= 0:
        return 1.0
    k = 10.0 ** math.floor(math.log10(value))
    return next(m * k for m in (1, 2, 5, 10) if m * k >= value)


def _pow2_floor(value: float) -> float:
    return 2.0 ** math.floor(math.log2(value))


def _pow2_ceil(value: float) -> float:
    return 2.0 ** math.ceil(math.log2(value))


class MemoryPlot(PlotPanel):
    """Predicted peak memory against ``dataset_size``, the machine's memory, and the current choice.

    ``ax.lines``: 0 predicted curve, 1 machine memory, 2 memory budget, 3 current choice, 4 measured peak.
    All are blitted over a cached background; the figure is redrawn in full only when an axis limit moves.
    """

    log_y = True

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        ax = self.ax
        self._style(ax, logx=True, logy=True)
        ax.yaxis.set_major_locator(LogLocator(base=4, numticks=6))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: _bytes(v)))
        self.predicted = self._animate(ax.plot([], [], color=_PREDICTED, lw=1.8, label="predicted peak")[0])
        self.machine = self._animate(ax.plot([], [], color=_MACHINE, lw=1.2, label="machine memory")[0])
        self.budget = self._animate(ax.plot([], [], color=_MACHINE, lw=1.0, ls="--", label="available")[0])
        self.current = self._animate(ax.plot([], [], "o", color=_CURRENT, ms=7, label="your choice")[0])
        self.measured = self._animate(ax.plot([], [], "*", color=_MEASURED, ms=12, label="measured")[0])
        self.label = self._animate(
            ax.annotate("", (1, 1), xytext=(6, 6), textcoords="offset points", fontsize=7)
        )
        ax.set_title("predicted peak memory vs dataset_size", fontsize=8)
        ax.set_xlabel("dataset_size (rows)", fontsize=7)
        ax.legend(loc="center right", fontsize=6, frameon=False)

    def update(
        self,
        rows: np.ndarray,
        peak: np.ndarray,
        *,
        machine_bytes: float,
        budget_bytes: float,
        current: tuple[float, float] | None,
        measured: tuple[float, float] | None = None,
    ) -> None:
        """Set the curve, the machine's memory, the budget, and the markers.

        Parameters
        ----------
        rows, peak
            The predicted curve: rows per dataset and peak bytes.
        machine_bytes
            Total memory of the machine.
        budget_bytes
            Memory a run may use (drawn dashed).
        current
            ``(rows, peak bytes)`` of the current plan, or None.
        measured
            ``(rows, measured peak RSS)`` of the last run, or None.
        """
        rows = np.asarray(rows, dtype=float)
        peak = np.asarray(peak, dtype=float)
        self.predicted.set_data(rows, peak)
        x = [rows[0], rows[-1]] if len(rows) else []
        self.machine.set_data(x, [machine_bytes] * len(x))
        self.budget.set_data(x, [budget_bytes] * len(x))
        if len(rows):
            self._set_xlim(self.ax, float(rows[0]) / 1.15, float(rows[-1]) * 1.15)
        values = [v for v in (*peak.tolist(), machine_bytes, budget_bytes) if v > 0]
        values += [p[1] for p in (current, measured) if p and p[1] > 0]
        if values:
            lo, hi = self.ax.get_ylim()
            new_lo, new_hi = _pow2_floor(min(values) / 1.5), _pow2_ceil(max(values) * 1.5)
            if new_lo != lo or new_hi != hi:
                self._set_ylim(self.ax, new_lo, new_hi)
        self._mark(current, measured, _bytes(current[1]) if current else "")


class _ChunkPlot(PlotPanel):
    """A predicted curve against ``shuffle_chunk_size`` with the current choice (and a measured value)."""

    title = ""
    ylabel = ""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        ax = self.ax
        self._style(ax, logx=True)
        self.predicted = self._animate(
            ax.plot([], [], "-", color=_PREDICTED, lw=1.8, marker=".", ms=4, label="predicted")[0]
        )
        self.current = self._animate(ax.plot([], [], "o", color=_CURRENT, ms=7, label="your choice")[0])
        self.measured = self._animate(ax.plot([], [], "*", color=_MEASURED, ms=12, label="measured")[0])
        self.label = self._animate(
            ax.annotate("", (1, 1), xytext=(6, 6), textcoords="offset points", fontsize=7)
        )
        ax.set_title(self.title, fontsize=8)
        ax.set_xlabel("shuffle_chunk_size (rows)", fontsize=7)
        ax.set_ylabel(self.ylabel, fontsize=7)

    def _label(self, y: float) -> str:
        return f"{y:.3g}"

    def _fit_y(self, values: list[float]) -> None:
        """Fit the y range to the values, with hysteresis (moves only when they leave it or shrink)."""
        top = max(values) if values else 1.0
        _, hi = self.ax.get_ylim()
        if not (top <= hi < 3 * top):
            self._set_ylim(self.ax, 0.0, _nice_ceiling(top * 1.15))

    def update(
        self,
        chunks: Sequence[float],
        values: Sequence[float],
        *,
        current: tuple[float, float] | None,
        measured: tuple[float, float] | None = None,
        xlim: tuple[float, float] | None = None,
    ) -> None:
        """Set the predicted curve and the markers.

        Parameters
        ----------
        chunks, values
            The predicted curve.
        current
            ``(shuffle_chunk_size, value)`` of the current plan, or None.
        measured
            ``(shuffle_chunk_size, measured value)`` of the last run, or None.
        xlim
            The ``shuffle_chunk_size`` range to show (default: the curve's and the markers').
        """
        x = np.asarray(chunks, dtype=float)
        y = np.asarray(values, dtype=float)
        self.predicted.set_data(x, y)
        if xlim is None:
            xs = [*x.tolist(), *([current[0]] if current else [])]
            xlim = (min(xs), max(xs)) if xs else None
        if xlim is not None:
            self._set_xlim(self.ax, xlim[0] / 1.3, xlim[1] * 1.3)
        ys = [*y.tolist(), *([current[1]] if current else []), *([measured[1]] if measured else [])]
        self._fit_y([v for v in ys if np.isfinite(v)])
        self._mark(current, measured, self._label(current[1]) if current else "")


class ThroughputPlot(_ChunkPlot):
    """Predicted throughput (cells/s) against ``shuffle_chunk_size``; ``ax.lines[0]`` is the prediction."""

    title = "predicted throughput vs shuffle_chunk_size"
    ylabel = "cells / s"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: _count(v)))
        self.ax.legend(loc="lower right", fontsize=6, frameon=False)

    def _label(self, y: float) -> str:
        return f"{_count(y)} cells/s"


class QualityPlot(_ChunkPlot):
    """Shuffle quality (0-1) against ``shuffle_chunk_size``; ``ax.lines[0]`` is the prediction."""

    title = "shuffle quality vs shuffle_chunk_size"
    ylabel = "quality (1 = ideal)"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.ax.legend(handles=[self.predicted, self.current], loc="lower left", fontsize=6, frameon=False)
        self.ax.set_ylim(0.0, 1.05)

    def _fit_y(self, values: list[float]) -> None:
        pass

    def _label(self, y: float) -> str:
        return f"{y:.2f}"


class RunPlot(PlotPanel):
    """A run, live: resident memory and cells written over time, over the predicted peak and pace.

    ``axes[0].lines``: 0 measured RSS, 1 predicted peak. ``axes[1].lines``: 0 cells written, 1 predicted pace.
    """

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("width", 8.6)
        kwargs.setdefault("height", 2.5)
        super().__init__(ncols=2, **kwargs)
        mem, rows = self.axes
        for ax in self.axes:
            self._style(ax, logx=False)
            ax.xaxis.set_major_locator(MaxNLocator(6))
            ax.set_xlabel("seconds", fontsize=7)
        mem.yaxis.set_major_formatter(FuncFormatter(lambda v, _: _bytes(v)))
        rows.yaxis.set_major_formatter(FuncFormatter(lambda v, _: _count(v)))
        (self.rss,) = mem.plot([], [], color=_MEASURED, lw=1.6, label="measured RSS (with workers)")
        (self.peak,) = mem.plot([], [], color=_PREDICTED, lw=1.2, ls="--", label="predicted peak")
        (self.rows,) = rows.plot([], [], color=_MEASURED, lw=1.6, label="written")
        (self.pace,) = rows.plot([], [], color=_PREDICTED, lw=1.2, ls="--", label="predicted")
        mem.set_title("memory during the run", fontsize=8)
        rows.set_title("cells written", fontsize=8)
        for ax in self.axes:
            ax.legend(loc="lower right", fontsize=6, frameon=False)

    def update(
        self,
        t: Sequence[float],
        rss: Sequence[float],
        rows: Sequence[float],
        *,
        predicted_peak: float,
        predicted_seconds: float,
        n_obs: int,
    ) -> None:
        """Set the measured series and the predictions.

        Parameters
        ----------
        t
            Seconds since the run started, per sample.
        rss
            Resident memory of the process and its worker processes, per sample.
        rows
            Cells written so far, per sample.
        predicted_peak
            The plan's predicted peak memory.
        predicted_seconds
            The plan's predicted wall time.
        n_obs
            Cells to write.
        """
        t_end = max([*t, predicted_seconds, 1.0])
        self.rss.set_data(t, rss)
        self.peak.set_data([0, t_end], [predicted_peak, predicted_peak])
        self.rows.set_data(t, rows)
        self.pace.set_data([0, predicted_seconds, t_end], [0, n_obs, n_obs])
        mem, rws = self.axes
        mem.set_xlim(0, t_end * 1.02)
        rws.set_xlim(0, t_end * 1.02)
        mem.set_ylim(0, max([*rss, predicted_peak]) * 1.25)
        rws.set_ylim(0, n_obs * 1.1 if n_obs else 1)
        self._mark_static_changed()

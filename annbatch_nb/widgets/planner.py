"""The widget planner: pick input files, tune the parameters against live predictions, run with progress.

Everything shown is computed by the planner model (:func:`annbatch_nb.plan.build_plan` on the scanned
metadata, never re-reading files on a slider move) and everything run is :meth:`annbatch_nb.Plan.run`, the
engine the API and the CLI use. Widget state lives in plain Python attributes (``planner.plan``,
``planner.memory_plot.ax`` ...); the ipywidgets are a thin view of it.
"""

from __future__ import annotations

import html
import math
import os
import secrets
import threading
import time
import traceback
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import ipywidgets as widgets
import psutil
from dask.utils import format_bytes

from ..collection import ValidationReport, validate
from ..engine import ShuffleResult
from ..errors import AnnbatchNBError, CancelledError
from ..plan import Parameters, Plan, build_plan
from ..plots import (
    MemoryPlot,
    PlotPanel,
    QualityPlot,
    RunPlot,
    ThroughputPlot,
    chunk_grid,
    dataset_grid,
    memory_curve,
)
from ..predict import Calibration, cached_calibration, rows_for_memory
from ..sources import SourceInfo
from ._debounce import Debouncer
from .files import FilePicker

__all__ = ["Planner"]

#: The dataset_size slider stops where a plan would have this many datasets.
MAX_DATASETS = 10_000
#: The predicted curves against shuffle_chunk_size start where a plan would have this many runs.
MAX_SWEEP_RUNS = 200_000
#: Fraction of the memory budget above which the summary warns.
MEMORY_WARN_FRACTION = 0.8

_STATUS_COLORS = {
    "info": "#555",
    "running": "#1f5fa8",
    "ok": "#1b7a2e",
    "warn": "#a05a00",
    "error": "#b00020",
}


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s" if seconds >= 10 else f"{seconds:.1f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def log_values(lo: int, hi: int, *, per_decade: int = 10, keep: Iterable[int] = ()) -> list[int]:
    """Whole numbers from ``lo`` to ``hi`` (both included), about ``per_decade`` per power of ten.

    Parameters
    ----------
    lo, hi
        The range.
    per_decade
        Steps per factor of 10 (rounded to two significant digits: 10, 13, 16, 20, 25, 32, 40, 50, 63, 79).
    keep
        Values to include as well (those within the range).

    Returns
    -------
    list[int]
        Sorted distinct values.
    """
    lo = max(1, int(lo))
    hi = max(lo, int(hi))
    values = {lo, hi} | {int(v) for v in keep if lo <= v <= hi}
    for k in range(math.floor(math.log10(lo) * per_decade), math.ceil(math.log10(hi) * per_decade) + 1):
        v = int(float(f"{10 ** (k / per_decade):.2g}"))
        if lo <= v <= hi:
            values.add(v)
    return sorted(values)


def _set_values(slider: widgets.SelectionSlider, values: list[int], value: int) -> None:
    """Give a log slider new stops, keeping ``value`` (added as a stop) or its nearest end."""
    value = min(max(int(value), values[0]), values[-1])
    if value not in values:
        values = sorted([*values, value])
    options = tuple((f"{v:,}", v) for v in values)
    if tuple(slider.options) != options:
        slider.options = options
    if slider.value != value:
        slider.value = value


def _tree_rss(proc: psutil.Process) -> int:
    """Resident memory of a process and its descendants (the engine may write datasets in workers)."""
    total = proc.memory_info().rss
    for child in proc.children(recursive=True):
        try:
            total += child.memory_info().rss
        except psutil.Error:  # ended meanwhile
            continue
    return total


class Planner(widgets.VBox):
    """Plan and run a preshuffle in JupyterLab: pick files, tune with live plots, run with progress.

    The planner shows three steps:

    1. **Inputs**: a folder browser with a glob filter and a table of the matching ``.h5ad``/``.zarr`` files
       (format, cells, genes, density, size on disk), each scanned once with :func:`annbatch_nb.scan`; the
       genes shared by all selected files and their union.
    2. **Tune**: ``shuffle_chunk_size`` and ``dataset_size`` on log-scale sliders, ``n_obs_per_chunk``, the
       seed, the output path, the var join and the assignment, with live plots of the predictions
       (:attr:`memory_plot`, :attr:`throughput_plot`, :attr:`quality_plot`, redrawn a debounce delay after the
       last change) and a summary line. A plan whose predicted peak memory exceeds the memory budget cannot be
       run; the reason is shown.
    3. **Run**: :meth:`annbatch_nb.Plan.run` in a background thread (the kernel stays responsive), progress
       bars for cells written and bytes read, the measured memory and throughput drawn over the predicted
       ones (:attr:`run_plot`), *Cancel* (the output stays resumable: *Run* again resumes), and
       :func:`annbatch_nb.validate` at the end. Errors are shown in the status line, never lost. With a dask
       ``client``, the datasets are tasks on its cluster: a third bar counts them and the status links the
       dask dashboard (the memory drawn is this kernel's, not the workers').

    Parameters
    ----------
    inputs
        Files, folders or glob patterns to pre-select (as :func:`annbatch_nb.plan` takes them).
    output
        Path of the collection to write.
    directory
        Folder the browser starts in (default: the inputs' folder, else the working directory).
    pattern
        Glob filter of the browser (comma-separated patterns; ``**`` recurses).
    memory_limit
        Memory (bytes) a run may use; default: this machine's available memory plus what this process holds.
    calibration
        Rates behind the predictions (default: a cached calibration of the selected inputs on this machine,
        else the reference machine's; see :func:`annbatch_nb.predict.calibrate`).
    debounce
        Seconds of quiet after a change before the plots are redrawn (0: redraw synchronously, in the
        thread that made the change).
    monitor_interval
        Seconds between memory samples (and live plot updates) during a run.
    client
        A :class:`dask.distributed.Client`: *Run* writes the datasets as tasks on its cluster (see
        :func:`annbatch_nb.execute`); None runs them in this machine's processes.
    **params
        Initial parameters of :func:`annbatch_nb.plan`: ``shuffle_chunk_size``, ``dataset_size`` (rows, a
        size such as ``"2GB"``, or ``"auto"``), ``n_obs_per_chunk``, ``shard_size``, ``seed`` (None draws
        one), ``var_join``, ``dtype``, ``assignment``, ``memory_fraction``.

    Raises
    ------
    ParameterError
        If an initial parameter is invalid.

    Examples
    --------
    >>> import annbatch_nb as abn
    >>> abn.Planner(["atlas/*.h5ad"], output="atlas.zarr", shuffle_chunk_size=1000)  # doctest: +SKIP
    """

    def __init__(
        self,
        inputs: str | os.PathLike[str] | Iterable[str | os.PathLike[str]] | None = None,
        output: str | os.PathLike[str] | None = None,
        *,
        directory: str | os.PathLike[str] | None = None,
        pattern: str = "*",
        memory_limit: int | None = None,
        calibration: Calibration | None = None,
        debounce: float = 0.05,
        monitor_interval: float = 1.0,
        client: Any = None,
        **params: Any,
    ) -> None:
        if params.get("seed") is None:
            params["seed"] = secrets.randbelow(2**31)  # small enough for the browser's numbers
        self._params = Parameters.validated(**params)
        self._pending_dataset_size: str | None = (
            self._params.dataset_size if isinstance(self._params.dataset_size, str) else None
        )
        self.memory_limit = memory_limit
        self.calibration = calibration
        self.monitor_interval = float(monitor_interval)
        #: The dask client runs use (None: local processes).
        self.client = client

        #: The plan of the current inputs and parameters (None when there is none; see :attr:`plan_error`).
        self.plan: Plan | None = None
        #: Why there is no plan, or None.
        self.plan_error: str | None = None
        #: Warnings about the current plan (also in the summary line).
        self.warnings: list[str] = []
        #: Why Run is disabled, or None.
        self.run_blocked: str | None = None
        #: The summary line as plain text.
        self.summary_text = ""
        #: The last run's result, validation report and error.
        self.result: ShuffleResult | None = None
        self.report: ValidationReport | None = None
        self.error: BaseException | None = None
        #: Completed redraws, and ``time.perf_counter()`` stamps of the last (started, first_paint, done).
        self.redraws = 0
        self.last_redraw: dict[str, float] = {}
        #: Samples of the last run: seconds, resident memory, cells written, bytes read.
        self.samples: list[tuple[float, int, int, int]] = []

        self._lock = threading.RLock()
        self._redrawn = threading.Condition()
        self._holds = 0
        self._generation = 0
        self._infos: list[SourceInfo] = []
        self._selection: tuple[Any, ...] = ()
        self._cal: Calibration | None = None
        self._plans: OrderedDict[Any, Plan] = OrderedDict()
        self._points: OrderedDict[Any, tuple[float, float] | None] = OrderedDict()
        self._measured_memory: tuple[float, float] | None = None
        self._measured_rate: tuple[float, float] | None = None
        self._thread: threading.Thread | None = None
        self._cancel_event: threading.Event | None = None
        self._rows_bar: Any = None
        self._bytes_bar: Any = None
        self._tasks_bar: Any = None
        self._rows_done = 0
        self._bytes_done = 0
        self._t0 = time.perf_counter()

        self._build_widgets(output)
        self.files = FilePicker(directory, pattern, inputs, exclude=[os.fspath(output)] if output else [])
        self.files.on_change(self._on_files_changed)
        self._debouncer = Debouncer(self._redraw, debounce)
        super().__init__(self._layout())
        self.add_class("abn-planner")
        self._on_files_changed(schedule=False)
        self._redraw()  # the first paint, before the planner is shown

    # ----------------------------------------------------------------------------------------------
    # Widgets
    # ----------------------------------------------------------------------------------------------
    def _build_widgets(self, output: str | os.PathLike[str] | None) -> None:
        p = self._params
        style = {"description_width": "125px"}
        wide = widgets.Layout(width="520px")
        # log-scale sliders: stops spaced evenly in log(value), every value a whole number
        chunks = log_values(1, max(10_000, p.shuffle_chunk_size), keep=[p.shuffle_chunk_size])
        self.shuffle_chunk_size = widgets.SelectionSlider(
            options=[(f"{v:,}", v) for v in chunks],
            value=p.shuffle_chunk_size,
            description="shuffle_chunk_size",
            style=style,
            layout=wide,
        ).add_class("abn-shuffle-chunk-size")
        rows = p.dataset_size if isinstance(p.dataset_size, int) else 10_000
        sizes = log_values(1, max(1_000_000, rows), keep=[rows])
        self.dataset_size = widgets.SelectionSlider(
            options=[(f"{v:,}", v) for v in sizes],
            value=rows,
            description="dataset_size",
            style=style,
            layout=wide,
        ).add_class("abn-dataset-size")
        self.dataset_size_label = widgets.HTML().add_class("abn-dataset-size-label")
        self.fit_button = widgets.Button(
            description="fit memory",
            tooltip="largest dataset_size whose predicted peak fits memory_fraction of the memory budget",
            layout=widgets.Layout(width="100px"),
        ).add_class("abn-fit-memory")
        self.n_obs_per_chunk = widgets.BoundedIntText(
            value=p.n_obs_per_chunk,
            min=1,
            max=1 << 24,
            description="n_obs_per_chunk",
            style=style,
            layout=widgets.Layout(width="230px"),
        ).add_class("abn-n-obs-per-chunk")
        self.seed = widgets.BoundedIntText(
            value=p.seed,
            min=0,
            max=2**53 - 1,
            description="seed",
            style={"description_width": "40px"},
            layout=widgets.Layout(width="180px"),
        ).add_class("abn-seed")
        self.output_path = widgets.Text(
            value=os.fspath(output) if output else "",
            placeholder="collection.zarr",
            description="output",
            continuous_update=False,
            style=style,
            layout=wide,
        ).add_class("abn-output")
        self.var_join = widgets.ToggleButtons(
            options=["outer", "inner"],
            value=p.var_join,
            tooltips=["union of genes (missing genes are zeros)", "genes present in every input"],
            style={"button_width": "80px"},
        ).add_class("abn-var-join")
        self.assignment = widgets.ToggleButtons(
            options=["balanced", "uniform"],
            value=p.assignment,
            tooltips=["every dataset gets every input's share", "annbatch's random cut"],
            style={"button_width": "80px"},
        ).add_class("abn-assignment")

        self.memory_plot = MemoryPlot()
        self.throughput_plot = ThroughputPlot()
        self.quality_plot = QualityPlot()
        self.run_plot = RunPlot()

        def image(css: str, width: str) -> widgets.Image:
            layout = widgets.Layout(width=width, max_width="100%", height="auto", align_self="flex-start")
            return widgets.Image(format="png", layout=layout).add_class(css)

        # the three plots share a row (shrinking with the notebook's width); the run plot keeps its size
        self.memory_image = image("abn-memory-plot", "32.5%")
        self.throughput_image = image("abn-throughput-plot", "32.5%")
        self.quality_image = image("abn-quality-plot", "32.5%")
        self.run_image = image("abn-run-plot", "auto")
        self.run_image.layout.display = "none"
        self._images: dict[int, widgets.Image] = {
            id(self.memory_plot): self.memory_image,
            id(self.throughput_plot): self.throughput_image,
            id(self.quality_plot): self.quality_image,
            id(self.run_plot): self.run_image,
        }
        self.summary = widgets.HTML().add_class("abn-summary")
        self.run_button = widgets.Button(description="Run", icon="play", button_style="success").add_class(
            "abn-run"
        )
        self.cancel_button = widgets.Button(
            description="Cancel", icon="stop", button_style="warning", disabled=True
        ).add_class("abn-cancel")
        self.run_reason = widgets.HTML().add_class("abn-run-reason")
        self.progress = widgets.VBox(layout=widgets.Layout(width="100%")).add_class("abn-progress")
        self.status = widgets.HTML(layout=widgets.Layout(width="100%")).add_class("abn-status")

        for w in (self.shuffle_chunk_size, self.dataset_size, self.n_obs_per_chunk, self.seed):
            w.observe(self._schedule, names="value")
        for w in (self.var_join, self.assignment, self.output_path):
            w.observe(self._schedule, names="value")
        self.output_path.observe(lambda c: self.files.set_exclude([c["new"]]), names="value")
        self.fit_button.on_click(lambda _: self.fit_memory())
        self.run_button.on_click(lambda _: self.run())
        self.cancel_button.on_click(lambda _: self.cancel())

    def _layout(self) -> list[widgets.Widget]:
        def heading(text: str) -> widgets.HTML:
            return widgets.HTML(f'<h4 style="margin:10px 0 4px 0">{text}</h4>')

        def labeled(text: str, widget: widgets.Widget) -> widgets.HBox:
            label = widgets.HTML(
                f'<div style="text-align:right;padding-right:8px">{text}</div>',
                layout=widgets.Layout(width="133px"),
            )
            return widgets.HBox([label, widget], layout=widgets.Layout(align_items="center"))

        controls = widgets.VBox(
            [
                self.shuffle_chunk_size,
                widgets.HBox([self.dataset_size, self.fit_button]),
                self.dataset_size_label,
                widgets.HBox([self.n_obs_per_chunk, self.seed]),
                widgets.HBox([labeled("var_join", self.var_join), labeled("assignment", self.assignment)]),
                self.output_path,
            ]
        )
        plots = widgets.HBox(
            [self.memory_image, self.throughput_image, self.quality_image],
            layout=widgets.Layout(
                flex_flow="row wrap", align_items="flex-start", justify_content="space-between"
            ),
        )
        return [
            widgets.HTML('<h3 style="margin:4px 0">annbatch-nb planner</h3>'),
            heading("1 · Inputs"),
            self.files,
            heading("2 · Tune"),
            controls,
            plots,
            self.summary,
            heading("3 · Run"),
            widgets.HBox(
                [self.run_button, self.cancel_button, self.run_reason],
                layout=widgets.Layout(align_items="center"),
            ),
            self.progress,
            self.status,
            self.run_image,
        ]

    # ----------------------------------------------------------------------------------------------
    # Public API
    # ----------------------------------------------------------------------------------------------
    @property
    def params(self) -> Parameters:
        """The parameters the widgets show (validated).

        Raises
        ------
        ParameterError
            If a widget holds an invalid value.
        """
        return Parameters.validated(
            shuffle_chunk_size=int(self.shuffle_chunk_size.value),
            dataset_size=int(self.dataset_size.value),
            n_obs_per_chunk=int(self.n_obs_per_chunk.value),
            shard_size=self._params.shard_size,
            seed=int(self.seed.value),
            var_join=self.var_join.value,
            dtype=self._params.dtype,
            assignment=self.assignment.value,
            memory_fraction=self._params.memory_fraction,
        )

    @property
    def running(self) -> bool:
        """Whether a run is in progress."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def figures(self) -> dict[str, Any]:
        """The matplotlib figures: ``memory``, ``throughput``, ``quality``, ``run``."""
        return {
            "memory": self.memory_plot.figure,
            "throughput": self.throughput_plot.figure,
            "quality": self.quality_plot.figure,
            "run": self.run_plot.figure,
        }

    def flush(self) -> None:
        """Redraw now if a change is waiting for its debounce delay, and wait for a redraw in progress."""
        self._debouncer.flush()
        with self._lock:
            pass

    def refresh(self) -> None:
        """Recompute the plan and redraw everything now."""
        self._debouncer.cancel()
        self._generation += 1
        self._redraw()

    def set(self, **values: Any) -> None:
        """Set controls by parameter name, as if the user had (one redraw for all of them).

        Slider values between the slider's stops are added as stops.

        Parameters
        ----------
        **values
            Any of ``shuffle_chunk_size``, ``dataset_size`` (rows), ``n_obs_per_chunk``, ``seed``,
            ``var_join``, ``assignment``, ``output``.

        Raises
        ------
        TypeError
            For an unknown name.
        """
        controls = {
            "n_obs_per_chunk": self.n_obs_per_chunk,
            "seed": self.seed,
            "var_join": self.var_join,
            "assignment": self.assignment,
            "output": self.output_path,
        }
        unknown = set(values) - set(controls) - {"shuffle_chunk_size", "dataset_size"}
        if unknown:
            raise TypeError(f"Planner.set() got unknown parameter(s): {', '.join(sorted(unknown))}")
        with self._hold():
            for name in ("shuffle_chunk_size", "dataset_size"):
                if name in values:
                    slider = getattr(self, name)
                    v = int(values[name])
                    _set_values(slider, sorted({*self._slider_values(slider), max(1, v)}), v)
            for name, widget in controls.items():
                if name in values:
                    widget.value = os.fspath(values[name]) if name == "output" else values[name]
        self._schedule()

    def fit_memory(self) -> None:
        """Set ``dataset_size`` to the largest whose predicted peak fits ``memory_fraction`` of the budget."""
        ref = self.plan or self._reference_plan()
        if ref is None:
            return
        rows = rows_for_memory(ref, self._budget() * self._params.memory_fraction, ref.calibration)
        self.set(dataset_size=max(rows, ref.params.shuffle_chunk_size))

    def run(self) -> None:
        """Start executing the current plan in a background thread (what the Run button does).

        Progress, measured memory and the outcome appear in the widget; :meth:`wait` waits for the end, after
        which :attr:`result`, :attr:`report` or :attr:`error` tell what happened.
        """
        self.flush()
        with self._lock:
            if self.running:
                return
            if self.run_blocked or self.plan is None:
                self._set_status(f"cannot run: {self.run_blocked or 'no plan'}", "error")
                return
            plan, output = self.plan, self.output_path.value.strip()
            self.result = self.report = self.error = None
            self.samples = []
            self._rows_done = self._bytes_done = 0
            self._measured_memory = self._measured_rate = None
            self._cancel_event = threading.Event()
            self._make_bars(plan)
            self._set_controls_disabled(True)
            self.run_button.disabled = True
            self.cancel_button.disabled = False
            self.run_image.layout.display = None
            self._set_status(self._running_text(output), "running", escape=False)
            stop = threading.Event()
            monitor = threading.Thread(
                target=self._monitor, args=(plan, stop), name="annbatch-nb-planner-monitor", daemon=True
            )
            self._thread = threading.Thread(
                target=self._worker,
                args=(plan, output, self._cancel_event, stop, monitor),
                name="annbatch-nb-planner-run",
                daemon=True,
            )
            self._t0 = time.perf_counter()
            monitor.start()
            self._thread.start()

    def cancel(self) -> None:
        """Ask the run to stop; it stops at its next check and leaves a resumable output."""
        if self._cancel_event is not None and self.running:
            self._cancel_event.set()
            self.cancel_button.disabled = True
            self._set_status("cancelling …", "warn")

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the run to end.

        Parameters
        ----------
        timeout
            Seconds to wait at most (None: no limit).

        Returns
        -------
        bool
            True if no run is in progress any more.
        """
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
        return not self.running

    # ----------------------------------------------------------------------------------------------
    # Reacting to changes
    # ----------------------------------------------------------------------------------------------
    @contextmanager
    def _hold(self) -> Iterator[None]:
        """Make programmatic widget changes without scheduling a redraw for each."""
        self._holds += 1
        try:
            yield
        finally:
            self._holds -= 1

    def _schedule(self, *_: Any) -> None:
        if self._holds:
            return
        self._generation += 1
        self._debouncer()

    def _on_files_changed(self, schedule: bool = True) -> None:
        with self._lock:
            infos = self.files.selected_infos
            self._infos = infos
            self._selection = tuple((i.path, i.display, i.size_bytes, i.mtime) for i in infos)
            self._cal = self.calibration or (cached_calibration(infos) if infos else None)
            self._measured_memory = self._measured_rate = None
            if infos:
                self._update_ranges()
        if schedule:
            self._schedule()

    def _update_ranges(self) -> None:
        n_obs = sum(i.n_obs for i in self._infos)
        max_file = max(i.n_obs for i in self._infos)
        with self._hold():
            if self._pending_dataset_size is not None:
                try:
                    p = build_plan(
                        self._infos,
                        replace(self._params, dataset_size=self._pending_dataset_size),
                        self._cal,
                    )
                    _set_values(self.dataset_size, self._slider_values(self.dataset_size), p.dataset_rows)
                    self._pending_dataset_size = None
                except AnnbatchNBError:
                    pass  # shown by the redraw, which plans with the slider's value
            _set_values(
                self.shuffle_chunk_size,
                log_values(1, max_file, keep=[self.shuffle_chunk_size.value]),
                self.shuffle_chunk_size.value,
            )
            _set_values(
                self.dataset_size,
                log_values(math.ceil(n_obs / MAX_DATASETS), n_obs, keep=[self.dataset_size.value]),
                self.dataset_size.value,
            )

    @staticmethod
    def _slider_values(slider: widgets.SelectionSlider) -> list[int]:
        return [int(v) for _, v in slider.options]

    # ----------------------------------------------------------------------------------------------
    # Planning (cached: moving a slider back and forth rebuilds nothing)
    # ----------------------------------------------------------------------------------------------
    def _plan_for(self, params: Parameters) -> Plan:
        key = (self._selection, params)
        plan = self._plans.get(key)
        if plan is None:
            plan = build_plan(self._infos, params, self._cal)
            self._plans[key] = plan
            while len(self._plans) > 6:
                self._plans.popitem(last=False)
        else:
            self._plans.move_to_end(key)
        return plan

    def _point(self, params: Parameters) -> tuple[float, float] | None:
        """Predicted (cells/s, quality) of a sweep point; None where the parameters are invalid."""
        key = (self._selection, params)
        if key not in self._points:
            try:
                p = build_plan(self._infos, params, self._cal)
                self._points[key] = (p.n_obs / max(p.seconds, 1e-9), p.quality.score)
            except AnnbatchNBError:
                self._points[key] = None
            while len(self._points) > 1024:
                self._points.popitem(last=False)
        return self._points[key]

    def _reference_plan(self) -> Plan | None:
        """A valid plan of the current inputs (one dataset) when the current parameters give none."""
        if not self._infos:
            return None
        try:
            params = self.params
            n_obs = sum(i.n_obs for i in self._infos)
            return self._plan_for(replace(params, dataset_size=max(n_obs, params.shuffle_chunk_size)))
        except AnnbatchNBError:
            return None

    def _budget(self) -> int:
        if self.memory_limit is not None:
            return int(self.memory_limit)
        return int(psutil.virtual_memory().available + psutil.Process().memory_info().rss)

    def _update_plan(self) -> None:
        self.plan, self.plan_error = None, None
        if not self._infos:
            self.plan_error = "select at least one input file"
            return
        try:
            self.plan = self._plan_for(self.params)
        except AnnbatchNBError as e:
            self.plan_error = str(e)

    # ----------------------------------------------------------------------------------------------
    # Drawing
    # ----------------------------------------------------------------------------------------------
    def _redraw(self) -> None:
        with self._lock:
            generation = self._generation
            started = first = time.perf_counter()
            try:
                self._update_plan()
                self._draw_memory()
                complete = self._draw_chunk_curves(compute=False)
                self._update_summary()
                self._publish(self.memory_plot, self.throughput_plot, self.quality_plot)
                first = time.perf_counter()
                if not complete and self._draw_chunk_curves(compute=True, generation=generation):
                    self._publish(self.throughput_plot, self.quality_plot)
            except Exception as e:  # a bug must show, not vanish in a timer thread
                self.summary.value = self._error_html("the planner failed to update", e)
            finally:
                self.last_redraw = {"started": started, "first_paint": first, "done": time.perf_counter()}
                with self._redrawn:
                    self.redraws += 1
                    self._redrawn.notify_all()

    def _publish(self, *plots: PlotPanel) -> None:
        for plot in plots:
            self._images[id(plot)].value = plot.render()

    def _draw_memory(self) -> None:
        machine = psutil.virtual_memory().total
        budget = self._budget()
        ref = self.plan or self._reference_plan()
        if ref is None:
            self.memory_plot.update([], [], machine_bytes=machine, budget_bytes=budget, current=None)
            self.dataset_size_label.value = ""
            return
        rows = dataset_grid(self._slider_values(self.dataset_size)[0], ref.n_obs)
        current = (float(self.plan.dataset_rows), float(self.plan.peak_memory_bytes)) if self.plan else None
        self.memory_plot.update(
            rows,
            memory_curve(ref, rows),
            machine_bytes=machine,
            budget_bytes=budget,
            current=current,
            measured=self._measured_memory,
        )
        n = int(self.dataset_size.value)
        per_row = ref.raw_bytes_per_row()
        datasets = f" → <b>{self.plan.n_datasets:,}</b> dataset(s)" if self.plan else ""
        self.dataset_size_label.value = (
            f'<span style="margin-left:130px;color:#444">dataset_size = <b>{n:,}</b> rows ≈ '
            f"<b>{format_bytes(int(n * per_row))}</b> of X each{datasets}</span>"
        )

    def _draw_chunk_curves(self, *, compute: bool, generation: int | None = None) -> bool:
        """Draw throughput and quality against shuffle_chunk_size; False if points were left to compute."""
        if not self._infos:
            for plot in (self.throughput_plot, self.quality_plot):
                plot.update([], [], current=None)
            return True
        try:
            params = self.params
        except AnnbatchNBError:
            return True
        n_obs = sum(i.n_obs for i in self._infos)
        max_file = max(i.n_obs for i in self._infos)
        grid = chunk_grid(
            min(max_file, params.dataset_size if isinstance(params.dataset_size, int) else n_obs),
            min_chunk=math.ceil(n_obs / MAX_SWEEP_RUNS),
        )
        xs: list[int] = []
        rates: list[float] = []
        quality: list[float] = []
        for c in grid:
            p = replace(params, shuffle_chunk_size=c)
            if (self._selection, p) not in self._points:
                if not compute:
                    self._draw_chunk_markers()
                    return False
                if generation is not None and generation != self._generation:
                    return False  # a newer change will redraw
            point = self._point(p)
            if point is not None:
                xs.append(c)
                rates.append(point[0])
                quality.append(point[1])
        plan = self.plan
        c_now = float(params.shuffle_chunk_size)
        xlim = self._chunk_xlim()
        self.throughput_plot.update(
            xs,
            rates,
            current=(c_now, plan.n_obs / max(plan.seconds, 1e-9)) if plan else None,
            measured=self._measured_rate,
            xlim=xlim,
        )
        self.quality_plot.update(
            xs, quality, current=(c_now, plan.quality.score) if plan else None, xlim=xlim
        )
        return True

    def _chunk_xlim(self) -> tuple[float, float]:
        """The shuffle_chunk_size range of the plots: the slider's."""
        return 1.0, float(self._slider_values(self.shuffle_chunk_size)[-1])

    def _draw_chunk_markers(self) -> None:
        """Move the current-choice markers, keeping the curves (they are being recomputed)."""
        plan = self.plan
        for plot, value in (
            (self.throughput_plot, (plan.n_obs / max(plan.seconds, 1e-9)) if plan else None),
            (self.quality_plot, plan.quality.score if plan else None),
        ):
            line = plot.predicted
            current = (float(plan.params.shuffle_chunk_size), value) if plan and value is not None else None
            measured = self._measured_rate if plot is self.throughput_plot else None
            plot.update(
                line.get_xdata(),
                line.get_ydata(),
                current=current,
                measured=measured,
                xlim=self._chunk_xlim(),
            )

    def _update_summary(self) -> None:
        warnings: list[str] = []
        blocked: str | None = None
        plan = self.plan
        budget = self._budget()
        if plan is None:
            blocked = self.plan_error or "no plan"
            text = f"✘ {blocked}"
            body = f'<span style="color:{_STATUS_COLORS["error"]}">✘ {html.escape(blocked)}</span>'
        else:
            peak = plan.peak_memory_bytes
            q = plan.quality
            if peak > budget:
                fit = rows_for_memory(plan, budget, plan.calibration)
                blocked = (
                    f"does not fit in memory: predicted peak {format_bytes(peak)} exceeds the "
                    f"{format_bytes(budget)} available; lower dataset_size (at most {fit:,} rows fit)"
                )
                warnings.append(blocked)
            elif peak > MEMORY_WARN_FRACTION * budget:
                warnings.append(
                    f"predicted peak is {peak / budget:.0%} of the {format_bytes(budget)} available memory"
                )
            if q.score < 0.5:
                warnings.append(
                    f"low shuffle quality ({q.score:.2f}): lower shuffle_chunk_size or raise dataset_size"
                )
            if plan.params.assignment == "uniform" and q.composition < 0.9:
                warnings.append(
                    f"datasets mix the inputs unevenly (composition {q.composition:.2f}): "
                    "assignment='balanced' fixes that"
                )
            rate = plan.n_obs / max(plan.seconds, 1e-9)
            parts = [
                (f"{plan.n_obs:,} cells × {plan.n_vars:,} genes", None),
                (f"{plan.n_datasets:,}", f" dataset(s) of ~{int(plan.rows_per_dataset.mean()):,} rows"),
                ("predicted peak memory ", format_bytes(peak)),
                ("predicted time ", f"~{_duration(plan.seconds)} ({rate:,.0f} cells/s)"),
                ("output ≈ ", format_bytes(plan.output_bytes)),
                ("quality ", f"{q.score:.2f}"),
            ]
            text = " · ".join(a + (b or "") for a, b in parts)
            body = " · ".join(
                (
                    f"<b>{html.escape(a)}</b>{html.escape(b)}"
                    if i == 1
                    else f"{html.escape(a)}<b>{html.escape(b)}</b>"
                )
                if b
                else html.escape(a)
                for i, (a, b) in enumerate(parts)
            )
            text += " · warnings: " + ("; ".join(warnings) if warnings else "none")
            if warnings:
                items = "".join(f"<li>{html.escape(w)}</li>" for w in warnings)
                warn = _STATUS_COLORS["warn"]
                body += f'<div style="color:{warn}">⚠ warnings:<ul style="margin:0">{items}</ul></div>'
            else:
                body += " · warnings: none"
        if blocked is None and not self.output_path.value.strip():
            blocked = "set an output path"
        self.warnings = warnings
        self.summary_text = text
        self.summary.value = f'<div style="padding:4px 0">{body}</div>'
        self.run_blocked = blocked
        self._update_run_button()

    def _update_run_button(self, running: bool | None = None) -> None:
        running = self.running if running is None else running
        self.run_button.disabled = running or self.run_blocked is not None
        self.run_button.tooltip = self.run_blocked or "execute this plan"
        color = _STATUS_COLORS["error"]
        self.run_reason.value = (
            f'<span style="color:{color}">Run is disabled: {html.escape(self.run_blocked)}</span>'
            if self.run_blocked and not running
            else ""
        )

    # ----------------------------------------------------------------------------------------------
    # Running
    # ----------------------------------------------------------------------------------------------
    def _set_controls_disabled(self, disabled: bool) -> None:
        self.files.set_disabled(disabled)
        for w in (
            self.shuffle_chunk_size,
            self.dataset_size,
            self.fit_button,
            self.n_obs_per_chunk,
            self.seed,
            self.output_path,
            self.var_join,
            self.assignment,
        ):
            w.disabled = disabled

    def _set_status(self, text: str, kind: str = "info", *, escape: bool = True) -> None:
        body = html.escape(text) if escape else text
        self.status.value = f'<div style="color:{_STATUS_COLORS[kind]};padding:4px 0">{body}</div>'

    @staticmethod
    def _error_html(what: str, e: BaseException) -> str:
        tb = html.escape("".join(traceback.format_exception(e)))
        return (
            f'<div style="color:{_STATUS_COLORS["error"]}">✘ {html.escape(what)}: '
            f"{html.escape(type(e).__name__)}: {html.escape(str(e))}"
            f'<details><summary>details</summary><pre style="font-size:11px">{tb}</pre></details></div>'
        )

    def _make_bars(self, plan: Plan) -> None:
        from tqdm.notebook import tqdm as notebook_tqdm

        common = {"display": False, "leave": True, "mininterval": 0.25, "dynamic_ncols": True}
        self._rows_bar = notebook_tqdm(
            total=plan.n_obs, desc="cells written", unit=" cells", unit_scale=True, **common
        )
        self._bytes_bar = notebook_tqdm(
            total=int(sum(i.raw_x_bytes for i in plan.inputs)),
            desc="bytes read",
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            **common,
        )
        self._tasks_bar = None
        bars = [self._rows_bar, self._bytes_bar]
        if self.client is not None:
            self._tasks_bar = notebook_tqdm(
                total=plan.n_datasets, desc="dataset tasks", unit=" datasets", **common
            )
            bars.insert(0, self._tasks_bar)
        self.progress.children = [b.container for b in bars]

    def _running_text(self, output: str) -> str:
        """Status HTML while running (with the dask dashboard link on a cluster)."""
        text = f"running → {html.escape(output)} …"
        if self.client is None:
            return text
        n = len(self.client.scheduler_info(n_workers=-1)["workers"])
        text += f" on a dask cluster of {n} worker(s)"
        link = getattr(self.client, "dashboard_link", None)
        if link:
            text += f' — <a href="{html.escape(link)}" target="_blank">dask dashboard</a>'
        return text

    def _on_progress(self, what: str, n: int) -> None:
        """Progress callback of the engine: ``("rows"|"bytes"|"datasets", n)`` increments."""
        if what == "datasets":
            if self._tasks_bar is not None:
                self._tasks_bar.update(max(0, min(n, self._tasks_bar.total - self._tasks_bar.n)))
            return
        if what == "rows":
            self._rows_done += n
            bar = self._rows_bar
        else:
            self._bytes_done += n
            bar = self._bytes_bar
        if bar is not None:
            bar.update(max(0, min(n, bar.total - bar.n)))

    def _close_bars(self, *, complete: bool, style: str | None = None) -> None:
        for bar in (self._tasks_bar, self._rows_bar, self._bytes_bar):
            if bar is None:
                continue
            if complete:
                bar.n = bar.total
                bar.refresh()
            bar.close()
            if style is not None:
                bar.container.children[1].bar_style = style

    def _worker(
        self,
        plan: Plan,
        output: str,
        cancel: threading.Event,
        stop: threading.Event,
        monitor: threading.Thread,
    ) -> None:
        on_progress = self._on_progress
        try:
            try:
                result = plan.run(
                    output, progress=False, cancel=cancel, on_progress=on_progress, client=self.client
                )
            except CancelledError:
                self._close_bars(complete=False, style="warning")
                self._set_status(
                    f"■ cancelled — {output} is left resumable: press Run again to resume "
                    "(completed datasets are kept)",
                    "warn",
                )
                return
            self.result = result
            self._close_bars(complete=True)
            self._set_status("validating …", "running")
            report = validate(output)
            self.report = report
            where = html.escape(os.path.abspath(output))
            what = (
                "already complete; "
                if result.already_complete
                else f"written in {_duration(result.seconds)}; "
            )
            if report.ok:
                self._set_status(
                    f"✔ validated — {html.escape(what + str(report))}<br>output: <code>{where}</code>",
                    "ok",
                    escape=False,
                )
            else:
                self._set_status(
                    f"✘ validation failed — {html.escape(str(report))}<br>output: <code>{where}</code>",
                    "error",
                    escape=False,
                )
        except AnnbatchNBError as e:  # a bad file, an unusable output ...: one readable line
            self.error = e
            self._close_bars(complete=False)
            self._set_status(f"✘ {type(e).__name__}: {e}", "error")
        except BaseException as e:  # anything else: the message, with the traceback one click away
            self.error = e
            self._close_bars(complete=False)
            self.status.value = self._error_html("the run failed", e)
        finally:
            stop.set()
            monitor.join()
            with self._lock:
                self._set_controls_disabled(False)
                self.cancel_button.disabled = True
                self._update_run_button(running=False)

    def _monitor(self, plan: Plan, stop: threading.Event) -> None:
        """Sample the process' resident memory and the progress; draw them live over the predictions."""
        proc = psutil.Process()
        while True:
            stopped = stop.wait(self.monitor_interval if self.samples else 0.0)
            t = time.perf_counter() - self._t0
            rss = _tree_rss(proc)
            self.samples.append((t, rss, self._rows_done, self._bytes_done))
            try:
                self._draw_run(plan)
            except Exception as e:  # never kill the run for a plot
                self.run_image.layout.display = "none"
                self.summary.value += self._error_html("the live plot failed", e)
            if stopped:
                return

    def _draw_run(self, plan: Plan) -> None:
        t = [s[0] for s in self.samples]
        rss = [s[1] for s in self.samples]
        rows = [s[2] for s in self.samples]
        with self._lock:
            self.run_plot.update(
                t,
                rss,
                rows,
                predicted_peak=plan.peak_memory_bytes,
                predicted_seconds=plan.seconds,
                n_obs=plan.n_obs,
            )
            self._measured_memory = (float(plan.dataset_rows), float(max(rss)))
            self.memory_plot.set_measured(self._measured_memory)
            if t[-1] > 0 and rows[-1] > 0:
                self._measured_rate = (float(plan.params.shuffle_chunk_size), rows[-1] / t[-1])
                self.throughput_plot.set_measured(self._measured_rate)
            self._publish(self.run_plot, self.memory_plot, self.throughput_plot)

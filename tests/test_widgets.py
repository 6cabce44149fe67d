"""The widget planner as Python objects (no browser): set values, fire observers, run, cancel, show errors.

Redraws are synchronous here (``debounce=0``) except in the debounce test; runs happen in the planner's
background thread and are waited on with ``planner.wait``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import zarr

matplotlib.use("Agg")

import annbatch_nb as abn
from annbatch_nb.collection import is_committed
from annbatch_nb.demo import make_demo_data

CSS_CLASSES = {
    "abn-planner",
    "abn-files",
    "abn-shuffle-chunk-size",
    "abn-dataset-size",
    "abn-memory-plot",
    "abn-throughput-plot",
    "abn-quality-plot",
    "abn-summary",
    "abn-run",
    "abn-cancel",
    "abn-progress",
    "abn-status",
}
RUN_TIMEOUT = 180


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Six small demo inputs (825 cells: three .h5ad, three .zarr), never modified."""
    root = tmp_path_factory.mktemp("widget-demo")
    return [str(p) for p in make_demo_data(root, scale=0.05)]


def planner(demo: list[str], output: Path | str | None, **kwargs) -> abn.Planner:
    kwargs = {"shuffle_chunk_size": 20, "dataset_size": 300, "seed": 0, "debounce": 0, **kwargs}
    return abn.Planner(inputs=demo, output=str(output) if output else None, **kwargs)


def all_classes(widget) -> set[str]:
    found = set(getattr(widget, "_dom_classes", ()))
    for child in getattr(widget, "children", ()):
        found |= all_classes(child)
    return found


def ydata(plot, line: int = 0) -> np.ndarray:
    return np.asarray(plot.ax.lines[line].get_ydata(), dtype=float).copy()


def xdata(plot, line: int = 0) -> np.ndarray:
    return np.asarray(plot.ax.lines[line].get_xdata(), dtype=float).copy()


# --------------------------------------------------------------------------------------------------
# Imports
# --------------------------------------------------------------------------------------------------
def test_importing_the_package_does_not_import_widget_code() -> None:
    code = (
        "import sys, annbatch_nb, annbatch_nb.plan, annbatch_nb.engine, annbatch_nb.cli\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('ipywidgets', 'matplotlib', 'tqdm.notebook')\n"
        "       or m.startswith('annbatch_nb.widgets') or m == 'annbatch_nb.plots']\n"
        "assert not bad, bad\n"
        "assert annbatch_nb.Planner.__name__ == 'Planner'\n"
        "assert 'ipywidgets' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# --------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------
def test_prefilled_inputs_table_and_overlap(demo: list[str], tmp_path: Path) -> None:
    p = planner(demo, tmp_path / "out.zarr")
    assert all_classes(p) >= CSS_CLASSES
    entries = p.files.entries
    assert [e.path for e in entries] == demo
    assert all(e.selected and e.error is None for e in entries)
    infos = abn.scan(demo)
    common = set.intersection(*(set(i.var_names) for i in infos))
    union = set.union(*(set(i.var_names) for i in infos))
    overlap = p.files.overlap.value
    assert f"genes in all files: <b>{len(common):,}</b>" in overlap
    assert f"in the union: <b>{len(union):,}</b>" in overlap
    # the table: a header and one row of 7 cells per file, with format, cells, genes, density and size
    assert len(p.files.table.children) == 7 * (len(demo) + 1)
    row = [c.value for c in p.files.table.children[8:14]]
    assert "h5ad" in row[1] and f"{infos[0].n_obs:,}" in row[2] and f"{infos[0].n_vars:,}" in row[3]
    assert "%" in row[4] and "B" in row[5]
    assert p.plan is not None and p.plan.n_obs == sum(i.n_obs for i in infos)


def test_browse_folders_glob_and_select(demo: list[str], tmp_path: Path) -> None:
    folder = str(Path(demo[0]).parent)
    p = abn.Planner(directory=folder, pattern="*.h5ad", output=str(tmp_path / "o.zarr"), debounce=0, seed=0)
    assert [e.name for e in p.files.entries] == sorted(Path(d).name for d in demo if d.endswith(".h5ad"))
    assert all(e.selected for e in p.files.entries)
    p.files.pattern.value = "*.zarr, *donor1*"
    names = [e.name for e in p.files.entries]
    assert names == ["gut_donor5.zarr", "gut_donor6.zarr", "lung_donor4.zarr", "pbmc_donor1.h5ad"]
    n_all = p.plan.n_obs

    p.files.select_none()
    assert p.plan is None and p.run_button.disabled
    assert p.run_blocked == "select at least one input file"
    p.files.entries[0].checkbox.value = True
    assert p.plan is not None and p.plan.n_obs < n_all
    p.files.select_all()
    assert p.plan.n_obs == n_all

    # navigate: up to the parent, then back down through the subfolder list
    p.files.up_button.click()
    assert Path(p.files.directory.value).resolve() == Path(folder).parent.resolve()
    assert "inputs" in p.files.subfolders.options[1][1]
    p.files.subfolders.value = "inputs"
    assert Path(p.files.directory.value).resolve() == Path(folder).resolve()
    p.files.directory.value = str(tmp_path / "nowhere")
    assert "no such folder" in p.files.message.value
    assert p.files.entries == [] and p.run_button.disabled


def test_unreadable_and_missing_inputs_are_shown(demo: list[str], tmp_path: Path) -> None:
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "broken.h5ad").write_bytes(b"this is not an HDF5 file")
    os.symlink(demo[0], folder / "good.h5ad")
    p = abn.Planner(directory=str(folder), output=str(tmp_path / "o.zarr"), debounce=0, seed=0)
    broken, good = p.files.entries
    assert broken.info is None and broken.checkbox.disabled and not broken.selected
    assert "broken.h5ad" in broken.error
    assert "✘" in p.files.table.children[8].value  # the error is in the row
    assert good.selected and p.plan is not None and [i.display for i in p.plan.inputs] == [good.path]

    p = abn.Planner(inputs=[str(tmp_path / "nope.h5ad")], debounce=0, seed=0)
    assert "no such file or directory" in p.files.message.value
    assert p.plan is None and "select at least one input file" in p.summary_text


# --------------------------------------------------------------------------------------------------
# Tune
# --------------------------------------------------------------------------------------------------
def test_sliders_and_controls_replan_and_redraw(demo: list[str], tmp_path: Path) -> None:
    p = planner(demo, tmp_path / "out.zarr")
    n_obs = p.plan.n_obs
    assert p.plan.dataset_rows == 300 and p.plan.n_datasets == 3
    mem_marker = xdata(p.memory_plot, 3)
    thr_curve, q_curve = ydata(p.throughput_plot), ydata(p.quality_plot)
    assert len(thr_curve) >= 4 and np.all(np.diff(q_curve) <= 1e-12)  # quality falls as runs grow
    assert mem_marker.tolist() == [300.0]

    assert 100 in [v for _, v in p.dataset_size.options]  # a stop of the log slider
    p.dataset_size.value = 100  # as the browser sets it: the observer replans
    assert p.plan.dataset_rows == 100 and p.plan.n_datasets == -(-n_obs // 100)
    assert xdata(p.memory_plot, 3).tolist() == [100.0]
    assert not np.array_equal(ydata(p.quality_plot), q_curve)  # smaller datasets mix less
    assert not np.array_equal(ydata(p.throughput_plot), thr_curve)
    assert "<b>100</b> rows" in p.dataset_size_label.value

    q_before = ydata(p.quality_plot, 1)
    p.shuffle_chunk_size.value = 5
    assert p.plan.params.shuffle_chunk_size == 5
    assert xdata(p.quality_plot, 1).tolist() == [5.0]
    assert ydata(p.quality_plot, 1)[0] > q_before[0]

    p.var_join.value = "inner"
    common = set.intersection(*(set(i.var_names) for i in abn.scan(demo)))
    assert p.plan.n_vars == len(common)

    mem_x, mem_y = xdata(p.memory_plot), ydata(p.memory_plot)
    p.files.entries[0].checkbox.value = False  # fewer cells: another memory curve over another range
    assert p.plan.n_obs < n_obs
    assert mem_x[-1] == n_obs and xdata(p.memory_plot)[-1] == p.plan.n_obs
    assert not np.array_equal(ydata(p.memory_plot), mem_y)
    p.files.entries[0].checkbox.value = True

    p.assignment.value = "uniform"
    p.seed.value = 7
    p.n_obs_per_chunk.value = 32
    params = p.plan.params
    assert (params.assignment, params.seed, params.n_obs_per_chunk) == ("uniform", 7, 32)
    # the planner's plan is the API's plan for the same parameters
    api = abn.plan(
        demo,
        shuffle_chunk_size=5,
        dataset_size=100,
        seed=7,
        var_join="inner",
        assignment="uniform",
        n_obs_per_chunk=32,
    )
    assert p.plan.fingerprint == api.fingerprint
    for key in ("datasets", "predicted peak memory", "predicted time", "quality", "warnings"):
        assert key in p.summary_text
    assert p.memory_image.value[:8] == b"\x89PNG\r\n\x1a\n"


def test_machine_memory_line_and_sizes(demo: list[str], tmp_path: Path) -> None:
    import psutil

    p = planner(demo, tmp_path / "out.zarr", dataset_size="auto")
    assert set(ydata(p.memory_plot, 1)) == {float(psutil.virtual_memory().total)}
    assert p.plan.n_datasets == 1  # everything fits: "auto" is one dataset
    assert p.dataset_size.value == p.plan.n_obs
    p = planner(demo, tmp_path / "out.zarr", dataset_size="40kB")
    assert 1 < p.plan.n_datasets < p.plan.n_obs
    assert p.dataset_size.value == p.plan.dataset_rows


def test_plan_that_does_not_fit_disables_run(demo: list[str], tmp_path: Path) -> None:
    p = planner(demo, tmp_path / "out.zarr", memory_limit=50_000_000)
    assert p.plan is not None and p.plan.peak_memory_bytes > 50_000_000
    assert p.run_button.disabled
    assert p.run_blocked.startswith("does not fit in memory")
    assert "does not fit in memory" in p.run_reason.value and "does not fit in memory" in p.summary.value
    p.run()
    assert not p.running and "cannot run" in p.status.value
    assert set(ydata(p.memory_plot, 2)) == {50_000_000.0}  # the budget line

    p.memory_limit = 64 * 2**30
    p.refresh()
    assert not p.run_button.disabled and p.run_blocked is None
    p.memory_limit = p.plan.peak_memory_bytes * 4
    p.fit_memory()
    assert p.plan.peak_memory_bytes <= p.memory_limit * p.plan.params.memory_fraction
    assert not p.run_button.disabled


def test_invalid_combination_disables_run(demo: list[str], tmp_path: Path) -> None:
    p = planner(demo, tmp_path / "out.zarr")
    p.set(shuffle_chunk_size=150, dataset_size=100)
    assert p.plan is None and "larger than dataset_size" in p.plan_error
    assert p.run_button.disabled and "larger than dataset_size" in p.run_reason.value
    assert len(ydata(p.quality_plot)) > 0  # the curves still show what is possible
    p.output_path.value = ""
    p.set(dataset_size=300)
    assert p.plan is not None and p.run_blocked == "set an output path" and p.run_button.disabled


def test_changes_are_debounced(demo: list[str], tmp_path: Path) -> None:
    p = planner(demo, tmp_path / "out.zarr", debounce=0.1)
    before = p.redraws
    for v in (120, 140, 160, 180, 200):
        p.set(dataset_size=v)
    with p._redrawn:
        assert p._redrawn.wait_for(lambda: p.redraws > before, timeout=10)
    time.sleep(0.3)
    assert p.redraws == before + 1  # five changes, one redraw
    assert p.plan.dataset_rows == 200
    assert xdata(p.memory_plot, 3).tolist() == [200.0]


# --------------------------------------------------------------------------------------------------
# Run
# --------------------------------------------------------------------------------------------------
def test_run_to_completion(demo: list[str], tmp_path: Path) -> None:
    out = tmp_path / "out.zarr"
    p = planner(demo, out, monitor_interval=0.2)
    n_obs = p.plan.n_obs
    p.run_button.click()
    assert p.running or p.result is not None
    assert p.wait(RUN_TIMEOUT), "the run did not finish"
    assert "validated" in p.status.value, p.status.value
    assert str(out) in p.status.value
    assert p.error is None and p.report.ok and p.result.datasets_written == p.plan.n_datasets
    assert abn.validate(out, inputs=demo).ok
    # progress bars in cells and bytes, complete
    rows_bar, bytes_bar = p._rows_bar, p._bytes_bar
    assert rows_bar.n == rows_bar.total == n_obs and bytes_bar.n == bytes_bar.total > 0
    assert [c for c in p.progress.children] == [rows_bar.container, bytes_bar.container]
    assert rows_bar.container.children[1].bar_style == "success"
    # measured memory and throughput, drawn over the predictions
    assert p.samples and p.samples[-1][2] == n_obs
    assert len(p.run_plot.axes[0].lines[0].get_xdata()) == len(p.samples)
    assert p.run_plot.axes[1].lines[0].get_ydata()[-1] == n_obs
    assert len(xdata(p.memory_plot, 4)) == 1 and ydata(p.memory_plot, 4)[0] > 0
    assert len(xdata(p.throughput_plot, 2)) == 1 and ydata(p.throughput_plot, 2)[0] > 0
    assert p.run_image.value[:4] == b"\x89PNG" and p.run_image.layout.display is None
    # controls are back; running again finds the collection complete
    assert not p.run_button.disabled and p.cancel_button.disabled and not p.dataset_size.disabled
    p.run()
    assert p.wait(RUN_TIMEOUT) and p.result.already_complete and "validated" in p.status.value


def test_cancel_leaves_a_resumable_output(demo: list[str], tmp_path: Path) -> None:
    out = tmp_path / "out.zarr"
    p = planner(demo, out)
    first_rows = int(p.plan.rows_per_dataset[0])
    engine_progress = p._on_progress

    def cancel_in_second_dataset(what: str, n: int) -> None:
        engine_progress(what, n)
        if what == "bytes" and p._rows_done >= first_rows:
            p.cancel()

    p._on_progress = cancel_in_second_dataset
    p.run()
    assert p.wait(RUN_TIMEOUT)
    assert "cancelled" in p.status.value and "resum" in p.status.value
    assert p.result is None and p.error is None
    assert not is_committed(zarr.open_group(str(out), mode="r"))
    assert p._rows_bar.container.children[1].bar_style == "warning"
    assert not p.run_button.disabled

    p._on_progress = engine_progress
    p.run()
    assert p.wait(RUN_TIMEOUT)
    assert "validated" in p.status.value, p.status.value
    assert p.result.datasets_resumed == 1
    assert p.result.datasets_resumed + p.result.datasets_written == p.plan.n_datasets
    assert abn.validate(out, inputs=demo).ok


def test_kernel_thread_stays_free_during_a_run(demo: list[str], tmp_path: Path) -> None:
    p = planner(demo, tmp_path / "out.zarr")
    p.run()
    t = time.perf_counter()
    assert p.running  # run() returned at once; the work is in another thread
    assert time.perf_counter() - t < 0.5
    assert any(th.name == "annbatch-nb-planner-run" for th in threading.enumerate())
    p.cancel()
    assert p.wait(RUN_TIMEOUT)


def test_errors_appear_in_the_widget(
    demo: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # an output location that belongs to something else
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    p = planner(demo, taken)
    p.run()
    assert p.wait(RUN_TIMEOUT)
    assert isinstance(p.error, abn.OutputError)
    assert "OutputError" in p.status.value and "taken" in p.status.value
    assert "validated" not in p.status.value and "Traceback" not in p.status.value
    assert (taken / "notes.txt").read_text() == "mine"

    # an output under a file: not writable
    blocker = tmp_path / "file"
    blocker.write_text("x")
    p.output_path.value = str(blocker / "out.zarr")
    p.run()
    assert p.wait(RUN_TIMEOUT)
    assert isinstance(p.error, abn.AnnbatchNBError) and "✘" in p.status.value

    # an input that changed after it was scanned
    changed = tmp_path / "changed"
    changed.mkdir()
    src = changed / "a.h5ad"
    src.write_bytes(Path(demo[0]).read_bytes())
    q = abn.Planner(
        inputs=[str(src)],
        output=str(tmp_path / "c.zarr"),
        shuffle_chunk_size=10,
        dataset_size=100,
        debounce=0,
        seed=0,
    )
    with src.open("ab") as f:
        f.write(b"\0" * 10)
    q.run()
    assert q.wait(RUN_TIMEOUT)
    assert isinstance(q.error, abn.InputError) and "changed" in q.status.value

    # an unexpected failure: message and traceback, one click away
    def boom(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(abn.Plan, "run", boom)
    p.output_path.value = str(tmp_path / "fine.zarr")
    p.run()
    assert p.wait(RUN_TIMEOUT)
    assert "RuntimeError: disk on fire" in p.status.value and "<details>" in p.status.value
    assert "Traceback" in p.status.value

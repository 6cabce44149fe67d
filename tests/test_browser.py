"""The planner in a real browser: JupyterLab + headless Debian Chromium, driven by Playwright.

Starts JupyterLab (127.0.0.1, free port, no token, temporary Jupyter directories, the project's venv as the
kernel), opens ``notebooks/planner-demo.ipynb`` on small demo data, runs it, checks that the widgets render,
moves the ``dataset_size`` slider and sees the memory plot change, clicks Run, waits for ``validated``, and
saves a screenshot to ``test-artifacts/planner-browser.png``. ``make test`` installs Debian's chromium.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import pytest
from browser.lab import CHROMIUM, CHROMIUM_ARGS, jupyter_lab

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "planner-demo.ipynb"
ARTIFACTS = ROOT / "test-artifacts"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def playwright_sync():
    if not Path(CHROMIUM).exists():
        pytest.skip(
            f"{CHROMIUM} is missing: `make test` installs Debian's chromium (apt-get install chromium)"
        )
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="playwright is a test extra: pip install -e .[test]"
    )
    return sync_api


def kernel_ready(page, timeout: float = 120) -> None:
    """Wait until the notebook's kernel is idle, accepting the kernel dialog should JupyterLab still ask."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        dialog = page.locator(".jp-Dialog .jp-mod-accept")
        if dialog.count():
            dialog.first.click()
        idle = page.locator(".jp-Notebook-ExecutionIndicator[data-status='idle']").count()
        if idle and page.locator(".jp-StatusBar-Widget", has_text="| Idle").count():
            page.wait_for_timeout(500)
            if not page.locator(".jp-Dialog").count():
                return
        page.wait_for_timeout(250)
    raise TimeoutError("the notebook's kernel did not become idle")


def test_planner_in_jupyterlab(playwright_sync, tmp_path: Path) -> None:
    root = tmp_path / "lab"
    root.mkdir()
    shutil.copy(NOTEBOOK, root / NOTEBOOK.name)
    data = root / "demo-data"
    env = {"ANNBATCH_NB_DEMO_DIR": str(data), "ANNBATCH_NB_DEMO_SCALE": "0.1", "MPLBACKEND": "Agg"}
    ARTIFACTS.mkdir(exist_ok=True)
    console: list[str] = []

    with jupyter_lab(root, tmp_path, env=env) as lab, playwright_sync.sync_playwright() as pw:
        browser = pw.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"),
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1500, "height": 2300},
        )
        try:
            page = browser.pages[0] if browser.pages else browser.new_page()
            page.on("console", lambda m: console.append(f"{m.type}: {m.text}"))
            page.set_default_timeout(120_000)
            page.goto(f"{lab.url}/lab/tree/{NOTEBOOK.name}")
            kernel_ready(page)
            # the kernel is the project's interpreter (jupyter_client runs the native kernel with it)
            assert lab.kernel_executables() == [sys.executable], lab.kernel_executables()

            # Run > Run All Cells
            page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
            page.locator("li.lm-Menu-item[data-command='runmenu:run-all']").click()

            planner = page.locator(".abn-planner")
            planner.wait_for(state="visible")
            memory = page.locator("img.abn-memory-plot")
            page.wait_for_function(
                "() => { const i = document.querySelector('img.abn-memory-plot');"
                " return i && i.src.startsWith('blob:') && i.naturalWidth > 0; }"
            )
            # every part rendered; no widget stuck loading
            for css in (
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
            ):
                assert page.locator(f".{css}").count() >= 1, css
            assert page.locator(".abn-dataset-size .noUi-handle").count() == 1
            assert page.locator(".abn-files input[type=checkbox]").count() == 6
            assert "quality" in page.locator(".abn-summary").inner_text()
            assert page.get_by_text("Loading widget").count() == 0
            assert page.get_by_text("Error displaying widget").count() == 0

            # move the dataset_size slider with the keyboard: the memory plot is redrawn
            before_src = memory.get_attribute("src")
            before_label = page.locator(".abn-dataset-size-label").inner_text()
            handle = page.locator(".abn-dataset-size .noUi-handle")
            handle.focus()
            for _ in range(4):
                page.keyboard.press("ArrowRight")
            page.wait_for_function(
                "(before) => document.querySelector('img.abn-memory-plot').src !== before", arg=before_src
            )
            page.wait_for_function(
                "(before) => document.querySelector('.abn-dataset-size-label').innerText !== before",
                arg=before_label,
            )

            # run, and wait for the validated collection
            run = page.locator("button.abn-run")
            assert run.is_enabled()
            t = time.monotonic()
            run.click()
            page.wait_for_function(
                "() => (document.querySelector('.abn-status')?.innerText || '').includes('validated')",
                timeout=150_000,
            )
            status = page.locator(".abn-status").inner_text()
            assert str(data / "collection.zarr") in status, status
            assert page.locator(".abn-progress .progress-bar, .abn-progress .widget-progress").count() >= 2
            page.wait_for_function(
                "() => { const i = document.querySelector('img.abn-run-plot');"
                " return i && i.naturalWidth > 0 && i.offsetParent !== null; }"
            )
            print(f"run + validation in the browser: {time.monotonic() - t:.1f} s")
            planner.scroll_into_view_if_needed()
            page.wait_for_timeout(300)
            planner.screenshot(path=str(ARTIFACTS / "planner-browser.png"))
            page.screenshot(path=str(ARTIFACTS / "planner-browser-page.png"))
        except Exception:
            with_path = ARTIFACTS / "planner-browser-failure.png"
            page.screenshot(path=str(with_path))
            print("\n".join(console[-40:]))
            print(lab.log_tail())
            raise
        finally:
            browser.close()
    assert (data / "collection.zarr" / "zarr.json").exists()

"""Start a throwaway JupyterLab server and a headless Debian Chromium (Playwright) for browser tests.

The server listens on 127.0.0.1 on a free port, without token or password, with temporary Jupyter config,
data and runtime directories (so nothing of the user's Jupyter setup leaks in: the ``python3`` kernel is the
interpreter running the tests, i.e. the project's venv), and is stopped by its PID when the test ends.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

CHROMIUM = os.environ.get("ANNBATCH_NB_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class LabServer:
    """A running JupyterLab server."""

    url: str
    root: Path
    process: subprocess.Popen
    log: Path

    def get(self, path: str) -> object:
        """GET a JSON document of the server's REST API."""
        with urllib.request.urlopen(f"{self.url}{path}", timeout=10) as r:
            return json.loads(r.read())

    def kernel_executables(self) -> list[str]:
        """The interpreters of the kernels this server runs (as started, not resolved)."""
        import psutil

        out = []
        for child in psutil.Process(self.process.pid).children(recursive=True):
            try:
                cmdline = child.cmdline()
                if any("ipykernel" in part for part in cmdline):
                    out.append(cmdline[0])
            except psutil.Error:
                continue
        return out

    def log_tail(self, n: int = 60) -> str:
        """The last lines of the server's log (for failure messages)."""
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)  # the server shuts its kernels down
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # a kernel left behind in the server's own session


@contextlib.contextmanager
def jupyter_lab(
    root: Path, workdir: Path, *, env: dict[str, str] | None = None, timeout: float = 120
) -> Iterator[LabServer]:
    """Run ``jupyter lab`` on ``root`` for the duration of the ``with`` block.

    Parameters
    ----------
    root
        The server's root directory (notebooks are opened relative to it).
    workdir
        Where the temporary Jupyter directories and the server log go.
    env
        Extra environment variables (the kernels inherit them).
    timeout
        Seconds to wait for the server to answer.
    """
    config, data, runtime = (workdir / d for d in ("jupyter-config", "jupyter-data", "jupyter-runtime"))
    for d in (config, data, runtime):
        d.mkdir(parents=True, exist_ok=True)
    # no news toast, no update check: clean screenshots, no network
    (config / "labconfig").mkdir(exist_ok=True)
    (config / "labconfig" / "page_config.json").write_text(
        json.dumps({"disabledExtensions": {"@jupyterlab/apputils-extension:announcements": True}})
    )
    # start the notebook's kernel without asking; attach every cell to the page (screenshots show them all)
    settings = config / "lab" / "user-settings" / "@jupyterlab" / "notebook-extension"
    settings.mkdir(parents=True, exist_ok=True)
    (settings / "tracker.jupyterlab-settings").write_text(
        json.dumps({"autoStartDefaultKernel": True, "windowingMode": "none"})
    )
    port = free_port()
    full_env = {
        **os.environ,
        "JUPYTER_CONFIG_DIR": str(config),
        "JUPYTER_DATA_DIR": str(data),
        "JUPYTER_RUNTIME_DIR": str(runtime),
        "PYTHONUNBUFFERED": "1",
        **(env or {}),
    }
    cmd = [
        sys.executable,
        "-m",
        "jupyter",
        "lab",
        "--allow-root",
        "--no-browser",
        "--ip=127.0.0.1",
        f"--port={port}",
        "--ServerApp.port_retries=0",
        "--IdentityProvider.token=",
        "--ServerApp.password=",
        f"--ServerApp.root_dir={root}",
    ]
    log = workdir / "jupyter-lab.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=full_env, start_new_session=True
        )
    server = LabServer(f"http://127.0.0.1:{port}", root, proc, log)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"jupyter lab exited with {proc.returncode}:\n{server.log_tail()}")
            try:
                server.get("/api/status")
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"jupyter lab did not answer in {timeout} s:\n{server.log_tail()}"
                    ) from None
                time.sleep(0.25)
        yield server
    finally:
        _stop(proc)

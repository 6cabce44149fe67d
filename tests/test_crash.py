"""Crash safety: kill -9 anywhere, resume, locks, changed inputs, write errors.

Each crash is a real SIGKILL of a CLI process at a named point (``ANNBATCH_NB_STOP_AT``); the re-run must
resume and produce the same bytes as a run that was never interrupted.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import zarr
from conftest import run_cli

import annbatch_nb as abn
from annbatch_nb.demo import make_demo_data
from annbatch_nb.shards import ShardedArray

PARAMS = ["--shuffle-chunk-size", "50", "--dataset-size", "400", "--n-obs-per-chunk", "16"]
PARAMS += ["--shard-size", "16KB", "--seed", "11", "--no-progress", "-q"]


def _digest(path: Path) -> dict[str, str]:
    out = {}
    for f in sorted(path.rglob("*")):
        if f.is_file():
            out[str(f.relative_to(path))] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    d = tmp_path_factory.mktemp("crash-inputs")
    return [str(p) for p in make_demo_data(d, scale=0.1)]


@pytest.fixture(scope="module")
def reference(inputs: list[str], tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    out = tmp_path_factory.mktemp("crash-ref") / "ref.zarr"
    proc = run_cli("shuffle", *inputs, "-o", str(out), *PARAMS)
    assert proc.returncode == 0, proc.stderr
    return _digest(out)


@pytest.fixture
def untouched_inputs(inputs: list[str]):
    before = {
        p: _digest(Path(p)) if Path(p).is_dir() else hashlib.sha256(Path(p).read_bytes()).hexdigest()
        for p in inputs
    }
    yield inputs
    after = {
        p: _digest(Path(p)) if Path(p).is_dir() else hashlib.sha256(Path(p).read_bytes()).hexdigest()
        for p in inputs
    }
    assert after == before, "an input file was modified"


def _not_loadable(out: Path) -> None:
    import annbatch

    root = zarr.open_group(str(out), mode="r")
    assert "encoding-type" not in root.attrs
    assert annbatch.DatasetCollection(str(out), mode="r").is_empty
    assert not abn.validate(out).ok


@pytest.mark.slow
@pytest.mark.parametrize(
    ("point", "already_done"),
    [
        ("start", 0),  # manifest written, no dataset yet
        ("dataset-read:0", 0),  # first dataset read, nothing of it written
        ("shard:2", 2),  # mid-dataset: one shard of dataset 2 stored
        ("dataset-written:3", 3),  # dataset 3 fully written but not yet recorded complete
        ("before-commit", 5),  # every dataset complete, marker not yet written
    ],
)
def test_kill_anywhere_then_resume_gives_identical_bytes(
    untouched_inputs: list[str], reference: dict[str, str], tmp_path: Path, point: str, already_done: int
) -> None:
    out = tmp_path / "out.zarr"
    args = ["shuffle", *untouched_inputs, "-o", str(out), *PARAMS]
    killed = run_cli(*args, env={"ANNBATCH_NB_STOP_AT": point})
    assert killed.returncode == -9, killed.stderr
    _not_loadable(out)
    resumed = run_cli("shuffle", *untouched_inputs, "-o", str(out), *PARAMS)
    assert resumed.returncode == 0, resumed.stderr
    if already_done:
        assert f"resumed: {already_done} of 5 datasets already complete" in resumed.stdout
    assert _digest(out) == reference
    assert abn.validate(out, inputs=untouched_inputs).ok


def test_rerun_without_a_seed_resumes_with_the_recorded_one(
    untouched_inputs: list[str], tmp_path: Path
) -> None:
    """The same command, seed drawn each time: the re-run adopts the seed the interrupted run recorded."""
    out = tmp_path / "out.zarr"
    args = ["shuffle", *untouched_inputs, "-o", str(out), *[a for a in PARAMS if a not in ("--seed", "11")]]
    killed = run_cli(*args, env={"ANNBATCH_NB_STOP_AT": "dataset-written:2"})
    assert killed.returncode == -9, killed.stderr
    recorded = zarr.open_group(str(out), mode="r")["annbatch_nb"].attrs["params"]["seed"]
    resumed = run_cli(*args)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed: 2 of 5 datasets already complete" in resumed.stdout
    assert zarr.open_group(str(out), mode="r")["annbatch_nb"].attrs["params"]["seed"] == recorded
    assert abn.validate(out, inputs=untouched_inputs).ok
    again = run_cli(*args)
    assert again.returncode == 0 and "already complete" in again.stdout


def test_cancel_leaves_a_resumable_output(
    untouched_inputs: list[str], reference: dict[str, str], tmp_path: Path
):
    import threading

    out = tmp_path / "out.zarr"
    p = abn.plan(
        untouched_inputs,
        shuffle_chunk_size=50,
        dataset_size=400,
        n_obs_per_chunk=16,
        shard_size="16KB",
        seed=11,
    )
    cancel = threading.Event()
    rows = []

    def on_progress(what: str, n: int) -> None:
        if what == "rows":
            rows.append(n)
            if sum(rows) > 700:
                cancel.set()

    with pytest.raises(abn.CancelledError):
        p.run(out, progress=False, cancel=cancel, on_progress=on_progress)
    _not_loadable(out)
    assert not (out / "annbatch_nb" / "lock.json").exists(), "a cancelled run must release its lock"
    seen: list[tuple[str, int]] = []
    result = p.run(out, progress=False, on_progress=lambda what, n: seen.append((what, n)))
    assert result.datasets_resumed >= 1
    # the resumed run reports what the earlier one did first, so progress still adds up to every cell
    assert seen[0][0] == "rows" and seen[0][1] > 0
    assert sum(n for what, n in seen if what == "rows") == p.n_obs
    assert _digest(out) == reference


def test_second_writer_is_refused_while_the_first_holds_the_lock(inputs: list[str], tmp_path: Path) -> None:
    out = tmp_path / "out.zarr"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / "annbatch_nb").mkdir(parents=True)
        lock = {"pid": sleeper.pid, "host": os.uname().nodename, "since": "2026-01-01T00:00:00"}
        (out / "annbatch_nb" / "lock.json").write_text(json.dumps(lock))
        proc = run_cli("shuffle", *inputs, "-o", str(out), *PARAMS)
        assert proc.returncode == 2
        assert f"locked by another run (pid {sleeper.pid} on host {lock['host']}" in proc.stderr
        assert not (out / "dataset_0").exists()
    finally:
        sleeper.kill()
        sleeper.wait()
    # the holder is gone now: its stale lock is taken over
    proc = run_cli("shuffle", *inputs, "-o", str(out), *PARAMS)
    assert proc.returncode == 0, proc.stderr
    assert not (out / "annbatch_nb" / "lock.json").exists()


def test_changed_input_refuses_resume_and_restart_starts_over(inputs: list[str], tmp_path: Path) -> None:
    src = tmp_path / "inputs"
    src.mkdir()
    copies = []
    for p in inputs[:3]:  # the h5ad files
        dst = src / Path(p).name
        dst.write_bytes(Path(p).read_bytes())
        copies.append(str(dst))
    out = tmp_path / "out.zarr"
    killed = run_cli(
        "shuffle", *copies, "-o", str(out), *PARAMS, env={"ANNBATCH_NB_STOP_AT": "dataset-written:1"}
    )
    assert killed.returncode == -9
    os.utime(copies[1], (1_000_000_000, 1_000_000_000))  # the input changed (mtime)
    proc = run_cli("shuffle", *copies, "-o", str(out), *PARAMS)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: {out}: was started from {copies[1]}")
    assert "--restart" in proc.stderr
    (out / "notes.txt").write_text("mine")  # something of the user's in the output folder
    proc = run_cli("shuffle", *copies, "-o", str(out), *PARAMS, "--restart")
    assert proc.returncode == 0, proc.stderr
    assert abn.validate(out, inputs=copies).ok
    assert (out / "notes.txt").read_text() == "mine", "restart must delete only what annbatch-nb wrote"


def test_write_error_is_one_line_and_resumable(
    inputs: list[str], reference: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out.zarr"
    p = abn.plan(
        inputs, shuffle_chunk_size=50, dataset_size=400, n_obs_per_chunk=16, shard_size="16KB", seed=11
    )
    real_put = ShardedArray.put
    calls = {"n": 0}

    def full_disk(self, coords, shard):  # the disk fills up after a few shards
        calls["n"] += 1
        if calls["n"] > 7:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_put(self, coords, shard)

    monkeypatch.setattr(ShardedArray, "put", full_disk)
    with pytest.raises(abn.OutputError) as info:
        p.run(out, progress=False)
    msg = str(info.value)
    assert "\n" not in msg and "No space left on device" in msg and "resume" in msg
    _not_loadable(out)
    monkeypatch.setattr(ShardedArray, "put", real_put)  # space freed
    p.run(out, progress=False)
    assert _digest(out) == reference


@pytest.mark.parametrize("where", ["/proc/annbatch-nb-test.zarr", "/sys/annbatch-nb-test.zarr"])
def test_unwritable_output_location_is_one_line(inputs: list[str], where: str) -> None:
    # root ignores permission bits, so use file systems nobody can create files in
    with pytest.raises(abn.OutputError, match="cannot be written") as info:
        abn.shuffle(inputs[:2], where, progress=False)
    assert str(info.value).startswith(where) and "\n" not in str(info.value)

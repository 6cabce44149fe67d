"""The command line: every subcommand runs the same API, errors are one line, exit codes are right."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from annbatch_nb.cli import main
from annbatch_nb.demo import make_demo_data


@pytest.fixture(scope="module")
def demo_inputs(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    d = tmp_path_factory.mktemp("cli-demo")
    return [str(p) for p in make_demo_data(d, scale=0.1)]


def test_plan_json_has_the_documented_keys(
    demo_inputs: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    rc = main(
        ["plan", *demo_inputs, "--shuffle-chunk-size", "50", "--dataset-size", "600", "--seed", "3", "--json"]
    )
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["n_obs"] == 1650
    assert out["n_datasets"] == 3
    assert sum(out["rows_per_dataset"]) == 1650
    assert out["params"]["seed"] == 3
    assert out["params"]["shuffle_chunk_size"] == 50


def test_shuffle_then_validate(
    demo_inputs: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "c.zarr"
    args = ["shuffle", *demo_inputs, "-o", str(out), "--shuffle-chunk-size", "50", "--dataset-size", "600"]
    assert main([*args, "--seed", "1", "--no-progress"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert main(["validate", str(out), "--inputs", *demo_inputs]) == 0
    assert "valid" in capsys.readouterr().out
    # the same command again: nothing to do
    assert main([*args, "--seed", "1", "--no-progress"]) == 0
    assert "already complete" in capsys.readouterr().out
    # a different plan into the same output is refused, with one line naming the output
    assert main([*args, "--seed", "2", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: {out}:")
    assert [line for line in err if line.startswith("error")] == [err[-1]]


def test_validate_fails_with_exit_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty.zarr").mkdir()
    assert main(["validate", str(tmp_path / "empty.zarr")]) == 1
    assert "INVALID" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["shuffle", "{missing}", "-o", "{out}"], "no such file or directory"),
        (["shuffle", "{input}", "-o", "{out}", "--shuffle-chunk-size", "0"], "shuffle_chunk_size"),
        (["shuffle", "{input}", "-o", "{out}", "--dataset-size", "abc"], "dataset_size"),
        (["plan", "{input}", "--dataset-size=-1GB"], "dataset_size"),
        (["plan", "{input}", "--dtype", "str"], "dtype"),
    ],
)
def test_bad_input_is_one_line_without_traceback(
    demo_inputs: list[str], tmp_path: Path, args: list[str], needle: str
) -> None:
    subs = {
        "{missing}": str(tmp_path / "nope.h5ad"),
        "{out}": str(tmp_path / "o.zarr"),
        "{input}": demo_inputs[0],
    }
    argv = [subs.get(a, a) for a in args]
    proc = subprocess.run(
        [sys.executable, "-m", "annbatch_nb.cli", *argv],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and needle in lines[0]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "o.zarr").exists()


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "annbatch_nb.cli", "--debug", "plan", str(tmp_path / "nope.h5ad")],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" in proc.stderr


def test_console_script_is_installed() -> None:
    exe = Path(sys.executable).with_name("annbatch-nb")
    proc = subprocess.run([str(exe), "--version"], capture_output=True, text=True, check=False, timeout=60)
    assert proc.returncode == 0 and "annbatch-nb" in proc.stdout


def test_demo_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--dir", str(tmp_path / "demo"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "valid" in out and "collection.zarr" in out
    assert (tmp_path / "demo" / "collection.zarr" / "zarr.json").is_file()

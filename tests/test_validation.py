"""``annbatch_nb.validate`` accepts a good collection and explains what is wrong with a damaged one."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import zarr
from conftest import dataset_keys

import annbatch_nb as abn


def test_good_output_is_valid(mixed) -> None:
    report = abn.validate(mixed.output, inputs=mixed.inputs)
    assert report.ok, str(report)
    assert bool(report) and report.errors == []
    assert report.n_obs == report.checked_cells == 1800
    assert report.n_datasets == mixed.result.n_datasets
    assert (report.n_vars, report.x_kind, report.dtype) == (300, "csr", "float64")
    assert "valid" in str(report) and "INVALID" not in str(report)


def test_good_output_is_valid_without_inputs_and_sampled(mixed) -> None:
    assert abn.validate(mixed.output).ok
    sampled = abn.validate(mixed.output, inputs=mixed.inputs, sample=20)
    assert sampled.ok and sampled.checked_cells == 20 * mixed.result.n_datasets


def remove_marker(out: Path) -> None:
    meta = json.loads((out / "zarr.json").read_text())
    for key in ("encoding-type", "encoding-version"):
        del meta["attributes"][key]
    (out / "zarr.json").write_text(json.dumps(meta))


def delete_dataset(out: Path) -> None:
    shutil.rmtree(out / "dataset_1")


def delete_last_dataset(out: Path) -> None:
    shutil.rmtree(out / dataset_keys(out)[-1])


def add_dataset_tmp(out: Path) -> None:
    zarr.open_group(str(out), mode="r+").create_group("dataset_tmp")


def change_one_value(out: Path) -> None:
    data = zarr.open_array(str(out / "dataset_0" / "X" / "data"), mode="r+")
    data[5] = data[5] + 1


def duplicate_dataset(out: Path) -> None:
    shutil.copytree(out / "dataset_0", out / f"dataset_{len(dataset_keys(out))}")


def swap_obs_value(out: Path) -> None:
    codes = zarr.open_array(str(out / "dataset_0" / "obs" / "cell_type" / "codes"), mode="r+")
    codes[0] = (int(codes[0]) + 1) % 5


def blank_categories(out: Path) -> None:
    # what a run killed while it wrote a dataset's obs can leave: an array created, its values not yet written
    cats = zarr.open_array(str(out / "dataset_1" / "obs" / "cell_type" / "categories"), mode="r+")
    cats[...] = ""


TAMPERS: dict[str, tuple[Callable[[Path], None], str]] = {
    "root marker removed": (remove_marker, "marker"),
    "a dataset deleted": (delete_dataset, "numbered"),
    "the last dataset deleted": (delete_last_dataset, "manifest lists 4 datasets"),
    "dataset_tmp added": (add_dataset_tmp, "dataset_tmp"),
    "one X value changed": (change_one_value, "X rows"),
    "a dataset duplicated": (duplicate_dataset, "not unique"),
    "one obs value changed": (swap_obs_value, "cell_type"),
    "obs categories left unwritten": (blank_categories, "dataset_1 cannot be read"),
}


@pytest.mark.parametrize(("tamper", "phrase"), TAMPERS.values(), ids=TAMPERS.keys())
def test_damaged_output_is_invalid(mixed, tmp_path: Path, tamper, phrase: str) -> None:
    out = tmp_path / "copy.zarr"
    shutil.copytree(mixed.output, out)  # the original is valid (test_good_output_is_valid)
    tamper(out)
    report = abn.validate(out, inputs=mixed.inputs)
    assert not report.ok and not bool(report)
    text = str(report)
    assert "INVALID" in text and phrase in text, text
    assert all(e and "\n" not in e for e in report.errors)


def test_missing_output_is_invalid(tmp_path: Path) -> None:
    report = abn.validate(tmp_path / "nothing.zarr")
    assert not report.ok and "does not exist" in str(report)


def test_wrong_inputs_are_reported(mixed, tmp_path: Path) -> None:
    report = abn.validate(mixed.output, inputs=mixed.inputs[:2])
    assert not report.ok
    assert any("not among the inputs" in e for e in report.errors), report.errors

"""The output location: interrupted runs are never loadable and resume exactly; existing paths are guarded."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import annbatch
import pytest
import zarr
from conftest import GENES, MARKER, check_collection, make_adata, shuffle, tree_digest

import annbatch_nb as abn

RESUME_KWARGS = {
    "shuffle_chunk_size": 20,
    "dataset_size": 300,
    "n_obs_per_chunk": 16,
    "shard_size": "1kB",  # one chunk per shard: every dataset is written in several shards
    "seed": 5,
}


@pytest.fixture
def two_inputs(inputs) -> list[str]:
    return [
        inputs.add("a.h5ad", make_adata(500, GENES[:40], seed=1)),
        inputs.add("b.zarr", make_adata(400, GENES[20:60], seed=2, x="dense", prefix="b")),
    ]


def root_attrs(path: Path) -> dict:
    return json.loads((path / "zarr.json").read_text()).get("attributes", {})


def assert_not_loadable(path: Path) -> None:
    """An unfinished output: no marker, annbatch sees an empty collection, validate says why."""
    assert not (MARKER.items() <= root_attrs(path).items())
    coll = annbatch.DatasetCollection(str(path), mode="r")
    assert coll.is_empty
    with pytest.raises(ValueError, match="empty"):
        annbatch.Loader(batch_size=8, chunk_size=4, preload_nchunks=2).use_collection(coll)
    report = abn.validate(path)
    assert not report.ok and any("marker" in e for e in report.errors)


# --------------------------------------------------------------------------------------------------
# Interrupted runs
# --------------------------------------------------------------------------------------------------
def test_interrupted_run_resumes_to_identical_output(two_inputs, tmp_path: Path) -> None:
    plan = abn.plan(two_inputs, **RESUME_KWARGS)
    assert plan.n_datasets == 3
    first_dataset = int(plan.rows_per_dataset[0])

    # cancel in the middle of dataset_1: after dataset_0 and a few shards of dataset_1 are written
    cancel = threading.Event()
    written = 0

    def on_progress(what: str, n: int) -> None:
        nonlocal written
        if what == "rows":
            written += n
            if written > first_dataset + 40:
                cancel.set()

    out = tmp_path / "out.zarr"
    with pytest.raises(abn.CancelledError) as info:
        plan.run(out, progress=False, cancel=cancel, on_progress=on_progress)
    assert "\n" not in str(info.value) and "resume" in str(info.value)
    # a whole dataset_0 and a partly written dataset_1 (some of its shards are on disk)
    assert (out / "dataset_0").is_dir()
    assert any((out / "dataset_1" / "X" / "data").rglob("c/*"))
    assert not (out / "dataset_2").exists()
    assert_not_loadable(out)

    # the same plan (re-planned from scratch, as a re-run of the same command would) resumes
    result = shuffle(two_inputs, out, **RESUME_KWARGS)
    assert result.datasets_resumed == 1 and result.datasets_written == 2 and not result.already_complete
    check_collection(out, two_inputs)

    # and the result is byte for byte what an uninterrupted run writes
    clean = tmp_path / "clean.zarr"
    shuffle(two_inputs, clean, **RESUME_KWARGS)
    assert tree_digest(out) == tree_digest(clean)


def test_cancel_before_start_leaves_resumable_output(two_inputs, tmp_path: Path) -> None:
    cancel = threading.Event()
    cancel.set()
    out = tmp_path / "out.zarr"
    plan = abn.plan(two_inputs, **RESUME_KWARGS)
    with pytest.raises(abn.CancelledError):
        abn.execute(plan, out, progress=False, cancel=cancel)
    assert_not_loadable(out)
    result = abn.execute(plan, out, progress=False)
    assert result.datasets_resumed == 0 and result.datasets_written == plan.n_datasets
    assert abn.validate(out, inputs=two_inputs).ok


def test_crash_inside_a_dataset_is_not_loadable(two_inputs, tmp_path: Path) -> None:
    """An exception other than a cancel (here from the progress callback) also leaves no marker."""

    def explode(what: str, n: int) -> None:
        if what == "rows":
            raise RuntimeError("simulated crash")

    out = tmp_path / "out.zarr"
    plan = abn.plan(two_inputs, **RESUME_KWARGS)
    with pytest.raises(RuntimeError, match="simulated crash"):
        plan.run(out, progress=False, on_progress=explode)
    assert_not_loadable(out)
    result = plan.run(out, progress=False)
    assert result.datasets_written == plan.n_datasets
    check_collection(out, two_inputs)


# --------------------------------------------------------------------------------------------------
# Existing outputs
# --------------------------------------------------------------------------------------------------
def test_unrelated_directory_is_refused(two_inputs, tmp_path: Path) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.txt").write_text("precious")
    before = tree_digest(out)
    with pytest.raises(abn.OutputError) as info:
        shuffle(two_inputs, out, **RESUME_KWARGS)
    assert str(out) in str(info.value) and "\n" not in str(info.value)
    assert tree_digest(out) == before


def test_unrelated_zarr_store_is_refused(two_inputs, tmp_path: Path) -> None:
    out = tmp_path / "other.zarr"
    zarr.open_group(str(out), mode="w").create_group("dataset_0")
    with pytest.raises(abn.OutputError, match="not written by annbatch-nb") as info:
        shuffle(two_inputs, out, **RESUME_KWARGS)
    assert str(out) in str(info.value)


def test_empty_directory_is_used(two_inputs, tmp_path: Path) -> None:
    out = tmp_path / "empty.zarr"
    out.mkdir()
    result = shuffle(two_inputs, out, **{**RESUME_KWARGS, "dataset_size": 900})
    assert result.datasets_written == 1
    assert abn.validate(out).ok


def test_finished_output_of_same_plan_is_already_complete(two_inputs, tmp_path: Path) -> None:
    out = tmp_path / "out.zarr"
    kwargs = {**RESUME_KWARGS, "dataset_size": 450}
    shuffle(two_inputs, out, **kwargs)
    before = tree_digest(out)
    again = shuffle(two_inputs, out, **kwargs)
    assert again.already_complete and again.datasets_written == 0
    assert "already complete" in str(again)
    assert tree_digest(out) == before

    # a different plan (another seed, another chunk size) is refused and leaves the output alone
    for change in ({"seed": 6}, {"shuffle_chunk_size": 25}):
        with pytest.raises(abn.OutputError, match="other parameters") as info:
            shuffle(two_inputs, out, **{**kwargs, **change})
        assert str(out) in str(info.value)
    # so is the same command over different inputs
    with pytest.raises(abn.OutputError, match="other inputs"):
        shuffle(two_inputs[:1], out, **kwargs)
    assert tree_digest(out) == before


def test_output_that_is_a_file_is_refused(two_inputs, tmp_path: Path) -> None:
    out = tmp_path / "out.zarr"
    out.write_text("a file")
    with pytest.raises(abn.OutputError, match="is a file") as info:
        shuffle(two_inputs, out, **RESUME_KWARGS)
    assert str(out) in str(info.value)
    assert out.read_text() == "a file"


@pytest.mark.parametrize("where", ["inside", "is", "contains"])
def test_output_overlapping_an_input_is_refused(inputs, tmp_path: Path, where: str) -> None:
    store = inputs.add("store.zarr", make_adata(100, GENES[:10], seed=1))
    out = {
        "inside": Path(store) / "out.zarr",
        "is": Path(store),
        "contains": inputs.directory,
    }[where]
    with pytest.raises(abn.OutputError) as info:
        shuffle([store], out, shuffle_chunk_size=10, dataset_size=50)
    assert str(out) in str(info.value) and "\n" not in str(info.value)
    assert not (Path(store) / "out.zarr").exists()

"""Appending to a finished collection: mixed in, bounded datasets, cheaper than a rewrite, crash safe."""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import zarr
from conftest import (
    GENES,
    categorical,
    floats,
    ints,
    make_adata,
    read_collection,
    run_cli,
    tree_digest,
    write_adata,
)
from test_compat import assert_loader_serves_collection

import annbatch_nb as abn
from annbatch_nb.append import AUTO_QUALITY_SLACK, plan_append
from annbatch_nb.errors import CancelledError, InputError, OutputError, ParameterError

PARAMS = {
    "shuffle_chunk_size": 20,
    "dataset_size": 300,
    "n_obs_per_chunk": 16,
    "shard_size": "16KB",
    "seed": 5,
}


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[str]]:
    d = tmp_path_factory.mktemp("append-inputs")
    old, new = [], []
    for i in range(4):
        a = make_adata(
            300,
            GENES,
            seed=i,
            prefix=f"old{i}-",
            obs={"donor": categorical([f"d{i}", f"d{i + 1}"]), "score": floats, "count": ints},
        )
        old.append(
            str(write_adata(a, d / f"old{i}.{'h5ad' if i % 2 else 'zarr'}", "h5ad" if i % 2 else "zarr3"))
        )
    # new donors (new categories), one input without the "count" column (it becomes nullable)
    a = make_adata(
        250, GENES[:350], seed=10, prefix="new0-", obs={"donor": categorical(["d9"]), "score": floats}
    )
    new.append(str(write_adata(a, d / "new0.h5ad", "h5ad")))
    a = make_adata(
        150,
        GENES,
        seed=11,
        prefix="new1-",
        obs={"donor": categorical(["d1", "d8"]), "score": floats, "count": ints},
    )
    new.append(str(write_adata(a, d / "new1.zarr", "zarr3")))
    digests = {p: tree_digest(p) for p in old + new}
    yield {"old": old, "new": new}
    assert {p: tree_digest(p) for p in old + new} == digests, "an input was modified"


@pytest.fixture(scope="module")
def base(files: dict[str, list[str]], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("append-base") / "base.zarr"
    abn.shuffle(files["old"], out, progress=False, **PARAMS)
    return out


@pytest.fixture
def coll(base: Path, tmp_path: Path) -> Path:
    out = tmp_path / "coll.zarr"
    shutil.copytree(base, out)
    return out


def _x_digest(out: Path, d: int) -> dict[str, str]:
    return tree_digest(out / f"dataset_{d}" / "X")


def _observed_shares(out: Path, n_inputs: int, inputs: list[str]) -> np.ndarray:
    """Per dataset, the share of each input, read from the written obs."""
    names = {Path(p).name: i for i, p in enumerate(inputs)}
    shares = []
    for a in read_collection(out):
        idx = np.array([names[Path(s).name] for s in a.obs["src_path"].astype(str)])
        shares.append(np.bincount(idx, minlength=n_inputs) / len(idx))
    return np.array(shares)


@pytest.mark.parametrize("rewrite", [0, 0.5, 1, "auto"])
def test_append_mixes_new_cells_within_dataset_size(files, coll: Path, rewrite) -> None:
    old, new = files["old"], files["new"]
    ap = plan_append(new, coll, rewrite=rewrite, seed=1)  # a fixed seed: the default one hashes the paths
    assert ap.n_obs_old == 1200 and ap.n_obs_new == 400 and ap.n_old_datasets == 4
    kept = {d: _x_digest(coll, d) for d in ap.untouched.tolist()}

    res = abn.append(new, coll, rewrite=rewrite, seed=1, progress=False)
    assert res.plan is not None and not res.already_complete
    assert res.plan.pool.fingerprint == ap.pool.fingerprint  # the plan that was shown is the one that ran

    report = abn.validate(coll, inputs=old + new)
    assert report.ok, report.errors
    assert report.checked_cells == 1600 and report.n_datasets == ap.n_datasets
    rows = [a.n_obs for a in read_collection(coll)]
    assert rows == ap.rows_per_dataset.tolist() and sum(rows) == 1600
    assert max(rows) <= ap.dataset_rows == 300  # annbatch lets datasets grow; ours stay bounded
    for d, digest in kept.items():  # datasets not rewritten keep their X bytes
        assert _x_digest(coll, d) == digest
    # the stated cost: below a rewrite unless everything is rewritten
    if rewrite == 1:
        assert len(ap.rewritten) == 4
    if len(ap.rewritten) == 4:  # "auto" may need every dataset: 25 % new cells mix in only by a rewrite
        assert ap.cost_ratio == pytest.approx(1.0)
    else:
        assert ap.cost_ratio < 1.0
    # the quality reported is the written collection's: per-dataset shares match exactly
    observed = _observed_shares(coll, 6, old + new)
    tv = 0.5 * np.abs(observed - ap.quality.share_global[None, :]).sum(axis=1)
    np.testing.assert_allclose(tv, ap.quality.dataset_tv, atol=1e-12)
    if len(ap.rewritten):  # new cells are mixed into rewritten datasets
        assert all(observed[d, 4:].sum() > 0 for d in ap.rewritten.tolist())

    manifest = dict(zarr.open_group(str(coll), mode="r")["annbatch_nb"].attrs)
    assert [r["path"] for r in manifest["inputs"]] == old + new
    assert manifest["n_obs"] == 1600 and manifest["n_datasets"] == ap.n_datasets
    assert manifest["appends"][-1]["rewritten"] == ap.rewritten.tolist()
    assert not (coll / "annbatch_nb" / "append").exists()  # staging cleaned up


def test_auto_picks_the_least_rewrite_within_the_slack(files, base: Path) -> None:
    scores = [plan_append(files["new"], base, rewrite=k / 4).quality.score for k in range(5)]
    assert scores == sorted(scores)  # more rewritten, better mixed
    costs = [plan_append(files["new"], base, rewrite=k / 4).cost_ratio for k in range(5)]
    assert costs == sorted(costs)
    auto = plan_append(files["new"], base)
    target = (1 - AUTO_QUALITY_SLACK) * scores[-1]
    k = len(auto.rewritten)
    assert auto.quality.score >= target
    assert k == 0 or scores[k - 1] < target
    assert auto.full_rewrite_quality.score == pytest.approx(scores[-1])
    text = auto.describe()
    assert "of a full rewrite" in text and f"quality {auto.quality.score:.2f}" in text


def test_loader_serves_an_appended_collection(files, coll: Path) -> None:
    abn.append(files["new"], coll, rewrite=0.5, progress=False)
    n = assert_loader_serves_collection(coll, batch_size=64, chunk_size=16, preload_nchunks=4)
    assert n == 1600


def test_append_twice_and_again_is_a_no_op(files, coll: Path) -> None:
    old, new = files["old"], files["new"]
    abn.append(new[:1], coll, progress=False)
    assert abn.validate(coll, inputs=old + new[:1]).ok
    second = abn.append(new[1:], coll, progress=False)
    assert second.plan is not None and second.plan.n_obs_old == 1450
    assert abn.validate(coll, inputs=old + new).ok
    again = abn.append(new[1:], coll, progress=False)
    assert again.already_complete and again.plan is None
    with pytest.raises(OutputError, match="cells were appended to; add more with mode='append'"):
        abn.shuffle(old + new, coll, progress=False, **PARAMS)
    manifest = dict(zarr.open_group(str(coll), mode="r")["annbatch_nb"].attrs)
    assert len(manifest["appends"]) == 2
    recorded = abn.validate(coll, inputs="recorded")  # the manifest lists old + new, in order
    assert recorded.ok and recorded.checked_cells == 1600
    proc = run_cli("validate", str(coll), "--recorded-inputs", "--sample", "50")
    assert proc.returncode == 0 and "valid" in proc.stdout, proc.stderr
    # shuffle(mode="append") is the same call
    with pytest.raises(ParameterError, match="shuffle_chunk_size cannot be set when appending"):
        abn.shuffle(new, coll, mode="append", shuffle_chunk_size=7, progress=False)
    assert abn.shuffle(new[1:], coll, mode="append", progress=False).already_complete


def test_cancel_leaves_the_collection_as_it_was(files, coll: Path) -> None:
    before = tree_digest(coll)
    cancel = threading.Event()

    def on_progress(what: str, n: int) -> None:
        if what == "rows":
            cancel.set()

    with pytest.raises(CancelledError):
        abn.append(files["new"], coll, rewrite=1, progress=False, cancel=cancel, on_progress=on_progress)
    after = {k: v for k, v in tree_digest(coll).items() if not k.startswith("annbatch_nb/append/")}
    assert after == before  # only the staging area changed
    assert abn.validate(coll, inputs=files["old"]).ok  # still the finished, loadable old collection
    res = abn.append(files["new"], coll, rewrite=1, progress=False)
    assert res.datasets_resumed >= 0 and abn.validate(coll, inputs=files["old"] + files["new"]).ok


# --------------------------------------------------------------------------------------------------
# Kill -9 during an append (CLI), then re-run: identical bytes to an uninterrupted append
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def appended_reference(files, base: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    out = tmp_path_factory.mktemp("append-ref") / "coll.zarr"
    shutil.copytree(base, out)
    proc = run_cli("shuffle", *files["new"], "-o", str(out), "--append", "--rewrite", "0.5", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert "of a full rewrite" in proc.stderr  # the plan is stated before the work
    return tree_digest(out)


@pytest.mark.parametrize(
    ("point", "loadable"),
    [
        ("dataset-written:1", True),  # staging the rewritten datasets: the collection is untouched
        ("append-staged", True),  # everything staged, nothing committed
        ("append-move:1", False),  # mid-swap: marker removed, so never loadable half-swapped
        ("append-before-marker", False),  # swapped, manifest updated, marker not yet back
    ],
)
def test_kill_during_append_then_rerun_gives_identical_bytes(
    files, coll: Path, appended_reference: dict[str, str], point: str, loadable: bool
) -> None:
    import annbatch

    args = ["shuffle", *files["new"], "-o", str(coll), "--append", "--rewrite", "0.5", "--no-progress", "-q"]
    killed = run_cli(*args, env={"ANNBATCH_NB_STOP_AT": point})
    assert killed.returncode == -9, killed.stderr
    assert annbatch.DatasetCollection(str(coll), mode="r").is_empty is not loadable
    if loadable:
        assert abn.validate(coll, inputs=files["old"]).ok
    resumed = run_cli(*args)
    assert resumed.returncode == 0, resumed.stderr
    if not loadable:
        assert "finished the commit of an interrupted append" in resumed.stdout
    assert tree_digest(coll) == appended_reference
    assert abn.validate(coll, inputs=files["old"] + files["new"]).ok


# --------------------------------------------------------------------------------------------------
# What cannot be appended, said in one line
# --------------------------------------------------------------------------------------------------
def test_append_refuses_what_it_cannot_do(files, coll: Path, tmp_path: Path) -> None:
    old, new = files["old"], files["new"]
    extra = make_adata(50, [*GENES[:10], "NOVEL"], seed=3, prefix="x-")
    novel = str(write_adata(extra, tmp_path / "novel.h5ad", "h5ad"))
    with pytest.raises(InputError, match=r"novel.h5ad: has 1 gene\(s\) the collection lacks"):
        plan_append([novel], coll)
    dropping = plan_append([novel], coll, rewrite=0, new_genes="drop")
    assert dropping.dropped_genes == {novel: 1}
    assert "1 gene(s) not in the collection are dropped" in dropping.describe()
    dropping.run(progress=False)
    assert abn.validate(coll, inputs=[*old, novel]).ok  # the kept genes are exact
    assert abn.append([novel], coll, progress=False).already_complete
    with pytest.raises(InputError, match=r"old0\.zarr: is already in the collection"):
        plan_append([old[0], new[0]], coll)
    typed = make_adata(50, GENES, seed=4, prefix="t-", obs={"count": lambda rng, n: np.array(["a"] * n)})
    conflicting = str(write_adata(typed, tmp_path / "typed.h5ad", "h5ad"))
    with pytest.raises(InputError, match="obs column 'count'"):
        plan_append([conflicting], coll)
    with pytest.raises(ParameterError, match="rewrite must be a share"):
        plan_append(new, coll, rewrite=1.5)
    with pytest.raises(OutputError, match="does not exist"):
        plan_append(new, tmp_path / "nope.zarr")
    not_ours = tmp_path / "plain.zarr"
    zarr.open_group(str(not_ours), mode="w")
    with pytest.raises(OutputError, match="not a collection written by annbatch-nb"):
        plan_append(new, not_ours)
    root = zarr.open_group(str(coll), mode="r+")
    del root.attrs["encoding-type"]  # as an interrupted shuffle leaves it
    with pytest.raises(OutputError, match="is not a finished collection"):
        plan_append(new, coll)


def test_append_refuses_when_an_original_input_changed(files, tmp_path: Path) -> None:
    copies = []
    for p in files["old"][:2]:
        dst = tmp_path / Path(p).name
        shutil.copytree(p, dst) if Path(p).is_dir() else shutil.copy2(p, dst)
        copies.append(str(dst))
    out = tmp_path / "c.zarr"
    abn.shuffle(copies, out, progress=False, **PARAMS)
    os.utime(copies[1], (1, 1))  # the h5ad "changed"
    with pytest.raises(InputError, match=r"old1.h5ad: changed since the collection was written"):
        plan_append(files["new"], out)
    Path(copies[1]).unlink()
    with pytest.raises(InputError, match=r"old1\.h5ad: is in the collection but no longer exists"):
        plan_append(files["new"], out)


def test_cli_plan_append_to_reports_cost_and_quality(files, base: Path) -> None:
    import json

    proc = run_cli("plan", *files["new"], "--append-to", str(base), "--rewrite", "0.25", "--json")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["n_obs"] == 1600 and len(summary["datasets_rewritten"]) == 1
    assert 0 < summary["cost_ratio"] < 1 and 0 < summary["quality"] <= summary["full_rewrite_quality"]
    bad = run_cli("shuffle", *files["new"], "-o", str(base), "--append", "--dataset-size", "10")
    assert bad.returncode == 2 and "--dataset-size cannot be set when appending" in bad.stderr
    assert "Traceback" not in bad.stderr

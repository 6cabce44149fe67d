"""The engine on a dask.distributed LocalCluster of two worker processes.

Every run is compared byte for byte with the local run of the same inputs and parameters (the session's
``mixed`` collection), including a run during which a worker is killed with SIGKILL in the middle of writing
a dataset.
"""

from __future__ import annotations

import json
import pickle
import threading
from pathlib import Path

import dask
import pytest
import zarr
from conftest import MIXED_KWARGS, check_collection, tree_digest
from distributed import Client, LocalCluster

import annbatch_nb as abn
from annbatch_nb.cli import main
from annbatch_nb.collection import META_KEY, is_committed
from annbatch_nb.distributed import _check_workers, _killed_with, worker_plan
from annbatch_nb.engine import STOP_ENV, STOP_ONCE_ENV

RUN_TIMEOUT = 180


def local_cluster() -> LocalCluster:
    return LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0")


@pytest.fixture(scope="module")
def client():
    """A client of a LocalCluster of two single-threaded worker processes, shared by this module."""
    with local_cluster() as cluster, Client(cluster) as c:
        yield c


def test_cluster_run_is_byte_identical_to_a_local_run(mixed, client: Client, tmp_path: Path) -> None:
    out = tmp_path / "dask.zarr"
    events: dict[str, int] = {}

    def on_progress(what: str, n: int) -> None:
        events[what] = events.get(what, 0) + n

    plan = abn.plan(mixed.inputs, **MIXED_KWARGS)
    result = plan.run(out, progress=False, client=client, on_progress=on_progress)
    assert result.datasets_written == result.n_datasets == mixed.result.n_datasets
    assert 1 <= result.workers <= 2 and result.dashboard_link
    assert len(result.dataset_seconds) == result.n_datasets
    assert tree_digest(out) == tree_digest(mixed.output)
    assert events["rows"] == result.n_obs and events["datasets"] == result.n_datasets and events["bytes"] > 0
    # the same output again: already complete, nothing submitted
    again = abn.shuffle(mixed.inputs, out, progress=False, client=client, **MIXED_KWARGS)
    assert again.already_complete


def test_killed_worker_is_retried_and_the_output_is_identical(
    mixed, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the worker processes inherit this: the first one to reach dataset 1's first shard dies (kill -9)
    # after writing part of it; the retried task must clear that part and write the same bytes
    died = tmp_path / "a-worker-died"
    monkeypatch.setenv(STOP_ENV, "shard:1")
    monkeypatch.setenv(STOP_ONCE_ENV, str(died))
    out = tmp_path / "dask.zarr"
    rows = 0

    def on_progress(what: str, n: int) -> None:
        nonlocal rows
        rows += n if what == "rows" else 0

    with local_cluster() as cluster, Client(cluster) as c:
        plan = abn.plan(mixed.inputs, **MIXED_KWARGS)
        result = plan.run(out, progress=False, client=c, on_progress=on_progress)
    assert died.exists(), "no worker was killed"
    assert result.datasets_written == result.n_datasets
    assert rows == result.n_obs, "rows of the killed attempt were counted twice"
    assert tree_digest(out) == tree_digest(mixed.output)
    report = abn.validate(out, inputs=mixed.inputs)
    assert report.ok, report


def test_a_task_that_keeps_killing_workers_stops_the_run_resumably(
    mixed, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(STOP_ENV, "dataset-read:2")  # every attempt of dataset 2 kills its worker
    out = tmp_path / "dask.zarr"
    with (
        dask.config.set({"distributed.scheduler.allowed-failures": 0}),  # the first death is final
        local_cluster() as cluster,
        Client(cluster) as c,
    ):
        plan = abn.plan(mixed.inputs, **MIXED_KWARGS)
        # a worker's death also fails the task queued behind dataset 2's on it (dataset 1 or 3, as the
        # scheduler dealt them): those are named too
        with pytest.raises(abn.ClusterError, match=r"datasets? ([0-9]+, )*2\b.*killed dask workers") as info:
            plan.run(out, progress=False, client=c)
    assert "\n" not in str(info.value) and "resume" in str(info.value)
    assert not is_committed(zarr.open_group(str(out), mode="r"))
    monkeypatch.delenv(STOP_ENV)
    result = plan.run(out, progress=False)  # a local run resumes it
    assert result.datasets_written >= 1
    assert tree_digest(out) == tree_digest(mixed.output)


def test_a_worker_death_names_every_dataset_whose_task_it_failed() -> None:
    from distributed.scheduler import KilledWorker

    class Done:  # a finished future: failed with ``error``, or succeeded (``error`` None)
        def __init__(self, error: BaseException | None) -> None:
            self.error = error
            self.status = "finished" if error is None else "error"

        def done(self) -> bool:
            return True

        def exception(self, timeout: float | None = None) -> BaseException | None:
            return self.error

    class Running(Done):
        def done(self) -> bool:
            return False

    waited: list[float] = []

    def wait(fs: list[object], timeout: float) -> None:
        waited.append(timeout)
        raise TimeoutError  # a task still runs: the grace ends

    died = KilledWorker("annbatch-nb-x-dataset-3", "tcp://w", 0)
    pending = {Done(died): 3, Done(None): 4, Running(None): 5, Done(ValueError("other")): 6, Done(died): 0}
    assert _killed_with(1, pending, wait, KilledWorker) == [0, 1, 3]
    assert waited == [1.0]
    assert _killed_with(2, {Done(None): 4}, wait, KilledWorker) == [2]


def test_cancel_leaves_a_resumable_output_that_a_cluster_resumes(
    mixed, client: Client, tmp_path: Path
) -> None:
    kwargs = {**MIXED_KWARGS, "dataset_size": 150}  # 12 datasets: more than the 4 tasks kept in flight
    local = tmp_path / "local.zarr"
    abn.shuffle(mixed.inputs, local, progress=False, **kwargs)
    out = tmp_path / "dask.zarr"
    cancel = threading.Event()

    def on_progress(what: str, n: int) -> None:
        if what == "datasets":
            cancel.set()

    with pytest.raises(abn.CancelledError, match="resume"):
        plan = abn.plan(mixed.inputs, **kwargs)
        plan.run(out, progress=False, client=client, cancel=cancel, on_progress=on_progress)
    root = zarr.open_group(str(out), mode="r")
    assert not is_committed(root)
    done = set(root[META_KEY]["complete"].group_keys())
    assert 1 <= len(done) < 12
    assert not (out / META_KEY / "lock.json").exists(), "the lock was not released"
    result = abn.shuffle(mixed.inputs, out, progress=False, client=client, **kwargs)
    assert result.datasets_resumed == len(done) and result.datasets_written == 12 - len(done)
    assert tree_digest(out) == tree_digest(local)


def test_workers_that_cannot_see_the_output_are_named(mixed, client: Client, tmp_path: Path) -> None:
    plan = abn.plan(mixed.inputs, **MIXED_KWARGS)
    with pytest.raises(
        abn.ClusterError, match=r"dask worker tcp://.*cannot see the output .*shared filesystem"
    ):
        _check_workers(client, str(tmp_path / "elsewhere.zarr"), plan, None)
    # a directory at the same path that holds another run's lock: another machine's disk
    lock = tmp_path / "other.zarr" / META_KEY / "lock.json"
    lock.parent.mkdir(parents=True)
    lock.write_text(json.dumps({"pid": 1, "host": "elsewhere", "since": "then"}))
    with pytest.raises(abn.ClusterError, match=r"sees another .* than the driver"):
        _check_workers(client, str(tmp_path / "other.zarr"), plan, {"pid": 2, "host": "here", "since": "now"})


def test_bad_cluster_arguments_fail_before_the_output_is_touched(
    mixed, client: Client, tmp_path: Path
) -> None:
    out = tmp_path / "out.zarr"
    with pytest.raises(abn.ParameterError, match="workers counts local processes"):
        abn.shuffle(mixed.inputs, out, progress=False, client=client, workers=2, **MIXED_KWARGS)
    with pytest.raises(abn.ParameterError, match=r"client must be a dask\.distributed\.Client"):
        abn.shuffle(mixed.inputs, out, progress=False, client="tcp://127.0.0.1:8786", **MIXED_KWARGS)
    with pytest.raises(abn.ParameterError, match="retries"):
        abn.shuffle(mixed.inputs, out, progress=False, client=client, retries=-1, **MIXED_KWARGS)
    assert not out.exists()


def test_worker_plan_carries_no_cell_or_input_gene_names(mixed) -> None:
    plan = abn.plan(mixed.inputs, **MIXED_KWARGS)
    slim = worker_plan(plan)
    assert slim.fingerprint == plan.fingerprint and slim.n_obs == plan.n_obs
    assert all(len(i.obs_names) == 0 and len(i.var_names) == 0 for i in slim.inputs)
    assert all(len(i.obs_names) == i.n_obs for i in plan.inputs)  # the driver's plan is untouched
    assert len(pickle.dumps(slim)) < len(pickle.dumps(plan))


def _cli_args(mixed, out: Path) -> list[str]:
    kw = MIXED_KWARGS
    return [
        "shuffle",
        *mixed.inputs,
        "-o",
        str(out),
        "--shuffle-chunk-size",
        str(kw["shuffle_chunk_size"]),
        "--dataset-size",
        str(kw["dataset_size"]),
        "--seed",
        str(kw["seed"]),
        "--no-progress",
    ]


def test_cli_scheduler_and_local_cluster(
    mixed, client: Client, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "scheduler.zarr"
    assert main([*_cli_args(mixed, out), "--scheduler", client.scheduler.address]) == 0
    err = capsys.readouterr().err
    assert "dask: dashboard http" in err
    assert tree_digest(out) == tree_digest(mixed.output)

    out = tmp_path / "local-cluster.zarr"
    assert main([*_cli_args(mixed, out), "--cluster", "local", "--workers", "2", "-q"]) == 0
    assert tree_digest(out) == tree_digest(mixed.output)

    code = main(
        [*_cli_args(mixed, tmp_path / "x.zarr"), "--scheduler", client.scheduler.address, "--workers", "2"]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: --workers") and err.count("\n") == 1
    assert not (tmp_path / "x.zarr").exists()


def test_planner_widget_runs_on_the_cluster(mixed, client: Client, tmp_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    out = tmp_path / "widget.zarr"
    p = abn.Planner(inputs=mixed.inputs, output=str(out), client=client, debounce=0, **MIXED_KWARGS)
    p.run_button.click()
    assert "dask cluster of 2 worker(s)" in p.status.value and "dask dashboard</a>" in p.status.value
    assert p.wait(RUN_TIMEOUT), "the run did not finish"
    assert p.error is None and "validated" in p.status.value, p.status.value
    tasks = p._tasks_bar
    assert tasks is not None and tasks.n == tasks.total == p.plan.n_datasets
    assert p._rows_bar.n == p.plan.n_obs
    assert p.progress.children[0] is tasks.container
    assert tree_digest(out) == tree_digest(mixed.output)
    check_collection(out, mixed.inputs)


def test_append_on_the_cluster_matches_a_local_append(client: Client, tmp_path: Path) -> None:
    import shutil

    from annbatch_nb.demo import make_demo_data

    files = [str(p) for p in make_demo_data(tmp_path / "in", scale=0.1)]
    base = tmp_path / "base.zarr"
    abn.shuffle(files[:5], base, shuffle_chunk_size=20, dataset_size=300, seed=2, progress=False)
    local, remote = tmp_path / "local.zarr", tmp_path / "remote.zarr"
    shutil.copytree(base, local)
    shutil.copytree(base, remote)
    abn.append(files[5:], local, rewrite=0.5, progress=False, workers=1)
    res = abn.append(files[5:], remote, rewrite=0.5, progress=False, client=client)
    assert res.staged is not None and res.staged.workers >= 1
    assert tree_digest(remote) == tree_digest(local)
    assert abn.validate(remote, inputs=files).ok

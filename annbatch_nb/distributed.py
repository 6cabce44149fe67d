"""The same engine on a dask.distributed cluster: one task per output dataset.

Imported only when a ``client`` is given (``shuffle(..., client=...)``, ``annbatch-nb shuffle --scheduler`` or
``--cluster local``). The driver, the process that called :func:`annbatch_nb.execute`:

1. plans, opens the output and takes its lock, exactly as a local run does;
2. checks that every worker sees the output (the lock file it just wrote, byte for byte) and the inputs at
   the same paths: a shared filesystem or an object store is required;
3. hands the plan to the cluster once, as a task that returns it, replicated on every worker (without its
   per-cell names, the largest part of a big plan; a task's result is computed again if its holders die,
   scattered data would be lost with its worker),
   and submits one task per dataset still to write, a few per worker at a time. A task's arguments are the
   dataset number and the unique names of its cells (a slice of the plan, not data);
4. commits the marker after every task succeeded.

A task opens the inputs (once per worker process and plan; the open sources are cached on the worker),
returns the existing record if an earlier attempt finished the dataset, otherwise deletes whatever an
earlier attempt left of it and writes it whole with :func:`~annbatch_nb.engine.write_dataset`. A task is a
pure function of the plan, so a retried task (after an exception, or on another worker after its worker
died) writes the same bytes, and the collection is byte-identical to a local run whatever the number of
workers.

Progress: a task reports its cumulative rows written and bytes read as worker events (at most four a second);
the driver keeps, per dataset, the largest value seen, so a retry never counts rows twice, and shows
datasets done, bytes read and cells written. Cancelling sets a cluster-wide event that running tasks check
between reads and shard writes; the driver waits for them to stop before it releases the lock.
"""

from __future__ import annotations

import dataclasses
import json
import os
import queue
import shutil
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from .collection import LOCK_NAME, META_KEY, S3Lock, dataset_key, open_root
from .engine import THREADS_ENV, BufferPool, cpu_share, read_order_rows, write_dataset
from .errors import CancelledError, ClusterError, ParameterError
from .sources import InputSpec, Source, open_source, remember_manifests
from .stores import describe_store_error, is_url

if TYPE_CHECKING:
    from distributed import Client

    from .collection import OutputState
    from .engine import ProgressCallback, ShuffleResult
    from .plan import Plan

__all__ = ["check_client", "cluster_client", "run_on_cluster", "worker_plan"]

#: Seconds between two progress events of one task.
_EVENT_INTERVAL = 0.25
#: Seconds between two looks of a task at the cluster-wide cancel event.
_CANCEL_INTERVAL = 0.5
#: Seconds the driver waits for running tasks to stop after a cancel or a failure.
_STOP_TIMEOUT = 120.0
#: Seconds the other tasks of a run get to report that the worker death which failed one task failed them too.
_KILLED_GRACE = 1.0
#: Seconds the driver waits for a cluster without workers to get one.
_WORKER_TIMEOUT = 60.0


# --------------------------------------------------------------------------------------------------
# Driver side
# --------------------------------------------------------------------------------------------------
def check_client(client: Any, *, workers: Any = "auto", retries: Any = 2) -> None:
    """Check the arguments of a cluster run before anything is opened.

    Raises
    ------
    ParameterError
        If ``client`` is not a running :class:`distributed.Client`, ``workers`` is set too, or ``retries`` is
        not a whole number >= 0.
    """
    from distributed import Client

    if not isinstance(client, Client):
        raise ParameterError(f"client must be a dask.distributed.Client, got {type(client).__name__}")
    if client.status != "running":
        raise ParameterError(f"the dask client is {client.status}, not running; connect it again")
    if workers != "auto":
        raise ParameterError(
            "workers counts local processes; with a dask client the cluster's workers write the datasets "
            "(size the cluster instead, e.g. LocalCluster(n_workers=...))"
        )
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise ParameterError(f"retries must be a whole number >= 0, got {retries!r}")


def worker_plan(plan: Plan) -> Plan:
    """The plan as the workers get it: the same, without the inputs' cell and gene names.

    Cell names are most of a large plan's size (tens of bytes per cell); each task receives the names of its
    own cells instead. Each input's gene names are not needed either: its map to the output genes
    (``plan.var_maps``, shared by inputs with the same genes) is. Cached predictions are left out too.
    """
    empty = pd.Index([], dtype=object)
    inputs = [dataclasses.replace(i, obs_names=empty, var_names=empty) for i in plan.inputs]
    slim = dataclasses.replace(plan, inputs=inputs, _cache={})
    slim.__dict__["fingerprint"] = plan.fingerprint  # same identity (names never were part of it)
    slim.__dict__["rows_per_dataset"] = plan.rows_per_dataset
    slim.__dict__["input_offsets"] = plan.input_offsets
    return slim


def _worker_output(path: str) -> str:
    """The output location as the workers should open it (absolute: their working directory differs)."""
    return path if is_url(path) else os.path.abspath(path)


def _lock_holder(state: OutputState) -> dict[str, Any] | None:
    if isinstance(state.lock, S3Lock):
        return dict(state.lock.holder)
    if state.lock is None:
        return None
    try:
        return dict(json.loads(Path(state.lock).read_text()))
    except (OSError, ValueError):
        return None


def _check_workers(client: Client, output: str, plan: Plan, holder: dict[str, Any] | None) -> int:
    """Wait for a worker, then make sure every worker sees the output and the inputs; return the count."""
    if not client.scheduler_info(n_workers=-1)["workers"]:
        try:
            client.wait_for_workers(1, timeout=_WORKER_TIMEOUT)
        except TimeoutError:
            raise ClusterError(
                f"the dask cluster at {client.scheduler.address} has no workers "
                f"(waited {_WORKER_TIMEOUT:.0f} s); start some or use --cluster local"
            ) from None
    inputs = [i.path for i in plan.inputs]
    answers = client.run(_probe, output, holder, inputs)
    for address, problem in sorted(answers.items()):
        if problem:
            raise ClusterError(f"dask worker {address}: {problem}")
    return len(answers)


def _dashboard(client: Client) -> str | None:
    try:
        link = client.dashboard_link
    except Exception:  # no dashboard (dashboard_address=None)
        return None
    return str(link) if link else None


@dataclass
class _Tracker:
    """Progress of the datasets being written, as the largest value each reported."""

    plan: Plan
    report: ProgressCallback
    rows: dict[int, int] = field(default_factory=dict)
    bytes: dict[int, int] = field(default_factory=dict)
    finished: set[int] = field(default_factory=set)

    def update(self, k: int, rows: int, nbytes: int) -> None:
        if k in self.finished:
            return
        rows = min(rows, int(self.plan.rows_per_dataset[k]))
        for what, seen, value in (("rows", self.rows, rows), ("bytes", self.bytes, nbytes)):
            delta = value - seen.get(k, 0)
            if delta > 0:
                seen[k] = value
                self.report(what, delta)

    def finish(self, k: int, total_bytes: int) -> None:
        self.update(k, int(self.plan.rows_per_dataset[k]), total_bytes)
        self.finished.add(k)
        self.report("datasets", 1)


def run_on_cluster(
    client: Client,
    plan: Plan,
    state: OutputState,
    todo: list[int],
    report: ProgressCallback,
    cancel: threading.Event | None,
    result: ShuffleResult,
    *,
    retries: int = 2,
    note: Callable[[str], None] | None = None,
) -> None:
    """Write datasets ``todo`` of ``plan`` as tasks on ``client``'s cluster (the driver's part).

    Parameters
    ----------
    client
        A connected :class:`distributed.Client`.
    plan
        The plan.
    state
        The opened output (its lock is held by this process).
    todo
        Datasets to write.
    report
        Progress callback: ``("bytes", n)``, ``("rows", n)``, ``("datasets", n)``.
    cancel
        Set to stop: running tasks stop at their next check, the output stays resumable.
    result
        Filled in: datasets written, their seconds, workers used, the dashboard link.
    retries
        Times a failed task is run again.
    note
        Called with a line for the user (workers, dashboard).

    Raises
    ------
    ClusterError
        If the workers cannot see the output or the inputs, or a task killed its workers repeatedly.
    CancelledError
        If ``cancel`` was set.
    """
    from distributed import Event, wait
    from distributed.scheduler import KilledWorker

    from .engine import _raw_input_bytes

    output = _worker_output(state.path)
    n_workers = _check_workers(client, output, plan, _lock_holder(state))
    result.dashboard_link = _dashboard(client)
    if note is not None:
        where = f", dashboard {result.dashboard_link}" if result.dashboard_link else ""
        note(f"dask: {len(todo)} dataset tasks on {n_workers} worker(s){where}")
    run_id = uuid.uuid4().hex[:12]
    topic = f"annbatch-nb-progress-{run_id}"
    events: queue.SimpleQueue[Any] = queue.SimpleQueue()
    client.subscribe_topic(topic, events.put)
    stop = Event(f"annbatch-nb-cancel-{run_id}", client=client)
    slim = worker_plan(plan)
    # a task that returns the plan, not scattered data: if the worker holding it dies, the scheduler computes
    # it again elsewhere (scattered data is lost with its worker, and the tasks needing it are cancelled)
    plan_future = client.submit(_plan_value, slim, key=f"annbatch-nb-{run_id}-plan", pure=False)
    client.replicate([plan_future])  # on every worker: no task is drawn to (and dies with) one holder
    tracker = _Tracker(plan, report)
    waiting = deque(todo)
    pending: dict[Any, int] = {}
    used: set[str] = set()

    def drain() -> None:
        while True:
            try:
                _, msg = events.get_nowait()
            except queue.Empty:
                return
            tracker.update(int(msg["k"]), int(msg["rows"]), int(msg["bytes"]))

    def fill() -> None:
        workers = client.scheduler_info(n_workers=-1)["workers"]
        limit = 2 * max(1, len(workers))
        slots: dict[str, int] = {}  # tasks that can run at once on each host: they share its CPUs
        for w in workers.values():
            host = str(w.get("host", ""))
            slots[host] = slots.get(host, 0) + int(w.get("nthreads", 1))
        while waiting and len(pending) < limit:
            k = waiting.popleft()
            names = plan.obs_names[read_order_rows(plan, plan.dataset_runs(k))]
            future = client.submit(
                _write_task,
                plan_future,
                k,
                names,
                output,
                topic,
                stop.name,
                slots,
                key=f"annbatch-nb-{run_id}-dataset-{k}",
                retries=retries,
                pure=False,
            )
            pending[future] = k

    try:
        fill()
        while pending:
            drain()
            if cancel is not None and cancel.is_set():
                raise CancelledError("cancelled; re-run the same command to resume")
            finished = [f for f in pending if f.done()]
            if not finished:
                time.sleep(0.05)
                continue
            for f in finished:
                k = pending.pop(f)
                try:
                    out = f.result()
                except KilledWorker:
                    killed = _killed_with(k, pending, wait, KilledWorker)
                    what = (
                        f"the task of dataset {k}"
                        if len(killed) == 1
                        else f"the tasks of datasets {', '.join(map(str, killed))} (one of them or all)"
                    )
                    raise ClusterError(
                        f"{what} killed dask workers repeatedly (out of memory? a dataset needs about "
                        f"{plan.memory.peak_bytes / 2**30:.1f} GiB per worker); nothing was committed: lower "
                        "dataset_size or give workers more memory, then re-run to resume"
                    ) from None
                drain()
                tracker.finish(k, _raw_input_bytes(plan, k))
                result.dataset_seconds.append(float(out["seconds"]))
                result.datasets_written += 1
                used.add(str(out["worker"]))
            fill()
        drain()
    except BaseException:
        stop.set()  # running tasks stop at their next check; tasks not started yet stop at once
        if pending:
            with suppress(Exception):
                wait(list(pending), timeout=_STOP_TIMEOUT)
            client.cancel(list(pending))
        raise
    finally:
        result.workers = len(used)
        with suppress(Exception):
            client.unsubscribe_topic(topic)
        with suppress(Exception):
            client.run(_forget, slim.fingerprint)
        with suppress(Exception):
            plan_future.release()


def _killed_with(k: int, pending: dict[Any, int], wait: Callable[..., Any], killed: type) -> list[int]:
    """Dataset ``k``, whose task failed with ``KilledWorker``, and the others that failed with it.

    A worker's death fails every task the scheduler had given it, the one that ran and those queued behind
    it, and dask cannot tell which one killed it: all of them are named. Their failures reach the client a
    moment apart, so the other tasks get :data:`_KILLED_GRACE` seconds to report.
    """
    with suppress(Exception):
        wait(list(pending), timeout=_KILLED_GRACE)
    others = [
        j
        for f, j in pending.items()
        if f.done() and f.status == "error" and isinstance(f.exception(timeout=0), killed)
    ]
    return sorted([k, *others])


@contextmanager
def cluster_client(scheduler: str | None = None, n_workers: int | None = None) -> Iterator[Client]:
    """A client of a running scheduler, or of a new :class:`distributed.LocalCluster`, closed on exit.

    Parameters
    ----------
    scheduler
        Address of a running dask scheduler (``tcp://host:8786``); None starts a local cluster.
    n_workers
        Worker processes of the local cluster (one thread each; default: one per core).

    Yields
    ------
    distributed.Client
        The connected client.
    """
    from distributed import Client, LocalCluster

    if scheduler is not None:
        try:
            client = Client(scheduler, timeout="30s")
        except (OSError, TimeoutError) as e:
            raise ClusterError(f"cannot connect to the dask scheduler {scheduler} ({e})") from None
        try:
            yield client
        finally:
            client.close()
        return
    if n_workers is not None and (isinstance(n_workers, bool) or n_workers < 1):
        raise ParameterError(f"workers must be a positive whole number, got {n_workers!r}")
    with (
        LocalCluster(
            n_workers=n_workers or os.cpu_count() or 1,
            threads_per_worker=1,
            processes=True,
            dashboard_address=":0",
        ) as cluster,
        Client(cluster) as client,
    ):
        yield client


# --------------------------------------------------------------------------------------------------
# Worker side
# --------------------------------------------------------------------------------------------------
@dataclass
class _Slot:
    """Opened sources and scratch buffers, used by one task at a time."""

    sources: list[Source]
    pool: BufferPool


@dataclass
class _WorkerPlan:
    """What a worker process keeps for one plan: the output root and the free slots."""

    fingerprint: str
    output: str
    root: Any
    free: list[_Slot] = field(default_factory=list)
    closed: bool = False


#: The plan this worker process currently writes (at most one), guarded by ``_LOCK``.
_CURRENT: dict[str, _WorkerPlan] = {}
_LOCK = threading.Lock()


def _probe(output: str, holder: dict[str, Any] | None, inputs: list[str]) -> str | None:
    """On a worker: why it cannot take part (None if it can)."""
    if is_url(output):
        try:
            root = open_root(output, mode="r")
            if META_KEY not in root:
                return f"sees no annbatch-nb run at {output}"
        except Exception as e:
            return f"cannot open {output} ({describe_store_error(e)}); do the workers have its credentials?"
    else:
        lock = Path(output) / META_KEY / LOCK_NAME
        try:
            seen = json.loads(lock.read_text())
        except (OSError, ValueError):
            return (
                f"cannot see the output {output} (no {META_KEY}/{LOCK_NAME} there); the workers need the "
                "output on a shared filesystem at the same path, or an s3:// output"
            )
        if holder is not None and seen != holder:
            return (
                f"sees another {output} than the driver (a different machine's disk); the workers need the "
                "output on a shared filesystem at the same path, or an s3:// output"
            )
    for path in inputs:
        if not is_url(path) and not os.path.exists(path):
            return f"cannot see the input {path}; the workers need the inputs at the same paths"
    return None


def _open_sources(plan: Plan) -> list[Source]:
    remember_manifests(plan.manifests)  # parsed by the driver: nothing to parse again here
    sources: list[Source] = []
    try:
        for info in plan.inputs:
            sources.append(open_source(InputSpec(info.path, info.display), info=info))
    except BaseException:
        for s in sources:
            s.close()
        raise
    return sources


def _close_slot(slot: _Slot) -> None:
    for s in slot.sources:
        with suppress(Exception):
            s.close()
    slot.pool.clear()


def _acquire(plan: Plan, output: str) -> tuple[_WorkerPlan, _Slot]:
    with _LOCK:
        wp = _CURRENT.get("plan")
        if wp is None or (wp.fingerprint, wp.output) != (plan.fingerprint, output):
            if wp is not None:
                wp.closed = True
                for slot in wp.free:
                    _close_slot(slot)
            problem = _probe(output, None, [])  # a worker that joined after the driver's check
            if problem:
                raise ClusterError(problem)
            wp = _WorkerPlan(plan.fingerprint, output, open_root(output, mode="r+"))
            _CURRENT["plan"] = wp
        slot = wp.free.pop() if wp.free else None
    if slot is None:
        slot = _Slot(_open_sources(plan), BufferPool())
    return wp, slot


def _release(wp: _WorkerPlan, slot: _Slot) -> None:
    with _LOCK:
        if not wp.closed:
            wp.free.append(slot)
            return
    _close_slot(slot)


def _plan_value(plan: Plan) -> Plan:
    """The plan, as a task's result (see :func:`run_on_cluster`)."""
    return plan


def _forget(fingerprint: str) -> None:
    """On a worker, after a run: close the sources kept for it."""
    with _LOCK:
        wp = _CURRENT.get("plan")
        if wp is None or wp.fingerprint != fingerprint:
            return
        del _CURRENT["plan"]
        wp.closed = True
        free, wp.free = wp.free, []
    for slot in free:
        _close_slot(slot)


def _completed(root: Any, k: int) -> dict[str, Any] | None:
    done = root[META_KEY].get("complete")
    if done is None or str(k) not in done:
        return None
    return dict(done[str(k)].attrs)


def _clear_dataset(output: str, k: int) -> None:
    """Delete what an earlier attempt wrote of dataset ``k`` (it is rewritten whole)."""
    if not is_url(output):
        shutil.rmtree(Path(output) / dataset_key(k), ignore_errors=True)
        return
    from .collection import _delete_keys
    from .errors import OutputError
    from .stores import list_keys, object_store, parse_url

    store = object_store(parse_url(output, OutputError), OutputError, prefix=True)
    keys = sorted(str(o["path"]) for o in list_keys(store, f"{dataset_key(k)}/"))
    if keys:
        _delete_keys(store, keys)


class _Reporter:
    """A task's progress callback: cumulative rows and bytes, sent as worker events now and then."""

    def __init__(self, topic: str, k: int) -> None:
        from distributed import get_worker

        self.worker = get_worker()
        self.topic = topic
        self.k = k
        self.rows = 0
        self.bytes = 0
        self.last = 0.0

    def __call__(self, what: str, n: int) -> None:
        if what == "rows":
            self.rows += n
        elif what == "bytes":
            self.bytes += n
        if time.monotonic() - self.last >= _EVENT_INTERVAL:
            self.send()

    def send(self) -> None:
        self.last = time.monotonic()
        self.worker.log_event(self.topic, {"k": self.k, "rows": self.rows, "bytes": self.bytes})


class _ClusterFlag:
    """The cluster-wide cancel event as ``write_dataset``'s ``cancel`` (looked at twice a second at most)."""

    def __init__(self, name: str) -> None:
        from distributed import Event

        self.event = Event(name)
        self.last = 0.0
        self.value = False

    def is_set(self) -> bool:
        now = time.monotonic()
        if not self.value and now - self.last >= _CANCEL_INTERVAL:
            self.last = now
            self.value = bool(self.event.is_set())
        return self.value


def _share_cpus(slots: dict[str, int], host: str) -> None:
    """Give this worker's tasks their share of the host's CPUs as encoding threads (unless the user chose)."""
    if _USER_THREADS is None:
        os.environ[THREADS_ENV] = str(cpu_share(slots.get(host, 1)))


#: ``$ANNBATCH_NB_THREADS`` as the worker process started with (a user's setting wins over the share).
_USER_THREADS = os.environ.get(THREADS_ENV)


def _write_task(
    plan: Plan,
    k: int,
    obs_names: pd.Index,
    output: str,
    topic: str,
    cancel_name: str,
    slots: dict[str, int] | None = None,
) -> dict[str, Any]:
    """One dataset, on a worker: idempotent, so dask may run it again after a failure."""
    from distributed import get_worker

    t = time.perf_counter()
    if slots:
        _share_cpus(slots, get_worker().ip)
    flag = _ClusterFlag(cancel_name)
    if flag.is_set():
        raise CancelledError("cancelled; re-run the same command to resume")
    wp, slot = _acquire(plan, output)
    try:
        record = _completed(wp.root, k)  # an earlier attempt finished it, then its worker died
        if record is None:
            _clear_dataset(output, k)
            reporter = _Reporter(topic, k)
            record = write_dataset(
                plan,
                k,
                slot.sources,
                wp.root,
                progress=reporter,
                cancel=flag,
                pool=slot.pool,
                obs_names=obs_names,
            )
            reporter.send()
    finally:
        _release(wp, slot)
    return {"k": k, "record": record, "seconds": time.perf_counter() - t, "worker": get_worker().address}

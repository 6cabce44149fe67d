"""The on-disk collection: layout, writing one dataset, the commit point, and validation.

Layout of an output written by annbatch-nb::

    out.zarr/                       zarr v3 group; root attrs get the annbatch marker last (the commit)
      dataset_0/ ... dataset_K-1/   AnnData groups (X sharded, obs, var, empty uns/obsm/...)
      annbatch_nb/                  this tool's manifest (annbatch ignores keys not named dataset_*)
        attrs                       parameters, seed, inputs (paths, sizes, mtimes), plan fingerprint
        runs                        int64 (n_runs, 4): input, start, stop, dataset  -- the assignment
        complete/<k>/               written after dataset_k is whole; a resume skips those

The marker ``{"encoding-type": "annbatch-preshuffled", "encoding-version": "0.1.0"}`` is written only after
every dataset is complete, so an interrupted run is never loadable as a collection.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import anndata as ad
import numpy as np
import pandas as pd
import zarr
from zarr.codecs import BloscCodec

from . import __version__
from .errors import OutputError
from .frames import write_frames
from .stores import (
    S3URL,
    describe_store_error,
    is_not_found,
    is_url,
    list_keys,
    object_store,
    parse_url,
    zarr_store,
)

if TYPE_CHECKING:
    from .plan import Plan

__all__ = [
    "MARKER",
    "META_KEY",
    "DatasetWriter",
    "OutputState",
    "ValidationReport",
    "commit",
    "is_committed",
    "mark_complete",
    "open_output",
    "validate",
]

MARKER = {"encoding-type": "annbatch-preshuffled", "encoding-version": "0.1.0"}
META_KEY = "annbatch_nb"
DATASET_RE = re.compile(r"^dataset_(\d+)$")


def _compressor() -> BloscCodec:
    return BloscCodec(cname="lz4", clevel=3, shuffle="shuffle")


def dataset_key(k: int) -> str:
    """Name of output dataset ``k``."""
    return f"dataset_{k}"


# --------------------------------------------------------------------------------------------------
# Opening / creating / resuming an output
# --------------------------------------------------------------------------------------------------
@dataclass
class OutputState:
    """An output opened for writing.

    Attributes
    ----------
    path
        Output path.
    root
        The root zarr group.
    complete
        Datasets already complete (from an earlier, interrupted run of the same plan).
    committed
        Whether the collection is already finished (marker present).
    resumed
        Whether an earlier run's state was found.
    lock
        The writer lock this process holds (a file, or an object on an object store).
    """

    path: str
    root: zarr.Group
    complete: set[int] = field(default_factory=set)
    committed: bool = False
    resumed: bool = False
    lock: Path | S3Lock | None = None


def _inside(child: Path, parent: Path) -> bool:
    try:
        child.relative_to(parent)
    except ValueError:
        return False
    return True


def _check_location(path: Path, plan: Plan) -> None:
    resolved = path.resolve()
    for info in plan.inputs:
        src = Path(info.path)
        if resolved == src or (src.is_dir() and _inside(resolved, src)):
            raise OutputError(
                path, f"is inside the input {info.display}; write the collection somewhere else"
            )
        if _inside(src, resolved) and resolved != src:
            raise OutputError(
                path, f"contains the input {info.display}; choose an output path outside the inputs"
            )
    if path.exists() and not path.is_dir():
        raise OutputError(path, "exists and is a file; choose a new directory path ending in .zarr")
    parent = path if path.exists() else next(p for p in [path, *path.parents] if p.exists())
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(path, f"cannot be written: {parent} is not writable")


def read_manifest(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The manifest of an annbatch-nb output (local or ``s3://``), or None if there is none."""
    if is_url(os.fspath(path)):
        try:
            url = parse_url(os.fspath(path), OutputError)
            keys = {str(o["path"]) for o in list_keys(object_store(url, OutputError, prefix=True))}
        except Exception:
            return None
        return _read_manifest_s3(url, keys)
    return _read_manifest(Path(path))


def _read_manifest(path: Path) -> dict[str, Any] | None:
    if not (path / "zarr.json").is_file() or not (path / META_KEY / "zarr.json").is_file():
        return None
    try:
        meta = zarr.open_group(str(path / META_KEY), mode="r")
        return dict(meta.attrs)
    except Exception:
        return None


LOCK_NAME = "lock.json"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def acquire_lock(path: Path) -> Path:
    """Take the output's writer lock (``annbatch_nb/lock.json``), or say who holds it.

    A lock left by a process that is no longer alive on this host is taken over.

    Raises
    ------
    OutputError
        If another live process holds the lock.
    """
    lock_dir = path / META_KEY
    lock_dir.mkdir(parents=True, exist_ok=True)
    lock = lock_dir / LOCK_NAME
    me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S")}
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                holder = json.loads(lock.read_text())
            except (OSError, ValueError):
                holder = {}
            pid, host = int(holder.get("pid", -1)), str(holder.get("host", "?"))
            if host == me["host"] and (pid == os.getpid() or not _pid_alive(pid)):
                lock.unlink(missing_ok=True)  # stale: its writer died; take it over
                continue
            raise OutputError(
                path,
                f"is locked by another run (pid {pid} on host {host} since {holder.get('since', '?')}); "
                f"wait for it to finish, or remove {lock} if that run is gone",
            ) from None
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        return lock
    raise OutputError(path, f"could not take the lock {lock}")  # pragma: no cover - lost three races


def release_lock(lock: Path | S3Lock | None) -> None:
    """Remove a lock taken by :func:`acquire_lock` (only if this process still holds it)."""
    if lock is None:
        return
    if isinstance(lock, S3Lock):
        lock.release()
        return
    try:
        holder = json.loads(lock.read_text())
    except (OSError, ValueError):
        return
    if holder.get("pid") == os.getpid():
        lock.unlink(missing_ok=True)


def _only_our_lock(path: Path) -> bool:
    """True when the directory holds nothing but the lock of a run that died before writing its manifest."""
    entries = list(path.iterdir())
    if [e.name for e in entries] != [META_KEY] or not entries[0].is_dir():
        return False
    return {e.name for e in entries[0].iterdir()} <= {LOCK_NAME}


def _mismatch(manifest: dict[str, Any], plan: Plan) -> str:
    """Say how an existing run differs from ``plan``."""
    old_inputs = {r.get("abspath"): r for r in manifest.get("inputs", [])}
    for rec in plan.inputs_record():
        old = old_inputs.get(rec["abspath"])
        if old is not None and (old.get("size_bytes"), old.get("mtime")) != (rec["size_bytes"], rec["mtime"]):
            return (
                f"was started from {rec['path']} as it was before it changed (size or mtime differ); "
                "re-run with restart (--restart) to start over, or choose a new output path"
            )
    if [r.get("abspath") for r in manifest.get("inputs", [])] != [r["abspath"] for r in plan.inputs_record()]:
        return "holds a run of other inputs; choose a new output path, or re-run with restart (--restart)"
    old_params = manifest.get("params", {})
    diffs = [
        f"{k} {old_params.get(k)!r} -> {v!r}"
        for k, v in plan.params.to_dict().items()
        if old_params.get(k) != v
    ]
    if diffs:
        return (
            f"holds a run with other parameters ({', '.join(diffs)}); choose a new output path, "
            "or re-run with restart (--restart)"
        )
    if manifest.get("appends"):
        return (
            "holds a collection that cells were appended to; add more with mode='append' (--append), or "
            "rewrite it with restart (--restart)"
        )
    return "holds a run of a different plan (annbatch-nb version?); re-run with restart (--restart)"


def remove_run(path: Path) -> None:
    """Delete what annbatch-nb wrote at ``path`` (datasets, manifest, root metadata); keep anything else."""
    manifest = _read_manifest(path)
    if manifest is None or manifest.get("tool") != "annbatch-nb":
        raise OutputError(path, "was not written by annbatch-nb; refusing to delete anything in it")
    for entry in path.iterdir():
        if DATASET_RE.match(entry.name) and entry.is_dir():
            shutil.rmtree(entry)
    for name in ("zarr.json", ".zgroup", ".zattrs"):
        (path / name).unlink(missing_ok=True)
    meta = path / META_KEY
    for entry in meta.iterdir():
        if entry.name != LOCK_NAME:
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()


def open_output(path: str | os.PathLike[str], plan: Plan, *, restart: bool = False) -> OutputState:
    """Create the output for ``plan``, or reopen an unfinished run of the same plan; take its lock.

    Parameters
    ----------
    path
        Output location.
    plan
        The plan to write.
    restart
        Start over: remove what an earlier annbatch-nb run wrote there (only that), then write anew.

    Returns
    -------
    OutputState
        The opened output, with the datasets an earlier run already completed. Release its lock with
        :func:`release_lock` (``state.lock``).

    Raises
    ------
    OutputError
        If the path exists and is not an empty directory or a run of this same plan, cannot be written, or
        is locked by another live run.
    """
    if is_url(os.fspath(path)):
        return _open_output_s3(os.fspath(path), plan, restart=restart)
    p = Path(path)
    _check_location(p, plan)
    fresh = not p.exists() or not any(p.iterdir()) or _only_our_lock(p)
    manifest = None if fresh else _read_manifest(p)
    if not fresh and (manifest is None or manifest.get("tool") != "annbatch-nb"):
        raise OutputError(p, "exists and was not written by annbatch-nb; choose a new output path")
    if manifest is not None and manifest.get("fingerprint") != plan.fingerprint and not restart:
        raise OutputError(p, _mismatch(manifest, plan))
    try:
        p.mkdir(parents=True, exist_ok=True)
        lock = acquire_lock(p)
    except OSError as e:
        raise OutputError(p, f"cannot be written ({e.strerror or e}); choose a writable location") from None
    try:
        if manifest is not None and restart:
            remove_run(p)
            manifest = None
        if manifest is None:
            root = zarr.open_group(str(p), mode="a", zarr_format=3)
            _write_manifest(root, plan)
            return OutputState(str(p), root, lock=lock)
        root = zarr.open_group(str(p), mode="r+")
        state = _resumed_state(str(p), root, plan, lock)
        for key in list(root.group_keys()):
            m = DATASET_RE.match(key)
            if m and int(m.group(1)) not in state.complete:
                # an unfinished dataset of our own earlier run: remove it, it will be rewritten whole
                shutil.rmtree(p / key, ignore_errors=True)
        return state
    except BaseException:
        release_lock(lock)
        raise


def open_root(path: str | os.PathLike[str], mode: Literal["r", "r+"] = "r+") -> zarr.Group:
    """Open an existing output's root group: a local path, or an ``s3://`` URL (zarr's ``ObjectStore``)."""
    if is_url(os.fspath(path)):
        url = parse_url(os.fspath(path), OutputError)
        return zarr.open_group(zarr_store(url, OutputError, read_only=mode == "r"), mode=mode)
    return zarr.open_group(os.fspath(path), mode=mode)


def _resumed_state(path: str, root: zarr.Group, plan: Plan, lock: Path | S3Lock) -> OutputState:
    state = OutputState(path, root, resumed=True, lock=lock)
    state.committed = is_committed(root)
    done = root[META_KEY].get("complete")
    if done is not None:
        state.complete = {int(k) for k in done.group_keys() if k.isdigit() and int(k) < plan.n_datasets}
    return state


# --------------------------------------------------------------------------------------------------
# The same on an object store (s3://bucket/prefix): keys instead of files, a put-if-absent lock object
# --------------------------------------------------------------------------------------------------
LOCK_KEY = f"{META_KEY}/{LOCK_NAME}"


@dataclass
class S3Lock:
    """The writer lock of an output on an object store: the object ``annbatch_nb/lock.json``.

    Attributes
    ----------
    url
        The output location.
    store
        An obstore store rooted at the output.
    holder
        What this process wrote into the lock (pid, host, since).
    """

    url: S3URL
    store: Any
    holder: dict[str, Any]

    def __str__(self) -> str:
        return f"{self.url}/{LOCK_KEY}"

    def read(self) -> dict[str, Any] | None:
        """The lock's content, or None if there is no lock."""
        import obstore

        try:
            return dict(json.loads(bytes(obstore.get(self.store, LOCK_KEY).bytes())))
        except Exception as e:
            if is_not_found(e):
                return None
            if isinstance(e, ValueError):
                return {}
            raise

    def release(self) -> None:
        """Delete the lock object if this process (pid and host) still holds it."""
        import obstore

        with contextlib.suppress(Exception):  # releasing is best effort: a stale lock is taken over later
            holder = self.read()
            if holder and (holder.get("pid"), holder.get("host")) == (
                self.holder["pid"],
                self.holder["host"],
            ):
                obstore.delete(self.store, LOCK_KEY)


def _store_failure(url: str, e: BaseException) -> OutputError:
    return OutputError(
        url,
        f"cannot be used ({describe_store_error(e)}); check the bucket name, AWS_ENDPOINT_URL and the "
        "credentials",
    )


def acquire_lock_s3(url: S3URL, store: Any) -> S3Lock:
    """Take the writer lock of an output on an object store (a put-if-absent object), or say who holds it.

    A lock left by a process that is no longer alive on this host is taken over.

    Raises
    ------
    OutputError
        If another live process holds the lock, or the store cannot be written.
    """
    import obstore
    from obstore.exceptions import AlreadyExistsError

    me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S")}
    lock = S3Lock(url, store, me)
    for _ in range(3):
        try:
            obstore.put(store, LOCK_KEY, json.dumps(me).encode(), mode="create")
            return lock
        except AlreadyExistsError:
            pass
        except Exception as e:
            raise _store_failure(url.url, e) from None
        holder = lock.read()
        if holder is None:
            continue  # released meanwhile
        pid, host = int(holder.get("pid", -1)), str(holder.get("host", "?"))
        if host == me["host"] and (pid == os.getpid() or not _pid_alive(pid)):
            obstore.delete(store, LOCK_KEY)  # stale: its writer died; take it over
            continue
        raise OutputError(
            url.url,
            f"is locked by another run (pid {pid} on host {host} since {holder.get('since', '?')}); "
            f"wait for it to finish, or delete {lock} if that run is gone",
        )
    raise OutputError(url.url, f"could not take the lock {lock}")  # pragma: no cover - lost three races


def _check_location_s3(url: S3URL, plan: Plan) -> None:
    for info in plan.inputs:
        if not is_url(info.path):
            continue
        src = parse_url(info.path, OutputError)
        if url.inside(src):
            raise OutputError(url.url, f"is inside the input {info.display}; write the collection elsewhere")
        if src.inside(url):
            raise OutputError(
                url.url, f"contains the input {info.display}; choose an output prefix outside the inputs"
            )


def _read_manifest_s3(url: S3URL, keys: set[str]) -> dict[str, Any] | None:
    if "zarr.json" not in keys or f"{META_KEY}/zarr.json" not in keys:
        return None
    try:
        root = zarr.open_group(zarr_store(url, OutputError, read_only=True), mode="r")
        return dict(root[META_KEY].attrs)
    except Exception:
        return None


def _delete_keys(store: Any, keys: list[str]) -> None:
    import obstore

    for i in range(0, len(keys), 1000):
        obstore.delete(store, keys[i : i + 1000])


def _ours(key: str, *, keep_complete: set[int] | None = None) -> bool:
    """Whether annbatch-nb wrote ``key``; with ``keep_complete``: whether it is in an unfinished dataset."""
    first = key.split("/", 1)[0]
    m = DATASET_RE.match(first)
    if keep_complete is not None:
        return bool(m) and "/" in key and int(m.group(1)) not in keep_complete  # type: ignore[union-attr]
    if m and "/" in key:
        return True
    if key in ("zarr.json", ".zgroup", ".zattrs"):
        return True
    return first == META_KEY and key != LOCK_KEY


def _open_output_s3(path: str, plan: Plan, *, restart: bool) -> OutputState:
    import obstore

    url = parse_url(path, OutputError)
    if not url.key:
        raise OutputError(
            path, "is a bucket root; give a prefix for the collection, e.g. s3://bucket/atlas.zarr"
        )
    _check_location_s3(url, plan)
    store = object_store(url, OutputError, prefix=True)
    try:
        bucket_store = object_store(S3URL(url.bucket, ""), OutputError)
        try:
            obstore.head(bucket_store, url.key)
            raise OutputError(path, "exists and is an object; choose a new prefix ending in .zarr")
        except OutputError:
            raise
        except Exception as e:
            if not is_not_found(e):
                raise
        keys = {str(o["path"]) for o in list_keys(store)}
    except OutputError:
        raise
    except Exception as e:
        raise _store_failure(path, e) from None
    fresh = keys <= {LOCK_KEY}
    manifest = None if fresh else _read_manifest_s3(url, keys)
    if not fresh and (manifest is None or manifest.get("tool") != "annbatch-nb"):
        raise OutputError(path, "exists and was not written by annbatch-nb; choose a new output prefix")
    if manifest is not None and manifest.get("fingerprint") != plan.fingerprint and not restart:
        raise OutputError(path, _mismatch(manifest, plan))
    lock = acquire_lock_s3(url, store)
    try:
        if manifest is not None and restart:
            _delete_keys(store, sorted(k for k in keys if _ours(k)))
            manifest = None
        zstore = zarr_store(url, OutputError, read_only=False)
        if manifest is None:
            root = zarr.open_group(zstore, mode="a", zarr_format=3)
            _write_manifest(root, plan)
            return OutputState(url.url, root, lock=lock)
        root = zarr.open_group(zstore, mode="r+")
        state = _resumed_state(url.url, root, plan, lock)
        # unfinished datasets of our own earlier run: remove them, they will be rewritten whole
        _delete_keys(store, sorted(k for k in keys if _ours(k, keep_complete=state.complete)))
        return state
    except BaseException:
        release_lock(lock)
        raise


def _write_manifest(root: zarr.Group, plan: Plan) -> None:
    attrs = {
        "tool": "annbatch-nb",
        "version": __version__,
        "plan_format": 1,
        "fingerprint": plan.fingerprint,
        "params": plan.params.to_dict(),
        "inputs": plan.inputs_record(),
        "n_obs": plan.n_obs,
        "n_vars": plan.n_vars,
        "x_kind": plan.x_kind,
        "dtype": plan.dtype.name,
        "n_datasets": plan.n_datasets,
        "dataset_rows": plan.dataset_rows,
        "rows_per_dataset": plan.rows_per_dataset.tolist(),
    }
    meta = root.create_group(META_KEY, attributes=attrs)
    write_runs_table(meta, np.concatenate([plan.runs, plan.run_dataset[:, None]], axis=1))
    meta.create_group("complete")


def write_runs_table(meta: zarr.Group, table: np.ndarray) -> None:
    """Store (or replace) the manifest's ``runs`` array: input, start, stop, dataset of every run."""
    table = np.asarray(table, dtype=np.int64)
    runs = meta.create_array(
        "runs",
        shape=table.shape,
        dtype=np.int64,
        chunks=(max(1, min(len(table), 1 << 18)), 4),
        compressors=_compressor(),
        attributes={"columns": ["input", "start", "stop", "dataset"]},
        overwrite=True,
    )
    runs[...] = table


def mark_complete(root: zarr.Group, k: int, record: dict[str, Any]) -> None:
    """Record that dataset ``k`` is whole (the resume point)."""
    root[META_KEY]["complete"].create_group(str(k), attributes=record, overwrite=True)


def is_committed(root: zarr.Group) -> bool:
    """Whether the root carries the annbatch collection marker."""
    attrs = dict(root.attrs)
    return all(attrs.get(k) == v for k, v in MARKER.items())


def commit(root: zarr.Group, plan: Plan) -> None:
    """Write the collection marker, after checking every dataset is complete.

    Raises
    ------
    OutputError
        If a dataset is not complete.
    """
    done = {int(k) for k in root[META_KEY]["complete"].group_keys()}
    missing = sorted(set(range(plan.n_datasets)) - done)
    if missing:
        raise OutputError(str(root.store), f"datasets {missing[:5]} are not complete; cannot commit")
    root.attrs.update(dict(MARKER))


# --------------------------------------------------------------------------------------------------
# Writing one dataset
# --------------------------------------------------------------------------------------------------
class DatasetWriter:
    """Create the arrays of one output dataset and write them shard by shard.

    Parameters
    ----------
    root
        Output root group.
    k
        Dataset number.
    plan
        The plan (chunk and shard sizes, dtypes, var).
    n_rows
        Rows of this dataset.
    nnz
        Stored entries (CSR only); ``None`` creates only the group, and :meth:`create_x` the arrays later.
    """

    def __init__(self, root: zarr.Group, k: int, plan: Plan, n_rows: int, nnz: int | None = 0) -> None:
        self.k = k
        self.plan = plan
        self.n_rows = n_rows
        self.nnz = 0
        self.group = root.create_group(
            dataset_key(k), attributes={"encoding-type": "anndata", "encoding-version": "0.1.0"}
        )
        if nnz is not None or plan.x_kind != "csr":
            self.create_x(nnz or 0)

    def create_x(self, nnz: int) -> None:
        """Create X's arrays (a CSR X needs its stored entries, known once the dataset has been read).

        Parameters
        ----------
        nnz
            Stored entries (CSR only).
        """
        plan, n_rows = self.plan, self.n_rows
        self.nnz = nnz
        shard_bytes = int(plan.params.shard_size)  # validated to bytes
        if plan.x_kind == "csr":
            itemsize = max(plan.dtype.itemsize, plan.index_dtype.itemsize)
            chunk = plan.x_chunk_elems
            per_shard = max(1, shard_bytes // (itemsize * chunk)) * chunk
            self.shard_elems = min(per_shard, max(chunk, -(-nnz // chunk) * chunk))
            x = self.group.create_group(
                "X",
                attributes={
                    "encoding-type": "csr_matrix",
                    "encoding-version": "0.1.0",
                    "shape": [n_rows, plan.n_vars],
                },
            )
            self.data = x.create_array(
                "data",
                shape=(nnz,),
                dtype=plan.dtype,
                chunks=(chunk,),
                shards=(self.shard_elems,),
                compressors=_compressor(),
                fill_value=0,
            )
            self.indices = x.create_array(
                "indices",
                shape=(nnz,),
                dtype=plan.index_dtype,
                chunks=(chunk,),
                shards=(self.shard_elems,),
                compressors=_compressor(),
                fill_value=0,
            )
            self.indptr = x.create_array(
                "indptr",
                shape=(n_rows + 1,),
                dtype=np.int64,
                chunks=(n_rows + 1,),
                compressors=_compressor(),
                fill_value=0,
            )
        else:
            chunk_rows = min(plan.params.n_obs_per_chunk, max(n_rows, 1))
            row_bytes = plan.n_vars * plan.dtype.itemsize
            per_shard = max(1, shard_bytes // max(row_bytes * chunk_rows, 1)) * chunk_rows
            self.shard_rows = min(per_shard, -(-n_rows // chunk_rows) * chunk_rows)
            self.x = self.group.create_array(
                "X",
                shape=(n_rows, plan.n_vars),
                dtype=plan.dtype,
                chunks=(chunk_rows, plan.n_vars),
                shards=(self.shard_rows, plan.n_vars),
                compressors=_compressor(),
                fill_value=0,
                attributes={"encoding-type": "array", "encoding-version": "0.2.0"},
            )

    def write_frames(self, obs: pd.DataFrame) -> None:
        """Write obs, var and the empty AnnData elements (see :func:`annbatch_nb.frames.write_frames`)."""
        write_frames(self.group.store_path.store, self.group.store_path.path, self.plan, obs)


# --------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------
@dataclass
class ValidationReport:
    """What :func:`validate` found.

    Attributes
    ----------
    output
        The collection checked.
    errors
        Problems found; empty when valid.
    n_datasets, n_obs, n_vars
        Shape of the collection.
    x_kind, dtype
        X encoding and dtype.
    checked_cells
        Cells whose X row and obs values were compared with the inputs.
    """

    output: str
    errors: list[str] = field(default_factory=list)
    n_datasets: int = 0
    n_obs: int = 0
    n_vars: int = 0
    x_kind: str = ""
    dtype: str = ""
    checked_cells: int = 0

    @property
    def ok(self) -> bool:
        """True when no problem was found."""
        return not self.errors

    def __bool__(self) -> bool:
        return self.ok

    def __str__(self) -> str:
        head = (
            f"{self.output}: {self.n_datasets} datasets, {self.n_obs:,} cells x {self.n_vars:,} genes "
            f"({self.x_kind}, {self.dtype})"
        )
        if self.ok:
            extra = f"; {self.checked_cells:,} cells compared with the inputs" if self.checked_cells else ""
            return f"{head}: valid{extra}"
        return head + ": INVALID\n" + "\n".join(f"  - {e}" for e in self.errors)


def _read_var_index(group: zarr.Group) -> pd.Index:
    return pd.Index(ad.io.read_elem(group["var"]).index)


def validate(
    output: str | os.PathLike[str],
    inputs: str | os.PathLike[str] | Iterable[str | os.PathLike[str]] | None = None,
    *,
    sample: int | None = None,
    seed: int = 0,
    virtualize: Any = "auto",
) -> ValidationReport:
    """Check that ``output`` is a complete, consistent annbatch collection.

    Parameters
    ----------
    output
        The collection: a local path or an ``s3://bucket/prefix`` URL.
    inputs
        If given, also check that every input cell appears exactly once and that X rows and obs values equal
        the inputs' (mapped to the collection's genes). ``"recorded"``: the inputs the manifest lists (every
        input a shuffle and its appends took, in order).
    sample
        Compare at most this many cells per dataset with the inputs (default: all).
    seed
        Seed of the sample.
    virtualize
        How ``.h5ad`` inputs are read (see :func:`annbatch_nb.plan`).

    Returns
    -------
    ValidationReport
        The findings; ``report.ok`` tells whether the collection is valid.
    """
    from .validation import check_collection

    return check_collection(output, inputs, sample=sample, seed=seed, virtualize=virtualize)

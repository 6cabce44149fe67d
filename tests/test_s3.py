"""Object stores: inputs and the output on S3, against a real S3 API (moto's server on 127.0.0.1).

Covers zarr and .h5ad inputs on S3 (virtualized, and with h5py through a file object), a collection written
to S3 (byte-identical to the same collection written locally), validation and annbatch's Loader reading it
back, resume after SIGKILL on S3, the lock object, --restart, and one-line errors for bad locations.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
from conftest import (
    GENES,
    categorical,
    floats,
    make_adata,
    read_collection,
    run_cli,
    tree_digest,
    write_adata,
)

import annbatch_nb as abn
from annbatch_nb.sources import H5adSource, VirtualH5adSource, open_source
from annbatch_nb.testing import MotoServer, moto_server, upload

pytest.importorskip("moto")

BUCKET = "cells"
OBS = {"cell_type": categorical(["T", "B", "NK"]), "score": floats}
KWARGS = {"shuffle_chunk_size": 40, "dataset_size": 300, "shard_size": "16KB", "n_obs_per_chunk": 16}


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    """A moto S3 server with the environment pointing at it, and the inputs uploaded to ``s3://cells/in/``."""
    with moto_server() as server, pytest.MonkeyPatch.context() as mp:
        for key in [k for k in os.environ if k.startswith("AWS_")]:
            mp.delenv(key)
        for key, value in server.env().items():
            mp.setenv(key, value)
        server.create_bucket(BUCKET)
        d = tmp_path_factory.mktemp("s3-inputs")
        files = {
            "a.h5ad": ("h5ad", make_adata(260, GENES[:100], seed=1, prefix="a", obs=OBS), None),
            "b.h5ad": ("h5ad", make_adata(180, GENES[50:150], seed=2, x="dense", prefix="b", obs=OBS), None),
            "c.zarr": ("zarr3", make_adata(220, GENES[:150], seed=3, prefix="c", obs=OBS), None),
            "d.h5ad": ("h5ad", make_adata(140, GENES[:100], seed=4, prefix="d", obs=OBS), "lzf"),
        }
        for name, (fmt, adata, compression) in files.items():
            if compression:
                adata.write_h5ad(d / name, compression=compression)
            else:
                write_adata(adata, d / name, fmt)
            upload(d / name, f"s3://{BUCKET}/in/{name}")
        server.local_inputs = d  # type: ignore[attr-defined]
        yield server


INPUTS = [f"s3://{BUCKET}/in/a.h5ad", f"s3://{BUCKET}/in/b.h5ad", f"s3://{BUCKET}/in/c.zarr"]


def _remote_digest(url: str) -> dict[str, str]:
    import obstore

    from annbatch_nb.errors import InputError
    from annbatch_nb.stores import list_keys, object_store, parse_url

    store = object_store(parse_url(url, InputError), InputError, prefix=True)
    return {
        str(o["path"]): hashlib.sha256(bytes(obstore.get(store, str(o["path"])).bytes())).hexdigest()
        for o in list_keys(store)
    }


@pytest.fixture(scope="module")
def local_twin(s3: MotoServer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The S3 inputs shuffled into a local directory (the reference for byte comparisons)."""
    out = tmp_path_factory.mktemp("s3-twin") / "twin.zarr"
    result = abn.shuffle(INPUTS, out, seed=7, progress=False, virtualize=True, **KWARGS)
    assert [i.reader for i in result.plan.inputs] == ["virtual", "virtual", "zarr"]
    return out


def test_s3_inputs_are_resolved_and_read_like_local_ones(s3: MotoServer) -> None:
    from annbatch_nb.sources import resolve_inputs

    specs = resolve_inputs([f"s3://{BUCKET}/in/"])
    assert [s.display for s in specs] == [
        f"s3://{BUCKET}/in/{n}" for n in ("a.h5ad", "b.h5ad", "c.zarr", "d.h5ad")
    ]
    assert [s.path for s in resolve_inputs(f"s3://{BUCKET}/in/*.h5ad")] == [
        f"s3://{BUCKET}/in/{n}" for n in ("a.h5ad", "b.h5ad", "d.h5ad")
    ]
    local = s3.local_inputs  # type: ignore[attr-defined]
    for name in ("a.h5ad", "b.h5ad", "c.zarr"):
        remote = open_source(f"s3://{BUCKET}/in/{name}", virtualize=True)
        here = open_source(str(local / name))
        assert isinstance(remote, VirtualH5adSource) == name.endswith(".h5ad")
        runs = np.array([[0, 30], [50, 51], [100, 140]])
        np.testing.assert_array_equal(remote.read_dense(runs), here.read_dense(runs))
        assert remote.info.obs_names.equals(here.info.obs_names)
        assert remote.info.obs_columns == here.info.obs_columns
    # h5py through a file object, when asked not to virtualize (and for LZF, with a note)
    plain = open_source(f"s3://{BUCKET}/in/a.h5ad", virtualize=False)
    assert type(plain) is H5adSource
    np.testing.assert_array_equal(plain.read_dense(runs), open_source(str(local / "a.h5ad")).read_dense(runs))
    with pytest.warns(abn.VirtualizationFallback, match="LZF"):
        assert type(open_source(f"s3://{BUCKET}/in/d.h5ad", virtualize=True)) is H5adSource


def test_auto_on_s3_picks_by_object_size(s3: MotoServer, monkeypatch) -> None:
    """Small objects fit h5py's block cache whole (a few big requests); larger ones are virtualized."""
    import annbatch_nb.sources as sources_mod

    assert type(open_source(f"s3://{BUCKET}/in/a.h5ad")) is H5adSource
    monkeypatch.setattr(sources_mod, "_H5PY_REMOTE_CACHE", 1024)
    assert type(open_source(f"s3://{BUCKET}/in/a.h5ad")) is VirtualH5adSource


def test_collection_on_s3_is_byte_identical_and_valid(s3: MotoServer, local_twin: Path) -> None:
    url = f"s3://{BUCKET}/out/atlas.zarr"
    result = abn.shuffle(INPUTS, url, seed=7, progress=False, virtualize=True, **KWARGS)
    assert result.datasets_written == result.n_datasets > 1
    assert _remote_digest(url) == tree_digest(local_twin)
    report = abn.validate(url, inputs=INPUTS)
    assert report.ok, report
    assert report.checked_cells == result.n_obs
    assert abn.shuffle(INPUTS, url, seed=7, progress=False, **KWARGS).already_complete
    # h5py over S3 (no manifest), written by two worker processes, gives the same bytes
    url2 = f"s3://{BUCKET}/out/plain.zarr"
    two = abn.shuffle(INPUTS, url2, seed=7, progress=False, virtualize=False, workers=2, **KWARGS)
    assert two.workers == 2
    assert _remote_digest(url2) == tree_digest(local_twin)


def test_annbatch_loader_reads_the_s3_collection(s3: MotoServer, local_twin: Path) -> None:
    import annbatch
    import zarr

    from annbatch_nb.errors import OutputError
    from annbatch_nb.stores import parse_url, zarr_store

    url = f"s3://{BUCKET}/out/loader.zarr"
    abn.shuffle(INPUTS, url, seed=7, progress=False, **KWARGS)
    group = zarr.open_group(zarr_store(parse_url(url, OutputError), OutputError, read_only=True), mode="r")
    datasets = read_collection(local_twin)
    ref = sp.vstack([sp.csr_matrix(d.X) for d in datasets]).tocsr()
    loader = annbatch.Loader(
        batch_size=32, chunk_size=8, preload_nchunks=4, shuffle=True, return_index=True, preload_to_gpu=False
    ).use_collection(annbatch.DatasetCollection(group, mode="r"))
    served = []
    for batch in loader:
        index = np.asarray(batch["index"])
        assert (sp.csr_matrix(batch["X"]) != ref[index]).nnz == 0
        served.append(index)
    assert np.array_equal(np.sort(np.concatenate(served)), np.arange(ref.shape[0]))


CLI_PARAMS = ["--shuffle-chunk-size", "40", "--dataset-size", "300", "--shard-size", "16KB"]
CLI_PARAMS += ["--n-obs-per-chunk", "16", "--seed", "7", "--no-progress", "-q", "--virtualize", "yes"]


def test_kill_on_s3_then_resume_gives_identical_bytes(s3: MotoServer, local_twin: Path) -> None:
    url = f"s3://{BUCKET}/out/killed.zarr"
    killed = run_cli("shuffle", *INPUTS, "-o", url, *CLI_PARAMS, env={"ANNBATCH_NB_STOP_AT": "shard:1"})
    assert killed.returncode == -9, killed.stderr
    assert not abn.validate(url).ok  # no marker: not a collection yet
    assert "annbatch_nb/lock.json" in _remote_digest(url)  # the dead run's lock is still there
    resumed = run_cli("shuffle", *INPUTS, "-o", url, *CLI_PARAMS)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed: 1 of" in resumed.stdout
    assert _remote_digest(url) == tree_digest(local_twin)


def test_cancel_on_s3_then_resume(s3: MotoServer, local_twin: Path) -> None:
    import threading

    url = f"s3://{BUCKET}/out/cancelled.zarr"
    p = abn.plan(INPUTS, seed=7, **KWARGS)
    cancel = threading.Event()

    def on_progress(what: str, n: int) -> None:
        if what == "rows":
            cancel.set()

    with pytest.raises(abn.CancelledError):
        p.run(url, progress=False, cancel=cancel, on_progress=on_progress)
    assert "annbatch_nb/lock.json" not in _remote_digest(url), "a cancelled run must release its lock"
    assert p.run(url, progress=False).datasets_resumed >= 0
    assert _remote_digest(url) == tree_digest(local_twin)


def test_s3_lock_restart_and_refusals(s3: MotoServer) -> None:
    import obstore

    from annbatch_nb.errors import OutputError
    from annbatch_nb.stores import object_store, parse_url

    url = f"s3://{BUCKET}/out/locked.zarr"
    store = object_store(parse_url(url, OutputError), OutputError, prefix=True)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = {"pid": sleeper.pid, "host": os.uname().nodename, "since": "2026-01-01T00:00:00"}
        obstore.put(store, "annbatch_nb/lock.json", json.dumps(lock).encode())
        with pytest.raises(
            abn.OutputError, match=rf"locked\.zarr: is locked by another run \(pid {sleeper.pid}"
        ):
            abn.shuffle(INPUTS, url, seed=7, progress=False, **KWARGS)
    finally:
        sleeper.kill()
        sleeper.wait()
    abn.shuffle(INPUTS, url, seed=7, progress=False, **KWARGS)  # the dead holder's lock is taken over
    obstore.put(store, "notes/readme.txt", b"not ours")
    with pytest.raises(abn.OutputError, match=r"other parameters.*seed 7 -> 8"):
        abn.shuffle(INPUTS, url, seed=8, progress=False, **KWARGS)
    abn.shuffle(INPUTS, url, seed=8, progress=False, restart=True, **KWARGS)
    keys = _remote_digest(url)
    assert "notes/readme.txt" in keys, "--restart deletes only what annbatch-nb wrote"
    assert abn.validate(url, inputs=INPUTS).ok
    # an unrelated prefix, an output that is an object, an output inside an input
    foreign = object_store(parse_url(f"s3://{BUCKET}/foreign", OutputError), OutputError, prefix=True)
    obstore.put(foreign, "data.bin", b"x")
    with pytest.raises(abn.OutputError, match="foreign: exists and was not written by annbatch-nb"):
        abn.shuffle(INPUTS, f"s3://{BUCKET}/foreign", seed=7, progress=False, **KWARGS)
    with pytest.raises(abn.OutputError, match=r"data\.bin: exists and is an object"):
        abn.shuffle(INPUTS, f"s3://{BUCKET}/foreign/data.bin", seed=7, progress=False, **KWARGS)
    with pytest.raises(abn.OutputError, match="is inside the input"):
        abn.shuffle(INPUTS, f"s3://{BUCKET}/in/c.zarr/out.zarr", seed=7, progress=False, **KWARGS)


@pytest.mark.parametrize(
    ("inputs", "pattern"),
    [
        ([f"s3://{BUCKET}/in/missing.h5ad"], rf"s3://{BUCKET}/in/missing\.h5ad: no such object"),
        (["s3://no-such-bucket/a.h5ad"], r"s3://no-such-bucket/a\.h5ad: "),
        ([f"s3://{BUCKET}/in/nothing*.h5ad"], "matches no object"),
        (["s3://"], "has no bucket name"),
    ],
)
def test_bad_s3_inputs_are_one_line_errors(s3: MotoServer, inputs: list[str], pattern: str) -> None:
    with pytest.raises(abn.InputError, match=pattern) as e:
        abn.plan(inputs)
    assert "\n" not in str(e.value)


def test_bad_s3_output_is_a_one_line_error(s3: MotoServer) -> None:
    with pytest.raises(abn.OutputError, match=r"s3://no-such-bucket/out\.zarr: cannot be used") as e:
        abn.shuffle(INPUTS, "s3://no-such-bucket/out.zarr", seed=1, progress=False, **KWARGS)
    assert "\n" not in str(e.value)
    report = abn.validate(f"s3://{BUCKET}/out/never-written.zarr")
    assert not report.ok and "does not exist" in str(report)


def test_no_credentials_and_unreachable_endpoint(s3: MotoServer, monkeypatch) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    with pytest.raises(abn.InputError, match=r"s3://cells/in/a\.h5ad: no credentials.*AWS_ACCESS_KEY_ID"):
        abn.plan(INPUTS)
    with pytest.raises(abn.OutputError, match=r"s3://cells/o\.zarr: no credentials"):
        abn.shuffle([str(s3.local_inputs / "a.h5ad")], "s3://cells/o.zarr", progress=False)  # type: ignore[attr-defined]
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    t = time.perf_counter()
    with pytest.raises(
        abn.InputError, match=r"s3://cells/in/a\.h5ad: cannot be read from the object store"
    ) as e:
        abn.plan(INPUTS)
    assert "\n" not in str(e.value)
    assert time.perf_counter() - t < 30

"""Page-cache residency of the inputs and the cold-read probe: what they report, and that no file changes."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from annbatch_nb import pagecache

pytestmark = pytest.mark.skipif(not pagecache.supported(), reason="needs mincore and posix_fadvise (Linux)")

#: A directory on the repository's file system: a disk, where dropped pages leave the cache (under a
#: memory-backed /tmp they would not).
_REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def on_disk() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix=".pagecache-test-", dir=_REPO))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _write(path: Path, nbytes: int, seed: int = 0) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(np.random.default_rng(seed).integers(0, 255, nbytes, dtype=np.uint8).tobytes())
    with open(path, "rb+") as f:
        os.fsync(f.fileno())  # clean pages: only those can be dropped
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_file_read_is_cached_and_a_dropped_one_is_not(on_disk: Path) -> None:
    f = on_disk / "a.h5ad"
    _write(f, 4 << 20)
    f.read_bytes()
    assert pagecache.uncached_fraction(f) == 0.0
    pagecache.drop(f)
    assert pagecache.uncached_fraction(f) > 0.9
    # half of it read back in (no read-ahead): half cached
    fd = os.open(f, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        os.pread(fd, 2 << 20, 0)
    finally:
        os.close(fd)
    assert pagecache.uncached_fraction(f) == pytest.approx(0.5, abs=0.1)


def test_a_store_is_judged_by_its_x_files_byte_weighted(on_disk: Path) -> None:
    store = on_disk / "a.zarr"
    _write(store / "X" / "data" / "c" / "0", 3 << 20, seed=1)
    _write(store / "X" / "indices" / "c" / "0", 1 << 20, seed=2)
    _write(store / "obs" / "big", 8 << 20, seed=3)  # not X: not part of the judgement
    for f in store.rglob("*"):
        if f.is_file():
            f.read_bytes()
    pagecache.drop(store / "X" / "data" / "c" / "0")
    assert pagecache.uncached_fraction(store) == pytest.approx(0.75, abs=0.05)


def test_remote_and_missing_inputs_count_as_cached(on_disk: Path) -> None:
    assert pagecache.uncached_fraction("s3://bucket/a.h5ad") == 0.0
    assert pagecache.uncached_fraction(on_disk / "missing.h5ad") == 0.0


def test_the_cold_read_probe_times_the_disk_and_leaves_the_file_as_it_was(on_disk: Path) -> None:
    small = on_disk / "small.h5ad"
    big = on_disk / "big.h5ad"
    _write(small, 1 << 20, seed=4)
    digest = _write(big, 24 << 20, seed=5)
    big.read_bytes()
    costs = pagecache.cold_read_costs([str(small), str(big), "s3://bucket/x.h5ad"])
    if costs is None:  # the disk answered as fast as memory (a cache below the file system): nothing to price
        pytest.fail("the probe found no cost on the repository's disk")
    call_s, rate = costs
    assert 0.0 <= call_s < 0.1
    assert 1e6 < rate <= 4e9
    # read back in, not changed
    assert pagecache.uncached_fraction(big) < 0.05
    assert hashlib.sha256(big.read_bytes()).hexdigest() == digest
    # nothing large enough to probe
    assert pagecache.cold_read_costs([str(small)]) is None

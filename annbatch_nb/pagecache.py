"""Which bytes of the inputs the operating system's page cache holds, and what reading the rest costs.

A run reads each input's X once. Bytes the page cache holds (an input read recently, or small enough to stay)
come at memory speed; the rest come from the disk, a cost that decides runs over inputs larger than memory
and the first run after a while over any inputs. The planner asks :func:`uncached_fraction` of every local
input when it plans, and :func:`~annbatch_nb.predict.calibrate` times cold reads with :func:`cold_read_costs`.

Nothing here changes a file: residency is queried with ``mincore(2)`` on a read-only mapping, and the probe
drops a few MiB of one input from the cache with ``posix_fadvise(POSIX_FADV_DONTNEED)`` (clean pages only;
the file's bytes are untouched) before reading them back in. Where the platform offers neither (not Linux or
another Unix with ``mincore``), inputs count as cached and the reference cold-read costs are kept.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import mmap
import os
import time
from pathlib import Path

import numpy as np

#: Files of a directory input (a zarr store) whose residency is queried, at most; spread over the sorted list.
MAX_FILES = 256
#: Bytes of a file's mapping queried per ``mincore`` call (bounds the residency vector).
_SPAN = 1 << 30

_PROT_READ = 0x1
_MAP_SHARED = 0x01


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None or not hasattr(os, "posix_fadvise"):
        return None
    try:
        lib = ctypes.CDLL(name, use_errno=True)
        lib.mmap.restype = ctypes.c_void_p
        lib.mmap.argtypes = [
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_long,
        ]
        lib.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        lib.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        return lib
    except (OSError, AttributeError):
        return None


_LIBC = _libc()


def supported() -> bool:
    """Whether residency can be queried and pages dropped on this platform."""
    return _LIBC is not None


def _file_resident(path: str) -> tuple[int, int]:
    """``(resident bytes, size)`` of one file (size 0 if it cannot be queried)."""
    assert _LIBC is not None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return 0, 0
    try:
        size = os.fstat(fd).st_size
        page = mmap.PAGESIZE
        resident = 0
        for off in range(0, size, _SPAN):
            n = min(_SPAN, size - off)
            addr = _LIBC.mmap(None, n, _PROT_READ, _MAP_SHARED, fd, off)
            if addr in (None, ctypes.c_void_p(-1).value):
                return 0, 0
            try:
                vec = np.zeros((n + page - 1) // page, dtype=np.uint8)
                if _LIBC.mincore(addr, n, vec.ctypes.data) != 0:
                    return 0, 0
                resident += int(np.count_nonzero(vec & 1)) * page
            finally:
                _LIBC.munmap(addr, n)
        return min(resident, size), size
    finally:
        os.close(fd)


def _files(path: Path) -> list[str]:
    """The files whose residency stands for ``path``'s: itself, or a spread sample of a directory's files."""
    if path.is_file():
        return [str(path)]
    x = path / "X"
    root = x if x.is_dir() else path  # an AnnData zarr store: X is what a run reads
    files = sorted(str(p) for p in root.rglob("*") if p.is_file())
    if len(files) > MAX_FILES:
        files = [files[i] for i in np.linspace(0, len(files) - 1, MAX_FILES).astype(int)]
    return files


def uncached_fraction(path: str | os.PathLike[str]) -> float:
    """Fraction of a local input's bytes that the page cache does not hold (0 where that cannot be known).

    A directory (an AnnData zarr store) is judged by the files under its ``X`` (up to :data:`MAX_FILES` of
    them, spread over the sorted list), byte-weighted. Remote inputs (``s3://``...) and platforms without
    ``mincore`` give 0: their reads are timed as they are by :func:`~annbatch_nb.predict.calibrate`.
    """
    if _LIBC is None or "://" in str(path):
        return 0.0
    p = Path(path)
    if not p.exists():
        return 0.0
    resident = size = 0
    for f in _files(p):
        r, s = _file_resident(f)
        resident += r
        size += s
    return 1.0 - resident / size if size else 0.0


def drop(path: str | os.PathLike[str], offset: int = 0, length: int = 0) -> None:
    """Ask the kernel to drop ``[offset, offset + length)`` of a file from the page cache (0: to the end).

    A directory (a zarr store): every file under it, whole. Pages not yet written out are written first
    (``fdatasync``); no file's bytes change. A no-op where ``posix_fadvise`` is missing. Useful to see what
    a run over inputs larger than memory would take.
    """
    if not hasattr(os, "posix_fadvise"):
        return
    if os.path.isdir(path):
        for f in Path(path).rglob("*"):
            if f.is_file():
                drop(f)
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        with contextlib.suppress(OSError):  # pages not yet written out cannot be dropped: write them first
            os.fdatasync(fd)
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _largest_file(paths: list[str]) -> str | None:
    best, best_size = None, 0
    for path in paths:
        if "://" in path:
            continue
        p = Path(path)
        candidates = [p] if p.is_file() else list(p.rglob("*")) if p.is_dir() else []
        for f in candidates:
            try:
                s = f.stat().st_size if f.is_file() else 0
            except OSError:
                continue
            if s > best_size:
                best, best_size = str(f), s
    return best


def cold_read_costs(
    paths: list[str], *, probes: int = 2, small: int = 64 << 10, n_small: int = 16, large: int = 16 << 20
) -> tuple[float, float] | None:
    """Seconds per read call and bytes per second of reading what the page cache does not hold.

    On the largest local file of ``paths`` (at least 4 MiB), ``probes`` times: a region in its middle is
    dropped from the page cache (:func:`drop`), then read back as ``n_small`` reads of ``small`` bytes spread
    over its first half (a run's short runs of rows: each pays the disk's latency) and as one sequential pass
    over its second half in 1 MiB reads (a long range: the kernel reads ahead). The rate is the second's bytes
    per second; the call cost what the first took beyond its bytes at that rate, per read; the probes' mean
    call cost and their rate over the bytes of all of them are returned. The region is read back in, so the
    cache holds it again afterwards. None where that cannot be done (no local file, no ``posix_fadvise``), or
    when the pages did not leave the cache (a file system in memory: no cost).
    """
    if _LIBC is None:
        return None
    path = _largest_file(paths)
    if path is None:
        return None
    got = [r for r in (_probe(path, small, n_small, large) for _ in range(probes)) if r is not None]
    if not got:
        return None
    return float(np.mean([g[0] for g in got])), float(len(got) / sum(1 / g[1] for g in got))


def _probe(path: str, small: int, n_small: int, large: int) -> tuple[float, float] | None:
    """One probe of :func:`cold_read_costs` on ``path``."""
    size = os.path.getsize(path)
    if size < 4 << 20:
        return None
    page = mmap.PAGESIZE
    length = min(2 * large, size // 2) // page * page
    start = (size - length) // 2 // page * page
    half = length // 2
    drop(path, start, length)
    fd = os.open(path, os.O_RDONLY)
    try:
        buf = bytearray(max(small, 1 << 20))
        view = memoryview(buf)
        offsets = start + (np.arange(n_small) * (half // n_small)) // page * page
        t = time.perf_counter()
        for off in offsets:
            os.preadv(fd, [view[:small]], int(off))
        t_small = time.perf_counter() - t
        t = time.perf_counter()
        off = start + half
        while off < start + length:
            off += os.preadv(fd, [view], off) or (start + length - off)
        t_large = time.perf_counter() - t
        off = start  # the rest of the first half back into the cache, as it was
        while off < start + half:
            off += os.preadv(fd, [view[: min(len(view), start + half - off)]], off) or half
    finally:
        os.close(fd)
    rate = (length - half) / max(t_large, 1e-9)
    if rate > 4e9:  # as fast as memory: the pages were not dropped (tmpfs), or the disk is a cache itself
        return None
    call_s = max(t_small / n_small - small / rate, 0.0)
    return call_s, rate

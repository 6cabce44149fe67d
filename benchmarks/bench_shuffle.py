"""Side-by-side benchmark: annbatch's preshuffler vs annbatch-nb vs an I/O floor.

Every run is a fresh subprocess (its own peak RSS), writing a fresh output directory that is deleted
afterwards. Engines alternate within each repeat (rotating the order), under a cold page cache (dropped
before the run; needs root) and a warm one (inputs read just before the run).

Engines
-------
annbatch        annbatch 0.3.1 ``DatasetCollection(out).add_adatas(...)``, default configuration, in its own
                venv (``benchmarks/.venv-annbatch``, created when missing).
annbatch+zarrs  the same, with ``zarr.config.set({"codec_pipeline.path": "zarrs.ZarrsCodecPipeline"})``.
annbatch-nb     ``annbatch_nb.shuffle(..., seed=0, progress=False)`` in the project venv.
io-floor        reads every input's X fully (h5py / zarr-python) and writes the same arrays (float32 data,
                smallest unsigned indices, int64 indptr) as valid sharded zarr v3 Blosc-lz4 with the same
                chunk and shard sizes, encoded by a lean writer (inner chunks compressed on a thread pool,
                one file write per shard): the cost of the I/O alone, no shuffle, no obs.

Modes
-----
(default)               all four engines on h5ad and zarr inputs, cold and warm.
--scaling               annbatch-nb and io-floor on 1x, 2x, 4x cells per file (``--scale-factors``).
--chunk-sizes 100,1000  annbatch-nb with each ``shuffle_chunk_size``.

Wall time is the engine call inside the worker (imports and interpreter start excluded; process wall time is
in the JSON). Peak RSS is the worker's kernel high-water mark (``wait4`` ru_maxrss, which covers its
children), checked against a 50 ms psutil poll of the worker's process tree.

Smoke run (< 1 minute)::

    python benchmarks/bench_shuffle.py --files 4 --cells 5000 --genes 2000 --dataset-size 5000 --repeats 1 \
        --formats h5ad --cache warm
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
ANNBATCH_VENV = HERE / ".venv-annbatch"
ANNBATCH_REQUIREMENTS = ("annbatch==0.3.1", "zarrs")
ENGINES = ("annbatch", "annbatch+zarrs", "annbatch-nb", "io-floor")
ANNBATCH_ENGINES = ("annbatch", "annbatch+zarrs")
DROP_CACHES = Path("/proc/sys/vm/drop_caches")
MARKER = {"encoding-type": "annbatch-preshuffled", "encoding-version": "0.1.0"}
VERSION_PACKAGES = (
    "annbatch",
    "anndata",
    "zarr",
    "zarrs",
    "numcodecs",
    "numpy",
    "scipy",
    "h5py",
    "dask",
    "pandas",
)
#: Targets from the tracker issue (ratio columns are marked pass/FAIL against them).
TARGETS = {
    "nb/annbatch": 1 / 3,
    "nb/annbatch+zarrs": 1 / 2,
    "nb/io-floor": 1.5,
    "rss nb/annbatch": 0.5,
    "chunk 100 vs 1000": 1.3,
}


# ==================================================================================================
# Worker side: runs inside a fresh interpreter (project venv or annbatch venv); stdlib imports at top only.
# ==================================================================================================
def parse_size(value: int | str) -> int:
    """Bytes of a size like ``1GB`` (decimal) or ``1GiB`` (binary); an int is returned as is."""
    if isinstance(value, int):
        return value
    m = re.fullmatch(r"\s*([0-9.]+)\s*([kKmMgGtT]?)(i?)[bB]?\s*", value)
    if not m:
        raise ValueError(f"not a size: {value!r}")
    power = " kmgt".index(m.group(2).lower() or " ")
    return int(float(m.group(1)) * (1024 if m.group(3) else 1000) ** power)


def _run_annbatch(spec: dict[str, Any], zarrs: bool) -> dict[str, Any]:
    """annbatch's preshuffler with the benchmark's parameters."""
    import numpy as np
    import zarr

    if zarrs:
        zarr.config.set({"codec_pipeline.path": "zarrs.ZarrsCodecPipeline"})
    from annbatch import DatasetCollection

    p = spec["params"]
    t0 = time.perf_counter()
    DatasetCollection(spec["output"]).add_adatas(
        spec["inputs"],
        shuffle_chunk_size=p["shuffle_chunk_size"],
        dataset_size=p["dataset_size"],
        n_obs_per_chunk=p["n_obs_per_chunk"],
        shard_size=p["shard_size"],
        rng=np.random.default_rng(p["seed"]),
    )
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "codec_pipeline": zarr.config.get("codec_pipeline.path")}


def _run_nb(spec: dict[str, Any]) -> dict[str, Any]:
    """annbatch-nb with the benchmark's parameters."""
    import annbatch_nb

    p = spec["params"]
    t0 = time.perf_counter()
    res = annbatch_nb.shuffle(
        spec["inputs"],
        spec["output"],
        shuffle_chunk_size=p["shuffle_chunk_size"],
        dataset_size=p["dataset_size"],
        n_obs_per_chunk=p["n_obs_per_chunk"],
        shard_size=p["shard_size"],
        seed=p["seed"],
        progress=False,
    )
    seconds = time.perf_counter() - t0
    return {
        "seconds": seconds,
        "n_datasets": res.n_datasets,
        "dataset_seconds": list(res.dataset_seconds),
        "annbatch_nb_file": annbatch_nb.__file__,
    }


def _read_x(path: str) -> tuple[Any, Any, Any, int]:
    """Read an AnnData input's CSR X arrays fully: data, indices, indptr and the number of columns."""
    import h5py

    if h5py.is_hdf5(path):
        with h5py.File(path, "r") as f:
            g = f["X"]
            return g["data"][...], g["indices"][...], g["indptr"][...], int(g.attrs["shape"][1])
    import zarr

    g = zarr.open_group(path, mode="r")["X"]
    return g["data"][...], g["indices"][...], g["indptr"][...], int(g.attrs["shape"][1])


def _write_sharded(group: Any, name: str, arr: Any, chunk: int, shard: int, pool: Any) -> int:
    """Write a 1-D array as a valid sharded zarr v3 array (bytes + Blosc lz4 inner chunks, crc32c index).

    zarr-python creates the metadata; the shards are encoded here (inner chunks compressed on a thread pool,
    one file write per shard), which is what a lean writer costs. Returns the bytes written.
    """
    import google_crc32c
    import numcodecs
    import numpy as np
    from zarr.codecs import BloscCodec

    blosc = numcodecs.Blosc(cname="lz4", clevel=3, shuffle=numcodecs.Blosc.SHUFFLE, blocksize=0)
    compressors = BloscCodec(cname="lz4", clevel=3, shuffle="shuffle")
    group.create_array(
        name, shape=arr.shape, dtype=arr.dtype, chunks=(chunk,), shards=(shard,), compressors=compressors
    )
    directory = Path(group.store.root) / group.path / name / "c"
    directory.mkdir(parents=True, exist_ok=True)
    per_shard = shard // chunk
    written = 0

    def encode(piece: Any) -> bytes:
        if len(piece) < chunk:  # the last chunk is padded with the fill value, as zarr does
            piece = np.concatenate([piece, np.zeros(chunk - len(piece), dtype=piece.dtype)])
        return blosc.encode(np.ascontiguousarray(piece))

    for k, s0 in enumerate(range(0, len(arr), shard)):
        part = arr[s0 : s0 + shard]
        blobs = list(pool.map(encode, (part[i : i + chunk] for i in range(0, len(part), chunk))))
        index = np.full((per_shard, 2), np.iinfo(np.uint64).max, dtype="<u8")
        sizes = np.array([len(b) for b in blobs], dtype="<u8")
        index[: len(blobs), 1] = sizes
        index[: len(blobs), 0] = np.cumsum(sizes) - sizes
        index_bytes = index.tobytes()
        with open(directory / str(k), "wb") as fh:
            written += fh.write(
                b"".join([*blobs, index_bytes, google_crc32c.value(index_bytes).to_bytes(4, "little")])
            )
    return written


def _run_floor(spec: dict[str, Any]) -> dict[str, Any]:
    """Read every input's X, write the same arrays as sharded zarr v3 Blosc-lz4 (no shuffle, no obs)."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np
    import zarr

    p = spec["params"]
    shard_bytes = parse_size(p["shard_size"])
    read_s = write_s = 0.0
    written = 0
    t0 = time.perf_counter()
    root = zarr.open_group(spec["output"], mode="w", zarr_format=3)
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        for k, path in enumerate(spec["inputs"]):
            t = time.perf_counter()
            data, indices, indptr, n_var = _read_x(path)
            read_s += time.perf_counter() - t
            t = time.perf_counter()
            indices = indices.astype(np.min_scalar_type(max(n_var - 1, 0)), copy=False)
            n_rows = len(indptr) - 1
            chunk = max(1, int(p["n_obs_per_chunk"] * len(data) / max(n_rows, 1)))
            itemsize = max(data.dtype.itemsize, indices.dtype.itemsize)
            shard = max(1, shard_bytes // (chunk * itemsize)) * chunk
            shard = min(shard, max(chunk, -(-len(data) // chunk) * chunk))
            x = root.create_group(f"part_{k}").create_group("X")
            written += _write_sharded(x, "data", data, chunk, shard, pool)
            written += _write_sharded(x, "indices", indices, chunk, shard, pool)
            indptr = indptr.astype(np.int64, copy=False)
            written += _write_sharded(x, "indptr", indptr, len(indptr), len(indptr), pool)
            write_s += time.perf_counter() - t
            del data, indices, indptr
    return {
        "seconds": time.perf_counter() - t0,
        "read_seconds": read_s,
        "write_seconds": write_s,
        "bytes_written": written,
    }


def worker_main(spec_path: str) -> int:
    """Run one engine as described by the spec json; write the result json."""
    import resource

    t_start = time.perf_counter()
    spec = json.loads(Path(spec_path).read_text())
    engine = spec["engine"]
    result: dict[str, Any] = {"engine": engine, "ok": False}
    try:
        if engine == "annbatch":
            result.update(_run_annbatch(spec, zarrs=False))
        elif engine == "annbatch+zarrs":
            result.update(_run_annbatch(spec, zarrs=True))
        elif engine == "annbatch-nb":
            result.update(_run_nb(spec))
        elif engine == "io-floor":
            result.update(_run_floor(spec))
        else:
            raise ValueError(f"unknown engine {engine!r}")
        result["ok"] = True
    except BaseException as e:
        result["error"] = f"{type(e).__name__}: {e}"
        result["traceback"] = traceback.format_exc()
    result["worker_seconds"] = time.perf_counter() - t_start
    result["ru_maxrss_self"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    Path(spec["result"]).write_text(json.dumps(result))
    return 0 if result["ok"] else 1


# ==================================================================================================
# Orchestrator side
# ==================================================================================================
@dataclass
class Config:
    """One input data set + parameters to benchmark every engine on."""

    fmt: str
    scale: int
    shuffle_chunk_size: int
    inputs: list[str]
    n_obs: int
    nnz: int
    input_bytes: int

    @property
    def key(self) -> str:
        """Short label used in tables."""
        return f"{self.fmt} x{self.scale} chunk={self.shuffle_chunk_size}"


@dataclass
class Run:
    """One engine run (one subprocess)."""

    config: str
    engine: str
    cache: str
    repeat: int
    ok: bool = False
    seconds: float = float("nan")
    process_seconds: float = float("nan")
    peak_rss: int = 0
    tree_rss_polled: int = 0
    children_seen: int = 0
    cpu_seconds: float = float("nan")
    other_cpu_share: float = float("nan")
    noisy: bool = False
    output_bytes: int = 0
    output_n_obs: int | None = None
    output_datasets: int | None = None
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _python_ok(python: str) -> bool:
    try:
        out = subprocess.run(
            [python, "-c", "import sys; print(sys.version_info >= (3, 12))"], capture_output=True, text=True
        )
    except OSError:
        return False
    return out.stdout.strip() == "True"


def ensure_annbatch_venv(venv: Path = ANNBATCH_VENV) -> str:
    """Create annbatch's venv (Python >= 3.12, packages from the index) unless complete; return its python.

    Complete means the stamp file names the wanted packages; otherwise the venv is rebuilt from scratch
    (``venv --clear``), so an interrupted install never lingers.
    """
    python = venv / "bin" / "python"
    stamp = venv / ".bench-requirements"
    wanted = " ".join(ANNBATCH_REQUIREMENTS) + " psutil"
    if python.exists() and stamp.is_file() and stamp.read_text().strip() == wanted:
        return str(python)
    candidates = (shutil.which("python3.12"), shutil.which("python3"), sys.executable)
    base = next((c for c in candidates if c and _python_ok(c)), None)
    if base is None:
        raise SystemExit("annbatch needs Python >= 3.12 to create benchmarks/.venv-annbatch; none found")
    print(f"creating {venv} with {base} and installing {wanted} ...", file=sys.stderr)
    subprocess.run([base, "-m", "venv", "--clear", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--upgrade", "pip"], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", *wanted.split()], check=True)
    stamp.write_text(wanted + "\n")
    return str(python)


def package_versions(python: str) -> dict[str, str]:
    """Installed versions of the benchmark-relevant packages in an interpreter's environment."""
    code = (
        "import json, sys\nfrom importlib.metadata import version, PackageNotFoundError\nv = {}\n"
        f"for n in {[*list(VERSION_PACKAGES), 'annbatch-nb']!r}:\n"
        "    try:\n        v[n] = version(n)\n    except PackageNotFoundError:\n        pass\n"
        "v['python'] = sys.version.split()[0]\nprint(json.dumps(v))"
    )
    out = subprocess.run([python, "-c", code], capture_output=True, text=True)
    try:
        return json.loads(out.stdout)
    except ValueError:
        return {"error": out.stderr.strip()[-300:]}


def git_revision() -> str:
    """Short git revision of the repo, with ``+dirty`` when annbatch_nb/ has uncommitted changes."""
    try:
        rev = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--", "annbatch_nb"],
            capture_output=True,
            text=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return rev + ("+dirty" if dirty else "")


def source_digest(directory: Path) -> str:
    """Hash of the ``*.py`` files under ``directory`` (detects edits during a benchmark)."""
    import hashlib

    h = hashlib.sha256()
    for f in sorted(directory.rglob("*.py")):
        h.update(str(f.relative_to(directory)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:12]


def export_revision(rev: str, workdir: Path) -> tuple[Path, str]:
    """Extract ``annbatch_nb/`` at git revision ``rev`` into ``workdir`` (git archive; repo untouched).

    Returns the directory to put on ``PYTHONPATH`` and the full commit hash.
    """
    commit = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--verify", f"{rev}^{{commit}}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    dest = workdir / f"annbatch_nb-{commit[:12]}"
    if not (dest / "annbatch_nb" / "__init__.py").is_file():
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir(parents=True)
        archive = subprocess.run(
            ["git", "-C", str(REPO), "archive", "--format=tar", commit, "annbatch_nb"],
            capture_output=True,
            check=True,
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest, commit


def machine_info() -> dict[str, Any]:
    """CPU, core count, memory, kernel and Python of this machine."""
    info: dict[str, Any] = {
        "nproc": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "kernel": platform.release(),
        "platform": platform.platform(),
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                info["mem_gib"] = round(int(line.split()[1]) / 2**20, 1)
                break
    except OSError:
        pass
    return info


def can_drop_caches() -> bool:
    """Whether this process may drop the page cache (root, writable /proc/sys/vm/drop_caches)."""
    try:
        subprocess.run(["sync"], check=False)
        DROP_CACHES.write_text("3\n")
    except OSError:
        return False
    return True


def _iter_files(paths: Iterable[str]) -> Iterable[Path]:
    for p in map(Path, paths):
        if p.is_dir():
            for root, _, names in os.walk(p):
                for n in names:
                    yield Path(root) / n
        else:
            yield p


def prepare_cache(mode: str, inputs: Sequence[str]) -> None:
    """Flush dirty pages, then drop the page cache (cold) or read every input file once (warm)."""
    subprocess.run(["sync"], check=False)
    if mode == "cold":
        DROP_CACHES.write_text("3\n")
        return
    buf = bytearray(16 << 20)
    for f in _iter_files(inputs):
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass


def _tree_rss(procs: list[Any]) -> int:
    """Sum of RSS over psutil processes (vanished ones count 0)."""
    import psutil

    total = 0
    for p in procs:
        with contextlib.suppress(psutil.Error):
            total += p.memory_info().rss
    return total


#: A minimal launcher (``python -S -I -c``, ~10 MB): forks the worker and reports its ``wait4`` ru_maxrss.
#: Linux carries a process's RSS high-water mark across ``exec`` (and a vfork-spawned child records its
#: parent's), so a worker launched straight from this orchestrator would report the orchestrator's peak;
#: launched from this tiny process, at most ~10 MB of the launcher's pages can leak into the figure.
LAUNCHER = """
import os, sys
pid = os.fork()
if pid == 0:
    try:
        os.execv(sys.argv[2], sys.argv[2:])
    finally:
        os._exit(127)
_, status, ru = os.wait4(pid, 0)
code = os.waitstatus_to_exitcode(status)
with open(sys.argv[1], "w") as f:
    f.write("%d %d %f" % (code, ru.ru_maxrss * 1024, ru.ru_utime + ru.ru_stime))
sys.exit(code if code >= 0 else 1)
"""


def busy_cpu_seconds() -> float:
    """CPU seconds the whole machine has spent busy (all CPUs; /proc/stat), or nan off Linux."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return float("nan")
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def other_load(seconds: float = 2.0) -> float:
    """Share of all CPUs busy over ``seconds`` while this process sleeps (other processes' load)."""
    b0, t0 = busy_cpu_seconds(), time.perf_counter()
    time.sleep(seconds)
    return (busy_cpu_seconds() - b0) / ((time.perf_counter() - t0) * (os.cpu_count() or 1))


def wait_for_quiet(threshold: float, timeout: float) -> float:
    """Wait (up to ``timeout`` s) until other processes use less than ``threshold`` of the CPUs.

    Returns the last load measured. On a dedicated machine this returns after one 2 s sample.
    """
    t0 = time.perf_counter()
    load = other_load()
    announced = False
    while load >= threshold and time.perf_counter() - t0 < timeout:
        if not announced:
            print(f"    machine busy ({100 * load:.0f}% CPU used by others); waiting ...", file=sys.stderr)
            announced = True
        time.sleep(5)
        load = other_load()
    return load


@dataclass
class Spawned:
    """What :func:`spawn` measured."""

    code: int
    wall: float
    maxrss: int
    polled_rss: int
    children: int
    cpu_seconds: float
    other_cpu_share: float


def spawn(cmd: list[str], env: dict[str, str], log: Path, timeout: float) -> Spawned:
    """Run ``cmd`` via the launcher and measure it.

    ``maxrss`` is the worker's ``wait4`` high-water mark; ``cpu_seconds`` its user + system time;
    ``other_cpu_share`` the machine's busy CPU time during the run not spent by the worker, as a share of
    ``wall x CPUs``: other processes competing with the benchmark (a shared machine makes it noisy).

    The polled figure sums the RSS of the worker and its descendants every 50 ms (psutil; the process list is
    refreshed every second to keep the poller's own CPU use negligible).
    """
    try:
        import psutil
    except ImportError:
        psutil = None
    rss_file = log.with_name("maxrss.txt")
    busy0 = busy_cpu_seconds()
    t0 = time.perf_counter()
    with open(log, "wb") as fh:
        p = subprocess.Popen(
            [sys.executable, "-S", "-I", "-c", LAUNCHER, str(rss_file), *cmd],
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    launcher = psutil.Process(p.pid) if psutil is not None else None
    peak = children = 0
    procs: list[Any] = []
    listed = 0.0
    try:
        while p.poll() is None:
            if launcher is not None:
                now = time.perf_counter()
                if now - listed > 1.0:  # listing descendants scans /proc: do it rarely, RSS reads are cheap
                    with contextlib.suppress(psutil.Error):
                        procs = launcher.children(recursive=True)
                        children = max(children, len(procs) - 1)
                    listed = now
                peak = max(peak, _tree_rss(procs))
            if time.perf_counter() - t0 > timeout:
                os.killpg(p.pid, signal.SIGKILL)
            time.sleep(0.05)
    except BaseException:  # interrupted: take the worker down with us
        with contextlib.suppress(OSError):
            os.killpg(p.pid, signal.SIGKILL)
        raise
    wall = time.perf_counter() - t0
    busy = busy_cpu_seconds() - busy0
    try:
        code_text, rss_text, cpu_text = rss_file.read_text().split()
        code, maxrss, cpu = int(code_text), int(rss_text), float(cpu_text)
    except (OSError, ValueError):
        code, maxrss, cpu = p.returncode or -1, 0, float("nan")
    other = max(0.0, busy - cpu) / (wall * (os.cpu_count() or 1)) if wall > 0 else float("nan")
    return Spawned(code, wall, maxrss, peak, children, cpu, other)


def inspect_output(path: Path) -> tuple[int, int | None, int | None]:
    """Bytes on disk, total rows and dataset count of a collection (None when it is not committed)."""
    from make_data import disk_bytes

    nbytes = disk_bytes(path)
    try:
        attrs = json.loads((path / "zarr.json").read_text()).get("attributes", {})
    except (OSError, ValueError):
        return nbytes, None, None
    if any(attrs.get(k) != v for k, v in MARKER.items()):
        return nbytes, None, None
    n_obs = n_ds = 0
    for d in path.iterdir():
        if re.fullmatch(r"dataset_\d+", d.name):
            meta = json.loads((d / "X" / "zarr.json").read_text())
            shape = meta.get("attributes", {}).get("shape") or meta["shape"]  # CSR group, or dense array
            n_obs += int(shape[0])
            n_ds += 1
    return nbytes, n_obs, n_ds


def run_one(
    cfg: Config,
    engine: str,
    cache: str,
    repeat: int,
    args: argparse.Namespace,
    pythons: dict[str, str],
    tag: str,
) -> Run:
    """Run one engine once in a fresh subprocess and a fresh output directory; delete the output."""
    run = Run(config=cfg.key, engine=engine, cache=cache, repeat=repeat)
    run_dir = Path(args.workdir) / f"{tag}-{re.sub(r'[^a-z0-9]+', '_', engine)}"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    output = run_dir / "collection.zarr"
    spec = {
        "engine": engine,
        "inputs": cfg.inputs,
        "output": str(output),
        "result": str(run_dir / "result.json"),
        "params": {
            "shuffle_chunk_size": cfg.shuffle_chunk_size,
            "dataset_size": args.dataset_size,
            "n_obs_per_chunk": args.n_obs_per_chunk,
            "shard_size": args.shard_size,
            "seed": args.seed,
        },
    }
    (run_dir / "spec.json").write_text(json.dumps(spec))
    env = dict(os.environ, TQDM_DISABLE="1", PYTHONUNBUFFERED="1")
    env.pop("PYTHONPATH", None)
    env.pop("VIRTUAL_ENV", None)
    if engine not in ANNBATCH_ENGINES and args.nb_source:
        env["PYTHONPATH"] = args.nb_source
    python = pythons["annbatch"] if engine in ANNBATCH_ENGINES else pythons["nb"]
    prepare_cache(cache, cfg.inputs)
    sp = spawn(
        [python, str(Path(__file__).resolve()), "--worker", str(run_dir / "spec.json")],
        env,
        run_dir / "log.txt",
        args.timeout,
    )
    code = sp.code
    run.process_seconds, run.tree_rss_polled, run.children_seen = sp.wall, sp.polled_rss, sp.children
    run.peak_rss = max(sp.maxrss, sp.polled_rss) if sp.children else sp.maxrss
    run.cpu_seconds, run.other_cpu_share = sp.cpu_seconds, sp.other_cpu_share
    try:
        res = json.loads((run_dir / "result.json").read_text())
    except (OSError, ValueError):
        res = {"ok": False, "error": f"worker exited {code} without a result"}
    run.seconds = float(res.pop("seconds", float("nan")))
    run.ok = bool(res.pop("ok", False)) and code == 0
    run.error = res.pop("error", None)
    res.pop("engine", None)
    tb = res.pop("traceback", None)
    run.extra = res
    if output.exists():
        run.output_bytes, run.output_n_obs, run.output_datasets = inspect_output(output)
    if run.ok and engine != "io-floor" and run.output_n_obs != cfg.n_obs:
        run.ok = False
        run.error = f"output holds {run.output_n_obs} rows, expected {cfg.n_obs} (or is not committed)"
    if not run.ok:
        log_tail = (run_dir / "log.txt").read_text(errors="replace")[-3000:]
        run.extra["log_tail"] = (tb or "") + log_tail
        print(f"    FAILED: {run.error}\n{(tb or log_tail)[-1500:]}", file=sys.stderr)
    shutil.rmtree(run_dir, ignore_errors=True)
    subprocess.run(["sync"], check=False)
    return run


# --------------------------------------------------------------------------------------------------
# Summaries
# --------------------------------------------------------------------------------------------------
def _median(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def summarize(runs: list[Run]) -> list[dict[str, Any]]:
    """Median, min and max wall time and median peak RSS per (config, cache, engine).

    Runs flagged noisy (other processes busy during the run) are left out unless every run is noisy.
    """
    groups: dict[tuple[str, str, str], list[Run]] = {}
    for r in runs:
        groups.setdefault((r.config, r.cache, r.engine), []).append(r)
    rows = []
    for (config, cache, engine), rs in groups.items():
        ok = [r for r in rs if r.ok and not r.noisy] or [r for r in rs if r.ok]
        secs = [r.seconds for r in ok]
        rows.append(
            {
                "config": config,
                "cache": cache,
                "engine": engine,
                "runs": len(rs),
                "ok": len(ok),
                "noisy": sum(r.noisy for r in ok),
                "median_s": _median(secs),
                "min_s": min(secs, default=float("nan")),
                "max_s": max(secs, default=float("nan")),
                "median_process_s": _median([r.process_seconds for r in ok]),
                "median_peak_rss": _median([r.peak_rss for r in ok]),
                "median_output_bytes": _median([r.output_bytes for r in ok]),
                "max_other_cpu_share": max((r.other_cpu_share for r in ok), default=float("nan")),
            }
        )
    return rows


def _lookup(rows: list[dict[str, Any]], config: str, cache: str, engine: str, key: str) -> float:
    for r in rows:
        if (r["config"], r["cache"], r["engine"]) == (config, cache, engine):
            return float(r[key])
    return float("nan")


def _ratio(a: float, b: float) -> float:
    return a / b if b and b == b and a == a else float("nan")


def _mark(value: float, target: float) -> str:
    if value != value:
        return "–"
    return f"{value:.2f} {'pass' if value <= target else 'FAIL'}"


def ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """annbatch-nb vs the others, per (config, cache): time ratios of medians and the RSS ratio."""
    out = []
    for config, cache in dict.fromkeys((r["config"], r["cache"]) for r in rows):

        def med(engine: str, key: str = "median_s", c: str = config, k: str = cache) -> float:
            return _lookup(rows, c, k, engine, key)

        out.append(
            {
                "config": config,
                "cache": cache,
                "nb/annbatch": _ratio(med("annbatch-nb"), med("annbatch")),
                "nb/annbatch+zarrs": _ratio(med("annbatch-nb"), med("annbatch+zarrs")),
                "nb/io-floor": _ratio(med("annbatch-nb"), med("io-floor")),
                "rss nb/annbatch": _ratio(
                    med("annbatch-nb", "median_peak_rss"), med("annbatch", "median_peak_rss")
                ),
                "rss nb/annbatch+zarrs": _ratio(
                    med("annbatch-nb", "median_peak_rss"), med("annbatch+zarrs", "median_peak_rss")
                ),
            }
        )
    return out


def _gib(n: float) -> str:
    return "–" if n != n or not n else f"{n / 2**30:.2f}"


def _pct(x: float) -> str:
    return "–" if x != x else f"{100 * x:.0f}%"


def _mib(n: float) -> str:
    return "–" if n != n or not n else f"{n / 2**20:,.0f}"


def _s(x: float) -> str:
    return "–" if x != x else f"{x:.2f}"


def markdown_tables(meta: dict[str, Any], runs: list[Run], configs: list[Config]) -> str:
    """The results as markdown: runs table, ratio table, and the scaling / chunk-size tables of the mode."""
    rows = summarize(runs)
    lines = [
        "| inputs | cache | engine | used/runs | median s | min–max s | median peak RSS GiB | output MiB "
        "| other load (max) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['config']} | {r['cache']} | {r['engine']} | {r['ok']}/{r['runs']}"
            f"{' (noisy)' if r['noisy'] else ''} | {_s(r['median_s'])} "
            f"| {_s(r['min_s'])}–{_s(r['max_s'])} | {_gib(r['median_peak_rss'])} "
            f"| {_mib(r['median_output_bytes'])} | {_pct(r['max_other_cpu_share'])} |"
        )
    mode = meta["mode"]
    engines = {r["engine"] for r in rows}
    if mode == "compare" and "annbatch-nb" in engines and len(engines) > 1:
        lines += [
            "",
            "| inputs | cache | nb/annbatch (≤0.33) | nb/annbatch+zarrs (≤0.5) | nb/io-floor (≤1.5) "
            "| RSS nb/annbatch (≤0.5) | RSS nb/annbatch+zarrs |",
            "|---|---|---|---|---|---|---|",
        ]
        for q in ratios(rows):
            lines.append(
                f"| {q['config']} | {q['cache']} | {_mark(q['nb/annbatch'], TARGETS['nb/annbatch'])} "
                f"| {_mark(q['nb/annbatch+zarrs'], TARGETS['nb/annbatch+zarrs'])} "
                f"| {_mark(q['nb/io-floor'], TARGETS['nb/io-floor'])} "
                f"| {_mark(q['rss nb/annbatch'], TARGETS['rss nb/annbatch'])} "
                f"| {_s(q['rss nb/annbatch+zarrs'])} |"
            )
    if mode == "scaling":
        lines += [
            "",
            "| format | cache | scale | cells | nnz | annbatch-nb s | io-floor s | nb/io-floor "
            "| nb s per M cells | nb time / (scale × 1x time) |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for cache in meta["caches"]:
            for fmt in meta["formats"]:
                base = None
                for c in (c for c in configs if c.fmt == fmt):
                    nb = _lookup(rows, c.key, cache, "annbatch-nb", "median_s")
                    fl = _lookup(rows, c.key, cache, "io-floor", "median_s")
                    base = (nb / c.scale) if base is None else base
                    lines.append(
                        f"| {fmt} | {cache} | {c.scale}x | {c.n_obs:,} | {c.nnz:,} | {_s(nb)} | {_s(fl)} "
                        f"| {_s(_ratio(nb, fl))} | {_s(nb / c.n_obs * 1e6)} "
                        f"| {_s(_ratio(nb, base * c.scale))} |"
                    )
    if mode == "chunk-sizes":
        lines += [
            "",
            "| format | cache | engine | shuffle_chunk_size | median s | vs largest chunk size (≤1.3) |",
            "|---|---|---|---|---|---|",
        ]
        for cache in meta["caches"]:
            for fmt in meta["formats"]:
                cs = sorted((c for c in configs if c.fmt == fmt), key=lambda c: -c.shuffle_chunk_size)
                for engine in sorted(engines):
                    ref = _lookup(rows, cs[0].key, cache, engine, "median_s")
                    for c in cs:
                        v = _lookup(rows, c.key, cache, engine, "median_s")
                        lines.append(
                            f"| {fmt} | {cache} | {engine} | {c.shuffle_chunk_size} | {_s(v)} "
                            f"| {_mark(_ratio(v, ref), TARGETS['chunk 100 vs 1000'])} |"
                        )
    return "\n".join(lines)


def header_markdown(meta: dict[str, Any]) -> str:
    """One paragraph naming the date, machine, versions and parameters of a benchmark run."""
    m, v = meta["machine"], meta["versions"]
    nb, ab = v.get("nb", {}), v.get("annbatch", {})
    p = meta["params"]
    parts = [
        f"Date {meta['date']}; {m.get('cpu', '?')}, {m.get('nproc')} CPUs, {m.get('mem_gib')} GiB RAM, "
        f"Linux {m.get('kernel')}.",
        f"annbatch-nb {meta['git_revision']} (anndata {nb.get('anndata')}, zarr {nb.get('zarr')}, "
        f"numpy {nb.get('numpy')}, python {nb.get('python')})",
    ]
    if ab:
        parts.append(
            f"annbatch {ab.get('annbatch')} (anndata {ab.get('anndata')}, zarr {ab.get('zarr')}, "
            f"zarrs {ab.get('zarrs')}, dask {ab.get('dask')}, numpy {ab.get('numpy')})."
        )
    parts.append(
        f"Data: {p['files']} files × {p['cells']:,} cells, {p['genes']:,} genes "
        f"({p['gene_fraction']:.0%} per file), density {p['density']}; "
        f"dataset_size={p['dataset_size']} rows, n_obs_per_chunk={p['n_obs_per_chunk']}, "
        f"shard_size={p['shard_size']}, seed={p['seed']}; {p['repeats']} repeats."
    )
    return " ".join(parts)


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------
def _csv(kind: type) -> Any:
    def parse(text: str) -> list[Any]:
        return [kind(x) for x in text.split(",") if x.strip()]

    return parse


def build_parser() -> argparse.ArgumentParser:
    """Command line flags."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", metavar="SPEC", help=argparse.SUPPRESS)
    ap.add_argument("--report", type=Path, metavar="JSON", help="print the tables of a saved results file")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument(
        "--scaling", action="store_true", help="1x/2x/4x cells per file: annbatch-nb and io-floor"
    )
    mode.add_argument(
        "--chunk-sizes", type=_csv(int), metavar="N,M", help="shuffle_chunk_size values to compare"
    )
    ap.add_argument(
        "--engines", type=_csv(str), help=f"comma list of {', '.join(ENGINES)} (default per mode)"
    )
    ap.add_argument(
        "--formats", type=_csv(str), default=["h5ad", "zarr"], help="input formats (default h5ad,zarr)"
    )
    ap.add_argument(
        "--cache", type=_csv(str), default=["cold", "warm"], help="cache modes (default cold,warm)"
    )
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--files", type=int, default=8)
    ap.add_argument("--cells", type=int, default=50_000, help="cells per file (1x)")
    ap.add_argument("--genes", type=int, default=20_000)
    ap.add_argument("--density", type=float, default=0.02)
    ap.add_argument("--gene-fraction", type=float, default=0.9)
    ap.add_argument(
        "--scale-factors", type=_csv(int), default=[1, 2, 4], help="for --scaling (default 1,2,4)"
    )
    ap.add_argument("--shuffle-chunk-size", type=int, default=1000)
    ap.add_argument("--dataset-size", type=int, default=100_000, help="rows per output dataset")
    ap.add_argument("--n-obs-per-chunk", type=int, default=64)
    ap.add_argument("--shard-size", default="1GB")
    ap.add_argument("--seed", type=int, default=0, help="data and shuffle seed")
    ap.add_argument("--data-dir", default=str(HERE / "data"), help="where generated inputs are cached")
    ap.add_argument("--workdir", default=str(HERE / "scratch"), help="where run outputs go (deleted after)")
    ap.add_argument("--results", default=str(HERE / "results"), help="where result json is written")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per run before it is killed")
    ap.add_argument(
        "--max-other-load",
        type=float,
        default=0.25,
        help="share of all CPUs other processes may use; busier runs are noisy (default 0.25; 1 = ignore)",
    )
    ap.add_argument(
        "--quiet-timeout", type=float, default=300, help="max seconds to wait for a quiet machine"
    )
    ap.add_argument("--retries", type=int, default=2, help="re-runs of a noisy run (default 2)")
    ap.add_argument("--nb-python", default=None, help="python of annbatch-nb (default .venv/bin/python)")
    ap.add_argument(
        "--nb-rev",
        default=None,
        help="benchmark annbatch_nb/ as committed at this git revision (e.g. HEAD), not the working tree",
    )
    return ap


def report(path: Path) -> int:
    """Print the header and tables of a results json written by an earlier run."""
    saved = json.loads(path.read_text())
    meta = saved["meta"]
    runs = [Run(**{k: v for k, v in r.items() if k in Run.__dataclass_fields__}) for r in saved["runs"]]
    configs = [Config(**c) for c in meta["configs"]]
    print(header_markdown(meta))
    print()
    print(markdown_tables(meta, runs, configs))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark described by the flags; print and save the results."""
    args = build_parser().parse_args(argv)
    if args.worker:
        return worker_main(args.worker)
    if args.report:
        return report(args.report)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so a killed benchmark kills its worker
    sys.path.insert(0, str(HERE))
    from make_data import dataset_dir_name, dataset_summary, make_dataset

    mode = "scaling" if args.scaling else "chunk-sizes" if args.chunk_sizes else "compare"
    default_engines = {
        "compare": list(ENGINES),
        "scaling": ["annbatch-nb", "io-floor"],
        "chunk-sizes": ["annbatch-nb"],
    }[mode]
    engines = args.engines or default_engines
    if unknown := set(engines) - set(ENGINES) or set(args.formats) - {"h5ad", "zarr"}:
        raise SystemExit(f"unknown engine or format: {sorted(unknown)}")
    caches = list(args.cache)
    if "cold" in caches and not can_drop_caches():
        print("cannot drop the page cache (needs root): warm only", file=sys.stderr)
        caches = [c for c in caches if c != "cold"] or ["warm"]

    nb_python = args.nb_python or str(REPO / ".venv" / "bin" / "python")
    if not Path(nb_python).exists():
        nb_python = sys.executable
    pythons = {"nb": nb_python}
    args.nb_source = None
    nb_commit = None
    if args.nb_rev:
        snapshot, nb_commit = export_revision(args.nb_rev, Path(args.workdir))
        args.nb_source = str(snapshot)
    nb_dir = Path(args.nb_source) / "annbatch_nb" if args.nb_source else REPO / "annbatch_nb"
    digest = source_digest(nb_dir)
    if set(engines) & set(ANNBATCH_ENGINES):
        pythons["annbatch"] = ensure_annbatch_venv()

    scales = args.scale_factors if mode == "scaling" else [1]
    chunks = args.chunk_sizes if mode == "chunk-sizes" else [args.shuffle_chunk_size]
    configs: list[Config] = []
    for fmt in args.formats:
        for scale in scales:
            cells = args.cells * scale
            name = dataset_dir_name(cells, args.genes, args.density, fmt, args.seed, args.gene_fraction)
            print(f"data: {args.files} x {cells:,} cells ({fmt}) ...", file=sys.stderr)
            paths = make_dataset(
                Path(args.data_dir) / name,
                files=args.files,
                cells=cells,
                genes=args.genes,
                density=args.density,
                fmt=fmt,
                seed=args.seed,
                gene_fraction=args.gene_fraction,
            )
            s = dataset_summary(paths)
            for chunk in chunks:
                configs.append(
                    Config(fmt, scale, chunk, [str(p) for p in paths], s["n_obs"], s["nnz"], s["bytes"])
                )

    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    Path(args.results).mkdir(parents=True, exist_ok=True)
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    versions = {k: package_versions(p) for k, p in pythons.items()}
    meta = {
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "mode": mode,
        "engines": engines,
        "formats": args.formats,
        "caches": caches,
        "git_revision": nb_commit[:7] if nb_commit else git_revision(),
        "annbatch_nb_source": str(nb_dir),
        "annbatch_nb_digest": digest,
        "machine": machine_info(),
        "versions": versions,
        "params": {
            "files": args.files,
            "cells": args.cells,
            "genes": args.genes,
            "density": args.density,
            "gene_fraction": args.gene_fraction,
            "dataset_size": args.dataset_size,
            "n_obs_per_chunk": args.n_obs_per_chunk,
            "shard_size": args.shard_size,
            "shuffle_chunk_size": args.shuffle_chunk_size,
            "chunk_sizes": args.chunk_sizes,
            "scale_factors": scales,
            "seed": args.seed,
            "repeats": args.repeats,
            "max_other_load": args.max_other_load,
            "retries": args.retries,
        },
        "configs": [asdict(c) for c in configs],
        "argv": sys.argv[1:] if argv is None else argv,
    }
    out_json = Path(args.results) / f"{stamp}-{mode}.json"
    runs: list[Run] = []
    total = len(configs) * args.repeats * len(caches) * len(engines)
    i = 0
    t_all = time.perf_counter()
    # Every repeat visits every configuration, cache mode and engine, so slow drifts of the machine hit all
    # of them alike; the engine order rotates from one repeat to the next.
    for rep in range(args.repeats):
        for cfg in configs:
            for cache in caches:
                order = engines[rep % len(engines) :] + engines[: rep % len(engines)]
                for engine in order:
                    i += 1
                    tag = f"{stamp}-{i:03d}"
                    print(f"[{i}/{total}] {cfg.key} {cache} {engine} (repeat {rep + 1}) ...", file=sys.stderr)
                    for attempt in range(args.retries + 1):
                        if args.max_other_load < 1:
                            wait_for_quiet(args.max_other_load, args.quiet_timeout)
                        run = run_one(cfg, engine, cache, rep, args, pythons, f"{tag}-{attempt}")
                        run.noisy = run.other_cpu_share > args.max_other_load
                        runs.append(run)
                        print(
                            f"    {run.seconds:.2f} s (process {run.process_seconds:.1f} s), "
                            f"peak RSS {run.peak_rss / 2**30:.2f} GiB, other load {_pct(run.other_cpu_share)}"
                            f"{' -> noisy' if run.noisy else ''}",
                            file=sys.stderr,
                        )
                        if not run.noisy or not run.ok:
                            break
                    meta["elapsed_s"] = time.perf_counter() - t_all
                    result = {"meta": meta, "runs": [asdict(r) for r in runs], "summary": summarize(runs)}
                    out_json.write_text(json.dumps(result, indent=1, default=str))
    meta["annbatch_nb_changed_during_run"] = source_digest(nb_dir) != digest
    if meta["annbatch_nb_changed_during_run"]:
        print(
            f"WARNING: {nb_dir} changed during the benchmark; use --nb-rev to pin a revision", file=sys.stderr
        )
    result = {
        "meta": meta,
        "runs": [asdict(r) for r in runs],
        "summary": summarize(runs),
        "ratios": ratios(summarize(runs)),
    }
    out_json.write_text(json.dumps(result, indent=1, default=str))
    print()
    print(header_markdown(meta))
    print()
    print(markdown_tables(meta, runs, configs))
    print(f"\nresults: {out_json}  ({time.perf_counter() - t_all:.0f} s)")
    return 0 if all(r.ok for r in runs) else 1


if __name__ == "__main__":
    raise SystemExit(main())

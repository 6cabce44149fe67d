"""A local S3 API for tests and benchmarks: moto's server on 127.0.0.1, in a child process.

Needs the test extra (``pip install 'annbatch-nb[test]'``, which brings ``moto[server]``). Nothing here talks
to any address but the loopback one it binds.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

__all__ = ["MotoServer", "moto_server", "s3_env", "upload"]


@dataclass
class MotoServer:
    """A running moto S3 server.

    Attributes
    ----------
    endpoint
        ``http://127.0.0.1:<port>``.
    process
        The server process.
    """

    endpoint: str
    process: subprocess.Popen[bytes]

    def env(self) -> dict[str, str]:
        """Environment variables that point obstore (and boto3) at this server with dummy credentials."""
        return s3_env(self.endpoint)

    def create_bucket(self, name: str) -> None:
        """Create a bucket (an empty ``PUT /<name>``; moto does not check signatures)."""
        req = urllib.request.Request(f"{self.endpoint}/{name}", method="PUT", data=b"")
        with urllib.request.urlopen(req, timeout=10) as resp:
            resp.read()

    def stop(self) -> None:
        """Stop the server process."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:  # pragma: no cover - moto ignores SIGTERM
                self.process.kill()
                self.process.wait()


def s3_env(endpoint: str) -> dict[str, str]:
    """Environment for an S3-compatible endpoint with dummy credentials (as obstore reads it)."""
    return {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_REGION": "us-east-1",
        "AWS_ALLOW_HTTP": "true",
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def moto_server(timeout: float = 30.0) -> Iterator[MotoServer]:
    """Start ``moto_server`` on a free port of 127.0.0.1; stop it on exit.

    Parameters
    ----------
    timeout
        Seconds to wait for the server to answer.

    Yields
    ------
    MotoServer
        The running server.
    """
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={k: v for k, v in os.environ.items() if not k.startswith("AWS_")},
    )
    server = MotoServer(f"http://127.0.0.1:{port}", proc)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"{server.endpoint}/moto-api/", timeout=2) as resp:
                    resp.read()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto_server did not start on port {port}") from None
                time.sleep(0.05)
        yield server
    finally:
        server.stop()


def upload(local: str | os.PathLike[str], url: str) -> None:
    """Copy a local file or directory tree to ``s3://bucket/key`` (credentials from the environment)."""
    import obstore

    from .errors import InputError
    from .stores import object_store, parse_url

    target = parse_url(url, InputError)
    store = object_store(target, InputError, prefix=True)
    local = os.fspath(local)
    if os.path.isdir(local):
        for dirpath, _, files in os.walk(local):
            for f in files:
                path = os.path.join(dirpath, f)
                with open(path, "rb") as fh:
                    obstore.put(store, os.path.relpath(path, local).replace(os.sep, "/"), fh.read())
        return
    bucket = object_store(parse_url(f"s3://{target.bucket}", InputError), InputError)
    with open(local, "rb") as fh:
        obstore.put(bucket, target.key, fh.read())

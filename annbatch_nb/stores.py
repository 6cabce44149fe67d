"""Object-store locations (``s3://bucket/key``): parsing, connecting, listing, one-line errors.

Credentials and endpoints come from the environment, as obstore reads them: ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY`` (and ``AWS_SESSION_TOKEN``), ``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT``,
``AWS_REGION``, ``AWS_ALLOW_HTTP``; ``AWS_SKIP_SIGNATURE=true`` reads public buckets without credentials.

A URL without credentials in the environment is refused before any request is made (obstore would otherwise
ask the cloud's instance-metadata service, which only exists on cloud machines). Requests are retried a few
times with short timeouts, so an unreachable endpoint fails in seconds, not minutes.
"""

from __future__ import annotations

import datetime as _dt
import fnmatch
import functools
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .errors import AnnbatchNBError

__all__ = [
    "S3URL",
    "describe_store_error",
    "is_url",
    "list_keys",
    "object_store",
    "parse_url",
    "store_env",
    "zarr_store",
]

_SCHEMES = ("s3://",)
_CREDENTIAL_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
_SKIP_SIGNATURE = "AWS_SKIP_SIGNATURE"


def is_url(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` names an object-store location (``s3://...``) rather than a local path."""
    return isinstance(path, str) and path.startswith(_SCHEMES)


@dataclass(frozen=True)
class S3URL:
    """A parsed ``s3://bucket/key`` location.

    Attributes
    ----------
    bucket
        Bucket name.
    key
        Key (or key prefix) inside the bucket, without leading or trailing ``/``; may be empty.
    """

    bucket: str
    key: str

    @property
    def url(self) -> str:
        """The normalised URL."""
        return f"s3://{self.bucket}/{self.key}" if self.key else f"s3://{self.bucket}"

    @property
    def name(self) -> str:
        """Last component of the key (like a file name)."""
        return self.key.rsplit("/", 1)[-1]

    def child(self, name: str) -> S3URL:
        """The location ``name`` below this one."""
        return S3URL(self.bucket, f"{self.key}/{name}".strip("/"))

    def inside(self, other: S3URL) -> bool:
        """Whether this location is ``other`` or below it."""
        return self.bucket == other.bucket and (
            not other.key or self.key == other.key or self.key.startswith(other.key + "/")
        )

    def __str__(self) -> str:
        return self.url


def parse_url(url: str, error: Callable[[str, str], AnnbatchNBError]) -> S3URL:
    """Parse ``s3://bucket/key``.

    Parameters
    ----------
    url
        The URL.
    error
        ``InputError`` or ``OutputError`` (called with the URL and the problem) for a malformed URL.

    Returns
    -------
    S3URL
        Bucket and key.
    """
    if not url.startswith("s3://"):
        raise error(url, "only s3:// URLs are supported for object stores")
    rest = url[len("s3://") :]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise error(url, "has no bucket name (expected s3://bucket/key)")
    return S3URL(bucket, key.strip("/"))


def check_credentials(url: str, error: Callable[[str, str], AnnbatchNBError]) -> None:
    """Refuse a URL when the environment has no credentials (and unsigned access is not requested).

    Raises
    ------
    InputError or OutputError
        Whatever ``error`` makes, naming the URL and the variables to set.
    """
    if os.environ.get(_SKIP_SIGNATURE, "").lower() in ("1", "true", "yes"):
        return
    missing = [v for v in _CREDENTIAL_VARS if not os.environ.get(v)]
    if missing:
        raise error(
            url,
            f"no credentials for the object store: set {' and '.join(missing)} (and AWS_ENDPOINT_URL, "
            f"AWS_REGION as needed), or {_SKIP_SIGNATURE}=true for a public bucket",
        )


def store_env() -> dict[str, str]:
    """The object-store settings of this process's environment (``AWS_*``), to hand to worker processes.

    A forkserver's workers inherit the environment the forkserver started with, not the parent's current one.
    """
    return {k: v for k, v in os.environ.items() if k.startswith("AWS_")}


def _endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT")


@functools.lru_cache(maxsize=64)
def _s3_store(bucket: str, prefix: str, env_key: tuple[str | None, ...]) -> Any:
    from obstore.store import S3Store

    kwargs: dict[str, Any] = {}
    endpoint = _endpoint()
    if endpoint:
        kwargs["endpoint"] = endpoint
        if endpoint.startswith("http://"):
            kwargs["allow_http"] = True
    if not os.environ.get("AWS_REGION") and not os.environ.get("AWS_DEFAULT_REGION"):
        kwargs["region"] = "us-east-1"
    return S3Store(
        bucket,
        prefix=prefix or None,
        client_options={"connect_timeout": "5s", "timeout": "300s"},
        retry_config={
            "max_retries": 3,
            "backoff": {
                "init_backoff": _dt.timedelta(milliseconds=100),
                "max_backoff": _dt.timedelta(seconds=2),
            },
            "retry_timeout": _dt.timedelta(seconds=20),
        },
        **kwargs,
    )


def object_store(url: S3URL, error: Callable[[str, str], AnnbatchNBError], *, prefix: bool = False) -> Any:
    """An obstore ``S3Store`` for ``url``'s bucket, configured from the environment.

    Parameters
    ----------
    url
        The location.
    error
        ``InputError`` or ``OutputError`` for missing credentials.
    prefix
        Root the store at ``url.key`` (keys are then relative to it); otherwise at the bucket.

    Returns
    -------
    obstore.store.S3Store
        The store (cached per bucket, prefix and environment).
    """
    check_credentials(url.url, error)
    env_key = tuple(
        os.environ.get(v)
        for v in (
            *_CREDENTIAL_VARS,
            "AWS_SESSION_TOKEN",
            "AWS_ENDPOINT_URL",
            "AWS_ENDPOINT",
            "AWS_REGION",
            "AWS_ALLOW_HTTP",
            _SKIP_SIGNATURE,
        )
    )
    return _s3_store(url.bucket, url.key if prefix else "", env_key)


def zarr_store(url: S3URL, error: Callable[[str, str], AnnbatchNBError], *, read_only: bool) -> Any:
    """A zarr ``ObjectStore`` rooted at ``url`` (the zarr group lives at the store's root)."""
    from zarr.storage import ObjectStore

    return ObjectStore(object_store(url, error, prefix=True), read_only=read_only)


def describe_store_error(e: BaseException) -> str:
    """One short line for an obstore/zarr error (no Rust debug dump)."""
    text = str(e).strip()
    first = text.splitlines()[0] if text else type(e).__name__
    for marker in (" - Server returned", " - HTTP error", " - error sending request"):
        head, sep, tail = first.partition(marker)
        if sep:
            reason = tail.strip(" :-") or marker.strip(" -")
            first = f"{head.split(' in ')[0]}: {reason}"
            break
    if len(first) > 240:
        first = first[:237] + "..."
    return first


def is_not_found(e: BaseException) -> bool:
    """Whether an obstore error means the object (or bucket) does not exist."""
    return isinstance(e, FileNotFoundError) or type(e).__name__ == "NotFoundError"


def list_keys(store: Any, prefix: str = "") -> list[dict[str, Any]]:
    """Every object below ``prefix`` in ``store`` (path, size, last_modified), recursively."""
    import obstore

    out: list[dict[str, Any]] = []
    for batch in obstore.list(store, prefix=prefix or None, chunk_size=1000):
        out.extend(batch)
    return out


def list_children(store: Any, prefix: str) -> tuple[list[str], list[dict[str, Any]]]:
    """Immediate children of ``prefix``: sub-prefix names and objects (one level, with a delimiter)."""
    import obstore

    result = obstore.list_with_delimiter(store, prefix=prefix or None)
    dirs = [p.rstrip("/").rsplit("/", 1)[-1] for p in result["common_prefixes"]]
    return dirs, list(result["objects"])


def glob_keys(store: Any, pattern: str) -> list[str]:
    """Keys and key prefixes (one per ``/``-level) of ``store`` matching a glob ``pattern``."""
    parts = pattern.split("/")
    first_glob = next(i for i, p in enumerate(parts) if set(p) & set("*?["))
    base = "/".join(parts[:first_glob])
    depth = len(parts)
    found: set[str] = set()
    for obj in list_keys(store, base):
        comps = str(obj["path"]).split("/")
        if len(comps) >= depth:
            cand = "/".join(comps[:depth])
            if fnmatch.fnmatchcase(cand, pattern):
                found.add(cand)
    return sorted(found)


def _write_errors() -> tuple[type[BaseException], ...]:
    try:
        from obstore.exceptions import BaseError
    except ImportError:  # pragma: no cover - obstore is a dependency
        return (OSError,)
    return (OSError, BaseError)


#: Exceptions a failed write raises: OSError for local files, obstore's errors on an object store.
WRITE_ERRORS = _write_errors()

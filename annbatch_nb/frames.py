"""Writing a dataset's obs, var and empty AnnData elements with one pass of zarr calls.

anndata's ``write_elem`` makes some sixty zarr calls for a small obs frame (create each group and array, set
its attributes, write its data), and each call waits for zarr's event-loop thread: 60-80 ms per dataset even
into a memory store, and twice that while the dataset's X is compressed on other threads. That was most of a
dataset's fixed cost.

Here the frame is first turned into the nodes anndata would write (:func:`encode_frame`: groups with their
attributes, 1-D arrays with their values), and all of them are then created with anndata's arguments and
filled concurrently, in one call into zarr's event loop. The store is the one anndata writes (the tests
compare them key by key). Column types outside what the engine produces are left to anndata itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import warnings
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anndata as ad
import numpy as np
import pandas as pd
import zarr
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import MemoryStore

if TYPE_CHECKING:
    from .plan import Plan

__all__ = ["encode_frame", "write_frames"]

#: zarr writes in flight at once when writing a dataset's frames.
_CONCURRENCY = 32


async def _copy_keys(src: Any, dst: Any, prefix: str, keys: list[str], limit: asyncio.Semaphore) -> None:
    async def one(key: str) -> None:
        async with limit:
            buf = await src.get(key, prototype=default_buffer_prototype())
            if buf is not None:
                await dst.set(f"{prefix}/{key}" if prefix else key, buf)

    await asyncio.gather(*(one(k) for k in keys))


async def _keys(store: Any, *, skip_root: bool) -> list[str]:
    keys = [k async for k in store.list()]
    return [k for k in keys if not (skip_root and k == "zarr.json")]


# --------------------------------------------------------------------------------------------------
# Encoding a frame as anndata does, as a list of nodes
# --------------------------------------------------------------------------------------------------
def _spec(encoding: str, version: str) -> dict[str, str]:
    return {"encoding-type": encoding, "encoding-version": version}


@dataclass(frozen=True)
class _Node:
    """One zarr node of an encoded element: a group (``values`` is ``None``) or a 1-D array."""

    key: str
    attributes: dict[str, Any]
    values: np.ndarray | None = None
    strings: bool = False  # a variable-length string array (anndata creates those with other arguments)


def _array(key: str, v: Any) -> list[_Node] | None:
    """Anndata's ``write_basic`` (numbers, booleans) and ``write_vlen_string_array_zarr`` (strings)."""
    if not isinstance(v, np.ndarray) or v.ndim != 1:
        return None
    if v.dtype.kind in "biuf":
        return [_Node(key, _spec("array", "0.2.0"), v)]
    if v.dtype.kind in "OU":
        return [_Node(key, _spec("string-array", "0.2.0"), v, strings=True)]
    return None


def _element(key: str, v: Any) -> list[_Node] | None:
    """The nodes anndata 0.13's ``write_elem`` writes for a column's or an index's ``_values``.

    Mirrors ``write_categorical``, ``write_nullable`` and the array writers, attributes in anndata's order;
    ``None`` for any other type (that frame is then written by anndata itself).
    """
    if isinstance(v, pd.Categorical):
        codes = _array(f"{key}/codes", v.codes)
        categories = _array(f"{key}/categories", v.categories.to_numpy())
        if codes is None or categories is None:
            return None
        return [
            _Node(key, {"ordered": bool(v.ordered), **_spec("categorical", "0.2.0")}),
            *codes,
            *categories,
        ]
    if isinstance(v, pd.arrays.IntegerArray | pd.arrays.BooleanArray):
        kind = "nullable-integer" if isinstance(v, pd.arrays.IntegerArray) else "nullable-boolean"
        values = _array(f"{key}/values", v.to_numpy(na_value=0, dtype=v.dtype.numpy_dtype))
        mask = _array(f"{key}/mask", np.asarray(v.isna()))
        if values is None or mask is None:
            return None
        return [_Node(key, _spec(kind, "0.1.0")), *values, *mask]
    if isinstance(v, pd.arrays.StringArray | pd.arrays.ArrowStringArray):
        allowed = ad.settings.allow_write_nullable_strings
        if allowed is False or (allowed is None and not pd.options.future.infer_string):
            return None  # anndata writes these otherwise, or refuses them
        na = v.dtype.na_value
        if na is pd.NA:
            attrs = {"na-value": "NA"}
        elif isinstance(na, float) and np.isnan(na):
            attrs = {"na-value": "NaN"}
        else:
            return None
        values = _array(f"{key}/values", v.to_numpy(na_value=""))
        mask = _array(f"{key}/mask", np.asarray(v.isna()))
        if values is None or mask is None:
            return None
        return [_Node(key, {**attrs, **_spec("nullable-string-array", "0.1.0")}), *values, *mask]
    return _array(key, v)


def encode_frame(key: str, df: pd.DataFrame) -> list[_Node] | None:
    """The nodes of anndata's ``write_dataframe`` for ``df`` at ``key``, groups before their children.

    ``None`` when a column (or the index) is of a type this module does not encode, or the frame has a
    named index (anndata's rules for those are left to anndata).
    """
    if df.index.name is not None or not all(isinstance(c, str) and c and "/" not in c for c in df.columns):
        return None
    if "_index" in df.columns or not df.columns.is_unique:
        return None
    attrs = {"column-order": list(df.columns), "_index": "_index", **_spec("dataframe", "0.2.0")}
    nodes = [_Node(key, attrs)]
    for name, v in [("_index", df.index._values), *((c, df[c]._values) for c in df.columns)]:
        element = _element(f"{key}/{name}", v)
        if element is None:
            return None
        nodes.extend(element)
    return nodes


async def _write_nodes(store: Any, prefix: str, nodes: list[_Node], limit: asyncio.Semaphore) -> None:
    """Create ``nodes`` under ``prefix`` of ``store`` with anndata's arguments, and fill the arrays.

    Groups go first, parents before children: creating a node also writes an empty document for any parent
    group not there yet, and that must not race with the group's own document and its attributes.
    """
    from zarr.api.asynchronous import create_array, create_group
    from zarr.core.dtype import VariableLengthUTF8

    def where(key: str) -> str:
        return f"{prefix}/{key}" if prefix else key

    async def group(n: _Node) -> None:
        async with limit:
            await create_group(store=store, path=where(n.key), attributes=n.attributes, zarr_format=3)

    async def array(n: _Node) -> None:
        assert n.values is not None
        # anndata's create_array arguments: write_vlen_string_array_zarr for strings, write_basic otherwise
        kwargs: dict[str, Any] = (
            {"dtype": VariableLengthUTF8(), "filters": None, "fill_value": None}
            if n.strings
            else {"dtype": n.values.dtype}
        )
        async with limit:
            a = await create_array(
                store,
                name=where(n.key),
                shape=n.values.shape,
                shards="auto",
                attributes=n.attributes,
                zarr_format=3,
                **kwargs,
            )
            if n.values.size:
                await a.setitem(slice(None), n.values)

    groups = [n for n in nodes if n.values is None]
    for depth in sorted({n.key.count("/") for n in groups}):
        await asyncio.gather(*(group(n) for n in groups if n.key.count("/") == depth))
    await asyncio.gather(*(array(n) for n in nodes if n.values is not None))


def _shard_config() -> Any:
    """The shard size anndata sets for its ``shards="auto"`` arrays when none is (``zarr_v3_sharding``)."""
    if isinstance(zarr.config.get("array.target_shard_size_bytes", None), int):
        return contextlib.nullcontext()
    return zarr.config.set({"array.target_shard_size_bytes": 1_000_000_000})


@contextlib.contextmanager
def _as_anndata() -> Iterator[None]:
    """Anndata's settings around its array creation: its shard size, and no warning for automatic shards."""
    with _shard_config(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", r"Automatic shard shape inference is experimental")
        yield


# --------------------------------------------------------------------------------------------------
# Per plan: var and the empty elements, encoded once
# --------------------------------------------------------------------------------------------------
#: var and the empty elements of recent plans, encoded in memory stores (calibration's samples alternate
#: between three plans).
_CONSTANT_FRAMES: OrderedDict[str, Any] = OrderedDict()
_CONSTANT_FRAMES_KEPT = 4
_CONSTANT_FRAMES_LOCK = threading.Lock()

_EMPTY_ELEMENTS = ("uns", "obsm", "varm", "obsp", "varp", "layers")


def _constant_frames(plan: Plan) -> Any:
    """A memory store holding a dataset's var and empty ``uns``, ``obsm``, ... groups for ``plan``."""
    key = plan.fingerprint
    with _CONSTANT_FRAMES_LOCK:
        if key in _CONSTANT_FRAMES:
            _CONSTANT_FRAMES.move_to_end(key)
            return _CONSTANT_FRAMES[key]
    store = MemoryStore()
    var = pd.DataFrame(index=plan.var_names.copy())
    nodes = encode_frame("var", var)
    if nodes is None:
        group = zarr.open_group(store, mode="w", zarr_format=3)
        ad.io.write_elem(group, "var", var)
        nodes = []
    nodes += [_Node(name, _spec("dict", "0.1.0")) for name in _EMPTY_ELEMENTS]

    async def run() -> None:
        await _write_nodes(store, "", nodes, asyncio.Semaphore(_CONCURRENCY))

    with _as_anndata():
        sync(run())
    with _CONSTANT_FRAMES_LOCK:
        _CONSTANT_FRAMES[key] = store
        while len(_CONSTANT_FRAMES) > _CONSTANT_FRAMES_KEPT:
            _CONSTANT_FRAMES.popitem(last=False)
    return store


def write_frames(store: Any, prefix: str, plan: Plan, obs: pd.DataFrame) -> None:
    """Write ``obs``, var and the empty AnnData elements into the dataset group at ``prefix`` of ``store``.

    The nodes are those anndata's ``write_elem`` writes (the tests compare the two key by key), created in
    one pass on zarr's event loop; a frame with a column type :func:`encode_frame` does not cover is written
    by anndata into memory and copied.

    Parameters
    ----------
    store
        The output's zarr store.
    prefix
        The dataset group's path in ``store`` (the group exists).
    plan
        The plan (var, and the key of its cached encoding).
    obs
        The dataset's obs frame, in output order.
    """
    constant = _constant_frames(plan)
    nodes = encode_frame("obs", obs)
    staged = None
    if nodes is None:
        staging = zarr.open_group(MemoryStore(), mode="w", zarr_format=3)
        ad.io.write_elem(staging, "obs", obs)  # categories are written as they are, used or not
        staged = staging.store_path.store

    async def run() -> None:
        limit = asyncio.Semaphore(_CONCURRENCY)
        copies = [_copy_keys(constant, store, prefix, await _keys(constant, skip_root=True), limit)]
        if staged is not None:
            copies.append(_copy_keys(staged, store, prefix, await _keys(staged, skip_root=True), limit))
        await asyncio.gather(*copies, _write_nodes(store, prefix, nodes or [], limit))

    with _as_anndata():
        sync(run())

"""A virtualizarr ``ManifestStore`` that can be handed chunks fetched in advance.

zarr asks a store for one chunk at a time; on an object store that is one request per chunk, and the small
chunks h5py picks for compressed datasets (tens of KB) make that slow. ``PrefetchingManifestStore.prefetch``
fetches every chunk a read will need with obstore's ``get_ranges`` (adjacent chunks coalesced into one
request, up to ten requests in flight) and zarr's reads are then served from memory.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import numpy as np
from virtualizarr.manifests import ManifestStore
from virtualizarr.manifests.manifest import INLINED_CHUNK_PATH

__all__ = ["PrefetchingManifestStore"]


class PrefetchingManifestStore(ManifestStore):
    """A ``ManifestStore`` whose chunk reads are served from :meth:`prefetch`'s cache when present."""

    def __init__(self, group: Any, *, registry: Any = None) -> None:
        super().__init__(group, registry=registry)
        self.cache: dict[str, Any] = {}

    @classmethod
    def wrap(cls, store: ManifestStore) -> PrefetchingManifestStore:
        """The same manifest and registry, with a chunk cache."""
        return cls(store._group, registry=store._registry)

    def __str__(self) -> str:
        # ManifestStore's own __str__ prints the whole manifest, and zarr formats the store on every node
        # lookup: that cost grows with the file
        return f"PrefetchingManifestStore({len(self._group._members)} members)"

    __repr__ = __str__

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["cache"] = {}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    async def get(self, key: str, prototype: Any, byte_range: Any = None) -> Any:
        """A chunk from the prefetch cache, else from the file (see ``ManifestStore.get``)."""
        hit = self.cache.get(key)
        if hit is not None and byte_range is None:
            return prototype.buffer.from_bytes(hit)
        return await super().get(key, prototype, byte_range)

    def _manifest_array(self, path: str) -> Any:
        node: Any = self._group
        parts = path.strip("/").split("/")
        for part in parts[:-1]:
            node = node.groups[part]
        return node.arrays[parts[-1]]

    def prefetch(self, jobs: Sequence[tuple[Any, Sequence[tuple[int, int]]]]) -> int:
        """Fetch the chunks holding rows ``[lo, hi)`` (all columns) of each zarr array into the cache.

        Parameters
        ----------
        jobs
            ``(zarr array opened on this store, row ranges)`` pairs.

        Returns
        -------
        int
            Chunks fetched.
        """
        from zarr.core.sync import sync

        by_path: dict[str, list[tuple[str, int, int]]] = {}
        for arr, ranges in jobs:
            marr = self._manifest_array(str(arr.path))
            manifest = marr.manifest
            rows_per_chunk = int(arr.chunks[0])
            wanted: set[int] = set()
            for lo, hi in ranges:
                if hi > lo:
                    wanted.update(range(lo // rows_per_chunk, (hi - 1) // rows_per_chunk + 1))
            paths = np.asarray(manifest._paths)
            offsets = np.asarray(manifest._offsets)
            lengths = np.asarray(manifest._lengths)
            for k in sorted(wanted):
                for rest in np.ndindex(*paths.shape[1:]):
                    coords = (k, *rest)
                    path = str(paths[coords])
                    if path in ("", INLINED_CHUNK_PATH) or int(lengths[coords]) == 0:
                        continue
                    key = f"{arr.path}/{arr.metadata.encode_chunk_key(coords)}"
                    if key not in self.cache:
                        start = int(offsets[coords])
                        by_path.setdefault(path, []).append((key, start, start + int(lengths[coords])))

        async def fetch(url: str, items: list[tuple[str, int, int]]) -> None:
            import obstore

            store, _ = self._registry.resolve(url)
            in_store = _path_in_store(store, url)
            blobs = await obstore.get_ranges_async(
                store, in_store, starts=[s for _, s, _ in items], ends=[e for _, _, e in items]
            )
            for (key, _, _), blob in zip(items, blobs, strict=True):
                self.cache[key] = blob

        async def run() -> None:
            await asyncio.gather(*(fetch(url, items) for url, items in by_path.items()))

        if by_path:
            sync(run())
        return sum(len(v) for v in by_path.values())

    def clear(self) -> None:
        """Drop the prefetched chunks."""
        self.cache = {}


def _path_in_store(store: Any, url: str) -> str:
    """The key of ``url`` inside ``store`` (as ``ManifestStore.get`` computes it)."""
    from urllib.parse import urlparse

    path = urlparse(url).path
    if getattr(store, "prefix", None):
        prefix = str(store.prefix).lstrip("/")
    elif hasattr(store, "url"):
        prefix = urlparse(store.url).path.lstrip("/")
    else:
        prefix = ""
    return path.lstrip("/").removeprefix(prefix).lstrip("/")

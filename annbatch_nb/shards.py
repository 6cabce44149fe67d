"""Encode and store whole zarr v3 shards, one inner chunk at a time.

zarr-python writes a shard only from a fully materialised array region, which costs a copy of the whole
shard (by default 1 GB) on top of the data it was gathered from. The engine instead produces the inner
chunks of a shard one after another in output order; :class:`ShardBuilder` compresses each as it comes and
keeps only compressed bytes, and :class:`ShardedArray` stores the finished shard with a single ``set`` on the
array's zarr store (a local directory or, later, an object store).

Only the codec chain annbatch collections use is supported (and checked): ``sharding_indexed`` with inner
``bytes`` (little endian) + ``blosc``, index ``bytes`` + ``crc32c`` at the end. The arrays themselves are
created by zarr-python, so their metadata is canonical; zarr reads the shards written here like its own.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading

import google_crc32c
import numpy as np
import zarr
from numcodecs import Blosc
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, ShardingCodec
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import LocalStore

__all__ = ["ShardBuilder", "ShardedArray"]

_EMPTY = np.uint64(2**64 - 1)
_SHUFFLE = {"noshuffle": 0, "shuffle": 1, "bitshuffle": 2}


class ShardBuilder:
    """Accumulate the compressed inner chunks of one shard, in C order.

    Parameters
    ----------
    n_chunks
        Inner chunks per shard.
    compressor
        The numcodecs Blosc codec of the array.
    """

    def __init__(self, n_chunks: int, compressor: Blosc) -> None:
        self._compressor = compressor
        self._index = np.full((n_chunks, 2), _EMPTY, dtype="<u8")
        self._parts: list[bytes] = []
        self._offset = 0
        self._next = 0

    @property
    def n_added(self) -> int:
        """Inner chunks added so far (empty ones included)."""
        return self._next

    def add(self, chunk: np.ndarray | None) -> None:
        """Compress and append the next inner chunk; ``None`` marks it absent (read as the fill value)."""
        i = self._next
        if i >= len(self._index):
            raise IndexError("shard is full")
        self._next += 1
        if chunk is None:
            return
        self._append(i, self._compressor.encode(np.ascontiguousarray(chunk)))

    def add_encoded(self, encoded: bytes | None) -> None:
        """Append the next inner chunk, already compressed with the array's codec (``None``: absent)."""
        i = self._next
        if i >= len(self._index):
            raise IndexError("shard is full")
        self._next += 1
        if encoded is not None:
            self._append(i, encoded)

    def _append(self, i: int, encoded: bytes) -> None:
        n = len(encoded)
        self._index[i] = (self._offset, n)
        self._parts.append(encoded)
        self._offset += n

    def finish_parts(self) -> list[bytes]:
        """The shard's bytes as pieces to be stored one after another: chunks, then index and crc32c."""
        index = self._index.tobytes()
        crc = google_crc32c.value(index).to_bytes(4, "little")
        return [*self._parts, index + crc]

    def finish(self) -> bytes:
        """The shard's bytes: chunks, then the index and its crc32c."""
        return b"".join(self.finish_parts())


class ShardedArray:
    """Write whole shards of a zarr v3 array created with the annbatch codec chain.

    Parameters
    ----------
    array
        A sharded array created by zarr-python (``create_array(..., shards=...)``) with a Blosc compressor.

    Raises
    ------
    NotImplementedError
        If the array uses another codec chain.
    """

    def __init__(self, array: zarr.Array) -> None:
        meta = array.metadata
        codecs = getattr(meta, "codecs", ())
        if len(codecs) != 1 or not isinstance(codecs[0], ShardingCodec):
            raise NotImplementedError("only sharded zarr v3 arrays are supported")
        sharding = codecs[0]
        inner = sharding.codecs
        if (
            len(inner) != 2
            or not isinstance(inner[0], BytesCodec)
            or not isinstance(inner[1], BloscCodec)
            or str(getattr(inner[0].endian, "value", inner[0].endian)) not in ("little", "None")
        ):
            raise NotImplementedError(f"unsupported inner codecs {inner}")
        index_codecs = sharding.index_codecs
        if (
            len(index_codecs) != 2
            or not isinstance(index_codecs[0], BytesCodec)
            or not isinstance(index_codecs[1], Crc32cCodec)
            or str(getattr(sharding.index_location, "value", sharding.index_location)) != "end"
        ):
            raise NotImplementedError("unsupported shard index layout")
        blosc = inner[1]
        self.array = array
        self.dtype = np.dtype(array.dtype)
        self.shape = tuple(int(s) for s in array.shape)
        self.shard_shape = tuple(int(s) for s in meta.chunk_grid.chunk_shape)
        self.chunk_shape = tuple(int(s) for s in sharding.chunk_shape)
        self.fill_value = meta.fill_value
        self.chunks_per_shard = tuple(s // c for s, c in zip(self.shard_shape, self.chunk_shape, strict=True))
        self.n_chunks = math.prod(self.chunks_per_shard)
        self.shard_grid = tuple(math.ceil(s / c) for s, c in zip(self.shape, self.shard_shape, strict=True))
        self._compressor = Blosc(
            cname=str(getattr(blosc.cname, "value", blosc.cname)),
            clevel=int(blosc.clevel),
            shuffle=_SHUFFLE[str(getattr(blosc.shuffle, "value", blosc.shuffle))],
            blocksize=int(blosc.blocksize),
            typesize=self.dtype.itemsize,
        )
        self._key_encoding = meta.chunk_key_encoding
        self._store = array.store_path.store
        self._path = array.store_path.path

    def builder(self) -> ShardBuilder:
        """A new, empty shard."""
        return ShardBuilder(self.n_chunks, self._compressor)

    def key(self, coords: tuple[int, ...]) -> str:
        """Store key of shard ``coords``."""
        return f"{self._path}/{self._key_encoding.encode_chunk_key(coords)}"

    def encode(self, chunk: np.ndarray) -> bytes:
        """Compress one inner chunk (padded to the chunk shape) as :class:`ShardBuilder` would.

        Thread-safe: numcodecs releases the GIL while Blosc compresses (one Blosc thread per call outside the
        main thread), so several threads compress side by side; the bytes are the same either way.
        """
        return self._compressor.encode(np.ascontiguousarray(self.pad(chunk)))

    def put(self, coords: tuple[int, ...], shard: bytes | list[bytes]) -> None:
        """Store the bytes of shard ``coords`` (whole, or as pieces from :meth:`ShardBuilder.finish_parts`).

        On a local directory the pieces are written straight to a temporary file renamed into place (as
        zarr's ``LocalStore`` does, without joining them into one copy first); elsewhere one ``set`` call.
        """
        key = self.key(coords)
        if isinstance(self._store, LocalStore) and not self._store.read_only:
            path = self._store.root / key
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.partial")
            try:
                with open(tmp, "wb") as f:
                    f.writelines([shard] if isinstance(shard, bytes) else shard)
                os.replace(tmp, path)
            except BaseException:
                with contextlib.suppress(OSError):
                    tmp.unlink()
                raise
            return
        data = shard if isinstance(shard, bytes) else b"".join(shard)
        buf = default_buffer_prototype().buffer.from_bytes(data)
        sync(self._store.set(key, buf))

    def write_rows(self, shard_row: int, rows: np.ndarray) -> None:
        """Encode and store one shard along axis 0 from the values it covers (clipped to the array).

        Parameters
        ----------
        shard_row
            Shard number along axis 0 (other axes must be a single shard).
        rows
            The array values of that shard's row range (fewer rows for the last shard).
        """
        if any(g != 1 for g in self.shard_grid[1:]):
            raise NotImplementedError("write_rows needs a single shard along every axis but the first")
        c = self.chunk_shape[0]
        builder = self.builder()
        n = rows.shape[0]
        for start in range(0, self.shard_shape[0], c):
            if start >= n:
                builder.add(None)
                continue
            builder.add(self.pad(rows[start : start + c]))
        self.put((shard_row,) + (0,) * (len(self.shape) - 1), builder.finish())

    def pad(self, chunk: np.ndarray) -> np.ndarray:
        """Pad a partial edge chunk with the fill value to the full chunk shape."""
        if chunk.shape == self.chunk_shape:
            return chunk
        out = np.full(self.chunk_shape, self.fill_value, dtype=self.dtype)
        out[tuple(slice(0, s) for s in chunk.shape)] = chunk
        return out

    def __repr__(self) -> str:
        shapes = f"shape={self.shape}, shard={self.shard_shape}, chunk={self.chunk_shape}"
        return f"ShardedArray({self._path!r}, {shapes})"

"""The streaming shard writer produces what zarr-python itself writes, byte for byte."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr
from zarr.codecs import BloscCodec, ZstdCodec

from annbatch_nb.shards import ShardedArray


def _compressor() -> BloscCodec:
    return BloscCodec(cname="lz4", clevel=3, shuffle="shuffle")


@pytest.mark.parametrize(
    ("shape", "chunks", "shards", "dtype"),
    [
        ((1000,), (100,), (300,), "float32"),  # last shard partial, last inner chunks absent
        ((1000,), (128,), (1024,), "uint16"),  # a single shard larger than the array
        ((130, 7), (16, 7), (64, 7), "float64"),  # dense rows
        ((5,), (4,), (8,), "int64"),
    ],
)
def test_shards_match_zarr_python(
    tmp_path: Path, shape: tuple, chunks: tuple, shards: tuple, dtype: str
) -> None:
    rng = np.random.default_rng(0)
    values = (rng.random(shape) * 100).astype(dtype)
    root = zarr.open_group(str(tmp_path / "s.zarr"), mode="w", zarr_format=3)
    kw = {"shape": shape, "dtype": dtype, "chunks": chunks, "shards": shards, "compressors": _compressor()}
    ours = ShardedArray(root.create_array("ours", fill_value=0, **kw))
    theirs = root.create_array("theirs", fill_value=0, **kw)
    theirs[...] = values
    for s in range(ours.shard_grid[0]):
        ours.write_rows(s, values[s * shards[0] : (s + 1) * shards[0]])
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "s.zarr" / "ours"), mode="r")[...], values)
    for f in sorted((tmp_path / "s.zarr" / "theirs" / "c").rglob("*")):
        if f.is_file():
            rel = f.relative_to(tmp_path / "s.zarr" / "theirs")
            assert (tmp_path / "s.zarr" / "ours" / rel).read_bytes() == f.read_bytes(), rel


def test_builder_rejects_an_overfull_shard(tmp_path: Path) -> None:
    root = zarr.open_group(str(tmp_path / "s.zarr"), mode="w", zarr_format=3)
    arr = ShardedArray(
        root.create_array("a", shape=(8,), dtype="f4", chunks=(4,), shards=(8,), compressors=_compressor())
    )
    b = arr.builder()
    b.add(np.zeros(4, "f4"))
    b.add(None)
    with pytest.raises(IndexError):
        b.add(np.zeros(4, "f4"))


def test_other_codecs_are_refused(tmp_path: Path) -> None:
    root = zarr.open_group(str(tmp_path / "s.zarr"), mode="w", zarr_format=3)
    unsharded = root.create_array("a", shape=(8,), dtype="f4", chunks=(4,), compressors=_compressor())
    with pytest.raises(NotImplementedError):
        ShardedArray(unsharded)
    zstd = root.create_array("b", shape=(8,), dtype="f4", chunks=(4,), shards=(8,), compressors=ZstdCodec())
    with pytest.raises(NotImplementedError):
        ShardedArray(zstd)

"""A dataset's obs, var and empty elements are the bytes anndata's ``write_elem`` writes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import zarr
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import MemoryStore

import annbatch_nb as abn
from annbatch_nb import engine, frames


class _Plan:
    """What :func:`frames.write_frames` reads of a plan."""

    def __init__(self, var_names: list[str]) -> None:
        self.var_names = pd.Index(np.asarray(var_names, dtype=object), dtype=object)
        self.fingerprint = f"test-{'-'.join(var_names)}"


def _frame(n: int, seed: int, *, index_dtype: Any = object) -> pd.DataFrame:
    """Every column type the engine writes, with missing values where the type has them."""
    rng = np.random.default_rng(seed)
    counts = pd.array(rng.integers(0, 9, n), dtype="Int64")
    counts[::3] = pd.NA
    flags = pd.array(rng.random(n) < 0.5, dtype="boolean")
    flags[::4] = pd.NA
    barcodes = pd.array(rng.choice(["x", "yy", "zzz"], n).astype(object), dtype="string")
    barcodes[::5] = pd.NA
    return pd.DataFrame(
        {
            "cell_type": pd.Categorical.from_codes(rng.integers(-1, 3, n), categories=["T", "B", "NK"]),
            "level": pd.Categorical.from_codes(rng.integers(0, 3, n), categories=[10, 20, 30], ordered=True),
            "score": rng.random(n),
            "count": rng.integers(0, 100, n).astype(np.int32),
            "ok": rng.random(n) < 0.5,
            "n": counts,
            "flag": flags,
            "barcode": barcodes,
        },
        index=pd.Index(np.asarray([f"c{seed}-{i}" for i in range(n)], dtype=object), dtype=index_dtype),
    )


def _contents(store: Any, prefix: str = "") -> dict[str, bytes]:
    async def run() -> dict[str, bytes]:
        out = {}
        async for key in store.list_prefix(prefix):
            buf = await store.get(key, prototype=default_buffer_prototype())
            out[key[len(prefix) :]] = buf.to_bytes()
        return out

    return sync(run())


def _by_anndata(obs: pd.DataFrame, var_names: pd.Index) -> dict[str, bytes]:
    group = zarr.open_group(MemoryStore(), mode="w", zarr_format=3)
    with ad.settings.override(remove_unused_categories=False):
        ad.io.write_elem(group, "obs", obs)
    ad.io.write_elem(group, "var", pd.DataFrame(index=var_names.copy()))
    for name in ("uns", "obsm", "varm", "obsp", "varp", "layers"):
        ad.io.write_elem(group, name, {})
    contents = _contents(group.store_path.store)
    del contents["zarr.json"]
    return contents


def _by_frames(obs: pd.DataFrame, plan: _Plan) -> dict[str, bytes]:
    root = zarr.open_group(MemoryStore(), mode="w", zarr_format=3)
    root.create_group("dataset_0")
    frames.write_frames(root.store_path.store, "dataset_0", plan, obs)  # type: ignore[arg-type]
    contents = _contents(root.store_path.store, "dataset_0/")
    del contents["zarr.json"]
    return contents


@pytest.mark.parametrize("n", [1, 6, 3000])
@pytest.mark.parametrize("index_dtype", [object, None])  # a plain string-array, pandas' nullable strings
def test_frames_are_the_bytes_anndata_writes(n: int, index_dtype: Any) -> None:
    plan = _Plan([f"g{i}" for i in range(50)])
    for seed in range(2):  # the second dataset of a plan reuses the encoded var
        obs = _frame(n, seed, index_dtype=index_dtype)
        assert frames.encode_frame("obs", obs) is not None  # written directly, not through anndata
        expected, written = _by_anndata(obs, plan.var_names), _by_frames(obs, plan)
        assert sorted(written) == sorted(expected)
        assert {k for k in written if written[k] != expected[k]} == set()
        back = ad.io.read_elem(_reopen(written))
        pd.testing.assert_frame_equal(back, ad.io.read_elem(_reopen(expected)))


def _reopen(contents: dict[str, bytes]) -> zarr.Group:
    """The ``obs`` group of a dataset held as key -> bytes."""
    store = MemoryStore()
    proto = default_buffer_prototype()

    async def run() -> None:
        await store.set("zarr.json", proto.buffer.from_bytes(b'{"zarr_format":3,"node_type":"group"}'))
        for key, value in contents.items():
            await store.set(key, proto.buffer.from_bytes(value))

    sync(run())
    return zarr.open_group(store, mode="r")["obs"]


@pytest.mark.parametrize(
    "change",
    [
        lambda df: df.assign(when=pd.Timestamp("2026-01-01")),  # a type anndata encodes and frames do not
        lambda df: df.rename_axis("cell"),  # a named index: anndata's rules for those
    ],
    ids=["datetime-column", "named-index"],
)
def test_other_frames_are_left_to_anndata(change: Any) -> None:
    plan = _Plan(["a", "b"])
    obs = change(_frame(20, 0))
    assert frames.encode_frame("obs", obs) is None
    try:
        expected = _by_anndata(obs, plan.var_names)
    except Exception as e:  # anndata cannot write it either: neither may we
        with pytest.raises(type(e)):
            _by_frames(obs, plan)
        return
    assert _by_frames(obs, plan) == expected


def test_engine_datasets_hold_what_anndata_writes(mixed) -> None:
    """Every dataset's obs (all the engine's column types), var and empty elements, on disk."""
    plan = abn.plan(mixed.inputs, **mixed.kwargs)
    sources = engine._open_for_plan(plan)
    try:
        for k in range(plan.n_datasets):
            obs = engine._build_obs(plan, sources, plan.dataset_runs(k)).iloc[plan.dataset_permutation(k)]
            assert frames.encode_frame("obs", obs) is not None
            expected = _by_anndata(obs, plan.var_names)
            folder = Path(mixed.output) / f"dataset_{k}"
            on_disk = {
                p.relative_to(folder).as_posix(): p.read_bytes()
                for p in folder.rglob("*")
                if p.is_file() and p.relative_to(folder).parts[0] != "X" and p != folder / "zarr.json"
            }
            assert sorted(on_disk) == sorted(expected)
            assert {key for key in on_disk if on_disk[key] != expected[key]} == set()
    finally:
        engine._close_all(sources)

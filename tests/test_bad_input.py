"""Every bad input or parameter is refused with a one-line AnnbatchNBError naming the file or parameter.

Each case builds its inputs in ``tmp_path`` and returns ``(inputs, shuffle kwargs, token)``; the error message
must contain ``token`` (the offending path, pattern or parameter name). Nothing is written to the output and
no file under ``tmp_path`` is modified.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import zarr
from conftest import GENES, make_adata, tree_digest, write_adata

import annbatch_nb as abn

Case = Callable[[Path], tuple[Any, dict[str, Any], str]]


def good(tmp_path: Path, name: str = "good.h5ad", n_obs: int = 100) -> str:
    """A valid input."""
    return str(write_adata(make_adata(n_obs, GENES[:30], seed=0), tmp_path / name, "h5ad"))


def reconsolidate(store: Path) -> None:
    """anndata consolidates zarr metadata: refresh the root's copy after editing an element."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "consolidated metadata is not part of zarr v3"
        zarr.consolidate_metadata(store)


def missing_path(tmp_path: Path):
    p = str(tmp_path / "missing.h5ad")
    return [good(tmp_path), p], {}, p


def empty_directory(tmp_path: Path):
    d = tmp_path / "empty"
    d.mkdir()
    return [str(d)], {}, str(d)


def glob_matches_nothing(tmp_path: Path):
    pattern = str(tmp_path / "nothing" / "*.h5ad")
    return [pattern], {}, pattern


def truncated_h5ad(tmp_path: Path):
    p = good(tmp_path, "truncated.h5ad", n_obs=500)
    os.truncate(p, os.path.getsize(p) // 2)
    return [p], {}, p


def damaged_h5ad(tmp_path: Path):
    """Same size, but the bytes of the cell names are overwritten (a bad copy, a failing disk)."""
    p = good(tmp_path, "damaged.h5ad")
    with h5py.File(p, "r") as f:
        offset = f["obs/_index/values"].id.get_offset()
    # each variable-length string is stored as (length: u4, heap address: u8, heap index: u4): keep the
    # lengths small (no huge allocation) and point the addresses nowhere
    broken = (np.uint32(4).tobytes() + b"\xff" * 8 + np.uint32(0).tobytes()) * 2
    with open(p, "r+b") as fh:
        fh.seek(offset)
        fh.write(broken)
    return [p], {}, p


def plain_hdf5(tmp_path: Path):
    p = tmp_path / "plain.h5"
    with h5py.File(p, "w") as f:
        f["measurements"] = np.arange(10)
    return [str(p)], {}, str(p)


def text_file_named_h5ad(tmp_path: Path):
    p = tmp_path / "notes.h5ad"
    p.write_text("not hdf5\n")
    return [str(p)], {}, str(p)


def zarr_not_anndata(tmp_path: Path):
    p = tmp_path / "plain.zarr"
    g = zarr.open_group(p, mode="w", zarr_format=3)
    g.create_array("measurements", shape=(10,), dtype="i8")
    return [str(p)], {}, str(p)


def directory_not_zarr(tmp_path: Path):
    p = tmp_path / "folder.zarr"
    p.mkdir()
    (p / "readme.txt").write_text("hello")
    return [str(p)], {}, str(p)


def csc_x(tmp_path: Path):
    a = make_adata(50, GENES[:20], seed=1)
    a.X = sp.csc_matrix(a.X)
    p = write_adata(a, tmp_path / "csc.h5ad", "h5ad")
    return [str(p)], {}, str(p)


def dense_x_unsupported_encoding(tmp_path: Path):
    p = write_adata(make_adata(50, GENES[:20], seed=1, x="dense"), tmp_path / "weird.zarr", "zarr3")
    zarr.open_array(p / "X", mode="r+").attrs["encoding-type"] = "awkward-array"
    reconsolidate(p)
    return [str(p)], {}, str(p)


def sparse_x_unsupported_encoding(tmp_path: Path):
    p = write_adata(make_adata(50, GENES[:20], seed=1), tmp_path / "coo.h5ad", "h5ad")
    with h5py.File(p, "r+") as f:
        f["X"].attrs["encoding-type"] = "coo_matrix"
    return [str(p)], {}, str(p)


def zero_cells(tmp_path: Path):
    a = ad.AnnData(X=sp.csr_matrix((0, 20), dtype=np.float32), var=pd.DataFrame(index=GENES[:20]))
    p = write_adata(a, tmp_path / "nocells.h5ad", "h5ad")
    return [good(tmp_path), str(p)], {}, str(p)


def zero_genes(tmp_path: Path):
    a = ad.AnnData(
        X=np.zeros((20, 0), dtype=np.float32), obs=pd.DataFrame(index=[f"c{i}" for i in range(20)])
    )
    p = write_adata(a, tmp_path / "nogenes.zarr", "zarr3")
    return [str(p)], {}, str(p)


def string_x_h5ad(tmp_path: Path):
    p = write_adata(make_adata(20, GENES[:5], seed=1, x="dense"), tmp_path / "strings.h5ad", "h5ad")
    with h5py.File(p, "r+") as f:
        del f["X"]
        f["X"] = np.full((20, 5), b"abc", dtype="S3")
        f["X"].attrs.update({"encoding-type": "array", "encoding-version": "0.2.0"})
    return [str(p)], {}, str(p)


def string_x_zarr(tmp_path: Path):
    p = write_adata(make_adata(20, GENES[:5], seed=1, x="dense"), tmp_path / "strings.zarr", "zarr3")
    g = zarr.open_group(p, mode="r+")
    del g["X"]
    x = g.create_array(
        "X", shape=(20, 5), dtype=str, attributes={"encoding-type": "array", "encoding-version": "0.2.0"}
    )
    x[...] = np.full((20, 5), "abc", dtype=object)
    reconsolidate(p)
    return [str(p)], {}, str(p)


def zero_inputs(tmp_path: Path):
    return [], {}, "input"


def listed_twice(tmp_path: Path):
    p = good(tmp_path)
    return [p, p], {}, p


def no_shared_gene(tmp_path: Path):
    a = write_adata(make_adata(30, GENES[:10], seed=1), tmp_path / "a.h5ad", "h5ad")
    b = write_adata(make_adata(30, GENES[10:20], seed=2), tmp_path / "b.h5ad", "h5ad")
    return [str(a), str(b)], {"var_join": "inner"}, "var_join"


def obs_type_conflict(tmp_path: Path):
    a = make_adata(30, GENES[:10], seed=1, obs={"batch": pd.Categorical(["x"] * 30)})
    b = make_adata(30, GENES[:10], seed=2, obs={"batch": np.arange(30, dtype=np.float64)})
    pa = write_adata(a, tmp_path / "a.h5ad", "h5ad")
    pb = write_adata(b, tmp_path / "b.zarr", "zarr3")
    return [str(pa), str(pb)], {}, str(pb)


def obs_string_vs_number(tmp_path: Path):
    a = make_adata(30, GENES[:10], seed=1, obs={"donor": np.arange(30)})
    b = make_adata(30, GENES[:10], seed=2, obs={"donor": np.array(["d"] * 30, dtype=object)})
    pa = write_adata(a, tmp_path / "a.h5ad", "h5ad")
    pb = write_adata(b, tmp_path / "b.h5ad", "h5ad")
    return [str(pa), str(pb)], {}, str(pb)


def param(**kwargs: Any) -> Case:
    """A valid input with one bad parameter; the token is the parameter's name."""
    (name,) = kwargs

    def case(tmp_path: Path):
        return [good(tmp_path)], dict(kwargs), name

    return case


def chunk_larger_than_dataset(tmp_path: Path):
    return [good(tmp_path)], {"shuffle_chunk_size": 500, "dataset_size": 100}, "shuffle_chunk_size"


CASES: dict[str, Case] = {
    "missing path": missing_path,
    "empty directory": empty_directory,
    "glob matches nothing": glob_matches_nothing,
    "truncated h5ad": truncated_h5ad,
    "damaged h5ad": damaged_h5ad,
    "plain HDF5 file": plain_hdf5,
    "text file named .h5ad": text_file_named_h5ad,
    "zarr group that is not AnnData": zarr_not_anndata,
    "directory that is not a zarr store": directory_not_zarr,
    "CSC X": csc_x,
    "dense X with unsupported encoding": dense_x_unsupported_encoding,
    "sparse X with unsupported encoding": sparse_x_unsupported_encoding,
    "0-cell file": zero_cells,
    "0-gene file": zero_genes,
    "string X (h5ad)": string_x_h5ad,
    "string X (zarr)": string_x_zarr,
    "zero inputs": zero_inputs,
    "input listed twice": listed_twice,
    "inner join without shared genes": no_shared_gene,
    "obs column categorical vs float": obs_type_conflict,
    "obs column int vs string": obs_string_vs_number,
    "shuffle_chunk_size 0": param(shuffle_chunk_size=0),
    "shuffle_chunk_size negative": param(shuffle_chunk_size=-5),
    "shuffle_chunk_size not a number": param(shuffle_chunk_size="many"),
    "dataset_size abc": param(dataset_size="abc"),
    "dataset_size -1GB": param(dataset_size="-1GB"),
    "dataset_size 0": param(dataset_size=0),
    "dataset_size '0'": param(dataset_size="0"),
    "shuffle_chunk_size > dataset_size": chunk_larger_than_dataset,
    "var_join left": param(var_join="left"),
    "negative seed": param(seed=-1),
    "non-numeric dtype": param(dtype="str"),
    "n_obs_per_chunk 0": param(n_obs_per_chunk=0),
    "shard_size nonsense": param(shard_size="lots"),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_bad_input_is_refused_with_one_line(case: Case, tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    inputs, kwargs, token = case(work)
    before = tree_digest(work)
    out = tmp_path / "out.zarr"
    with pytest.raises(abn.AnnbatchNBError) as info:
        abn.shuffle(inputs, out, progress=False, **kwargs)
    message = str(info.value)
    assert "\n" not in message and message.strip() == message and message
    assert token in message, f"{token!r} not in {message!r}"
    assert not out.exists(), "a refused run must not create the output"
    assert tree_digest(work) == before, "a refused run must not modify its inputs"


@pytest.mark.parametrize("case", [missing_path, csc_x, obs_type_conflict, chunk_larger_than_dataset])
def test_plan_refuses_like_shuffle(case: Case, tmp_path: Path) -> None:
    inputs, kwargs, token = case(tmp_path)
    with pytest.raises(abn.AnnbatchNBError) as info:
        abn.plan(inputs, **kwargs)
    assert token in str(info.value)


def test_error_classes(tmp_path: Path) -> None:
    with pytest.raises(abn.InputError) as info:
        abn.plan([str(tmp_path / "nope.h5ad")])
    assert info.value.path == str(tmp_path / "nope.h5ad")
    with pytest.raises(abn.ParameterError):
        abn.plan([good(tmp_path)], shuffle_chunk_size=0)
    # every error is also a ValueError (or the base class), so generic handlers still catch it
    assert issubclass(abn.InputError, ValueError) and issubclass(abn.ParameterError, ValueError)

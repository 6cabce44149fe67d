"""Checks behind :func:`annbatch_nb.validate`.

Structure is checked from the collection alone (marker, dataset naming, identical var / X kind / dtype /
obs columns across datasets, CSR consistency, row counts against the manifest, unique cell names). With
inputs, every input cell is located through ``src_path`` and its (made-unique) cell name, independently
of the plan's assignment, and its X row and obs values are compared with the input's.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import zarr

from .collection import DATASET_RE, META_KEY, ValidationReport, is_committed
from .errors import AnnbatchNBError
from .plan import make_unique
from .sources import InputSpec, Source, open_sources, resolve_inputs
from .stores import is_url

__all__ = ["check_collection"]

_MAX_ERRORS = 20


class _Report(ValidationReport):
    def fail(self, msg: str) -> None:
        if len(self.errors) < _MAX_ERRORS:
            self.errors.append(msg)
        elif len(self.errors) == _MAX_ERRORS:
            self.errors.append("(more problems not listed)")


def _x_kind(group: zarr.Group) -> str:
    x = group["X"]
    enc = x.attrs.get("encoding-type")
    if isinstance(x, zarr.Array) and enc == "array":
        return "dense"
    if isinstance(x, zarr.Group) and enc == "csr_matrix":
        return "csr"
    return f"unsupported ({enc})"


def _x_rows(group: zarr.Group) -> int:
    x = group["X"]
    if isinstance(x, zarr.Array):
        return int(x.shape[0])
    return int(x.attrs["shape"][0])


def _check_structure(root: zarr.Group, report: _Report) -> list[zarr.Group]:
    if not is_committed(root):
        report.fail(
            "not a finished collection: the annbatch marker is missing (an interrupted run? re-run the same "
            "shuffle command to resume it)"
        )
    keys = [k for k in root if k.startswith("dataset_")]
    bad = [k for k in keys if not DATASET_RE.match(k)]
    if bad:
        report.fail(
            f"keys {bad} start with 'dataset_' but are not dataset_<n>; annbatch's Loader would crash"
        )
    numbers = sorted(int(DATASET_RE.match(k).group(1)) for k in keys if DATASET_RE.match(k))  # type: ignore[union-attr]
    if not numbers:
        report.fail("no dataset_<n> groups")
        return []
    if numbers != list(range(len(numbers))):
        report.fail(f"datasets are not numbered 0..{len(numbers) - 1}: {numbers[:10]}")
    groups = [root[f"dataset_{n}"] for n in numbers]
    report.n_datasets = len(groups)

    ref_var: pd.Index | None = None
    ref_kind = ref_dtype = None
    ref_obs: pd.Series | None = None
    ref_cats: dict[str, list[Any]] = {}
    all_names: list[np.ndarray] = []
    for n, g in zip(numbers, groups, strict=True):
        name = f"dataset_{n}"
        if g.attrs.get("encoding-type") != "anndata":
            report.fail(f"{name} is not an AnnData group (encoding-type {g.attrs.get('encoding-type')!r})")
            continue
        missing = [k for k in ("X", "obs", "var") if k not in g]
        if missing:
            report.fail(f"{name} lacks {missing}")
            continue
        try:
            var = pd.Index(ad.io.read_elem(g["var"]).index)
            kind = _x_kind(g)
            x = g["X"]
            dtype = str(x.dtype if isinstance(x, zarr.Array) else x["data"].dtype)
            if ref_var is None:
                ref_var, ref_kind, ref_dtype = var, kind, dtype
            else:
                if not var.equals(ref_var):
                    report.fail(f"{name} has a different var than dataset_{numbers[0]}")
                if kind != ref_kind:
                    report.fail(f"{name} X is {kind}, dataset_{numbers[0]} X is {ref_kind}")
                if dtype != ref_dtype:
                    report.fail(f"{name} X dtype is {dtype}, dataset_{numbers[0]} has {ref_dtype}")
            n_rows = _x_rows(g)
            if kind == "csr":
                shape = x.attrs.get("shape")
                if list(shape)[1] != len(var):
                    report.fail(f"{name} X has {shape[1]} columns but var has {len(var)} genes")
                indptr = x["indptr"][...]
                nnz = int(x["data"].shape[0])
                if (
                    len(indptr) != n_rows + 1
                    or indptr[0] != 0
                    or indptr[-1] != nnz
                    or np.any(np.diff(indptr) < 0)
                ):
                    report.fail(f"{name} X/indptr is inconsistent with {n_rows} rows and {nnz} entries")
                if int(x["indices"].shape[0]) != nnz:
                    report.fail(f"{name} X/indices and X/data differ in length")
                elif nnz and int(x["indices"][...].max()) >= len(var):
                    report.fail(f"{name} X/indices has a column index >= n_vars")
            elif kind == "dense":
                if x.shape[1] != len(var):
                    report.fail(f"{name} X has {x.shape[1]} columns but var has {len(var)} genes")
            else:
                report.fail(f"{name} X has {kind} encoding")
            with ad.settings.override(remove_unused_categories=False):
                obs = ad.io.read_elem(g["obs"])
            if len(obs) != n_rows:
                report.fail(f"{name} obs has {len(obs)} rows, X has {n_rows}")
            if ref_obs is None:
                ref_obs = obs.dtypes
                ref_cats = {
                    c: list(obs[c].cat.categories)
                    for c in obs.columns
                    if isinstance(obs[c].dtype, pd.CategoricalDtype)
                }
            else:
                if list(obs.columns) != list(ref_obs.index) or any(
                    str(obs[c].dtype) != str(ref_obs[c]) for c in obs.columns if c in ref_obs.index
                ):
                    report.fail(f"{name} obs columns or types differ from dataset_{numbers[0]}")
                for c, cats in ref_cats.items():
                    if c in obs.columns and list(obs[c].cat.categories) != cats:
                        report.fail(
                            f"{name} obs column {c!r} has different categories than dataset_{numbers[0]}"
                        )
            all_names.append(np.asarray(obs.index, dtype=object))
            report.n_obs += n_rows
        except Exception as e:  # a dataset cut short (an interrupted run) or damaged: reported, not raised
            first_line = str(e).splitlines()[0] if str(e) else ""
            report.fail(f"{name} cannot be read ({type(e).__name__}: {first_line})")
    if ref_var is not None:
        report.n_vars = len(ref_var)
        report.x_kind = str(ref_kind)
        report.dtype = str(ref_dtype)
    if all_names:
        names = pd.Index(np.concatenate(all_names))
        if names.has_duplicates:
            report.fail(
                f"cell names are not unique across the collection (e.g. {names[names.duplicated()][0]!r})"
            )

    if META_KEY in root:
        meta = dict(root[META_KEY].attrs)
        expected = meta.get("rows_per_dataset")
        if expected is not None:
            got = [_x_rows(g) if "X" in g else -1 for g in groups]  # no X: a dataset cut short, reported
            if len(expected) != len(got):
                report.fail(f"the manifest lists {len(expected)} datasets, the collection has {len(got)}")
            elif list(expected) != got:
                report.fail("row counts differ from the manifest's")
    return groups


def _input_rows_csr(src: Source, rows: np.ndarray, var_map: np.ndarray, n_vars: int) -> sp.csr_matrix:
    """Rows (sorted, unique) of an input as CSR in the collection's gene space."""
    runs = np.stack([rows, rows + 1], axis=1)
    if src.info.x_kind == "csr":
        nnz = src.run_nnz(runs)
        data = np.empty(int(nnz.sum()), dtype=src.info.dtype)
        idx = np.empty(int(nnz.sum()), dtype=np.int64)
        src.read_csr_into(runs, data, idx)
        indptr = np.concatenate([[0], np.cumsum(nnz)])
        m = sp.csr_matrix((data, idx, indptr), shape=(len(rows), src.info.n_vars))
    else:
        m = sp.csr_matrix(src.read_dense(runs))
    m = m.tocoo()
    cols = var_map[m.col]
    keep = cols >= 0
    out = sp.csr_matrix((m.data[keep], (m.row[keep], cols[keep])), shape=(len(rows), n_vars))
    out.sum_duplicates()
    return out


def _same_csr(a: sp.csr_matrix, b: sp.csr_matrix) -> bool:
    a = a.copy()
    b = b.copy()
    a.sort_indices()
    b.sort_indices()
    return (
        a.shape == b.shape
        and np.array_equal(a.indptr, b.indptr)
        and np.array_equal(a.indices, b.indices)
        and np.array_equal(a.data, b.data.astype(a.data.dtype, copy=False), equal_nan=True)
    )


def _values_equal(a: pd.Series, b: pd.Series) -> bool:
    a = a.astype(object) if isinstance(a.dtype, pd.CategoricalDtype) else a
    b = b.astype(object) if isinstance(b.dtype, pd.CategoricalDtype) else b
    av = np.asarray(a, dtype=object)
    bv = np.asarray(b, dtype=object)
    na = pd.isna(av)
    nb = pd.isna(bv)
    if not np.array_equal(na, nb):
        return False
    av, bv = av[~na], bv[~nb]
    try:
        return bool(np.all(av.astype(float) == bv.astype(float)))
    except (TypeError, ValueError):
        return bool(np.all(av.astype(str) == bv.astype(str)))


def _check_against_inputs(
    groups: list[zarr.Group], inputs: Any, report: _Report, sample: int | None, seed: int, virtualize: Any
) -> None:
    try:
        specs = inputs if isinstance(inputs, list) and all(isinstance(i, InputSpec) for i in inputs) else None
        sources = open_sources(specs or resolve_inputs(inputs), virtualize=virtualize)
    except AnnbatchNBError as e:
        report.fail(f"cannot open the inputs: {e}")
        return
    try:
        by_display = {s.info.display: i for i, s in enumerate(sources)}
        by_path = {s.info.path: i for i, s in enumerate(sources)}
        names = make_unique(
            pd.Index(np.concatenate([np.asarray(s.info.obs_names, dtype=object) for s in sources]))
        )
        offsets = np.concatenate([[0], np.cumsum([s.info.n_obs for s in sources])])
        total = int(offsets[-1])
        lookup = pd.Index(names)
        seen = np.zeros(total, dtype=np.int64)
        var = pd.Index(ad.io.read_elem(groups[0]["var"]).index) if groups else pd.Index([])
        var_maps = [var.get_indexer(s.info.var_names) for s in sources]
        rng = np.random.default_rng(seed)
        for n, g in enumerate(groups):
            with ad.settings.override(remove_unused_categories=False):
                obs = ad.io.read_elem(g["obs"])
            if "src_path" not in obs.columns:
                report.fail(f"dataset_{n} has no src_path column; cannot trace cells to inputs")
                return
            src_idx = np.array(
                [
                    by_display.get(p, by_path.get(str(Path(p).resolve()), -1))
                    for p in obs["src_path"].astype(str)
                ]
            )
            if np.any(src_idx < 0):
                unknown = obs["src_path"].astype(str)[src_idx < 0].iloc[0]
                report.fail(f"dataset_{n} has cells from {unknown!r}, which is not among the inputs")
                continue
            glob_rows = lookup.get_indexer(pd.Index(np.asarray(obs.index, dtype=object)))
            if np.any(glob_rows < 0):
                report.fail(f"dataset_{n} has cell names not found in the inputs")
                continue
            owner = np.searchsorted(offsets, glob_rows, side="right") - 1
            if np.any(owner != src_idx):
                report.fail(f"dataset_{n}: src_path disagrees with the input that holds the cell name")
                continue
            np.add.at(seen, glob_rows, 1)
            # content check
            rows_out = np.arange(len(obs))
            if sample is not None and sample < len(rows_out):
                rows_out = np.sort(rng.choice(len(obs), size=sample, replace=False))
            x = g["X"]
            if isinstance(x, zarr.Array):
                out_x = sp.csr_matrix(x[...][rows_out]) if len(rows_out) else sp.csr_matrix((0, len(var)))
            else:
                out_full = ad.io.read_elem(x)
                out_x = sp.csr_matrix(out_full[rows_out])
            for i, s in enumerate(sources):
                sel = np.flatnonzero(src_idx[rows_out] == i)
                if not len(sel):
                    continue
                in_rows = glob_rows[rows_out[sel]] - offsets[i]
                order = np.argsort(in_rows)
                expected = _input_rows_csr(s, in_rows[order], var_maps[i], len(var))
                inv = np.empty_like(order)
                inv[order] = np.arange(len(order))
                if not _same_csr(expected[inv], out_x[sel]):
                    report.fail(f"dataset_{n}: X rows of cells from {s.info.display} differ from the input")
                in_obs = s.read_obs(np.stack([in_rows[order], in_rows[order] + 1], axis=1))
                for col, val in in_obs.items():
                    if col == "src_path" or col not in obs.columns:
                        continue
                    expected_col = _column_values(val, s.info.obs_columns[col])
                    got = obs[col].iloc[rows_out[sel]].reset_index(drop=True)
                    if not _values_equal(pd.Series(expected_col)[inv].reset_index(drop=True), got):
                        report.fail(f"dataset_{n}: obs column {col!r} of cells from {s.info.display} differs")
            report.checked_cells += len(rows_out)
        if np.any(seen == 0):
            first = int(np.flatnonzero(seen == 0)[0])
            owner = int(np.searchsorted(offsets, first, side="right") - 1)
            report.fail(
                f"{int((seen == 0).sum()):,} input cells are missing (e.g. {names[first]!r} of "
                f"{sources[owner].info.display})"
            )
        if np.any(seen > 1):
            report.fail(f"{int((seen > 1).sum()):,} input cells appear more than once")
    finally:
        for s in sources:
            s.close()


def _column_values(val: Any, spec: Any) -> np.ndarray:
    if spec.kind == "categorical":
        codes, cats = val
        cats_arr = np.asarray(list(cats), dtype=object)
        out = np.where(
            np.asarray(codes) >= 0,
            cats_arr[np.maximum(np.asarray(codes), 0)] if len(cats_arr) else None,
            None,
        )
        return out.astype(object)
    if isinstance(val, tuple):
        values, mask = val
        out = np.asarray(values, dtype=object)
        out[np.asarray(mask, dtype=bool)] = None
        return out
    return np.asarray(val)


def check_collection(
    output: str | os.PathLike[str],
    inputs: str | os.PathLike[str] | Iterable[str | os.PathLike[str]] | None,
    *,
    sample: int | None = None,
    seed: int = 0,
    virtualize: Any = "auto",
) -> ValidationReport:
    """Validate a collection (see :func:`annbatch_nb.validate`)."""
    report = _Report(output=str(output))
    if is_url(os.fspath(output)):
        root = _open_remote(os.fspath(output), report)
        if root is None:
            return report
    else:
        path = Path(output)
        if not path.exists():
            report.fail("does not exist")
            return report
        try:
            root = zarr.open_group(str(path), mode="r")
        except Exception as e:
            report.fail(f"is not a zarr group ({type(e).__name__})")
            return report
    groups = _check_structure(root, report)
    if isinstance(inputs, str) and inputs == "recorded":
        try:
            records = dict(root[META_KEY].attrs)["inputs"]
        except Exception:
            report.fail("has no annbatch-nb manifest listing its inputs; pass the inputs instead")
            return report
        inputs = [InputSpec(r["abspath"], r["path"]) for r in records]
    if inputs is not None and groups and report.ok:
        _check_against_inputs(groups, inputs, report, sample, seed, virtualize)
    return report


def _open_remote(output: str, report: _Report) -> zarr.Group | None:
    """Open a collection on an object store read-only, or record why it cannot be."""
    from .errors import OutputError
    from .stores import describe_store_error, list_keys, object_store, parse_url, zarr_store

    try:
        url = parse_url(output, OutputError)
        keys = list_keys(object_store(url, OutputError, prefix=True))
    except AnnbatchNBError as e:
        report.fail(e.problem if isinstance(e, OutputError) else str(e))
        return None
    except Exception as e:
        report.fail(f"cannot be listed ({describe_store_error(e)})")
        return None
    if not keys:
        report.fail("does not exist")
        return None
    try:
        return zarr.open_group(zarr_store(url, OutputError, read_only=True), mode="r")
    except Exception as e:
        report.fail(f"is not a zarr group ({type(e).__name__})")
        return None

"""Choosing the inputs: a folder browser, a glob filter, a table of the matching files, their gene overlap."""

from __future__ import annotations

import glob
import html
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import ipywidgets as widgets
from dask.utils import format_bytes

from ..errors import AnnbatchNBError
from ..plan import scan, var_overlap
from ..sources import InputSpec, SourceInfo, resolve_inputs

__all__ = ["FileEntry", "FilePicker"]

_COLUMNS = ("", "file", "format", "cells", "genes", "density", "on disk")
_GRID = "26px minmax(180px, 3fr) 58px 78px 64px 66px 78px"


@dataclass
class FileEntry:
    """One row of the file table.

    Attributes
    ----------
    path
        The path as scanned (and recorded in ``src_path``).
    name
        What the table shows.
    info
        Its scanned metadata, or None if it cannot be read.
    error
        Why it cannot be read (one line), or None.
    checkbox
        Its selection box.
    """

    path: str
    name: str
    info: SourceInfo | None
    error: str | None
    checkbox: widgets.Checkbox

    @property
    def selected(self) -> bool:
        """Whether the file is selected (and readable)."""
        return bool(self.checkbox.value) and self.info is not None


def _is_input(path: str) -> bool:
    p = Path(path)
    if p.name.startswith("."):
        return False
    if p.suffix == ".h5ad":
        return p.is_file()
    return p.suffix == ".zarr" and p.is_dir()


def _abs(path: str) -> str:
    return str(Path(path).expanduser().resolve()) if "://" not in path else path


def _cell(text: str, *, title: str = "", align: str = "right") -> widgets.HTML:
    tip = f' title="{html.escape(title)}"' if title else ""
    return widgets.HTML(
        f'<div style="text-align:{align};white-space:nowrap;overflow:hidden;text-overflow:ellipsis"{tip}>'
        f"{text}</div>"
    )


class FilePicker(widgets.VBox):
    """Pick input files: a folder, a glob filter, and a table of the matching ``.h5ad``/``.zarr`` inputs.

    Every listed file is scanned once with :func:`annbatch_nb.scan` (metadata only; the result is cached
    until the file changes or *Rescan* is pressed); a file that cannot be read shows its error in its row and
    cannot be selected.

    Parameters
    ----------
    directory
        The folder to list (default: the common folder of ``inputs``, else the working directory).
    pattern
        Glob pattern(s) relative to the folder, comma-separated (``*.h5ad, *.zarr``; ``**/*.h5ad`` recurses).
    inputs
        Files, folders or glob patterns to list first and select (as :func:`annbatch_nb.plan` takes them).
    exclude
        Paths never to list (the output collection).
    """

    def __init__(
        self,
        directory: str | os.PathLike[str] | None = None,
        pattern: str = "*",
        inputs: str | os.PathLike[str] | Iterable[str | os.PathLike[str]] | None = None,
        exclude: Iterable[str] = (),
    ) -> None:
        self._callbacks: list[Callable[[], None]] = []
        self._cache: dict[tuple[str, int, int], SourceInfo] = {}
        self._checked: dict[str, bool] = {}
        self._pinned: list[InputSpec] = []
        self._exclude = {_abs(p) for p in exclude}
        self._quiet = False
        self._navigating = False
        self.entries: list[FileEntry] = []
        self.message = widgets.HTML().add_class("abn-files-message")
        self._input_error = ""
        if inputs is not None:
            try:
                self._pinned = resolve_inputs(inputs)
            except AnnbatchNBError as e:
                self._input_error = str(e)
        if directory is None:
            local = [s for s in self._pinned if "://" not in s.path]
            folders = {os.path.dirname(s.display) or "." for s in local}
            if len(folders) == 1:  # as the user gave it (relative stays relative)
                directory = folders.pop()
            elif local:
                directory = os.path.commonpath([os.path.dirname(s.path) for s in local])
            else:
                directory = "."

        self.directory = widgets.Text(
            value=os.fspath(directory),
            description="folder",
            continuous_update=False,
            layout=widgets.Layout(width="420px"),
            style={"description_width": "50px"},
        ).add_class("abn-directory")
        self.up_button = widgets.Button(
            icon="arrow-up", tooltip="parent folder", layout=widgets.Layout(width="36px")
        )
        self.subfolders = widgets.Dropdown(
            options=[("open a subfolder…", "")], value="", layout=widgets.Layout(width="190px")
        ).add_class("abn-subfolders")
        self.pattern = widgets.Text(
            value=pattern,
            description="match",
            placeholder="*.h5ad, *.zarr",
            continuous_update=False,
            layout=widgets.Layout(width="230px"),
            style={"description_width": "45px"},
        ).add_class("abn-pattern")
        self.rescan_button = widgets.Button(
            description="Rescan", icon="refresh", layout=widgets.Layout(width="90px")
        )
        self.select_all_button = widgets.Button(description="Select all", layout=widgets.Layout(width="90px"))
        self.select_none_button = widgets.Button(
            description="Select none", layout=widgets.Layout(width="100px")
        )
        self.overlap = widgets.HTML().add_class("abn-overlap")
        self.table = widgets.GridBox(
            layout=widgets.Layout(
                grid_template_columns=_GRID,
                grid_gap="1px 8px",
                max_height="230px",
                overflow="auto",
                border="1px solid #ddd",
                padding="2px 6px",
            )
        ).add_class("abn-files")

        self.directory.observe(lambda _: self.refresh(), names="value")
        self.pattern.observe(lambda _: self.refresh(), names="value")
        self.subfolders.observe(self._open_subfolder, names="value")
        self.up_button.on_click(lambda _: self._go_up())
        self.rescan_button.on_click(lambda _: self.refresh(rescan=True))
        self.select_all_button.on_click(lambda _: self.select_all())
        self.select_none_button.on_click(lambda _: self.select_none())

        super().__init__(
            [
                widgets.HBox(
                    [self.directory, self.up_button, self.subfolders, self.pattern, self.rescan_button]
                ),
                self.message,
                self.table,
                widgets.HBox(
                    [self.select_all_button, self.select_none_button, self.overlap],
                    layout=widgets.Layout(align_items="center"),
                ),
            ]
        )
        self.refresh()

    # -- what is selected -------------------------------------------------------------------------------
    @property
    def selected_infos(self) -> list[SourceInfo]:
        """Scanned metadata of the selected files, in table order."""
        return [e.info for e in self.entries if e.selected and e.info is not None]

    @property
    def selected_paths(self) -> list[str]:
        """Paths of the selected files, in table order."""
        return [e.path for e in self.entries if e.selected]

    def on_change(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` whenever the selection (or what is known about it) changes.

        Parameters
        ----------
        callback
            Called without arguments.
        """
        self._callbacks.append(callback)

    def _changed(self) -> None:
        self._update_overlap()
        if self._quiet:
            return
        for cb in self._callbacks:
            cb()

    def select_all(self) -> None:
        """Select every readable file."""
        self._set_all(True)

    def select_none(self) -> None:
        """Deselect every file."""
        self._set_all(False)

    def _set_all(self, value: bool) -> None:
        self._quiet = True
        try:
            for e in self.entries:
                if e.info is not None:
                    e.checkbox.value = value
        finally:
            self._quiet = False
        self._changed()

    def set_exclude(self, paths: Iterable[str]) -> None:
        """Never list these paths (e.g. the output collection); re-lists if that changes anything.

        Parameters
        ----------
        paths
            Paths to leave out.
        """
        new = {_abs(p) for p in paths if p}
        if new != self._exclude:
            self._exclude = new
            if any(_abs(e.path) in new for e in self.entries):
                self.refresh()

    def set_disabled(self, disabled: bool) -> None:
        """Disable (during a run) or enable every control.

        Parameters
        ----------
        disabled
            True to disable.
        """
        for w in (
            self.directory,
            self.up_button,
            self.subfolders,
            self.pattern,
            self.rescan_button,
            self.select_all_button,
            self.select_none_button,
        ):
            w.disabled = disabled
        for e in self.entries:
            e.checkbox.disabled = disabled or e.info is None

    # -- listing and scanning ---------------------------------------------------------------------------
    def _set_message(self, text: str, *, error: bool = False) -> None:
        parts = []
        if self._input_error:
            parts.append(f'<span style="color:#b00020">✘ {html.escape(self._input_error)}</span>')
        if text:
            color = "#b00020" if error else "#555"
            parts.append(f'<span style="color:{color}">{html.escape(text)}</span>')
        self.message.value = "<br>".join(parts)

    def _go_up(self) -> None:
        here = Path(self.directory.value).expanduser()
        parent = here.resolve().parent if str(here) in ("", ".") else here.parent
        self.directory.value = str(parent)

    def _open_subfolder(self, change: dict) -> None:
        name = change["new"]
        if name and not self._navigating:
            self.directory.value = os.path.join(self.directory.value, name)

    def _list(self) -> list[InputSpec]:
        folder = os.path.expanduser(self.directory.value.strip() or ".")
        found: list[InputSpec] = list(self._pinned)
        seen = {_abs(s.path) for s in found}
        if not os.path.isdir(folder):
            self._set_message(f"{folder}: no such folder", error=True)
            self._set_subfolders([])
            return found
        patterns = [p.strip() for p in self.pattern.value.split(",") if p.strip()] or ["*"]
        for pat in patterns:
            for match in sorted(glob.glob(os.path.join(folder, pat), recursive=True)):
                match = os.path.normpath(match)
                if ".zarr" + os.sep in match or not _is_input(match):
                    continue
                key = _abs(match)
                if key in seen or key in self._exclude:
                    continue
                seen.add(key)
                found.append(InputSpec(key, match))
        try:
            subdirs = sorted(
                e.name
                for e in os.scandir(folder)
                if e.is_dir() and not e.name.startswith(".") and not e.name.endswith(".zarr")
            )
        except OSError:
            subdirs = []
        self._set_subfolders(subdirs)
        return found

    def _set_subfolders(self, names: list[str]) -> None:
        self._navigating = True
        try:
            self.subfolders.options = [("open a subfolder…", ""), *[(n + "/", n) for n in names]]
            self.subfolders.value = ""
        finally:
            self._navigating = False

    def _scan(self, spec: InputSpec) -> tuple[SourceInfo | None, str | None]:
        try:
            st = os.stat(spec.path) if "://" not in spec.path else None
            key = (spec.path, st.st_size if st else 0, st.st_mtime_ns if st else 0)
            if key not in self._cache:
                self._cache[key] = scan(spec.display)[0]
            return self._cache[key], None
        except AnnbatchNBError as e:
            return None, str(e)
        except Exception as e:  # a damaged file may fail in a library: still one readable line
            return None, f"{spec.display}: {type(e).__name__}: {e}"

    def refresh(self, *, rescan: bool = False) -> None:
        """List the folder again (and re-read every file's metadata if ``rescan``).

        Parameters
        ----------
        rescan
            Forget cached metadata first.
        """
        if rescan:
            self._cache.clear()
        for e in self.entries:
            self._checked[_abs(e.path)] = bool(e.checkbox.value)
        self._set_message("")
        specs = self._list()
        pinned = {_abs(s.path) for s in self._pinned}
        entries = []
        for spec in specs:
            info, error = self._scan(spec)
            key = _abs(spec.path)
            default = key in pinned or not self._pinned
            box = widgets.Checkbox(
                value=self._checked.get(key, default) and info is not None,
                indent=False,
                disabled=info is None,
                layout=widgets.Layout(width="22px"),
            )
            box.observe(lambda _: self._changed(), names="value")
            name = (
                os.path.relpath(spec.display, self.directory.value)
                if "://" not in spec.display
                else spec.display
            )
            if name.startswith(".."):
                name = spec.display
            entries.append(FileEntry(spec.display, name, info, error, box))
        self.entries = entries
        if not entries and os.path.isdir(os.path.expanduser(self.directory.value.strip() or ".")):
            self._set_message("no .h5ad or .zarr input matches here")
        self._render_table()
        self._changed()

    def _render_table(self) -> None:
        cells: list[widgets.Widget] = [
            widgets.HTML(
                f"<b>{c}</b>", layout=widgets.Layout(justify_content="flex-end" if i > 2 else "flex-start")
            )
            for i, c in enumerate(_COLUMNS)
        ]
        for e in self.entries:
            cells.append(e.checkbox)
            if e.info is None:
                err = html.escape(e.error or "unreadable")
                cells.append(
                    _cell(
                        f'{html.escape(e.name)} <span style="color:#b00020">✘ {err}</span>',
                        title=e.error or "",
                        align="left",
                    )
                )
                cells.extend(_cell("—") for _ in range(5))
                continue
            i = e.info
            density = i.nnz / max(i.n_obs * i.n_vars, 1)
            cells.extend(
                [
                    _cell(html.escape(e.name), title=i.path, align="left"),
                    _cell(
                        f"{i.format} {'' if i.x_kind == 'csr' else '(dense)'}".strip(),
                        title=f"X {i.dtype.name}, "
                        + (f"chunks of {i.x_chunk:,}" if i.x_chunk else "contiguous")
                        + f", compression {i.x_compression or 'unknown'}; read by {i.reader}",
                        align="left",
                    ),
                    _cell(f"{i.n_obs:,}"),
                    _cell(f"{i.n_vars:,}"),
                    _cell(f"{density:.1%}" if i.x_kind == "csr" else "dense"),
                    _cell(format_bytes(i.size_bytes)),
                ]
            )
        self.table.children = cells

    def _update_overlap(self) -> None:
        infos = self.selected_infos
        if not infos:
            self.overlap.value = "<i>no file selected</i>"
            return
        overlap = var_overlap(infos)
        cells = sum(i.n_obs for i in infos)
        self.overlap.value = (
            f"<b>{len(infos)}</b> of {len(self.entries)} file(s) selected · <b>{cells:,}</b> cells · "
            f"genes in all files: <b>{overlap.n_intersection:,}</b> · "
            f"in the union: <b>{overlap.n_union:,}</b>"
        )

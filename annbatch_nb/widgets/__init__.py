"""JupyterLab widgets of annbatch-nb (ipywidgets + matplotlib).

Importing :mod:`annbatch_nb` does not import this package; ``annbatch_nb.Planner`` loads it on first use.
"""

from .files import FileEntry, FilePicker
from .planner import Planner

__all__ = ["FileEntry", "FilePicker", "Planner"]

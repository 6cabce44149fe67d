"""Exceptions raised by annbatch-nb.

Every error a user can cause is an :class:`AnnbatchNBError` whose message is one line that names the file
(or parameter) and the problem, so that the CLI can print it without a traceback.
"""

from __future__ import annotations

import os

__all__ = ["AnnbatchNBError", "CancelledError", "InputError", "OutputError", "ParameterError"]


class AnnbatchNBError(Exception):
    """Base class of every error annbatch-nb raises on purpose."""


class InputError(AnnbatchNBError, ValueError):
    """An input file cannot be used; the message starts with its path.

    Parameters
    ----------
    path
        The offending input (as the user gave it).
    problem
        What is wrong with it, and where possible what to do about it.
    """

    def __init__(self, path: str | os.PathLike[str], problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")

    def __reduce__(self) -> tuple[type, tuple[str, str]]:  # survive pickling (process pools)
        return type(self), (self.path, self.problem)


class OutputError(AnnbatchNBError, ValueError):
    """The output location cannot be used (exists, unrelated, not writable, ...).

    Parameters
    ----------
    path
        The output location.
    problem
        What is wrong with it.
    """

    def __init__(self, path: str | os.PathLike[str], problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")

    def __reduce__(self) -> tuple[type, tuple[str, str]]:  # survive pickling (process pools)
        return type(self), (self.path, self.problem)


class ParameterError(AnnbatchNBError, ValueError):
    """A parameter value is invalid; the message names the parameter."""


class CancelledError(AnnbatchNBError):
    """A run was cancelled; the output is left in a resumable state."""


class ClusterError(AnnbatchNBError):
    """A dask cluster cannot run the plan; nothing was committed and the run stays resumable.

    For example: no workers, workers that cannot see the output or the inputs, a dataset task that keeps
    killing its workers.
    """

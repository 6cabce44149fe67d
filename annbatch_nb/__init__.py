"""annbatch-nb: preshuffle AnnData files into annbatch collections, fast, in bounded memory, resumably.

The public API::

    import annbatch_nb as abn

    p = abn.plan(["a.h5ad", "b.zarr"], shuffle_chunk_size=1000, dataset_size="2GB", seed=0)
    result = p.run("out.zarr")            # same as abn.shuffle(inputs, "out.zarr", ...)
    report = abn.validate("out.zarr", inputs=["a.h5ad", "b.zarr"])
    abn.plan_append(["c.h5ad"], "out.zarr").describe()  # cost and mixing of adding cells
    abn.append(["c.h5ad"], "out.zarr")    # same as abn.shuffle(["c.h5ad"], "out.zarr", mode="append")
"""

from __future__ import annotations

__version__ = "0.1.0"

from .append import AppendPlan, AppendResult, append, plan_append
from .collection import ValidationReport, validate
from .engine import ShuffleResult, execute, shuffle
from .errors import (
    AnnbatchNBError,
    CancelledError,
    ClusterError,
    InputError,
    OutputError,
    ParameterError,
)
from .plan import Parameters, Plan, VarOverlap, build_plan, plan, scan, scan_table, sweep, var_overlap
from .predict import Calibration, calibrate
from .sources import VirtualizationFallback

__all__ = [
    "AnnbatchNBError",
    "AppendPlan",
    "AppendResult",
    "Calibration",
    "CancelledError",
    "ClusterError",
    "InputError",
    "OutputError",
    "ParameterError",
    "Parameters",
    "Plan",
    "ShuffleResult",
    "ValidationReport",
    "VarOverlap",
    "VirtualizationFallback",
    "__version__",
    "append",
    "build_plan",
    "calibrate",
    "execute",
    "plan",
    "plan_append",
    "scan",
    "scan_table",
    "shuffle",
    "sweep",
    "validate",
    "var_overlap",
]


def __getattr__(name: str) -> object:
    # the widget planner imports ipywidgets and matplotlib: load it only when asked for
    if name == "Planner":
        from .widgets import Planner

        return Planner
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

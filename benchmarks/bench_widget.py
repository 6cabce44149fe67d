"""Redraw latency of the widget planner: from a slider change to updated plots, with the real debounce.

Builds an ``annbatch_nb.Planner`` on the demo inputs (``make_demo_data``, default scale 1: 16,500 cells in
six files), then moves the sliders the way a user does, one change at a time, and times each change from the
moment the slider value is set until the plots are published:

- ``first paint``: the current plan, the memory curve, every marker and the summary line are updated (curves
  against ``shuffle_chunk_size`` that are not cached yet keep their previous shape until the next stage);
- ``full``: every curve is up to date (a ``dataset_size`` change recomputes the sweep over
  ``shuffle_chunk_size``).

Each slider moves one stop at a time (as the arrow keys move it) through values not planned before.

Both include the debounce delay (``--debounce``, the Planner's default 0.05 s). Prints the median and 90th
percentile per kind of change, and the overall median redraw in ms.

Usage::

    python benchmarks/bench_widget.py [--scale 1.0] [--repeats 10] [--debounce 0.05] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import annbatch_nb as abn
from annbatch_nb.demo import make_demo_data


def _wait_redraw(planner: abn.Planner, before: int, timeout: float = 30.0) -> None:
    with planner._redrawn:
        ok = planner._redrawn.wait_for(lambda: planner.redraws > before, timeout)
    if not ok:
        raise TimeoutError("the planner did not redraw")


def _change(planner: abn.Planner, slider, value: int) -> tuple[float, float]:
    before = planner.redraws
    t0 = time.perf_counter()
    slider.value = value
    _wait_redraw(planner, before)
    stamps = planner.last_redraw
    return (stamps["first_paint"] - t0) * 1e3, (stamps["done"] - t0) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=float, default=1.0, help="demo data scale (1.0: 16,500 cells)")
    ap.add_argument("--repeats", type=int, default=10, help="changes per slider")
    ap.add_argument("--debounce", type=float, default=0.05, help="the Planner's debounce delay (s)")
    ap.add_argument("--data", default=None, help="directory for the demo inputs (default: a temp dir)")
    ap.add_argument("--json", default=None, help="also write the measurements here")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-widget-") as tmp:
        data = Path(args.data or tmp)
        paths = make_demo_data(data, scale=args.scale)
        t = time.perf_counter()
        planner = abn.Planner(
            inputs=[str(p) for p in paths],
            output=str(data / "bench.zarr"),
            shuffle_chunk_size=100,
            dataset_size=2000,
            seed=0,
            debounce=args.debounce,
        )
        build_s = time.perf_counter() - t
        n_obs = planner.plan.n_obs
        print(f"inputs: {len(paths)} files, {n_obs:,} cells; Planner built and drawn in {build_s:.2f} s")

        results: dict[str, list[tuple[float, float]]] = {"shuffle_chunk_size": [], "dataset_size": []}
        for name in results:
            slider = getattr(planner, name)
            stops = [v for _, v in slider.options]
            # step one stop at a time, as the arrow keys do, through values never planned before
            start = max(0, min(stops.index(slider.value), len(stops) - 1 - args.repeats))
            for value in stops[start + 1 : start + 1 + args.repeats]:
                results[name].append(_change(planner, slider, value))

        summary = {}
        for name, values in results.items():
            first = [v[0] for v in values]
            full = [v[1] for v in values]
            summary[name] = {
                "first_paint_median_ms": statistics.median(first),
                "first_paint_p90_ms": statistics.quantiles(first, n=10)[-1],
                "full_median_ms": statistics.median(full),
                "full_p90_ms": statistics.quantiles(full, n=10)[-1],
            }
            s = summary[name]
            print(
                f"{name:>20}: first paint median {s['first_paint_median_ms']:6.0f} ms "
                f"(p90 {s['first_paint_p90_ms']:4.0f}) · full median {s['full_median_ms']:6.0f} ms "
                f"(p90 {s['full_p90_ms']:4.0f})"
            )
        every_first = [v[0] for values in results.values() for v in values]
        every_full = [v[1] for values in results.values() for v in values]
        print(f"median redraw ms (first paint): {statistics.median(every_first):.0f}")
        print(f"median redraw ms (all curves):  {statistics.median(every_full):.0f}")
        if args.json:
            Path(args.json).write_text(
                json.dumps({"n_obs": n_obs, "debounce_s": args.debounce, "changes": summary}, indent=2)
            )


if __name__ == "__main__":
    main()

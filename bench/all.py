"""The one performance table of issue 15: every benchmark's rows, each beside its reference from the same run.

Run by hand from the repository root (a full run takes a while; the machine should be otherwise idle):

    .venv/bin/python -m bench.all [--only ingest,send_results,...] [--counts 300,3000] [--slices 300]
        [--out build/bench-table.txt]

Calls ``rows()`` of each benchmark module in turn (:data:`BENCHMARKS`, in that order), passing the
options its signature takes (``counts``, ``count``, ``slices``), and prints one table
(:func:`bench.report.format_table`), also written to ``--out``. A module without ``rows()``, one that
cannot be imported (torch missing, say) or one whose run fails gives a row saying so, and the others
still run. dcmtk and Orthanc run with ``TCP_NODELAY=1`` (set here when not set).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import os
import platform
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.report import Row, format_table

BENCHMARKS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("ingest", ("bench.ingest",)),
    ("stow_ingest", ("bench.stow_ingest",)),
    ("early_completion", ("bench.early_completion",)),
    ("turnaround", ("bench.turnaround", "bench.e2e_latency")),
    ("encode_objects", ("bench.encode_objects",)),
    ("send_results", ("bench.send_results",)),
    ("model_inference", ("bench.model_inference",)),
)
"""(name for ``--only``, the modules that may hold its ``rows()``: the first that has one is used)."""


def missing(name: str, why: str) -> Row:
    """A row saying the benchmark gave no figure (no value: NaN)."""
    return Row(f"{name}: no figure", float("nan"), "", note=f"{name}: {why}")


def find_rows(name: str, modules: tuple[str, ...]) -> Callable[..., list[Row]] | Row:
    """The ``rows`` function of the first of ``modules`` that has one, else a row saying why there is none."""
    problems: list[str] = []
    for module_name in modules:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:
                continue  # that module does not exist (yet)
            problems.append(f"{module_name} cannot be imported ({exc})")
            continue
        except Exception as exc:
            problems.append(f"{module_name} cannot be imported ({type(exc).__name__}: {exc})")
            continue
        rows = getattr(module, "rows", None)
        if callable(rows):
            return rows
        problems.append(f"{module_name} has no rows() yet")
    return missing(name, "; ".join(problems) or f"none of {', '.join(modules)} exists")


def call_rows(rows: Callable[..., list[Row]], options: dict[str, Any]) -> list[Row]:
    """``rows(**the options its signature names)``."""
    params = inspect.signature(rows).parameters
    return rows(**{k: v for k, v in options.items() if k in params})


def run(names: list[str], options: dict[str, Any]) -> list[Row]:
    """Every selected benchmark's rows, in :data:`BENCHMARKS` order; a failure is a row, not an exception."""
    table: list[Row] = []
    for name, modules in BENCHMARKS:
        if name not in names:
            continue
        found = find_rows(name, modules)
        if isinstance(found, Row):
            table.append(found)
            continue
        t0 = time.monotonic()
        print(f"== {name} ...", flush=True)
        try:
            got = call_rows(found, options)
        except Exception as exc:  # one broken benchmark must not lose the others' figures
            traceback.print_exc()
            got = [missing(name, f"failed: {type(exc).__name__}: {str(exc)[:300]}")]
        print(f"== {name}: {len(got)} row(s) in {time.monotonic() - t0:.0f} s", flush=True)
        table.extend(got)
    return table


def machine() -> str:
    load = os.getloadavg()
    return (f"{platform.node()}: {os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), "
            f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


def main(argv: list[str] | None = None) -> None:
    names = [name for name, _ in BENCHMARKS]
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--only", default="", help=f"comma-separated subset of: {', '.join(names)}")
    parser.add_argument("--counts", default="300,3000", help="instances per ingest run, comma separated")
    parser.add_argument("--slices", type=int, default=300, help="slices of the CT series of the other benchmarks")
    parser.add_argument("--out", type=Path, default=None, help="also write the table to this file")
    args = parser.parse_args(argv)
    only = [n.strip() for n in args.only.split(",") if n.strip()] or names
    unknown = sorted(set(only) - set(names))
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(names)}")
    counts = tuple(int(c) for c in args.counts.split(",") if c.strip())
    os.environ.setdefault("TCP_NODELAY", "1")  # dcmtk and Orthanc honour it (node/nodelay.py says why)
    before = machine()
    started = time.monotonic()
    table = run(only, {"counts": counts, "count": args.slices, "slices": args.slices})
    text = "\n".join([f"before: {before}", format_table(table),
                      f"after:  {machine()}; {time.monotonic() - started:.0f} s in all"])
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()

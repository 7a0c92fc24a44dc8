"""pytest configuration for bench/ (pytest-benchmark suites; tests/ is untouched).

Makes bench/ helpers importable and, when pyfork is not installed into the
interpreter, the checkout itself, so `pytest bench/ --benchmark-only` works
both before and after `pip install -e .`.
"""
import os
import sys

import pytest

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH_DIR)

import benchlib  # noqa: E402

try:
    import pyfork  # noqa: F401
except ImportError:
    sys.path.insert(0, benchlib.REPO_DIR)


@pytest.fixture(scope="session")
def floor_build():
    """(executable, shared library) of bench/floor.c, or skip when there is no compiler."""
    try:
        return benchlib.build_floor()
    except benchlib.Unavailable as e:
        pytest.skip(str(e))


def pytest_terminal_summary(terminalreporter):
    """The figure pytest-benchmark's table cannot show: primary CPU per connection."""
    rows = benchlib.DISPATCH_SUMMARY
    if not rows:
        return
    tr = terminalreporter
    tr.section("primary CPU per dispatched connection (µs, /proc/<pid>/schedstat)")
    tr.write_line(f"{'client concurrency':>18}  {'target':>8}  {'µs/conn':>8}  {'× floor':>8}  {'× python':>8}")
    for conc in sorted({c for c, _ in rows}):
        floor, pure = rows.get((conc, "floor")), rows.get((conc, "python"))
        for target in ("floor", "c", "python"):
            v = rows.get((conc, target))
            if v is None:
                continue
            xf = f"{v / floor:.2f}" if floor else "-"
            xp = f"{v / pure:.2f}" if pure else "-"
            tr.write_line(f"{conc:>18}  {target:>8}  {v:>8.2f}  {xf:>8}  {xp:>8}")
    tr.write_line("targets (under load, bench/README.md): c <= 0.5 x python and c <= 1.25 x floor; "
                  "see bench/primary_cpu.py for the wrk-load figure")

#!/usr/bin/env python3
"""What rvgahp's top-level imports cost a session start, under each CPython present.

    python3 bench/import_costs.py [--runs N] [MODULE ...]

Each interpreter starts as the client does (-I -S), imports the modules every process of
rvgahp needs, then MODULE; the figure is the median wall time of N starts, minus the
median of N starts that stop before MODULE, taken in alternation so load hits both
alike. The default MODULEs are those rvgahp.py imports lazily, and those it used to.
Prints figures; asserts nothing.
"""

import argparse
import glob
import os
import statistics
import subprocess
import time

BASE = "import errno, fcntl, heapq, os, pwd, resource, select, socket, stat, struct, sys, time, collections"
LAZY = ["signal", "json", "argparse", "traceback", "threading", "ctypes", "selectors"]
OLD_BASE = "import _socket, errno, posix, stat, struct, sys, time"


def interpreters():
    found = []
    for path in sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.*/bin/python3"))):
        found.append(path)
    return found or ["python3"]


def wall(python, code, runs):
    """The median wall time, in ms, of `python -I -S -c code`."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run([python, "-I", "-S", "-c", code], check=True)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def alternating(python, a, b, runs):
    """Medians of a and b, run in alternation, in ms."""
    ta, tb = [], []
    for _ in range(runs):
        ta.append(wall(python, a, 1))
        tb.append(wall(python, b, 1))
    return statistics.median(ta), statistics.median(tb)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=31)
    parser.add_argument("modules", nargs="*")
    args = parser.parse_args()
    print("median wall ms of a start (-I -S), %d runs each, in alternation" % args.runs)
    for python in interpreters():
        version = subprocess.run([python, "-c", "import sys; print(sys.version.split()[0])"], capture_output=True, text=True).stdout.strip()
        old, new = alternating(python, OLD_BASE, BASE, args.runs)
        print(
            "%-8s rvgahp's imports before (os on first use, _socket): %.1f; ordinary imports: %.1f; +%.1f ms"
            % (version, old, new, new - old)
        )
        for module in args.modules or LAZY:
            base, more = alternating(python, BASE, BASE + ", " + module, args.runs)
            print("%-8s   + %-10s %+.1f ms" % (version, module, more - base))


if __name__ == "__main__":
    main()

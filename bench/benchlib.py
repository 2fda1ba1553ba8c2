"""Helpers that bench.py, faults.py and tunnel.py share: one copy of each.

- progress lines on stderr, with the seconds since the run began;
- statistics (median, p90, min, max) and plain-text tables;
- what ran: interpreter versions, the sshd's banner, the ssh client, the rvgahp.py measured;
- the processes' own CPU time from /proc, and syscall counts from `strace -c`;
- ending the processes a run left behind (only ones that name our own temp paths).

Nothing here asserts a timing: the scripts print figures.
"""

import contextlib
import hashlib
import math
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from testbed import loopback  # noqa: E402  (the real parts the tests use too)

MB = 1000 * 1000
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class Progress:
    """Progress goes to stderr, stamped with the seconds since the run began; tables go to stdout."""

    def __init__(self, name):
        self.name = name
        self.started = time.monotonic()

    def __call__(self, message):
        sys.stderr.write("[%s %6.1f s] %s\n" % (self.name, time.monotonic() - self.started, message))
        sys.stderr.flush()


# --------------------------------------------------------------------------- statistics


def percentile(values, q):
    """Nearest-rank percentile: the smallest value with at least q of the values at or below it."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def summary(values, scale=1.0):
    """n, median, p90, min and max of the values that are not None (scaled); None if there are none."""
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {
        "n": len(values),
        "median": statistics.median(values) * scale,
        "p90": percentile(values, 0.9) * scale,
        "min": min(values) * scale,
        "max": max(values) * scale,
    }


def table(headers, rows):
    """Left-aligned columns, two spaces apart, with a rule under the headers."""
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    out = ["  ".join(str(h).ljust(w) for h, w in zip(headers, widths)).rstrip()]
    out.append("  ".join("-" * w for w in widths))
    for row in rows:
        out.append("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
    return "\n".join(out)


# --------------------------------------------------------------------------- what ran


def exe_of(pid):
    try:
        return os.readlink("/proc/%d/exe" % pid)
    except (OSError, TypeError):
        return "?"


def python_version(exe):
    try:
        out = subprocess.run([exe, "-c", "import platform; print(platform.python_version())"], capture_output=True, text=True, timeout=20)
        return out.stdout.strip() or "?"
    except (OSError, subprocess.TimeoutExpired):
        return "?"


def real_python(python):
    """The interpreter a command name really runs (a pyenv shim is a script that execs one)."""
    out = subprocess.run([python, "-c", "import sys; print(sys.executable)"], capture_output=True, text=True, timeout=30)
    if out.returncode != 0 or not out.stdout.strip():
        raise SystemExit("cannot run %s: %s" % (python, out.stderr.strip()))
    return out.stdout.strip()


def sshd_banner(port):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            return s.recv(256).decode(errors="replace").strip()
    except OSError as e:
        return "? (%s)" % e


def ssh_version():
    try:
        out = subprocess.run(["ssh", "-V"], capture_output=True, text=True, timeout=10)
        return (out.stderr or out.stdout).strip()
    except (OSError, subprocess.TimeoutExpired):
        return "?"


def load_average():
    """The machine is shared: a high load explains odd figures."""
    try:
        return "%.2f %.2f %.2f (1, 5, 15 min)" % os.getloadavg()
    except OSError:
        return "?"


def cpu_flags():
    """The flags of the first CPU in /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def rvgahp_source(path=loopback.RVGAHP):
    """Which rvgahp.py was measured: it changes often, so name it by hash, and say whether it is
    HEAD's, the working tree's (with uncommitted changes) or another file."""

    def digest(data):
        return hashlib.sha256(data).hexdigest()[:12]

    def git(*args):
        try:
            out = subprocess.run(["git", "-C", REPO, *args], capture_output=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout if out.returncode == 0 else None

    with open(path, "rb") as f:
        measured = digest(f.read())
    commit = (git("rev-parse", "--short", "HEAD") or b"?").decode().strip()
    head = git("show", "HEAD:rvgahp.py")
    try:
        with open(loopback.RVGAHP, "rb") as f:
            tree = digest(f.read())
    except OSError:
        tree = None
    if head is not None and digest(head) == measured:
        where = "HEAD %s" % commit
    elif tree == measured:
        where = "the working tree: HEAD %s with uncommitted changes" % commit
    else:
        where = "neither HEAD %s nor the working tree" % commit
    return "sha256 %s... (%s)" % (measured, where)


# One copy of it, in the loopback: a file's text, or "" while it does not exist yet.
read_text = loopback.read_text


def busy_processes(count=6, exclude=()):
    """The processes that used the most CPU over the last second: who else was on the machine."""

    def ticks():
        found = {}
        for name in os.listdir("/proc"):
            if name.isdigit() and int(name) not in exclude:
                with contextlib.suppress(OSError, IndexError, ValueError):
                    with open("/proc/%s/stat" % name) as f:
                        fields = f.read().rsplit(")", 1)[1].split()
                    found[int(name)] = int(fields[11]) + int(fields[12])
        return found

    before = ticks()
    time.sleep(1.0)
    after = ticks()
    used = sorted(((after[p] - before.get(p, 0), p) for p in after), reverse=True)[:count]
    out = []
    for spent, pid in used:
        words = loopback.cmdline(pid)
        if spent <= 0 or not words:
            continue
        name = " ".join(" ".join(os.path.basename(w) if i == 0 else w for i, w in enumerate(words[:3])).split())[:60]
        out.append("%d%% %s" % (round(100.0 * spent / CLOCK_TICKS), name or "?"))
    return ", ".join(out) or "nothing busy"


# --------------------------------------------------------------------------- CPU time and syscalls


def cpu_seconds(pids):
    """utime + stime of these processes, from their own /proc/PID/stat (all threads); gone ones count 0."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError, IndexError, ValueError):
            with open("/proc/%d/stat" % pid) as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
    return total / CLOCK_TICKS


def ancestors(pid, stop):
    """pid's ancestors, nearest first, up to but not including stop (or init)."""
    chain = []
    parent = loopback.parent_of(pid)
    while parent and parent not in (stop, 1) and len(chain) < 20:
        chain.append(parent)
        parent = loopback.parent_of(parent)
    return chain


class Strace:
    """`strace -c -f -p PID` on each named process while a block runs: syscalls counted, not timed."""

    def __init__(self, pids):
        self.pids = dict(pids)  # name -> pid
        self.dir = tempfile.mkdtemp(prefix="strace", dir="/tmp")
        self.procs = {}

    @staticmethod
    def available():
        return bool(shutil.which("strace"))

    def __enter__(self):
        for name, pid in self.pids.items():
            out = os.path.join(self.dir, name)
            proc = subprocess.Popen(["strace", "-c", "-f", "-p", str(pid), "-o", out], stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
            self.procs[name] = proc
        for name, proc in self.procs.items():
            # strace says "Process N attached" on stderr once it is tracing.
            line = proc.stderr.readline().decode(errors="replace")
            if "attached" not in line:
                raise RuntimeError("strace -p %d: %s" % (self.pids[name], line.strip() or "no output"))
        return self

    def __exit__(self, *exc):
        for proc in self.procs.values():
            with contextlib.suppress(OSError):
                proc.send_signal(signal.SIGINT)
        for proc in self.procs.values():
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            proc.stderr.close()
        return False

    def counts(self):
        """{name: {"calls": total, "top": [(syscall, calls), ...]}} from strace's summary tables."""
        found = {}
        for name in self.pids:
            calls, rows = 0, []
            for line in read_text(os.path.join(self.dir, name)).splitlines():
                words = line.split()
                if len(words) >= 5 and words[-1] == "total":
                    calls = int(words[3])
                elif len(words) >= 5 and re.match(r"^[\d.]+$", words[0]) and words[3].isdigit():
                    rows.append((words[-1], int(words[3])))
            found[name] = {"calls": calls, "top": sorted(rows, key=lambda r: -r[1])[:5]}
        shutil.rmtree(self.dir, ignore_errors=True)
        return found


# --------------------------------------------------------------------------- cleaning up


def leftovers(markers, but=()):
    """Live (not zombie) processes whose command line names one of our temp paths: ours by construction."""
    found = {pid for marker in markers for pid in loopback.pids_running(marker)}
    return sorted(p for p in found if p not in but and loopback.process_state(p) not in (None, "Z"))


def end_leftovers(markers, grace=5.0, but=(), sig=signal.SIGTERM):
    """Give our processes `grace` seconds to end on their own, then signal the rest; [(pid, command)]."""
    deadline = time.monotonic() + grace
    while True:
        strays = leftovers(markers, but)
        if not strays or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    ended = [(pid, " ".join(loopback.cmdline(pid))[:200]) for pid in strays]
    for pid in strays:
        with contextlib.suppress(OSError):
            os.kill(pid, sig)
    return ended


def interpreter_line():
    return "%s (%s)" % (sys.executable, platform.python_version())

#!/usr/bin/env python3
"""Benchmark: reaching a GAHP directly, over plain ssh, and through rvgahp, side by side.

    python3 bench/bench.py [--quick] [--python PATH] [--json FILE] [--no-pyz] [--logs DIR]

One run starts its own sshd on 127.0.0.1 (tests/harness.py) and measures, for each way
of reaching the test GAHP:

    direct        the GAHP spawned locally as a subprocess: the floor
    plain ssh     `ssh host GAHP` per session, as HTCondor's stock remote_gahp does
    rvgahp        rvgahp_client -> rvgahp_proxy -> one ssh link -> rvgahp_server -> GAHP,
                  with rvgahp.py run by --python (default: the interpreter behind python3)
    rvgahp (pyz)  the same through rvgahp.pyz built by build_zipapp.sh, run by its shebang
                  (only when shiv is importable; --no-pyz skips it)

The figures: session start (back to back, and 50 at once), the round trip of one small
command, throughput each way, and the submit host's memory per extra session. Timings are
reported, never asserted; the targets table says PASS or MISS. The machine is shared and
noisy, so medians and p90s are quoted and the modes are interleaved where that is cheap.

Every mode runs the same GAHP: a copy of tests/testgahp.py whose shebang names this
script's own interpreter, so no mode pays for a `/usr/bin/env` lookup or a pyenv shim
and all of them run the same Python for the GAHP.
"""

import argparse
import contextlib
import hashlib
import json
import math
import os
import platform
import selectors
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))
import harness  # noqa: E402

MB = 1000 * 1000
BURST = 50  # sessions started at once
BURST_TIMEOUT = 30.0  # a session with no banner this long after its spawn has failed
WARMUP_SESSIONS = 2
RT_WARMUP = 200
RT_COUNT = 2000
SETTLE = 0.5  # pause between bursts, so one mode's teardown does not load the next
STARTED = time.monotonic()


def log(message):
    """Progress goes to stderr; the tables go to stdout."""
    sys.stderr.write("[bench %6.1f s] %s\n" % (time.monotonic() - STARTED, message))
    sys.stderr.flush()


# --------------------------------------------------------------------------- statistics


def percentile(values, q):
    """Nearest-rank percentile: the smallest value with at least q of the values at or below it."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def summary(values, scale=1.0):
    return {
        "n": len(values),
        "median": statistics.median(values) * scale,
        "p90": percentile(values, 0.9) * scale,
        "min": min(values) * scale,
        "max": max(values) * scale,
    }


# --------------------------------------------------------------------------- sessions

LIVE = []  # every session not yet closed, so cleanup can end them whatever happened


def open_session(mode):
    """(session, spawn time) for one new session of mode."""
    t0 = time.monotonic()
    session = harness.GahpSession(mode.argv(), env=mode.env)
    LIVE.append(session)
    return session, t0


def close_session(session, timeout=15):
    """Close stdin as the GridManager does; the exit status, or None if it had to be killed."""
    if session in LIVE:
        LIVE.remove(session)
    try:
        status, _ = session.finish(timeout)
        return status
    except subprocess.TimeoutExpired:
        session.close()
        return None


def close_all_sessions():
    while LIVE:
        session = LIVE.pop()
        with contextlib.suppress(Exception):
            session.close()


def memory_kb(pid, field):
    """A kB figure from /proc: VmRSS from status, Pss from smaps_rollup; 0 if pid is gone."""
    path = "/proc/%d/%s" % (pid, "status" if field == "VmRSS" else "smaps_rollup")
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def exe_of(pid):
    try:
        return os.readlink("/proc/%d/exe" % pid)
    except OSError:
        return "?"


def python_version(exe):
    try:
        out = subprocess.run([exe, "-V"], capture_output=True, text=True, timeout=10)
        return (out.stdout or out.stderr).split()[-1]
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return "?"


# --------------------------------------------------------------------------- the modes


class Mode:
    """One way of reaching the GAHP: how to start a session, and what it costs the submit host."""

    key = name = ""
    env = None
    rss_what = ""

    def argv(self):
        raise NotImplementedError

    def submit_pids(self, sessions):
        """The submit host's processes for these open sessions (shared ones included once)."""
        return [s.proc.pid for s in sessions]


class Direct(Mode):
    key, name = "direct", "direct"
    rss_what = "the GAHPs themselves"

    def __init__(self, gahp):
        self.gahp = gahp

    def argv(self):
        return [self.gahp]


class PlainSsh(Mode):
    key, name = "ssh", "plain ssh"
    rss_what = "ssh clients"

    def __init__(self, sshd, gahp):
        self.sshd = sshd
        self.gahp = gahp

    def argv(self):
        return self.sshd.ssh_argv(self.gahp)


class Rvgahp(Mode):
    rss_what = "clients + proxy"

    def __init__(self, key, name, rig):
        self.key, self.name = key, name
        self.rig = rig

    def argv(self):
        return self.rig.client_argv("blahpd")

    def proxy_pids(self):
        """The rvgahp_proxy serving our socket: a Python process with the socket path in its argv.

        The ssh client of the transport has the same words in its command line, so the
        match is on the interpreter as well.
        """
        found = []
        for pid in harness.pids_running("rvgahp_proxy"):
            try:
                with open("/proc/%d/cmdline" % pid, "rb") as f:
                    args = f.read().decode(errors="replace").split("\0")
            except OSError:
                continue
            if self.rig.sock in args and os.path.basename(exe_of(pid)).startswith("python"):
                found.append(pid)
        return found

    def submit_pids(self, sessions):
        return [s.proc.pid for s in sessions] + self.proxy_pids()


# --------------------------------------------------------------------------- measurements


def start_once(mode):
    """Seconds from spawning a session to its banner; the session is closed before returning."""
    session, t0 = open_session(mode)
    try:
        banner = session.banner(timeout=BURST_TIMEOUT)
        elapsed = time.monotonic() - t0
        if not banner.startswith("$GahpVersion"):
            raise RuntimeError("not a banner: %r" % banner[:80])
    finally:
        status = close_session(session)
    if status != 0:
        raise RuntimeError("the session exited with status %s" % status)
    return elapsed


def back_to_back(modes, count):
    """Round robin over the modes, so a noisy stretch of time hits them all alike."""
    samples = {m.key: [] for m in modes}
    errors = {}
    for _ in range(count):
        for mode in modes:
            if mode.key in errors:
                continue
            try:
                samples[mode.key].append(start_once(mode))
            except Exception as e:
                errors[mode.key] = "%s: %s" % (type(e).__name__, e)
    results = {}
    for mode in modes:
        if mode.key in errors:
            results[mode.key] = {"error": errors[mode.key], "done": len(samples[mode.key])}
        else:
            results[mode.key] = summary(samples[mode.key], 1000.0)
    return results


def collect_banners(spawned, timeout):
    """Read every session's banner at once; ({index: latency s}, {index: reason})."""
    latencies, failures = {}, {}
    selector = selectors.DefaultSelector()
    for i, (session, t0) in enumerate(spawned):
        selector.register(session.proc.stdout.fileno(), selectors.EVENT_READ, (i, session, t0))
    deadline = spawned[-1][1] + timeout
    try:
        while selector.get_map():
            left = deadline - time.monotonic()
            if left <= 0:
                break
            for key, _ in selector.select(left):
                i, session, t0 = key.data
                data = os.read(key.fd, 65536)
                now = time.monotonic()
                if not data:
                    selector.unregister(key.fd)
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        session.proc.wait(2)
                    failures[i] = "exited (%s) before its banner: %s" % (session.proc.returncode, session.stderr_text().strip()[:200])
                    continue
                session.buf += data
                if b"\n" in session.buf:
                    selector.unregister(key.fd)
                    line, session.buf = session.buf.split(b"\n", 1)
                    if not line.startswith(b"$GahpVersion"):
                        failures[i] = "not a banner: %r" % line[:80]
                    elif now - t0 > timeout:
                        failures[i] = "banner after %.1f s" % (now - t0)
                    else:
                        latencies[i] = now - t0
        for key in list(selector.get_map().values()):
            failures[key.data[0]] = "no banner within %g s" % timeout
    finally:
        selector.close()
    return latencies, failures


def burst(mode, count):
    """One session open, then `count` more started at once: start-up under load, and memory per session."""
    base, _ = open_session(mode)
    base.banner(timeout=BURST_TIMEOUT)
    time.sleep(0.2)  # let the first session's processes settle before weighing them
    pids1 = mode.submit_pids([base])
    rss1 = sum(memory_kb(p, "VmRSS") for p in pids1)
    pss1 = sum(memory_kb(p, "Pss") for p in pids1)

    first = time.monotonic()
    spawned = [open_session(mode) for _ in range(count)]
    latencies, failures = collect_banners(spawned, BURST_TIMEOUT)
    all_in = time.monotonic() - first

    ok = [spawned[i][0] for i in sorted(latencies)]
    pids = mode.submit_pids([base, *ok])
    rss = sum(memory_kb(p, "VmRSS") for p in pids)
    pss = sum(memory_kb(p, "Pss") for p in pids)

    for session, _ in spawned:
        with contextlib.suppress(OSError):
            session.proc.stdin.close()  # all at once, as a GridManager restart would
    for i, (session, _) in enumerate(spawned):
        status = close_session(session, timeout=30)
        if status != 0 and i not in failures:
            failures[i] = "exit status %s at close" % status
    close_session(base)

    result = {
        "n": count,
        "failures": len(failures),
        "failure_reasons": sorted(set(failures.values()))[:5],
        "all_banners_s": all_in if not failures else None,
        "processes_weighed": len(pids),
    }
    if latencies:
        result.update({"per_session_" + k: v for k, v in summary(list(latencies.values()), 1000.0).items()})
    memory = {"what": mode.rss_what, "total1_mb": rss1 * 1024 / MB, "total_mb": rss * 1024 / MB, "extra_sessions": len(ok)}
    if ok:
        memory["per_session_mb"] = (rss - rss1) * 1024 / MB / len(ok)
        memory["pss_per_session_mb"] = (pss - pss1) * 1024 / MB / len(ok)
    return result, memory


def round_trips(session, count):
    """Seconds for each of count `ECHO hello` -> `S hello` round trips."""
    times = []
    for _ in range(count):
        t0 = time.perf_counter()
        reply = session.command("ECHO hello")
        times.append(time.perf_counter() - t0)
        if reply != "S hello":
            raise RuntimeError("ECHO answered %r" % reply)
    return times


def download(session, nbytes, timeout):
    """MB/s for FLOOD nbytes, from the command to the last byte; the lines are counted too."""
    t0 = time.perf_counter()
    session.send("FLOOD %d" % nbytes)
    reply = session.readline()
    if reply != "S":
        raise RuntimeError("FLOOD answered %r" % reply)
    got, newlines = len(session.buf), session.buf.count(b"\n")
    session.buf = b""
    fd = session.proc.stdout.fileno()
    deadline = time.monotonic() + timeout
    while got < nbytes:
        left = deadline - time.monotonic()
        if left <= 0:
            raise RuntimeError("only %d of %d bytes within %g s" % (got, nbytes, timeout))
        if session.selector.select(left):
            data = os.read(fd, 1 << 20)
            if not data:
                raise RuntimeError("EOF after %d of %d bytes" % (got, nbytes))
            got += len(data)
            newlines += data.count(b"\n")
    elapsed = time.perf_counter() - t0
    if got != nbytes or newlines != nbytes // 1024:
        raise RuntimeError("got %d bytes and %d lines, expected %d and %d" % (got, newlines, nbytes, nbytes // 1024))
    return nbytes / elapsed / MB


def upload(session, nbytes, timeout):
    """MB/s for SINK nbytes: a thread writes the bytes while we wait for the `S N` reply."""
    chunk = memoryview(b"\0" * (1 << 20))
    fd = session.proc.stdin.fileno()
    trouble = []

    def write_all():
        left = nbytes
        try:
            while left:
                left -= os.write(fd, chunk[: min(left, len(chunk))])
        except OSError as e:
            trouble.append(e)

    t0 = time.perf_counter()
    session.send("SINK %d" % nbytes)
    writer = threading.Thread(target=write_all, daemon=True)
    writer.start()
    try:
        reply = session.readline(timeout)
    except AssertionError as e:
        raise RuntimeError(str(e))
    elapsed = time.perf_counter() - t0
    writer.join(timeout)
    if trouble:
        raise RuntimeError("writing stdin: %s" % trouble[0])
    if reply != "S %d" % nbytes:
        raise RuntimeError("SINK answered %r" % reply)
    return nbytes / elapsed / MB


def stream_figures(modes, nbytes, repeats):
    """Round trips, then download, then upload, on one session per mode.

    The modes take turns (blocks of round trips, one transfer each), so a noisy stretch
    of time hits them all alike; throughput is the median of `repeats` transfers. A mode
    whose session fails stops there: its stream is in an unknown state.
    """
    sessions = {}
    figures = {m.key: {} for m in modes}
    rtts = {m.key: [] for m in modes}
    rates = {m.key: {"download_mbps": [], "upload_mbps": []} for m in modes}
    broken = set()

    def turn(figure, run):
        """run(mode, session) for every mode still working; an error ends that mode."""
        for mode in modes:
            if mode.key in broken:
                continue
            try:
                run(mode, sessions[mode.key])
            except Exception as e:
                broken.add(mode.key)
                figures[mode.key][figure] = {"error": "%s: %s" % (type(e).__name__, e)}

    for mode in modes:
        sessions[mode.key], _ = open_session(mode)
    turn("rtt_us", lambda mode, s: (s.banner(timeout=BURST_TIMEOUT), round_trips(s, RT_WARMUP)))
    blocks = 4
    for _ in range(blocks):
        turn("rtt_us", lambda mode, s: rtts[mode.key].extend(round_trips(s, RT_COUNT // blocks)))
    for _ in range(repeats):
        turn("download_mbps", lambda mode, s: rates[mode.key]["download_mbps"].append(download(s, nbytes, 120)))
    for _ in range(repeats):
        turn("upload_mbps", lambda mode, s: rates[mode.key]["upload_mbps"].append(upload(s, nbytes, 120)))

    for mode in modes:
        status = close_session(sessions[mode.key], timeout=30)
        if status != 0:
            figures[mode.key]["close_status"] = status
        if mode.key not in broken:
            figures[mode.key]["rtt_us"] = summary(rtts[mode.key], 1e6)
            for figure, values in rates[mode.key].items():
                figures[mode.key][figure] = statistics.median(values)
                figures[mode.key][figure + "_all"] = values
    return figures


# --------------------------------------------------------------------------- set-up


def real_python(python):
    """The interpreter a command name really runs (a pyenv shim is a script that execs one)."""
    out = subprocess.run([python, "-c", "import sys; print(sys.executable)"], capture_output=True, text=True, timeout=30)
    if out.returncode != 0 or not out.stdout.strip():
        raise SystemExit("bench: cannot run %s: %s" % (python, out.stderr.strip()))
    return out.stdout.strip()


def write_gahp(directory):
    """tests/testgahp.py with this interpreter in its shebang: one exec, same Python in every mode."""
    with open(os.path.join(REPO, "tests", "testgahp.py")) as f:
        text = f.read()
    path = os.path.join(directory, "testgahp.py")
    with open(path, "w") as f:
        if text.startswith("#!"):
            text = text.split("\n", 1)[1]
        f.write("#!%s\n%s" % (sys.executable, text))
    os.chmod(path, 0o755)
    return path


def sshd_version(sshd):
    with socket.create_connection(("127.0.0.1", sshd.port), timeout=5) as s:
        return s.recv(256).decode(errors="replace").strip()


def shiv_available():
    try:
        import shiv  # noqa: F401
    except ImportError:
        return False
    return True


def build_pyz(directory):
    out = os.path.join(directory, "rvgahp.pyz")
    result = subprocess.run(
        [os.path.join(REPO, "build_zipapp.sh"), out],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, PYTHON=sys.executable),
    )
    if result.returncode != 0:
        raise RuntimeError("build_zipapp.sh failed: %s" % (result.stderr.strip() or result.stdout.strip()))
    return out


def role_interpreters(mode):
    """What each rvgahp role actually runs under, read from /proc of live processes."""
    session, _ = open_session(mode)
    try:
        session.banner(timeout=BURST_TIMEOUT)
        exes = {
            "server": exe_of(mode.rig.server.pid),
            "proxy": ", ".join(exe_of(p) for p in mode.proxy_pids()) or "?",
            "client": exe_of(session.proc.pid),
        }
    finally:
        close_session(session)
    return {role: "%s (%s)" % (exe, python_version(exe)) if exe != "?" else exe for role, exe in exes.items()}


def median_run_ms(argv, runs=5):
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=30)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def startup_costs(role_python, rv_modes):
    """What an interpreter start and a client start cost here: the floor under session start."""
    pythons = {"GAHP Python": sys.executable}
    if os.path.realpath(role_python) != os.path.realpath(sys.executable):
        pythons["--python"] = role_python
    text = {}
    for label, exe in pythons.items():
        plain = median_run_ms([exe, "-c", "pass"])
        bare = median_run_ms([exe, "-I", "-S", "-c", "pass"])
        text[label] = "`-c pass` %.0f ms, `-I -S -c pass` %.0f ms (the difference is site-packages)" % (plain, bare)
    for mode in rv_modes:
        text["%s client" % mode.name] = "`rvgahp_client --version` %.0f ms" % median_run_ms(mode.rig.flavor.argv("client", "--version"))
    return text


def log_findings(path, pid=None):
    """Lines in an rvgahp log that say something went wrong, and how often the link came up."""
    notable = (
        "internal error",
        "error",
        "refused",
        "traceback",
        "ignored eof",
        "sigkill",
        "link down",
        "link attempt failed",
        "lost",
        "overran",
        "cannot",
    )
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return {"path": path, "lines": 0, "links_up": 0, "notable": []}
    found = [line for line in lines if any(word in line.lower() for word in notable)]
    return {
        "path": path,
        "lines": len(lines),
        "links_up": sum(1 for line in lines if "link up" in line and (pid is None or "[%d]" % pid in line)),
        "notable_count": len(found),
        "notable": found[:8],
    }


def reap_strays(markers, timeout=5.0):
    """After cleanup, end any process still naming one of our temp paths (ours by construction)."""
    deadline = time.monotonic() + timeout
    while True:
        strays = sorted({pid for marker in markers for pid in harness.pids_running(marker)})
        if not strays or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    for pid in strays:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGTERM)
    if strays:
        log("sent SIGTERM to stray processes %s" % strays)


# --------------------------------------------------------------------------- report

LABEL = 46
COLUMN = 18


def cell(value, fmt, baseline=None):
    if value is None:
        return "-"
    if isinstance(value, dict) and "error" in value:
        return "ERROR"
    text = fmt % value
    if baseline:
        text += " x%.2f" % (value / baseline)
    return text


def table_row(label, cells):
    return label.ljust(LABEL) + "".join(str(c).rjust(COLUMN) for c in cells)


def dig(figures, *path):
    value = figures
    for key in path:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value


def report(results, modes, params, env):
    keys = [m.key for m in modes]
    out = []
    out.append("rvgahp benchmark: %s mode, %d back-to-back starts, %d at once, %d round trips, %d MB each way" % params_line(params))
    out.append("")
    for name, value in env.items():
        if isinstance(value, dict):
            out.append("%s:" % name)
            width = max(len(k) for k in value)
            for role, text in value.items():
                out.append("    %s  %s" % (role.ljust(width), text))
        else:
            out.append("%s: %s" % (name, value))
    out.append("")
    out.append("(xR) after a figure is its ratio to plain ssh, the stock remote_gahp.")
    out.append(table_row("", [m.name for m in modes]))
    out.append("-" * (LABEL + COLUMN * len(modes)))

    def row(label, path, fmt, ratio=True):
        ssh = dig(results, "ssh", *path) if ratio else None
        cells = []
        for key in keys:
            source = dig(results, key, path[0])
            if isinstance(source, dict) and "error" in source:
                cells.append("ERROR")
                continue
            value = dig(results, key, *path)
            cells.append(cell(value, fmt, ssh if (ratio and key != "ssh" and isinstance(value, (int, float))) else None))
        out.append(table_row(label, cells))

    out.append("session start, back to back (ms)")
    row("  median", ("start_b2b", "median"), "%.1f")
    row("  p90", ("start_b2b", "p90"), "%.1f")
    out.append("session start, %d at once" % params["burst"])
    row("  failures", ("burst", "failures"), "%d", ratio=False)
    row("  until all banners (s)", ("burst", "all_banners_s"), "%.2f")
    row("  per session, median (ms)", ("burst", "per_session_median"), "%.0f")
    row("  per session, p90 (ms)", ("burst", "per_session_p90"), "%.0f")
    out.append("round trip, ECHO hello (us)")
    row("  median", ("rtt_us", "median"), "%.0f")
    row("  p90", ("rtt_us", "p90"), "%.0f")
    out.append("throughput, median of %d (MB/s, 1 MB = 10^6 bytes)" % params["repeats"])
    row("  download, FLOOD %d MB" % (params["bytes"] // MB), ("download_mbps",), "%.0f")
    row("  upload, SINK %d MB" % (params["bytes"] // MB), ("upload_mbps",), "%.0f")
    out.append("submit host memory per extra session (MB)")
    out.append(table_row("  what is weighed", [dig(results, k, "memory", "what") or "-" for k in keys]))
    row("  VmRSS, (51 open - 1 open) / 50", ("memory", "per_session_mb"), "%.1f")
    row("  Pss, the same", ("memory", "pss_per_session_mb"), "%.1f")
    row("  VmRSS total with 1 open", ("memory", "total1_mb"), "%.1f", ratio=False)

    errors = [(k, name, dig(results, k, name)) for k in keys for name in results.get(k, {})]
    problems = [(k, n, v["error"]) for k, n, v in errors if isinstance(v, dict) and "error" in v]
    reasons = [(k, r) for k in keys for r in dig(results, k, "burst", "failure_reasons") or []]
    if problems or reasons:
        out.append("")
        out.append("errors and failures:")
        for key, name, text in problems:
            out.append("  %s, %s: %s" % (key, name, text))
        for key, text in reasons:
            out.append("  %s, burst: %s" % (key, text))

    out.append("")
    out.append(targets_table(results, [m for m in modes if isinstance(m, Rvgahp)]))
    return "\n".join(out)


def params_line(params):
    return (params["mode"], params["sessions"], params["burst"], params["round_trips"], params["bytes"] // MB)


def evaluate_targets(results, key):
    """[(target, figure text, PASS/MISS/n/a)] for one rvgahp column."""

    def get(*path):
        value = dig(results, *path)
        return value if isinstance(value, (int, float)) else None

    rows = []

    def judge(name, figure, limit, ok, fmt):
        if figure is None or limit is None:
            rows.append((name, "n/a", "n/a"))
        else:
            rows.append((name, fmt % (figure, limit), "PASS" if ok(figure, limit) else "MISS"))

    direct_p90 = get("direct", "start_b2b", "p90")
    judge(
        "session start p90 <= direct p90 + 20 ms",
        get(key, "start_b2b", "p90"),
        None if direct_p90 is None else direct_p90 + 20,
        lambda f, lim: f <= lim,
        "%.1f vs %.1f ms",
    )
    failures = get(key, "burst", "failures")
    judge("%d simultaneous starts, 0 failures" % BURST, failures, 0, lambda f, lim: f == lim, "%d failed (want %d)")
    ssh_rtt = get("ssh", "rtt_us", "median")
    judge(
        "round trip median <= 1.3x plain ssh",
        get(key, "rtt_us", "median"),
        None if ssh_rtt is None else 1.3 * ssh_rtt,
        lambda f, lim: f <= lim,
        "%.0f vs %.0f us",
    )
    for direction in ("download", "upload"):
        ssh_rate = get("ssh", direction + "_mbps")
        judge(
            "%s >= 0.8x plain ssh" % direction,
            get(key, direction + "_mbps"),
            None if ssh_rate is None else 0.8 * ssh_rate,
            lambda f, lim: f >= lim,
            "%.0f vs %.0f MB/s",
        )
    judge(
        "<= 15 MB VmRSS per extra session",
        get(key, "memory", "per_session_mb"),
        15.0,
        lambda f, lim: f <= lim,
        "%.1f vs %.0f MB",
    )
    return rows


def targets_table(results, rv_modes):
    label, width = 40, 32
    lines = ["target".ljust(label) + "".join(("%s: figure vs limit" % m.name).rjust(width) for m in rv_modes)]
    lines.append("-" * (label + width * len(rv_modes)))
    per_mode = [results[m.key]["targets"] for m in rv_modes]
    for i, row in enumerate(per_mode[0] if per_mode else []):
        cells = "".join(("%s  %s" % (rows[i]["figure"], rows[i]["verdict"].ljust(4))).rjust(width) for rows in per_mode)
        lines.append(row["target"].ljust(label) + cells)
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer sessions and 50 MB instead of 200 MB (about a minute)")
    parser.add_argument("--python", default="python3", help="the interpreter that runs rvgahp.py's roles (default: python3)")
    parser.add_argument("--json", metavar="FILE", help="also save the figures here")
    parser.add_argument("--no-pyz", action="store_true", help="skip the rvgahp.pyz column")
    parser.add_argument("--logs", metavar="DIR", help="copy the server, proxy, GAHP and sshd logs here before cleaning up")
    return parser.parse_args(argv)


def set_up(cleanup, args):
    """sshd, the rigs and the modes, each registered with cleanup as soon as it exists."""
    work = harness.short_tempdir("bench")
    cleanup.callback(shutil.rmtree, work, ignore_errors=True)
    ours = [work]  # temp paths that only our processes name
    cleanup.callback(reap_strays, ours)

    python = real_python(args.python)
    gahp = write_gahp(work)
    log("starting sshd")
    sshd = harness.Sshd(os.path.join(work, "sshd"))
    os.makedirs(sshd.dir)
    cleanup.callback(sshd.stop)
    sshd.start()

    modes = [Direct(gahp), PlainSsh(sshd, gahp)]
    flavors = [harness.Flavor("rvgahp.py", python, harness.RVGAHP)]
    if not args.no_pyz and shiv_available():
        log("building rvgahp.pyz")
        try:
            flavors.append(harness.Flavor("rvgahp.pyz", None, build_pyz(work)))
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            log("no pyz column: %s" % e)
    for flavor in flavors:
        cleanup.callback(shutil.rmtree, flavor.bin, ignore_errors=True)
    rigs = []
    for flavor in flavors:
        # rvgahp's default ping settings, not the tests' fast ones.
        rig = harness.Rig(sshd, flavor, gahp=gahp, ping_interval=15, ping_timeout=45)
        cleanup.callback(rig.cleanup)
        ours.append(rig.dir)
        rig.start_server()
        rigs.append(rig)
        key, name = ("rvgahp", "rvgahp") if flavor.python else ("pyz", "rvgahp (pyz)")
        modes.append(Rvgahp(key, name, rig))
    if args.logs:
        cleanup.callback(copy_logs, args.logs, sshd, rigs)
    cleanup.callback(close_all_sessions)  # runs first: sessions end before their servers
    return sshd, modes


def measure(modes, params):
    results = {m.key: {} for m in modes}
    log("session start, back to back: %d rounds over %d modes" % (params["sessions"], len(modes)))
    for key, figures in back_to_back(modes, params["sessions"]).items():
        results[key]["start_b2b"] = figures
    for mode in modes:
        log("%s: %d sessions at once" % (mode.name, BURST))
        try:
            results[mode.key]["burst"], results[mode.key]["memory"] = burst(mode, BURST)
        except Exception as e:
            results[mode.key]["burst"] = {"error": "%s: %s" % (type(e).__name__, e)}
        close_all_sessions()
        time.sleep(SETTLE)
    log("round trips and throughput, the modes taking turns")
    for key, figures in stream_figures(modes, params["bytes"], params["repeats"]).items():
        results[key].update(figures)
    return results


def main(argv=None):
    args = parse_args(argv)
    params = {
        "mode": "quick" if args.quick else "full",
        "sessions": 10 if args.quick else 30,
        "burst": BURST,
        "round_trips": RT_COUNT,
        "bytes": (50 if args.quick else 200) * MB,
        "repeats": 3,
    }
    # SIGTERM and SIGHUP unwind like Ctrl-C does, through the cleanup below.
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, lambda n, _: sys.exit(128 + n))

    with contextlib.ExitStack() as cleanup:
        sshd, modes = set_up(cleanup, args)
        rv_modes = [m for m in modes if isinstance(m, Rvgahp)]
        env = {
            "machine": "%s, %d cores, Linux %s" % (platform.node(), os.cpu_count() or 0, platform.release()),
            "rvgahp.py": measured_source(),
            "sshd": "%s (%s); client %s" % (sshd_version(sshd), harness.find_sshd(), ssh_client_version()),
            "bench and GAHP Python": "%s (%s)" % (sys.executable, platform.python_version()),
            "python3 on PATH": python3_on_path(),
            "load average at start": load_average(),
        }
        log("warming up (%d sessions per mode)" % WARMUP_SESSIONS)
        for mode in modes:
            for _ in range(WARMUP_SESSIONS):
                start_once(mode)
        for mode in rv_modes:
            env["%s roles" % mode.name] = role_interpreters(mode)
        env["start-up costs, median of 5"] = startup_costs(rv_modes[0].rig.flavor.python, rv_modes)

        results = measure(modes, params)

        env["load average at end"] = load_average()
        for mode in rv_modes:
            logs = {"server": log_findings(mode.rig.server_log, mode.rig.server.pid), "proxy": log_findings(mode.rig.proxy_log)}
            results[mode.key]["logs"] = logs
            env["%s logs" % mode.name] = {role: summarize_log(findings) for role, findings in logs.items()}
            results[mode.key]["targets"] = [{"target": t, "figure": f, "verdict": v} for t, f, v in evaluate_targets(results, mode.key)]
        print(report(results, modes, params, env))
        for mode in rv_modes:
            for role, findings in results[mode.key]["logs"].items():
                for line in findings["notable"]:
                    print("  %s %s log: %s" % (mode.name, role, line))
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"params": params, "environment": env, "results": results}, f, indent=2, sort_keys=True)
            log("figures saved to %s" % args.json)
        log("cleaning up")
    log("done")
    return 0


def summarize_log(findings):
    return "%d lines, link up %d time(s), %d notable line(s)" % (findings["lines"], findings["links_up"], findings.get("notable_count", 0))


def measured_source():
    """Which rvgahp.py was measured: it changes often, so name it by hash and commit."""
    with open(harness.RVGAHP, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()[:12]

    def git(*args):
        out = subprocess.run(["git", "-C", REPO, *args], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD") or "?"
    dirty = git("status", "--porcelain", "--", "rvgahp.py")
    return "sha256 %s... (git %s%s)" % (digest, commit, ", with uncommitted changes" if dirty else "")


def load_average():
    """The machine is shared: a high load explains odd figures."""
    return "%.2f %.2f %.2f (1, 5, 15 min)" % os.getloadavg()


def ssh_client_version():
    out = subprocess.run(["ssh", "-V"], capture_output=True, text=True, timeout=10)
    return (out.stderr or out.stdout).strip().split(",")[0]


def python3_on_path():
    path = shutil.which("python3") or "?"
    try:
        with open(path, "rb") as f:
            if f.read(2) == b"#!":
                return "%s (a script that execs an interpreter: the pyz's shebang pays for it)" % path
    except OSError:
        pass
    return path


def copy_logs(directory, sshd, rigs):
    os.makedirs(directory, exist_ok=True)
    shutil.copy(sshd.log, os.path.join(directory, "sshd.log"))
    for rig in rigs:
        name = rig.flavor.name
        for path, label in ((rig.server_log, "server"), (rig.proxy_log, "proxy")):
            if os.path.exists(path):
                shutil.copy(path, os.path.join(directory, "%s.%s.log" % (name, label)))
        stderr_log = os.path.join(rig.dot, "gahp_stderr.log")
        if os.path.exists(stderr_log):
            shutil.copy(stderr_log, os.path.join(directory, "%s.gahp_stderr.log" % name))


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.stderr.write("bench: interrupted; cleaned up\n")
        sys.exit(130)

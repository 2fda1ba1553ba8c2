#!/usr/bin/env python3
"""Benchmark: reaching a GAHP directly, over plain ssh, and through rvgahp, side by side.

    python3 bench/bench.py [--quick] [--only SECTION,...] [--python PATH] [--old-python PATH]
                           [--json FILE] [--logs DIR]

One run starts its own sshd on 127.0.0.1 (tests/loopback.py) and measures, section by
section, against that one sshd and one GAHP:

    start       session start back to back: direct (the GAHP spawned locally), plain ssh
                (`ssh host GAHP`, the stock remote_gahp), and rvgahp as rvgahp.py and as
                rvgahp.pyz (run by its name, as users run it), each under the oldest
                supported CPython (3.6) and the newest; and the pyz starting an ft-gahp
                with CONDOR_INHERIT set, so with its tunnel and `Allocated port` line
    burst       50 sessions started at once; submit-host memory per extra session
    rtt         the round trip of one small command, over 5 or more sessions: the median of
                the per-session rvgahp/ssh ratios, and the CPU per round trip that the
                relaying processes spent (from their own /proc/PID/stat); rvgahp under
                both CPythons, each beside the floor: floor_relay.py, the least a framed
                Python relay can do in the proxy's and the server's places
    throughput  download and upload against plain ssh, with the default cipher and with
                aes128-gcm@openssh.com, and CPU per MB
    syscalls    syscalls per MB of a bulk transfer for the proxy and the server (strace -c)
    tunnel      the file-transfer tunnel against `ssh -R`, beside floor_relay.py's tunnel
                (bench/tunnel.py)

Timings are printed, never asserted; a targets table at the end says PASS or MISS. The
machine is shared and noisy: every figure is a median or a ratio within one run, and the
modes take turns where that is cheap. Run it under `taskset -c 1` to show the work alone.
"""

import argparse
import contextlib
import json
import os
import platform
import resource
import selectors
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time

import tunnel
from benchlib import (
    MB,
    REPO,
    Progress,
    Strace,
    ancestors,
    busy_processes,
    cpu_flags,
    cpu_seconds,
    end_leftovers,
    exe_of,
    load_average,
    loopback,
    python_version,
    real_python,
    rvgahp_source,
    ssh_version,
    sshd_banner,
    summary,
    table,
)

SECTIONS = ("start", "burst", "rtt", "throughput", "syscalls", "tunnel")
BURST = 50  # sessions started at once
BURST_TIMEOUT = 30.0  # a session with no banner this long after its spawn has failed
WARMUP_SESSIONS = 2
RT_WARMUP = 200
SETTLE = 0.5  # pause between bursts, so one mode's teardown does not load the next
GCM = "aes128-gcm@openssh.com"
FLOOR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "floor_relay.py")
log = Progress("bench")


# --------------------------------------------------------------------------- sessions

LIVE = []  # every session not yet closed, so cleanup can end them whatever happened


def open_session(mode):
    """(session, spawn time) for one new session of mode."""
    t0 = time.monotonic()
    session = loopback.GahpSession(mode.argv(), env=mode.env)
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


def gahp_pid(session):
    """The GAHP's own pid, as it says (testgahp's PID command)."""
    reply = session.command("PID")
    if not reply.startswith("S "):
        raise RuntimeError("PID answered %r" % reply)
    return int(reply.split()[1])


# --------------------------------------------------------------------------- the modes


class Mode:
    """One way of reaching the GAHP: how to start a session, and which processes relay it."""

    key = name = ""
    env = None
    rss_what = ""

    def argv(self):
        raise NotImplementedError

    def submit_pids(self, sessions):
        """The submit host's processes for these open sessions (shared ones included once)."""
        return [s.proc.pid for s in sessions]

    def relay_pids(self, session, gahp):
        """{role: [pid]}: the processes between us and the GAHP, whose CPU a message costs."""
        return {}

    def daemon_pids(self):
        """Long-lived processes that work for every session (rvgahp's proxy and server)."""
        return []


class Direct(Mode):
    key, name = "direct", "direct"
    rss_what = "the GAHPs themselves"

    def __init__(self, gahp):
        self.gahp = gahp

    def argv(self):
        return [self.gahp]


class PlainSsh(Mode):
    rss_what = "ssh clients"

    def __init__(self, sshd, gahp, key="ssh", name="plain ssh", options=()):
        self.key, self.name = key, name
        self.sshd = sshd
        self.gahp = gahp
        self.options = list(options)

    def argv(self):
        argv = self.sshd.ssh_argv(self.gahp)
        argv[1:1] = self.options
        return argv

    def relay_pids(self, session, gahp):
        return {"ssh": [session.proc.pid], "sshd": ancestors(gahp, self.sshd.proc.pid)}


class BenchRig(loopback.Rig):
    """A rig with rvgahp's default pings, and optionally ssh options for its transport and a
    directory put first on every role's PATH (where `python3` is the interpreter to test)."""

    def __init__(self, sshd, flavor, gahp, python_dir=None, ssh_options=()):
        self.python_dir = python_dir
        self.ssh_options = list(ssh_options)
        super().__init__(sshd, flavor, gahp=gahp, ping_interval=15, ping_timeout=45)

    def write_transport(self, text=None):
        if text is None:
            remote = self.flavor.command_line("proxy", self.sock)
            if self.python_dir:
                remote = "PATH=%s:$PATH %s" % (shlex.quote(self.python_dir), remote)
            argv = self.sshd.ssh_argv(remote)
            argv[1:1] = self.ssh_options
            text = "exec " + " ".join(shlex.quote(a) for a in argv) + "\n"
        super().write_transport(text)

    def env(self, **extra):
        env = super().env(**extra)
        if self.python_dir:
            env["PATH"] = self.python_dir + os.pathsep + env.get("PATH", "")
        return env


class Rvgahp(Mode):
    rss_what = "clients + proxy"

    def __init__(self, key, name, rig):
        self.key, self.name = key, name
        self.rig = rig
        if rig.python_dir:
            self.env = dict(os.environ, PATH=rig.python_dir + os.pathsep + os.environ.get("PATH", ""))

    def argv(self):
        return self.rig.client_argv("blahpd")

    def proxy_pids(self):
        pid = self.rig.proxy_pid()
        return [pid] if pid else []

    def submit_pids(self, sessions):
        return [s.proc.pid for s in sessions] + self.proxy_pids()

    def daemon_pids(self):
        return self.proxy_pids() + [self.rig.server.pid]

    def relay_pids(self, session, gahp):
        proxy = self.proxy_pids()
        transport = self.rig.transport_pid()
        return {
            "proxy": proxy,
            "server": [self.rig.server.pid],
            "client": [session.proc.pid],
            "ssh": [transport] if transport else [],
            "sshd": ancestors(proxy[0], self.rig.sshd.proc.pid) if proxy else [],
        }


class FtGahp(Rvgahp):
    """An ft-gahp session on an rvgahp mode's rig, with CONDOR_INHERIT as the GridManager sets
    it: the server opens a tunnel listener, and the client says `Allocated port` before the
    banner. Nothing listens at the address; no transfer is made."""

    def __init__(self, base):
        super().__init__("ft-" + base.key, base.name + " ft-gahp", base.rig)
        self.env = dict(base.env or os.environ, CONDOR_INHERIT="4242 <127.0.0.1:9618?addrs=127.0.0.1-9618> 0")

    def argv(self):
        return self.rig.client_argv("condor_ft-gahp")


class Floor(Mode):
    """bench/floor_relay.py in the proxy's and the server's places, one link per session: the
    least CPU any Python relay there can spend, measured in the same run as rvgahp."""

    rss_what = ""

    def __init__(self, setup, which):
        self.key, self.name = "floor-" + which, "floor relay %s" % setup.versions[which]
        self.python = setup.pythons[which]
        self.sshd = setup.sshd
        self.gahp = setup.gahp
        self.dir = os.path.join(setup.work, self.key)
        os.makedirs(self.dir)
        setup.ours.append(self.dir)
        self.servers = {}  # sock path -> the floor server's Popen
        setup.cleanup.callback(self.stop)

    def argv(self):
        sock = os.path.join(self.dir, "%d.sock" % len(self.servers))
        argv = [self.python, FLOOR, "server", sock, self.gahp, "--"] + self.sshd.ssh_argv()
        self.servers[sock] = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
        return [self.python, FLOOR, "client", sock]

    def relay_pids(self, session, gahp):
        server = loopback.parent_of(gahp)
        sock = session.proc.args[-1]
        proxy = [pid for pid in loopback.pids_running(" proxy " + sock) if loopback.cmdline(pid)[1:2] == [FLOOR]]
        ssh = [pid for pid in loopback.children_of(server) if pid != gahp]
        return {"proxy": proxy, "server": [server], "ssh": ssh, "sshd": ancestors(proxy[0], self.sshd.proc.pid) if proxy else []}

    def stop(self):
        for server in self.servers.values():
            if server.poll() is None:
                server.terminate()
            server.wait()


# --------------------------------------------------------------------------- session start


def child_cpu():
    """CPU seconds of our children that have been waited for (and their waited-for descendants)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def start_once(mode, cpu=None):
    """Seconds from spawning a session to its banner; the session is closed before returning.

    With a dict for cpu, it adds the CPU seconds of the process we started (the client, ssh
    or the GAHP, measured once it has been waited for) and of the mode's daemons.
    """
    daemons = mode.daemon_pids()
    before = child_cpu(), cpu_seconds(daemons)
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
    if cpu is not None:
        cpu.setdefault("started", []).append(child_cpu() - before[0])
        cpu.setdefault("daemons", []).append(cpu_seconds(daemons) - before[1])
    return elapsed


def back_to_back(modes, count):
    """Round robin over the modes, so a noisy stretch of time hits them all alike."""
    samples = {m.key: [] for m in modes}
    cpu = {m.key: {} for m in modes}
    errors = {}
    for _ in range(count):
        for mode in modes:
            if mode.key in errors:
                continue
            try:
                samples[mode.key].append(start_once(mode, cpu[mode.key]))
            except Exception as e:
                errors[mode.key] = "%s: %s" % (type(e).__name__, e)
    results = {}
    for mode in modes:
        if mode.key in errors:
            results[mode.key] = {"error": errors[mode.key], "done": len(samples[mode.key])}
        else:
            results[mode.key] = summary(samples[mode.key], 1000.0)
            results[mode.key]["cpu_started_ms"] = statistics.median(cpu[mode.key]["started"]) * 1000
            # The daemons' CPU comes in 10 ms ticks: the mean over all starts, not a median.
            results[mode.key]["cpu_daemons_ms"] = statistics.mean(cpu[mode.key]["daemons"]) * 1000
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


def roles_cpu(groups):
    return {role: cpu_seconds(pids) for role, pids in groups.items()}


def add_cpu(total, before, after):
    for role in after:
        total[role] = total.get(role, 0.0) + after[role] - before[role]


def rtt_figures(modes, ratio_to, sessions, count, blocks=4):
    """Round trips on `sessions` fresh sessions per mode, the modes taking turns in blocks.

    Per session and mode: the median round trip. The figure to hold is the median over
    sessions of rvgahp's median divided by plain ssh's in the same session pair: one
    session is a coin flip on a 2-vCPU VM. The relaying processes' CPU time is summed over
    every round trip and divided by their number.
    """
    per_session = []
    cpu = {m.key: {} for m in modes}
    done = {m.key: 0 for m in modes}
    for i in range(sessions):
        opened = {}
        try:
            for mode in modes:
                session, _ = open_session(mode)
                session.banner(timeout=BURST_TIMEOUT)
                round_trips(session, RT_WARMUP)
                opened[mode.key] = (session, mode.relay_pids(session, gahp_pid(session)))
            times = {m.key: [] for m in modes}
            for _ in range(blocks):
                for mode in modes:
                    session, groups = opened[mode.key]
                    before = roles_cpu(groups)
                    times[mode.key].extend(round_trips(session, count // blocks))
                    add_cpu(cpu[mode.key], before, roles_cpu(groups))
                    done[mode.key] += count // blocks
        finally:
            for session, _ in opened.values():
                close_session(session)
        medians = {key: statistics.median(values) * 1e6 for key, values in times.items()}
        per_session.append(medians)
        log("rtt: session %d of %d: %s" % (i + 1, sessions, ", ".join("%s %.0f us" % (k, v) for k, v in medians.items())))
    results = {}
    for mode in modes:
        values = [s[mode.key] for s in per_session]
        figures = {"median_us": statistics.median(values), "per_session_us": values, "round_trips": done[mode.key]}
        figures["cpu_us"] = {role: spent / done[mode.key] * 1e6 for role, spent in cpu[mode.key].items()}
        if mode.key != ratio_to and ratio_to in per_session[0]:
            ratios = [s[mode.key] / s[ratio_to] for s in per_session]
            figures["ratios"] = ratios
            figures["ratio_median"] = statistics.median(ratios)
        results[mode.key] = figures
    return results


def throughput_figures(modes, nbytes, repeats):
    """Download and upload on one session per mode, the modes taking turns; medians of `repeats`.

    The relaying processes' CPU per MB is summed over all the transfers of a direction.
    """
    figures = {m.key: {} for m in modes}
    rates = {m.key: {"download": [], "upload": []} for m in modes}
    cpu = {m.key: {"download": {}, "upload": {}} for m in modes}
    opened = {}
    try:
        for mode in modes:
            session, _ = open_session(mode)
            session.banner(timeout=BURST_TIMEOUT)
            opened[mode.key] = (session, mode.relay_pids(session, gahp_pid(session)))
        for direction, run in (("download", download), ("upload", upload)):
            for r in range(repeats):
                log("throughput: %s %d of %d, %d MB" % (direction, r + 1, repeats, nbytes // MB))
                for mode in modes:
                    if "error" in figures[mode.key]:
                        continue
                    session, groups = opened[mode.key]
                    before = roles_cpu(groups)
                    try:
                        rates[mode.key][direction].append(run(session, nbytes, 180))
                    except Exception as e:
                        figures[mode.key]["error"] = "%s: %s: %s" % (direction, type(e).__name__, e)
                        continue
                    add_cpu(cpu[mode.key][direction], before, roles_cpu(groups))
    finally:
        for session, _ in opened.values():
            close_session(session, timeout=30)
    for mode in modes:
        for direction, values in rates[mode.key].items():
            if values:
                moved = len(values) * nbytes / MB
                figures[mode.key][direction + "_mbps"] = statistics.median(values)
                figures[mode.key][direction + "_all"] = values
                figures[mode.key][direction + "_cpu_us_per_mb"] = {role: s / moved * 1e6 for role, s in cpu[mode.key][direction].items()}
    return figures


def syscall_figures(mode, nbytes):
    """Syscalls per MB for the proxy and the server during one download and one upload, from `strace -c -f -p`.

    strace slows the processes it watches; the figure is the count, not the time.
    """
    if not Strace.available():
        return {"error": "strace is not installed"}
    session, _ = open_session(mode)
    results = {}
    try:
        session.banner(timeout=BURST_TIMEOUT)
        download(session, 4 * MB, 60)  # warm
        time.sleep(0.3)  # the replacement spare, if any, has started by now
        watched = {"proxy": mode.proxy_pids()[0], "server": mode.rig.server.pid}
        for direction, run in (("download", download), ("upload", upload)):
            with Strace(watched) as tracer:
                run(session, nbytes, 300)
            counts = tracer.counts()
            results[direction] = {
                role: {"per_mb": c["calls"] / (nbytes / MB), "calls": c["calls"], "top": c["top"]} for role, c in counts.items()
            }
    finally:
        close_session(session)
    results["mb"] = nbytes / MB
    return results


# --------------------------------------------------------------------------- set-up


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


def python_dir(directory, python):
    """A directory whose `python3` is python: put first on PATH, it is what the pyz's prologue finds."""
    os.makedirs(directory)
    os.symlink(python, os.path.join(directory, "python3"))
    return directory


def snapshot(source, directory):
    """A copy of the repository's top-level scripts (build_zipapp.sh and the modules it packs), with
    `source` as rvgahp.py, so that edits made during a run cannot mix two versions."""
    os.makedirs(directory)
    for name in os.listdir(REPO):
        if name.endswith((".py", ".sh")) and os.path.isfile(os.path.join(REPO, name)):
            shutil.copy2(os.path.join(REPO, name), directory)
    path = os.path.join(directory, "rvgahp.py")
    shutil.copy2(source, path)
    return path


def build_pyz(rvgahp, directory):
    """rvgahp.pyz from the snapshot, by build_zipapp.sh (which packs the rvgahp.py beside it)."""
    out = os.path.join(directory, "rvgahp.pyz")
    result = subprocess.run(
        [os.path.join(os.path.dirname(rvgahp), "build_zipapp.sh"), out],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, PYTHON=sys.executable),
    )
    if result.returncode != 0:
        raise RuntimeError("build_zipapp.sh failed: %s" % (result.stderr.strip() or result.stdout.strip()))
    return out


def build_pip_pyz(rvgahp, directory):
    """The rvgahp.pyz that `rvgahp setup` packs when it runs from a pip install (or from the
    sources): rvgahp_admin.running_payload() on the snapshot's modules."""
    out = os.path.join(directory, "pip", "rvgahp.pyz")
    os.makedirs(os.path.dirname(out))
    code = "import sys; sys.argv = ['rvgahp']; import rvgahp_admin; sys.stdout.buffer.write(rvgahp_admin.running_payload()[0])"
    data = subprocess.run([sys.executable, "-c", code], cwd=os.path.dirname(rvgahp), stdout=subprocess.PIPE, check=True, timeout=120).stdout
    with open(out, "wb") as f:
        f.write(data)
    os.chmod(out, 0o755)
    return out


class Setup:
    """sshd, the GAHP and the rigs, each made when a section first needs it and registered for cleanup."""

    def __init__(self, cleanup, args):
        self.cleanup = cleanup
        self.args = args
        self.work = loopback.short_tempdir("bench")
        cleanup.callback(shutil.rmtree, self.work, ignore_errors=True)
        self.ours = [self.work]  # temp paths that only our processes name
        cleanup.callback(lambda: end_leftovers(self.ours))
        self.gahp = write_gahp(self.work)
        self.rvgahp = snapshot(args.rvgahp, os.path.join(self.work, "snapshot"))
        log("starting sshd")
        self.sshd = loopback.Sshd(os.path.join(self.work, "sshd"))
        os.makedirs(self.sshd.dir)
        cleanup.callback(self.sshd.stop)
        self.sshd.start()
        self.rigs = {}
        self.failed = {}
        self.flavors = {}
        self.pyz = None
        self.pythons = {"new": real_python(args.python)}
        if args.old_python:
            self.pythons["old"] = real_python(args.old_python)
        self.versions = {k: python_version(v) for k, v in self.pythons.items()}
        cleanup.callback(close_all_sessions)  # runs first: sessions end before their servers

    def flavor(self, kind, which):
        """rvgahp.py under one of our interpreters, or the pyz (its python3 comes from PATH)."""
        key = (kind, which if kind == "py" else None)
        if key not in self.flavors:
            if kind == "py":
                flavor = loopback.Flavor("rvgahp.py", self.pythons[which], self.rvgahp)
            elif kind == "pip":
                log("packing rvgahp.pyz as setup does from a pip install")
                flavor = loopback.Flavor("pip-path pyz", None, build_pip_pyz(self.rvgahp, self.work))
            else:
                if self.pyz is None:
                    log("building rvgahp.pyz")
                    self.pyz = build_pyz(self.rvgahp, self.work)
                flavor = loopback.Flavor("rvgahp.pyz", None, self.pyz)
            self.cleanup.callback(shutil.rmtree, flavor.bin, ignore_errors=True)
            self.ours.append(flavor.bin)
            self.flavors[key] = flavor
        return self.flavors[key]

    def mode(self, kind, which="new", gcm=False):
        """The rvgahp mode for a flavor and interpreter; its server is started here, once."""
        key = "%s-%s%s" % (kind, which, "-gcm" if gcm else "")
        if key in self.failed:
            raise RuntimeError("%s did not start earlier: %s" % (key, self.failed[key]))
        if key not in self.rigs:
            flavor = self.flavor(kind, which)
            directory = None
            if kind in ("pyz", "pip"):
                directory = python_dir(os.path.join(self.work, "python-%s-%s" % (kind, which)), self.pythons[which])
            options = ["-o", "Ciphers=" + GCM] if gcm else []
            rig = BenchRig(self.sshd, flavor, self.gahp, python_dir=directory, ssh_options=options)
            self.cleanup.callback(rig.cleanup)
            self.ours.append(rig.dir)
            log("starting an rvgahp server: %s under CPython %s%s" % (flavor.name, self.versions[which], ", " + GCM if gcm else ""))
            try:
                rig.start_server()
            except Exception as e:
                self.failed[key] = "%s: %s" % (type(e).__name__, str(e)[:1000])
                raise
            name = "%s %s%s" % (flavor.name, self.versions[which], " gcm" if gcm else "")
            self.rigs[key] = Rvgahp(key, name, rig)
            for _ in range(WARMUP_SESSIONS):
                start_once(self.rigs[key])
        return self.rigs[key]


# --------------------------------------------------------------------------- report


def fmt(value, pattern):
    return "-" if value is None else pattern % value


def ratio(value, base):
    return "-" if value is None or not base else "%.2fx" % (value / base)


def cpu_text(cpu, roles):
    return " + ".join("%s %.0f" % (r, cpu[r]) for r in roles if r in cpu)


def report_start(results, modes):
    direct = results.get("direct", {}).get("p90")
    rows = []
    for m in modes:
        r = results[m.key]
        if "error" in r:
            rows.append([m.name, "ERROR: " + r["error"][:100]])
            continue
        rows.append(
            [
                m.name,
                "%.1f" % r["median"],
                "%.1f" % r["p90"],
                "%.1f-%.1f" % (r["min"], r["max"]),
                fmt(direct and r["p90"] - direct, "%+.1f"),
                "%.1f" % r["cpu_started_ms"],
                "%.1f" % r["cpu_daemons_ms"] if m.daemon_pids() else "-",
            ]
        )
    out = table(["mode", "median ms", "p90 ms", "min-max", "p90 - direct p90", "CPU ms: started", "CPU ms: proxy+server"], rows)
    out += "\n  CPU started: the median CPU time of the process we spawn (client, ssh or GAHP) over its whole life."
    out += "\n  CPU proxy+server: their mean CPU per start, spare GAHP launches included."
    return out


def report_burst(results, modes):
    rows = []
    for m in modes:
        b, mem = results[m.key].get("burst", {}), results[m.key].get("memory", {})
        if "error" in b:
            rows.append([m.name, "ERROR: " + b["error"][:80]])
            continue
        rows.append(
            [
                m.name,
                str(b["failures"]),
                fmt(b.get("all_banners_s"), "%.2f"),
                fmt(b.get("per_session_median"), "%.0f"),
                fmt(b.get("per_session_p90"), "%.0f"),
                fmt(mem.get("per_session_mb"), "%.1f"),
                fmt(mem.get("pss_per_session_mb"), "%.1f"),
                mem.get("what", ""),
            ]
        )
    out = table(["mode", "failures", "all banners s", "median ms", "p90 ms", "VmRSS MB/session", "Pss MB/session", "weighed"], rows)
    reasons = [(m.name, r) for m in modes for r in results[m.key].get("burst", {}).get("failure_reasons", [])]
    return out + "".join("\n  %s: %s" % pair for pair in reasons)


def report_rtt(results, modes, sessions, count):
    def relays(key):
        cpu = results.get(key, {}).get("cpu_us", {})
        return cpu.get("proxy", 0.0) + cpu.get("server", 0.0) if "proxy" in cpu else None

    rows = []
    for m in modes:
        r = results[m.key]
        floor = "floor-" + m.key.split("-")[1] if m.key.startswith("py-") else None
        rows.append(
            [
                m.name,
                "%.0f" % r["median_us"],
                fmt(r.get("ratio_median"), "%.2fx"),
                " ".join("%.2f" % x for x in r.get("ratios", [])) or "-",
                fmt(relays(m.key), "%.0f"),
                ratio(relays(m.key), relays(floor)) if floor else "-",
                cpu_text(r["cpu_us"], ("client", "proxy", "server", "ssh", "sshd")) or "-",
            ]
        )
    out = table(
        ["mode", "median us", "ratio to ssh", "per-session ratios", "CPU us: proxy+server", "x floor", "CPU us per round trip, by process"],
        rows,
    )
    out += "\n  %d sessions per mode, %d round trips each (after %d to warm up), the modes taking turns in blocks." % (
        sessions,
        count,
        RT_WARMUP,
    )
    out += "\n  The ratio is the median over sessions of rvgahp/ssh within one session pair: a single session is a"
    out += "\n  coin flip on a 2-vCPU VM. CPU is utime+stime from /proc/PID/stat (10 ms ticks), over all round trips."
    out += "\n  floor relay: bench/floor_relay.py in the proxy's and the server's places, under the same CPython: one"
    out += "\n  epoll_wait, read and writev per hop and nothing else. x floor is rvgahp's proxy+server CPU over the floor's."
    return out


def report_throughput(results, modes, ratio_to):
    rows = []
    base = results.get(ratio_to, {})
    for m in modes:
        r = results[m.key]
        if "error" in r and "download_mbps" not in r:
            rows.append([m.name, "ERROR: " + r["error"][:80]])
            continue
        cells = [m.name]
        for d in ("download", "upload"):
            cells += [fmt(r.get(d + "_mbps"), "%.0f"), ratio(r.get(d + "_mbps"), base.get(d + "_mbps"))]
        for d in ("download", "upload"):
            cpu = r.get(d + "_cpu_us_per_mb", {})
            cells.append("%.0f" % sum(cpu.values()) if cpu else "-")
        rows.append(cells)
    out = table(["mode", "down MB/s", "x ssh", "up MB/s", "x ssh", "down CPU us/MB", "up CPU us/MB"], rows)
    out += "\n  CPU us/MB: every relaying process (ssh, sshd; for rvgahp also client, proxy, server), not the GAHP."
    out += "\n  floor relay: bench/floor_relay.py in rvgahp's proxy and server places, default cipher (see the rtt section)."
    for m in modes:
        for d in ("download", "upload"):
            cpu = results[m.key].get(d + "_cpu_us_per_mb")
            if cpu and len(cpu) > 2:
                out += "\n  %s %s: %s" % (m.name, d, cpu_text(cpu, ("client", "proxy", "server", "ssh", "sshd")))
    return out


def report_syscalls(results):
    if "error" in results:
        return "  " + results["error"]
    rows = []
    for d in ("download", "upload"):
        for role, c in results[d].items():
            reads = dict(c["top"]).get("read")
            rows.append(
                [
                    d,
                    role,
                    "%.0f" % c["per_mb"],
                    fmt(reads and c["calls"] / reads, "%.1f"),
                    fmt(reads and results["mb"] * MB / reads / 1024, "%.0f"),
                    ", ".join("%s %d" % t for t in c["top"]),
                ]
            )
    out = table(["transfer", "process", "syscalls/MB", "per read", "KiB per read", "most called"], rows)
    out += "\n  %d MB each way under strace -c -f -p. per read: all syscalls / read calls, about the syscalls per frame." % results["mb"]
    out += "\n  The download's count follows how the GAHP writes: the test GAHP's FLOOD writes 1 KiB lines, so each"
    out += "\n  read takes what has piled up; strace slows the watched processes, so compare runs made this way only."
    return out


def report_tunnel(results):
    p = results["params"]
    keys = [k for k in ("ssh_r", "rvgahp", "floor", "ssh_r_gcm", "rvgahp_gcm") if k in results]
    reference = {"rvgahp": "ssh_r", "floor": "ssh_r", "rvgahp_gcm": "ssh_r_gcm"}  # the same cipher
    rows = []
    for name, label in (
        ("down_1", "1 stream, download"),
        ("up_1", "1 stream, upload"),
        ("down_%d" % p["parallel"], "%d streams, download" % p["parallel"]),
        ("up_%d" % p["parallel"], "%d streams, upload" % p["parallel"]),
    ):
        row = [label + " (MB/s)"]
        for k in keys:
            value = results[k].get(name + "_mbps")
            base = results.get(reference.get(k), {})
            same = "" if k not in reference or value is None else " (%s)" % ratio(value, base.get(name + "_mbps"))
            row.append(fmt(value, "%.0f") + same)
            cpu = results[k].get(name + "_cpu_us_per_mb")
            row.append("%.0f" % sum(cpu.values()) if cpu else "-")
        rows.append(row)
    row = ["new connection to the endpoint's answer (ms)"]
    for k in keys:
        s = results[k].get("setup_ms")
        row.append(
            "-"
            if not s
            else "%.2f / %.2f" % (s["median"], s["p90"])
            + ("" if k not in reference else " (%s)" % ratio(s["median"], results.get(reference[k], {}).get("setup_ms", {}).get("median")))
        )
        cpu = results[k].get("setup_cpu_us")
        row.append("%.0f us/conn" % sum(cpu.values()) if cpu else "-")
    rows.append(row)
    headers = ["figure"]
    for k in keys:
        headers += [results[k]["name"], "CPU us/MB"]
    out = table(headers, rows)
    out += "\n  MB/s: median of %d, %d MB per stream each way; setup: median / p90 of %d connections." % (
        p["repeats"],
        p["mb"],
        p["connections"],
    )
    out += "\n  CPU: the relaying processes (ssh -R: ssh and sshd; rvgahp: proxy, server, transport ssh, sshd)."
    out += "\n  Ratios: rvgahp against ssh -R with the same cipher; gcm = -o Ciphers=%s, as rvgahp's transport is shipped." % GCM
    out += "\n  floor relay: bench/floor_relay.py's tunnel in rvgahp's proxy and server places, default cipher: per hop"
    out += "\n  one epoll_wait, read and write, no owner check, credit or limits; the least any Python relay there costs."
    for k in keys:
        for name in ("down_1", "up_1", "down_%d" % p["parallel"], "up_%d" % p["parallel"]):
            cpu = results[k].get(name + "_cpu_us_per_mb")
            if cpu:
                out += "\n  %s, %s, CPU us/MB: %s" % (results[k]["name"], name, cpu_text(cpu, ("proxy", "server", "ssh", "sshd")))
        cpu = results[k].get("setup_cpu_us")
        if cpu:
            out += "\n  %s, CPU us per new connection: %s" % (results[k]["name"], cpu_text(cpu, ("proxy", "server", "ssh", "sshd")))
    for k in keys:
        calls = results[k].get("syscalls")
        if calls:
            out += "\n  %s, syscalls per MB (strace -c, one stream): %s" % (
                results[k]["name"],
                "; ".join("%s: %s" % (d, ", ".join("%s %.0f" % rc for rc in sorted(c.items()))) for d, c in sorted(calls.items())),
            )
    for k in keys:
        if "error" in results[k]:
            out += "\n  %s: %s" % (results[k]["name"], results[k]["error"])
    return out


def targets(results):
    """Lines of target, figure vs limit, and PASS, MISS or n/a (no figure)."""
    rows = []

    def judge(name, figure, limit, pattern, at_most=True):
        if figure is None or limit is None:
            rows.append((name, "n/a", "n/a"))
        else:
            ok = figure <= limit if at_most else figure >= limit
            rows.append((name, pattern % (figure, limit), "PASS" if ok else "MISS"))

    def share(value, ref):
        return value / ref if value is not None and ref else None

    start = results.get("start", {})
    direct = start.get("direct", {}).get("p90")
    for key, r in start.items():
        # The target is for rvgahp.pyz, as users run it. rvgahp.py run as a script is in
        # the table for comparison: Python compiles a script on every start.
        if key.startswith(("pyz-", "ft-pyz-", "pip-")):
            judge("start p90 <= direct p90: %s" % r.get("name", key), r.get("p90"), direct, "%.1f vs %.1f ms")
    for key, r in results.get("burst", {}).items():
        if key not in ("direct", "ssh"):
            name = r.get("name", key)
            judge("%d at once, failures: %s" % (BURST, name), r.get("burst", {}).get("failures"), 0, "%d vs %d")
            judge("VmRSS per extra session: %s" % name, r.get("memory", {}).get("per_session_mb"), 15.0, "%.1f vs %.0f MB")
    for key, r in results.get("rtt", {}).items():
        if key.startswith(("py-", "pyz-", "floor-")) and "ratio_median" in r:
            name = r.get("name", key)
            judge("round trip / ssh, median of sessions: %s" % name, r["ratio_median"], 1.15, "%.2fx vs %.2fx")
            cpu = r["cpu_us"]
            judge("CPU per round trip, proxy + server: %s" % name, cpu.get("proxy", 0) + cpu.get("server", 0), 70, "%.0f vs %d us")
    tp = results.get("throughput", {})
    for key, r in tp.items():
        if not key.startswith(("py-", "pyz-", "floor-")):
            continue
        gcm = key.endswith("-gcm")
        name = r.get("name", key)
        for d in ("download", "upload"):
            value = r.get(d + "_mbps")
            ref = tp.get("ssh-gcm" if gcm else "ssh", {}).get(d + "_mbps")
            judge("%s / ssh%s: %s" % (d, ", both gcm" if gcm else "", name), share(value, ref), 1.0, "%.2fx vs %.1fx", at_most=False)
            if gcm:
                ref = tp.get("ssh", {}).get(d + "_mbps")
                judge("%s, gcm / ssh default: %s" % (d, name), share(value, ref), 1.0, "%.2fx vs %.1fx", at_most=False)
    tn = results.get("tunnel", {})
    if "params" in tn:
        ssh_r, rv = tn.get("ssh_r", {}), tn.get("rvgahp", {})
        for name in ("down_1", "up_1", "down_%d" % tn["params"]["parallel"], "up_%d" % tn["params"]["parallel"]):
            figure = share(rv.get(name + "_mbps"), ssh_r.get(name + "_mbps"))
            judge("tunnel %s / ssh -R" % name, figure, 0.9, "%.2fx vs %.1fx", at_most=False)
            if "rvgahp_gcm" in tn:
                figure = share(tn["rvgahp_gcm"].get(name + "_mbps"), tn.get("ssh_r_gcm", {}).get(name + "_mbps"))
                judge("tunnel %s / ssh -R, both gcm" % name, figure, 0.9, "%.2fx vs %.1fx", at_most=False)
                figure = share(tn["rvgahp_gcm"].get(name + "_mbps"), ssh_r.get(name + "_mbps"))
                judge("tunnel %s, rvgahp gcm / ssh -R default" % name, figure, 0.9, "%.2fx vs %.1fx", at_most=False)
        floor = tn.get("floor")
        if floor is not None:
            for name in ("down_1", "up_1", "down_%d" % tn["params"]["parallel"], "up_%d" % tn["params"]["parallel"]):
                figure = share(floor.get(name + "_mbps"), ssh_r.get(name + "_mbps"))
                judge("tunnel %s / ssh -R: floor relay" % name, figure, 0.9, "%.2fx vs %.1fx", at_most=False)
        ref = (ssh_r.get("setup_ms") or {}).get("median")
        for key, label in (("rvgahp", ""), ("floor", ": floor relay")):
            if key in tn:
                value = (tn[key].get("setup_ms") or {}).get("median")
                judge("tunnel connection setup vs ssh -R, median%s" % label, value, ref, "%.2f vs %.2f ms")
    width = max([len(r[0]) for r in rows] + [10])
    return "\n".join("%s  %s  %s" % (name.ljust(width), figure.rjust(18), verdict) for name, figure, verdict in rows)


# --------------------------------------------------------------------------- main


def parse_args(argv):
    found = loopback.find_interpreters()
    newest = found[max(found, key=lambda v: int(v.split(".")[1]))] if found else "python3"
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer sessions and smaller transfers (about 2 minutes for all)")
    parser.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections: %s (default: all)" % ",".join(SECTIONS))
    parser.add_argument("--python", default=newest, help="the newest CPython, for rvgahp's roles in every section (default: %s)" % newest)
    parser.add_argument(
        "--old-python", default=found.get("3.6"), help="the oldest CPython, for session start (default: %s)" % found.get("3.6")
    )
    parser.add_argument("--sessions", type=int, help="round-trip sessions per mode (default 7, --quick 5)")
    parser.add_argument("--tunnel-mb", type=int, help="MB per tunnel stream each way (default 256, --quick 64)")
    parser.add_argument("--rvgahp", default=loopback.RVGAHP, help="the rvgahp.py to measure (default: the working tree's)")
    parser.add_argument("--json", metavar="FILE", help="also save the figures here")
    parser.add_argument("--logs", metavar="DIR", help="copy the server, proxy and sshd logs here before cleaning up")
    args = parser.parse_args(argv)
    args.only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(args.only) - set(SECTIONS))
    if unknown:
        parser.error("unknown section(s) %s; pick from %s" % (", ".join(unknown), ", ".join(SECTIONS)))
    return args


def header(setup, args):
    flags = cpu_flags()
    lines = [
        "rvgahp benchmark (%s): %s" % ("quick" if args.quick else "full", ", ".join(args.only)),
        "machine:       %s, %d CPUs, Linux %s; CPU has AES instructions: %s"
        % (platform.node(), os.cpu_count() or 0, platform.release(), "yes" if "aes" in flags else "no"),
        "load average:  %s" % load_average(),
        "busy now:      %s" % busy_processes(exclude=(os.getpid(),)),
        "rvgahp.py:     %s, copied at start from %s" % (rvgahp_source(setup.rvgahp), args.rvgahp),
        "sshd:          %s; client %s" % (sshd_banner(setup.sshd.port), ssh_version()),
        "GAHP + bench:  %s (%s)" % (sys.executable, platform.python_version()),
        "PYTHON* env:   %s (every process here inherits it)"
        % (" ".join("%s=%s" % kv for kv in sorted(os.environ.items()) if kv[0].startswith("PYTHON")) or "none"),
        "roles under:   %s" % ", ".join("%s (%s)" % (setup.pythons[k], setup.versions[k]) for k in setup.pythons),
        "The machine is shared: figures are medians and ratios within this run, not across runs.",
    ]
    return "\n".join(lines)


def section(title, text):
    print("\n== %s\n%s" % (title, text))
    sys.stdout.flush()


def run(setup, args, results):
    quick = args.quick
    direct = Direct(setup.gahp)
    ssh = PlainSsh(setup.sshd, setup.gahp)
    for _ in range(WARMUP_SESSIONS):
        start_once(direct)
        start_once(ssh)

    def available(kinds):
        """The rvgahp modes that start; one that does not is said once, and the others still run."""
        modes = []
        for kind, which in kinds:
            if which not in setup.pythons:
                continue
            try:
                modes.append(setup.mode(kind, which))
            except Exception as e:
                key = "%s-%s" % (kind, which)
                if key not in results.setdefault("mode_errors", {}):
                    results["mode_errors"][key] = "%s: %s" % (type(e).__name__, e)
                    section("%s %s: no column" % (kind, setup.versions[which]), "  " + results["mode_errors"][key][:2000])
        return modes

    def section_start():
        modes = [direct, ssh] + available([("py", "old"), ("pyz", "old"), ("py", "new"), ("pyz", "new"), ("pip", "old")])
        modes += [FtGahp(m) for m in modes if m.key.startswith("pyz-")]
        count = 10 if quick else 40
        log("session start, back to back: %d rounds over %d modes" % (count, len(modes)))
        figures = back_to_back(modes, count)
        for m in modes:
            figures[m.key]["name"] = m.name
        results["start"] = figures
        section("session start, back to back, %d each, the modes taking turns" % count, report_start(figures, modes))
        for m in modes[2:]:
            print("  %s roles: %s" % (m.name, role_interpreters(m)))
        print("  the floor, median of 5 runs (wall ms / CPU ms):")
        for which, python in setup.pythons.items():
            print(
                "    CPython %s: `-c pass` %s, `-I -S -c pass` %s"
                % (setup.versions[which], run_cost([python, "-c", "pass"]), run_cost([python, "-I", "-S", "-c", "pass"]))
            )
        for m in modes[2:]:
            print("    %s: `rvgahp_client --version` %s" % (m.name, run_cost(m.rig.flavor.argv("client", "--version"), m.env)))

    def section_burst():
        modes = [direct, ssh] + available([("py", "new"), ("pyz", "new")])
        figures = {}
        for mode in modes:
            log("%s: %d sessions at once" % (mode.name, BURST))
            try:
                b, mem = burst(mode, BURST)
                figures[mode.key] = {"burst": b, "memory": mem, "name": mode.name}
            except Exception as e:
                figures[mode.key] = {"burst": {"error": "%s: %s" % (type(e).__name__, e)}}
            close_all_sessions()
            time.sleep(SETTLE)
        results["burst"] = figures
        section("%d sessions started at once (one already open); memory per extra session" % BURST, report_burst(figures, modes))

    def section_rtt():
        modes = [direct, ssh]
        for which in ("new", "old"):
            if which in setup.pythons:
                modes += available([("py", which)]) + [Floor(setup, which)]
        sessions = args.sessions or (5 if quick else 7)
        count = 1000 if quick else 2000
        log("round trips: %d sessions per mode, %d each" % (sessions, count))
        results["rtt"] = rtt_figures(modes, "ssh", sessions, count)
        for m in modes:
            results["rtt"][m.key]["name"] = m.name
        section("round trip, ECHO hello -> S hello", report_rtt(results["rtt"], modes, sessions, count))

    def section_throughput():
        ssh_gcm = PlainSsh(setup.sshd, setup.gahp, "ssh-gcm", "plain ssh gcm", ["-o", "Ciphers=" + GCM])
        modes = [direct, ssh, ssh_gcm, setup.mode("py"), setup.mode("py", gcm=True), Floor(setup, "new")]
        nbytes = (50 if quick else 200) * MB
        repeats = 3 if quick else 5
        results["throughput"] = throughput_figures(modes, nbytes, repeats)
        for m in modes:
            results["throughput"][m.key]["name"] = m.name
        section(
            "throughput, FLOOD/SINK %d MB, median of %d (1 MB = 10^6 bytes); gcm = ssh -o Ciphers=%s" % (nbytes // MB, repeats, GCM),
            report_throughput(results["throughput"], modes, "ssh"),
        )

    def section_syscalls():
        nbytes = (16 if quick else 64) * MB
        log("syscalls: strace -c on the proxy and the server, %d MB each way" % (nbytes // MB))
        results["syscalls"] = syscall_figures(setup.mode("py"), nbytes)
        section("syscalls per MB of a bulk transfer (%s)" % setup.mode("py").name, report_syscalls(results["syscalls"]))

    def section_tunnel():
        mb = args.tunnel_mb or (64 if quick else 256)
        results["tunnel"] = tunnel.measure(
            setup.sshd,
            setup.mode("py").rig,
            setup.rvgahp,
            log,
            nbytes=mb * MB,
            repeats=3,
            connections=100 if quick else 300,
            gcm_rig=setup.mode("py", gcm=True).rig,
            gcm=GCM,
            floor_python=setup.pythons["new"],
        )
        section("file-transfer tunnel: rvgahp vs ssh -R, same sshd, same endpoint", report_tunnel(results["tunnel"]))

    sections = {
        "start": section_start,
        "burst": section_burst,
        "rtt": section_rtt,
        "throughput": section_throughput,
        "syscalls": section_syscalls,
        "tunnel": section_tunnel,
    }
    for name in SECTIONS:
        if name not in args.only:
            continue
        try:
            sections[name]()
        except Exception as e:
            # One section's failure is a figure too; the others still run.
            results.setdefault("errors", {})[name] = "%s: %s" % (type(e).__name__, e)
            section("%s: FAILED" % name, "  %s: %s" % (type(e).__name__, str(e)[:2000]))
            close_all_sessions()


def run_cost(argv, env=None, runs=5):
    """'wall / CPU' in ms, medians of `runs` runs of argv to its end."""
    walls, cpus = [], []
    for _ in range(runs):
        c0, t0 = child_cpu(), time.perf_counter()
        subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=30, env=env)
        walls.append(time.perf_counter() - t0)
        cpus.append(child_cpu() - c0)
    return "%.0f / %.0f" % (statistics.median(walls) * 1000, statistics.median(cpus) * 1000)


def role_interpreters(mode):
    """What each rvgahp role actually runs under, read from /proc of live processes."""
    session, _ = open_session(mode)
    try:
        session.banner(timeout=BURST_TIMEOUT)
        exes = {"server": exe_of(mode.rig.server.pid), "proxy": exe_of(mode.rig.proxy_pid()), "client": exe_of(session.proc.pid)}
    finally:
        close_session(session)
    return ", ".join("%s %s" % (role, exe) for role, exe in exes.items())


def copy_logs(directory, setup):
    os.makedirs(directory, exist_ok=True)
    shutil.copy(setup.sshd.log, os.path.join(directory, "sshd.log"))
    for key, mode in setup.rigs.items():
        for path, label in ((mode.rig.server_log, "server"), (mode.rig.proxy_log, "proxy")):
            if os.path.exists(path):
                shutil.copy(path, os.path.join(directory, "%s.%s.log" % (key, label)))


def main(argv=None):
    args = parse_args(argv)
    # SIGTERM and SIGHUP unwind like Ctrl-C does, through the cleanup below.
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, lambda n, _: sys.exit(128 + n))
    results = {}
    with contextlib.ExitStack() as cleanup:
        setup = Setup(cleanup, args)
        if args.logs:
            cleanup.callback(copy_logs, args.logs, setup)
        print(header(setup, args))
        sys.stdout.flush()
        try:
            run(setup, args, results)
        finally:
            results["load_average_end"] = load_average()
            section("targets", targets(results))
            print("\nload average at the end: %s" % results["load_average_end"])
            print("busy at the end: %s" % busy_processes(exclude=(os.getpid(),)))
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(results, f, indent=2, sort_keys=True, default=str)
                log("figures saved to %s" % args.json)
            log("cleaning up")
    log("done")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.stderr.write("bench: interrupted; cleaned up\n")
        sys.exit(130)

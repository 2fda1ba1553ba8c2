#!/usr/bin/env python3
"""Fault figures: how fast rvgahp recovers, detects dead links, and how gently it logs in.

    python3 bench/faults.py [--quick] [--only SECTIONS] [--python PATH] [--json FILE]
                            [--trials N] [--sessions N] [--seed N]

One run starts its own sshd on 127.0.0.1 (tests/loopback.py), runs rvgahp's roles under
--python (default: this script's interpreter), and measures:

1. Link kill -> first working session. A fresh rig per trial (so the server's back-off
   is fresh), kill -9 of the transport ssh, of the sshd session process, or of the proxy,
   then the time until a new session reads its banner. "Working" is detected two ways:
   by a real rvgahp_client (--rvgahp-wait 10; its interpreter start-up is included) and
   by loopback.quick_session retried every 20 ms (no client process: the link alone).
   Then a second kill of the same kind in the same rig right after the first recovery,
   when the back-off applies. A healthy link's session start is the baseline.
2. Dead-link detection. SIGSTOP of the transport ssh with one live session open; the time
   until the client exits non-zero and until the server logs "link down", against the
   configured ping timeout (1 s / 3 s, and once with the defaults 15 s / 45 s).
3. Logins per minute while the submit host refuses (ssh exits 255 at once), while the
   login works but the remote command exits at once, and while the link comes up but
   drops after 1 s. The target: never more than 6 logins in any minute.
4. Soak: fds and RSS of the server and the proxy before and after N sequential sessions
   through a fast shell GAHP, sessions per second, and zombies/orphans after.
5. Hard failover, with the default pings (15 s / 45 s): an active server and a hot standby
   (a second server, as from a second login node, whose proxy shares the socket). A random
   0-15 s after a session on the active link (a ping interval; --seed), the active node
   dies with its network: SIGSTOP of its
   link's ssh client and of the sshd process that serves it (no byte and no EOF reaches
   the proxy, as when a cable is pulled: TCP stays open and silent), and kill -9 of its
   server, in that order, within a few ms. A real rvgahp_client (default wait, as the
   GridManager starts it) starts at once. The times from the fault until the standby's
   "link active" line and until that first session's banner, and whether it succeeded
   (served by the standby), against the goal of 15 s.

--only picks sections: kills (1, with its baseline), hangs (2), storms (3), soak (4),
failover (5); the default is all of them.

The GAHP everywhere is a two-line shell script (banner, then `cat`), so the figures are
rvgahp's and ssh's, not a GAHP's start-up. Timings are reported, never asserted; the
machine is shared and noisy, so every figure is a median with its min and max.
Tables go to stdout, progress to stderr.
"""

import argparse
import json
import os
import platform
import re
import shlex
import shutil
import signal
import sys
import time

from benchlib import (
    Progress,
    end_leftovers,
    exe_of,
    load_average,
    loopback,
    python_version,
    read_text,
    rvgahp_source,
    ssh_version,
    sshd_banner,
    table,
)
from benchlib import summary as stats

SECTIONS = ("kills", "hangs", "storms", "soak", "failover")
KILL_TARGETS = ("ssh", "sshd", "proxy")
METHODS = ("client", "quick")
METHOD_NAMES = {"client": "rvgahp_client", "quick": "quick_session"}
TARGET_NAMES = {"ssh": "transport ssh", "sshd": "sshd session", "proxy": "rvgahp_proxy"}
RECOVERY_LIMIT = 40.0  # a kill not recovered from in this long is a failed trial
QUICK_RETRY = 0.02
FAST_GAHP = "#!/bin/sh\necho '$GahpVersion: 1.0 faults $'\nexec cat >/dev/null\n"
log = Progress("faults")
LINE_RE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+) (rvgahp_\w+)\[(\d+)\]: (.*)$")


# --------------------------------------------------------------------------- helpers


def cells(st, fmt="%.3f"):
    """median, min, max as table cells."""
    if st is None:
        return ["-", "-", "-"]
    return [fmt % st["median"], fmt % st["min"], fmt % st["max"]]


def wall_of(stamp):
    """The time.time() of a log timestamp (local time, as rvgahp writes it)."""
    return time.mktime(time.strptime(stamp[:19], "%Y-%m-%d %H:%M:%S")) + float("0" + stamp[19:])


def log_events(text, role=None, pid=None):
    """[(wall time, role, pid, message)] from rvgahp log text, optionally one process's."""
    events = []
    for line in text.splitlines():
        m = LINE_RE.match(line)
        if not m:
            continue
        if role is not None and m.group(2) != role:
            continue
        if pid is not None and int(m.group(3)) != pid:
            continue
        events.append((wall_of(m.group(1)), m.group(2), int(m.group(3)), m.group(4)))
    return events


class Watchdog:
    """Raise TimeoutError in the main thread if the body takes longer than `seconds`
    (loopback.quick_session reads the banner without a timeout of its own)."""

    def __init__(self, seconds):
        self.seconds = seconds

    def _fire(self, signum, frame):
        raise TimeoutError("no answer within %g s" % self.seconds)

    def __enter__(self):
        self.old = signal.signal(signal.SIGALRM, self._fire)
        signal.setitimer(signal.ITIMER_REAL, self.seconds)
        return self

    def __exit__(self, *exc):
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, self.old)
        return False


def quick(sock, timeout=5.0):
    """One loopback.quick_session, bounded in time; its CLOSE fields."""
    with Watchdog(timeout + 5.0):
        return loopback.quick_session(sock, timeout=timeout)


def short_command(command):
    """'ssh', 'sshd: root@notty', 'python3 rvgahp_proxy': what a killed process was."""
    words = command.split()
    if not words:
        return "?"
    name = os.path.basename(words[0])
    if name.startswith("python") and len(words) > 1:
        return "%s %s" % (name, os.path.basename(words[1]))
    return command[:40] if name.startswith("sshd") else name


def ended_well(status):
    """quick_session's result for a GAHP that exited 0: CLOSE fields, or (newer) the status line."""
    return status in ({"exit": "0"}, "exit 0")


# --------------------------------------------------------------------------- the context


class Context:
    """sshd, the flavor, and everything started, so that cleanup can end it all."""

    def __init__(self, args):
        self.args = args
        self.sshd = None
        self.flavor = None
        self.rigs = []
        self.sessions = []
        self.stopped = []  # pids we SIGSTOPped, to SIGCONT whatever happens
        self.dirs = []  # our temp dirs; a process naming one of them is ours
        self.gahp = None

    def set_up(self):
        self.sshd = loopback.Sshd()
        self.dirs.append(self.sshd.dir)
        self.sshd.start()
        self.flavor = loopback.Flavor("faults", self.args.python, self.snapshot())
        self.dirs.append(self.flavor.bin)
        gahp_dir = loopback.short_tempdir("gahp")
        self.dirs.append(gahp_dir)
        self.gahp = os.path.join(gahp_dir, "gahp")
        with open(self.gahp, "w") as f:
            f.write(FAST_GAHP)
        os.chmod(self.gahp, 0o755)

    def snapshot(self):
        """A private copy of rvgahp.py for the whole run, so that edits to the working tree
        mid-run cannot mix versions: the roles run it, and quick_session's `import rvgahp`
        finds it already imported."""
        import importlib.util

        snap_dir = loopback.short_tempdir("rvsnap")
        self.dirs.append(snap_dir)
        path = os.path.join(snap_dir, "rvgahp.py")
        shutil.copy2(loopback.RVGAHP, path)
        self.rvgahp_source = rvgahp_source(path)
        spec = importlib.util.spec_from_file_location("rvgahp", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules["rvgahp"] = module
        self.rvgahp_version = module.VERSION
        return path

    def rig(self, **kw):
        kw.setdefault("gahp", self.gahp)
        rig = loopback.Rig(self.sshd, self.flavor, **kw)
        self.rigs.append(rig)
        self.dirs.append(rig.dir)
        return rig

    def drop(self, rig):
        rig.cleanup()
        if rig in self.rigs:
            self.rigs.remove(rig)

    def session(self, rig, wait=10):
        s = rig.session(argv=rig.flavor.argv("client", "--rvgahp-wait", str(wait), rig.sock, "blahpd"))
        self.sessions.append(s)
        return s

    def end_session(self, s):
        if s in self.sessions:
            self.sessions.remove(s)
        try:
            s.close()
        except Exception:
            pass

    def cleanup(self):
        """End everything we started; returns the leftovers found (and then killed)."""
        for pid in self.stopped:
            try:
                os.kill(pid, signal.SIGCONT)
            except OSError:
                pass
        while self.sessions:
            self.end_session(self.sessions[-1])
        while self.rigs:
            rig = self.rigs.pop()
            try:
                rig.cleanup()
            except Exception as e:
                log("cleanup of rig %s: %s" % (rig.dir, e))
        sshd_pid = (self.sshd.proc.pid,) if self.sshd is not None and self.sshd.proc is not None else ()
        # Ours: each names one of our temp dirs.
        report = end_leftovers(self.dirs, grace=10.0, but=sshd_pid, sig=signal.SIGKILL)
        if self.sshd is not None:
            self.sshd.stop()
        time.sleep(0.2)
        report += end_leftovers(self.dirs, grace=0.0, sig=signal.SIGKILL)
        for d in self.dirs:
            shutil.rmtree(d, ignore_errors=True)
        return report


# --------------------------------------------------------------------------- 1. kill -> working


def working_by_client(ctx, rig, t0):
    """Seconds from t0 until a fresh rvgahp_client reads its banner; (seconds, clients started, errors)."""
    errors = []
    attempts = 0
    while True:
        attempts += 1
        s = ctx.session(rig)
        try:
            line = s.banner(timeout=15)
            elapsed = time.monotonic() - t0
            if line.startswith("$GahpVersion"):
                status, err = s.finish(timeout=15)
                if status != 0:
                    errors.append("exit %s at close: %s" % (status, err.strip()[:200]))
                return elapsed, attempts, errors
            errors.append("not a banner: %r" % line[:80])
        except (EOFError, AssertionError, OSError) as e:
            errors.append(str(e).strip()[:300])
        finally:
            ctx.end_session(s)
        if time.monotonic() - t0 > RECOVERY_LIMIT:
            raise RuntimeError("no working session %g s after the kill: %s" % (RECOVERY_LIMIT, errors[-3:]))
        time.sleep(QUICK_RETRY)


def working_by_quick(ctx, rig, t0):
    """Seconds from t0 until loopback.quick_session succeeds, retried every 20 ms."""
    errors = {}
    attempts = 0
    while True:
        attempts += 1
        try:
            fields = quick(rig.sock)
            elapsed = time.monotonic() - t0
            if ended_well(fields):
                return elapsed, attempts, ["%dx %s" % (n, e) for e, n in errors.items()]
            key = "CLOSE %s" % fields
        except Exception as e:
            key = "%s: %s" % (type(e).__name__, str(e)[:120])
        errors[key] = errors.get(key, 0) + 1
        if time.monotonic() - t0 > RECOVERY_LIMIT:
            raise RuntimeError("no working session %g s after the kill: %s" % (RECOVERY_LIMIT, list(errors)[-3:]))
        time.sleep(QUICK_RETRY)


def target_pid(rig, target):
    return {"ssh": rig.transport_pid, "sshd": rig.sshd_session_pid, "proxy": rig.proxy_pid}[target]()


def kill_once(ctx, rig, target, method):
    """kill -9 the target, measure the time to a working session, and read the server's account of it."""
    pid = target_pid(rig, target)
    if not pid:
        raise RuntimeError("no %s process found" % target)
    victim = " ".join(loopback.cmdline(pid))[:120]
    ups = rig.links_up()
    wall0 = time.time()
    t0 = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    if method == "client":
        elapsed, attempts, errors = working_by_client(ctx, rig, t0)
    else:
        elapsed, attempts, errors = working_by_quick(ctx, rig, t0)
    result = {
        "pid": pid,
        "victim": victim,
        "seconds": elapsed,
        "attempts": attempts,
        "errors": errors[:5],
        "new_link": rig.links_up() > ups,
    }
    # The server's own account: when it saw the link go, what delay it planned, how long the login took.
    for when, _, _, message in log_events(rig.log_text(), "rvgahp_server", rig.server.pid):
        if when < wall0 - 0.001:
            continue
        if "down_s" not in result and message.startswith("link down after"):
            result["down_s"] = when - wall0
            result["down_reason"] = message.split(": ", 1)[-1]
        elif "planned_delay_s" not in result and message == "reconnecting now":
            result["planned_delay_s"] = 0.0
        elif "planned_delay_s" not in result and message.startswith("next login attempt in"):
            result["planned_delay_s"] = float(message.split()[4])
        elif "login_s" not in result and message.startswith("link up"):
            m = re.search(r"([\d.]+) s after the login began", message)
            result["login_s"] = float(m.group(1)) if m else None
            result["up_s"] = when - wall0
    return result


def baseline(ctx, trials):
    """Session start on a healthy link, for contrast."""
    rig = ctx.rig(ping_interval=15, ping_timeout=45)
    out = {"client": [], "quick": []}
    try:
        rig.start_server()
        quick(rig.sock)  # warm
        for _ in range(trials * 2):
            t0 = time.monotonic()
            elapsed, _, _ = working_by_client(ctx, rig, t0)
            out["client"].append(elapsed)
            t0 = time.monotonic()
            elapsed, _, _ = working_by_quick(ctx, rig, t0)
            out["quick"].append(elapsed)
        out["server_exe"] = exe_of(rig.server.pid)
        out["proxy_exe"] = exe_of(rig.proxy_pid())
    finally:
        ctx.drop(rig)
    return out


def kill_trials(ctx, trials, results):
    """Fill results (so an interrupted run still reports what it measured)."""
    for trial in range(trials):
        for target in KILL_TARGETS:
            for method in METHODS:
                key = "%s/%s" % (target, method)
                entry = results.setdefault(key, {"first": [], "second": [], "failures": []})
                rig = ctx.rig(ping_interval=15, ping_timeout=45)
                try:
                    rig.start_server()
                    quick(rig.sock)  # the link serves before we break it
                    first = kill_once(ctx, rig, target, method)
                    entry["first"].append(first)
                    second = kill_once(ctx, rig, target, method)
                    entry["second"].append(second)
                    log(
                        "trial %d: kill -9 %s, %s: %.3f s; again at once: %.3f s (planned delay %s s)"
                        % (trial + 1, target, METHOD_NAMES[method], first["seconds"], second["seconds"], second.get("planned_delay_s"))
                    )
                except Exception as e:
                    entry["failures"].append("%s: %s" % (type(e).__name__, e))
                    log("trial %d: kill -9 %s, %s FAILED: %s" % (trial + 1, target, METHOD_NAMES[method], e))
                finally:
                    ctx.drop(rig)


# --------------------------------------------------------------------------- 2. dead link


def hang_trial(ctx, interval, timeout):
    rig = ctx.rig(ping_interval=interval, ping_timeout=timeout)
    result = {"ping_interval": interval, "ping_timeout": timeout}
    s = None
    try:
        rig.start_server()
        s = ctx.session(rig)
        if not s.banner(timeout=15).startswith("$GahpVersion"):
            raise RuntimeError("no banner")
        time.sleep(min(interval, 1.0) * 1.5)  # a ping or so each way on the live link
        ssh = rig.transport_pid()
        marker = "rvgahp_server[%d]: link down" % rig.server.pid
        downs = rig.log_text().count(marker)
        wall0 = time.time()
        t0 = time.monotonic()
        os.kill(ssh, signal.SIGSTOP)
        ctx.stopped.append(ssh)
        client_s = server_s = None
        limit = timeout * 2 + 20
        last_log_read = 0.0
        while (client_s is None or server_s is None) and time.monotonic() - t0 < limit:
            now = time.monotonic()
            if client_s is None and s.proc.poll() is not None:
                client_s = now - t0
            if server_s is None and now - last_log_read >= 0.02:
                last_log_read = now
                if rig.log_text().count(marker) > downs:
                    server_s = time.monotonic() - t0
            time.sleep(0.005)
        result.update(client_exit_s=client_s, server_link_down_s=server_s, client_status=s.proc.poll())
        result["client_stderr"] = s.stderr_text().strip()[:300] if client_s is not None else "(still running)"
        for when, _, _, message in log_events(rig.log_text(), "rvgahp_server", rig.server.pid):
            if when >= wall0 and message.startswith("link down after"):
                result["server_log_down_s"] = when - wall0
                result["server_reason"] = message.split(": ", 1)[-1]
                break
        for when, _, _, message in log_events(read_text(rig.proxy_log), "rvgahp_proxy"):
            if when >= wall0 and message.startswith("link down"):
                result["proxy_log_down_s"] = when - wall0
                result["proxy_reason"] = message.split(": ", 1)[-1]
                break
        try:
            rig.wait_link(count=2, timeout=timeout + 30)
            result["link_back_s"] = time.monotonic() - t0
        except AssertionError:
            result["link_back_s"] = None
        try:
            loopback.wait_for(lambda: loopback.process_state(ssh) in (None, "Z"), 10, what="the stopped ssh to end")
            result["stopped_ssh_ended"] = True
        except AssertionError:
            result["stopped_ssh_ended"] = False
        if ssh in ctx.stopped and loopback.process_state(ssh) is None:
            ctx.stopped.remove(ssh)
    finally:
        if s is not None:
            ctx.end_session(s)
        ctx.drop(rig)
    return result


# --------------------------------------------------------------------------- 3. logins per minute


def storm_variants(ctx):
    """(name, rig) for each way a login can keep failing, transports written."""
    variants = []
    rig = ctx.rig()
    rig.write_transport("echo 'ssh: connect to host x port 22: Connection refused' >&2\nexit 255\n")
    variants.append(("refused: ssh exits 255 at once", rig))
    rig = ctx.rig()
    rig.write_transport("exec " + " ".join(shlex.quote(a) for a in ctx.sshd.ssh_argv("exit 0")) + "\n")
    variants.append(("login works, remote command exits 0", rig))
    rig = ctx.rig()
    remote = "timeout 1 " + rig.flavor.command_line("proxy", rig.sock)
    rig.write_transport("exec " + " ".join(shlex.quote(a) for a in ctx.sshd.ssh_argv(remote)) + "\n")
    variants.append(("link up, then the proxy ends after 1 s", rig))
    return variants


def max_in_window(times, window=60.0):
    best = 0
    for i, t in enumerate(times):
        best = max(best, sum(1 for u in times[i:] if u - t < window))
    return best


def login_storms(ctx, seconds, extra):
    """Run the variants side by side for seconds + extra; count logins from each server's log.

    The count is over the first `seconds` from the server's start; the sliding-window
    maximum is over the whole watch, so a login just past the first minute is seen too.
    """
    variants = storm_variants(ctx)
    watch = seconds + extra
    try:
        for _, rig in variants:
            rig.start_server(wait=False)
        deadline = time.monotonic() + watch + 0.5
        while time.monotonic() < deadline:
            for name, rig in variants:
                if rig.server.poll() is not None:
                    raise RuntimeError("the server for %r exited %s" % (name, rig.server.returncode))
            time.sleep(0.25)
        results = []
        for name, rig in variants:
            events = log_events(rig.log_text(), "rvgahp_server", rig.server.pid)
            start = events[0][0] if events else time.time()
            end = start + seconds
            all_logins = [w for w, _, _, m in events if m.startswith("link: started transport") and w < start + watch]
            logins = [w for w in all_logins if w < end]
            delays = []
            for w, _, _, m in events:
                if w >= start + watch:
                    continue
                if m.startswith("next login attempt in"):
                    delays.append(float(m.split()[4]))
                elif m == "reconnecting now":
                    delays.append(0.0)
            first_failure = next((m for _, _, _, m in events if m.startswith(("link attempt failed", "link down after"))), None)
            results.append(
                {
                    "variant": name,
                    "seconds": seconds,
                    "watched_s": watch,
                    "logins": len(logins),
                    "per_minute": len(logins) * 60.0 / seconds,
                    "max_in_any_60s": max_in_window(all_logins),
                    "login_offsets_s": [round(w - start, 2) for w in all_logins],
                    "delays_logged_s": delays,
                    "links_up": sum(1 for _, _, _, m in events if m.startswith("link up")),
                    "first_failure": first_failure,
                }
            )
        return results
    finally:
        for _, rig in variants:
            ctx.drop(rig)


# --------------------------------------------------------------------------- 4. soak


def soak(ctx, count, time_limit):
    rig = ctx.rig(ping_interval=15, ping_timeout=45)
    try:
        rig.start_server()
        server, proxy = rig.server.pid, rig.proxy_pid()
        for _ in range(100):  # warm-up: caches, allocator arenas, first-use imports
            quick(rig.sock)
        time.sleep(0.3)

        def sample():
            return {
                "server_fds": loopback.open_fd_count(server),
                "server_rss_kb": loopback.rss_kb(server),
                "proxy_fds": loopback.open_fd_count(proxy),
                "proxy_rss_kb": loopback.rss_kb(proxy),
            }

        before = sample()
        checkpoints = []
        failures = {}
        done = 0
        path_len = len(sys.path)
        t0 = time.monotonic()
        for i in range(count):
            if time.monotonic() - t0 > time_limit:
                log("soak: stopped at the %g s limit after %d sessions" % (time_limit, done))
                break
            try:
                fields = quick(rig.sock, timeout=10)
                if not ended_well(fields):
                    key = "CLOSE %s" % fields
                    failures[key] = failures.get(key, 0) + 1
            except Exception as e:
                key = "%s: %s" % (type(e).__name__, str(e)[:120])
                failures[key] = failures.get(key, 0) + 1
            done += 1
            del sys.path[: len(sys.path) - path_len]  # quick_session prepends REPO on every call
            if sum(failures.values()) > 50:
                log("soak: more than 50 failures; stopping")
                break
            if (i + 1) % max(1, count // 5) == 0:
                point = dict(sample(), sessions=i + 1, seconds=time.monotonic() - t0)
                checkpoints.append(point)
                log(
                    "soak: %d sessions, %.0f/s; server %d fds %d kB, proxy %d fds %d kB"
                    % (
                        i + 1,
                        (i + 1) / point["seconds"],
                        point["server_fds"],
                        point["server_rss_kb"],
                        point["proxy_fds"],
                        point["proxy_rss_kb"],
                    )
                )
        elapsed = time.monotonic() - t0
        time.sleep(0.5)
        after = sample()
        try:
            loopback.wait_for(lambda: not rig.zombies(), 5, what="no zombies")
        except AssertionError:
            pass
        return {
            "sessions": done,
            "seconds": elapsed,
            "per_second": done / elapsed if elapsed else None,
            "before": before,
            "after": after,
            "checkpoints": checkpoints,
            "failures": failures,
            "zombies": rig.zombies(),
            "orphans": rig.orphans(),
            "live_gahps": len(rig.gahp_pids()),
        }
    finally:
        ctx.drop(rig)


# --------------------------------------------------------------------------- 5. hard failover

FAILOVER_GOAL = 15.0  # seconds: the first session after a hard failover succeeds within this
FAILOVER_LIMIT = 90.0  # a first session with no banner or error by then is a failed trial
GRIDMANAGER_WAIT = 20.0  # the GridManager's own timeout per command


def named_gahp(ctx, name):
    """A shell GAHP whose banner names the node it runs on, so a session shows who served it."""
    path = os.path.join(os.path.dirname(ctx.gahp), "gahp-" + name)
    with open(path, "w") as f:
        f.write(FAST_GAHP.replace("faults", name))
    os.chmod(path, 0o755)
    return path


def first_after(events, wall0, pid=None, starts=()):
    """Seconds from wall0 to the first event at or after it whose message starts with one of
    `starts` (and from process pid, if given); None if there is none."""
    for when, _, epid, message in events:
        if when >= wall0 - 0.001 and (pid is None or epid == pid) and message.startswith(starts):
            return when - wall0
    return None


def stop_pid(ctx, pid):
    os.kill(pid, signal.SIGSTOP)
    ctx.stopped.append(pid)


def end_stopped(ctx, pids):
    """SIGCONT, then SIGKILL: the frozen link's processes, once a trial is over."""
    for pid in pids:
        for sig in (signal.SIGCONT, signal.SIGKILL):
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        if pid in ctx.stopped:
            ctx.stopped.remove(pid)


def failover_trial(ctx, rng, result):
    """One hard failover on a fresh pair of rigs; fills result with what happened, in seconds from the fault."""
    active = ctx.rig(ping_interval=15, ping_timeout=45, gahp=named_gahp(ctx, "active"))
    standby = None
    frozen = []
    s = None
    try:
        active.start_server()
        # Only one proxy serves the socket yet: this one is the active link's.
        active_proxy = active.proxy_pid()
        standby = ctx.rig(ping_interval=15, ping_timeout=45, gahp=named_gahp(ctx, "standby"))
        standby.sock, standby.proxy_log = active.sock, active.proxy_log  # a second login node, same socket
        standby.write_transport()
        standby.start_server(wait=False)
        loopback.wait_for(lambda: "link up as a hot standby" in standby.log_text(), 30, what="the standby link")
        result["server_exe"], result["proxy_exe"] = exe_of(active.server.pid), exe_of(active_proxy)
        before = active.run_client(input=b"")
        if b"1.0 active" not in before.stdout:
            raise RuntimeError("before the fault, a session was not served by the active node: %r" % before.stdout[:200])
        # Not active.sshd_session_pid(): it takes the first proxy on the socket, which may be the standby's.
        ssh, sshd_session = active.transport_pid(), loopback.parent_of(active_proxy) if active_proxy else None
        if not ssh or not sshd_session or not " ".join(loopback.cmdline(sshd_session)).startswith("sshd"):
            raise RuntimeError("the active link's processes not found (ssh %s, sshd %s, proxy %s)" % (ssh, sshd_session, active_proxy))
        result["victims"] = {
            "ssh": short_command(" ".join(loopback.cmdline(ssh))),
            "sshd": short_command(" ".join(loopback.cmdline(sshd_session))),
        }
        # Users' faults fall anywhere between pings: how long the link has been quiet
        # decides whether the first session probes it at once.
        phase = rng.uniform(0.0, 15.0)
        result["phase_s"] = phase
        time.sleep(phase)
        standby_links = standby.links_up()
        wall0 = time.time()
        t0 = time.monotonic()
        for pid in (ssh, sshd_session):
            stop_pid(ctx, pid)  # the network is down: nothing moves, nothing closes
            frozen.append(pid)
        active.server.kill()  # and the node is gone
        result["faulted"] = True
        result["fault_spread_s"] = time.monotonic() - t0
        s = active.session()  # the GridManager's next GAHP start: the default client wait
        ctx.sessions.append(s)
        active.server.wait()
        try:
            line = s.banner(timeout=FAILOVER_LIMIT)
            result["banner_s"] = time.monotonic() - t0
            result["banner"] = line.strip()[:80]
            status, err = s.finish(timeout=15)
        except EOFError:
            result["ended_s"] = time.monotonic() - t0
            s.proc.wait(15)
            status, err = s.proc.returncode, s.stderr_text()
        except AssertionError as e:  # no line within the limit
            result["ended_s"] = time.monotonic() - t0
            status, err = None, "no banner and no error within %g s (%s)" % (FAILOVER_LIMIT, e)
        result["client_status"] = status
        result["client_stderr"] = err.strip()[:300]
        result["served_by_standby"] = result.get("banner", "").startswith("$GahpVersion: 1.0 standby")
        result["ok"] = result["served_by_standby"] and status == 0
        try:
            loopback.wait_for(lambda: "link active: the standby proxy took over" in standby.log_text(), 30, what="the takeover")
        except AssertionError:
            pass
        # Each step, from the logs (wall-clock stamps; the proxies share the socket's log).
        proxy_events = log_events(read_text(active.proxy_log), "rvgahp_proxy")
        server_events = log_events(standby.log_text(), "rvgahp_server", standby.server.pid)
        result["silent_s"] = first_after(proxy_events, wall0, active_proxy, ("link down",))
        result["silent_line"] = next(
            (m for w, _, p, m in proxy_events if w >= wall0 - 0.001 and p == active_proxy and m.startswith("link down")), None
        )
        others = [e for e in proxy_events if e[2] != active_proxy]  # the standby's proxy
        result["proxy_took_over_s"] = first_after(others, wall0, None, ("took over", "the rvgahp_proxy serving"))
        result["takeover_s"] = first_after(server_events, wall0, None, ("link active: the standby proxy took over",))
        result["standby_session_s"] = first_after(others, wall0, None, ("session ",))
        result["new_logins"] = standby.links_up() - standby_links
    finally:
        if s is not None:
            ctx.end_session(s)
        end_stopped(ctx, frozen)
        for rig in (standby, active):
            if rig is None:
                continue
            for pid in rig.gahp_pids():
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            ctx.drop(rig)


def failovers(ctx, trials, seed, results):
    """Fill results (so an interrupted run still reports what it measured)."""
    import random

    rng = random.Random(seed)
    for trial in range(trials):
        r = {}
        results.append(r)
        try:
            failover_trial(ctx, rng, r)
        except Exception as e:
            r["failure"] = "%s%s: %s" % ("" if r.get("faulted") else "before the fault: ", type(e).__name__, e)
            log("failover %d FAILED: %s" % (trial + 1, r["failure"]))
        else:
            log(
                "failover %d (%.1f s after the last session): standby active after %s s; first session %s after %s s"
                % (
                    trial + 1,
                    r["phase_s"],
                    "%.2f" % r["takeover_s"] if r.get("takeover_s") is not None else "-",
                    "served by the standby" if r["ok"] else "FAILED (%s)" % r["client_stderr"][:120],
                    "%.2f" % r.get("banner_s", r.get("ended_s", 0.0)),
                )
            )


# --------------------------------------------------------------------------- report


def report(results):
    out = []
    meta = results["meta"]
    out.append("rvgahp fault figures (%s mode), %s" % ("quick" if meta["quick"] else "full", meta["date"]))
    out.append("rvgahp:   %s" % meta.get("rvgahp", "?"))
    out.append("roles:    rvgahp.py under CPython %s (%s)" % (meta["roles_python_version"], meta["roles_python"]))
    out.append("          seen running: server %s, proxy %s" % (meta.get("server_exe", "?"), meta.get("proxy_exe", "?")))
    out.append("openssh:  %s; sshd says %s" % (meta.get("ssh_version", "?"), meta.get("sshd_banner", "?")))
    out.append(
        "machine:  %d CPUs, load %s at start, %s at end; bench under Python %s"
        % (meta["cpus"], meta["load_start"], meta.get("load_end", "?"), meta["bench_python"])
    )
    out.append("GAHP:     a shell script (banner, then cat), so GAHP start-up is ~nothing")

    if "kills" in results:
        out.append("")
        out.append("1. kill -9 -> first working session (seconds from the kill; fresh rig per trial; pings 15 s / 45 s)")
        rows = []
        base = results.get("baseline", {})
        for method in METHODS:
            rows.append(
                ["(healthy link)", METHOD_NAMES[method], "-"]
                + [str(len(base.get(method, [])))]
                + cells(stats(base.get(method, [])))
                + ["-", "-", "-", "-"]
            )
        for target in KILL_TARGETS:
            for method in METHODS:
                entry = results["kills"].get("%s/%s" % (target, method))
                if entry is None:
                    continue
                for which in ("first", "second"):
                    trials = entry[which]
                    st = stats([t["seconds"] for t in trials])
                    down = stats([t.get("down_s") for t in trials])
                    delay = stats([t.get("planned_delay_s") for t in trials])
                    login = stats([t.get("login_s") for t in trials])
                    rows.append(
                        [TARGET_NAMES[target], METHOD_NAMES[method], "1st" if which == "first" else "2nd, at once", str(len(trials))]
                        + cells(st)
                        + [
                            "%.3f" % down["median"] if down else "-",
                            "%.2f" % delay["median"] if delay else "-",
                            "%.3f" % login["median"] if login else "-",
                            str(len(entry["failures"])) if which == "first" else "",
                        ]
                    )
        out.append(table(["killed", "working =", "kill", "n", "median", "min", "max", "down@", "delay", "login", "failed"], rows))
        out.append("  down@: the server's 'link down' line, s after the kill; delay: the wait it planned before the next login")
        out.append("  (0 = 'reconnecting now'); login: s from starting ssh to the proxy's hello. All three are medians.")
        out.append("  rvgahp_client figures include the client's interpreter start-up; quick_session retries every 20 ms in-process.")
        for target in KILL_TARGETS:
            trials = [t for m in METHODS for w in ("first", "second") for t in results["kills"].get("%s/%s" % (target, m), {}).get(w, [])]
            if not trials:
                continue
            seen = {}
            for t in trials:
                for e in t["errors"]:
                    kind = re.sub(r"^\d+x ", "", e)[:90]
                    seen[kind] = seen.get(kind, 0) + 1
            out.append(
                "  %s (%s): while waiting, failed attempts said: %s"
                % (TARGET_NAMES[target], short_command(trials[0]["victim"]), "; ".join(sorted(seen)) or "nothing (first attempt worked)")
            )
        for key, entry in results["kills"].items():
            for f in entry["failures"]:
                out.append("  FAILED %s: %s" % (key, f[:300]))

    if "hangs" in results:
        out.append("")
        out.append("2. dead-link detection: SIGSTOP of the transport ssh with one live session (seconds from the SIGSTOP)")
        rows = []
        groups = {}
        for h in results["hangs"]:
            groups.setdefault((h["ping_interval"], h["ping_timeout"]), []).append(h)
        for (interval, timeout), hs in groups.items():
            step = min(interval, timeout / 4.0, 5.0)
            client = stats([h.get("client_exit_s") for h in hs])
            server = stats([h.get("server_link_down_s") for h in hs])
            proxy = stats([h.get("proxy_log_down_s") for h in hs])
            back = stats([h.get("link_back_s") for h in hs])
            statuses = sorted({str(h.get("client_status")) for h in hs})
            rows.append(
                ["%g s / %g s" % (interval, timeout), "%.2f-%.2f" % (timeout - interval, timeout + step), str(len(hs))]
                + ["%s [%s-%s]" % tuple(cells(client, "%.2f")), "%s [%s-%s]" % tuple(cells(server, "%.2f"))]
                + ["%s" % cells(proxy, "%.2f")[0], "%s" % cells(back, "%.2f")[0], ",".join(statuses)]
            )
        out.append(
            table(
                [
                    "ping interval / timeout",
                    "expected",
                    "n",
                    "client exits [min-max]",
                    "server 'link down' [min-max]",
                    "proxy down",
                    "link back",
                    "client exit",
                ],
                rows,
            )
        )
        out.append("  expected: timeout - interval .. timeout + one tick (min(interval, timeout/4, 5) s). proxy down and")
        out.append("  link back are medians: the proxy's own 'link down' log line, and the server's next 'link up'.")
        reasons = sorted({h.get("client_stderr", "") for h in results["hangs"]})
        for r in reasons[:3]:
            out.append("  client said: %s" % r)
        sreasons = sorted({h.get("server_reason", "") for h in results["hangs"]})
        for r in sreasons[:3]:
            out.append("  server said: link down ...: %s" % r)

    if "storms" in results:
        out.append("")
        out.append("3. logins while they keep failing (target: never more than 6 in any 60 s)")
        rows = []
        for s in results["storms"]:
            rows.append(
                [
                    s["variant"],
                    "%g s" % s.get("watched_s", s["seconds"]),
                    "%d in %g s" % (s["logins"], s["seconds"]),
                    "%.1f" % s["per_minute"],
                    str(s["max_in_any_60s"]),
                    str(s["links_up"]),
                    " ".join("%g" % d for d in s["delays_logged_s"]),
                ]
            )
        out.append(
            table(["transport", "watched", "logins", "per minute", "max in any 60 s", "links up", "delays the server logged (s)"], rows)
        )
        for s in results["storms"]:
            out.append("  %s: logins at %s s" % (s["variant"], ", ".join("%g" % x for x in s["login_offsets_s"])))
            out.append("    first failure: %s" % (s["first_failure"] or "-")[:200])
        if results["storms"] and results["storms"][0]["seconds"] < 60:
            out.append("  per minute scales the count up to 60 s; the back-off front-loads attempts, so the scaled figure")
            out.append("  overstates the rate: 'max in any 60 s' over a full minute (full mode) is the figure to hold to 6.")

    if "soak" in results:
        s = results["soak"]
        out.append("")
        out.append("4. soak: %d sequential sessions (loopback.quick_session) after 100 to warm up" % s["sessions"])
        b, a = s["before"], s["after"]
        rows = [
            [
                "rvgahp_server",
                "%d -> %d" % (b["server_fds"], a["server_fds"]),
                "%d -> %d (%+d)" % (b["server_rss_kb"], a["server_rss_kb"], a["server_rss_kb"] - b["server_rss_kb"]),
            ],
            [
                "rvgahp_proxy",
                "%d -> %d" % (b["proxy_fds"], a["proxy_fds"]),
                "%d -> %d (%+d)" % (b["proxy_rss_kb"], a["proxy_rss_kb"], a["proxy_rss_kb"] - b["proxy_rss_kb"]),
            ],
        ]
        out.append(table(["process", "open fds", "RSS kB"], rows))
        out.append(
            "  %.0f sessions/s (%.1f s); failures: %s; zombies after: %s; orphaned GAHPs: %s; GAHPs still running: %d"
            % (s["per_second"] or 0, s["seconds"], s["failures"] or "none", s["zombies"] or "none", s["orphans"] or "none", s["live_gahps"])
        )
        if s["checkpoints"]:
            out.append(
                "  along the way (sessions: server RSS kB / proxy RSS kB): "
                + ", ".join("%d: %d / %d" % (c["sessions"], c["server_rss_kb"], c["proxy_rss_kb"]) for c in s["checkpoints"])
            )

    if "failover" in results:
        fo = results["failover"]
        done = [r for r in fo if "ok" in r]  # finished trials (an interrupted one has neither ok nor failure)
        out.append("")
        out.append(
            "5. hard failover to a hot standby, default pings 15 s / 45 s (seconds from the fault; %d trials, seed %s)"
            % (len(fo), results["meta"].get("seed"))
        )
        if done:
            v = done[0]["victims"]
            out.append(
                "  fault: SIGSTOP of the active link's %s and %s (network down: no bytes, no EOF), then kill -9" % (v["ssh"], v["sshd"])
            )
            out.append(
                "  of its rvgahp_server, within %.1f ms; a real rvgahp_client (default wait) starts at once"
                % (1000 * max(r["fault_spread_s"] for r in done))
            )
        rows = []
        steps = [
            ("active proxy: link down (silent link found)", "silent_s"),
            ("standby proxy takes the socket", "proxy_took_over_s"),
            ("standby server: 'link active' (takeover)", "takeover_s"),
            ("standby proxy starts the first session", "standby_session_s"),
            ("first session's banner (client)", "banner_s"),
        ]
        for name, key in steps:
            values = [r.get(key) for r in done]
            st = stats(values)
            within = sum(1 for x in values if x is not None and x <= FAILOVER_GOAL)
            rows.append(
                [name, "%d" % (st["n"] if st else 0)] + cells(st, "%.2f") + ["%d of %d" % (within, len(done)) if key == "banner_s" else ""]
            )
        out.append(table(["step", "n", "median", "min", "max", "<= %g s (goal)" % FAILOVER_GOAL], rows))
        # A trial that failed before the fault measured nothing; an interrupted one did not finish.
        measured = [r for r in fo if r.get("faulted") and ("ok" in r or "failure" in r)]
        ok = sum(1 for r in measured if r.get("ok"))
        in_goal = sum(1 for r in measured if r.get("ok") and r["banner_s"] <= FAILOVER_GOAL)
        in_gm = sum(1 for r in measured if r.get("ok") and r["banner_s"] <= GRIDMANAGER_WAIT)
        out.append(
            "  first session succeeded (served by the standby, exit 0): %d of %d; within the %g s goal: %d; within the"
            " GridManager's %g s: %d" % (ok, len(measured), FAILOVER_GOAL, in_goal, GRIDMANAGER_WAIT, in_gm)
        )
        if len(measured) < len(fo):
            out.append("  %d trial(s) failed before the fault or were interrupted (not counted): see below" % (len(fo) - len(measured)))
        out.append(
            "  goal: the first session after a hard failover succeeds within %g s: %s"
            % (
                FAILOVER_GOAL,
                "no trial reached the fault"
                if not measured
                else "met in every trial"
                if in_goal == len(measured)
                else "MISSED in %d of %d trials" % (len(measured) - in_goal, len(measured)),
            )
        )
        out.append("  per trial (quiet: s from the last session on the active link to the fault; logins: new ones by the standby):")
        for i, r in enumerate(fo):
            if "failure" in r:
                out.append("    %d. trial FAILED: %s" % (i + 1, r["failure"][:200]))
                continue
            if "ok" not in r:
                out.append("    %d. interrupted before it finished" % (i + 1))
                continue
            out.append(
                "    %d. quiet %.1f; silent %s, active %s, banner %s; %s; logins %d"
                % (
                    i + 1,
                    r["phase_s"],
                    "%.2f" % r["silent_s"] if r.get("silent_s") is not None else "-",
                    "%.2f" % r["takeover_s"] if r.get("takeover_s") is not None else "-",
                    "%.2f" % r["banner_s"] if r.get("banner_s") is not None else "none (ended at %.2f)" % r.get("ended_s", 0.0),
                    "ok" if r["ok"] else "FAILED: exit %s, %s" % (r["client_status"], r["client_stderr"][:160] or r.get("banner", "")),
                    r["new_logins"],
                )
            )
        lines = sorted({r["silent_line"] for r in done if r.get("silent_line")})
        for line in lines[:3]:
            out.append("  the active proxy said: %s" % line[:200])

    out.append("")
    strays = results.get("leftovers")
    if strays is None:
        out.append("cleanup: see stderr")
    else:
        out.append("cleanup: %s" % ("no leftover processes" if not strays else "LEFTOVERS (killed): %s" % strays))
    return "\n".join(out)


# --------------------------------------------------------------------------- main


def parse_args(argv):
    parser = argparse.ArgumentParser(description="rvgahp fault figures against a real sshd on 127.0.0.1")
    parser.add_argument("--quick", action="store_true", help="2 trials, 30 s login watch, 1000-session soak, no default-ping hang")
    parser.add_argument("--python", default=sys.executable, help="the interpreter for rvgahp's roles (default: this one)")
    parser.add_argument("--json", metavar="FILE", help="also save every figure and trial here")
    parser.add_argument("--trials", type=int, help="trials per kill target and method, hang trials and failovers (default 5, --quick 2)")
    parser.add_argument("--sessions", type=int, help="soak sessions (default 5000, --quick 1000)")
    parser.add_argument("--only", metavar="SECTIONS", help="a comma-separated subset of: %s (default: all)" % ",".join(SECTIONS))
    parser.add_argument("--seed", type=int, help="the seed for the failover's fault times (default: from the clock; printed)")
    args = parser.parse_args(argv)
    if args.only is None:
        args.sections = SECTIONS
    else:
        args.sections = tuple(x.strip() for x in args.only.split(",") if x.strip())
        unknown = [x for x in args.sections if x not in SECTIONS]
        if unknown or not args.sections:
            parser.error("--only %s: the sections are %s" % (args.only, ",".join(SECTIONS)))
    if args.seed is None:
        args.seed = int(time.time() * 1000) % 1000000
    if not (os.path.isfile(args.python) and os.access(args.python, os.X_OK)):
        parser.error("--python %s is not an executable file" % args.python)
    args.trials = max(1, min(args.trials or (2 if args.quick else 5), 50))
    args.sessions = max(1, min(args.sessions or (1000 if args.quick else 5000), 100000))
    args.watch = 30.0 if args.quick else 60.0
    return args


def run(ctx, results):
    args = ctx.args
    ctx.set_up()
    meta = results["meta"]
    meta["rvgahp"] = "rvgahp %s, %s, copied at start" % (ctx.rvgahp_version, ctx.rvgahp_source)
    meta["ssh_version"] = ssh_version()
    meta["sshd_banner"] = sshd_banner(ctx.sshd.port)
    log("sshd on 127.0.0.1:%d (%s); roles under %s" % (ctx.sshd.port, meta["sshd_banner"], args.python))

    if "kills" in args.sections:
        log("1. baseline: session start on a healthy link")
        base = baseline(ctx, args.trials)
        meta["server_exe"] = base.pop("server_exe")
        meta["proxy_exe"] = base.pop("proxy_exe")
        results["baseline"] = base
        log("1. kill -9 -> working session, %d trials x %d targets x %d methods" % (args.trials, len(KILL_TARGETS), len(METHODS)))
        results["kills"] = {}
        kill_trials(ctx, args.trials, results["kills"])

    if "hangs" in args.sections:
        log("2. dead-link detection, pings 1 s / 3 s, %d trials" % args.trials)
        hangs = results["hangs"] = []
        for i in range(args.trials):
            h = hang_trial(ctx, 1, 3)
            log(
                "hang %d: client exited after %s s, server 'link down' after %s s"
                % (i + 1, h.get("client_exit_s"), h.get("server_link_down_s"))
            )
            hangs.append(h)
        if not args.quick:
            log("2. dead-link detection with the default pings 15 s / 45 s (about a minute)")
            h = hang_trial(ctx, 15, 45)
            log("hang: client exited after %s s, server 'link down' after %s s" % (h.get("client_exit_s"), h.get("server_link_down_s")))
            hangs.append(h)

    if "storms" in args.sections:
        log("3. logins per minute while they keep failing: three servers side by side for %g s" % (args.watch + (0 if args.quick else 15)))
        results["storms"] = login_storms(ctx, args.watch, 0.0 if args.quick else 15.0)

    if "soak" in args.sections:
        log("4. soak: %d sessions" % args.sessions)
        results["soak"] = soak(ctx, args.sessions, time_limit=900)

    if "failover" in args.sections:
        log("5. hard failover to a hot standby, default pings, %d trials, seed %d" % (args.trials, args.seed))
        results["failover"] = []
        failovers(ctx, args.trials, args.seed, results["failover"])
        seen = [r for r in results["failover"] if "server_exe" in r]
        if seen and "server_exe" not in meta:
            meta["server_exe"], meta["proxy_exe"] = seen[0]["server_exe"], seen[0]["proxy_exe"]


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    results = {
        "meta": {
            "quick": args.quick,
            "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
            "roles_python": args.python,
            "roles_python_version": python_version(args.python),
            "bench_python": platform.python_version(),
            "cpus": os.cpu_count() or 0,
            "load_start": load_average(),
            "trials": args.trials,
            "sections": list(args.sections),
            "seed": args.seed,
        }
    }
    ctx = Context(args)

    def interrupted(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started with SIGINT ignored
    status = 0
    try:
        run(ctx, results)
    except KeyboardInterrupt:
        log("interrupted; cleaning up")
        status = 130
    except Exception as e:
        log("FAILED: %s: %s" % (type(e).__name__, e))
        results["error"] = "%s: %s" % (type(e).__name__, e)
        status = 1
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, signal.SIG_IGN)  # cleanup runs to the end
        strays = ctx.cleanup()
        results["leftovers"] = strays
        if strays:
            log("leftover processes (killed): %s" % strays)
        results["meta"]["load_end"] = load_average()
    print(report(results))
    sys.stdout.flush()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2, sort_keys=True)
        log("figures saved to %s" % args.json)
    return status


if __name__ == "__main__":
    sys.exit(main())

"""Tunnel figures (issue 7): rvgahp's file-transfer tunnel next to an `ssh -R` forward.

bench.py runs this with `--only tunnel`. Both ways reach the same TCP endpoint on the
"submit host" (a separate process, so its work does not share our GIL), through the same
sshd, in one run, taking turns:

    ssh -R     `ssh -R 0:127.0.0.1:ENDPOINT host cat`, as HTCondor's remote_gahp does; ssh
               prints `Allocated port N for remote forward to 127.0.0.1:ENDPOINT`
    rvgahp     an rvgahp_client for condor_ft-gahp with CONDOR_INHERIT naming the endpoint;
               it prints the same line, and N is a port on the cluster's 127.0.0.1
    floor      bench/floor_relay.py's tunnel in rvgahp's proxy and server places: the
               least any framed Python relay there costs, on the same path as rvgahp

The "cluster" is this machine, so this process connects to 127.0.0.1:N itself; the GAHP
session only has to stay open. The figures: one stream and 8 parallel streams each way
(MB/s, the median of the repeats), the CPU that the relaying processes spent per MB, and
the time to open a new connection and hear the endpoint answer (median of many).
"""

import os
import re
import selectors
import socket
import statistics
import subprocess
import sys
import threading
import time

from benchlib import MB, Strace, ancestors, cpu_seconds, loopback, summary

FLOOR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "floor_relay.py")

ALLOCATED = re.compile(rb"Allocated port (\d+) for remote forward to (\S+)")
CHUNK = 1 << 20

# The GridManager's file-transfer endpoint, played by a small server: each connection sends
# one line, then `DOWN n` gets n bytes and EOF; `UP n` sends n bytes and gets `OK`;
# `PING` gets `PONG`.
ENDPOINT = r"""
import socket, sys, threading
CHUNK = 1 << 20
def serve(conn):
    try:
        head = b""
        while b"\n" not in head:
            data = conn.recv(4096)
            if not data:
                return
            head += data
        line, rest = head.split(b"\n", 1)
        words = line.split()
        if words[0] == b"PING":
            conn.sendall(b"PONG\n")
        elif words[0] == b"DOWN":
            left = int(words[1])
            block = memoryview(b"x" * CHUNK)
            while left:
                left -= conn.send(block[: min(left, CHUNK)])
            conn.shutdown(socket.SHUT_WR)
            while conn.recv(4096):
                pass
        elif words[0] == b"UP":
            left = int(words[1]) - len(rest)
            buf = bytearray(CHUNK)
            while left > 0:
                n = conn.recv_into(buf)
                if not n:
                    return
                left -= n
            conn.sendall(b"OK\n")
    except OSError:
        pass
    finally:
        conn.close()
listener = socket.socket()
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind(("127.0.0.1", 0))
listener.listen(256)
sys.stdout.write("%d\n" % listener.getsockname()[1])
sys.stdout.flush()
while True:
    conn, _ = listener.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
"""


class Endpoint:
    """The file-transfer endpoint, in its own process."""

    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, "-c", ENDPOINT], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
        self.port = int(self.proc.stdout.readline())

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.proc.stdout.close()


def read_allocated_port(fd, timeout, what):
    """The N of the first `Allocated port N ...` line written on fd (a pipe), and all text read."""
    deadline = time.monotonic() + timeout
    text = b""
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        while True:
            m = ALLOCATED.search(text)
            if m and text.endswith(b"\n"):
                return int(m.group(1)), text
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError("%s printed no `Allocated port` line within %g s: %r" % (what, timeout, text[-300:]))
            if selector.select(left):
                data = os.read(fd, 4096)
                if not data:
                    raise RuntimeError("%s closed stderr without an `Allocated port` line: %r" % (what, text[-300:]))
                text += data


class SshForward:
    """`ssh -R 0:127.0.0.1:ENDPOINT host cat`: the stock remote_gahp's tunnel."""

    key, name = "ssh_r", "ssh -R"

    def __init__(self, sshd, endpoint_port, options=(), key=None, name=None):
        self.sshd = sshd
        self.key, self.name = key or self.key, name or self.name
        argv = sshd.ssh_argv("echo $$; exec cat")
        # The first value given wins: ssh says `Allocated port` at INFO, which ERROR hides.
        argv[1:1] = ["-o", "LogLevel=INFO", "-o", "ExitOnForwardFailure=yes", "-R", "0:127.0.0.1:%d" % endpoint_port] + list(options)
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.port, _ = read_allocated_port(self.proc.stderr.fileno(), 20, "ssh -R")
        self.remote_pid = int(self.proc.stdout.readline())  # `cat`, run by sshd's session process

    def relay_pids(self):
        return {"ssh": [self.proc.pid], "sshd": ancestors(self.remote_pid, self.sshd.proc.pid)}

    def close(self):
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for f in (self.proc.stdout, self.proc.stderr):
            f.close()


class RvgahpForward:
    """An rvgahp_client for condor_ft-gahp that names the endpoint in CONDOR_INHERIT."""

    key, name = "rvgahp", "rvgahp tunnel"

    def __init__(self, rig, endpoint_port, key=None, name=None):
        self.rig = rig
        self.key, self.name = key or self.key, name or self.name
        inherit = "4242 <127.0.0.1:%d?addrs=127.0.0.1-%d&sock=bench> 0" % (endpoint_port, endpoint_port)
        env = dict(os.environ, CONDOR_INHERIT=inherit)
        self.session = loopback.GahpSession(rig.client_argv("condor_ft-gahp"), env=env)
        banner = self.session.banner(timeout=30)
        if not banner.startswith("$GahpVersion"):
            raise RuntimeError("not a banner: %r" % banner[:80])
        # The client writes the line before any GAHP byte reaches its stdout.
        self.port, _ = read_allocated_port(self.session.proc.stderr.fileno(), 5, "rvgahp_client for condor_ft-gahp")

    def relay_pids(self):
        proxy = self.rig.proxy_pid()
        return {
            "proxy": [proxy] if proxy else [],
            "server": [self.rig.server.pid],
            "ssh": [self.rig.transport_pid()] if self.rig.transport_pid() else [],
            "sshd": ancestors(proxy, self.rig.sshd.proc.pid) if proxy else [],
        }

    def close(self):
        try:
            self.session.finish(15)
        except subprocess.TimeoutExpired:
            self.session.close()


class FloorForward:
    """bench/floor_relay.py's tunnel in rvgahp's places: the least a Python relay there costs."""

    key, name = "floor", "floor relay"

    def __init__(self, sshd, endpoint_port, python):
        self.sshd = sshd
        target = "127.0.0.1:%d" % endpoint_port
        argv = [python, FLOOR, "tunnel-server", target, "--"] + sshd.ssh_argv()
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.port, _ = read_allocated_port(self.proc.stderr.fileno(), 20, "floor_relay.py tunnel-server")
        self.target = target

    def relay_pids(self):
        proxy = [pid for pid in loopback.pids_running("tunnel-proxy " + self.target) if loopback.cmdline(pid)[1:2] == [FLOOR]]
        return {
            "proxy": proxy,
            "server": [self.proc.pid],
            "ssh": loopback.children_of(self.proc.pid),
            "sshd": ancestors(proxy[0], self.sshd.proc.pid) if proxy else [],
        }

    def close(self):
        if self.proc.poll() is None:
            self.proc.terminate()
        self.proc.wait()
        self.proc.stderr.close()


def tunnel_available(path):
    with open(path, "rb") as f:
        return b"Allocated port" in f.read()


# --------------------------------------------------------------------------- one stream


def stream(port, direction, nbytes, errors):
    """One connection through the forward: DOWN reads nbytes to EOF, UP writes nbytes and waits for OK."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=120) as s:
            s.sendall(b"%s %d\n" % (direction.encode(), nbytes))
            if direction == "DOWN":
                got = 0
                buf = bytearray(CHUNK)
                while True:
                    n = s.recv_into(buf)
                    if not n:
                        break
                    got += n
                if got != nbytes:
                    errors.append("DOWN: %d of %d bytes" % (got, nbytes))
            else:
                block = memoryview(b"\0" * CHUNK)
                left = nbytes
                while left:
                    left -= s.send(block[: min(left, CHUNK)])
                reply = b""
                while not reply.endswith(b"\n"):
                    data = s.recv(64)
                    if not data:
                        break
                    reply += data
                if reply != b"OK\n":
                    errors.append("UP: endpoint answered %r" % reply)
    except OSError as e:
        errors.append("%s: %s" % (direction, e))


def transfer(port, direction, nbytes, streams):
    """MB/s over all streams together, from the first connect to the last stream's end."""
    errors = []
    threads = [threading.Thread(target=stream, args=(port, direction, nbytes, errors)) for _ in range(streams)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    if errors:
        raise RuntimeError("; ".join(sorted(set(errors))[:3]))
    return streams * nbytes / elapsed / MB


def setup_once(port):
    """Seconds from connect() to the endpoint's answer through the forward."""
    t0 = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(b"PING\n")
        reply = b""
        while not reply.endswith(b"\n"):
            data = s.recv(64)
            if not data:
                raise RuntimeError("the connection closed before PONG (%r)" % reply)
            reply += data
    return time.perf_counter() - t0


# --------------------------------------------------------------------------- the section


def measure(sshd, rig, rvgahp, log, nbytes=256 * MB, repeats=3, parallel=8, connections=200, gcm_rig=None, gcm=None, floor_python=None):
    """{key: figures} for ssh -R and rvgahp's tunnel, taking turns; errors are figures too.

    With gcm_rig (an rvgahp whose transport has `-o Ciphers=gcm`), also both with that
    cipher: rvgahp as its transport is shipped, and ssh -R with the same cipher. With
    floor_python, also floor_relay.py's tunnel under it, with the default cipher."""
    endpoint = Endpoint()
    forwards = []
    results = {}
    try:
        log("tunnel: endpoint on 127.0.0.1:%d; opening ssh -R" % endpoint.port)
        wanted = [(SshForward, (sshd, endpoint.port), {}), (RvgahpForward, (rig, endpoint.port), {})]
        if gcm_rig is not None:
            gcm_options = ["-o", "Ciphers=" + gcm]
            wanted.append((SshForward, (sshd, endpoint.port), {"options": gcm_options, "key": "ssh_r_gcm", "name": "ssh -R gcm"}))
            wanted.append((RvgahpForward, (gcm_rig, endpoint.port), {"key": "rvgahp_gcm", "name": "rvgahp tunnel gcm"}))
        if floor_python is not None:
            wanted.append((FloorForward, (sshd, endpoint.port, floor_python), {}))
        for kind, args, kw in wanted:
            key = kw.get("key", kind.key)
            results[key] = {"name": kw.get("name", kind.name)}
            if kind is RvgahpForward and not tunnel_available(rvgahp):
                results[key]["error"] = "this rvgahp.py has no file-transfer tunnel yet (no `Allocated port` in it)"
                continue
            try:
                forwards.append(kind(*args, **kw))
            except Exception as e:
                results[key]["error"] = "%s: %s" % (type(e).__name__, e)
        for f in forwards:
            results[f.key]["port"] = f.port
            setup_once(f.port)  # warm
        log("tunnel: %d new connections through each, taking turns" % connections)
        setups = {f.key: [] for f in forwards}
        setup_cpu = {f.key: {} for f in forwards}
        block = 20
        for _ in range(max(1, connections // block)):
            for f in forwards:
                groups = f.relay_pids()
                c0 = {role: cpu_seconds(p) for role, p in groups.items()}
                for _ in range(block):
                    setups[f.key].append(setup_once(f.port))
                for role, pids in groups.items():
                    setup_cpu[f.key][role] = setup_cpu[f.key].get(role, 0.0) + cpu_seconds(pids) - c0[role]
        for f in forwards:
            results[f.key]["setup_ms"] = summary(setups[f.key], 1000.0)
            results[f.key]["setup_cpu_us"] = {role: spent / len(setups[f.key]) * 1e6 for role, spent in setup_cpu[f.key].items()}

        figures = [(n, d) for n in (1, parallel) for d in ("DOWN", "UP")]
        rates = {f.key: {fig: [] for fig in figures} for f in forwards}
        cpu = {f.key: {fig: {} for fig in figures} for f in forwards}
        broken = set()
        for r in range(repeats):
            for streams, direction in figures:
                log("tunnel: repeat %d of %d, %d stream(s) %s, %d MB each" % (r + 1, repeats, streams, direction, nbytes // MB))
                for f in forwards:
                    if f.key in broken:
                        continue
                    groups = f.relay_pids()
                    c0 = {role: cpu_seconds(p) for role, p in groups.items()}
                    try:
                        rates[f.key][(streams, direction)].append(transfer(f.port, direction, nbytes, streams))
                    except Exception as e:
                        broken.add(f.key)
                        results[f.key]["error"] = "%d stream(s) %s: %s" % (streams, direction, e)
                        continue
                    spent = cpu[f.key][(streams, direction)]
                    for role, pids in groups.items():
                        spent[role] = spent.get(role, 0.0) + cpu_seconds(pids) - c0[role]
        for f in forwards:
            for (streams, direction), values in rates[f.key].items():
                if not values:
                    continue
                name = "%s_%d" % (direction.lower(), streams)
                results[f.key][name + "_mbps"] = statistics.median(values)
                results[f.key][name + "_all"] = values
                moved = len(values) * streams * nbytes / MB
                results[f.key][name + "_cpu_us_per_mb"] = {role: s / moved * 1e6 for role, s in cpu[f.key][(streams, direction)].items()}
        rv = [f for f in forwards if f.key == RvgahpForward.key and f.key not in broken]  # default cipher
        if rv and Strace.available():
            results[rv[0].key]["syscalls"] = tunnel_syscalls(rv[0], min(nbytes, 64 * MB), log)
    finally:
        for f in forwards:
            f.close()
        endpoint.stop()
    results["params"] = {"mb": nbytes // MB, "repeats": repeats, "parallel": parallel, "connections": connections}
    return results


def tunnel_syscalls(forward, nbytes, log):
    """{direction: {role: syscalls per MB}} of one stream through rvgahp's tunnel, from `strace -c -f -p`."""
    found = {}
    watched = {"proxy": forward.rig.proxy_pid(), "server": forward.rig.server.pid}
    for direction in ("DOWN", "UP"):
        log("tunnel: strace -c on the proxy and the server, one stream %s, %d MB" % (direction, nbytes // MB))
        with Strace(watched) as tracer:
            transfer(forward.port, direction, nbytes, 1)
        found[direction.lower()] = {role: c["calls"] / (nbytes / MB) for role, c in tracer.counts().items()}
    return found

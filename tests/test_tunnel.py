"""End to end: the file-transfer tunnel, as the GridManager and the ft-gahp use it.

The GridManager starts `rvgahp_client SOCK condor_ft-gahp` with CONDOR_INHERIT naming its
own address. The client answers on stderr, before the GAHP's banner, with
`Allocated port N for remote forward to HOST:PORT`, and from then on the GridManager
tells the ft-gahp on the cluster to connect to 127.0.0.1:N for each transfer.

Here a FakeGridManager (a threaded TCP server on the submit host) plays the
GridManager's file-transfer endpoint, and tests/testgahp, running as the ft-gahp on the
"cluster" (this same machine), opens the connections when told to by GAHP commands
(TCP_OPEN and friends). Every byte is pseudo-random from a pinned seed and is checked
by its sha256 at the far end, never by eye.
"""

import collections
import contextlib
import encodings.idna  # noqa: F401  (a uid-nobody child resolves "127.0.0.1" with it, and can't import it)
import hashlib
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading

import harness
import pytest
import testgahp

SEED = 20261121  # every stream's seed is derived from this one; printed by each test that uses it
MB = 1 << 20
WAIT = 30  # seconds to wait for an event before calling it a hang
ALLOCATED = re.compile(r"^Allocated port (\d+) for remote forward to (\S+)$")
WARNING_DIRECT = "transfers will go direct"
NOBODY = 65534

Result = collections.namedtuple("Result", "sent received sha256 read_end send_end")
Seen = collections.namedtuple("Seen", "mode received sha256 end sent")


def seed_for(name):
    """A stream's seed: the pinned SEED plus a small offset per stream, printed for a rerun."""
    seed = SEED + sum(name.encode()) % 1000
    print("stream %s: seed %d" % (name, seed))
    return seed


def sha256(data):
    return hashlib.sha256(data).hexdigest()


def reply_of(count, digest):
    """What a sink endpoint answers after EOF: the count and sha256 it received."""
    return ("%d %s\n" % (count, digest)).encode()


# --------------------------------------------------------------------------- the GridManager's endpoint


class FakeGridManager:
    """The GridManager's file-transfer endpoint: a threaded TCP server on the submit host.

    Each connection starts with a line `MODE TAG [ARGS]` that says what to do:
      sink TAG             read to EOF, then answer "COUNT SHA256\\n" and close
      source TAG N SEED    write N seeded bytes, half-close, then read to EOF
      echo TAG             write back what it reads; at EOF half-close
      stall TAG            read nothing more until release(), then as sink
      gather TAG K         wait until K gather connections are open at once, then as sink
      hold TAG             read to EOF; never close first
    What each connection saw is in .seen[TAG] once it ends; .headers has each TAG on arrival.
    """

    def __init__(self, host="127.0.0.1", listen=True, rcvbuf=None):
        self.host = host
        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if rcvbuf:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)  # accepted sockets inherit it
        self.sock.bind((host, 0))
        self.port = self.sock.getsockname()[1]
        self.lock = threading.Lock()
        self.headers = []
        self.seen = {}
        self.accepted = 0
        self.released = threading.Event()
        self.barriers = {}
        self.conns = []
        self.listening = False
        if listen:
            self.listen()

    @property
    def address(self):
        return "[%s]:%d" % (self.host, self.port) if ":" in self.host else "%s:%d" % (self.host, self.port)

    def condor_inherit(self):
        """CONDOR_INHERIT as the GridManager gives it to the ft-gahp: ppid, sinful, ..."""
        host = "[%s]" % self.host if ":" in self.host else self.host
        return "4242 <%s:%d?addrs=%s-%d&noUDP&sock=schedd_1_2> 0" % (host, self.port, host, self.port)

    def listen(self):
        """Start accepting. Until then the port is bound but refuses connections."""
        self.sock.listen(128)
        self.listening = True
        threading.Thread(target=self._accept_loop, daemon=True).start()

    def _accept_loop(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return  # close() shut the listener down
            with self.lock:
                self.accepted += 1
                self.conns.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def release(self):
        self.released.set()

    def close(self):
        self.released.set()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the accept() on Linux
        except OSError:
            pass
        self.sock.close()
        with self.lock:
            for conn in self.conns:
                try:
                    conn.shutdown(socket.SHUT_RDWR)  # wakes its thread's recv(); the thread closes it
                except OSError:
                    pass

    def wait_seen(self, tag, timeout=WAIT):
        return harness.wait_for(
            lambda: self.seen.get(tag), timeout, what="the endpoint to see connection %s end (headers so far: %s)" % (tag, self.headers)
        )

    def wait_header(self, tag, timeout=WAIT):
        harness.wait_for(lambda: tag in self.headers, timeout, what="connection %s to reach the endpoint" % tag)

    # One connection.

    def _serve(self, conn):
        conn.settimeout(testgahp.JOB_TIMEOUT)
        with conn:
            head = b""
            try:
                while b"\n" not in head and len(head) < 512:
                    data = conn.recv(512)
                    if not data:
                        break
                    head += data
            except OSError:
                pass
            line, _, rest = head.partition(b"\n")
            words = line.decode(errors="replace").split()
            if len(words) < 2:
                return
            mode, tag, args = words[0], words[1], words[2:]
            with self.lock:
                self.headers.append(tag)
            digest = hashlib.sha256(rest)
            received = len(rest)
            sent = 0
            if mode == "echo" and rest:
                try:
                    conn.sendall(rest)
                    sent += len(rest)
                except OSError:
                    pass  # the read below sees how the connection ended
            if mode == "source":
                total, seed = int(args[0]), int(args[1])
                try:
                    for piece in testgahp.seeded_bytes(seed, total):
                        conn.sendall(piece)
                        sent += len(piece)
                    conn.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
            elif mode == "stall":
                self.released.wait(testgahp.JOB_TIMEOUT)
            elif mode == "gather":
                with self.lock:
                    barrier = self.barriers.setdefault(args[0], threading.Barrier(int(args[0]), timeout=WAIT))
                try:
                    barrier.wait()
                except threading.BrokenBarrierError:
                    self.seen[tag] = Seen(mode, received, None, "only %d of %s were open at once" % (barrier.n_waiting, args[0]), 0)
                    return
            end = "eof"
            try:
                while True:
                    data = conn.recv(1 << 16)
                    if not data:
                        break
                    received += len(data)
                    digest.update(data)
                    if mode == "echo":
                        conn.sendall(data)
                        sent += len(data)
            except OSError as e:
                end = testgahp.errno_name(e)
            if mode in ("sink", "stall", "gather") and end == "eof":
                try:
                    conn.sendall(reply_of(received, digest.hexdigest()))
                except OSError:
                    end = "could not reply"
            elif mode == "echo" and end == "eof":
                try:
                    conn.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
            self.seen[tag] = Seen(mode, received, digest.hexdigest(), end, sent)


@pytest.fixture(scope="module")
def quiet_rig(sshd, default_flavor):
    """One linked server for this module's tests that only start sessions and break nothing."""
    r = harness.Rig(sshd, default_flavor)
    r.start_server()
    yield r
    r.cleanup()


@pytest.fixture
def endpoint():
    made = []

    def make(**kw):
        gm = FakeGridManager(**kw)
        made.append(gm)
        return gm

    yield make
    for gm in made:
        gm.close()


# --------------------------------------------------------------------------- the ft-gahp session


class FtSession(harness.GahpSession):
    """A client run as the GridManager runs the ft-gahp, with its stderr read while it runs."""

    def __init__(self, argv, env):
        harness.GahpSession.__init__(self, argv, env=env)
        self.err_fd = self.proc.stderr.fileno()
        os.set_blocking(self.err_fd, False)
        self.err = b""
        self.err_at_banner = None

    def drain_stderr(self):
        """Take what the client has written on stderr so far."""
        while True:
            try:
                data = os.read(self.err_fd, 65536)
            except BlockingIOError:
                return self.err.decode(errors="replace")
            if not data:
                return self.err.decode(errors="replace")
            self.err += data

    def banner(self, timeout=WAIT):
        """The GAHP's banner. At the moment its first byte can be read, whatever the client
        wrote on stderr before it is already in the pipe: keep that as err_at_banner."""
        if not self.buf:
            self.selector.select(timeout)
        self.err_at_banner = self.drain_stderr()
        return self.readline(timeout)

    def stderr_text(self):
        if self.proc.poll() is None:
            return self.drain_stderr()
        os.set_blocking(self.err_fd, True)
        while select.select([self.err_fd], [], [], WAIT)[0]:
            data = os.read(self.err_fd, 65536)
            if not data:
                break
            self.err += data
        return self.err.decode(errors="replace")

    def allocated_lines(self, text=None):
        lines = (self.drain_stderr() if text is None else text).splitlines()
        return [line for line in lines if line.startswith("Allocated port")]

    def tunnel_port(self, endpoint):
        """N from the one `Allocated port N ...` line, which must have come before the banner."""
        assert self.err_at_banner is not None, "read the banner first"
        lines = self.allocated_lines(self.err_at_banner)
        assert lines, (
            "the client printed no `Allocated port N for remote forward to %s` line on stderr before the ft-gahp's banner "
            "(is the tunnel implemented?); its stderr by then: %r" % (endpoint.address, self.err_at_banner)
        )
        assert len(lines) == 1, "more than one Allocated line: %r" % lines
        m = ALLOCATED.match(lines[0])
        assert m, "the Allocated line is not in ssh's shape: %r" % lines[0]
        assert m.group(2) == endpoint.address, "the line names %s, not the GridManager's %s" % (m.group(2), endpoint.address)
        port = int(m.group(1))
        assert 0 < port < 65536
        return port

    def tcp(self, line, timeout=WAIT):
        reply = self.command(line, timeout)
        assert reply.startswith("S"), "%s -> %s" % (line, reply)
        return reply

    def tcp_wait(self, tag, timeout=WAIT):
        """The ft-gahp's account of one connection, once it has ended."""
        reply = self.command("TCP_WAIT %s %d" % (tag, timeout), timeout + 15)
        assert reply.startswith("S "), "connection %s: %s" % (tag, reply)
        return parse_result(reply)


def parse_result(reply):
    words = reply.split()
    assert words[0] == "S" and len(words) == 6, reply
    return Result(int(words[1]), int(words[2]), words[3], words[4], words[5])


def ft_env(inherit):
    env = dict(os.environ)
    env.pop("CONDOR_INHERIT", None)
    if inherit is not None:
        env["CONDOR_INHERIT"] = inherit
    return env


def start_ft(rig, inherit, gahp="condor_ft-gahp", argv=None):
    """A GridManager-started ft-gahp session, read up to its banner."""
    s = FtSession(argv or rig.client_argv(gahp), ft_env(inherit))
    banner = s.banner()
    assert banner.startswith("$GahpVersion"), banner
    return s


def tunnel_session(rig, gm):
    s = start_ft(rig, gm.condor_inherit())
    return s, s.tunnel_port(gm)


def linked_tunnel_session(make_rig, endpoint, **endpoint_options):
    """A linked server, a GridManager endpoint, and an ft-gahp session with its tunnel port."""
    rig = make_rig()
    rig.start_server()
    gm = endpoint(**endpoint_options)
    s, port = tunnel_session(rig, gm)
    return rig, gm, s, port


def transfer_both_ways(s, gm, port, size, name, timeout=120):
    """size seeded bytes up to the endpoint and size down from it, each checked by digest."""
    up_seed, down_seed = seed_for(name + "-up"), seed_for(name + "-down")
    s.tcp("TCP_OPEN up %d %d %d send sink up" % (port, size, up_seed))
    s.tcp("TCP_OPEN down %d 0 0 recv source down %d %d" % (port, size, down_seed))
    assert gm.wait_seen("up") == Seen("sink", size, testgahp.seeded_digest(up_seed, size), "eof", 0)
    assert s.tcp_wait("up", timeout).sent == size
    assert s.tcp_wait("down", timeout) == Result(0, size, testgahp.seeded_digest(down_seed, size), "eof", "done")


def works_with_one_warning(s):
    """An ft-gahp session with no tunnel still works and ends well, having said one
    warning line and no Allocated line; (the warning, all of stderr)."""
    assert s.command("ECHO works") == "S works"
    status, err = s.finish(WAIT)
    assert status == 0, err
    assert not s.allocated_lines(err), err
    lines = err.splitlines()
    assert len(lines) == 1, "want one warning line, got %r" % err
    assert lines[0].startswith("rvgahp_client: warning: "), err
    return lines[0], err


def finish_clean(s):
    """End the session as the GridManager does; it exits 0 having said exactly one Allocated line."""
    status, err = s.finish(WAIT)
    assert status == 0, err
    assert len(s.allocated_lines(err)) == 1, err
    assert "warning" not in err, err
    return err


def listeners_on(port):
    """Local addresses (hex, as /proc/net/tcp{,6} has them) listening on port."""
    found = []
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(name) as f:
                next(f)
                for line in f:
                    fields = line.split()
                    addr, hexport = fields[1].split(":")
                    if fields[3] == "0A" and int(hexport, 16) == port:
                        found.append(addr)
        except OSError:
            pass
    return found


def connecting_to(port):
    """Whether a TCP socket here is still waiting for the answer to its SYN to port."""
    with open("/proc/net/tcp") as f:
        next(f)
        return any(fields[3] == "02" and int(fields[2].split(":")[1], 16) == port for fields in (line.split() for line in f))


def connect_refused(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


def has_ipv6_loopback():
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


# --------------------------------------------------------------------------- the announcement


def test_an_ft_gahp_session_announces_a_loopback_port_before_its_banner(make_rig, endpoint):
    _rig, _gm, s, port = linked_tunnel_session(make_rig, endpoint)
    # ssh -R listens on the cluster's loopback only, and so must we: the GridManager
    # rewrites its address to 127.0.0.1:N, and nobody off the login node may come in.
    assert listeners_on(port) == ["0100007F"], "port %d listens on %s" % (port, listeners_on(port))
    assert s.command("COMMANDS").startswith("S COMMANDS")
    finish_clean(s)


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed")
def test_the_allocated_line_reaches_stderr_in_one_write(quiet_rig, endpoint):
    # The GridManager misses a line split across two reads of the pipe.
    rig, gm = quiet_rig, endpoint()
    trace = os.path.join(rig.dir, "client.strace")
    argv = ["strace", "-f", "-qq", "-e", "trace=write,writev", "-s", "300", "-o", trace, *rig.client_argv("condor_ft-gahp")]
    s = start_ft(rig, gm.condor_inherit(), argv=argv)
    port = s.tunnel_port(gm)
    finish_clean(s)
    calls = [line for line in harness.read_text(trace).splitlines() if re.search(r"\bwritev?\(2,", line)]
    want = "Allocated port %d for remote forward to %s\\n" % (port, gm.address)
    size = len(want) - 1  # strace shows the newline as the two characters \n
    pattern = r'\bwrite\(2, "%s", %d\) += %d$' % (re.escape(want), size, size)
    assert len([c for c in calls if re.search(pattern, c)]) == 1, "want one write of the whole line; the writes to stderr: %s" % calls


def test_a_blahpd_session_never_announces_a_tunnel(quiet_rig, endpoint):
    rig, gm = quiet_rig, endpoint()
    for gahp in ("blahpd", "batch_gahp"):
        s = start_ft(rig, gm.condor_inherit(), gahp=gahp)
        assert s.command("BLAH_PING") == "S"
        status, err = s.finish(WAIT)
        assert (status, err) == (0, ""), gahp


# --------------------------------------------------------------------------- bytes, both ways


def test_a_large_upload_arrives_intact_and_the_answer_comes_back_after_the_half_close(make_rig, endpoint):
    _rig, gm, s, port = linked_tunnel_session(make_rig, endpoint)
    size, seed = 32 * MB, seed_for("upload")
    s.tcp("TCP_OPEN up %d %d %d send sink up" % (port, size, seed))
    got = s.tcp_wait("up", 120)
    seen = gm.wait_seen("up")
    assert seen == Seen("sink", size, testgahp.seeded_digest(seed, size), "eof", 0)
    # The ft-gahp half-closed; its read side stayed open for the endpoint's answer.
    answer = reply_of(size, seen.sha256)
    assert got == Result(size, len(answer), sha256(answer), "eof", "done")
    finish_clean(s)


def test_a_large_download_arrives_intact_and_the_ft_gahp_answers_after_the_endpoint_half_closes(make_rig, endpoint):
    _rig, gm, s, port = linked_tunnel_session(make_rig, endpoint)
    size, seed = 32 * MB, seed_for("download")
    back, back_seed = 1 * MB, seed_for("download-answer")
    s.tcp("TCP_OPEN down %d %d %d recv source down %d %d" % (port, back, back_seed, size, seed))
    got = s.tcp_wait("down", 120)
    assert got == Result(back, size, testgahp.seeded_digest(seed, size), "eof", "done")
    # The endpoint half-closed first and still read everything the ft-gahp sent after.
    assert gm.wait_seen("down") == Seen("source", back, testgahp.seeded_digest(back_seed, back), "eof", size)
    finish_clean(s)


def test_both_directions_at_once_through_an_echoing_endpoint(make_rig, endpoint):
    _rig, gm, s, port = linked_tunnel_session(make_rig, endpoint)
    size, seed = 8 * MB, seed_for("echo")
    s.tcp("TCP_OPEN echo %d %d %d send echo echo" % (port, size, seed))
    digest = testgahp.seeded_digest(seed, size)
    assert s.tcp_wait("echo", 120) == Result(size, size, digest, "eof", "done")
    assert gm.wait_seen("echo") == Seen("echo", size, digest, "eof", size)
    finish_clean(s)


def test_64_connections_at_once_each_arrive_intact(make_rig, endpoint):
    _rig, gm, s, port = linked_tunnel_session(make_rig, endpoint)
    count, size = 64, 256 * 1024
    seeds = {}
    for i in range(count):
        tag = "c%d" % i
        seeds[tag] = SEED + 1000 + i
        # The endpoint holds each one until all 64 are open at the same time.
        s.tcp("TCP_OPEN %s %d %d %d send gather %s %d" % (tag, port, size, seeds[tag], tag, count))
    print("64 streams: seeds %d..%d" % (SEED + 1000, SEED + 1000 + count - 1))
    for tag, seed in seeds.items():
        seen = gm.wait_seen(tag, 60)
        assert seen == Seen("gather", size, testgahp.seeded_digest(seed, size), "eof", 0), tag
        answer = reply_of(size, seen.sha256)
        assert s.tcp_wait(tag, 60) == Result(size, len(answer), sha256(answer), "eof", "done"), tag
    assert gm.accepted == count
    finish_clean(s)


# --------------------------------------------------------------------------- endpoints that misbehave


def test_a_refusing_endpoint_closes_that_connection_and_the_session_goes_on(make_rig, endpoint):
    # bound, not listening: every connection is refused
    rig, gm, s, port = linked_tunnel_session(make_rig, endpoint, listen=False)
    s.tcp("TCP_OPEN refused %d %d %d send sink refused" % (port, 64 * 1024, seed_for("refused")))
    # The ft-gahp sees its connection closed: EOF, or a reset if its bytes were unread.
    # On a busy machine the reset can even beat the ft-gahp's own connect() to its result.
    reply = s.command("TCP_WAIT refused %d" % WAIT, WAIT + 15)
    if reply.startswith("E "):
        assert reply.endswith(":\\ ECONNRESET"), reply
    else:
        got = parse_result(reply)
        assert got.received == 0 and got.read_end in ("eof", "ECONNRESET"), got
    line = "tunnel: cannot connect to %s: Connection refused" % gm.address
    harness.wait_for(lambda: line in harness.read_text(rig.proxy_log), WAIT, what="%r in the proxy log" % line)
    proxy_log = harness.read_text(rig.proxy_log)
    assert proxy_log.count("tunnel: cannot connect to") == 1, proxy_log
    assert re.search(r"session \d+: " + re.escape(line), proxy_log), proxy_log
    # The session goes on, and so does its tunnel, once the GridManager listens.
    assert s.command("ECHO still here") == "S still here"
    gm.listen()
    size, seed = 1 * MB, seed_for("after-refusal")
    s.tcp("TCP_OPEN after %d %d %d send sink after" % (port, size, seed))
    assert s.tcp_wait("after").sent == size
    assert gm.wait_seen("after") == Seen("sink", size, testgahp.seeded_digest(seed, size), "eof", 0)
    finish_clean(s)


def test_an_endpoint_that_answers_the_connect_late_still_gets_every_byte(make_rig, endpoint):
    # A GridManager on another host answers a connect a network round trip later, and the
    # proxy must wait for that without holding up anything else. Here the endpoint's queue
    # of unaccepted connections is full, so its kernel drops the proxy's SYN until the
    # queue frees and TCP sends the SYN again, a second later.
    _rig, gm, s, port = linked_tunnel_session(make_rig, endpoint, listen=False)
    gm.sock.listen(0)
    filler = socket.create_connection(("127.0.0.1", gm.port), timeout=WAIT)  # the one queued connection
    size, seed = 1 * MB, seed_for("late")
    s.tcp("TCP_OPEN late %d %d %d send sink late" % (port, size, seed))
    harness.wait_for(lambda: connecting_to(gm.port), WAIT, what="the proxy's connect to wait for the endpoint")
    assert s.command("ECHO meanwhile") == "S meanwhile"
    gm.listen()  # accepts the queued one, and the SYN's next try gets through
    filler.close()
    assert s.tcp_wait("late").sent == size
    assert gm.wait_seen("late") == Seen("sink", size, testgahp.seeded_digest(seed, size), "eof", 0)
    finish_clean(s)


def test_a_stalled_endpoint_holds_back_only_its_own_connection(make_rig, endpoint):
    # a small receive buffer, so the stall backs up at once
    _rig, gm, s, port = linked_tunnel_session(make_rig, endpoint, rcvbuf=64 * 1024)
    slow_size, slow_seed = 24 * MB, seed_for("stalled")
    fast_size, fast_seed = 8 * MB, seed_for("fast")
    s.tcp("TCP_OPEN slow %d %d %d send stall slow" % (port, slow_size, slow_seed))
    gm.wait_header("slow")
    # The stalled one fills what buffers lie between; far more than one window is waiting.
    harness.wait_for(lambda: state_sent(s, "slow") >= 2 * MB, WAIT, what="2 MB of the stalled transfer to leave the ft-gahp")
    s.tcp("TCP_OPEN fast %d %d %d send sink fast" % (port, fast_size, fast_seed))
    seen = gm.wait_seen("fast", 60)
    assert seen == Seen("sink", fast_size, testgahp.seeded_digest(fast_seed, fast_size), "eof", 0)
    assert s.tcp_wait("fast").sent == fast_size
    assert "slow" not in gm.seen and s.command("TCP_STATE slow").startswith("S running"), "the stall never held"
    # Once the endpoint reads again, the held-back transfer completes intact.
    gm.release()
    got = s.tcp_wait("slow", 120)
    assert gm.wait_seen("slow") == Seen("stall", slow_size, testgahp.seeded_digest(slow_seed, slow_size), "eof", 0)
    assert (got.sent, got.read_end, got.send_end) == (slow_size, "eof", "done")
    finish_clean(s)


def state_sent(s, tag):
    words = s.command("TCP_STATE " + tag).split()
    assert words[:2] == ["S", "running"], "connection %s is no longer running: %s" % (tag, " ".join(words))
    return int(words[2])


# --------------------------------------------------------------------------- ends


def test_connections_open_when_the_session_ends_are_closed_at_both_ends(make_rig, endpoint):
    rig = make_rig()
    rig.start_server()
    gm = endpoint()
    # A first session, so the server's spare ft-gahp and the proxy are in their steady state.
    warm = start_ft(rig, gm.condor_inherit())
    warm.tunnel_port(gm)
    finish_clean(warm)
    proxy = rig.proxy_pid()
    baseline = {"server": harness.open_fd_count(rig.server.pid), "proxy": harness.open_fd_count(proxy)}

    s, port = tunnel_session(rig, gm)
    report = os.path.join(rig.dir, "tcp-report.txt")
    s.tcp("TCP_REPORT " + report)
    # Processes of the ft-gahp that outlive it, each holding a connection nobody closes.
    holders = [int(s.tcp("TCP_DETACH hold%d %d hold hold%d" % (i, port, i)).split()[1]) for i in range(3)]
    try:
        for i in range(3):
            gm.wait_header("hold%d" % i)
        # --status counts them against their session.
        status = json.loads(subprocess.check_output(rig.flavor.argv("client", "--status", "--json", rig.sock), timeout=WAIT))
        assert [x["tunnel_connections"] for x in status["sessions"] if x["gahp"] == "condor_ft-gahp"] == [3], status
        status, err = s.finish(WAIT)  # the GridManager closes the pipes; the GAHP exits
        assert status == 0, err
        # rvgahp closes them: the holders on the cluster see EOF, and so does the endpoint.
        harness.wait_for(
            lambda: harness.read_text(report).count("\n") == 3,
            WAIT,
            what="the 3 held connections to be closed; report:\n" + harness.read_text(report),
        )
        for line in harness.read_text(report).splitlines():
            got = parse_result(line.split(" ", 1)[1])
            assert got.read_end in ("eof", "ECONNRESET") and got.send_end == "open", line
        for i in range(3):
            assert gm.wait_seen("hold%d" % i).end in ("eof", "ECONNRESET")
        assert connect_refused(port), "the tunnel port %d still accepts after its session ended" % port
        harness.wait_for(
            lambda: harness.open_fd_count(rig.server.pid) <= baseline["server"] and harness.open_fd_count(proxy) <= baseline["proxy"],
            WAIT,
            what="the server's and proxy's fds to return to %s" % baseline,
        )
    finally:
        for pid in holders:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


def test_a_link_killed_mid_transfer_closes_the_connection_at_both_ends(make_rig, endpoint):
    rig, gm, s, port = linked_tunnel_session(make_rig, endpoint, rcvbuf=64 * 1024)
    report = os.path.join(rig.dir, "tcp-report.txt")
    s.tcp("TCP_REPORT " + report)
    size, seed = 24 * MB, seed_for("killed")
    s.tcp("TCP_OPEN doomed %d %d %d send stall doomed" % (port, size, seed))
    gm.wait_header("doomed")
    harness.wait_for(lambda: state_sent(s, "doomed") >= 1 * MB, WAIT, what="the transfer to be under way")
    transport = rig.transport_pid()
    assert transport, "no transport ssh to kill"
    os.kill(transport, signal.SIGKILL)
    # The ft-gahp sees its connection closed, never a hang: it has already had EOF on its
    # stdin, and waits for the connection before it exits.
    line = harness.wait_for(lambda: harness.read_text(report), WAIT, what="the ft-gahp's connection to end after the link died")
    got = parse_result(line.split(" ", 1)[1])
    assert got.received == 0 and got.read_end in ("eof", "ECONNRESET"), got
    # The endpoint too: it sees the end, not silence, and what it read is short (only what
    # the proxy's bounded buffers held). The end is a reset, never a clean EOF, so a cut-off
    # transfer cannot pass for a finished one.
    gm.release()
    seen = gm.wait_seen("doomed")
    assert seen.received < size and seen.end == "ECONNRESET", seen
    assert s.proc.wait(WAIT) != 0
    s.close()
    # The link heals, and a new session's tunnel works.
    rig.wait_link(2, timeout=60)
    s2, port2 = tunnel_session(rig, gm)
    size2, seed2 = 1 * MB, seed_for("after-relink")
    s2.tcp("TCP_OPEN again %d %d %d send sink again" % (port2, size2, seed2))
    assert s2.tcp_wait("again").sent == size2
    assert gm.wait_seen("again") == Seen("sink", size2, testgahp.seeded_digest(seed2, size2), "eof", 0)
    finish_clean(s2)


# --------------------------------------------------------------------------- addresses and environments


@pytest.mark.skipif(not has_ipv6_loopback(), reason="this machine has no ::1")
def test_an_ipv6_sinful_reaches_the_ipv6_endpoint(make_rig, endpoint):
    # the line names [::1]:PORT, as cut from the sinful
    _rig, gm, s, port = linked_tunnel_session(make_rig, endpoint, host="::1")
    # The cluster side is still IPv4 loopback: the GridManager rewrites to 127.0.0.1:N.
    assert listeners_on(port) == ["0100007F"]
    size, seed = 4 * MB, seed_for("ipv6")
    s.tcp("TCP_OPEN v6 %d %d %d send sink v6" % (port, size, seed))
    assert s.tcp_wait("v6").sent == size
    assert gm.wait_seen("v6") == Seen("sink", size, testgahp.seeded_digest(seed, size), "eof", 0)
    finish_clean(s)


@pytest.mark.parametrize(
    "inherit",
    [None, "", "4242 0", "4242 <> 0", "4242 <127.0.0.1?addrs=127.0.0.1-9618> 0", "4242 <127.0.0.1:port?x=y> 0", "4242 <127.0.0.1:9618"],
    ids=["absent", "empty", "no-sinful", "empty-sinful", "no-port", "bad-port", "unclosed"],
)
def test_a_bad_or_absent_condor_inherit_warns_once_and_the_ft_gahp_still_works(quiet_rig, inherit):
    warning, err = works_with_one_warning(start_ft(quiet_rig, inherit))
    assert WARNING_DIRECT in warning, err


def test_the_tunnel_can_be_turned_off_with_RVGAHP_FT_TUNNEL(make_rig, endpoint):
    rig = make_rig(config_extra="RVGAHP_FT_TUNNEL = False\n")
    rig.start_server()
    gm = endpoint()
    s = start_ft(rig, gm.condor_inherit())
    assert s.command("ECHO works") == "S works"
    # A site that opens 9618 asked for no tunnel: nothing to announce, nothing to warn of.
    assert s.finish(WAIT) == (0, "")


def test_another_uid_on_the_login_node_cannot_use_the_tunnel_port(make_rig, endpoint):
    if os.geteuid() != 0:
        pytest.skip("needs root to act as uid %d" % NOBODY)
    rig, gm, s, port = linked_tunnel_session(make_rig, endpoint)
    outcome = connect_as(NOBODY, port, b"sink intruder\n")
    assert outcome in ("eof", "ECONNRESET"), "the connection from uid %d was not closed at once: %s" % (NOBODY, outcome)
    pattern = r"session \d+: tunnel: closed a connection from uid %d \(\S+\); only uid %d may use it" % (NOBODY, os.getuid())
    harness.wait_for(lambda: re.search(pattern, rig.log_text()), WAIT, what="%r in the server log:\n%s" % (pattern, rig.log_text()))
    # The owner's connections still go through, and the intruder's never reached the endpoint.
    size, seed = 1 * MB, seed_for("owner")
    s.tcp("TCP_OPEN owner %d %d %d send sink owner" % (port, size, seed))
    assert s.tcp_wait("owner").sent == size
    assert gm.wait_seen("owner") == Seen("sink", size, testgahp.seeded_digest(seed, size), "eof", 0)
    assert "intruder" not in gm.headers and gm.accepted == 1
    finish_clean(s)


def connect_as(uid, port, first):
    """Connect to 127.0.0.1:port as uid from a forked child, send first, and say how the
    connection ended: eof, an errno name, timeout, or what went wrong."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        outcome = "child failed"
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
            try:
                sock.sendall(first)
                outcome = "eof" if not sock.recv(4096) else "got bytes"
            except OSError as e:
                outcome = testgahp.errno_name(e)
        except BaseException as e:
            outcome = "child failed: %r" % e
        finally:
            os.write(w, outcome.encode())
            os._exit(0)
    os.close(w)
    try:
        assert select.select([r], [], [], WAIT + 10)[0], "the uid %d child never reported" % uid
        return os.read(r, 4096).decode()
    finally:
        os.close(r)
        os.waitpid(pid, 0)


@contextlib.contextmanager
def rig_with_an_older_side(make_rig, default_flavor, older, commit):
    """A linked rig whose `older` side runs rvgahp.py as of commit; the other side, and
    every client, run this one. It is how a site looks while one host is upgraded."""
    old_dir = harness.short_tempdir("old")
    old = os.path.join(old_dir, "old_rvgahp.py")
    with open(old, "wb") as f:
        f.write(subprocess.check_output(["git", "-C", harness.REPO, "show", "%s:rvgahp.py" % commit]))
    old_flavor = harness.Flavor("old", sys.executable, old)
    try:
        rig = make_rig()
        rig.flavor = old_flavor
        if older == "rvgahp_proxy":
            rig.write_transport()  # the transport runs the old proxy; the server is new
            rig.flavor = default_flavor
        rig.start_server()
        yield rig
    finally:
        shutil.rmtree(old_flavor.bin, ignore_errors=True)
        shutil.rmtree(old_dir, ignore_errors=True)


@pytest.mark.parametrize("older", ["rvgahp_server", "rvgahp_proxy"])
def test_an_older_peer_without_the_tunnel_is_named_and_transfers_go_direct(make_rig, endpoint, default_flavor, older):
    # One host still runs the release before the tunnel (49c15b0).
    with rig_with_an_older_side(make_rig, default_flavor, older, "49c15b0") as rig:
        gm = endpoint()
        s = start_ft(rig, gm.condor_inherit(), argv=default_flavor.argv("client", rig.sock, "condor_ft-gahp"))
        warning, err = works_with_one_warning(s)
        # One line that names the older side and says what it means for the transfers.
        assert "no file-transfer tunnel" in warning and older in warning and WARNING_DIRECT in warning, err
        # The new side's log says so too, once per link.
        new_log = harness.read_text(rig.proxy_log) if older == "rvgahp_server" else rig.log_text()
        assert new_log.count("%s (rvgahp " % older) == 1 and "has no file-transfer tunnel" in new_log, new_log


@pytest.mark.parametrize("older", ["rvgahp_server", "rvgahp_proxy"])
def test_an_older_peer_with_the_narrow_tunnel_window_still_carries_large_transfers(make_rig, endpoint, default_flavor, older):
    # 33d9199 has the tunnel with 512 KiB windows and no "wide_tunnel". Were this side to
    # send 2 MiB ahead regardless, the older side would take it for a protocol error and
    # drop the link: so each way carries more than both windows, and is checked by digest.
    with rig_with_an_older_side(make_rig, default_flavor, older, "33d9199") as rig:
        gm = endpoint()
        s, port = tunnel_session(rig, gm)
        transfer_both_ways(s, gm, port, 8 * MB, "narrow")
        finish_clean(s)
        assert "protocol error" not in rig.log_text() + harness.read_text(rig.proxy_log)
        if older == "rvgahp_server":  # the new proxy says what the two ends agreed on
            status = json.loads(subprocess.check_output(default_flavor.argv("client", "--status", "--json", rig.sock)))
            assert status["link"]["features"] == ["tunnel"], status["link"]


# --------------------------------------------------------------------------- every interpreter, once


def test_every_flavor_carries_a_transfer_through_the_tunnel(rig, endpoint):
    gm = endpoint()
    s, port = tunnel_session(rig, gm)
    transfer_both_ways(s, gm, port, 2 * MB, "flavor")
    finish_clean(s)

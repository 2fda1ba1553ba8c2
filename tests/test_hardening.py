"""Field hardening (issue 8): what a hostile neighbour, a wedged peer, a shared $HOME
and a long outage did to rvgahp in the field, each replayed with real processes.

Where a test must speak the link protocol itself (floods, hostile hellos), it starts
rvgahp_proxy on pipes, as ssh would, and plays the server with rvgahp's own framing.
"Another user" is uid 65534 (nobody), reached by forking and dropping privileges.
"""

# array is imported here: a child that has dropped to another uid may no longer be
# able to read the interpreter's files to import it.
import array
import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading

import harness
import pytest

sys.path.insert(0, harness.REPO)

import rvgahp

NOBODY = 65534
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")


# --------------------------------------------------------------------------- helpers


def one_line(result):
    lines = result.stderr.decode(errors="replace").splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def assert_still_serving(rig, home=None):
    s = rig.session("blahpd")
    assert s.banner().startswith("$GahpVersion")
    assert s.command("CWD") == "S " + (home or rig.home)
    assert s.finish() == (0, "")


def lines_with(text, needle):
    return [line for line in text.splitlines() if needle in line]


def public_dir(mode=0o1777):
    """A directory anyone may create files in, like /tmp (sticky) or a careless share."""
    path = harness.short_tempdir("pub")
    os.chmod(path, mode)
    return path


def gahp_pid(rig, gahp="blahpd"):
    s = rig.session(gahp)
    assert s.banner().startswith("$GahpVersion")
    pid = int(s.command("PID")[2:])
    assert s.finish() == (0, "")
    return pid


def one_spare(rig):
    """The one live GAHP once every session has ended, after its wrapper has exec'd it."""

    def ready():
        pids = rig.gahp_pids()
        return pids if len(pids) == 1 and any("testgahp.py" in a for a in harness.cmdline(pids[0])) else None

    return harness.wait_for(ready, 15, what="one spare GAHP")[0]


class AsNobody:
    """A forked child running work(report_fd, stop_fd) as uid 65534.

    work writes what it found to report_fd; the parent closes stop_fd's other end when
    the child should finish, and reads the report.
    """

    def __init__(self, work):
        report_r, report_w = os.pipe()
        stop_r, stop_w = os.pipe()
        ready_r, ready_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                os.close(report_r)
                os.close(stop_w)
                os.close(ready_r)
                os.setgid(NOBODY)
                os.setuid(NOBODY)
                work(report_w, stop_r, ready_w)
            except BaseException as e:
                try:
                    os.write(report_w, ("the child failed: %r" % e).encode())
                except OSError:
                    pass
            finally:
                os._exit(0)
        os.close(report_w)
        os.close(stop_r)
        os.close(ready_w)
        self.pid = pid
        self.report_r = report_r
        self.stop_w = stop_w
        # The child says it is ready (or fails) by closing its end.
        with os.fdopen(ready_r, "rb") as f:
            self.ready = f.read().decode()

    def finish(self):
        os.close(self.stop_w)
        with os.fdopen(self.report_r, "rb") as f:
            report = f.read().decode()
        os.waitpid(self.pid, 0)
        return report


def fake_proxy_owner(sock_path, answer=True):
    """work for AsNobody: another user's impostor that serves sock_path.

    It counts the fds its callers hand over (from recvmsg's ancillary data), and, if
    answer, replies as a proxy would: ACCEPT, a GAHP banner on the stdout it was given,
    and "exit 0".
    """

    def work(report_w, stop_r, ready_w):
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(sock_path)
        os.chmod(sock_path, 0o777)
        listener.listen(16)
        os.write(ready_w, b"listening")
        os.close(ready_w)
        received = 0
        connections = 0
        while True:
            readable, _, _ = select.select([listener, stop_r], [], [])
            if stop_r in readable:
                break
            conn, _ = listener.accept()
            connections += 1
            conn.settimeout(5)
            try:
                data, ancdata, _, _ = conn.recvmsg(65536, socket.CMSG_SPACE(16 * 4))
            except OSError:
                data, ancdata = b"", []
            fds = []
            for level, kind, blob in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.extend(array.array("i", blob[: len(blob) - len(blob) % 4]))
            received += len(fds)
            if data and answer and len(fds) == 2:
                try:
                    conn.sendall(rvgahp.frame(rvgahp.ACCEPT, 0, rvgahp.encode_fields({"pid": 4242})))
                    os.write(fds[1], b"$GahpVersion: 1.0.0 an impostor's gahp $\r\n")
                    conn.sendall(b"exit 0\n")
                except OSError:
                    pass
            for fd in fds:
                os.close(fd)
            conn.close()
        listener.close()
        os.write(report_w, ("connections=%d fds=%d" % (connections, received)).encode())

    return work


class BareProxy:
    """rvgahp_proxy SOCK on pipes, as ssh runs it; the test plays the server.

    Its stderr (its log, with --no-log-file) is collected as it comes. Its stdout, the
    link, is read and parsed into frames only if read_link; a flood test leaves it
    unread on purpose.
    """

    def __init__(self, flavor, sock, *args, read_link=True):
        self.proc = subprocess.Popen(
            flavor.argv("proxy", "--no-log-file", *args, sock),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.err = b""
        self.frames = []
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._read_err, daemon=True)]
        if read_link:
            self.threads.append(threading.Thread(target=self._read_link, daemon=True))
        for t in self.threads:
            t.start()

    def _read_err(self):
        while True:
            data = os.read(self.proc.stderr.fileno(), 65536)
            if not data:
                return
            with self.lock:
                self.err += data

    def _read_link(self):
        buf = b""
        reader = None
        while True:
            data = os.read(self.proc.stdout.fileno(), 1 << 20)
            if not data:
                return
            if reader is None:
                buf += data
                if rvgahp.LINK_START not in buf:
                    continue
                data = buf.split(rvgahp.LINK_START, 1)[1]
                reader = rvgahp.FrameReader()
            for f in reader.feed(data):
                with self.lock:
                    self.frames.append(f)

    def log(self):
        with self.lock:
            return self.err.decode(errors="replace")

    def send(self, *chunks):
        """True if the proxy took it all; False once its end of the link is closed."""
        try:
            for chunk in chunks:
                self.proc.stdin.write(chunk)
            self.proc.stdin.flush()
            return True
        except (BrokenPipeError, ValueError):
            return False

    def hello(self, **fields):
        hello = {"role": "server", "rvgahp": rvgahp.VERSION, "pid": os.getpid(), "host": "test", "ping_interval": 1, "ping_timeout": 30}
        hello.update(fields)
        return self.send(rvgahp.LINK_START + rvgahp.frame(rvgahp.HELLO, 0, rvgahp.encode_fields(hello)))

    def got(self, kind, payload=None):
        with self.lock:
            return any(k == kind and (payload is None or p == payload) for k, _, p in self.frames)

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            try:
                f.close()
            except (OSError, ValueError):
                pass


@pytest.fixture
def bare_proxy(default_flavor):
    made = []
    dirs = []

    def make(sock=None, *args, **kw):
        if sock is None:
            d = harness.short_tempdir("bp")
            dirs.append(d)
            sock = os.path.join(d, "p.sock")
        p = BareProxy(default_flavor, sock, *args, **kw)
        p.sock = sock
        made.append(p)
        return p

    yield make
    for p in made:
        p.close()
    for d in dirs:
        subprocess.run(["rm", "-rf", d])


# --------------------------------------------------------------------------- 1. another user serves the socket


@needs_root
def test_a_client_never_hands_its_pipes_to_another_users_socket(make_rig):
    """The link is down, the README's socket sits in /tmp, and another user has bound
    the path. The GridManager's client must not give that user its stdin and stdout."""
    rig = make_rig()
    sock = os.path.join(public_dir(), "alice.hpcc.sock")
    impostor = AsNobody(fake_proxy_owner(sock))
    try:
        assert impostor.ready == "listening", impostor.ready
        result = subprocess.run(rig.flavor.argv("client", "--rvgahp-wait", "3", sock, "blahpd"), input=b"", capture_output=True, timeout=60)
    finally:
        report = impostor.finish()
    assert report.startswith("connections="), report
    assert report.endswith(" fds=0"), "the client handed its fds to uid %d (%s)" % (NOBODY, report)
    assert result.returncode == 1
    assert result.stdout == b""
    line = one_line(result)
    assert line.startswith("rvgahp_client: ") and "is served by uid %d" % NOBODY in line, line


@needs_root
def test_a_proxy_whose_path_another_user_holds_says_so_and_does_not_stand_by_for_ever(bare_proxy):
    sock = os.path.join(public_dir(), "alice.hpcc.sock")
    impostor = AsNobody(fake_proxy_owner(sock, answer=False))
    try:
        assert impostor.ready == "listening", impostor.ready
        proxy = bare_proxy(sock)
        assert proxy.hello(ping_interval=1, ping_timeout=600)
        harness.wait_for(lambda: "held by uid %d" % NOBODY in proxy.log(), 20, what="'held by uid' in the proxy's log:\n" + proxy.log())
        harness.wait_for(lambda: proxy.proc.poll() is not None, 30, what="the proxy to give up instead of standing by")
    finally:
        impostor.finish()
    assert "standing by" not in proxy.log(), proxy.log()


# --------------------------------------------------------------------------- 2. a planted log symlink


@needs_root
def test_a_log_symlink_planted_by_another_user_is_not_followed(make_rig):
    rig = make_rig()
    shared = public_dir(0o777)
    victim = os.path.join(shared, "precious.txt")
    with open(victim, "w") as f:
        f.write("root's precious file\n")
    rig.sock = os.path.join(shared, "alice.hpcc.sock")
    rig.proxy_log = rig.sock + ".log"
    rig.write_transport()

    def plant(report_w, stop_r, ready_w):
        os.symlink(victim, rig.proxy_log)
        os.close(ready_w)
        os.read(stop_r, 1)

    planter = AsNobody(plant)
    planter.finish()
    assert os.lstat(rig.proxy_log).st_uid == NOBODY
    rig.start_server()
    assert_still_serving(rig)
    with open(victim) as f:
        assert f.read() == "root's precious file\n"
    assert os.path.islink(rig.proxy_log)
    harness.wait_for(lambda: "symbolic link" in rig.log_text(), 10, what="the proxy to name the symbolic link")
    subprocess.run(["rm", "-rf", shared])


# --------------------------------------------------------------------------- 3. something else at the socket path


@pytest.mark.parametrize("what", ["a regular file", "a symlink"])
def test_something_at_the_socket_path_that_is_not_a_socket_is_never_deleted(make_rig, what):
    rig = make_rig()
    keep = os.path.join(rig.dir, "keep.txt")
    with open(keep, "w") as f:
        f.write("not a socket\n")
    if what == "a regular file":
        os.rename(keep, rig.sock)
    else:
        os.symlink(keep, rig.sock)
    rig.start_server(wait=False)
    harness.wait_for(lambda: "is not a socket" in rig.log_text(), 20, what="'is not a socket' in the log:\n" + rig.log_text())
    assert os.path.lexists(rig.sock)
    if what == "a symlink":
        assert os.path.islink(rig.sock) and os.readlink(rig.sock) == keep
    with open(rig.sock) as f:
        assert f.read() == "not a socket\n"
    assert "removed the dead socket" not in rig.log_text()
    assert rig.server.poll() is None


# --------------------------------------------------------------------------- 4. stdio the proxy cannot poll


@pytest.fixture(scope="module")
def module_rig(sshd, default_flavor):
    r = harness.Rig(sshd, default_flavor)
    r.start_server()
    yield r
    r.cleanup()


BAD_STDIO = ["stdout: a directory", "stdout: a regular file", "stdout: /dev/null", "stdout: a read-only pipe",
             "stdin: a directory", "stdin: a regular file", "stdin: /dev/null", "stdin: a write-only pipe"]  # fmt: skip


@pytest.mark.parametrize("case", BAD_STDIO)
def test_a_request_with_stdio_the_proxy_cannot_use_is_refused_and_nobody_else_notices(make_rig, case, tmp_path):
    rig = make_rig()
    rig.start_server()
    proxy = rig.proxy_pid()
    bystander = rig.session("blahpd")
    assert bystander.banner().startswith("$GahpVersion")
    which, kind = case.split(": ")
    opened = []

    def keep(fd):
        opened.append(fd)
        return fd

    good_r, good_w = os.pipe()
    opened += [good_r, good_w]
    if kind == "a directory":
        bad = keep(os.open(str(tmp_path), os.O_RDONLY))
    elif kind == "a regular file":
        bad = keep(os.open(str(tmp_path / "f"), os.O_RDWR | os.O_CREAT, 0o600))
    elif kind == "/dev/null":
        bad = keep(os.open(os.devnull, os.O_RDWR))
    elif kind == "a read-only pipe":
        bad = good_r
    else:  # a write-only pipe as stdin
        bad = good_w
    fds = (good_r, bad) if which == "stdout" else (bad, good_w)
    request = rvgahp.frame(
        rvgahp.OPEN, 0, rvgahp.encode_fields({"gahp": "blahpd", "rvgahp": rvgahp.VERSION, "protocol": rvgahp.CLIENT_PROTOCOL})
    )
    try:
        reply = harness.raw_request(rig.sock, request, fds, timeout=30)
    finally:
        for fd in set(opened):
            os.close(fd)
    assert reply is not None and reply[0] == rvgahp.REFUSE, reply
    assert "malformed request: %s" % which in reply[1]["reason"], reply
    # Everyone else carries on: the open session, the next client, the same proxy.
    assert bystander.command("ECHO still-here") == "S still-here"
    assert bystander.finish() == (0, "")
    assert_still_serving(rig)
    assert rig.proxy_pid() == proxy
    assert rig.links_up() == 1


# --------------------------------------------------------------------------- 5. floods


def test_a_peer_flooding_huge_pings_while_never_reading_does_not_grow_the_proxy(bare_proxy):
    proxy = bare_proxy(read_link=False)
    assert proxy.hello(ping_interval=1, ping_timeout=30)
    harness.wait_for(lambda: "link up: server pid" in proxy.log(), 20, what="the proxy's link up")
    before = harness.rss_kb(proxy.proc.pid)
    ping = rvgahp.frame(rvgahp.PING, 0, b"p" * rvgahp.MAX_PAYLOAD)
    sent = 0
    for _ in range(240):
        if not proxy.send(ping):
            break
        sent += 1
    # The event: the proxy took all 240 PINGs, or closed the link on us.
    if proxy.proc.poll() is None:
        grown = harness.rss_kb(proxy.proc.pid) - before
        print("proxy took %d PINGs; RSS grew %d kB" % (sent, grown))
        assert grown < 30 * 1024, "the proxy grew %d kB from a PING flood" % grown
    log = proxy.log()
    assert sent < 240 or "has not read" in log or "protocol error" in log, log
    harness.wait_for(lambda: proxy.proc.poll() is not None, 60, what="the proxy to close the flooding link")
    assert "protocol error" in proxy.log() or "has not read" in proxy.log(), proxy.log()


def test_a_ping_payload_over_64_bytes_is_a_protocol_error(bare_proxy):
    proxy = bare_proxy()
    assert proxy.hello()
    harness.wait_for(lambda: "link up: server pid" in proxy.log(), 20, what="the proxy's link up")
    assert proxy.send(rvgahp.frame(rvgahp.PING, 0, b"a" * 64))
    harness.wait_for(lambda: proxy.got(rvgahp.PONG, b"a" * 64), 10, what="a PONG to a 64-byte PING")
    proxy.send(rvgahp.frame(rvgahp.PING, 0, b"b" * 65))
    harness.wait_for(lambda: proxy.proc.poll() is not None, 20, what="the proxy to drop the link")
    assert not proxy.got(rvgahp.PONG, b"b" * 65)
    assert "protocol error" in proxy.log(), proxy.log()


def test_a_peer_that_writes_but_never_reads_is_dead_at_the_ping_timeout(bare_proxy):
    proxy = bare_proxy(read_link=False)
    assert proxy.hello(ping_interval=0.2, ping_timeout=2)
    harness.wait_for(lambda: "link up: server pid" in proxy.log(), 20, what="the proxy's link up")
    before = harness.rss_kb(proxy.proc.pid)
    stop = threading.Event()

    def chatter():
        # Small, legal PINGs: enough PONGs to fill the pipe nobody reads (the proxy widens
        # its link's pipes) and then some, then a steady trickle so that the peer is
        # never silent.
        small = rvgahp.frame(rvgahp.PING, 0, b"x" * 64)
        if not proxy.send(small * (2 * rvgahp.PIPE_SIZE // len(small))):
            return
        while not stop.wait(0.1):
            if not proxy.send(small):
                return

    t = threading.Thread(target=chatter, daemon=True)
    t.start()
    try:
        harness.wait_for(lambda: proxy.proc.poll() is not None, 40, what="the proxy to give up on a peer that never reads")
    finally:
        stop.set()
        t.join(10)
    assert "has not read" in proxy.log(), proxy.log()
    print("proxy RSS before the flood %d kB" % before)


def test_a_proxy_flooding_huge_pings_while_never_reading_does_not_grow_the_server(make_rig):
    rig = make_rig(ping_interval=1, ping_timeout=30)
    go = os.path.join(rig.dir, "go")
    done = os.path.join(rig.dir, "done")
    fake = os.path.join(rig.dir, "flooding_proxy.py")
    with open(fake, "w") as f:
        f.write(
            "import os, sys, time\n"
            "sys.path.insert(0, %r)\n"
            "import rvgahp\n"
            "out = os.fdopen(1, 'wb', buffering=0)\n"
            "hello = {'role': 'proxy', 'rvgahp': rvgahp.VERSION, 'pid': os.getpid(), 'host': 'flood', 'socket': 'x', 'state': 'active'}\n"
            "out.write(rvgahp.LINK_START + rvgahp.frame(rvgahp.HELLO, 0, rvgahp.encode_fields(hello)))\n"
            "while not os.path.exists(%r):\n"
            "    time.sleep(0.02)\n"
            "ping = rvgahp.frame(rvgahp.PING, 0, b'p' * rvgahp.MAX_PAYLOAD)\n"
            "sent = 0\n"
            "try:\n"
            "    for _ in range(240):\n"
            "        out.write(ping)\n"
            "        sent += 1\n"
            "except OSError:\n"
            "    pass\n"
            "with open(%r + '.tmp', 'w') as f:\n"
            "    f.write(str(sent))\n"
            "os.rename(%r + '.tmp', %r)\n"
            "time.sleep(3600)\n" % (harness.REPO, go, done, done, done)
        )
    rig.write_transport("exec %s %s\n" % (sys.executable, fake))
    rig.start_server(wait=False)
    harness.wait_for(lambda: "link up: proxy pid" in rig.log_text(), 20, what="the fake proxy's link:\n" + rig.log_text())
    before = harness.rss_kb(rig.server.pid)
    open(go, "w").close()
    # The event: the server took the whole flood, or dropped the link (and ended the
    # fake proxy before it could say so).
    harness.wait_for(lambda: os.path.exists(done) or "link down after" in rig.log_text(), 60, what="the flood to be sent or cut off")
    grown = harness.rss_kb(rig.server.pid) - before
    print("the fake proxy sent %s PINGs; server RSS grew %d kB" % (harness.read_text(done), grown))
    assert grown < 30 * 1024, "the server grew %d kB from a PING flood" % grown
    harness.wait_for(lambda: "link down after" in rig.log_text(), 60, what="the server to drop the flooding link")
    down = lines_with(rig.log_text(), "link down after")[0]
    assert "protocol error" in down or "has not read" in down, down


# --------------------------------------------------------------------------- 6. huge numbers


def test_huge_ping_settings_in_the_config_are_clamped_not_fatal(make_rig):
    rig = make_rig(ping_interval="1e7", ping_timeout="1e7")
    rig.start_server()
    assert_still_serving(rig)
    log = rig.log_text()
    assert len([line for line in log.splitlines() if "RVGAHP_PING_INTERVAL" in line and "using" in line]) == 1, log
    assert len([line for line in log.splitlines() if "RVGAHP_PING_TIMEOUT" in line and "using" in line]) == 1, log
    assert rig.server.poll() is None


def test_an_infinite_log_size_is_clamped_not_fatal(make_rig):
    rig = make_rig(config_extra="RVGAHP_LOG_MAX_SIZE = inf\n")
    rig.start_server()
    assert_still_serving(rig)
    log = rig.log_text()
    assert len([line for line in log.splitlines() if "RVGAHP_LOG_MAX_SIZE" in line and "using" in line]) == 1, log
    assert "Traceback" not in log


@pytest.mark.parametrize("value", ["inf", "1e7", "nan", "-5"])
def test_a_hello_with_absurd_ping_settings_does_not_crash_the_proxy(bare_proxy, value):
    proxy = bare_proxy()
    assert proxy.hello(ping_interval=value, ping_timeout=value)
    harness.wait_for(lambda: "link up: server pid" in proxy.log() or proxy.proc.poll() is not None, 20, what="the proxy's link up")
    assert proxy.send(rvgahp.frame(rvgahp.PING, 0, b"are you there"))
    harness.wait_for(lambda: proxy.got(rvgahp.PONG, b"are you there") or proxy.proc.poll() is not None, 20, what="a PONG:\n" + proxy.log())
    assert proxy.proc.poll() is None, proxy.log()
    assert proxy.got(rvgahp.PONG, b"are you there")
    assert "Traceback" not in proxy.log()
    if value in ("inf", "1e7"):
        assert len(lines_with(proxy.log(), "using")) >= 1, proxy.log()


# --------------------------------------------------------------------------- 7. config edge cases


def macro_chain(name, depth, end):
    """NAME = $(NAME_1), NAME_1 = $(NAME_2), ... NAME_depth = end."""
    lines = ["%s = $(%s_1)" % (name, name)]
    lines += ["%s_%d = $(%s_%d)" % (name, i, name, i + 1) for i in range(1, depth)]
    lines.append("%s_%d = %s" % (name, depth, end))
    return "\n".join(lines) + "\n"


def run_server(rig, *args, timeout=20):
    return subprocess.run(rig.flavor.argv("server", *args), env=rig.env(), capture_output=True, timeout=timeout)


def test_a_500_level_macro_chain_is_a_one_line_config_error_at_start(make_rig):
    rig = make_rig(config_extra=macro_chain("RVGAHP_PING_INTERVAL", 500, "2"))
    result = run_server(rig)
    assert result.returncode == 1
    line = one_line(result)
    assert line.startswith("rvgahp_server: config %s:" % rig.config), line
    assert "Traceback" not in result.stderr.decode()


def test_a_500_level_macro_chain_added_while_running_refuses_the_session_and_keeps_the_link(make_rig):
    rig = make_rig()
    rig.start_server()
    with open(rig.config) as f:
        good = f.read()
    with open(rig.config, "a") as f:
        f.write(macro_chain("DEEP", 500, "/opt/deep"))
        f.write("GLITE_LOCATION = $(DEEP)\n")
    line = one_line(rig.run_client("blahpd"))
    assert "refused blahpd: config %s:" % rig.config in line, line
    with open(rig.config, "w") as f:
        f.write(good + "# fixed\n")
    assert_still_serving(rig)
    assert rig.links_up() == 1, rig.log_text()
    assert "link down" not in rig.log_text()


def test_a_fifo_as_the_config_is_a_one_line_error_not_a_hang(make_rig):
    rig = make_rig()
    os.unlink(rig.config)
    os.mkfifo(rig.config)
    try:
        result = run_server(rig, timeout=30)
    finally:
        unblock_fifo(rig.config)
    assert result.returncode == 1
    line = one_line(result)
    assert "it is a FIFO, not a file" in line and rig.config in line, line


def test_a_fifo_put_in_place_of_the_config_while_running_refuses_sessions_not_hangs(make_rig):
    rig = make_rig()
    rig.start_server()
    os.unlink(rig.config)
    os.mkfifo(rig.config)
    try:
        result = rig.run_client("blahpd", timeout=60)
    finally:
        unblock_fifo(rig.config)
    line = one_line(result)
    assert "refused blahpd" in line and "it is a FIFO, not a file" in line, line
    assert rig.server.poll() is None


def unblock_fifo(path):
    """Let a reader stuck opening this FIFO go (it reads EOF), so a failure cleans up."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
    except OSError:
        pass


# --------------------------------------------------------------------------- 8. the GAHP name on the command line


@pytest.mark.parametrize(
    "name",
    [b"blah\npd", b"blah\xffpd", b"-\x1b[2Jblahpd", b"bl\x1b]0;owned\x07ahpd", b"blahpd\r"],
    ids=["newline", "not-utf8", "escape-after-dash", "osc-sequence", "carriage-return"],
)
def test_a_hostile_gahp_name_gets_one_plain_line_and_no_traceback(module_rig, name):
    rig = module_rig
    rig.wait_link()
    argv = rig.flavor.argv("client", rig.sock) + [name]
    result = subprocess.run(argv, input=b"", capture_output=True, timeout=60)
    assert result.returncode != 0
    assert result.stdout == b""
    err = result.stderr
    assert b"Traceback" not in err, err
    assert err.startswith(b"rvgahp_client: ") and err.endswith(b"\n"), err
    assert err.count(b"\n") == 1, err
    raw_controls = [c for c in err[:-1] if c < 0x20 or c == 0x7F]
    assert raw_controls == [], err


# --------------------------------------------------------------------------- 9. a full accept backlog


sleeping_between_retries = harness.sleeping_between_retries


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="reads x86_64 syscall numbers from /proc")
def test_a_client_that_meets_a_full_accept_backlog_retries_and_gets_its_banner(make_rig):
    rig = make_rig()
    rig.start_server()
    proxy = rig.proxy_pid()
    queued = []
    os.kill(proxy, signal.SIGSTOP)
    try:
        while True:  # fill the listen backlog while the proxy cannot accept
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.setblocking(False)
            try:
                s.connect(rig.sock)
            except BlockingIOError:
                s.close()
                break
            queued.append(s)
            assert len(queued) < 10000
        client = rig.session(argv=rig.flavor.argv("client", "--rvgahp-wait", "20", rig.sock, "blahpd"))
        harness.wait_for(
            lambda: client.proc.poll() is not None or sleeping_between_retries(client.proc.pid), 60, what="the client to retry its connect"
        )
    finally:
        os.kill(proxy, signal.SIGCONT)
    try:
        assert client.banner(timeout=40).startswith("$GahpVersion"), client.stderr_text()
        assert client.finish() == (0, "")
    finally:
        client.close()
        for s in queued:
            s.close()
    print("queued %d connections before the client" % len(queued))


# --------------------------------------------------------------------------- 10. connections that never speak


def test_a_connection_that_never_sends_a_request_is_closed(make_rig):
    rig = make_rig()
    rig.start_server()
    mute = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    mute.settimeout(120)
    mute.connect(rig.sock)
    try:
        assert mute.recv(4096) == b""  # the event: the proxy let go of it
    finally:
        mute.close()
    harness.wait_for(lambda: "sent no request" in harness.read_text(rig.proxy_log), 10, what="the proxy's log line")
    assert_still_serving(rig)


# --------------------------------------------------------------------------- 11. login nodes that share $HOME


def start_on_host(rig, host, *args):
    """rvgahp_server run on another login node: its own hostname, the same $HOME."""
    argv = ["unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"', host] + rig.flavor.argv("server", *args)
    return subprocess.run(argv, env=rig.env(), capture_output=True, timeout=30)


def live_pid_in(path):
    text = harness.read_text(path).strip()
    return int(text) if text.isdigit() and harness.process_state(int(text)) not in (None, "Z") else None


def stop_daemons(rig, pids):
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except OSError:
            pass
    for pid in pids:
        harness.wait_for(lambda pid=pid: harness.process_state(pid) in (None, "Z"), 30, what="daemon %d to stop" % pid)


@pytest.mark.skipif(os.geteuid() != 0, reason="unshare --uts needs root")
def test_two_login_nodes_sharing_a_home_each_run_a_server_and_one_stands_by(make_rig):
    rig = make_rig()
    pid_file = os.path.join(rig.dot, "rvgahp_server.%s.pid")
    log_file = os.path.join(rig.dot, "rvgahp_server.%s.log")
    daemons = []
    try:
        first = start_on_host(rig, "login1", "-d")
        assert (first.returncode, first.stdout, first.stderr) == (0, b"", b"")
        daemons.append(harness.wait_for(lambda: live_pid_in(pid_file % "login1"), 10, what="login1's pid file"))
        harness.wait_for(lambda: "link up: proxy pid" in harness.read_text(log_file % "login1"), 30, what="login1's link")
        second = start_on_host(rig, "login2", "-d")
        assert (second.returncode, second.stdout, second.stderr) == (0, b"", b""), second
        daemons.append(harness.wait_for(lambda: live_pid_in(pid_file % "login2"), 10, what="login2's pid file"))
        assert daemons[0] != daemons[1]
        harness.wait_for(lambda: "link up as a hot standby" in harness.read_text(log_file % "login2"), 30, what="login2's standby link")
        assert "hot standby" not in harness.read_text(log_file % "login1")
        again = start_on_host(rig, "login1", "-d")
        assert again.returncode == 0
        assert again.stdout.decode().startswith("rvgahp_server: already running (pid %d on login1)" % daemons[0]), again.stdout
        assert_still_serving(rig)
        assert live_pid_in(pid_file % "login2") == daemons[1]  # the re-run touched only login1
    finally:
        stop_daemons(rig, daemons)


# --------------------------------------------------------------------------- 12. a long outage


def unreachable_transport(rig):
    argv = rig.sshd.ssh_argv(rig.flavor.command_line("proxy", rig.sock))
    argv[argv.index("-p") + 1] = str(harness.free_port())  # nothing listens: "Connection refused"
    return "exec %s\n" % " ".join(argv)


# How the server says an attempt never reached the submit host's sshd (no login made).
UNREACHED = r"could not reach|was not reached"


def stated_delays(text):
    """The waits announced in text ("... in 3.1 s"), in seconds."""
    return [float(m.group(1)) for m in re.finditer(r" in (\d+(?:\.\d+)?) s\b", text)]


def test_a_long_outage_retries_every_few_seconds_and_a_rerun_start_tries_at_once(make_rig):
    rig = make_rig()
    rig.write_transport(unreachable_transport(rig))
    rig.start_server(wait=False)
    harness.wait_for(lambda: rig.log_text().count("link attempt failed") >= 4, 60, what="four failed attempts:\n" + rig.log_text())
    log = rig.log_text()
    assert "Connection refused" in log
    unreached = [line for line in log.splitlines() if re.search(UNREACHED, line)]
    assert len(unreached) >= 4, log
    delays = stated_delays("\n".join(unreached))
    assert len(delays) >= 4, log
    assert max(delays) <= 10, "the server backs off from an unreachable host: %s" % delays
    assert delays[3] <= delays[0] + 2, "the waits grow: %s" % delays
    # The network is back; cron's line runs again and the server need not wait.
    rig.write_transport()
    rerun = run_server(rig, "-l", rig.server_log)
    assert rerun.returncode == 0
    assert "asked it to reconnect" in rerun.stdout.decode(), rerun.stdout
    rig.wait_link()
    assert_still_serving(rig)


# --------------------------------------------------------------------------- 13. a link gone silent


def link_status(rig):
    """`rvgahp_client --status --json SOCK`, or None where the proxy has no such thing."""
    result = subprocess.run(rig.flavor.argv("client", "--status", "--json", rig.sock), capture_output=True, timeout=30)
    if result.returncode != 0:
        return None
    return json.loads(result.stdout.decode())


def test_a_client_arriving_on_a_silent_link_is_told_so_not_left_to_time_out(make_rig):
    rig = make_rig(ping_interval=0.5, ping_timeout=60)
    rig.start_server()
    assert_still_serving(rig)
    ssh = rig.transport_pid()
    os.kill(ssh, signal.SIGSTOP)  # the network is silently down: nothing moves, nothing closes
    try:

        def quiet():
            status = link_status(rig)
            return status is None or status["link"]["state"] == "silent" or status["link"]["last_heard_s"] > 2

        harness.wait_for(quiet, 30, what="the link to fall quiet")
        result = rig.run_client(argv=rig.flavor.argv("client", "--rvgahp-wait", "10", rig.sock, "blahpd"), timeout=90)
    finally:
        os.kill(ssh, signal.SIGCONT)
    err = result.stderr.decode()
    assert "did not start" not in err, err
    if result.returncode == 0:
        assert result.stdout.startswith(b"$GahpVersion")  # the next link served it
    else:
        assert result.returncode == 1
        assert "silent" in one_line(result), err


# --------------------------------------------------------------------------- 14. dead servers and stopped proxies


def test_a_busy_gahp_dies_with_its_kill_9ed_server(make_rig):
    rig = make_rig()
    rig.start_server()
    s = rig.session("blahpd")
    assert s.banner().startswith("$GahpVersion")
    busy = int(s.command("PID")[2:])
    assert s.command("IGNORE_EOF") == "S"  # deep in a long command: EOF alone won't end it
    rig.server.kill()
    rig.server.wait()
    try:
        harness.wait_for(lambda: harness.process_state(busy) in (None, "Z"), 20, what="the GAHP to die with its server")
        harness.wait_for(lambda: rig.gahp_pids() == [], 20, what="every GAHP of the dead server, spares too, to die")
    finally:
        s.close()
        for pid in rig.gahp_pids():
            os.kill(pid, signal.SIGKILL)


def test_a_stopped_proxy_is_replaced_by_the_standby_after_the_ping_timeout(make_rig):
    first = make_rig(ping_interval=0.5, ping_timeout=3)
    first.start_server()
    second = make_rig(ping_interval=0.5, ping_timeout=3)  # another login node, same socket
    second.sock = first.sock
    second.write_transport()
    second.start_server(wait=False)
    harness.wait_for(lambda: "link up as a hot standby" in second.log_text(), 20, what="the standby link")
    stopped = first.proxy_pid()
    os.kill(stopped, signal.SIGSTOP)
    try:
        harness.wait_for(
            lambda: "link active: the standby proxy took over" in first.log_text() + second.log_text(),
            60,
            what="a standby to take over from the stopped proxy",
        )
        s = first.session("blahpd")
        assert s.banner().startswith("$GahpVersion")
        assert s.finish() == (0, "")
    finally:
        # SIGKILL ends a stopped process too. Its parent may reap it at once, so there is
        # no pid left for anything after (a SIGCONT here failed on a loaded machine).
        os.kill(stopped, signal.SIGKILL)


# --------------------------------------------------------------------------- messages that mislead


def test_a_killed_ssh_is_named_in_the_log_not_blamed_on_the_peer(make_rig):
    rig = make_rig()
    rig.start_server()
    os.kill(rig.transport_pid(), signal.SIGKILL)
    rig.wait_link(count=2)
    down = lines_with(rig.log_text(), "link down after")[0]
    assert "killed by signal 9" in down, down
    assert "the peer closed the link" not in down, down


def test_shutting_down_with_only_spares_does_not_say_it_ends_0_gahps(make_rig):
    rig = make_rig()
    rig.start_server()
    gahp_pid(rig)
    one_spare(rig)
    rig.server.send_signal(signal.SIGTERM)
    assert rig.server.wait(30) == 0
    shutting = lines_with(rig.log_text(), "shutting down: ")
    assert len(shutting) == 1
    assert "1 spare" in shutting[0], shutting  # what it really ends, not "0 GAHPs" alone
    assert rig.gahp_pids() == []


def test_a_proxy_missing_on_the_submit_host_is_named_in_the_diagnosis(make_rig):
    rig = make_rig()
    missing = "/nonexistent/bin%d/rvgahp_proxy" % os.getpid()
    rig.write_transport("exec %s\n" % " ".join(rig.sshd.ssh_argv("%s %s" % (missing, rig.sock))))
    rig.start_server(wait=False)
    harness.wait_for(lambda: "link attempt failed" in rig.log_text(), 20, what="the failed attempt:\n" + rig.log_text())
    failed = lines_with(rig.log_text(), "link attempt failed")[0]
    assert "exit 127" in failed and missing in failed, failed


def test_a_live_edit_of_the_gahp_stderr_log_applies_to_the_next_session(make_rig):
    first = os.path.join(harness.short_tempdir("err"), "gahp_stderr.log")
    rig = make_rig(config_extra="RVGAHP_GAHP_STDERR = %s\n" % first)
    rig.start_server()
    moved = os.path.join(rig.dir, "moved_stderr.log")
    s = rig.session("blahpd")
    s.banner()
    assert s.command("STDERR before-the-edit") == "S"
    assert s.finish() == (0, "")
    with open(rig.config, "a") as f:
        f.write("RVGAHP_GAHP_STDERR = %s\n" % moved)
    s = rig.session("blahpd")
    s.banner()
    assert s.command("STDERR after-the-edit") == "S"
    assert s.finish() == (0, "")
    assert "after-the-edit" in harness.read_text(moved)
    assert "after-the-edit" not in harness.read_text(first)
    assert "before-the-edit" in harness.read_text(first)
    subprocess.run(["rm", "-rf", os.path.dirname(first)])


def test_a_proxy_out_of_fds_pauses_accepting_and_serves_again_once_it_has_some(make_rig):
    """An admin's ulimit, or a flood of clients, leaves the proxy no fd to accept with:
    it says so, stops watching the socket for a second instead of spinning on it, and
    the next client after fds are free again is served as usual."""
    import resource

    rig = make_rig()
    rig.start_server()
    proxy = rig.proxy_pid()
    soft, hard = resource.prlimit(proxy, resource.RLIMIT_NOFILE)
    resource.prlimit(proxy, resource.RLIMIT_NOFILE, (harness.open_fd_count(proxy), hard))
    try:
        waiting = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        waiting.connect(rig.sock)  # queued by the kernel; the proxy cannot take it
        line = "cannot accept a client: Too many open files; pausing accepts for 1 s"
        harness.wait_for(lambda: line in harness.read_text(rig.proxy_log), 20, what="the proxy to say it is out of fds")
    finally:
        resource.prlimit(proxy, resource.RLIMIT_NOFILE, (soft, hard))
    s = rig.session("blahpd")
    assert s.banner().startswith("$GahpVersion")
    assert s.finish() == (0, "")
    waiting.close()
    assert rig.proxy_pid() == proxy and rig.links_up() == 1

"""The real parts the tests and the benchmark run rvgahp against.

- Sshd: a real OpenSSH server on 127.0.0.1, with its own host key, client key and
  authorized_keys, started and stopped by us.
- Flavor: one way of running the three roles: `rvgahp.py` under a given CPython, or
  the built `rvgahp.pyz`; always through symlinks named rvgahp_server, rvgahp_proxy
  and rvgahp_client, as users install it.
- Rig: a cluster home with condor_config.rvgahp and rvgahp_ssh, a server started from
  it, and clients on the submit side's socket.
- GahpSession: one client process, driven like the GridManager drives a GAHP.

Nothing here is mocked: the transport is ssh to that sshd, and the GAHP is tests/testgahp.
"""

import getpass
import os
import re
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RVGAHP = os.path.join(REPO, "rvgahp.py")
TESTGAHP = os.path.join(REPO, "tests", "testgahp")
ROLES = ("server", "proxy", "client")


def short_tempdir(prefix="rv"):
    """A directory with a short path: a UNIX socket path must fit in 107 bytes."""
    return tempfile.mkdtemp(prefix=prefix, dir="/tmp")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout, interval=0.02, what="condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("timed out after %.1f s waiting for %s" % (timeout, what))
        time.sleep(interval)


# --------------------------------------------------------------------------- sshd


def find_sshd():
    for candidate in (shutil.which("sshd"), "/usr/sbin/sshd", "/usr/local/sbin/sshd"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


class Sshd:
    """A real sshd on 127.0.0.1 that only lets our test key log in as the current user."""

    def __init__(self, workdir=None):
        self.dir = workdir or short_tempdir("sshd")
        self.user = getpass.getuser()
        self.port = None
        self.proc = None
        self.key = os.path.join(self.dir, "client_key")
        self.authorized_keys = os.path.join(self.dir, "authorized_keys")
        self.log = os.path.join(self.dir, "sshd.log")

    def start(self):
        sshd = find_sshd()
        if sshd is None:
            raise RuntimeError("sshd not found; install openssh-server")
        for name in ("host_key", "client_key"):
            path = os.path.join(self.dir, name)
            if not os.path.exists(path):
                subprocess.check_call(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", path])
        if not os.path.exists(self.authorized_keys):
            shutil.copy(self.key + ".pub", self.authorized_keys)
        os.chmod(self.authorized_keys, 0o600)
        if os.geteuid() == 0:
            os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # privilege separation
        for _ in range(5):
            self.port = free_port()
            config = self._write_config()
            with open(self.log, "ab") as log:
                self.proc = subprocess.Popen([sshd, "-D", "-e", "-f", config], stderr=log)
            try:
                wait_for(self._listening, 10, what="sshd to listen")
                return self
            except AssertionError:
                self.stop()
        raise RuntimeError("sshd did not start; see %s" % self.log)

    def _write_config(self):
        path = os.path.join(self.dir, "sshd_config")
        with open(path, "w") as f:
            f.write("\n".join(self.config_lines() + [""]))
        return path

    def base_config(self):
        """Where it listens and who it is: what every test sshd shares."""
        return [
            "Port %d" % self.port,
            "ListenAddress 127.0.0.1",
            "HostKey %s" % os.path.join(self.dir, "host_key"),
            "PidFile %s" % os.path.join(self.dir, "sshd.pid"),
        ]

    def config_lines(self):
        return self.base_config() + [
            "AuthorizedKeysFile %s" % self.authorized_keys,
            "PermitRootLogin prohibit-password",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "UsePAM no",
            "StrictModes no",
            "PrintMotd no",
            # Benchmarks and fault tests open many logins at once.
            "MaxStartups 500:30:1000",
            "MaxSessions 500",
            "LogLevel VERBOSE",
        ]

    def _listening(self):
        if self.proc.poll() is not None:
            raise RuntimeError("sshd exited with %s; see %s" % (self.proc.returncode, self.log))
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                return True
        except OSError:
            return False

    def ssh_argv(self, *remote):
        """ssh to this sshd as a transport would: batch mode, no user config, no mux."""
        return [
            "ssh",
            "-F",
            "/dev/null",
            "-i",
            self.key,
            "-p",
            str(self.port),
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "LogLevel=ERROR",
            "-o",
            "ControlMaster=no",
            "-o",
            "ControlPath=none",
            "%s@127.0.0.1" % self.user,
            *remote,
        ]

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# --------------------------------------------------------------------------- interpreters


def find_interpreters():
    """{"3.6": path, ...} for every CPython 3.6-3.13 found (pyenv first, then PATH)."""
    found = {}
    root = os.environ.get("PYENV_ROOT") or os.path.expanduser("~/.pyenv")
    versions = os.path.join(root, "versions")
    if os.path.isdir(versions):
        for name in os.listdir(versions):
            m = re.match(r"^3\.(\d+)\.(\d+)$", name)
            python = os.path.join(versions, name, "bin", "python3")
            if m and 6 <= int(m.group(1)) <= 13 and os.access(python, os.X_OK):
                minor = "3." + m.group(1)
                best = found.get(minor)
                if best is None or _patch(python) > _patch(best):
                    found[minor] = python
    for minor in range(6, 14):
        key = "3.%d" % minor
        if key not in found:
            path = shutil.which("python" + key)
            if path:
                found[key] = path
    return dict(sorted(found.items(), key=lambda kv: int(kv[0].split(".")[1])))


def _patch(python):
    m = re.search(r"/3\.\d+\.(\d+)/", python)
    return int(m.group(1)) if m else 0


class Flavor:
    """How to run the three roles: an interpreter and the file the symlinks point at."""

    def __init__(self, name, python, target):
        self.name = name
        self.python = python  # None: run the symlink itself, as users do
        self.target = target
        self.bin = short_tempdir("bin")
        for role in ROLES:
            os.symlink(target, os.path.join(self.bin, "rvgahp_" + role))

    def argv(self, role, *args):
        exe = os.path.join(self.bin, "rvgahp_" + role)
        return ([self.python, exe] if self.python else [exe]) + [str(a) for a in args]

    def command_line(self, role, *args):
        import shlex

        return " ".join(shlex.quote(a) for a in self.argv(role, *args))

    def __repr__(self):
        return "Flavor(%s)" % self.name


# --------------------------------------------------------------------------- the rig


DEFAULT_CONFIG = """\
# A cluster's condor_config.rvgahp, as the tests use it.
BATCH_GAHP = {gahp}
FT_GAHP = {gahp}
GLITE_LOCATION = {home}/glite
RVGAHP_PING_INTERVAL = {ping_interval}
RVGAHP_PING_TIMEOUT = {ping_timeout}
"""


class Rig:
    """A cluster home, a server run from it, and the submit side's socket."""

    def __init__(self, sshd, flavor, config_extra="", ping_interval=2, ping_timeout=10, gahp=TESTGAHP, transport=None):
        self.sshd = sshd
        self.flavor = flavor
        self.dir = short_tempdir("rig")
        self.home = os.path.join(self.dir, "home")
        self.dot = os.path.join(self.home, ".rvgahp")
        os.makedirs(self.dot)
        self.sock = os.path.join(self.dir, "g.sock")
        self.config = os.path.join(self.dot, "condor_config.rvgahp")
        self.transport = os.path.join(self.dot, "rvgahp_ssh")
        self.server_log = os.path.join(self.dir, "server.log")
        self.sink = os.path.join(self.dir, "sink.txt")
        self.proxy_log = self.sock + ".log"
        with open(self.config, "w") as f:
            f.write(DEFAULT_CONFIG.format(gahp=gahp, home=self.home, ping_interval=ping_interval, ping_timeout=ping_timeout))
            f.write(config_extra)
        self.write_transport(transport)
        self.server = None

    def write_transport(self, text=None):
        if text is None:
            import shlex

            remote = self.flavor.command_line("proxy", self.sock)
            text = "exec " + " ".join(shlex.quote(a) for a in self.sshd.ssh_argv(remote)) + "\n"
        with open(self.transport, "w") as f:
            f.write(text)

    def env(self, **extra):
        env = dict(os.environ)
        env["HOME"] = self.home
        env["TESTGAHP_SINK"] = self.sink  # where testgahp writes lines after CLOSE_STDOUT
        env.update(extra)
        return env

    def start_server(self, *args, wait=True, prefix=()):
        """prefix: a command that runs the server, such as setpriv with fewer capabilities."""
        self.server = subprocess.Popen(
            [*prefix, *self.flavor.argv("server", "-l", self.server_log, *args)],
            env=self.env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        if wait:
            self.wait_link()
        return self.server

    def log_text(self):
        try:
            with open(self.server_log, encoding="utf-8", errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def links_up(self):
        return self.log_text().count("rvgahp_server[%d]: link up" % self.server.pid) if self.server else 0

    def wait_link(self, count=1, timeout=20):
        def ready():
            if self.server.poll() is not None:
                raise AssertionError("server exited %s: %s" % (self.server.returncode, self.server.stderr.read().decode()))
            return self.links_up() >= count and os.path.exists(self.sock)

        wait_for(ready, timeout, what="link %d to come up; server log:\n%s" % (count, self.log_text()))

    def client_argv(self, gahp="blahpd", *extra):
        return self.flavor.argv("client", *extra, self.sock, gahp)

    def session(self, gahp="blahpd", argv=None, **kw):
        return GahpSession(argv or self.client_argv(gahp), **kw)

    def run_client(self, gahp="blahpd", input=b"", argv=None, timeout=30, env=None):
        return subprocess.run(
            argv or self.client_argv(gahp),
            input=input,
            capture_output=True,
            timeout=timeout,
            env=env,
        )

    # The processes of this rig's chain, found from /proc.

    def transport_pid(self):
        """The ssh client the server runs as its transport (its child, argv[0] ssh)."""
        for pid in children_of(self.server.pid):
            if cmdline(pid)[:1] == ["ssh"]:
                return pid
        return None

    def proxy_pid(self):
        for pid in pids_running("rvgahp_proxy %s" % self.sock):
            argv = cmdline(pid)
            if argv and not argv[0].endswith("ssh") and argv[-1] == self.sock:
                return pid
        return None

    def sshd_session_pid(self):
        """The sshd process whose child is the proxy: the session's own sshd."""
        proxy = self.proxy_pid()
        return parent_of(proxy) if proxy else None

    def gahp_pids(self):
        """Every live GAHP this rig's servers started, wherever it is now (only GAHPs
        carry CONDOR_CONFIG pointing at this rig's config)."""
        marker = ("CONDOR_CONFIG=%s" % self.config).encode()
        found = []
        for name in os.listdir("/proc"):
            if name.isdigit():
                try:
                    with open("/proc/%s/environ" % name, "rb") as f:
                        if marker in f.read().split(b"\0") and process_state(int(name)) not in (None, "Z"):
                            found.append(int(name))
                except OSError:
                    pass
        return found

    def zombies(self):
        if self.server is None or self.server.poll() is not None:
            return []
        return [pid for pid in children_of(self.server.pid) if process_state(pid) == "Z"]

    def orphans(self):
        """GAHPs of this rig that are not the current server's children."""
        server = self.server.pid if self.server and self.server.poll() is None else None
        return [pid for pid in self.gahp_pids() if parent_of(pid) != server]

    def stop(self):
        if self.server and self.server.poll() is None:
            self.server.send_signal(signal.SIGTERM)
            try:
                self.server.wait(20)
            except subprocess.TimeoutExpired:
                self.server.kill()
                self.server.wait()
        if self.server and self.server.stderr:
            self.server.stderr.close()

    def cleanup(self):
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class GahpSession:
    """A client process driven the way the GridManager drives a GAHP."""

    def __init__(self, argv, env=None, stdin=subprocess.PIPE):
        self.proc = subprocess.Popen(argv, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        self._stderr = None
        self.buf = b""
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.proc.stdout, selectors.EVENT_READ)

    def send(self, line):
        self.proc.stdin.write(line.encode() + b"\r\n")
        self.proc.stdin.flush()

    def readline(self, timeout=15):
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError("no line from the GAHP within %s s (have %r)" % (timeout, self.buf[-200:]))
            if self.selector.select(left):
                data = os.read(self.proc.stdout.fileno(), 65536)
                if not data:
                    raise EOFError("GAHP stdout closed (have %r); stderr: %s" % (self.buf, self.stderr_text()))
                self.buf += data
        line, self.buf = self.buf.split(b"\n", 1)
        return line.decode().rstrip("\r")

    def read_exactly(self, n, timeout=60):
        deadline = time.monotonic() + timeout
        while len(self.buf) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError("only %d of %d bytes within %s s" % (len(self.buf), n, timeout))
            if self.selector.select(left):
                data = os.read(self.proc.stdout.fileno(), 1 << 20)
                if not data:
                    raise EOFError("EOF after %d of %d bytes" % (len(self.buf), n))
                self.buf += data
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def read_to_eof(self, timeout=15):
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError("stdout still open after %s s" % timeout)
            if self.selector.select(left):
                data = os.read(self.proc.stdout.fileno(), 65536)
                if not data:
                    out, self.buf = self.buf, b""
                    return out
                self.buf += data

    def command(self, line, timeout=15):
        self.send(line)
        return self.readline(timeout)

    def banner(self, timeout=15):
        return self.readline(timeout)

    def close_stdin(self):
        self.proc.stdin.close()

    def wait(self, timeout=15):
        return self.proc.wait(timeout)

    def stderr_text(self):
        """All the client wrote on stderr, once it has exited (read once, then kept)."""
        if self._stderr is None:
            if self.proc.poll() is None:
                return "(still running)"
            self._stderr = self.proc.stderr.read().decode(errors="replace")
        return self._stderr

    def finish(self, timeout=15):
        """Close stdin as the GridManager does and return (exit status, stderr)."""
        if self.proc.stdin and not self.proc.stdin.closed:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
        status = self.proc.wait(timeout)
        err = self.stderr_text()
        self.close()
        return status, err

    def close(self):
        self.selector.close()
        for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if f and not f.closed:
                try:
                    f.close()
                except OSError:
                    pass  # stdin of a client that has died: nothing to flush to
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def children_of(pid):
    """Direct children of pid, from /proc."""
    kids = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open("/proc/%s/stat" % name) as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                if int(fields[1]) == pid:
                    kids.append(int(name))
            except (OSError, IndexError, ValueError):
                pass
    return kids


def parent_of(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def cmdline(pid):
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def quick_session(sock, gahp="blahpd", timeout=10):
    """A whole session without a client process, for soaks: hand the proxy a pair of
    pipes, read the banner, close stdin, read to EOF, and return the status line."""
    import array

    sys.path.insert(0, REPO)
    import rvgahp

    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(sock)
        request = rvgahp.frame(rvgahp.OPEN, 0, rvgahp.encode_fields({"gahp": gahp, "protocol": rvgahp.CLIENT_PROTOCOL}))
        s.sendmsg([request], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [in_r, out_w]))])
        os.close(in_r)
        os.close(out_w)
        in_r = out_w = None
        reply = rvgahp.read_reply(s, time.monotonic() + timeout)
        assert reply is not None and reply[0] == rvgahp.ACCEPT, reply
        banner = os.read(out_r, 4096)
        assert banner.startswith(b"$GahpVersion"), banner
        os.close(in_w)  # the GAHP sees EOF and ends
        in_w = None
        while os.read(out_r, 65536):
            pass
        line = b""
        while not line.endswith(b"\n"):
            chunk = s.recv(4096)
            assert chunk, "the socket closed before the status line (%r)" % line
            line += chunk
        return line.decode().strip()
    finally:
        s.close()
        for fd in (in_r, in_w, out_r, out_w):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass


def process_state(pid):
    """The one-letter state of pid ('Z' for a zombie), or None if it is gone."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None


def open_fd_count(pid):
    return len(os.listdir("/proc/%d/fd" % pid))


def rss_kb(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def pids_running(pattern):
    """pids whose command line contains pattern."""
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit() and int(name) != os.getpid():
            try:
                with open("/proc/%s/cmdline" % name, "rb") as f:
                    cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if pattern in cmd:
                found.append(int(name))
    return found


def read_text(path):
    """A file's text, or "" while it does not exist yet."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except FileNotFoundError:
        return ""


def raw_request(sock_path, payload, fds=(), timeout=10):
    """Talk to the proxy as a broken or hostile client would: send payload (with fds),
    and return the proxy's one reply as (kind, fields), or None if it just hung up."""
    import array

    sys.path.insert(0, REPO)
    import rvgahp

    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(sock_path)
    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    try:
        try:
            s.sendmsg([payload], ancillary)
        except BrokenPipeError:
            pass  # refused before it read us; its answer is still there to read
        reader = rvgahp.FrameReader()
        while True:
            data = s.recv(65536)
            if not data:
                return None
            frames = reader.feed(data)
            if frames:
                kind, _, body = frames[0]
                return kind, rvgahp.decode_fields(body)
    finally:
        s.close()


def no_tunnel_warning(gahp):
    """What a client says when an ft-gahp starts without CONDOR_INHERIT (most tests set
    none): its transfers cannot use the tunnel. Other GAHPs say nothing."""
    if gahp != "condor_ft-gahp":
        return ""
    return (
        "rvgahp_client: warning: CONDOR_INHERIT is not set, so the GridManager's address is unknown; "
        "file transfers will go direct to the GridManager, not through the link\n"
    )


if __name__ == "__main__":
    # A quick manual check: python3 tests/harness.py  starts sshd and one session.
    d = Sshd().start()
    flavor = Flavor("local", sys.executable, RVGAHP)
    rig = Rig(d, flavor)
    rig.start_server()
    s = rig.session()
    print(s.banner())
    print(s.command("COMMANDS"))
    print(s.finish())
    rig.cleanup()
    d.stop()


# x86_64 numbers of the calls time.sleep() makes: select (3.6-3.10), nanosleep, clock_nanosleep.
RETRY_SLEEPS = {"23", "35", "230"}


def sleeping_between_retries(pid):
    """The client sleeps before another connect(). Nothing before its first connect()
    sleeps (interpreter start, argv, the handoff), so it has tried once and will again.
    Elsewhere than x86_64, a sleeping process state is the nearest sign."""
    if os.uname().machine != "x86_64":
        return process_state(pid) == "S"
    try:
        with open("/proc/%d/syscall" % pid) as f:
            return f.read().split()[0] in RETRY_SLEEPS
    except (OSError, IndexError):
        return False

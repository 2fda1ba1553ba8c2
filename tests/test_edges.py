"""Hardening, round 3 (issues 18 and 19): the edges a hostile user, a new user and the
real HTCondor found, each replayed with real processes over the real sshd.

- a session start refused after its GAHP was taken leaves no GAHP behind;
- every number from outside goes through one checked parser;
- a bad boolean in the config stops the server at start, at file:line;
- each file rvgahp reads or writes, found to be a directory, a FIFO, a device, a socket,
  a dangling symlink or unreadable, at start or while running, gives one line that names
  the path and what it is;
- a GAHP that dies before its banner is explained on the client's stderr before the
  GridManager sees EOF, since HTCondor builds the resource's reason from those lines;
- a server whose transport or config is removed says so once and exits.
"""

import hashlib
import json
import os
import re
import select
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import time

import harness
import pytest
import testgahp
from test_hardening import BareProxy, assert_still_serving, one_line, run_server

sys.path.insert(0, harness.REPO)

import rvgahp

INHERIT = "4242 <127.0.0.1:9618?addrs=127.0.0.1-9618&sock=gm_1> 0"
BOOLEAN_ERROR = "RVGAHP_FT_TUNNEL must be one of true, false, yes, no, 1, 0 (any case), not 'off'"


def ft_env(rig, inherit=INHERIT):
    return rig.env(CONDOR_INHERIT=inherit)


# --------------------------------------------------------------------------- 1. no GAHP outlives a refused start


def test_a_session_refused_for_a_bad_config_value_leaves_no_gahp_behind(make_rig):
    rig = make_rig()
    rig.start_server()
    assert_still_serving(rig)  # leaves one blahpd spare
    harness.wait_for(lambda: len(rig.gahp_pids()) == 1, 20, what="the blahpd spare")
    before = set(rig.gahp_pids())
    with open(rig.config, "a") as f:
        f.write("RVGAHP_FT_TUNNEL = off\n")
    for _ in range(5):  # the GridManager retries a failed start
        result = rig.run_client("condor_ft-gahp", env=ft_env(rig))
        assert result.returncode != 0
        assert BOOLEAN_ERROR in one_line(result)
    # Every GAHP taken for those starts must go; on its own it would wait for ever.
    harness.wait_for(lambda: set(rig.gahp_pids()) <= before, 30, what="no GAHP beyond the spare: %s" % rig.gahp_pids())
    assert rig.zombies() == []
    assert rig.server.poll() is None


# --------------------------------------------------------------------------- 3. numbers from outside


@pytest.mark.parametrize("port", ["\u00b2", "9" * 5000, "0", "65536", "1_000", "\u0661\u0662"])
def test_a_condor_inherit_with_a_port_that_is_no_port_warns_once_and_the_ft_gahp_starts(make_rig, port):
    rig = make_rig()
    rig.start_server()
    s = rig.session("condor_ft-gahp", env=ft_env(rig, "4242 <127.0.0.1:%s?sock=x> 0" % port))
    assert s.banner().startswith("$GahpVersion")
    status, err = s.finish()
    assert status == 0
    lines = err.splitlines()
    assert len(lines) == 1 and "cannot find the GridManager's address in CONDOR_INHERIT" in lines[0], err
    assert "Traceback" not in err


@pytest.mark.parametrize("wait", ["\u0665", "1_0", "nan", " 5"])
def test_a_wait_that_is_no_number_is_a_usage_error(make_rig, wait):
    rig = make_rig()
    result = rig.run_client("blahpd", env=rig.env(RVGAHP_WAIT=wait))
    assert result.returncode == 2, result
    assert "the wait must be 0 to 3600 seconds" in one_line(result)


def test_a_tunnel_frame_naming_a_session_that_is_no_number_is_refused_and_the_link_stays(default_flavor):
    d = harness.short_tempdir("bp")
    proxy = BareProxy(default_flavor, os.path.join(d, "p.sock"))
    try:
        assert proxy.hello(features="tunnel,wide_tunnel")
        harness.wait_for(lambda: "link up: server pid" in proxy.log(), 20, what="the proxy's link up:\n" + proxy.log())
        cid = rvgahp.TUNNEL_CHANNEL | 7
        assert proxy.send(rvgahp.frame(rvgahp.TUNNEL, cid, rvgahp.encode_fields({"session": "\u00b2"})))
        assert proxy.send(rvgahp.frame(rvgahp.PING, 0, b"still there?"))
        harness.wait_for(lambda: proxy.got(rvgahp.PONG, b"still there?") or proxy.proc.poll() is not None, 20, what="a PONG")
        assert proxy.proc.poll() is None, proxy.log()
        closes = [p for k, c, p in proxy.frames if k == rvgahp.CLOSE and c == cid]
        assert closes and "no open session" in rvgahp.decode_fields(closes[0])["error"], proxy.frames
        assert "link down" not in proxy.log() and "internal error" not in proxy.log(), proxy.log()
    finally:
        proxy.close()
        subprocess.run(["rm", "-rf", d])


def test_the_number_parsers_take_ascii_numbers_in_range_and_nothing_else():
    assert [rvgahp.whole_number(t, 1, 65535) for t in ("1", "65535", "007")] == [1, 65535, 7]
    for text in ("", "0", "65536", "\u00b2", "\u0661", "1_0", " 1", "+1", "-1", "1.0", "9" * 5000):
        assert rvgahp.whole_number(text, 1, 65535) is None, text
    assert [rvgahp.plain_number(t) for t in ("2", "0.5", "1e7", "-5", "inf")] == [2.0, 0.5, 1e7, -5.0, float("inf")]
    for text in ("", "nan", "1_0", "\u0665", " 2", "2 ", "x", "9" * 41):
        assert rvgahp.plain_number(text) is None, text


# --------------------------------------------------------------------------- 9. booleans


def test_an_invalid_boolean_stops_the_server_at_start_naming_the_line_and_the_words(make_rig):
    rig = make_rig(config_extra="RVGAHP_FT_TUNNEL = off\n")
    result = run_server(rig)
    assert result.returncode == 1
    line = one_line(result)
    lineno = len(harness.read_text(rig.config).splitlines())
    assert line == "rvgahp_server: config %s:%d: %s" % (rig.config, lineno, BOOLEAN_ERROR), line


@pytest.mark.parametrize("word", ["TRUE", "yes", "1", "False", "no", "0"])
def test_the_booleans_htcondor_writes_are_taken(make_rig, word):
    config = rvgahp.Config("c", "RVGAHP_FT_TUNNEL = %s\n" % word)
    config.check_knobs()
    assert config.boolean("RVGAHP_FT_TUNNEL", None) is (word.lower() in ("true", "yes", "1"))


# --------------------------------------------------------------------------- 8. files that are not files


def make_kind(path, kind, keep):
    """Put a thing of this kind at path (keep holds what must stay open)."""
    if os.path.lexists(path):
        os.unlink(path)
    if kind == "a directory":
        os.mkdir(path)
    elif kind == "a FIFO":
        os.mkfifo(path)
    elif kind == "a character device":
        os.mknod(path, 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    elif kind == "a socket":
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(path)
        keep.append(s)
    elif kind == "a dangling symlink":
        os.symlink(path + ".missing", path)


KINDS = ["a directory", "a FIFO", "a character device", "a socket", "a dangling symlink"]


def kind_words(kind, path):
    """What the one line must say about a thing of this kind."""
    if kind == "a dangling symlink":
        return ("symbolic link",)
    return ("it is %s" % kind,)


def remove(path):
    if os.path.isdir(path) and not os.path.islink(path):
        os.rmdir(path)
    elif os.path.lexists(path):
        os.unlink(path)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("which", ["config", "transport", "log file", "pid file"])
def test_a_file_of_the_servers_that_is_not_a_file_at_start_is_one_line(make_rig, which, kind):
    if kind == "a character device" and os.geteuid() != 0:
        pytest.skip("making a device needs root")
    rig = make_rig()
    args = []
    if which == "config":
        path = rig.config
    elif which == "transport":
        path = rig.transport
    elif which == "log file":
        path = os.path.join(rig.dir, "server.log")
        args = ["-l", path]
    else:
        path = os.path.join(rig.dot, "rvgahp_server.%s.pid" % rvgahp.host_tag())
    keep = []
    make_kind(path, kind, keep)
    try:
        result = run_server(rig, *args)
    finally:
        for s in keep:
            s.close()
    assert result.returncode == 1, result
    line = one_line(result)
    assert path in line, line
    for words in kind_words(kind, path):
        assert words in line, line
    assert "Traceback" not in result.stderr.decode()


def rig_with_files_of_its_own(make_rig):
    """A rig whose BATCH_GAHP (a wrapper of the test GAHP) and GAHP stderr log are files
    a test may turn into other things; no spares, so each session opens them afresh."""
    gahp = os.path.join(harness.short_tempdir("gh"), "blahpd")
    with open(gahp, "w") as f:
        f.write('#!/bin/sh\nexec %s "$@"\n' % harness.TESTGAHP)
    os.chmod(gahp, 0o755)
    stderr_log = os.path.join(harness.short_tempdir("gl"), "gahp.err")
    rig = make_rig(gahp=gahp, config_extra="RVGAHP_SPARE_GAHPS = 0\nRVGAHP_GAHP_STDERR = %s\n" % stderr_log)
    return rig, gahp, stderr_log


@pytest.mark.parametrize("kind", KINDS)
def test_files_a_session_needs_that_turn_into_other_things_while_running_refuse_it_and_the_server_serves_on(make_rig, kind):
    if kind == "a character device" and os.geteuid() != 0:
        pytest.skip("making a device needs root")
    rig, gahp, stderr_log = rig_with_files_of_its_own(make_rig)
    rig.start_server()
    assert_still_serving(rig)
    with open(rig.config) as f:
        good_config = f.read()
    for what, path in (("config", rig.config), ("BATCH_GAHP", gahp), ("the GAHP stderr log", stderr_log)):
        keep = []
        saved = None
        if what == "BATCH_GAHP":
            with open(gahp) as f:
                saved = f.read()
        make_kind(path, kind, keep)
        try:
            line = one_line(rig.run_client("blahpd", timeout=60))
        finally:
            for s in keep:
                s.close()
            remove(path)
            if what == "config":
                with open(path, "w") as f:
                    f.write(good_config + "# restored\n")
            elif what == "BATCH_GAHP":
                with open(path, "w") as f:
                    f.write(saved)
                os.chmod(path, 0o755)
        assert "refused blahpd" in line and path in line, (what, line)
        for words in kind_words(kind, path):
            assert words in line, (what, line)
        assert rig.server.poll() is None
        assert_still_serving(rig)


@pytest.mark.parametrize("which", ["config", "transport", "log file", "pid file"])
def test_a_file_of_the_servers_it_may_not_open_is_one_line_at_start(which):
    """Unreadable (mode 000) is a kind too. Root opens any file, so the server runs as
    nobody here, in a home of nobody's own."""
    from test_hardening import NOBODY

    if os.geteuid() != 0:
        pytest.skip("running the server as another uid needs root")
    home = harness.short_tempdir("ur")
    dot = os.path.join(home, ".rvgahp")
    os.mkdir(dot, 0o700)
    paths = {
        "config": os.path.join(dot, "condor_config.rvgahp"),
        "transport": os.path.join(dot, "rvgahp_ssh"),
        "log file": os.path.join(home, "server.log"),
        "pid file": os.path.join(dot, "rvgahp_server.%s.pid" % rvgahp.host_tag()),
    }
    texts = {"config": "BATCH_GAHP = %s\n" % harness.TESTGAHP, "transport": "exit 1\n", "log file": "", "pid file": ""}
    for name, path in paths.items():
        with open(path, "w") as f:
            f.write(texts[name])
        os.chmod(path, 0o000 if name == which else 0o600)
    for root, _dirs, files in os.walk(home):
        for name in [root] + [os.path.join(root, n) for n in files]:
            os.chown(name, NOBODY, NOBODY)
    argv = ["setpriv", "--reuid=%d" % NOBODY, "--regid=%d" % NOBODY, "--clear-groups"]
    argv += ["env", "-i", "HOME=" + home, "PATH=/usr/bin:/bin", "/usr/bin/python3", rvgahp.__file__, "server"]
    argv += ["-l", paths["log file"]]
    try:
        result = subprocess.run(argv, capture_output=True, timeout=60)
    finally:
        shutil.rmtree(home, ignore_errors=True)
    assert result.returncode == 1, result
    line = one_line(result)
    assert paths[which] in line and "Permission denied" in line, line
    assert "Traceback" not in result.stderr.decode()


def test_files_a_session_needs_that_become_unreadable_while_running_refuse_it_and_the_server_serves_on(make_rig):
    """Unreadable (mode 000) while running. The server runs as root without root's power
    to open any file (setpriv drops CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH), so a mode
    stops it as it would stop a user's server."""
    if os.geteuid() != 0:
        pytest.skip("dropping root's file capabilities needs root")
    rig, gahp, stderr_log = rig_with_files_of_its_own(make_rig)
    rig.start_server(prefix=["setpriv", "--bounding-set=-dac_override,-dac_read_search"])
    assert_still_serving(rig)
    with open(rig.config, "a") as f:
        f.write("# the GAHP stderr log exists from here on\n")
    for what, path, words in (
        ("config", rig.config, "Permission denied"),  # edited and saved unreadable: an unchanged file is not read again
        ("BATCH_GAHP", gahp, "is not executable"),
        ("the GAHP stderr log", stderr_log, "Permission denied"),
    ):
        mode = stat.S_IMODE(os.stat(path).st_mode)
        if what == "config":
            with open(path, "a") as f:
                f.write("# edited\n")
        os.chmod(path, 0)
        try:
            line = one_line(rig.run_client("blahpd", timeout=60))
        finally:
            os.chmod(path, mode)
        assert "refused blahpd" in line and path in line and words in line, (what, line)
        assert rig.server.poll() is None
        assert_still_serving(rig)


# --------------------------------------------------------------------------- 18. a GAHP that dies before its banner


DIES_EARLY = """#!/bin/sh
echo "Cannot open log file '/var/lib/condor/log/FTGahpLog'" >&2
exit 4
"""


def test_a_gahp_that_dies_before_its_banner_is_explained_on_stderr_before_the_gridmanager_sees_eof(make_rig):
    gahp = os.path.join(harness.short_tempdir("gd"), "condor_ft-gahp")
    with open(gahp, "w") as f:
        f.write(DIES_EARLY)
    os.chmod(gahp, 0o755)
    rig = make_rig(gahp=gahp)
    rig.start_server()
    s = rig.session("condor_ft-gahp", env=ft_env(rig))
    # As the GridManager does: read stdout to EOF; by then the cause must be waiting on
    # stderr, or HTCondor's "Failed to start GAHP:" shows only what came before it.
    assert s.read_to_eof(timeout=30) == b""
    err_fd = s.proc.stderr.fileno()
    os.set_blocking(err_fd, False)
    ready, _, _ = select.select([err_fd], [], [], 0)
    early = os.read(err_fd, 65536).decode() if ready else ""
    lines = early.splitlines()
    stderr_log = os.path.join(rig.dot, "gahp_stderr.%s.log" % rvgahp.host_tag())
    assert lines[0].startswith("Allocated port "), early
    assert lines[-1] == (
        "rvgahp_client: condor_ft-gahp session ended: exit 4 before its banner; the last line of %s on the cluster: "
        "Cannot open log file '/var/lib/condor/log/FTGahpLog'" % stderr_log
    ), early
    assert s.proc.wait(15) == 1
    assert "did not start: exit 4 before its banner" in harness.read_text(rig.proxy_log)
    assert rig.server.poll() is None


# --------------------------------------------------------------------------- 14. a server whose files are removed


@pytest.mark.parametrize("which", ["transport", "config"])
def test_a_server_whose_files_are_removed_says_so_once_and_exits(make_rig, which):
    rig = make_rig()
    rig.start_server()
    path = rig.transport if which == "transport" else rig.config
    os.unlink(path)
    os.kill(rig.proxy_pid(), 9)  # the link ends, as when setup --remove stops the proxy
    assert rig.server.wait(60) == 1
    log = rig.log_text()
    assert log.count("its %s %s is gone, so this server stops" % (which, path)) == 1, log
    assert "next login attempt" not in log.split("is gone")[-1]


# --------------------------------------------------------------------------- 2. a reset is a reset, both ways


class ResettingEndpoint:
    """The GridManager's file-transfer port, played by hand: accept one connection at a time."""

    def __init__(self):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.sock.settimeout(30)
        self.port = self.sock.getsockname()[1]

    def inherit(self):
        return "4242 <127.0.0.1:%d?addrs=127.0.0.1-%d&sock=gm_1> 0" % (self.port, self.port)

    def accept(self):
        conn, _ = self.sock.accept()
        conn.settimeout(30)
        return conn


def reset(sock):
    """Close with SO_LINGER 0: the kernel sends RST, not FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def outcome(sock):
    """What the next read sees: "reset", "eof", or the bytes."""
    try:
        data = sock.recv(65536)
    except ConnectionResetError:
        return "reset"
    return "eof" if data == b"" else data


def tunnel_port_of(session):
    lines = [line for line in session.err_at_banner.splitlines() if line.startswith("Allocated port ")]
    assert len(lines) == 1, session.err_at_banner
    return int(lines[0].split()[2])


@pytest.mark.parametrize("who", ["the GridManager", "the ft-gahp"])
def test_a_reset_at_either_end_of_a_tunnel_connection_reaches_the_other_end_as_a_reset(make_rig, who):
    from test_tunnel import start_ft

    rig = make_rig()
    rig.start_server()
    gm = ResettingEndpoint()
    s = start_ft(rig, gm.inherit())
    cluster_side = socket.create_connection(("127.0.0.1", tunnel_port_of(s)), timeout=30)
    cluster_side.sendall(b"the first bytes of a sandbox")
    gm_side = gm.accept()
    got = b""
    while len(got) < len(b"the first bytes of a sandbox"):
        got += gm_side.recv(65536)
    cut, other = (gm_side, cluster_side) if who == "the GridManager" else (cluster_side, gm_side)
    reset(cut)
    assert outcome(other) == "reset", "a transfer cut off by %s must not look finished at the other end" % who
    other.close()
    text = rig.log_text() + harness.read_text(rig.proxy_log)
    harness.wait_for(lambda: "reset its connection" in rig.log_text() + harness.read_text(rig.proxy_log), 30, what="the reset logged")
    assert "%s reset its connection" % who in rig.log_text() + harness.read_text(rig.proxy_log), text
    # The slot is free and the session carries the next transfer as before.
    again = socket.create_connection(("127.0.0.1", tunnel_port_of(s)), timeout=30)
    again.sendall(b"next")
    gm_side = gm.accept()
    assert gm_side.recv(4) == b"next"
    gm_side.sendall(b"answer")
    assert again.recv(6) == b"answer"
    again.close()
    gm_side.close()
    assert s.finish()[0] == 0


# --------------------------------------------------------------------------- 17. messages that must not mislead


def test_a_client_during_an_outage_is_told_when_the_last_link_went_down_and_why(make_rig):
    from test_hardening import unreachable_transport

    rig = make_rig()
    rig.start_server()
    rig.write_transport(unreachable_transport(rig))  # the network is down from now on
    os.kill(rig.transport_pid(), 9)
    harness.wait_for(lambda: "link down: " in harness.read_text(rig.proxy_log), 30, what="the proxy's link down")
    harness.wait_for(lambda: not os.path.exists(rig.sock), 30, what="the proxy gone")
    line = one_line(rig.run_client("blahpd", env=rig.env(RVGAHP_WAIT="1")))
    assert "no rvgahp server is connected to %s (waited 1 s); its last link went down at 20" % rig.sock in line, line
    assert "rvgahp_server on the cluster logs in again by itself" in line, line
    assert "is rvgahp_server running" not in line
    # And a monitoring script gets JSON with a state, and exit 1, not silence.
    result = subprocess.run(rig.flavor.argv("client", "--status", "--json", rig.sock), capture_output=True, timeout=30)
    assert result.returncode == 1
    status = json.loads(result.stdout.decode())
    assert status["state"] == "no proxy" and status["socket"] == rig.sock, status
    assert status["last_link"].startswith("its last link went down at"), status


def test_links_that_came_up_and_ended_early_are_not_called_failed_logins():
    b = rvgahp.Backoff(300.0)
    now = 1000.0
    b.next_delay(now - 15, 15.0, now)  # up 15 s: the first early drop is the network
    b.next_delay(now, 15.0, now + 15)
    assert b.streak() == "2 links that ended within 30 s in a row"
    b.next_delay(now + 20, None, now + 25)  # a login that gave no link
    assert b.streak() == "1 failed login and 2 links that ended within 30 s in a row"
    b.next_delay(now + 30, 31.0, now + 61)  # a stable link ends the streak
    assert (b.failures, b.short_links) == (0, 0)


def test_the_status_gives_both_pids_as_numbers(make_rig):
    rig = make_rig()
    rig.start_server()
    result = subprocess.run(rig.flavor.argv("client", "--status", "--json", rig.sock), capture_output=True, timeout=30)
    assert result.returncode == 0, result
    status = json.loads(result.stdout.decode())
    assert status["server"]["pid"] == rig.server.pid and status["proxy"]["pid"] == rig.proxy_pid(), status


def test_the_proxys_verbose_flag_says_what_it_does(default_flavor):
    result = subprocess.run(default_flavor.argv("proxy", "--help"), capture_output=True, timeout=30)
    text = " ".join(result.stdout.decode().split())
    assert "-v, --verbose log more: the traceback behind each internal error" in text, text


# --------------------------------------------------------------------------- 16. a silent link, found in seconds


def test_after_a_hard_failover_the_first_session_is_served_by_the_standby(make_rig):
    """kill -9 of the active login node's server with its network down: its ssh and the
    submit host's sshd session are stopped, so the link neither speaks nor closes. With
    the default 45 s ping timeout, only the session's own probe can find that out."""
    first = make_rig(ping_interval=15, ping_timeout=45)
    first.start_server()
    second = make_rig(ping_interval=15, ping_timeout=45)  # the standby login node, same socket
    second.sock = first.sock
    second.write_transport()
    second.start_server(wait=False)
    harness.wait_for(lambda: "link up as a hot standby" in second.log_text(), 30, what="the standby link")
    frozen = [first.transport_pid(), first.sshd_session_pid()]
    for pid in frozen:
        os.kill(pid, signal.SIGSTOP)  # the network is down: nothing moves, nothing closes
    try:
        first.server.kill()  # and the node is gone
        first.server.wait()
        s = first.session("blahpd")  # the GridManager's next start, on the default 5 s wait
        assert s.banner(timeout=120).startswith("$GahpVersion")
        assert s.command("CWD") == "S " + second.home, "served by the standby's server"
        assert s.finish() == (0, "")
    finally:
        for pid in frozen:
            os.kill(pid, signal.SIGKILL)
    assert "the link went silent: no answer to a probe" in harness.read_text(first.proxy_log)
    assert "link active: the standby proxy took over" in second.log_text()


def test_a_command_waiting_on_a_silent_link_gets_an_error_in_seconds_not_at_the_ping_timeout(make_rig):
    rig = make_rig(ping_interval=15, ping_timeout=45)
    rig.start_server()
    s = rig.session("blahpd")
    assert s.banner().startswith("$GahpVersion")
    ssh = rig.transport_pid()
    os.kill(ssh, signal.SIGSTOP)
    try:
        s.send("ECHO are you there")
        # The session ends, named for a silent link (found by a probe), not at the ping
        # timeout, which would come after the GridManager's own 20 s had run out.
        with pytest.raises(EOFError):
            s.readline(timeout=120)
        status, err = s.finish()
    finally:
        os.kill(ssh, signal.SIGKILL)
    assert status == 1
    assert "the link went silent: no answer to a probe" in err, err


# --------------------------------------------------------------------------- 4 and 6. another uid knocking on a tunnel port

BURSTS = 20000


def knock(port, count):
    """work for AsNobody: connect, send, close, count times; report how many connected."""

    def work(report_w, stop_r, ready_w):
        os.close(ready_w)
        connected = 0
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                s.connect(("127.0.0.1", port))
                s.send(b"sink intruder\n")
                connected += 1
            except OSError:
                pass
            finally:
                s.close()
        os.write(report_w, str(connected).encode())

    return work


def refused_in_log(text, uid):
    """How many tunnel connections the server's log says it closed: first lines and sums."""
    firsts = len(re.findall(r"tunnel: closed a connection (from uid %d|whose owner is gone)" % uid, text))
    pattern = r"tunnel: closed (\d+) more connections? (?:from uid %d \(\S+\)|whose owner is gone)" % uid
    sums = sum(int(n) for n in re.findall(pattern, text))
    return firsts, sums


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")
def test_another_uids_connect_send_close_bursts_never_reach_the_gridmanager_and_cost_a_few_log_lines(make_rig):
    from test_hardening import NOBODY, AsNobody
    from test_tunnel import FakeGridManager, tunnel_session

    rig = make_rig()
    rig.start_server()  # as root: the uid a closed socket is reported with
    gm = FakeGridManager()
    try:
        knocked(rig, gm, NOBODY, AsNobody, tunnel_session)
    finally:
        gm.close()


def knocked(rig, gm, uid, as_other, tunnel_session):
    s, port = tunnel_session(rig, gm)
    started = time.monotonic()
    child = as_other(knock(port, BURSTS))
    connected = int(child.finish())
    assert connected > BURSTS // 2, "the bursts mostly failed to connect (%d of %d)" % (connected, BURSTS)
    # Every knock accepted is closed, and counted; the session's end says the last sums.
    harness.wait_for(lambda: sum(refused_in_log(rig.log_text(), uid)) >= 1, 60, what="a refusal logged")
    assert s.finish()[0] == 0
    harness.wait_for(lambda: sum(refused_in_log(rig.log_text(), uid)) >= connected, 60, what="all %d knocks counted" % connected)
    firsts, sums = refused_in_log(rig.log_text(), uid)
    assert firsts + sums == connected, (firsts, sums, connected)
    # At most one line a minute of each kind (two kinds here): on a loaded machine the
    # knocks can span more than one minute, each of which may begin with its own line.
    minutes = 1 + int((time.monotonic() - started) // rvgahp.LogSummary.PERIOD) + 1
    assert firsts <= 2 * minutes, "one line per kind a minute, not one per knock (%d lines in %d minutes)" % (firsts, minutes)
    assert gm.accepted == 0 and gm.headers == [], "a foreign byte reached the GridManager"
    assert rig.server.poll() is None


# --------------------------------------------------------------------------- 7. a closed connection frees its slot

PAIRS = 1000
IN_FLIGHT = 400  # well over the 256 open connections a session may have


class AnsweringEndpoint:
    """The GridManager's port for many quick transfers: one thread with a selector, a deep
    accept backlog, and for each connection "ok N" (the bytes it read) after its EOF."""

    def __init__(self):
        import selectors
        import threading

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(1024)
        self.sock.setblocking(False)
        self.port = self.sock.getsockname()[1]
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.sock, selectors.EVENT_READ)
        self.stop_r, self.stop_w = os.pipe()
        self.selector.register(self.stop_r, selectors.EVENT_READ)
        self.accepted = 0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def inherit(self):
        return "4242 <127.0.0.1:%d?addrs=127.0.0.1-%d&sock=gm_1> 0" % (self.port, self.port)

    def _run(self):
        import selectors

        counts = {}
        while True:
            for key, _ in self.selector.select():
                if key.fileobj == self.stop_r:
                    return
                if key.fileobj is self.sock:
                    try:
                        conn, _ = self.sock.accept()
                    except BlockingIOError:
                        continue
                    self.accepted += 1
                    counts[conn] = 0
                    self.selector.register(conn, selectors.EVENT_READ)
                    continue
                conn = key.fileobj
                try:
                    data = conn.recv(65536)
                except OSError:
                    data = None
                if data:
                    counts[conn] += len(data)
                    continue
                self.selector.unregister(conn)
                if data == b"":
                    conn.sendall(b"ok %d\n" % counts[conn])
                del counts[conn]
                conn.close()

    def close(self):
        os.write(self.stop_w, b"x")
        self.thread.join(10)
        self.sock.close()


def test_a_thousand_back_to_back_transfers_closed_at_once_are_none_of_them_dropped(make_rig):
    """The ft-gahp sends a command and closes its side at once, many times over, while
    the GridManager's answers are still on the way: a connection the ft-gahp has closed
    must not hold one of the session's 256 slots until that answer has come."""
    from test_tunnel import start_ft

    rig = make_rig()
    rig.start_server()
    gm = AnsweringEndpoint()
    open_socks = []
    outcomes = []

    def collect(sock):
        got = b""
        try:
            while True:
                data = sock.recv(4096)
                if not data:
                    break
                got += data
        except OSError as e:
            got = repr(e).encode()
        sock.close()
        outcomes.append(got)

    try:
        s = start_ft(rig, gm.inherit())
        port = tunnel_port_of(s)
        for i in range(PAIRS):
            c = socket.create_connection(("127.0.0.1", port), timeout=60)
            c.sendall(b"pair %04d\n" % i)
            c.shutdown(socket.SHUT_WR)  # done sending; only the answer is to come
            open_socks.append(c)
            if len(open_socks) > IN_FLIGHT:
                collect(open_socks.pop(0))
        while open_socks:
            collect(open_socks.pop(0))
        assert s.finish()[0] == 0
    finally:
        for c in open_socks:
            c.close()
        gm.close()
    dropped = [o for o in outcomes if o != b"ok 10\n"]
    logs = rig.log_text() + harness.read_text(rig.proxy_log)
    assert not dropped, "%d of %d transfers got no answer, e.g. %r\n%s" % (len(dropped), PAIRS, dropped[:3], logs[-3000:])
    assert gm.accepted == PAIRS
    assert "over the limit" not in rig.log_text()


# --------------------------------------------------------------------------- 5. memory for connections that wait


def unread_bytes(port):
    """Bytes sent to or from 127.0.0.1:port that no program has read yet: the receive
    queues of the accepted sockets plus the send queues of the connecting ones."""
    total = 0
    with open("/proc/net/tcp") as f:
        for line in f.read().splitlines()[1:]:
            fields = line.split()
            local, remote = fields[1], fields[2]
            tx, rx = (int(x, 16) for x in fields[4].split(":"))
            if local.endswith(":%04X" % port):
                total += rx
            elif remote.endswith(":%04X" % port):
                total += tx
    return total


def test_connections_waiting_on_a_busy_gridmanager_cost_the_proxy_no_memory(make_rig):
    from test_tunnel import start_ft

    rig = make_rig()
    rig.start_server()
    busy = socket.socket(socket.AF_INET, socket.SOCK_STREAM)  # a GridManager too busy to accept
    busy.bind(("127.0.0.1", 0))
    busy.listen(0)
    gm_port = busy.getsockname()[1]
    s = start_ft(rig, "4242 <127.0.0.1:%d?sock=gm_1> 0" % gm_port)
    port = tunnel_port_of(s)
    conns = []
    try:
        for _ in range(40):
            c = socket.create_connection(("127.0.0.1", port), timeout=60)
            c.sendall(b"x" * (1 << 20))  # what an upload begins with
            conns.append(c)

        def status():
            out = subprocess.run(rig.flavor.argv("client", "--status", "--json", rig.sock), capture_output=True, timeout=30).stdout
            return json.loads(out.decode())["sessions"][0]

        harness.wait_for(lambda: status()["tunnel_connections"] == 40, 60, what="40 tunnel connections at the proxy")
        # The kernel queues a connection or two for a listen(0) socket; what the others
        # sent has not left the cluster's sockets, and nothing waits in the proxy's memory.
        assert unread_bytes(port) >= 38 << 20
        assert status()["tunnel_buffered"] == 0
    finally:
        for c in conns:
            c.close()
        busy.close()
    assert s.finish()[0] == 0


def stalled_endpoint(backlog):
    """A GridManager port that accepts (in the kernel) and never reads."""
    stalled = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stalled.bind(("127.0.0.1", 0))
    stalled.listen(backlog)
    return stalled


def push_what_fits(pushers):
    """Send each [socket, bytes left] as much as its socket takes now."""
    for p in pushers:
        try:
            while p[1] > 0:
                p[1] -= p[0].send(b"u" * min(p[1], 65536))
        except BlockingIOError:
            pass


def proxy_status(rig):
    out = subprocess.run(rig.flavor.argv("client", "--status", "--json", rig.sock), capture_output=True, timeout=30).stdout
    return json.loads(out.decode())


def test_the_proxy_holds_one_bounded_pool_for_all_tunnel_connections_and_frees_it_when_they_end(make_rig):
    """A GridManager that stops reading: two sessions, 20 connections each, the cluster's
    side pushing 4 MiB into every one. The proxy holds at most TUNNEL_POOL for all of them
    together (not a 2 MiB window each: 80 MiB), and holds nothing once they have ended."""
    from test_tunnel import start_ft

    rig = make_rig()
    rig.start_server()
    stalled = stalled_endpoint(1024)
    gm_port = stalled.getsockname()[1]
    sessions = [start_ft(rig, "4242 <127.0.0.1:%d?sock=gm_1> 0" % gm_port) for _ in range(2)]
    pushers = []
    for s in sessions:
        port = tunnel_port_of(s)
        for _ in range(20):
            c = socket.create_connection(("127.0.0.1", port), timeout=60)
            c.setblocking(False)
            pushers.append([c, 4 << 20])

    def push_until_the_pool_is_spent():
        push_what_fits(pushers)
        pool = proxy_status(rig)["link"]["tunnel_pool"]
        return pool["waiting"] > 0 and pool["granted"] > pool["size"] - rvgahp.TUNNEL_GRANT_MIN and pool

    try:
        pool = harness.wait_for(push_until_the_pool_is_spent, 120, interval=0.2, what="the proxy's tunnel pool to be spent")
        now = proxy_status(rig)
        held = sum(s["tunnel_buffered"] for s in now["sessions"])
        assert sum(s["tunnel_connections"] for s in now["sessions"]) == 40
        assert pool["size"] == rvgahp.TUNNEL_POOL and held <= rvgahp.TUNNEL_POOL, (
            "the proxy holds %d bytes for its GridManager sockets" % held
        )
    finally:
        for p in pushers:
            p[0].close()
        stalled.close()  # the connections it never accepted are reset: every one ends

    def emptied():
        now = proxy_status(rig)
        return not any(s["tunnel_connections"] for s in now["sessions"]) and now["link"]["tunnel_pool"]["granted"] == 0

    harness.wait_for(emptied, 120, what="the tunnel connections to end and give their credit back")
    for s in sessions:
        s.finish()


def test_idle_tunnel_connections_hold_no_credit_and_ask_again_when_they_send(make_rig):
    """40 connections that sent their first line and then nothing: once idle, each gives
    its credit back, so the pool's grants fall to nothing while all 40 stay open. When
    one sends again, it asks, and 3 MiB arrive whole."""
    from test_tunnel import FakeGridManager, seed_for, tunnel_session

    rig = make_rig()
    rig.start_server()
    gm = FakeGridManager()
    conns = []
    try:
        s, port = tunnel_session(rig, gm)
        for i in range(40):
            c = socket.create_connection(("127.0.0.1", port), timeout=60)
            c.sendall(b"sink idle%d\n" % i)
            conns.append(c)
        harness.wait_for(lambda: len(gm.headers) == 40, 60, what="40 connections to reach the endpoint")

        def idle_and_empty():
            now = proxy_status(rig)
            open_now = sum(x["tunnel_connections"] for x in now["sessions"])
            return open_now == 40 and now["link"]["tunnel_pool"]["granted"] == 0

        harness.wait_for(idle_and_empty, 60, what="40 idle connections to give their credit back")
        data = b"".join(testgahp.seeded_bytes(seed_for("idle0"), 3 << 20))
        conns[0].sendall(data)
        conns[0].shutdown(socket.SHUT_WR)
        seen = gm.wait_seen("idle0")
        assert (seen.received, seen.sha256, seen.end) == (len(data), hashlib.sha256(data).hexdigest(), "eof")
    finally:
        for c in conns:
            c.close()
        gm.close()
    s.finish()


def test_a_connection_waiting_for_a_spent_pool_gets_its_turn_when_credit_comes_back(make_rig):
    """Twelve connections to a GridManager that reads nothing spend the pool; a thirteenth,
    to one that reads, waits in line (the status counts it), and once the stalled ones
    end, its 1 MiB arrives whole: the pool is strict, and no one waits for ever."""
    from test_tunnel import FakeGridManager, seed_for, start_ft

    rig = make_rig()
    rig.start_server()
    stalled = stalled_endpoint(64)
    gm = FakeGridManager()
    pushers, late = [], None
    try:
        stuck = start_ft(rig, "4242 <127.0.0.1:%d?sock=gm_1> 0" % stalled.getsockname()[1])
        reading = start_ft(rig, gm.condor_inherit())
        for _ in range(12):
            c = socket.create_connection(("127.0.0.1", tunnel_port_of(stuck)), timeout=60)
            c.setblocking(False)
            pushers.append([c, 8 << 20])  # more than the kernel buffers toward the stalled reader take

        last = [None]

        def spent():
            push_what_fits(pushers)
            now = proxy_status(rig)
            pool, held = now["link"]["tunnel_pool"], sum(x["tunnel_buffered"] for x in now["sessions"])
            # Spent, and stuck: what the proxy holds no longer drains into the kernel's
            # buffers toward the stalled reader, so no credit comes back until a
            # connection ends.
            still, last[0] = held > 0 and held == last[0], held
            return pool["granted"] > pool["size"] - rvgahp.TUNNEL_GRANT_MIN and still and pool

        waiting = harness.wait_for(spent, 120, interval=0.2, what="the stalled connections to spend the pool")["waiting"]
        data = b"".join(testgahp.seeded_bytes(seed_for("late"), 1 << 20))
        late = socket.create_connection(("127.0.0.1", tunnel_port_of(reading)), timeout=60)
        late.sendall(b"sink late\n")
        in_line = lambda: proxy_status(rig)["link"]["tunnel_pool"]["waiting"] == waiting + 1  # noqa: E731
        harness.wait_for(in_line, 60, what="the late connection to wait in line")
        assert "late" not in gm.headers  # its first line needs credit, and none is free
        for p in pushers:
            p[0].close()
        stalled.close()  # resets what it never accepted: the stalled connections end, and their credit comes back
        late.sendall(data)
        late.shutdown(socket.SHUT_WR)
        seen = gm.wait_seen("late")
        assert (seen.received, seen.sha256, seen.end) == (len(data), hashlib.sha256(data).hexdigest(), "eof")
    finally:
        for p in pushers:
            p[0].close()
        stalled.close()
        if late is not None:
            late.close()
        gm.close()
    stuck.finish()
    reading.finish()


# --------------------------------------------------------------------------- 12. small things a new user trips on


def test_the_top_level_command_names_an_unknown_command_and_itself(tmp_path):
    link = tmp_path / "rvgahp"
    link.symlink_to(os.path.join(harness.REPO, "rvgahp_launch.py"))  # the pip install's `rvgahp`
    run = lambda *args: subprocess.run([sys.executable, str(link), *args], capture_output=True, text=True, timeout=30)  # noqa: E731
    bogus = run("bogus")
    assert bogus.returncode == 2 and bogus.stdout == ""
    assert bogus.stderr == (
        "rvgahp: unknown command bogus; expected one of server, proxy, client, setup, doctor, print (rvgahp --help says more)\n"
    )
    usage = run("--help").stdout
    assert usage.startswith("usage: rvgahp server ") and "rvgahp print {transport," in usage
    for command in ("setup", "doctor", "print"):
        version = run(command, "--version")
        assert (version.returncode, version.stdout) == (0, "rvgahp %s %s\n" % (command, rvgahp.VERSION)), version

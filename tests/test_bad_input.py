"""Bad input: each gets one clear line naming the offending thing, and the long-running
processes keep serving everyone else."""

# array is imported here, not in raw_request: a child that has dropped to another uid
# may no longer be able to read the interpreter's own files to import it.
import os
import socket
import stat
import subprocess
import sys

import harness
import pytest

sys.path.insert(0, harness.REPO)

import rvgahp


def open_frame(**fields):
    return rvgahp.frame(rvgahp.OPEN, 0, rvgahp.encode_fields(fields))


def assert_still_serving(rig):
    s = rig.session("blahpd")
    assert s.banner().startswith("$GahpVersion")
    assert s.command("ECHO still-serving") == "S still-serving"
    assert s.finish() == (0, "")


def one_line(result):
    lines = result.stderr.decode().splitlines()
    assert len(lines) == 1, lines
    assert result.stdout == b""
    return lines[0]


# --------------------------------------------------------------------------- requests


def test_malformed_requests_on_the_socket_are_refused_and_the_proxy_carries_on(rig):
    r, w = os.pipe()
    try:
        cases = [
            (b"GET / HTTP/1.0\r\n\r\n", (r, w), "malformed request"),
            (open_frame(gahp="blahpd"), (), "a request without its stdin and stdout"),
            (rvgahp.frame(rvgahp.DATA, 0, b"hi"), (r, w), "frame type 5 instead of a request"),
            (open_frame(nogahp="x"), (r, w), "no GAHP named"),
            (rvgahp.frame(rvgahp.OPEN, 0, b"\xff\xfe"), (r, w), "a request that is not UTF-8"),
            (rvgahp.HEADER.pack(rvgahp.OPEN, 0, 10**9), (r, w), "a 1000000000-byte frame"),
        ]
        for payload, fds, reason in cases:
            reply = harness.raw_request(rig.sock, payload, fds)
            assert reply is not None and reply[0] == rvgahp.REFUSE, (payload, reply)
            assert reason in reply[1]["reason"], (payload, reply)
    finally:
        os.close(r)
        os.close(w)
    assert_still_serving(rig)


def test_a_client_from_another_rvgahp_version_is_told_to_restart_the_link(rig):
    """After an upgrade, new clients may meet the old proxy of a link still up."""
    r, w = os.pipe()
    try:
        reply = harness.raw_request(rig.sock, open_frame(gahp="blahpd", rvgahp="0.9", protocol="0"), (r, w))
    finally:
        os.close(r)
        os.close(w)
    assert reply[0] == rvgahp.REFUSE and reply[1]["by"] == "proxy"
    assert "this rvgahp_client (rvgahp 0.9) speaks client protocol 0, and the rvgahp_proxy on %s" % rig.sock in reply[1]["reason"]
    assert "restart the link by stopping that proxy" in reply[1]["reason"]
    assert_still_serving(rig)


def test_an_overlong_gahp_name_is_refused_in_one_line(rig):
    result = rig.run_client("b" * 5000)
    assert result.returncode == 2
    assert one_line(result) == "rvgahp_client: the GAHP name is 5000 characters long; GAHP names are short words such as blahpd"
    assert_still_serving(rig)


def test_a_socket_path_too_long_for_af_unix_is_named(rig):
    long_path = "/tmp/" + "x" * 200 + ".sock"
    result = rig.run_client(argv=rig.flavor.argv("client", long_path, "blahpd"))
    assert result.returncode == 1
    assert one_line(result) == (
        "rvgahp_client: socket path %s is %d bytes; AF_UNIX allows at most 107, so choose a shorter path" % (long_path, len(long_path))
    )


def test_a_client_of_another_user_is_turned_away(rig):
    if os.geteuid() != 0:
        pytest.skip("needs root to act as another user")
    # Let the kernel pass it, so that the proxy's own check is what is tested.
    os.chmod(rig.dir, 0o711)
    os.chmod(rig.sock, 0o666)
    try:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            try:
                os.setgid(65534)
                os.setuid(65534)
                reply = harness.raw_request(rig.sock, open_frame(gahp="blahpd"), (0, 1))
                os.write(w, repr(reply).encode())
            except BaseException as e:
                os.write(w, ("the child failed: %r" % e).encode())
            finally:
                os._exit(0)
        os.close(w)
        with os.fdopen(r) as f:
            reply = f.read()
        os.waitpid(pid, 0)
    finally:
        os.chmod(rig.sock, 0o600)
        os.chmod(rig.dir, 0o700)
    assert "only uid 0 may use %s, and this client is uid 65534" % rig.sock in reply
    assert_still_serving(rig)


def test_the_real_client_of_another_user_is_told_why(make_rig):
    system_python = "/usr/bin/python3"
    if os.geteuid() != 0 or not os.access(system_python, os.X_OK):
        pytest.skip("needs root and a system python3 that another user can run")
    rig = make_rig()
    rig.start_server()
    os.chmod(rig.dir, 0o711)
    os.chmod(rig.sock, 0o666)

    def become_nobody():
        os.setgid(65534)
        os.setuid(65534)

    result = subprocess.run(
        [system_python, harness.RVGAHP, "client", "--rvgahp-wait", "3", rig.sock, "blahpd"],
        preexec_fn=become_nobody,
        stdin=subprocess.PIPE,
        capture_output=True,
        timeout=30,
        cwd="/",
    )
    # The client checks who serves the socket before it hands anything over; the
    # proxy's own check (test_a_client_of_another_user_is_turned_away) stands behind it.
    assert result.returncode == 1
    assert one_line(result) == (
        "rvgahp_client: %s is served by uid 0 (root), not by you (uid 65534): another user may have taken the path; "
        "put the socket in a private directory such as ~/.rvgahp/ (see the README)" % rig.sock
    )


def test_the_socket_is_private_to_its_owner(rig):
    mode = os.stat(rig.sock).st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600


# --------------------------------------------------------------------------- the server's side


def run_server(rig, *args, timeout=20):
    return subprocess.run(rig.flavor.argv("server", *args), env=rig.env(), capture_output=True, timeout=timeout)


def test_a_missing_config_stops_the_server_with_its_path(make_rig):
    rig = make_rig()
    os.unlink(rig.config)
    result = run_server(rig)
    assert result.returncode == 1
    assert one_line(result) == "rvgahp_server: cannot read config %s: No such file or directory" % rig.config


def test_a_broken_config_line_stops_the_server_with_file_and_line(make_rig):
    rig = make_rig(config_extra="BATCH_GAHP /no/equals/sign\n")
    result = run_server(rig)
    assert result.returncode == 1
    where = config_line(rig, "BATCH_GAHP /no/equals/sign")
    assert one_line(result) == (
        "rvgahp_server: config %s:%d: expected NAME = value, found 'BATCH_GAHP /no/equals/sign'" % (rig.config, where)
    )


def test_a_missing_gahp_binary_is_refused_by_name_and_other_gahps_still_run(make_rig):
    rig = make_rig(config_extra="BATCH_GAHP = /nonexistent/blahpd\n")
    rig.start_server()
    result = rig.run_client("blahpd")
    assert result.returncode == 1
    assert one_line(result) == (
        "rvgahp_client: the rvgahp server refused blahpd: BATCH_GAHP /nonexistent/blahpd (from %s) does not exist" % rig.config
    )
    s = rig.session("condor_ft-gahp")
    assert s.banner().startswith("$GahpVersion")
    assert s.finish() == (0, harness.no_tunnel_warning("condor_ft-gahp"))


def test_a_gahp_that_is_not_executable_is_refused_by_name(make_rig):
    rig = make_rig()
    plain = os.path.join(rig.home, "blahpd")
    with open(plain, "w") as f:
        f.write("#!/bin/sh\n")
    os.chmod(plain, 0o644)
    with open(rig.config, "a") as f:
        f.write("BATCH_GAHP = %s\n" % plain)
    rig.start_server()
    line = one_line(rig.run_client("blahpd"))
    assert line.endswith("refused blahpd: BATCH_GAHP %s (from %s) is not executable" % (plain, rig.config))


def test_a_config_broken_while_running_refuses_sessions_until_fixed(make_rig):
    rig = make_rig()
    rig.start_server()
    with open(rig.config) as f:
        good = f.read()
    with open(rig.config, "a") as f:
        f.write("oops\n")
    line = one_line(rig.run_client("blahpd"))
    assert line.endswith("refused blahpd: config %s:%d: expected NAME = value, found 'oops'" % (rig.config, config_line(rig, "oops")))
    with open(rig.config, "w") as f:
        f.write(good + "# fixed\n")
    assert_still_serving(rig)
    assert rig.server.poll() is None


def test_a_failing_transport_is_logged_and_retried_while_the_server_lives(make_rig):
    rig = make_rig()
    rig.write_transport("echo 'alice@submit.example.org: Permission denied (publickey).' >&2\nexit 255\n")
    rig.start_server(wait=False)
    harness.wait_for(lambda: rig.log_text().count("link attempt failed") >= 2, 20, what="two failed attempts")
    log = rig.log_text()
    assert "transport: alice@submit.example.org: Permission denied (publickey)." in log
    assert "link attempt failed: the transport ended (exit 255); ssh failed: its messages are above" in log
    assert "next login attempt in" in log
    assert rig.server.poll() is None
    result = rig.run_client(argv=rig.flavor.argv("client", "--rvgahp-wait", "0.2", rig.sock, "blahpd"))
    assert "no rvgahp server is connected to %s" % rig.sock in one_line(result)


def test_a_transport_that_cannot_find_the_proxy_says_so(make_rig):
    rig = make_rig()
    rig.write_transport("exec %s\n" % " ".join(rig.sshd.ssh_argv("no_such_rvgahp_proxy /tmp/x.sock")))
    rig.start_server(wait=False)
    harness.wait_for(lambda: "a command was not found" in rig.log_text(), 20, what="the diagnosis")
    assert "link attempt failed: the transport ended (exit 127); a command was not found" in rig.log_text()
    assert rig.server.poll() is None


def test_a_proxy_socket_path_too_long_reaches_the_server_log(make_rig):
    rig = make_rig()
    long_path = "/tmp/" + "y" * 120
    rig.write_transport("exec %s\n" % " ".join(rig.sshd.ssh_argv(rig.flavor.command_line("proxy", long_path))))
    rig.start_server(wait=False)
    harness.wait_for(lambda: "AF_UNIX allows at most 107" in rig.log_text(), 20, what="the proxy's error in the server log")
    assert "socket path %s is 125 bytes" % long_path in rig.log_text()
    assert rig.server.poll() is None


def test_a_login_banner_before_the_proxy_starts_is_skipped(make_rig):
    rig = make_rig()
    remote = "echo Welcome to the submit host; echo 'Quota: 93%% used'; exec " + rig.flavor.command_line("proxy", rig.sock)
    rig.write_transport("exec %s\n" % " ".join(rig.sshd.ssh_argv("'%s'" % remote.replace("'", "'\\''"))))
    rig.start_server()
    assert "transport printed before the link started: Welcome to the submit host" in rig.log_text()
    assert_still_serving(rig)


# --------------------------------------------------------------------------- sockets


def test_a_live_socket_is_never_stolen(rig):
    before = os.stat(rig.sock).st_ino
    intruder = subprocess.run(
        rig.flavor.argv("proxy", "--no-log-file", rig.sock),
        stdin=subprocess.PIPE,
        capture_output=True,
        timeout=20,
    )
    # With nobody on its stdin it stands by, hears EOF, and leaves the socket alone.
    assert intruder.returncode == 0
    assert "%s is busy: another live rvgahp_proxy serves it; standing by" % rig.sock in intruder.stderr.decode()
    assert os.stat(rig.sock).st_ino == before
    assert_still_serving(rig)


def test_a_dead_socket_left_behind_is_replaced(make_rig):
    rig = make_rig()
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(rig.sock)
    dead.close()  # the file stays; connecting to it is refused
    assert os.path.exists(rig.sock)
    rig.start_server()
    assert_still_serving(rig)
    with open(rig.proxy_log) as f:
        assert "removed the dead socket %s" % rig.sock in f.read()


def test_the_client_waits_for_a_server_that_is_on_its_way(make_rig):
    """A client that arrives while the link is still coming up is served, not failed."""
    rig = make_rig()
    client = rig.session("blahpd", argv=rig.flavor.argv("client", "--rvgahp-wait", "30", rig.sock, "blahpd"))
    # It has found no socket and waits to try again: only then does the server start.
    harness.wait_for(lambda: harness.sleeping_between_retries(client.proc.pid), 30, what="the client to wait for a server")
    rig.start_server(wait=False)
    assert client.banner(timeout=30).startswith("$GahpVersion")
    assert client.finish() == (0, "")


def config_line(rig, text):
    """The line number of text in the rig's config, as the error should name it."""
    with open(rig.config) as f:
        return next(n for n, line in enumerate(f, 1) if line.strip() == text)

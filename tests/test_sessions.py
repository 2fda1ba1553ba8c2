"""End to end, for every interpreter: sessions through a real sshd to a real GAHP.

Each test is a situation a GridManager or an admin is in. The rig's server has
dialled out over ssh to 127.0.0.1 and its proxy owns the socket; every client here is
a real rvgahp_client process with pipes, as the GridManager starts it.
"""

import os
import subprocess
import sys
import threading
import time

import harness
import pytest

sys.path.insert(0, harness.REPO)

import rvgahp


def test_gridmanager_starts_blahpd_and_talks_the_gahp_protocol(rig):
    s = rig.session("blahpd")
    assert s.banner().startswith("$GahpVersion: ")
    assert s.command("COMMANDS").startswith("S COMMANDS ")
    assert s.command("ASYNC_MODE_ON") == "S"
    assert s.command("BLAH_PING") == "S"
    assert s.command("QUIT") == "S"
    status, err = s.finish()
    assert (status, err) == (0, "")


@pytest.mark.parametrize(
    "gahp, args",
    [("blahpd", ""), ("batch_gahp", ""), ("condor_ft-gahp", " -f")],
)
def test_each_gahp_name_runs_its_configured_program(rig, gahp, args):
    s = rig.session(gahp)
    assert s.banner().startswith("$GahpVersion")
    # testgahp is both BATCH_GAHP and FT_GAHP here; only the ft-gahp gets -f.
    assert s.command("ARGV") == "S %s/tests/testgahp.py%s" % (harness.REPO, args)
    assert s.finish() == (0, harness.no_tunnel_warning(gahp))


@pytest.mark.parametrize(
    "style",
    [
        ["alice@login.example.org", "--rvgahp-socket", "{sock}", "blahpd"],
        ["--rgahp-user", "alice", "--rgahp-key", "/k", "--rgahp-nokey", "--rgahp-pass", "/p", "--rgahp-nopass",
         "--rgahp-glite", "g", "--rgahp-script", "s", "--rgahp-nobatchmode", "--rgahp-nologin",
         "alice@login.example.org:2222", "--rvgahp-socket", "{sock}", "--", "batch_gahp"],
        ["{sock}", "condor_ft-gahp"],
    ],
    ids=["rvgahp-socket", "all-remote_gahp-options", "socket-first"],
)  # fmt: skip
def test_both_grid_resource_argv_styles_work(rig, style):
    argv = rig.flavor.argv("client", *[a.format(sock=rig.sock) for a in style])
    s = rig.session(argv=argv)
    assert s.banner().startswith("$GahpVersion")
    assert s.command("ECHO style") == "S style"
    assert s.finish() == (0, harness.no_tunnel_warning(style[-1]))


def test_gahp_gets_config_glite_home_clean_fds_and_default_signals(rig):
    s = rig.session("blahpd")
    s.banner()
    assert s.command("ENV CONDOR_CONFIG") == "S " + rig.config
    assert s.command("ENV GLITE_LOCATION") == "S %s/glite" % rig.home
    assert s.command("CWD") == "S " + rig.home
    assert s.command("FDS") == "S 0 1 2"
    # Nothing ignored (SIGPIPE back at default) and nothing blocked.
    assert s.command("SIGNALS") == "S SigIgn=0000000000000000 SigBlk=0000000000000000"
    assert s.finish() == (0, "")


def test_gahp_stderr_goes_to_a_log_never_into_the_protocol(rig):
    marker = "stderr-marker-%d" % os.getpid()
    s = rig.session("blahpd")
    s.banner()
    assert s.command("STDERR " + marker) == "S"
    assert s.command("ECHO after") == "S after"
    status, err = s.finish()
    assert status == 0 and marker not in err
    # Per host, as login nodes share $HOME: gahp_stderr.HOST.log.
    with open(os.path.join(rig.dot, "gahp_stderr.%s.log" % rvgahp.host_tag())) as f:
        assert marker in f.read()


def test_unknown_gahp_is_refused_with_a_reason_and_the_next_session_works(rig):
    result = rig.run_client("condor_c-gahp")
    assert result.returncode == 1
    assert result.stdout == b""
    lines = result.stderr.decode().splitlines()
    assert len(lines) == 1, lines
    assert "refused condor_c-gahp: unknown GAHP 'condor_c-gahp'" in lines[0]
    assert lines[0].startswith("rvgahp_client: ")
    s = rig.session("blahpd")
    assert s.banner().startswith("$GahpVersion")
    assert s.finish() == (0, "")


def test_client_with_no_server_behind_the_socket_fails_fast_with_one_line(rig):
    missing = os.path.join(rig.dir, "nobody.sock")
    result = rig.run_client(argv=rig.flavor.argv("client", "--rvgahp-wait", "0.5", missing, "blahpd"))
    assert result.returncode == 1
    assert result.stdout == b""
    assert result.stderr.decode() == (
        "rvgahp_client: no rvgahp server is connected to %s (waited 0.5 s); is rvgahp_server running on the cluster?\n" % missing
    )


def test_a_waiting_client_is_a_small_shell_not_an_interpreter(rig):
    """Once it has handed over its pipes, the client waits as /bin/sh: same pid, so the
    GridManager's SIGTERM still reaches it, at a fraction of the memory."""
    s = rig.session("blahpd")
    s.banner()
    assert s.command("ECHO waiting") == "S waiting"
    exe = os.path.realpath("/proc/%d/exe" % s.proc.pid)
    assert "python" not in os.path.basename(exe), exe
    assert os.path.basename(exe) in ("sh", "dash", "bash", "busybox"), exe
    assert s.finish() == (0, "")


def test_a_client_on_files_reports_the_gahp_exit_status_too(rig):
    """Not a pipe: the client pumps itself, waits in Python, and exits the same way."""
    cmds = os.path.join(rig.dir, "exit5.txt")
    with open(cmds, "wb") as f:
        f.write(b"EXIT 5\r\n")
    with open(cmds, "rb") as stdin, open(os.devnull, "wb") as stdout:
        result = subprocess.run(rig.client_argv("blahpd"), stdin=stdin, stdout=stdout, stderr=subprocess.PIPE, timeout=30)
    assert (result.returncode, result.stderr) == (5, b"")


def test_the_gahp_exit_status_reaches_the_gridmanager(rig):
    s = rig.session("blahpd")
    s.banner()
    s.send("EXIT 7")
    assert s.read_to_eof() == b""
    assert s.finish() == (7, "")


def test_fifty_sessions_start_at_once_and_all_work(rig):
    sessions = [rig.session("blahpd") for _ in range(50)]
    try:
        for s in sessions:
            assert s.banner(timeout=60).startswith("$GahpVersion")
        for i, s in enumerate(sessions):
            s.send("ECHO %d" % i)
        for i, s in enumerate(sessions):
            assert s.readline(timeout=30) == "S %d" % i
        assert [s.finish(timeout=30) for s in sessions] == [(0, "")] * 50
    finally:
        for s in sessions:
            s.close()


def pipe_size(path):
    """The buffer size of the pipe at path (a /proc/PID/fd/N), read by a reader that never reads."""
    import fcntl

    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        return fcntl.fcntl(fd, 1032)  # F_GETPIPE_SZ, named by fcntl from 3.10 on
    finally:
        os.close(fd)


def link_pipes(parent, child):
    """/proc paths, in child, of the pipes that parent and child share, but child's stderr:
    the link's two, for the server and its ssh, or for the proxy's sshd and the proxy."""

    def pipes(pid):
        base = "/proc/%d/fd/" % pid
        return {os.readlink(base + name): base + name for name in os.listdir(base) if os.readlink(base + name).startswith("pipe:")}

    shared = pipes(child)
    del shared[os.readlink("/proc/%d/fd/2" % child)]
    return [path for inode, path in shared.items() if inode in pipes(parent)]


def test_the_link_runs_over_wide_pipes_at_both_ends(rig):
    """Each read of the link takes more from a wide pipe, so a MB costs fewer wake-ups."""
    for parent, child in ((rig.server.pid, rig.transport_pid()), (rig.sshd_session_pid(), rig.proxy_pid())):
        assert sorted(pipe_size(path) for path in link_pipes(parent, child)) == [rvgahp.PIPE_SIZE] * 2


def test_the_first_sessions_get_wide_pipes_and_the_rest_keep_the_users_pipe_budget(make_rig):
    """The kernel charges wide pipes to the user's pipe budget and, once a user is over
    it, gives each new pipe of theirs one page: so only the first few sessions get them,
    at both ends: the GAHP's pipes on the server, the GridManager's on the proxy."""
    import fcntl

    share = rvgahp.wide_pipe_sessions()
    if not share:
        pytest.skip("this kernel has no per-user pipe budget to read")
    rig = make_rig()  # its own: no other test's sessions still winding down
    rig.start_server()
    sessions = [rig.session("blahpd")]
    try:
        assert sessions[0].banner(timeout=60).startswith("$GahpVersion")  # alone: it must get wide pipes
        sessions += [rig.session("blahpd") for _ in range(share + 1)]  # they arrive in any order
        gahp_sides, gridmanager_sides = [], []
        for s in sessions[1:]:
            assert s.banner(timeout=60).startswith("$GahpVersion")
        for s in sessions:
            reply = s.command("PIPE_SIZES").split()
            gahp_sides.append((int(reply[1]), int(reply[2])))
            gridmanager_sides.append(tuple(fcntl.fcntl(f.fileno(), 1032) for f in (s.proc.stdin, s.proc.stdout)))
        wide = (rvgahp.PIPE_SIZE, rvgahp.PIPE_SIZE)
        for sizes in (gahp_sides, gridmanager_sides):
            assert sizes[0] == wide
            assert sizes.count(wide) <= share  # on the server, spares count too
            assert len([size for size in sizes if rvgahp.PIPE_SIZE not in size]) >= 2
        assert [s.finish() for s in sessions] == [(0, "")] * len(sessions)
    finally:
        for s in sessions:
            s.close()


def test_a_flooding_gahp_with_a_slow_reader_does_not_stall_another_session(rig):
    size = 40 * 1000 * 1000
    flood = rig.session("blahpd")
    flood.banner()
    flood.send("FLOOD %d" % size)
    assert flood.readline() == "S"
    # Nobody reads the flood now. Another session must still answer promptly.
    other = rig.session("blahpd")
    other.banner()
    for i in range(20):
        assert other.command("ECHO %d" % i, timeout=10) == "S %d" % i
    # The stalled stream is held back by flow control, not buffered without bound.
    server_rss = harness.rss_kb(rig.server.pid)
    assert server_rss < 60 * 1024, "server RSS %d kB while a reader stalls" % server_rss
    assert other.finish() == (0, "")
    data = flood.read_exactly(size, timeout=120)
    assert len(data) == size and data.count(b"\n") == size // 1024 and set(data) == {ord("x"), ord("\n")}
    assert flood.finish() == (0, "")


def test_the_gridmanager_closing_stdin_still_gets_all_output(rig):
    """Half-close, client side: stdin EOF travels, output keeps flowing to the end."""
    s = rig.session("blahpd")
    s.banner()
    s.send("FLOOD 1000000")
    s.close_stdin()
    assert s.readline() == "S"
    assert len(s.read_to_eof(timeout=60)) == 1000000
    assert s.finish() == (0, "")


def test_a_gahp_closing_stdout_can_still_be_sent_input(rig):
    """Half-close, GAHP side: stdout EOF travels, input keeps flowing to the GAHP."""
    open(rig.sink, "w").close()
    s = rig.session("blahpd")
    s.banner()
    s.send("CLOSE_STDOUT")
    assert s.readline() == "S"
    assert s.read_to_eof() == b""
    s.send("after-one")
    s.send("after-two")
    s.close_stdin()
    assert s.wait() == 0
    with open(rig.sink) as f:
        assert f.read().splitlines() == ["after-one", "after-two"]


def test_stdin_and_stdout_that_are_files_work_too(rig):
    """An admin trying it by hand: commands from a file, replies to a file."""
    cmds = os.path.join(rig.dir, "cmds.txt")
    out = os.path.join(rig.dir, "out.txt")
    with open(cmds, "wb") as f:
        f.write(b"ECHO from-a-file\r\nQUIT\r\n")
    with open(cmds, "rb") as stdin, open(out, "wb") as stdout:
        status = subprocess.call(rig.client_argv("blahpd"), stdin=stdin, stdout=stdout, timeout=30)
    assert status == 0
    with open(out, "rb") as f:
        lines = f.read().decode().splitlines()
    assert lines[0].startswith("$GahpVersion") and lines[1:] == ["S from-a-file", "S"]


def test_a_killed_client_ends_its_gahp_and_the_gahp_is_reaped(rig):
    s = rig.session("blahpd")
    s.banner()
    gahp_pid = int(s.command("PID")[2:])
    assert harness.process_state(gahp_pid) not in (None, "Z")
    s.proc.kill()
    s.proc.wait()
    harness.wait_for(lambda: harness.process_state(gahp_pid) is None, 15, what="GAHP %d to be reaped" % gahp_pid)
    s.close()
    fresh = rig.session("blahpd")
    assert fresh.banner().startswith("$GahpVersion")
    assert fresh.finish() == (0, "")


def test_sessions_in_parallel_threads_keep_their_streams_apart(rig):
    """Many sessions exchanging at the same time never see each other's bytes."""
    errors = []

    def worker(n):
        try:
            s = rig.session("blahpd")
            s.banner()
            for i in range(30):
                word = "w%d-%d" % (n, i)
                if s.command("ECHO " + word) != "S " + word:
                    errors.append((n, i))
            s.finish()
        except Exception as e:
            errors.append((n, repr(e)))

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == []


def test_an_admin_can_ask_for_the_state_of_the_link(rig):
    s = rig.session("blahpd")
    s.banner()
    result = subprocess.run(rig.flavor.argv("client", "--status", rig.sock), capture_output=True, timeout=30)
    assert result.returncode == 0, result.stderr
    head, sessions = result.stdout.decode().splitlines()[:6], result.stdout.decode().splitlines()[6:]
    lines = dict(line.split(":", 1) for line in head)
    assert set(lines) == {"socket", "proxy", "link", "server", "ping", "sessions"}
    assert lines["socket"].strip() == rig.sock
    assert lines["link"].strip().startswith("up since ")
    assert ", last heard " in lines["link"]
    assert lines["link"].endswith("; features: tunnel, tunnel_pool, wide_tunnel")  # both ends are this rvgahp
    assert "pid %d on " % rig.server.pid in lines["server"]
    assert lines["sessions"].strip().startswith("1 open, ")
    assert len(sessions) == 1 and " blahpd " in sessions[0] and " to the GAHP, " in sessions[0]
    assert s.finish() == (0, "")


def test_status_of_a_socket_nobody_serves_says_so(rig):
    missing = os.path.join(rig.dir, "nobody.sock")
    result = subprocess.run(rig.flavor.argv("client", "--status", missing), capture_output=True, timeout=30)
    assert result.returncode == 1
    assert result.stderr.decode().startswith("rvgahp_client: no rvgahp proxy is serving %s (No such file or directory)" % missing)


def test_a_gahp_that_exits_while_its_reader_is_slow_loses_no_output(rig):
    """Its last output waits behind flow control; the session must not end without it."""
    # More than the channel's window, so the server stops reading, and little enough
    # more that the GAHP's pipe takes the rest and the GAHP can exit.
    size = rvgahp.CHANNEL_WINDOW + 16 * 1024
    s = rig.session("blahpd")
    s.banner()
    gahp = int(s.command("PID")[2:])
    s.send("FLOOD %d" % size)
    s.send("EXIT 0")
    # The GAHP is gone and reaped (the server's event), and the server's wait for a dead
    # GAHP's stdout, which starts at that event, has passed: only then does it matter.
    harness.wait_for(lambda: harness.process_state(gahp) is None, 30, what="the GAHP to exit and be reaped")
    reaped = time.monotonic()
    harness.wait_for(lambda: time.monotonic() > reaped + rvgahp.EXIT_LINGER + 0.5, 30, what="the server's linger to pass")
    assert s.readline() == "S"
    assert len(s.read_exactly(size, timeout=60)) == size
    assert s.read_to_eof() == b""
    assert s.finish() == (0, "")

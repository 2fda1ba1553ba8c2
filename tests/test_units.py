"""The pieces that need no processes: config, framing, argv, back-off, role names."""

import os
import random
import socket
import struct
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import rvgahp


def config(text, environ=None):
    return rvgahp.Config("/x/condor_config.rvgahp", text, environ or {})


# --------------------------------------------------------------------------- config


def test_config_names_are_case_insensitive_and_values_trimmed():
    c = config("Batch_Gahp =   /opt/blahp/bin/blahpd  \n")
    assert c.get("BATCH_GAHP") == "/opt/blahp/bin/blahpd"
    assert c.get("batch_gahp") == "/opt/blahp/bin/blahpd"
    assert c.get("FT_GAHP") is None
    assert c.get("FT_GAHP", "dflt") == "dflt"


def test_config_comments_blank_lines_and_the_last_definition_wins():
    c = config("# a comment\n\n   # indented comment\nA = 1\nA = 2\nB = x # not a comment\n")
    assert c.get("A") == "2"
    assert c.get("B") == "x # not a comment"


def test_config_continuation_joins_lines_and_trims_the_next_ones_indent():
    c = config("A = one \\\n     two \\\n\tthree\nB = after\n")
    assert c.get("A") == "one two three"
    assert c.get("B") == "after"


def test_config_macros_defaults_and_environment():
    c = config(
        "ROOT = /opt/rv\n"
        "BATCH_GAHP = $(ROOT)/bin/blahpd\n"
        "UNDEF = [$(NOPE)]\n"
        "DEF = $(NOPE:fallback)\n"
        "EMPTY =\n"
        "EMPTYDEF = $(EMPTY:used-when-empty)\n"
        "NESTED = $(NOPE:$(ROOT)/x)\n"
        "HOMEDIR = $ENV(HOME)\n"
        "ENVDEF = $ENV(NOT_SET:/tmp)\n"
        "DOLLAR = cost $5\n",
        environ={"HOME": "/home/alice"},
    )
    assert c.get("BATCH_GAHP") == "/opt/rv/bin/blahpd"
    assert c.get("UNDEF") == "[]"
    assert c.get("DEF") == "fallback"
    assert c.get("EMPTYDEF") == "used-when-empty"
    assert c.get("NESTED") == "/opt/rv/x"
    assert c.get("HOMEDIR") == "/home/alice"
    assert c.get("ENVDEF") == "/tmp"
    assert c.get("DOLLAR") == "cost $5"


def test_a_value_that_uses_htcondors_built_in_names_is_not_taken_as_known():
    """What only HTCondor knows ($(LOCK), or a default after a name it defines) is not ours
    to act on: the server makes DAEMON_SOCKET_DIR only when this file says it all."""
    c = config(
        "LOG = $ENV(HOME)/.rvgahp\n"
        "MINE = $(LOG)/daemon_sock\n"
        "THROUGH = $(MINE)\n"
        "BUILT_IN = $(LOCK)/daemon_sock\n"
        "DEFAULTED = $(RUN:/tmp)/daemon_sock\n",
        environ={"HOME": "/home/alice"},
    )
    assert c.get_all_here("MINE") == c.get_all_here("THROUGH") == "/home/alice/.rvgahp/daemon_sock"
    assert c.get("BUILT_IN") == "/daemon_sock" and c.get_all_here("BUILT_IN") is None
    assert c.get("DEFAULTED") == "/tmp/daemon_sock" and c.get_all_here("DEFAULTED") is None
    assert c.get_all_here("NOT_THERE") is None


def test_config_expansion_is_lazy_and_self_reference_means_the_earlier_one():
    c = config("GAHP = $(BASE)/blahpd\nBASE = /first\nPATHS = /a\nPATHS = $(PATHS):/b\nBASE = /last\n")
    assert c.get("GAHP") == "/last/blahpd"  # lazy: BASE's last definition
    assert c.get("PATHS") == "/a:/b"


def test_config_macro_loops_are_reported_with_the_chain():
    c = config("A = $(B)\nB = $(C)\nC = $(A)\n")
    with pytest.raises(rvgahp.ConfigError) as e:
        c.get("A")
    assert "macro loop: A -> B -> C -> A" in str(e.value)
    assert "/x/condor_config.rvgahp:" in str(e.value)


def line_of(text, needle):
    """The 1-based number of the line of text that holds needle."""
    return next(i for i, line in enumerate(text.splitlines(), 1) if needle in line)


def test_config_errors_name_the_file_and_line():
    text = "A = 1\n\nthis is not a setting\n"
    with pytest.raises(rvgahp.ConfigError) as e:
        config(text)
    assert str(e.value) == "config /x/condor_config.rvgahp:%d: expected NAME = value, found 'this is not a setting'" % line_of(
        text, "this is not"
    )
    text = "A = 1\nB = $(A\n"
    with pytest.raises(rvgahp.ConfigError) as e:
        config(text).get("B")
    assert str(e.value).startswith("config /x/condor_config.rvgahp:%d: unterminated '$(A'" % line_of(text, "B = "))


def test_config_numbers_are_checked():
    text = "RVGAHP_PING_INTERVAL = 5\nRVGAHP_PING_TIMEOUT = soon\n"
    c = config(text)
    assert c.number("RVGAHP_PING_INTERVAL", 15.0) == 5.0
    assert c.number("RVGAHP_BACKOFF_MAX", 300.0) == 300.0
    with pytest.raises(rvgahp.ConfigError) as e:
        c.number("RVGAHP_PING_TIMEOUT", 45.0)
    where = line_of(text, "RVGAHP_PING_TIMEOUT")
    assert "config /x/condor_config.rvgahp:%d: RVGAHP_PING_TIMEOUT must be a number" % where in str(e.value)


def test_a_missing_config_file_is_one_clear_error(tmp_path):
    with pytest.raises(rvgahp.ConfigError) as e:
        rvgahp.Config.load(str(tmp_path / "nope"))
    assert str(e.value) == "cannot read config %s: No such file or directory" % (tmp_path / "nope")


# --------------------------------------------------------------------------- framing


def test_frames_survive_any_split_of_the_byte_stream():
    frames = [(rvgahp.DATA, 7, b"hello"), (rvgahp.EOF, 7, b""), (rvgahp.WINDOW, 9, struct.pack("!I", 65536))]
    stream = b"".join(rvgahp.frame(*f) for f in frames)
    for cut in range(len(stream) + 1):
        reader = rvgahp.FrameReader()
        got = reader.feed(stream[:cut]) + reader.feed(stream[cut:])
        assert got == frames
        assert reader.pending() == 0


def test_large_payloads_arrive_whole_however_the_reads_cut_them():
    """A bulk stream: big DATA frames (passed on as views, not copies) among small
    frames, fed in reads cut at random places. Every payload arrives intact, in order."""
    import random

    seed = 20261123
    print("seed", seed)
    rng = random.Random(seed)
    frames = []
    for i in range(60):
        size = rng.choice((0, 1, 100, rvgahp.FrameReader.VIEW_AT, rvgahp.READ_SIZE))
        frames.append((rvgahp.DATA, i % 5 + 1, rng.getrandbits(8 * size).to_bytes(size, "big") if size else b""))
        if i % 7 == 0:
            frames.append((rvgahp.WINDOW, 3, struct.pack("!I", i)))
    stream = b"".join(rvgahp.frame(*f) for f in frames)
    reader = rvgahp.FrameReader()
    got, at = [], 0
    while at < len(stream):
        step = rng.randint(1, 3 * rvgahp.READ_SIZE)
        got.extend(reader.feed(stream[at : at + step]))
        at += step
    assert [(k, c, bytes(p)) for k, c, p in got] == frames
    assert reader.pending() == 0


def test_the_link_passes_on_the_parts_of_a_cut_data_frame_at_once():
    """With stream_data (the link's reader), a DATA frame cut by a read goes on in parts,
    each as soon as it arrives; joined per channel, the bytes are exactly those sent, and
    every other frame still arrives whole and in its place."""
    import random

    seed = 20261124
    print("seed", seed)
    rng = random.Random(seed)
    frames = []
    for i in range(80):
        size = rng.choice((0, 1, 9, 100, rvgahp.FrameReader.VIEW_AT, rvgahp.READ_SIZE, rvgahp.MAX_PAYLOAD))
        frames.append((rvgahp.DATA, i % 3 + 1, rng.getrandbits(8 * size).to_bytes(size, "big") if size else b""))
        if i % 5 == 0:
            frames.append((rvgahp.WINDOW, i % 3 + 1, struct.pack("!I", i)))
            frames.append((rvgahp.EOF, 9, b""))
    stream = b"".join(rvgahp.frame(*f) for f in frames)
    reader = rvgahp.FrameReader(stream_data=True)
    got, at, parts = [], 0, 0
    while at < len(stream):
        step = rng.choice((1, 5, 9, 13, rng.randint(1, 3 * rvgahp.READ_SIZE)))
        for kind, channel, payload in reader.feed(stream[at : at + step]):
            parts += 1
            # Consecutive DATA frames here are on different channels, so DATA for the
            # channel just seen is a later part of the same frame.
            if kind == rvgahp.DATA and got and got[-1][:2] == [rvgahp.DATA, channel]:
                got[-1][2].extend(payload)
            else:
                got.append([kind, channel, bytearray(payload)])
        at += step
    assert [(k, c, bytes(p)) for k, c, p in got] == frames
    assert parts > len(frames), "no frame was cut: the test proves nothing"
    assert reader.pending() == 0 and reader.data_left == 0


def test_an_oversized_frame_is_a_protocol_error_not_an_allocation():
    reader = rvgahp.FrameReader()
    with pytest.raises(rvgahp.ProtocolError):
        reader.feed(rvgahp.HEADER.pack(rvgahp.DATA, 1, rvgahp.MAX_PAYLOAD + 1))


def test_fields_round_trip_and_bad_ones_are_rejected():
    fields = {"gahp": "blahpd", "reason": "x = y; z", "pid": "12"}
    assert rvgahp.decode_fields(rvgahp.encode_fields(fields)) == fields
    with pytest.raises(rvgahp.ProtocolError):
        rvgahp.decode_fields(b"no equals sign\n")
    with pytest.raises(rvgahp.ProtocolError):
        rvgahp.decode_fields(b"\xff\xfe=1\n")
    with pytest.raises(rvgahp.ProtocolError):
        rvgahp.decode_fields(b"gahp=" + b"x" * rvgahp.MAX_FIELDS)
    with pytest.raises(ValueError):
        rvgahp.encode_fields({"reason": "two\nlines"})


# --------------------------------------------------------------------------- client argv


@pytest.mark.parametrize(
    "argv, sock, gahp",
    [
        (["/tmp/u.sock", "blahpd"], "/tmp/u.sock", "blahpd"),
        (["alice@login", "--rvgahp-socket", "/tmp/a.sock", "blahpd"], "/tmp/a.sock", "blahpd"),
        (["--rvgahp-socket=/tmp/a.sock", "alice@login", "batch_gahp"], "/tmp/a.sock", "batch_gahp"),
        (
            ["--rgahp-user", "u", "--rgahp-key", "k", "--rgahp-nokey", "--rgahp-pass", "p", "--rgahp-nopass", "--rgahp-glite", "g",
             "--rgahp-script", "s", "--rgahp-nobatchmode", "--rgahp-nologin", "u@h:22", "--rvgahp-socket", "/s", "--", "condor_ft-gahp"],
            "/s",
            "condor_ft-gahp",
        ),
    ],
)  # fmt: skip
def test_client_argv_in_both_gridmanager_styles(argv, sock, gahp):
    assert rvgahp.parse_client_args(argv)[:2] == (sock, gahp)


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "no GAHP named"),
        (["blahpd"], "no socket path"),
        (["alice@login", "blahpd"], "'alice@login' looks like a host, not a socket path; add --rvgahp-socket"),
        (["--frobnicate", "/s", "blahpd"], "unknown option --frobnicate"),
        (["/s", "--rvgahp-socket"], "the last argument must be the GAHP name, not --rvgahp-socket"),
        (["--rvgahp-wait", "soon", "/s", "blahpd"], "the wait must be 0 to 3600 seconds, not 'soon'"),
    ],
)
def test_client_argv_mistakes_get_one_clear_message(argv, message):
    with pytest.raises(rvgahp.UsageError) as e:
        rvgahp.parse_client_args(argv)
    assert message in str(e.value)


# --------------------------------------------------------------------------- back-off


def test_backoff_is_immediate_after_a_link_that_held(monkeypatch):
    b = rvgahp.Backoff(cap=300)
    assert b.next_delay(started=0.0, held_for=rvgahp.LINK_STABLE + 1, now=100.0) == 0.0


def test_one_early_drop_reconnects_at_once_but_a_flapping_link_backs_off():
    b = rvgahp.Backoff(cap=300)
    assert b.next_delay(started=0.0, held_for=3.0, now=100.0) == 0.0
    assert 0.75 <= b.next_delay(started=100.0, held_for=3.0, now=200.0) <= 1.25
    assert 1.5 <= b.next_delay(started=200.0, held_for=3.0, now=300.0) <= 2.5


def test_backoff_grows_with_jitter_and_is_capped():
    b = rvgahp.Backoff(cap=20)
    now = 0.0
    delays = []
    for _ in range(8):
        d = b.next_delay(started=now, held_for=None, now=now)
        delays.append(d)
        now += max(d, 61.0)  # far apart, so the per-minute cap does not interfere
    assert 0.75 <= delays[0] <= 1.25
    assert 1.5 <= delays[1] <= 2.5
    assert 3.0 <= delays[2] <= 5.0
    assert all(d <= 20 * 1.25 for d in delays)
    assert delays[-1] >= 20 * 0.75
    assert b.next_delay(started=now, held_for=rvgahp.LINK_STABLE, now=now) == 0.0
    assert b.failures == 0


def test_backoff_never_allows_more_than_a_handful_of_logins_a_minute():
    b = rvgahp.Backoff(cap=0)  # even with no back-off at all
    now = 0.0
    starts = []
    for _ in range(30):
        starts.append(now)
        now += b.next_delay(started=now, held_for=None, now=now) + 0.01
    for t in starts:
        in_window = [s for s in starts if t <= s < t + 60]
        assert len(in_window) <= rvgahp.MAX_LOGINS_PER_MINUTE


def test_an_outage_of_any_length_is_retried_every_few_seconds_and_costs_no_logins():
    """Attempts that never reached sshd (refused, unreachable, no DNS) are the network,
    not a login: they neither grow the back-off nor count against the login limit."""
    b = rvgahp.Backoff(cap=300)
    now = 0.0
    for _ in range(200):  # 200 failed attempts: about ten minutes of outage
        delay = b.next_delay(started=now, held_for=None, now=now, reached=False)
        assert rvgahp.UNREACHED_RETRY * 0.75 <= delay <= rvgahp.UNREACHED_RETRY * 1.25
        now += delay
    assert b.failures == 0 and b.logins == []
    # The network is back and the next attempt is a real login: it is not held back.
    assert b.next_delay(started=now, held_for=rvgahp.LINK_STABLE, now=now + 60) == 0.0


# --------------------------------------------------------------------------- roles


@pytest.mark.parametrize(
    "program, role",
    [
        ("/home/u/bin/rvgahp_client", "client"),
        ("rvgahp_server", "server"),
        ("/x/rvgahp_proxy.py", "proxy"),
        ("/x/rvgahp.pyz", None),
        ("rvgahp_other", None),
    ],
)
def test_the_role_comes_from_the_program_name(program, role):
    assert rvgahp.role_of(program) == role


def test_subcommands_version_and_help(capsys):
    assert rvgahp.main(["rvgahp.pyz", "--version"]) == 0
    assert capsys.readouterr().out == "rvgahp %s\n" % rvgahp.VERSION
    assert rvgahp.main(["rvgahp.pyz", "--help"]) == 0
    assert "rvgahp.pyz client SOCKPATH GAHP_NAME" in capsys.readouterr().out
    assert rvgahp.main(["rvgahp.pyz", "client", "--version"]) == 0
    assert capsys.readouterr().out == "rvgahp_client %s\n" % rvgahp.VERSION
    assert rvgahp.main(["rvgahp.pyz"]) == 2
    with pytest.raises(SystemExit) as e:
        rvgahp.main(["/bin/rvgahp_server", "--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out == "rvgahp_server %s\n" % rvgahp.VERSION


# --------------------------------------------------------------------------- defences found in review


def run_wait_script(shell, line):
    """Run the client's waiting shell script with `line` arriving on its socket (fd 3);
    returns (exit status, stderr)."""
    import subprocess

    r, w = os.pipe()
    os.write(w, line)
    os.close(w)
    err_r, err_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.dup2(r, 3)
            os.dup2(err_w, 2)
            os.execv(shell, [shell, "-c", rvgahp.WAIT_SCRIPT, "rvgahp_client", "blahpd", "/tmp/x.sock"])
        finally:
            os._exit(99)
    os.close(r)
    os.close(err_w)
    with os.fdopen(err_r, "rb") as f:
        err = f.read()
    _, status = os.waitpid(pid, 0)
    return subprocess.CompletedProcess(
        [shell], os.waitstatus_to_exitcode(status) if hasattr(os, "waitstatus_to_exitcode") else status >> 8, b"", err
    )


@pytest.mark.parametrize("shell", [s for s in ("/bin/sh", "/bin/bash", "/bin/dash") if os.access(s, os.X_OK)])
def test_the_waiting_shell_does_only_arithmetic_on_plain_numbers(shell, tmp_path):
    assert run_wait_script(shell, b"exit 7\n").returncode == 7
    result = run_wait_script(shell, b"signal 9\n")
    assert result.returncode == 137
    assert result.stderr == b"rvgahp_client: blahpd was killed by signal 9 on the cluster\n"
    result = run_wait_script(shell, b"error the link went down (x)\n")
    assert (result.returncode, result.stderr) == (1, b"rvgahp_client: blahpd session ended: the link went down (x)\n")
    assert run_wait_script(shell, b"").stderr.startswith(b"rvgahp_client: lost the rvgahp proxy on /tmp/x.sock")
    # A hostile far end must not get a command run on the submit host.
    marker = tmp_path / "pwned"
    for hostile in (b"signal a[$(touch %s)]\n", b"exit $(touch %s)\n", b"signal 1+a[$(touch %s)]\n"):
        result = run_wait_script(shell, hostile % str(marker).encode())
        assert result.returncode == 1 and not marker.exists(), (hostile, result)


def test_exit_lines_carry_only_small_numbers():
    assert rvgahp.exit_line({"exit": "0"}) == "exit 0\n"
    assert rvgahp.exit_line({"signal": "9"}) == "signal 9\n"
    assert rvgahp.exit_line({"error": "two\nlines"}) == "error two lines\n"
    for bad in ("a[$(id)]", "256", "-1", "²", ""):
        assert rvgahp.exit_line({"signal": bad}).startswith("error the server sent a bad signal status")
    assert rvgahp.exit_line({}) == "error the session ended without a status\n"


def test_the_loop_never_calls_back_for_an_fd_closed_earlier_in_the_same_batch():
    log = rvgahp.Log("test")
    loop = rvgahp.Loop(log)
    first_r, first_w = os.pipe()
    second_r, second_w = os.pipe()
    os.write(first_w, b"x")
    os.write(second_w, b"y")  # both readable: one select() returns both
    calls = []
    fresh = []

    def first():
        calls.append("first")
        other = first_r if calls == ["second"] else second_r  # whoever runs first closes the other
        loop.forget(other)
        os.close(other)
        fresh.extend(os.pipe())  # likely reuses the closed number
        os.write(fresh[-1], b"new owner's data")
        loop.stop()

    def second():
        calls.append("second")
        first_or_second = first_r if not calls[:-1] else second_r
        loop.forget(first_or_second)
        os.close(first_or_second)
        fresh.extend(os.pipe())
        os.write(fresh[-1], b"new owner's data")
        loop.stop()

    loop.on_readable(first_r, first)
    loop.on_readable(second_r, second)
    loop.run()
    assert len(calls) == 1, calls
    for fd in [first_w, second_w, *fresh] + [fd for fd in (first_r, second_r) if fd not in fresh]:
        try:
            os.close(fd)
        except OSError:
            pass


@pytest.mark.parametrize("poller", ["epoll", "selectors"])
def test_the_loop_runs_fds_timers_and_a_callback_that_raises_with_either_poller(monkeypatch, poller):
    """Where select has no epoll, the loop falls back to selectors: same callbacks, same
    timeouts (-1 waits for ever), and a raising callback ends only its owner."""
    import select

    if poller == "selectors":
        monkeypatch.delattr(select, "epoll", raising=False)
    log = rvgahp.Log("test")
    log.fd = os.open(os.devnull, os.O_WRONLY)
    loop = rvgahp.Loop(log)
    assert hasattr(loop.poller, "epoll") == (poller == "epoll")
    r, w = os.pipe()
    events = []

    class Owner:
        def readable(self):
            events.append(os.read(r, 10))
            loop.on_readable(r, None)
            raise RuntimeError("a bug in one owner")

        def fail(self, reason):
            events.append(reason)
            loop.call_later(0.01, lambda: (events.append("timer"), loop.stop()))

    loop.on_readable(r, Owner().readable)
    os.write(w, b"ping")
    loop.run()
    assert events == [b"ping", "internal error: a bug in one owner", "timer"]
    for fd in (r, w, log.fd):
        os.close(fd)


def test_work_put_off_with_soon_runs_after_the_next_polls_events():
    """The server hands out a spare GAHP and forks its replacement with soon(): the
    spare's banner, readable by the next poll, must go out before that fork."""
    log = rvgahp.Log("test")
    loop = rvgahp.Loop(log)
    first_r, first_w = os.pipe()
    second_r, second_w = os.pipe()
    order = []

    def first():
        os.read(first_r, 10)
        order.append("first")
        loop.on_readable(first_r, None)
        loop.soon(lambda: (order.append("put off"), loop.stop()))
        os.write(second_w, b"banner")  # readable only from the next poll on

    def second():
        os.read(second_r, 10)
        order.append("second")
        loop.on_readable(second_r, None)

    loop.on_readable(first_r, first)
    loop.on_readable(second_r, second)
    os.write(first_w, b"x")
    loop.run()
    assert order == ["first", "second", "put off"]
    for fd in (first_r, first_w, second_r, second_w):
        os.close(fd)


def test_an_outbox_whose_reader_vanishes_still_reports_drained():
    log = rvgahp.Log("test")
    loop = rvgahp.Loop(log)
    r, w = os.pipe()
    os.set_blocking(w, False)
    events = []
    box = rvgahp.Outbox(loop, w, on_gone=lambda: (events.append("gone"), box.detach()))
    box.write(b"x" * (1 << 20))  # more than the pipe holds: some stays queued
    assert box.queue
    box.when_drained(lambda: events.append("drained"))
    os.close(r)
    box._flush()
    assert events == ["gone", "drained"]
    os.close(w)


def drain(fd):
    """Everything a non-blocking pipe holds now."""
    data = bytearray()
    while True:
        try:
            chunk = os.read(fd, 1 << 20)
        except BlockingIOError:
            return data
        if not chunk:
            return data
        data += chunk


def test_an_outbox_that_writes_in_part_delivers_every_byte_in_order():
    """A full pipe takes part of a write, both when it is written and when the queue is
    flushed; what is kept of a chunk is a view into it, so this checks the views' offsets."""
    seed = 20261123
    print("seed", seed)
    rng = random.Random(seed)
    log = rvgahp.Log("test")
    loop = rvgahp.Loop(log)
    r, w = os.pipe()
    os.set_blocking(w, False)
    os.set_blocking(r, False)
    box = rvgahp.Outbox(loop, w)
    sent = bytearray()
    received = bytearray()
    for i in range(300):
        size = rng.choice([1, 9, 4096, 65537, 150000])
        chunk = bytes([i % 251]) * size + os.urandom(8)
        parts = (chunk[:9], memoryview(chunk)[9:]) if rng.random() < 0.5 else (chunk,)
        box.write(*parts)
        sent += chunk
        while box.queue and rng.random() < 0.7:  # the reader takes an odd amount, the queue moves on
            try:
                received += os.read(r, rng.choice([1, 777, 30000, 200000]))
            except BlockingIOError:
                pass
            box._flush()
    for _ in range(len(sent) // 4096 + 10):  # each turn frees the pipe, so each flush moves bytes
        received += drain(r)
        if not box.queue:
            break
        box._flush()
    received += drain(r)
    assert box.size == 0 and box.written_total == box.queued_total == len(sent)
    assert bytes(received) == bytes(sent)
    box.detach()
    os.close(r)
    os.close(w)


@pytest.mark.parametrize(
    "peer_features, window",
    [("tunnel", rvgahp.CHANNEL_WINDOW), ("tunnel,wide_tunnel", rvgahp.TUNNEL_WINDOW)],
)
def test_a_tunnel_connection_uses_the_wide_window_only_when_the_peer_knows_it(peer_features, window):
    """Both ends must agree: a receiver takes more than its window for a protocol error.
    So a tunnel connection's credit, and what it accepts unacknowledged, follow the
    peer's features; an older peer gets the window it knows."""
    log = rvgahp.Log("test")
    loop = rvgahp.Loop(log)
    link_r, link_w = os.pipe()
    link = rvgahp.Link(loop, log, link_r, link_w, events=None)
    link.features = frozenset(peer_features.split(","))
    ours, theirs = socket.socketpair()
    for sock, option in ((ours, socket.SO_SNDBUF), (theirs, socket.SO_RCVBUF)):
        sock.setsockopt(socket.SOL_SOCKET, option, 4096)  # the sink takes next to nothing
    os.set_blocking(link_w, False)
    conn = rvgahp.TunnelConn(link, rvgahp.TUNNEL_CHANNEL | 7, ours, None, {})
    conn.begin_relay()
    assert conn.credit == window
    piece = b"x" * (64 * 1024)
    for _ in range(window // len(piece)):  # a whole window, as a peer with its credit may send
        conn.on_frame(rvgahp.DATA, piece)
    assert conn.sink.size > window - 64 * 1024  # nearly all of it waits: no credit went back
    with pytest.raises(rvgahp.ProtocolError):
        conn.on_frame(rvgahp.DATA, b"x")
    conn.sink.detach()
    ours.close()
    theirs.close()
    for fd in (link_r, link_w):
        os.close(fd)


def test_a_failed_fork_is_an_ordinary_error_that_leaks_no_fd(monkeypatch):
    before = len(os.listdir("/proc/self/fd"))

    def no_fork():
        raise OSError(11, "Resource temporarily unavailable")

    monkeypatch.setattr(os, "fork", no_fork)
    with pytest.raises(rvgahp.SpawnError) as e:
        rvgahp.spawn(["/bin/true"], {}, "/", 0, 1, 2)
    assert str(e.value) == "cannot fork for /bin/true: Resource temporarily unavailable"
    assert len(os.listdir("/proc/self/fd")) == before


def test_a_bare_host_name_is_not_taken_for_a_socket_path():
    with pytest.raises(rvgahp.UsageError) as e:
        rvgahp.parse_client_args(["login.hpcc.example.org", "blahpd"])
    assert "'login.hpcc.example.org' looks like a host, not a socket path" in str(e.value)


def test_both_ways_of_finding_who_owns_a_tunnel_connection_agree():
    """The tunnel admits only our uid. sock_diag asks the kernel about the one socket;
    /proc/net/tcp is the fallback. Both name a connection's owner, ours or another's."""
    import encodings.idna  # noqa: F401 (the child cannot load it once it is nobody)
    import socket

    if os.geteuid() != 0:
        pytest.skip("needs root to connect as another user")
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(5)
    ready_r, ready_w = os.pipe()  # the child says it is connected...
    done_r, done_w = os.pipe()  # ...and holds the connection until we say we are done
    pid = os.fork()
    if pid == 0:
        try:
            os.setgid(65534)
            os.setuid(65534)
            theirs = socket.socket()
            theirs.connect(listener.getsockname())
            os.write(ready_w, b"x")
            os.read(done_r, 1)
        finally:
            os._exit(0)
    try:
        conn, peer = listener.accept()
        os.read(ready_r, 1)
        mine = socket.create_connection(listener.getsockname())
        my_conn, my_peer = listener.accept()
        cases = [(peer, conn.getsockname(), 65534), (my_peer, my_conn.getsockname(), 0), (("127.0.0.1", 1), conn.getsockname(), -1)]
        sock_diag = rvgahp.SockDiag()
        for where, local, owner in cases * 2:  # the second time round on the same netlink socket
            assert sock_diag.uid(where, local) == owner
        sock_diag.close()

        class NoNetlink:
            def uid(self, peer, local):
                raise OSError("no netlink here")

        for where, local, owner in cases:
            assert rvgahp.tcp_peer_uid(where, local, NoNetlink()) == owner
        for s in (conn, mine, my_conn):
            s.close()
    finally:
        os.write(done_w, b"x")
        os.waitpid(pid, 0)
        listener.close()
        for fd in (ready_r, ready_w, done_r, done_w):
            os.close(fd)


class PoolMember:
    """What CreditPool reads of a tunnel connection, and the grants it gets."""

    def __init__(self, window=100):
        self.window, self.pooled, self.released, self.peer_done, self.wants_credit = window, 0, False, False, False
        self.grants = []

    def granted_more(self, n):
        self.pooled += n
        self.grants.append(n)


def test_the_tunnel_pool_never_grants_past_its_size_and_serves_wants_in_turn(monkeypatch):
    monkeypatch.setattr(rvgahp, "TUNNEL_GRANT_MIN", 10)
    pool = rvgahp.CreditPool(250)
    a, b, c = PoolMember(), PoolMember(), PoolMember()
    for conn in (a, b, c):
        pool.want(conn)
    assert (a.grants, b.grants, c.grants, pool.granted) == ([100], [100], [50], 250)
    d = PoolMember()
    pool.want(d)  # nothing free: it waits in line
    assert d.grants == [] and list(pool.waiting) == [d]
    pool.give_back(5)  # less than the smallest grant: still waiting, nobody overtakes
    a.pooled -= 5
    pool.want(a)
    assert d.grants == [] and list(pool.waiting) == [d, a]
    pool.give_back(20)
    b.pooled -= 20
    assert d.grants == [25] and a.grants == [100] and pool.granted == 250  # d first, then a waits on


def test_a_connection_that_ended_or_sent_eof_leaves_the_tunnel_pools_line_and_gets_nothing(monkeypatch):
    monkeypatch.setattr(rvgahp, "TUNNEL_GRANT_MIN", 10)
    pool = rvgahp.CreditPool(100)
    full, done, gone, last = PoolMember(), PoolMember(), PoolMember(), PoolMember()
    pool.want(full)
    for conn in (done, gone, last):
        pool.want(conn)
    assert list(pool.waiting) == [done, gone, last]
    gone.released = True
    pool.leave(gone)  # at once, not when it would reach the head
    assert list(pool.waiting) == [done, last] and not gone.wants_credit
    done.peer_done = True  # its far end sent EOF: credit now would never be used
    full.pooled -= 100
    pool.give_back(100)
    assert done.grants == [] and gone.grants == [] and last.grants == [100] and not pool.waiting

#!/usr/bin/env python3
"""rvgahp: reach a cluster's GAHPs through one ssh link that the cluster dials out.

HTCondor's GridManager normally logs in to a cluster to start its GAHPs. Where the
cluster forbids that, rvgahp turns the direction around:

    submit host                                       cluster login node
    GridManager --pipes--> rvgahp_client              rvgahp_server (cron @reboot)
                             | hands its stdin/stdout     | runs rvgahp_ssh, i.e.
                             v over a UNIX socket         | ssh submithost rvgahp_proxy SOCK
                           rvgahp_proxy <====== one framed ssh link =====+
                           (owns SOCK)                    | forks one GAHP per session
                                                          v
                                                        blahpd, condor_ft-gahp

Every session is a channel on the one link, so a start costs no ssh login, and with a
spare GAHP kept ready, no GAHP start-up either.

One role per process, chosen by the name it runs under (rvgahp_server, rvgahp_proxy,
rvgahp_client) or by a first-argument subcommand. Standard library only; Python 3.6+.

Where things are, in reading order:
  constants          limits, timings, the GAHP allow-list
  logging            Log: the line format, size rotation, reopening on SIGHUP
  config             Config: HTCondor's syntax, with lazy macro expansion
  framing            frame types, fields, FrameReader, a session's status line
  the link           Link: start line, hello, pings, dispatch
                     Channel: one session's two streams, with credit
  event-loop pieces  fd helpers, Loop, Outbox, LineReader, spawn, Backoff
  the server         Layout, Server, Spare, ServerSession
  the proxy          Proxy, ClientConn, ProxySession
  the client         argv, Handoff, run_client, the waiting shell, --status
  the command line   each role's main, the pid lock, daemonize, main
"""

import errno
import os
import socket
import stat
import struct
import sys
import time

# --------------------------------------------------------------------------- constants

VERSION = "1.0.0"
ROLES = ("server", "proxy", "client")

# The link protocol's major version. Both ends must speak the same one.
LINK_PROTOCOL = 1

# Bounds. Every buffer a long-running process keeps is limited by one of these.
READ_SIZE = 64 * 1024  # one read from a GAHP, a client pipe, or the link
MAX_PAYLOAD = 256 * 1024  # a larger frame is a protocol error, not a big allocation
CHANNEL_WINDOW = 512 * 1024  # bytes a sender may have in flight per channel direction
GRANT_AT = CHANNEL_WINDOW // 4  # return credit in batches, not per write
LINK_HIGH_WATER = 2 * 1024 * 1024  # stop reading sources while the link is this backed up
LINK_LOW_WATER = 512 * 1024  # ...and resume once it has drained to here
MAX_FIELDS = 4096  # a hello, a request, a reply
MAX_NOISE = 64 * 1024  # what a login shell may print before the link starts
MAX_LOG_LINE = 2000
MAX_SESSIONS = 1000
SPARE_AFTER = 0.05  # start a replacement spare this long after handing one out, so the
# session that took it gets its banner relayed before the server spends time on a fork

# Timings, in seconds. Those an admin may want to change are also config knobs.
DEFAULT_PING_INTERVAL = 15.0
DEFAULT_PING_TIMEOUT = 45.0
DEFAULT_CLIENT_WAIT = 5.0
START_TIMEOUT = 20.0  # a GAHP not started by then is a hung server (the GridManager waits 20 s too)
DEFAULT_BACKOFF_MAX = 300.0
BACKOFF_FIRST = 1.0
LINK_STABLE = 30.0  # a link up this long has proved the login works
MAX_LOGINS_PER_MINUTE = 6  # sites lock accounts that log in in storms
LOGIN_WINDOW = 61.0  # "a minute", with a second to spare for sites that count whole seconds
EXIT_LINGER = 2.0  # wait this long for a dead GAHP's stdout to reach EOF
GAHP_TERM_AFTER = 5.0  # after its session ends, a GAHP gets this long to exit on EOF
GAHP_KILL_AFTER = 5.0  # ...and then this long after SIGTERM before SIGKILL
TRANSPORT_KILL_AFTER = 2.0
STANDBY_POLL = 1.0  # a standby proxy tries the socket's lock this often (no logins involved)

# The GAHPs a session may ask for: name -> (config knob, binary under -b BASEDIR/bin, args).
GAHPS = {
    "blahpd": ("BATCH_GAHP", "blahpd", []),
    "batch_gahp": ("BATCH_GAHP", "blahpd", []),  # what GridManagers before 8.9.12 send
    "condor_ft-gahp": ("FT_GAHP", "condor_ft-gahp", ["-f"]),
}


# --------------------------------------------------------------------------- logging


class UserError(Exception):
    """A problem a person can fix; its text is the whole one-line message."""


def timestamp(now=None):
    now = time.time() if now is None else now
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now)) + ".%06d" % (now % 1 * 1e6)


class Log:
    """Lines of `YYYY-MM-DD HH:MM:SS.ffffff rvgahp_ROLE[pid]: message`.

    Each line is one write() to an O_APPEND fd, so lines from several processes sharing
    a file never interleave. With a file and a size limit, the file is rotated to
    FILE.1 when it grows past the limit; SIGHUP reopens it for logrotate.
    """

    def __init__(self, role):
        self.name = "rvgahp_" + role
        self.fd = 2
        self.path = None
        self.max_bytes = 0
        self.verbose = False
        self.echo_fd = None  # a second destination, e.g. the proxy's stderr back to ssh

    def to_file(self, path, max_bytes=0):
        self.path = path
        self.max_bytes = max_bytes
        self.reopen()

    def reopen(self):
        if self.path is None:
            return
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        except OSError as e:
            raise UserError("cannot open log file %s: %s" % (self.path, e.strerror))
        if self.fd > 2:
            os.close(self.fd)
        self.fd = fd

    def reopen_after_sighup(self):
        """logrotate moved the file away: start a new one. Never fatal to the process."""
        try:
            self.reopen()
        except UserError as e:
            self.info(str(e))
            return
        self.info("reopened the log (SIGHUP)")

    def info(self, message):
        self.write_line("%s %s[%d]: %s" % (timestamp(), self.name, os.getpid(), message))

    def debug(self, message):
        if self.verbose:
            self.info(message)

    def write_line(self, line):
        data = (line[:MAX_LOG_LINE] + "\n").encode("utf-8", "replace")
        for fd in (self.fd, self.echo_fd):
            if fd is not None:
                try:
                    os.write(fd, data)
                except OSError:
                    pass  # a log that cannot be written must not take the process down
        if self.max_bytes and self.path:
            self._rotate_if_big()

    def _rotate_if_big(self):
        try:
            if os.fstat(self.fd).st_size <= self.max_bytes:
                return
            os.replace(self.path, self.path + ".1")
            self.reopen()
        except (OSError, UserError):
            pass


# --------------------------------------------------------------------------- config


class ConfigError(UserError):
    pass


class Config:
    """The subset of HTCondor's config syntax that condor_config.rvgahp files use.

    `NAME = value` lines (names case-insensitive), `#` comment lines, trailing-backslash
    continuation, and the macros $(NAME), $(NAME:default), $ENV(NAME), $ENV(NAME:default).
    Expansion is lazy and the last definition wins, except that a definition referring
    to its own name sees the definition before it, so `PATH = $(PATH):/x` appends.
    """

    def __init__(self, path, text, environ=None):
        self.path = path
        self.environ = os.environ if environ is None else environ
        self.defs = {}  # lower-case name -> [(order, line number, raw value)]
        self._parse(text)

    @classmethod
    def load(cls, path):
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                text = f.read()
        except OSError as e:
            raise ConfigError("cannot read config %s: %s" % (path, e.strerror))
        return cls(path, text)

    def _parse(self, text):
        order = 0
        lines = text.splitlines()
        i = 0
        while i < len(lines):
            start = i + 1
            line = lines[i]
            i += 1
            if line.lstrip().startswith("#"):
                continue
            while line.endswith("\\") and i < len(lines):
                line = line[:-1] + lines[i].lstrip()
                i += 1
            if line.endswith("\\"):
                line = line[:-1]
            if not line.strip():
                continue
            name, sep, value = line.partition("=")
            name = name.strip()
            if not sep or not is_config_name(name):
                raise self.error(start, "expected NAME = value, found %r" % line.strip()[:60])
            order += 1
            self.defs.setdefault(name.lower(), []).append((order, start, value.strip()))

    def error(self, lineno, message):
        return ConfigError("config %s:%d: %s" % (self.path, lineno, message))

    def get(self, name, default=None):
        """The expanded value of NAME, or default when it is not defined."""
        found = self._definition(name.lower(), None)
        if found is None:
            return default
        return self._expand(name.lower(), found, ())

    def number(self, name, default, minimum=0.0):
        raw = self.get(name)
        if raw is None or raw == "":
            return default
        try:
            value = float(raw)
        except ValueError:
            value = None
        if value is None or value < minimum or value != value:
            _, lineno, _ = self._definition(name.lower(), None)
            raise self.error(lineno, "%s must be a number of at least %g, not %r" % (name, minimum, raw))
        return value

    def _definition(self, key, before):
        defs = self.defs.get(key, ())
        if before is not None:
            defs = [d for d in defs if d[0] < before]
        return defs[-1] if defs else None

    def _expand(self, key, definition, stack):
        order, lineno, raw = definition
        if (key, order) in stack:
            chain = " -> ".join(k.upper() for k, _ in stack + ((key, order),))
            raise self.error(lineno, "macro loop: %s" % chain)
        return self._substitute(raw, key, definition, stack + ((key, order),))

    def _substitute(self, text, key, definition, stack):
        order, lineno, _ = definition
        out = []
        i = 0
        while True:
            j = text.find("$", i)
            if j < 0:
                out.append(text[i:])
                return "".join(out)
            out.append(text[i:j])
            if text.startswith("$(", j):
                kind, start = "macro", j + 2
            elif text.startswith("$ENV(", j):
                kind, start = "env", j + 5
            else:
                out.append("$")
                i = j + 1
                continue
            end = matching_paren(text, start)
            if end < 0:
                raise self.error(lineno, "unterminated %r" % text[j:][:40])
            body = text[start:end]
            name, has_default, default = body.partition(":")
            name = name.strip()
            if not is_config_name(name):
                raise self.error(lineno, "bad macro name %r" % body[:40])
            if kind == "env":
                value = self.environ.get(name, "")
            else:
                # A definition that names itself means the one before it.
                before = order if name.lower() == key else None
                found = self._definition(name.lower(), before)
                value = "" if found is None else self._expand(name.lower(), found, stack)
            if not value and has_default:
                value = self._substitute(default, key, definition, stack)
            out.append(value)
            i = end + 1


def is_config_name(name):
    return bool(name) and all(c.isalnum() or c in "_." for c in name) and not name[0].isdigit()


def matching_paren(text, start):
    depth = 1
    for k in range(start, len(text)):
        if text[k] == "(":
            depth += 1
        elif text[k] == ")":
            depth -= 1
            if depth == 0:
                return k
    return -1


# --------------------------------------------------------------------------- framing

# Every frame is: type (1 byte), channel (4 bytes), payload length (4 bytes), payload.
HEADER = struct.Struct("!BII")

HELLO = 1  # link start: key=value fields (version, role, ping settings)
OPEN = 2  # proxy -> server: start a GAHP on this channel (fields: gahp=NAME)
ACCEPT = 3  # server -> proxy: the GAHP runs (fields: pid=N)
REFUSE = 4  # server -> proxy: no GAHP for you (fields: reason=TEXT); the channel is gone
DATA = 5  # bytes of one direction of a session
EOF = 6  # the sender's direction is finished (a half-close)
CLOSE = 7  # the session is over (fields: exit=N | signal=N | error=TEXT)
WINDOW = 8  # credit: the receiver has consumed this many more bytes (4-byte count)
PING = 9  # link liveness; answered by PONG with the same payload
PONG = 10
RETRY = 11  # proxy -> client only: the link went away before the GAHP started; ask again
STATE = 12  # proxy -> server: it became the socket's owner, or cannot be (fields: state, reason)
STATUS = 13  # client <-> proxy only: how is the link? (reply fields: see Proxy.status)
# After ACCEPT, the proxy ends a client's socket with one text line instead of a frame:
# "exit N", "signal N" or "error TEXT". A line is what lets the waiting client be a
# shell (see wait_in_shell) rather than a whole Python interpreter.
FRAME_NAMES = {
    number: name
    for name, number in (
        ("HELLO", HELLO), ("OPEN", OPEN), ("ACCEPT", ACCEPT), ("REFUSE", REFUSE), ("DATA", DATA), ("EOF", EOF), ("CLOSE", CLOSE),
        ("WINDOW", WINDOW), ("PING", PING), ("PONG", PONG), ("RETRY", RETRY), ("STATE", STATE), ("STATUS", STATUS),
    )
}  # fmt: skip

# What a client and the proxy on the same host must agree on (the requests, and what
# follows ACCEPT). A new rvgahp.pyz on the submit host meets the old proxy of a link
# that is still up; this number is how that gets a clear refusal instead of confusion.
CLIENT_PROTOCOL = 1

# A login shell may print a banner before the proxy starts, so each end of the link
# begins with this line and the reader skips anything before it.
LINK_MAGIC = b"RVGAHP-LINK/"
LINK_START = LINK_MAGIC + str(LINK_PROTOCOL).encode() + b"\n"

COUNT = struct.Struct("!I")


class ProtocolError(Exception):
    """The peer sent something rvgahp never sends; the connection it came on is dropped."""


def frame(kind, channel, payload=b""):
    return HEADER.pack(kind, channel, len(payload)) + payload


def encode_fields(fields):
    """key=value lines: small, readable in a packet dump, and no json import for the client."""
    lines = []
    for key, value in fields.items():
        value = str(value)
        if "\n" in value or "=" in key:
            raise ValueError("field %r cannot be encoded" % key)
        lines.append("%s=%s\n" % (key, value))
    return "".join(lines).encode("utf-8")


def decode_fields(payload):
    if len(payload) > MAX_FIELDS:
        raise ProtocolError("a %d-byte request (the limit is %d)" % (len(payload), MAX_FIELDS))
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError("a request that is not UTF-8")  # "request": what clients get told
    fields = {}
    for line in text.split("\n"):
        if not line:
            continue
        key, sep, value = line.partition("=")
        if not sep or not key or "\0" in line:
            raise ProtocolError("a malformed request line %r" % line[:60])
        fields[key] = value
    return fields


class FrameReader:
    """Turns a byte stream into frames, holding at most one partial frame."""

    def __init__(self):
        self.buf = bytearray()

    def feed(self, data):
        self.buf += data
        frames = []
        offset = 0
        with memoryview(self.buf) as view:  # slicing a view: one copy per payload, not two
            while len(view) - offset >= HEADER.size:
                kind, channel, length = HEADER.unpack_from(view, offset)
                if length > MAX_PAYLOAD:
                    raise ProtocolError("a %d-byte frame (the limit is %d)" % (length, MAX_PAYLOAD))
                start = offset + HEADER.size
                if len(view) < start + length:
                    break
                frames.append((kind, channel, bytes(view[start : start + length])))
                offset = start + length
        del self.buf[:offset]
        return frames


def describe_status(status):
    """exit=N or signal=N fields for a waitpid() status."""
    if os.WIFSIGNALED(status):
        return {"signal": os.WTERMSIG(status)}
    return {"exit": os.WEXITSTATUS(status)}


def status_line(fields):
    """The line an accepted client's socket ends with: exit N, signal N or error TEXT.

    N must be a plain number of 0-255: the waiting client may be a shell that does
    arithmetic with it, and the text came from the other end of an ssh link.
    """
    if "error" in fields:
        return "error %s\n" % str(fields["error"]).replace("\n", " ")
    for key in ("signal", "exit"):
        if key in fields:
            value = str(fields[key])
            if is_small_number(value):
                return "%s %s\n" % (key, value)
            return "error the server sent a bad %s status %r\n" % (key, value[:40])
    return "error the session ended without a status\n"


def is_small_number(text):
    return 0 < len(text) <= 3 and all("0" <= c <= "9" for c in text) and int(text) <= 255


def status_text(fields):
    if "signal" in fields:
        return "killed by signal %s" % fields["signal"]
    if "exit" in fields:
        return "exit %s" % fields["exit"]
    return fields.get("error", "ended")


def human_bytes(n):
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return ("%d %s" if unit == "B" else "%.1f %s") % (n, unit)
        n /= 1000.0


# --------------------------------------------------------------------------- the link


class Link:
    """The framed byte stream between server and proxy, over the transport's pipes.

    Both ends send LINK_START and a HELLO, then frames. Either end pings; anything heard
    counts as life, and a link silent past the timeout is closed. Channel frames go to
    the Channel objects in self.channels; the role (`events`) hears on_hello, on_open,
    on_state, on_noise and on_link_closed.
    """

    def __init__(self, loop, log, rfd, wfd, events):
        self.loop = loop
        self.log = log
        self.rfd = rfd
        self.wfd = wfd
        self.events = events
        self.reader = FrameReader()
        self.outbox = Outbox(loop, wfd, on_written=self._written, on_gone=self._write_failed)
        self.channels = {}
        self.synced = False
        self.peer = None  # the peer's hello fields, once heard
        self.closed = False
        self.ended_by_peer = False  # EOF from the peer, as opposed to a close decided here
        self.congested = False
        self.prelude = bytearray()  # bytes before the peer's LINK_START
        self.ping_interval = DEFAULT_PING_INTERVAL
        self.ping_timeout = DEFAULT_PING_TIMEOUT
        self.last_heard = self.last_ping = time.monotonic()
        self.timer = None
        self.rtt = None

    def start(self, hello):
        os.set_blocking(self.rfd, False)
        os.set_blocking(self.wfd, False)
        self.loop.on_readable(self.rfd, self._readable)
        self.outbox.write(LINK_START + frame(HELLO, 0, encode_fields(hello)))
        self._tick()

    def set_ping(self, interval, timeout):
        self.ping_interval, self.ping_timeout = interval, timeout
        if self.timer is not None:  # re-plan the next tick on the new interval
            self.timer.cancel()
            self._tick()

    def send(self, kind, channel, payload=b""):
        if self.closed:
            return
        # Header and payload go out as two chunks of one writev: no copy to join them.
        self.outbox.write(HEADER.pack(kind, channel, len(payload)), payload)
        if not self.congested and self.outbox.size > LINK_HIGH_WATER:
            self.congested = True

    def _written(self, n):
        if self.congested and self.outbox.size <= LINK_LOW_WATER:
            self.congested = False
            for channel in list(self.channels.values()):
                channel.refresh()

    def _write_failed(self):
        self.ended_by_peer = True  # EPIPE: the reader at the far end is gone
        self.close("the peer closed the link" if self.synced else "the transport ended before the link started")

    def _tick(self):
        """Ping, and declare the link dead when the peer has been silent too long."""
        if self.closed:
            return
        now = time.monotonic()
        silent = now - self.last_heard
        if silent > self.ping_timeout:
            self.close("ping timeout: no word from the peer for %.0f s" % silent)
            return
        if now - self.last_ping >= self.ping_interval:
            self.last_ping = now
            self.send(PING, 0, struct.pack("!d", now))
        # Wake for the next ping, or the moment the silence would pass the timeout.
        wake = min(self.last_ping + self.ping_interval, self.last_heard + self.ping_timeout + 0.01)
        self.timer = self.loop.call_later(max(0.05, wake - now), self._tick)

    def _readable(self):
        data = read_some(self.rfd, 4 * READ_SIZE)
        if data is None:
            return
        if not data:
            self.ended_by_peer = True
            self.close("the peer closed the link" if self.synced else "the transport ended before the link started")
            return
        self.last_heard = time.monotonic()
        if not self.synced:
            data = self._skip_prelude(data)
            if data is None:
                return
        try:
            frames = self.reader.feed(data)
            for kind, channel, payload in frames:
                if self.closed:
                    return
                self._dispatch(kind, channel, payload)
        except ProtocolError as e:
            self.close("protocol error from the peer: %s" % e)

    def _skip_prelude(self, data):
        """Drop what a login shell printed before the peer's LINK_START; return the rest."""
        self.prelude += data
        at = self.prelude.find(LINK_MAGIC)
        newline = self.prelude.find(b"\n", at) if at >= 0 else -1
        if newline < 0:
            if len(self.prelude) > MAX_NOISE:
                self.close("the transport printed %d bytes and no rvgahp link start; does rvgahp_ssh run rvgahp_proxy?" % len(self.prelude))
            return None
        noise = bytes(self.prelude[:at])
        version = bytes(self.prelude[at + len(LINK_MAGIC) : newline])
        rest = bytes(self.prelude[newline + 1 :])
        self.prelude = bytearray()
        if noise.strip():
            self.events.on_noise(noise)
        if version != str(LINK_PROTOCOL).encode():
            self.close(
                "the peer speaks link protocol %r and this rvgahp %s speaks %d; install the same rvgahp.pyz on both hosts"
                % (version.decode("ascii", "replace")[:20], VERSION, LINK_PROTOCOL)
            )
            return None
        self.synced = True
        return rest

    def _dispatch(self, kind, channel, payload):
        if self.peer is None and kind != HELLO:
            raise ProtocolError("%s before HELLO" % FRAME_NAMES.get(kind, kind))
        if kind == HELLO:
            self.peer = decode_fields(payload)
            self.events.on_hello(self.peer)
            self.last_ping = time.monotonic()
            self.send(PING, 0, struct.pack("!d", self.last_ping))  # a first round-trip figure at once
        elif kind == PING:
            self.send(PONG, 0, payload)
        elif kind == PONG:
            if len(payload) == 8:
                self.rtt = time.monotonic() - struct.unpack("!d", payload)[0]
        elif kind == OPEN:
            self.events.on_open(channel, payload)
        elif kind == STATE:
            self.events.on_state(decode_fields(payload))
        elif kind in (ACCEPT, REFUSE, DATA, EOF, CLOSE, WINDOW):
            target = self.channels.get(channel)
            if target is not None:
                target.on_frame(kind, payload)
            # else: a frame that crossed the channel's CLOSE in flight; nothing to do
        else:
            raise ProtocolError("unknown frame type %d" % kind)

    def fail(self, reason):
        self.close(reason)

    def close(self, reason):
        if self.closed:
            return
        self.closed = True
        if self.timer:
            self.timer.cancel()
        self.outbox.detach()
        self.loop.forget(self.rfd)
        self.loop.forget(self.wfd)
        close_fd(self.rfd)
        if self.wfd != self.rfd:
            close_fd(self.wfd)
        for channel in list(self.channels.values()):
            channel.link_lost(reason)
        self.channels.clear()
        self.events.on_link_closed(reason)


class Channel:
    """One session's two byte streams across the link.

    The source fd (a GAHP's stdout, or the GridManager's stdin) is read only while the
    peer has granted credit and the link is not backed up, so a stalled reader stops
    its own stream and nothing else. Data for the sink fd is queued in an Outbox that
    can never hold more than the window we granted; credit goes back as it drains.
    Roles subclass this for what happens at the edges (a process, a client).
    """

    def __init__(self, link, cid, source_fd, sink_fd):
        self.link = link
        self.loop = link.loop
        self.log = link.log
        self.cid = cid
        self.source_fd = source_fd
        self.sink_fd = sink_fd
        self.sink = Outbox(self.loop, sink_fd, on_written=self._sink_took, on_gone=self._sink_gone)
        self.credit = CHANNEL_WINDOW
        self.inflight = 0  # received, not yet written to the sink
        self.ungranted = 0  # written to the sink, credit not yet returned
        self.reading = False
        self.relaying = False
        self.source_done = False
        self.sink_done = False
        self.released = False
        self.bytes_up = 0  # source -> link
        self.bytes_down = 0  # link -> sink
        self.started = time.monotonic()

    def begin_relay(self):
        self.relaying = True
        os.set_blocking(self.source_fd, False)
        os.set_blocking(self.sink_fd, False)
        self.refresh()

    def refresh(self):
        want = self.relaying and not self.source_done and self.credit > 0 and not self.link.congested
        if want != self.reading:
            self.reading = want
            self.loop.on_readable(self.source_fd, self._source_readable if want else None)

    def _source_readable(self):
        data = read_some(self.source_fd, min(READ_SIZE, self.credit))
        if data is None:
            return
        if not data:
            self.end_source()
            return
        self.credit -= len(data)
        self.bytes_up += len(data)
        self.link.send(DATA, self.cid, data)
        self.refresh()

    def end_source(self):
        """The source is finished: tell the peer with EOF, once."""
        if self.source_done:
            return
        self.source_done = True
        self.reading = False
        self.loop.forget(self.source_fd)
        close_fd(self.source_fd)
        self.link.send(EOF, self.cid)
        self.source_ended()

    def on_frame(self, kind, payload):
        if kind == DATA:
            if self.inflight + self.ungranted + len(payload) > CHANNEL_WINDOW:
                raise ProtocolError("channel %d overran its window" % self.cid)
            self.inflight += len(payload)
            self.bytes_down += len(payload)
            if self.sink_done:
                self._sink_took(len(payload))
            else:
                self.sink.write(payload)
        elif kind == EOF:
            self.sink.when_drained(self.end_sink)
        elif kind == WINDOW:
            self.credit += COUNT.unpack(payload)[0] if len(payload) == 4 else 0
            self.refresh()
        elif kind == CLOSE:
            self.peer_closed(decode_fields(payload))
        elif kind == ACCEPT:
            self.accepted(decode_fields(payload))
        elif kind == REFUSE:
            self.refused(decode_fields(payload))

    def _sink_took(self, n):
        self.inflight -= n
        self.ungranted += n
        if self.ungranted >= GRANT_AT and not self.released:
            self.link.send(WINDOW, self.cid, COUNT.pack(self.ungranted))
            self.ungranted = 0

    def _sink_gone(self):
        """The sink's reader went away; keep taking data (and discarding it) so the
        peer is never stuck on credit for a stream nobody reads."""
        self.end_sink()

    def end_sink(self):
        if self.sink_done:
            return
        self.sink_done = True
        self.sink.detach()
        self.loop.forget(self.sink_fd)
        close_fd(self.sink_fd)
        self.sink_ended()

    def release(self):
        """Drop the channel: both fds closed, no more frames to or from it."""
        if self.released:
            return
        self.released = True
        self.relaying = False
        if not self.source_done:
            self.source_done = True
            self.loop.forget(self.source_fd)
            close_fd(self.source_fd)
        if not self.sink_done:
            self.sink_done = True
            self.sink.detach()
            self.loop.forget(self.sink_fd)
            close_fd(self.sink_fd)
        if self.link.channels.get(self.cid) is self:
            del self.link.channels[self.cid]

    def fail(self, reason):
        """An internal error in this channel: end it alone and tell the peer."""
        self.log.info("session %d: %s" % (self.cid, reason))
        if not self.released:
            self.link.send(CLOSE, self.cid, encode_fields({"error": reason}))
        self.peer_closed({"error": reason})

    def summary(self):
        return "%.1f s, %s up, %s down" % (
            time.monotonic() - self.started,
            human_bytes(self.bytes_up),
            human_bytes(self.bytes_down),
        )

    # What the roles fill in.
    def source_ended(self):
        pass

    def sink_ended(self):
        pass

    def accepted(self, fields):
        raise ProtocolError("unexpected ACCEPT on channel %d" % self.cid)

    def refused(self, fields):
        raise ProtocolError("unexpected REFUSE on channel %d" % self.cid)

    def peer_closed(self, fields):
        self.release()

    def link_lost(self, reason):
        self.release()


# --------------------------------------------------------------------------- event-loop pieces

# A peer going away shows up as one of these; for us it is an ordinary end of stream.
GONE = frozenset((errno.EPIPE, errno.ECONNRESET, errno.EIO, errno.ENOTCONN, errno.ESHUTDOWN))


def read_some(fd, size):
    """Bytes; b"" at end of stream or when the peer is gone; None if nothing is ready."""
    try:
        return os.read(fd, size)
    except (BlockingIOError, InterruptedError):
        return None
    except OSError as e:
        if e.errno in GONE:
            return b""
        raise


def write_some(fd, chunks):
    """How many bytes of chunks went out now: 0 if none could, -1 if the reader is gone."""
    try:
        return os.writev(fd, chunks)
    except (BlockingIOError, InterruptedError):
        return 0
    except OSError as e:
        if e.errno in GONE:
            return -1
        raise


def close_fd(fd):
    if fd is not None and fd >= 0:
        try:
            os.close(fd)
        except OSError:
            pass


def fd_is_streamable(fd):
    """Pipes and sockets can be polled and handed to the proxy; ttys and files cannot."""
    mode = os.fstat(fd).st_mode
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)


def close_inherited_fds(keep):
    """Close every fd above 2 except keep; run in a forked child just before exec."""
    try:
        fds = [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:
        fds = range(3, 1024)
    for fd in fds:
        if fd > 2 and fd not in keep:
            close_fd(fd)


def raise_fd_limit():
    """Many sessions need many fds; the hard limit is ours to use."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > 65536:
        hard = 65536
    if soft != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass


class Timer:
    __slots__ = ("callback", "cancelled", "when")

    def __init__(self, when, callback):
        self.when = when
        self.callback = callback
        self.cancelled = False

    def cancel(self):
        self.cancelled = True


class Loop:
    """One selectors loop per process, with timers and signals.

    A callback that raises is logged, and its owner (the object the bound method belongs
    to) is ended through its fail() method: a client connection or a channel alone, or
    the whole link when the fault was in the link's own stream. The loop carries on.
    Signals are noted by a tiny handler and run from the loop, never mid-callback.
    """

    def __init__(self, log):
        import selectors

        self.log = log
        self.selector = selectors.DefaultSelector()
        self.EVENT_READ, self.EVENT_WRITE = selectors.EVENT_READ, selectors.EVENT_WRITE
        self.watches = {}  # fd -> [reader callback, writer callback]
        self.timers = []
        self.serial = 0
        self.stopped = False
        self.signal_handlers = {}
        self.pending_signals = []
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)
        self.on_readable(self.wake_r, self._drain_wakeups)

    # fds
    def on_readable(self, fd, callback):
        self._watch(fd, 0, callback)

    def on_writable(self, fd, callback):
        self._watch(fd, 1, callback)

    def _watch(self, fd, slot, callback):
        old = self.watches.get(fd)
        if old is None:
            if callback is None:
                return
            new = [None, None]
            new[slot] = callback
            self.watches[fd] = new
            self.selector.register(fd, self._mask(new), new)
            return
        if old[slot] is callback:
            return
        old[slot] = callback
        if old[0] is None and old[1] is None:
            del self.watches[fd]
            self.selector.unregister(fd)
        else:
            self.selector.modify(fd, self._mask(old), old)

    def _mask(self, pair):
        return (self.EVENT_READ if pair[0] else 0) | (self.EVENT_WRITE if pair[1] else 0)

    def forget(self, fd):
        """Stop watching fd; call before closing it so a reused number is never confused."""
        watch = self.watches.pop(fd, None)
        if watch is not None:
            watch[0] = watch[1] = None
            self.selector.unregister(fd)

    # timers
    def call_later(self, delay, callback):
        import heapq

        timer = Timer(time.monotonic() + max(0.0, delay), callback)
        self.serial += 1
        heapq.heappush(self.timers, (timer.when, self.serial, timer))
        return timer

    # signals
    def on_signal(self, signum, callback):
        import signal

        self.signal_handlers[signum] = callback
        signal.signal(signum, self._note_signal)
        signal.set_wakeup_fd(self.wake_w)

    def _note_signal(self, signum, frame):
        self.pending_signals.append(signum)

    def _drain_wakeups(self):
        while read_some(self.wake_r, 4096):
            pass

    # running
    def stop(self):
        self.stopped = True

    def run(self):
        import heapq

        while not self.stopped:
            timeout = None
            while self.timers and self.timers[0][2].cancelled:
                heapq.heappop(self.timers)
            if self.timers:
                timeout = max(0.0, self.timers[0][0] - time.monotonic())
            if self.pending_signals:
                timeout = 0
            for key, mask in self.selector.select(timeout):
                # A callback earlier in this batch may have closed this fd, and even
                # reused its number: act only on a watch that is still the same one.
                watch = key.data
                if mask & self.EVENT_READ and watch[0] and self.watches.get(key.fd) is watch:
                    self._call(watch[0])
                if mask & self.EVENT_WRITE and watch[1] and self.watches.get(key.fd) is watch:
                    self._call(watch[1])
            while self.pending_signals:
                signum = self.pending_signals.pop(0)
                self._call(self.signal_handlers[signum])
            now = time.monotonic()
            while self.timers and self.timers[0][0] <= now:
                timer = heapq.heappop(self.timers)[2]
                if not timer.cancelled:
                    self._call(timer.callback)

    def _call(self, callback):
        try:
            callback()
        except Exception as e:
            import traceback

            owner = getattr(callback, "__self__", None)
            self.log.info("internal error in %s: %s" % (type(owner).__name__, e))
            for line in traceback.format_exc().splitlines():
                self.log.debug("  " + line)
            fail = getattr(owner, "fail", None)
            if fail is not None and owner is not self:
                try:
                    fail("internal error: %s" % e)
                except Exception as e2:
                    self.log.info("could not fail %s cleanly: %s" % (type(owner).__name__, e2))


class Outbox:
    """Buffered non-blocking writes to one fd, in the order given.

    Writes at once when nothing is queued; after a short write, queues the rest and
    asks the loop for writability; unregisters once drained. on_written(n) reports bytes
    that actually left, which is what flow control counts. It never closes the fd.
    """

    def __init__(self, loop, fd, on_written=None, on_gone=None):
        from collections import deque

        self.loop = loop
        self.fd = fd
        self.queue = deque()
        self.size = 0
        self.gone = False
        self.on_written = on_written
        self.on_gone = on_gone
        self.on_drained = None

    def write(self, *chunks):
        if self.gone:
            return
        idle = not self.queue
        for chunk in chunks:
            if chunk:
                self.queue.append(chunk)
                self.size += len(chunk)
        if idle and self.queue:
            self._flush()

    def _flush(self):
        chunks = list(self.queue) if len(self.queue) <= 64 else [self.queue[i] for i in range(64)]
        n = write_some(self.fd, chunks)
        if n < 0:
            self._lost()
            return
        left = n
        while left:
            head = self.queue[0]
            if len(head) <= left:
                self.queue.popleft()
                left -= len(head)
            else:
                self.queue[0] = head[left:]
                left = 0
        self.size -= n
        self.loop.on_writable(self.fd, self._flush if self.queue else None)
        if n and self.on_written:
            self.on_written(n)
        if not self.queue and self.on_drained:
            callback, self.on_drained = self.on_drained, None
            callback()

    def when_drained(self, callback):
        """Run callback once everything queued has been written (at once if nothing is)."""
        if self.queue and not self.gone:
            self.on_drained = callback
        else:
            callback()

    def _lost(self):
        dropped = self.size
        drained, self.on_drained = self.on_drained, None  # before on_gone, which may detach us
        self.gone = True
        self.queue.clear()
        self.size = 0
        self.loop.on_writable(self.fd, None)
        if self.on_written and dropped:
            self.on_written(dropped)  # what the reader will never take still frees credit
        if self.on_gone:
            self.on_gone()
        if drained:
            drained()

    def detach(self):
        """Forget the fd (its owner is about to close it)."""
        self.gone = True
        self.queue.clear()
        self.size = 0
        self.on_drained = None
        self.loop.on_writable(self.fd, None)


class LineReader:
    """Reads a pipe to its end and hands over whole lines, each cut to MAX_LOG_LINE."""

    def __init__(self, loop, fd, on_line):
        self.loop = loop
        self.fd = fd
        self.on_line = on_line
        self.partial = b""
        os.set_blocking(fd, False)
        loop.on_readable(fd, self._readable)

    def _readable(self):
        data = read_some(self.fd, READ_SIZE)
        if data is None:
            return
        if not data:
            self.close()
            return
        lines = (self.partial + data).split(b"\n")
        self.partial = lines.pop()[:MAX_LOG_LINE]
        for line in lines:
            self.on_line(line[:MAX_LOG_LINE].decode("utf-8", "replace").rstrip("\r"))

    def fail(self, reason):
        self.close()

    def close(self):
        if self.fd is None:
            return
        if self.partial:
            self.on_line(self.partial.decode("utf-8", "replace"))
            self.partial = b""
        self.loop.forget(self.fd)
        close_fd(self.fd)
        self.fd = None


class SpawnError(Exception):
    pass


# Signals a child must get back at their defaults: Python ignores SIGPIPE, and the
# server catches the rest. A GAHP that inherits an ignored SIGPIPE misbehaves.
RESET_SIGNALS = ("SIGPIPE", "SIGCHLD", "SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT", "SIGXFSZ")


def spawn(argv, env, cwd, stdin, stdout, stderr):
    """fork + exec argv in its own session with the given stdio and nothing else.

    The child reports a failed exec through a close-on-exec pipe, so the caller learns
    "no such file" at once instead of seeing a process that exits 127.
    """
    import signal

    report_r, report_w = os.pipe()
    try:
        pid = os.fork()
    except OSError as e:  # EAGAIN at the process limit, ENOMEM: a failure like any other
        os.close(report_r)
        os.close(report_w)
        raise SpawnError("cannot fork for %s: %s" % (argv[0], e.strerror))
    if pid == 0:
        try:
            os.setsid()
            os.dup2(stdin, 0)
            os.dup2(stdout, 1)
            os.dup2(stderr, 2)
            close_inherited_fds(keep=(report_w,))
            signal.set_wakeup_fd(-1)
            for name in RESET_SIGNALS:
                signal.signal(getattr(signal, name), signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_SETMASK, [])
            os.chdir(cwd)
            os.execve(argv[0], argv, env)
        except BaseException as e:
            try:
                os.write(report_w, ("%s: %s" % (argv[0], getattr(e, "strerror", None) or e)).encode())
            finally:
                os._exit(127)
    os.close(report_w)
    report = b""
    while True:
        chunk = os.read(report_r, 4096)
        if not chunk:
            break
        report += chunk
    os.close(report_r)
    if report:
        os.waitpid(pid, 0)
        raise SpawnError(report.decode("utf-8", "replace"))
    return pid


class Backoff:
    """When the next login may happen.

    At once after a link that held for LINK_STABLE, and at once, too, the first time a
    link that came up drops early: one drop is the network, not the login. Growing,
    jittered and capped while attempts keep failing or links keep flapping; and never
    more than MAX_LOGINS_PER_MINUTE, whatever happens.
    """

    def __init__(self, cap):
        self.cap = cap
        self.failures = 0
        self.attempts = []

    def attempted(self, now):
        self.attempts = [t for t in self.attempts if now - t < LOGIN_WINDOW] + [now]

    def next_delay(self, held_for, now):
        if held_for is not None and held_for >= LINK_STABLE:
            self.failures = 0
            delay = 0.0
        else:
            self.failures += 1
            steps = self.failures - (1 if held_for is not None else 0)
            delay = 0.0
            if steps > 0:
                jitter = int.from_bytes(os.urandom(2), "big") / 65535.0
                delay = min(self.cap, BACKOFF_FIRST * 2 ** min(steps - 1, 30)) * (0.75 + 0.5 * jitter)
        recent = [t for t in self.attempts if now - t < LOGIN_WINDOW]
        if len(recent) >= MAX_LOGINS_PER_MINUTE:
            delay = max(delay, recent[-MAX_LOGINS_PER_MINUTE] + LOGIN_WINDOW - now)
        return delay


# --------------------------------------------------------------------------- the server


class Layout:
    """Where the server finds its config, its transport, its GAHPs and its state.

    The default is ~/.rvgahp/; with -b BASEDIR (or $BLAHPD_LOCATION) it is HTCondor's
    own packaging: BASEDIR/etc/condor_config.ft-gahp, BASEDIR/bin/rvgahp_ssh and
    BASEDIR/bin/{blahpd,condor_ft-gahp}.
    """

    def __init__(self, basedir=None, config=None, transport=None):
        self.home = os.path.expanduser("~")
        self.basedir = basedir
        if basedir:
            self.config = config or os.path.join(basedir, "etc", "condor_config.ft-gahp")
            self.transport = transport or os.path.join(basedir, "bin", "rvgahp_ssh")
            self.gahp_dir = os.path.join(basedir, "bin")
        else:
            dot = os.path.join(self.home, ".rvgahp")
            self.config = config or os.path.join(dot, "condor_config.rvgahp")
            self.transport = transport or os.path.join(dot, "rvgahp_ssh")
            self.gahp_dir = None
        self.state_dir = os.path.dirname(os.path.abspath(self.config))
        self.pid_file = os.path.join(self.state_dir, "rvgahp_server.pid")


class Server:
    """Keeps one link up to the submit host and runs a GAHP for every session on it."""

    def __init__(self, log, layout, config):
        self.log = log
        self.layout = layout
        self.config = config
        self.config_stamp = self._stamp()
        self.loop = Loop(log)
        self.ping_interval = config.number("RVGAHP_PING_INTERVAL", DEFAULT_PING_INTERVAL, 0.05)
        self.ping_timeout = config.number("RVGAHP_PING_TIMEOUT", DEFAULT_PING_TIMEOUT, 0.1)
        self.backoff = Backoff(config.number("RVGAHP_BACKOFF_MAX", DEFAULT_BACKOFF_MAX, 0.0))
        self.gahp_stderr = config.get("RVGAHP_GAHP_STDERR") or os.path.join(layout.state_dir, "gahp_stderr.log")
        self.link = None
        self.attempt_started = None
        self.link_up_at = None
        self.failure = None  # why the current login attempt or link ended
        self.next_attempt = None  # the timer for the next login
        self.transport_pid = None
        self.transport_status = None
        self.children = {}  # pid -> callback(status)
        self.sessions = {}  # pid -> ServerSession, until the process is reaped
        self.spares = {}  # GAHP argv -> Spare: started ahead, for the next session of its kind
        self.want_spares = config.number("RVGAHP_SPARE_GAHPS", 1, 0) > 0
        self.stopping = False

    def run(self):
        import signal

        self.loop.on_signal(signal.SIGCHLD, self.reap)
        self.loop.on_signal(signal.SIGTERM, self.shutdown)
        self.loop.on_signal(signal.SIGINT, self.shutdown)
        self.loop.on_signal(signal.SIGHUP, self.log.reopen_after_sighup)
        self.log.info("rvgahp %s starting (Python %s); config %s" % (VERSION, sys.version.split()[0], self.config.path))
        self.connect()
        self.loop.run()
        self.log.info("stopped")
        return 0

    # -- the link

    def connect(self):
        if self.stopping:
            return
        now = time.monotonic()
        self.backoff.attempted(now)
        self.attempt_started = now
        self.link_up_at = None
        self.transport_status = None
        self.failure = None
        transport = self.layout.transport
        if not os.path.isfile(transport):
            self._cannot_start("transport %s does not exist; create it (see the README)" % transport)
            return
        fds = []
        try:
            for _ in range(3):
                fds.extend(os.pipe())
        except OSError as e:
            for fd in fds:
                close_fd(fd)
            self._cannot_start("cannot make pipes for the transport: %s" % e.strerror)
            return
        link_in, transport_out, transport_in, link_out, err_r, err_w = fds
        try:
            pid = spawn(["/bin/sh", transport], dict(os.environ), self.layout.home, transport_in, transport_out, err_w)
        except SpawnError as e:
            for fd in (link_in, link_out, err_r):
                close_fd(fd)
            self._cannot_start("cannot run the transport: %s" % e)
            return
        finally:
            for fd in (transport_in, transport_out, err_w):
                close_fd(fd)
        self.transport_pid = pid
        self.children[pid] = self.transport_exited
        self.log.info("link: started transport %s (pid %d)" % (transport, pid))
        LineReader(self.loop, err_r, self.transport_said)
        self.link = Link(self.loop, self.log, link_in, link_out, self)
        self.link.set_ping(self.ping_interval, self.ping_timeout)
        self.link.start(
            {
                "role": "server",
                "rvgahp": VERSION,
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "ping_interval": self.ping_interval,
                "ping_timeout": self.ping_timeout,
            }
        )

    def _cannot_start(self, reason):
        self.failure = reason
        self.transport_pid = None
        self.link = None
        self._attempt_over()

    def transport_said(self, line):
        # The proxy's own log lines come back over ssh's stderr already formatted.
        if " rvgahp_proxy[" in line[:60]:
            self.log.write_line(line)
        elif line.strip():
            self.log.info("transport: %s" % line)

    def on_noise(self, noise):
        lines = noise.decode("utf-8", "replace").splitlines()
        for line in lines[:10]:
            self.log.info("transport printed before the link started: %s" % line[:200])
        if len(lines) > 10:
            self.log.info("... and %d more lines" % (len(lines) - 10))

    def on_hello(self, fields):
        if fields.get("role") != "proxy":
            self.link.close("the peer is not an rvgahp_proxy (it says role=%r)" % fields.get("role"))
            return
        if fields.get("state") == "error":
            self.link.close("the proxy cannot serve: %s" % fields.get("reason", "no reason given"))
            return
        self.link_up_at = time.monotonic()
        standby = fields.get("state") == "standby"
        self.log.info(
            "link up%s: proxy pid %s on %s %s %s (rvgahp %s), %.2f s after the login began"
            % (
                " as a hot standby" if standby else "",
                fields.get("pid", "?"),
                fields.get("host", "?"),
                "waits for" if standby else "serves",
                fields.get("socket", "?"),
                fields.get("rvgahp", "?"),
                self.link_up_at - self.attempt_started,
            )
        )
        if standby:
            self.log.info("standing by: %s" % fields.get("reason", "the socket is busy"))

    def on_state(self, fields):
        if fields.get("state") == "active":
            self.log.info("link active: the standby proxy took over %s" % self.link.peer.get("socket", "the socket"))
        elif fields.get("state") == "error":
            self.link.close("the proxy cannot serve: %s" % fields.get("reason", "no reason given"))

    def on_link_closed(self, reason):
        if self.link_up_at is not None:
            self.log.info("link down after %.1f s: %s" % (time.monotonic() - self.link_up_at, reason))
        self.failure = reason
        # A transport that closed the link is on its way out: give it a moment, so its
        # exit status (ssh's 255, a shell's 127) is what we report, not our SIGTERM.
        self.stop_transport(grace=1.0 if self.link.ended_by_peer else 0.0)
        self._attempt_over()

    def stop_transport(self, grace=0.0):
        pid = self.transport_pid

        def alive():  # this transport, not just this pid number: pids get reused
            return pid is not None and self.transport_pid == pid and self.transport_status is None

        if not alive():
            return

        def term():
            if alive():
                signal_group(pid, "SIGTERM")
                signal_group(pid, "SIGCONT")  # a stopped (hung) transport must wake to die
                self.loop.call_later(TRANSPORT_KILL_AFTER, lambda: alive() and signal_group(pid, "SIGKILL"))

        if grace:
            self.loop.call_later(grace, term)
        else:
            term()

    def transport_exited(self, status):
        self.transport_status = status
        link = self.link
        if link is not None and not link.closed:
            # Let the link read what the transport printed last: it is often the diagnosis.
            self.loop.call_later(0.05, lambda: link.close("the transport ended (%s)" % status_text(describe_status(status))))
            return
        self._attempt_over()

    def _attempt_over(self):
        """Once the link is closed and its transport reaped, plan the next login."""
        if self.link is not None and not self.link.closed:
            return
        if self.transport_pid is not None and self.transport_pid in self.children:
            return
        if self.stopping:
            self._maybe_exit()
            return
        if self.next_attempt is not None:
            return
        if self.link_up_at is None:
            self.log.info("link attempt failed: %s" % self._diagnosis())
        held = None if self.link_up_at is None else time.monotonic() - self.link_up_at
        delay = self.backoff.next_delay(held, time.monotonic())
        if delay > 0:
            self.log.info("next login attempt in %.1f s (%d failed in a row)" % (delay, self.backoff.failures))
        else:
            self.log.info("reconnecting now")
        self.next_attempt = self.loop.call_later(delay, self._attempt_due)

    def _diagnosis(self):
        """Why a login did not give us a link, in the words most useful to an admin."""
        link_said_eof = self.link is not None and self.link.ended_by_peer
        if self.transport_status is not None and (link_said_eof or "transport ended" in self.failure):
            fields = describe_status(self.transport_status)
            return "the transport ended (%s)%s" % (status_text(fields), transport_hint(fields))
        return self.failure

    def _attempt_due(self):
        self.next_attempt = None
        self.connect()

    # -- sessions

    def on_open(self, cid, payload):
        link = self.link
        try:
            fields = decode_fields(payload)
        except ProtocolError as e:
            self.refuse(cid, "malformed request: %s" % e)
            return
        gahp = fields.get("gahp", "")
        if cid in link.channels or cid == 0:
            link.close("protocol error: OPEN for channel %d, which is in use" % cid)
            return
        if len(self.sessions) >= MAX_SESSIONS:
            self.refuse(cid, "this server already runs %d GAHPs (the limit)" % MAX_SESSIONS)
            return
        try:
            argv, env = self.gahp_command(gahp)
            spare = self.spares.pop(tuple(argv), None)
            if spare is not None:
                pid, stdin_w, stdout_r = spare.hand_over()
                origin = "a spare started %.1f s ago" % (time.monotonic() - spare.born)
            else:
                pid, stdin_w, stdout_r = self.spawn_gahp(argv, env)
                origin = "started now"
        except UserError as e:
            self.refuse(cid, str(e))
            return
        session = ServerSession(self, cid, gahp, pid, stdout_r, stdin_w)
        self.link.channels[cid] = session
        self.sessions[pid] = session
        self.children[pid] = session.exited
        link.send(ACCEPT, cid, encode_fields({"pid": pid}))
        session.begin_relay()
        self.log.info("session %d: %s runs as pid %d, %s (%s)" % (cid, gahp, pid, origin, argv[0]))
        if self.want_spares:
            self.loop.call_later(SPARE_AFTER, lambda: self.make_spare(gahp, argv, env))

    def refuse(self, cid, reason):
        self.log.info("session %d: refused: %s" % (cid, reason))
        self.link.send(REFUSE, cid, encode_fields({"reason": reason}))

    def current_config(self):
        """The config, re-read if the file changed, so edits apply to the next session."""
        stamp = self._stamp()
        if stamp != self.config_stamp:
            self.config = Config.load(self.config.path)
            self.config_stamp = stamp
            self.log.info("re-read config %s" % self.config.path)
            self.discard_spares()  # they run with the old settings
        return self.config

    def _stamp(self):
        try:
            st = os.stat(self.config.path)
            return (st.st_mtime, st.st_size, st.st_ino)
        except OSError:
            return None

    def gahp_command(self, gahp):
        if gahp not in GAHPS:
            raise UserError("unknown GAHP %r; this server runs %s" % (gahp[:80], ", ".join(sorted(GAHPS))))
        config = self.current_config()
        knob, binary, args = GAHPS[gahp]
        path = config.get(knob) or (os.path.join(self.layout.gahp_dir, binary) if self.layout.gahp_dir else "")
        if not path:
            raise UserError("%s is not set in %s" % (knob, config.path))
        if not os.path.isfile(path):
            raise UserError("%s %s (from %s) does not exist" % (knob, path, config.path))
        if not os.access(path, os.X_OK):
            raise UserError("%s %s (from %s) is not executable" % (knob, path, config.path))
        env = dict(os.environ)
        env["CONDOR_CONFIG"] = config.path
        for name in ("GLITE_LOCATION", "BLAHPD_LOCATION"):
            value = config.get(name)
            if value:
                env[name] = value
        return [path] + args, env

    def make_spare(self, gahp, argv, env):
        """Start a GAHP of this kind before anyone asks, so the next session's is up."""
        key = tuple(argv)
        if self.stopping or key in self.spares or self._stamp() != self.config_stamp:
            return
        try:
            pid, stdin_w, stdout_r = self.spawn_gahp(argv, env)
        except UserError as e:
            self.log.info("cannot start a spare %s: %s" % (gahp, e))
            return
        spare = Spare(self, key, gahp, pid, stdin_w, stdout_r)
        self.spares[key] = spare
        self.children[pid] = spare.exited

    def discard_spares(self):
        for spare in list(self.spares.values()):
            spare.discard()
        self.spares.clear()

    def spawn_gahp(self, argv, env):
        """fork + exec one GAHP; (pid, its stdin's write end, its stdout's read end)."""
        fds = []
        try:
            fds.extend(os.pipe())
            fds.extend(os.pipe())
        except OSError as e:
            for fd in fds:
                close_fd(fd)
            raise UserError("cannot make pipes for %s: %s" % (os.path.basename(argv[0]), e.strerror))
        stdin_r, stdin_w, stdout_r, stdout_w = fds
        try:
            stderr_fd = os.open(self.gahp_stderr, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        except OSError as e:
            for fd in fds:
                close_fd(fd)
            raise UserError("cannot open the GAHP stderr log %s: %s" % (self.gahp_stderr, e.strerror))
        try:
            pid = spawn(argv, env, self.layout.home, stdin_r, stdout_w, stderr_fd)
        except SpawnError as e:
            close_fd(stdin_w)
            close_fd(stdout_r)
            raise UserError("cannot start %s: %s" % (os.path.basename(argv[0]), e))
        finally:
            for fd in (stdin_r, stdout_w, stderr_fd):
                close_fd(fd)
        return pid, stdin_w, stdout_r

    def reap(self):
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            callback = self.children.pop(pid, None)
            if callback is not None:
                callback(status)
        self._maybe_exit()

    def gahp_gone(self, session):
        self.sessions.pop(session.pid, None)

    # -- signals

    def shutdown(self):
        if self.stopping:
            return
        self.stopping = True
        self.log.info("shutting down: closing the link and ending %d GAHPs" % len(self.sessions))
        self.discard_spares()
        if self.next_attempt is not None:
            self.next_attempt.cancel()
        if self.link is not None and not self.link.closed:
            self.link.close("the server is shutting down")
        self.stop_transport()
        # Give up waiting on anything that ignores EOF and SIGTERM; it gets SIGKILL.
        self.loop.call_later(GAHP_TERM_AFTER + GAHP_KILL_AFTER + 1.0, self.loop.stop)
        self._maybe_exit()

    def _maybe_exit(self):
        if self.stopping and not self.children:
            self.loop.stop()


def transport_hint(fields):
    code = fields.get("exit")
    if code == 255:
        return "; ssh failed: its messages are above"
    if code == 127:
        return "; a command was not found: check rvgahp_ssh, and that rvgahp_proxy is on the submit host's PATH"
    if code == 126:
        return "; a command was not executable"
    return ""


def signal_group(pid, name):
    import signal

    try:
        os.killpg(pid, getattr(signal, name))
    except OSError:
        pass
    return True


class Spare:
    """A GAHP started before anyone asked, its banner waiting in the pipe.

    One per kind in use, so a session start costs no GAHP start-up. A spare that dies
    idle is not replaced until a session needs its kind again, so a GAHP that crashes
    at start cannot turn into a fork loop.
    """

    def __init__(self, server, key, gahp, pid, stdin_w, stdout_r):
        self.server = server
        self.key = key
        self.gahp = gahp
        self.pid = pid
        self.stdin_w = stdin_w
        self.stdout_r = stdout_r
        self.born = time.monotonic()
        self.status = None

    def hand_over(self):
        """The process and its pipes, for a session; the spare lets go of them."""
        fds = (self.pid, self.stdin_w, self.stdout_r)
        self.stdin_w = self.stdout_r = None
        return fds

    def exited(self, status):
        self.status = status
        idle = self.server.spares.get(self.key) is self
        self.discard()
        if idle:
            del self.server.spares[self.key]
            self.server.log.info(
                "spare %s pid %d exited while idle (%s); the next session starts its own"
                % (self.gahp, self.pid, status_text(describe_status(status)))
            )

    def discard(self):
        """Close its pipes: it sees EOF and exits, and is made to if it does not."""
        close_fd(self.stdin_w)
        close_fd(self.stdout_r)
        self.stdin_w = self.stdout_r = None
        if self.status is None:
            # Our own status, not a pid lookup, says whether it still runs: a pid can be reused.
            loop = self.server.loop
            loop.call_later(GAHP_TERM_AFTER, lambda: self.status is None and signal_group(self.pid, "SIGTERM"))
            loop.call_later(GAHP_TERM_AFTER + GAHP_KILL_AFTER, lambda: self.status is None and signal_group(self.pid, "SIGKILL"))


class ServerSession(Channel):
    """A GAHP process on one channel: its stdout is the source, its stdin the sink."""

    def __init__(self, server, cid, gahp, pid, stdout_r, stdin_w):
        Channel.__init__(self, server.link, cid, stdout_r, stdin_w)
        self.server = server
        self.gahp = gahp
        self.pid = pid
        self.status = None
        self.timers = []

    def source_ended(self):
        self._maybe_finish()

    def exited(self, status):
        self.status = status
        for timer in self.timers:
            timer.cancel()
        self.server.gahp_gone(self)
        if not self.released and not self.source_done:
            # A grandchild may hold stdout open; don't let it keep the session alive.
            self.loop.call_later(EXIT_LINGER, self._linger_over)
        self._maybe_finish()

    def _linger_over(self):
        if self.released or self.source_done:
            return
        if not self.reading:  # held back by flow control: its output is still to come
            self.loop.call_later(EXIT_LINGER, self._linger_over)
            return
        self.end_source()

    def _maybe_finish(self):
        if self.released or not self.source_done or self.status is None:
            return
        fields = describe_status(self.status)
        self.link.send(CLOSE, self.cid, encode_fields(fields))
        self.log.info("session %d: %s pid %d ended (%s) after %s" % (self.cid, self.gahp, self.pid, status_text(fields), self.summary()))
        self.release()

    def peer_closed(self, fields):
        self.log.info("session %d: the client ended it (%s) after %s" % (self.cid, status_text(fields), self.summary()))
        self._abandon()

    def link_lost(self, reason):
        self.log.info("session %d: %s pid %d loses its link after %s" % (self.cid, self.gahp, self.pid, self.summary()))
        self._abandon()

    def _abandon(self):
        """Close the GAHP's pipes; it should exit on EOF, and is made to if it doesn't."""
        self.release()
        if self.status is None:
            self.timers.append(self.loop.call_later(GAHP_TERM_AFTER, self._terminate))

    def _terminate(self):
        if self.status is None:
            self.log.info("session %d: %s pid %d ignored EOF; sending SIGTERM" % (self.cid, self.gahp, self.pid))
            signal_group(self.pid, "SIGTERM")
            self.timers.append(self.loop.call_later(GAHP_KILL_AFTER, self._kill))

    def _kill(self):
        if self.status is None:
            self.log.info("session %d: %s pid %d ignored SIGTERM; sending SIGKILL" % (self.cid, self.gahp, self.pid))
            signal_group(self.pid, "SIGKILL")


# --------------------------------------------------------------------------- the proxy


class Proxy:
    """Owns SOCKPATH on the submit host and carries its clients' sessions on the link."""

    def __init__(self, log, sockpath):
        self.log = log
        self.sockpath = sockpath
        self.loop = Loop(log)
        self.listener = None
        self.lock_fd = None
        self.bound_inode = None
        self.link = None
        self.ready = False
        self.waiting = []  # sessions that arrived before the server's hello
        self.clients = set()
        self.draining = set()  # sessions whose GAHP has ended, still writing its last output
        self.next_cid = 0
        self.started = time.time()
        self.link_up_at = None
        self.sessions_total = 0
        self.sessions_refused = 0

    def run(self):
        import signal

        check_socket_path(self.sockpath)
        rfd, wfd = take_stdio_for_link()
        self.link = Link(self.loop, self.log, rfd, wfd, self)
        self.loop.on_signal(signal.SIGTERM, self.shutdown)
        self.loop.on_signal(signal.SIGINT, self.shutdown)
        self.loop.on_signal(signal.SIGHUP, self.log.reopen_after_sighup)
        hello = {"role": "proxy", "rvgahp": VERSION, "pid": os.getpid(), "host": socket.gethostname(), "socket": self.sockpath}
        try:
            self.claim_socket()
            hello["state"] = "active"
        except SocketBusy as e:
            # Another link serves the socket: keep this one up as a hot standby that
            # takes over when that one ends, without another ssh login.
            self.log.info("%s; standing by to take over when it ends" % e)
            hello.update(state="standby", reason=str(e))
            self.loop.call_later(STANDBY_POLL, self._try_takeover)
        except UserError as e:
            reason = str(e)
            self.log.info(reason)
            hello.update(state="error", reason=reason)
            self.link.start(hello)
            # Say why, then end: the server logs the reason and backs off.
            self.link.outbox.when_drained(lambda: self.link.close(reason))
            self.loop.run()
            return 1
        self.link.start(hello)
        self.loop.run()
        return 0

    def _try_takeover(self):
        if self.link.closed:
            return
        try:
            self.claim_socket()
        except SocketBusy:
            self.loop.call_later(STANDBY_POLL, self._try_takeover)
            return
        except UserError as e:
            reason = str(e)
            self.log.info(reason)
            self.link.send(STATE, 0, encode_fields({"state": "error", "reason": reason}))
            self.link.outbox.when_drained(lambda: self.link.close(reason))
            return
        self.log.info("took over %s: the link that served it has ended" % self.sockpath)
        self.link.send(STATE, 0, encode_fields({"state": "active"}))

    def claim_socket(self):
        """Bind SOCKPATH, replacing a dead socket but never stealing a live one.

        A lock on SOCKPATH.lock, held for the proxy's life, settles races between two
        proxies; the connect probe catches a live owner that takes no lock.
        """
        import fcntl

        lock_path = self.sockpath + ".lock"
        try:
            lock_fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        except OSError as e:
            raise UserError("cannot open the lock file %s: %s" % (lock_path, e.strerror))
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(lock_fd)
            raise SocketBusy("%s is busy: another live rvgahp_proxy serves it" % self.sockpath)
        if socket_is_live(self.sockpath):
            os.close(lock_fd)
            raise SocketBusy("%s is busy: a live process that is not an rvgahp_proxy owns it" % self.sockpath)
        self.lock_fd = lock_fd
        try:
            os.unlink(self.sockpath)
            self.log.info("removed the dead socket %s" % self.sockpath)
        except FileNotFoundError:
            pass
        except OSError as e:
            raise UserError("cannot remove the dead socket %s: %s" % (self.sockpath, e.strerror))
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)  # born 0600: no window where others may connect
        try:
            listener.bind(self.sockpath)
        except OSError as e:
            listener.close()
            raise UserError("cannot create socket %s: %s" % (self.sockpath, e.strerror))
        finally:
            os.umask(old_umask)
        os.chmod(self.sockpath, 0o600)
        listener.listen(128)
        listener.setblocking(False)
        self.listener = listener
        self.bound_inode = os.stat(self.sockpath).st_ino
        self.loop.on_readable(listener.fileno(), self.accept)

    def release_socket(self):
        if self.listener is None:
            return
        self.loop.forget(self.listener.fileno())
        try:
            if os.stat(self.sockpath).st_ino == self.bound_inode:
                os.unlink(self.sockpath)
        except OSError:
            pass
        self.listener.close()
        self.listener = None

    def accept(self):
        while True:
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE):
                    # Level-triggered: left registered, this would spin. Try again in a second.
                    self.log.info("cannot accept a client: %s; pausing accepts for 1 s" % e.strerror)
                    self.loop.on_readable(self.listener.fileno(), None)
                    self.loop.call_later(1.0, self._resume_accepts)
                    return
                raise
            conn = ClientConn(self, sock)
            self.clients.add(conn)
            uid = peer_uid(sock)
            if uid != os.getuid():
                reason = "only uid %d may use %s, and this client is uid %s" % (os.getuid(), self.sockpath, uid)
                self.log.info("rejected a client: %s" % reason)
                conn.reader = None  # it gets no hearing
                conn.finish(REFUSE, {"reason": reason, "by": "proxy"})

    def _resume_accepts(self):
        if self.listener is not None:
            self.loop.on_readable(self.listener.fileno(), self.accept)

    def open_session(self, conn, fields, fds):
        gahp = fields.get("gahp", "")
        if len(self.link.channels) + len(self.waiting) >= MAX_SESSIONS:
            conn.finish(REFUSE, {"reason": "the proxy already carries %d sessions (the limit)" % MAX_SESSIONS, "by": "proxy"})
            for fd in fds:
                close_fd(fd)
            return
        cid = self._new_cid()
        self.sessions_total += 1
        session = ProxySession(self, cid, conn, gahp, fds[0], fds[1])
        conn.session = session
        self.link.channels[cid] = session
        if self.ready:
            session.send_open()
        else:
            self.waiting.append(session)

    def status(self):
        """What `rvgahp_client --status` shows an admin."""
        peer = self.link.peer or {}
        rtt = self.link.rtt
        return {
            "socket": self.sockpath,
            "proxy": "pid %d on %s, rvgahp %s, up since %s" % (os.getpid(), socket.gethostname(), VERSION, timestamp(self.started)[:19]),
            "link": "up since %s" % timestamp(self.link_up_at)[:19] if self.link_up_at else "waiting for the server's hello",
            "server": "pid %s on %s, rvgahp %s" % (peer.get("pid", "?"), peer.get("host", "?"), peer.get("rvgahp", "?")),
            "ping": "every %g s, dead after %g s, last round trip %s"
            % (self.link.ping_interval, self.link.ping_timeout, "%.1f ms" % (rtt * 1000) if rtt is not None else "not yet measured"),
            "sessions": "%d open, %d since the link came up, %d refused"
            % (len(self.link.channels), self.sessions_total, self.sessions_refused),
        }

    def _new_cid(self):
        while True:
            self.next_cid = self.next_cid % 0xFFFFFFFF + 1
            if self.next_cid not in self.link.channels:
                return self.next_cid

    def on_hello(self, fields):
        if fields.get("role") != "server":
            self.link.close("the peer is not an rvgahp_server (it says role=%r)" % fields.get("role"))
            return
        try:
            interval = float(fields.get("ping_interval", DEFAULT_PING_INTERVAL))
            timeout = float(fields.get("ping_timeout", DEFAULT_PING_TIMEOUT))
        except ValueError:
            interval, timeout = DEFAULT_PING_INTERVAL, DEFAULT_PING_TIMEOUT
        self.link.set_ping(max(interval, 0.05), max(timeout, 0.1))
        self.log.info(
            "link up: server pid %s on %s (rvgahp %s)" % (fields.get("pid", "?"), fields.get("host", "?"), fields.get("rvgahp", "?"))
        )
        self.ready = True
        self.link_up_at = time.time()
        waiting, self.waiting = self.waiting, []
        for session in waiting:
            if not session.released:
                session.send_open()

    def on_open(self, cid, payload):
        raise ProtocolError("the server tried to open a channel")

    def on_state(self, fields):
        raise ProtocolError("the server sent a STATE frame")

    def on_noise(self, noise):
        self.log.info("ignored %d bytes before the server's link start" % len(noise))

    def on_link_closed(self, reason):
        self.log.info("link down: %s" % reason)
        # The socket goes first, so no new client reaches a proxy that cannot serve it.
        self.release_socket()
        for session in self.waiting:
            session.link_lost(reason)
        for conn in list(self.clients):
            if conn.session is None:
                conn.finish(RETRY, {"reason": reason})
        self._stop_when_drained(time.monotonic() + 10.0)

    def _stop_when_drained(self, deadline):
        """Exit once the sessions whose GAHP already ended have delivered its output."""
        if self.draining and time.monotonic() < deadline:
            self.loop.call_later(0.1, lambda: self._stop_when_drained(deadline))
        else:
            self.loop.stop()

    def shutdown(self):
        self.log.info("shutting down (signal)")
        self.link.close("the proxy was told to stop")


class SocketBusy(UserError):
    """Someone alive serves the socket; we must not take it."""


def check_socket_path(path):
    limit = 107  # sizeof(sun_path) on Linux, less the trailing NUL
    size = len(os.fsencode(path))
    if size > limit:
        raise UserError("socket path %s is %d bytes; AF_UNIX allows at most %d, so choose a shorter path" % (path, size, limit))


def socket_is_live(path):
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
        return True
    except OSError:
        return False
    finally:
        probe.close()


def peer_uid(sock):
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


def take_stdio_for_link():
    """Move the link off fds 0 and 1, so a stray print can never corrupt it."""
    rfd, wfd = os.dup(0), os.dup(1)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    os.close(devnull)
    return rfd, wfd


class ClientConn:
    """One rvgahp_client on the socket: its request, the fds it hands over, the replies."""

    def __init__(self, proxy, sock):
        self.proxy = proxy
        self.loop = proxy.loop
        self.sock = sock
        self.fd = sock.fileno()
        self.reader = FrameReader()
        self.session = None
        self.closed = False
        sock.setblocking(False)
        self.outbox = Outbox(self.loop, self.fd, on_gone=self.gone)
        self.loop.on_readable(self.fd, self._readable)

    def _readable(self):
        import array

        try:
            data, ancdata, flags, _ = self.sock.recvmsg(READ_SIZE, socket.CMSG_SPACE(2 * 4))
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            if e.errno not in GONE:
                raise
            data, ancdata, flags = b"", [], 0
        fds = []
        for level, kind, blob in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.extend(array.array("i", blob[: len(blob) - len(blob) % 4]))
        if not data:
            for fd in fds:
                close_fd(fd)
            self.gone()
            return
        if self.session is not None or self.reader is None:
            for fd in fds:  # nothing more is expected from a client; never leak what it sends
                close_fd(fd)
            return
        try:
            if flags & socket.MSG_CTRUNC or len(fds) > 2:
                raise ProtocolError("a request with more than two fds")
            frames = self.reader.feed(data)
            if not frames and len(self.reader.buf) > MAX_FIELDS + HEADER.size:
                raise ProtocolError("an overlong request")
            if not frames:
                raise ProtocolError("a request split from its fds")
            kind, _, payload = frames[0]
            if kind == STATUS:
                for fd in fds:
                    close_fd(fd)
                self.reader = None
                self.finish(STATUS, self.proxy.status())
                return
            if kind != OPEN:
                raise ProtocolError("frame type %d instead of a request" % kind)
            fields = decode_fields(payload)
            check_request(fields)
            mismatch = protocol_mismatch(fields, self.proxy.sockpath)
            if len(fds) != 2:
                raise ProtocolError("a request without its stdin and stdout")
        except ProtocolError as e:
            for fd in fds:
                close_fd(fd)
            self.proxy.log.info("refused a client: %s" % e)
            self.finish(REFUSE, {"reason": "malformed request: %s" % e, "by": "proxy"})
            return
        self.reader = None
        if mismatch:
            for fd in fds:
                close_fd(fd)
            self.proxy.log.info("refused a client: %s" % mismatch)
            self.finish(REFUSE, {"reason": mismatch, "by": "proxy"})
            return
        self.proxy.open_session(self, fields, fds)

    def reply(self, kind, fields):
        if not self.closed:
            self.outbox.write(frame(kind, 0, encode_fields(fields)))

    def finish(self, kind, fields):
        """Send a last reply, then close once it is out."""
        self.reply(kind, fields)
        self.outbox.when_drained(self.close)

    def finish_line(self, line):
        """End an accepted session's socket with its status line."""
        if not self.closed:
            self.outbox.write(line.encode("utf-8"))
        self.outbox.when_drained(self.close)

    def gone(self):
        """The client hung up (it exited, or was killed)."""
        session = self.session
        self.close()
        if session is not None:
            session.client_gone()

    def fail(self, reason):
        self.gone()

    def close(self):
        if self.closed:
            return
        self.closed = True
        self.outbox.detach()
        self.loop.forget(self.fd)
        self.sock.close()
        self.proxy.clients.discard(self)


def check_request(fields):
    # Which GAHPs exist is the server's to say (it has the config); we only need a name.
    if not fields.get("gahp"):
        raise ProtocolError("no GAHP named")


def protocol_mismatch(fields, sockpath):
    """Why this proxy cannot serve this client, or None if it can."""
    theirs = fields.get("protocol", "0")
    if theirs == str(CLIENT_PROTOCOL):
        return None
    return (
        "this rvgahp_client (rvgahp %s) speaks client protocol %s, and the rvgahp_proxy on %s (pid %d, rvgahp %s) speaks %d; "
        "after upgrading rvgahp.pyz, restart the link by stopping that proxy (the server reconnects)"
        % (fields.get("rvgahp", "before 1.0.0"), theirs, sockpath, os.getpid(), VERSION, CLIENT_PROTOCOL)
    )


class ProxySession(Channel):
    """A client's session: the GridManager's stdin is the source, its stdout the sink."""

    def __init__(self, proxy, cid, conn, gahp, stdin_fd, stdout_fd):
        Channel.__init__(self, proxy.link, cid, stdin_fd, stdout_fd)
        self.proxy = proxy
        self.conn = conn
        self.gahp = gahp
        self.state = "waiting"

    def send_open(self):
        self.state = "opening"
        self.link.send(OPEN, self.cid, encode_fields({"gahp": self.gahp}))

    def accepted(self, fields):
        self.state = "open"
        self.log.info("session %d: %s runs as pid %s on the cluster" % (self.cid, self.gahp, fields.get("pid", "?")))
        self.conn.reply(ACCEPT, fields)
        self.begin_relay()

    def refused(self, fields):
        self.proxy.sessions_refused += 1
        self.log.info("session %d: %s refused: %s" % (self.cid, self.gahp, fields.get("reason", "?")))
        self.conn.finish(REFUSE, fields)
        self.release()

    def peer_closed(self, fields):
        """The GAHP is done and all its output has arrived: deliver it, then report."""
        if self.link.channels.get(self.cid) is self:
            del self.link.channels[self.cid]
        self.proxy.draining.add(self)
        self.relaying = False
        if not self.source_done:
            self.source_done = True
            self.loop.forget(self.source_fd)
            close_fd(self.source_fd)

        def delivered():
            self.end_sink()
            self.log.info("session %d: %s ended (%s) after %s" % (self.cid, self.gahp, status_text(fields), self.summary()))
            self.conn.finish_line(status_line(fields))
            self.release()
            self.proxy.draining.discard(self)

        self.sink.when_drained(delivered)

    def client_gone(self):
        self.proxy.draining.discard(self)
        if self.released:
            return
        if self.state != "waiting":
            self.link.send(CLOSE, self.cid, encode_fields({"error": "the client went away"}))
        self.log.info("session %d: the client went away after %s" % (self.cid, self.summary()))
        self.release()

    def link_lost(self, reason):
        if self.released:
            return
        if self.state == "open":
            self.conn.finish_line(status_line({"error": "the link to the cluster went down mid-session (%s)" % reason}))
        else:
            self.conn.finish(RETRY, {"reason": reason})
        self.release()


# --------------------------------------------------------------------------- the client

CLIENT_VALUE_OPTIONS = (
    "--rgahp-user",
    "--rgahp-key",
    "--rgahp-pass",
    "--rgahp-glite",
    "--rgahp-script",
    "--rvgahp-socket",
    "--rvgahp-wait",
)
CLIENT_FLAG_OPTIONS = ("--rgahp-nokey", "--rgahp-nopass", "--rgahp-nobatchmode", "--rgahp-nologin")

CLIENT_USAGE = (
    """\
usage: rvgahp_client SOCKPATH GAHP_NAME
       rvgahp_client [--rgahp-* ...] [user@host[:port]] --rvgahp-socket SOCKPATH [--] GAHP_NAME
       rvgahp_client --status SOCKPATH

HTCondor's REMOTE_GAHP. Asks the rvgahp_proxy on SOCKPATH for a GAHP on the cluster
(blahpd, batch_gahp or condor_ft-gahp) and connects it to this process's stdin and
stdout. The other --rgahp-* options of HTCondor's remote_gahp are accepted and ignored.

  --rvgahp-wait SECONDS   how long to wait for a server to be connected
                          (default %g, or $RVGAHP_WAIT)
  --status SOCKPATH       show the state of the link behind SOCKPATH and exit
"""
    % DEFAULT_CLIENT_WAIT
)


class UsageError(UserError):
    pass


class GahpKilled(UserError):
    """The GAHP died of a signal: say so, and exit as a shell would (128 + signal)."""

    def __init__(self, status, message):
        UserError.__init__(self, message)
        self.status = status


def parse_client_args(args):
    """(socket path, GAHP name, wait) from either argv style the GridManager produces."""
    if not args:
        raise UsageError("no GAHP named; usage: rvgahp_client SOCKPATH GAHP_NAME")
    gahp, rest = args[-1], args[:-1]
    options, positional = {}, []
    i = 0
    while i < len(rest):
        arg = rest[i]
        name, has_value, value = arg.partition("=")
        if arg == "--":
            positional.extend(rest[i + 1 :])
            break
        if name in CLIENT_VALUE_OPTIONS:
            if not has_value:
                if i + 1 >= len(rest):
                    raise UsageError("option %s needs a value" % arg)
                i += 1
                value = rest[i]
            options[name] = value
        elif arg in CLIENT_FLAG_OPTIONS:
            pass
        elif arg.startswith("-"):
            raise UsageError("unknown option %s" % arg)
        else:
            positional.append(arg)
        i += 1
    if gahp.startswith("-"):
        raise UsageError("the last argument must be the GAHP name, not %s" % gahp)
    sockpath = options.get("--rvgahp-socket") or (positional[0] if positional else "")
    if not sockpath:
        raise UsageError("no socket path; usage: rvgahp_client SOCKPATH GAHP_NAME")
    if "/" not in sockpath and ("@" in sockpath or not os.path.exists(sockpath)):
        raise UsageError("%r looks like a host, not a socket path; add --rvgahp-socket SOCKPATH to grid_resource" % sockpath)
    raw_wait = options.get("--rvgahp-wait") or os.environ.get("RVGAHP_WAIT") or str(DEFAULT_CLIENT_WAIT)
    try:
        wait = float(raw_wait)
    except ValueError:
        wait = -1.0
    if not 0 <= wait <= 3600:
        raise UsageError("the wait must be 0 to 3600 seconds, not %r" % raw_wait)
    return sockpath, gahp, wait


class Handoff:
    """The stdin and stdout the proxy will use for the session.

    Pipes and sockets (what the GridManager gives us) are handed over as they are, so
    the client is not in the data path at all. Anything else, such as a terminal, gets
    a pipe that a thread of ours pumps, because the proxy could not poll it.
    """

    def __init__(self):
        self.fds = []
        self.ours = []  # our copies of the handed-over pipe ends, closed at completion
        self.pumps = []
        for fd, inbound in ((0, True), (1, False)):
            try:
                direct = fd_is_streamable(fd)
            except OSError:
                raise UserError("standard %s is closed" % ("input" if inbound else "output"))
            if direct:
                self.fds.append(fd)
                continue
            r, w = os.pipe()
            if inbound:
                self.fds.append(r)
                self.ours.append(r)
                self.pumps.append(self._pump(0, w))
            else:
                self.fds.append(w)
                self.ours.append(w)
                self.pumps.append(self._pump(r, 1))

    def _pump(self, src, dst):
        import threading

        def run():
            try:
                while True:
                    data = os.read(src, READ_SIZE)
                    if not data:
                        break
                    os.write(dst, data)
            except OSError:
                pass
            if dst != 1:
                close_fd(dst)  # EOF onward; our own stdout is left alone

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        return thread

    def complete(self):
        """The proxy has the fds: let go of ours, so EOF travels as it should."""
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in self.fds:
            if fd in (0, 1):
                os.dup2(devnull, fd)
        close_fd(devnull)
        for fd in self.ours:
            close_fd(fd)

    def finish(self):
        """After the session: let the output pump deliver what is left."""
        if len(self.pumps) and self.fds[1] != 1:
            self.pumps[-1].join(10)


def connect_to_proxy(sockpath, deadline, wait):
    check_socket_path(sockpath)
    delay = 0.02
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(max(deadline - time.monotonic(), 1.0))  # a full backlog blocks connect()
        try:
            sock.connect(sockpath)
            return sock
        except socket.timeout:
            sock.close()
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
        except PermissionError:
            sock.close()
            raise UserError("cannot connect to %s: permission denied; the socket belongs to another user" % sockpath)
        except OSError as e:
            sock.close()
            raise UserError("cannot connect to %s: %s" % (sockpath, e.strerror or e))
        left = deadline - time.monotonic()
        if left <= 0:
            raise UserError(
                "no rvgahp server is connected to %s (waited %g s); is rvgahp_server running on the cluster?" % (sockpath, wait)
            )
        time.sleep(min(delay, left))
        delay = min(delay * 2, 0.25)


def read_reply(sock, deadline):
    """The proxy's next reply as (kind, fields); None if it hung up; raises on timeout.

    It reads exactly one frame and not a byte more: what follows an ACCEPT is the
    status line, and that belongs to whoever waits for it, perhaps a shell.
    """
    header = recv_exactly(sock, HEADER.size, deadline)
    if header is None:
        return None
    kind, _, length = HEADER.unpack(header)
    if length > MAX_FIELDS:
        raise UserError("the rvgahp proxy sent a %d-byte reply; is something else listening on the socket?" % length)
    payload = recv_exactly(sock, length, deadline)
    if payload is None:
        return None
    return kind, decode_fields(payload)


def recv_exactly(sock, size, deadline):
    data = b""
    while len(data) < size:
        if deadline is None:
            sock.settimeout(None)
        else:
            left = deadline - time.monotonic()
            if left <= 0:
                raise socket.timeout()
            sock.settimeout(left)
        try:
            chunk = sock.recv(size - len(data))
        except socket.timeout:
            raise
        except OSError:
            chunk = b""
        if not chunk:
            return None
        data += chunk
    return data


# The client's last act when its stdin and stdout are handed over: become a shell that
# waits for the status line and exits as the GAHP did. A Python interpreter idling for
# hours costs 10-20 MB per session on the submit host; a shell costs one or two.
# The GAHP's name and the socket are arguments, never part of the script.
WAIT_SCRIPT = """\
IFS= read -r status <&3
n=${status#* }
case $n in ''|*[!0-9]*) n=x ;; esac
case $status in
"exit "[0-9]*) [ "$n" != x ] && exit "$n" ;;
"signal "[0-9]*) [ "$n" != x ] && echo "rvgahp_client: $1 was killed by signal $n on the cluster" >&2 && exit $((128 + n)) ;;
"error "*) echo "rvgahp_client: $1 session ended: ${status#error }" >&2; exit 1 ;;
esac
echo "rvgahp_client: lost the rvgahp proxy on $2 mid-session; is the link to the cluster down?" >&2
exit 1
"""


def wait_in_shell(sock, gahp, sockpath):
    """exec /bin/sh with the socket on fd 3; returns only if that is impossible."""
    sock.setblocking(True)  # a timeout left O_NONBLOCK set; the shell's read would see EAGAIN as EOF
    fd = sock.fileno()
    if fd == 3:
        os.set_inheritable(3, True)
    else:
        os.dup2(fd, 3)
    try:
        os.execv("/bin/sh", ["rvgahp_client", "-c", WAIT_SCRIPT, "rvgahp_client", gahp, sockpath])
    except OSError:
        pass


def wait_in_python(sock, gahp, sockpath):
    """The same wait as WAIT_SCRIPT, for when our own threads must keep pumping."""
    line = b""
    sock.settimeout(None)
    while not line.endswith(b"\n"):
        try:
            chunk = sock.recv(MAX_FIELDS)
        except OSError:
            chunk = b""
        if not chunk:
            break
        line += chunk
    word, _, rest = line.decode("utf-8", "replace").strip().partition(" ")
    if word == "exit" and is_small_number(rest):
        return int(rest)
    if word == "signal" and is_small_number(rest):
        raise GahpKilled(128 + int(rest), "%s was killed by signal %s on the cluster" % (gahp, rest))
    if word == "error":
        raise UserError("%s session ended: %s" % (gahp, rest))
    raise UserError("lost the rvgahp proxy on %s mid-session; is the link to the cluster down?" % sockpath)


def run_client(sockpath, gahp, wait):
    """Start a session and return the GAHP's exit status, or raise UserError."""
    import array

    handoff = Handoff()
    deadline = time.monotonic() + wait
    request = frame(OPEN, 0, encode_fields({"gahp": gahp, "rvgahp": VERSION, "protocol": CLIENT_PROTOCOL}))
    while True:
        sock = connect_to_proxy(sockpath, deadline, wait)
        try:
            sock.sendmsg([request], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", handoff.fds))])
        except OSError:
            pass  # the proxy may have answered and hung up before reading us: hear what it said
        try:
            # The wait was for a link; starting the GAHP gets its own time on top.
            reply = read_reply(sock, max(deadline, time.monotonic() + START_TIMEOUT))
        except socket.timeout:
            raise UserError("the rvgahp server did not start %s within %g s" % (gahp, START_TIMEOUT))
        if reply is not None and reply[0] == ACCEPT:
            break
        sock.close()
        if reply is not None and reply[0] == REFUSE:
            by = reply[1].get("by", "server")
            raise UserError("the rvgahp %s refused %s: %s" % (by, gahp, reply[1].get("reason", "no reason given")))
        if reply is not None and reply[0] != RETRY:
            raise UserError("unexpected reply %s from the rvgahp proxy" % FRAME_NAMES.get(reply[0], reply[0]))
        # The link went down before our GAHP started; a new one may come up in time.
        if time.monotonic() >= deadline:
            raise UserError(
                "no rvgahp server is connected to %s (waited %g s); is rvgahp_server running on the cluster?" % (sockpath, wait)
            )
        time.sleep(0.05)
    handoff.complete()
    if not handoff.pumps:
        wait_in_shell(sock, gahp, sockpath)
    try:
        return wait_in_python(sock, gahp, sockpath)
    finally:
        sock.close()
        handoff.finish()


def show_status(sockpath):
    """Ask the proxy how its link is, for an admin at a terminal."""
    check_socket_path(sockpath)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(sockpath)
    except OSError as e:
        sock.close()
        raise UserError(
            "no rvgahp proxy is serving %s (%s): the link is down, or rvgahp_server is not running on the cluster"
            % (sockpath, e.strerror or e)
        )
    sock.sendall(frame(STATUS, 0))
    try:
        reply = read_reply(sock, time.monotonic() + 10)
    except socket.timeout:
        reply = None
    sock.close()
    if reply is None or reply[0] != STATUS:
        raise UserError("the rvgahp proxy on %s did not answer a status request" % sockpath)
    for key, value in reply[1].items():
        sys.stdout.write("%-9s %s\n" % (key + ":", value))
    return 0


def client_main(args):
    if args in (["--help"], ["-h"]):
        sys.stdout.write(CLIENT_USAGE)
        return 0
    if args == ["--version"]:
        sys.stdout.write("rvgahp_client %s\n" % VERSION)
        return 0
    if args[:1] == ["--status"]:
        if len(args) != 2:
            raise UsageError("usage: rvgahp_client --status SOCKPATH")
        return show_status(args[1])
    sockpath, gahp, wait = parse_client_args(args)
    return run_client(sockpath, gahp, wait)


# --------------------------------------------------------------------------- the command line


def proxy_main(args):
    import argparse

    parser = argparse.ArgumentParser(
        prog="rvgahp_proxy",
        description="Run by the server's ssh on the submit host: owns SOCKPATH and carries its clients' sessions on the link.",
    )
    parser.add_argument("sockpath", help="the UNIX socket to own, e.g. /tmp/user.hpcc.sock")
    parser.add_argument("--log", metavar="FILE", help="also log here (default: SOCKPATH.log)")
    parser.add_argument("--no-log-file", action="store_true", help="log to stderr only")
    parser.add_argument("--log-max-size", type=int, default=10 * 1000 * 1000, metavar="BYTES", help="rotate the log file past this size")
    parser.add_argument("-v", "--verbose", action="store_true")
    parser.add_argument("--version", action="version", version="rvgahp_proxy %s" % VERSION)
    opts = parser.parse_args(args)
    log = Log("proxy")
    log.verbose = opts.verbose
    check_socket_path(opts.sockpath)
    if not opts.no_log_file:
        log.to_file(opts.log or opts.sockpath + ".log", max_bytes=opts.log_max_size)
        log.echo_fd = 2  # ssh carries stderr back to the server's log
    raise_fd_limit()
    return Proxy(log, opts.sockpath).run()


def server_main(args):
    import argparse

    parser = argparse.ArgumentParser(
        prog="rvgahp_server",
        description="Run on the cluster's login node: keep an ssh link to the submit host up and start GAHPs for its sessions.",
    )
    parser.add_argument("-d", dest="detach", action="store_true", help="detach from the terminal and run as a daemon")
    parser.add_argument("-l", dest="logfile", metavar="LOGFILE", help="append the log to this file")
    parser.add_argument(
        "-b",
        dest="basedir",
        metavar="BASEDIR",
        help="HTCondor's layout: BASEDIR/etc/condor_config.ft-gahp, BASEDIR/bin/{rvgahp_ssh,blahpd,condor_ft-gahp}",
    )
    parser.add_argument("-c", dest="config", metavar="CONFIG", help="the config file (default ~/.rvgahp/condor_config.rvgahp)")
    parser.add_argument(
        "-t", dest="transport", metavar="TRANSPORT", help="the transport script run with /bin/sh (default ~/.rvgahp/rvgahp_ssh)"
    )
    parser.add_argument("-v", dest="verbose", action="store_true", help="log more")
    parser.add_argument("--version", action="version", version="rvgahp_server %s" % VERSION)
    opts = parser.parse_args(args)
    ensure_std_fds()  # first: a log or lock opened as fd 0-2 would be clobbered later
    log = Log("server")
    log.verbose = opts.verbose
    layout = Layout(opts.basedir or os.environ.get("BLAHPD_LOCATION") or None, opts.config, opts.transport)
    config = Config.load(layout.config)
    max_log = config.number("RVGAHP_LOG_MAX_SIZE", 10 * 1000 * 1000, 0)
    logfile = opts.logfile or (os.path.join(layout.state_dir, "rvgahp_server.log") if opts.detach else None)
    if logfile:
        log.to_file(logfile, max_bytes=int(max_log))
    lock_fd = take_pid_lock(layout.pid_file)
    if lock_fd is None:
        return 0
    if opts.detach:
        daemonize(log)
    write_pid(lock_fd)
    raise_fd_limit()
    return Server(log, layout, config).run()


def take_pid_lock(path):
    """An exclusive lock held for the server's life; None if another server has it."""
    import fcntl

    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as e:
        raise UserError("cannot open the pid file %s: %s" % (path, e.strerror))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        other = os.read(fd, 64).decode("ascii", "replace").strip() or "?"
        os.close(fd)
        # stdout, not stderr: this is the expected answer to cron's repeated starts,
        # and a crontab can discard it while cron still mails real errors.
        sys.stdout.write("rvgahp_server: already running (pid %s)\n" % other)
        return None
    return fd


def write_pid(fd):
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, b"%d\n" % os.getpid())


def daemonize(log):
    """Fork, setsid, fork again, chdir /, and point stdio at the log or /dev/null."""
    if os.fork() > 0:
        os._exit(0)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    os.chdir("/")
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    out = log.fd if log.fd > 2 else devnull
    os.dup2(out, 1)
    os.dup2(out, 2)
    close_fd(devnull)


def ensure_std_fds():
    """Cron may start us with fds 0-2 closed; a pipe landing there would be clobbered."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            os.dup2(os.open(os.devnull, os.O_RDWR), fd)


USAGE = """\
usage: rvgahp.pyz server [-d] [-l LOGFILE] [-b BASEDIR]    (on the cluster login node)
       rvgahp.pyz proxy SOCKPATH                            (run by the server's ssh)
       rvgahp.pyz client SOCKPATH GAHP_NAME                 (HTCondor's REMOTE_GAHP)

Symlinked as rvgahp_server, rvgahp_proxy or rvgahp_client, the name picks the role.
Each role takes --help.
"""


def role_of(program):
    name = os.path.basename(program)
    for suffix in (".pyz", ".py"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    if name.startswith("rvgahp_") and name[7:] in ROLES:
        return name[7:]
    return None


def main(argv=None):
    argv = sys.argv if argv is None else argv
    role = role_of(argv[0]) if argv else None
    args = list(argv[1:])
    if role is None:
        if args and args[0] in ROLES:
            role, args = args[0], args[1:]
        elif args == ["--version"]:
            sys.stdout.write("rvgahp %s\n" % VERSION)
            return 0
        else:
            (sys.stdout if args in (["--help"], ["-h"]) else sys.stderr).write(USAGE)
            return 0 if args in (["--help"], ["-h"]) else 2
    run = {"server": server_main, "proxy": proxy_main, "client": client_main}[role]
    try:
        return run(args)
    except UsageError as e:
        sys.stderr.write("rvgahp_%s: %s\n" % (role, e))
        return 2
    except GahpKilled as e:
        sys.stderr.write("rvgahp_%s: %s\n" % (role, e))
        return e.status
    except UserError as e:
        sys.stderr.write("rvgahp_%s: %s\n" % (role, e))
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

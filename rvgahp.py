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
spare GAHP kept ready, no GAHP start-up either. The ft-gahp's file transfers travel the
same link: each TCP connection it makes to its session's port on the cluster's
127.0.0.1 becomes a channel that the proxy connects on to the GridManager, so the
cluster needs no way in to the submit host but the link it dialled itself.

One role per process, chosen by the name it runs under (rvgahp_server, rvgahp_proxy,
rvgahp_client) or by a first-argument subcommand. Standard library only; Python 3.6+.

Where things are, in reading order:
  imports            the standard library; the few imported where used say what they cost
  constants          limits, timings, the ranges numbers are clamped to, the config knobs,
                     the GAHP allow-list
  logging            Log: the line format, size rotation, reopening on SIGHUP; printable,
                     open_private and path_problem (files that are not files, by kind)
  config             Config: HTCondor's syntax, lazy macro expansion, checked knobs;
                     whole_number and plain_number, the one way numbers come in from outside
  framing            frame types, features, fields, FrameReader; a GAHP's exit status
                     as fields and as the line that ends a client's socket (exit_*)
  the link           Link: start line, hello, pings, probes (also for a session's
                     unanswered command), dispatch
                     Channel: one stream pair (a session or a tunnel connection), with credit
  event-loop pieces  fd helpers, Poller and Loop, Outbox, LineReader, spawn, Child,
                     LogSummary (what other users can make us log), Backoff
  the server         Layout; LinkKeeper (transport, back-off, login cap, diagnosis);
                     GahpLauncher (allow-list, config re-reads, spawn, spares); Server
                     (sessions, reaping, shutdown); Spare, ServerSession
  the tunnel         TunnelListener (cluster side, its limit and its owner check, SockDiag),
                     CreditPool (the proxy's one bound on what it holds for all of them,
                     served in turn), TunnelConn (both sides: half-close, reset, credit
                     asked for when bytes wait and given back when idle)
  the proxy          SocketClaim (bind, stand by, heartbeat, take over, let go); Proxy
                     (sessions, status); ClientConn, ProxySession
  the client         argv, Handoff, the owner check, run_client, the Allocated line,
                     the waiting shell, --status
  the command line   each role's main, the pid lock, daemonize, main

Beside this file: rvgahp_launch.py (rvgahp.pyz's start, and the `rvgahp` command, which
sends setup, doctor and print to rvgahp_admin.py; this module never imports either) and
rvgahp_probe.py (what setup runs on the cluster before rvgahp is there).
"""

import errno
import fcntl
import heapq
import os
import pwd
import resource
import select
import signal
import socket
import stat
import struct
import sys
import time
from collections import deque

# Imported where used, because no session start needs them and together they were 6 to
# 10 ms of every start (python3 bench/import_costs.py): json, threading and ctypes (the
# proxy's status, a client's pumps, the server's prctl); argparse and traceback (a
# role's command line, a logged internal error) were 3 to 8 ms each on their own.


# --------------------------------------------------------------------------- constants

VERSION = "1.1.0"
ROLES = ("server", "proxy", "client")

# The link protocol's major version. Both ends must speak the same one.
LINK_PROTOCOL = 1

# Bounds. Every buffer a long-running process keeps is limited by one of these.
READ_SIZE = 120 * 1024  # one read of any fd: stays below 128 KiB, where glibc would serve
# each buffer with mmap and munmap (two more syscalls and two page faults a read)
PIPE_SIZE = 1024 * 1024  # what a widened pipe holds (see widen_pipe)
MAX_PAYLOAD = 256 * 1024  # a larger frame is a protocol error, not a big allocation
MAX_PING_PAYLOAD = 64  # a PING carries a timestamp; more is a peer trying to make us queue
CHANNEL_WINDOW = 512 * 1024  # bytes a sender may have in flight per channel direction
# ...and per tunnel connection, where both ends know the feature "wide_tunnel". One file
# transfer must keep the whole path through ssh busy, and 512 KiB in flight could not
# (python3 bench/tunnel.py; the figures are in docs/performance.md).
TUNNEL_WINDOW = 2 * 1024 * 1024
LINK_HIGH_WATER = 2 * 1024 * 1024  # stop reading sources while the link is this backed up
LINK_LOW_WATER = 512 * 1024  # ...and resume once it has drained to here
MAX_FIELDS = 4096  # a hello, a request, a reply
MAX_NOISE = 64 * 1024  # what a login shell may print before the link starts
MAX_LOG_LINE = 2000
MAX_SESSIONS = 1000
MAX_TUNNEL_CONNECTIONS = 256  # per session; the ft-gahp opens one per transfer command, and
# more wait in the kernel's accept queue until one ends (never refused for the count)
MAX_TUNNEL_AT_PROXY = 2 * MAX_TUNNEL_CONNECTIONS  # the proxy's own bound: its count trails the server's
# What the proxy lets the cluster send ahead, over all tunnel connections of its link
# together, for GridManager sockets that read slowly or not at all (see CreditPool).
TUNNEL_POOL = 16 * 1024 * 1024
TUNNEL_GRANT_MIN = 64 * 1024  # a smaller grant waits until this much is free (no trickle)
TUNNEL_IDLE_RETURN = 1.0  # s: a connection that sends nothing this long gives its credit back
MAX_STATUS_SESSIONS = 200  # a status reply lists at most this many sessions
MAX_MACRO_DEPTH = 64  # deeper nesting in a config is a mistake, not a real config

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
REQUEST_TIMEOUT = 10.0  # a client connection that has not sent its request by then is closed
QUIET_AFTER = 1.0  # a new session on a link silent this long probes it at once...
PROBE_TIMEOUT = 3.0  # ...and a link that stays silent this long after the probe is dead
# (A session's command that has no answer for QUIET_AFTER probes the link the same way,
# so a dead network is found within seconds of a GridManager waiting on it.)
FAILOVER_WAIT = 10.0  # a client whose link died before its GAHP started waits this long for the next
UNREACHED_RETRY = 3.0  # an attempt that never reached sshd is no login: retry this soon
TUNNEL_CONNECT_TIMEOUT = 20.0  # the proxy gives up on a GridManager endpoint after this

# The range every number from a config or from the peer is clamped to: (low, high).
# A value outside is used at the nearest bound, and the clamping is logged.
LIMITS = {
    "ping_interval": (0.05, 3600.0),
    "ping_timeout": (0.1, 86400.0),
    "backoff_max": (0.0, 86400.0),
    "log_max_size": (0.0, 2.0**40),
    "spare_gahps": (0.0, 1.0),
}

# The config knobs that hold a number (-> their LIMITS entry) or a boolean. Config.load
# checks each one, so a bad value stops a start with file:line.
NUMBER_KNOBS = {
    "RVGAHP_PING_INTERVAL": "ping_interval",
    "RVGAHP_PING_TIMEOUT": "ping_timeout",
    "RVGAHP_BACKOFF_MAX": "backoff_max",
    "RVGAHP_LOG_MAX_SIZE": "log_max_size",
    "RVGAHP_SPARE_GAHPS": "spare_gahps",
}
BOOLEAN_KNOBS = ("RVGAHP_FT_TUNNEL",)
BOOLEAN_WORDS = "true, false, yes, no, 1, 0"

# The GAHPs a session may ask for: name -> (config knob, binary under -b BASEDIR/bin, args).
GAHPS = {
    "blahpd": ("BATCH_GAHP", "blahpd", []),
    "batch_gahp": ("BATCH_GAHP", "blahpd", []),  # what GridManagers before 8.9.12 send
    "condor_ft-gahp": ("FT_GAHP", "condor_ft-gahp", ["-f"]),
}


# --------------------------------------------------------------------------- logging


class UserError(Exception):
    """A problem a person can fix; its text is the whole one-line message."""


def traceback_text():
    import traceback

    return traceback.format_exc().rstrip()


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
        fd = open_private(self.path, os.O_WRONLY | os.O_APPEND, "log file")
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
        data = (printable(line[:MAX_LOG_LINE]) + "\n").encode("utf-8", "replace")
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


def printable(text):
    """text with control characters escaped: what a peer or argv sent never moves a cursor."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() or c == "\t" else ascii(c)[1:-1] for c in text)


def file_kind(mode):
    for test, name in (
        (stat.S_ISREG, "a regular file"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISLNK, "a symbolic link"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "an unknown kind of file"


def dangling_link(path):
    """ "it is a symbolic link to X, which does not exist" where path is one, else None."""
    try:
        if stat.S_ISLNK(os.lstat(path).st_mode) and not os.path.exists(path):
            return "it is a symbolic link to %s, which does not exist" % os.readlink(path)
    except OSError:
        pass
    return None


def path_problem(path):
    """What keeps path from being read as a file ("it is a directory", ...), or None.

    For the one-line errors about a config, a transport or a GAHP that is there but is
    not a file: the kind is the fix's first clue.
    """
    try:
        st = os.stat(path)
    except OSError as e:
        return dangling_link(path) or ("it does not exist" if e.errno == errno.ENOENT else e.strerror)
    if not stat.S_ISREG(st.st_mode):
        return "it is %s, not a file" % file_kind(st.st_mode)
    return None


def transport_problem(path):
    """What keeps /bin/sh from running the transport script at path, or None: it must be
    a file this user may read (sh reads it; it need not be executable)."""
    problem = path_problem(path)
    if problem is None and not os.access(path, os.R_OK):
        problem = "Permission denied (uid %d may not read it)" % os.getuid()
    return problem


def open_private(path, flags, what):
    """Open (creating 0600) a file of ours in a directory others may write to.

    Never through a symlink someone planted, never a file another uid owns, never a
    FIFO or device that would block or misbehave: any of those is a one-line error.
    """
    try:
        fd = os.open(path, flags | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o600)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise UserError("cannot open %s %s: it is a symbolic link, and rvgahp never follows one there" % (what, path))
        try:
            kind = file_kind(os.lstat(path).st_mode)
        except OSError:
            kind = "a regular file"
        if kind != "a regular file":  # a directory, or a FIFO with no reader (ENXIO)
            raise UserError("cannot use %s %s: it is %s, not a file" % (what, path, kind))
        raise UserError("cannot open %s %s: %s" % (what, path, e.strerror))
    st = os.fstat(fd)
    problem = None
    if not stat.S_ISREG(st.st_mode):
        problem = "it is %s, not a file" % file_kind(st.st_mode)
    elif st.st_uid != os.getuid():
        problem = "it belongs to uid %d, not to uid %d" % (st.st_uid, os.getuid())
    if problem:
        os.close(fd)
        raise UserError("cannot use %s %s: %s" % (what, path, problem))
    os.set_blocking(fd, True)
    return fd


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
        self.notes = []  # what a reader should be told, such as a clamped value
        self._parse(text)

    @classmethod
    def load(cls, path):
        """Read and check a config file: every rvgahp knob in it must have a good value."""
        # O_NONBLOCK: a FIFO put where the config should be must not hang the start.
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            problem = path_problem(path)  # a socket or a dangling link says more than ENXIO or ENOENT
            raise ConfigError("cannot read config %s: %s" % (path, e.strerror if problem in (None, "it does not exist") else problem))
        try:
            mode = os.fstat(fd).st_mode
            if not stat.S_ISREG(mode):
                raise ConfigError("cannot read config %s: it is %s, not a file" % (path, file_kind(mode)))
            data = os.read(fd, 1 << 20)
        except OSError as e:
            raise ConfigError("cannot read config %s: %s" % (path, e.strerror))
        finally:
            os.close(fd)
        config = cls(path, data.decode("utf-8", "replace"))
        config.check_knobs()
        return config

    def check_knobs(self):
        """Read every knob rvgahp has, so a bad value is an error at load, at file:line,
        and not when some later session first needs it."""
        for name, limits in NUMBER_KNOBS.items():
            self.number(name, 0.0, LIMITS[limits])
        for name in BOOLEAN_KNOBS:
            self.boolean(name, True)

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

    def number(self, name, default, limits=(0.0, float("inf"))):
        """A number within limits (low, high); one outside is clamped, with a note."""
        raw = self.get(name)
        if raw is None or raw == "":
            return default
        lineno = self._definition(name.lower(), None)[1]
        value = plain_number(raw)
        if value is None:
            raise self.error(lineno, "%s must be a number, not %r" % (name, raw[:40]))
        clamped = clamp(value, limits)
        note = "config %s:%d: %s = %s is out of range; using %g" % (self.path, lineno, name, raw[:40], clamped)
        if clamped != value and note not in self.notes:
            self.notes.append(note)
        return clamped

    def boolean(self, name, default):
        """HTCondor's booleans: true/false, yes/no, 1/0 (any case)."""
        raw = self.get(name)
        if raw is None or raw == "":
            return default
        word = raw.lower()
        if word in ("true", "yes", "1", "t", "y"):
            return True
        if word in ("false", "no", "0", "f", "n"):
            return False
        raise self.error(
            self._definition(name.lower(), None)[1], "%s must be one of %s (any case), not %r" % (name, BOOLEAN_WORDS, raw[:40])
        )

    def _definition(self, key, before):
        defs = self.defs.get(key, ())
        if before is not None:
            defs = [d for d in defs if d[0] < before]
        return defs[-1] if defs else None

    def get_all_here(self, name):
        """As get, but None unless NAME and every macro it uses are defined in this file.

        HTCondor gives many names built-in values (LOG, LOCK, RUN) that a GAHP reading
        this file sees and this parser cannot: with one of those left out, the value here
        is not the one the GAHP will use."""
        found = self._definition(name.lower(), None)
        if found is None:
            return None
        undefined = []
        value = self._expand(name.lower(), found, (), undefined)
        return None if undefined else value

    def _expand(self, key, definition, stack, undefined=None):
        order, lineno, raw = definition
        if (key, order) in stack:
            chain = " -> ".join(k.upper() for k, _ in stack + ((key, order),))
            raise self.error(lineno, "macro loop: %s" % chain)
        if len(stack) >= MAX_MACRO_DEPTH:
            raise self.error(lineno, "macros nested more than %d deep (%s -> ...)" % (MAX_MACRO_DEPTH, stack[0][0].upper()))
        return self._substitute(raw, key, definition, stack + ((key, order),), undefined)

    def _substitute(self, text, key, definition, stack, undefined=None):
        """text with its macros expanded; each $(NAME) defined nowhere in this file is
        added to undefined, where given."""
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
                if found is None and undefined is not None:
                    undefined.append(name)
                value = "" if found is None else self._expand(name.lower(), found, stack, undefined)
            if not value and has_default:
                value = self._substitute(default, key, definition, stack, undefined)
            out.append(value)
            i = end + 1


def whole_number(text, low, high):
    """text as an int when it is plain ASCII digits within [low, high], else None.

    Every integer from outside (an environment variable, a request, a frame field, a
    file) comes through here: str.isdigit() accepts "²", which int() refuses, and int()
    accepts "1_000", spaces and thousands of digits, which no field of ours ever holds.
    """
    if not 0 < len(text) <= 19 or not all("0" <= c <= "9" for c in text):
        return None
    value = int(text)
    return value if low <= value <= high else None


def plain_number(text):
    """text as a float when it is a number written in ASCII ("2", "0.5", "1e7", "inf"),
    else None: float() also reads "1_0", surrounding blanks and other scripts' digits,
    and "nan" compares unequal to every bound."""
    if not 0 < len(text) <= 40 or not all(" " < c < "\x7f" and c != "_" for c in text):
        return None
    try:
        value = float(text)
    except ValueError:
        return None
    return None if value != value else value


def clamp(value, limits):
    low, high = limits
    return min(max(value, low), high)


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
TUNNEL = 14  # server -> proxy: a connection came to session S's tunnel port; this channel
# carries it to the address that session's client announced (fields: session=S)
READY = 15  # client -> proxy only: the client has said `Allocated port`; relay the GAHP now
ASK = 16  # server -> proxy, a tunnel connection: bytes wait here and it has no credit
UNUSED = 17  # server -> proxy, a tunnel connection: it gives back this much credit (4-byte count)
# After ACCEPT, the proxy ends a client's socket with one text line instead of a frame:
# "exit N", "signal N" or "error TEXT". A line is what lets the waiting client be a
# shell (see wait_in_shell) rather than a whole Python interpreter.
FRAME_NAMES = {
    number: name
    for name, number in (
        ("HELLO", HELLO), ("OPEN", OPEN), ("ACCEPT", ACCEPT), ("REFUSE", REFUSE), ("DATA", DATA), ("EOF", EOF), ("CLOSE", CLOSE),
        ("WINDOW", WINDOW), ("PING", PING), ("PONG", PONG), ("RETRY", RETRY), ("STATE", STATE), ("STATUS", STATUS),
        ("TUNNEL", TUNNEL), ("READY", READY), ("ASK", ASK), ("UNUSED", UNUSED),
    )
}  # fmt: skip
SESSION_FRAMES = frozenset((ACCEPT, REFUSE, DATA, EOF, CLOSE, WINDOW, ASK, UNUSED))  # those a Channel takes

# What this rvgahp can do beyond link protocol 1, said in the hello. A feature is used
# only when both ends name it, so either host's rvgahp.pyz can be the older one.
FEATURES = ("tunnel", "wide_tunnel", "tunnel_pool")
# tunnel_pool: a tunnel connection's cluster end sends only what the proxy has granted
# from one pool for the whole link (CreditPool): nothing before the proxy has connected
# it to the GridManager, and no credit kept while it has nothing to send (ASK, UNUSED).
# Without it the proxy would hold up to a whole window for every connection.

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


def decode_fields(payload, limit=MAX_FIELDS):
    if len(payload) > limit:
        raise ProtocolError("a %d-byte request (the limit is %d)" % (len(payload), limit))
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
    """Turns a byte stream into frames, holding at most one partial frame.

    Frames are parsed straight from the chunk just read. A large DATA payload goes on
    as a view of the chunk, not a copy; a small one is copied, so that a view of a few
    bytes never keeps a whole chunk alive in a slow sink's queue.

    A frame cut by the end of a read is copied aside until the rest arrives, except,
    with stream_data, a DATA frame: the part that came goes on at once as a DATA frame
    of its own, and the rest follows as reads bring it. The link uses this, because
    its reads end wherever ssh's packets did, which is inside nearly every large
    frame; a sink wants bytes, not frames, so joining the parts would be copies for
    nothing.
    """

    VIEW_AT = READ_SIZE // 4

    # Every relayed message passes through a FrameReader, a Link, a Channel and an Outbox.
    # With fixed attributes (slots) each attribute read is a direct load, not a dict
    # lookup: together with a leaner loop turn, a sixth less CPU per round trip in the
    # proxy and the server (python3 bench/bench.py --only rtt; docs/performance.md).
    __slots__ = ("data_channel", "data_left", "need", "partial", "stream_data")

    def __init__(self, stream_data=False):
        self.stream_data = stream_data
        self.partial = bytearray()
        self.need = HEADER.size  # bytes the partial frame needs before it can be parsed
        self.data_left = 0  # bytes still to come of a DATA payload that began in a past read
        self.data_channel = 0

    def pending(self):
        return len(self.partial)

    def feed(self, data):
        frames = []
        offset = 0
        if self.data_left:  # (then nothing is held in partial)
            offset = min(self.data_left, len(data))
            frames.append((DATA, self.data_channel, self._payload(data, 0, offset)))
            self.data_left -= offset
        elif self.partial:
            self.partial += data
            if len(self.partial) < self.need:
                return frames
            data = bytes(self.partial)
            self.partial = bytearray()
        end = len(data)
        while end - offset >= HEADER.size:
            kind, channel, length = HEADER.unpack_from(data, offset)
            if length > MAX_PAYLOAD:
                raise ProtocolError("a %d-byte frame (the limit is %d)" % (length, MAX_PAYLOAD))
            start = offset + HEADER.size
            stop = start + length
            if stop > end:
                if kind == DATA and self.stream_data:
                    if start < end:
                        frames.append((DATA, channel, self._payload(data, start, end)))
                    self.data_left = stop - end
                    self.data_channel = channel
                    offset = end
                    self.need = HEADER.size
                else:
                    self.need = stop - offset
                break
            frames.append((kind, channel, self._payload(data, start, stop) if kind == DATA else data[start:stop]))
            offset = stop
        else:
            self.need = HEADER.size
        if offset < end:
            self.partial += data[offset:]
        return frames

    def _payload(self, data, start, stop):
        return memoryview(data)[start:stop] if stop - start >= self.VIEW_AT else data[start:stop]


def exit_fields(status):
    """exit=N or signal=N fields for a waitpid() status."""
    if os.WIFSIGNALED(status):
        return {"signal": os.WTERMSIG(status)}
    return {"exit": os.WEXITSTATUS(status)}


def exit_line(fields):
    """The line an accepted client's socket ends with: exit N, signal N or error TEXT.

    N must be a plain number of 0-255: the waiting client may be a shell that does
    arithmetic with it, and the text came from the other end of an ssh link.
    """
    if "error" in fields:
        return "error %s\n" % str(fields["error"]).replace("\n", " ")
    for key in ("signal", "exit"):
        if key in fields:
            value = str(fields[key])
            if whole_number(value, 0, 255) is not None:
                return "%s %s\n" % (key, value)
            return "error the server sent a bad %s status %r\n" % (key, value[:40])
    return "error the session ended without a status\n"


def exit_text(fields):
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
    counts as life. The link is dead when the peer has been silent past the ping
    timeout, or has not read what we sent for as long: a peer that writes but never
    reads would otherwise make us queue without end. Channel frames go to the Channel
    objects in self.channels; the role (`events`) hears on_hello, on_open, on_tunnel,
    on_state, on_noise and, always exactly once, on_link_closed.
    """

    # slots: see FrameReader
    __slots__ = (
        "answer_timer", "awaiting", "channels", "closed", "congested", "ended_by_peer", "events", "features", "last_heard",
        "last_ping", "log", "loop", "outbox", "peer", "ping_interval", "ping_timeout", "pong_mark",
        "prelude", "probe_sent", "reader", "rfd", "rtt", "synced", "timer", "watch_answers", "wfd",
    )  # fmt: skip

    def __init__(self, loop, log, rfd, wfd, events):
        self.loop = loop
        self.log = log
        self.rfd = rfd
        self.wfd = wfd
        self.events = events
        self.reader = FrameReader(stream_data=True)
        self.outbox = Outbox(loop, wfd, on_gone=self._write_failed)  # on_written: while congested
        self.channels = {}
        self.synced = False
        self.peer = None  # the peer's hello fields, once heard
        self.features = frozenset()  # what the peer's rvgahp can do beyond the basics
        self.closed = False
        self.ended_by_peer = False  # EOF from the peer, as opposed to a close decided here
        self.congested = False
        self.prelude = bytearray()  # bytes before the peer's LINK_START
        self.ping_interval = DEFAULT_PING_INTERVAL
        self.ping_timeout = DEFAULT_PING_TIMEOUT
        self.last_heard = self.last_ping = time.monotonic()
        self.pong_mark = 0  # where in the outbox our last PONG ends: one PONG queued at most
        self.probe_sent = None
        self.timer = None
        self.rtt = None
        self.watch_answers = False  # the proxy's: its sessions wait on the peer's answers
        self.awaiting = None  # since when a session's frame has gone unanswered
        self.answer_timer = None

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
        if self.awaiting is None and self.watch_answers and kind in (DATA, OPEN):
            self.awaiting = time.monotonic()
            if self.answer_timer is None:
                self.answer_timer = self.loop.call_later(QUIET_AFTER, self._answer_due)
        if not self.congested and self.outbox.size > LINK_HIGH_WATER:
            self.congested = True
            self.outbox.on_written = self._written  # what leaves matters only now

    def _written(self, n):
        if self.outbox.size <= LINK_LOW_WATER:
            self.congested = False
            self.outbox.on_written = None
            for channel in list(self.channels.values()):
                channel.refresh()

    def _write_failed(self):
        self.ended_by_peer = True  # EPIPE: the reader at the far end is gone
        self.close("the peer closed the link" if self.synced else "the transport ended before the link started")

    def _tick(self):
        """Ping, and declare the link dead when the peer is silent or stops reading."""
        if self.closed:
            return
        now = time.monotonic()
        silent = now - self.last_heard
        if silent > self.ping_timeout:
            self.close("ping timeout: no word from the peer for %.0f s" % silent)
            return
        stuck = self.outbox.stuck_for(now)
        if stuck > self.ping_timeout:
            self.close("the peer has not read from the link for %.0f s" % stuck)
            return
        if now - self.last_ping >= self.ping_interval:
            self.last_ping = now
            self.send(PING, 0, struct.pack("!d", now))
        # Wake for the next ping, or the moment the silence would pass the timeout.
        wake = min(self.last_ping + self.ping_interval, self.last_heard + self.ping_timeout + 0.01)
        if self.outbox.size:
            wake = min(wake, now + self.ping_timeout - stuck + 0.01)
        self.timer = self.loop.call_later(max(0.05, wake - now), self._tick)

    def probe(self):
        """A session is starting: if the link has been quiet, make sure it still lives,
        so the session learns in seconds, not at the ping timeout, that it does not."""
        now = time.monotonic()
        if self.closed or self.probe_sent is not None or now - self.last_heard < QUIET_AFTER:
            return
        self.probe_sent = now
        self.send(PING, 0, struct.pack("!d", now))
        wait = min(PROBE_TIMEOUT, self.ping_timeout)
        self.loop.call_later(wait, lambda: self._probe_over(now, wait))

    def _answer_due(self):
        """A session's frame went out a while ago: if nothing at all has come back since,
        probe, so the GridManager hears of a dead link in seconds, not at the ping timeout.
        (A live peer answers the probe even while its GAHP takes minutes over a command.)"""
        self.answer_timer = None
        if self.awaiting is None or self.closed:
            return  # answered
        left = self.awaiting + QUIET_AFTER - time.monotonic()
        if left > 0:  # a later frame, sent after an answer: its own wait
            self.answer_timer = self.loop.call_later(left, self._answer_due)
            return
        self.awaiting = None
        self.probe()

    def _probe_over(self, sent, wait):
        self.probe_sent = None
        if not self.closed and self.last_heard < sent:
            self.close("the link went silent: no answer to a probe for %g s" % wait)

    def _readable(self):
        data = read_some(self.rfd, READ_SIZE)
        if data is None:
            return
        if not data:
            self.ended_by_peer = True
            self.close("the peer closed the link" if self.synced else "the transport ended before the link started")
            return
        self.last_heard = time.monotonic()
        self.awaiting = None
        if not self.synced:
            data = self._skip_prelude(data)
            if data is None:
                return
        try:
            for kind, channel, payload in self.reader.feed(data):
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
        # The frames of a session come first: they are nearly all of the traffic.
        if kind in SESSION_FRAMES:
            if self.peer is None:
                raise ProtocolError("%s before HELLO" % FRAME_NAMES[kind])
            target = self.channels.get(channel)
            if target is not None:  # else: it crossed the channel's CLOSE in flight
                try:
                    target.on_frame(kind, payload)
                except ProtocolError:
                    raise
                except Exception as e:  # a fault in one channel ends that channel, not the link
                    self._channel_failed(target, e)
        elif kind == PING:
            if len(payload) > MAX_PING_PAYLOAD:
                raise ProtocolError("a %d-byte PING (the limit is %d)" % (len(payload), MAX_PING_PAYLOAD))
            if self.outbox.written_total >= self.pong_mark:  # the last PONG has left
                self.send(PONG, 0, payload)
                self.pong_mark = self.outbox.queued_total
        elif kind == PONG:
            if len(payload) == 8:
                self.rtt = time.monotonic() - struct.unpack("!d", payload)[0]
        elif kind == HELLO:
            if self.peer is not None:
                raise ProtocolError("a second HELLO")
            self.peer = decode_fields(payload)
            self.features = frozenset(self.peer.get("features", "").split(","))
            self.events.on_hello(self.peer)
            self.last_ping = time.monotonic()
            self.send(PING, 0, struct.pack("!d", self.last_ping))  # a first round-trip figure at once
        elif self.peer is None:
            raise ProtocolError("%s before HELLO" % FRAME_NAMES.get(kind, kind))
        elif kind == OPEN:
            self.events.on_open(channel, payload)
        elif kind == TUNNEL:
            self.events.on_tunnel(channel, payload)
        elif kind == STATE:
            self.events.on_state(decode_fields(payload))
        else:
            raise ProtocolError("unknown frame type %d" % kind)

    def _channel_failed(self, target, e):
        self.log.info("internal error in session %d: %s" % (target.cid, e))
        self.log.debug(traceback_text())
        target.fail("internal error: %s" % e)

    def fail(self, reason):
        self.close(reason)

    def close(self, reason):
        """Close both fds, end every channel, and tell the role: always, and once."""
        if self.closed:
            return
        self.closed = True
        try:
            if self.timer:
                self.timer.cancel()
            self.outbox.detach()
            self.loop.forget(self.rfd)
            self.loop.forget(self.wfd)
            close_fd(self.rfd)
            if self.wfd != self.rfd:
                close_fd(self.wfd)
            for channel in list(self.channels.values()):
                try:
                    channel.link_lost(reason)
                except Exception as e:
                    self.log.info("internal error ending session %d: %s" % (channel.cid, e))
            self.channels.clear()
        finally:
            self.events.on_link_closed(reason)


class Channel:
    """One stream pair across the link: a session, or one tunnel connection.

    The source fd (a GAHP's stdout, the GridManager's stdin, a TCP connection) is read
    only while the peer has granted credit and the link is not backed up, so a stalled
    reader stops its own stream and nothing else. Data for the sink fd is queued in an
    Outbox that can never hold more than the window we granted; credit goes back as it
    drains. Roles subclass this for what happens at the edges.
    """

    # slots: see FrameReader
    __slots__ = (
        "_on_source", "cid", "credit", "grant_at", "held", "held_size", "inflight", "link", "log",
        "loop", "reading", "received", "relaying", "released", "sent", "sink", "sink_done", "sink_fd",
        "source_done", "source_fd", "started", "ungranted", "window",
    )  # fmt: skip

    def __init__(self, link, cid, source_fd, sink_fd, window=CHANNEL_WINDOW):
        self.link = link
        self.loop = link.loop
        self.log = link.log
        self.cid = cid
        self.source_fd = source_fd
        self.sink_fd = sink_fd
        self.sink = Outbox(self.loop, sink_fd, on_written=self._sink_took, on_gone=self._sink_gone)
        self.window = window  # both ends use the same for a channel, each way
        self.grant_at = window // 4  # credit goes back in batches, not per write
        self.credit = window
        self.inflight = 0  # received, not yet written to the sink
        self.ungranted = 0  # written to the sink, credit not yet returned
        self.reading = False
        self.relaying = False
        self.source_done = False
        self.sink_done = False
        self.released = False
        self.sent = 0  # bytes read from the source and sent on the link
        self.received = 0  # bytes that came over the link for the sink
        self.started = time.monotonic()
        self.held = None  # frames for the sink kept back (see hold_sink)
        self.held_size = 0
        self._on_source = self._source_readable  # one bound method, so the loop sees no change

    def begin_relay(self):
        self.relaying = True
        os.set_blocking(self.source_fd, False)
        if self.sink_fd != self.source_fd:  # a TCP connection is both
            os.set_blocking(self.sink_fd, False)
        self.refresh()

    def refresh(self):
        want = self.relaying and not self.source_done and self.credit > 0 and not self.link.congested
        if want != self.reading:
            self.reading = want
            self.loop.on_readable(self.source_fd, self._on_source if want else None)

    def _source_readable(self):
        data = self.read_source(READ_SIZE if self.credit >= READ_SIZE else self.credit)
        if data is None:
            return
        if not data:
            self.end_source()
            return
        n = len(data)
        self.credit -= n
        self.sent += n
        self.link.send(DATA, self.cid, data)
        if self.credit <= 0 or self.link.congested:  # only then can the answer change
            self.refresh()

    def read_source(self, size):
        """Bytes from the source; b"" at its end (or when its writer is gone); None if none yet."""
        return read_some(self.source_fd, size)

    def end_source(self):
        """The source is finished: tell the peer with EOF, once."""
        if self.source_done:
            return
        self._close_source()
        self.link.send(EOF, self.cid)
        self.source_ended()

    def _close_source(self):
        self.source_done = True
        self.reading = False
        self.loop.forget(self.source_fd)
        close_fd(self.source_fd)

    def hold_sink(self):
        """Keep what arrives for the sink until release_sink(): for a client that must
        say `Allocated port` before the GAHP's banner, or a TCP connection being made."""
        self.held = []
        self.held_size = 0

    def release_sink(self):
        held, self.held = self.held, None
        for kind, payload in held:
            self.on_frame(kind, payload)

    def on_frame(self, kind, payload):
        if self.held is not None and kind in (DATA, EOF):
            self.held_size += len(payload)
            if self.held_size > self.window:
                raise ProtocolError("channel %d overran its window" % self.cid)
            self.held.append((kind, payload))
            return
        if kind == DATA:
            n = len(payload)
            if self.inflight + self.ungranted + n > self.window:
                raise ProtocolError("channel %d overran its window" % self.cid)
            self.inflight += n
            self.received += n
            if self.sink_done:
                self._sink_took(n)
            else:
                self.sink.write(payload)
        elif kind == WINDOW:
            self.credit += COUNT.unpack(payload)[0] if len(payload) == 4 else 0
            self.refresh()
        elif kind == EOF:
            self.peer_eof()
        elif kind == CLOSE:
            self.peer_closed(decode_fields(payload))
        elif kind == ACCEPT:
            self.accepted(decode_fields(payload))
        elif kind == REFUSE:
            self.refused(decode_fields(payload))
        elif kind == ASK:
            self.asked_for_credit()
        elif kind == UNUSED:
            self.gave_back_credit(COUNT.unpack(payload)[0] if len(payload) == 4 else 0)

    def peer_eof(self):
        """The peer's direction is finished: our sink ends once what came is written."""
        self.sink.when_drained(self.end_sink)

    def _sink_took(self, n):
        self.inflight -= n
        self.ungranted += n
        if self.ungranted >= self.grant_at and not self.released:
            self.link.send(WINDOW, self.cid, COUNT.pack(self.ungranted))
            self.ungranted = 0

    def _sink_gone(self):
        """The sink's reader went away; keep taking data (and discarding it) so the
        peer is never stuck on credit for a stream nobody reads."""
        self.end_sink()

    def end_sink(self):
        if self.sink_done:
            return
        self._close_sink()
        self.sink_ended()

    def _close_sink(self):
        self.sink_done = True
        self.sink.detach()
        self.loop.forget(self.sink_fd)
        close_fd(self.sink_fd)

    def release(self):
        """Drop the channel: both fds closed, no more frames to or from it."""
        if self.released:
            return
        self.released = True
        self.relaying = False
        if not self.source_done:
            self._close_source()
        if not self.sink_done:
            self._close_sink()
        if self.link.channels.get(self.cid) is self:
            del self.link.channels[self.cid]

    def fail(self, reason):
        """An internal error in this channel: end it alone and tell the peer."""
        self.log.info("session %d: %s" % (self.cid, reason))
        if not self.released:
            self.link.send(CLOSE, self.cid, encode_fields({"error": reason}))
        self.failed(reason)

    def age(self):
        return time.monotonic() - self.started

    # What the roles fill in.
    def source_ended(self):
        pass

    def sink_ended(self):
        pass

    def accepted(self, fields):
        raise ProtocolError("unexpected ACCEPT on channel %d" % self.cid)

    def refused(self, fields):
        raise ProtocolError("unexpected REFUSE on channel %d" % self.cid)

    def asked_for_credit(self):
        raise ProtocolError("unexpected ASK on channel %d" % self.cid)

    def gave_back_credit(self, n):
        raise ProtocolError("unexpected UNUSED on channel %d" % self.cid)

    def peer_closed(self, fields):
        self.release()

    def failed(self, reason):
        self.release()

    def link_lost(self, reason):
        self.release()


def session_summary(channel, to_gahp, from_gahp):
    """How long a session ran and what it moved, named the same on both hosts."""
    text = "%.1f s, %s to the GAHP, %s from it" % (channel.age(), human_bytes(to_gahp), human_bytes(from_gahp))
    count, to_gm, from_gm = channel.tunnel_totals
    if count:
        text += "; %d tunnel connection%s, %s to the GridManager, %s from it" % (
            count,
            "" if count == 1 else "s",
            human_bytes(to_gm),
            human_bytes(from_gm),
        )
    return text


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


def close_fds(fds):
    for fd in fds:
        close_fd(fd)


# A pipe holds 64 KiB unless asked for more. In a wider pipe, a GAHP or ssh can write
# ahead while we are busy, so each read takes more and a MB costs fewer wake-ups: with
# 120 KiB reads, nearly half the CPU per MB in the proxy and the server. The kernel
# counts widened pipes against a per-user budget (fs.pipe-user-pages-soft, 64 MiB by
# default), and gives every new pipe of a user over it a single page, so rvgahp widens
# the link's two pipes always, and a session's two (a GAHP's on the server, the
# GridManager's on the proxy) only while few sessions run (wide_pipe_sessions).
F_SETPIPE_SZ = 1031  # fcntl names it from Python 3.10 on


def widen_pipe(fd):
    """Ask the kernel for PIPE_SIZE of buffer in pipe fd; one it won't widen stays as it is."""
    try:
        fcntl.fcntl(fd, F_SETPIPE_SZ, PIPE_SIZE)
    except OSError:
        pass  # EPERM: over the user's budget or pipe-max-size; EBADF: not a pipe (a socket)


def wide_pipe_sessions():
    """How many sessions at once get widened pipes: their share is a quarter of the budget."""
    try:
        with open("/proc/sys/fs/pipe-user-pages-soft") as f:
            pages = int(f.read())
    except (OSError, ValueError):
        return 0  # not Linux, or no budget to read: leave pipes as they are
    if pages == 0:  # no budget at all; still, a fixed share of kernel memory is enough
        pages = 16384
    return pages * 4096 // 4 // (2 * PIPE_SIZE)


def make_pipes(count, what):
    """count pipes as a flat list [r1, w1, r2, w2, ...]; on failure none are left open."""
    fds = []
    try:
        for _ in range(count):
            fds.extend(os.pipe())
    except OSError as e:
        close_fds(fds)
        raise UserError("cannot make pipes for %s: %s" % (what, e.strerror))
    return fds


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
    close_fds(fd for fd in fds if fd > 2 and fd not in keep)


def raise_fd_limit():
    """Many sessions need many fds; the hard limit is ours to use."""
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
        self.callback = None  # a cancelled timer keeps nothing alive (a connection, a channel)


READABLE, WRITABLE, BROKEN = 0x001, 0x004, 0x008 | 0x010  # poll(2)'s IN, OUT, ERR|HUP


class Poller:
    """epoll, or where there is none a selectors.DefaultSelector, behind one small face:
    register, modify, unregister, and wait(timeout) returning (fd, poll-style mask)
    pairs, where timeout is in seconds, or -1 to wait for ever. With epoll, each of
    these is the epoll object's own method: no Python call in between."""

    def __init__(self):
        if hasattr(select, "epoll"):
            self.epoll = select.epoll()  # close-on-exec
            self.register = self.epoll.register
            self.modify = self.epoll.modify
            self.unregister = self.epoll.unregister
            self.wait = self.epoll.poll
        else:
            import selectors

            self.selector = selectors.DefaultSelector()
            self.register = lambda fd, mask: self.selector.register(fd, self._events(mask))
            self.modify = lambda fd, mask: self.selector.modify(fd, self._events(mask))
            self.unregister = self.selector.unregister
            self.wait = self._select

    @staticmethod
    def _events(mask):
        import selectors

        return (selectors.EVENT_READ if mask & READABLE else 0) | (selectors.EVENT_WRITE if mask & WRITABLE else 0)

    def _select(self, timeout):
        import selectors

        ready = self.selector.select(None if timeout < 0 else timeout)
        return [
            (key.fd, (READABLE if m & selectors.EVENT_READ else 0) | (WRITABLE if m & selectors.EVENT_WRITE else 0)) for key, m in ready
        ]


class Loop:
    """One event loop per process, with timers and signals.

    Each watched fd has a reader and a writer callback; the kernel is told only when the
    set of wanted events really changes. A callback that raises is logged, and its
    owner (the object the bound method belongs to) is ended through its fail() method:
    a client connection, a channel or a tunnel connection alone, or the link when the
    fault was in the link's own stream. The loop carries on. Signals are noted by a
    tiny handler and run from the loop, never in the middle of a callback.
    """

    def __init__(self, log):
        self.log = log
        self.poller = Poller()
        self.watches = {}  # fd -> [reader callback, writer callback]
        self.forgotten = set()  # fds dropped since the last wait: their events are stale
        self.timers = []
        self.next_turn = []  # callbacks for the turn after this one (soon)
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
        watch = self.watches.get(fd)
        if watch is None:
            if callback is None:
                return
            watch = [None, None]
            watch[slot] = callback
            self.poller.register(fd, READABLE if slot == 0 else WRITABLE)  # may refuse: nothing recorded yet
            self.watches[fd] = watch
            return
        old = watch[slot]
        if old is callback:
            return
        watch[slot] = callback
        if (old is None) == (callback is None):
            return  # another callback for the same event: the kernel's mask is unchanged
        if watch[0] is None and watch[1] is None:
            del self.watches[fd]
            self.poller.unregister(fd)
        else:
            self.poller.modify(fd, (READABLE if watch[0] else 0) | (WRITABLE if watch[1] else 0))

    def forget(self, fd):
        """Stop watching fd; call before closing it so a reused number is never confused."""
        watch = self.watches.pop(fd, None)
        if watch is not None:
            watch[0] = watch[1] = None
            self.forgotten.add(fd)
            try:
                self.poller.unregister(fd)
            except (OSError, KeyError, ValueError):
                pass  # already closed by its owner: the kernel forgot it too

    # timers
    def call_later(self, delay, callback):
        timer = Timer(time.monotonic() + max(0.0, delay), callback)
        self.serial += 1
        if self.serial % 1024 == 0:
            # Cancelled timers leave the heap only when they come due; with thousands of
            # sessions a minute, sweep them out now and then so the heap stays small.
            self.timers[:] = [entry for entry in self.timers if not entry[2].cancelled]
            heapq.heapify(self.timers)
        heapq.heappush(self.timers, (timer.when, self.serial, timer))
        return timer

    def soon(self, callback):
        """Run callback on the next turn of the loop, after the events that turn's poll
        brings: what is put off this way never delays what already waits in a pipe."""
        self.next_turn.append(callback)

    # signals
    def on_signal(self, signum, callback):
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
        watches = self.watches
        forgotten = self.forgotten
        timers = self.timers
        wait = self.poller.wait
        monotonic = time.monotonic
        on_read, on_write = READABLE | BROKEN, WRITABLE | BROKEN
        # Every relayed message takes a turn in each process it crosses, and most turns
        # bring one event and nothing else: so each step below is skipped when it has
        # nothing to do, and callbacks are called here, not through _call, one Python
        # call fewer per event.
        while not self.stopped:
            this_turn = self.next_turn
            if this_turn:
                self.next_turn = []
            else:
                this_turn = ()  # not the list that soon() fills during this turn
            timeout = -1
            if timers:
                while timers and timers[0][2].cancelled:
                    heapq.heappop(timers)
                if timers:
                    timeout = timers[0][0] - monotonic()
                    if timeout < 0:
                        timeout = 0
            if this_turn or self.pending_signals:
                timeout = 0
            if forgotten:
                forgotten.clear()
            for fd, mask in wait(timeout):
                # A callback earlier in this batch may have closed this fd, and even
                # reused its number: skip it; a live fd's event comes again next time.
                if fd in forgotten:
                    continue
                watch = watches.get(fd)
                if watch is None:
                    continue
                if mask & on_read and watch[0] is not None:
                    callback = watch[0]
                    try:
                        callback()
                    except Exception as e:
                        self._failed(callback, e)
                    if fd in forgotten:
                        continue
                if mask & on_write and watch[1] is not None:
                    callback = watch[1]
                    try:
                        callback()
                    except Exception as e:
                        self._failed(callback, e)
            for callback in this_turn:
                self._call(callback)
            while self.pending_signals:
                signum = self.pending_signals.pop(0)
                self._call(self.signal_handlers[signum])
            if timers and timers[0][0] <= monotonic():
                now = monotonic()
                while timers and timers[0][0] <= now:
                    timer = heapq.heappop(timers)[2]
                    if not timer.cancelled:
                        self._call(timer.callback)

    def _call(self, callback):
        try:
            callback()
        except Exception as e:
            self._failed(callback, e)

    def _failed(self, callback, e):
        """A callback raised: log it, and end its owner alone through owner.fail()."""
        owner = getattr(callback, "__self__", None)
        self.log.info("internal error in %s: %s" % (type(owner).__name__, e))
        self.log.debug(traceback_text())
        fail = getattr(owner, "fail", None)
        if fail is not None and owner is not self:
            try:
                fail("internal error: %s" % e)
            except Exception as e2:
                self.log.info("could not fail %s cleanly: %s" % (type(owner).__name__, e2))


class Outbox:
    """Buffered non-blocking writes to one fd, in the order given.

    Writes straight through while nothing is queued; after a short write, queues the
    rest and asks the loop for writability; lets go of it once drained. The rest of a
    chunk that went out in part is kept as a memoryview: slicing bytes would copy up to
    a whole read, and a busy link writes in part often. on_written(n) reports bytes that
    actually left, which is what flow control counts. It never closes the fd.
    """

    # slots: see FrameReader
    __slots__ = (
        "_on_writable", "fd", "gone", "loop", "on_drained", "on_gone", "on_written", "queue",
        "queued_total", "size", "waiting_since", "written_total",
    )  # fmt: skip

    def __init__(self, loop, fd, on_written=None, on_gone=None):
        self.loop = loop
        self.fd = fd
        self.queue = deque()
        self.size = 0
        self.queued_total = 0  # every byte ever given to write()...
        self.written_total = 0  # ...and every byte that left: together, what is still queued where
        self.waiting_since = None  # when the queue last made progress (None: nothing queued)
        self.gone = False
        self.on_written = on_written
        self.on_gone = on_gone
        self.on_drained = None
        self._on_writable = self._flush  # one bound method, so the loop sees no change

    def write(self, *chunks):
        if self.gone:
            return
        if self.queue:  # behind what is queued already
            for chunk in chunks:
                if chunk:
                    self.queue.append(chunk)
                    self.size += len(chunk)
                    self.queued_total += len(chunk)
            return
        total = 0
        for chunk in chunks:
            total += len(chunk)
        if not total:
            return
        self.queued_total += total
        n = write_some(self.fd, chunks)
        if n < 0:
            self.size = total
            self._lost()
            return
        if n < total:
            skip = n
            for chunk in chunks:
                if skip >= len(chunk):
                    skip -= len(chunk)
                    continue
                self.queue.append(memoryview(chunk)[skip:] if skip else chunk)
                skip = 0
            self.size = total - n
            self.waiting_since = time.monotonic()
            self.loop.on_writable(self.fd, self._on_writable)
        if n:
            self.written_total += n
            if self.on_written:
                self.on_written(n)

    def _flush(self):
        queue = self.queue
        chunks = list(queue) if len(queue) <= 64 else [queue[i] for i in range(64)]
        n = write_some(self.fd, chunks)
        if n < 0:
            self._lost()
            return
        left = n
        while left:
            head = queue[0]
            if len(head) <= left:
                queue.popleft()
                left -= len(head)
            else:
                queue[0] = memoryview(head)[left:]
                left = 0
        self.size -= n
        self.written_total += n
        if n:
            self.waiting_since = time.monotonic()
        if not queue:
            self.waiting_since = None
            self.loop.on_writable(self.fd, None)
        if n and self.on_written:
            self.on_written(n)
        if not queue and self.on_drained:
            callback, self.on_drained = self.on_drained, None
            callback()

    def stuck_for(self, now):
        """Seconds since queued bytes last moved; 0 when nothing waits."""
        return 0.0 if self.waiting_since is None else now - self.waiting_since

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
        self.waiting_since = None
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
        self.waiting_since = None
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


def accept_waiting(loop, log, listener, what, take):
    """Accept every connection waiting on listener, handing each to take(sock, peer).

    Out of fds, stop watching the listener for a second: left registered, the
    level-triggered loop would spin on it, and a second later some may be free.
    """
    while True:
        try:
            fd, peer = listener._accept()  # the C half's accept: a bare fd
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            if e.errno not in (errno.EMFILE, errno.ENFILE):
                raise
            log.info("%s: %s; pausing accepts for 1 s" % (what, e.strerror))
            pause_accepts(loop, listener, 1.0)
            return
        if take(socket.socket(listener.family, socket.SOCK_STREAM, 0, fd), peer) is False:
            return  # it wants no more for now


def pause_accepts(loop, listener, seconds):
    fd = listener.fileno()
    callback = loop.watches[fd][0]
    loop.on_readable(fd, None)
    loop.call_later(seconds, lambda: listener.fileno() == fd and loop.on_readable(fd, callback))


class SpawnError(Exception):
    pass


# Signals a child must get back at their defaults: Python ignores SIGPIPE, and the
# server catches the rest. A GAHP that inherits an ignored SIGPIPE misbehaves.
RESET_SIGNALS = ("SIGPIPE", "SIGCHLD", "SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT", "SIGXFSZ", "SIGUSR1")


def parent_death_signal():
    """A function that asks Linux to SIGTERM the calling process when its parent dies,
    or None where that cannot be had. Found before fork: a child should not load libc."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (ImportError, OSError, AttributeError):
        return None
    pr_set_pdeathsig, sigterm = 1, 15
    return lambda: prctl(pr_set_pdeathsig, sigterm, 0, 0, 0)


def spawn(argv, env, cwd, stdin, stdout, stderr, die_with_parent=None):
    """fork + exec argv in its own session with the given stdio and nothing else.

    The child reports a failed exec through a close-on-exec pipe, so the caller learns
    "no such file" at once instead of seeing a process that exits 127. With
    die_with_parent (from parent_death_signal), the child gets SIGTERM if we are killed:
    a GAHP busy in a long command, or an ssh, must not outlive a server killed with -9.
    """
    report_r, report_w = os.pipe()
    parent = os.getpid()
    try:
        pid = os.fork()
    except OSError as e:  # EAGAIN at the process limit, ENOMEM: a failure like any other
        close_fds((report_r, report_w))
        raise SpawnError("cannot fork for %s: %s" % (argv[0], e.strerror))
    if pid == 0:
        try:
            if die_with_parent is not None:
                die_with_parent()
                if os.getppid() != parent:  # the parent died before we asked
                    os._exit(1)
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


def signal_group(pid, name):
    try:
        os.killpg(pid, getattr(signal, name))
    except OSError:
        pass


class Child:
    """A process we started, from fork to reaping: the one place that ends children.

    The role's SIGCHLD handler calls exited(). stop() sends SIGTERM after a grace and
    SIGKILL after more, each only while our own record says the child has not been
    reaped; a pid number can be reused, so we never ask the system.
    """

    def __init__(self, loop, pid, on_exit):
        self.loop = loop
        self.pid = pid
        self.on_exit = on_exit
        self.status = None
        self.timers = []
        self.stderr_log = None  # a GAHP's: where its stderr goes, for the cause of an early death

    def running(self):
        return self.status is None

    def exited(self, status):
        self.status = status
        for timer in self.timers:
            timer.cancel()
        self.on_exit(status)

    def stop(self, term_after, kill_after, say=None):
        """End it unless it ends by itself first; say(signal name) before each signal."""
        if not self.running() or self.timers:
            return

        def send(name, then):
            if self.running():
                if say is not None:
                    say(name)
                signal_group(self.pid, name)
                signal_group(self.pid, "SIGCONT")  # a stopped process must wake to die
                if then:
                    self.timers.append(self.loop.call_later(kill_after, then))

        self.timers.append(self.loop.call_later(term_after, lambda: send("SIGTERM", lambda: send("SIGKILL", None))))


class LogSummary:
    """Log lines that another user can cause, at most one a minute of each kind.

    The first of a kind is logged at once; the rest of that minute are counted and
    summed up in one line when the minute is over (or sooner, by flush), so nobody can
    rotate the owner's log history away by knocking on a port."""

    PERIOD = 60.0
    MAX_KINDS = 64  # kinds counted at once; the rest share one count

    def __init__(self, loop, log):
        self.loop = loop
        self.log = log
        self.counts = {}  # (what, whose) -> how many since that kind's line
        self.timer = None

    def note(self, what, whose, why=""):
        """One more of `what` (e.g. "session 3: tunnel: closed"), `whose` (e.g. "from
        uid 999 (rvgadv)"); the first of a kind is logged with why."""
        key = (what, whose)
        if key in self.counts:
            self.counts[key] += 1
            return
        if len(self.counts) >= self.MAX_KINDS:
            key = (what, "of other kinds")
            self.counts[key] = self.counts.get(key, 0) + 1
            return
        self.counts[key] = 0
        self.log.info("%s a connection %s%s" % (what, whose, "; " + why if why else ""))
        if self.timer is None:
            self.timer = self.loop.call_later(self.PERIOD, self.flush)

    def flush(self):
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        counts, self.counts = self.counts, {}
        for (what, whose), n in sorted(counts.items()):
            if n:
                self.log.info("%s %d more connection%s %s in the last %g s" % (what, n, "" if n == 1 else "s", whose, self.PERIOD))


class Backoff:
    """When the next attempt at a link may happen.

    An attempt that never reached the submit host's sshd (refused, unreachable, a
    name that does not resolve) is no login: it is retried every few seconds, however
    long the outage, so the link is back soon after the network. A login that failed
    backs off: growing, jittered and capped. A link that held for LINK_STABLE proves
    the login, and so does the first early drop (one drop is the network). And never
    more than MAX_LOGINS_PER_MINUTE logins, whatever happens.
    """

    def __init__(self, cap):
        self.cap = cap
        self.failures = 0
        self.short_links = 0  # of those failures, links that came up but ended early
        self.logins = []  # start times of recent attempts that reached sshd

    def next_delay(self, started, held_for, now, reached=True):
        if not reached:
            return UNREACHED_RETRY * (0.75 + 0.5 * jitter())
        self.logins = [t for t in self.logins if now - t < LOGIN_WINDOW] + [started]
        if held_for is not None and held_for >= LINK_STABLE:
            self.failures = self.short_links = 0
            delay = 0.0
        else:
            self.failures += 1
            self.short_links += held_for is not None
            steps = self.failures - (1 if held_for is not None else 0)
            delay = 0.0
            if steps > 0:
                delay = min(self.cap, BACKOFF_FIRST * 2 ** min(steps - 1, 30)) * (0.75 + 0.5 * jitter())
        return max(delay, self.cap_delay(now))

    def cap_delay(self, now):
        """How long until one more login keeps within MAX_LOGINS_PER_MINUTE."""
        recent = [t for t in self.logins if now - t < LOGIN_WINDOW]
        if len(recent) < MAX_LOGINS_PER_MINUTE:
            return 0.0
        return max(0.0, recent[-MAX_LOGINS_PER_MINUTE] + LOGIN_WINDOW - now)

    def streak(self):
        """The attempts since the last stable link, in words: a link that came up and
        ended early backs off too, but it was no failed login, and must not read as one."""
        failed = self.failures - self.short_links
        parts = []
        if failed:
            parts.append("%d failed login%s" % (failed, "" if failed == 1 else "s"))
        if self.short_links:
            parts.append("%d link%s that ended within %g s" % (self.short_links, "" if self.short_links == 1 else "s", LINK_STABLE))
        return " and ".join(parts) + " in a row"

    def recent(self, now, window=3600.0):
        return len([t for t in self.logins if now - t < window])


def jitter():
    return int.from_bytes(os.urandom(2), "big") / 65535.0


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
        # Login nodes usually share $HOME, so what belongs to one host's server (its
        # lock and pid, its default logs) carries the host's name.
        self.state_dir = os.path.dirname(os.path.abspath(self.config))
        tag = host_tag()
        self.pid_file = os.path.join(self.state_dir, "rvgahp_server.%s.pid" % tag)
        self.default_log = os.path.join(self.state_dir, "rvgahp_server.%s.log" % tag)
        self.default_gahp_stderr = os.path.join(self.state_dir, "gahp_stderr.%s.log" % tag)


def host_tag():
    """This host's name, safe in a file name."""
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in socket.gethostname()) or "localhost"


# What ssh prints when it never reached the far sshd: the network, not the login.
UNREACHED_SIGNS = ("ssh: connect to host ", "ssh: Could not resolve hostname", "Connection timed out during banner exchange")


class LinkKeeper:
    """Keeps one link up to the submit host: runs the transport, says why each login or
    link ended, and plans the next login within the back-off and the login cap.

    It is the link's events object. Session frames (OPEN, TUNNEL) go to the server."""

    def __init__(self, server, config):
        self.server = server
        self.loop = server.loop
        self.log = server.log
        self.layout = server.layout
        self.on_open = server.on_open
        self.ping_interval = config.number("RVGAHP_PING_INTERVAL", DEFAULT_PING_INTERVAL, LIMITS["ping_interval"])
        self.ping_timeout = config.number("RVGAHP_PING_TIMEOUT", DEFAULT_PING_TIMEOUT, LIMITS["ping_timeout"])
        self.backoff = Backoff(config.number("RVGAHP_BACKOFF_MAX", DEFAULT_BACKOFF_MAX, LIMITS["backoff_max"]))
        self.link = None
        self.transport = None  # the Child running the current transport
        self.transport_lines = []  # its last few stderr lines: often the diagnosis
        self.unreached = False  # it said it never reached the submit host's sshd
        self.attempt_started = None
        self.link_up_at = None
        self.failure = None  # why the current login attempt or link ended
        self.next_attempt = None  # the timer for the next login
        self.history = []  # (start, "up" | "failed") of logins in the last hour, for status

    def connect(self):
        if self.server.stopping:
            return
        self.attempt_started = time.monotonic()
        self.link_up_at = None
        self.failure = None
        self.transport_lines = []
        self.unreached = False
        transport = self.layout.transport
        gone = self.server.files_gone()
        if gone:
            # Removed (rvgahp setup --remove) or moved: retrying would only log in vain,
            # and a second server started later would find this one still holding on.
            self.log.info("%s, so this server stops; run rvgahp setup again to bring it back" % gone)
            self.server.exit_status = 1
            self.server.shutdown()
            return
        problem = transport_problem(transport)
        if problem:
            self._cannot_start("cannot run transport %s: %s" % (transport, problem))
            return
        try:
            link_in, transport_out, transport_in, link_out, err_r, err_w = make_pipes(3, "the transport")
            widen_pipe(link_in)
            widen_pipe(link_out)
        except UserError as e:
            self._cannot_start(str(e))
            return
        try:
            pid = spawn(
                ["/bin/sh", transport], dict(os.environ), self.layout.home, transport_in, transport_out, err_w, self.server.die_with_parent
            )
        except SpawnError as e:
            close_fds((link_in, link_out, err_r))
            self._cannot_start("cannot run the transport: %s" % e)
            return
        finally:
            close_fds((transport_in, transport_out, err_w))
        self.transport = self.server.children[pid] = Child(self.loop, pid, self.transport_exited)
        self.log.info("link: started transport %s (pid %d)" % (transport, pid))
        LineReader(self.loop, err_r, self.transport_said)
        self.link = Link(self.loop, self.log, link_in, link_out, self)
        self.link.set_ping(self.ping_interval, self.ping_timeout)
        now = time.monotonic()
        self.link.start(
            {
                "role": "server",
                "rvgahp": VERSION,
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "ping_interval": self.ping_interval,
                "ping_timeout": self.ping_timeout,
                "features": ",".join(FEATURES),
                "logins_1h": 1 + len([t for t, _ in self.history if now - t < 3600]),  # this one too
                "failed_logins_1h": len([t for t, outcome in self.history if now - t < 3600 and outcome == "failed"]),
            }
        )

    def _cannot_start(self, reason):
        self.failure = reason
        self.transport = None
        self.link = None
        self._attempt_over()

    def transport_said(self, line):
        # The proxy's own log lines come back over ssh's stderr already formatted.
        if " rvgahp_proxy[" in line[:60]:
            self.log.write_line(line)
        elif line.strip():
            self.log.info("transport: %s" % line)
            self.transport_lines = self.transport_lines[-4:] + [line.strip()]
            if line.startswith(UNREACHED_SIGNS) and self.link_up_at is None:
                self.unreached = True

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
        if "tunnel" not in self.link.features:
            self.log.info(
                "the rvgahp_proxy (rvgahp %s) has no file-transfer tunnel, so condor_ft-gahp transfers will go direct; "
                "install this rvgahp.pyz on the submit host too" % fields.get("rvgahp", "?")
            )

    def on_state(self, fields):
        if fields.get("state") == "active":
            self.log.info("link active: the standby proxy took over %s" % self.link.peer.get("socket", "the socket"))
        elif fields.get("state") == "error":
            self.link.close("the proxy cannot serve: %s" % fields.get("reason", "no reason given"))

    def on_tunnel(self, cid, payload):
        raise ProtocolError("the proxy sent a TUNNEL frame")

    def on_link_closed(self, reason):
        self.failure = reason
        # A transport that closed the link is on its way out: give it a moment, so its
        # exit status (ssh's 255, a shell's 127, a kill -9) is what we report, not our SIGTERM.
        self.stop_transport(grace=1.0 if self.link.ended_by_peer else 0.0)
        self._attempt_over()

    def stop_transport(self, grace=0.0):
        if self.transport is not None:
            self.transport.stop(grace, TRANSPORT_KILL_AFTER)

    def transport_exited(self, status):
        link = self.link
        if link is not None and not link.closed:
            # Let the link read what the transport printed last: it is often the diagnosis.
            self.loop.call_later(0.05, lambda: link.close("the transport ended (%s)" % exit_text(exit_fields(status))))
            return
        self._attempt_over()

    def _attempt_over(self):
        """Once the link is closed and its transport reaped: say why, plan the next login."""
        if self.link is not None and not self.link.closed:
            return
        if self.transport is not None and self.transport.running():
            return
        if self.server.stopping:
            self.server.maybe_exit()
            return
        if self.next_attempt is not None:
            return
        now = time.monotonic()
        reached = not self.unreached
        if self.link_up_at is None:
            self.log.info("link attempt failed: %s" % self._diagnosis())
        else:
            self.log.info("link down after %.1f s: %s" % (now - self.link_up_at, self._diagnosis()))
        if reached:
            self.history = [h for h in self.history if now - h[0] < 3600] + [(self.attempt_started, "up" if self.link_up_at else "failed")]
        held = None if self.link_up_at is None else now - self.link_up_at
        delay = self.backoff.next_delay(self.attempt_started, held, now, reached)
        if not reached:
            self.log.info("the submit host was not reached, so that was no login; trying again in %.1f s" % delay)
        elif delay > 0:
            self.log.info("next login attempt in %.1f s (%s)" % (delay, self.backoff.streak()))
        else:
            self.log.info("reconnecting now")
        self.next_attempt = self.loop.call_later(delay, self._attempt_due)

    def _diagnosis(self):
        """Why a login gave no link or a link ended, in the words most useful to an admin."""
        status = None if self.transport is None else self.transport.status
        ended_by_transport = self.link is None or self.link.ended_by_peer or "transport ended" in (self.failure or "")
        if status is not None and ended_by_transport:
            fields = exit_fields(status)
            return "the transport ended (%s)%s" % (exit_text(fields), transport_hint(fields, self.transport_lines))
        return self.failure

    def _attempt_due(self):
        self.next_attempt = None
        self.connect()

    def nudged(self):
        """Another start of the server (cron) found us running: try the link now."""
        if self.next_attempt is None:
            self.log.info("asked to reconnect now, but the link is %s" % ("up" if self.link_up_at else "being attempted"))
            return
        self.next_attempt.cancel()
        self.backoff.failures = self.backoff.short_links = 0
        wait = self.backoff.cap_delay(time.monotonic())
        if wait > 0:
            self.log.info("asked to reconnect now (another start); the login limit allows the next one in %.1f s" % wait)
            self.next_attempt = self.loop.call_later(wait, self._attempt_due)
        else:
            self.log.info("asked to reconnect now (another start): trying at once")
            self.next_attempt = None
            self.connect()

    def stop(self):
        """The server is shutting down: no more logins, and this link ends."""
        if self.next_attempt is not None:
            self.next_attempt.cancel()
        if self.link is not None and not self.link.closed:
            self.link.close("the server is shutting down")
        self.stop_transport()


class GahpLauncher:
    """Starts the GAHPs sessions ask for: the allow-list, the config (re-read when it
    changes), fork and exec, and one spare of each kind in use, started ahead."""

    def __init__(self, server, config):
        self.server = server
        self.loop = server.loop
        self.log = server.log
        self.layout = server.layout
        self.config = config
        self.config_stamp = self._stamp()
        self.want_spares = config.number("RVGAHP_SPARE_GAHPS", 1, LIMITS["spare_gahps"]) > 0
        self.spares = {}  # GAHP argv -> Spare: started ahead, for the next session of its kind
        self.wide_pipe_quota = wide_pipe_sessions()  # GAHPs whose pipes may be widened
        self.socket_dir_failed = set()  # DAEMON_SOCKET_DIRs already logged as impossible to make

    def take(self, gahp):
        """(child, its stdout, its stdin, where it came from, argv, config) for a session,
        from a spare where one waits; or a UserError that says why not."""
        argv, env, config = self.gahp_command(gahp)
        spare = self.spares.pop(tuple(argv), None)
        if spare is not None:
            child, stdout_r, stdin_w = spare.hand_over()
            origin = "a spare started %.1f s ago" % (time.monotonic() - spare.born)
        else:
            child, stdout_r, stdin_w = self.spawn_gahp(argv, env, config)
            origin = "started now"
        if self.want_spares:
            # After the next poll, so the banner already waiting in the spare's pipe goes
            # out before the server spends time on a fork.
            self.loop.soon(lambda: self.make_spare(gahp, argv, env, config))
        return child, stdout_r, stdin_w, origin, argv, config

    def current_config(self):
        """The config, re-read if the file changed, so edits apply to the next session."""
        stamp = self._stamp()
        if stamp != self.config_stamp:
            self.config = Config.load(self.config.path)
            self.config_stamp = stamp
            self.log.info("re-read config %s" % self.config.path)
            for note in self.config.notes:
                self.log.info(note)
            self.discard_spares()  # they run with the old settings
        return self.config

    def _stamp(self):
        try:
            st = os.stat(self.config.path)
            return (st.st_mtime, st.st_size, st.st_ino)
        except OSError:
            return None

    def gahp_command(self, gahp):
        """(argv, environment, config) for a GAHP of this name, or a UserError that says why not."""
        if gahp not in GAHPS:
            raise UserError("unknown GAHP %r; this server runs %s" % (gahp[:80], ", ".join(sorted(GAHPS))))
        config = self.current_config()
        knob, binary, args = GAHPS[gahp]
        path = config.get(knob) or (os.path.join(self.layout.gahp_dir, binary) if self.layout.gahp_dir else "")
        if not path:
            raise UserError("%s is not set in %s" % (knob, config.path))
        problem = path_problem(path)
        if problem == "it does not exist":
            raise UserError("%s %s (from %s) does not exist" % (knob, path, config.path))
        if problem:
            raise UserError("%s %s (from %s) cannot run: %s" % (knob, path, config.path, problem))
        if not os.access(path, os.X_OK):
            raise UserError("%s %s (from %s) is not executable" % (knob, path, config.path))
        env = dict(os.environ)
        env["CONDOR_CONFIG"] = config.path
        for name in ("GLITE_LOCATION", "BLAHPD_LOCATION"):
            value = config.get(name)
            if value:
                env[name] = value
        return [path] + args, env, config

    def make_spare(self, gahp, argv, env, config):
        """Start a GAHP of this kind before anyone asks, so the next session's is up."""
        key = tuple(argv)
        if self.server.stopping or key in self.spares or self._stamp() != self.config_stamp:
            return
        try:
            child, stdout_r, stdin_w = self.spawn_gahp(argv, env, config)
        except UserError as e:
            self.log.info("cannot start a spare %s: %s" % (gahp, e))
            return
        self.spares[key] = Spare(self, key, gahp, child, stdout_r, stdin_w)

    def discard_spares(self):
        for spare in list(self.spares.values()):
            spare.discard()
        self.spares.clear()

    def spawn_gahp(self, argv, env, config):
        """fork + exec one GAHP: (its Child, its stdout's read end, its stdin's write end)."""
        name = os.path.basename(argv[0])
        self.make_daemon_socket_dir(config)
        stderr_path = config.get("RVGAHP_GAHP_STDERR") or self.layout.default_gahp_stderr
        if stderr_path == os.devnull:
            stderr_fd = os.open(os.devnull, os.O_WRONLY)
        else:
            stderr_fd = open_private(stderr_path, os.O_WRONLY | os.O_APPEND, "the GAHP stderr log")
        try:
            stdin_r, stdin_w, stdout_r, stdout_w = make_pipes(2, name)
        except UserError:
            close_fd(stderr_fd)
            raise
        if len(self.server.session_of_pid) + len(self.spares) < self.wide_pipe_quota:
            widen_pipe(stdin_w)
            widen_pipe(stdout_r)
        try:
            pid = spawn(argv, env, self.layout.home, stdin_r, stdout_w, stderr_fd, self.server.die_with_parent)
        except SpawnError as e:
            close_fds((stdin_w, stdout_r))
            raise UserError("cannot start %s: %s" % (name, e))
        finally:
            close_fds((stdin_r, stdout_w, stderr_fd))
        child = self.server.children[pid] = Child(self.loop, pid, lambda status: None)
        child.stderr_log = None if stderr_path == os.devnull else stderr_path
        return child, stdout_r, stdin_w

    def make_daemon_socket_dir(self, config):
        """Make the config's DAEMON_SOCKET_DIR before a GAHP needs it.

        A session's condor_ft-gahp and its spare start together. When the directory is
        missing, both try to make it, and HTCondor's SharedPortEndpoint gives up in the
        one whose mkdir lost the race: that GAHP exits 4 before its banner. Seen as a
        failed setup in a CI run of the HTCondor tier (tests/test_htcondor.py)."""
        try:
            path = config.get_all_here("DAEMON_SOCKET_DIR")
        except ConfigError:
            return  # the GAHP reads the same config, and says what is wrong with it
        if not path or not os.path.isabs(path):
            return  # not set here, or set from HTCondor's built-ins, which only the GAHP knows
        try:
            if os.path.isdir(path):
                return
            os.makedirs(path, 0o700, exist_ok=True)
            self.log.info("made DAEMON_SOCKET_DIR %s (from %s)" % (path, config.path))
        except (OSError, ValueError) as e:  # ValueError: a NUL in the path
            if path not in self.socket_dir_failed:  # once, not at every session start
                self.socket_dir_failed.add(path)
                why = getattr(e, "strerror", None) or e
                self.log.info("cannot make DAEMON_SOCKET_DIR %s (from %s): %s" % (path, config.path, why))


class Server:
    """The cluster's role: a LinkKeeper keeps the link up, a GahpLauncher starts GAHPs,
    and the server joins each session's channel to its GAHP, and reaps every child."""

    def __init__(self, log, layout, config):
        self.log = log
        self.layout = layout
        self.loop = Loop(log)
        self.die_with_parent = parent_death_signal()
        self.children = {}  # pid -> Child, until reaped
        self.session_of_pid = {}  # a GAHP's pid -> its ServerSession, until the GAHP is reaped
        self.stopping = False
        self.exit_status = 0
        self.keeper = LinkKeeper(self, config)
        self.launcher = GahpLauncher(self, config)
        self.next_tunnel_cid = 0
        self.tcp_owner_note = False  # said once that tunnel peers cannot be checked here
        self.sock_diag = SockDiag()  # asks the kernel who connected to a tunnel port
        self.refusals = LogSummary(self.loop, log)  # what other users can make us log

    @property
    def link(self):
        return self.keeper.link

    def run(self):
        self.loop.on_signal(signal.SIGCHLD, self.reap)
        self.loop.on_signal(signal.SIGTERM, self.shutdown)
        self.loop.on_signal(signal.SIGINT, self.shutdown)
        self.loop.on_signal(signal.SIGHUP, self.log.reopen_after_sighup)
        self.loop.on_signal(signal.SIGUSR1, self.keeper.nudged)
        config = self.launcher.config
        self.log.info(
            "rvgahp %s starting on %s (Python %s); config %s" % (VERSION, socket.gethostname(), sys.version.split()[0], config.path)
        )
        for note in config.notes:
            self.log.info(note)
        if self.die_with_parent is None:
            self.log.info("note: this system cannot end GAHPs with the server (no prctl), so a kill -9 of the server leaves them running")
        self.keeper.connect()
        self.loop.run()
        self.log.info("stopped")
        return self.exit_status

    def files_gone(self):
        """Why the server has nothing left to run on (its transport or config is gone), or None."""
        for what, path in (("transport", self.layout.transport), ("config", self.launcher.config.path)):
            if not os.path.lexists(path):
                return "its %s %s is gone" % (what, path)
        return None

    # -- sessions

    def on_open(self, cid, payload):
        link = self.link
        if cid in link.channels or cid == 0 or cid & TUNNEL_CHANNEL:
            link.close("protocol error: OPEN for channel %d, which is in use or not the proxy's to open" % cid)
            return
        try:
            fields = decode_fields(payload)
        except ProtocolError as e:
            self.refuse(cid, "malformed request: %s" % e)
            return
        if len(self.session_of_pid) >= MAX_SESSIONS:
            self.refuse(cid, "this server already runs %d GAHPs (the limit)" % MAX_SESSIONS)
            return
        try:
            self.start_session(cid, fields)
        except UserError as e:
            self.refuse(cid, str(e))
        except Exception as e:  # one session's fault never takes the link down
            self.log.debug(traceback_text())
            self.refuse(cid, "internal error: %s" % e)

    def start_session(self, cid, fields):
        gahp = fields.get("gahp", "")
        child, stdout_r, stdin_w, origin, argv, config = self.launcher.take(gahp)
        session = ServerSession(self, cid, gahp, child, stdout_r, stdin_w)
        try:
            reply = {"pid": child.pid}
            if fields.get("tunnel") == "1" and gahp == "condor_ft-gahp":  # only the ft-gahp transfers files
                reply.update(self.open_tunnel(session, config))
        except BaseException:
            # The start is refused after all: the GAHP we took must not outlive it, held
            # by nobody, one more with every retry the GridManager makes.
            session.abandon()
            raise
        self.link.channels[cid] = session
        self.session_of_pid[child.pid] = session
        self.link.send(ACCEPT, cid, encode_fields(reply))
        session.begin_relay()
        self.log.info("session %d: %s runs as pid %d, %s (%s)%s" % (cid, gahp, child.pid, origin, argv[0], session.tunnel_note()))

    def open_tunnel(self, session, config):
        """The ACCEPT fields that tell the client about this session's tunnel port."""
        if not config.boolean("RVGAHP_FT_TUNNEL", True):
            return {"tunnel": "off"}
        try:
            session.tunnel = TunnelListener(self, session)
        except OSError as e:
            reason = "cannot open a TCP port on the cluster's 127.0.0.1: %s" % (e.strerror or e)
            self.log.info("session %d: tunnel: %s" % (session.cid, reason))
            return {"tunnel": "error", "tunnel_error": reason}
        return {"tunnel": "on", "tunnel_port": session.tunnel.port}

    def new_tunnel_cid(self):
        while True:
            self.next_tunnel_cid = self.next_tunnel_cid % 0x7FFFFFFF + 1
            cid = TUNNEL_CHANNEL | self.next_tunnel_cid
            if cid not in self.link.channels:
                return cid

    def refuse(self, cid, reason):
        self.log.info("session %d: refused: %s" % (cid, reason))
        self.link.send(REFUSE, cid, encode_fields({"reason": reason}))

    def gahp_gone(self, session):
        self.session_of_pid.pop(session.child.pid, None)

    # -- children and signals

    def reap(self):
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            child = self.children.pop(pid, None)
            if child is not None:
                child.exited(status)
        self.maybe_exit()

    def shutdown(self):
        if self.stopping:
            return
        self.stopping = True
        running, spares = len(self.session_of_pid), len(self.launcher.spares)
        self.log.info(
            "shutting down: closing the link, ending %d GAHP%s in sessions and %d spare%s"
            % (running, "" if running == 1 else "s", spares, "" if spares == 1 else "s")
        )
        self.launcher.discard_spares()
        self.keeper.stop()
        # Give up waiting on anything that ignores EOF and SIGTERM; it gets SIGKILL.
        self.loop.call_later(GAHP_TERM_AFTER + GAHP_KILL_AFTER + 1.0, self.loop.stop)
        self.maybe_exit()

    def maybe_exit(self):
        if self.stopping and not self.children:
            self.loop.stop()


def transport_hint(fields, lines):
    """What to do about a transport's exit, quoting its own last words where they name the fault."""
    code = fields.get("exit")
    said = (": it said %r" % lines[-1][:200]) if lines else ""
    if code == 255:
        return "; ssh failed: its messages are above"
    if code == 127:
        return (
            '; a command was not found%s; check the path of rvgahp_proxy in command="..." in the submit host\'s '
            "authorized_keys and in rvgahp_ssh" % said
        )
    if code == 126:
        return "; a command was not executable%s; chmod +x it (rvgahp.pyz, and the script that runs it)" % said
    return ""


class Spare:
    """A GAHP started before anyone asked, its banner waiting in the pipe.

    One per kind in use, so a session start costs no GAHP start-up. A spare that dies
    idle is not replaced until a session needs its kind again, so a GAHP that crashes
    at start cannot turn into a fork loop.
    """

    def __init__(self, launcher, key, gahp, child, stdout_r, stdin_w):
        self.launcher = launcher
        self.key = key
        self.gahp = gahp
        self.child = child
        self.stdout_r = stdout_r
        self.stdin_w = stdin_w
        self.born = time.monotonic()
        child.on_exit = self.exited

    def hand_over(self):
        """The process and its pipes, for a session; the spare lets go of them."""
        handed = (self.child, self.stdout_r, self.stdin_w)
        self.stdout_r = self.stdin_w = None
        return handed

    def exited(self, status):
        idle = self.launcher.spares.get(self.key) is self
        self.discard()
        if idle:
            del self.launcher.spares[self.key]
            self.launcher.log.info(
                "spare %s pid %d exited while idle (%s); the next session starts its own"
                % (self.gahp, self.child.pid, exit_text(exit_fields(status)))
            )

    def discard(self):
        """Close its pipes: it sees EOF and exits, and is made to if it does not."""
        close_fds((self.stdin_w, self.stdout_r))
        self.stdin_w = self.stdout_r = None
        self.child.stop(GAHP_TERM_AFTER, GAHP_KILL_AFTER)


def last_line_of(path, limit=4096, all_lines=False):
    """The last non-blank line of a log file, at most 300 characters; "" if none can be
    read. With all_lines, the non-blank lines of its last `limit` bytes instead."""
    nothing = [] if all_lines else ""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return nothing
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return nothing
        os.lseek(fd, max(0, st.st_size - limit), 0)
        lines = os.read(fd, limit).decode("utf-8", "replace").splitlines()
    except OSError:
        return nothing
    finally:
        os.close(fd)
    lines = [printable(line.strip()[:300]) for line in lines if line.strip()]
    if all_lines:
        return lines
    return lines[-1] if lines else ""


class ServerSession(Channel):
    """A GAHP process on one channel: its stdout is the source, its stdin the sink."""

    def __init__(self, server, cid, gahp, child, stdout_r, stdin_w):
        Channel.__init__(self, server.link, cid, stdout_r, stdin_w)
        self.server = server
        self.gahp = gahp
        self.child = child
        self.tunnel = None  # its TunnelListener, for a condor_ft-gahp
        self.tunnel_totals = [0, 0, 0]  # ended tunnel connections, bytes to and from the GridManager
        child.on_exit = self.exited

    def tunnel_note(self):
        return "; tunnel port %d" % self.tunnel.port if self.tunnel else ""

    def summary(self):
        return session_summary(self, self.received, self.sent)

    def source_ended(self):
        self._maybe_finish()

    def exited(self, status):
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
        if self.released or not self.source_done or self.child.running():
            return
        fields = exit_fields(self.child.status)
        if self.sent == 0 and fields != {"exit": 0}:
            # It died before its banner: the GridManager will show only its stderr
            # lines, so send it the likeliest cause, the GAHP's own last words.
            fields["before_banner"] = "1"
            if self.child.stderr_log:
                fields["stderr_log"] = self.child.stderr_log
                fields["stderr_tail"] = last_line_of(self.child.stderr_log)
        self.link.send(CLOSE, self.cid, encode_fields(fields))
        self.log.info(
            "session %d: %s pid %d ended (%s) after %s" % (self.cid, self.gahp, self.child.pid, exit_text(fields), self.summary())
        )
        self.release()

    def release(self):
        Channel.release(self)
        if self.tunnel is not None:
            self.tunnel.close()

    def peer_closed(self, fields):
        self.log.info("session %d: the client ended it (%s) after %s" % (self.cid, exit_text(fields), self.summary()))
        self.abandon()

    def failed(self, reason):
        self.abandon()

    def link_lost(self, reason):
        self.log.info("session %d: %s pid %d loses its link after %s" % (self.cid, self.gahp, self.child.pid, self.summary()))
        self.abandon()

    def abandon(self):
        """Close the GAHP's pipes; it should exit on EOF, and is made to if it doesn't."""
        self.release()

        def say(name):
            self.log.info(
                "session %d: %s pid %d ignored %s; sending %s"
                % (self.cid, self.gahp, self.child.pid, "EOF" if name == "SIGTERM" else "SIGTERM", name)
            )

        self.child.stop(GAHP_TERM_AFTER, GAHP_KILL_AFTER, say)


# --------------------------------------------------------------------------- the tunnel

# Channels of tunnel connections are numbered by the server with this bit set, so they
# never meet the proxy's session numbers.
TUNNEL_CHANNEL = 0x80000000


class TunnelListener:
    """A session's TCP port on the cluster's 127.0.0.1, where its condor_ft-gahp connects
    for each transfer. Each connection becomes a channel to the proxy, which connects it
    on to the GridManager address that the session's client announced, and nowhere else.
    Only our own uid may connect: `ssh -R` lets in any local user, we do not."""

    def __init__(self, server, session):
        self.server = server
        self.session = session
        self.loop = server.loop
        self.log = server.log
        self.conns = {}  # cid -> TunnelConn
        self.paused = False  # at the limit: not accepting until a connection ends
        self.said_full = False
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.bind(("127.0.0.1", 0))
            sock.listen(128)
        except OSError:
            sock.close()
            raise
        sock.setblocking(False)
        self.sock = sock
        self.port = sock.getsockname()[1]
        self.loop.on_readable(sock.fileno(), self._accept)
        server.sock_diag.open()

    def _accept(self):
        if len(self.conns) >= MAX_TUNNEL_CONNECTIONS:
            self._pause()
            return
        accept_waiting(self.loop, self.log, self.sock, "session %d: tunnel: cannot accept" % self.session.cid, self._take)

    def _take(self, conn, peer):
        """One accepted connection; False once the session has all it may have open."""
        if not self._welcome(conn, peer):
            conn.close()
            return True
        cid = self.server.new_tunnel_cid()
        self.conns[cid] = tunnel = TunnelConn(self.server.link, cid, conn, self.session, self.conns, self._resume)
        if "tunnel_pool" in self.server.link.features:
            tunnel.asks = True  # it sends nothing until the proxy's pool grants it credit
            tunnel.credit = 0
        self.server.link.channels[cid] = tunnel
        self.server.link.send(TUNNEL, cid, encode_fields({"session": self.session.cid}))
        tunnel.begin_relay()
        if len(self.conns) < MAX_TUNNEL_CONNECTIONS:
            return True
        self._pause()
        return False

    def _pause(self):
        """At the limit, stop accepting: the next connections wait in the kernel's queue
        (and then in TCP's own retries) until one ends, and none is refused."""
        if self.paused:
            return
        self.paused = True
        self.loop.on_readable(self.sock.fileno(), None)
        if not self.said_full:  # once a session: a busy ft-gahp may touch the limit often
            self.said_full = True
            self.log.info(
                "session %d: tunnel: %d connections are open (the limit); more wait for one to end" % (self.session.cid, len(self.conns))
            )

    def _resume(self):
        if self.paused and self.sock is not None and len(self.conns) < MAX_TUNNEL_CONNECTIONS:
            self.paused = False
            self.loop.on_readable(self.sock.fileno(), self._accept)

    def _welcome(self, conn, peer):
        """Whether this connection may use the tunnel: our uid, and within the limit."""
        cid = self.session.cid
        uid = tcp_peer_uid(peer, conn.getsockname(), self.server.sock_diag)
        if uid is None and not self.server.tcp_owner_note:
            self.server.tcp_owner_note = True
            self.log.info("tunnel: cannot tell here which user connects to a tunnel port (no /proc/net/tcp); any local user can use it")
        if uid == -1:
            self.server.refusals.note("session %d: tunnel: closed" % cid, "whose owner is gone", "it closed before it could be checked")
            return False
        if uid is not None and uid != os.getuid():
            self.server.refusals.note(
                "session %d: tunnel: closed" % cid, "from uid %d (%s)" % (uid, user_name(uid)), "only uid %d may use it" % os.getuid()
            )
            return False
        return True

    def close(self):
        """The session is over: no new connections, and the open ones end with it."""
        if self.sock is not None:
            self.loop.forget(self.sock.fileno())
            self.sock.close()
            self.sock = None
            self.server.refusals.flush()  # its counts are told with it, not a minute later
        for conn in list(self.conns.values()):
            conn.abort("its session ended")


def tcp_peer_uid(peer, local, sock_diag):
    """The uid owning the TCP socket at `peer` that is connected to our `local`; -1 if no
    process owns such a socket any more (it is closed: only a TIME_WAIT or orphaned
    entry is left, which the kernel reports as uid 0, and which proves nobody's); None
    where this cannot be found out at all."""
    try:
        return sock_diag.uid(peer, local)
    except OSError:
        pass  # no netlink here (an old kernel, a locked-down container): read the table
    try:
        with open("/proc/net/tcp") as f:
            table = f.read()
    except OSError:
        return None

    def key(address):
        host, port = address[:2]
        return "%08X:%04X" % (struct.unpack("=I", socket.inet_aton(host))[0], port)

    want = (key(peer), key(local))
    for line in table.splitlines()[1:]:
        fields = line.split()
        if len(fields) > 9 and (fields[1], fields[2]) == want:
            if fields[3] == "%02X" % TCP_TIME_WAIT or fields[9] == "0":
                return -1
            return whole_number(fields[7], 0, 2**32 - 1)
    return -1


NETLINK_SOCK_DIAG, SOCK_DIAG_BY_FAMILY, NLMSG_ERROR, NLM_F_REQUEST = 4, 20, 2, 1
NLMSG_HEADER = struct.Struct("=IHHII")  # length, type, flags, sequence, port id
# inet_diag_msg: family, state, timer, retransmits; the socket id; 3 counters; uid; inode
INET_DIAG_STATE_AT = NLMSG_HEADER.size + 1
INET_DIAG_UID_AT = NLMSG_HEADER.size + 4 + 48 + 12
TCP_TIME_WAIT = 6


class SockDiag:
    """Linux's sock_diag netlink: ask the kernel about one TCP socket by its addresses.
    It costs microseconds, where reading /proc/net/tcp walks every TCP socket on the host.

    The question is on the path of every new tunnel connection, so the server keeps one
    netlink socket open: making one for each question cost more than asking it
    (bench/tunnel.py counts the server's CPU per connection)."""

    def __init__(self):
        self.sock = None
        self.seq = 0

    def open(self):
        """Open the netlink socket ahead of the first question, so the server's fd count
        is steady from its first tunnel on. Where netlink is missing, uid() says so."""
        if self.sock is None:
            try:
                self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG)
            except OSError:
                pass

    def close(self):
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def uid(self, peer, local):
        """tcp_peer_uid through sock_diag; raises OSError where netlink cannot answer."""
        self.open()
        if self.sock is None:
            raise OSError(errno.EAFNOSUPPORT, "no sock_diag netlink here")
        self.seq = self.seq % 0xFFFFFFFF + 1
        # inet_diag_req_v2: family, protocol, extensions, pad, states; then the socket id:
        # ports and addresses in network order, any interface, no cookie to match.
        socket_id = (
            struct.pack("!HH", peer[1], local[1])
            + socket.inet_aton(peer[0]).ljust(16, b"\0")
            + socket.inet_aton(local[0]).ljust(16, b"\0")
            + struct.pack("=III", 0, 0xFFFFFFFF, 0xFFFFFFFF)
        )
        request = struct.pack("=BBBBI", socket.AF_INET, socket.IPPROTO_TCP, 0, 0, 0xFFFFFFFF) + socket_id
        try:
            self.sock.send(NLMSG_HEADER.pack(NLMSG_HEADER.size + len(request), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST, self.seq, 0) + request)
            # The kernel answers inside send(), so the reply is queued by now; one that
            # is not will never come, and waiting for it must not stall the server.
            while True:
                reply = self.sock.recv(8192, socket.MSG_DONTWAIT)
                if len(reply) >= NLMSG_HEADER.size and NLMSG_HEADER.unpack_from(reply)[3] == self.seq:
                    break  # (an older question's answer is skipped)
        except OSError:
            self.close()  # the next question starts on a fresh socket
            raise
        _, kind, _, _, _ = NLMSG_HEADER.unpack_from(reply)
        if kind == NLMSG_ERROR:
            code = -struct.unpack_from("=i", reply, NLMSG_HEADER.size)[0]
            if code == errno.ENOENT:
                return -1
            raise OSError(code, os.strerror(code))
        if kind != SOCK_DIAG_BY_FAMILY or len(reply) < INET_DIAG_UID_AT + 8:
            raise OSError(errno.EPROTO, "an unexpected sock_diag reply")
        uid, inode = struct.unpack_from("=II", reply, INET_DIAG_UID_AT)
        if reply[INET_DIAG_STATE_AT] == TCP_TIME_WAIT or inode == 0:
            return -1  # closed already: no process owns it, whatever uid it shows
        return uid


def is_connected(sock):
    """Whether a non-blocking connect has completed: it often has by the time connect()
    returns, when the other end is on this host."""
    try:
        sock.getpeername()
    except OSError:
        return False  # still under way, or failed: the wait for writable tells which
    return True


def tunnel_window(link):
    """What a tunnel connection may have in flight each way: TUNNEL_WINDOW where the peer
    knows it too, else the window every rvgahp with the tunnel uses."""
    return TUNNEL_WINDOW if "wide_tunnel" in link.features else CHANNEL_WINDOW


class CreditPool:
    """The credit the proxy grants the tunnel connections of its link, in total: what
    the cluster may send ahead for GridManager sockets, so all the proxy can hold for
    them, however many sessions and connections there are.

    A connection wants credit when it has connected to the GridManager, when its cluster
    end asks (bytes wait there and it has none), and when its socket has taken a batch
    of what came, so a transfer keeps streaming. Wants are served in turn, each up to
    the connection's window, from what is free: never more than the pool. A connection
    with nothing to send gives its credit back (see TunnelConn), so idle ones hold none,
    and the others wait only on GridManager sockets that have not read what they got.
    """

    def __init__(self, size):
        self.size = size
        self.granted = 0  # to connections, and not yet given back
        self.waiting = deque()  # connections that want credit, in turn

    def want(self, conn):
        if not conn.wants_credit:
            conn.wants_credit = True
            self.waiting.append(conn)
        self.serve()

    def leave(self, conn):
        """An ended connection leaves the line now, not when it would reach its head."""
        if conn.wants_credit:
            conn.wants_credit = False
            self.waiting.remove(conn)

    def give_back(self, n):
        self.granted -= n
        self.serve()

    def serve(self):
        while self.waiting:
            conn = self.waiting[0]
            want = 0 if conn.released or conn.peer_done else conn.window - conn.pooled
            n = min(want, self.size - self.granted)
            if want > 0 and n < min(want, TUNNEL_GRANT_MIN):
                return  # the first in turn waits for enough to come back; none overtakes it
            self.waiting.popleft()
            conn.wants_credit = False
            if n > 0:
                self.granted += n
                conn.granted_more(n)


class TunnelConn(Channel):
    """One TCP connection through the tunnel: the same class at both ends.

    Its socket is both source and sink. EOF travels as a half-close: our read side ending
    sends EOF; the peer's EOF, once its data is written, shuts our write side. When both
    directions are done the channel ends; an error at either end aborts both.
    """

    def __init__(self, link, cid, sock, session, registry, on_end=None, pool=None):
        Channel.__init__(self, link, cid, sock.fileno(), sock.fileno(), tunnel_window(link))
        self.sock = sock
        # The proxy's end, with tunnel_pool: its credit comes from the link's CreditPool.
        self.pool = pool
        self.pooled = 0  # granted from the pool and not yet given back
        self.wants_credit = False  # in the pool's line
        self.peer_done = False  # the far end sent EOF: it needs no more credit
        # The cluster's end, with tunnel_pool: it starts with no credit, asks for some when
        # bytes wait, and gives back what it has not used once it has sent nothing for a
        # while (TUNNEL_IDLE_RETURN).
        self.asks = False
        self.asked = False
        self.watching = None  # what the loop calls when the socket has bytes: read, or ask
        self._on_ask = self._ask
        self.last_sent = 0.0
        self.idle_timer = None
        self.session = session
        self.registry = registry  # the session's table of its connections
        self.on_end = on_end  # told once it has left the registry
        self.closed = False
        self.aborted = False  # ended by an error: a reset, never a FIN that looks like the end
        self.target = None  # where the proxy connects it to
        self.at_gridmanager = False  # the proxy's end, whose socket is the GridManager's
        self.connect_timer = None

    def connect(self, address, text):
        """At the proxy: connect on to the GridManager, holding the peer's bytes till then."""
        self.target = text
        self.at_gridmanager = True
        self.hold_sink()
        err = self.sock.connect_ex(address)
        if err == errno.EINPROGRESS and is_connected(self.sock):
            err = 0  # a GridManager on this host has answered already: no need to wait a turn
        if err == 0:
            self._relay_connected()
            return
        if err != errno.EINPROGRESS:
            self._connect_failed(os.strerror(err))
            return
        self.loop.on_writable(self.sock.fileno(), self._connected)
        self.connect_timer = self.loop.call_later(
            TUNNEL_CONNECT_TIMEOUT, lambda: self._connect_failed("no answer within %g s" % TUNNEL_CONNECT_TIMEOUT)
        )

    def _connected(self):
        self.loop.on_writable(self.sock.fileno(), None)
        self.connect_timer.cancel()
        err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self._connect_failed(os.strerror(err))
            return
        self._relay_connected()

    def _relay_connected(self):
        self.begin_relay()
        self.release_sink()
        if self.pool is not None and not self.peer_done:  # (an EOF may have come before the connect)
            self.pool.want(self)  # the far end may send what the pool grants

    # -- the proxy's end: credit from the pool

    def on_frame(self, kind, payload):
        if kind == DATA and self.pool is not None and self.inflight + self.ungranted + len(payload) > self.pooled:
            raise ProtocolError("channel %d sent more than the pool granted it" % self.cid)
        Channel.on_frame(self, kind, payload)

    def granted_more(self, n):
        self.pooled += n
        self.link.send(WINDOW, self.cid, COUNT.pack(n))

    def _sink_took(self, n):
        if self.pool is None:
            Channel._sink_took(self, n)
            return
        # Credit goes back to the pool in batches, or once the socket has taken all that
        # came (the far end may be waiting on a small grant); a connection whose socket
        # takes bytes is streaming, so it wants more.
        self.inflight -= n
        self.ungranted += n
        if (self.ungranted >= self.grant_at or self.inflight == 0) and not self.released:
            self.pooled -= self.ungranted
            self.pool.give_back(self.ungranted)
            self.ungranted = 0
            if not self.peer_done:
                self.pool.want(self)

    def peer_eof(self):
        if self.pool is not None and not self.peer_done:
            self.peer_done = True
            unused = self.pooled - self.inflight - self.ungranted  # frames come in order: no more will
            self.pooled -= unused
            self.pool.give_back(unused)
        Channel.peer_eof(self)

    def asked_for_credit(self):
        if self.pool is None:
            Channel.asked_for_credit(self)
        if self.relaying and not self.peer_done:  # before its connect, the connect wants for it
            self.pool.want(self)

    def gave_back_credit(self, n):
        unsent = self.pooled - self.inflight - self.ungranted  # what the far end may still send, at most
        if self.pool is None or n > unsent:
            raise ProtocolError("channel %d gave back %d bytes of credit it does not have" % (self.cid, n))
        self.pooled -= n
        self.pool.give_back(n)

    # -- the cluster's end: ask when bytes wait, give back when idle

    def refresh(self):
        if not self.asks:
            Channel.refresh(self)
            return
        live = self.relaying and not self.source_done and not self.link.congested
        if self.credit > 0:
            self.asked = False
            want = self._on_source if live else None
            if want is not None and self.idle_timer is None:
                self.last_sent = time.monotonic()
                self.idle_timer = self.loop.call_later(TUNNEL_IDLE_RETURN, self._idle_check)
        else:
            want = self._on_ask if live and not self.asked else None
        if want is not self.watching:
            self.watching = want
            self.reading = want is self._on_source
            self.loop.on_readable(self.source_fd, want)

    def _ask(self):
        """Bytes wait on a connection that has no credit: one ASK, until credit comes."""
        self.asked = True
        self.link.send(ASK, self.cid)
        self.refresh()

    def _idle_check(self):
        self.idle_timer = None
        if self.released or self.source_done or self.credit <= 0:
            return
        idle = time.monotonic() - self.last_sent
        if idle < TUNNEL_IDLE_RETURN or self.link.congested:  # held back by the link is not idle
            wait = TUNNEL_IDLE_RETURN if self.link.congested else TUNNEL_IDLE_RETURN - idle
            self.idle_timer = self.loop.call_later(wait, self._idle_check)
            return
        self.link.send(UNUSED, self.cid, COUNT.pack(self.credit))  # the pool's, while we have nothing to send
        self.credit = 0
        self.refresh()

    def _connect_failed(self, reason):
        if self.released:
            return
        self.log.info("session %d: tunnel: cannot connect to %s: %s" % (self.session.cid, self.target, reason))
        self.abort("cannot connect to the GridManager at %s: %s" % (self.target, reason))

    def summary(self):
        return "%.1f s, %s sent, %s received" % (self.age(), human_bytes(self.sent), human_bytes(self.received))

    def buffered(self):
        """Bytes held here for the socket: those waiting for its connect, and its outbox."""
        return (self.held_size if self.held is not None else 0) + self.sink.size

    def read_source(self, size):
        """As Channel's, except that a reset is not an end: the far end must be reset too,
        or a transfer cut off here would look finished there."""
        try:
            data = os.read(self.source_fd, size)
            if self.asks:
                self.last_sent = time.monotonic()
            return data
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as e:
            self.was_reset(e.strerror)
            return None

    def _sink_gone(self):
        """Our socket's reader reset it, or closed it with bytes still coming: those bytes
        are lost, so the far end learns it the same way."""
        self.was_reset("the connection is gone with bytes still to deliver")

    def was_reset(self, why):
        if self.released:
            return
        side = "the GridManager" if self.at_gridmanager else "the ft-gahp"
        self.log.info("session %d: tunnel: %s reset its connection (%s) after %s" % (self.session.cid, side, why, self.summary()))
        self.abort("reset by %s: %s" % (side, why))

    def _close_source(self):
        self.source_done = True
        self.reading = False
        self.watching = None
        self.loop.on_readable(self.source_fd, None)
        self._close_when_done()

    def _close_sink(self):
        self.sink_done = True
        self.sink.detach()
        if not self.closed and not self.aborted:
            try:
                self.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        self._close_when_done()

    def _close_when_done(self):
        if self.source_done and self.sink_done and not self.closed:
            self.closed = True
            self.loop.forget(self.sock.fileno())
            self.sock.close()

    def source_ended(self):
        if self.sink_done:
            self.release()

    def sink_ended(self):
        if self.source_done:
            self.release()

    def release(self):
        if self.released:
            return
        Channel.release(self)
        if self.idle_timer is not None:
            self.idle_timer.cancel()
            self.idle_timer = None
        if self.pool is not None:
            self.pool.leave(self)
            self.pool.give_back(self.pooled)
            self.pooled = 0
        if self.registry.get(self.cid) is self:
            del self.registry[self.cid]
            if self.on_end is not None:
                self.on_end()
        # The session's totals, named from the GridManager's side on both hosts.
        to_gm, from_gm = (self.received, self.sent) if self.at_gridmanager else (self.sent, self.received)
        totals = self.session.tunnel_totals
        totals[0] += 1
        totals[1] += to_gm
        totals[2] += from_gm

    def abort(self, reason):
        """End it now, both ways, and tell the peer: a reset, not a clean close."""
        if self.released:
            return
        self.link.send(CLOSE, self.cid, encode_fields({"error": reason}))
        self._reset()

    def _reset(self):
        self.aborted = True
        if not self.closed:
            try:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass
        self.release()

    def peer_closed(self, fields):
        self._reset()

    def failed(self, reason):
        self._reset()

    def link_lost(self, reason):
        self._reset()  # a transfer cut off by the link must not look finished


# --------------------------------------------------------------------------- the proxy


class SocketClaim:
    """The proxy's hold on SOCKPATH: it binds the socket, or stands by while another
    live proxy serves it; it touches the lock as a heartbeat, takes over from a proxy
    that has stopped or gone silent, and lets go of socket and lock with the link."""

    def __init__(self, proxy):
        self.proxy = proxy
        self.loop = proxy.loop
        self.log = proxy.log
        self.sockpath = proxy.sockpath
        self.lock_path = proxy.sockpath + ".lock"
        self.listener = None
        self.lock_fd = None
        self.bound_inode = None
        self.standby = False

    def stand_by(self):
        """Another link serves the socket: keep this one up as a hot standby that takes
        over when that one ends, without another ssh login."""
        self.standby = True
        self.loop.call_later(STANDBY_POLL, self._try_takeover)

    def _try_takeover(self):
        if self.proxy.link.closed:
            return
        try:
            try:
                self.claim()
            except SocketBusy:
                silent = self._owner_silent_for()
                if silent is None or silent <= self.proxy.link.ping_timeout:
                    self.loop.call_later(STANDBY_POLL, self._try_takeover)
                    return
                self.log.info(
                    "the rvgahp_proxy serving %s has not been heard from for %.0f s (stopped or hung?); taking over"
                    % (self.sockpath, silent)
                )
                self.claim(owner_is_silent=True)
        except SocketBusy:
            self.loop.call_later(STANDBY_POLL, self._try_takeover)
            return
        except UserError as e:
            self.proxy.cannot_serve(str(e))
            return
        self.standby = False
        self.log.info("took over %s: the link that served it has ended" % self.sockpath)
        self.proxy.link.send(STATE, 0, encode_fields({"state": "active"}))

    def _owner_silent_for(self):
        """Seconds since the serving proxy last touched the lock file: its heartbeat."""
        try:
            st = os.stat(self.lock_path)
        except OSError:
            return None
        return None if st.st_uid != os.getuid() else time.time() - st.st_mtime

    def claim(self, owner_is_silent=False):
        """Bind SOCKPATH, replacing a dead socket of ours but never stealing a live one.

        A lock on SOCKPATH.lock, held for the proxy's life and touched as a heartbeat,
        settles races between two proxies; the connect probe catches a live owner that
        takes no lock. Only a socket that we own is ever removed: a file, a symlink or
        another user's socket at the path is an error that names it.
        """
        if owner_is_silent:
            # Its lock goes with it: the silent proxy keeps a lock on a file nobody can open.
            try:
                os.unlink(self.lock_path)
            except OSError:
                pass
        lock_fd = open_private(self.lock_path, os.O_RDWR, "lock file")
        try:
            try:
                fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                raise SocketBusy("%s is busy: another live rvgahp_proxy serves it" % self.sockpath)
            self._remove_dead_socket(owner_is_silent)
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            old_umask = os.umask(0o177)  # born 0600: no window where others may connect
            try:
                listener.bind(self.sockpath)
            except OSError as e:
                listener.close()
                raise UserError("cannot create socket %s: %s" % (self.sockpath, e.strerror))
            finally:
                os.umask(old_umask)
        except BaseException:
            os.close(lock_fd)
            raise
        self.lock_fd = lock_fd
        os.chmod(self.sockpath, 0o600)
        listener.listen(128)
        listener.setblocking(False)
        self.listener = listener
        self.bound_inode = os.stat(self.sockpath).st_ino
        self.loop.on_readable(listener.fileno(), self.proxy.accept)
        self._heartbeat()

    def _remove_dead_socket(self, owner_is_silent):
        try:
            st = os.lstat(self.sockpath)
        except FileNotFoundError:
            return
        except OSError as e:
            raise UserError("cannot look at %s: %s" % (self.sockpath, e.strerror))
        if not stat.S_ISSOCK(st.st_mode):
            raise UserError(
                "%s exists and is not a socket (%s); move it away or choose another socket path" % (self.sockpath, file_kind(st.st_mode))
            )
        if st.st_uid != os.getuid():
            raise UserError(
                "%s is held by uid %d (%s), not by uid %d: another user has taken the path; "
                "choose a socket in a private directory such as ~/.rvgahp/" % (self.sockpath, st.st_uid, user_name(st.st_uid), os.getuid())
            )
        if not owner_is_silent and socket_is_live(self.sockpath):
            raise SocketBusy("%s is busy: a live process that is not an rvgahp_proxy owns it" % self.sockpath)
        try:
            os.unlink(self.sockpath)
        except OSError as e:
            raise UserError("cannot remove the old socket %s: %s" % (self.sockpath, e.strerror))
        self.log.info("removed the %s socket %s" % ("silent proxy's" if owner_is_silent else "dead", self.sockpath))

    def _heartbeat(self):
        """Touch the lock now and then: a standby proxy takes over from one that stops."""
        if self.lock_fd is None or self.proxy.link.closed:
            return
        try:
            os.utime(self.lock_fd)
        except OSError:
            pass
        self.loop.call_later(max(0.5, min(self.proxy.link.ping_interval, self.proxy.link.ping_timeout / 3)), self._heartbeat)

    def release(self):
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
        # The lock too: a standby link takes the socket over at its next try, not after
        # this proxy has finished draining and exited.
        close_fd(self.lock_fd)
        self.lock_fd = None


class Proxy:
    """Owns SOCKPATH on the submit host and carries its clients' sessions on the link."""

    def __init__(self, log, sockpath):
        self.log = log
        self.sockpath = sockpath
        self.loop = Loop(log)
        self.claim = SocketClaim(self)
        self.link = None
        self.ready = False
        self.waiting = []  # sessions that arrived before the server's hello
        self.session_of_cid = {}  # a channel -> its ProxySession, until released
        self.wide_pipe_quota = wide_pipe_sessions()  # sessions whose pipes may be widened
        self.tunnel_pool = CreditPool(TUNNEL_POOL)  # one link per proxy, so one pool
        self.clients = set()
        self.draining = set()  # sessions whose GAHP has ended, still writing its last output
        self.next_cid = 0
        self.started = time.time()
        self.link_up_at = None
        self.sessions_total = 0
        self.sessions_refused = 0

    def run(self):
        check_socket_path(self.sockpath)
        rfd, wfd = take_stdio_for_link()
        self.link = Link(self.loop, self.log, rfd, wfd, self)
        self.link.watch_answers = True
        self.loop.on_signal(signal.SIGTERM, self.shutdown)
        self.loop.on_signal(signal.SIGINT, self.shutdown)
        self.loop.on_signal(signal.SIGHUP, self.log.reopen_after_sighup)
        hello = {
            "role": "proxy",
            "rvgahp": VERSION,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "socket": self.sockpath,
            "features": ",".join(FEATURES),
        }
        try:
            self.claim.claim()
            hello["state"] = "active"
        except SocketBusy as e:
            self.log.info("%s; standing by to take over when it ends" % e)
            hello.update(state="standby", reason=str(e))
            self.claim.stand_by()
        except UserError as e:
            self.cannot_serve(str(e), hello)
            self.loop.run()
            return 1
        self.link.start(hello)
        self.loop.run()
        return 0

    def cannot_serve(self, reason, hello=None):
        """Say why to the server (which logs it and backs off), then end the link."""
        self.log.info(reason)
        if hello is not None:
            hello.update(state="error", reason=reason)
            self.link.start(hello)
        else:
            self.link.send(STATE, 0, encode_fields({"state": "error", "reason": reason}))
        self.link.outbox.when_drained(lambda: self.link.close(reason))

    def accept(self):
        accept_waiting(self.loop, self.log, self.claim.listener, "cannot accept a client", self._take_client)

    def _take_client(self, sock, _):
        conn = ClientConn(self, sock)
        self.clients.add(conn)
        uid = peer_uid(sock)
        if uid != os.getuid():
            reason = "only uid %d may use %s, and this client is uid %s" % (os.getuid(), self.sockpath, uid)
            self.log.info("rejected a client: %s" % reason)
            conn.reader = None  # it gets no hearing
            conn.finish(REFUSE, {"reason": reason, "by": "proxy"})

    def open_session(self, conn, fields, fds):
        gahp = fields.get("gahp", "")
        if len(self.session_of_cid) >= MAX_SESSIONS:
            close_fds(fds)
            conn.finish(REFUSE, {"reason": "the proxy already carries %d sessions (the limit)" % MAX_SESSIONS, "by": "proxy"})
            return
        cid = self._new_cid()
        self.sessions_total += 1
        if len(self.session_of_cid) < self.wide_pipe_quota:
            widen_pipe(fds[0])  # the GridManager's pipes (files and sockets stay as they are)
            widen_pipe(fds[1])
        session = ProxySession(self, cid, conn, gahp, fds[0], fds[1], tunnel_address(fields))
        conn.session = session
        self.link.channels[cid] = self.session_of_cid[cid] = session
        if self.ready:
            session.send_open()
        else:
            self.waiting.append(session)

    def status(self):
        """What `rvgahp_client --status` shows an admin: the link as it is now."""
        now = time.monotonic()
        link = self.link
        peer = link.peer or {}
        heard = now - link.last_heard
        if self.claim.standby:
            state = "standby"
        elif not self.ready:
            state = "starting"
        elif heard > link.ping_interval + 1.0:
            state = "silent"  # pings go unanswered: it may be dying, and must not look "up"
        else:
            state = "up"
        sessions = sorted(self.session_of_cid.values(), key=lambda s: s.cid)
        return {
            "socket": self.sockpath,
            "proxy": {"pid": os.getpid(), "host": socket.gethostname(), "rvgahp": VERSION, "since": self.started},
            "link": {
                "state": state,
                "up_since": self.link_up_at,
                "last_heard_s": round(heard, 3),
                "rtt_ms": None if link.rtt is None else round(link.rtt * 1000, 3),
                "ping_interval": link.ping_interval,
                "ping_timeout": link.ping_timeout,
                "features": sorted(link.features.intersection(FEATURES)),  # what both ends use
                "tunnel_pool": {
                    "size": self.tunnel_pool.size,
                    "granted": self.tunnel_pool.granted,
                    "waiting": len(self.tunnel_pool.waiting),
                },
            },
            "server": {
                "pid": whole_number(peer.get("pid", ""), 1, 2**31 - 1),  # a number, as the proxy's; None if it did not say
                "host": peer.get("host", "?"),
                "rvgahp": peer.get("rvgahp", "?"),
                "logins_1h": peer_count(peer, "logins_1h"),
                "failed_logins_1h": peer_count(peer, "failed_logins_1h"),
            },
            "sessions": [
                {
                    "id": s.cid,
                    "gahp": s.gahp,
                    "state": s.state,
                    "age_s": round(s.age(), 3),
                    "bytes_to_gahp": s.sent,
                    "bytes_from_gahp": s.received,
                    "tunnel_connections": len(s.tunnel_conns),
                    "tunnel_buffered": sum(c.buffered() for c in s.tunnel_conns.values()),
                }
                for s in sessions[:MAX_STATUS_SESSIONS]
            ],
            "totals": {"sessions": self.sessions_total, "open": len(sessions), "refused": self.sessions_refused},
        }

    def _new_cid(self):
        while True:
            self.next_cid = self.next_cid % (TUNNEL_CHANNEL - 1) + 1
            if self.next_cid not in self.link.channels:
                return self.next_cid

    def on_hello(self, fields):
        if fields.get("role") != "server":
            self.link.close("the peer is not an rvgahp_server (it says role=%r)" % fields.get("role"))
            return
        interval = peer_number(fields, "ping_interval", DEFAULT_PING_INTERVAL, self.log)
        timeout = peer_number(fields, "ping_timeout", DEFAULT_PING_TIMEOUT, self.log)
        self.link.set_ping(interval, timeout)
        self.log.info(
            "link up: server pid %s on %s (rvgahp %s)" % (fields.get("pid", "?"), fields.get("host", "?"), fields.get("rvgahp", "?"))
        )
        if "tunnel" not in self.link.features:
            self.log.info(
                "the rvgahp_server (rvgahp %s) has no file-transfer tunnel, so condor_ft-gahp transfers will go direct; "
                "install this rvgahp.pyz on the cluster too" % fields.get("rvgahp", "?")
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

    def on_tunnel(self, cid, payload):
        """The ft-gahp on the cluster connected to a session's tunnel port: connect on to
        that session's GridManager address. The server names only the session; the
        address is the one its client announced, and nothing else is ever dialled."""
        if not cid & TUNNEL_CHANNEL or cid in self.link.channels:
            raise ProtocolError("TUNNEL on channel %d, which is not free for one" % cid)
        fields = decode_fields(payload)
        session = self.session_of_cid.get(whole_number(fields.get("session", ""), 1, 0xFFFFFFFF))
        reason = None
        if set(fields) != {"session"}:
            reason = "the server sent %s; a tunnel goes only to the address its session's client announced" % ", ".join(sorted(fields))
        elif session is None or session.state != "open":
            reason = "no open session %s" % fields["session"][:20]
        elif session.tunnel_to is None:
            reason = "session %d announced no tunnel address" % session.cid
        elif len(session.tunnel_conns) >= MAX_TUNNEL_AT_PROXY:
            reason = "session %d has %d tunnel connections (the limit)" % (session.cid, MAX_TUNNEL_AT_PROXY)
        if reason is not None:
            self.log.info("tunnel: refused a connection from the server: %s" % reason)
            self.link.send(CLOSE, cid, encode_fields({"error": reason}))
            return
        family, host, port, text = session.tunnel_to
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        pool = self.tunnel_pool if "tunnel_pool" in self.link.features else None
        conn = TunnelConn(self.link, cid, sock, session, session.tunnel_conns, pool=pool)
        self.link.channels[cid] = session.tunnel_conns[cid] = conn
        conn.connect((host, port), text)

    def on_noise(self, noise):
        self.log.info("ignored %d bytes before the server's link start" % len(noise))

    def on_link_closed(self, reason):
        self.log.info("link down: %s" % reason)
        # The socket goes first, so no new client reaches a proxy that cannot serve it.
        self.claim.release()
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
    size = len(path.encode(sys.getfilesystemencoding(), "surrogateescape"))  # os.fsencode(path)
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


# The fds of an SCM_RIGHTS message are C ints. struct packs them: array would be one more
# import on every client's start.
def pack_fds(fds):
    return struct.pack("%di" % len(fds), *fds)


def unpack_fds(blob):
    return list(struct.unpack("%di" % (len(blob) // 4), blob[: len(blob) - len(blob) % 4]))


def user_name(uid):
    try:
        return pwd.getpwuid(uid).pw_name
    except (ImportError, KeyError):
        return "no name"


def peer_number(fields, key, default, log):
    """A number from the peer's hello, clamped to LIMITS[key]; a bad one is said and replaced."""
    raw = fields.get(key)
    if raw is None:
        return default
    value = plain_number(raw)
    if value is None:
        log.info("the server sent %s=%r, which is not a number; using %g" % (key, raw[:40], default))
        return default
    clamped = clamp(value, LIMITS[key])
    if clamped != value:
        log.info("the server asked for %s=%s; using %g" % (key, raw[:40], clamped))
    return clamped


def peer_count(fields, key):
    return whole_number(fields.get(key, ""), 0, 10**9)


def take_stdio_for_link():
    """Move the link off fds 0 and 1, so a stray print can never corrupt it."""
    rfd, wfd = os.dup(0), os.dup(1)
    widen_pipe(rfd)  # sshd's pipes, or a socketpair, which stays as it is
    widen_pipe(wfd)
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
        self.reader = FrameReader()  # None once the request is heard
        self.session = None
        self.closed = False
        sock.setblocking(False)
        self.outbox = Outbox(self.loop, self.fd, on_gone=self.gone)
        self.loop.on_readable(self.fd, self._readable)
        self.deadline = self.loop.call_later(REQUEST_TIMEOUT, self._no_request)

    def _readable(self):
        data, fds = self._receive()
        if data is None:
            return
        if not data:
            close_fds(fds)
            self.gone()
            return
        if self.reader is None:
            close_fds(fds)  # nothing but READY is expected now; never leak what a client sends
            if self.session is not None and data.startswith(READY_FRAME):
                self.session.client_ready()
            return
        try:
            fields = self._request(data, fds)
        except ProtocolError as e:
            close_fds(fds)
            self.proxy.log.info("refused a client: %s" % e)
            self.finish(REFUSE, {"reason": "malformed request: %s" % e, "by": "proxy"})
            return
        if fields is None:
            return  # a status request, answered
        mismatch = protocol_mismatch(fields, self.proxy.sockpath)
        if mismatch:
            close_fds(fds)
            self.proxy.log.info("refused a client: %s" % mismatch)
            self.finish(REFUSE, {"reason": mismatch, "by": "proxy"})
            return
        self.proxy.open_session(self, fields, fds)

    def _receive(self):
        """(data, fds) from the client; (None, []) when nothing is ready."""
        try:
            data, ancdata, flags, _ = self.sock.recvmsg(READ_SIZE, socket.CMSG_SPACE(2 * 4))
        except (BlockingIOError, InterruptedError):
            return None, []
        except OSError as e:
            if e.errno not in GONE:
                raise
            return b"", []
        fds = []
        for level, kind, blob in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.extend(unpack_fds(blob))
        if flags & socket.MSG_CTRUNC:
            fds.append(-1)  # more fds than asked for were sent: the request check refuses it
        return data, fds

    def _request(self, data, fds):
        """The request's fields, checked; None for a status request (answered here)."""
        if len(fds) > 2:
            raise ProtocolError("a request with more than two fds")
        frames = self.reader.feed(data)
        if not frames:
            if self.reader.pending() > MAX_FIELDS + HEADER.size:
                raise ProtocolError("an overlong request")
            raise ProtocolError("a request split from its fds")
        self.reader = None
        self.deadline.cancel()
        kind, _, payload = frames[0]
        if kind == STATUS:
            close_fds(fds)
            self.finish(STATUS, {"json": json_text(self.proxy.status())})
            return None
        if kind != OPEN:
            raise ProtocolError("frame type %d instead of a request" % kind)
        fields = decode_fields(payload)
        if not fields.get("gahp"):  # which GAHPs exist is the server's to say; we need a name
            raise ProtocolError("no GAHP named")
        if len(fds) != 2:
            raise ProtocolError("a request without its stdin and stdout")
        check_handed_fds(fds)
        tunnel_address(fields)  # raises on a bad one
        return fields

    def _no_request(self):
        if self.reader is not None and not self.closed:
            self.proxy.log.info("closed a client connection that sent no request within %g s" % REQUEST_TIMEOUT)
            self.close()

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
        self.deadline.cancel()
        self.outbox.detach()
        self.loop.forget(self.fd)
        self.sock.close()
        self.proxy.clients.discard(self)


READY_FRAME = frame(READY, 0)


def check_handed_fds(fds):
    """The stdin and stdout a client hands over must be what the loop can relay: a pipe
    or socket, readable and writable the right way. Anything else is refused here, at
    the request, before it can upset the loop that every other session shares."""
    for fd, name, wrong_mode, wrong_word in ((fds[0], "stdin", os.O_WRONLY, "writing"), (fds[1], "stdout", os.O_RDONLY, "reading")):
        try:
            mode = os.fstat(fd).st_mode
            access = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE
        except OSError as e:
            raise ProtocolError("%s cannot be used: %s" % (name, e.strerror))
        if not (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)):
            raise ProtocolError("%s is %s, not a pipe or socket" % (name, file_kind(mode)))
        if access == wrong_mode:
            raise ProtocolError("%s is open only for %s" % (name, wrong_word))


def tunnel_address(fields):
    """(family, numeric host, port, text) of the GridManager address a client announced
    for its ft-gahp's tunnel, or None; a malformed one is a ProtocolError."""
    if "tunnel_to" not in fields:
        return None
    text, host, port = fields["tunnel_to"], fields.get("tunnel_host", ""), fields.get("tunnel_port", "")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        socket.inet_pton(family, host)
        number = whole_number(port, 1, 65535)
    except OSError:
        number = None
    if number is None:
        raise ProtocolError("a bad tunnel address %r" % text[:80])
    return family, host, number, text


def json_text(value):
    import json

    return json.dumps(value, sort_keys=True)


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

    def __init__(self, proxy, cid, conn, gahp, stdin_fd, stdout_fd, tunnel_to):
        Channel.__init__(self, proxy.link, cid, stdin_fd, stdout_fd)
        self.proxy = proxy
        self.conn = conn
        self.gahp = gahp
        self.state = "waiting"
        self.tunnel_to = tunnel_to  # the GridManager's address for an ft-gahp's tunnel, or None
        self.tunnel_conns = {}  # cid -> TunnelConn
        self.tunnel_totals = [0, 0, 0]  # ended tunnel connections, bytes to and from the GridManager
        self.reported = False  # the client has the status line of a GAHP that died before its banner

    def summary(self):
        return session_summary(self, self.sent, self.received)

    def send_open(self):
        self.state = "opening"
        fields = {"gahp": self.gahp}
        if self.tunnel_to is not None and "tunnel" in self.link.features:
            fields["tunnel"] = "1"
        self.link.probe()  # a link quiet for a while may be dead: find out in seconds
        self.link.send(OPEN, self.cid, encode_fields(fields))

    def accepted(self, fields):
        self.state = "open"
        reply = dict(fields)
        if self.tunnel_to is not None and "tunnel" not in self.link.features:
            reply.update(tunnel="unsupported", tunnel_error="the rvgahp_server (rvgahp %s) has none" % self.link.peer.get("rvgahp", "?"))
        if reply.get("tunnel") == "on":
            self.hold_sink()  # until the client has said `Allocated port`: it must come first
        self.log.info(
            "session %d: %s runs as pid %s on the cluster%s"
            % (self.cid, self.gahp, fields.get("pid", "?"), "; tunnel to %s" % self.tunnel_to[3] if reply.get("tunnel") == "on" else "")
        )
        self.conn.reply(ACCEPT, reply)
        self.begin_relay()

    def client_ready(self):
        if self.held is not None:
            self.release_sink()

    def peer_eof(self):
        if self.received == 0:
            return  # not a byte, not even a banner: CLOSE will say why, before the EOF
        Channel.peer_eof(self)

    def refused(self, fields):
        self.proxy.sessions_refused += 1
        self.log.info("session %d: %s refused: %s" % (self.cid, self.gahp, fields.get("reason", "?")))
        self.conn.finish(REFUSE, fields)
        self.release()

    def release(self):
        Channel.release(self)
        self.proxy.session_of_cid.pop(self.cid, None)
        for conn in list(self.tunnel_conns.values()):
            conn.abort("its session ended")

    def peer_closed(self, fields):
        """The GAHP is done and all its output has arrived: deliver it, then report."""
        if self.link.channels.get(self.cid) is self:
            del self.link.channels[self.cid]
        self.proxy.draining.add(self)
        self.relaying = False
        if self.held is not None:
            self.release_sink()
        if not self.source_done:
            self._close_source()
        if fields.get("before_banner") == "1":
            self.died_before_banner(fields)
            return

        def delivered():
            self.end_sink()
            self.log.info("session %d: %s ended (%s) after %s" % (self.cid, self.gahp, exit_text(fields), self.summary()))
            self.conn.finish_line(exit_line(fields))
            self.release()
            self.proxy.draining.discard(self)

        self.sink.when_drained(delivered)

    def died_before_banner(self, fields):
        """Tell the client why, and let the GridManager see EOF only once the client has
        said so on stderr: the GridManager fails the start at that EOF, and its reason for
        the resource is made of the stderr lines it has read by then."""
        cause = "%s before its banner" % exit_text(fields)
        if fields.get("stderr_log"):
            tail = fields.get("stderr_tail") or "(nothing)"
            cause += "; the last line of %s on the cluster: %s" % (fields["stderr_log"], tail)
        self.log.info("session %d: %s did not start: %s" % (self.cid, self.gahp, cause))
        self.reported = True
        self.conn.outbox.write(exit_line({"error": cause}).encode("utf-8"))
        # The client exits once it has printed the line; its hang-up ends the session.
        self.loop.call_later(EXIT_LINGER, self.client_gone)

    def failed(self, reason):
        self.peer_closed({"error": reason})

    def client_gone(self):
        self.proxy.draining.discard(self)
        if self.reported:  # it has said why its GAHP died: now the GridManager sees EOF
            self.conn.close()
            if not self.released:
                self.end_sink()
                self.release()
            return
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
            self.conn.finish_line(exit_line({"error": "the link to the cluster went down mid-session (%s)" % reason}))
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
       rvgahp_client --status [--json] SOCKPATH

HTCondor's REMOTE_GAHP. Asks the rvgahp_proxy on SOCKPATH for a GAHP on the cluster
(blahpd, batch_gahp or condor_ft-gahp) and connects it to this process's stdin and
stdout. The other --rgahp-* options of HTCondor's remote_gahp are accepted and ignored.

  --rvgahp-wait SECONDS   how long to wait for a server to be connected
                          (default %g, or $RVGAHP_WAIT)
  --status SOCKPATH       show the state of the link behind SOCKPATH and exit
                          (--json: as one JSON object, for scripts and doctor)

For condor_ft-gahp with CONDOR_INHERIT set, it prints `Allocated port N for remote
forward to HOST:PORT` on stderr, as ssh -R would: the ft-gahp's transfers reach the
GridManager through the link, with no port open but ssh.
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
    if len(gahp) > 200:
        raise UsageError("the GAHP name is %d characters long; GAHP names are short words such as blahpd" % len(gahp))
    if not is_gahp_word(gahp):
        raise UsageError("%s is not a GAHP name: it has spaces, control characters or bytes that are not ASCII" % ascii(gahp))
    sockpath = options.get("--rvgahp-socket") or (positional[0] if positional else "")
    if not sockpath:
        raise UsageError("no socket path; usage: rvgahp_client SOCKPATH GAHP_NAME")
    if "/" not in sockpath and ("@" in sockpath or not os.path.exists(sockpath)):
        raise UsageError("%r looks like a host, not a socket path; add --rvgahp-socket SOCKPATH to grid_resource" % sockpath)
    raw_wait = options.get("--rvgahp-wait") or os.environ.get("RVGAHP_WAIT") or str(DEFAULT_CLIENT_WAIT)
    wait = plain_number(raw_wait)
    if wait is None or not 0 <= wait <= 3600:
        raise UsageError("the wait must be 0 to 3600 seconds, not %r" % raw_wait)
    return sockpath, gahp, wait


def is_gahp_word(name):
    return 0 < len(name) <= 200 and all("!" <= c <= "~" for c in name)


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
        devnull = os.open("/dev/null", os.O_RDWR)
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


def connect_to_proxy(sockpath, deadline, wait, last_reason=None):
    """A socket connected to our own rvgahp_proxy on sockpath, retried until deadline."""
    check_socket_path(sockpath)
    delay = 0.02
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(max(deadline - time.monotonic(), 1.0))
        try:
            sock.connect(sockpath)
            check_proxy_owner(sock, sockpath)
            return sock
        except (socket.timeout, FileNotFoundError, ConnectionRefusedError, BlockingIOError, InterruptedError):
            sock.close()  # no proxy yet, or a busy one whose accept backlog is full: try again
        except PermissionError:
            sock.close()
            raise UserError("cannot connect to %s: permission denied; the socket belongs to another user" % sockpath)
        except OSError as e:
            sock.close()
            raise UserError("cannot connect to %s: %s" % (sockpath, e.strerror or e))
        except BaseException:
            sock.close()
            raise
        left = deadline - time.monotonic()
        if left <= 0:
            raise no_server_error(sockpath, wait, last_reason)
        time.sleep(min(delay, left))
        delay = min(delay * 2, 0.25)


def no_server_error(sockpath, wait, last_reason):
    if last_reason:
        return UserError("no rvgahp server is connected to %s (waited %g s); the last link ended: %s" % (sockpath, wait, last_reason))
    last = last_link_news(sockpath + ".log")
    if last:
        return UserError(
            "no rvgahp server is connected to %s (waited %g s); %s; rvgahp_server on the cluster logs in again by itself "
            "(its log: ~/.rvgahp/rvgahp_server.HOST.log there)" % (sockpath, wait, last)
        )
    return UserError("no rvgahp server is connected to %s (waited %g s); is rvgahp_server running on the cluster?" % (sockpath, wait))


def last_link_news(proxy_log):
    """How the last link to the socket ended, from its proxy's log (ours only), or None.

    The proxy leaves with its link, so its log is what remembers an outage: a client
    that finds nobody should say "down since 12:03 (ping timeout)", not guess."""
    try:
        if os.stat(proxy_log).st_uid != os.getuid():
            return None
    except OSError:
        return None
    for line in reversed(last_line_of(proxy_log, limit=16384, all_lines=True)):
        when, _, rest = line.partition(" rvgahp_proxy[")
        message = rest.partition("]: ")[2]
        if message.startswith("link down: "):
            return "its last link went down at %s (%s)" % (when[:19], message[len("link down: ") :])
        if message.startswith("link up: "):
            return "its last link came up at %s and its proxy has since gone without a word" % when[:19]
    return None


def check_proxy_owner(sock, sockpath):
    """Refuse a socket served by anyone but us, before a byte or an fd goes to it.

    In a directory that others can write to, such as /tmp, another user can bind the
    path while our proxy is away; whoever listens would get the GridManager's commands.
    """
    uid = peer_uid(sock)
    owner = os.stat(sockpath).st_uid
    for who, found in (("served", uid), ("owned", owner)):
        if found != os.getuid():
            raise UserError(
                "%s is %s by uid %d (%s), not by you (uid %d): another user may have taken the path; "
                "put the socket in a private directory such as ~/.rvgahp/ (see the README)"
                % (sockpath, who, found, user_name(found), os.getuid())
            )


def read_reply(sock, deadline, limit=MAX_FIELDS):
    """The proxy's next reply as (kind, fields); None if it hung up; raises on timeout.

    It reads exactly one frame and not a byte more: what follows an ACCEPT is the
    status line, and that belongs to whoever waits for it, perhaps a shell.
    """
    header = recv_exactly(sock, HEADER.size, deadline)
    if header is None:
        return None
    kind, _, length = HEADER.unpack(header)
    if length > limit:
        raise UserError("the rvgahp proxy sent a %d-byte reply; is something else listening on the socket?" % length)
    payload = recv_exactly(sock, length, deadline)
    if payload is None:
        return None
    try:
        return kind, decode_fields(payload, limit)
    except ProtocolError as e:
        raise UserError("the rvgahp proxy sent a reply that makes no sense (%s); is something else listening on the socket?" % e)


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
    if word == "exit" and whole_number(rest, 0, 255) is not None:
        return int(rest)
    if word == "signal" and whole_number(rest, 0, 255) is not None:
        raise GahpKilled(128 + int(rest), "%s was killed by signal %s on the cluster" % (gahp, rest))
    if word == "error":
        raise UserError("%s session ended: %s" % (gahp, rest))
    raise UserError("lost the rvgahp proxy on %s mid-session; is the link to the cluster down?" % sockpath)


def run_client(sockpath, gahp, wait):
    """Start a session and return the GAHP's exit status, or raise UserError."""
    tunnel, no_tunnel_why = None, None
    if gahp == "condor_ft-gahp":
        tunnel, no_tunnel_why = gridmanager_address(os.environ.get("CONDOR_INHERIT"))
    handoff = Handoff()
    deadline = time.monotonic() + wait
    fields = {"gahp": gahp, "rvgahp": VERSION, "protocol": CLIENT_PROTOCOL}
    if tunnel is not None:
        fields.update(tunnel_to=tunnel[0], tunnel_host=tunnel[1], tunnel_port=tunnel[2])
    request = frame(OPEN, 0, encode_fields(fields))
    last_reason = None
    retried = False
    while True:
        sock = connect_to_proxy(sockpath, deadline, wait, last_reason)
        try:
            sock.sendmsg([request], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, pack_fds(handoff.fds))])
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
        # The link went down before our GAHP started. A standby link takes the socket over
        # within a second or two, and a new login may follow: wait for one, once.
        last_reason = None if reply is None else reply[1].get("reason")
        if not retried:
            retried = True
            deadline = max(deadline, time.monotonic() + FAILOVER_WAIT)
        if time.monotonic() >= deadline:
            raise no_server_error(sockpath, wait, last_reason)
        time.sleep(0.05)
    if gahp == "condor_ft-gahp":
        announce_tunnel(sock, reply[1], tunnel, no_tunnel_why, sockpath)
    handoff.complete()
    if not handoff.pumps:
        wait_in_shell(sock, gahp, sockpath)
    try:
        return wait_in_python(sock, gahp, sockpath)
    finally:
        sock.close()
        handoff.finish()


def gridmanager_address(inherit):
    """((text, numeric host, port), None) for the GridManager's address in CONDOR_INHERIT,
    or (None, why not). The address is inside the first <...>, before any `?`."""
    if not inherit:
        return None, "CONDOR_INHERIT is not set, so the GridManager's address is unknown"
    start = inherit.find("<")
    end = inherit.find(">", start + 1)
    text = inherit[start + 1 : end].split("?", 1)[0] if 0 <= start < end else ""
    if text.startswith("["):
        host, _, port = text[1:].partition("]:")
    else:
        host, _, port = text.rpartition(":")
    number = whole_number(port, 1, 65535)
    if not host or number is None:
        return None, "cannot find the GridManager's address in CONDOR_INHERIT (%s)" % ascii(inherit[:100])
    try:
        # A host given as text goes through the idna codec: 2 to 4 ms more of an
        # ft-gahp's start (python3 bench/import_costs.py encodings.idna). Sinfuls carry
        # numeric addresses.
        name = host.encode("ascii") if all(c < "\x80" for c in host) else host
        address = socket.getaddrinfo(name, number, 0, socket.SOCK_STREAM)[0][4]
    except (OSError, UnicodeError) as e:
        return None, "cannot resolve the GridManager's host %s from CONDOR_INHERIT: %s" % (ascii(host), getattr(e, "strerror", e))
    return (text, address[0], number), None


def announce_tunnel(sock, accepted, tunnel, no_tunnel_why, sockpath):
    """Tell the GridManager, as `ssh -R` would, where the ft-gahp reaches it, or why not.

    The Allocated line goes out in one write, and only then does the proxy let the
    GAHP's banner through (READY): the GridManager must see the line first.
    """
    state = accepted.get("tunnel")
    if tunnel is None:
        warn("%s; file transfers will go direct to the GridManager, not through the link" % no_tunnel_why)
    elif state == "on" and whole_number(accepted.get("tunnel_port", ""), 1, 65535) is not None:
        line = "Allocated port %s for remote forward to %s\n" % (accepted["tunnel_port"], tunnel[0])
        os.write(2, line.encode("utf-8"))
        sock.sendall(READY_FRAME)
    elif state in ("error", "unsupported"):
        warn("no file-transfer tunnel: %s; transfers will go direct" % accepted.get("tunnel_error", "no reason given"))
    elif state != "off":
        warn(
            "the rvgahp on the other host has no file-transfer tunnel (the rvgahp_proxy on %s is older); transfers will go direct; "
            "restart the link after upgrading rvgahp.pyz on both hosts" % sockpath
        )


def warn(message):
    os.write(2, ("rvgahp_client: warning: %s\n" % printable(message)).encode("utf-8", "replace"))


def show_status(sockpath, as_json=False):
    """Ask the proxy how its link is, for an admin at a terminal or a script."""
    check_socket_path(sockpath)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    try:
        sock.connect(sockpath)
        check_proxy_owner(sock, sockpath)
    except (OSError, socket.timeout) as e:
        sock.close()
        reason = "no rvgahp proxy is serving %s (%s): the link is down, or rvgahp_server is not running on the cluster" % (
            sockpath,
            getattr(e, "strerror", None) or e,
        )
        if as_json:  # a monitoring script reads stdout: give it a state, not silence
            import json

            last = last_link_news(sockpath + ".log")
            sys.stdout.write(
                json.dumps({"socket": sockpath, "state": "no proxy", "reason": reason, "last_link": last}, sort_keys=True) + "\n"
            )
            return 1
        raise UserError(reason)
    except BaseException:
        sock.close()
        raise
    sock.sendall(frame(STATUS, 0))
    try:
        reply = read_reply(sock, time.monotonic() + 10, limit=MAX_PAYLOAD)
    except socket.timeout:
        reply = None
    sock.close()
    if reply is None or reply[0] != STATUS or "json" not in reply[1]:
        raise UserError("the rvgahp proxy on %s did not answer a status request (is it older than this client?)" % sockpath)
    import json

    status = json.loads(reply[1]["json"])
    sys.stdout.write(json.dumps(status, indent=2, sort_keys=True) + "\n" if as_json else status_report(status))
    return 0


def status_report(status):
    """The status as lines for a person."""
    proxy, link, server, totals = status["proxy"], status["link"], status["server"], status["totals"]
    heard = "last heard %.1f s ago" % link["last_heard_s"]
    if link["state"] == "up":
        link_line = "up since %s, %s" % (timestamp(link["up_since"])[:19], heard)
    elif link["state"] == "silent":
        link_line = "SILENT: %s, past the ping interval (dead after %g s); up since %s" % (
            heard,
            link["ping_timeout"],
            timestamp(link["up_since"])[:19],
        )
    else:
        link_line = link["state"] + ("" if link["state"] == "standby" else ": waiting for the server's hello")
    if link["state"] in ("up", "silent") and "features" in link:  # an older proxy does not say
        link_line += "; features: %s" % (", ".join(link["features"]) or "none")
    logins = "; logins in the last hour: %s, %s failed" % (server["logins_1h"], server["failed_logins_1h"])
    rtt = "not yet measured" if link["rtt_ms"] is None else "%.1f ms" % link["rtt_ms"]
    lines = [
        ("socket", status["socket"]),
        ("proxy", "pid %s on %s, rvgahp %s, up since %s" % (proxy["pid"], proxy["host"], proxy["rvgahp"], timestamp(proxy["since"])[:19])),
        ("link", link_line),
        (
            "server",
            "pid %s on %s, rvgahp %s%s"
            % (server["pid"] or "?", server["host"], server["rvgahp"], logins if server["logins_1h"] is not None else ""),
        ),
        ("ping", "every %g s, dead after %g s, last round trip %s" % (link["ping_interval"], link["ping_timeout"], rtt)),
        ("sessions", "%d open, %d since the proxy started, %d refused" % (totals["open"], totals["sessions"], totals["refused"])),
    ]
    out = ["%-9s %s\n" % (key + ":", value) for key, value in lines]
    for s in status["sessions"]:
        tunnel = ", %d tunnel connections" % s["tunnel_connections"] if s["tunnel_connections"] else ""
        out.append(
            "  %-5d %-15s %-8s %8.1f s old, %s to the GAHP, %s from it%s\n"
            % (s["id"], s["gahp"], s["state"], s["age_s"], human_bytes(s["bytes_to_gahp"]), human_bytes(s["bytes_from_gahp"]), tunnel)
        )
    return "".join(out)


def client_main(args):
    if args in (["--help"], ["-h"]):
        sys.stdout.write(CLIENT_USAGE)
        return 0
    if args == ["--version"]:
        sys.stdout.write("rvgahp_client %s\n" % VERSION)
        return 0
    if args[:1] == ["--status"]:
        as_json = args[1:2] == ["--json"]
        rest = args[2:] if as_json else args[1:]
        if len(rest) != 1:
            raise UsageError("usage: rvgahp_client --status [--json] SOCKPATH")
        return show_status(rest[0], as_json)
    sockpath, gahp, wait = parse_client_args(args)
    return run_client(sockpath, gahp, wait)


# --------------------------------------------------------------------------- the command line


def proxy_main(args):
    import argparse

    parser = argparse.ArgumentParser(
        prog="rvgahp_proxy",
        description="Run by the server's ssh on the submit host: owns SOCKPATH and carries its clients' sessions on the link.",
    )
    parser.add_argument("sockpath", help="the UNIX socket to own, e.g. ~/.rvgahp/hpcc.sock (a private directory, not /tmp)")
    parser.add_argument("--log", metavar="FILE", help="also log here (default: SOCKPATH.log)")
    parser.add_argument("--no-log-file", action="store_true", help="log to stderr only")
    parser.add_argument("--log-max-size", type=int, default=10 * 1000 * 1000, metavar="BYTES", help="rotate the log file past this size")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more: the traceback behind each internal error")
    parser.add_argument("--version", action="version", version="rvgahp_proxy %s" % VERSION)
    opts = parser.parse_args(args)
    log = Log("proxy")
    log.verbose = opts.verbose
    check_socket_path(opts.sockpath)
    if not opts.no_log_file:
        log.echo_fd = 2  # ssh carries stderr back to the server's log
        try:
            log.to_file(opts.log or opts.sockpath + ".log", max_bytes=opts.log_max_size)
        except UserError as e:
            # Someone else's file or symlink at the log's path must not stop the service.
            log.echo_fd = None
            log.info("%s; logging only to the link (the server's log)" % e)
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
    parser.add_argument("-v", dest="verbose", action="store_true", help="log more: the traceback behind each internal error")
    parser.add_argument("--version", action="version", version="rvgahp_server %s" % VERSION)
    opts = parser.parse_args(args)
    ensure_std_fds()  # first: a log or lock opened as fd 0-2 would be clobbered later
    log = Log("server")
    log.verbose = opts.verbose
    layout = Layout(opts.basedir or os.environ.get("BLAHPD_LOCATION") or None, opts.config, opts.transport)
    config = Config.load(layout.config)
    problem = transport_problem(layout.transport)
    if problem:
        raise UserError("cannot run transport %s: %s; rvgahp setup writes it (or see docs/setup-by-hand.md)" % (layout.transport, problem))
    max_log = config.number("RVGAHP_LOG_MAX_SIZE", 10 * 1000 * 1000, LIMITS["log_max_size"])
    logfile = opts.logfile or (layout.default_log if opts.detach else None)
    if logfile:
        log.to_file(logfile, max_bytes=int(max_log))
    lock_fd = take_pid_lock(layout.pid_file)
    if lock_fd is None:
        return 0
    if opts.detach:
        daemonize(log, lambda: write_pid(lock_fd))
    else:
        write_pid(lock_fd)
    raise_fd_limit()
    return Server(log, layout, config).run()


def take_pid_lock(path):
    """An exclusive lock held for the server's life; None if another server has it.

    A start that finds one running asks it (SIGUSR1) to try its link at once, so an
    admin or cron re-running the start command ends a back-off wait.
    """
    fd = open_private(path, os.O_RDWR, "pid file")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        other = os.read(fd, 64).decode("ascii", "replace").strip()
        os.close(fd)
        nudged = False
        if whole_number(other, 1, 2**31 - 1) is not None:
            try:
                os.kill(int(other), signal.SIGUSR1)
                nudged = True
            except OSError:
                pass
        # stdout, not stderr: this is the expected answer to cron's repeated starts,
        # and a crontab can discard it while cron still mails real errors.
        sys.stdout.write(
            "rvgahp_server: already running (pid %s on %s)%s\n"
            % (other or "?", host_tag(), "; asked it to reconnect now if it was waiting" if nudged else "")
        )
        return None
    return fd


def write_pid(fd):
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, b"%d\n" % os.getpid())


def daemonize(log, started):
    """Fork, setsid, fork again, chdir /, and point stdio at the log or /dev/null.

    The starting process exits only once the daemon has run started() (writing its
    pid), so a start right after it, from cron or a person, always finds that pid.
    """
    ready_r, ready_w = os.pipe()
    if os.fork() > 0:
        os.close(ready_w)
        os.read(ready_r, 1)  # EOF when the daemon is ready, or if it died first
        os._exit(0)
    os.close(ready_r)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    started()
    os.close(ready_w)
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
usage: {0} server [-d] [-l LOGFILE] [-b BASEDIR]    (on the cluster login node)
       {0} proxy SOCKPATH                            (run by the server's ssh)
       {0} client SOCKPATH GAHP_NAME                 (HTCondor's REMOTE_GAHP)
       {0} setup USER@CLUSTER                        (on the submit host, once)
       {0} doctor                                    (on either host)
       {0} print {{transport,authorized-key,server-config,crontab}}   (for a setup by hand)

Symlinked as rvgahp_server, rvgahp_proxy or rvgahp_client, the name picks the role.
Each command takes --help and --version.
"""


def role_of(program):
    name = program.rpartition("/")[2]
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
        elif args and args[0] in ADMIN_COMMANDS:
            # rvgahp_launch.py hands these to rvgahp_admin.py before they get here.
            name = os.path.basename(argv[0])
            where = "which comes with rvgahp.pyz or a pip install; run rvgahp.pyz %s" % args[0]
            say_error(name, UsageError("%s is an admin command, %s" % (args[0], where)))
            return 2
        elif args == ["--version"]:
            sys.stdout.write("rvgahp %s\n" % VERSION)
            return 0
        elif args in (["--help"], ["-h"]):
            sys.stdout.write(USAGE.format(os.path.basename(argv[0]) if argv else "rvgahp"))
            return 0
        else:
            name = os.path.basename(argv[0]) if argv else "rvgahp"
            what = "unknown command %s" % ascii(args[0])[1:-1] if args else "no command"
            commands = ", ".join(ROLES + ADMIN_COMMANDS)
            sys.stderr.write("%s: %s; expected one of %s (%s --help says more)\n" % (name, what, commands, name))
            return 2
    run = {"server": server_main, "proxy": proxy_main, "client": client_main}[role]
    return run_reporting("rvgahp_" + role, run, args)


def run_reporting(program, run, args):
    """run(args), with a problem a person can fix said in one line and an exit status."""
    try:
        return run(args)
    except UsageError as e:
        say_error(program, e)
        return 2
    except GahpKilled as e:
        say_error(program, e)
        return e.status
    except UserError as e:
        say_error(program, e)
        return 1
    except KeyboardInterrupt:
        return 130


def say_error(program, error):
    sys.stderr.write("%s: %s\n" % (program, printable(str(error))))


# The admin's tools (setup, doctor, print) are another module, rvgahp_admin.py, that
# rvgahp.pyz carries beside this one; rvgahp_launch.py sends their commands there, so the
# relay never imports it. Named here for the usage and for unknown commands.
ADMIN_COMMANDS = ("setup", "doctor", "print")


if __name__ == "__main__":
    sys.exit(main())

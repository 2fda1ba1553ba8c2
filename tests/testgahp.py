#!/usr/bin/env python3
"""A GAHP for tests and the demo: it speaks the GAHP line protocol and reports on itself.

Like blahpd and condor_ft-gahp it prints a `$GahpVersion: ... $` banner, reads
CRLF-terminated commands, answers `S ...` or `E ...`, and exits at stdin EOF. Its extra
commands let a test look at what the GAHP received from rvgahp: its argv, environment,
cwd, fds, signal dispositions, and how it behaves when it floods or closes stdout.
As condor_ft-gahp it also opens TCP connections to 127.0.0.1:PORT, the way the real
ft-gahp reaches the GridManager through the tunnel's `Allocated port`, and reports on
each by byte count and sha256.

    COMMANDS               S followed by the command names
    VERSION                S and the banner
    ASYNC_MODE_ON          S
    BLAH_PING              S
    ECHO words...          S words...
    ARGV                   S and argv, space-separated
    ENV NAME               S and the value of NAME, or E if unset
    CWD                    S and the working directory
    PID                    S and the process id
    FDS                    S and the open fds
    PIPE_SIZES             S and the buffer sizes of the pipes on stdin and stdout
                           (F_GETPIPE_SZ), or - for one that is not a pipe
    SIGNALS                S and the ignored and blocked signal masks the GAHP inherited
                           (hex, from /proc), as recorded by the `testgahp` sh wrapper
    STDERR words...        writes words to stderr, then S
    FLOOD N                S, then N bytes of 'x' lines; a test checks none are lost
    SINK N                 reads the next N raw bytes of stdin, then S N
    CLOSE_STDOUT           S, then closes stdout and keeps reading; each later line goes
                           to the file named by $TESTGAHP_SINK
    EXIT N                 exits with status N at once
    IGNORE_EOF             S; from now on, stdin EOF does not end the GAHP
    QUIT                   S, then exits 0
    TCP_OPEN TAG PORT SEND SEED ORDER HEADER...
                           S; a thread connects to 127.0.0.1:PORT and writes the line
                           HEADER. ORDER send: writes SEND bytes of seeded_bytes(SEED)
                           while reading, half-closes, reads to EOF. ORDER recv: reads to
                           EOF, then writes and half-closes. ORDER hold: reads to EOF and
                           never closes its side. At stdin EOF the GAHP waits for its
                           connections to end (each gives up after JOB_TIMEOUT)
    TCP_STATE TAG          S running SENT RECEIVED, or S done and the TCP_WAIT result
    TCP_WAIT TAG SECONDS   waits up to SECONDS for the connection to end, then
                           S SENT RECEIVED SHA256 READ_END SEND_END, where READ_END is
                           eof, timeout or an errno name (ECONNRESET), and SEND_END is
                           done (all written, then half-closed), open, skipped or an
                           errno name; E if it could not connect or is still running
    TCP_REPORT PATH        S; from now on each connection that ends appends the line
                           "TAG S ..." (as TCP_WAIT says) to PATH, even after stdin EOF
    TCP_DETACH TAG PORT HEADER...
                           S and a pid: a process of its own session, with none of this
                           GAHP's stdio, holds a connection as ORDER hold does and
                           outlives the GAHP; it appends its result to TCP_REPORT's PATH
"""

import errno
import os
import signal
import sys

# The TCP_ commands import hashlib, socket, threading and subprocess when first used:
# bench.py times this GAHP's start, and they would add about 20 ms to it.

# Written like the real GAHPs: the banner's text says which one this stands for.
NAME = os.path.basename(sys.argv[0])
BANNER = "$GahpVersion: 1.0.0 Nov 21 2026 rvgahp\\ test\\ gahp\\ (%s) $" % NAME
COMMANDS = (
    "COMMANDS VERSION ASYNC_MODE_ON BLAH_PING ECHO ARGV ENV CWD PID FDS PIPE_SIZES SIGNALS STDERR FLOOD SINK CLOSE_STDOUT EXIT"
    " IGNORE_EOF QUIT"
    " TCP_OPEN TCP_STATE TCP_WAIT TCP_REPORT TCP_DETACH"
)
SEED_BLOCK = 1 << 20
JOB_TIMEOUT = 60.0  # a connection nobody closes gives up after this, so none outlives a test run


def open_fds():
    """The fds open in this process, less the one listdir() used to find them."""
    fds = []
    for name in os.listdir("/proc/self/fd"):
        try:
            os.readlink("/proc/self/fd/" + name)
        except OSError:
            continue  # listdir's own fd, closed by now
        fds.append(int(name))
    return sorted(fds)


def seeded_bytes(seed, total):
    """total pseudo-random bytes, in pieces, the same for the same seed here and in the tests."""
    import hashlib

    block = 0
    while total > 0:
        size = min(SEED_BLOCK, total)
        yield hashlib.shake_256(b"testgahp %d %d" % (seed, block)).digest(size)
        total -= size
        block += 1


def seeded_digest(seed, total):
    """The sha256 hex digest of seeded_bytes(seed, total)."""
    import hashlib

    digest = hashlib.sha256()
    for piece in seeded_bytes(seed, total):
        digest.update(piece)
    return digest.hexdigest()


def errno_name(e):
    """ECONNRESET and the like; timeout for a socket timeout."""
    if e.errno:
        return errno.errorcode.get(e.errno, "error")
    return "timeout" if "timed out" in str(e) else type(e).__name__


class Connection:
    """One TCP connection to 127.0.0.1:PORT, as the ft-gahp opens one per transfer."""

    def __init__(self, tag, port, send, seed, order, header, report):
        import hashlib
        import threading

        self.tag = tag
        self.port = port
        self.send = send
        self.seed = seed
        self.order = order
        self.header = header.encode() + b"\n"
        self.report = report
        self.sent = 0
        self.received = 0
        self.digest = hashlib.sha256()
        self.read_end = None
        self.send_end = "open" if order == "hold" else "skipped"
        self.result = None
        self.thread = threading.Thread(target=self.run, name="tcp " + tag)

    def run(self):
        import socket

        try:
            sock = socket.create_connection(("127.0.0.1", self.port), timeout=JOB_TIMEOUT)
        except OSError as e:
            self.finish("E connect\\ to\\ 127.0.0.1:%d:\\ %s" % (self.port, errno_name(e)))
            return
        with sock:
            try:
                sock.sendall(self.header)
            except OSError as e:
                self.send_end = errno_name(e)
            else:
                if self.order == "send":
                    import threading

                    writer = threading.Thread(target=self.write_all, args=(sock,))
                    writer.start()
                    self.read_to_end(sock)
                    writer.join()
                elif self.order == "recv":
                    self.read_to_end(sock)
                    if self.read_end == "eof":
                        self.write_all(sock)
                else:
                    self.read_to_end(sock)
            if self.read_end is None:
                self.read_end = "skipped"
        self.finish("S %d %d %s %s %s" % (self.sent, self.received, self.digest.hexdigest(), self.read_end, self.send_end))

    def write_all(self, sock):
        import socket

        try:
            for piece in seeded_bytes(self.seed, self.send):
                view = memoryview(piece)
                while view:
                    n = sock.send(view)
                    self.sent += n
                    view = view[n:]
            sock.shutdown(socket.SHUT_WR)
            self.send_end = "done"
        except OSError as e:
            self.send_end = errno_name(e)

    def read_to_end(self, sock):
        try:
            while True:
                data = sock.recv(1 << 16)
                if not data:
                    self.read_end = "eof"
                    return
                self.received += len(data)
                self.digest.update(data)
        except OSError as e:
            self.read_end = errno_name(e)

    def finish(self, result):
        self.result = result
        if self.report:
            with open(self.report, "a") as f:
                f.write("%s %s\n" % (self.tag, result))

    def state(self):
        if self.result is not None:
            return "S done " + self.result
        return "S running %d %d" % (self.sent, self.received)


def hold_detached(args):
    """testgahp.py --hold TAG PORT REPORT HEADER...: what TCP_DETACH runs."""
    tag, port, report = args[0], int(args[1]), args[2]
    Connection(tag, port, 0, 0, "hold", " ".join(args[3:]), report).run()
    return 0


def pipe_size(fd):
    import fcntl

    try:
        return str(fcntl.fcntl(fd, 1032))  # F_GETPIPE_SZ, named by fcntl from 3.10 on
    except OSError:
        return "-"


def main():
    out = os.fdopen(1, "wb", buffering=0)
    inp = os.fdopen(0, "rb", buffering=0)

    def say(line):
        if out is not None:
            out.write(line.encode() + b"\n")

    say(BANNER)
    connections = {}
    report = None
    ignore_eof = False
    sink = None
    buf = b""
    while True:
        chunk = inp.read(65536)
        if not chunk:
            if ignore_eof:
                signal.pause()
            return 0
        buf += chunk
        while b"\n" in buf:
            raw, buf = buf.split(b"\n", 1)
            line = raw.rstrip(b"\r").decode("utf-8", "replace")
            if out is None:
                with open(sink, "a") as f:
                    f.write(line + "\n")
                continue
            words = line.split(" ")
            cmd, args = words[0], words[1:]
            if cmd == "COMMANDS":
                say("S " + COMMANDS)
            elif cmd == "VERSION":
                say("S " + BANNER)
            elif cmd in ("ASYNC_MODE_ON", "BLAH_PING"):
                say("S")
            elif cmd == "ECHO":
                say("S " + " ".join(args))
            elif cmd == "ARGV":
                say("S " + " ".join(sys.argv))
            elif cmd == "ENV":
                value = os.environ.get(args[0] if args else "")
                say("E unset" if value is None else "S " + value)
            elif cmd == "PID":
                say("S %d" % os.getpid())
            elif cmd == "CWD":
                say("S " + os.getcwd())
            elif cmd == "FDS":
                say("S " + " ".join(str(fd) for fd in open_fds()))
            elif cmd == "PIPE_SIZES":
                say("S %s %s" % (pipe_size(0), pipe_size(1)))
            elif cmd == "SIGNALS":
                ignored = os.environ.get("TESTGAHP_SIGIGN", "unknown")
                blocked = os.environ.get("TESTGAHP_SIGBLK", "unknown")
                say("S SigIgn=%s SigBlk=%s" % (ignored, blocked))
            elif cmd == "STDERR":
                sys.stderr.write(" ".join(args) + "\n")
                sys.stderr.flush()
                say("S")
            elif cmd == "FLOOD":
                total = int(args[0])
                say("S")
                line = b"x" * 1023 + b"\n"
                sent = 0
                while sent < total:
                    piece = line[: total - sent]
                    out.write(piece)
                    sent += len(piece)
            elif cmd == "SINK":
                want = int(args[0])
                got = min(len(buf), want)
                buf = buf[got:]
                while got < want:
                    chunk = inp.read(min(1 << 20, want - got))
                    if not chunk:
                        return 0
                    got += len(chunk)
                say("S %d" % got)
            elif cmd == "CLOSE_STDOUT":
                say("S")
                sink = os.environ["TESTGAHP_SINK"]
                out.close()
                out = None
            elif cmd == "EXIT":
                os._exit(int(args[0]))
            elif cmd == "IGNORE_EOF":
                ignore_eof = True
                say("S")
            elif cmd == "QUIT":
                say("S")
                return 0
            elif cmd == "TCP_OPEN":
                tag, port, send, seed, order = args[0], int(args[1]), int(args[2]), int(args[3]), args[4]
                connections[tag] = Connection(tag, port, send, seed, order, " ".join(args[5:]), report)
                connections[tag].thread.start()
                say("S")
            elif cmd == "TCP_STATE":
                say(connections[args[0]].state() if args[0] in connections else "E no\\ such\\ connection")
            elif cmd == "TCP_WAIT":
                conn = connections.get(args[0])
                if conn is None:
                    say("E no\\ such\\ connection")
                    continue
                conn.thread.join(float(args[1]))
                say(conn.result if conn.result is not None else "E still\\ running %d %d" % (conn.sent, conn.received))
            elif cmd == "TCP_REPORT":
                report = args[0]
                say("S")
            elif cmd == "TCP_DETACH":
                import subprocess

                child = subprocess.Popen(
                    [sys.executable, os.path.abspath(__file__), "--hold", args[0], args[1], report or ""] + args[2:],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    start_new_session=True,
                )
                say("S %d" % child.pid)
            else:
                say("E unknown\\ command\\ " + cmd)


if __name__ == "__main__":
    sys.exit(hold_detached(sys.argv[2:]) if sys.argv[1:2] == ["--hold"] else main())

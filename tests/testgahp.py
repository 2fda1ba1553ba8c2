#!/usr/bin/env python3
"""A GAHP for tests and the demo: it speaks the GAHP line protocol and reports on itself.

Like blahpd and condor_ft-gahp it prints a `$GahpVersion: ... $` banner, reads
CRLF-terminated commands, answers `S ...` or `E ...`, and exits at stdin EOF. Its extra
commands let a test look at what the GAHP received from rvgahp: its argv, environment,
cwd, fds, signal dispositions, and how it behaves when it floods or closes stdout.

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
"""

import os
import signal
import sys

# Written like the real GAHPs: the banner's text says which one this stands for.
NAME = os.path.basename(sys.argv[0])
BANNER = "$GahpVersion: 1.0.0 Nov 21 2026 rvgahp\\ test\\ gahp\\ (%s) $" % NAME
COMMANDS = "COMMANDS VERSION ASYNC_MODE_ON BLAH_PING ECHO ARGV ENV CWD PID FDS SIGNALS STDERR FLOOD SINK CLOSE_STDOUT EXIT IGNORE_EOF QUIT"


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


def main():
    out = os.fdopen(1, "wb", buffering=0)
    inp = os.fdopen(0, "rb", buffering=0)

    def say(line):
        if out is not None:
            out.write(line.encode() + b"\n")

    say(BANNER)
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
            else:
                say("E unknown\\ command\\ " + cmd)


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""See rvgahp work in ten seconds, on this machine, with no ssh and no HTCondor.

    python3 contrib/demo.py

It runs all three roles here: rvgahp_server with a transport that starts rvgahp_proxy
directly instead of through ssh, the proxy owning a socket in a temporary directory,
and rvgahp_client driven the way HTCondor's GridManager drives a GAHP. The GAHP is
the test GAHP from tests/, which speaks the GAHP line protocol. Everything it starts
is stopped and removed at the end.
"""

import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RVGAHP = os.path.join(REPO, "rvgahp.py")
GAHP = os.path.join(REPO, "tests", "testgahp.py")


def step(text):
    print("\n\033[1m%s\033[0m" % text if sys.stdout.isatty() else "\n" + text)


class Gahp:
    """A client, driven like the GridManager: write a CRLF command, read one reply line."""

    def __init__(self, sock, name, env=None):
        self.proc = subprocess.Popen(
            [sys.executable, RVGAHP, "client", sock, name], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
        )
        self.name = name

    def stderr_line(self):
        ready, _, _ = select.select([self.proc.stderr], [], [], 15)
        if not ready:
            raise SystemExit("demo: nothing on the client's stderr within 15 s")
        return self.proc.stderr.readline().decode().rstrip("\n")

    def readline(self):
        ready, _, _ = select.select([self.proc.stdout], [], [], 15)
        if not ready:
            raise SystemExit("demo: no reply within 15 s")
        return self.proc.stdout.readline().decode().rstrip("\r\n")

    def command(self, line, show=True):
        self.proc.stdin.write(line.encode() + b"\r\n")
        self.proc.stdin.flush()
        reply = self.readline()
        if show:
            print("  GridManager -> %-28s GAHP -> %s" % (line, reply[:60] + ("..." if len(reply) > 60 else "")))
        return reply

    def close(self):
        self.proc.stdin.close()
        status = self.proc.wait(15)
        err = self.proc.stderr.read().decode().strip()
        return status, err


def main():
    work = tempfile.mkdtemp(prefix="rvdemo", dir="/tmp")
    sock = os.path.join(work, "demo.sock")
    config = os.path.join(work, "condor_config.rvgahp")
    transport = os.path.join(work, "rvgahp_ssh")
    log = os.path.join(work, "server.log")
    with open(config, "w") as f:
        f.write("BATCH_GAHP = %s\nFT_GAHP = %s\n" % (GAHP, GAHP))
    with open(transport, "w") as f:
        # In real use: exec ssh ... user@submithost "rvgahp_proxy /tmp/user.sock"
        f.write("exec %s %s proxy %s\n" % (sys.executable, RVGAHP, sock))
    server = None
    try:
        step("1. The cluster side: rvgahp_server starts its transport, which starts rvgahp_proxy")
        server = subprocess.Popen([sys.executable, RVGAHP, "server", "-c", config, "-t", transport, "-l", log])
        deadline = time.monotonic() + 15
        while not os.path.exists(sock):
            if time.monotonic() > deadline or server.poll() is not None:
                raise SystemExit("demo: the link did not come up; see %s" % log)
            time.sleep(0.05)
        print("  the proxy owns %s; the link is up" % sock)

        step("2. The GridManager runs `rvgahp_client %s blahpd` and talks to the GAHP" % sock)
        started = time.monotonic()
        g = Gahp(sock, "blahpd")
        banner = g.readline()
        print("  banner after %.0f ms: %s" % ((time.monotonic() - started) * 1000, banner))
        g.command("COMMANDS")
        g.command("ASYNC_MODE_ON")
        g.command("ECHO hello\\ from\\ the\\ demo")
        g.command("ENV CONDOR_CONFIG")
        g.command("QUIT")
        print("  client exit status and stderr: %r" % (g.close(),))

        step("3. Five sessions at once share the one link")
        started = time.monotonic()
        many = [Gahp(sock, name) for name in ("blahpd", "batch_gahp", "condor_ft-gahp", "blahpd", "blahpd")]
        for g in many:
            g.readline()
        for i, g in enumerate(many):
            print("  %-15s %s" % (g.name, g.command("ECHO session\\ %d" % i, show=False)))
        print("  all five up and answering in %.0f ms" % ((time.monotonic() - started) * 1000))
        for g in many:
            g.close()

        step("4. A GAHP that is not on the allow-list is refused, with the reason on stderr")
        bad = Gahp(sock, "condor_c-gahp")
        print("  exit status %d, stderr: %s" % bad.close())

        step("5. A file transfer: the ft-gahp on the cluster reaches the GridManager through the link")
        endpoint = socket.socket()
        endpoint.bind(("127.0.0.1", 0))
        endpoint.listen(1)
        gm = "127.0.0.1:%d" % endpoint.getsockname()[1]
        threading.Thread(target=echo_once, args=(endpoint,), daemon=True).start()
        print("  the GridManager's file-transfer endpoint listens on %s (a port the cluster cannot reach)" % gm)
        env = dict(os.environ, CONDOR_INHERIT="%d <%s?addrs=%s&sock=demo> 0" % (os.getpid(), gm, gm.replace(":", "-")))
        ft = Gahp(sock, "condor_ft-gahp", env)
        line = ft.stderr_line()
        print("  the client says, on stderr as ssh -R would: %s" % line)
        port = int(line.split()[2])
        with socket.create_connection(("127.0.0.1", port), 10) as transfer:  # what the ft-gahp does on the cluster
            transfer.sendall(b"the bytes of a job's input file")
            transfer.shutdown(socket.SHUT_WR)
            print("  a connection to the cluster's 127.0.0.1:%d reached the GridManager, which answered %r" % (port, read_all(transfer)))
        print("  ft-gahp banner: %s" % ft.readline())
        ft.close()

        step("6. What the server logged")
        server.send_signal(signal.SIGTERM)
        server.wait(15)
        with open(log) as f:
            for line in f:
                print("  " + line.rstrip())
    finally:
        if server is not None and server.poll() is None:
            server.kill()
        shutil.rmtree(work, ignore_errors=True)
    print("\nDone. For the real thing, see the README's Setup section.")


def echo_once(listener):
    """The GridManager's end of one transfer: read to EOF, answer, close."""
    conn, _ = listener.accept()
    with conn:
        conn.sendall(b"received: " + read_all(conn))


def read_all(sock):
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk


if __name__ == "__main__":
    main()

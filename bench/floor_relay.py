#!/usr/bin/env python3
"""The floor under rvgahp's relays: the least a framed Python relay can do in their places.

bench.py's round-trip section runs this beside rvgahp, over the same sshd, ssh and GAHP,
with the same shape of path:

    client --fds--> proxy  ==ssh link==  server --pipes--> GAHP

    floor_relay.py server SOCK GAHP -- SSH_ARGV...  (the cluster side) starts the GAHP, and
        ssh running the proxy; relays the GAHP's pipes <-> the link
    floor_relay.py proxy SOCK    (run by ssh on the submit side) takes one client's stdin and
        stdout over SOCK with SCM_RIGHTS; relays them <-> the link (its own stdin and stdout)
    floor_relay.py client SOCK   the session's process: hands over its stdin and stdout, then
        waits for the proxy to end

Each hop is one epoll_wait, one read and one writev, with rvgahp's 9-byte frame header on
the link. There is nothing else: one session per link, no credit, no pings, no logs, and
blocking writes, which a session that moves bytes one way at a time (a round trip, a
download, an upload) can afford. So its CPU per round trip, and per MB, is what any
Python relay in these places costs on this machine today, and rvgahp's figure divided by
it is the share that rvgahp's own design adds.
"""

import array
import os
import select
import socket
import struct
import subprocess
import sys
import time

HEADER = struct.Struct("!BII")  # kind, channel, length: rvgahp's
DATA = 5
READ_SIZE = 64 * 1024


def relay(local_in, local_out, link_in, link_out):
    """Frame local_in onto link_out and unframe link_in onto local_out, until either ends.

    A frame cut by the end of a read is passed on in parts, as rvgahp's link does, so a
    bulk transfer costs no joining copies."""
    poller = select.epoll()
    poller.register(local_in, select.EPOLLIN)
    poller.register(link_in, select.EPOLLIN)
    head = b""  # a header cut by the end of a read
    left = 0  # payload bytes still to come of the frame being passed on
    while True:
        for fd, _ in poller.poll():
            data = os.read(fd, READ_SIZE)
            if not data:
                return
            if fd == local_in:
                os.writev(link_out, [HEADER.pack(DATA, 1, len(data)), data])
                continue
            view = memoryview(data)
            payloads = []
            at, end = 0, len(data)
            while at < end:
                if left:
                    take = min(left, end - at)
                    payloads.append(view[at : at + take])
                    at += take
                    left -= take
                    continue
                cut = data[at : at + HEADER.size - len(head)]
                head += cut
                at += len(cut)
                if len(head) == HEADER.size:
                    left = HEADER.unpack(head)[2]
                    head = b""
            for first in range(0, len(payloads), 512):  # IOV_MAX is 1024
                os.writev(local_out, payloads[first : first + 512])


def serve(sock_path, gahp, ssh_argv):
    gahp_proc = subprocess.Popen(gahp, stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)
    ssh = subprocess.Popen(ssh_argv + ["%s %s proxy %s" % (sys.executable, os.path.abspath(__file__), sock_path)],
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)  # fmt: skip
    try:
        relay(gahp_proc.stdout.fileno(), gahp_proc.stdin.fileno(), ssh.stdout.fileno(), ssh.stdin.fileno())
    finally:
        for proc in (ssh, gahp_proc):
            proc.stdin.close()
            proc.wait()


def proxy(sock_path):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(sock_path)
        listener.listen(1)
        conn, _ = listener.accept()
        os.unlink(sock_path)
    fds = array.array("i")
    _, ancillary, _, _ = conn.recvmsg(1, socket.CMSG_LEN(2 * fds.itemsize))
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
    if len(fds) != 2:
        sys.exit("floor_relay proxy: the client sent %d fds, not 2" % len(fds))
    relay(fds[0], fds[1], 0, 1)
    conn.close()  # the client's cue to exit


def client(sock_path, wait=30.0):
    deadline = time.monotonic() + wait
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    while True:
        try:
            conn.connect(sock_path)
            break
        except (FileNotFoundError, ConnectionRefusedError):
            if time.monotonic() > deadline:
                sys.exit("floor_relay client: no proxy on %s after %g s" % (sock_path, wait))
            time.sleep(0.005)  # the proxy is still starting on the far side of ssh
    conn.sendmsg([b"x"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [0, 1]).tobytes())])
    os.close(0)
    os.close(1)
    while conn.recv(4096):
        pass


def main(argv):
    if len(argv) >= 4 and argv[0] == "server" and "--" in argv:
        cut = argv.index("--")
        serve(argv[1], argv[2:cut], argv[cut + 1 :])
    elif len(argv) == 2 and argv[0] in ("proxy", "client"):
        (proxy if argv[0] == "proxy" else client)(argv[1])
    else:
        sys.exit(__doc__.split("\n\n")[2])


if __name__ == "__main__":
    main(sys.argv[1:])

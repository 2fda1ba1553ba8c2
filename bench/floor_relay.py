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

and bench/tunnel.py runs its file-transfer tunnel beside rvgahp's and `ssh -R`:

    connection --TCP--> tunnel-server  ==ssh link==  tunnel-proxy --TCP--> endpoint

    floor_relay.py tunnel-server HOST:PORT -- SSH_ARGV...  (the cluster side) listens on
        127.0.0.1, says `Allocated port N for remote forward to HOST:PORT` on stderr as
        ssh -R does, and starts ssh running the tunnel-proxy; each connection it accepts
        becomes a channel on the link
    floor_relay.py tunnel-proxy HOST:PORT   (run by ssh) connects each channel to HOST:PORT

Each hop is one epoll_wait, one read and one writev, with rvgahp's 9-byte frame header on
the link. There is nothing else: one session per link, no credit, no pings, no logs, and
blocking writes, which a session that moves bytes one way at a time (a round trip, a
download, an upload) can afford. The tunnel adds only what it must: a frame that opens a
channel, one that ends a direction (a half-close), and a table of channels; no owner
check, no limits, and a blocking connect. So its CPU per round trip, and per MB, is what any
Python relay in these places costs on this machine today, and rvgahp's figure divided by
it is the share that rvgahp's own design adds.
"""

import array
import itertools
import os
import select
import socket
import struct
import subprocess
import sys
import time

HEADER = struct.Struct("!BII")  # kind, channel, length: rvgahp's
DATA, EOF, OPEN = 5, 6, 14  # rvgahp's DATA, EOF and TUNNEL
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


class Unframer:
    """Cuts the link's byte stream into frames, passing cut payloads on in parts.

    relay() does the same cut inline: a session's round trip is the floor's finest
    figure, and a generator per read would show in it. The tunnel needs the kind and
    channel of each frame, which this keeps."""

    def __init__(self):
        self.head = b""  # a header cut by the end of a read
        self.kind = self.channel = self.left = 0  # the frame whose payload is being passed on

    def feed(self, data):
        """(kind, channel, payload view) for each frame or part of a payload in data."""
        view = memoryview(data)
        at, end = 0, len(data)
        while at < end:
            if self.left:
                take = min(self.left, end - at)
                yield self.kind, self.channel, view[at : at + take]
                at += take
                self.left -= take
                continue
            cut = data[at : at + HEADER.size - len(self.head)]
            self.head += cut
            at += len(cut)
            if len(self.head) == HEADER.size:
                self.kind, self.channel, self.left = HEADER.unpack(self.head)
                self.head = b""
                if not self.left:
                    yield self.kind, self.channel, view[at:at]


def tunnel_relay(link_in, link_out, listener=None, target=None):
    """Relay TCP connections over the link until it ends: the server accepts them from
    listener, the proxy connects them to target."""
    poller = select.epoll()
    poller.register(link_in, select.EPOLLIN)
    if listener is not None:
        poller.register(listener.fileno(), select.EPOLLIN)
    conns = {}  # channel -> socket
    channels = {}  # socket fd -> channel
    ended = {}  # channel -> directions ended (our read side, the peer's EOF)
    unframer = Unframer()
    numbers = itertools.count(1)

    def end(cid):
        ended[cid] = ended.get(cid, 0) + 1
        if ended[cid] == 2:
            sock = conns.pop(cid)
            del channels[sock.fileno()], ended[cid]
            sock.close()

    while True:
        for fd, _ in poller.poll():
            if listener is not None and fd == listener.fileno():
                sock, _ = listener.accept()
                cid = next(numbers)
                conns[cid], channels[sock.fileno()] = sock, cid
                os.write(link_out, HEADER.pack(OPEN, cid, 0))
                poller.register(sock, select.EPOLLIN)
                continue
            if fd != link_in:
                cid = channels[fd]
                try:
                    data = os.read(fd, READ_SIZE)
                except ConnectionError:
                    data = b""
                if data:
                    os.writev(link_out, [HEADER.pack(DATA, cid, len(data)), data])
                else:
                    os.write(link_out, HEADER.pack(EOF, cid, 0))
                    poller.unregister(fd)
                    end(cid)
                continue
            data = os.read(link_in, READ_SIZE)
            if not data:
                return
            for kind, cid, payload in unframer.feed(data):
                if kind == DATA:
                    try:
                        conns[cid].sendall(payload)
                    except (ConnectionError, KeyError):
                        pass  # its reader is gone: drop what was for it
                elif kind == OPEN:
                    sock = socket.create_connection(target)
                    conns[cid], channels[sock.fileno()] = sock, cid
                    poller.register(sock, select.EPOLLIN)
                elif kind == EOF and cid in conns:
                    try:
                        conns[cid].shutdown(socket.SHUT_WR)
                    except OSError:
                        pass
                    end(cid)


def address(text):
    host, _, port = text.rpartition(":")
    return host, int(port)


def tunnel_server(target, ssh_argv):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    ssh = subprocess.Popen(ssh_argv + ["%s %s tunnel-proxy %s" % (sys.executable, os.path.abspath(__file__), target)],
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)  # fmt: skip
    sys.stderr.write("Allocated port %d for remote forward to %s\n" % (listener.getsockname()[1], target))
    sys.stderr.flush()
    try:
        tunnel_relay(ssh.stdout.fileno(), ssh.stdin.fileno(), listener=listener)
    finally:
        ssh.stdin.close()
        ssh.wait()


def tunnel_proxy(target):
    tunnel_relay(0, 1, target=address(target))


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
    elif len(argv) >= 3 and argv[0] == "tunnel-server" and argv[2] == "--":
        tunnel_server(argv[1], argv[3:])
    elif len(argv) == 2 and argv[0] == "tunnel-proxy":
        tunnel_proxy(argv[1])
    else:
        sys.exit("usage:\n" + "\n".join(__doc__.split("\n\n")[i] for i in (3, 6)))


if __name__ == "__main__":
    main(sys.argv[1:])

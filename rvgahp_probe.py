"""What `rvgahp setup` runs on the cluster over its one ssh login, before rvgahp is there.

setup sends this file's source to the cluster's first Python 3.6+ (found by the sh in
rvgahp_admin.PROBE_SH), so it is standard library only and must run on 3.6. Two jobs:

    python3 - look WANT_JSON       what is there: Python, the GAHPs, batch systems, cron,
                                   the files setup may change; one line of JSON
    python3 - echo PORT TOKEN      send TOKEN to 127.0.0.1:PORT and print what comes back
                                   (setup's proof that the file-transfer tunnel works)
"""

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys


def usable(path):
    return bool(path) and os.path.isfile(path) and os.access(path, os.X_OK)


def find(named, name, places):
    """The program the user named, or the first of PATH and places that is there."""
    if named:
        path = os.path.expanduser(named)
        return {"path": path, "ok": usable(path), "named": True}
    for candidate in [shutil.which(name)] + [os.path.expanduser(p) for p in places]:
        if usable(candidate):
            return {"path": candidate, "ok": True}
    return {"path": None, "ok": False, "tried": ["PATH"] + list(places)}


def text(home, path):
    try:
        with open(os.path.join(home, path), encoding="utf-8", errors="surrogateescape") as f:
            return f.read()
    except OSError:
        return None


def digest(home, path):
    try:
        with open(os.path.join(home, path), "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    except OSError:
        return None


def cron_finds_python():
    """Whether `python3` under cron's PATH is 3.6+; if not, setup names the interpreter."""
    check = ["/usr/bin/env", "python3", "-c", "import sys; print(sys.version_info >= (3, 6))"]
    found = subprocess.run(check, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env={"PATH": "/usr/bin:/bin"})
    return found.stdout.strip() == b"True"


def crontab():
    if not shutil.which("crontab"):
        return None
    listed = subprocess.run(["crontab", "-l"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    return listed.stdout.decode("utf-8", "surrogateescape") if listed.returncode == 0 else None


def look(want):
    home = os.path.expanduser("~")
    return {
        "python": sys.executable,
        "version": "%d.%d.%d" % sys.version_info[:3],
        "cron_python_ok": cron_finds_python(),
        "home": home,
        "home_writable": os.access(home, os.W_OK),
        "hostname": socket.gethostname(),
        "blahpd": find(want["blahpd"], "blahpd", want["blahpd_places"]),
        "ft_gahp": find(want["ft_gahp"], "condor_ft-gahp", want["ft_gahp_places"]),
        "batch": [system for command, system in want["batch"] if shutil.which(command)],
        "crontab_cmd": shutil.which("crontab"),
        "crontab": crontab(),
        "texts": {path: text(home, path) for path in want["texts"]},
        "pyz": digest(home, "bin/rvgahp.pyz"),
    }


def echo(port, token):
    """What came back after sending token to 127.0.0.1:port, as text."""
    s = socket.create_connection(("127.0.0.1", port), 10)
    s.sendall(token.encode())
    got = b""
    while len(got) < len(token):
        more = s.recv(4096)
        if not more:
            break
        got += more
    return got.decode(errors="replace")


def main(args):
    if args[:1] == ["look"] and len(args) == 2:
        print(json.dumps(look(json.loads(args[1]))))
    elif args[:1] == ["echo"] and len(args) == 3:
        print(echo(int(args[1]), args[2]))
    else:
        sys.stderr.write("rvgahp_probe: expected look WANT_JSON or echo PORT TOKEN, not %r\n" % (args,))
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

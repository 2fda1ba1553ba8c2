"""`rvgahp setup`, `rvgahp doctor` and the packaging, as a new user meets them.

The story: alice (the throwaway user rvadsub) runs HTCondor on a submit host. She has
accounts on two clusters (rvadcla and rvadclb). A real sshd on 127.0.0.1 plays both the
cluster's login node (password logins, answered by an SSH_ASKPASS program that counts
its calls) and the submit host's sshd (the key setup makes on the cluster). She runs
`rvgahp setup` once per cluster, with no terminal, and answers one password prompt each
time; then a real rvgahp_server links up and her GAHP sessions work.

The crontab is a small file-backed `crontab` on the users' PATH (cron itself is not on a
fresh test machine, and these tests check the crontab's text, not cron's clock), and a
`condor_config_val` stand-in answers REMOTE_GAHP for doctor.
"""

import hashlib
import json
import os
import pprint
import pwd
import random
import re
import shutil
import signal
import stat
import subprocess
import sys
import zipfile

import harness
import pytest

sys.path.insert(0, harness.REPO)

import rvgahp
import rvgahp_admin

ADMIN = os.path.join(harness.REPO, "rvgahp_admin.py")
INTERRUPT = os.path.join(harness.REPO, "tests", "interrupt")  # a sitecustomize that kills setup at a named point
PYTHON = "/usr/bin/python3"  # the users' python: /root's interpreters are out of their reach
SUB, CLA, CLB = "rvadsub", "rvadcla", "rvadclb"
SEED = int(os.environ.get("RVGAHP_TEST_SEED", "9"))
RUNTIME = re.compile(r"^(rvgahp_server\..*\.(pid|log(\.1)?)|gahp_stderr\..*|FTGahpLog.*|daemon_sock|.*\.sock(\.lock|\.log(\.1)?)?)$")


def missing_tools():
    if os.geteuid() != 0:
        return "these tests make throwaway users, which needs root"
    for tool in ("useradd", "userdel", "chpasswd", "setpriv", "ssh-keyscan"):
        if not shutil.which(tool):
            return "%s is not installed" % tool
    if not os.access(PYTHON, os.X_OK):
        return "%s is not installed" % PYTHON
    if harness.find_sshd() is None:
        return "sshd is not installed"
    return None


pytestmark = pytest.mark.skipif(missing_tools() is not None, reason=missing_tools() or "")


# --------------------------------------------------------------------------- the world


class PasswordSshd(harness.Sshd):
    """The harness's sshd, with password logins and per-user authorized_keys, for our users only."""

    def __init__(self, users, path, kill_at_file):
        super().__init__()
        self.users = users
        self.path = path
        self.kill_at_file = kill_at_file

    def config_lines(self):
        return self.base_config() + [
            "AuthorizedKeysFile .ssh/authorized_keys",
            "PasswordAuthentication yes",
            "KbdInteractiveAuthentication no",
            "UsePAM no",
            "StrictModes yes",
            "AllowUsers %s" % " ".join(self.users),
            # The interruption tests' fault injector (tests/interrupt), for every command
            # setup runs on a cluster; it does nothing while the file is empty.
            "SetEnv PATH=%s PYTHONPATH=%s RVGAHP_TEST_KILL_AT_FILE=%s" % (self.path, INTERRUPT, self.kill_at_file),
            "PrintMotd no",
            "MaxStartups 100:30:200",
            "LogLevel VERBOSE",
        ]


CRONTAB = """#!/bin/sh
# A file-backed crontab: -l, -r, and a new table from a file or stdin. When the
# interruption tests name write:crontab, a write kills setup (the parent) first.
f={dir}/$(id -un)
case "$1" in -|-r) [ "$(cat {kill_at_file} 2>/dev/null)" = write:crontab ] && kill -9 $PPID && exit 1 ;; esac
case "$1" in
    -l) [ -f "$f" ] && exec cat "$f"; echo "no crontab for $(id -un)" >&2; exit 1 ;;
    -r) [ -f "$f" ] && exec rm -f "$f"; echo "no crontab for $(id -un)" >&2; exit 1 ;;
    -|"") cat > "$f.new" && mv "$f.new" "$f" ;;
    *) cat "$1" > "$f.new" && mv "$f.new" "$f" ;;
esac
"""

CONDOR_CONFIG_VAL = """#!/bin/sh
# REMOTE_GAHP as a test says it is set.
[ -s {file} ] && exec cat {file}
echo "Not defined: $1" >&2
exit 1
"""

ASKPASS = """#!/bin/sh
# Answers ssh's prompt and counts the calls: one line per prompt. A new host key's
# question is answered yes (a test that meets one checks what setup said first).
echo "$*" >> "$RV_ASKPASS_LOG"
case "$*" in *"(yes/no"*) echo yes; exit 0 ;; esac
printf '%s\\n' "$RV_PASSWORD"
"""


def write(path, text, mode=0o644, owner=None):
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, mode)
    if owner:
        os.chown(path, owner.pw_uid, owner.pw_gid)


def processes_of(uid):
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if os.stat("/proc/" + name).st_uid == uid:
                    found.append(int(name))
            except OSError:
                pass
    return found


def drop_users(names):
    """Delete the throwaway users, after ending every process of theirs, each by its pid
    (the clusters' servers first would only log in again, so all of them, until none)."""
    uids = []
    for name in names:
        try:
            uids.append(pwd.getpwnam(name).pw_uid)
        except KeyError:
            pass

    def none_left():
        left = [pid for uid in uids for pid in processes_of(uid)]
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return not left

    harness.wait_for(none_left, 20, interval=0.1, what="the test users' processes to end")
    for name in names:
        subprocess.run(["userdel", "-r", name], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


class World:
    def __init__(self):
        self.rng = random.Random(SEED)
        print("test_admin: seed %d (RVGAHP_TEST_SEED)" % SEED)
        self.dir = harness.short_tempdir("rvadm")
        os.chmod(self.dir, 0o755)
        self.bin = os.path.join(self.dir, "bin")
        self.crondir = os.path.join(self.dir, "crontabs")
        os.makedirs(self.bin)
        os.makedirs(self.crondir)
        os.chmod(self.bin, 0o755)
        os.chmod(self.crondir, 0o1777)
        self.remote_gahp_file = os.path.join(self.dir, "remote_gahp")
        self.kill_at_file = os.path.join(self.dir, "kill_at")  # a point for the cluster side (tests/interrupt)
        write(self.kill_at_file, "", 0o644)
        write(os.path.join(self.bin, "crontab"), CRONTAB.format(dir=self.crondir, kill_at_file=self.kill_at_file), 0o755)
        write(os.path.join(self.bin, "condor_config_val"), CONDOR_CONFIG_VAL.format(file=self.remote_gahp_file), 0o755)
        write(os.path.join(self.dir, "askpass"), ASKPASS, 0o755)
        self.path = "%s:/usr/local/bin:/usr/bin:/bin" % self.bin
        self.passwords = {}
        drop_users((SUB, CLA, CLB))
        for name in (SUB, CLA, CLB):
            subprocess.check_call(["useradd", "-m", "-s", "/bin/bash", name])
            self.passwords[name] = "pw-%08x" % self.rng.getrandbits(32)
            subprocess.run(["chpasswd"], input=("%s:%s\n" % (name, self.passwords[name])).encode(), check=True)
        self.sshd = PasswordSshd([SUB, CLA, CLB], self.path, self.kill_at_file).start()
        self.port = self.sshd.port
        sub = pwd.getpwnam(SUB)
        # The submit user has logged in to the clusters before: their host key is known.
        with open(os.path.join(self.sshd.dir, "host_key.pub")) as f:
            hostkey = " ".join(f.read().split()[:2])
        ssh_dir = self.home(SUB, ".ssh")
        os.makedirs(ssh_dir, mode=0o700)
        os.chown(ssh_dir, sub.pw_uid, sub.pw_gid)
        write(
            os.path.join(ssh_dir, "known_hosts"),
            "[127.0.0.1]:%d %s\n[localhost]:%d %s\n" % (self.port, hostkey, self.port, hostkey),
            0o644,
            sub,
        )
        # Lines of her own, which setup must leave alone (the last one has no newline).
        write(os.path.join(ssh_dir, "authorized_keys"), "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOwnKeyOfHerOwn alice@laptop", 0o600, sub)
        self.askpass_dir = os.path.join(self.dir, "askpass.d")
        os.makedirs(self.askpass_dir)
        os.chown(self.askpass_dir, sub.pw_uid, sub.pw_gid)
        self.tmp = os.path.join(self.dir, "tmp")  # setup's TMPDIR: where its ssh master's dir goes
        os.makedirs(self.tmp, mode=0o700)
        os.chown(self.tmp, sub.pw_uid, sub.pw_gid)
        # Cluster A has been used before: a config line of its own, and a crontab.
        cla = pwd.getpwnam(CLA)
        dot = self.home(CLA, ".rvgahp")
        os.makedirs(dot, mode=0o700)
        os.chown(dot, cla.pw_uid, cla.pw_gid)
        write(
            os.path.join(dot, "condor_config.rvgahp"),
            "# mine\nRVGAHP_PING_INTERVAL = 1\nRVGAHP_PING_TIMEOUT = 120\n",
            0o640,
            cla,
        )
        write(os.path.join(self.crondir, CLA), "0 3 * * * echo keep-me\n", 0o600, cla)
        self.runs = 0
        with open(self.remote_gahp_file, "w") as f:  # as her HTCondor config will say, once set up
            f.write(self.home(SUB, "bin", "rvgahp_client") + "\n")

    def home(self, user, *parts):
        return os.path.join(pwd.getpwnam(user).pw_dir, *parts)

    def sock(self, cluster=CLA, host=None):
        """setup's default socket: the cluster's account and whole host name."""
        return self.home(SUB, ".rvgahp", "%s@%s.sock" % (cluster, host or self.host_of(cluster)))

    @staticmethod
    def host_of(cluster):
        return "127.0.0.1" if cluster == CLA else "localhost"

    def env(self, user, **extra):
        env = {"HOME": self.home(user), "USER": user, "LOGNAME": user, "PATH": self.path, "SHELL": "/bin/bash", "LANG": "C.UTF-8"}
        env.update(extra)
        return env

    def as_user(self, user, argv, input=None, timeout=240, **env):
        pw = pwd.getpwnam(user)

        def demote():
            os.initgroups(user, pw.pw_gid)
            os.setgid(pw.pw_gid)
            os.setuid(pw.pw_uid)

        return subprocess.run(
            argv,
            env=self.env(user, **env),
            cwd=pw.pw_dir,
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout,
            preexec_fn=demote,
            start_new_session=True,  # no terminal: ssh must ask SSH_ASKPASS
            text=True,
        )

    def user_argv(self, user, *argv):
        """argv run as user, for processes a test drives itself (GahpSession)."""
        pw = pwd.getpwnam(user)
        env = ["%s=%s" % kv for kv in sorted(self.env(user).items())]
        return ["setpriv", "--reuid=%d" % pw.pw_uid, "--regid=%d" % pw.pw_gid, "--init-groups", "env", "-i", *env, *argv]

    def setup(self, *args, cluster=CLA, kill_at=None, expect=0, host=None, program=None):
        """`rvgahp setup` as the submit user, with no terminal; (result, askpass calls).
        program: run this rvgahp.pyz rather than rvgahp_admin.py from the sources."""
        self.runs += 1
        log = os.path.join(self.askpass_dir, "calls.%d" % self.runs)
        argv = ([program] if program else [PYTHON, ADMIN]) + [
            "setup",
            "-p",
            str(self.port),
            "--submit-host",
            "%s@127.0.0.1:%d" % (SUB, self.port),
        ]
        argv += ["--blahpd", harness.TESTGAHP, "--ft-gahp", harness.TESTGAHP] if "--no-gahps" not in args else []
        argv += [a for a in args if a != "--no-gahps"]
        argv.append("%s@%s" % (cluster, host or self.host_of(cluster)))
        env = dict(
            SSH_ASKPASS=os.path.join(self.dir, "askpass"),
            SSH_ASKPASS_REQUIRE="force",
            RV_ASKPASS_LOG=log,
            RV_PASSWORD=self.passwords[cluster],
            TMPDIR=self.tmp,
        )
        if kill_at:  # (host, point): see tests/interrupt/sitecustomize.py
            host, point = kill_at
            env["PYTHONPATH"] = INTERRUPT
            if host == "submit":
                env["RVGAHP_TEST_KILL_AT"] = point
            else:
                write(self.kill_at_file, point, 0o644)
        try:
            result = self.as_user(SUB, argv, **env)
        finally:
            write(self.kill_at_file, "", 0o644)
        self.end_leftover_masters()
        try:
            with open(log) as f:
                calls = len(f.read().splitlines())
        except FileNotFoundError:
            calls = 0
        if expect is not None:
            assert result.returncode == expect, "setup exited %d:\n%s\n%s" % (result.returncode, result.stdout, result.stderr)
        return result, calls

    def end_leftover_masters(self):
        """An interrupted setup leaves its ssh master behind (a real user's Ctrl-C closes it)."""
        for pid in harness.pids_running(self.tmp):
            if harness.cmdline(pid)[:1] == ["ssh"]:
                os.kill(pid, signal.SIGTERM)
        harness.wait_for(lambda: not [p for p in harness.pids_running(self.tmp) if harness.cmdline(p)[:1] == ["ssh"]], 10, what="masters")
        for name in os.listdir(self.tmp):
            shutil.rmtree(os.path.join(self.tmp, name), ignore_errors=True)

    def doctor(self, user, *args):
        pyz = self.home(user, "bin", "rvgahp.pyz")
        if user != SUB and os.path.exists(pyz):
            argv = [pyz, "doctor", *args]  # on the cluster, from the .pyz setup installed
        else:
            argv = [PYTHON, ADMIN, "doctor", *args]
        return self.as_user(user, argv, timeout=120)

    def checks(self, user):
        """{check: its JSON} from doctor --json (the last, where several sockets repeat one), and the exit status."""
        result = self.doctor(user, "--json")
        return {c["check"]: c for c in json.loads(result.stdout)["checks"]}, result.returncode

    def snapshot(self, user, runtime=True, normalize=False):
        """Every path in user's home: kind, mode, digest; and the user's crontab."""
        home = self.home(user)
        out = {}
        for root, dirs, files in os.walk(home):
            for name in dirs + files:
                path = os.path.join(root, name)
                rel = os.path.relpath(path, home)
                if not runtime and RUNTIME.match(name):
                    continue
                st = os.lstat(path)
                mode = stat.S_IMODE(st.st_mode)
                if stat.S_ISLNK(st.st_mode):
                    out[rel] = ("link", os.readlink(path))
                elif stat.S_ISDIR(st.st_mode):
                    out[rel] = ("dir", mode)
                elif stat.S_ISREG(st.st_mode):
                    with open(path, "rb") as f:
                        data = f.read()
                    if normalize and name.startswith(rvgahp_admin.KEY_NAME):
                        ok = subprocess.run(["ssh-keygen", "-l", "-f", path], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                        data = b"a whole key" if ok.returncode == 0 else b"a broken key"
                    elif normalize and name == rvgahp_admin.MANIFEST:
                        out[rel] = ("manifest", mode, tuple(sorted(data.decode().splitlines())))
                        continue
                    elif normalize and name == "authorized_keys":
                        data = re.sub(rb"ssh-ed25519 \S+ rvgahp@", b"ssh-ed25519 KEY rvgahp@", data)
                    elif normalize and name.endswith(".pyc"):
                        data = b"bytecode"  # marshal's output may differ from one compile to the next
                    out[rel] = ("file", mode, hashlib.sha256(data).hexdigest())
                else:
                    out[rel] = ("other", mode)
        try:
            with open(os.path.join(self.crondir, user), "rb") as f:
                out["<crontab>"] = hashlib.sha256(f.read()).hexdigest()
        except FileNotFoundError:
            out["<crontab>"] = None
        return out

    def state(self, runtime=True, normalize=False):
        return {u: self.snapshot(u, runtime, normalize) for u in (SUB, CLA, CLB)}

    def server_pid(self, cluster=CLA):
        argv = [PYTHON, "-c", "import rvgahp_admin; print(rvgahp_admin.server_state()[0])"]
        out = self.as_user(cluster, argv, PYTHONPATH=harness.REPO).stdout.strip()
        return int(out) if out.isdigit() else None

    def server_log(self, cluster=CLA):
        path = self.home(cluster, ".rvgahp", "rvgahp_server.%s.log" % rvgahp.host_tag())
        try:
            with open(path) as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def stop_server(self, cluster=CLA):
        pid = self.server_pid(cluster)
        if pid:
            os.kill(pid, signal.SIGTERM)
            harness.wait_for(lambda: self.server_pid(cluster) is None, 30, what="the server to stop")

    def start_server(self, cluster=CLA, wait=True):
        result = self.as_user(cluster, [self.home(cluster, "bin", "rvgahp_server"), "-d"])
        assert result.returncode == 0, result.stderr
        if wait:
            self.wait_link(cluster)

    def wait_link(self, cluster=CLA):
        harness.wait_for(lambda: rvgahp.socket_is_live(self.sock(cluster)), 30, what="the link; server log:\n" + self.server_log(cluster))

    def session(self, cluster=CLA, gahp="blahpd", sock=None):
        return harness.GahpSession(self.user_argv(SUB, self.home(SUB, "bin", "rvgahp_client"), sock or self.sock(cluster), gahp))

    def close(self):
        drop_users((SUB, CLA, CLB))
        self.sshd.stop()
        shutil.rmtree(self.sshd.dir, ignore_errors=True)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def world():
    w = World()
    yield w
    w.close()


def works(world, cluster=CLA, sock=None):
    """A session of each GAHP through the cluster's link, driven like the GridManager."""
    for gahp in ("blahpd", "condor_ft-gahp"):
        s = world.session(cluster, gahp, sock)
        assert s.banner().startswith("$GahpVersion")
        assert s.command("ECHO hello\\ from\\ %s" % cluster) == "S hello\\ from\\ %s" % cluster
        assert s.command("ENV CONDOR_CONFIG") == "S " + world.home(cluster, ".rvgahp", "condor_config.rvgahp")
        status, _ = s.finish()
        assert status == 0


def differences(a, b):
    """{(user, path): (was, is)} for every path that differs between two world.state()s."""
    found = {}
    for user in set(a) | set(b):
        x, y = a.get(user, {}), b.get(user, {})
        found.update({(user, k): (x.get(k), y.get(k)) for k in set(x) | set(y) if x.get(k) != y.get(k)})
    return found


# --------------------------------------------------------------------------- without the world


def test_marked_blocks_are_replaced_and_removed_to_the_byte():
    put, drop = rvgahp_admin.put_block, rvgahp_admin.drop_block
    for before in (None, "", "mine\n", "mine, no newline", "a\n# >>> rvgahp setup: other >>>\nx\n# <<< rvgahp setup: other <<<\n"):
        once = put(before, "/s.sock", "line 1\nline 2\n")
        assert put(once, "/s.sock", "line 1\nline 2\n") == once  # idempotent
        changed = put(once, "/s.sock", "line 3\n")
        assert changed.count(">>> rvgahp setup: /s.sock") == 1 and "line 3" in changed and "line 1" not in changed
        assert drop(changed, "/s.sock") == before
    two = put(put("mine\n", "/a.sock", "a\n"), "/b.sock", "b\n")
    assert drop(drop(two, "/a.sock"), "/b.sock") == "mine\n"
    assert drop(two, "/a.sock") == put("mine\n", "/b.sock", "b\n")


def test_the_contrib_examples_are_what_setup_writes():
    with open(os.path.join(harness.REPO, "contrib", "rvgahp_ssh.example")) as f:
        example = f.read()
    submit = ("alice", "submit.example.edu", None)
    text = rvgahp_admin.transport_text(submit, "/home/alice/.rvgahp/hpcc.sock", "/home/alice/bin/rvgahp_proxy")
    assert rvgahp_admin.put_block(None, rvgahp_admin.CLUSTER_IDENT, text) in example
    with open(os.path.join(harness.REPO, "contrib", "authorized_keys.example")) as f:
        example = f.read()
    key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIExampleKeyOnlyReplaceWithTheClustersPublicKey rvgahp@login1"
    line = rvgahp_admin.authorized_key_text(key, "/home/alice/.rvgahp/hpcc.sock", "/home/alice/bin/rvgahp_proxy")
    assert rvgahp_admin.put_block("", "/home/alice/.rvgahp/hpcc.sock", line) in example
    # The options sit in one list, so a new one is a one-line change.
    options = rvgahp_admin.transport_options("K", "H")
    for option in ("BatchMode=yes", "ControlMaster=no", "ControlPath=none", "StrictHostKeyChecking=yes", "UserKnownHostsFile=H"):
        assert option in options and option in text.replace("~/.rvgahp/known_hosts", "H")


def test_print_gives_each_file_for_a_setup_by_hand(tmp_path):
    def printed(*args):
        result = subprocess.run([sys.executable, ADMIN, "print", *args], capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, result.stderr
        return result.stdout

    sock, proxy = "/home/alice/.rvgahp/hpcc.sock", "/home/alice/bin/rvgahp_proxy"
    with open(os.path.join(harness.REPO, "contrib", "rvgahp_ssh.example")) as f:
        assert printed("transport", "--socket", sock, "--proxy", proxy, "alice@submit.example.edu") in f.read()
    key = tmp_path / "rvgahp.pub"
    key.write_text("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIExampleKeyOnlyReplaceWithTheClustersPublicKey rvgahp@login1\n")
    with open(os.path.join(harness.REPO, "contrib", "authorized_keys.example")) as f:
        assert printed("authorized-key", "--socket", sock, "--proxy", proxy, str(key)) in f.read()
    assert "\n@reboot ~/bin/rvgahp_server -d >/dev/null\n*/10 * * * * ~/bin/rvgahp_server -d >/dev/null\n" in printed("crontab")
    assert "/opt/py/bin/python3.9 ~/bin/rvgahp_server -d" in printed("crontab", "--python", "/opt/py/bin/python3.9")
    config = printed("server-config", "--blahpd", "/b/glite/bin/blahpd", "--ft-gahp", "/b/sbin/condor_ft-gahp")
    # HTCondor defines LOG and BLAHPD_LOCATION before any file is read, as if on lines
    # above the block: setup's values must win over those, and a line below must win
    # over setup's.
    builtin = "LOG = /var/lib/condor/log\nBLAHPD_LOCATION = /usr\n"
    c = rvgahp.Config("x", builtin + config + "GLITE_LOCATION = /mine\n", {"HOME": "/home/alice"})
    assert (c.get("BATCH_GAHP"), c.get("GLITE_LOCATION"), c.get("BLAHPD_LOCATION")) == ("/b/glite/bin/blahpd", "/mine", "/mine")
    assert (c.get("LOG"), c.get("FT_GAHP_LOG")) == ("/home/alice/.rvgahp", "/home/alice/.rvgahp/FTGahpLog")
    wrong = subprocess.run([sys.executable, ADMIN, "print", "nothing"], capture_output=True, text=True, timeout=30)
    assert (
        wrong.returncode == 2 and "unknown file nothing: expected one of transport, authorized-key, server-config, crontab" in wrong.stderr
    )


def test_the_pyz_carries_setup_and_doctor(pyz):
    with zipfile.ZipFile(pyz) as z:
        names = z.namelist()
    assert "site-packages/rvgahp_admin.py" in names and "site-packages/rvgahp.py" in names


def test_pip_install_gives_all_four_commands():
    src = harness.short_tempdir("pipsrc")
    venv = harness.short_tempdir("venv")
    try:
        for name in ("pyproject.toml", "README.md", "rvgahp.py", "rvgahp_admin.py", "rvgahp_launch.py", "rvgahp_probe.py"):
            shutil.copy(os.path.join(harness.REPO, name), src)
        shutil.copytree(os.path.join(harness.REPO, "bench"), os.path.join(src, "bench"))  # what used to trip setuptools
        shutil.copytree(os.path.join(harness.REPO, "contrib"), os.path.join(src, "contrib"))
        subprocess.check_call([sys.executable, "-m", "venv", venv])
        pip = subprocess.run(
            [os.path.join(venv, "bin", "pip"), "install", "-q", "--disable-pip-version-check", src],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=300,
        )
        out = pip.stdout.decode(errors="replace")
        if pip.returncode != 0 and ("Could not find a version" in out or "No matching distribution" in out):
            pytest.skip("pip cannot fetch setuptools (no package index): %s" % out.strip().splitlines()[-1])
        assert pip.returncode == 0, out
        for command in ("rvgahp", "rvgahp_client", "rvgahp_proxy", "rvgahp_server"):
            result = subprocess.run([os.path.join(venv, "bin", command), "--version"], stdout=subprocess.PIPE, timeout=30)
            assert result.stdout.decode() == "%s %s\n" % (command, rvgahp.VERSION)
        result = subprocess.run([os.path.join(venv, "bin", "rvgahp"), "setup", "--version"], stdout=subprocess.PIPE, timeout=30)
        assert result.stdout.decode() == "rvgahp setup %s\n" % rvgahp.VERSION
        # What setup installs from here: an rvgahp.pyz packed from the installed modules.
        code = "import rvgahp_admin; data, where = rvgahp_admin.running_payload(); print(len(data), where)"
        packed = subprocess.run([os.path.join(venv, "bin", "python"), "-c", code], stdout=subprocess.PIPE, timeout=30, cwd=venv)
        assert "an rvgahp.pyz packed from the modules in %s" % venv in packed.stdout.decode(), packed.stdout
    finally:
        shutil.rmtree(src, ignore_errors=True)
        shutil.rmtree(venv, ignore_errors=True)


# --------------------------------------------------------------------------- setup, end to end


def test_a_dry_run_logs_in_once_lists_every_step_and_writes_nothing(world):
    before = world.state()
    result, calls = world.setup("--dry-run")
    assert calls == 1
    assert world.state() == before
    out = result.stdout
    for step in ("log in to", "look at the cluster", "host key", "copy rvgahp", "write the cluster's files", "write this host's files"):
        assert step in out
    # The copy names its destination first, then where it came from (issue 19, item 17).
    assert "] copy rvgahp %s to ~/bin/rvgahp.pyz on the cluster (from an rvgahp.pyz packed from the modules in " % rvgahp.VERSION in out
    assert re.search(r"would write +~/.rvgahp/rvgahp_ssh\n", out)
    assert re.search(r"would write +~/.ssh/authorized_keys\n", out)
    assert re.search(r"would make +~/.rvgahp/id_ed25519\n", out)
    assert "would run ~/bin/rvgahp_server -d" in out
    assert "[9/9] run one session of each GAHP through the link, and one connection through the tunnel" in out
    assert "send a token through the ft-gahp's tunnel and back" in out
    assert "Dry run: nothing was written." in out


def test_setup_links_up_runs_both_gahps_changes_nothing_twice_and_removes_to_the_byte(world):
    before = world.state()
    result, calls = world.setup()
    print(result.stdout)
    assert calls == 1, "one password prompt per setup"
    out = result.stdout
    assert "[1/9] log in to %s@127.0.0.1" % CLA in out
    assert "Python 3." in out and "testgahp" in out
    assert re.search(r"blahpd +\$GahpVersion", out) and re.search(r"condor_ft-gahp +\$GahpVersion", out)
    assert re.search(r"\n      tunnel: proven \(port \d+ on the cluster's 127\.0\.0\.1 reached 127\.0\.0\.1:\d+ here and back\)\n", out)
    assert "REMOTE_GAHP = %s" % world.home(SUB, "bin", "rvgahp_client") in out
    assert "grid_resource = batch slurm %s" % world.sock() in out
    works(world)
    set_up = world.state(runtime=False)

    # What she had is still there, as it was.
    with open(world.home(SUB, ".ssh", "authorized_keys")) as f:
        assert f.read().startswith("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOwnKeyOfHerOwn alice@laptop\n# >>> rvgahp setup: ")
    with open(os.path.join(world.crondir, CLA)) as f:
        crontab = f.read()
    assert crontab.startswith("0 3 * * * echo keep-me\n")
    assert "\n@reboot ~/bin/rvgahp_server -d >/dev/null\n*/10 * * * * ~/bin/rvgahp_server -d >/dev/null\n" in crontab
    with open(world.home(CLA, ".rvgahp", "condor_config.rvgahp")) as f:
        assert f.read().startswith("# mine\nRVGAHP_PING_INTERVAL = 1\n")
    assert stat.S_IMODE(os.stat(world.home(CLA, ".rvgahp", "condor_config.rvgahp")).st_mode) == 0o640  # its mode kept
    assert stat.S_IMODE(os.stat(world.home(SUB, ".rvgahp")).st_mode) == 0o700
    with open(world.home(CLA, ".rvgahp", "rvgahp_ssh")) as f:
        transport = f.read()
    assert '-p %d %s@127.0.0.1 "%s %s"' % (world.port, SUB, world.home(SUB, "bin", "rvgahp_proxy"), world.sock()) in transport

    result, calls = world.setup()
    assert calls == 1
    assert "Done: nothing changed, everything was already set up; the link is up." in result.stdout
    assert "already running" in result.stdout
    assert world.state(runtime=False) == set_up

    result, calls = world.setup("--remove")
    print(result.stdout)
    assert calls == 1
    assert "stopped rvgahp_server" in result.stdout
    assert differences(before, world.state()) == {}


def test_setup_stops_at_a_missing_gahp_with_the_fix(world):
    before = world.state()
    result, calls = world.setup("--no-gahps", cluster=CLB, expect=1)
    assert calls == 1
    assert result.stderr.startswith("rvgahp setup: look at the cluster: no blahpd on the cluster (looked on PATH and in ~/bosco/")
    assert "name it with --blahpd PATH" in result.stderr
    assert len(result.stderr.splitlines()) == 1
    assert world.state() == before


def test_setup_with_the_tunnel_off_says_so_and_succeeds(world):
    clb = pwd.getpwnam(CLB)
    dot = world.home(CLB, ".rvgahp")
    os.makedirs(dot, mode=0o700)
    os.chown(dot, clb.pw_uid, clb.pw_gid)
    write(os.path.join(dot, "condor_config.rvgahp"), "# this site opens 9618\nRVGAHP_FT_TUNNEL = False\n", 0o600, clb)
    try:
        before = world.state()
        result, calls = world.setup(cluster=CLB)
        assert calls == 1
        assert re.search(r"condor_ft-gahp +\$GahpVersion.*\n      tunnel: off \(RVGAHP_FT_TUNNEL = False\)\nDone: ", result.stdout)
        assert "proven" not in result.stdout and not result.stderr
        works(world, CLB)
        world.setup("--remove", cluster=CLB)
        assert differences(before, world.state()) == {}
    finally:
        shutil.rmtree(dot)


def test_two_clusters_each_with_its_own_socket(world):
    before = world.state()
    world.setup(cluster=CLA)
    world.setup(cluster=CLB)
    works(world, CLA)
    works(world, CLB)
    out = passing(world, SUB)
    assert out.count("✓ socket: ") == 2 and out.count("✓ link: up") == 2
    world.setup("--remove", cluster=CLB)
    assert not os.path.exists(world.sock(CLB))
    works(world, CLA)  # the shared ~/bin/rvgahp.pyz and links stay for the other cluster
    world.setup("--remove", cluster=CLA)
    assert differences(before, world.state()) == {}


# --------------------------------------------------------------------------- doctor


def failing(world, user, check):
    """doctor's text as the user: the failed check's line and its fix."""
    result = world.doctor(user)
    assert result.returncode == 1, result.stdout
    lines = result.stdout.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("✗ %s: " % check):
            assert lines[i + 1].startswith("    fix: "), result.stdout
            return line, lines[i + 1]
    raise AssertionError("no failed %r check in:\n%s" % (check, result.stdout))


def passing(world, user):
    result = world.doctor(user)
    assert result.returncode == 0, result.stdout
    assert "✗" not in result.stdout and result.stdout.endswith("all checks passed\n")
    return result.stdout


class Undo:
    """Put a file back as it was, owner and mode included."""

    def __init__(self, path):
        self.path = path
        st = os.lstat(path)
        self.owner, self.mode = (st.st_uid, st.st_gid), stat.S_IMODE(st.st_mode)
        with open(path, "rb") as f:
            self.data = f.read()

    def edit(self, change):
        with open(self.path, "r+b") as f:
            data = change(self.data)
            f.seek(0)
            f.truncate()
            f.write(data)

    def restore(self):
        with open(self.path, "wb") as f:
            f.write(self.data)
        os.chown(self.path, *self.owner)
        os.chmod(self.path, self.mode)


def test_doctor_names_each_fault_and_its_fix(world):
    world.setup()
    out = passing(world, SUB)
    for check in ("authorized_keys", "roles", "socket directory", "socket", "link", "REMOTE_GAHP"):
        assert "✓ %s: " % check in out
    out = passing(world, CLA)
    for check in ("config", "blahpd", "condor_ft-gahp", "known_hosts", "transport", "crontab", "server", "last login"):
        assert "✓ %s: " % check in out

    # The submit host.
    client = world.home(SUB, "bin", "rvgahp_client")
    os.unlink(client)
    line, fix = failing(world, SUB, "roles")
    assert "rvgahp_client in ~/bin does not resolve" in line and "ln -sf rvgahp.pyz ~/bin/rvgahp_client" in fix
    os.symlink("rvgahp.pyz", client)
    os.lchown(client, *Undo(world.home(SUB, "bin", "rvgahp.pyz")).owner)

    os.chmod(world.home(SUB, ".rvgahp"), 0o777)
    line, fix = failing(world, SUB, "socket directory")
    assert "may be changed by others" in line and fix == "    fix: chmod 700 %s" % world.home(SUB, ".rvgahp")
    os.chmod(world.home(SUB, ".rvgahp"), 0o700)

    os.chmod(world.sock(), 0o666)
    line, fix = failing(world, SUB, "socket")
    assert "with mode 666" in line and "rm %s" % world.sock() in fix
    os.chmod(world.sock(), 0o600)

    keys = Undo(world.home(SUB, ".ssh", "authorized_keys"))
    keys.edit(lambda d: d.replace(b'.sock" ssh-ed25519', b'.other.sock" ssh-ed25519'))
    line, fix = failing(world, SUB, "authorized_keys")
    assert "its command serves %s" % world.sock().replace(".sock", ".other.sock") in line and "rvgahp setup" in fix
    keys.restore()

    with open(world.remote_gahp_file, "w") as f:
        f.write("/usr/bin/elsewhere\n")
    line, fix = failing(world, SUB, "REMOTE_GAHP")
    assert line.endswith("REMOTE_GAHP = /usr/bin/elsewhere") and "REMOTE_GAHP = %s" % client in fix
    with open(world.remote_gahp_file, "w") as f:
        f.write(client + "\n")

    server = world.server_pid()
    os.kill(server, signal.SIGSTOP)  # a hung server: its link goes silent (ping interval 1 s here)
    try:
        harness.wait_for(lambda: world.checks(SUB)[0]["link"]["ok"] is False, 30, what="doctor to see a silent link")
        line, fix = failing(world, SUB, "link")
        assert line.startswith("✗ link: silent") and "server's log" in fix
    finally:
        os.kill(server, signal.SIGCONT)
    harness.wait_for(lambda: world.checks(SUB)[0]["link"]["ok"], 30, what="the link to be heard again")

    # The cluster.
    config = Undo(world.home(CLA, ".rvgahp", "condor_config.rvgahp"))
    config.edit(lambda d: d + b"this is not a config line\n")
    line, fix = failing(world, CLA, "config")
    assert "expected NAME = value" in line
    config.edit(lambda d: d + b"BATCH_GAHP = /nowhere/blahpd\n")
    line, fix = failing(world, CLA, "blahpd")
    assert "BATCH_GAHP = /nowhere/blahpd: not an executable file" in line and "--blahpd PATH" in fix
    config.edit(lambda d: d + b"FT_GAHP = /nowhere/condor_ft-gahp\n")
    line, fix = failing(world, CLA, "condor_ft-gahp")
    assert "--ft-gahp PATH" in fix
    config.restore()

    key = world.home(CLA, ".rvgahp", rvgahp_admin.KEY_NAME)
    os.chmod(key, 0o644)
    line, fix = failing(world, CLA, "transport")
    assert "is mode 644" in line and fix.endswith("chmod 600 ~/.rvgahp/id_ed25519")
    os.chmod(key, 0o600)

    known = Undo(world.home(CLA, ".rvgahp", "known_hosts"))
    known.edit(lambda d: b"".join(line for line in d.splitlines(True) if line.startswith(b"#")))
    line, fix = failing(world, CLA, "known_hosts")
    assert "has no key for [127.0.0.1]:%d" % world.port in line and "ssh-keyscan -p %d 127.0.0.1" % world.port in fix
    known.restore()

    crontab = Undo(os.path.join(world.crondir, CLA))
    crontab.edit(lambda d: b"".join(line for line in d.splitlines(True) if b"@reboot" not in line))
    line, fix = failing(world, CLA, "crontab")
    assert "lacks the @reboot line" in line and "rvgahp print crontab" in fix
    crontab.restore()

    world.stop_server()
    line, fix = failing(world, CLA, "server")
    assert fix == "    fix: start it: ~/bin/rvgahp_server -d"

    # The submit host no longer lets the key in: the transport and the last login fail.
    keys.edit(lambda d: d.split(b"\n# >>> rvgahp setup")[0])
    world.start_server(wait=False)
    harness.wait_for(lambda: "link attempt failed" in world.server_log(), 30, what="a failed login")
    line, fix = failing(world, CLA, "last login")
    assert "link attempt failed: the transport ended (exit 255)" in line
    line, fix = failing(world, CLA, "transport")
    assert "Permission denied" in line
    keys.restore()
    world.stop_server()
    world.start_server()
    passing(world, CLA)
    passing(world, SUB)

    # Neither host of anything: say what to run.
    line, fix = failing(world, CLB, "setup")
    assert "rvgahp setup USER@CLUSTER" in fix
    world.setup("--remove")


# --------------------------------------------------------------------------- interruptions

# (host, point): where setup is killed, by tests/interrupt/sitecustomize.py and the crontab stub.
KILL_POINTS = [("submit", "step:" + s) for s in rvgahp_admin.Setup.STEPS] + [
    ("cluster", "write:setup-created"),  # the first record of a created path
    ("cluster", "write:id_ed25519.pub"),  # between the key's two halves
    ("cluster", "write:condor_config.rvgahp"),
    ("cluster", "write:rvgahp_ssh"),
    ("cluster", "write:rvgahp.pyz"),  # the staged copy, put in place
    ("cluster", "write:crontab"),
    ("submit", "write:setup-created"),
    ("submit", "write:rvgahp.pyz"),
    ("submit", "write:authorized_keys"),
]


@pytest.fixture(scope="module")
def reference(world):
    """Homes before setup, and (keys aside) after it."""
    before = world.state()
    world.setup()
    after = world.state(runtime=False, normalize=True)
    world.setup("--remove")
    assert world.state() == before
    return before, after


@pytest.mark.parametrize("kill_at", KILL_POINTS, ids=["%s-%s" % k for k in KILL_POINTS])
def test_an_interrupted_setup_leaves_whole_files_and_the_next_run_completes(world, reference, kill_at):
    before, after = reference
    try:
        interrupted_then_completed(world, before, after, kill_at)
    finally:
        world.setup("--remove", expect=None)  # so a failure here leaves the next test a clean world
    assert differences(before, world.state()) == {}


def interrupted_then_completed(world, before, after, kill_at):
    result, calls = world.setup(kill_at=kill_at, expect=None)
    assert result.returncode != 0 and calls <= 1
    now = world.state(runtime=False, normalize=True)
    for user in now:
        for path, value in now[user].items():
            if rvgahp_admin.TEMP_SUFFIX in path:
                continue  # a temporary file: the next run replaces it
            if value is not None and value[0] == "manifest":  # the list of paths to remove: any part of the final one
                assert set(value[2]) <= set(after[user][path][2]), (user, path, kill_at)
                continue
            whole = (before[user].get(path), after[user].get(path))
            assert value in whole, "%s: %s is half-written after a kill at %s" % (user, path, kill_at)
    result, calls = world.setup()
    assert calls == 1
    changed = differences(after, world.state(runtime=False, normalize=True))
    assert not changed, "after a kill at %s and a second run:\n%s" % (kill_at, pprint.pformat(changed))
    works(world)


# --------------------------------------------------------------------------- two clusters, one submit user


@pytest.fixture
def login_names(world):
    """Two clusters whose login nodes are both login.*: /etc/hosts names them, and the
    submit user has logged in to both before (their host key is known), for this test."""
    names = ("login.hpcc.example.edu", "login.other.example.org")
    with open("/etc/hosts") as f:
        saved = f.read()
    known = Undo(world.home(SUB, ".ssh", "known_hosts"))
    with open(os.path.join(world.sshd.dir, "host_key.pub")) as f:
        hostkey = " ".join(f.read().split()[:2])
    known.edit(lambda d: d + b"".join(b"[%s]:%d %s\n" % (n.encode(), world.port, hostkey.encode()) for n in names))
    with open("/etc/hosts", "a") as f:
        f.write("127.0.0.1 %s\n" % " ".join(names))
    try:
        yield names
    finally:
        with open("/etc/hosts", "w") as f:
            f.write(saved)
        known.restore()


def test_two_clusters_whose_login_nodes_are_both_login_star_never_share_a_socket(world, login_names):
    first, second = login_names
    before = world.state()
    world.setup(cluster=CLA, host=first)
    world.setup(cluster=CLB, host=second)
    assert world.sock(CLA, first) != world.sock(CLB, second)
    works(world, CLA, world.sock(CLA, first))
    works(world, CLB, world.sock(CLB, second))
    s = world.session(CLA, "blahpd", world.sock(CLA, first))
    assert s.banner().startswith("$GahpVersion")
    assert s.command("CWD") == "S " + world.home(CLA), "the first cluster's socket runs its GAHPs on the first cluster"
    s.finish()
    world.setup("--remove", cluster=CLB, host=second)
    world.setup("--remove", cluster=CLA, host=first)
    assert differences(before, world.state()) == {}


def test_a_socket_another_clusters_setup_owns_is_never_taken(world, login_names):
    first, second = login_names
    before = world.state()
    world.setup(cluster=CLA, host=first)
    taken = world.sock(CLA, first)
    result, calls = world.setup("--socket", taken, cluster=CLB, host=second, expect=1)
    assert calls == 0, "it stops before logging in"
    line = result.stderr.strip().splitlines()
    assert len(line) == 1 and "is the socket of %s@%s" % (CLA, first) in line[0] and "--socket" in line[0], result.stderr
    works(world, CLA, taken)
    world.setup("--remove", cluster=CLA, host=first)
    assert differences(before, world.state()) == {}


def test_a_new_socket_for_the_same_cluster_replaces_the_older_block_for_its_key(world):
    before = world.state()
    world.setup(cluster=CLA)
    moved = world.home(SUB, ".rvgahp", "moved.sock")
    result, _ = world.setup("--socket", moved, cluster=CLA)
    assert "the block for the socket ~/.rvgahp/%s: it had this cluster's key" % os.path.basename(world.sock(CLA)) in result.stdout
    with open(world.home(SUB, ".ssh", "authorized_keys")) as f:
        keys = f.read()
    assert keys.count("restrict,command=") == 1 and moved in keys
    works(world, CLA, moved)  # sshd found the one line for the key: the link serves the new socket
    world.setup("--remove", "--socket", moved, cluster=CLA)
    world.setup("--remove", cluster=CLA)
    assert differences(before, world.state()) == {}


# --------------------------------------------------------------------------- a hot standby sharing $HOME


def locked(path):
    import fcntl

    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)


def test_remove_never_orphans_a_standbys_server(world):
    """A second login node (its own UTS namespace, named rvadlogin2) shares the cluster
    account's $HOME and runs its own server: --remove names it and changes nothing."""
    before = world.state()
    world.setup()
    standby_pid_file = world.home(CLA, ".rvgahp", "rvgahp_server.rvadlogin2.pid")
    server = [PYTHON, world.home(CLA, "bin", "rvgahp_server"), "-d"]
    started = subprocess.run(
        ["unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"', "rvadlogin2", *world.user_argv(CLA, *server)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert started.returncode == 0, started.stderr
    harness.wait_for(lambda: locked(standby_pid_file), 30, what="the standby's server")
    with open(standby_pid_file) as f:
        standby = int(f.read().strip())
    try:
        set_up = world.state(runtime=False)
        result, calls = world.setup("--remove", expect=1)
        assert calls == 1
        line = result.stderr.strip().splitlines()
        assert len(line) == 1, result.stderr
        assert "rvgahp_server also runs on rvadlogin2 (pid %d, ~/.rvgahp/rvgahp_server.rvadlogin2.pid)" % standby in line[0]
        assert "on rvadlogin2: kill %d" % standby in line[0]
        assert world.state(runtime=False) == set_up, "nothing removed while the standby runs"
        assert locked(standby_pid_file) and world.server_pid() is not None
        works(world)
    finally:
        os.kill(standby, signal.SIGTERM)
        harness.wait_for(lambda: not locked(standby_pid_file), 30, what="the standby's server to stop")
    result, _ = world.setup("--remove")
    assert "stopped rvgahp_server" in result.stdout
    assert differences(before, world.state()) == {}


def test_remove_takes_the_shiv_copies_of_the_pyz_it_removes_on_both_hosts(world, pyz):
    """Setup run from the shiv-built rvgahp.pyz: each host's ~/.shiv gets its unpacked copy;
    --remove takes them with ~/bin/rvgahp.pyz and leaves nothing behind."""
    program = os.path.join(world.dir, "rvgahp.pyz")
    shutil.copy(pyz, program)
    os.chmod(program, 0o755)
    before = world.state()
    world.setup(program=program)
    works(world)
    for user in (SUB, CLA):
        assert [n for n in os.listdir(world.home(user, ".shiv")) if n.startswith("rvgahp.pyz_")], user
    result, _ = world.setup("--remove", program=program)
    assert re.search(r"removed +~/\.shiv/rvgahp\.pyz_\S+/", result.stdout), result.stdout
    assert differences(before, world.state()) == {}


def test_condor_config_with_a_hand_written_remote_gahp_is_warned_about_by_file_and_line(world):
    user_config = world.home(SUB, "user_config")
    mine = "# my own\nSCHEDD_DEBUG = D_FULLDEBUG\n  remote_gahp = /opt/old/remote_gahp\n"
    with open(user_config, "w") as f:
        f.write(mine)
    os.chown(user_config, pwd.getpwnam(SUB).pw_uid, pwd.getpwnam(SUB).pw_gid)
    before = world.state()
    result, _ = world.setup("--condor-config", user_config)
    warned = [line for line in result.stdout.splitlines() if "warning:" in line]
    assert len(warned) == 1, result.stdout
    assert "%s:3 already sets remote_gahp = /opt/old/remote_gahp" % user_config in warned[0]
    with open(user_config) as f:
        written = f.read()
    assert written.startswith(mine) and "\nREMOTE_GAHP = %s\n" % world.home(SUB, "bin", "rvgahp_client") in written
    result, _ = world.setup("--condor-config", user_config)  # the second run warns again: the line is still there
    assert sum("warning:" in line for line in result.stdout.splitlines()) == 1
    world.setup("--remove", "--condor-config", user_config)
    assert differences(before, world.state()) == {}
    with open(user_config) as f:
        assert f.read() == mine


def test_first_contact_says_what_the_host_key_question_is_before_ssh_asks(world):
    new = "login.new.example.net"
    with open("/etc/hosts") as f:
        saved = f.read()
    known = Undo(world.home(SUB, ".ssh", "known_hosts"))
    with open("/etc/hosts", "a") as f:
        f.write("127.0.0.1 %s\n" % new)
    try:
        result, _ = world.setup(host=new)
        said = [line for line in result.stdout.splitlines() if "first login to" in line]
        assert len(said) == 1 and "first login to %s: ssh shows its host key's fingerprint" % new in said[0], result.stdout
        assert "ssh-keyscan -p %d %s | ssh-keygen -lf -" % (world.port, new) in said[0]
        assert result.stdout.index("first login to") < result.stdout.index("[2/9]")
        with open(os.path.join(world.askpass_dir, "calls.%d" % world.runs)) as f:
            asked = f.read()
        assert asked.count("continue connecting (yes/no") == 1 and asked.count("password:") == 1, asked
        works(world, CLA, world.sock(CLA, new))
        result, calls = world.setup(host=new)  # ssh keeps the key: no question, and nothing said
        assert "first login to" not in result.stdout and calls == 1
        world.setup("--remove", host=new)
    finally:
        with open("/etc/hosts", "w") as f:
            f.write(saved)
        known.restore()


# --------------------------------------------------------------------------- issue 19's items 10 and 15, issue 18's batch systems


def test_the_rvgahp_command_exists_after_setup_and_runs_doctor(world):
    world.setup()
    rvgahp_cmd = world.home(SUB, "bin", "rvgahp")
    assert os.readlink(rvgahp_cmd) == "rvgahp.pyz"
    result = world.as_user(SUB, [rvgahp_cmd, "doctor"])
    assert result.returncode == 0 and "rvgahp doctor %s" % rvgahp.VERSION in result.stdout, result.stdout + result.stderr
    world.setup("--remove")
    assert not os.path.lexists(rvgahp_cmd)


def test_doctor_moves_a_socket_in_a_shared_directory_and_never_chmods_it(world):
    shared = "/tmp/rvadm-%d.sock" % os.getpid()
    before = world.state()
    world.setup("--socket", shared)
    checks, status = world.checks(SUB)
    check = checks["socket directory"]
    assert status == 1 and not check["ok"], check
    fix = check["fix"]
    assert "chmod" not in fix and "rvgahp setup --socket ~/.rvgahp/%s" % os.path.basename(shared) in fix and "grid_resource" in fix
    world.setup("--remove", "--socket", shared)
    assert differences(before, world.state()) == {}


def test_several_batch_systems_are_named_and_one_is_chosen_with_a_flag(world):
    """Stand-ins for sbatch and condor_submit on the cluster's PATH (only their names count)."""
    stand_ins = [os.path.join(world.bin, name) for name in ("sbatch", "condor_submit")]
    for path in stand_ins:
        write(path, "#!/bin/sh\n# a stand-in: setup only looks for the name\nexit 0\n", 0o755)
    try:
        before = world.state()
        result, calls = world.setup(expect=1)
        assert calls == 1
        line = result.stderr.strip().splitlines()
        assert len(line) == 1 and "several batch systems (slurm, condor)" in line[0] and "--batch-system NAME" in line[0], result.stderr
        result, _ = world.setup("--batch-system", "condor")
        assert "batch system    condor (--batch-system)" in result.stdout
        assert "grid_resource = batch condor %s" % world.sock() in result.stdout
        world.setup("--remove")
        assert differences(before, world.state()) == {}
    finally:
        for path in stand_ins:
            os.unlink(path)

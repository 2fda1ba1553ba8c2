"""A real HTCondor, a real Slurm and rvgahp, on two hosts made of network namespaces.

Used by tests/test_htcondor.py and by the bench; it imports nothing from either.

    root = build_root()              # Debian trixie with condor, slurm-wlm, munge, sshd
                                     # (built once, cached under RVGAHP_HTCONDOR_CACHE)
    rig = Rig(root, pyz).start()     # the hosts "submit" and "cluster", their daemons
    rig.setup()                      # `rvgahp setup` as alice on submit, one password login
    jobs = rig.submit(20, in_size=1 << 20, out_size=1 << 20)
    rig.wait_jobs(jobs, COMPLETED)
    rig.check_outputs(jobs)
    rig.close()                      # processes, mounts and namespaces gone

The two hosts share one cached root (read-only below an overlayfs per host, so each has
its own /etc, /home, /tmp and /var), each has its own network namespace and hostname,
and a veth pair joins them with no route anywhere else:

- submit (192.0.2.1): alice's personal HTCondor (master, collector, schedd; the schedd
  starts the GridManager), bound to its 127.0.0.1 only (Rig(condor_addr=) can move it to
  192.0.2.1, in the cluster's reach, for the bench); an sshd on 192.0.2.1:22 for the link
  rvgahp_server dials; rvgahp_proxy and rvgahp_client once set up.
- cluster (192.0.2.2): munged, slurmctld and slurmd on its 127.0.0.1; rvgahp_server,
  blahpd and condor_ft-gahp as alice; an sshd with password logins only while setup runs.

So the only way from the cluster to the submit host is ssh, and every file the GridManager
sends or fetches must go through rvgahp's tunnel.

Needs root, debootstrap, iproute2 and util-linux (nsenter, unshare) on the host, and the
Debian mirror (RVGAHP_DEBIAN_MIRROR) for the first build.
"""

import fcntl
import hashlib
import os
import random
import re
import shutil
import signal
import subprocess
import time

from testbed import loopback
from testbed.loopback import cmdline

BASE = os.environ.get("RVGAHP_HTCONDOR_CACHE", "/var/tmp/rvgahp-htcondor")
MIRROR = os.environ.get("RVGAHP_DEBIAN_MIRROR", "http://deb.debian.org/debian")
SUITE = "trixie"
PACKAGES = ("condor", "slurm-wlm", "munge", "openssh-server", "openssh-client", "cron", "python3", "procps")
RECIPE = "1"  # bump when the build steps change: a new stamp, a new root
HOST_TOOLS = ("debootstrap", "ip", "nsenter", "unshare", "mount", "umount", "chroot")

USER = "alice"
UID = 2001
SUBMIT, CLUSTER = "submit", "cluster"
ADDRESS = {SUBMIT: "192.0.2.1", CLUSTER: "192.0.2.2"}  # TEST-NET-1, inside our namespaces only
NAMES = {SUBMIT: "submit.example.org", CLUSTER: "login.hpcc.example.edu"}  # the docs' names, in /etc/hosts
NETNS = {SUBMIT: "rvgahp-ht-submit", CLUSTER: "rvgahp-ht-cluster"}
VETH = {SUBMIT: "rvght-s", CLUSTER: "rvght-c"}
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
HOME = "/home/" + USER
CONDOR_DIR = HOME + "/condor"
CONDOR_CONFIG = CONDOR_DIR + "/condor_config"
CONDOR_LOCAL = CONDOR_DIR + "/condor_config.local"
JOBS_DIR = HOME + "/jobs"
PYZ = HOME + "/rvgahp.pyz"
SOCKET = HOME + "/.rvgahp/%s@%s.sock" % (USER, ADDRESS[CLUSTER])  # setup's default: ~/.rvgahp/USER@CLUSTER.sock
BLAH_PY = "/usr/libexec/blahp/blah.py"

# HTCondor's JobStatus numbers
IDLE, RUNNING, REMOVED, COMPLETED, HELD = 1, 2, 3, 4, 5
STATUS_NAMES = {1: "Idle", 2: "Running", 3: "Removed", 4: "Completed", 5: "Held", 6: "Transferring", 7: "Suspended"}


class Unavailable(Exception):
    """The tier cannot run here (no root, a missing tool, no mirror): the reason, in one line."""


def wait_for(predicate, timeout, what, interval=0.2):
    """predicate()'s first true value, polled until timeout seconds have passed (loopback's
    wait, with this tier's slower default poll)."""
    return loopback.wait_for(predicate, timeout, interval=interval, what=what)


def read_file(path):
    with open(path, errors="replace") as f:
        return f.read()


def missing_prerequisite():
    """Why the tier cannot run on this host, or None."""
    if os.geteuid() != 0:
        return "the HTCondor tier needs root (network namespaces, mounts, chroot)"
    for tool in HOST_TOOLS:
        if not shutil.which(tool):
            return "%s is not installed (test.sh installs debootstrap, iproute2 and util-linux)" % tool
    if "overlay" not in read_file("/proc/filesystems"):
        subprocess.run(["modprobe", "overlay"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if "overlay" not in read_file("/proc/filesystems"):
            return "the kernel has no overlayfs"
    return None


def run(argv, timeout=600, check=True, **kw):
    kw.setdefault("stdout", subprocess.PIPE)
    kw.setdefault("stderr", subprocess.STDOUT)
    result = subprocess.run(argv, timeout=timeout, **kw)
    if check and result.returncode != 0:
        out = result.stdout.decode(errors="replace") if isinstance(result.stdout, bytes) else result.stdout
        raise RuntimeError("%s exited %d:\n%s" % (" ".join(argv), result.returncode, (out or "")[-3000:]))
    return result


class Lock:
    """An exclusive flock on BASE/lock: one build and one rig at a time on this machine."""

    def __init__(self, timeout=1800):
        os.makedirs(BASE, exist_ok=True)
        self.f = open(os.path.join(BASE, "lock"), "w")  # noqa: SIM115 (held until release)
        wait_for(self.try_lock, timeout, "another HTCondor rig on this machine to finish (%s/lock)" % BASE, 1)

    def try_lock(self):
        try:
            fcntl.flock(self.f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False

    def release(self):
        self.f.close()


# --------------------------------------------------------------------------- mounts


def mounts_under(path):
    """Mount points at or under path, deepest first."""
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split()[4].replace("\\040", " ")
            if point == path or point.startswith(path.rstrip("/") + "/"):
                found.append(point)
    return sorted(set(found), key=lambda p: -p.count("/"))


def unmount_all(path):
    for _ in range(5):
        points = mounts_under(path)
        if not points:
            return
        for point in points:
            if subprocess.run(["umount", point], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode:
                subprocess.run(["umount", "-l", point], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    left = mounts_under(path)
    if left:
        raise RuntimeError("could not unmount: %s" % ", ".join(left))


# --------------------------------------------------------------------------- the root


def stamp():
    return hashlib.sha256(repr((RECIPE, SUITE, PACKAGES)).encode()).hexdigest()[:12]


def root_dir():
    return os.path.join(BASE, "root-" + stamp())


def build_root(say=print, lock=True):
    """The cached trixie root with PACKAGES, built if absent or incomplete; its path.

    COMPLETE is written last, so an interrupted build is started over."""
    top = root_dir()
    root = os.path.join(top, "root")
    complete = os.path.join(top, "COMPLETE")
    if os.path.exists(complete):
        return root
    held = Lock() if lock else None
    try:
        if os.path.exists(complete):
            return root
        why = missing_prerequisite()
        if why:
            raise Unavailable(why)
        unmount_all(top)
        shutil.rmtree(top, ignore_errors=True)
        os.makedirs(top)
        started = time.monotonic()
        say("htcondor: building the %s root in %s (debootstrap from %s)" % (SUITE, root, MIRROR))
        log_path = os.path.join(top, "build.log")
        with open(log_path, "wb") as log:
            result = subprocess.run(
                ["debootstrap", "--variant=minbase", SUITE, root, MIRROR], stdout=log, stderr=subprocess.STDOUT, timeout=900
            )
        if result.returncode != 0:
            last = read_file(log_path).strip().splitlines()[-1:]
            raise Unavailable("debootstrap %s from %s failed (exit %d): %s" % (SUITE, MIRROR, result.returncode, " ".join(last)))
        # No service starts inside the root while packages install.
        with open(os.path.join(root, "usr/sbin/policy-rc.d"), "w") as f:
            f.write("#!/bin/sh\nexit 101\n")
        os.chmod(os.path.join(root, "usr/sbin/policy-rc.d"), 0o755)
        try:
            run(["mount", "-t", "proc", "proc", os.path.join(root, "proc")])
            run(["mount", "--bind", "/dev", os.path.join(root, "dev")])
            env = {"PATH": PATH, "DEBIAN_FRONTEND": "noninteractive", "LANG": "C.UTF-8"}
            for argv in (["apt-get", "update"], ["apt-get", "install", "-y", *PACKAGES], ["apt-get", "clean"]):
                with open(log_path, "ab") as log:
                    log.write(("\n$ %s\n" % " ".join(argv)).encode())
                    log.flush()
                    result = subprocess.run(["chroot", root, *argv], stdout=log, stderr=subprocess.STDOUT, env=env, timeout=900)
                if result.returncode != 0:
                    raise Unavailable("%s in the root failed (exit %d); see %s" % (" ".join(argv), result.returncode, log_path))
        finally:
            unmount_all(top)
        versions = root_versions(root)
        with open(complete + ".new", "w") as f:
            f.write("".join("%s %s\n" % kv for kv in sorted(versions.items())))
        os.rename(complete + ".new", complete)
        say("htcondor: root built in %.0f s: %s" % (time.monotonic() - started, versions))
        return root
    finally:
        if held:
            held.release()


def root_versions(root):
    """{package: version} of the packages that matter, from dpkg's status file."""
    versions = {}
    name = None
    with open(os.path.join(root, "var/lib/dpkg/status")) as f:
        for line in f:
            if line.startswith("Package: "):
                name = line.split()[1]
            elif line.startswith("Version: ") and name in ("condor", "slurm-wlm", "slurmd", "munge", "openssh-server", "python3"):
                versions[name] = line.split()[1]
    return versions


def build_pyz(out, repo=None, python=None):
    """rvgahp.pyz from the checkout, built by build_zipapp.sh (shiv must be in python)."""
    repo = repo or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    python = python or os.path.join(repo, ".venv", "bin", "python")
    run([os.path.join(repo, "build_zipapp.sh"), out], env=dict(os.environ, PYTHON=python), timeout=300)
    return out


# --------------------------------------------------------------------------- a host


class Host:
    """One machine: an overlay over the cached root, a network namespace, a hostname."""

    def __init__(self, rig, name):
        self.rig = rig
        self.name = name
        self.addr = ADDRESS[name]
        self.netns = NETNS[name]
        self.dir = os.path.join(rig.run_dir, name)
        self.root = os.path.join(self.dir, "merged")
        self.uts = os.path.join(self.dir, "uts")
        self.logs = os.path.join(rig.run_dir, "logs")
        self.daemons = {}

    def path(self, *parts):
        return os.path.join(self.root, *[p.lstrip("/") for p in parts])

    def make(self):
        for sub in ("upper", "work", "merged"):
            os.makedirs(os.path.join(self.dir, sub))
        run(
            [
                "mount", "-t", "overlay", "overlay",
                "-o", "lowerdir=%s,upperdir=%s/upper,workdir=%s/work" % (self.rig.root, self.dir, self.dir),
                self.root,
            ]
        )  # fmt: skip
        run(["mount", "-t", "proc", "proc", self.path("proc")])
        run(["mount", "--bind", "/dev", self.path("dev")])
        run(["mount", "-t", "tmpfs", "-o", "mode=1777", "tmpfs", self.path("dev/shm")])
        open(self.uts, "w").close()
        run(["unshare", "--uts=" + self.uts, "hostname", self.name])
        run(["ip", "netns", "add", self.netns])
        run(["ip", "-n", self.netns, "link", "set", "lo", "up"])
        self.write("/etc/hostname", self.name + "\n")
        self.write(
            "/etc/hosts",
            "127.0.0.1 localhost\n" + "".join("%s %s %s\n" % (ADDRESS[h], h, NAMES[h]) for h in (SUBMIT, CLUSTER)),
        )
        os.remove(self.path("usr/sbin/policy-rc.d"))

    def env(self, user=None, **extra):
        home = "/home/" + user if user else "/root"
        env = {"PATH": PATH, "LANG": "C.UTF-8", "HOME": home, "USER": user or "root", "LOGNAME": user or "root", "SHELL": "/bin/bash"}
        if user == USER and self.name == SUBMIT:
            env["CONDOR_CONFIG"] = CONDOR_CONFIG
        env.update(extra)
        return env

    def argv(self, argv, user=None, cwd=None, **extra):
        """argv run on this host (its network, its hostname, its root), as user or root."""
        cmd = ["nsenter", "--net=/run/netns/" + self.netns, "--uts=" + self.uts, "chroot", self.root]
        if user:
            cmd += ["setpriv", "--reuid=" + user, "--regid=" + user, "--init-groups"]
        cmd += ["env", "-i"]
        if cwd:
            cmd += ["-C", cwd]
        cmd += ["%s=%s" % kv for kv in sorted(self.env(user, **extra).items())]
        return cmd + list(argv)

    def run(self, argv, user=None, cwd=None, timeout=300, check=True, input=None, env=None):
        result = subprocess.run(
            self.argv(argv, user, cwd, **(env or {})),
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout,
            start_new_session=True,  # no terminal: ssh asks SSH_ASKPASS
            text=True,
        )
        if check and result.returncode != 0:
            said = "stdout: %s\nstderr: %s" % (result.stdout[-3000:], result.stderr[-3000:])
            raise RuntimeError("%s: %s exited %d\n%s" % (self.name, " ".join(argv), result.returncode, said))
        return result

    def daemon(self, name, argv, user=None, env=None):
        """A long-running process in the foreground, its output in logs/HOST.NAME.log."""
        os.makedirs(self.logs, exist_ok=True)
        with open(os.path.join(self.logs, "%s.%s.log" % (self.name, name)), "ab") as out:
            argv = self.argv(argv, user, **(env or {}))
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.daemons[name] = proc
        return proc

    def stop_daemon(self, name):
        proc = self.daemons.pop(name, None)
        if proc and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(30)

    def write(self, path, text, mode=0o644, owner=None):
        full = self.path(path)
        os.makedirs(os.path.dirname(full), exist_ok=True)
        data = text.encode() if isinstance(text, str) else text
        with open(full + ".new", "wb") as f:
            f.write(data)
        os.chmod(full + ".new", mode)
        if owner:
            os.chown(full + ".new", UID, UID)
        os.rename(full + ".new", full)

    def read(self, path, default=None):
        try:
            with open(self.path(path), errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            if default is None:
                raise
            return default

    def mkdir(self, path, mode=0o755, owner=None):
        full = self.path(path)
        os.makedirs(full, exist_ok=True)
        os.chmod(full, mode)
        if owner:
            os.chown(full, UID, UID)

    def pids(self):
        """Every process in this host's network namespace."""
        out = subprocess.run(["ip", "netns", "pids", self.netns], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True).stdout
        return [int(p) for p in out.split()]

    def processes(self, name=None):
        """[(pid, argv)] of this host's processes, those named name if given: a word of
        their argv is name or ends in /name (a role run from the pyz is python3's argument)."""
        found = []
        for pid in self.pids():
            argv = cmdline(pid)
            if argv and (name is None or name in [os.path.basename(a) for a in argv if "\n" not in a]):
                found.append((pid, argv))
        return found


def kill_netns_processes(netns):
    def gone():
        out = subprocess.run(["ip", "netns", "pids", netns], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True).stdout
        pids = [int(p) for p in out.split()]
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return not pids

    wait_for(gone, 60, "the processes in %s to end" % netns, 0.1)


def clean(run_dir, files=True):
    """End a rig: its processes, mounts, namespaces and veths, and its files unless files is False
    (the hosts' upper layers, with every log, stay for a post-mortem until the next start)."""
    existing = subprocess.run(["ip", "netns", "list"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True).stdout
    for netns in NETNS.values():
        if netns in existing.split():
            kill_netns_processes(netns)
    # Anything else still running inside the roots (none is expected).
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if os.readlink("/proc/%s/root" % name).startswith(run_dir + "/"):
                    os.kill(int(name), signal.SIGKILL)
            except OSError:
                pass
    for netns in NETNS.values():
        if netns in existing.split():
            subprocess.run(["ip", "netns", "del", netns], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for veth in VETH.values():
        subprocess.run(["ip", "link", "del", veth], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if os.path.isdir(run_dir):
        unmount_all(run_dir)
        if files:
            shutil.rmtree(run_dir)


# --------------------------------------------------------------------------- configs

SUBMIT_SSHD = """\
ListenAddress {addr}
Port 22
HostKey /etc/ssh/ssh_host_ed25519_key
PidFile none
AuthorizedKeysFile .ssh/authorized_keys
PubkeyAuthentication yes
PasswordAuthentication {password}
KbdInteractiveAuthentication no
UsePAM no
StrictModes yes
AllowUsers {user}
PrintMotd no
MaxStartups 100:30:200
LogLevel VERBOSE
"""

CONDOR = """\
# alice's personal HTCondor on the submit host, bound to {addr} only
RELEASE_DIR = /usr
BIN = /usr/bin
SBIN = /usr/sbin
LIB = /usr/lib/condor
LIBEXEC = /usr/libexec/condor
SHARE = /usr/share/condor
LOCAL_DIR = {dir}
LOG = $(LOCAL_DIR)/log
SPOOL = $(LOCAL_DIR)/spool
EXECUTE = $(LOCAL_DIR)/execute
LOCK = $(LOCAL_DIR)/lock
RUN = $(LOCAL_DIR)/run
CRED_STORE_DIR = $(LOCAL_DIR)/cred
LOCAL_CONFIG_FILE = {local}
REQUIRE_LOCAL_CONFIG_FILE = False
CONDOR_HOST = {addr}
COLLECTOR_HOST = {addr}:9618
NETWORK_INTERFACE = {addr}
BIND_ALL_INTERFACES = False
USE_SHARED_PORT = False
CCB_ADDRESS =
DAEMON_LIST = MASTER, COLLECTOR, SCHEDD
CONDOR_ADMIN =
MAIL = /bin/true
use SECURITY : HOST_BASED
ALLOW_READ = *
ALLOW_WRITE = *
ALLOW_ADMINISTRATOR = *
ALLOW_DAEMON = *
ALLOW_NEGOTIATOR = *
SEC_DEFAULT_AUTHENTICATION_METHODS = FS
SEC_CLIENT_AUTHENTICATION_METHODS = FS
MASTER_UPDATE_INTERVAL = 30
SCHEDD_INTERVAL = 5
# Polling must not decide the timings: the transports must.
GRIDMANAGER_JOB_PROBE_INTERVAL = 2
GRIDMANAGER_JOB_PROBE_INTERVAL_BATCH = 2
GRIDMANAGER_RESOURCE_PROBE_INTERVAL = 5
GRIDMANAGER_CHECKPROXY_INTERVAL = 600
GRIDMANAGER_MINIMUM_PROXY_TIME = 10
GRIDMANAGER_MAX_SUBMITTED_JOBS_PER_RESOURCE = 1000
GRIDMANAGER_MAX_PENDING_SUBMITS_PER_RESOURCE = 100
GRIDMANAGER_GAHP_CALL_TIMEOUT = 300
INFN_JOB_POLL_INTERVAL = 2
GRIDMANAGER_DEBUG = D_FULLDEBUG
MAX_GRIDMANAGER_LOG = 100000000
SCHEDD_DEBUG = D_FULLDEBUG
"""

SLURM = """\
ClusterName=rvgahp
SlurmctldHost=cluster(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/builtin
SlurmdParameters=config_overrides
ReturnToService=2
MpiDefault=none
SlurmctldPort=6817
SlurmdPort=6818
NodeName=cluster NodeAddr=127.0.0.1 CPUs=64 RealMemory=4000 State=UNKNOWN
PartitionName=main Nodes=cluster Default=YES MaxTime=INFINITE State=UP
"""

JOB_SCRIPT = """\
#!/bin/sh
# $1: the input file; $2: bytes of output; $3 (optional): a file on the cluster to wait
# for before finishing (a gate the test opens). Runs on the cluster under Slurm.
set -e
echo "running $$" > "${{3:-/dev/null}}.running.$1" 2>/dev/null || true
if [ -n "$3" ]; then while [ ! -e "$3" ]; do sleep 0.1; done; fi
{{
  echo "host $(hostname)"
  echo "slurm_job ${{SLURM_JOB_ID:-none}}"
  echo "input $(sha256sum "$1" | cut -d' ' -f1)"
}} > result.txt
head -c "$2" /dev/urandom > big.out
echo "job $1 done"
"""

ASKPASS = """#!/bin/sh
# Answers ssh's password prompt (setup's one login) and counts the calls.
echo "$*" >> "$HOME/.askpass-calls"
printf '%s\\n' "$RV_PASSWORD"
"""


# --------------------------------------------------------------------------- the rig


def submit_description(socket, arguments, inputs, count, extra=""):
    """The submit file of count grid jobs through socket: job.sh with arguments, the input
    files, and result.txt and big.out back as result.N and big.N."""
    lines = [
        "universe = grid",
        "grid_resource = batch slurm " + socket,
        "executable = job.sh",
        "arguments = " + arguments,
        "transfer_input_files = " + inputs,
        "should_transfer_files = YES",
        "when_to_transfer_output = ON_EXIT",
        "transfer_output_files = result.txt, big.out",
        'transfer_output_remaps = "result.txt = result.$(Process); big.out = big.$(Process)"',
        "output = out.$(Process)",
        "error = err.$(Process)",
        "log = job.log",
        "leave_in_queue = JobStatus == 4",
        extra,
        "queue %d" % count,
        "",
    ]
    return "\n".join(lines)


class Jobs:
    """A submitted cluster of grid jobs: its id, its directory, what each job should produce."""

    def __init__(self, cluster, directory, count, in_sizes, out_size):
        self.cluster = cluster
        self.gate = ""
        self.dir = directory
        self.count = count
        self.in_sizes = in_sizes
        self.out_size = out_size
        self.digests = {}

    def ids(self):
        return ["%d.%d" % (self.cluster, p) for p in range(self.count)]


class Rig:
    def __init__(self, root, pyz, say=print, seed=18, condor_addr="127.0.0.1"):
        self.root = root
        self.condor_addr = condor_addr  # where the submit host's HTCondor listens
        self.setup_help = None  # `rvgahp setup --help`, once asked
        self.pyz = pyz
        self.say = say
        self.rng = random.Random(seed)
        self.run_dir = os.path.join(BASE, "run")
        self.submit = Host(self, SUBMIT)
        self.cluster = Host(self, CLUSTER)
        self.hosts = (self.submit, self.cluster)
        self.password = "pw-%08x" % self.rng.getrandbits(32)
        self.lock = None
        self.patched = []
        self.counter = 0

    # ---- bring-up

    def start(self):
        self.lock = Lock()
        try:
            clean(self.run_dir)
            os.makedirs(self.run_dir)
            for host in self.hosts:
                host.make()
            pair = [VETH[SUBMIT], "netns", NETNS[SUBMIT], "type", "veth", "peer", "name", VETH[CLUSTER], "netns", NETNS[CLUSTER]]
            run(["ip", "link", "add", *pair])
            for host in self.hosts:
                run(["ip", "-n", host.netns, "addr", "add", host.addr + "/24", "dev", VETH[host.name]])
                run(["ip", "-n", host.netns, "link", "set", VETH[host.name], "up"])
            for host in self.hosts:
                host.run(["useradd", "-m", "-u", str(UID), "-s", "/bin/bash", USER])
                host.run(["chpasswd"], input="%s:%s\n" % (USER, self.password))
                for name in ("ssh_host_rsa_key", "ssh_host_ecdsa_key", "ssh_host_ed25519_key"):
                    for suffix in ("", ".pub"):
                        if os.path.exists(host.path("/etc/ssh", name + suffix)):
                            os.remove(host.path("/etc/ssh", name + suffix))
                host.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", "/etc/ssh/ssh_host_ed25519_key"])
                host.mkdir("/run/sshd", 0o755)
            self.start_cluster()
            self.start_submit()
            return self
        except BaseException:
            self.close()
            raise

    def start_submit(self):
        s = self.submit
        s.write("/etc/ssh/sshd_config", SUBMIT_SSHD.format(addr=s.addr, password="no", user=USER))
        s.daemon("sshd", ["/usr/sbin/sshd", "-D", "-e", "-f", "/etc/ssh/sshd_config"])
        for sub in ("", "/log", "/spool", "/execute", "/lock", "/run", "/cred"):
            s.mkdir(CONDOR_DIR + sub, 0o755, owner=True)
        s.write(CONDOR_CONFIG, CONDOR.format(dir=CONDOR_DIR, local=CONDOR_LOCAL, addr=self.condor_addr), owner=True)
        s.write(CONDOR_LOCAL, "# setup's block goes here\n", owner=True)
        s.mkdir(HOME + "/.ssh", 0o700, owner=True)
        hostkey = " ".join(self.cluster.read("/etc/ssh/ssh_host_ed25519_key.pub").split()[:2])
        s.write(HOME + "/.ssh/known_hosts", "%s,%s %s\n" % (ADDRESS[CLUSTER], NAMES[CLUSTER], hostkey), 0o644, owner=True)
        s.mkdir(JOBS_DIR, 0o755, owner=True)
        with open(self.pyz, "rb") as f:
            s.write(PYZ, f.read(), 0o755, owner=True)
        s.write("/usr/local/bin/rvgahp-askpass", ASKPASS, 0o755)
        s.daemon("condor_master", ["/usr/sbin/condor_master", "-f"], user=USER)
        answers = lambda: s.run(["condor_q", "-totals"], user=USER, check=False, timeout=60).returncode == 0  # noqa: E731
        wait_for(answers, 180, "the schedd to answer condor_q")
        self.condor_version = s.run(["condor_version"], user=USER).stdout.splitlines()[0]

    def start_cluster(self):
        c = self.cluster
        # Debian's blahp calls ConfigParser.readfp, gone in Python 3.12: patch it (not rvgahp's code).
        text = c.read(BLAH_PY)
        if "self.readfp(vfile)" in text:
            c.write(BLAH_PY, text.replace("self.readfp(vfile)", "self.read_file(vfile)"))
            self.patched.append("%s: ConfigParser.readfp -> read_file (readfp is gone in Python 3.12)" % BLAH_PY)
        c.mkdir("/run/munge", 0o755)
        run(["chroot", c.root, "chown", "munge:munge", "/run/munge", "/var/lib/munge", "/var/log/munge", "/etc/munge"])
        if not os.path.exists(c.path("/etc/munge/munge.key")):
            c.run(["mungekey", "--create"])
            run(["chroot", c.root, "chown", "munge:munge", "/etc/munge/munge.key"])
        c.daemon("munged", ["/usr/sbin/munged", "-F"], user="munge")
        wait_for(lambda: os.path.exists(c.path("/run/munge/munge.socket.2")), 60, "munged's socket")
        c.write("/etc/slurm/slurm.conf", SLURM)
        c.write("/etc/slurm/cgroup.conf", "CgroupPlugin=disabled\n")  # a container has no cgroup of its own
        for d in ("/var/spool/slurmctld", "/var/spool/slurmd", "/var/log/slurm"):
            c.mkdir(d, 0o755)
        c.daemon("slurmctld", ["/usr/sbin/slurmctld", "-D", "-i"])
        c.daemon("slurmd", ["/usr/sbin/slurmd", "-D", "-N", CLUSTER])

        def idle():
            out = c.run(["sinfo", "-h", "-o", "%T"], check=False, timeout=60).stdout.strip()
            return out in ("idle", "mixed", "allocated") and out

        wait_for(idle, 180, "the Slurm node to come up; slurmctld.log:\n" + c.read("/var/log/slurm/slurmctld.log", "")[-2000:])
        self.slurm_version = c.run(["sinfo", "--version"]).stdout.strip()

    # ---- rvgahp setup

    def setup(self, *args, expect=0, by_name=False):
        """`rvgahp setup` as alice on submit, with no terminal, against a password-taking sshd on
        the cluster that runs only for it; by_name: the hosts by their NAMES, not addresses.
        (result, askpass calls)."""
        where = NAMES if by_name else ADDRESS
        c, s = self.cluster, self.submit
        c.write("/etc/ssh/sshd_config", SUBMIT_SSHD.format(addr=c.addr, password="yes", user=USER))
        proc = c.daemon("sshd", ["/usr/sbin/sshd", "-D", "-e", "-f", "/etc/ssh/sshd_config"])
        try:
            wait_for(lambda: self.connects(s, c.addr, 22), 60, "the cluster's sshd")
            calls = s.path(HOME, ".askpass-calls")
            if os.path.exists(calls):
                os.remove(calls)
            argv = ["python3", PYZ, "setup", "--submit-host", "%s@%s" % (USER, where[SUBMIT]), "--condor-config", CONDOR_LOCAL]
            if self.setup_knows("--batch-system"):  # an older rvgahp (RVGAHP_TIER_REPO) may not
                argv += ["--batch-system", "slurm"]  # Debian's condor package puts condor_submit on the cluster too
            argv += list(args) + ["%s@%s" % (USER, where[CLUSTER])]
            result = s.run(
                argv,
                user=USER,
                check=False,
                timeout=600,
                env={"SSH_ASKPASS": "/usr/local/bin/rvgahp-askpass", "SSH_ASKPASS_REQUIRE": "force", "RV_PASSWORD": self.password},
            )
            asked = len(s.read(HOME + "/.askpass-calls", "").splitlines())
        finally:
            if proc.poll() is None:
                c.stop_daemon("sshd")
        if expect is not None and result.returncode != expect:
            raise AssertionError("setup exited %d:\n%s\n%s" % (result.returncode, result.stdout, result.stderr))
        return result, asked

    def setup_knows(self, option):
        """Whether this rvgahp's `setup --help` lists option."""
        if self.setup_help is None:
            self.setup_help = self.submit.run(["python3", PYZ, "setup", "--help"], user=USER, check=False, timeout=120).stdout
        return option in self.setup_help

    def connects(self, host, addr, port):
        """Whether a TCP connect from host to addr:port succeeds."""
        code = "import socket,sys\ns=socket.socket()\ns.settimeout(10)\nsys.exit(s.connect_ex((sys.argv[1],int(sys.argv[2]))))"
        return host.run(["python3", "-c", code, addr, str(port)], check=False, timeout=60).returncode == 0

    def schedd_port(self):
        text = self.submit.read(CONDOR_DIR + "/spool/.schedd_address")
        return int(re.search(r"<[\d.]+:(\d+)", text).group(1))

    # ---- jobs

    def submit_jobs(self, count, in_size=1024, out_size=1024, gated=False, extra="", socket=SOCKET):
        """count grid jobs through rvgahp's socket, each with an input file of in_size random
        bytes and an output file of out_size bytes; a Jobs. Gated jobs keep running on the
        cluster until open_gate(jobs)."""
        s = self.submit
        self.counter += 1
        name = "batch%03d" % self.counter
        gate = "/tmp/gate.%s" % name if gated else ""
        d = JOBS_DIR + "/" + name
        s.mkdir(d, 0o755, owner=True)
        s.write(d + "/job.sh", JOB_SCRIPT.format(), 0o755, owner=True)
        digests = {}
        for p in range(count):
            data = self.rng.getrandbits(8 * in_size).to_bytes(in_size, "little") if in_size else b""
            s.write("%s/in.%d" % (d, p), data, 0o644, owner=True)
            digests[p] = hashlib.sha256(data).hexdigest()
        s.write(
            d + "/job.sub", submit_description(socket, "in.$(Process) %d %s" % (out_size, gate), "in.$(Process)", count, extra), owner=True
        )
        out = s.run(["condor_submit", "-terse", "job.sub"], user=USER, cwd=d, timeout=120).stdout
        cluster = int(out.strip().split(".")[0])
        jobs = Jobs(cluster, d, count, in_size, out_size)
        jobs.digests = digests
        jobs.gate = gate
        return jobs

    def q(self, jobs, attrs=("JobStatus",)):
        """{proc: [attr values]} for the cluster's jobs still in the queue."""
        out = self.submit.run(["condor_q", str(jobs.cluster), "-af", "ProcId"] + list(attrs), user=USER, timeout=120).stdout
        rows = {}
        for line in out.splitlines():
            parts = line.split(None, len(attrs))
            if parts:
                rows[int(parts[0])] = parts[1:]
        return rows

    def statuses(self, jobs):
        return {p: int(v[0]) for p, v in self.q(jobs).items()}

    def wait_jobs(self, jobs, status, timeout=600, procs=None):
        """Until every job (or those in procs) has JobStatus status; the last statuses seen."""
        procs = range(jobs.count) if procs is None else procs

        def done():
            now = self.statuses(jobs)
            self.last = now
            return all(now.get(p) == status for p in procs) and now

        try:
            return wait_for(done, timeout, "jobs %s to be %s" % (jobs.cluster, STATUS_NAMES[status]), 1)
        except AssertionError as e:
            raise AssertionError("%s; last seen: %s\n%s" % (e, self.last, self.diagnose(jobs))) from None

    def running_on_cluster(self, jobs):
        """The procs whose job script has started under Slurm on the cluster (gated jobs only)."""
        return [p for p in range(jobs.count) if os.path.exists(self.cluster.path("%s.running.in.%d" % (jobs.gate, p)))]

    def wait_running(self, jobs, timeout=600, procs=None):
        """Until the gated jobs' scripts run under Slurm and HTCondor says they are Running."""
        procs = list(range(jobs.count) if procs is None else procs)
        try:
            wait_for(lambda: set(procs) <= set(self.running_on_cluster(jobs)), timeout, "jobs %d to start under Slurm" % jobs.cluster, 0.5)
        except AssertionError as e:
            raise AssertionError("%s\n%s" % (e, self.diagnose(jobs))) from None
        return self.wait_jobs(jobs, RUNNING, timeout, procs)

    def slurm_queue(self, ids=None):
        """Slurm job ids in the queue (of ids, if given)."""
        out = self.cluster.run(["squeue", "-h", "-o", "%i"], timeout=60).stdout.split()
        return [int(i) for i in out if ids is None or int(i) in ids]

    def start_server(self):
        """rvgahp_server -d as alice on the cluster, as cron starts it."""
        self.cluster.run([HOME + "/bin/rvgahp_server", "-d"], user=USER, timeout=120)

    def open_gate(self, jobs):
        self.cluster.write(jobs.gate, "open\n")

    def stop_gridmanagers(self):
        """kill -9 of every GridManager, until none runs. The schedd may already have let an
        idle one exit, so none running is fine; the next job's GridManager starts its GAHPs
        afresh."""
        for pid, _ in self.submit.processes("condor_gridmanager"):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        wait_for(lambda: not self.submit.processes("condor_gridmanager"), 60, "every GridManager to die")

    def wait_gone(self, jobs, timeout=300):
        wait_for(lambda: not self.q(jobs), timeout, "jobs %d to leave the queue" % jobs.cluster, 1)

    def check_outputs(self, jobs, procs=None):
        """Each job's result.txt names the cluster's host, a Slurm job and its input's digest;
        big.N has out_size bytes. The Slurm job ids, by proc."""
        s = self.submit
        slurm_ids = {}
        for p in range(jobs.count) if procs is None else procs:
            result = s.read("%s/result.%d" % (jobs.dir, p))
            fields = dict(line.split(" ", 1) for line in result.splitlines() if " " in line)
            assert fields.get("host") == CLUSTER, "job %d.%d: %r" % (jobs.cluster, p, result)
            assert fields.get("input") == jobs.digests[p], "job %d.%d: input digest %r" % (jobs.cluster, p, result)
            assert fields.get("slurm_job", "none") != "none", "job %d.%d did not run under Slurm: %r" % (jobs.cluster, p, result)
            size = os.path.getsize(s.path("%s/big.%d" % (jobs.dir, p)))
            assert size == jobs.out_size, "job %d.%d: big.out has %d bytes, not %d" % (jobs.cluster, p, size, jobs.out_size)
            slurm_ids[p] = int(fields["slurm_job"])
        return slurm_ids

    # ---- logs and processes

    def transfer_ports(self, jobs, proc):
        """{DOWNLOAD_SANDBOX / UPLOAD_SANDBOX: [ports]}: the TransferSocket port of each of the
        job's sandbox transfers, from the ft-gahp's log on the cluster."""
        found = {}
        job = r"_%d\.%d_" % (jobs.cluster, proc)
        line = r"got stdin: (DOWNLOAD_SANDBOX|UPLOAD_SANDBOX) \d+ \S*%s\S* .*?TransferSocket\\ =\\ \"<([\d.]+):(\d+)" % job
        for m in re.finditer(line, self.ft_gahp_logs()):
            found.setdefault(m.group(1), []).append((m.group(2), int(m.group(3))))
        return found

    def allocated_ports(self):
        """Ports of the GridManager's `Allocated port N for remote forward to ADDR` lines."""
        return [int(p) for p in re.findall(r"\(stderr\) -> Allocated port (\d+) for remote forward to", self.gridmanager_log())]

    def server_tunnel_ports(self):
        """Ports the server opened for ft-gahp sessions (`tunnel port N`)."""
        return [int(p) for p in re.findall(r"condor_ft-gahp runs as pid \d+.*; tunnel port (\d+)", self.server_log())]

    def check_tunnel(self, jobs, procs=None):
        """Both sandboxes of each job went through rvgahp's tunnel: the ft-gahp was told the
        cluster's 127.0.0.1 and a port that the GridManager's Allocated line and the server's
        log both name. {proc: {transfer: ports}}."""
        allocated = set(self.allocated_ports())
        opened = set(self.server_tunnel_ports())
        seen = {}
        for p in range(jobs.count) if procs is None else procs:
            ports = self.transfer_ports(jobs, p)
            job = "job %d.%d" % (jobs.cluster, p)
            assert set(ports) == {"DOWNLOAD_SANDBOX", "UPLOAD_SANDBOX"}, "%s: sandbox transfers in the ft-gahp's log: %s" % (job, ports)
            for kind, where in ports.items():
                for host, port in where:
                    assert host == "127.0.0.1", "%s: %s went to %s, not the tunnel" % (job, kind, host)
                    assert port in allocated, "%s: %s port %d is in no Allocated line (%s)" % (job, kind, port, sorted(allocated))
                    assert port in opened, "%s: %s port %d is no port the server opened (%s)" % (job, kind, port, sorted(opened))
            seen[p] = ports
        return seen

    def gridmanager_log(self):
        return self.submit.read(CONDOR_DIR + "/log/GridmanagerLog." + USER, "")

    def schedd_log(self):
        return self.submit.read(CONDOR_DIR + "/log/SchedLog", "")

    def slurm_submissions(self):
        """Slurm job ids in submission order, from slurmctld's log."""
        log = self.cluster.read("/var/log/slurm/slurmctld.log", "")
        return [int(m) for m in re.findall(r"_slurm_rpc_submit_batch_job: JobId=(\d+)", log)]

    def rvgahp_dir(self, host):
        return HOME + "/.rvgahp"

    def server_log(self):
        return self.cluster.read(HOME + "/.rvgahp/rvgahp_server.%s.log" % CLUSTER, "")

    def proxy_log(self):
        return self.submit.read(SOCKET + ".log", "")

    def ft_gahp_logs(self):
        d = self.cluster.path(HOME, ".rvgahp")
        text = ""
        for name in sorted(os.listdir(d)) if os.path.isdir(d) else ():
            if name.startswith("FTGahpLog"):
                text += self.cluster.read(HOME + "/.rvgahp/" + name, "")
        return text

    def diagnose(self, jobs=None):
        """The tails of the logs that explain a stuck job, for an assertion message."""
        parts = []
        if jobs is not None:
            argv = ["condor_q", str(jobs.cluster), "-af", "ProcId", "JobStatus", "GridJobId", "HoldReason"]
            parts.append("condor_q: " + self.submit.run(argv, user=USER, check=False).stdout)
        for title, text in (
            ("GridmanagerLog", self.gridmanager_log()),
            ("server log", self.server_log()),
            ("proxy log", self.proxy_log()),
            ("ft-gahp log", self.ft_gahp_logs()),
            ("gahp stderr", self.cluster.read(HOME + "/.rvgahp/gahp_stderr.%s.log" % CLUSTER, "")),
        ):
            parts.append("---- %s (tail)\n%s" % (title, "\n".join(text.splitlines()[-25:])))
        return "\n".join(parts)

    def summary(self):
        return "HTCondor: %s; batch system: %s (real, one node, munge); patched: %s" % (
            self.condor_version,
            self.slurm_version,
            "; ".join(self.patched) or "nothing",
        )

    # ---- teardown

    def close(self):
        for host in self.hosts:
            for name in list(host.daemons):
                proc = host.daemons.pop(name)
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        try:
            clean(self.run_dir, files=False)
        finally:
            if self.lock:
                self.lock.release()
                self.lock = None

"""The same grid jobs through three transports on the real HTCondor rig, side by side.

    sudo .venv/bin/python bench/htcondor.py                 # the default matrix
    sudo .venv/bin/python bench/htcondor.py --jobs 20 --sizes 1 --repeats 3 --no-kill
    sudo .venv/bin/python bench/htcondor.py --reachable    # the C rvgahp where it can work

testbed/htcondor.py's rig (Debian 13's condor 23.9 and slurm-wlm in two network
namespaces, the cluster unable to reach any HTCondor port unless --reachable) runs, in
one run:

- rvgahp: configured by `rvgahp setup` as the HTCondor tier does;
  `grid_resource = batch slurm SOCKET`;
- c-rvgahp: HTCondor's own C rvgahp from the same package: /usr/sbin/rvgahp_server -b BASE
  on the cluster dials ssh to the submit host, which runs /usr/sbin/rvgahp_proxy on a
  socket; /usr/sbin/rvgahp_client is the GAHP. It has no file-transfer tunnel, so with the
  cluster unable to reach the GridManager its jobs are held: that is its figure. With
  --reachable the submit host's HTCondor listens on 192.0.2.1 instead of 127.0.0.1, so
  the cluster can reach the GridManager and the C rvgahp's ft-gahp connects straight to it
  (rvgahp and the stock script still carry their transfers over ssh);
- stock: HTCondor's ssh /usr/sbin/remote_gahp, the GridManager's ssh key login to a key-only
  sshd on the cluster, with `ssh -R` for the ft-gahp; its blahpd and ft-gahp under
  ~/bosco/glite on the cluster, where the script looks by default.

REMOTE_GAHP is one setting for every resource, so it is a two-line dispatcher: rvgahp's
socket goes to what `rvgahp setup` wrote, the C rvgahp's socket to /usr/sbin/rvgahp_client,
anything else to /usr/sbin/remote_gahp. The GridManager is killed before every run, so each
run starts its GAHPs afresh and the GAHP start is in every run's time.

Figures: seconds from condor_submit to all Completed; the GAHP start as the GridManager's
log times it (from `GAHP server pid = N` to `GAHP server version:`, D_SUB_SECOND); and the
delay a kill -9 of the link's ssh adds to running jobs (gated jobs: time to all Completed
after the gate opens, with the kill just before it, minus the same without). Medians where
there are repeats, the ratio against rvgahp, the load, the versions and the seed. Nothing
here asserts a timing. Needs root; waits for the rig's lock like the HTCondor tier.
"""

import argparse
import hashlib
import os
import random
import re
import signal
import sys
import tempfile
import time
from datetime import datetime

import benchlib
from benchlib import table

from testbed import htcondor
from testbed.htcondor import COMPLETED, HELD, HOME, JOBS_DIR, RUNNING, SOCKET, USER

MiB = 1 << 20
TRANSPORTS = ("rvgahp", "c-rvgahp", "stock")
TITLES = {"rvgahp": "rvgahp", "c-rvgahp": "HTCondor C rvgahp", "stock": "stock ssh remote_gahp"}
C_BASE = HOME + "/c-rvgahp"
C_SOCKET = HOME + "/.c-rvgahp.sock"
GLITE = HOME + "/bosco/glite"
DISPATCH = HOME + "/bin/bench-remote-gahp"
INPUTS = JOBS_DIR + "/inputs"

JOB = """\
#!/bin/sh
# $1 input, $2 bytes of output, $3 a gate file on the cluster or -, $4 the proc
set -e
if [ "$3" != - ]; then echo "$$" > "$3.running.$4"; while [ ! -e "$3" ]; do sleep 0.1; done; fi
{
  echo "host $(hostname)"
  echo "slurm_job ${SLURM_JOB_ID:-none}"
  echo "input $(sha256sum "$1" | cut -d' ' -f1)"
} > result.txt
head -c "$2" /dev/urandom > big.out
"""

FT_CONFIG = """\
# condor_ft-gahp's config for the bench's two peers (plain definitions: LOG has a built-in default)
LOG = {base}/log
FT_GAHP_LOG = $(LOG)/FTGahpLog
BOSCO_SANDBOX_DIR = {base}/sandbox
LIBEXEC = /usr/libexec/condor
"""


class BenchRig(htcondor.Rig):
    """The tier's rig, with the two peers set up beside rvgahp (testbed/htcondor.py untouched)."""

    def peers(self):
        s, c = self.submit, self.cluster
        local = s.read(htcondor.CONDOR_LOCAL)
        found = re.findall(r"(?im)^\s*REMOTE_GAHP\s*=\s*(\S+)\s*$", local)
        if not found:
            raise RuntimeError("setup wrote no REMOTE_GAHP into %s:\n%s" % (htcondor.CONDOR_LOCAL, local))
        self.rvgahp_client = found[-1]
        s.mkdir(HOME + "/bin", 0o755, owner=True)
        s.write(
            DISPATCH,
            '#!/bin/sh\ncase "$1" in\n  %s) exec %s "$@" ;;\n  %s) exec /usr/sbin/rvgahp_client "$@" ;;\nesac\n'
            'exec /usr/sbin/remote_gahp "$@"\n' % (SOCKET, self.rvgahp_client, C_SOCKET),
            0o755,
            owner=True,
        )
        s.write(
            htcondor.CONDOR_LOCAL,
            local + "\n# bench/htcondor.py: one REMOTE_GAHP for three transports; sub-second log times\n"
            "REMOTE_GAHP = %s\nGRIDMANAGER_DEBUG = D_FULLDEBUG D_SUB_SECOND\n" % DISPATCH,
            owner=True,
        )
        s.run(["condor_reconfig"], user=USER, timeout=120)
        # Keys: alice@submit -> cluster (stock), alice@cluster -> submit (the C rvgahp's link).
        s.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", HOME + "/.ssh/bench_stock"], user=USER)
        s.write(HOME + "/.ssh/config", "Host %s\n  IdentityFile ~/.ssh/bench_stock\n" % c.addr, 0o600, owner=True)
        c.mkdir(HOME + "/.ssh", 0o700, owner=True)
        c.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", HOME + "/.ssh/bench_c_rvgahp"], user=USER)
        keys = c.read(HOME + "/.ssh/authorized_keys", "")
        c.write(HOME + "/.ssh/authorized_keys", keys + s.read(HOME + "/.ssh/bench_stock.pub"), 0o600, owner=True)
        keys = s.read(HOME + "/.ssh/authorized_keys", "")
        line = 'command="/usr/sbin/rvgahp_proxy %s",no-pty %s' % (C_SOCKET, c.read(HOME + "/.ssh/bench_c_rvgahp.pub"))
        s.write(HOME + "/.ssh/authorized_keys", keys + line, 0o600, owner=True)
        hostkey = " ".join(s.read("/etc/ssh/ssh_host_ed25519_key.pub").split()[:2])
        c.write(HOME + "/.ssh/known_hosts_bench", "%s %s\n" % (s.addr, hostkey), 0o644, owner=True)
        # The stock script's layout, ~/bosco/glite/{bin,etc}, and a key-only sshd on the cluster.
        c.mkdir(HOME + "/bosco", 0o755, owner=True)  # rvgahp's ft-gahp sandbox is ~/bosco/sandbox: alice's
        for base in (GLITE, C_BASE):
            for sub in ("", "/bin", "/etc", "/log", "/sandbox"):
                c.mkdir(base + sub, 0o755, owner=True)
            c.write(base + "/etc/condor_config.ft-gahp", FT_CONFIG.format(base=base), 0o644, owner=True)
            # blahpd wants no GLITE/BLAHPD_LOCATION pointing here: Debian's /etc/blahp.config is its config.
            blahpd = '#!/bin/sh\nunset BLAHPD_LOCATION GLITE_LOCATION\nexec /usr/bin/blahpd "$@" 2>>%s/log/blahpd.stderr\n'
            c.write(base + "/bin/blahpd", blahpd % base, 0o755, owner=True)
            # The C server runs it with no argument: -f (the foreground) unless the stock script gave it.
            ft = '#!/bin/sh\ncase " $* " in *" -f "*) ;; *) set -- -f "$@" ;; esac\n'
            ft += 'CONDOR_CONFIG=%s/etc/condor_config.ft-gahp exec /usr/sbin/condor_ft-gahp "$@" 2>>%s/log/ft-gahp.stderr\n'
            c.write(base + "/bin/condor_ft-gahp", ft % (base, base), 0o755, owner=True)
        ssh = "exec ssh -o BatchMode=yes -o ServerAliveInterval=60 -o UserKnownHostsFile=~/.ssh/known_hosts_bench"
        ssh += " -i ~/.ssh/bench_c_rvgahp %s@%s\n"
        c.write(C_BASE + "/bin/rvgahp_ssh", "#!/bin/sh\n" + ssh % (USER, s.addr), 0o755, owner=True)
        c.write("/etc/ssh/sshd_config.bench", htcondor.SUBMIT_SSHD.format(addr=c.addr, password="no", user=USER))
        c.daemon("sshd-bench", ["/usr/sbin/sshd", "-D", "-e", "-f", "/etc/ssh/sshd_config.bench"])
        htcondor.wait_for(lambda: self.connects(s, c.addr, 22), 60, "the cluster's key-only sshd")
        c.daemon("c-rvgahp-server", ["/usr/sbin/rvgahp_server", "-b", C_BASE, "-l", C_BASE + "/log/server.log"], user=USER)
        htcondor.wait_for(lambda: os.path.exists(s.path(C_SOCKET)), 120, "the C rvgahp_proxy's socket on the submit host")
        check = s.run(["ssh", "-o", "BatchMode=yes", "%s@%s" % (USER, c.addr), "echo", "ok"], user=USER, check=False, timeout=60)
        if check.stdout.strip() != "ok":
            raise RuntimeError("alice's key login to the cluster failed: %s" % check.stderr)

    def resource(self, transport):
        if transport == "rvgahp":
            return SOCKET
        if transport == "c-rvgahp":
            return C_SOCKET
        return "%s@%s" % (USER, self.cluster.addr)

    def inputs(self, size, seed):
        """The one shared input file of size bytes (made once, from the seed); its sha256."""
        path = "%s/in.%d" % (INPUTS, size)
        self.submit.mkdir(INPUTS, 0o755, owner=True)
        if not os.path.exists(self.submit.path(path)):
            self.submit.write(path, random.Random("%d-%d" % (seed, size)).randbytes(size), 0o644, owner=True)
        with open(self.submit.path(path), "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()

    def bench_submit(self, transport, count, size, digest, gated=False):
        """count jobs through transport, each with the shared input and an output of size bytes."""
        s = self.submit
        self.counter += 1
        name = "bench%03d" % self.counter
        d = JOBS_DIR + "/" + name
        s.mkdir(d, 0o755, owner=True)
        s.write(d + "/job.sh", JOB, 0o755, owner=True)
        gate = "/tmp/gate." + name if gated else "-"
        arguments = "in.%d %d %s $(Process)" % (size, size, gate)
        sub = htcondor.submit_description(self.resource(transport), arguments, "%s/in.%d" % (INPUTS, size), count)
        s.write(d + "/job.sub", sub, owner=True)
        started = time.monotonic()
        out = s.run(["condor_submit", "-terse", "job.sub"], user=USER, cwd=d, timeout=300).stdout
        jobs = htcondor.Jobs(int(out.strip().split(".")[0]), d, count, size, size)
        jobs.gate = "" if gate == "-" else gate
        jobs.digest = digest
        jobs.started = started
        return jobs

    def until(self, jobs, done, timeout):
        """Poll condor_q until done(statuses); (seconds since jobs.started or None, statuses)."""
        deadline = time.monotonic() + timeout
        now = {}
        while time.monotonic() < deadline:
            now = self.statuses(jobs)
            if len(now) == jobs.count and done(now):
                return time.monotonic() - jobs.started, now
            time.sleep(0.5)
        return None, now

    def check_and_clean(self, jobs):
        """Each output has the right size and its result names the shared input's digest; then
        the outputs are deleted. A list of problems (empty when all is well)."""
        problems = []
        for p in range(jobs.count):
            result = self.submit.read("%s/result.%d" % (jobs.dir, p), "")
            if "input %s" % jobs.digest not in result or "host cluster" not in result:
                problems.append("job %d.%d: result %r" % (jobs.cluster, p, result[:200]))
            big = self.submit.path("%s/big.%d" % (jobs.dir, p))
            size = os.path.getsize(big) if os.path.exists(big) else -1
            if size != jobs.out_size:
                problems.append("job %d.%d: big.out has %d bytes, not %d" % (jobs.cluster, p, size, jobs.out_size))
        for name in os.listdir(self.submit.path(jobs.dir)):
            if name.startswith(("big.", "result.")):
                os.remove(self.submit.path(jobs.dir, name))
        return problems

    def forget(self, jobs, timeout=180):
        """condor_rm of the batch, and a wait (bounded) for it to leave the queue, so that its
        cleanup is not in the next run's time."""
        self.submit.run(["condor_rm", str(jobs.cluster)], user=USER, check=False, timeout=120)
        deadline = time.monotonic() + timeout
        while self.q(jobs) and time.monotonic() < deadline:
            time.sleep(1)

    def link_ssh(self, transport):
        """pids of the ssh processes that carry transport's sessions."""
        if transport == "rvgahp":  # the server's link: on the cluster, not the C rvgahp's
            found = self.cluster.processes("ssh")
            return [pid for pid, argv in found if "bench_c_rvgahp" not in " ".join(argv)]
        if transport == "stock":  # remote_gahp's two: the blahpd's and the ft-gahp's (with -R)
            return [pid for pid, argv in self.submit.processes("ssh") if "%s@%s" % (USER, self.cluster.addr) in argv]
        return [pid for pid, argv in self.cluster.processes("ssh") if "bench_c_rvgahp" in " ".join(argv)]


# --------------------------------------------------------------------------- the GridManager's log

STAMP = re.compile(r"^(\d\d/\d\d/\d\d \d\d:\d\d:\d\d(?:\.\d+)?) ")


def stamp_of(line):
    m = STAMP.match(line)
    if not m:
        return None
    text = m.group(1)
    return datetime.strptime(text, "%m/%d/%y %H:%M:%S.%f" if "." in text else "%m/%d/%y %H:%M:%S").timestamp()


def gahp_starts(log):
    """{"blahpd": [s], "ft-gahp": [s]}: from each `GAHP server pid = N` to the next `GAHP
    server version:` line (the banner read), in the GridManager log text given."""
    found = {"blahpd": [], "ft-gahp": []}
    started = None
    for line in log.splitlines():
        if "GAHP server pid = " in line:
            started = stamp_of(line)
        elif "GAHP server version:" in line and started is not None:
            ended = stamp_of(line)
            kind = "ft-gahp" if "FT_GAHP" in line or "FT-GAHP" in line.upper() else "blahpd"
            if ended is not None:
                found[kind].append(ended - started)
            started = None
    return found


# --------------------------------------------------------------------------- the runs


def one_run(rig, say, transport, count, size, digest, args):
    """One batch through transport: {"time": s or None, "note": text, "gahp": {...}}."""
    rig.stop_gridmanagers()
    offset = len(rig.gridmanager_log())
    load = os.getloadavg()[0]
    jobs = rig.bench_submit(transport, count, size, digest)
    timeout = args.c_timeout if transport == "c-rvgahp" and not args.reachable else args.timeout
    took, seen = rig.until(jobs, lambda st: all(v in (COMPLETED, HELD) for v in st.values()), timeout)
    held = [p for p, v in seen.items() if v == HELD]
    if took is None:
        result = {"time": None, "note": "not settled after %d s: %s" % (timeout, summarize(seen))}
    elif held:
        reason = " ".join(rig.q(jobs, ("HoldReason",)).get(held[0], ["?"])).split(" <")[0]  # no address
        result = {"time": None, "note": "held %d/%d: %s" % (len(held), count, reason[:70]), "held_after": took}
    else:
        result = {"time": took, "note": "; ".join(rig.check_and_clean(jobs)[:3])}
    result["gahp"] = gahp_starts(rig.gridmanager_log()[offset:])
    result["load"] = load
    rig.forget(jobs)
    say(
        "%s %d x %s: %s%s%s (load %.2f)"
        % (
            transport,
            count,
            human(size),
            "%.1f s" % result["time"] if result["time"] is not None else "-",
            " " + result["note"] if result["note"] else "",
            " after %.1f s" % result["held_after"] if "held_after" in result else "",
            load,
        )
    )
    return result


def kill_run(rig, say, transport, count, size, digest, kill, args):
    """Gated jobs running under Slurm; the seconds from the gate opening to all Completed, with
    a kill -9 of the link's ssh just before the gate opens when kill is true."""
    rig.stop_gridmanagers()
    jobs = rig.bench_submit(transport, count, size, digest, gated=True)
    marker = lambda p: os.path.exists(rig.cluster.path("%s.running.%d" % (jobs.gate, p)))  # noqa: E731
    try:
        htcondor.wait_for(lambda: all(marker(p) for p in range(count)), args.timeout, "the gated jobs to run under Slurm", 0.5)
        took, _ = rig.until(jobs, lambda st: all(v == RUNNING for v in st.values()), args.timeout)
        if took is None:
            raise AssertionError("HTCondor did not see the jobs Running")
    except AssertionError as e:
        rig.forget(jobs)
        say("%s kill=%s: %s" % (transport, kill, e))
        return None, "the jobs did not start: %s" % str(e).splitlines()[0][:80]
    killed = []
    if kill:
        killed = rig.link_ssh(transport)
        for pid in killed:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    jobs.started = time.monotonic()
    rig.open_gate(jobs)
    took, seen = rig.until(jobs, lambda st: all(v == COMPLETED for v in st.values()), args.timeout)
    note = "killed %d ssh" % len(killed) if kill else ""
    if took is None:
        note = "not all Completed after %d s: %s" % (args.timeout, summarize(seen))
    else:
        problems = rig.check_and_clean(jobs)
        if problems:
            note += "; " + "; ".join(problems[:2])
    rig.forget(jobs)
    say(
        "%s %s: %s %s" % (transport, "kill -9 of the link's ssh" if kill else "no kill", "%.1f s" % took if took is not None else "-", note)
    )
    return took, note


def summarize(statuses):
    counts = {}
    for v in statuses.values():
        counts[htcondor.STATUS_NAMES.get(v, str(v))] = counts.get(htcondor.STATUS_NAMES.get(v, str(v)), 0) + 1
    return ", ".join("%d %s" % (n, k) for k, n in sorted(counts.items())) or "none in the queue"


def human(size):
    return "%d MB" % (size // MiB) if size >= MiB else "%d B" % size


def median(values):
    s = benchlib.summary(values)
    return s["median"] if s else None


def cell(value, base, unit="s", fmt="%.1f"):
    if value is None:
        return "-"
    text = (fmt % value) + " " + unit
    if base:
        text += " (x%.2f)" % (value / base)
    return text


def kill_row(args, transports, kills):
    """The link-kill figure: per transport, the median over its pairs of (with kill - without),
    the medians of each, and n."""
    delays = {}
    for t, pairs in kills.items():
        delays[t] = [hit - base for base, hit, _ in pairs if base is not None and hit is not None]
    base_delay = median(delays.get("rvgahp", []))
    row = ["%d running jobs: delay from a kill -9 of the link's ssh (with - without; median of n)" % args.kill_jobs]
    for t in transports:
        pairs = kills.get(t)
        if pairs is None:
            row.append("-")
            continue
        if not pairs:
            row.append("n/a: its jobs are held before they run (no file transfer)")
            continue
        notes = sorted({n for n in (re.sub(r"(^|; )killed \d+ ssh", "", note).strip("; ") for _, _, note in pairs) if n})
        delay = median(delays[t])
        if delay is None:
            row.append("- " + " | ".join(notes))
            continue
        hit = median([h for b, h, _ in pairs if b is not None and h is not None])
        base = median([b for b, h, _ in pairs if b is not None and h is not None])
        text = "%+.1f s (medians %.1f with, %.1f without) n=%d" % (delay, hit, base, len(delays[t]))
        if t != "rvgahp" and base_delay and base_delay > 0:
            text += " (x%.2f)" % (delay / base_delay)
        row.append(text + ("; " + " | ".join(notes) if notes else ""))
    return row


# --------------------------------------------------------------------------- main


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", default="20,200", help="job counts, comma-separated (default 20,200)")
    parser.add_argument("--sizes", default="1,100", help="input and output sizes in MiB, comma-separated (default 1,100)")
    parser.add_argument("--full", action="store_true", help="every count with every size (default: 200 jobs only with the smallest size)")
    parser.add_argument("--transports", default=",".join(TRANSPORTS), help="default: " + ",".join(TRANSPORTS))
    parser.add_argument("--repeats", type=int, default=1, help="runs of each cell, and pairs of kill runs (default 1)")
    parser.add_argument("--kill-jobs", type=int, default=20, help="gated jobs in the link-kill figure (default 20; 0 skips it)")
    parser.add_argument("--no-kill", action="store_true", help="skip the link-kill figure")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds a batch may take (default 1800)")
    parser.add_argument(
        "--c-timeout",
        type=int,
        default=240,
        help="seconds to wait for the C rvgahp's jobs to be held (default 240; with --reachable, --timeout applies)",
    )
    parser.add_argument(
        "--reachable", action="store_true", help="the submit host's HTCondor on 192.0.2.1, in the cluster's reach (default: 127.0.0.1 only)"
    )
    parser.add_argument("--seed", type=int, default=18)
    args = parser.parse_args()

    counts = [int(x) for x in args.jobs.split(",") if x]
    sizes = [int(x) * MiB for x in args.sizes.split(",") if x]
    transports = [t for t in args.transports.split(",") if t]
    bad = set(transports) - set(TRANSPORTS)
    if bad:
        parser.error("unknown transport(s): %s" % ", ".join(sorted(bad)))
    cells = [(n, z) for n in counts for z in sizes if args.full or n == min(counts) or z == min(sizes)]
    skipped = [(n, z) for n in counts for z in sizes if (n, z) not in cells]
    why = htcondor.missing_prerequisite()
    if why:
        raise SystemExit("bench/htcondor.py: " + why)

    say = benchlib.Progress("htcondor")
    say("seed %d; cells %s; transports %s; repeats %d" % (args.seed, cells, transports, args.repeats))
    load_before = benchlib.load_average()
    root = htcondor.build_root(say=say)
    tmp = tempfile.mkdtemp(prefix="rvgahp-bench-htcondor-")
    pyz = htcondor.build_pyz(os.path.join(tmp, "rvgahp.pyz"))
    rig = BenchRig(root, pyz, say=say, seed=args.seed, condor_addr=htcondor.ADDRESS[htcondor.SUBMIT] if args.reachable else "127.0.0.1")

    def interrupted(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupted)
    results = {}
    kills = {}
    try:
        say("waiting for the rig's lock, then starting the hosts")
        rig.start()
        result, _ = rig.setup()
        if "the link is up" not in result.stdout:
            raise SystemExit("rvgahp setup did not bring the link up:\n" + result.stdout)
        rig.peers()
        say("hosts up, rvgahp set up, peers ready: %s" % rig.summary())
        reaches = rig.connects(rig.cluster, rig.submit.addr, rig.schedd_port())
        if reaches != args.reachable:
            verb = "reaches" if reaches else "cannot reach"
            raise SystemExit("bench/htcondor.py: the cluster %s the schedd's port, but --reachable is %s" % (verb, args.reachable))
        digests = {z: rig.inputs(z, args.seed) for z in sizes}
        rng = random.Random(args.seed)
        for n, z in cells:
            for _ in range(args.repeats):
                order = list(transports)
                rng.shuffle(order)  # no transport always runs first (or after another)
                for t in order:
                    results.setdefault((n, z, t), []).append(one_run(rig, say, t, n, z, digests[z], args))
        if not args.no_kill and args.kill_jobs:
            z = min(sizes)
            for t in transports:
                if t == "c-rvgahp" and not args.reachable:
                    kills[t] = []
                    continue
                for _ in range(args.repeats):  # a pair at a time, so load drifts hit both alike
                    base, note1 = kill_run(rig, say, t, args.kill_jobs, z, digests[z], False, args)
                    hit, note2 = kill_run(rig, say, t, args.kill_jobs, z, digests[z], True, args)
                    kills.setdefault(t, []).append((base, hit, "; ".join(x for x in (note1, note2) if x)))
        report(rig, args, cells, skipped, transports, results, kills, load_before)
    except KeyboardInterrupt:
        say("interrupted: closing the rig")
        if results:
            report(rig, args, cells, skipped, transports, results, kills, load_before)
        return 130
    finally:
        rig.close()
        for name in os.listdir(tmp):
            os.remove(os.path.join(tmp, name))
        os.rmdir(tmp)
    return 0


def report(rig, args, cells, skipped, transports, results, kills, load_before):
    out = []
    w = out.append
    w("")
    w("bench/htcondor.py: the same grid jobs (grid_resource = batch slurm ...) through three transports")
    w("  HTCondor: %s" % rig.summary())
    w("  rvgahp: %s" % benchlib.rvgahp_source())
    w("  OpenSSH in the root: %s" % rig.submit.run(["ssh", "-V"], check=False).stderr.strip())
    w("  seed %d; repeats %d; load before %s, after %s" % (args.seed, args.repeats, load_before, benchlib.load_average()))
    w("  GridManager probe intervals lowered by the rig (GRIDMANAGER_JOB_PROBE_INTERVAL = 2, _BATCH = 2,")
    w("  GRIDMANAGER_RESOURCE_PROBE_INTERVAL = 5, INFN_JOB_POLL_INTERVAL = 2), kept; every run starts a new GridManager")
    if args.reachable:
        w("  --reachable: the submit host's HTCondor listens on %s, which the cluster can reach" % rig.condor_addr)
    else:
        w("  the cluster reaches no HTCondor port: only ssh joins the hosts")
    w("")
    headers = ["figure"] + [TITLES[t] for t in transports]
    rows = []
    for n, z in cells:
        base = median([r["time"] for r in results.get((n, z, "rvgahp"), [])])
        row = ["%d jobs x %s in+out: submit to all Completed" % (n, human(z))]
        for t in transports:
            runs = results.get((n, z, t), [])
            value = median([r["time"] for r in runs])
            text = cell(value, base if t != "rvgahp" else None)
            notes = sorted({r["note"] for r in runs if r["note"]})
            held_after = median([r["held_after"] for r in runs if "held_after" in r])
            if held_after is not None:
                notes = [n + " (after %.1f s)" % held_after if n.startswith("held") else n for n in notes]
            if notes:
                text = (text + "; " if value is not None else "") + " | ".join(notes)
            row.append(text)
        rows.append(row)
    for kind in ("blahpd", "ft-gahp"):
        every = {t: [x for (_, _, tt), runs in results.items() if tt == t for r in runs for x in r["gahp"][kind]] for t in transports}
        base = median(every.get("rvgahp", []))
        row = ["GAHP start, %s (GridManager log; median of n)" % kind]
        for t in transports:
            value = median(every[t])
            row.append(
                cell(value * 1000 if value is not None else None, base * 1000 if base and t != "rvgahp" else None, "ms", "%.0f")
                + " n=%d" % len(every[t])
            )
        rows.append(row)
    if kills:
        rows.append(kill_row(args, transports, kills))
    w(table(headers, rows))
    w("")
    w("(xN): the ratio against rvgahp's figure. One run per cell unless repeats > 1 (then medians).")
    w("The link kill: rvgahp's server ssh on the cluster; the C rvgahp's (with --reachable), also on the cluster;")
    w("the stock script's two ssh processes on the submit host (blahpd's and the ft-gahp's).")
    if skipped:
        w("not run (use --full): %s" % ", ".join("%d jobs x %s" % (n, human(z)) for n, z in skipped))
    loads = ["%s %d x %s: %.2f" % (t, n, human(z), r["load"]) for (n, z, t), runs in sorted(results.items()) for r in runs]
    w("1-min load at each run's start: " + "; ".join(loads))
    print("\n".join(out), flush=True)


if __name__ == "__main__":
    sys.exit(main())

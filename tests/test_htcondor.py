"""The real thing: HTCondor's GridManager, blahpd, condor_ft-gahp and Slurm, through rvgahp.

testbed/htcondor.py builds (once, cached) a Debian trixie root with Debian's condor and
slurm-wlm, and makes two hosts of it in network namespaces: "submit" (alice's personal
HTCondor, bound to its 127.0.0.1, and an sshd) and "cluster" (Slurm with munge). `rvgahp
setup`, run from the built rvgahp.pyz under the root's python3, sets the cluster up with
one password login, and grid jobs (`grid_resource = batch slurm SOCKET`) then run through
rvgahp: the cluster can reach the submit host only by the link's ssh, so every sandbox
goes through rvgahp's tunnel.

Slow (a minute to build the root the first time, about as long to start the hosts), so
it is one module-scoped rig, and the tests run in file order: the jobs, the faults, the
tunnel turned off, and setup again and --remove last. Skipped where it cannot run (no
root, no Debian mirror), except in CI (CI=true), where that is a failure.

RVGAHP_TIER_REPO=DIR runs the tier on the rvgahp.pyz built from another checkout.
"""

import os
import shutil
import signal
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from testbed import htcondor
from testbed.htcondor import COMPLETED, HELD

IN_CI = os.environ.get("CI") == "true"
STATE = {}


def unavailable(reason):
    if IN_CI:
        pytest.fail("the HTCondor tier must run in CI: " + reason)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def rig(request, tmp_path_factory):
    capture = request.config.pluginmanager.getplugin("capturemanager")

    def say(line):
        """To the test output as it runs, not captured: what ran, how long it took."""
        with capture.global_and_fixture_disabled():
            print(line, flush=True)

    why = htcondor.missing_prerequisite()
    if why:
        unavailable(why)
    started = time.monotonic()
    try:
        root = htcondor.build_root(say=say)
    except htcondor.Unavailable as e:
        unavailable(str(e))
    # RVGAHP_TIER_REPO: another checkout's rvgahp (say an old commit's worktree), to see
    # whether the tier catches what it got wrong.
    other = os.environ.get("RVGAHP_TIER_REPO")
    python = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".venv", "bin", "python")
    pyz = htcondor.build_pyz(str(tmp_path_factory.mktemp("pyz") / "rvgahp.pyz"), repo=other, python=python)
    if other:
        say("\nhtcondor tier: rvgahp from %s" % other)
    r = htcondor.Rig(root, pyz, say=say).start()
    try:
        say("\nhtcondor tier: %s" % r.summary())
        result, asked = r.setup()
        assert asked == 1, "setup asked for the password %d times:\n%s" % (asked, result.stdout)
        assert "the link is up" in result.stdout, result.stdout
        STATE["setup"] = result.stdout
        say("htcondor tier: hosts up and set up in %.0f s (root at %s)" % (time.monotonic() - started, root))
        yield r
    finally:
        r.close()


def slurm_count(rig):
    return len(rig.slurm_submissions())


def finished(rig, jobs, submitted_before, timeout=600):
    """Every job Completed with its output, through the tunnel, each submitted to Slurm once."""
    rig.wait_jobs(jobs, COMPLETED, timeout)
    slurm_ids = rig.check_outputs(jobs)
    rig.check_tunnel(jobs)
    after = rig.slurm_submissions()[submitted_before:]
    assert len(after) == jobs.count, "%d jobs, %d Slurm submissions: %s" % (jobs.count, len(after), after)
    assert sorted(slurm_ids.values()) == sorted(after), "the jobs ran as Slurm jobs %s, but Slurm took %s" % (slurm_ids, after)
    return slurm_ids


def test_the_cluster_reaches_no_htcondor_port(rig):
    port = rig.schedd_port()
    assert rig.connects(rig.submit, "127.0.0.1", port), "the schedd's port %d is not open on the submit host" % port
    for addr in (rig.submit.addr, "127.0.0.1"):
        for p in (port, 9618):
            assert not rig.connects(rig.cluster, addr, p), "the cluster reached %s:%d" % (addr, p)
    assert rig.connects(rig.cluster, rig.submit.addr, 22), "the cluster cannot reach the submit host's sshd"


def test_one_job_with_input_and_output_files_through_the_tunnel(rig):
    before = slurm_count(rig)
    jobs = rig.submit_jobs(1, in_size=200_000, out_size=300_000)
    finished(rig, jobs, before)


def test_twenty_jobs_at_once(rig):
    before = slurm_count(rig)
    jobs = rig.submit_jobs(20, in_size=100_000, out_size=100_000)
    ids = finished(rig, jobs, before)
    assert len(set(ids.values())) == 20


# --------------------------------------------------------------------------- the GridManager's controls and faults


def link_ups(rig):
    return rig.server_log().count("link up:")


def kill_one(host, name):
    """kill -9 of one process on host whose argv[0..2] is named name; its pid."""
    found = host.processes(name)
    assert found, "no %s is running on %s" % (name, host.name)
    pid = found[0][0]
    os.kill(pid, signal.SIGKILL)
    htcondor.wait_for(lambda: htcondor.cmdline(pid) == [] or not os.path.exists("/proc/%d" % pid), 60, "pid %d to die" % pid)
    return pid


def new_gridmanager(rig, old):
    """Until the schedd has started a GridManager other than pid old."""
    htcondor.wait_for(lambda: [p for p, _ in rig.submit.processes("condor_gridmanager") if p != old], 300, "a new GridManager")


def test_condor_rm_hold_and_release_reach_slurm(rig):
    before = slurm_count(rig)
    jobs = rig.submit_jobs(3, in_size=10_000, out_size=10_000, gated=True)
    rig.wait_running(jobs)
    first = rig.slurm_submissions()[before:]
    assert len(first) == 3, first
    rig.submit.run(["condor_rm", "%d.0" % jobs.cluster], user=htcondor.USER)
    rig.submit.run(["condor_hold", "%d.1" % jobs.cluster], user=htcondor.USER)
    rig.wait_jobs(jobs, HELD, procs=[1])
    htcondor.wait_for(lambda: 0 not in rig.statuses(jobs), 300, "the removed job to leave the queue")
    # Both reached Slurm: their batch jobs are gone from its queue, and job 2's is still there.
    # (Slurm numbers the jobs in the order blahpd submitted them, not in proc order.)
    kept = int(rig.q(jobs, ("GridJobId",))[2][-1].rsplit("/", 1)[1])
    assert kept in first, "job 2 runs as Slurm job %d, not one of %s" % (kept, first)
    try:
        htcondor.wait_for(lambda: rig.slurm_queue(first) == [kept], 300, "Slurm to cancel the removed and the held job")
    except AssertionError as e:
        raise AssertionError("%s; Slurm's queue: %s\n%s" % (e, rig.cluster.run(["squeue", "-h"]).stdout, rig.diagnose(jobs))) from None
    rig.submit.run(["condor_release", "%d.1" % jobs.cluster], user=htcondor.USER)
    rig.open_gate(jobs)
    rig.wait_jobs(jobs, COMPLETED, procs=[1, 2])
    rig.check_outputs(jobs, procs=[1, 2])
    rig.check_tunnel(jobs, procs=[1, 2])
    assert len(rig.slurm_submissions()[before:]) == 4, "the released job goes to Slurm once more, and only once"


FAULTS = (
    "link-ssh",
    "proxy",
    "server",
    "gridmanager",
)


@pytest.mark.parametrize("fault", FAULTS)
def test_jobs_running_through_a_kill_all_complete_and_none_is_submitted_twice(rig, fault):
    before = slurm_count(rig)
    jobs = rig.submit_jobs(4, in_size=50_000, out_size=50_000, gated=True)
    rig.wait_running(jobs)
    ups = link_ups(rig)
    if fault == "link-ssh":
        kill_one(rig.cluster, "ssh")  # the transport rvgahp_server started
    elif fault == "proxy":
        kill_one(rig.submit, "rvgahp_proxy")
    elif fault == "server":
        kill_one(rig.cluster, "rvgahp_server")
        rig.start_server()  # cron would, within ten minutes
    else:
        new_gridmanager(rig, kill_one(rig.submit, "condor_gridmanager"))  # the schedd starts a new one
    if fault != "gridmanager":
        htcondor.wait_for(lambda: link_ups(rig) > ups, 300, "the link to come back; server log:\n" + rig.server_log()[-2000:])
    rig.open_gate(jobs)
    finished(rig, jobs, before)


def test_ft_gahps_that_start_together_with_no_daemon_socket_dir_all_give_banners(rig):
    """Sessions' ft-gahps and their spare start together. When DAEMON_SOCKET_DIR is
    missing, HTCondor's SharedPortEndpoint in each tries to make it, and the one whose
    mkdir loses exits 4 before its banner: a CI run's setup failed so. The server makes
    the directory first."""
    sock_dir = rig.cluster.path(htcondor.HOME, ".rvgahp/daemon_sock")
    ups = link_ups(rig)
    kill_one(rig.cluster, "rvgahp_server")  # and with it its spares, which hold the directory
    shutil.rmtree(sock_dir, ignore_errors=True)
    rig.start_server()
    htcondor.wait_for(lambda: link_ups(rig) > ups, 300, "the link to come back")
    assert not os.path.exists(sock_dir), "something made %s before any GAHP started" % sock_dir
    one = "echo QUIT | %s/bin/rvgahp_client %s condor_ft-gahp 2>&1" % (htcondor.HOME, htcondor.SOCKET)
    out = rig.submit.run(["sh", "-c", "for i in 1 2 3 4; do (%s) & done; wait" % one], user=htcondor.USER, timeout=180).stdout
    assert out.count("$GahpVersion") == 4, out
    assert "made DAEMON_SOCKET_DIR" in rig.server_log()


# --------------------------------------------------------------------------- the tunnel off, setup again, --remove


def test_with_the_tunnel_off_transfers_go_direct_and_fail_where_no_htcondor_port_is_open(rig):
    """With RVGAHP_FT_TUNNEL = False on the cluster, the ft-gahp connects straight to the
    GridManager's own address, which this cluster cannot reach: the transfer fails with
    HTCondor's own message, and no Allocated line comes from the new ft-gahp."""
    config = htcondor.HOME + "/.rvgahp/condor_config.rvgahp"
    saved = rig.cluster.read(config)
    rig.cluster.write(config, saved + "RVGAHP_FT_TUNNEL = False\n", 0o600, owner=True)
    allocated = len(rig.allocated_ports())
    try:
        old = kill_one(rig.cluster, "rvgahp_server")  # its spares were started with the tunnel on
        ups = link_ups(rig)
        rig.start_server()
        htcondor.wait_for(lambda: link_ups(rig) > ups, 300, "the link to come back")
        del old
        rig.stop_gridmanagers()  # the next job's GridManager starts a new ft-gahp session
        jobs = rig.submit_jobs(1, in_size=1000, out_size=1000)
        rig.wait_jobs(jobs, HELD, timeout=600)
        reason = rig.q(jobs, ("HoldReason",))[0][0]
        rig.say("htcondor tier: tunnel off: job held: %s" % reason)
        assert "connect" in reason.lower() or "transfer" in reason.lower(), reason
        assert len(rig.allocated_ports()) == allocated, "an Allocated line with the tunnel off"
        rig.submit.run(["condor_rm", str(jobs.cluster)], user=htcondor.USER)
    finally:
        rig.cluster.write(config, saved, 0o600, owner=True)


def test_setup_run_again_changes_nothing_and_remove_leaves_no_server(rig):
    result, asked = rig.setup()
    assert asked == 1, result.stdout
    rig.say("htcondor tier: setup again: " + result.stdout.strip().splitlines()[-6])
    result, asked = rig.setup("--remove")
    assert asked == 1, result.stdout
    assert not rig.cluster.processes("rvgahp_server"), "a server outlived --remove:\n" + result.stdout
    assert not os.path.exists(rig.cluster.path(htcondor.HOME, "bin/rvgahp.pyz")), "--remove left the cluster's pyz"
    assert not os.path.exists(rig.submit.path(htcondor.HOME, "bin/rvgahp_client")), "--remove left the client"
    assert "REMOTE_GAHP" not in rig.submit.read(htcondor.CONDOR_LOCAL), "--remove left REMOTE_GAHP"

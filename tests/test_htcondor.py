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
"""

import os
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from testbed import htcondor
from testbed.htcondor import COMPLETED

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
    pyz = htcondor.build_pyz(str(tmp_path_factory.mktemp("pyz") / "rvgahp.pyz"))
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

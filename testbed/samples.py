"""The samples in README.md and docs/, made by a real run with the docs' placeholder names.

    sudo .venv/bin/python -m testbed.samples > samples.txt

On the HTCondor tier's two hosts (testbed/htcondor.py), whose /etc/hosts give them the
names the docs use (submit.example.org, login.hpcc.example.edu): `rvgahp setup
alice@login.hpcc.example.edu`, one grid job through the socket, then what an admin looks
at: `rvgahp_client --status`, `rvgahp doctor` on both hosts, and the logs. Everything
printed comes from the run; nothing is edited.
"""

import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from testbed import htcondor
from testbed.htcondor import CLUSTER, COMPLETED, HOME, NAMES, USER

SOCKET = HOME + "/.rvgahp/%s@%s.sock" % (USER, NAMES[CLUSTER])


def section(title, text):
    print("==== %s\n%s" % (title, text.rstrip("\n")))


def main():
    root = htcondor.build_root(say=lambda line: print(line, file=sys.stderr))
    with tempfile.TemporaryDirectory() as tmp:
        pyz = htcondor.build_pyz(os.path.join(tmp, "rvgahp.pyz"))
        rig = htcondor.Rig(root, pyz, say=lambda line: print(line, file=sys.stderr)).start()
        try:
            result, _ = rig.setup(by_name=True)
            section("rvgahp setup %s@%s" % (USER, NAMES[CLUSTER]), result.stdout)
            jobs = rig.submit_jobs(1, in_size=100_000, out_size=100_000, socket=SOCKET)
            rig.wait_jobs(jobs, COMPLETED)
            s, c = rig.submit, rig.cluster
            status = s.run([HOME + "/bin/rvgahp_client", "--status", SOCKET], user=USER, check=False)
            section("rvgahp_client --status %s (exit %d)" % (SOCKET, status.returncode), status.stdout + status.stderr)
            doctor = s.run([HOME + "/bin/rvgahp", "doctor"], user=USER, check=False)
            section("rvgahp doctor, on the submit host (exit %d)" % doctor.returncode, doctor.stdout + doctor.stderr)
            doctor = c.run([HOME + "/bin/rvgahp.pyz", "doctor"], user=USER, check=False)
            section("~/bin/rvgahp.pyz doctor, on the cluster (exit %d)" % doctor.returncode, doctor.stdout + doctor.stderr)
            section("~/.rvgahp/rvgahp_server.%s.log, on the cluster" % CLUSTER, rig.server_log())
            section("%s.log, on the submit host" % SOCKET, s.read(SOCKET + ".log", ""))
        finally:
            rig.close()


if __name__ == "__main__":
    main()

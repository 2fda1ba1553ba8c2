"""The setups the README describes work as written: a restricted key, HTCondor's -b
layout, the example config."""

import os
import re
import subprocess
import sys

import harness

sys.path.insert(0, harness.REPO)

import rvgahp


def restricted_key(rig, tag):
    """A second client key whose authorized_keys line pins it to the proxy command."""
    key = os.path.join(rig.dir, "restricted_key")
    subprocess.check_call(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", key, "-C", tag])
    with open(key + ".pub") as f:
        public = f.read().strip()
    forced = rig.flavor.command_line("proxy", rig.sock).replace('"', '\\"')
    with open(rig.sshd.authorized_keys, "a") as f:
        f.write('restrict,command="%s" %s\n' % (forced, public))
    return key


def ssh_with_key(rig, key, remote):
    argv = rig.sshd.ssh_argv(remote)
    argv[argv.index("-i") + 1] = key
    return argv


def test_a_key_restricted_to_the_proxy_command_brings_the_link_up(make_rig):
    rig = make_rig()
    key = restricted_key(rig, "rvgahp@cluster")
    # The cluster side asks for something else entirely; sshd runs the forced command.
    rig.write_transport("exec %s\n" % " ".join(ssh_with_key(rig, key, "echo this-is-ignored")))
    rig.start_server()
    s = rig.session("blahpd")
    assert s.banner().startswith("$GahpVersion")
    assert s.finish() == (0, "")
    # And the key gives no shell: asking for one runs the proxy, which finds its
    # socket taken and leaves without running anything else.
    result = subprocess.run(ssh_with_key(rig, key, "echo pwned"), stdin=subprocess.DEVNULL, capture_output=True, timeout=30)
    assert b"pwned" not in result.stdout + result.stderr
    assert b"is busy: another live rvgahp_proxy serves it" in result.stderr


def test_htcondor_basedir_layout(make_rig):
    """-b BASEDIR: config in etc/condor_config.ft-gahp, transport and GAHPs in bin/."""
    rig = make_rig()
    base = os.path.join(rig.dir, "bosco")
    os.makedirs(os.path.join(base, "etc"))
    os.makedirs(os.path.join(base, "bin"))
    config = os.path.join(base, "etc", "condor_config.ft-gahp")
    with open(config, "w") as f:
        f.write("RVGAHP_PING_INTERVAL = 2\n")  # no BATCH_GAHP: the layout supplies it
    for name in ("blahpd", "condor_ft-gahp"):
        path = os.path.join(base, "bin", name)
        with open(path, "w") as f:
            f.write('#!/bin/sh\nexec %s "$@"\n' % harness.TESTGAHP)
        os.chmod(path, 0o755)
    os.rename(rig.transport, os.path.join(base, "bin", "rvgahp_ssh"))
    os.unlink(rig.config)  # prove the default layout is not what is used
    rig.start_server("-b", base)
    s = rig.session("blahpd")
    s.banner()
    assert s.command("ARGV") == "S %s/tests/testgahp.py" % harness.REPO  # exec'd by bin/blahpd
    assert s.command("ENV CONDOR_CONFIG") == "S " + config
    assert s.finish() == (0, "")
    s = rig.session("condor_ft-gahp")
    s.banner()
    assert s.command("ARGV") == "S %s/tests/testgahp.py -f" % harness.REPO
    assert s.finish() == (0, harness.no_tunnel_warning("condor_ft-gahp"))
    assert "(%s/bin/blahpd)" % base in rig.log_text()
    assert "(%s/bin/condor_ft-gahp)" % base in rig.log_text()


def test_the_example_config_reads_as_documented():
    path = os.path.join(harness.REPO, "contrib", "condor_config.rvgahp")
    with open(path) as f:
        c = rvgahp.Config(path, f.read(), {"HOME": "/home/alice"})
    assert c.get("BATCH_GAHP") == "/home/alice/bosco/glite/bin/blahpd"
    assert c.get("FT_GAHP") == "/home/alice/bosco/sbin/condor_ft-gahp"
    assert c.get("BLAHPD_LOCATION") == "/home/alice/bosco/glite"
    assert c.get("FT_GAHP_LOG") == "/home/alice/.rvgahp/FTGahpLog"
    assert c.number("RVGAHP_PING_INTERVAL", 15.0) == 15.0


def test_the_demo_runs_all_three_roles_and_shows_the_exchange():
    result = subprocess.run([sys.executable, os.path.join(harness.REPO, "contrib", "demo.py")], capture_output=True, timeout=120)
    out = result.stdout.decode()
    assert result.returncode == 0, out + result.stderr.decode()
    assert "GridManager -> ECHO hello\\ from\\ the\\ demo  GAHP -> S hello\\ from\\ the\\ demo" in out
    assert "all five up and answering" in out
    assert "refused condor_c-gahp: unknown GAHP" in out
    assert "rvgahp_server[" in out and "rvgahp_proxy[" in out
    # The file transfer: the announced port, the bytes there and back, and the logged totals.
    assert re.search(r"Allocated port \d+ for remote forward to 127\.0\.0\.1:\d+", out)
    assert 'which answered b"received: the bytes of a job\'s input file"' in out
    assert "1 tunnel connection, 31 B to the GridManager, 41 B from it" in out

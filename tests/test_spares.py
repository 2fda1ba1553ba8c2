"""Spare GAHPs: once a kind of GAHP has been asked for, the server keeps one started,
so the next session of that kind finds its banner already waiting."""

import os
import signal

import harness


def gahp_pid(rig, gahp="blahpd"):
    s = rig.session(gahp)
    assert s.banner().startswith("$GahpVersion")
    pid = int(s.command("PID")[2:])
    assert s.finish() == (0, harness.no_tunnel_warning(gahp))
    return pid


def one_spare(rig):
    """The one live GAHP left once every session has ended: the spare, once its sh
    wrapper has exec'd testgahp.py (before that, the wrapper's own children, the grep
    and cut it runs, would outlive a kill of the wrapper)."""

    def ready():
        pids = rig.gahp_pids()
        return pids if len(pids) == 1 and any("testgahp.py" in arg for arg in harness.cmdline(pids[0])) else None

    return harness.wait_for(ready, 15, what="one spare, exec'd")[0]


def test_the_next_session_gets_the_gahp_that_is_already_up(make_rig):
    rig = make_rig()
    rig.start_server()
    first = gahp_pid(rig)
    spare = one_spare(rig)
    assert spare != first
    assert harness.parent_of(spare) == rig.server.pid
    assert gahp_pid(rig) == spare
    assert "blahpd runs as pid %d, a spare started" % spare in rig.log_text()
    assert one_spare(rig) != spare  # and another one is ready


def test_each_kind_has_its_own_spare(make_rig):
    rig = make_rig()
    rig.start_server()
    gahp_pid(rig, "condor_ft-gahp")
    spare = one_spare(rig)
    s = rig.session("condor_ft-gahp")
    s.banner()
    assert int(s.command("PID")[2:]) == spare
    assert s.command("ARGV").endswith("testgahp.py -f")
    assert s.finish() == (0, harness.no_tunnel_warning("condor_ft-gahp"))
    s = rig.session("blahpd")  # a blahpd is started for it, not the ft-gahp spare
    s.banner()
    assert s.command("ARGV").endswith("testgahp.py")
    assert s.finish() == (0, "")


def test_a_config_edit_retires_the_spare_so_the_next_gahp_sees_the_new_settings(make_rig):
    rig = make_rig()
    rig.start_server()
    gahp_pid(rig)
    stale = one_spare(rig)
    with open(rig.config, "a") as f:
        f.write("GLITE_LOCATION = /opt/new-glite\n")
    s = rig.session("blahpd")
    s.banner()
    assert int(s.command("PID")[2:]) != stale
    assert s.command("ENV GLITE_LOCATION") == "S /opt/new-glite"
    assert s.finish() == (0, "")
    harness.wait_for(lambda: harness.process_state(stale) is None, 15, what="the stale spare to exit and be reaped")


def test_a_spare_that_dies_idle_is_logged_and_not_replaced_until_needed(make_rig):
    rig = make_rig()
    rig.start_server()
    gahp_pid(rig)
    spare = one_spare(rig)
    os.kill(spare, signal.SIGKILL)
    harness.wait_for(lambda: "spare blahpd pid %d exited while idle (killed by signal 9)" % spare in rig.log_text(), 15, what="the log")
    assert rig.gahp_pids() == []  # no fork loop: nothing restarts it on its own
    assert not rig.zombies()
    assert gahp_pid(rig) != spare  # the next session starts its own, and a spare again
    one_spare(rig)


def test_spares_can_be_turned_off(make_rig):
    rig = make_rig(config_extra="RVGAHP_SPARE_GAHPS = 0\n")
    rig.start_server()
    gahp_pid(rig)
    gahp_pid(rig)
    harness.wait_for(lambda: rig.gahp_pids() == [], 15, what="no GAHP left running")
    assert "a spare started" not in rig.log_text()


def test_the_server_makes_daemon_socket_dir_before_a_gahp_and_its_spare_start_together(make_rig):
    """A session's ft-gahp and its spare start together; HTCondor's ft-gahps that both
    find DAEMON_SOCKET_DIR missing race to make it, and the loser exits 4 (a CI run of
    the HTCondor tier failed setup so). The server makes it first; where it cannot, the
    session still starts, and the log says why once, not at every start."""
    made = "$ENV(HOME)/.rvgahp/daemon_sock"
    rig = make_rig(config_extra="DAEMON_SOCKET_DIR = %s\n" % made)
    rig.start_server()
    path = os.path.join(rig.home, ".rvgahp", "daemon_sock")
    assert not os.path.exists(path)
    gahp_pid(rig, "condor_ft-gahp")
    assert os.path.isdir(path) and os.stat(path).st_mode & 0o777 == 0o700
    assert rig.log_text().count("made DAEMON_SOCKET_DIR %s" % path) == 1

    blocked = os.path.join(rig.home, "a-file")
    with open(blocked, "w"):
        pass
    with open(rig.config, "a") as f:
        f.write("DAEMON_SOCKET_DIR = %s/sock\n" % blocked)
    for _ in range(2):
        gahp_pid(rig, "condor_ft-gahp")
    assert rig.log_text().count("cannot make DAEMON_SOCKET_DIR %s/sock" % blocked) == 1

    # One of HTCondor's own names in it: only the GAHP knows the value, so none is made.
    with open(rig.config, "a") as f:
        f.write("DAEMON_SOCKET_DIR = $(LOCK)/sock\n")
    gahp_pid(rig, "condor_ft-gahp")
    assert "DAEMON_SOCKET_DIR /sock" not in rig.log_text() and not os.path.exists("/sock")

    # A path no directory can have (a NUL in it): said once; the session still starts.
    with open(rig.config, "a") as f:
        f.write("DAEMON_SOCKET_DIR = %s/a\0b\n" % rig.home)
    for _ in range(2):
        gahp_pid(rig, "condor_ft-gahp")
    assert rig.log_text().count("cannot make DAEMON_SOCKET_DIR %s/a\\x00b" % rig.home) == 1

"""Kills `rvgahp setup` at one named point, from outside the product, for the
interruption tests in tests/test_admin.py.

Python imports this module at start-up when this directory is on PYTHONPATH. The test
world puts it there for its setup runs: in the submit user's environment, and through
its sshd's SetEnv for every command setup runs on the cluster. The point comes from
RVGAHP_TEST_KILL_AT (the submit side's setup, started by the test itself), or else from
the file that RVGAHP_TEST_KILL_AT_FILE names (the cluster side, which an ssh login starts).
With neither, or in any process but setup's own, this module does nothing.

    step:NAME    setup is about to begin its step NAME (Setup.step is called with it)
    write:NAME   a file named NAME is about to be renamed into place, which is how setup
                 puts every file it writes

The world's crontab stub reads the same file for `write:crontab`, since the crontab is
written by a program, not renamed into place."""

import os
import signal
import sys


def named_point():
    point = os.environ.get("RVGAHP_TEST_KILL_AT", "")
    if point:
        return point
    try:
        with open(os.environ["RVGAHP_TEST_KILL_AT_FILE"]) as f:
            return f.read().strip()
    except (KeyError, OSError):
        return ""


def die():
    """As an interruption would: no handler, no cleanup."""
    os.kill(os.getpid(), signal.SIGKILL)


def kill_before_rename_onto(name):
    rename = os.rename

    def renaming(src, dst, *args, **kwargs):
        if os.path.basename(os.fspath(dst)) == name:
            die()
        return rename(src, dst, *args, **kwargs)

    os.rename = renaming


def kill_at_step(name):
    def watch(frame, event, arg):
        code = frame.f_code
        in_step = event == "call" and code.co_name == "step" and code.co_filename.endswith("rvgahp_admin.py")
        if in_step and frame.f_locals.get("name") == name:
            die()

    sys.setprofile(watch)


def arm(point):
    kind, _, name = point.partition(":")
    if kind == "write":
        kill_before_rename_onto(name)
    elif kind == "step":
        kill_at_step(name)


# Only setup's own processes (argv[1] is "setup"), not the probe's python or a GAHP that a
# login also starts; Python before 3.8 has no sys.argv yet here, and arms whatever runs.
if getattr(sys, "argv", [None, "setup"])[1:2] == ["setup"]:
    arm(named_point())

"""The admin commands' edges a new user trips on (issue 19, item 12): --version,
print's usage, an unknown name, the .gitignore, and the Python floor each install
path really has: rvgahp.pyz runs on 3.6; `pip install .` needs setuptools>=61, so 3.7."""

import os
import re
import shutil
import socket
import subprocess
import sys

import harness
import pytest

import rvgahp
import rvgahp_admin

ADMIN = os.path.join(harness.REPO, "rvgahp_admin.py")
RVGAHP = os.path.join(harness.REPO, "rvgahp.py")
LAUNCH = os.path.join(harness.REPO, "rvgahp_launch.py")


def run(*argv):
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("command", [["setup"], ["doctor"], ["print"], ["print", "crontab"], ["print", "transport"]])
def test_each_admin_command_takes_version(command):
    # through the launcher's dispatch, as `rvgahp.pyz setup --version` and the pip `rvgahp` run it
    result = run(LAUNCH, *command, "--version")
    assert (result.returncode, result.stdout, result.stderr) == (0, "rvgahp %s %s\n" % (command[0], rvgahp.VERSION), "")
    # and rvgahp_admin.py itself, as rvgahp.pyz's dispatch hands a longer command line over
    result = run(ADMIN, *command, "--version")
    assert (result.returncode, result.stdout) == (0, "rvgahp %s %s\n" % (command[0], rvgahp.VERSION))


def test_the_relay_alone_names_where_the_admin_commands_are():
    # rvgahp.py never imports rvgahp_admin.py: copied and run alone, it says where setup is.
    result = run(RVGAHP, "setup", "alice@login.hpcc.example.edu")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == (
        "rvgahp.py: setup is an admin command, which comes with rvgahp.pyz or a pip install; run rvgahp.pyz setup\n"
    ), result.stderr


def test_print_help_gives_the_full_usage_of_every_file():
    result = run(ADMIN, "print", "--help")
    assert result.returncode == 0 and result.stderr == ""
    for what in rvgahp_admin.PRINTABLE:
        assert re.search(r"^ *(usage: )?rvgahp print %s " % what, result.stdout, re.M), result.stdout
        assert re.search(r"^  %s +\S" % what, result.stdout, re.M), "a line says what %s is:\n%s" % (what, result.stdout)
    bare = run(ADMIN, "print")
    assert bare.returncode == 2 and bare.stderr == result.stdout


def test_an_unknown_name_is_said_to_be_unknown():
    result = run(ADMIN, "print", "bogus")
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "unknown file bogus" in result.stderr and "crontab" in result.stderr, result.stderr
    result = run(ADMIN, "bogus")
    assert result.returncode == 2 and "unknown command bogus" in result.stderr, result.stderr


def test_the_gitignore_covers_what_pip_install_leaves():
    with open(os.path.join(harness.REPO, ".gitignore")) as f:
        assert "*.egg-info/" in f.read().split()


def requires_python():
    with open(os.path.join(harness.REPO, "pyproject.toml")) as f:
        floor = re.search(r'^requires-python = ">=3\.(\d+)"', f.read(), re.M)
    return int(floor.group(1))


def pyenv_python(minor):
    root = os.path.expanduser("~/.pyenv/versions")
    found = sorted(d for d in os.listdir(root) if d.startswith("3.%d." % minor)) if os.path.isdir(root) else []
    return os.path.join(root, found[-1], "bin", "python") if found else None


def pip_install(python):
    """`pip install .` of this tree into a fresh venv of `python`: (ok, output)."""
    src = harness.short_tempdir("pipsrc")
    venv = harness.short_tempdir("venv")
    try:
        for name in ("pyproject.toml", "README.md", "rvgahp.py", "rvgahp_admin.py", "rvgahp_launch.py", "rvgahp_probe.py"):
            shutil.copy(os.path.join(harness.REPO, name), src)
        subprocess.check_call([python, "-m", "venv", venv])
        pip = subprocess.run(
            [os.path.join(venv, "bin", "pip"), "install", "-q", "--disable-pip-version-check", src],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=300,
        )
        out = pip.stdout.decode(errors="replace")
        if pip.returncode == 0:
            version = subprocess.run([os.path.join(venv, "bin", "rvgahp"), "--version"], stdout=subprocess.PIPE, timeout=30)
            return version.stdout.decode() == "rvgahp %s\n" % rvgahp.VERSION, out
        return False, out
    finally:
        shutil.rmtree(src, ignore_errors=True)
        shutil.rmtree(venv, ignore_errors=True)


def test_requires_python_is_the_oldest_python_pip_install_works_on():
    floor = requires_python()
    assert floor == 7, "requires-python says 3.%d; pip install . needs setuptools>=61, which needs 3.7" % floor
    below, at = pyenv_python(floor - 1), pyenv_python(floor)
    if not (below and at):
        pytest.skip("no pyenv interpreters 3.%d and 3.%d here to install with" % (floor - 1, floor))
    ok, out = pip_install(at)
    if not ok and ("Could not find a version" in out or "No matching distribution" in out) and "setuptools" not in out:
        pytest.skip("pip cannot reach a package index: %s" % out.strip().splitlines()[-1])
    assert ok, "pip install . under 3.%d:\n%s" % (floor, out)
    ok, out = pip_install(below)
    assert not ok, "pip install . works under 3.%d too: lower requires-python" % (floor - 1)


def test_the_pyz_floor_is_still_3_6():
    # The relay and the admin's tools run on 3.6 (vermin checks the code; this, the claim).
    python = pyenv_python(6)
    if not python:
        pytest.skip("no Python 3.6 here")
    result = subprocess.run([python, ADMIN, "setup", "--version"], stdout=subprocess.PIPE, text=True, timeout=60)
    assert result.stdout == "rvgahp setup %s\n" % rvgahp.VERSION


def test_setups_probe_runs_on_3_6_as_setup_sends_it():
    # rvgahp_probe.py runs on the cluster before rvgahp is there, under whatever Python the
    # sh finds: the oldest must run it from stdin, and its echo must carry a token back.
    python = pyenv_python(6)
    if not python:
        pytest.skip("no Python 3.6 here")
    import json
    import threading

    want = {"blahpd": None, "ft_gahp": None, "blahpd_places": [], "ft_gahp_places": [], "batch": [["sh", "shell"]], "texts": [".bashrc"]}
    program = rvgahp_admin.probe_program()
    result = subprocess.run([python, "-", "look", json.dumps(want)], input=program, stdout=subprocess.PIPE, text=True, timeout=60)
    found = json.loads(result.stdout)
    assert found["python"] == python and found["version"].startswith("3.6.") and found["batch"] == ["shell"]
    assert found["blahpd"] == {"path": None, "ok": False, "tried": ["PATH"]} or found["blahpd"]["ok"]
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)

    def echo_once():
        conn, _ = listener.accept()
        conn.sendall(conn.recv(100))
        conn.close()

    t = threading.Thread(target=echo_once, daemon=True)
    t.start()
    port = str(listener.getsockname()[1])
    echoed = subprocess.run([python, "-c", program, "echo", port, "token-1234"], stdout=subprocess.PIPE, text=True, timeout=60)
    t.join(30)
    listener.close()
    assert echoed.stdout == "token-1234\n"

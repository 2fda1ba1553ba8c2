"""rvgahp.pyz as users run it: the sh prologue, the unpacked copy, and the build.

Two archives hold the same launcher (rvgahp_launch.py): the one build_zipapp.sh makes
with shiv, and the one `rvgahp setup` packs when it runs from a pip install or the
sources. Each test of a start runs on both: the pip path must start as fast.

The end-to-end files already run every role through the pyz (the pyz and pyz-3.6
flavors). These tests hold what is particular to the archive: it starts Python isolated
on the unpacked copy, it unpacks on the first run, a missing interpreter is one clear
line, and two builds are the same bytes.
"""

import os
import re
import shutil
import subprocess
import sys
import zipfile

import harness
import pytest
from conftest import INTERPRETERS

with open(harness.RVGAHP) as f:
    VERSION = next(line.split('"')[1] for line in f if line.startswith("VERSION = "))


def run(argv, env=None, **kw):
    return subprocess.run(argv, capture_output=True, env=env, timeout=120, **kw)


@pytest.fixture(scope="module")
def pip_pyz():
    """The rvgahp.pyz that setup packs from a pip install: rvgahp_admin.running_payload()."""
    directory = harness.short_tempdir("pippyz")
    path = os.path.join(directory, "rvgahp.pyz")
    code = "import sys; sys.argv = ['rvgahp']; import rvgahp_admin; sys.stdout.buffer.write(rvgahp_admin.running_payload()[0])"
    with open(path, "wb") as f:
        f.write(subprocess.run([sys.executable, "-c", code], cwd=harness.REPO, stdout=subprocess.PIPE, check=True, timeout=120).stdout)
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(params=["shiv", "pip"])
def archive(request, pyz, pip_pyz):
    return pyz if request.param == "shiv" else pip_pyz


@pytest.fixture
def home(archive):
    """A fresh shiv cache and a bin directory (with a space in its name) of symlinks to the pyz."""
    top = harness.short_tempdir("zipapp")
    bindir = os.path.join(top, "my bin")
    os.makedirs(bindir)
    for name in ("rvgahp_client", "rvgahp_server", "rvgahp_proxy"):
        os.symlink(archive, os.path.join(bindir, name))
    env = dict(os.environ, SHIV_ROOT=os.path.join(top, "shiv"))
    env.pop("SHIV_FORCE_EXTRACT", None)
    yield bindir, env
    shutil.rmtree(top, ignore_errors=True)


def logging_python(directory, python):
    """An interpreter wrapper that records the arguments it was given, one per line."""
    path = os.path.join(directory, "logging-python")
    with open(path, "w") as f:
        f.write('#!/bin/sh\nprintf "%%s\\n" "$@" >> "%s.args"\nexec "%s" "$@"\n' % (path, python))
    os.chmod(path, 0o755)
    return path


def unpacked_dirs(env):
    root = env["SHIV_ROOT"]
    found = [os.path.join(root, name, "site-packages") for name in os.listdir(root)] if os.path.isdir(root) else []
    return [path for path in found if os.path.isdir(path)]  # not shiv's lock files


def test_first_run_unpacks_and_later_runs_start_isolated_from_the_unpacked_copy(home):
    bindir, env = home
    client = os.path.join(bindir, "rvgahp_client")
    first = run([client, "--version"], env=env)
    assert first.returncode == 0, first.stderr
    assert first.stdout.decode() == "rvgahp_client %s\n" % VERSION
    [unpacked] = unpacked_dirs(env)
    assert os.path.isfile(os.path.join(unpacked, "rvgahp.py"))

    # Mark the unpacked copy, then watch which interpreter arguments the prologue uses.
    path = os.path.join(unpacked, "rvgahp.py")
    with open(path) as f:
        text = f.read()
    with open(path, "w") as f:
        f.write(text.replace('VERSION = "%s"' % VERSION, 'VERSION = "0.0.0-unpacked"', 1))
    shutil.rmtree(os.path.join(unpacked, "__pycache__"), ignore_errors=True)
    wrapper = logging_python(bindir, sys.executable)
    second = run([client, "--version"], env=dict(env, RVGAHP_PYTHON=wrapper))
    assert second.returncode == 0, second.stderr
    assert second.stdout.decode() == "rvgahp_client 0.0.0-unpacked\n"
    with open(wrapper + ".args") as f:
        args = f.read().split("\n")
    assert args[:3] == ["-I", "-S", "-c"], args
    assert client in args, "argv[0] must be the name the pyz was run by: %r" % args
    # Isolated mode ignores PYTHONDONTWRITEBYTECODE, so the next start loads bytecode.
    tag = subprocess.check_output([sys.executable, "-c", "import sys; print(sys.implementation.cache_tag)"]).decode().strip()
    assert os.path.exists(os.path.join(unpacked, "__pycache__", "rvgahp.%s.pyc" % tag))


def test_a_chain_of_relative_symlinks_still_starts_from_the_unpacked_copy(home, archive):
    """The prologue follows the links to the archive's own name, which names shiv's
    unpacked copy; where it lost the way, every start would go the slow way round."""
    bindir, env = home
    top = os.path.dirname(bindir)
    for directory in ("a/b", "c"):
        os.makedirs(os.path.join(top, directory))
    os.symlink(archive, os.path.join(top, "c", "rvgahp-current.pyz"))
    os.symlink("../../c/rvgahp-current.pyz", os.path.join(top, "a", "b", "middle"))
    client = os.path.join(top, "a", "rvgahp_client")
    os.symlink("b/middle", client)
    assert run([client, "--version"], env=env).returncode == 0  # unpacks
    again = run([client, "--version"], env=dict(env, RVGAHP_PYTHON=verbose_python(bindir, sys.executable)))
    assert again.returncode == 0, again.stderr
    assert again.stdout.decode() == "rvgahp_client %s\n" % VERSION
    assert "rvgahp" in imported_modules(again.stderr), "the prologue did not start from the unpacked copy"


def verbose_python(directory, python):
    """An interpreter wrapper that says what it imports (-v), on an unbuffered stderr (-u):
    before 3.9 a buffered stderr loses its last lines when the client execs its shell."""
    path = os.path.join(directory, "verbose-python")
    with open(path, "w") as f:
        f.write('#!/bin/sh\nexec "%s" -u -v "$@"\n' % python)
    os.chmod(path, 0o755)
    return path


def imported_modules(stderr):
    """The modules a `python -v` run imported, from its `import 'name' # ...` lines."""
    return {m.group(1) for m in re.finditer(r"^import '([\w.]+)'", stderr.decode(errors="replace"), re.M)}


@pytest.mark.parametrize("version", sorted(INTERPRETERS, key=lambda v: int(v.split(".")[1])))
def test_a_session_start_imports_nothing_beyond_the_clients_own_imports(home, make_rig, version):
    """Every module a client imports is start-up time on every session. The client needs
    the launcher and rvgahp's top-level imports, and nothing more: not json, threading or ctypes, which only
    the other roles use (6 to 10 ms together, bench/import_costs.py); not array, which
    from 3.10 on pulled in more of collections; and for an ft-gahp, not the idna codec,
    whose re took 20 ms."""
    bindir, env = home
    verbose = verbose_python(bindir, INTERPRETERS[version])
    env = dict(env, RVGAHP_PYTHON=verbose, CONDOR_INHERIT="4242 <127.0.0.1:9618?addrs=127.0.0.1-9618> 0")
    client = os.path.join(bindir, "rvgahp_client")
    assert run([client, "--version"], env=env).returncode == 0  # unpacks; the next runs start from the copy

    top_level = "import errno, fcntl, heapq, os, pwd, resource, select, signal, socket, stat, struct, sys, time, collections"
    own = run([verbose, "-I", "-S", "-c", top_level], env=env)
    assert own.returncode == 0, own.stderr
    rig = make_rig()
    rig.start_server()
    for gahp in ("blahpd", "condor_ft-gahp"):
        session = harness.GahpSession([client, rig.sock, gahp], env=env)
        assert session.banner().startswith("$GahpVersion")
        assert session.command("COMMANDS").startswith("S ")
        status, stderr = session.finish()
        assert status == 0, stderr
        used = imported_modules(stderr.encode())
        assert "rvgahp" in used, "no `import 'rvgahp'` line: did the prologue start from the unpacked copy?\n" + stderr
        if gahp == "condor_ft-gahp":
            assert "Allocated port" in stderr, stderr
        extra = used - imported_modules(own.stderr) - {"rvgahp", "rvgahp_launch"}
        assert not extra, "a %s session start under %s imported %s beyond rvgahp's top-level imports" % (gahp, version, sorted(extra))


@pytest.mark.skipif("3.6" not in INTERPRETERS, reason="CPython 3.6 is not installed")
def test_the_oldest_python_runs_every_role_by_name_through_the_prologue(home):
    bindir, env = home
    env = dict(env, RVGAHP_PYTHON=INTERPRETERS["3.6"])
    for role in ("client", "server", "proxy"):
        result = run([os.path.join(bindir, "rvgahp_" + role), "--version"], env=env)
        assert result.returncode == 0, result.stderr
        assert result.stdout.decode().strip() == "rvgahp_%s %s" % (role, VERSION)


def test_a_missing_interpreter_is_one_line_naming_it(home):
    bindir, env = home
    client = os.path.join(bindir, "rvgahp_client")
    result = run([client, "--version"], env=dict(env, RVGAHP_PYTHON="/no/such/python3"))
    assert result.returncode == 127
    lines = result.stderr.decode().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(client + ": cannot find /no/such/python3"), lines
    assert "RVGAHP_PYTHON" in lines[0]
    assert result.stdout == b""


def test_python_running_the_archive_still_works(home, archive):
    _, env = home
    result = run([sys.executable, archive, "--version"], env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode() == "rvgahp %s\n" % VERSION
    setup = run([sys.executable, archive, "setup", "--version"], env=env)
    assert (setup.returncode, setup.stdout.decode()) == (0, "rvgahp setup %s\n" % VERSION), setup.stderr


def test_the_pip_paths_pyz_still_runs_where_it_cannot_unpack(pip_pyz):
    # A read-only home: the archive runs from itself, only slower, rather than failing.
    env = dict(os.environ, SHIV_ROOT="/proc/rvgahp-cannot-write-here")
    result = run([pip_pyz, "--version"], env=env)
    assert (result.returncode, result.stdout.decode(), result.stderr) == (0, "rvgahp %s\n" % VERSION, b"")


def test_sessions_starting_at_once_on_a_new_build_all_start(home):
    """The first start of a build unpacks it; ten at once must each find a whole copy."""
    bindir, env = home
    client = os.path.join(bindir, "rvgahp_client")
    procs = [subprocess.Popen([client, "--version"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env) for _ in range(10)]
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert (p.returncode, out.decode()) == (0, "rvgahp_client %s\n" % VERSION), err
    assert len(unpacked_dirs(env)) == 1


def test_the_build_is_reproducible_and_still_a_zip(pyz):
    out = os.path.join(harness.short_tempdir("zipapp"), "again.pyz")
    try:
        build = run([os.path.join(harness.REPO, "build_zipapp.sh"), out], env=dict(os.environ, PYTHON=sys.executable))
        assert build.returncode == 0, build.stderr
        with open(pyz, "rb") as a, open(out, "rb") as b:
            assert a.read() == b.read()
    finally:
        shutil.rmtree(os.path.dirname(out), ignore_errors=True)
    with open(pyz, "rb") as f:
        assert f.readline() == b"#!/bin/sh\n"
    with zipfile.ZipFile(pyz) as z:
        assert "site-packages/rvgahp.py" in z.namelist()
        assert z.testzip() is None

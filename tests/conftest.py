"""Fixtures: one real sshd for the whole run, and the roles under every interpreter.

The end-to-end tests take a `rig` (a server already linked through sshd) for each
flavor: rvgahp.py under every CPython 3.6-3.13 found, and the built rvgahp.pyz run by
its name (its sh prologue starts python3) and by Python 3.6. RVGAHP_TEST_FLAVORS=3.11,pyz narrows the matrix for
quick local runs; the full test command leaves it unset.
"""

import os
import shutil
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness

INTERPRETERS = harness.find_interpreters()
WANTED = ["3.%d" % minor for minor in range(6, 14)]
FLAVOR_NAMES = WANTED + ["pyz", "pyz-3.6"]
ONLY = [name.strip() for name in os.environ.get("RVGAHP_TEST_FLAVORS", "").split(",") if name.strip()]

# What ran and what was skipped, for the summary at the end.
USED = {}
SKIPPED = {}


def flavor_params():
    params = []
    for name in FLAVOR_NAMES:
        reason = None
        needs = "3.6" if name == "pyz-3.6" else (name if name in WANTED else None)
        if needs and needs not in INTERPRETERS:
            reason = "CPython %s is not installed" % needs
        if ONLY and name not in ONLY:
            SKIPPED[name] = "not in RVGAHP_TEST_FLAVORS"
            continue  # a developer's narrowed run; deselected, not reported as skips
        if reason:
            SKIPPED[name] = reason
            params.append(pytest.param(name, id=name, marks=pytest.mark.skip(reason=reason)))
        else:
            params.append(pytest.param(name, id=name))
    return params


FLAVORS = flavor_params()


@pytest.fixture(scope="session")
def sshd():
    if harness.find_sshd() is None:
        pytest.fail("sshd is not installed; the test command (./test.sh) installs openssh-server")
    daemon = harness.Sshd().start()
    yield daemon
    daemon.stop()
    shutil.rmtree(daemon.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def pyz():
    """rvgahp.pyz, built once per run by build_zipapp.sh, as users get it."""
    out_dir = harness.short_tempdir("pyz")
    out = os.path.join(out_dir, "rvgahp.pyz")
    result = subprocess.run(
        [os.path.join(harness.REPO, "build_zipapp.sh"), out],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=dict(os.environ, PYTHON=sys.executable),
    )
    if result.returncode != 0:
        pytest.fail("build_zipapp.sh failed:\n" + result.stdout.decode())
    yield out
    shutil.rmtree(out_dir, ignore_errors=True)


def make_flavor(name, request):
    if name.startswith("pyz"):
        target = request.getfixturevalue("pyz")
        python = INTERPRETERS["3.6"] if name == "pyz-3.6" else None
        flavor = harness.Flavor(name, python, target)
        USED[name] = "rvgahp.pyz via %s" % (python or "its name (the prologue's python3: %s)" % shutil.which("python3"))
    else:
        python = INTERPRETERS[name]
        flavor = harness.Flavor(name, python, harness.RVGAHP)
        version = subprocess.check_output([python, "-c", "import platform; print(platform.python_version())"]).decode().strip()
        USED[name] = "rvgahp.py under CPython %s (%s)" % (version, python)
    return flavor


MADE_FLAVORS = []


@pytest.fixture(scope="session", autouse=True)
def remove_flavor_bins():
    yield
    for flavor in MADE_FLAVORS:
        shutil.rmtree(flavor.bin, ignore_errors=True)


@pytest.fixture(scope="session", params=FLAVORS)
def flavor(request):
    made = make_flavor(request.param, request)
    MADE_FLAVORS.append(made)
    return made


@pytest.fixture(scope="session")
def default_flavor(request):
    """The roles under the interpreter running the tests, for tests about behaviour
    rather than interpreters (they would only repeat themselves across the matrix)."""
    flavor = harness.Flavor("default", sys.executable, harness.RVGAHP)
    MADE_FLAVORS.append(flavor)
    return flavor


@pytest.fixture(scope="module")
def rig(sshd, flavor):
    """A server linked through sshd, shared by one test module's tests for a flavor."""
    r = harness.Rig(sshd, flavor)
    r.start_server()
    yield r
    r.cleanup()


@pytest.fixture
def make_rig(sshd, default_flavor):
    """Fresh rigs for tests that break or reconfigure things; cleaned up after."""
    made = []

    def make(flavor=None, **kw):
        r = harness.Rig(sshd, flavor or default_flavor, **kw)
        made.append(r)
        return r

    yield make
    for r in made:
        r.cleanup()


def pytest_terminal_summary(terminalreporter):
    tr = terminalreporter
    tr.section("rvgahp interpreters")
    for name in FLAVOR_NAMES:
        if name in USED:
            tr.write_line("ran      %-8s %s" % (name, USED[name]))
        else:
            tr.write_line("skipped  %-8s %s" % (name, SKIPPED.get(name, "no test selected it")))

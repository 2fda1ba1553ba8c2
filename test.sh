#!/usr/bin/env bash
# The full test suite, on a fresh machine or your own:
#
#   ./test.sh              everything: lint, the Python 3.6 floor, and all tests
#   ./test.sh -k flood     extra arguments go to pytest
#
# It installs what it needs: openssh-server (the end-to-end tests start their own sshd
# on 127.0.0.1) and, in ./.venv, the development tools named in pyproject.toml.
# The end-to-end tests run the roles under every CPython 3.6-3.13 they find (pyenv
# or PATH) and through the built rvgahp.pyz, and say at the end which ran.
set -euo pipefail
cd "$(dirname "$0")"

say() { printf '\n== %s\n' "$*"; }

as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"
    elif command -v sudo >/dev/null; then sudo "$@"
    else echo "test.sh: need root to run: $*" >&2; return 1
    fi
}

if ! command -v sshd >/dev/null && [ ! -x /usr/sbin/sshd ] || ! command -v ssh >/dev/null; then
    say "installing openssh-server and openssh-client"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssh-server openssh-client >/dev/null
fi

# The HTCondor tier (tests/test_htcondor.py) builds a Debian root with debootstrap and
# runs it in network namespaces (iproute2) entered with nsenter (util-linux).
if [ "$(id -u)" = 0 ] && { ! command -v debootstrap >/dev/null || ! command -v ip >/dev/null || ! command -v nsenter >/dev/null; }; then
    say "installing debootstrap, iproute2 and util-linux for the HTCondor tier"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap iproute2 util-linux >/dev/null
fi

python=${PYTHON:-python3}
venv=.venv
if [ ! -x "$venv/bin/python" ]; then
    say "creating $venv with $($python --version)"
    "$python" -m venv "$venv"
fi
deps=$("$venv/bin/python" - <<'PY'
import re
text = open("pyproject.toml").read()
block = re.search(r"^test = \[(.*?)\]", text, re.M | re.S).group(1)
print(" ".join(re.findall(r'"([^"]+)"', block)))
PY
)
say "installing the development tools: $deps"
"$venv/bin/python" -m pip install -q --disable-pip-version-check $deps

say "ruff"
"$venv/bin/ruff" check .
"$venv/bin/ruff" format --check .

say "vermin: what runs on users' hosts, and the bench's floor relay, must run on Python 3.6"
"$venv/bin/vermin" -t=3.6- --violations --no-tips rvgahp.py rvgahp_admin.py rvgahp_launch.py rvgahp_probe.py bench/floor_relay.py

say "pytest"
"$venv/bin/python" -m pytest "$@"

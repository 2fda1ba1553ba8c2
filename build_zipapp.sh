#!/usr/bin/env bash
# Build rvgahp.pyz: the one file users copy to both hosts and symlink as
# rvgahp_server, rvgahp_proxy and rvgahp_client. It runs on any Python 3.6+, and
# `rvgahp.pyz setup USER@CLUSTER` copies it to the cluster by itself.
#
#   ./build_zipapp.sh [OUTPUT]        (default: ./rvgahp.pyz)
#
# Needs shiv in the Python that runs it (PYTHON, default python3): pip install shiv.
# The build is reproducible, and shiv keys its unpack cache (~/.shiv) on a hash of the
# contents, so a new rvgahp.pyz never runs an old unpacked copy.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$here/rvgahp.pyz}
python=${PYTHON:-python3}

if ! "$python" -c "import shiv" 2>/dev/null; then
    echo "build_zipapp.sh: shiv is not installed for $python; run: $python -m pip install shiv" >&2
    exit 1
fi

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
# The modules: the relay, the admin's tools, the launcher, and setup's probe of the cluster.
cp "$here/rvgahp.py" "$here/rvgahp_admin.py" "$here/rvgahp_launch.py" "$here/rvgahp_probe.py" "$stage/"

# shiv's bootstrap keeps argv[0], so the name a symlink gives still picks the role.
# --compile-pyc writes the bytecode when the archive is first unpacked, so a client
# never recompiles rvgahp.py, even where PYTHONDONTWRITEBYTECODE is set or the unpack
# cache is read-only later.
"$python" -m shiv --site-packages "$stage" --entry-point rvgahp_launch:main \
    --python "/usr/bin/env python3" --reproducible --compressed --compile-pyc --output-file "$out"
# rvgahp_launch.py then becomes the archive's __main__.py and, inside a short sh prologue
# in place of shiv's shebang line, the start of the archive run by its name: both start
# the role straight from the unpacked copy, and leave shiv's bootstrap to unpack it.
"$python" -c 'import sys; sys.path.insert(0, sys.argv[1]); import rvgahp_admin; rvgahp_admin.finish_shiv_pyz(sys.argv[2])' "$here" "$out"
echo "built $out ($(wc -c <"$out") bytes)"

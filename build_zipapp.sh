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
cp "$here/rvgahp.py" "$here/rvgahp_admin.py" "$stage/"   # the roles, and setup/doctor

# shiv's bootstrap keeps argv[0], so the name a symlink gives still picks the role.
# --compile-pyc writes the bytecode when the archive is first unpacked, so a client
# never recompiles rvgahp.py, even where PYTHONDONTWRITEBYTECODE is set or the unpack
# cache is read-only later.
"$python" -m shiv --site-packages "$stage" --entry-point rvgahp:main \
    --python "/usr/bin/env python3" --reproducible --compressed --compile-pyc --output-file "$out"
# Two launchers of our own, both starting the role straight from the unpacked copy:
# zipapp_prologue.sh in place of shiv's shebang line, for the archive run by its name
# (as users and HTCondor run it), and zipapp_main.py as the archive's __main__, for
# `python3 rvgahp.pyz`. Neither runs shiv's bootstrap, which only unpacks.
"$python" - "$out" "$here/zipapp_main.py" "$here/zipapp_prologue.sh" <<'PY'
import io, json, os, sys, zipfile

path, launcher, prologue = sys.argv[1:]
with open(path, "rb") as f:
    data = f.read()
archive = zipfile.ZipFile(io.BytesIO(data))
build_id = json.loads(archive.read("environment.json"))["build_id"]
with open(launcher) as f:
    main = f.read().replace("@BUILD_ID@", build_id).encode()
with open(prologue) as f:
    shebang = f.read().replace("@BUILD_ID@", build_id).encode()
out = io.BytesIO()
with zipfile.ZipFile(out, "w") as rebuilt:
    for info in archive.infolist():  # same names, dates and order: still reproducible
        rebuilt.writestr(info, main if info.filename == "__main__.py" else archive.read(info), info.compress_type)
with open(path + ".tmp", "wb") as f:
    f.write(shebang + out.getvalue())
os.chmod(path + ".tmp", 0o755)
os.replace(path + ".tmp", path)
PY
echo "built $out ($(wc -c <"$out") bytes)"

#!/bin/sh
# rvgahp.pyz is a zip archive of Python behind this short sh prologue (build_zipapp.sh
# puts it there). Run by its name or a symlink's, it starts Python isolated (-I -S: no
# site, no PYTHON* variables, no user site-packages) straight on the copy that shiv
# unpacked into ~/.shiv, so a session start pays for neither site nor the zip's import
# machinery: together 40% of a client's start on 3.6. The first run of a new build, and
# `python3 rvgahp.pyz`, go through the archive's __main__ instead, which unpacks.
# RVGAHP_PYTHON names the interpreter; the default is python3 on PATH.
py=${RVGAHP_PYTHON:-python3}
if ! command -v "$py" >/dev/null 2>&1; then
    echo "$0: cannot find $py on PATH ($PATH): install Python 3.6 or newer, or set RVGAHP_PYTHON" >&2
    exit 127
fi
exec "$py" -I -S -c '
import os, sys
sys.argv.pop(0)  # now the name we were run by, which picks the role
root = os.environ.get("SHIV_ROOT") or os.path.expanduser("~/.shiv")
unpacked = os.path.join(root, os.path.basename(os.path.realpath(sys.argv[0])) + "_@BUILD_ID@", "site-packages")
if os.path.isfile(os.path.join(unpacked, "rvgahp.py")) and not os.environ.get("SHIV_FORCE_EXTRACT"):
    sys.path.insert(0, unpacked)
    import rvgahp
    sys.exit(rvgahp.main())
os.execv(sys.executable, [sys.executable] + sys.argv)
' "$0" "$@"

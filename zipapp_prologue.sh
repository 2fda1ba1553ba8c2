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
import posix, sys
# posix: what this needs of os, before rvgahp (which imports os) is found.
sys.argv.pop(0)  # now the name we were run by, which picks the role
def env(name):
    value = posix.environ.get(name.encode())
    return None if value is None else value.decode(sys.getfilesystemencoding(), "surrogateescape")
def is_file(path):
    try:
        return posix.stat(path).st_mode & 0o170000 == 0o100000
    except (OSError, ValueError):
        return False
archive = sys.argv[0]  # shiv names its unpacked copy after the archive: follow the symlinks to it
for _ in range(40):
    try:
        link = posix.readlink(archive)
    except OSError:
        break
    head, slash, _ = archive.rpartition("/")
    archive = link if link.startswith("/") else head + slash + link
home = env("HOME")  # as os.path.expanduser finds it, which is where shiv unpacked
if home is None:
    home = __import__("pwd").getpwuid(posix.getuid()).pw_dir
root = env("SHIV_ROOT") or home.rstrip("/") + "/.shiv"
unpacked = root + "/" + archive.rpartition("/")[2] + "_@BUILD_ID@/site-packages"
if is_file(unpacked + "/rvgahp.py") and not env("SHIV_FORCE_EXTRACT"):
    sys.path.insert(0, unpacked)
    import rvgahp
    sys.exit(rvgahp.main())
posix.execv(sys.executable, [sys.executable] + sys.argv)
' "$0" "$@"

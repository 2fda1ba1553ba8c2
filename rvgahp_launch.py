"""rvgahp's one launcher: every way in to rvgahp passes through this file.

- `rvgahp.pyz` run by its name, or by a symlink's (rvgahp_client, ...), as users and
  HTCondor run it: the archive starts with a few lines of sh (SH_PROLOGUE below). They
  find the copy of the modules unpacked from this build under ~/.shiv, and run
  run_unpacked() from it with `python3 -I -S`. The first run of a build has no copy yet,
  and goes the next way instead.
- `python3 rvgahp.pyz ...`: this file is the archive's __main__.py; start() finds the
  unpacked copy, unpacking it first if need be.
- `pip install .`: the `rvgahp` command calls main() here.

Each ends in dispatch(): a role (server, proxy, client) to rvgahp.main, an admin command
(setup, doctor, print) to rvgahp_admin.main. So rvgahp.py, the relay, never imports the
admin's tools, and stays one module that runs alone.

Why the prologue: the client starts once per GAHP session, and `python3 rvgahp.pyz`
pays for site and for zipimport before any of rvgahp runs. `-I -S` on the unpacked copy
skips both; bench/import_costs.py prints what that saves.

Standard library only, Python 3.6+, like rvgahp itself. build_zipapp.sh fills in
BUILD_ID, and so does `rvgahp setup` when it packs the modules of a pip install.
"""

import os
import sys

BUILD_ID = "@BUILD_ID@"
ADMIN_COMMANDS = ("setup", "doctor", "print")
MODULES = ("rvgahp.py", "rvgahp_admin.py", "rvgahp_launch.py", "rvgahp_probe.py")

# The first bytes of rvgahp.pyz, with {build_id} filled in. The copy's place is the one
# unpacked_dir() computes: realpath, not the symlink, names it. `exec` keeps the name the
# archive was run by, which picks the role.
SH_PROLOGUE = """#!/bin/sh
# rvgahp.pyz: a zip archive behind this sh prologue, which starts the role fast
# (see rvgahp_launch.py in the archive). RVGAHP_PYTHON names the interpreter.
py=${{RVGAHP_PYTHON:-python3}}
if ! command -v "$py" >/dev/null 2>&1; then
    echo "$0: cannot find $py on PATH ($PATH): install Python 3.6 or newer, or set RVGAHP_PYTHON" >&2
    exit 127
fi
self=$(readlink -f -- "$0" 2>/dev/null) || self=$0
copy=${{SHIV_ROOT:-$HOME/.shiv}}/${{self##*/}}_{build_id}/site-packages
if [ -f "$copy/rvgahp_launch.py" ] && [ -z "$SHIV_FORCE_EXTRACT" ]; then
    exec "$py" -I -S -c "import sys; sys.path.insert(0, sys.argv.pop(1)); import rvgahp_launch; rvgahp_launch.run_unpacked()" \\
        "$copy" "$0" "$@"
fi
exec "$py" "$0" "$@"
"""


# --------------------------------------------------------------------------- dispatch


def dispatch(argv):
    """Run what argv asks for, with the modules importable; the exit status."""
    import rvgahp

    args = argv[1:]
    if rvgahp.role_of(argv[0]) is None and args and args[0] in ADMIN_COMMANDS:
        import rvgahp_admin

        return rvgahp_admin.main(args)
    return rvgahp.main(argv)


def main():
    """The pip install's console scripts, and shiv's entry point after it unpacks."""
    sys.exit(dispatch(sys.argv))


# --------------------------------------------------------------------------- the archive's copy


def archive_path(program):
    """The archive file itself: program may be a symlink to it, or a chain of them."""
    return os.path.realpath(program)


def unpacked_dir(archive):
    """Where the archive's modules are unpacked: $SHIV_ROOT or ~/.shiv, then the archive's
    file name and its build id, as shiv's bootstrap names it."""
    root = os.environ.get("SHIV_ROOT") or os.path.join(os.path.expanduser("~"), ".shiv")
    return os.path.join(root, "%s_%s" % (os.path.basename(archive), BUILD_ID), "site-packages")


def compile_once(site_packages):
    """The unpacked copy was compiled by the interpreter that unpacked it. Another one (a
    second python3 on the same home) would compile rvgahp.py on every start wherever
    PYTHONDONTWRITEBYTECODE is set, so write its bytecode once."""
    source = os.path.join(site_packages, "rvgahp.py")
    cached = os.path.join(site_packages, "__pycache__", "rvgahp.%s.pyc" % sys.implementation.cache_tag)
    if not os.path.exists(cached):
        try:
            import py_compile

            py_compile.compile(source, cfile=cached, doraise=True)
        except Exception:
            pass  # a read-only copy still runs, only slower


def unpack(archive, site_packages):
    """Unpack an archive that `rvgahp setup` packed from a pip install (it has no shiv
    bootstrap): into a fresh directory, renamed into place, so that sessions starting at
    once never see half a copy."""
    import py_compile
    import shutil
    import tempfile
    import time
    import zipfile

    final = os.path.dirname(site_packages)
    os.makedirs(os.path.dirname(final), exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".unpacking-", dir=os.path.dirname(final))
    try:
        with zipfile.ZipFile(archive) as z:
            for info in z.infolist():
                if info.filename.startswith("site-packages/") and info.filename.endswith(".py"):
                    # dated as in the archive, so that two unpacks of one build are the same bytes
                    when = time.mktime(info.date_time + (0, 0, -1))
                    os.utime(z.extract(info, staging), (when, when))
        for name in os.listdir(os.path.join(staging, "site-packages")):
            py_compile.compile(os.path.join(staging, "site-packages", name), doraise=True)
        try:
            os.rename(staging, final)
        except OSError:
            if not os.path.isdir(site_packages):
                raise
            # another session unpacked the same build first: use its copy
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def run_unpacked():
    """The prologue's start, in the unpacked copy: argv is (-c, the name run by, args)."""
    sys.argv.pop(0)
    sys.exit(dispatch(sys.argv))


def start():
    """The archive's __main__.py: run from the unpacked copy, unpacking it first if need be."""
    if BUILD_ID == "@BUILD_ID@":  # run from the sources: the modules are beside this file
        sys.exit(dispatch(sys.argv))
    archive = archive_path(sys.argv[0])
    site_packages = unpacked_dir(archive)
    if not os.path.isfile(os.path.join(site_packages, "rvgahp_launch.py")) or os.environ.get("SHIV_FORCE_EXTRACT"):
        sys.path.insert(0, archive)
        try:
            import _bootstrap  # shiv's: rvgahp.pyz built by build_zipapp.sh
        except ImportError:
            unpack(archive, site_packages)
        else:
            _bootstrap.bootstrap()  # unpacks, then calls main() above
            return
    compile_once(site_packages)
    sys.path.insert(0, site_packages)
    sys.exit(dispatch(sys.argv))


# --------------------------------------------------------------------------- building an archive


def build_id_of(archive):
    """The build id of an rvgahp.pyz (from the launcher in its __main__.py); None if it
    is no such archive."""
    import re
    import zipfile

    try:
        with zipfile.ZipFile(archive) as z:
            main = z.read("__main__.py").decode("utf-8", "replace")
    except (OSError, KeyError, zipfile.BadZipFile):
        return None
    found = re.search(r'^BUILD_ID = "([0-9a-f]+)"$', main, re.M)
    return found.group(1) if found else None


def launcher_source(build_id):
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "rvgahp_launch.py")) as f:
        return f.read().replace('BUILD_ID = "@BUILD_ID@"', 'BUILD_ID = "%s"' % build_id, 1)


def build_pyz(members, build_id):
    """The bytes of an rvgahp.pyz: the sh prologue, then a zip of members ((name or
    ZipInfo, bytes), in the order given; a bare name is dated 1980, so that a build is
    reproducible) whose __main__.py is this launcher with build_id filled in."""
    import io
    import zipfile

    source = launcher_source(build_id)
    prologue = SH_PROLOGUE.format(build_id=build_id)
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in list(members) + [("__main__.py", source.encode())]:
            if isinstance(name, zipfile.ZipInfo):
                info = name  # shiv's own entry, dates and all
            else:
                info = zipfile.ZipInfo(name, (1980, 1, 1, 0, 0, 0))
                info.compress_type = zipfile.ZIP_DEFLATED
                info.external_attr = 0o644 << 16
            z.writestr(info, data)
    return prologue.encode() + out.getvalue()


def finish_shiv_pyz(path):
    """build_zipapp.sh's last step: put the prologue and this launcher into the archive
    shiv built, keeping shiv's bootstrap and build id."""
    import json
    import zipfile

    with zipfile.ZipFile(path) as z:
        build_id = json.loads(z.read("environment.json").decode())["build_id"]
        members = [(i, z.read(i)) for i in z.infolist() if i.filename != "__main__.py"]
    data = build_pyz(members, build_id)
    with open(path + ".tmp", "wb") as f:
        f.write(data)
    os.chmod(path + ".tmp", 0o755)
    os.replace(path + ".tmp", path)
    return build_id


if __name__ == "__main__":
    start()

"""rvgahp's one launcher: every way in to rvgahp passes through this file.

- `rvgahp.pyz` run by its name, or by a symlink's (rvgahp_client, ...), as users and
  HTCondor run it: the archive starts with a few lines of sh (rvgahp_admin.SH_PROLOGUE,
  which packs archives). They
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

Standard library only, Python 3.6+, like rvgahp itself. The archive's copy of this file
has BUILD_ID filled in (rvgahp_admin.build_pyz, used by build_zipapp.sh and by setup).
"""

import os
import sys

BUILD_ID = "@BUILD_ID@"

# --------------------------------------------------------------------------- dispatch


def dispatch(argv):
    """Run what argv asks for, with the modules importable; the exit status."""
    import rvgahp

    args = argv[1:]
    if rvgahp.role_of(argv[0]) is None and args and args[0] in rvgahp.ADMIN_COMMANDS:
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
            try:
                unpack(archive, site_packages)
            except OSError:
                # Nowhere to unpack to (a read-only home): run from the archive, only slower.
                sys.path.insert(0, os.path.join(archive, "site-packages"))
                sys.exit(dispatch(sys.argv))
        else:
            _bootstrap.bootstrap()  # unpacks, then calls main() above
            return
    compile_once(site_packages)
    sys.path.insert(0, site_packages)
    sys.exit(dispatch(sys.argv))


if __name__ == "__main__":
    start()

"""rvgahp.pyz's __main__: start the role at once from the copy shiv unpacked.

build_zipapp.sh puts this file in the archive in place of shiv's own __main__, with
BUILD_ID filled in. It runs when Python is given the archive (`python3 rvgahp.pyz`),
and on the first run of a new build, which the sh prologue (zipapp_prologue.sh) hands
here. shiv's bootstrap imports a dozen modules on every start just to find the
directory it unpacked the archive to, and rvgahp_client starts for every session. So
when that directory is there, import rvgahp from it directly; when it is not, hand
over to shiv's bootstrap, which unpacks it. Standard library only, Python 3.6+, like
rvgahp itself.
"""

import os
import sys

BUILD_ID = "@BUILD_ID@"


def unpacked_site_packages():
    # Where shiv unpacks: $SHIV_ROOT or ~/.shiv, then <archive file name>_<build id>.
    root = os.environ.get("SHIV_ROOT") or os.path.expanduser("~/.shiv")
    name = os.path.basename(os.path.realpath(sys.argv[0]))
    return os.path.join(root, "%s_%s" % (name, BUILD_ID), "site-packages")


def compile_once(site_packages):
    """shiv compiled rvgahp for the interpreter that unpacked it; another (a second
    python3 on the same home) would compile 150 kB of source on every start where
    PYTHONDONTWRITEBYTECODE is set. Write this interpreter's bytecode once."""
    source = os.path.join(site_packages, "rvgahp.py")
    cached = os.path.join(site_packages, "__pycache__", "rvgahp.%s.pyc" % sys.implementation.cache_tag)
    if not os.path.exists(cached):
        try:
            import py_compile

            py_compile.compile(source, cfile=cached, doraise=True)
        except Exception:
            pass  # a read-only cache: it still runs, only slower


def main():
    site_packages = unpacked_site_packages()
    if os.path.isdir(site_packages) and not os.environ.get("SHIV_FORCE_EXTRACT"):
        compile_once(site_packages)
        sys.path.insert(0, site_packages)
        import rvgahp

        sys.exit(rvgahp.main())
    import _bootstrap

    _bootstrap.bootstrap()


main()

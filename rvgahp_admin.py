"""rvgahp's admin commands: set a cluster up in one step, check either host, print the files.

    rvgahp setup [-p PORT] [-o SSH_OPTION]... [--submit-host [USER@]HOST[:PORT]]
                 [--socket PATH] [--blahpd PATH] [--ft-gahp PATH] [--condor-config FILE]
                 [--dry-run] [--remove] USER@CLUSTER
    rvgahp doctor [--json] [--socket PATH]
    rvgahp print transport --socket PATH [--proxy PATH] [USER@]SUBMIT[:PORT]
    rvgahp print authorized-key --socket PATH [--proxy PATH] PUBKEY_FILE
    rvgahp print server-config --blahpd PATH --ft-gahp PATH
    rvgahp print crontab [--python PATH]

`setup` runs on the submit host, as the user whose GridManager will use the cluster. It
logs in to the cluster once (ssh ControlMaster on a private ControlPath), and every
remote step goes through that one connection. On the cluster it runs this same program
(`setup --cluster-side`, fed a plan on stdin), so both hosts' files are edited by the same code:

  - each file setup shares with others (authorized_keys, the crontab, a condor config)
    gets a marked block, replaced on the next run and removed by --remove, with the
    lines around it left as they were and the file's mode kept;
  - every write goes to a temporary file in the same directory, then a rename;
  - the paths it creates (directories, the .pyz, links, the key) are listed in
    ~/.rvgahp/setup-created before they are made, so --remove deletes exactly those.

Standard library only; Python 3.6+.
"""

import argparse
import fcntl
import getpass
import hashlib
import io
import json
import os
import re
import select
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import zipfile

import rvgahp
from rvgahp import GAHPS, VERSION, Config, Layout, UserError, check_socket_path, host_tag, socket_is_live

COMMANDS = rvgahp.ADMIN_COMMANDS  # setup, doctor, print
PRINTABLE = ("transport", "authorized-key", "server-config", "crontab")  # rvgahp print WHAT

CLUSTER_IDENT = "rvgahp_server"  # the cluster account has one transport, so one block of each kind
KEY_NAME = "id_ed25519"  # in ~/.rvgahp on the cluster
MANIFEST = "setup-created"  # in ~/.rvgahp: "IDENT<TAB>PATH" for each path setup created
TEMP_SUFFIX = ".rvgahp-new"
LINK_WAIT = 30.0  # how long setup waits for the link after starting the server
STOP_WAIT = 30.0
PROVE_WAIT = 90.0  # for each GAHP session setup runs through the new link, tunnel included

# Where a cluster usually has its GAHPs, after PATH. BOSCO's layout first.
BLAHPD_PLACES = ("~/bosco/glite/bin/blahpd", "~/bosco/bin/blahpd", "/usr/libexec/blahp/blahpd", "/usr/bin/blahpd")
FT_GAHP_PLACES = (
    "~/bosco/sbin/condor_ft-gahp",
    "~/bosco/libexec/condor_ft-gahp",
    "~/bosco/bin/condor_ft-gahp",
    "/usr/sbin/condor_ft-gahp",
    "/usr/libexec/condor/condor_ft-gahp",
)
BATCH_SYSTEMS = (("sbatch", "slurm"), ("qsub", "pbs"), ("bsub", "lsf"), ("condor_submit", "condor"))


DAEMON_SOCK = "daemon_sock"  # in ~/.rvgahp: the ft-gahps' named sockets (DAEMON_SOCKET_DIR)


class StepFailed(UserError):
    """A setup step that cannot go on; its text names what was found and the fix."""


def home_path(path, home=None):
    """~/x in the user's own words, for messages."""
    home = home or os.path.expanduser("~")
    if path == home:
        return "~"
    if path.startswith(home + "/"):
        return "~/" + path[len(home) + 1 :]
    return path


# --------------------------------------------------------------------------- marked blocks

BEGIN = "# >>> rvgahp setup: "
END = "# <<< rvgahp setup: "
NEW_FILE = "setup made this file"  # so --remove deletes it
NEWLINE_ADDED = "setup ended the line above"  # so --remove takes that newline back


def begin_line(ident, flags=()):
    return BEGIN + ident + " >>>" + ("" if not flags else " " + ", ".join(flags)) + "\n"


def end_line(ident):
    return END + ident + " <<<\n"


def find_block(text, ident):
    """(start, end, flags) of IDENT's block in text (offsets of whole lines), or None."""
    start = 0
    lines = text.splitlines(True)
    offset = 0
    found = None
    for line in lines:
        bare = line.rstrip("\n")
        if found is None and bare.startswith(BEGIN + ident + " >>>"):
            rest = bare[len(BEGIN + ident + " >>>") :].strip()
            found = [f.strip() for f in rest.split(",") if f.strip()]
            start = offset
        elif found is not None and bare == END + ident + " <<<":
            return start, offset + len(line), found
        offset += len(line)
    return None


def block_idents(text):
    """The idents of every rvgahp block in text."""
    found = []
    for line in text.splitlines():
        if line.startswith(BEGIN) and " >>>" in line:
            found.append(line[len(BEGIN) : line.rindex(" >>>")])
    return found


def block_body(text, ident):
    where = find_block(text, ident)
    if where is None:
        return None
    start, end, _ = where
    lines = text[start:end].splitlines(True)
    return "".join(lines[1:-1])


def put_block(text, ident, body):
    """text (None: no file) with IDENT's block holding body, added at the end or replaced."""
    if body and not body.endswith("\n"):
        body += "\n"
    where = None if text is None else find_block(text, ident)
    if where is not None:
        start, end, flags = where
        return text[:start] + begin_line(ident, flags) + body + end_line(ident) + text[end:]
    if text is None or text == "":
        return begin_line(ident, [NEW_FILE] if text is None else []) + body + end_line(ident)
    if not text.endswith("\n"):
        return text + "\n" + begin_line(ident, [NEWLINE_ADDED]) + body + end_line(ident)
    return text + begin_line(ident) + body + end_line(ident)


def drop_block(text, ident):
    """text without IDENT's block, as it was before setup added it; None: delete the file."""
    where = find_block(text, ident)
    if where is None:
        return text
    start, end, flags = where
    rest = text[:start] + text[end:]
    if NEWLINE_ADDED in flags and rest[:start].endswith("\n"):
        rest = rest[: start - 1] + rest[start:]
    if NEW_FILE in flags and rest == "":
        return None
    return rest


# --------------------------------------------------------------------------- the files setup writes


def transport_options(key, known_hosts):
    """The ssh options of the transport, in one list: the link runs unattended for months."""
    return [
        "BatchMode=yes",  # never prompt: nobody is at a terminal
        "ControlMaster=no",  # the user's ~/.ssh/config must not route the link
        "ControlPath=none",  # through a shared master that dies with a login
        "ConnectTimeout=10",
        "ServerAliveInterval=15",
        "ServerAliveCountMax=3",
        "IdentitiesOnly=yes",
        "IdentityFile=" + key,
        "UserKnownHostsFile=" + known_hosts,
        "StrictHostKeyChecking=yes",
    ]


def shell_word(word):
    """A word for sh, in double quotes when plain, which reads better than shlex's quotes."""
    if word and all(c.isalnum() or c in "@%+=:,./_-~ " for c in word):
        return '"%s"' % word if " " in word else word
    return shlex.quote(word)


def proxy_command(proxy, sock):
    return "%s %s" % (shlex.quote(proxy), shlex.quote(sock))


def transport_text(submit, sock, proxy, key="~/.rvgahp/" + KEY_NAME, known_hosts="~/.rvgahp/known_hosts"):
    """The transport script (~/.rvgahp/rvgahp_ssh), without its block markers."""
    user, host, port = submit
    words = ["exec", "ssh"]
    for option in transport_options(key, known_hosts):
        words += ["-o", option]
    if port:
        words += ["-p", str(port)]
    words += ["%s@%s" % (user, host), shell_word(proxy_command(proxy, sock))]
    # Two options to a line, the destination on its own line.
    lines = [" ".join(words[:2])]
    opts = words[2 : 2 + 2 * len(transport_options(key, known_hosts))]
    for i in range(0, len(opts), 4):
        lines.append("    " + " ".join(opts[i : i + 4]))
    lines.append("    " + " ".join(words[2 + len(opts) :]))
    lines[0] = 'exec ssh "$@"'  # the cipher preference, if any, from the lines above
    where = ("-p %d " % port if port else "") + host
    return (
        "# How rvgahp_server reaches the submit host: it runs this file with /bin/sh and speaks\n"
        "# the link over its stdin and stdout; what it prints on stderr goes to the server's log.\n"
        "# BatchMode: nobody answers prompts. ControlMaster/ControlPath: never ride a shared\n"
        "# connection. The key is rvgahp's own, and the submit host's key is in known_hosts.\n"
        "# The submit host's authorized_keys pins the key to this proxy command.\n" + cipher_preference(where) + " \\\n".join(lines) + "\n"
    )


# Where the CPU has AES instructions, AES-GCM is ssh's fastest cipher, and the link's
# throughput rose by 15-30% with it in rvgahp's bench. It is put first among the ciphers
# this ssh and the site's policy already allow, in their order; `ssh -G` only reads the
# config. An ssh that cannot say its list, or allows no AES-GCM, gets no option at all,
# so no host ever fails to connect for it. (OpenSSH's "^cipher" would override a site's
# crypto policy, and OpenSSH 8.0, RHEL 8's, rejects it.)
CIPHER_PREFERENCE = """\
allowed=$(ssh -G %s 2>/dev/null | sed -n 's/^ciphers //p')
set --
case ",$allowed," in
*,aes128-gcm@openssh.com,*)
    others=$(printf %%s "$allowed" | tr , '\\n' | grep -vx 'aes128-gcm@openssh.com' | paste -sd , -)
    set -- -o "Ciphers=aes128-gcm@openssh.com${others:+,$others}" ;;
esac
"""


def cipher_preference(where):
    return CIPHER_PREFERENCE % where


def authorized_key_text(pubkey, sock, proxy, cluster=None):
    """The submit host's authorized_keys line for the cluster's key: no shell, only the
    proxy; with cluster, a comment naming it, so that no other cluster's setup takes it."""
    command = proxy_command(proxy, sock).replace("\\", "\\\\").replace('"', '\\"')
    owner = OWNER_MARK + cluster + "\n" if cluster else ""
    return '%srestrict,command="%s" %s\n' % (owner, command, pubkey.strip())


def server_config_text(blahpd, ft_gahp):
    """The lines setup adds to ~/.rvgahp/condor_config.rvgahp (the last definition wins)."""
    lines = ["# The GAHPs rvgahp_server runs; rvgahp setup found these."]
    base = os.path.dirname(os.path.dirname(blahpd))
    if os.path.basename(os.path.dirname(blahpd)) == "bin" and base not in ("/usr", "/"):
        lines.append("GLITE_LOCATION = %s" % base)
        lines.append("BLAHPD_LOCATION = $(GLITE_LOCATION)")
    # Plain definitions, never $(NAME:default): HTCondor gives LOG and BLAHPD_LOCATION
    # built-in values ($(LOCAL_DIR)/log, $(RELEASE_DIR)), so a default after the colon
    # would never apply, and the ft-gahp would exit 4 on a log it cannot open.
    lines += [
        "BATCH_GAHP = %s" % blahpd,
        "FT_GAHP = %s" % ft_gahp,
        "# What condor_ft-gahp needs; to change one, define it again below this block.",
        "LOG = $ENV(HOME)/.rvgahp",
        "FT_GAHP_LOG = $(LOG)/FTGahpLog",
        "BOSCO_SANDBOX_DIR = $ENV(HOME)/bosco/sandbox",
        "# rvgahp_server makes this before it starts a GAHP.",
        "DAEMON_SOCKET_DIR = $(LOG)/" + DAEMON_SOCK,
    ]
    return "\n".join(lines) + "\n"


def server_command(python=None):
    """How cron starts the server: by the .pyz's name (python3 on PATH), or by a named interpreter."""
    return ((shlex.quote(python) + " ") if python else "") + "~/bin/rvgahp_server -d"


def crontab_text(python=None):
    command = server_command(python)
    return (
        "# rvgahp_server at boot, and every ten minutes in case it died; a start while it\n"
        "# runs only prints 'already running' on stdout, which goes to /dev/null.\n"
        "@reboot %s >/dev/null\n*/10 * * * * %s >/dev/null\n" % (command, command)
    )


def condor_config_text(client):
    return "REMOTE_GAHP = %s\n" % client


def other_remote_gahps(text):
    """[(line number, line)] of each REMOTE_GAHP definition outside setup's blocks."""
    found = []
    inside = False
    for number, line in enumerate((text or "").splitlines(), 1):
        if line.startswith(BEGIN):
            inside = True
        elif line.startswith(END):
            inside = False
        elif not inside and re.match(r"\s*REMOTE_GAHP\s*=", line, re.I):
            found.append((number, line.strip()))
    return found


# --------------------------------------------------------------------------- applying a plan


def read_text(path):
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            return f.read()
    except FileNotFoundError:
        return None


def atomic_write(path, data, mode):
    """Write data to path through a temporary file and a rename: never half a file."""
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogateescape")
    directory, base = os.path.split(path)
    tmp = os.path.join(directory, "." + base + TEMP_SUFFIX)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
        os.fchmod(fd, mode)
    finally:
        os.close(fd)
    os.rename(tmp, path)


def file_mode(path, default):
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        return default


# A report's verbs, as a dry run says them.
DRY_VERBS = {"wrote": "write", "created": "create", "linked": "link", "made": "make", "removed": "remove"}


class Applier:
    """Makes this host's part of a setup true, or undoes it; each op reports a line."""

    def __init__(self, ident, dry_run=False, home=None):
        self.ident = ident
        self.dry_run = dry_run
        self.home = home or os.path.expanduser("~")
        self.manifest_path = os.path.join(self.home, ".rvgahp", MANIFEST)
        self.report = []  # (verb, what): verb is one of wrote, created, kept, removed, would ...
        self.changed = 0

    def note(self, verb, what, changed):
        if changed:
            self.changed += 1
            if self.dry_run:
                verb = "would " + " ".join([DRY_VERBS.get(verb.split()[0], verb.split()[0])] + verb.split()[1:])
        self.report.append((verb, home_path(what, self.home)))

    # -- the manifest of created paths, shared by every ident on this host

    def manifest(self):
        text = read_text(self.manifest_path) or ""
        return [tuple(line.split("\t", 1)) for line in text.splitlines() if "\t" in line]

    def _write_manifest(self, entries):
        if not entries:
            if os.path.exists(self.manifest_path):
                os.unlink(self.manifest_path)
            return
        atomic_write(self.manifest_path, "".join("%s\t%s\n" % e for e in entries), 0o600)

    def record_created(self, path):
        """List path as ours before creating it, so an interrupted run still removes it."""
        entries = self.manifest()
        if (self.ident, path) not in entries:
            self._write_manifest(entries + [(self.ident, path)])

    def adopt(self, path):
        """A path another ident created: share it, so removing that one keeps it for us."""
        entries = self.manifest()
        if any(p == path for _, p in entries) and (self.ident, path) not in entries:
            self._write_manifest(entries + [(self.ident, path)])

    # -- ops

    def directory(self, path, mode):
        if os.path.isdir(path):
            if not self.dry_run:
                self.adopt(path)
            self.note("kept", path + "/", False)
            return
        if not self.dry_run:
            if path == os.path.dirname(self.manifest_path):
                self.make_manifest_home(path, mode)
            else:
                self.record_created(path)
                os.mkdir(path, mode)
                os.chmod(path, mode)
        self.note("created", path + "/", True)

    def make_manifest_home(self, path, mode):
        """The manifest's own directory (~/.rvgahp) and the record of it, in one rename.

        The manifest lives in it, so the directory cannot be recorded before it exists;
        made and then recorded, a kill between the two left a directory that the next
        run took for the user's own and --remove kept. Made under a temporary name with
        its manifest inside, it appears whole or not at all."""
        tmp = os.path.join(os.path.dirname(path), "." + os.path.basename(path) + TEMP_SUFFIX)
        shutil.rmtree(tmp, ignore_errors=True)  # an interrupted run's
        os.mkdir(tmp, mode)
        os.chmod(tmp, mode)
        atomic_write(os.path.join(tmp, MANIFEST), "%s\t%s\n" % (self.ident, path), 0o600)
        os.rename(tmp, path)

    def block(self, path, body, default_mode=0o600, ident=None, sole=False):
        """IDENT's block in path holds body. sole: refuse a file with lines outside any block
        that would run instead of ours (a hand-written transport)."""
        ident = ident or self.ident
        text = read_text(path)
        if sole and text is not None and find_block(text, ident) is None and text.strip():
            raise StepFailed(
                "%s exists and was not written by rvgahp setup; move it aside (mv %s %s.manual) and run setup again"
                % (home_path(path, self.home), home_path(path, self.home), home_path(path, self.home))
            )
        new = put_block(text, ident, body)
        if new == text:
            self.note("kept", path, False)
            return
        if not self.dry_run:
            atomic_write(path, new, file_mode(path, default_mode))
        self.note("wrote", path, True)

    def unblock(self, path, ident=None):
        ident = ident or self.ident
        text = read_text(path)
        if text is None or find_block(text, ident) is None:
            return
        new = drop_block(text, ident)
        if not self.dry_run:
            if new is None:
                os.unlink(path)
            else:
                atomic_write(path, new, file_mode(path, 0o600))
        self.note("removed our lines from" if new is not None else "removed", path, True)

    def file_bytes(self, path, data, mode, source=None):
        """path holds data; source: a temporary file already holding it, to rename into place."""
        try:
            with open(path, "rb") as f:
                same = f.read() == data
        except FileNotFoundError:
            same = None
        if same:
            if source and not self.dry_run:
                os.unlink(source)
            if not self.dry_run:
                self.adopt(path)
            self.note("kept", path, False)
            return
        if not self.dry_run:
            if same is None:
                self.record_created(path)
            if source:
                os.chmod(source, mode)
                os.rename(source, path)
            else:
                atomic_write(path, data, mode)
        self.note("wrote", path, True)

    def symlink(self, path, target):
        where = os.path.join(os.path.dirname(path), target)
        if os.path.islink(path) or os.path.exists(path):
            if os.path.islink(path) and os.readlink(path) == target:
                if not self.dry_run:
                    self.adopt(path)
                self.note("kept", path, False)
                return
            if not (os.path.exists(path) and os.path.exists(where) and os.path.samefile(path, where)):
                raise StepFailed(
                    "%s exists and is not a link to %s; move it aside and run setup again" % (home_path(path, self.home), target)
                )
            self.note("kept", path, False)
            return
        if not self.dry_run:
            self.record_created(path)
            tmp = os.path.join(os.path.dirname(path), "." + os.path.basename(path) + TEMP_SUFFIX)
            if os.path.lexists(tmp):
                os.unlink(tmp)
            os.symlink(target, tmp)
            os.rename(tmp, path)
        self.note("linked", path, True)

    def keygen(self, path, comment):
        """A key of its own: made here, and its private half never leaves this host."""
        pub = path + ".pub"
        tmp = os.path.join(os.path.dirname(path), "." + os.path.basename(path) + TEMP_SUFFIX)
        for leftover in (tmp, tmp + ".pub"):  # from an interrupted run
            if os.path.exists(leftover) and not self.dry_run:
                os.unlink(leftover)
        if os.path.exists(path):
            derived = run(["ssh-keygen", "-y", "-f", path])
            if derived.returncode != 0:
                raise StepFailed("cannot read the key %s: %s" % (path, last_line(derived.stderr)))
            public = " ".join(derived.stdout.split()[:2] + [comment]) + "\n"  # newer ssh-keygen -y adds the comment
            old = read_text(pub)
            if old is not None and old.split()[:2] == public.split()[:2]:
                self.note("kept", path, False)
                return old.strip()
            if not self.dry_run:
                atomic_write(pub, public, 0o644)
            self.note("wrote", pub, True)
            return public.strip()
        if self.dry_run:
            self.note("made", path, True)
            return "ssh-ed25519 (made by setup) " + comment
        self.record_created(path)
        self.record_created(pub)
        made = run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", tmp])
        if made.returncode != 0:
            raise StepFailed("ssh-keygen failed: %s" % last_line(made.stderr))
        public = read_text(tmp + ".pub")
        os.rename(tmp, path)
        atomic_write(pub, public, 0o644)
        os.unlink(tmp + ".pub")
        self.note("made", path, True)
        return public.strip()

    def crontab(self, body, ident=None, remove=False):
        ident = ident or self.ident
        current = run(["crontab", "-l"])
        if current.returncode != 0:
            if "no crontab" not in current.stderr:
                raise StepFailed("crontab -l failed: %s" % last_line(current.stderr))
            text = None
        else:
            text = current.stdout
        if remove:
            if text is None or find_block(text, ident) is None:
                return
            new = drop_block(text, ident)
        else:
            new = put_block(text, ident, body)
            if new == text:
                self.note("kept", "the crontab", False)
                return
        if not self.dry_run:
            if new is None:
                done = run(["crontab", "-r"])
            else:
                done = run(["crontab", "-"], stdin=new)
            if done.returncode != 0:
                raise StepFailed("crontab failed: %s" % last_line(done.stderr))
        self.note("removed our lines from" if remove else "wrote", "the crontab", True)

    def remove_temporaries(self, directories):
        """What an interrupted run left half-way: our temporary files, by their names."""
        for directory in directories:
            try:
                names = os.listdir(directory)
            except OSError:
                continue
            for name in names:
                if name.startswith(".") and TEMP_SUFFIX in name:
                    path = os.path.join(directory, name)
                    if not self.dry_run:
                        if os.path.isdir(path) and not os.path.islink(path):
                            shutil.rmtree(path, ignore_errors=True)  # a ~/.rvgahp being made
                        else:
                            os.unlink(path)
                    self.note("removed", path, True)

    def remove_created(self):
        """Delete what this ident created and no other ident shares, deepest first."""
        entries = self.manifest()
        mine = [p for i, p in entries if i == self.ident]
        rest = [(i, p) for i, p in entries if i != self.ident]
        still_used = {p for _, p in rest}
        for path in sorted(mine, key=lambda p: -p.count("/")):
            if path in still_used:
                continue
            if path == os.path.dirname(self.manifest_path):
                continue  # last, after the manifest itself
            self._remove_path(path)
        if not self.dry_run:
            self._write_manifest(rest)
        dot = os.path.dirname(self.manifest_path)
        if dot in mine and dot not in still_used:
            self._remove_path(dot)

    def remove_with_pyz(self, pyz, copies):
        """Once pyz is gone, the copies shiv unpacked from it (shiv_copies) go too."""
        removed = ("would remove" if self.dry_run else "removed", home_path(pyz, self.home)) in self.report
        if not copies or not (removed or not os.path.lexists(pyz)):
            return
        for path in copies:
            if os.path.isdir(path) and not os.path.islink(path):
                if not self.dry_run:
                    shutil.rmtree(path, ignore_errors=True)
                self.note("removed", path + "/", True)
            elif os.path.lexists(path):
                if not self.dry_run:
                    os.unlink(path)
                self.note("removed", path, True)
        root = os.path.dirname(copies[0])
        try:
            if not self.dry_run and not os.listdir(root):
                os.rmdir(root)
                self.note("removed", root + "/", True)
        except OSError:
            pass

    def _remove_path(self, path):
        if os.path.isdir(path) and not os.path.islink(path):
            try:
                left = os.listdir(path)
            except FileNotFoundError:
                return
            if left:
                self.report.append(("left", "%s/ (it holds %s)" % (home_path(path, self.home), ", ".join(sorted(left)[:3]))))
                return
            if not self.dry_run:
                os.rmdir(path)
            self.note("removed", path + "/", True)
        elif os.path.lexists(path):
            if not self.dry_run:
                os.unlink(path)
            self.note("removed", path, True)


def shiv_copies(pyz):
    """What was unpacked from this rvgahp.pyz ($SHIV_ROOT or ~/.shiv, NAME_BUILDID and its
    lock), as rvgahp_launch.py finds it; [] for no such file."""
    build_id = build_id_of(pyz)
    if not build_id:
        return []
    root = os.environ.get("SHIV_ROOT") or os.path.expanduser("~/.shiv")
    try:
        names = sorted(os.listdir(root))
    except OSError:
        return []
    # NAME_BUILDID, .NAME_BUILDID_lock and NAME_BUILDID.tmp, under every name this build ran
    # as (setup runs the cluster's staged copy, .rvgahp.pyz.rvgahp-new, before renaming it)
    mark = "_" + build_id
    return [os.path.join(root, n) for n in names if n.endswith((mark, mark + "_lock", mark + ".tmp"))]


def run(argv, stdin=None, env=None, timeout=60):
    """argv's (returncode, stdout, stderr) as text; a missing program is exit 127."""
    try:
        return subprocess.run(  # noqa: UP022 (capture_output and text are Python 3.7)
            argv,
            input=stdin,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=None if stdin is not None else subprocess.DEVNULL,
            encoding="utf-8",
            errors="replace",  # the words of any program, whatever it prints
            env=env,
            timeout=timeout,
        )
    except FileNotFoundError:
        return subprocess.CompletedProcess(argv, 127, "", "%s: command not found" % argv[0])
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(argv, 124, "", "%s: no answer within %d s" % (argv[0], timeout))


def last_line(text):
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    return lines[-1] if lines else "(no message)"


# --------------------------------------------------------------------------- the cluster's side


def runtime_files(dot):
    """What a server leaves in ~/.rvgahp: its pid files and logs, the GAHPs' stderr, the
    ft-gahp's log, and the DAEMON_SOCKET_DIR that setup's config names (a directory)."""
    found = []
    try:
        names = os.listdir(dot)
    except FileNotFoundError:
        return found
    for name in names:
        server_file = name.startswith("rvgahp_server.") and (name.endswith(".pid") or ".log" in name)
        if server_file or name.startswith(("gahp_stderr.", "FTGahpLog")) or name == DAEMON_SOCK:
            found.append(os.path.join(dot, name))
    return found


def server_state():
    """(pid or None, pid file) of the server on this host: the pid file's lock says if it runs."""
    path = Layout().pid_file
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None, path
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        text = os.read(fd, 64).decode("ascii", "replace").strip()
        os.close(fd)
        return (int(text) if text.isdigit() else -1), path
    os.close(fd)
    return None, path


def servers_elsewhere(dot):
    """[(host tag, pid, pid file)] of the servers another login node sharing this HOME
    runs (a standby): their pid file is locked, and they use the files --remove deletes.
    Setup cannot signal a process on another host."""
    found = []
    mine = os.path.basename(Layout().pid_file)
    try:
        names = sorted(os.listdir(dot))
    except OSError:
        return found
    for name in names:
        if not (name.startswith("rvgahp_server.") and name.endswith(".pid")) or name == mine:
            continue
        path = os.path.join(dot, name)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            text = os.read(fd, 64).decode("ascii", "replace").strip()
            found.append((name[len("rvgahp_server.") : -len(".pid")], text if text.isdigit() else "?", path))
        finally:
            os.close(fd)
    return found


def stop_server():
    """SIGTERM this host's server and wait for its lock to go; the pid, or None if none ran."""
    pid, _ = server_state()
    if pid is None or pid <= 0:
        return None
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return None
    deadline = time.monotonic() + STOP_WAIT
    while server_state()[0] is not None:
        if time.monotonic() > deadline:
            raise StepFailed("rvgahp_server (pid %d) did not stop within %d s of SIGTERM; kill -9 %d and run again" % (pid, STOP_WAIT, pid))
        time.sleep(0.05)
    return pid


def start_server(python):
    """Start this host's server now, as cron will; its answer (started, or already running)."""
    argv = ([python] if python else []) + [os.path.expanduser("~/bin/rvgahp_server"), "-d"]
    done = run(argv, timeout=30)
    if done.returncode != 0:
        raise StepFailed(
            "rvgahp_server -d failed (exit %d): %s; see %s" % (done.returncode, last_line(done.stderr), home_path(Layout().default_log))
        )
    return done.stdout.strip()


def cluster_apply(plan):
    """Everything setup does on the cluster, from a plan made on the submit host."""
    home = os.path.expanduser("~")
    dot = os.path.join(home, ".rvgahp")
    bindir = os.path.join(home, "bin")
    a = Applier(CLUSTER_IDENT, dry_run=plan.get("dry_run", False), home=home)
    out = {"host": socket.gethostname(), "tag": host_tag(), "log": Layout().default_log}
    if plan["action"] == "install":
        a.directory(dot, 0o700)
        a.directory(bindir, 0o755)
        out["pubkey"] = a.keygen(os.path.join(dot, KEY_NAME), "rvgahp@" + host_tag())
        a.block(os.path.join(dot, "condor_config.rvgahp"), plan["config"])
        a.block(os.path.join(dot, "known_hosts"), plan["known_hosts"])
        a.block(os.path.join(dot, "rvgahp_ssh"), plan["transport"], sole=True)
        staged = os.path.join(home, plan["staged"])
        with open(staged, "rb") as f:
            data = f.read()
        a.file_bytes(os.path.join(bindir, "rvgahp.pyz"), data, 0o755, source=staged)
        a.symlink(os.path.join(bindir, "rvgahp_server"), "rvgahp.pyz")
        a.crontab(plan["crontab"])
        out["transport_changed"] = any(what.endswith("rvgahp_ssh") for verb, what in a.report if verb in ("wrote", "would wrote"))
    elif plan["action"] == "start":
        if plan.get("restart") and not a.dry_run:
            stopped = stop_server()
            if stopped:
                out["stopped"] = stopped
        out["said"] = start_server(plan.get("python"))
        out["pid"], _ = server_state()
    elif plan["action"] == "remove":
        others = servers_elsewhere(dot)
        if others:
            raise StepFailed(
                "rvgahp_server also runs on %s, using the files --remove deletes; stop it there first (%s), then run --remove again"
                % (
                    ", ".join("%s (pid %s, %s)" % (tag, pid, home_path(path, home)) for tag, pid, path in others),
                    "; ".join("on %s: kill %s" % (tag, pid) for tag, pid, _ in others),
                )
            )
        if not a.dry_run:
            out["stopped"] = stop_server()
        a.crontab(None, remove=True)
        for name in ("rvgahp_ssh", "known_hosts", "condor_config.rvgahp"):
            a.unblock(os.path.join(dot, name))
        a.remove_temporaries([home, dot, bindir])
        for path in runtime_files(dot):  # the server's logs and pid files go with it
            if not a.dry_run:
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    os.unlink(path)
            a.note("removed", path, True)
        pyz = os.path.join(bindir, "rvgahp.pyz")
        copies = shiv_copies(pyz)
        a.remove_created()
        a.remove_with_pyz(pyz, copies)
    out["report"] = a.report
    out["changed"] = a.changed
    return out


def setup_remote_main():
    """Run on the cluster by setup: a JSON plan on stdin, a JSON answer on stdout."""
    plan = json.loads(sys.stdin.read())
    try:
        out = cluster_apply(plan)
    except UserError as e:
        out = {"error": str(e)}
    sys.stdout.write(json.dumps(out) + "\n")
    return 0 if "error" not in out else 1


# What setup runs on the cluster first, with sh: find a Python 3.6+, then run rvgahp_probe.py
# (in the here-document) with it, to look around.
PROBE_SH = r"""
for p in python3 python3.13 python3.12 python3.11 python3.10 python3.9 python3.8 python3.7 python3.6; do
    path=$(command -v "$p" 2>/dev/null) || continue
    if "$path" -c 'import sys; sys.exit(sys.version_info < (3, 6))' 2>/dev/null; then
        exec "$path" - "$@" <<'RVGAHP_PROBE'
%s
RVGAHP_PROBE
    fi
done
echo '{"python": null, "path": "'"$PATH"'"}'
"""


def sibling(name):
    """The bytes of one of rvgahp's modules, which sit beside this file in the sources, in
    rvgahp.pyz's unpacked copy and in a pip install."""
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), name), "rb") as f:
        return f.read()


def probe_program():
    """rvgahp_probe.py's source, which setup runs on the cluster."""
    return sibling("rvgahp_probe.py").decode("utf-8")


def probe_script():
    """PROBE_SH with rvgahp_probe.py in its here-document."""
    return PROBE_SH % probe_program().strip()


# --------------------------------------------------------------------------- the archive
# rvgahp.pyz: the sh prologue, then a zip whose __main__.py is rvgahp_launch.py. Made here
# (build_zipapp.sh finishes shiv's archive with finish_shiv_pyz; setup packs one itself
# when it runs from a pip install), so the launcher that runs on every start carries none
# of it.

MODULES = ("rvgahp.py", "rvgahp_admin.py", "rvgahp_launch.py", "rvgahp_probe.py")

# The first bytes of rvgahp.pyz, with {build_id} filled in. The copy's place must be the
# one rvgahp_launch.unpacked_dir() computes: the archive's real name (readlink -f), not a
# symlink's, names it. `exec` keeps the name the archive was run by, which picks the role.
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


def build_id_of(archive):
    """The build id of an rvgahp.pyz (from the launcher in its __main__.py); None if it
    is no such archive."""
    try:
        with zipfile.ZipFile(archive) as z:
            main = z.read("__main__.py").decode("utf-8", "replace")
    except (OSError, KeyError, zipfile.BadZipFile):
        return None
    found = re.search(r'^BUILD_ID = "([0-9a-f]+)"$', main, re.M)
    return found.group(1) if found else None


def launcher_source(build_id):
    source = sibling("rvgahp_launch.py").decode("utf-8")
    return source.replace('BUILD_ID = "@BUILD_ID@"', 'BUILD_ID = "%s"' % build_id, 1)


def build_pyz(members, build_id):
    """The bytes of an rvgahp.pyz: the sh prologue, then a zip of members ((name or
    ZipInfo, bytes), in the order given; a bare name is dated 1980, so that a build is
    reproducible) whose __main__.py is the launcher with build_id filled in."""
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
    with zipfile.ZipFile(path) as z:
        build_id = json.loads(z.read("environment.json").decode())["build_id"]
        members = [(i, z.read(i)) for i in z.infolist() if i.filename != "__main__.py"]
    data = build_pyz(members, build_id)
    with open(path + ".tmp", "wb") as f:
        f.write(data)
    os.chmod(path + ".tmp", 0o755)
    os.replace(path + ".tmp", path)
    return build_id


# --------------------------------------------------------------------------- the payload


def running_payload():
    """(bytes, description) of the rvgahp to install: the running .pyz itself, or, run from
    the sources or a pip install, an rvgahp.pyz packed from the same modules by the same
    launcher, so that its client starts as fast as one built by build_zipapp.sh."""
    argv0 = os.path.realpath(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    if argv0 and os.path.isfile(argv0) and zipfile.is_zipfile(argv0):
        with zipfile.ZipFile(argv0) as z:
            if any(n == "rvgahp.py" or n.endswith("/rvgahp.py") for n in z.namelist()):
                with open(argv0, "rb") as f:
                    return f.read(), argv0
    here = os.path.dirname(os.path.abspath(__file__))
    members = [("site-packages/" + name, sibling(name)) for name in MODULES]
    build_id = hashlib.sha256(b"".join(data for _, data in members)).hexdigest()
    return build_pyz(members, build_id), "an rvgahp.pyz packed from the modules in %s" % here


# --------------------------------------------------------------------------- setup, on the submit host


def parse_destination(text, what, default_user=None):
    """[USER@]HOST[:PORT] -> (user, host, port or None)."""
    user, at, rest = text.rpartition("@")
    if not at:
        user, rest = default_user, text
    port = None
    if rest.startswith("["):
        host, _, tail = rest[1:].partition("]")
        if tail.startswith(":"):
            port = tail[1:]
    elif rest.count(":") == 1:
        host, port = rest.split(":")
    else:
        host = rest
    if port is not None and not (port.isdigit() and 0 < int(port) < 65536):
        raise UserError("%s %r: the port must be a number from 1 to 65535" % (what, text))
    if not host or not user or any(c.isspace() for c in user + host):
        raise UserError("%s %r: expected [USER@]HOST[:PORT]" % (what, text))
    return user, host, int(port) if port else None


def cluster_name(user, host):
    """The cluster's name in file names: the account and the whole host, so that two
    clusters whose login nodes are both login.* never share a socket or a key line."""
    name = "%s@%s" % (user, host) if user else host
    return "".join(c if c.isalnum() or c in "._-@" else "_" for c in name) or "cluster"


OWNER_MARK = "# rvgahp: the link from "  # a comment line in our authorized_keys block


def block_owner(body):
    """The cluster (USER@HOST) an authorized_keys block of ours was written for, or None."""
    for line in (body or "").splitlines():
        if line.startswith(OWNER_MARK):
            return line[len(OWNER_MARK) :].strip()
    return None


class Remote:
    """One ssh login to the cluster (a ControlMaster on a private path); every step rides it."""

    def __init__(self, destination, port, options):
        self.destination = destination
        self.base = (["-p", str(port)] if port else []) + [w for o in options for w in ("-o", o)]
        self.dir = tempfile.mkdtemp(prefix="rvgahp-setup-")  # 0700: nobody else may use the master
        self.control = os.path.join(self.dir, "master")
        self.up = False

    def login(self):
        argv = ["ssh"] + self.base + ["-o", "ControlMaster=yes", "-o", "ControlPath=" + self.control, "-o", "ControlPersist=no"]
        argv += ["-f", "-N", self.destination]
        errors_to_terminal = sys.stderr.isatty()
        log = os.path.join(self.dir, "login.err")
        with open(log, "w") as err:
            status = subprocess.call(argv, stdin=subprocess.DEVNULL, stderr=None if errors_to_terminal else err)
        if status != 0:
            said = "" if errors_to_terminal else last_line(read_text(log))
            raise StepFailed(
                "ssh %s failed (exit %d)%s; check that `ssh %s` logs you in, and pass its options with -p and -o"
                % (self.destination, status, (": " + said) if said else "", " ".join(self.base + [self.destination]))
            )
        self.up = True

    def unknown_host_key(self):
        """(host, port, host) when ssh would ask about the cluster's host key on this login
        (no key in its known_hosts files and StrictHostKeyChecking ask); else None."""
        done = run(["ssh", "-G"] + self.base + [self.destination], timeout=30)
        if done.returncode != 0:
            return None
        config = {}
        for line in done.stdout.splitlines():
            key, _, value = line.partition(" ")
            config.setdefault(key.lower(), value.strip())
        if config.get("stricthostkeychecking", "ask") != "ask":
            return None
        host = config.get("hostkeyalias") or config.get("hostname") or self.destination.rpartition("@")[2]
        port = config.get("port", "22")
        name = host if port == "22" else "[%s]:%s" % (host, port)
        for known in config.get("userknownhostsfile", "~/.ssh/known_hosts").split() + config.get("globalknownhostsfile", "").split():
            path = os.path.expanduser(known)
            if os.path.isfile(path) and run(["ssh-keygen", "-F", name, "-f", path], timeout=30).returncode == 0:
                return None
        return host, port, host

    def argv(self, command):
        return ["ssh"] + self.base + ["-o", "ControlMaster=no", "-o", "ControlPath=" + self.control, self.destination, command]

    def run(self, command, stdin=None, binary=False, timeout=120):
        """command run by the cluster's login shell, in the home directory."""
        kw = {} if binary else {"universal_newlines": True}
        try:
            return subprocess.run(  # noqa: UP022
                self.argv(command),
                input=stdin,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                stdin=None if stdin is not None else subprocess.DEVNULL,
                timeout=timeout,
                **kw,
            )
        except subprocess.TimeoutExpired:
            raise StepFailed("the cluster did not answer within %d s: %s" % (timeout, command[:60]))

    def close(self):
        if self.up:
            subprocess.call(
                ["ssh", "-o", "ControlPath=" + self.control, "-O", "exit", self.destination],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        shutil.rmtree(self.dir, ignore_errors=True)


# The cluster's end of setup's tunnel proof: send argv[2] to 127.0.0.1:argv[1], print what comes back.


def read_banner(child, deadline):
    """(stdout, stderr) of a session's client, read as they come until its first stdout line is
    whole, or until both end (then the client is leaving: its last words are in stderr)."""
    got = {child.stdout: b"", child.stderr: b""}
    files = list(got)
    while files and b"\n" not in got[child.stdout]:
        ready = select.select(files, [], [], max(0.0, deadline - time.monotonic()))[0]
        if not ready:
            break
        for f in ready:
            data = os.read(f.fileno(), 65536)
            got[f] += data
            if not data:
                files.remove(f)
    # The client writes its Allocated line before the proxy lets the banner through: it is here by now.
    if child.stderr in files and select.select([child.stderr], [], [], 0)[0]:
        got[child.stderr] += os.read(child.stderr.fileno(), 65536)
    return got[child.stdout].decode(errors="replace"), got[child.stderr].decode(errors="replace")


def echo_once(listener, size, deadline, heard):
    """Accept one connection, read size bytes from it, send them back; heard gets them."""
    try:
        listener.settimeout(max(0.1, deadline - time.monotonic()))
        conn = listener.accept()[0]
        with conn:
            conn.settimeout(max(0.1, deadline - time.monotonic()))
            data = b""
            while len(data) < size:
                more = conn.recv(size - len(data))
                if not more:
                    break
                data += more
            conn.sendall(data)
            heard.append(data)
    except OSError:
        pass


class Setup:
    STEPS = ("login", "probe", "hostkey", "copy", "cluster-files", "submit-files", "start", "link", "prove")

    def __init__(self, opts):
        self.opts = opts
        self.dry = opts.dry_run
        self.home = os.path.expanduser("~")
        self.local_user = getpass.getuser()
        self.cluster = parse_destination(opts.cluster, "cluster", default_user=self.local_user)
        if "@" not in opts.cluster:
            self.cluster = (None,) + self.cluster[1:]
        self.name = cluster_name(self.cluster[0] or self.local_user, self.cluster[1])
        self.sock = os.path.abspath(os.path.expanduser(opts.socket or os.path.join("~/.rvgahp", self.name + ".sock")))
        check_socket_path(self.sock)
        self.submit = parse_destination(opts.submit_host or socket.getfqdn(), "--submit-host", default_user=self.local_user)
        self.bin = os.path.join(self.home, "bin")
        self.proxy = os.path.join(self.bin, "rvgahp_proxy")
        self.client = os.path.join(self.bin, "rvgahp_client")
        self.step_no = 0
        self.remote = None
        self.changed = 0

    def say(self, text):
        sys.stdout.write(text + "\n")
        sys.stdout.flush()

    def step(self, name, text):
        self.step_no += 1
        self.current = text
        self.say("[%d/%d] %s" % (self.step_no, len(self.STEPS) if not self.opts.remove else 4, text))

    def detail(self, report):
        for verb, what in report:
            self.say("      %-22s %s" % (verb, what))

    def fail(self, text):
        raise StepFailed("%s: %s" % (self.current, text))

    def destination(self):
        user, host, _ = self.cluster
        return ("%s@%s" % (user, host)) if user else host

    def run(self):
        self.remote = Remote(self.destination(), self.cluster[2], self.opts.ssh_options)
        try:
            if self.opts.remove:
                return self.remove()
            return self.install()
        finally:
            self.remote.close()

    # -- the steps

    def login(self):
        self.step("login", "log in to %s (answer its prompts; this is the only login)" % self.destination())
        unknown = self.remote.unknown_host_key()
        if unknown:
            self.say(
                "      first login to %s: ssh shows its host key's fingerprint and asks whether to trust it; answer yes only "
                "if it matches what your site publishes (ssh-keyscan -p %s %s | ssh-keygen -lf - prints it); "
                "ssh then keeps the key in ~/.ssh/known_hosts" % unknown
            )
        self.remote.login()

    def probe(self):
        self.step("probe", "look at the cluster")
        want = {
            "blahpd": self.opts.blahpd,
            "ft_gahp": self.opts.ft_gahp,
            "blahpd_places": BLAHPD_PLACES,
            "ft_gahp_places": FT_GAHP_PLACES,
            "batch": BATCH_SYSTEMS,
            "texts": [".rvgahp/condor_config.rvgahp", ".rvgahp/known_hosts", ".rvgahp/rvgahp_ssh"],
        }
        done = self.remote.run("/bin/sh -s look " + shlex.quote(json.dumps(want)), stdin=probe_script())
        try:
            found = json.loads(done.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            self.fail("the probe failed (exit %d): %s" % (done.returncode, last_line(done.stderr or done.stdout)))
        if not found.get("python"):
            self.fail(
                "no Python 3.6 or newer on the cluster's PATH (%s; tried python3, python3.13 ... python3.6); "
                "load one in your ~/.bashrc there (e.g. module load python3) or ask its admins" % found.get("path")
            )
        self.say("      Python %s (%s)%s" % (found["version"], found["python"], "" if found["cron_python_ok"] else "; cron will name it"))
        if not found["home_writable"]:
            self.fail("the home directory %s is not writable; fix its permissions or ask the cluster's admins" % found["home"])
        for key, name, option in (("blahpd", "blahpd", "--blahpd"), ("ft_gahp", "condor_ft-gahp", "--ft-gahp")):
            g = found[key]
            if g.get("named") and not g["ok"]:
                self.fail("%s %s is not an executable file on the cluster; check the path given to %s" % (name, g["path"], option))
            if not g["ok"]:
                self.fail(
                    "no %s on the cluster (looked on PATH and in %s); install it (HTCondor's condor_remote_cluster "
                    "installs BOSCO's), or name it with %s PATH" % (name, ", ".join(g["tried"][1:]), option)
                )
            self.say("      %-15s %s" % (name, g["path"]))
        if not found["crontab_cmd"]:
            self.fail("crontab is not available on the cluster; ask its admins for cron, or run rvgahp_server from the systemd unit")
        self.batch = self.choose_batch(found["batch"])
        self.found = found
        self.python = None if found["cron_python_ok"] else found["python"]

    def hostkey(self):
        _, host, port = self.submit
        self.step("hostkey", "read this host's ssh host key, as %s%s" % (host, ":%d" % port if port else ""))
        done = run(["ssh-keyscan", "-T", "10"] + (["-p", str(port)] if port else []) + [host])
        keys = sorted(line for line in done.stdout.splitlines() if line.strip() and not line.startswith("#"))
        if not keys:
            self.fail(
                "ssh-keyscan found no host key at %s port %d (%s); the cluster must reach this host's sshd: "
                "name this host as the cluster sees it with --submit-host [USER@]HOST[:PORT]" % (host, port or 22, last_line(done.stderr))
            )
        self.known_hosts = "# The submit host's ssh host keys, for the transport's StrictHostKeyChecking.\n" + "\n".join(keys) + "\n"
        self.say("      %d key%s for %s" % (len(keys), "" if len(keys) == 1 else "s", keys[0].split()[0]))

    def choose_batch(self, found):
        """The batch system for grid_resource: named with --batch-system, the only one
        found, or asked for (with a terminal) when the cluster has several."""
        names = [b for _, b in BATCH_SYSTEMS]
        if self.opts.batch_system:
            if self.opts.batch_system not in names:
                self.fail("--batch-system %s: expected one of %s" % (self.opts.batch_system, ", ".join(names)))
            self.say("      batch system    %s (--batch-system)" % self.opts.batch_system)
            return self.opts.batch_system
        if len(found) == 1:
            self.say("      batch system    %s" % found[0])
            return found[0]
        if not found:
            self.say(
                "      batch system    none found on PATH (looked for %s); grid_resource names slurm below"
                % ", ".join(c for c, _ in BATCH_SYSTEMS)
            )
            return "slurm"
        if not sys.stdin.isatty():
            self.fail("the cluster has several batch systems (%s); choose one with --batch-system NAME" % ", ".join(found))
        while True:
            sys.stdout.write("      the cluster has %s; which one runs the jobs? [%s] " % (", ".join(found), found[0]))
            sys.stdout.flush()
            answer = sys.stdin.readline().strip() or found[0]
            if answer in found:
                return answer
            self.say("      %s is not one of %s" % (answer, ", ".join(found)))

    def copy(self):
        self.payload, where = running_payload()
        digest = hashlib.sha256(self.payload).hexdigest()
        self.step("copy", "copy rvgahp %s to ~/bin/rvgahp.pyz on the cluster (from %s)" % (VERSION, home_path(where, self.home)))
        self.staged = ".rvgahp.pyz" + TEMP_SUFFIX
        if self.dry:
            self.say(
                "      would copy %d bytes to ~/bin/rvgahp.pyz%s"
                % (len(self.payload), " (the same is there)" if self.found["pyz"] == digest else "")
            )
            return
        done = self.remote.run("umask 077 && cat > %s" % self.staged, stdin=self.payload, binary=True)
        if done.returncode != 0:
            self.fail("cannot write ~/%s on the cluster: %s" % (self.staged, last_line(done.stderr.decode(errors="replace"))))

    def plan_texts(self):
        return {
            "config": server_config_text(self.found["blahpd"]["path"], self.found["ft_gahp"]["path"]),
            "known_hosts": self.known_hosts,
            "transport": transport_text(self.submit, self.sock, self.proxy),
            "crontab": crontab_text(self.python),
        }

    def cluster_call(self, plan):
        runner = shlex.quote(self.found["python"])
        target = self.staged if plan["action"] == "install" else "bin/rvgahp.pyz"
        done = self.remote.run("%s %s setup --cluster-side" % (runner, target), stdin=json.dumps(plan))
        try:
            out = json.loads(done.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            self.fail("rvgahp on the cluster failed (exit %d): %s" % (done.returncode, last_line(done.stderr or done.stdout)))
        if "error" in out:
            self.fail(out["error"])
        return out

    def cluster_files(self):
        self.step("cluster-files", "write the cluster's files")
        texts = self.plan_texts()
        if self.dry:
            # Nothing runs there: say what would change from what the probe read.
            cluster_home = self.found["home"]
            for name, key in (("condor_config.rvgahp", "config"), ("known_hosts", "known_hosts"), ("rvgahp_ssh", "transport")):
                old = self.found["texts"][".rvgahp/" + name]
                same = put_block(old, CLUSTER_IDENT, texts[key]) == old
                self.say("      %-22s %s" % ("kept" if same else "would write", "~/.rvgahp/" + name))
            same = (
                self.found["crontab"] is not None
                and put_block(self.found["crontab"], CLUSTER_IDENT, texts["crontab"]) == self.found["crontab"]
            )
            self.say("      %-22s %s" % ("kept" if same else "would write", "the crontab (crontab -)"))
            for path in ("~/.rvgahp/" + KEY_NAME, "~/bin/rvgahp_server -> rvgahp.pyz"):
                self.say("      %-22s %s" % ("would make", path))
            self.pubkey = "ssh-ed25519 (the key setup makes on %s)" % cluster_home
            self.cluster_out = {"tag": "HOST", "log": "~/.rvgahp/rvgahp_server.HOST.log"}
            return
        out = self.cluster_call(dict(texts, action="install", staged=self.staged))
        self.detail(out["report"])
        self.changed += out["changed"]
        self.pubkey = out["pubkey"]
        self.cluster_out = out

    def submit_files(self):
        self.step("submit-files", "write this host's files")
        a = Applier(self.sock, dry_run=self.dry, home=self.home)
        dot = os.path.join(self.home, ".rvgahp")
        a.directory(dot, 0o700)
        parent = os.path.dirname(self.sock)
        if not os.path.isdir(parent) and not (self.dry and parent == dot):
            self.fail("the socket's directory %s does not exist; create it (mode 0700) or choose another --socket" % parent)
        a.directory(self.bin, 0o755)
        a.file_bytes(os.path.join(self.bin, "rvgahp.pyz"), self.payload, 0o755)
        # rvgahp itself too: the README's `rvgahp doctor` and `rvgahp setup` must work here.
        for name in ("rvgahp_proxy", "rvgahp_client", "rvgahp"):
            a.symlink(os.path.join(self.bin, name), "rvgahp.pyz")
        ssh_dir = os.path.join(self.home, ".ssh")
        a.directory(ssh_dir, 0o700)
        keys = os.path.join(ssh_dir, "authorized_keys")
        self.drop_older_blocks(a, keys)
        a.block(keys, authorized_key_text(self.pubkey, self.sock, self.proxy, self.owner()))
        if self.opts.condor_config:
            config = os.path.abspath(os.path.expanduser(self.opts.condor_config))
            for number, line in other_remote_gahps(read_text(config)):
                self.say(
                    "      warning: %s:%d already sets %s; the last definition in the file wins (setup's, at its end): "
                    "delete the other line, or drop --condor-config" % (config, number, line)
                )
            a.block(config, condor_config_text(self.client), default_mode=0o644)
        self.detail(a.report)
        self.changed += a.changed

    def owner(self):
        user, host, _ = self.cluster
        return "%s@%s" % (user or self.local_user, host)

    def check_socket_is_ours(self):
        """Stop before anything changes if another cluster's setup owns this socket."""
        text = read_text(os.path.join(self.home, ".ssh", "authorized_keys")) or ""
        other = block_owner(block_body(text, self.sock))
        if other and other != self.owner():
            raise UserError(
                "%s is the socket of %s, set up by an earlier rvgahp setup; choose another --socket for %s, "
                "or run rvgahp setup --remove %s first" % (home_path(self.sock, self.home), other, self.owner(), other)
            )

    def drop_older_blocks(self, applier, keys):
        """sshd uses the first line of a key: an older block for this cluster's key (a socket
        of an earlier setup) would win over ours for ever. It goes, and is named."""
        text = read_text(keys) or ""
        key = " ".join(self.pubkey.split()[:2])
        for ident in block_idents(text):
            if ident != self.sock and key in (block_body(text, ident) or ""):
                applier.unblock(keys, ident)
                self.say("      %-22s the block for the socket %s: it had this cluster's key" % ("replaced", home_path(ident, self.home)))

    def start(self):
        self.step("start", "start rvgahp_server on the cluster now (cron starts it at boot)")
        if self.dry:
            self.say("      would run %s" % server_command(self.python))
            return
        out = self.cluster_call({"action": "start", "python": self.python, "restart": self.cluster_out.get("transport_changed")})
        if out.get("stopped"):
            self.say("      stopped the old server (pid %s): its transport changed" % out["stopped"])
        self.say("      %s" % (out["said"] or "started rvgahp_server (pid %s) on %s" % (out.get("pid"), out["tag"])))
        self.cluster_out.update(tag=out["tag"], log=out["log"])

    def link(self):
        self.step("link", "wait for the link to %s" % home_path(self.sock, self.home))
        if self.dry:
            return
        deadline = time.monotonic() + LINK_WAIT
        while not (os.path.exists(self.sock) and socket_is_live(self.sock)):
            if time.monotonic() > deadline:
                tail = self.remote.run("tail -n 3 %s" % shlex.quote(self.cluster_out["log"]))
                said = [line.split(": ", 1)[-1] for line in tail.stdout.splitlines() if line.strip()]
                self.fail(
                    "no link within %d s; the server's log (%s on the cluster) ends: %s; then run rvgahp doctor on both hosts"
                    % (LINK_WAIT, home_path(self.cluster_out["log"], self.found["home"]), " | ".join(said) or "(empty)")
                )
            time.sleep(0.1)
        self.say("      up")

    def prove(self):
        self.step("prove", "run one session of each GAHP through the link, and one connection through the tunnel")
        if self.dry:
            self.say("      would run blahpd and condor_ft-gahp, and send a token through the ft-gahp's tunnel and back")
            return
        for gahp in ("blahpd", "condor_ft-gahp"):
            self.session(gahp)

    def session(self, gahp):
        """One session through the link, to its banner; the ft-gahp's also carries one tunnel connection."""
        listener, env = None, None
        if gahp == "condor_ft-gahp":  # the GridManager's side of the tunnel: an echo of one connection
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            listener.bind(("127.0.0.1", 0))
            listener.listen(1)
            env = dict(os.environ, CONDOR_INHERIT="%d <127.0.0.1:%d> 0" % (os.getpid(), listener.getsockname()[1]))
        deadline = time.monotonic() + PROVE_WAIT
        child = subprocess.Popen(
            [self.client, self.sock, gahp], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
        )
        try:
            out, err = read_banner(child, deadline)
            if not out.startswith("$GahpVersion"):
                try:
                    child.wait(max(0.0, min(5.0, deadline - time.monotonic())))
                except subprocess.TimeoutExpired:
                    pass
                self.fail(
                    "%s gave no banner (%s): %s; see ~/.rvgahp/gahp_stderr.%s.log on the cluster"
                    % (
                        gahp,
                        "still running" if child.returncode is None else "exit %d" % child.returncode,
                        last_line(err),
                        self.cluster_out.get("tag", "HOST"),
                    )
                )
            self.say("      %-15s %s" % (gahp, out.splitlines()[0][:70]))
            if listener is not None:
                self.tunnel(listener, err, deadline)
            try:
                child.communicate(timeout=max(0.0, deadline - time.monotonic()))  # stdin's EOF ends the session
            except subprocess.TimeoutExpired:
                self.fail("%s did not end at its stdin's EOF within %d s; see rvgahp doctor on both hosts" % (gahp, PROVE_WAIT))
        finally:
            if listener is not None:
                listener.close()
            if child.returncode is None:
                child.kill()
                child.wait()
                for f in (child.stdin, child.stdout, child.stderr):
                    f.close()

    def tunnel(self, listener, said, deadline):
        """A token sent to the session's Allocated port on the cluster comes back from listener here."""
        allocated = [line.split()[2] for line in said.splitlines() if line.startswith("Allocated port ")]
        if not allocated:
            if "rvgahp_client: warning:" not in said:
                self.say("      tunnel: off (RVGAHP_FT_TUNNEL = False)")
                return
            self.fail(
                "condor_ft-gahp got no tunnel (%s); run rvgahp doctor on both hosts, or turn the tunnel off with "
                "RVGAHP_FT_TUNNEL = False in ~/.rvgahp/condor_config.rvgahp on the cluster" % last_line(said)
            )
        token = os.urandom(16).hex()
        heard = []
        echo = threading.Thread(target=echo_once, args=(listener, len(token), deadline, heard), daemon=True)
        echo.start()
        command = "%s -c %s echo %s %s" % (shlex.quote(self.found["python"]), shlex.quote(probe_program()), allocated[0], token)
        done = self.remote.run(command, timeout=max(1, int(deadline - time.monotonic())))
        echo.join(max(0.0, deadline - time.monotonic()))
        here = "127.0.0.1:%d" % listener.getsockname()[1]
        if done.stdout.strip() != token or heard != [token.encode()]:
            said = (done.stderr or done.stdout).strip()
            cause = last_line(said) if said else "the cluster's side exited %d without a word" % done.returncode
            cause += "; %s here heard %s" % (
                here,
                "the token" if heard == [token.encode()] else "nothing" if not heard or not heard[0] else "only part of it",
            )
            self.fail(
                "a connection to port %s on the cluster's 127.0.0.1 did not reach %s here and back (%s); see the server's log "
                "(%s on the cluster) and %s.log here"
                % (allocated[0], here, cause, self.cluster_out["log"], home_path(self.sock, self.home))
            )
        self.say("      tunnel: proven (port %s on the cluster's 127.0.0.1 reached %s here and back)" % (allocated[0], here))

    def install(self):
        self.say("rvgahp setup %s: socket %s%s" % (self.destination(), self.sock, " (dry run: nothing is written)" if self.dry else ""))
        self.check_socket_is_ours()
        self.login()
        self.probe()
        self.hostkey()
        self.copy()
        self.cluster_files()
        self.submit_files()
        self.start()
        self.link()
        self.prove()
        if self.dry:
            self.say("Dry run: nothing was written.")
        elif self.changed:
            self.say("Done: %d change%s; the link is up." % (self.changed, "" if self.changed == 1 else "s"))
        else:
            self.say("Done: nothing changed, everything was already set up; the link is up.")
        batch = self.batch
        self.say("")
        self.say("For HTCondor (in condor_config.local or ~/.condor/user_config):")
        self.say("    " + condor_config_text(self.client).strip())
        self.say("and in submit files:")
        self.say("    grid_resource = batch %s %s" % (batch, self.sock))
        return 0

    def remove(self):
        self.say("rvgahp setup --remove %s: socket %s%s" % (self.destination(), self.sock, " (dry run)" if self.dry else ""))
        self.login()
        self.step("probe", "look at the cluster")
        done = self.remote.run(
            "/bin/sh -s look "
            + shlex.quote(json.dumps({"blahpd": "/", "ft_gahp": "/", "blahpd_places": [], "ft_gahp_places": [], "batch": [], "texts": []})),
            stdin=probe_script(),
        )
        try:
            self.found = json.loads(done.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            self.fail("the probe failed (exit %d): %s" % (done.returncode, last_line(done.stderr or done.stdout)))
        self.step("cluster-files", "stop the server and remove what setup added on the cluster")
        if not self.found.get("python") or not self.found.get("pyz"):
            self.say("      nothing to remove there (no ~/bin/rvgahp.pyz)")
        else:
            out = self.cluster_call({"action": "remove", "dry_run": self.dry})
            if out.get("stopped"):
                self.say("      stopped rvgahp_server (pid %s) on %s" % (out["stopped"], out["tag"]))
            self.detail(out["report"])
            self.changed += out["changed"]
        self.step("submit-files", "remove what setup added on this host")
        a = Applier(self.sock, dry_run=self.dry, home=self.home)
        a.unblock(os.path.join(self.home, ".ssh", "authorized_keys"))
        if self.opts.condor_config:
            a.unblock(os.path.abspath(os.path.expanduser(self.opts.condor_config)))
        deadline = time.monotonic() + STOP_WAIT
        while not self.dry and os.path.exists(self.sock) and socket_is_live(self.sock) and time.monotonic() < deadline:
            time.sleep(0.05)  # the proxy leaves once its link is gone
        for suffix in ("", ".lock", ".log", ".log.1"):
            if os.path.lexists(self.sock + suffix):
                if not self.dry:
                    os.unlink(self.sock + suffix)
                a.note("removed", self.sock + suffix, True)
        a.remove_temporaries([self.home] + [os.path.join(self.home, d) for d in (".rvgahp", "bin", ".ssh")])
        pyz = os.path.join(self.bin, "rvgahp.pyz")
        copies = shiv_copies(pyz)
        a.remove_created()
        a.remove_with_pyz(pyz, copies)
        self.detail(a.report)
        self.changed += a.changed
        self.say("Removed %d item%s." % (self.changed, "" if self.changed == 1 else "s") if self.changed else "Nothing to remove.")
        return 0


def setup_main(args):
    if args == ["--cluster-side"]:
        return setup_remote_main()

    parser = argparse.ArgumentParser(
        prog="rvgahp setup",
        description="Set a cluster up for rvgahp from this submit host, with one ssh login to the cluster.",
    )
    parser.add_argument("-p", dest="port", type=int, metavar="PORT", help="ssh port of the cluster's login node (for the setup login)")
    parser.add_argument(
        "-o", dest="ssh_options", action="append", default=[], metavar="SSH_OPTION", help="an ssh option for the setup login"
    )
    parser.add_argument(
        "--submit-host", metavar="[USER@]HOST[:PORT]", help="how the cluster reaches this host (default: this user at its FQDN)"
    )
    parser.add_argument("--socket", metavar="PATH", help="the socket on this host (default ~/.rvgahp/CLUSTER.sock)")
    parser.add_argument("--blahpd", metavar="PATH", help="blahpd on the cluster (default: found on PATH or in BOSCO's places)")
    parser.add_argument("--ft-gahp", metavar="PATH", help="condor_ft-gahp on the cluster (default: found likewise)")
    parser.add_argument("--condor-config", metavar="FILE", help="also write REMOTE_GAHP into this HTCondor config file")
    parser.add_argument(
        "--batch-system",
        metavar="NAME",
        help="the batch system for grid_resource: %s (default: the one found on the cluster)" % ", ".join(b for _, b in BATCH_SYSTEMS),
    )
    parser.add_argument("--dry-run", action="store_true", help="list every step, file and command; change nothing")
    parser.add_argument("--remove", action="store_true", help="undo what setup added, on both hosts")
    parser.add_argument("--version", action="version", version="rvgahp setup %s" % VERSION)
    parser.add_argument("cluster", metavar="USER@CLUSTER")
    opts = parser.parse_args(args)
    setup = Setup(opts)
    if opts.port:
        setup.cluster = setup.cluster[:2] + (opts.port,)
    return setup.run()


# --------------------------------------------------------------------------- doctor


class Doctor:
    def __init__(self):
        self.checks = []

    def add(self, name, ok, detail, fix=None):
        """ok: True, False, or None for a check that did not apply."""
        self.checks.append({"check": name, "ok": ok, "detail": detail, "fix": None if ok is not False else fix})

    # -- the submit host

    def submit(self, sockets, home):
        ak = os.path.join(home, ".ssh", "authorized_keys")
        text = read_text(ak) or ""
        for sock in sockets:
            body = block_body(text, sock)
            proxy = None
            if body is None:
                self.add(
                    "authorized_keys", False, "no rvgahp line for %s in %s" % (sock, home_path(ak)), "run rvgahp setup USER@CLUSTER again"
                )
            else:
                proxy, line_sock, problem = parse_forced_command(body)
                if problem is None and line_sock != sock:
                    problem = "its command serves %s, not %s" % (line_sock, sock)
                if problem is None and not (os.path.isfile(proxy) and os.access(proxy, os.X_OK)):
                    problem = "its command runs %s, which is not an executable file" % proxy
                self.add(
                    "authorized_keys",
                    problem is None,
                    ("the cluster's key runs %s %s" % (proxy, sock))
                    if problem is None
                    else "the rvgahp line in %s: %s" % (home_path(ak), problem),
                    "run rvgahp setup USER@CLUSTER again, or fix the line (rvgahp print authorized-key prints it)",
                )
            bindir = os.path.dirname(proxy) if proxy else os.path.join(home, "bin")
            bad = [r for r in ("rvgahp_proxy", "rvgahp_client") if not os.access(os.path.join(bindir, r), os.X_OK)]
            self.add(
                "roles",
                not bad,
                "rvgahp_proxy and rvgahp_client in %s run %s"
                % (home_path(bindir), home_path(os.path.realpath(os.path.join(bindir, "rvgahp_proxy"))))
                if not bad
                else "%s in %s do%s not resolve to an executable file"
                % (" and ".join(bad), home_path(bindir), "es" if len(bad) == 1 else ""),
                "chmod +x ~/bin/rvgahp.pyz and link it: ln -sf rvgahp.pyz ~/bin/rvgahp_proxy; ln -sf rvgahp.pyz ~/bin/rvgahp_client",
            )
            self.socket(sock)
            self.link(sock, os.path.join(bindir, "rvgahp_client"))
            self.remote_gahp(os.path.join(bindir, "rvgahp_client"))

    def socket(self, sock):
        parent = os.path.dirname(sock)
        # Every fix here is the user's own to run: never a chmod of a directory such as
        # /tmp that others own and share. A socket there moves to a private directory.
        move = (
            "move the socket to a private directory: rvgahp setup --socket ~/.rvgahp/%s USER@CLUSTER, "
            "then use the new path in grid_resource" % os.path.basename(sock)
        )
        try:
            st = os.stat(parent)
            ours = st.st_uid == os.getuid()
            loose = not ours or st.st_mode & 0o022
            self.add(
                "socket directory",
                not loose,
                "%s is yours, mode %o" % (home_path(parent), stat.S_IMODE(st.st_mode))
                if not loose
                else "%s may be changed by others (owner uid %d, mode %o)" % (home_path(parent), st.st_uid, stat.S_IMODE(st.st_mode)),
                "chmod 700 %s" % parent if ours else move,
            )
        except FileNotFoundError:
            self.add("socket directory", False, "%s does not exist" % parent, "mkdir -m 700 %s" % parent)
        fix = "start the server on the cluster (~/bin/rvgahp_server -d there) and read its log; rvgahp doctor on the cluster says why"
        try:
            st = os.lstat(sock)
        except FileNotFoundError:
            self.add("socket", False, "%s does not exist: no link has come up" % sock, fix)
            return
        if st.st_uid != os.getuid():
            self.add("socket", False, "%s belongs to uid %d, not to you: another user has taken the path" % (sock, st.st_uid), move)
        elif not stat.S_ISSOCK(st.st_mode):
            self.add(
                "socket", False, "%s is not a socket" % sock, "move it aside (mv %s %s.old); the proxy makes the socket" % (sock, sock)
            )
        elif stat.S_IMODE(st.st_mode) != 0o600:
            self.add(
                "socket",
                False,
                "%s is yours with mode %o" % (sock, stat.S_IMODE(st.st_mode)),
                "remove it (rm %s) and let your rvgahp_proxy make it again; it makes it 0600" % sock,
            )
        elif not socket_is_live(sock):
            self.add("socket", False, "%s is there but nothing serves it" % sock, fix)
        else:
            self.add("socket", True, "%s is live, yours, mode 600" % sock)

    def link(self, sock, client):
        if not socket_is_live(sock):
            self.add("link", None, "not checked: nothing serves the socket")
            return
        done = run([client, "--status", "--json", sock], timeout=30)
        try:
            status = json.loads(done.stdout)
            link = status["link"]
        except (ValueError, KeyError, TypeError):
            self.add(
                "link",
                False,
                "rvgahp_client --status --json %s failed: %s" % (sock, last_line(done.stderr)),
                "see the proxy's log %s.log" % sock,
            )
            return
        state = link.get("state")
        server = status.get("server") or {}
        self.add(
            "link",
            state in ("up", "standby"),
            "%s to %s on %s, last heard %.0f s ago" % (state, "rvgahp_server", server.get("host", "?"), link.get("last_heard_s") or 0),
            "the link is %s: read the server's log on the cluster; it reconnects by itself" % state,
        )

    def remote_gahp(self, client):
        if not shutil.which("condor_config_val"):
            self.add("REMOTE_GAHP", None, "not checked: condor_config_val is not on PATH")
            return
        done = run(["condor_config_val", "REMOTE_GAHP"])
        value = done.stdout.strip()
        good = done.returncode == 0 and value and os.path.exists(value) and os.path.samefile(value, client)
        self.add(
            "REMOTE_GAHP",
            bool(good),
            "REMOTE_GAHP = %s" % value if done.returncode == 0 else "REMOTE_GAHP is not set",
            "add to your HTCondor config: REMOTE_GAHP = %s (then condor_reconfig)" % client,
        )

    # -- the cluster

    def cluster(self, layout):
        try:
            config = Config.load(layout.config)
            gahps = {}
            for gahp in ("blahpd", "condor_ft-gahp"):
                knob, binary, _ = GAHPS[gahp]
                gahps[gahp] = (knob, config.get(knob) or (os.path.join(layout.gahp_dir, binary) if layout.gahp_dir else ""))
            self.add("config", True, "%s reads cleanly" % home_path(layout.config))
        except UserError as e:
            self.add("config", False, str(e), "fix that line, or run rvgahp setup again from the submit host")
            gahps = None
        for gahp in ("blahpd", "condor_ft-gahp"):
            if gahps is None:
                self.add(gahp, None, "not checked: the config does not read")
                continue
            knob, path = gahps[gahp]
            ok = bool(path) and os.path.isfile(path) and os.access(path, os.X_OK)
            self.add(
                gahp,
                ok,
                "%s = %s" % (knob, path)
                if ok
                else "%s = %s: %s" % (knob, path or "(unset)", "not set" if not path else "not an executable file"),
                "set %s in %s to the %s program (rvgahp setup --%s PATH does)"
                % (knob, home_path(layout.config), gahp, "blahpd" if gahp == "blahpd" else "ft-gahp"),
            )
        self.transport(layout)
        self.crontab()
        pid, pid_file = server_state()
        self.add(
            "server",
            pid is not None,
            "rvgahp_server runs as pid %s on %s" % (pid, host_tag())
            if pid is not None
            else "no rvgahp_server runs on %s (%s is not locked)" % (host_tag(), home_path(pid_file)),
            "start it: ~/bin/rvgahp_server -d",
        )
        self.last_login(layout)

    def transport(self, layout):
        path = layout.transport
        text = read_text(path)
        if text is None:
            self.add(
                "transport",
                False,
                "%s does not exist" % home_path(path),
                "run rvgahp setup again, or write it (rvgahp print transport prints it)",
            )
            self.add("known_hosts", None, "not checked: no transport")
            return
        ssh = parse_transport(text)
        if ssh is None:
            self.add("transport", None, "not checked: %s does not end in exec ssh ..." % home_path(path))
            return
        user_host, port, key, known = ssh
        host = user_host.rpartition("@")[2]
        if known:
            spec = host if not port or port == 22 else "[%s]:%d" % (host, port)
            found = run(["ssh-keygen", "-F", spec, "-f", os.path.expanduser(known)])
            self.add(
                "known_hosts",
                found.returncode == 0 and bool(found.stdout.strip()),
                "%s holds %s" % (known, spec) if found.returncode == 0 else "%s has no key for %s" % (known, spec),
                "run rvgahp setup again from the submit host; or on the submit host run ssh-keyscan %s%s and add its lines to %s"
                % ("-p %d " % port if port else "", host, known),
            )
        else:
            self.add("known_hosts", None, "not checked: the transport names no UserKnownHostsFile")
        if key:
            key_path = os.path.expanduser(key)
            mode = file_mode(key_path, None)
            if mode is None or mode & 0o077:
                self.add(
                    "transport",
                    False,
                    "the key %s %s" % (key, "does not exist" if mode is None else "is mode %o; ssh refuses a key others may read" % mode),
                    "run rvgahp setup again" if mode is None else "chmod 600 %s" % key,
                )
                return
        if last_link_line(layout)[1]:
            # A second login would only leave "standing by" and "link down" in the submit
            # host's proxy log, where an admin reads them as trouble; the live link proves it.
            self.add("transport", True, "%s: not tried again; the running server's link through it is up" % home_path(path))
            return
        done = run(["/bin/sh", path], timeout=40)
        said = [line for line in done.stderr.splitlines() if line.strip() and "rvgahp_proxy[" not in line]
        self.add(
            "transport",
            done.returncode not in (255, 124, 127),
            "%s logged in to %s with the key" % (home_path(path), user_host)
            if done.returncode not in (255, 124, 127)
            else "%s failed (exit %d): %s" % (home_path(path), done.returncode, last_line("\n".join(said))),
            "if the key was refused, run rvgahp setup again (it puts the key in the submit host's authorized_keys); "
            "if the host key changed, run it again too",
        )

    def crontab(self):
        done = run(["crontab", "-l"])
        lines = [line for line in done.stdout.splitlines() if "rvgahp_server" in line and not line.lstrip().startswith("#")]
        boot = any(line.split()[0] == "@reboot" for line in lines)
        periodic = any(not line.startswith("@") for line in lines)
        self.add(
            "crontab",
            boot and periodic,
            "the crontab starts rvgahp_server at boot and every 10 minutes"
            if boot and periodic
            else "the crontab lacks %s"
            % " and ".join(w for w, ok in (("the @reboot line", boot), ("the periodic line", periodic)) if not ok),
            "run rvgahp setup again, or crontab -e and add these lines (rvgahp print crontab prints them)",
        )

    def last_login(self, layout):
        path = layout.default_log
        if read_text(path) is None:
            self.add("last login", None, "not checked: no log at %s" % home_path(path))
            return
        last, good = last_link_line(layout)
        if last and last.startswith(("link up", "link active")) and not good:
            # The log's last word is the past: the server that said it is gone.
            pid = (read_text(layout.pid_file) or "").strip()
            last += " (but that server, pid %s, is not running now; start it: ~/bin/rvgahp_server -d)" % (pid or "?")
        self.add(
            "last login",
            good if last else None,
            last or "no login in %s yet" % home_path(path),
            "fix what it says (docs/troubleshooting.md lists the common ones); the server retries by itself",
        )

    # -- output

    def failed(self):
        return [c for c in self.checks if c["ok"] is False]

    def print(self, where):
        marks = {True: "✓", False: "✗", None: "-"}
        try:
            "✓✗".encode(sys.stdout.encoding or "ascii")
        except (UnicodeEncodeError, LookupError):
            marks = {True: "ok", False: "FAIL", None: "-"}
        sys.stdout.write("rvgahp doctor %s on %s\n" % (VERSION, where))
        for c in self.checks:
            sys.stdout.write("%s %s: %s\n" % (marks[c["ok"]], c["check"], c["detail"]))
            if c["fix"]:
                sys.stdout.write("    fix: %s\n" % c["fix"])
        bad = self.failed()
        sys.stdout.write("%d check%s failed\n" % (len(bad), "" if len(bad) == 1 else "s") if bad else "all checks passed\n")


def last_link_line(layout):
    """(the server log's last word on its link, whether that link is up now): up means the
    last word says so and the server that said it is still running."""
    last = None
    for line in (read_text(layout.default_log) or "").splitlines():
        said = line.split("]: ", 1)[-1]
        if said.startswith(("link up", "link active", "link attempt failed", "link down")):
            last = said
    up = last is not None and last.startswith(("link up", "link active"))
    return last, up and pid_is_running((read_text(layout.pid_file) or "").strip())


def pid_is_running(text):
    """Whether the pid in text (a pid file's) names a live process."""
    if not (text.isdigit() and 0 < len(text) < 10):
        return False
    try:
        os.kill(int(text), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def parse_forced_command(body):
    """(proxy, socket, problem) from an authorized_keys line of ours."""
    for line in body.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        if not line.startswith("restrict,"):
            return None, None, "the line lacks restrict"
        start = line.find('command="')
        if start < 0:
            return None, None, 'the line lacks command="..."'
        i = start + len('command="')
        out = []
        while i < len(line) and line[i] != '"':
            if line[i] == "\\" and i + 1 < len(line):
                i += 1
            out.append(line[i])
            i += 1
        try:
            words = shlex.split("".join(out))
        except ValueError:
            words = []
        if len(words) != 2:
            return None, None, "its command is not PROXY SOCKET"
        return words[0], words[1], None
    return None, None, "the block holds no key line"


def parse_transport(text):
    """(user@host, port, IdentityFile, UserKnownHostsFile) from a transport's exec ssh line."""
    joined = text.replace("\\\n", " ")
    for line in joined.splitlines():
        try:
            words = shlex.split(line, comments=True)
        except ValueError:
            continue
        if words[:2] != ["exec", "ssh"]:
            continue
        port = key = known = dest = None
        i = 2
        while i < len(words):
            w = words[i]
            if w in ("-o", "-p", "-i", "-l", "-F", "-J") and i + 1 < len(words):
                value = words[i + 1]
                if w == "-p":
                    port = int(value) if value.isdigit() else None
                elif w == "-i":
                    key = value
                elif w == "-o":
                    name, _, v = value.partition("=")
                    if name.lower() == "identityfile":
                        key = v
                    elif name.lower() == "userknownhostsfile":
                        known = v
                    elif name.lower() == "port" and v.isdigit():
                        port = int(v)
                i += 2
            elif w.startswith("-") or w == "$@":  # "$@": the cipher preference set above it
                i += 1
            else:
                dest = w
                break
        if dest:
            return dest, port, key, known
    return None


def doctor_main(args):
    parser = argparse.ArgumentParser(
        prog="rvgahp doctor", description="Check this host's rvgahp setup: one line per check, and a fix for each failure."
    )
    parser.add_argument("--json", action="store_true", help="one JSON object instead of lines")
    parser.add_argument("--socket", metavar="PATH", action="append", help="check this socket (default: those in ~/.ssh/authorized_keys)")
    parser.add_argument("-b", dest="basedir", metavar="BASEDIR", help="the cluster's HTCondor layout, as rvgahp_server -b")
    parser.add_argument("--version", action="version", version="rvgahp doctor %s" % VERSION)
    opts = parser.parse_args(args)
    home = os.path.expanduser("~")
    d = Doctor()
    sockets = opts.socket or [
        ident for ident in block_idents(read_text(os.path.join(home, ".ssh", "authorized_keys")) or "") if ident.startswith("/")
    ]
    layout = Layout(opts.basedir or os.environ.get("BLAHPD_LOCATION") or None)
    on_cluster = os.path.exists(layout.config) or os.path.exists(layout.transport)
    roles = []
    if sockets:
        roles.append("the submit host")
        d.submit([os.path.abspath(os.path.expanduser(s)) for s in sockets], home)
    if on_cluster:
        roles.append("the cluster")
        d.cluster(layout)
    if not roles:
        d.add(
            "setup",
            False,
            "found neither an rvgahp line in ~/.ssh/authorized_keys nor %s" % home_path(layout.config),
            "run rvgahp setup USER@CLUSTER on the submit host",
        )
    where = "%s (%s)" % (socket.gethostname(), " and ".join(roles) or "nothing set up")
    if opts.json:
        sys.stdout.write(
            json.dumps({"host": socket.gethostname(), "roles": roles, "ok": not d.failed(), "checks": d.checks}, indent=1) + "\n"
        )
    else:
        d.print(where)
    return 1 if d.failed() else 0


# --------------------------------------------------------------------------- printers


PRINT_USAGE = """\
usage: rvgahp print transport --socket PATH [--proxy PATH] [USER@]SUBMIT[:PORT]
       rvgahp print authorized-key --socket PATH [--proxy PATH] PUBKEY_FILE
       rvgahp print server-config --blahpd PATH --ft-gahp PATH
       rvgahp print crontab [--python PATH]

Print one file (or block) as rvgahp setup writes it, for a setup by hand:
  transport        the cluster's ~/.rvgahp/rvgahp_ssh
  authorized-key   the submit host's authorized_keys block for the cluster's key
  server-config    the lines for the cluster's ~/.rvgahp/condor_config.rvgahp
  crontab          the crontab lines rvgahp setup adds on the cluster
Each takes --help.
"""


def print_main(args):
    if args in (["--help"], ["-h"]):
        sys.stdout.write(PRINT_USAGE)
        return 0
    if args == ["--version"]:
        sys.stdout.write("rvgahp print %s\n" % VERSION)
        return 0
    if not args:
        sys.stderr.write(PRINT_USAGE)
        return 2
    if args[0] not in PRINTABLE:
        raise rvgahp.UsageError("unknown file %s: expected one of %s (rvgahp print --help)" % (args[0], ", ".join(PRINTABLE)))
    what, args = args[0], args[1:]
    parser = argparse.ArgumentParser(prog="rvgahp print " + what)
    parser.add_argument("--version", action="version", version="rvgahp print %s" % VERSION)
    home = os.path.expanduser("~")
    if what in ("transport", "authorized-key"):
        parser.add_argument("--socket", required=True, metavar="PATH", help="the socket on the submit host")
        proxy = os.path.join(home, "bin", "rvgahp_proxy")
        parser.add_argument("--proxy", default=proxy, metavar="PATH", help="rvgahp_proxy on the submit host (default %s)" % proxy)
    if what == "transport":
        parser.description = "The cluster's ~/.rvgahp/rvgahp_ssh, as rvgahp setup writes it."
        parser.add_argument("submit", metavar="[USER@]SUBMIT[:PORT]", help="the submit host as the cluster reaches it")
    elif what == "authorized-key":
        parser.description = "The submit host's authorized_keys block for the cluster's key, as rvgahp setup writes it."
        parser.add_argument("pubkey", metavar="PUBKEY_FILE", help="the cluster's public key (.pub), or - for stdin")
    elif what == "server-config":
        parser.description = "The lines rvgahp setup adds to the cluster's ~/.rvgahp/condor_config.rvgahp."
        parser.add_argument("--blahpd", required=True, metavar="PATH")
        parser.add_argument("--ft-gahp", required=True, metavar="PATH")
    else:
        parser.description = "The crontab lines rvgahp setup adds on the cluster."
        parser.add_argument("--python", metavar="PATH", help="start the server with this interpreter rather than the python3 on PATH")
    opts = parser.parse_args(args)
    if what == "transport":
        submit = parse_destination(opts.submit, "submit host", default_user=getpass.getuser())
        text = put_block(None, CLUSTER_IDENT, transport_text(submit, os.path.abspath(opts.socket), opts.proxy))
    elif what == "authorized-key":
        if opts.pubkey == "-":
            pubkey = sys.stdin.read()
        else:
            pubkey = read_text(opts.pubkey)
            if pubkey is None:
                raise UserError("cannot read %s" % opts.pubkey)
        sock = os.path.abspath(opts.socket)
        text = put_block("", sock, authorized_key_text(pubkey, sock, opts.proxy))
    elif what == "server-config":
        text = server_config_text(opts.blahpd, opts.ft_gahp)
    else:
        text = crontab_text(opts.python)
    sys.stdout.write(text)
    return 0


def main(args):
    """rvgahp's admin commands: args[0] is one of COMMANDS. Returns the exit status."""
    if not args or args[0] not in COMMANDS:
        what = "unknown command %s; " % args[0] if args else ""
        sys.stderr.write("rvgahp: %sexpected one of %s\n" % (what, ", ".join(COMMANDS)))
        return 2
    command, rest = args[0], args[1:]
    try:
        if command == "setup":
            return setup_main(rest)
        if command == "doctor":
            return doctor_main(rest)
        return print_main(rest)
    except rvgahp.UsageError as e:
        sys.stderr.write("rvgahp %s: %s\n" % (command, e))
        return 2
    except UserError as e:
        sys.stderr.write("rvgahp %s: %s\n" % (command, e))
        return 1
    except KeyboardInterrupt:
        sys.stderr.write("rvgahp %s: interrupted; run it again to finish\n" % command)
        return 130


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Writing files safely: atomic writes, destination checks, stale temporary files, run-folder locks.

* :func:`atomic_write` writes to a hidden temporary file next to the destination and renames
  it, so a destination is either its old self or the complete new file; a failed write (a full
  disk included) removes its temporary file and raises :class:`OutputError` naming the path.
* :func:`check_output_file` / :func:`check_output_folder` refuse a destination that cannot be
  written *before* any work is done (a path under a regular file, a folder given for a file,
  a folder one may not write in).
* Temporary files carry the writer's host and pid, so those of a killed process are found and
  removed (:func:`remove_stale_temporaries`) without touching a live writer's.
* :class:`RunLock` makes a run folder belong to one training run at a time.
"""

import errno
import hashlib
import json
import os
import re
import socket
import tempfile
import time

LOCK_NAME = ".lock"
_TMP_PATTERN = re.compile(r"^\.(?P<name>.+)\.(?P<host>[0-9a-f]{6})-(?P<pid>\d+)\.[A-Za-z0-9_]+\.tmp$")


class OutputError(OSError):
    """A destination that cannot be written; the message names the path and what to do."""

    def __init__(self, message, code=None):
        super().__init__(message)
        self.errno = code

    def __str__(self):
        return self.args[0]


class RunLockedError(RuntimeError):
    """Another live run owns the run folder."""


def _host_tag():
    return hashlib.sha1(socket.gethostname().encode()).hexdigest()[:6]


def pid_alive(pid):
    """Whether a process with this pid exists on this host."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        return True
    except OSError:
        return False
    return True


def explain_os_error(error, path, option=None, verb="write"):
    """One sentence for an OSError met while writing (``verb``) ``path``: what happened and what to do."""
    what = f"{option} {path!r}" if option else repr(path)
    code = getattr(error, "errno", None)
    if code in (errno.ENOSPC, errno.EDQUOT):
        return f"cannot {verb} {what}: the disk is full (no space left on device); free some space or write elsewhere"
    if code in (errno.EACCES, errno.EPERM):
        advice = "choose a folder you may write in" if verb == "write" else "check its permissions"
        return f"cannot {verb} {what}: permission denied; {advice}"
    if code == errno.EROFS:
        return f"cannot {verb} {what}: the file system is read-only; choose another place"
    if code == errno.ENOTDIR:
        return f"cannot {verb} {what}: a part of the path is a file, not a folder; choose another path"
    if code == errno.EISDIR:
        return f"cannot {verb} {what}: it is a folder; give a file name"
    detail = getattr(error, "strerror", None) or str(error) or type(error).__name__
    return f"cannot {verb} {what}: {detail}"


def _is_disk_full(error):
    text = str(error)
    return "No space left on device" in text or "[Errno 28]" in text or "Disk quota exceeded" in text


class _RecordingFile:
    """A file proxy that remembers the OSError of a failed write: torch's zip writer turns it
    into a RuntimeError ("[enforce fail at inline_container.cc...] file write failed")."""

    def __init__(self, f):
        self._f, self.error = f, None

    def write(self, data):
        try:
            return self._f.write(data)
        except OSError as error:
            self.error = error
            raise

    def __getattr__(self, name):
        return getattr(self._f, name)


def temporary_name(path):
    """The prefix and suffix of ``path``'s temporary files (host tag and pid included)."""
    return f".{os.path.basename(path)}.{_host_tag()}-{os.getpid()}.", ".tmp"


def remove_stale_temporaries(folder, name=None):
    """Removes the temporary files in ``folder`` (of destination ``name``, or of any) left by a
    process of this host that no longer runs; returns their paths."""
    removed = []
    try:
        entries = os.listdir(folder)
    except OSError:
        return removed
    host = _host_tag()
    for entry in entries:
        match = _TMP_PATTERN.match(entry)
        if not match or (name is not None and match["name"] != name) or match["host"] != host:
            continue
        pid = int(match["pid"])
        if pid == os.getpid() or pid_alive(pid):
            continue
        try:
            os.unlink(os.path.join(folder, entry))
            removed.append(os.path.join(folder, entry))
        except OSError:
            pass
    return removed


def atomic_write(path, write, option=None):
    """Calls ``write(file)`` on a temporary file next to ``path``, then renames it to ``path``:
    an interrupted or failed write leaves no half-written file under the final name, and its
    temporary file is removed. Errors of the file system raise :class:`OutputError` naming
    ``path`` (and ``option``, the command-line option it came from, when given)."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        remove_stale_temporaries(folder, os.path.basename(path))
        prefix, suffix = temporary_name(path)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=prefix, suffix=suffix)
    except OSError as error:
        raise OutputError(explain_os_error(error, path, option), error.errno) from error
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; give the usual permissions
        with os.fdopen(fd, "wb") as raw:
            f = _RecordingFile(raw)
            try:
                write(f)
            except RuntimeError as error:  # torch.save's zip writer hides the OSError
                if f.error is not None:
                    raise f.error from error
                if _is_disk_full(error):
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)) from error
                if "file write failed" in str(error) or "enforce fail" in str(error):
                    raise OSError(errno.EIO, f"the write failed ({str(error).strip().splitlines()[0]})") \
                        from error
                raise
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(error, OSError) and not isinstance(error, OutputError):
            raise OutputError(explain_os_error(error, path, option), error.errno) from error
        raise


def _first_existing(path):
    """The nearest existing path among ``path`` and its parents."""
    path = os.path.abspath(path)
    while not os.path.lexists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def _check_parent_chain(path, option, target):
    existing = _first_existing(os.path.dirname(os.path.abspath(path)))
    if not os.path.isdir(existing):
        raise OutputError(f"cannot write {option} {path!r}: {existing!r} is a file, not a folder; "
                          f"choose another {target}", errno.ENOTDIR)
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write {option} {path!r}: permission denied in {existing!r}; "
                          f"choose a folder you may write in", errno.EACCES)


def check_output_file(path, option):
    """Refuses, before any work, a file destination that cannot be written."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise OutputError(f"cannot write {option} {path!r}: it is a folder; give the path of a file (the folder is "
                          f"left as it is)", errno.EISDIR)
    _check_parent_chain(path, option, "file name")
    return path


def check_output_folder(path, option):
    """Refuses, before any work, a folder destination that cannot be created or written in."""
    path = os.fspath(path)
    if os.path.lexists(path) and not os.path.isdir(path):
        raise OutputError(f"cannot write {option} {path!r}: it is a file, and a folder is needed here; "
                          f"choose another name (the file is left as it is)", errno.ENOTDIR)
    if os.path.isdir(path):
        if not os.access(path, os.W_OK | os.X_OK):
            raise OutputError(f"cannot write in {option} {path!r}: permission denied; choose a folder you may "
                              f"write in", errno.EACCES)
    else:
        _check_parent_chain(path, option, "folder")
    return path


class RunLock:
    """``<folder>/.lock`` holding the owner's pid and host while a run writes into ``folder``.

    A second run refuses while the owner lives; a lock whose owner is gone (a killed run on
    this host) is taken over, with a note through ``on_stale``. Releasing removes the lock, and
    the folder itself when this lock created it and nothing else was written there.
    """

    def __init__(self, folder, option="--out", on_stale=None):
        self.folder, self.option, self.on_stale = os.fspath(folder), option, on_stale
        self.path = os.path.join(self.folder, LOCK_NAME)
        self.created = []
        self.held = False

    def _make_folders(self):
        missing, path = [], os.path.abspath(self.folder)
        while not os.path.lexists(path):
            missing.append(path)
            path = os.path.dirname(path)
        try:
            os.makedirs(self.folder, exist_ok=True)
        except OSError as error:
            raise OutputError(explain_os_error(error, self.folder, self.option), error.errno) from error
        self.created = missing  # innermost first

    def _try_create(self, record):
        """Writes the lock atomically (a complete record or nothing); False when one exists."""
        prefix, suffix = temporary_name(self.path)
        fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=prefix, suffix=suffix)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(record, f)
            try:
                os.link(tmp, self.path)  # fails if the lock exists
                return True
            except FileExistsError:
                return False
            except OSError:  # a file system without hard links
                try:
                    fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                except FileExistsError:
                    return False
                with os.fdopen(fd, "w") as f:
                    json.dump(record, f)
                return True
        finally:
            os.unlink(tmp)

    def _read(self):
        try:
            with open(self.path) as f:
                record = json.load(f)
            return record if isinstance(record, dict) else {}
        except (OSError, ValueError):
            return {}

    def acquire(self):
        self._make_folders()
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        try:
            for _ in range(3):
                if self._try_create(record):
                    self.held = True
                    return self
                owner = self._read()
                pid, host = owner.get("pid"), owner.get("host")
                if not os.path.exists(self.path):
                    continue  # released meanwhile: try again
                if host != socket.gethostname() or not isinstance(pid, int):
                    where = f"pid {pid} on host {host}" if host else "an unknown process"
                    raise RunLockedError(
                        f"{self.option} {self.folder!r} is locked by {where} ({self.path!r}); if no run is "
                        f"writing there any more, delete {self.path!r} and try again, or choose another "
                        f"{self.option}")
                if pid == os.getpid() or pid_alive(pid):
                    raise RunLockedError(
                        f"{self.option} {self.folder!r} is in use by another training run (pid {pid}); wait for it "
                        f"to finish, or choose another {self.option}")
                if self.on_stale is not None:
                    self.on_stale(f"taking over the lock of a run that no longer runs (pid {pid}) in "
                                  f"{self.folder!r}")
                try:
                    os.unlink(self.path)
                except FileNotFoundError:
                    pass
            raise RunLockedError(f"could not lock {self.option} {self.folder!r}: another run is starting there")
        except BaseException as error:
            self._remove_created()
            if isinstance(error, OSError) and not isinstance(error, OutputError):
                raise OutputError(explain_os_error(error, self.path, self.option), error.errno) from error
            raise

    def _remove_created(self):
        for path in self.created:  # innermost first; only folders that are still empty
            try:
                os.rmdir(path)
            except OSError:
                break
        self.created = []

    def release(self):
        if self.held:
            if self._read().get("pid") == os.getpid():
                try:
                    os.unlink(self.path)
                except FileNotFoundError:
                    pass
            self.held = False
        self._remove_created()

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()

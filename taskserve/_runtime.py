"""Where processes keep their runtime files: one private directory per store.

The SQLite queue's wake-up sockets and every worker's scratch directory (uploaded files)
live in ``<base>/taskserve-<uid>-<hash of the store>``, where base is
``$TASKSERVE_RUNTIME_DIR``, else ``$XDG_RUNTIME_DIR``, else the temp directory. Processes of
the same store on one machine must agree on it, so it is derived from the store alone: the
absolute SQLite path, or the Redis URL without its password, plus the key prefix.

The directory is private (0700, ours, not a link): whoever can write to it receives the
wake-ups, which carry task ids, so one made by anybody else is refused rather than used.
Each process removes what it made when it exits cleanly, and the directory itself once it
is empty; what a ``kill -9`` left is swept by the next process (see ``scratch_dir``).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import socket
import stat
import tempfile
from collections.abc import Callable, Iterator
from typing import TypeVar
from urllib.parse import parse_qs, urlparse

T = TypeVar("T")

SCRATCH = "worker-"
METRICS = "metrics-"  # a supervisor's PROMETHEUS_MULTIPROC_DIR, locked and swept as a scratch directory is
LOCKS = "locks-"  # a supervisor's lock stamps (queue/_sqlite_lockstamps.py), the same way
# A Unix socket's path holds at most 107 bytes: base + "/taskserve-UID-HASH/" + a socket's name.
MAX_BASE = 50


class RuntimeDirError(PermissionError):
    """The runtime directory exists but is not private to this user: it is not used."""


def base_dir() -> str:
    chosen = os.environ.get("TASKSERVE_RUNTIME_DIR")
    if chosen:
        if not os.path.isabs(chosen) or len(chosen) > MAX_BASE:
            raise RuntimeDirError(
                f"TASKSERVE_RUNTIME_DIR must be an absolute path of at most {MAX_BASE} bytes "
                f"(Unix socket paths are short); got {chosen!r}."
            )
        return chosen
    for value in (os.environ.get("XDG_RUNTIME_DIR"), tempfile.gettempdir()):
        if value and os.path.isabs(value) and len(value) <= MAX_BASE and os.path.isdir(value):
            return value
    return "/tmp"


def sqlite_key(path: str) -> str:
    return "sqlite:" + os.path.abspath(path)


def store_key(url: str) -> str:
    """What identifies the store a broker URL names, without any secret in it."""
    parsed = urlparse(url)
    if parsed.scheme == "sqlite":
        from .queue._sqlite_schema import db_path

        return sqlite_key(db_path(url))
    prefix = parse_qs(parsed.query).get("prefix", ["taskserve"])[-1]
    host = f"{parsed.hostname or ''}:{parsed.port or ''}"
    return f"{parsed.scheme}://{parsed.username or ''}@{host}{parsed.path}#{prefix}"


def runtime_dir(key: str) -> str:
    """The path of the store's runtime directory (not created)."""
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return os.path.join(base_dir(), f"taskserve-{os.getuid()}-{digest}")


def check_private(path: str) -> bool:
    """True if ``path`` is a private directory of ours, False if it does not exist; else raise."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a directory"
        raise RuntimeDirError(
            f"Refusing the runtime directory {path}: it must be a directory owned by uid {os.getuid()} with "
            f"mode 0700, and it is {kind} owned by uid {st.st_uid} with mode {stat.S_IMODE(st.st_mode):o}. "
            "Remove it, or set TASKSERVE_RUNTIME_DIR to a private directory."
        )
    return True


def ensure(key: str) -> str:
    """Create the store's runtime directory (0700) or check the one there; returns its path."""
    path = runtime_dir(key)
    if not check_private(path):
        with contextlib.suppress(FileExistsError):
            os.mkdir(path, 0o700)
        check_private(path)  # made by somebody else in between
    return path


def using(key: str, use: Callable[[str], T]) -> T:
    """``use(directory)``, again if another process removed the (empty) directory meanwhile."""
    for _ in range(5):
        try:
            return use(ensure(key))
        except FileNotFoundError:
            continue
    return use(ensure(key))


def remove_if_empty(path: str) -> None:
    with contextlib.suppress(OSError):  # not empty: another process still uses it
        os.rmdir(path)


def _lock(path: str) -> int | None:
    """An fd holding an exclusive lock on ``path``, or None if a live process holds it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def sweep(directory: str) -> int:
    """Remove what processes killed without cleaning up left in a runtime directory; returns how many.

    A scratch directory goes once nobody holds its lock (a lock dies with its holder, however
    it died); a socket once nobody is bound to it (connecting is refused).
    """
    swept = 0
    with contextlib.suppress(FileNotFoundError):
        for name in os.listdir(directory):
            path = os.path.join(directory, name)
            if name.startswith((SCRATCH, METRICS, LOCKS)):
                fd = _lock(path)
                if fd is None:
                    continue
                try:
                    shutil.rmtree(path, ignore_errors=True)
                    swept += 1
                finally:
                    os.close(fd)
            elif name.endswith(".sock") and not _bound(path):
                with contextlib.suppress(OSError):
                    os.unlink(path)
                    swept += 1
    return swept


def _bound(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            return False
        except OSError:
            pass  # not ours to judge
    return True


def sweep_all() -> None:
    """Sweep every runtime directory of this user (other stores' too), removing the empty ones.

    Stores that a kill left files for may never be used again (a test's, a soak's), so a
    start-up cleans up after all of them; their directories are private to us, so this is safe.
    """
    base = base_dir()
    prefix = f"taskserve-{os.getuid()}-"
    with contextlib.suppress(OSError):
        for name in os.listdir(base):
            path = os.path.join(base, name)
            if not name.startswith(prefix):
                continue
            try:
                check_private(path)
            except RuntimeDirError:
                continue
            sweep(path)
            remove_if_empty(path)


@contextlib.contextmanager
def scratch_dir(key: str, prefix: str = SCRATCH) -> Iterator[str]:
    """A private scratch directory for one worker process, under the store's runtime directory.

    It is created under a hidden name, locked (``flock``, held for the process's life) and only
    then given its ``worker-`` name, so a sweeper never takes a live worker's directory.
    """

    def make(parent: str) -> tuple[str, int]:
        sweep(parent)
        hidden = tempfile.mkdtemp(prefix="." + prefix, dir=parent)
        fd = _lock(hidden)
        assert fd is not None  # nobody else knows its name yet
        path = os.path.join(parent, os.path.basename(hidden)[1:])
        os.rename(hidden, path)
        return path, fd

    path, fd = using(key, make)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
        os.close(fd)
        remove_if_empty(os.path.dirname(path))

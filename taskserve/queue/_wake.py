"""Wake-ups between processes on one machine, for the SQLite queue.

SQLite has no way to tell another process that a row changed, and polling it hard costs
a core. Each process that waits binds a Unix datagram socket in the store's private runtime
directory (``_runtime``); writers send a few bytes to every socket of the right role after
they commit. A lost datagram only costs latency: every waiter also polls with back-off.
Messages carry task ids, so a directory that is not private to this user is never used.

Messages: ``w`` (new work), ``c:ID`` (task cancelled), ``d:ID`` (task reached a terminal state).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable

from .. import _runtime

WORKER = "w"
API = "a"
logger = logging.getLogger("taskserve.queue")


class Waker:
    def __init__(self, db_path: str) -> None:
        # Socket paths hold ~100 bytes, so they live in the store's runtime dir, not beside the db.
        self.key = _runtime.sqlite_key(db_path)
        self.dir = _runtime.runtime_dir(self.key)
        _runtime.check_private(self.dir)  # refuse a foreign one now, clearly, not at the first wake-up
        self._send_sock: socket.socket | None = None
        self._peers: dict[str, list[str]] = {}
        self._listed_at = 0.0
        self._mtime = 0
        self._own: dict[str, socket.socket] = {}
        self._pending: dict[str, set[bytes]] = {}
        self._flush_scheduled = False

    # -- sending ---------------------------------------------------------------------------

    def send(self, role: str, message: bytes) -> None:
        """Queue a message for every process of ``role``; sent once per event-loop turn."""
        self._pending.setdefault(role, set()).add(message)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            try:
                asyncio.get_running_loop().call_soon(self.flush)
            except RuntimeError:
                self.flush()

    def flush(self) -> None:
        self._flush_scheduled = False
        pending, self._pending = self._pending, {}
        for role, messages in pending.items():
            for path in self._list(role):
                for message in messages:
                    if not self._send_one(path, message):
                        break

    def _list(self, role: str) -> list[str]:
        # A new listener changes the directory's mtime, so it is heard from at once.
        try:
            mtime = os.lstat(self.dir).st_mtime_ns
        except FileNotFoundError:
            return []
        now = time.monotonic()
        if mtime != self._mtime or now - self._listed_at > 5.0:
            self._listed_at = now
            self._mtime = mtime
            self._peers = {}
            try:
                _runtime.check_private(self.dir)  # made by someone else since: send them nothing
            except _runtime.RuntimeDirError as exc:
                logger.error("%s Wake-ups are not sent; waiting processes poll instead.", exc)
                return []
            with contextlib.suppress(FileNotFoundError):
                for name in os.listdir(self.dir):
                    if name.endswith(".sock"):
                        self._peers.setdefault(name[0], []).append(os.path.join(self.dir, name))
        return self._peers.get(role, [])

    def _send_one(self, path: str, message: bytes) -> bool:
        if self._send_sock is None:
            self._send_sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self._send_sock.setblocking(False)
        try:
            self._send_sock.sendto(message, path)
        except BlockingIOError:
            return False  # its buffer is full: it has plenty to wake up for already
        except (ConnectionRefusedError, FileNotFoundError):
            # The process behind it died without cleaning up (kill -9).
            with contextlib.suppress(OSError):
                os.unlink(path)
            self._listed_at = 0.0
            return False
        except OSError:
            return False
        return True

    # -- receiving -------------------------------------------------------------------------

    def listen(self, role: str, on_message: Callable[[bytes], None]) -> None:
        """Bind this process's socket for ``role`` and call ``on_message`` for each datagram."""
        if role in self._own:
            return
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)

        def bind(directory: str) -> None:
            sock.bind(os.path.join(directory, f"{role}-{os.getpid()}-{os.urandom(3).hex()}.sock"))

        try:
            _runtime.using(self.key, bind)
        except BaseException:
            sock.close()
            raise
        sock.setblocking(False)
        self._own[role] = sock
        self._listed_at = 0.0

        def readable() -> None:
            while True:
                try:
                    data = sock.recv(4096)
                except (BlockingIOError, InterruptedError):
                    return
                except OSError:
                    return
                on_message(data)

        asyncio.get_running_loop().add_reader(sock.fileno(), readable)

    def close(self) -> None:
        for sock in self._own.values():
            path = sock.getsockname()
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(sock.fileno())
            sock.close()
            with contextlib.suppress(OSError):
                os.unlink(path)
        if self._own:
            _runtime.sweep(self.dir)
            _runtime.remove_if_empty(self.dir)
        self._own.clear()
        if self._send_sock is not None:
            self._send_sock.close()
            self._send_sock = None

"""One writer per rank directory: an exclusive, advisory lock file held for the whole fit.

``rank-<r>/writer.lock`` is locked with ``fcntl.flock`` (exclusive, non-blocking) and holds a
line of JSON naming its holder (pid, host, start time, log directory); releasing deletes it.
The kernel releases a ``flock`` when its process dies, however it dies (SIGKILL included), so
a lock file that still names a holder but can be locked is stale: it is taken over and the
takeover is reported (a warning). A live holder makes a second writer fail at once with :class:`LogLockedError`
naming it, before it touches a single file of the log.

On network filesystems ``flock`` is only as good as the server's lock support (NFSv4 and
Lustre honour it; some FUSE filesystems do not).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import time
import warnings
from pathlib import Path
from typing import Any

from lightning_influence.log.format import LOCK_FILE, RANK_DIR

try:  # POSIX only: on other systems the lock is not enforced (a warning says so once)
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]


class LogLockedError(RuntimeError):
    """Another live process holds the writer lock of a rank directory of this log."""


def describe_holder(info: dict[str, Any]) -> str:
    """``pid 123 on host h, started 2026-11-29 22:10:05 UTC`` from a lock file's JSON."""
    started = info.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(started)) if isinstance(started, (int, float)) else "?"
    return f"pid {info.get('pid', '?')} on host {info.get('host', '?')}, started {when}"


class WriterLock:
    """The exclusive writer lock of one rank directory (``acquire`` / ``release``, or a context manager).

    Args:
        log_dir: the log directory.
        rank: the rank whose folder is locked.

    Raises:
        LogLockedError: from :meth:`acquire`, when another live process (or another writer in
            this process) holds the lock; the message names the holder.
    """

    def __init__(self, log_dir: str | os.PathLike, rank: int = 0) -> None:
        self.path = Path(log_dir) / RANK_DIR.format(rank=rank) / LOCK_FILE
        self._fd: int | None = None
        self.took_over: dict[str, Any] | None = None  # the stale holder this lock was taken from

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> "WriterLock":
        if self._fd is not None:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                self._lock(fd)
            except BaseException:
                os.close(fd)
                raise
            try:  # the holder we waited for may have released it by deleting the file: lock the file now there
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        try:
            previous = _read(fd)
            if previous.get("pid") is not None:  # the file names a holder, yet the lock was free: it died
                self.took_over = previous
                warnings.warn(
                    f"{self.path}: taking over a stale writer lock of {describe_holder(previous)}, which ended "
                    "without releasing it (killed or crashed); steps it had not written are not in the log",
                    RuntimeWarning, stacklevel=2)
            info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
                    "log_dir": str(Path(self.path.parent.parent).resolve())}
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return self

    def _lock(self, fd: int) -> None:
        """``flock`` ``fd`` without waiting, or raise :class:`LogLockedError` naming the holder."""
        if fcntl is None:  # pragma: no cover - Windows
            warnings.warn("InfluenceTracker: no fcntl on this system, the log's writer lock is not enforced")
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            holder = _read(fd)
            mine = holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname()
            raise LogLockedError(
                f"{self.path.parent.parent}: rank {self.path.parent.name.split('-')[-1]} of this influence log is being "
                f"written by {'another writer in this process' if mine else 'another process'} ({describe_holder(holder)}). "
                "Two writers would interleave their steps, so this fit touched nothing. Wait for that fit to end (or "
                "stop it), or give this fit another log_dir.") from None

    def release(self) -> None:
        """Delete the lock file and unlock; harmless when not held.

        The file goes first, then the lock: a writer that opened the old file meanwhile sees
        that it no longer is the file at the path and locks the new one (``acquire``).
        """
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        except OSError:  # a read-only folder: leave an empty file, a cleanly released lock
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
        finally:
            os.close(fd)  # closing the descriptor releases the flock

    def __enter__(self) -> "WriterLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def __del__(self) -> None:  # a writer dropped without close: do not keep the folder locked
        self.release()


def writer_state(log_dir: str | os.PathLike, rank: int = 0) -> tuple[str, dict[str, Any]]:
    """``("live" | "gone" | "unknown" | "none", holder)``: whether the process a rank's lock file names still runs.

    Read without locking (a reader must never make a starting writer fail), the holder's pid checked on this host:
    ``"unknown"`` for another host, ``"none"`` without a lock file naming a holder (a writer that ended normally)."""
    path = Path(log_dir) / RANK_DIR.format(rank=rank) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return "none", {}
    try:
        holder = _read(fd)
    finally:
        os.close(fd)
    pid = holder.get("pid")
    if not isinstance(pid, int):
        return "none", holder
    if holder.get("host") != socket.gethostname():
        return "unknown", holder
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return "gone", holder
    except OSError:  # it exists, owned by another user
        pass
    return "live", holder


def _read(fd: int) -> dict[str, Any]:
    try:
        data = os.pread(fd, 4096, 0)
        out = json.loads(data.decode()) if data.strip() else {}
        return out if isinstance(out, dict) else {}
    except (OSError, ValueError):
        return {}

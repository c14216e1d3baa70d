"""The ``RUNNING`` lock of a fold: one process trains a fold, on this machine or another.

The lock is a small JSON file, ``fold_<i>/RUNNING``: ``host``, ``pid``, ``pidns`` (the PID
namespace), ``started`` and ``heartbeat`` (Unix times) and a random ``token``. It is
created whole and atomically (written under a temporary name, then ``os.link``-ed onto
``RUNNING``, which fails when the file exists), so of two processes only one takes it. While
the fold trains, a background thread rewrites it every ``HEARTBEAT_S`` seconds (temporary
file and ``os.replace``), with a fresh ``heartbeat``.

A lock is *live* when its process is running: on this machine (same host name and PID
namespace) when its pid is alive; on another machine when its heartbeat is younger than
``STALE_AFTER`` intervals. ``ek cv`` skips a fold with a live lock and takes over a stale
one. A takeover is itself exclusive: the taker first links a marker named after the stale
lock's token, then checks that the lock still holds that token, then replaces it.

What this needs from the file system: atomic ``link`` (fails on an existing name) and
``rename``, visible to every machine at once (NFSv3+ and most cluster file systems; not an
eventually consistent object store), and clocks that agree to well within a heartbeat
interval (NTP), because another machine's heartbeat is compared with this one's clock.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import tempfile
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from ..files import digest_bytes, process_alive, write_text

log = logging.getLogger(__name__)

HEARTBEAT_S = 30.0
STALE_AFTER = 5  # intervals without a beat before another machine's lock is stale (NFS caches
# a file's attributes and name lookups for up to 60 s: 30 + 60 s of apparent age is normal)
MARKER_TIMEOUT_S = 60.0  # a takeover marker older than this was left by a crashed taker


@dataclass(frozen=True)
class LockInfo:
    """Who holds a fold's lock."""

    host: str
    pid: int
    pidns: str
    started: float
    heartbeat: float
    token: str

    def describe(self) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        beat = max(0.0, time.time() - self.heartbeat)
        return f"host {self.host}, pid {self.pid}, since {since}, heartbeat {beat:.0f} s ago"


def this_process() -> LockInfo:
    """A fresh lock for the calling process."""
    now = time.time()
    return LockInfo(socket.gethostname(), os.getpid(), _pidns(), now, now, uuid.uuid4().hex)


def read_lock(path: Path) -> LockInfo | None:
    """The lock at ``path``; None when there is none.

    A file that is not a lock of this format (an older ``ek``'s bare pid, garbage) reads as
    a lock of this host whose heartbeat is the file's mtime.
    """
    try:
        raw = Path(path).read_bytes()
        mtime = os.stat(path).st_mtime
    except FileNotFoundError:
        return None
    try:
        return LockInfo(**json.loads(raw))
    except (ValueError, TypeError):
        text = raw.decode(errors="replace").strip()
        pid = int(text) if text.isdigit() else 0
        return LockInfo(socket.gethostname(), pid, _pidns(), mtime, mtime, digest_bytes(raw))


def is_live(info: LockInfo, interval: float = HEARTBEAT_S) -> bool:
    """Whether the lock's process still runs (see the module docstring)."""
    if info.host == socket.gethostname() and info.pidns == _pidns():
        started = _process_start(info.pid)
        reused = started is not None and started > info.started + 5.0  # a later process
        return process_alive(info.pid) and not reused
    return time.time() - info.heartbeat < STALE_AFTER * interval


class FoldLock:
    """A held lock; its heartbeat thread runs between :meth:`start` and :meth:`release`.

    Use as a context manager. ``lost`` turns true when another process took the lock over
    (it judged this one stale); the holder should then not write its results.
    """

    def __init__(self, path: Path, info: LockInfo, interval: float):
        self.path, self.info, self.interval = Path(path), info, interval
        self.lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat {path}", daemon=True)

    def start(self) -> FoldLock:
        self._thread.start()
        return self

    def release(self) -> None:
        """Stop the heartbeat and remove the lock if it is still this process's."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        current = read_lock(self.path)
        if current is not None and current.token == self.info.token:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> FoldLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            current = read_lock(self.path)
            if current is None or current.token != self.info.token:
                self.lost = True
                holder = current.describe() if current else "nobody"
                log.warning("%s: this process lost the lock (now %s)", self.path, holder)
                return
            beat = LockInfo(**{**asdict(self.info), "heartbeat": time.time()})
            write_text(self.path, json.dumps(asdict(beat)))


def acquire(path: Path, interval: float = HEARTBEAT_S) -> FoldLock | LockInfo:
    """Take the lock at ``path`` (taking over a stale one), or say who holds it.

    Returns:
        A started :class:`FoldLock`, or the :class:`LockInfo` of the live holder.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tries = 0
    while True:
        mine = this_process()
        if _create(path, mine):
            return FoldLock(path, mine, interval).start()
        held = read_lock(path)
        if held is None:
            continue  # released in between: try again
        tries += 1
        if is_live(held, interval) or tries > 5:
            return held  # live, or being taken over by another process
        log.warning("%s: taking over a stale lock (%s)", path, held.describe())
        if _take_over(path, held, mine):
            return FoldLock(path, mine, interval).start()


def _create(path: Path, info: LockInfo) -> bool:
    """Link a complete lock file onto ``path``; False when ``path`` exists."""
    tmp = _write_temp(path, info)
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)


def _take_over(path: Path, stale: LockInfo, mine: LockInfo) -> bool:
    """Replace the stale lock by ours unless another process is taking it over too."""
    marker = path.with_name(f"{path.name}.takeover-{stale.token}")
    if not _create(marker, mine):
        try:
            if time.time() - os.stat(marker).st_mtime > MARKER_TIMEOUT_S:
                marker.unlink(missing_ok=True)  # its taker died before finishing
        except FileNotFoundError:
            pass
        return False
    try:
        current = read_lock(path)
        if current is None or current.token != stale.token:
            return False  # released or taken over meanwhile
        tmp = _write_temp(path, mine)
        os.replace(tmp, path)
        return True
    finally:
        marker.unlink(missing_ok=True)


def _write_temp(path: Path, info: LockInfo) -> Path:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w") as fh:
        fh.write(json.dumps(asdict(info)))
    return Path(tmp)


def _process_start(pid: int) -> float | None:
    """Unix time a process started (Linux ``/proc``); None where unknown."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        boot = next(
            float(line.split()[1])
            for line in Path("/proc/stat").read_text().splitlines()
            if line.startswith("btime ")
        )
        return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def _pidns() -> str:
    """This process's PID namespace (containers on one host differ); '' where unknown."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""

"""Atomic writes and content digests.

Every file a later step trusts is written to a temporary name in the same folder and
renamed into place, so a killed run never leaves a half-written file under the real name.
Files that belong together (a submission CSV and its JSON) are renamed by
:func:`atomic_group`, a folder of them (a report) by :func:`staged_folder`. Temporary files
are created with the umask's mode, as an ordinary ``open`` would (``mkstemp`` alone gives
0600). A full disk or a read-only folder is an :class:`EkError` naming the path.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import WRITE_ERRNOS, EkError, os_error


def umask_mode(base: int = 0o666) -> int:
    """``base`` less the process's umask: the mode ``open`` gives a new file."""
    mask = os.umask(0)
    os.umask(mask)
    return base & ~mask


@contextlib.contextmanager
def user_errors(path: Path | str | None = None, needed_bytes: int | None = None) -> Iterator[None]:
    """Turn a full disk, read-only folder or missing permission into a one-line
    :class:`EkError` naming ``path`` (else the error's file), with ``needed_bytes`` shown for
    a full disk."""
    try:
        yield
    except OSError as err:
        if err.errno not in WRITE_ERRNOS:
            raise
        named = OSError(err.errno, err.strerror, str(path) if path else err.filename)
        raise os_error(named, needed_bytes) or err from None


def _temp_beside(path: Path, suffix: str = ".tmp") -> Path:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    os.chmod(tmp, umask_mode())
    return Path(tmp)


@contextlib.contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` on success.

    On an exception the temporary file is removed and ``path`` is left untouched.
    """
    path = Path(path)
    with user_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp_path = _temp_beside(path)
    try:
        with user_errors(path):
            yield tmp_path
            os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_group(*paths: Path | str) -> Iterator[list[Path]]:
    """Yield temporary paths for files that belong together; put them in place as one unit.

    The last path is the *seal* (a submission's JSON beside its CSV): it is removed before
    the others are renamed into place and renamed last itself, so a run killed at any point
    leaves either the old set, or new files without a seal, never a seal beside files it
    does not describe. On an exception the temporary files go and nothing changes.
    """
    finals = [Path(p) for p in paths]
    temps: list[Path] = []
    try:
        with user_errors():
            for final in finals:
                final.parent.mkdir(parents=True, exist_ok=True)
                temps.append(_temp_beside(final))
            yield temps
            finals[-1].unlink(missing_ok=True)
            for tmp, final in zip(temps, finals):
                os.replace(tmp, final)
    finally:
        for tmp in temps:
            tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def staged_folder(folder: Path | str) -> Iterator[Path]:
    """Yield an empty staged folder beside ``folder``; swap it in for ``folder`` on success.

    The old folder is renamed aside, the staged one renamed into place, then the old one
    removed, so ``folder`` is at every moment either the complete old or the complete new
    one (a kill between the two renames leaves no ``folder``, never a mix). On an exception
    the staged folder is removed and ``folder`` is untouched.
    """
    folder = Path(folder)
    with user_errors(folder):
        folder.parent.mkdir(parents=True, exist_ok=True)
        staged = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
        os.chmod(staged, umask_mode(0o777))
    old = staged.with_name(staged.name.replace(".tmp", ".old"))
    try:
        with user_errors(folder):
            yield staged
            if folder.exists():
                os.replace(folder, old)
            os.replace(staged, folder)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def exclusive_lock(path: Path | str, what: str) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` for the block, or refuse in one line.

    The kernel drops the lock when the process ends however it ends, so a killed run never
    leaves a stale lock. ``path`` keeps the holder's pid for the message.

    Raises:
        EkError: ``<path>: another <what> is running (pid N); wait for it to finish``.
    """
    path = Path(path)
    with user_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(path, "a+")
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "?"
            raise EkError(
                f"{path}: another {what} is running (pid {holder}); wait for it to finish"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        yield


def write_text(path: Path | str, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: Path | str, data: Any) -> None:
    """Write ``data`` as indented JSON atomically."""
    write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: Path | str) -> Any:
    """A JSON file's content; an unreadable or truncated file is an :class:`EkError` naming it."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise EkError(
            f"{path}: corrupt JSON ({err}); delete it and rerun the step that writes it"
        ) from None


def digest_bytes(data: bytes) -> str:
    """Short sha256 hex digest of bytes."""
    return hashlib.sha256(data).hexdigest()[:16]


def digest_file(path: Path | str, chunk: int = 1 << 22) -> str:
    """Short sha256 hex digest of a file's content, read in chunks."""
    sha = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            sha.update(block)
    return sha.hexdigest()[:16]


def digest_json(data: Any) -> str:
    """Digest of a JSON-serialisable value, independent of key order."""
    return digest_bytes(json.dumps(data, sort_keys=True, default=str).encode())


def process_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this machine (owned by anyone)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user
    return True

"""The one exception type for errors a user can cause."""

from __future__ import annotations

import errno


class EkError(Exception):
    """A user-facing error: bad config, missing record, corrupt file, mismatched OOF.

    The CLI prints ``str(error)`` as one line and exits with code 2.
    """

    exit_code = 2


# errno values a user causes (a full disk, a read-only or unwritable folder, a missing file)
USER_ERRNOS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENOENT: "no such file or folder",
    errno.EISDIR: "is a folder",
    errno.ENOTDIR: "not a folder",
}

# those of them a write causes: full disk, read-only or unwritable folder
WRITE_ERRNOS = frozenset((errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM))


def os_error(error: OSError, needed_bytes: int | None = None) -> EkError | None:
    """The one-line :class:`EkError` for an :class:`OSError` a user causes, else None.

    Args:
        error: The error raised by a read or write.
        needed_bytes: For a full disk, about how much the step needed (shown in MB).

    Returns:
        ``EkError("<path>: no space left on device (needed ~N MB)")`` and the like, or None
        for an error that is a bug rather than the user's doing.
    """
    what = USER_ERRNOS.get(error.errno or -1)
    if what is None:
        return None
    path = error.filename if error.filename is not None else "ek"
    needed = f" (needed ~{max(1, round(needed_bytes / 2**20))} MB)" if needed_bytes else ""
    return UserOSError(f"{path}: {what}{needed}")


class UserOSError(EkError, OSError):
    """A full disk, read-only folder or missing permission, as one line naming the path.

    Still an :class:`OSError`, so code that handles write failures as before keeps doing so.
    """


def interrupted(error: BaseException) -> bool:
    """Whether ``error`` is a Ctrl-C that compiled code wrapped in another exception.

    Numba's compiled code does not check signals. When it calls back into Python (to box a
    result, say) right after a SIGINT, the pending ``KeyboardInterrupt`` is raised there and
    numba reports it as ``SystemError: ... returned a result with an exception set``, the
    ``KeyboardInterrupt`` among its causes.
    """
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, KeyboardInterrupt):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False

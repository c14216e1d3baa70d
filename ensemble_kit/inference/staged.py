"""Folders built whole or not at all: ``ek export`` and ``ek kaggle`` write into a staged
sibling folder and swap it in at the end, so a failure (a full disk, a bad model, Ctrl-C, a
kill) never leaves a half bundle or ``.tmp`` files in the folder a user uploads.

Kept small and local to :mod:`ensemble_kit.inference`; a project-wide helper for full disks
may live in :mod:`ensemble_kit.files` later.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from ..errors import EkError
from ..files import process_alive

STAGING = ".{name}.staging-{pid}"
REPLACED = ".{name}.old-{pid}"


@contextlib.contextmanager
def no_space_is_an_error(where: Path) -> Iterator[None]:
    """Turn a full disk (``ENOSPC``) into the one-line ``<path>: no space left on device``."""
    try:
        yield
    except OSError as err:
        if err.errno != errno.ENOSPC:
            raise
        raise EkError(f"{err.filename or where}: no space left on device") from None


@contextlib.contextmanager
def staged_folder(out: Path) -> Iterator[Path]:
    """Yield an empty sibling folder of ``out`` to build into; on success it replaces ``out``.

    On any exception the staged folder is removed and ``out`` is left as it was. Leftovers of
    killed runs (staged or replaced folders whose process is gone) are removed first.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(out)
    staging = out.parent / STAGING.format(name=out.name, pid=os.getpid())
    shutil.rmtree(staging, ignore_errors=True)
    try:
        with no_space_is_an_error(out):
            staging.mkdir()
            yield staging
            _swap(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _swap(staging: Path, out: Path) -> None:
    replaced = out.parent / REPLACED.format(name=out.name, pid=os.getpid())
    if out.exists():
        os.replace(out, replaced)
    os.replace(staging, out)
    shutil.rmtree(replaced, ignore_errors=True)


def remove_leftovers(out: Path) -> None:
    """Remove staged and replaced folders of ``out`` left by processes that are gone; a run
    killed between its two renames left ``out`` missing, so its replaced folder comes back."""
    for pattern in (STAGING, REPLACED):
        for path in out.parent.glob(pattern.format(name=out.name, pid="*")):
            pid = path.name.rsplit("-", 1)[-1]
            if not pid.isdigit() or process_alive(int(pid)):
                continue
            if pattern == REPLACED and not out.exists():
                os.replace(path, out)
            else:
                shutil.rmtree(path, ignore_errors=True)

"""The one rule for names that become folders: config names, pseudo-label sets, classes.

A name is a plain file name (letters, digits, ``.``, ``_``, ``-``; no path separator), does
not start with a dot, and, for a name that becomes a folder of the working directory itself
(a config's), is not one of its own entries (``blend``, ``cache``, ``pseudo``, ``export``,
...), so it can never write outside its own folder or into another stage's.
"""

from __future__ import annotations

import re

from .errors import EkError
from .layout import RESERVED_NAMES

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def check_name(name: object, where: str, reserved: tuple[str, ...] = RESERVED_NAMES) -> str:
    """``name`` itself when it is a valid folder name, else an :class:`EkError`.

    Args:
        name: The name to check.
        where: What the message names first: a config file and key, or an option.
        reserved: Names taken in the folder the name lands in: the workdir's own entries
            for a config; none for a pseudo-label set (``folds/pseudo/<name>``, where the
            default name is ``pseudo``).

    Raises:
        EkError: ``<where>: <name> is not a valid name ...``.
    """
    text = name if isinstance(name, str) else ""
    if not NAME_PATTERN.fullmatch(text):
        raise EkError(
            f"{where}: {name!r} is not a valid name; use letters, digits, '.', '_' or '-', "
            "starting with a letter or digit (it becomes a folder name)"
        )
    if text.lower() in reserved:
        raise EkError(
            f"{where}: {name!r} is reserved for the working directory's own "
            f"{'files' if '.' in text else 'folders'}; choose another name"
        )
    return text

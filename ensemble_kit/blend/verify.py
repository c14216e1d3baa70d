"""Load ``blend.json``'s rule and check that nothing it was chosen on changed since.

Imports nothing of the search, so submission loads only this module and :mod:`.rule`.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import EkError
from ..files import digest_file, digest_json
from .rule import BlendFile, BlendRule


def verify_blend(layout) -> BlendRule:
    """Load ``blend.json``'s rule and check that no OOF it was chosen on changed since.

    Raises:
        EkError: blend.json is missing or unreadable, or an OOF/holdout file or the splits
            changed ("stale blend.json").
    """
    path = layout.blend_json
    blend = BlendFile.load(path)
    digests = blend.digests
    files = [(layout.oof_npy(n), d) for n, d in digests.get("oof", {}).items()]
    files += [(layout.holdout_npy(n), d) for n, d in digests.get("holdout", {}).items()]
    for name in digests.get("oof", {}):
        summary = layout.summary(name)
        if not summary.is_file() or _splits_digest(summary) != digests.get("splits"):
            _stale(summary)
        if (
            name in digests.get("sources", {})
            and _sources_digest(summary) != digests["sources"][name]
        ):
            _stale(summary)  # re-assembled from changed data files (e.g. holdout labels)
    for file, digest in files:
        if not file.is_file() or member_digest(file) != digest:
            _stale(file)
    return blend.rule


def _stale(file: Path) -> None:
    raise EkError(f"stale blend.json: {file} changed since `ek blend`; rerun ek blend --oof")


def _splits_digest(summary: Path) -> str | None:
    try:
        return json.loads(summary.read_text()).get("splits_digest")
    except json.JSONDecodeError:
        return None


def _sources_digest(summary: Path) -> str | None:
    try:
        return digest_json(json.loads(summary.read_text()).get("sources"))
    except json.JSONDecodeError:
        return None


def member_digest(path: Path) -> str:
    """The digest ``blend.json`` records for a member's OOF or holdout file."""
    return digest_file(path)

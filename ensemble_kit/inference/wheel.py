"""A wheel of the running ensemble_kit, written in-process: no network, no build backend.

The wheel holds the package folder this module was imported from: the repository's
``ensemble_kit/`` for an editable install (so uncommitted edits are in it), the installed
copy in ``site-packages`` for a regular install (the very files that were installed). Caches
(``__pycache__``, numba's ``.nbi``/``.nbc``) are left out. Entries carry a fixed timestamp, so
the same sources give the same wheel, byte for byte.

Its metadata lists what the prediction path needs (the bundle installs it with ``--no-deps``
on Kaggle's image, which has them all); training needs the full install from the
repository.
"""

from __future__ import annotations

import base64
import hashlib
import zipfile
from pathlib import Path

from .. import __version__
from ..files import atomic_path

DIST = "ensemble_kit"
PREDICTION_REQUIRES = ("numpy", "pandas", "torch", "numba", "pyyaml", "tqdm")
SKIPPED_SUFFIXES = (".pyc", ".pyo", ".nbi", ".nbc")
FIXED_TIME = (1980, 1, 1, 0, 0, 0)


def wheel_name(version: str = __version__) -> str:
    """``ensemble_kit-<version>-py3-none-any.whl``."""
    return f"{DIST}-{version}-py3-none-any.whl"


def package_dir() -> Path:
    """The folder of the imported ``ensemble_kit`` package (the repository's for an editable
    install, ``site-packages``' otherwise)."""
    return Path(__file__).resolve().parents[1]


def package_files(root: Path) -> list[Path]:
    """Every file of the package under ``root``, caches excluded, in a stable order."""
    return sorted(
        path
        for path in root.rglob("*")
        if path.is_file()
        and "__pycache__" not in path.parts
        and not path.name.startswith(".")
        and path.suffix not in SKIPPED_SUFFIXES
    )


def build_wheel(out_dir: Path | str, source: Path | None = None) -> Path:
    """Write ``out_dir/ensemble_kit-<version>-py3-none-any.whl``; returns its path.

    Args:
        out_dir: Folder to write the wheel to (created when missing).
        source: Package folder to pack; default :func:`package_dir`.
    """
    source = source or package_dir()
    dist_info = f"{DIST}-{__version__}.dist-info"
    entries = [
        (f"{DIST}/{path.relative_to(source).as_posix()}", path.read_bytes())
        for path in package_files(source)
    ]
    entries += [
        (f"{dist_info}/METADATA", _metadata().encode()),
        (f"{dist_info}/WHEEL", _wheel_file().encode()),
        (f"{dist_info}/entry_points.txt", b"[console_scripts]\nek = ensemble_kit.cli:main\n"),
        (f"{dist_info}/top_level.txt", f"{DIST}\n".encode()),
    ]
    record = "".join(f"{name},{_hash(data)},{len(data)}\n" for name, data in entries)
    entries.append((f"{dist_info}/RECORD", (record + f"{dist_info}/RECORD,,\n").encode()))
    path = Path(out_dir) / wheel_name()
    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in entries:
            info = zipfile.ZipInfo(name, date_time=FIXED_TIME)
            info.external_attr = 0o644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, data)
    return path


def _metadata() -> str:
    lines = [
        "Metadata-Version: 2.1",
        "Name: ensemble-kit",
        f"Version: {__version__}",
        "Summary: K-fold training, OOF blending and Kaggle submissions (prediction bundle)",
        "License: MIT",
        "Requires-Python: >=3.10",
        *(f"Requires-Dist: {name}" for name in PREDICTION_REQUIRES),
    ]
    return "\n".join(lines) + "\n"


def _wheel_file() -> str:
    return (
        "Wheel-Version: 1.0\n"
        f"Generator: ensemble-kit ({__version__})\n"
        "Root-Is-Purelib: true\n"
        "Tag: py3-none-any\n"
    )


def _hash(data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"sha256={digest}"

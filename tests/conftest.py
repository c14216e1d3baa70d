"""Shared fixtures: the real sample records, synthetic data sets, a tiny config."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO.parent / "shared" / "data" / "contrails-sample"


@pytest.fixture
def sample_root() -> Path:
    """The six real records (read-only); the test is skipped when they are absent."""
    if not SAMPLE.is_dir():
        pytest.skip(f"{SAMPLE} not present")
    return SAMPLE


@pytest.fixture
def sample_copy(sample_root: Path, tmp_path: Path) -> Path:
    """A writable copy of the sample records, for corrupting."""
    target = tmp_path / "data"
    shutil.copytree(sample_root, target)
    for path in target.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    return target


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    """A small synthetic data set at 64 px (train 48, validation 12, test 8)."""
    from ensemble_kit.data.synth import write_synthetic

    root = tmp_path_factory.mktemp("synth") / "data"
    write_synthetic(root, n_train=48, n_validation=12, n_test=8, size=64, seed=0)
    return root


@pytest.fixture
def tiny_config_path() -> Path:
    return REPO / "configs" / "tiny.yaml"


# U-Net and FPN decoders of a few channels: the default ones (256 ... 16 channels) are most
# of a tiny model's CPU time at 64 px, and no test about files, backends or locks needs them.
SMALL_UNET = {"decoder_channels": [16, 8, 8, 8, 8]}
SMALL_FPN = {"decoder_pyramid_channels": 32, "decoder_segmentation_channels": 32}  # GroupNorm(32)


@pytest.fixture(scope="session")
def fast_tiny_config(tmp_path_factory) -> Path:
    """configs/tiny.yaml (name ``tiny``) with a small U-Net decoder: the same files and logs,
    a few times less CPU."""
    import yaml

    raw = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    raw["model"]["decoder"] = SMALL_UNET
    path = tmp_path_factory.mktemp("fast_tiny") / "tiny.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.fixture
def tiny_disk(tmp_path):
    """A 2 MB tmpfs (root only); skipped where mount is not allowed."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)

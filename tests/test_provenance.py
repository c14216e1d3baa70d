"""A changed data file makes everything made from it stale: folds, OOF summaries, blend.json."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from ensemble_kit.blend.verify import verify_blend
from ensemble_kit.cli import main
from ensemble_kit.errors import EkError
from ensemble_kit.layout import Layout

CONFIG = """
name: quick
input: {channels: ash, frames: [4]}
model: {arch: Unet, encoder: tu-test_resnet, decoder: {decoder_channels: [16, 8, 8, 8, 8]}}
train: {epochs: 1, batch_size: 4, max_steps_per_epoch: 2, seed: 0}
tta: [identity]
"""


def _rewrite(path, change) -> None:
    np.save(path, change(np.load(path)))


def test_a_changed_file_is_reported_stale_downstream(tmp_path):
    from ensemble_kit.data.synth import write_synthetic

    data, workdir, config = tmp_path / "data", tmp_path / "folds", tmp_path / "quick.yaml"
    write_synthetic(data, n_train=12, n_validation=4, n_test=2, size=64, seed=3)
    config.write_text(CONFIG)
    layout = Layout(workdir)

    def ek(*args):
        return CliRunner().invoke(main, [args[0], "--workdir", str(workdir), *args[1:]])

    cv = ("cv", "--data", str(data), "--folds", "2", str(config))
    assert ek(*cv).exit_code == 0
    summary = json.loads(layout.summary("quick").read_text())
    assert set(summary["sources"]) == {
        "train/inputs",
        "train/labels",
        "validation/inputs",
        "validation/labels",
    }
    done = json.loads((layout.fold_dir("quick", 0) / "DONE").read_text())
    assert "validation/labels" not in done["sources"]  # the holdout's labels only score
    assert ek("blend", "--oof", "--steps", "2").exit_code == 0
    verify_blend(layout)

    # a holdout label changes: the OOF summary is stale until ek cv re-scores it (no training)
    holdout_mask = sorted((data / "validation").glob("*/human_pixel_masks.npy"))[0]
    _rewrite(holdout_mask, lambda m: 1 - m)
    result = ek("blend", "--oof", "--steps", "2")
    assert result.exit_code == 2 and "stale OOF" in result.output
    assert "validation/labels" in result.output
    stamp = (layout.fold_dir("quick", 0) / "best.pt").stat().st_mtime_ns
    assert ek(*cv).exit_code == 0
    assert (layout.fold_dir("quick", 0) / "best.pt").stat().st_mtime_ns == stamp
    with pytest.raises(EkError, match="stale blend.json: .*summary.json"):
        verify_blend(layout)  # what `ek submit` checks
    assert ek("blend", "--oof", "--steps", "2").exit_code == 0

    # a training band changes: the folds were trained on other data
    band = sorted((data / "train").glob("*/band_14.npy"))[0]
    _rewrite(band, lambda b: b + 1.0)
    result = ek(*cv)
    assert result.exit_code == 2 and "trained on data that changed since" in result.output
    assert "train/inputs" in result.output
    result = ek("blend", "--oof", "--steps", "2")
    assert result.exit_code == 2 and "train/inputs" in result.output


def test_failed_start_does_not_block_the_fixed_config(tmp_path):
    from ensemble_kit.config import config_from_dict
    from ensemble_kit.layout import Layout
    from ensemble_kit.training.provenance import claim_config_dir

    layout = Layout(tmp_path / "folds")
    first = config_from_dict({"name": "quick", "model": {"encoder_weights": "imagenet"}})
    claim_config_dir(layout, first)  # the start then failed: no fold trained
    (layout.fold_dir("quick", 0)).mkdir(parents=True)  # a RUNNING lock's folder, no weights
    fixed = config_from_dict({"name": "quick"})
    claim_config_dir(layout, fixed)
    assert "encoder_weights: null" in (layout.config_dir("quick") / "config.yaml").read_text()
    (layout.fold_dir("quick", 0) / "last.pt").write_bytes(b"trained")
    changed = config_from_dict({"name": "quick", "optim": {"lr": 0.01}, "train": {"epochs": 3}})
    with pytest.raises(EkError) as refused:
        claim_config_dir(layout, changed)
    message = str(refused.value)
    assert "changed since its folds were trained" in message
    assert "optim.lr 0.001 -> 0.01, train.epochs 10 -> 3" in message

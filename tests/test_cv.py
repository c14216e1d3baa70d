"""`ek cv` end to end on synthetic data: files, formats, resume, faults."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from ensemble_kit.cli import main
from ensemble_kit.inference.checkpoints import load_fold_model
from ensemble_kit.layout import Layout
from ensemble_kit.oof import read_oof
from ensemble_kit.training import trainer as train_module

QUICK = """
name: {name}
input: {{channels: ash, frames: [4]}}
model: {{arch: Unet, encoder: tu-test_resnet, decoder: {{decoder_channels: [16, 8, 8, 8, 8]}}}}
optim: {{name: adam, lr: 0.003}}
augment: {{hflip: 0.5}}
train: {{epochs: {epochs}, batch_size: 8, max_steps_per_epoch: 2, seed: 0}}
tta: [identity, hflip]
"""


def write_config(folder: Path, name="quick", epochs=2) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(QUICK.format(name=name, epochs=epochs))
    return path


def run_ek(*args: str):
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return result


@pytest.fixture(scope="module")
def finished(tmp_path_factory, synth_root):
    """One finished 2-fold run of a quick config, shared by the read-only tests."""
    folder = tmp_path_factory.mktemp("cv")
    config = write_config(folder)
    workdir = folder / "folds"
    result = run_ek(
        "cv", "--data", str(synth_root), "--workdir", str(workdir), "--folds", "2", str(config)
    )
    assert result.exit_code == 0, result.output
    return Layout(workdir), synth_root, config


def test_outputs_and_formats(finished):
    layout, root, _ = finished
    splits = pd.read_csv(layout.splits_csv, dtype={"record_id": str})
    pool = splits[splits["fold"] >= 0]
    oof = read_oof(layout, "quick")
    assert oof.probs.dtype == np.uint8 and oof.probs.shape == (len(pool), 64, 64)
    assert oof.ids == pool["record_id"].tolist()
    assert np.array_equal(oof.folds, pool["fold"].to_numpy())
    assert oof.holdout.shape == (12, 64, 64) and len(oof.holdout_ids) == 12
    for fold in (0, 1):
        fold_dir = layout.fold_dir("quick", fold)
        for name in ("best.pt", "last.pt", "metrics.csv", "config.yaml", "DONE"):
            assert (fold_dir / name).is_file(), name
        metrics = pd.read_csv(fold_dir / "metrics.csv")
        assert list(metrics.columns)[:6] == [
            "epoch",
            "train_loss",
            "val_loss",
            "val_dice",
            "threshold",
            "lr",
        ]
        assert len(metrics) == 2
    summary = json.loads(layout.summary("quick").read_text())
    for key in (
        "oof_dice",
        "holdout_dice",
        "splits_digest",
        "config_digest",
        "data_digest",
        "folds",
    ):
        assert key in summary
    assert 0.0 <= summary["oof_dice"] <= 1.0 and len(summary["folds"]) == 2
    assert layout.curves_png("quick").stat().st_size > 1000


def test_oof_rows_are_the_fold_models_predictions(finished):
    """Each OOF row equals the TTA prediction of the model that never saw that record."""
    from ensemble_kit.config import load_config
    from ensemble_kit.data.cache import decode_inputs, ensure_inputs
    from ensemble_kit.inference.tta import predict_inputs
    from ensemble_kit.oof import to_codes

    layout, root, config_path = finished
    config = load_config(config_path)
    oof = read_oof(layout, "quick")
    entry = ensure_inputs(layout, root, "train", config.input)
    for row in (0, len(oof.ids) - 1):
        model = load_fold_model(
            config, layout.fold_dir("quick", int(oof.folds[row])), torch.device("cpu")
        )
        x = torch.from_numpy(decode_inputs(entry.arrays["inputs"][entry.index_of([oof.ids[row]])]))
        expected = to_codes(predict_inputs([model], config, x))[0]
        assert np.abs(expected.astype(int) - oof.probs[row]).max() <= 1


def test_status_table(finished):
    layout, _, _ = finished
    result = run_ek("status", "--workdir", str(layout.workdir))
    assert result.exit_code == 0
    assert "quick" in result.output and "done e" in result.output


def test_rerun_skips_done_folds(finished):
    layout, root, config = finished
    stamp = (layout.fold_dir("quick", 0) / "best.pt").stat().st_mtime_ns
    result = run_ek("cv", "--data", str(root), "--workdir", str(layout.workdir), str(config))
    assert result.exit_code == 0
    assert (layout.fold_dir("quick", 0) / "best.pt").stat().st_mtime_ns == stamp


def test_changed_config_refused(finished, tmp_path):
    layout, root, _ = finished
    changed = tmp_path / "quick.yaml"
    changed.write_text(QUICK.format(name="quick", epochs=2).replace("0.003", "0.01"))
    result = CliRunner().invoke(main, ["cv", "--workdir", str(layout.workdir), str(changed)])
    assert result.exit_code == 2 and "changed since its folds were trained" in result.output
    assert "optim.lr 0.003 -> 0.01" in result.output


def test_bad_arch_names_the_config_and_leaves_a_fixable_start(synth_root, tmp_path):
    bad = tmp_path / "quick.yaml"
    bad.write_text(QUICK.format(name="quick", epochs=1).replace("arch: Unet", "arch: FNP"))
    workdir = str(tmp_path / "folds")
    result = run_ek("cv", "--data", str(synth_root), "--workdir", workdir, "--folds", "2", str(bad))
    assert result.exit_code == 2
    assert result.output.startswith(f"ek: error: {bad}: unknown model.arch 'FNP'")
    assert not Layout(Path(workdir)).fold_dir("quick", 0).exists()
    fpn = QUICK.format(name="quick", epochs=1).replace("arch: Unet", "arch: FPN")
    bad.write_text(
        fpn.replace("decoder_channels: [16, 8, 8, 8, 8]", "decoder_pyramid_channels: 16")
    )
    fixed = run_ek("cv", "--data", str(synth_root), "--workdir", workdir, "--fold", "0", str(bad))
    assert fixed.exit_code == 0, fixed.output


def test_other_k_refused(finished):
    layout, root, config = finished
    result = CliRunner().invoke(
        main, ["cv", "--workdir", str(layout.workdir), "--folds", "3", str(config)]
    )
    assert result.exit_code == 2 and "has 2 folds, not 3" in result.output


def test_unknown_key_exit_code(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("modle: {arch: Unet}\n")
    result = CliRunner().invoke(main, ["cv", "--workdir", str(tmp_path / "w"), str(bad)])
    assert result.exit_code == 2
    assert (
        result.output.strip() == "ek: error: " + f"{bad}: unknown key 'modle' (did you mean model?)"
    )


def test_partial_folds_then_assembly(tmp_path, synth_root):
    config = write_config(tmp_path, epochs=1)
    workdir = tmp_path / "folds"
    common = ["cv", "--data", str(synth_root), "--workdir", str(workdir), "--folds", "2"]
    assert run_ek(*common, "--fold", "1", str(config)).exit_code == 0
    layout = Layout(workdir)
    assert not layout.oof_npy("quick").exists()
    from ensemble_kit.errors import EkError

    with pytest.raises(EkError, match=r"folds \[0\] are not DONE"):
        read_oof(layout, "quick")
    assert run_ek(*common, "--fold", "0", str(config)).exit_code == 0
    assert read_oof(layout, "quick").probs.shape[0] == 48


def test_nan_loss_stops_the_fold_and_keeps_weights_finite(tmp_path, synth_root, monkeypatch):
    config = write_config(tmp_path, epochs=3)
    calls = {"n": 0}
    original = train_module.Trainer.train_step

    def exploding(self, *args):
        calls["n"] += 1
        return float("nan") if calls["n"] == 3 else original(self, *args)

    monkeypatch.setattr(train_module.Trainer, "train_step", exploding)
    result = CliRunner().invoke(
        main,
        [
            "cv",
            "--data",
            str(synth_root),
            "--workdir",
            str(tmp_path / "w"),
            "--folds",
            "2",
            str(config),
        ],
    )
    assert result.exit_code == 2
    assert "loss became NaN at epoch 2, step 1" in result.output
    fold_dir = Layout(tmp_path / "w").fold_dir("quick", 0)
    assert not (fold_dir / "DONE").exists()
    best = torch.load(fold_dir / "best.pt", weights_only=True)["model"]
    assert all(torch.isfinite(v).all() for v in best.values() if v.is_floating_point())


def test_full_disk_during_checkpoint_keeps_previous(tmp_path, synth_root, monkeypatch):
    config = write_config(tmp_path, epochs=2)
    real_save = torch.save
    saves = {"last": 0}

    def flaky_save(obj, path, *args, **kwargs):
        if "state" in obj:
            saves["last"] += 1
            if saves["last"] == 2:
                Path(path).write_bytes(b"partial")
                raise OSError(28, "No space left on device")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", flaky_save)
    # issue 20: a full disk is one line, exit 2 (it was an OSError traceback)
    result = CliRunner().invoke(
        main,
        ["cv", "--data", str(synth_root), "--workdir", str(tmp_path / "w"), "--folds", "2",
         str(config)],
        catch_exceptions=False,
    )  # fmt: skip
    assert result.exit_code == 2 and "no space left on device" in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    last = Layout(tmp_path / "w").fold_dir("quick", 0) / "last.pt"
    checkpoint = torch.load(last, weights_only=False)
    assert checkpoint["state"]["epoch"] == 1
    assert not [p for p in last.parent.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.slow
def test_kill_9_then_resume_equals_uninterrupted(tmp_path, synth_root):
    config = write_config(tmp_path, epochs=4)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "ensemble_kit.cli",
        "cv",
        "--data",
        str(synth_root),
        "--folds",
        "2",
    ]
    subprocess.run(
        [*command, "--workdir", str(tmp_path / "straight"), str(config)],
        check=True,
        env=env,
        capture_output=True,
    )
    killed = tmp_path / "killed"
    process = subprocess.Popen(
        [*command, "--workdir", str(killed), str(config)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    last = Layout(killed).fold_dir("quick", 0) / "last.pt"
    deadline = time.time() + 300
    while not last.exists() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # into the next epoch
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (Layout(killed).fold_dir("quick", 0) / "DONE").exists(), (
        "kill came too late to test resuming"
    )
    subprocess.run(
        [*command, "--workdir", str(killed), str(config)], check=True, env=env, capture_output=True
    )
    straight = np.load(Layout(tmp_path / "straight").oof_npy("quick"))
    resumed = np.load(Layout(killed).oof_npy("quick"))
    assert np.array_equal(straight, resumed)
    shutil.rmtree(killed)


@pytest.mark.slow
def test_tiny_config_learns_far_above_an_untrained_model(tmp_path, tiny_config_path):
    """The issue's acceptance run: `ek cv --folds 2 configs/tiny.yaml` on `ek synth` data.

    Slow (the longest default test before: 332 s of a 1,985 s default run on a loaded
    2-core machine): 15 epochs x 2 folds of 128 records. With 64 records it does not learn
    (val dice ~0.02 after 14 epochs, with the default or a small decoder), so there is no
    cheaper version of this check in the default suite.
    """
    from ensemble_kit.config import load_config
    from ensemble_kit.data.cache import ensure_inputs, load_labels
    from ensemble_kit.inference.tta import predict_inputs
    from ensemble_kit.metrics import best_threshold
    from ensemble_kit.models import build_model
    from ensemble_kit.oof import to_codes

    data = tmp_path / "data"
    assert (
        run_ek(
            "synth",
            "--out",
            str(data),
            "--train",
            "128",
            "--validation",
            "16",
            "--test",
            "4",
            "--size",
            "64",
        ).exit_code
        == 0
    )
    workdir = tmp_path / "folds"
    result = run_ek(
        "cv", "--data", str(data), "--workdir", str(workdir), "--folds", "2", str(tiny_config_path)
    )
    assert result.exit_code == 0, result.output
    layout = Layout(workdir)
    trained = json.loads(layout.summary("tiny").read_text())["oof_dice"]
    config = load_config(tiny_config_path)
    torch.manual_seed(0)
    untrained_model = build_model(config).eval()
    oof = read_oof(layout, "tiny")
    entry = ensure_inputs(layout, data, "train", config.input)
    x = torch.from_numpy(entry.arrays["inputs"][entry.index_of(oof.ids)].astype(np.float32) / 255)
    codes = to_codes(predict_inputs([untrained_model], config, x))
    labels = load_labels(layout, data, pd.DataFrame({"record_id": oof.ids, "split": "train"}))
    untrained = best_threshold(codes, labels)[1]
    assert trained > 0.15 and trained > 5 * untrained, (trained, untrained)

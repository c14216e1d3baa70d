"""`ek submit` and `ek export` end to end on synthetic data."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from ensemble_kit.cli import main
from ensemble_kit.inference.ensemble import Timer, predict_codes
from ensemble_kit.inference.rle import decode
from ensemble_kit.inference.submit import load_ensemble
from ensemble_kit.layout import Layout
from ensemble_kit.oof import read_ids

CONFIG = """
name: {name}
input: {{channels: ash, frames: {frames}}}
model: {{arch: {arch}, encoder: tu-test_resnet}}
optim: {{name: adam, lr: 0.003}}
train: {{epochs: 1, batch_size: 8, max_steps_per_epoch: 2, seed: {seed}}}
tta: {tta}
"""


def ek(*args: str, check: bool = True):
    result = CliRunner().invoke(main, [str(a) for a in args])
    if check:
        assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def blended(tmp_path_factory, synth_root):
    """Two configs x 2 folds trained, blended; returns (workdir, data root)."""
    folder = tmp_path_factory.mktemp("submit")
    configs = []
    for name, frames, arch, seed, tta in (
        ("a", "[4]", "Unet", 0, "[identity, hflip]"),
        ("b", "[3, 4, 5]", "FPN", 1, "[identity, vflip]"),
    ):
        path = folder / f"{name}.yaml"
        path.write_text(CONFIG.format(name=name, frames=frames, arch=arch, seed=seed, tta=tta))
        configs.append(path)
    workdir = folder / "folds"
    ek("cv", "--data", synth_root, "--workdir", workdir, "--folds", "2", *configs)
    ek("blend", "--oof", "--workdir", workdir, "--steps", "4")
    return workdir, synth_root


def test_submission_is_valid_and_complete(blended, tmp_path):
    workdir, root = blended
    out = tmp_path / "sub" / "submission.csv"
    result = ek("submit", "--workdir", workdir, "--data", root, "--out", out)
    assert "records/s" in result.output and str(out) in result.output
    frame = pd.read_csv(out, dtype=str, keep_default_na=False)
    assert list(frame.columns) == ["record_id", "encoded_pixels"]
    assert sorted(frame["record_id"]) == sorted(p.name for p in (root / "test").iterdir())
    for rle in frame["encoded_pixels"]:
        decode(rle, (64, 64))
    provenance = json.loads(out.with_suffix(".json").read_text())
    assert provenance["records"] == len(frame) and set(provenance["configs"]) <= {"a", "b"}
    assert set(provenance["seconds_by_stage"]) == {"read", "model", "encode"}
    assert ek("submit", "--check", out, "--data", root).exit_code == 0


def test_validation_split_agrees_with_blend_holdout(blended, tmp_path):
    workdir, root = blended
    out = tmp_path / "validation.csv"
    result = ek(
        "submit", "--workdir", workdir, "--data", root, "--split", "validation", "--out", out
    )
    dice = json.loads(out.with_suffix(".json").read_text())["dice"]
    holdout = json.loads(Layout(workdir).blend_json.read_text())["scores"]["holdout"]
    assert f"global dice on validation: {dice:.4f}" in result.output
    assert dice == pytest.approx(holdout, abs=1e-9)


def test_submit_reproduces_holdout_codes_exactly(blended):
    """Submit quantises inputs as the cache does and averages folds as holdout.npy was; a
    batch size other than training's must not matter."""
    workdir, root = blended
    layout = Layout(workdir)
    blend = json.loads(layout.blend_json.read_text())
    ensemble = load_ensemble(layout, blend, torch.device("cpu"))
    ids, codes = [], {name: [] for name in blend["configs"]}
    for batch_ids, batch in predict_codes(
        ensemble, root, "validation", 5, torch.device("cpu"), Timer()
    ):
        ids += batch_ids
        for name in codes:
            codes[name].append(batch[name])
    for name in codes:
        holdout_ids = read_ids(layout.holdout_ids(name))["record_id"].tolist()
        order = [holdout_ids.index(record_id) for record_id in ids]
        expected = np.load(layout.holdout_npy(name))[order]
        np.testing.assert_array_equal(np.concatenate(codes[name]), expected)


def test_stale_blend_is_refused(blended, tmp_path):
    workdir, root = blended
    copy = tmp_path / "folds"
    shutil.copytree(workdir, copy)
    oof = Layout(copy).oof_npy("a")
    array = np.load(oof)
    array[0, 0, 0] ^= 1
    np.save(oof, array)
    result = ek(
        "submit", "--workdir", copy, "--data", root, "--out", tmp_path / "s.csv", check=False
    )
    assert result.exit_code == 2 and "stale" in result.output and not (tmp_path / "s.csv").exists()


def test_missing_blend_says_what_to_run(tmp_path):
    result = ek("submit", "--workdir", tmp_path, check=False)
    assert result.exit_code == 2 and "ek blend --oof" in result.output


def test_corrupt_test_record_leaves_previous_submission(blended, tmp_path):
    workdir, root = blended
    data = tmp_path / "data"
    shutil.copytree(root, data)
    victim = sorted((data / "test").iterdir())[-1] / "band_14.npy"
    victim.write_bytes(b"\x93NUMPY broken")
    out = tmp_path / "submission.csv"
    out.write_text("record_id,encoded_pixels\nkeep,-\n")
    result = ek("submit", "--workdir", workdir, "--data", data, "--out", out, check=False)
    assert result.exit_code == 2 and "band_14.npy" in result.output
    assert out.read_text() == "record_id,encoded_pixels\nkeep,-\n"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".submission")] == []


def test_check_rejects_a_bad_csv(tmp_path, blended):
    _, root = blended
    bad = tmp_path / "bad.csv"
    bad.write_text("record_id,encoded_pixels\n123,5 2 6 1\n")
    result = ek("submit", "--check", bad, check=False)
    assert result.exit_code == 2 and "bad.csv" in result.output


def test_export_parity_and_exported_submission(blended, tmp_path):
    workdir, root = blended
    result = ek("export", "--workdir", workdir)
    assert "max |prob diff|" in result.output
    manifest = json.loads((Layout(workdir).export_dir / "manifest.json").read_text())
    # frozen without numerics-changing passes: the traced logits are the eager ones exactly
    assert all(entry["max_abs_diff"] == 0.0 for entry in manifest["configs"].values())
    assert not any(p.is_dir() for p in Layout(workdir).export_dir.iterdir())
    eager, exported = tmp_path / "eager.csv", tmp_path / "exported.csv"
    ek("submit", "--workdir", workdir, "--data", root, "--out", eager)
    ek("submit", "--workdir", workdir, "--data", root, "--out", exported, "--exported")
    assert eager.read_bytes() == exported.read_bytes()
    copied = Layout(workdir).export_dir / "blend.json"
    kept = copied.read_bytes()
    copied.write_bytes(kept.replace(b'"threshold_sum"', b'"threshold_sum" ', 1))
    try:
        result = ek(
            "submit", "--workdir", workdir, "--data", root, "--out", exported, "--exported",
            check=False,
        )  # fmt: skip
    finally:
        copied.write_bytes(kept)
    assert result.exit_code == 2 and "rerun ek export" in result.output


def test_export_fails_loudly_when_outputs_differ(blended, monkeypatch):
    from ensemble_kit.inference import export

    workdir, _ = blended
    monkeypatch.setattr(export, "parity", lambda *a: 0.5)
    result = ek("export", "--workdir", workdir, check=False)
    assert result.exit_code == 2 and "differs from eager" in result.output


def test_submit_killed_between_csv_and_json_never_pairs_new_csv_with_old_json(
    blended, tmp_path, monkeypatch
):
    import ensemble_kit.files as files
    from ensemble_kit.files import digest_file

    workdir, root = blended
    out = tmp_path / "submission.csv"
    ek("submit", "--workdir", workdir, "--data", root, "--out", out)
    real_replace = files.os.replace

    def killed_at_the_json(src, dst):
        if str(dst).endswith(".json"):
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(files.os, "replace", killed_at_the_json)
    ek(
        "submit",
        "--workdir",
        workdir,
        "--data",
        root,
        "--out",
        out,
        "--batch-size",
        "3",
        check=False,
    )
    monkeypatch.undo()
    assert not out.with_suffix(".json").exists()  # no provenance rather than the old one
    assert sorted(p.name for p in tmp_path.iterdir()) == ["submission.csv"]  # no temp files
    ek("submit", "--workdir", workdir, "--data", root, "--out", out)
    provenance = json.loads(out.with_suffix(".json").read_text())
    assert provenance["csv_digest"] == digest_file(out)

"""`ek submit` and `ek export` end to end on synthetic data."""

from __future__ import annotations

import errno
import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from conftest import SMALL_FPN, SMALL_UNET

from ensemble_kit.blend.rule import BlendRule
from ensemble_kit.cli import main
from ensemble_kit.inference.ensemble import Timer, predict_codes
from ensemble_kit.inference.rle import decode
from ensemble_kit.inference.submit import load_ensemble
from ensemble_kit.layout import Layout
from ensemble_kit.oof import load_codes, read_ids

CONFIG = """
name: {name}
input: {{channels: ash, frames: {frames}}}
model: {{arch: {arch}, encoder: tu-test_resnet, decoder: {decoder}}}
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
    for name, frames, arch, seed, tta, decoder in (
        ("a", "[4]", "Unet", 0, "[identity, hflip]", SMALL_UNET),
        ("b", "[3, 4, 5]", "FPN", 1, "[identity, vflip]", SMALL_FPN),
    ):
        path = folder / f"{name}.yaml"
        fields = dict(name=name, frames=frames, arch=arch, seed=seed, tta=tta)
        path.write_text(CONFIG.format(**fields, decoder=json.dumps(decoder)))
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
    rule = BlendRule.load(layout.blend_json)
    ensemble = load_ensemble(layout, rule, torch.device("cpu"))
    ids, codes = [], {name: [] for name in rule.weights}
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


def test_the_rule_on_holdout_codes_gives_exactly_the_submitted_masks(blended, tmp_path):
    """BlendRule.load(blend.json).apply(every member's holdout.npy) == ek submit --split
    validation, mask for mask."""
    workdir, root = blended
    layout = Layout(workdir)
    out = tmp_path / "validation.csv"
    ek("submit", "--workdir", workdir, "--data", root, "--split", "validation", "--out", out)
    rule = BlendRule.load(layout.blend_json)
    codes = {name: load_codes(layout.config_dir(name), "holdout") for name in rule.weights}
    masks = rule.apply(codes)
    holdout_ids = read_ids(layout.holdout_ids(rule.members[0]))["record_id"].tolist()
    rows = pd.read_csv(out, dtype=str, keep_default_na=False)
    assert sorted(rows["record_id"]) == sorted(holdout_ids)
    for record_id, rle in rows.itertuples(index=False):
        want = masks[holdout_ids.index(record_id)]
        np.testing.assert_array_equal(decode(rle, want.shape), want)
    provenance = json.loads(out.with_suffix(".json").read_text())
    assert provenance["rule"] == rule.to_dict()
    assert provenance["threshold_sum_applied"] == rule.threshold_for(rule.histogram(codes))


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


# --- Kaggle hardware and hidden data (issue 19) ---------------------------------------------


def predict_csv(layout: Layout, root, out, devices=("cpu",), options=None) -> bytes:
    """The CSV of the test split predicted with one worker per named device."""
    from ensemble_kit.inference.ensemble import PredictOptions, predict_submission

    rule = BlendRule.load(layout.blend_json)
    workers = [(load_ensemble(layout, rule, torch.device(d)), torch.device(d)) for d in devices]
    predict_submission(workers[0][0], rule, root, "test", out, 3,
                       options=options or PredictOptions(), workers=workers)  # fmt: skip
    return out.read_bytes()


def test_two_cpu_workers_write_the_one_worker_csv(blended, tmp_path, caplog):
    workdir, root = blended
    layout = Layout(workdir)
    one = predict_csv(layout, root, tmp_path / "one.csv")
    with caplog.at_level("INFO"):
        two = predict_csv(layout, root, tmp_path / "two.csv", devices=("cpu", "cpu"))
    assert two == one
    assert "predicted 8/8 records" in caplog.text and "records/s" in caplog.text


def test_rows_follow_sample_submission(blended, tmp_path):
    workdir, root = blended
    data = tmp_path / "data"
    shutil.copytree(root, data)
    sample = pd.read_csv(data / "sample_submission.csv", dtype=str, keep_default_na=False)
    shuffled = sample.iloc[::-1]
    shuffled.to_csv(data / "sample_submission.csv", index=False)
    out = tmp_path / "s.csv"
    ek("submit", "--workdir", workdir, "--data", data, "--out", out)
    written = pd.read_csv(out, dtype=str, keep_default_na=False)
    assert written["record_id"].tolist() == shuffled["record_id"].tolist()


def test_hidden_nan_and_unreadable_records_never_abort(blended, tmp_path, caplog):
    """Lenient (the notebook's): a NaN pixel is filled by its frame's median, an unreadable
    record is an empty mask; each warns once, naming the record."""
    from ensemble_kit.inference.ensemble import PredictOptions

    workdir, root = blended
    layout = Layout(workdir)
    data, repaired = tmp_path / "data", tmp_path / "repaired"
    shutil.copytree(root, data)
    nan_record, broken = sorted((data / "test").iterdir())[:2]
    band = np.load(nan_record / "band_14.npy")
    band[3, 5, 4] = np.nan
    np.save(nan_record / "band_14.npy", band)
    (broken / "band_11.npy").write_bytes(b"\x93NUMPY broken")
    shutil.copytree(data, repaired)
    fixed = band.copy()
    fixed[3, 5, 4] = np.median(np.delete(band[:, :, 4].ravel(), 3 * band.shape[1] + 5))
    np.save(repaired / "test" / nan_record.name / "band_14.npy", fixed)
    lenient = PredictOptions(lenient=True)
    with caplog.at_level("WARNING"):
        got = predict_csv(layout, data, tmp_path / "s.csv", options=lenient)
    rows = dict(line.split(",") for line in got.decode().splitlines()[1:])
    assert rows[broken.name] == "-"
    expected = dict(
        line.split(",")
        for line in predict_csv(layout, repaired, tmp_path / "r.csv", options=lenient)
        .decode()
        .splitlines()[1:]
    )
    assert rows[nan_record.name] == expected[nan_record.name]
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len([w for w in warnings if str(nan_record) in w and "NaN" in w]) == 1
    assert len([w for w in warnings if str(broken) in w and "unreadable" in w]) == 1


def test_submit_takes_a_precision(blended, tmp_path):
    workdir, root = blended
    out = tmp_path / "fp32.csv"
    ek("submit", "--workdir", workdir, "--data", root, "--out", out, "--precision", "fp32")
    assert json.loads(out.with_suffix(".json").read_text())["precision"] == "fp32"
    result = ek("submit", "--workdir", workdir, "--precision", "fp8", check=False)
    assert result.exit_code == 2 and "--precision" in result.output


def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device", "/full/disk/manifest.json")


def debris(folder) -> list[str]:
    return sorted(
        str(p.relative_to(folder))
        for p in folder.rglob("*")
        if ".tmp" in p.name or ".staging-" in p.name or ".old-" in p.name
    )


def test_export_on_a_full_disk_is_one_line_and_keeps_the_old_bundle(blended, monkeypatch):
    from ensemble_kit.inference import export

    workdir, _ = blended
    layout = Layout(workdir)
    ek("export", "--workdir", workdir)
    before = {p.name: p.read_bytes() for p in layout.export_dir.iterdir()}
    monkeypatch.setattr(export, "write_json", no_space)
    result = ek("export", "--workdir", workdir, check=False)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.output.strip() == "ek: error: /full/disk/manifest.json: no space left on device"
    assert {p.name: p.read_bytes() for p in layout.export_dir.iterdir()} == before
    assert debris(workdir) == []


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

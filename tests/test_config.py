from pathlib import Path

import pytest

from ensemble_kit.config import (
    Config,
    config_digest,
    config_from_dict,
    dump_config,
    load_config,
    tta_list,
)
from ensemble_kit.errors import EkError

REPO = Path(__file__).resolve().parents[1]


def test_defaults_and_name_from_file(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("model: {encoder: tu-test_resnet}\n")
    config = load_config(path)
    assert config.name == "mine"
    assert config.input.frames == (4,)
    assert config.model.encoder == "tu-test_resnet"
    assert config.input.in_channels == 3


def test_every_shipped_config_loads():
    paths = sorted((REPO / "configs").glob("*.yaml"))
    assert len(paths) >= 5
    names = [load_config(p).name for p in paths]
    assert len(set(names)) == len(names)


def test_unknown_key_names_key_and_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train: {epoch: 3}\n")
    with pytest.raises(EkError, match=r"bad.yaml: unknown key 'train.epoch' \(did you mean epochs"):
        load_config(path)


def test_bad_choice_and_type(tmp_path):
    with pytest.raises(EkError, match="optim.name"):
        config_from_dict({"optim": {"name": "adamax"}}, "x.yaml")
    with pytest.raises(EkError, match="train.epochs"):
        config_from_dict({"train": {"epochs": "many"}}, "x.yaml")
    with pytest.raises(EkError, match="input.frames"):
        config_from_dict({"input": {"frames": [9]}}, "x.yaml")
    with pytest.raises(EkError, match="unknown tta"):
        config_from_dict({"tta": ["spin"]}, "x.yaml")


def test_loss_list_and_tta_expansion():
    config = config_from_dict({"loss": [{"name": "focal", "weight": 2}], "tta": ["identity", "d4"]})
    assert config.loss[0].name == "focal" and config.loss[0].weight == 2.0
    assert len(tta_list(config)) == 8 and tta_list(config)[0] == "identity"


def test_frozen_and_digest_ignores_name(tmp_path):
    a = config_from_dict({"name": "a"})
    b = config_from_dict({"name": "b"})
    assert config_digest(a) == config_digest(b)
    assert config_digest(a) != config_digest(config_from_dict({"optim": {"lr": 0.1}}))
    with pytest.raises(AttributeError):
        a.name = "c"  # type: ignore[misc]


def test_dump_round_trip(tmp_path):
    config = config_from_dict(
        {"name": "r", "input": {"frames": [3, 4, 5]}, "model": {"upsample": 2}}
    )
    path = tmp_path / "r.yaml"
    path.write_text(dump_config(config))
    assert load_config(path) == config
    assert isinstance(load_config(path), Config)


@pytest.mark.parametrize(
    ("yaml_text", "message"),
    [
        ("train: {batch_size: 0}", r"'train.batch_size' is 0; it must be in \[1, inf\]"),
        ("train: {batch_size: -4}", r"'train.batch_size' is -4"),
        ("train: {accumulate: 0}", r"'train.accumulate' is 0"),
        ("train: {epochs: 0}", r"'train.epochs' is 0"),
        ("optim: {lr: -0.001}", r"'optim.lr' is -0.001; it must be in \(0, inf\]"),
        ("optim: {lr: .nan}", r"'optim.lr' must be a finite number"),
        ("optim: {lr: nan}", r"'optim.lr' must be a finite number"),
        ("augment: {hflip: 1.5}", r"'augment.hflip' is 1.5"),
        ("loss: [{name: dice, weight: -1}]", r"'loss.weight' is -1.0"),
        ("input: {frames: []}", r"'input.frames' needs at least one frame"),
        ("train: {channels_last: maybe}", r"'train.channels_last' must be true, false or auto"),
        ("train: {channels_last: 'false'}", r"'train.channels_last' must be true, false or auto"),
    ],
)
def test_bad_values_are_one_line_errors_naming_file_and_key(tmp_path, yaml_text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml_text + "\n")
    with pytest.raises(EkError, match=r"bad.yaml: " + message):
        load_config(path)


def test_channels_last_takes_booleans_and_auto(tmp_path):
    for text, expected in (("true", True), ("false", False), ("auto", "auto")):
        path = tmp_path / "ok.yaml"
        path.write_text(f"train: {{channels_last: {text}}}\n")
        assert load_config(path).train.channels_last == expected


@pytest.mark.parametrize("name", ["../../evil", "", ".hidden", "a/b", "blend", "cache", "pseudo"])
def test_config_name_must_be_a_plain_unreserved_folder_name(tmp_path, name):
    path = tmp_path / "named.yaml"
    path.write_text(f"name: {name!r}\n")
    with pytest.raises(EkError, match=r"named.yaml: 'name': .*(not a valid name|reserved)"):
        load_config(path)

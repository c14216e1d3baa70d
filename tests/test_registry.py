"""One registry per choice: names defined once, every name implemented, one did-you-mean."""

from __future__ import annotations

import pytest

from ensemble_kit import registry
from ensemble_kit.config import CHOICES, config_from_dict
from ensemble_kit.errors import EkError

# importing the implementing modules registers the implementations
from ensemble_kit.inference import tta  # noqa: F401
from ensemble_kit.registry import Registry, did_you_mean
from ensemble_kit.training import backends, losses, trainer  # noqa: F401

IMPLEMENTED = [
    registry.LOSSES,
    registry.OPTIMIZERS,
    registry.SCHEDULES,
    registry.AMP_MODES,
    registry.TTA_MERGES,
    registry.BACKENDS,
]


@pytest.mark.parametrize("choice", IMPLEMENTED, ids=lambda r: r.kind)
def test_every_declared_name_has_its_implementation(choice):
    assert choice.missing() == ()


def test_config_validates_against_the_registries():
    assert CHOICES[("loss", "name")] is registry.LOSSES
    assert CHOICES[("optim", "name")] is registry.OPTIMIZERS
    with pytest.raises(EkError, match=r"'optim.name' is 'adma' \(did you mean adam"):
        config_from_dict({"name": "x", "optim": {"name": "adma"}})


def test_registry_rejects_undeclared_names_and_suggests():
    choice = Registry("colour", ("red", "green"))
    with pytest.raises(ValueError):
        choice.register("blue")
    choice.register("red")(1)
    assert choice.get("red") == 1 and choice.missing() == ("green",)
    with pytest.raises(
        EkError, match=r"unknown colour 'rde' \(did you mean red\?\); choose one of red, green"
    ):
        choice.get("rde")


def test_did_you_mean_is_case_insensitive_and_empty_when_nothing_is_close():
    assert did_you_mean("ADAM", ("adam", "sgd")) == " (did you mean adam?)"
    assert did_you_mean("zzzz", ("adam", "sgd")) == ""


def test_backend_is_looked_up_in_the_registry():
    with pytest.raises(EkError, match="unknown backend 'rya'"):
        backends.run_jobs([], lambda job: {}, "rya")

"""Truncated or corrupt files a later step reads are one-line errors naming the file."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ensemble_kit.config import config_from_dict
from ensemble_kit.errors import EkError
from ensemble_kit.inference.checkpoints import load_fold_model
from ensemble_kit.layout import Layout, pseudo_files
from ensemble_kit.models import build_model
from ensemble_kit.training.pseudo import read_pseudo


def test_truncated_best_pt_names_the_file(tmp_path):
    config = config_from_dict({"name": "quick"})
    fold_dir = tmp_path / "fold_0"
    fold_dir.mkdir()
    best = fold_dir / "best.pt"
    torch.save({"model": build_model(config, pretrained=False).state_dict()}, best)
    assert load_fold_model(config, fold_dir, torch.device("cpu")) is not None
    best.write_bytes(best.read_bytes()[: best.stat().st_size // 2])
    with pytest.raises(EkError, match=r"best.pt: truncated or unreadable checkpoint"):
        load_fold_model(config, fold_dir, torch.device("cpu"))


def test_truncated_pseudo_labels_name_the_file(tmp_path):
    layout = Layout(tmp_path / "folds")
    files = pseudo_files(layout.pseudo_dir("r1"))
    files["labels"].parent.mkdir(parents=True)
    np.save(files["labels"], np.zeros((2, 1, 8, 8), np.uint8))
    files["ids"].write_text("record_id,split,fold,models\n1,train,0,a\n2,train,1,a\n")
    files["manifest"].write_text(json.dumps({"frames": [3]}))
    files["labels"].write_bytes(files["labels"].read_bytes()[:100])
    with pytest.raises(EkError, match=r"labels.npy: truncated or unreadable"):
        read_pseudo(layout, "r1")

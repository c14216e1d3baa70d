"""Loading trained fold models: the architecture rebuilt, then the fold's ``best.pt``."""

from __future__ import annotations

import pickle
from pathlib import Path

import torch

from ..config import Config
from ..errors import EkError
from ..layout import fold_files
from ..models import build_model


def load_fold_model(
    config: Config,
    fold_dir: Path,
    device: torch.device,
    channels: tuple[int, int] | None = None,
) -> torch.nn.Module:
    """The best checkpoint of a fold, in eval mode.

    The architecture is built without pretrained weights (``best.pt`` replaces them), so
    loading never touches the network. ``channels``: the model's ``(input, output)``
    channels on an image task or with several classes (``task.model_channels``); None: the
    config's contrail channels and one output.
    """
    path = fold_files(fold_dir)["best"]
    if not path.is_file():
        raise EkError(f"{path}: missing; run `ek cv` to train this fold")
    model = build_model(config, pretrained=False, channels=channels)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)["model"]
    except (RuntimeError, EOFError, OSError, KeyError, pickle.UnpicklingError) as err:
        raise EkError(
            f"{path}: truncated or unreadable checkpoint ({str(err).splitlines()[0][:80]}); "
            f"delete {fold_dir} and rerun ek cv to retrain this fold"
        ) from None
    model.load_state_dict(state)
    return model.to(device).eval()

"""The public Python API of ensemble-kit: what users' scripts and notebooks import.

Everything here is a contract (its ``__all__`` is checked against
``docs/reference/formats.md``); every other module may move. Importing this module loads
torch and the blend search; ``ek --help`` and ``ek submit`` never import it.

Example::

    from ensemble_kit.api import BlendRule, load_codes, rle_encode

    rule = BlendRule.load("folds/blend.json")
    codes = {name: load_codes(f"folds/{name}", "holdout") for name in rule.weights}
    masks = rule.apply(codes)  # bool (N, H, W), exactly ek submit --split validation's
    rows = [rle_encode(mask) for mask in masks]
"""

from __future__ import annotations

from .blend.rule import BlendFile, BlendRule, top_fraction_threshold
from .blend.run import run_blend
from .blend.verify import verify_blend
from .config import Config, load_config
from .data.records import ash_false_color, build_input, list_records, load_mask
from .data.synth import write_synthetic
from .inference.checkpoints import load_fold_model
from .inference.rle import decode as rle_decode
from .inference.rle import encode as rle_encode
from .inference.submission import check_submission, write_submission
from .inference.tta import predict_probs
from .layout import Layout
from .metrics import global_dice
from .models import build_model
from .oof import from_codes, load_codes, read_oof, to_codes
from .training.cv import CvRequest, run_cv

__all__ = [
    "BlendFile",
    "BlendRule",
    "Config",
    "CvRequest",
    "Layout",
    "ash_false_color",
    "build_input",
    "build_model",
    "check_submission",
    "from_codes",
    "global_dice",
    "list_records",
    "load_codes",
    "load_config",
    "load_fold_model",
    "load_mask",
    "predict_probs",
    "read_oof",
    "rle_decode",
    "rle_encode",
    "run_blend",
    "run_cv",
    "to_codes",
    "top_fraction_threshold",
    "verify_blend",
    "write_submission",
    "write_synthetic",
]

"""``ek export``: fold models as a portable TorchScript (or ONNX) bundle, parity-checked.

The bundle (``folds/export/``) holds one traced model per fold of every blended config, a
``manifest.json`` (configs, TTA, input specs, blend weights) and a copy of ``blend.json``, so
a Kaggle notebook can predict with ``torch.jit.load`` and no training environment. Tracing
has changed outputs before (the experiment log saw dice drop after tracing), so every model
is compared with its eager original on sample inputs, and export fails loudly beyond
tolerance.
"""

from __future__ import annotations

import json
import logging
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch

from ..config import load_config, resolved_dict
from ..data.splits import read_meta
from ..errors import EkError
from ..files import atomic_path, write_json
from ..layout import Layout
from .checkpoints import load_fold_model

log = logging.getLogger(__name__)
FORMATS = ("torchscript", "onnx")
TOLERANCE = 1e-4


def exported_path(layout: Layout, name: str, fold: int, fmt: str = "torchscript") -> Path:
    return layout.export_dir / name / f"fold_{fold}.{'pt' if fmt == 'torchscript' else 'onnx'}"


def sample_inputs(in_channels: int, side: int, count: int = 2, seed: int = 0) -> torch.Tensor:
    """Inputs in the value range models see (cached inputs lie in [0, 1] or are standardised)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(count, in_channels, side, side, generator=generator)


def parity(reference: torch.nn.Module, exported, inputs: torch.Tensor) -> float:
    """Largest absolute difference of sigmoid outputs between two models."""
    with torch.inference_mode():
        return float(
            (torch.sigmoid(reference(inputs)) - torch.sigmoid(exported(inputs))).abs().max()
        )


def export_models(
    layout: Layout,
    fmt: str = "torchscript",
    names: list[str] | None = None,
    side: int | None = None,
) -> dict:
    """Trace every fold model of the named (default: blended) configs; returns the manifest."""
    if fmt not in FORMATS:
        raise EkError(f"unknown export format '{fmt}'; choose one of {', '.join(FORMATS)}")
    names = names or _blended_names(layout)
    n_folds = read_meta(layout)["n_folds"]
    manifest = {"format": fmt, "n_folds": n_folds, "configs": {}}
    for name in names:
        config = load_config(layout.config_dir(name) / "config.yaml")
        size = side or _label_side(layout, name)
        worst = max(_export_fold(layout, config, k, fmt, size) for k in range(n_folds))
        manifest["configs"][name] = {
            "config": resolved_dict(config),
            "side": size,
            "max_abs_diff": worst,
        }
    if layout.blend_json.is_file():
        shutil.copyfile(layout.blend_json, layout.export_dir / "blend.json")
    write_json(layout.export_dir / "manifest.json", manifest)
    return manifest


def _export_fold(layout: Layout, config, fold: int, fmt: str, side: int) -> float:
    model = load_fold_model(config, layout.fold_dir(config.name, fold), torch.device("cpu"))
    inputs = sample_inputs(config.input.in_channels, side)
    path = exported_path(layout, config.name, fold, fmt)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "onnx":
        return _export_onnx(model, inputs, path)
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter(
            "ignore", torch.jit.TracerWarning
        )  # the input size is baked in on purpose
        warnings.simplefilter(
            "ignore", FutureWarning
        )  # torch.jit is deprecated but still the portable format
        traced = torch.jit.freeze(torch.jit.trace(model, inputs[:1], check_trace=False))
    diff = parity(model, traced, inputs)
    if diff > TOLERANCE:
        raise EkError(
            f"{config.name} fold {fold}: traced model differs from eager by {diff:.2e} "
            f"(> {TOLERANCE}); not exported"
        )
    with atomic_path(path) as tmp:
        torch.jit.save(traced, str(tmp))
    reloaded = torch.jit.load(str(path))
    diff = max(diff, parity(model, reloaded, inputs))
    log.info("%s fold %d: exported, max |diff| %.2e", config.name, fold, diff)
    return diff


def _export_onnx(model, inputs: torch.Tensor, path: Path) -> float:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        raise EkError(
            "--format onnx needs the onnx and onnxruntime packages (pip install onnx onnxruntime)"
        ) from None
    with atomic_path(path) as tmp:
        torch.onnx.export(
            model,
            inputs[:1],
            str(tmp),
            input_names=["x"],
            output_names=["logits"],
            dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}},
        )
    import onnxruntime as ort

    session = ort.InferenceSession(str(path))
    out = torch.from_numpy(session.run(None, {"x": inputs.numpy()})[0])
    with torch.inference_mode():
        diff = float((torch.sigmoid(model(inputs)) - torch.sigmoid(out)).abs().max())
    if diff > TOLERANCE:
        raise EkError(f"{path}: ONNX model differs from eager by {diff:.2e} (> {TOLERANCE})")
    return diff


def load_exported(layout: Layout, name: str, n_folds: int, device: torch.device) -> list:
    """The traced fold models of a config, for ``ek submit --exported``."""
    models = []
    for fold in range(n_folds):
        path = exported_path(layout, name, fold)
        if not path.is_file():
            raise EkError(f"{path}: missing; run `ek export` first")
        models.append(torch.jit.load(str(path), map_location=device).eval())
    return models


def _blended_names(layout: Layout) -> list[str]:
    if layout.blend_json.is_file():
        return list(json.loads(layout.blend_json.read_text())["configs"])
    names = [n for n in layout.config_names() if layout.summary(n).is_file()]
    if not names:
        raise EkError(f"{layout.workdir}: no finished configs to export; run `ek cv` first")
    return names


def _label_side(layout: Layout, name: str) -> int:
    return int(np.load(layout.oof_npy(name), mmap_mode="r").shape[-1])

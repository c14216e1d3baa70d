"""``ek export``: fold models as a portable TorchScript (or ONNX) bundle, parity-checked.

The bundle (``folds/export/``, layout in :mod:`.bundle`) holds one traced model per fold of
every blended config, a ``manifest.json`` (resolved configs, the training pool's band
statistics for ``bands`` inputs) and a copy of ``blend.json``, so a Kaggle notebook can
predict with ``torch.jit.load`` and no training environment (:func:`.bundle.predict_bundle`).

Tracing has changed outputs before (the experiment log saw dice drop after tracing): models
are frozen without the passes that change numerics (conv-BN folding), so on the same device
a traced model returns the eager model's logits bit for bit, and every model is still
compared with its eager original on sample inputs, failing loudly beyond tolerance.
"""

from __future__ import annotations

import io
import logging
import shutil
import warnings
from pathlib import Path

import torch

from ..blend.rule import BlendRule
from ..config import Config, load_config, resolved_dict
from ..data.cache import band_stats
from ..data.splits import read_meta
from ..errors import EkError
from ..files import atomic_path, write_json
from ..layout import Layout, bundle_files, bundle_model
from ..registry import EXPORT_FORMATS
from ..sparse_oof import open_codes
from ..task import model_channels, task_dict, workdir_task
from .bundle import MODEL_FORMATS, TORCH_MIN
from .checkpoints import load_fold_model
from .staged import staged_folder

log = logging.getLogger(__name__)
FORMATS = EXPORT_FORMATS.names  # declared once, in the registry
TOLERANCE = 1e-4


def exported_path(layout: Layout, name: str, fold: int, fmt: str = "torchscript") -> Path:
    """Where ``ek export`` writes a fold's model (``folds/export/<name>/fold_<k>.pt``)."""
    return bundle_model(layout.export_dir, name, fold, fmt)


def sample_inputs(
    in_channels: int, side: int | tuple[int, int], count: int = 2, seed: int = 0
) -> torch.Tensor:
    """Inputs in the value range models see (cached inputs lie in [0, 1] or are standardised);
    ``side``: a square's side or an image task's ``(H, W)``."""
    generator = torch.Generator().manual_seed(seed)
    height, width = (side, side) if isinstance(side, int) else side
    return torch.rand(count, in_channels, height, width, generator=generator)


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
    out_dir: Path | None = None,
) -> dict:
    """Trace every fold model of the named (default: blended) configs; returns the manifest.

    The bundle is built in a staged folder and swapped in whole (:mod:`.staged`): a failure
    leaves the previous bundle as it was and no ``.tmp`` files; a full disk is one line.

    Args:
        layout: The workdir with the trained folds (and ``blend.json``).
        fmt: ``torchscript`` or ``onnx``.
        names: Configs to export; default those with a weight in ``blend.json``, else every
            finished config.
        side: Side of the sample inputs (default: the OOF's side, the size predicted).
        out_dir: Bundle folder to write (default ``folds/export/``).
    """
    if fmt not in FORMATS:
        raise EkError(f"unknown export format '{fmt}'; choose one of {', '.join(FORMATS)}")
    with staged_folder(Path(out_dir or layout.export_dir)) as staging:
        return write_bundle(layout, fmt, names, side, staging)


def write_bundle(
    layout: Layout, fmt: str, names: list[str] | None, side: int | None, out_dir: Path
) -> dict:
    """:func:`export_models` into ``out_dir`` as it is (the caller stages it)."""
    names = names or _blended_names(layout)
    meta = read_meta(layout)
    task = workdir_task(layout, meta)
    manifest: dict = {
        "format": fmt,
        "n_folds": meta["n_folds"],
        "torch": torch.__version__,
        "torch_min": TORCH_MIN,
        "configs": {},
    }
    if task.kind == "images":
        manifest["task"] = task_dict(task)  # contrails bundles stay as they were
    for name in names:
        config = load_config(layout.config_yaml(name))
        size = side or _label_side(layout, name)
        shape: int | tuple[int, int] = task.size if task.kind == "images" else size
        channels = model_channels(config, task)
        worst = max(
            _export_fold(layout, config, k, fmt, shape, out_dir, channels)
            for k in range(meta["n_folds"])
        )
        manifest["configs"][name] = {
            "config": resolved_dict(config),
            "side": size,
            "max_abs_diff": worst,
            "band_stats": _band_stats(layout, config, meta),
        }
    _remove_stale_models(out_dir, manifest)
    files = bundle_files(out_dir)
    if layout.blend_json.is_file():
        shutil.copyfile(layout.blend_json, files["blend"])
    else:
        files["blend"].unlink(missing_ok=True)  # never leave an older run's blend behind
    write_json(files["manifest"], manifest)
    return manifest


def _remove_stale_models(out_dir: Path, manifest: dict) -> None:
    """Delete exported models an earlier export left that this manifest does not list."""
    fmt, folds = manifest["format"], range(manifest["n_folds"])
    kept = {bundle_model(out_dir, n, k, fmt) for n in manifest["configs"] for k in folds}
    for path in list(out_dir.glob("*.fold_*.pt")) + list(out_dir.glob("*.fold_*.onnx")):
        if path not in kept:
            path.unlink()


def _band_stats(layout: Layout, config: Config, meta: dict) -> dict | None:
    """The training pool's band statistics a ``bands`` input is normalised with."""
    if config.input.channels != "bands":
        return None
    return band_stats(layout, Path(meta["data_root"]), config.input)


def _export_fold(
    layout: Layout,
    config: Config,
    fold: int,
    fmt: str,
    side: int | tuple[int, int],
    out_dir: Path,
    channels: tuple[int, int],
) -> float:
    fold_dir = layout.fold_dir(config.name, fold)
    model = load_fold_model(config, fold_dir, torch.device("cpu"), channels)
    inputs = sample_inputs(channels[0], side)
    path = bundle_model(out_dir, config.name, fold, fmt)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "onnx":
        return _export_onnx(model, inputs, path)
    with torch.inference_mode(), warnings.catch_warnings():
        # The input size is baked in on purpose; torch.jit is deprecated but still portable.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", FutureWarning)
        traced = torch.jit.trace(model, inputs[:1], check_trace=False)
        traced = torch.jit.freeze(traced, optimize_numerics=False)
    diff = parity(model, traced, inputs)
    if diff > TOLERANCE:
        raise EkError(
            f"{config.name} fold {fold}: traced model differs from eager by {diff:.2e} "
            f"(> {TOLERANCE}); not exported"
        )
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation, chosen
        torch.jit.save(traced, buffer)
    # Written by Python, not torch's C++ writer: a full disk is an OSError, not an abort.
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getvalue())
    reloaded = MODEL_FORMATS["torchscript"].load(path, torch.device("cpu"))
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
            (inputs[:1],),
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


def _blended_names(layout: Layout) -> list[str]:
    if layout.blend_json.is_file():
        return BlendRule.load(layout.blend_json).members
    names = [n for n in layout.config_names() if layout.summary(n).is_file()]
    if not names:
        raise EkError(f"{layout.workdir}: no finished configs to export; run `ek cv` first")
    return names


def _label_side(layout: Layout, name: str) -> int:
    return int(open_codes(layout.oof_npy(name)).shape[-1])

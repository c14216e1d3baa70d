"""The prediction bundle: traced fold models, ``manifest.json`` and ``blend.json`` in one folder
(``folds/export/`` from ``ek export``, or the dataset ``ek kaggle`` writes).

Layout::

    manifest.json         format, n_folds; per config: resolved config, side, parity, and
                          the training pool's band statistics (bands inputs)
    blend.json            the blend to apply (a copy of the workdir's)
    <config>.fold_<k>.pt  TorchScript model of fold k (flat: Kaggle uploads skip folders)

:func:`predict_bundle` is what the Kaggle notebook runs and what ``ek submit --exported`` runs
(through :mod:`.ensemble`); neither needs the ``folds/`` workdir or the packages that built
the models: this module imports only torch, numpy, pandas, numba and PyYAML from outside the
standard library and ensemble_kit (no timm, segmentation_models_pytorch, huggingface_hub,
scikit-learn or matplotlib, which Kaggle's image does not promise).
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..blend.rule import BlendRule
from ..config import config_from_dict
from ..errors import EkError
from ..layout import bundle_files, bundle_model
from ..runtime import resolve_devices
from ..task import Task, task_from_dict
from .ensemble import Ensemble, PredictOptions, predict_submission

log = logging.getLogger(__name__)
PROJECTED_RECORDS = 2000  # about the size of the hidden test set
TORCH_MIN = "2.2"  # the oldest torch the bundle runs on; setup.cfg's torch>= agrees (tested)


def read_json(path: Path, what: str) -> dict:
    """A bundle's JSON file, or an EkError naming it and what to run."""
    if not path.is_file():
        raise EkError(f"{path}: missing; {what}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise EkError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise EkError(f"{path}: expected a JSON object")
    return data


@dataclass(frozen=True)
class ModelFormat:
    """How a bundle's fold models of one format are named and read."""

    suffix: str
    load: Callable[[Path, torch.device], Callable[[torch.Tensor], torch.Tensor]]


MODEL_FORMATS: dict[str, ModelFormat] = {}


def model_format(name: str, suffix: str):
    """Register a loader: ``@model_format("onnx", ".onnx") def load(path, device): ...``."""

    def register(load):
        MODEL_FORMATS[name] = ModelFormat(suffix, load)
        return load

    return register


@model_format("torchscript", ".pt")
def _load_torchscript(path: Path, device: torch.device):
    with warnings.catch_warnings():
        # ek chose TorchScript on purpose (it reads back to torch 2.2); torch >= 2.9 warns that
        # torch.jit is deprecated on every load. docs/explanation/model-formats.md: what next.
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.load(str(path), map_location=device).eval()


class CallableModel(torch.nn.Module):
    """A model given as a function (an ONNX session, an exported program), kept out of
    ``modules()`` so that ``eval()`` (which exported programs refuse) never reaches it."""

    def __init__(self, forward: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        self.__dict__["function"] = forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.__dict__["function"](x)


@model_format("torch_export", ".pt2")
def _load_torch_export(path: Path, device: torch.device):
    return CallableModel(torch.export.load(str(path)).module().to(device))


@model_format("onnx", ".onnx")
def _load_onnx(path: Path, device: torch.device):
    try:
        import onnxruntime
    except ImportError:
        raise EkError(f"{path}: ONNX models need the onnxruntime package") from None
    session = onnxruntime.InferenceSession(str(path))

    def forward(x: torch.Tensor) -> torch.Tensor:
        logits = session.run(None, {"x": x.float().cpu().numpy()})[0]
        return torch.from_numpy(logits).to(x.device)

    return CallableModel(forward)


def bundle_fix(manifest: dict) -> str:
    """What rebuilds this bundle: ``ek kaggle`` for a Kaggle dataset, else ``ek export``."""
    return "rerun `ek kaggle`" if "wheel" in manifest else "rerun `ek export`"


def load_bundle(folder: Path | str, device: torch.device) -> tuple[Ensemble, BlendRule]:
    """Every fold model of every config with non-zero weight in the bundle's blend.

    The models are read by their format's loader (:data:`MODEL_FORMATS`: TorchScript, ONNX,
    ``torch.export``), so any registered format can ship.

    Returns:
        ``(ensemble, rule)``: the models on ``device`` in eval mode, and ``blend.json``'s
        :class:`~ensemble_kit.blend.rule.BlendRule`.

    Raises:
        EkError: a file is missing or unreadable, the format is unknown, or the blend weights a
            config the bundle lacks; each names ``ek kaggle`` (or ``ek export``) as the fix.
    """
    files = bundle_files(folder)
    manifest = read_json(files["manifest"], "run `ek kaggle` (or `ek export`) to write it")
    fix = bundle_fix(manifest)
    fmt = _model_format(files["manifest"], manifest, fix)
    _warn_if_older_torch(manifest.get("torch"))
    rule = bundle_rule(files["blend"], fix)
    configs, stats, sides = {}, {}, {}
    models: dict[str, list] = {}
    for name in rule.members:
        entry = _config_entry(files["manifest"], manifest, name, fix)
        configs[name] = config_from_dict(entry["config"], source=f"{files['manifest']} ({name})")
        stats[name] = entry.get("band_stats")
        sides[name] = int(entry["side"])
        if configs[name].input.channels == "bands" and stats[name] is None:
            raise EkError(f"{files['manifest']}: no band_stats for '{name}'; {fix}")
        models[name] = [
            _load_model(bundle_model(folder, name, k).with_suffix(fmt.suffix), fmt, device, fix)
            for k in range(manifest["n_folds"])
        ]
    task = _task_of(files["manifest"], manifest)
    shapes: dict = sides if task is None else {n: tuple(task.size) for n in sides}  # traced (H, W)
    return Ensemble(configs, models, stats, shapes, weights=dict(rule.weights), task=task), rule


def bundle_task(folder: Path | str) -> Task | None:
    """The image task a bundle was exported for (``manifest.json``'s ``task``); None for a
    contrails bundle."""
    path = bundle_files(folder)["manifest"]
    return _task_of(path, read_json(path, "run `ek kaggle` (or `ek export`) to write it"))


def _task_of(path: Path, manifest: dict) -> Task | None:
    entry = manifest.get("task")
    return None if entry is None else task_from_dict(entry, source=f"{path} (task)")


def bundle_rule(path: Path, fix: str) -> BlendRule:
    """The bundle's ``blend.json`` rule; a missing or unreadable one names ``fix``."""
    if not path.is_file():
        raise EkError(f"{path}: missing; {fix} after `ek blend --oof`")
    try:
        return BlendRule.load(path)
    except EkError as error:
        raise EkError(f"{error}; then {fix}") from None


def _model_format(path: Path, manifest: dict, fix: str) -> ModelFormat:
    name = manifest.get("format")
    if name not in MODEL_FORMATS:
        raise EkError(
            f"{path}: model format {name!r}; this ensemble_kit reads "
            f"{', '.join(MODEL_FORMATS)}; {fix}"
        )
    return MODEL_FORMATS[name]


def _config_entry(path: Path, manifest: dict, name: str, fix: str) -> dict:
    entry = manifest.get("configs", {}).get(name)
    if entry is None:
        raise EkError(f"{path}: blend.json weights config '{name}', which the bundle lacks; {fix}")
    return entry


def _warn_if_older_torch(exported_with: str | None) -> None:
    """TorchScript written by a newer torch may fail to load, or load and run differently."""
    if exported_with and _major_minor(torch.__version__) < _major_minor(exported_with):
        log.warning(
            "the bundle was exported with torch %s, this is torch %s (the oldest supported "
            "is %s): if loading fails, rerun `ek kaggle` with a torch no newer than this one",
            exported_with,
            torch.__version__,
            TORCH_MIN,
        )


def _major_minor(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("+")[0].split(".")[:2] if part.isdigit())


def torch_is_supported(version: str = torch.__version__) -> bool:
    """Whether ``version`` is at least :data:`TORCH_MIN`."""
    return _major_minor(version) >= _major_minor(TORCH_MIN)


def _load_model(path: Path, fmt: ModelFormat, device: torch.device, fix: str):
    if not path.is_file():
        raise EkError(f"{path}: missing; {fix}")
    try:
        return fmt.load(path, device)
    except (RuntimeError, ValueError, OSError) as err:
        raise EkError(f"{path}: unreadable model ({str(err).splitlines()[0]}); {fix}") from None


def predict_bundle(
    folder: Path | str,
    data_root: Path | str,
    out: Path | str,
    split: str = "test",
    device: str | None = "auto",
    batch_size: int = 16,
    precision: str = "auto",
    time_budget_hours: float | None = None,
) -> dict:
    """Predict every record of ``data_root/split`` with a bundle; write a checked CSV.

    The Kaggle notebook's one call. Hidden data never aborts it: NaN/inf pixels are
    replaced and an unreadable record is predicted empty, each with a warning. On CUDA the
    batch starts from free memory and is halved on an out-of-memory error.

    Args:
        folder: The bundle folder.
        data_root: A data folder in the Kaggle layout (``<split>/<record_id>/band_*.npy``).
        out: The submission CSV to write (atomically, after validating it).
        split: The split folder to predict.
        device: ``auto`` (every visible GPU, one worker each, else the CPU), ``cpu``,
            ``cuda:1``, or a list such as ``cuda:0,cuda:1``.
        batch_size: Records per batch (at most).
        precision: ``auto`` (fp16 below sm80, bf16 from sm80, fp32 on CPU), ``fp32``,
            ``fp16`` or ``bf16``.
        time_budget_hours: When the projection after the first 3 % exceeds it, TTA copies and
            then the lowest-weighted members are dropped (logged); None: no budget.

    Returns:
        :func:`ensemble_kit.inference.ensemble.predict_submission`'s result plus ``device``,
        ``load_seconds`` (reading the models) and ``projected_seconds`` for
        :data:`PROJECTED_RECORDS` records.
    """
    started = time.perf_counter()
    devices = resolve_devices(device)
    workers = [(load_bundle(folder, d)[0], d) for d in devices]
    rule = bundle_rule(bundle_files(folder)["blend"], "rerun `ek kaggle`")
    log.info("predicting on %s, one worker each", ", ".join(map(str, devices)))
    load_seconds = time.perf_counter() - started
    options = PredictOptions(
        precision=precision,
        memory_safe=True,
        lenient=True,
        budget_seconds=None if time_budget_hours is None else time_budget_hours * 3600,
    )
    ensemble = workers[0][0]
    result = predict_submission(ensemble, rule, Path(data_root), split, Path(out), batch_size,
                                options=options, workers=workers)  # fmt: skip
    result.update(
        device=", ".join(map(str, devices)),
        load_seconds=load_seconds,
        projected_seconds=projected_seconds(result["records_per_second"], load_seconds),
    )
    log.info(throughput_line(result))
    return result


def projected_seconds(
    records_per_second: float, load_seconds: float = 0.0, records: int = PROJECTED_RECORDS
) -> float:
    """Seconds to load the models and predict ``records`` records at the measured rate."""
    return load_seconds + records / max(records_per_second, 1e-9)


def manifest_lines(manifest: dict) -> list[str]:
    """One line per config of an export manifest: folds and the parity check's largest diff."""
    return [
        f"{name}: {manifest['n_folds']} folds, max |prob diff| {entry['max_abs_diff']:.2e}"
        for name, entry in manifest["configs"].items()
    ]


def throughput_line(result: dict) -> str:
    """``N records/s on DEVICE; 2,000 records: ~T min`` for a :func:`predict_bundle` result."""
    return (
        f"{result['records_per_second']:.2f} records/s on {result['device']} "
        f"({result['records']} records); {PROJECTED_RECORDS:,} records: "
        f"~{result['projected_seconds'] / 60:.1f} min "
        f"(incl. {result['load_seconds']:.1f} s loading the models)"
    )

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
from pathlib import Path

import torch

from ..config import config_from_dict
from ..errors import EkError
from ..layout import bundle_files, bundle_model
from ..runtime import resolve_device
from .ensemble import Ensemble, predict_submission

log = logging.getLogger(__name__)
PROJECTED_RECORDS = 2000  # about the size of the hidden test set


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


def load_bundle(folder: Path | str, device: torch.device) -> tuple[Ensemble, dict]:
    """Every traced fold model of every config with non-zero weight in the bundle's blend.

    Returns:
        ``(ensemble, blend)``: the models on ``device`` in eval mode, and ``blend.json``.

    Raises:
        EkError: a file is missing or unreadable, the bundle is not TorchScript, or the blend
            weights a config the bundle lacks.
    """
    files = bundle_files(folder)
    manifest_path = files["manifest"]
    manifest = read_json(manifest_path, "run `ek export` or `ek kaggle` to write the bundle")
    if manifest.get("format") != "torchscript":
        raise EkError(
            f"{manifest_path}: format {manifest.get('format')!r}; predicting from a bundle "
            "needs TorchScript (ek export --format torchscript)"
        )
    _warn_if_older_torch(manifest.get("torch"))
    blend = read_json(files["blend"], "run `ek blend --oof`, then `ek export`")
    configs, stats, sides = {}, {}, {}
    models: dict[str, list[torch.nn.Module]] = {}
    for name in blend.get("configs", {}):
        entry = manifest.get("configs", {}).get(name)
        if entry is None:
            raise EkError(
                f"{manifest_path}: blend.json weights config '{name}', which the bundle lacks; "
                "rerun ek export"
            )
        configs[name] = config_from_dict(entry["config"], source=f"{manifest_path} ({name})")
        stats[name] = entry.get("band_stats")
        sides[name] = int(entry["side"])
        if configs[name].input.channels == "bands" and stats[name] is None:
            raise EkError(f"{manifest_path}: no band_stats for '{name}'; rerun ek export")
        models[name] = [
            _load_traced(bundle_model(folder, name, k), device) for k in range(manifest["n_folds"])
        ]
    return Ensemble(configs, models, stats, sides), blend


def _warn_if_older_torch(exported_with: str | None) -> None:
    """TorchScript written by a newer torch may fail to load, or load and run differently."""
    if exported_with and _major_minor(torch.__version__) < _major_minor(exported_with):
        log.warning(
            "the bundle was exported with torch %s, this is torch %s: if loading fails, "
            "export with a torch no newer than this one",
            exported_with,
            torch.__version__,
        )


def _major_minor(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("+")[0].split(".")[:2] if part.isdigit())


def _load_traced(path: Path, device: torch.device) -> torch.jit.ScriptModule:
    if not path.is_file():
        raise EkError(f"{path}: missing; rerun ek export")
    return torch.jit.load(str(path), map_location=device).eval()


def predict_bundle(
    folder: Path | str,
    data_root: Path | str,
    out: Path | str,
    split: str = "test",
    device: str | None = "auto",
    batch_size: int = 16,
) -> dict:
    """Predict every record of ``data_root/split`` with a bundle; write a checked CSV.

    The Kaggle notebook's one call; ``ek submit --exported`` takes the same path.

    Args:
        folder: The bundle folder.
        data_root: A data folder in the Kaggle layout (``<split>/<record_id>/band_*.npy``).
        out: The submission CSV to write (atomically, after validating it).
        split: The split folder to predict.
        device: ``auto`` (CUDA when present), ``cpu``, ``cuda``, ``cuda:1``, ...
        batch_size: Records per batch.

    Returns:
        :func:`ensemble_kit.inference.ensemble.predict_submission`'s result plus ``device``,
        ``load_seconds`` (reading the models) and ``projected_seconds`` for
        :data:`PROJECTED_RECORDS` records.
    """
    started = time.perf_counter()
    torch_device = resolve_device(device)
    ensemble, blend = load_bundle(folder, torch_device)
    load_seconds = time.perf_counter() - started
    result = predict_submission(
        ensemble, blend, Path(data_root), split, Path(out), batch_size, torch_device
    )
    result.update(
        device=str(torch_device),
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

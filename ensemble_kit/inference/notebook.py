"""The Kaggle notebook of the ``ek kaggle`` bundle, as nbformat 4 JSON.

Its first cell holds the parameters: Kaggle's paths by default, each overridable by an
environment variable (``EK_DATA``, ``EK_BUNDLE``, ``EK_OUT``), so that the very same notebook
runs on Kaggle and in the tests. It is the one place that reads paths from the environment;
the library takes them as arguments.
"""

from __future__ import annotations

import json

from ..task import Task

COMPETITION_DATA = "/kaggle/input/google-research-identify-contrails-reduce-global-warming"
KAGGLE_INPUT = "/kaggle/input"
KAGGLE_OUT = "/kaggle/working/submission.csv"
SITE_FOLDER = "ek-site"  # where the wheel is installed, beside the submission
PARAMETERS = """# Parameters: Kaggle's paths; the environment variables EK_DATA, EK_BUNDLE
# and EK_OUT override them (to run this very notebook elsewhere; a relative one is taken
# from the folder the notebook was launched from, not the notebook's own folder).
import os
from pathlib import Path

LAUNCHED_FROM = Path(os.environ.get("PWD") or os.getcwd())
DATA = LAUNCHED_FROM / os.environ.get("EK_DATA", "{data}")
BUNDLE = LAUNCHED_FROM / os.environ.get("EK_BUNDLE", "{input}/{slug}")
OUT = LAUNCHED_FROM / os.environ.get("EK_OUT", "{out}")
SPLIT = "test"
DEVICE = "auto"  # every visible GPU (one worker each), else the CPU
PRECISION = "auto"  # fp16 on T4/P100 (no bf16), bf16 from A100 on, fp32 on CPU
BATCH_SIZE = 16  # at most: on a GPU it starts from free memory and halves on OOM
TIME_BUDGET_HOURS = 8.5  # over it, TTA copies and then the last members are dropped
SITE = OUT.parent / "{site}"  # the wheel is installed here, in the working directory"""
CHECKS = """# First checks, each with its fix: data, dataset, wheel, torch.
import json
import re

import torch


def fail(message):
    raise SystemExit("ek: error: " + message)


{split_line}if not ({split_dir}).is_dir():
    fail(f"{{{split_dir}}}: no competition data; Add Input > Competitions > {data_name}")
if not (BUNDLE / "manifest.json").is_file():
    fail(f"{{BUNDLE}}: no ek bundle; Add Input > Datasets > {slug} (written by `ek kaggle`)")
MANIFEST = json.loads((BUNDLE / "manifest.json").read_text())
WHEELS = sorted(BUNDLE.glob("ensemble_kit-*.whl"))
if MANIFEST.get("wheel") not in [wheel.name for wheel in WHEELS]:
    found = ", ".join(wheel.name for wheel in WHEELS) or "none"
    named = MANIFEST.get("wheel")
    fail(f"{{BUNDLE}}: wheel {{named}} not found ({{found}}); rerun `ek kaggle`, upload it again")
WHEEL = BUNDLE / MANIFEST["wheel"]


def major_minor(version):
    return tuple(int(part) for part in re.findall(r"\\d+", version)[:2])


if major_minor(torch.__version__) < major_minor(MANIFEST["torch_min"]):
    oldest = MANIFEST["torch_min"]
    fail(f"torch {{torch.__version__}} is older than {{oldest}}; Settings > Environment: latest")
print("data, bundle, wheel and torch", torch.__version__, "checked")"""
INSTALL = """# Install the bundle's ensemble_kit offline, then import it from there (first).
import subprocess
import sys

pip = [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--upgrade"]
subprocess.run(pip + ["--target", str(SITE), str(WHEEL)], check=True)
sys.path.insert(0, str(SITE))
import ensemble_kit

print("ensemble_kit", ensemble_kit.__version__, "from", ensemble_kit.__file__)
assert Path(ensemble_kit.__file__).resolve().is_relative_to(SITE.resolve()), "not the wheel's"
"""
PREDICT = """# Predict every record of DATA/SPLIT with the exported fold models; write OUT.
import logging

from ensemble_kit.inference.bundle import predict_bundle, throughput_line

logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)
result = predict_bundle(
    BUNDLE, DATA, OUT, split=SPLIT, device=DEVICE, batch_size=BATCH_SIZE,
    precision=PRECISION, time_budget_hours=TIME_BUDGET_HOURS,
)
print("devices used:", result["device"])"""
CHECK = """# Validate the CSV with the checker of `ek submit --check`: header, ids, every RLE.
from ensemble_kit.inference.submission import check_submission

print(check_submission(OUT, DATA, SPLIT))"""
TASK_CHECK = """# Validate the CSV with the checker of `ek submit --check`: header, ids, every RLE.
from ensemble_kit.inference.bundle import bundle_task
from ensemble_kit.inference.submission import check_task_submission

print(check_task_submission(OUT, bundle_task(BUNDLE), DATA, SPLIT))"""
TIMING = """# Throughput here, and the time the hidden test set (about 2,000 records) would take.
print(throughput_line(result))"""
INTRO = """# {title}

Predicts the {what} of the competition's test {records} with the fold models of the
`{slug}` dataset, written by `ek kaggle` (ensemble-kit {version}), and writes
`submission.csv`. Runs with the internet off: ensemble-kit is installed from the wheel in the
dataset, and nothing outside Kaggle's Python image is needed. Attach the competition data and
the `{slug}` dataset, then run all cells."""


def notebook(slug: str, title: str, wheel: str, version: str, task: Task | None = None) -> dict:
    """The notebook as an nbformat 4 dict (``json.dump`` it to an ``.ipynb``).

    ``task``: an image task (``kind: images``): its Kaggle data path, image folders and
    submission checker; None (contrails) gives the contrails notebook, unchanged.
    """
    images = task if task is not None and task.kind == "images" else None
    data = COMPETITION_DATA if images is None else f"{KAGGLE_INPUT}/{images.kaggle_slug}"
    parameters = PARAMETERS.format(
        data=data, input=KAGGLE_INPUT, slug=slug, out=KAGGLE_OUT, site=SITE_FOLDER
    )  # fmt: skip
    if images is None:
        checks = CHECKS.format(
            slug=slug, split_line="", split_dir="DATA / SPLIT", data_name="the contrails data"
        )
        what, records, check = "contrail masks", "records", CHECK
    else:
        folders = {s: getattr(images.images, s) for s in ("train", "validation", "test")}
        line = f"IMAGES = DATA / {json.dumps({k: v for k, v in folders.items() if v})}[SPLIT]\n"
        checks = CHECKS.format(
            slug=slug, split_line=line, split_dir="IMAGES", data_name="the competition's data"
        )
        what, records, check = f"masks of task {images.name}", "images", TASK_CHECK
    intro = INTRO.format(title=title, slug=slug, version=version, what=what, records=records)
    cells = [
        _cell("markdown", "intro", intro),
        _cell("code", "parameters", parameters, tags=["parameters"]),
        _cell("code", "checks", checks),
        _cell("code", "install", INSTALL),
        _cell("code", "predict", PREDICT),
        _cell("code", "check", check),
        _cell("code", "timing", TIMING),
    ]
    return {
        "cells": cells,
        "metadata": {
            "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
            "language_info": {"name": "python"},
        },
        "nbformat": 4,
        "nbformat_minor": 5,
    }


def notebook_json(slug: str, title: str, wheel: str, version: str, task: Task | None = None) -> str:
    return json.dumps(notebook(slug, title, wheel, version, task), indent=1) + "\n"


def _cell(kind: str, cell_id: str, text: str, tags: list[str] | None = None) -> dict:
    cell: dict = {
        "cell_type": kind,
        "id": cell_id,
        "metadata": {"tags": tags} if tags else {},
        "source": text.strip("\n").splitlines(keepends=True),
    }
    if kind == "code":
        cell.update(execution_count=None, outputs=[])
    return cell

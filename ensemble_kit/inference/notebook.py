"""The Kaggle notebook of the ``ek kaggle`` bundle, as nbformat 4 JSON.

Its first cell holds the parameters: Kaggle's paths by default, each overridable by an
environment variable (``EK_DATA``, ``EK_BUNDLE``, ``EK_OUT``), so that the very same notebook
runs on Kaggle and in the tests. It is the one place that reads paths from the environment;
the library takes them as arguments.
"""

from __future__ import annotations

import json

COMPETITION_DATA = "/kaggle/input/google-research-identify-contrails-reduce-global-warming"
KAGGLE_INPUT = "/kaggle/input"
KAGGLE_OUT = "/kaggle/working/submission.csv"
SITE_FOLDER = "ek-site"  # where the wheel is installed, beside the submission
PARAMETERS = """# Parameters: Kaggle's paths; the environment variables EK_DATA, EK_BUNDLE
# and EK_OUT override them (to run this very notebook elsewhere).
import os
from pathlib import Path

DATA = Path(os.environ.get("EK_DATA", "{data}"))
BUNDLE = Path(os.environ.get("EK_BUNDLE", "{input}/{slug}"))
OUT = Path(os.environ.get("EK_OUT", "{out}"))
SPLIT = "test"
DEVICE = "auto"  # cuda when the notebook has a GPU, else cpu
BATCH_SIZE = 16
WHEEL = BUNDLE / "{wheel}"
SITE = OUT.parent / "{site}"  # the wheel is installed here, in the working directory"""
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
result = predict_bundle(BUNDLE, DATA, OUT, split=SPLIT, device=DEVICE, batch_size=BATCH_SIZE)"""
CHECK = """# Validate the CSV with the checker of `ek submit --check`: header, ids, every RLE.
from ensemble_kit.inference.submission import check_submission

print(check_submission(OUT, DATA, SPLIT))"""
TIMING = """# Throughput here, and the time the hidden test set (about 2,000 records) would take.
print(throughput_line(result))"""
INTRO = """# {title}

Predicts the contrail masks of the competition's test records with the fold models of the
`{slug}` dataset, written by `ek kaggle` (ensemble-kit {version}), and writes
`submission.csv`. Runs with the internet off: ensemble-kit is installed from the wheel in the
dataset, and nothing outside Kaggle's Python image is needed. Attach the competition data and
the `{slug}` dataset, then run all cells."""


def notebook(slug: str, title: str, wheel: str, version: str) -> dict:
    """The notebook as an nbformat 4 dict (``json.dump`` it to an ``.ipynb``)."""
    parameters = PARAMETERS.format(
        data=COMPETITION_DATA, input=KAGGLE_INPUT, slug=slug, out=KAGGLE_OUT, wheel=wheel,
        site=SITE_FOLDER,
    )  # fmt: skip
    cells = [
        _cell("markdown", "intro", INTRO.format(title=title, slug=slug, version=version)),
        _cell("code", "parameters", parameters, tags=["parameters"]),
        _cell("code", "install", INSTALL),
        _cell("code", "predict", PREDICT),
        _cell("code", "check", CHECK),
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


def notebook_json(slug: str, title: str, wheel: str, version: str) -> str:
    return json.dumps(notebook(slug, title, wheel, version), indent=1) + "\n"


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

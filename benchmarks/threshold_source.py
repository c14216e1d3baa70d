"""Which threshold carries over to unseen fold-mean predictions: chosen on OOF or on the holdout?

    python benchmarks/threshold_source.py                 # synth data + the demo's two configs
    python benchmarks/threshold_source.py --workdir folds --heldout DATA   # a finished folds/

OOF rows each come from one fold model; the holdout and the test set are predicted by the
mean of K fold models. This script blends the same OOF twice, ``ek blend --oof
--threshold-from oof`` and ``--threshold-from holdout``, and predicts a held-out split that
neither saw with ``ek submit --split validation`` (every fold model, as on the test set):

1. unless ``--workdir``: ``ek synth`` (``--train`` 160, ``--validation`` 64 at 64 px, seed 0)
   and ``ek cv`` of ``--configs`` (default ``configs/tiny.yaml`` and ``configs/tiny_fpn.yaml``)
   with ``--folds`` 3: the demo's run;
2. unless ``--heldout``: a new draw of the same generator (``ek synth --seed 1``), whose
   ``validation/`` is the held-out split;
3. per source: the threshold, the blend's own honest estimate (``oof``: the holdout dice at
   the OOF threshold, beside the nested OOF estimate; ``holdout``: the mean and spread of
   its cross-fitted halves), the dice on the held-out split, and estimate minus held-out.

Prints one line per source. The time is nearly all ``ek cv`` (``make demo``, the same run,
takes 3-7 min on an idle 2-core machine); ``--configs configs/tiny.yaml`` halves it. On a
busy machine run it with ``OMP_NUM_THREADS=1``: with torch's two threads per process under a
load average of 15, an epoch took minutes instead of seconds here.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from click.testing import CliRunner

from ensemble_kit.blend.rule import BlendFile
from ensemble_kit.cli import main as ek

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = (ROOT / "configs" / "tiny.yaml", ROOT / "configs" / "tiny_fpn.yaml")


def run(*args) -> str:
    result = CliRunner().invoke(ek, [str(a) for a in args], catch_exceptions=False)
    if result.exit_code:
        raise SystemExit(result.output)
    return result.output


def train(folder: Path, args) -> Path:
    """Synth data (64 px, seed 0) and ``ek cv`` of the configs (default: the demo's run)."""
    data, workdir = folder / "data", folder / "folds"
    run(
        "synth", "--out", data, "--train", args.train, "--validation", args.validation,
        "--test", 4, "--size", 64,
    )  # fmt: skip
    extra = () if args.epochs is None else ("--epochs", args.epochs)
    run("cv", "--data", data, "--workdir", workdir, "--folds", args.folds, *extra, *args.configs)
    return workdir


def held_out_split(folder: Path, size: int, records: int) -> Path:
    """A new draw of the same generator (seed 1): its validation/ is the held-out split."""
    data = folder / "heldout"
    run(
        "synth", "--out", data, "--train", 0, "--validation", records, "--test", 0,
        "--size", size, "--seed", 1,
    )  # fmt: skip
    return data


def compare(workdir: Path, heldout: Path, scratch: Path) -> list[dict]:
    rows = []
    for source in ("oof", "holdout"):
        run("blend", "--oof", "--workdir", workdir, "--threshold-from", source)
        blend = BlendFile.load(workdir / "blend.json")
        out = scratch / f"heldout_{source}.csv"
        run("submit", "--workdir", workdir, "--data", heldout, "--split", "validation",
            "--out", out)  # fmt: skip
        scores = blend.scores
        if source == "oof":
            estimate, spread = scores["holdout"], None
        else:
            estimate, spread = scores["holdout_crossfit"]["mean"], scores["holdout_crossfit"]["std"]
        rows.append(
            {
                "source": source,
                "mode": blend.rule.mode,
                "threshold": blend.rule.threshold,
                "estimate": estimate,
                "spread": spread,
                "nested_oof": scores["nested"]["pooled"],
                "holdout_best": scores["holdout_threshold"]["best_dice"],
                "heldout": json.loads(out.with_suffix(".json").read_text())["dice"],
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, help="a finished folds/ (default: train one)")
    parser.add_argument("--heldout", type=Path, help="data folder whose validation/ is unseen")
    parser.add_argument("--records", type=int, default=128, help="held-out records to draw")
    parser.add_argument("--epochs", type=int, default=None, help="override the configs' epochs")
    parser.add_argument("--configs", type=Path, nargs="+", default=list(CONFIGS))
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--train", type=int, default=160, help="synthetic train records")
    parser.add_argument("--validation", type=int, default=64, help="holdout records")
    args = parser.parse_args()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        workdir = args.workdir or train(scratch, args)
        heldout = args.heldout or held_out_split(scratch, _image_side(workdir), args.records)
        rows = compare(workdir, heldout, scratch)
    for r in rows:
        spread = "" if r["spread"] is None else f" +- {r['spread']:.4f}"
        print(
            f"threshold from {r['source']:7s} [{r['mode']}] {r['threshold']:.4f}: "
            f"estimate {r['estimate']:.4f}{spread} (nested OOF {r['nested_oof']:.4f}), "
            f"held-out dice {r['heldout']:.4f}, estimate - held-out {r['estimate'] - r['heldout']:+.4f}"
        )
    best = max(rows, key=lambda r: r["heldout"])
    print(
        f"holdout's own best dice {rows[0]['holdout_best']:.4f}; higher held-out dice: "
        f"threshold from {best['source']}; {time.perf_counter() - started:.0f} s"
    )


def _image_side(workdir: Path) -> int:
    name = next(p.parent.name for p in sorted(workdir.glob("*/summary.json")))
    return int(np.load(workdir / name / "oof.npy", mmap_mode="r").shape[-1])


if __name__ == "__main__":
    main()

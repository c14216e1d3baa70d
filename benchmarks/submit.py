"""End-to-end `ek submit`: records/s and where the time goes (read, model, encode).

Two tiny configs x 5 folds x 4 TTA on synthetic 256x256 test records. The fold models are
trained for a few steps only (their quality does not matter here). To spare ~19 MB of disk
per record, test records beyond the first `--distinct` are hard links to those files, so
reads may come from the page cache (read time is then a lower bound).

    .venv/bin/python benchmarks/submit.py [--records 2000] [--distinct 64]
    .venv/bin/python benchmarks/submit.py --records 1000 --configs 1 --folds 2 --tta 1
        # the per-record cost around the model (read, encode, write) at little model time
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import pandas as pd
from click.testing import CliRunner

from ensemble_kit.cli import main as ek

CONFIG = """
name: {name}
input: {{channels: ash, frames: {frames}}}
model: {{arch: {arch}, encoder: {encoder}}}
train: {{epochs: 1, batch_size: 8, max_steps_per_epoch: 1}}
tta: {tta}
"""
FLIPS = ("identity", "hflip", "vflip", "hvflip")


def run(*args) -> str:
    result = CliRunner().invoke(ek, [str(a) for a in args], catch_exceptions=False)
    if result.exit_code:
        raise SystemExit(result.output)
    return result.output


def clone_test_records(data: Path, total: int) -> None:
    """Add hard-linked copies of the synthetic test records until there are ``total``."""
    test = data / "test"
    sources = sorted(test.iterdir())
    for i in range(total - len(sources)):
        source = sources[i % len(sources)]
        target = test / f"{9_000_000_000_000_000 + i}"
        target.mkdir()
        for file in source.iterdir():
            os.link(file, target / file.name)
    ids = sorted(p.name for p in test.iterdir())
    pd.DataFrame({"record_id": ids, "encoded_pixels": "-"}).to_csv(
        data / "sample_submission.csv", index=False
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, default=2000)
    parser.add_argument("--distinct", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--configs", type=int, choices=(1, 2), default=2)
    parser.add_argument("--tta", type=int, choices=(1, 2, 4), default=4, help="flips per record")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = root / "data"
        run(
            "synth",
            "--out",
            data,
            "--train",
            40,
            "--validation",
            4,
            "--test",
            args.distinct,
            "--size",
            256,
        )
        clone_test_records(data, args.records)
        configs = []
        tta = "[" + ", ".join(FLIPS[: args.tta]) + "]"
        for name, frames, arch, encoder in (
            ("tiny_unet", "[3, 4, 5]", "Unet", "tu-test_resnet"),
            ("tiny_fpn", "[4]", "FPN", "tu-test_efficientnet"),
        )[: args.configs]:
            path = root / f"{name}.yaml"
            text = CONFIG.format(name=name, frames=frames, arch=arch, encoder=encoder, tta=tta)
            path.write_text(text)
            configs.append(path)
        workdir = root / "folds"
        run("cv", "--data", data, "--workdir", workdir, "--folds", args.folds, *configs)
        run("blend", "--oof", "--workdir", workdir, "--steps", 4)
        blend = (workdir / "blend.json").read_text()
        names = [p.stem for p in configs]
        if any(f'"{name}"' not in blend for name in names):  # make sure every config runs
            fields = json.loads(blend)
            fields["rule"]["weights"] = dict.fromkeys(names, 1)
            (workdir / "blend.json").write_text(json.dumps(fields))
        started = time.perf_counter()
        output = run(
            "submit",
            "--workdir",
            workdir,
            "--data",
            data,
            "--out",
            root / "sub.csv",
            "--batch-size",
            args.batch_size,
        )
        wall = time.perf_counter() - started
    print(output.strip())
    print(
        f"{args.records} records ({args.distinct} distinct), {args.configs} config(s) x "
        f"{args.folds} folds x {args.tta} TTA: "
        f"{wall:.1f} s wall, {args.records / wall:.1f} records/s"
    )


if __name__ == "__main__":
    main()

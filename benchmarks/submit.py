"""End-to-end `ek submit`: records/s and where the time goes (read, model, encode).

Two tiny configs x 5 folds x 4 TTA on synthetic 256x256 test records. The fold models are
trained for a few steps only (their quality does not matter here). To spare ~19 MB of disk
per record, test records beyond the first `--distinct` are hard links to those files, so
reads may come from the page cache (read time is then a lower bound).

    .venv/bin/python benchmarks/submit.py [--records 2000] [--distinct 64]
"""

from __future__ import annotations

import argparse
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
tta: [identity, hflip, vflip, hvflip]
"""


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
        for name, frames, arch, encoder in (
            ("tiny_unet", "[3, 4, 5]", "Unet", "tu-test_resnet"),
            ("tiny_fpn", "[4]", "FPN", "tu-test_efficientnet"),
        ):
            path = root / f"{name}.yaml"
            path.write_text(CONFIG.format(name=name, frames=frames, arch=arch, encoder=encoder))
            configs.append(path)
        workdir = root / "folds"
        run("cv", "--data", data, "--workdir", workdir, "--folds", 5, *configs)
        run("blend", "--oof", "--workdir", workdir, "--steps", 4)
        blend = (workdir / "blend.json").read_text()
        if '"tiny_fpn"' not in blend or '"tiny_unet"' not in blend:  # make sure both configs run
            import json

            fields = json.loads(blend)
            fields["configs"] = {"tiny_unet": 1, "tiny_fpn": 1}
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
        f"{args.records} records ({args.distinct} distinct), 2 configs x 5 folds x 4 TTA: "
        f"{wall:.1f} s wall, {args.records / wall:.1f} records/s"
    )


if __name__ == "__main__":
    main()

"""``ek``: thin click commands over the Python API (no torch import at start-up)."""

from __future__ import annotations

import logging
import math
import re
import sys
from pathlib import Path

import click

from .errors import EkError, interrupted, os_error
from .layout import DEFAULT_KAGGLE_DIR, DEFAULT_SUBMISSION, DEFAULT_WORKDIR, SPLITS, Layout
from .registry import BACKENDS, EXPORT_FORMATS, THRESHOLD_SOURCES, Registry, did_you_mean

WORKFLOW = """
\b
Workflow (docs: docs/README.md in the source; ek COMMAND --help for each command):
  ek synth --out data                      synthetic data, or bring the Kaggle data
  ek folds --data data                     shared K-fold splits
  ek prepare --data data configs/tiny.yaml input caches (optional; cv builds them)
  ek cv --data data configs/tiny.yaml      fold models, OOF and holdout
  ek status                                what is trained
  ek blend --oof                           weights, threshold, report
  ek submit --data data                    submissions/submission.csv
  ek export / ek kaggle                    a bundle / an offline Kaggle dataset
"""


def _error_at(option: str, message: str) -> EkError:
    return EkError(f"{option}: {message}")


def _existing_folder(ctx: click.Context, param: click.Parameter, value: Path | None):
    if value is not None and not Path(value).is_dir():
        raise _error_at(f"--{param.name.replace('_root', '')} {value}", "no such folder")
    return value


def _at_least_one(ctx: click.Context, param: click.Parameter, value: int | None):
    if value is not None and value < 1:
        option = f"--{param.opts[0].lstrip('-')}"
        raise _error_at(f"{option} {value}", f"{option} must be at least 1")
    return value


def _positive_seconds(ctx: click.Context, param: click.Parameter, value: float | None):
    if value is not None and not (math.isfinite(value) and value > 0):
        raise _error_at(f"{param.opts[0]} {value}", "must be a number of seconds above 0")
    return value


def _device(ctx: click.Context, param: click.Parameter, value: str):
    if not DEVICE_PATTERN.fullmatch(value):
        raise _error_at(f"--device {value}", "expected auto, cpu, cuda or cuda:N")
    return value


def _splits(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]):
    for split in value:
        if split not in SPLITS:
            raise _error_at(
                f"--split {split}",
                f"unknown split{did_you_mean(split, SPLITS)}; choose from {', '.join(SPLITS)}",
            )
    return value


def _split(ctx: click.Context, param: click.Parameter, value: str):
    return _splits(ctx, param, (value,))[0]


def _not_a_folder(ctx: click.Context, param: click.Parameter, value: Path | None):
    if value is not None and Path(value).is_dir():
        raise _error_at(f"--out {value}", "is a folder; give a file name")
    return value


def _choice(registry: Registry) -> click.Choice:
    return click.Choice(list(registry.names))


DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:[0-9]+)?")
WORKDIR = click.option(
    "--workdir",
    type=click.Path(path_type=Path),
    default=DEFAULT_WORKDIR,
    show_default=True,
    help="Where splits, caches, fold models and OOF live.",
)
DEVICE = click.option(
    "--device",
    default="auto",
    show_default=True,
    callback=_device,
    help="cpu, cuda, cuda:1, ... (auto: cuda if present).",
)


PRECISION = click.option(
    "--precision",
    type=click.Choice(["auto", "fp32", "fp16", "bf16"]),
    default="auto",
    show_default=True,
    help="Prediction precision (auto: fp16 below sm80, bf16 from sm80, fp32 on CPU).",
)


def task_option(help_text: str):
    return click.option("--task", "task_name", default=None, metavar="NAME_OR_FILE", help=help_text)


def data_option(required: bool = False):
    return click.option(
        "--data",
        "data_root",
        type=click.Path(path_type=Path),
        required=required,
        callback=_existing_folder,
        help="Data folder in the Kaggle layout (train/, validation/, test/).",
    )


class ValuesOption(click.Option):
    """An option that takes every value up to the next option: ``--frames 0 1 2 3``.

    ``--frames 0,1,2`` and repeating the option (``--frames 0 --frames 1``) work too; the
    command receives one string per occurrence and splits it. Use with :class:`EkCommand`,
    which joins the values before click parses the line.
    """


class EkCommand(click.Command):
    """Every ``ek`` command: sets the process's thread counts before it runs, and lets its
    :class:`ValuesOption` options take several space-separated values.

    The thread counts are not set in the group callback: that runs before a subcommand parses
    ``--help``, and ``ek <command> --help`` would then import torch. ``parse_args`` (click's
    documented hook for a command's own parsing) joins the words after a ``ValuesOption``, up
    to the next one starting with ``-``, into one value.
    """

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        greedy = {o for p in self.params if isinstance(p, ValuesOption) for o in p.opts}
        return super().parse_args(ctx, join_values(args, greedy))

    def invoke(self, ctx: click.Context):
        from .runtime import set_process_threads

        set_process_threads()  # the process edge: torch and numba thread counts
        return super().invoke(ctx)


def join_values(args: list[str], greedy: set[str]) -> list[str]:
    """``args`` with the words after each option in ``greedy`` joined into its one value."""
    joined: list[str] = []
    words = iter(args)
    for word in words:
        joined.append(word)
        if word == "--":
            joined.extend(words)
            break
        if word in greedy:
            values: list[str] = []
            for value in words:
                if value.startswith("-") and values:
                    joined.extend([" ".join(values), value])
                    break
                values.append(value)
            else:
                joined.extend([" ".join(values)] if values else [])
    return joined


def parse_ints(option: str, texts: tuple[str, ...]) -> tuple[int, ...]:
    """Whole numbers separated by spaces or commas, from one or more option values."""
    words = [w for text in texts for w in text.replace(",", " ").split()]
    try:
        return tuple(int(w) for w in words)
    except ValueError:
        raise EkError(f"{option}: expected whole numbers, got {' '.join(words)!r}") from None


class EkSubGroup(EkCommand, click.Group):
    """A command group under ``ek`` (``ek tasks``): a command itself, whose commands are too."""

    command_class = EkCommand


class EkGroup(click.Group):
    """Shows :class:`EkError` (and a disk or permission error) as one line on stderr, exit 2;
    a Ctrl-C, even one that numba wrapped, as click's ``Aborted!``, exit 1."""

    command_class = EkCommand

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (EkError, OSError) as err:
            error = err if isinstance(err, EkError) else os_error(err)
            if error is None:
                raise
            click.echo(f"ek: error: {error}", err=True)
            sys.exit(EkError.exit_code)
        except SystemError as err:  # a Ctrl-C inside a numba kernel arrives wrapped
            if not interrupted(err):
                raise
            raise KeyboardInterrupt from None  # click prints "Aborted!", exit 1


@click.group(cls=EkGroup, epilog=WORKFLOW, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
@click.version_option(package_name="ensemble-kit")
def main(verbose: bool) -> None:
    """ensemble-kit: K-fold training, OOF blending and Kaggle submissions for segmentation."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s")


@main.command()
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Folder to write.")
@click.option("--train", "n_train", default=64, show_default=True, help="Training records.")
@click.option(
    "--validation", "n_validation", default=16, show_default=True, help="Validation records."
)
@click.option("--test", "n_test", default=16, show_default=True, help="Test records.")
@click.option("--size", default=256, show_default=True, help="Image side in pixels.")
@click.option("--seed", default=0, show_default=True, help="Random seed of the data.")
@click.option(
    "--task",
    "task_name",
    type=click.Choice(["contrails", "steel", "folder"]),
    default="contrails",
    show_default=True,
    help="Layout to write (steel: 256 x 1600, --size ignored; no validation split).",
)
@click.option("--classes", default=1, show_default=True, help="folder: number of classes.")
def synth(
    out: Path,
    n_train: int,
    n_validation: int,
    n_test: int,
    size: int,
    seed: int,
    task_name: str,
    classes: int,
) -> None:
    """Write a synthetic data set in a task's exact layout (contrails by default)."""
    counts = {"train": n_train, "validation": n_validation, "test": n_test}
    if task_name == "contrails":
        from .data.synth import write_synthetic

        written = write_synthetic(
            out, **{f"n_{k}": v for k, v in counts.items()}, size=size, seed=seed
        )
    else:
        from .data.synth_images import synth_task, write_synthetic_task

        written = write_synthetic_task(out, synth_task(task_name, classes, size), counts, seed)
    click.echo(f"wrote {written} to {out}")
    if task_name == "folder":
        click.echo(f"task file: {out}/task.yaml (ek folds --data {out} --task {out}/task.yaml)")


@main.command()
@data_option(required=True)
@WORKDIR
@click.option("--folds", "n_folds", default=5, show_default=True, callback=_at_least_one, help="K.")
@click.option("--seed", default=0, show_default=True, help="Seed of the fold assignment.")
@click.option(
    "--pool-validation", is_flag=True, help="Pool the validation split into the folds (no holdout)."
)
@click.option("--force", is_flag=True, help="Overwrite an existing splits.csv.")
@task_option("Built-in task (contrails, steel, folder) or a task YAML file; default contrails.")
def folds(
    data_root: Path,
    workdir: Path,
    n_folds: int,
    seed: int,
    pool_validation: bool,
    force: bool,
    task_name: str | None,
) -> None:
    """Write the shared K-fold splits (folds/splits.csv) and, for other tasks, folds/task.yaml."""
    from .data.splits import make_splits
    from .task import resolve_task

    layout = Layout(workdir)
    task = resolve_task(task_name)
    splits = make_splits(layout, data_root, n_folds, seed, pool_validation, task, force=force)
    counts = splits.groupby("fold").size().to_dict()
    click.echo(f"wrote {layout.splits_csv}: records per fold {counts}")


@main.command()
@data_option(required=True)
@WORKDIR
@click.option(
    "--split",
    "split_names",
    multiple=True,
    default=SPLITS,
    show_default=True,
    callback=_splits,
    help="Splits to cache (repeatable); a split without a folder in --data is skipped.",
)
@click.option(
    "--workers",
    type=int,
    default=None,
    callback=_at_least_one,
    help="Worker processes (default: CPU count, at most 8).",
)
@click.argument("configs", nargs=-1, required=True, type=click.Path(path_type=Path))
def prepare(
    data_root: Path, workdir: Path, split_names: tuple[str, ...], workers: int | None, configs
) -> None:
    """Build the input caches the configs need (once per split and input spec)."""
    from .config import load_config
    from .data.cache import prepare_inputs

    layout = Layout(workdir)
    for path in configs:
        spec = load_config(path).input
        for split in split_names:
            entry = prepare_inputs(layout, data_root, split, spec, workers)
            if entry is not None:
                click.echo(f"{path} {split}: {entry.path} {entry.arrays['inputs'].shape}")


@main.command()
@data_option()
@WORKDIR
@click.option(
    "--folds",
    "n_folds",
    type=int,
    default=None,
    callback=_at_least_one,
    help="K (default 5 for a new splits.csv).",
)
@click.option(
    "--fold", "fold_ids", type=int, multiple=True, help="Run only these folds (repeatable)."
)
@click.option(
    "--epochs",
    type=int,
    default=None,
    callback=_at_least_one,
    help="Override train.epochs of every config.",
)
@DEVICE
@click.option(
    "--backend",
    type=_choice(BACKENDS),
    default="local",
    show_default=True,
    help="Where folds run: here, or as Ray tasks (a local Ray unless --address).",
)
@click.option(
    "--jobs",
    default=1,
    show_default=True,
    callback=_at_least_one,
    help="Local: folds side by side, one process each.",
)
@click.option("--cpus-per-job", type=int, default=None, help="CPU threads (Ray: CPUs) per fold.")
@click.option("--gpus-per-job", type=float, default=None, help="Ray: GPUs per fold (0.5 shares).")
@click.option("--address", default=None, help="Ray: cluster address (default: start a local Ray).")
@click.option("--seed", default=0, show_default=True, help="Seed of a new splits.csv.")
@PRECISION
@task_option("Task of a new splits.csv (as `ek folds --task`); must match existing splits.")
@click.argument("configs", nargs=-1, required=True, type=click.Path(path_type=Path))
def cv(workdir: Path, fold_ids: tuple[int, ...], configs, **options) -> None:
    """Train K fold models per config and save out-of-fold probabilities."""
    from .training.cv import CvRequest, run_cv
    from .training.status import format_status, status_rows

    layout = Layout(workdir)
    request = CvRequest(tuple(configs), layout, folds=tuple(fold_ids), **options)
    run_cv(request, on_fold_done=click.echo)
    click.echo(format_status(status_rows(layout)))


@main.command()
@WORKDIR
@data_option()
@click.option(
    "--frames",
    cls=ValuesOption,
    multiple=True,
    metavar="F [F ...]",
    help="Target frames, e.g. --frames 0 1 2 3 5 6 7 (the default); 0,1,2 works too.",
)
@click.option(
    "--out", "name", default="pseudo", show_default=True, help="Name: folds/pseudo/NAME/."
)
@DEVICE
def pseudo(workdir: Path, data_root, frames, name: str, device: str) -> None:
    """Soft pseudo-labels of the unlabelled frames from the blend's fold models (no leakage)."""
    from .training.pseudo import DEFAULT_FRAMES, PseudoRequest, pseudo_lines, run_pseudo

    targets = parse_ints("--frames", frames) if frames else DEFAULT_FRAMES
    layout = Layout(workdir)
    manifest = run_pseudo(PseudoRequest(layout, data_root, targets, name, device))
    for line in pseudo_lines(layout, name, manifest):
        click.echo(line)


@main.group(cls=EkSubGroup, invoke_without_command=True)
@click.pass_context
def tasks(ctx: click.Context) -> None:
    """List the built-in tasks (`ek tasks show NAME` prints one as YAML to copy)."""
    if ctx.invoked_subcommand is not None:
        return
    from .task import BUILTIN_TASKS, builtin_task

    for name in BUILTIN_TASKS:
        task = builtin_task(name)
        size = "size of the first image" if task.size == (0, 0) else "x".join(map(str, task.size))
        click.echo(
            f"{name:10} {task.kind:9} {task.n_classes} class(es) {', '.join(task.classes)}; "
            f"{size}; {task.metric}"
        )


@tasks.command("show")
@click.argument("name")
def tasks_show(name: str) -> None:
    """Print a built-in task as YAML, ready to copy and edit (or use `extends: NAME`)."""
    from .task import builtin_text

    click.echo(builtin_text(name).rstrip())


@main.command()
@WORKDIR
def status(workdir: Path) -> None:
    """Table of configs x folds: done / running / stopped / missing, best epoch and dice."""
    from .training.status import format_status, status_rows

    click.echo(format_status(status_rows(Layout(workdir))))


@main.command()
@click.option("--oof", is_flag=True, required=True, help="Search on out-of-fold predictions.")
@WORKDIR
@data_option()
@click.option("--configs", "names", multiple=True, help="Blend only these configs (repeatable).")
@click.option(
    "--steps",
    type=int,
    default=25,
    show_default=True,
    help="Greedy selection rounds (at least 1).",
)
@click.option("--refine", is_flag=True, help="Coordinate-search refinement of the weights.")
@click.option(
    "--max-seconds-per-record",
    type=float,
    default=None,
    callback=_positive_seconds,
    help="Seconds (> 0): only ensembles whose measured prediction cost fits.",
)
@click.option(
    "--threshold-from",
    type=_choice(THRESHOLD_SOURCES),
    default="oof",
    show_default=True,
    help="Choose the threshold on OOF or on the holdout's fold-mean predictions.",
)
def blend(
    oof, workdir, data_root, names, steps, refine, max_seconds_per_record, threshold_from
) -> None:
    """Search ensemble weights, threshold and postprocessing on OOF dice."""
    from .blend.run import run_blend

    layout = Layout(workdir)
    result = run_blend(
        layout,
        data_root,
        list(names) or None,
        steps=steps,
        refine=refine,
        max_seconds_per_record=max_seconds_per_record,
        threshold_from=threshold_from,
    )
    if layout.blend_report_txt.is_file():
        click.echo(layout.blend_report_txt.read_text().rstrip())
    click.echo(f"wrote {layout.blend_json} (weights {result.rule.weights})")


@main.command()
@click.argument("record_id")
@WORKDIR
@data_option()
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=None,
    help="PNG to write (default: <workdir>/blend/show/RECORD_ID.png).",
)
@click.option("--frames", is_flag=True, help="Also draw the false colour of all 8 frames.")
def show(record_id: str, workdir: Path, data_root: Path | None, out: Path | None, frames: bool):
    """Draw one record: false colour, label, blended probability, TP/FP/FN mask (no model run).

    A test record shows its false colour only (no test probabilities are stored).
    """
    from .blend.show import show_record

    shown = show_record(Layout(workdir), record_id, data_root, out, frames)
    click.echo(f"wrote {shown.path}: {shown.panel.title}")


@main.command()
@data_option()
@WORKDIR
@click.option(
    "--split",
    default="test",
    show_default=True,
    callback=_split,
    help="Split to predict (validation: also prints its dice).",
)
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=DEFAULT_SUBMISSION,
    show_default=True,
    callback=_not_a_folder,
    help="The CSV to write; its provenance goes beside it as .json.",
)
@click.option(
    "--batch-size",
    default=16,
    show_default=True,
    callback=_at_least_one,
    help="Records per forward pass.",
)
@DEVICE
@click.option(
    "--exported", is_flag=True, help="Predict from the `ek export` bundle instead of checkpoints."
)
@click.option(
    "--check",
    "check_file",
    type=click.Path(path_type=Path),
    default=None,
    help="Only validate an existing submission CSV (with --data: against its ids).",
)
@PRECISION
def submit(
    data_root, workdir, split, out, batch_size, device, exported, check_file, precision
) -> None:
    """Predict with the blended fold x config ensemble and write a validated submission CSV."""
    if check_file is not None:
        from .inference.submission import check_submission, check_task_submission
        from .task import workdir_task

        task = workdir_task(Layout(workdir))
        if task.kind == "contrails":
            result = check_submission(check_file, data_root, split)
        else:
            result = check_task_submission(check_file, task, data_root, split)
        click.echo(f"{check_file}: valid ({result})")
        return
    from .inference.submit import SubmitRequest, run_submit

    request = SubmitRequest(
        Layout(workdir), data_root, split, out, batch_size, device, exported, precision
    )
    result = run_submit(request)
    stages = ", ".join(f"{k} {v:.1f} s" for k, v in result["seconds_by_stage"].items())
    click.echo(
        f"{result['records']} records, {result['records_per_second']:.1f} records/s ({stages})"
    )
    if "dice" in result:
        click.echo(f"global dice on {split}: {result['dice']:.4f}")
    if "score" in result:
        click.echo(f"{result['metric']} on {split}: {result['score']:.4f}")
    click.echo(f"wrote {out}")


@main.command()
@WORKDIR
@click.option(
    "--format",
    "fmt",
    type=_choice(EXPORT_FORMATS),
    default="torchscript",
    show_default=True,
    help="Model format of the bundle.",
)
@click.option(
    "--configs", "names", multiple=True, help="Export these configs (default: those in blend.json)."
)
def export(workdir: Path, fmt: str, names) -> None:
    """Export fold models as a portable bundle, parity-checked against the eager models."""
    from .inference.bundle import manifest_lines
    from .inference.export import export_models

    layout = Layout(workdir)
    manifest = export_models(layout, fmt, list(names) or None)
    for line in manifest_lines(manifest):
        click.echo(line)
    click.echo(f"wrote {layout.export_dir}")


@main.command()
@WORKDIR
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=DEFAULT_KAGGLE_DIR,
    show_default=True,
    help="The dataset folder to write (new, or an earlier `ek kaggle` folder).",
)
@click.option(
    "--slug",
    default="contrails-ensemble-kit",
    show_default=True,
    help="Dataset slug: /kaggle/input/<slug> in the notebook.",
)
@click.option(
    "--title", default="Contrails ensemble (ensemble-kit)", show_default=True, help="Dataset title."
)
@click.option(
    "--device",
    default="auto",
    show_default=True,
    callback=_device,
    help="Where to time the bundle: cpu, cuda, ... (auto: cuda if present).",
)
def kaggle(workdir: Path, out: Path, slug: str, title: str, device: str) -> None:
    """Write the blended models, a wheel and an offline notebook as one Kaggle dataset."""
    from .inference.bundle import manifest_lines, throughput_line
    from .inference.kaggle import KaggleRequest, build_kaggle_bundle

    result = build_kaggle_bundle(KaggleRequest(Layout(workdir), out, slug, title, device))
    for line in manifest_lines(result["manifest"]):
        click.echo(line)
    measured = result["measured"]
    if "skipped" in measured:
        click.echo(f"not timed: {measured['skipped']}")
    else:
        click.echo(f"measured on {measured['split']} records: {throughput_line(measured)}")
    click.echo(f"wrote {out} (set your user name in {out / 'dataset-metadata.json'}, then")
    click.echo(f"  kaggle datasets create -p {out}; see {out / 'README.md'})")


if __name__ == "__main__":
    main()

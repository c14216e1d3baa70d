"""Loading offline, and `ek kaggle`: the bundle, its wheel, and its notebook run as Kaggle
runs it (no network, none of the packages Kaggle's image lacks, ensemble_kit from the wheel)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import segmentation_models_pytorch as smp
import timm
import torch
from click.testing import CliRunner
from conftest import SMALL_FPN, SMALL_UNET
from huggingface_hub.errors import LocalEntryNotFoundError

from ensemble_kit import __version__
from ensemble_kit.cli import main
from ensemble_kit.config import load_config
from ensemble_kit.inference.bundle import predict_bundle
from ensemble_kit.inference.checkpoints import load_fold_model
from ensemble_kit.inference.wheel import build_wheel, wheel_name
from ensemble_kit.layout import Layout

KAGGLE_LACKS = ("timm", "segmentation_models_pytorch", "huggingface_hub", "sklearn", "matplotlib")
CONFIG = """
name: {name}
input: {input}
model: {{arch: {arch}, encoder: tu-test_resnet, encoder_weights: {weights}, decoder: {decoder}}}
optim: {{name: adam, lr: 0.003}}
train: {{epochs: 1, batch_size: 8, max_steps_per_epoch: 2, seed: {seed}}}
tta: {tta}
"""
CONFIGS = {
    "net": dict(input="{channels: ash, frames: [4]}", arch="Unet", weights="imagenet",
                seed=0, tta="[identity, hflip]", decoder=json.dumps(SMALL_UNET)),
    "bands": dict(input="{channels: bands, bands: [11, 14, 15], frames: [3, 4, 5]}",
                  arch="FPN", weights="null", seed=1, tta="[identity, vflip]",
                  decoder=json.dumps(SMALL_FPN)),
}  # fmt: skip
# The notebook as Kaggle runs it: nbclient + ipykernel, the notebook's folder as cwd.
RUNNER = """
import sys
import nbformat
from nbclient import NotebookClient

notebook = nbformat.read(sys.argv[1], as_version=4)
nbformat.validate(notebook)
client = NotebookClient(
    notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": sys.argv[2]}}
)
client.execute()
nbformat.write(notebook, sys.argv[3])
"""


def ek(*args, check: bool = True):
    result = CliRunner().invoke(main, [str(a) for a in args])
    if check:
        assert result.exit_code == 0, result.output
    return result


def write_config(folder: Path, name: str) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(CONFIG.format(name=name, **CONFIGS[name]))
    return path


def failing_download(*args, **kwargs):
    raise LocalEntryNotFoundError("no network and not in the cache (patched by the test)")


def block_downloads(monkeypatch) -> None:
    """Every way timm and smp fetch weights now fails as it does offline without a cache."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(timm.models._hub, "hf_hub_download", failing_download)
    monkeypatch.setattr(smp.encoders, "hf_hub_download", failing_download)
    monkeypatch.setattr(torch.hub, "download_url_to_file", failing_download)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, synth_root):
    """`net` (encoder_weights: imagenet, its download faked) and `bands` x 2 folds, blended
    with both weighted (set by hand, so that both input kinds are in every bundle)."""
    folder = tmp_path_factory.mktemp("kaggle")
    weights = folder / "model.safetensors"
    safetensors.torch.save_file(timm.create_model("test_resnet").state_dict(), weights)
    fetched = []

    def download(repo_id, filename, **kwargs):
        fetched.append(repo_id)
        return str(weights)

    workdir = folder / "folds"
    configs = [write_config(folder, name) for name in CONFIGS]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(timm.models._hub, "hf_hub_download", download)
        ek("cv", "--data", synth_root, "--workdir", workdir, "--folds", "2", *configs)
    assert fetched and set(fetched) == {"timm/test_resnet.r160_in1k"}
    ek("blend", "--oof", "--workdir", workdir, "--steps", "4")
    blend_json = Layout(workdir).blend_json
    blend = json.loads(blend_json.read_text())
    blend["rule"]["weights"] = {"net": 1, "bands": 1}
    blend_json.write_text(json.dumps(blend))
    return workdir, synth_root


@pytest.fixture(scope="module")
def submitted(trained, tmp_path_factory):
    """`ek submit`'s CSV of the test split, run offline with every download failing."""
    workdir, root = trained
    out = tmp_path_factory.mktemp("submit") / "submission.csv"
    with pytest.MonkeyPatch.context() as patch:
        block_downloads(patch)
        ek("submit", "--workdir", workdir, "--data", root, "--out", out)
    return out


@pytest.fixture(scope="module")
def bundle(trained, tmp_path_factory):
    """`ek kaggle` (which exports every fold) run offline: (folder, CLI output)."""
    workdir, _ = trained
    out = tmp_path_factory.mktemp("bundle") / "kaggle"
    with pytest.MonkeyPatch.context() as patch:
        block_downloads(patch)
        result = ek("kaggle", "--workdir", workdir, "--out", out, "--slug", "tiny-contrails",
                    "--title", "Tiny contrails test", "--device", "cpu")  # fmt: skip
    return out, result.output


def test_trained_imagenet_fold_loads_exports_and_submits_offline(
    trained, submitted, bundle, monkeypatch
):
    """The `submitted` and `bundle` fixtures ran `ek submit` and `ek kaggle` (export included)
    with downloads failing; here every fold of the ImageNet-initialised config loads too."""
    workdir, root = trained
    block_downloads(monkeypatch)
    layout = Layout(workdir)
    config = load_config(layout.config_dir("net") / "config.yaml")
    assert config.model.encoder_weights == "imagenet"
    for fold in (0, 1):
        load_fold_model(config, layout.fold_dir("net", fold), torch.device("cpu"))
    assert ek("submit", "--check", submitted, "--data", root).exit_code == 0
    assert (bundle[0] / "net.fold_1.pt").is_file()


def test_cv_offline_without_cached_weights_fails_fast_in_one_line(
    tmp_path, synth_root, monkeypatch
):
    block_downloads(monkeypatch)
    config = write_config(tmp_path, "net")
    workdir = tmp_path / "folds"
    result = ek("cv", "--data", synth_root, "--workdir", workdir, "--folds", "2", config,
                check=False)  # fmt: skip
    assert result.exit_code == 2 and "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("ek: error:")]
    assert errors == [result.output.strip().splitlines()[-1]]
    assert errors[0].startswith(
        f"ek: error: {config}: ImageNet weights for tu-test_resnet are not in the local cache "
        "and the hub is unreachable; "
    )
    assert "timm.create_model('test_resnet', pretrained=True)" in errors[0]
    assert not list(workdir.glob("net/fold_*/last.pt")), "it trained before failing"


def test_bundle_code_path_imports_nothing_kaggle_lacks():
    script = (
        "import sys\n"
        "import ensemble_kit.inference.bundle, ensemble_kit.inference.submission\n"
        f"found = [m for m in {KAGGLE_LACKS!r} if m in sys.modules]\n"
        "assert not found, found\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True)


def test_wheel_is_reproducible_and_installs_offline(tmp_path):
    first = build_wheel(tmp_path / "a")
    second = build_wheel(tmp_path / "b")
    assert first.name == wheel_name() == f"ensemble_kit-{__version__}-py3-none-any.whl"
    assert first.read_bytes() == second.read_bytes()
    names = zipfile.ZipFile(first).namelist()
    assert "ensemble_kit/inference/bundle.py" in names
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--quiet"]
        + ["--target", str(target), str(first)],
        check=True,
    )
    where = subprocess.run(
        [sys.executable, "-c", "import ensemble_kit; print(ensemble_kit.__file__)"],
        env={**os.environ, "PYTHONPATH": str(target)},
        cwd=tmp_path,  # not the repository, whose package `python -c` would find first
        capture_output=True,
        text=True,
        check=True,
    )
    assert Path(where.stdout.strip()).is_relative_to(target)


def test_kaggle_writes_the_dataset_folder(trained, bundle):
    workdir, _ = trained
    out, output = bundle
    assert json.loads((out / "dataset-metadata.json").read_text()) == {
        "title": "Tiny contrails test",
        "id": "KAGGLE_USERNAME/tiny-contrails",
        "licenses": [{"name": "CC0-1.0"}],
    }
    assert (out / "blend.json").read_bytes() == Layout(workdir).blend_json.read_bytes()
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["configs"]) == {"net", "bands"}
    assert manifest["configs"]["bands"]["band_stats"]["bands"] == [11, 14, 15]
    assert all(entry["max_abs_diff"] <= 1e-4 for entry in manifest["configs"].values())
    assert sorted(p.name for p in out.glob("*.pt")) == [
        f"{name}.fold_{k}.pt" for name in ("bands", "net") for k in (0, 1)
    ]
    assert (out / wheel_name()).is_file() and manifest["wheel"] == wheel_name()
    assert [p for p in out.iterdir() if p.is_dir()] == []  # `kaggle datasets create` skips folders
    readme = (out / "README.md").read_text()
    assert "kaggle datasets create -p" in readme and "KAGGLE_USERNAME" in readme
    assert "records/s" in output and "2,000 records" in output


def test_notebook_parameters_default_to_kaggle_paths(bundle):
    import nbformat

    out, _ = bundle
    notebook = nbformat.read(out / "inference.ipynb", as_version=4)
    nbformat.validate(notebook)
    assert notebook.nbformat == 4
    first = next(cell for cell in notebook.cells if cell.cell_type == "code")
    assert "parameters" in first.metadata.tags
    for variable, default in (
        ("EK_DATA", "/kaggle/input/google-research-identify-contrails-reduce-global-warming"),
        ("EK_BUNDLE", "/kaggle/input/tiny-contrails"),
        ("EK_OUT", "/kaggle/working/submission.csv"),
    ):
        assert f'os.environ.get("{variable}", "{default}")' in first.source
    code = "\n".join(cell.source for cell in notebook.cells if cell.cell_type == "code")
    assert "--no-index" in code and "--no-deps" in code and "--target" in code


def test_bundle_prediction_equals_submit_byte_for_byte(trained, submitted, bundle, tmp_path):
    _, root = trained
    out, _ = bundle
    predicted = tmp_path / "bundle.csv"
    result = predict_bundle(out, root, predicted, device="cpu")
    assert predicted.read_bytes() == submitted.read_bytes()
    assert result["records"] == len(list((root / "test").iterdir()))


def test_kaggle_refuses_a_bad_slug_and_a_foreign_folder(trained, tmp_path):
    workdir, _ = trained
    result = ek("kaggle", "--workdir", workdir, "--slug", "Bad_Slug", check=False)
    assert result.exit_code == 2 and "--slug 'Bad_Slug'" in result.output
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    result = ek("kaggle", "--workdir", workdir, "--out", foreign, check=False)
    assert result.exit_code == 2 and "not an `ek kaggle` folder" in result.output
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]


def shadow_packages(folder: Path) -> Path:
    """A path entry whose modules shadow what Kaggle's image does not promise."""
    for name in KAGGLE_LACKS:
        (folder / name).mkdir(parents=True)
        (folder / name / "__init__.py").write_text(
            f"raise ImportError('{name} is not on Kaggle\\'s image (shadowed by the test)')\n"
        )
    return folder


def offline_command(command: list[str]) -> list[str]:
    """``command`` in a user and network namespace with only loopback (the kernel's channel);
    ``command`` as is, with a loud warning, where namespaces are not allowed."""
    probe = ["unshare", "-rn", "sh", "-c", "ip link set lo up"]
    if shutil.which("unshare") and subprocess.run(probe, capture_output=True).returncode == 0:
        return ["unshare", "-rn", "sh", "-c", 'ip link set lo up && exec "$@"', "sh", *command]
    message = "unshare -rn is not available here: the notebook runs WITH network access"
    print(f"\nWARNING: {message}", file=sys.stderr)
    warnings.warn(message, stacklevel=2)
    return command


def test_notebook_runs_offline_as_on_kaggle(trained, submitted, bundle, tmp_path):
    _, root = trained
    out, _ = bundle
    data = tmp_path / "competition"  # the Kaggle layout, read-only
    shutil.copytree(root, data)
    working = tmp_path / "working"
    working.mkdir()
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("PYTHONPATH", "EK_DATA", "EK_BUNDLE", "EK_OUT")
    }
    env.update(
        PYTHONPATH=str(shadow_packages(tmp_path / "shadow")),  # never the repository
        PWD=str(tmp_path),  # where it is launched from: the relative paths below start there
        EK_DATA="competition",
        EK_BUNDLE=os.path.relpath(out, tmp_path),
        EK_OUT="working/submission.csv",
        HF_HUB_OFFLINE="1",
    )
    executed = tmp_path / "executed.ipynb"
    command = [sys.executable, "-c", RUNNER, str(out / "inference.ipynb"), str(working)]
    run = subprocess.run(
        offline_command(command + [str(executed)]),
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    printed = _outputs(executed)
    assert f"from {working / 'ek-site' / 'ensemble_kit' / '__init__.py'}" in printed
    assert "records/s on cpu" in printed and "2,000 records" in printed
    assert "devices used: cpu" in printed
    assert "'rows': 8" in printed
    assert (working / "submission.csv").read_bytes() == submitted.read_bytes()


def _outputs(notebook: Path) -> str:
    cells = json.loads(notebook.read_text())["cells"]
    return "".join(
        "".join(output.get("text", "")) for cell in cells for output in cell.get("outputs", [])
    )


def test_rerunning_kaggle_keeps_the_user_name_already_set(tmp_path):
    from ensemble_kit.inference.kaggle import PLACEHOLDER_USER, _user_of, dataset_metadata

    path = tmp_path / "dataset-metadata.json"
    assert _user_of(path) == PLACEHOLDER_USER
    path.write_text(json.dumps(dataset_metadata("old-slug", "A title", "alice-b")))
    assert _user_of(path) == "alice-b"
    path.write_text("{not json")
    assert _user_of(path) == PLACEHOLDER_USER


def test_traced_models_refuse_records_of_another_size():
    from ensemble_kit.config import Config
    from ensemble_kit.errors import EkError
    from ensemble_kit.inference.ensemble import Ensemble

    ensemble = Ensemble({"net": Config(name="net")}, {"net": []}, {"net": None}, {"net": 64})
    ensemble.check_side("net", torch.zeros(1, 3, 64, 64))
    with pytest.raises(EkError, match="take 64x64 inputs, but the records are 256x256"):
        ensemble.check_side("net", torch.zeros(1, 3, 256, 256))


# --- Kaggle hardware (issue 19) and staged writes (issue 20) --------------------------------


def test_kaggle_on_a_full_disk_is_one_line_and_keeps_the_old_folder(trained, bundle, monkeypatch):
    from ensemble_kit.inference import kaggle

    workdir, _ = trained
    out, _ = bundle
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(out / "x.whl"))

    monkeypatch.setattr(kaggle, "build_wheel", full)
    result = ek("kaggle", "--workdir", workdir, "--out", out, "--slug", "tiny-contrails",
                "--title", "Tiny contrails test", "--device", "cpu", check=False)  # fmt: skip
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.output.strip() == f"ek: error: {out / 'x.whl'}: no space left on device"
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    leftovers = [p.name for p in out.parent.rglob("*") if ".tmp" in p.name or "staging" in p.name]
    assert leftovers == []


def test_manifest_states_the_oldest_torch_as_setup_cfg_and_readme_do(bundle):
    from ensemble_kit.inference.bundle import TORCH_MIN

    out, _ = bundle
    repo = Path(__file__).resolve().parents[1]
    assert json.loads((out / "manifest.json").read_text())["torch_min"] == TORCH_MIN
    assert f"torch>={TORCH_MIN}\n" in (repo / "setup.cfg").read_text()
    assert f"torch {TORCH_MIN}" in (repo / "README.md").read_text()


def test_errors_inside_a_kaggle_bundle_name_ek_kaggle(bundle, tmp_path):
    from ensemble_kit.errors import EkError
    from ensemble_kit.inference.bundle import load_bundle

    copy = tmp_path / "bundle"
    shutil.copytree(bundle[0], copy)
    (copy / "net.fold_1.pt").unlink()
    with pytest.raises(EkError, match=r"net.fold_1.pt: missing; rerun `ek kaggle`"):
        load_bundle(copy, torch.device("cpu"))
    (copy / "net.fold_1.pt").write_bytes(b"not a model")
    with pytest.raises(EkError, match=r"net.fold_1.pt: unreadable model .*rerun `ek kaggle`"):
        load_bundle(copy, torch.device("cpu"))
    manifest = json.loads((copy / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps({**manifest, "format": "tflite"}))
    with pytest.raises(EkError, match=r"format 'tflite'.*torchscript.*onnx.*rerun `ek kaggle`"):
        load_bundle(copy, torch.device("cpu"))


def test_the_loader_reads_any_registered_format(trained, bundle, tmp_path):
    """The manifest's format picks the loader (a registry): here the fold models re-exported
    with ``torch.export`` predict the same codes as the TorchScript ones."""
    from ensemble_kit.inference.bundle import load_bundle
    from ensemble_kit.inference.ensemble import MemoryPlan, predict_batch

    workdir, _ = trained
    layout = Layout(workdir)
    copy = tmp_path / "bundle"
    shutil.copytree(bundle[0], copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps({**manifest, "format": "torch_export"}))
    for name, entry in manifest["configs"].items():
        config = load_config(layout.config_dir(name) / "config.yaml")
        x = torch.rand(2, config.input.in_channels, entry["side"], entry["side"])
        for fold in (0, 1):
            model = load_fold_model(config, layout.fold_dir(name, fold), torch.device("cpu"))
            batch = ({0: torch.export.Dim("batch")},)  # TTA passes hold B x copies images
            program = torch.export.export(model, (x,), dynamic_shapes=batch)
            torch.export.save(program, copy / f"{name}.fold_{fold}.pt2")
            (copy / f"{name}.fold_{fold}.pt").unlink()
    exported, _ = load_bundle(copy, torch.device("cpu"))
    traced, _ = load_bundle(bundle[0], torch.device("cpu"))
    x = [torch.rand(3, 3, 64, 64), torch.rand(3, 9, 64, 64)]
    by_spec = [x[0] if s.channels == "ash" else x[1] for s in traced.specs]
    got = predict_batch(exported, by_spec, "fp32", MemoryPlan(3))
    expected = predict_batch(traced, by_spec, "fp32", MemoryPlan(3))
    for name in expected:
        assert np.abs(got[name].astype(int) - expected[name]).max() <= 1


def run_first_cells(bundle_dir: Path, env: dict, cwd: Path) -> dict:
    """The notebook's parameter and check cells, executed as Kaggle would (their globals)."""
    import nbformat

    notebook = nbformat.read(bundle_dir / "inference.ipynb", as_version=4)
    cells = {cell.id: cell.source for cell in notebook.cells}
    scope: dict = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(cwd)
        for key, value in env.items():
            patch.setenv(key, value)
        exec(cells["parameters"], scope)
        exec(cells["checks"], scope)
    return scope


def test_first_cell_checks_say_the_fix_in_one_line(trained, bundle, tmp_path):
    _, root = trained
    out, _ = bundle
    env = {"EK_DATA": str(root), "EK_BUNDLE": str(out), "EK_OUT": str(tmp_path / "s.csv")}
    assert run_first_cells(out, env, tmp_path)["WHEEL"] == out / wheel_name()
    cases = [
        ({"EK_DATA": str(tmp_path / "none")}, "no competition data; Add Input > Competitions"),
        ({"EK_BUNDLE": str(tmp_path)}, "no ek bundle; Add Input > Datasets > tiny-contrails"),
    ]
    for change, message in cases:
        with pytest.raises(SystemExit, match=f"^ek: error: .*{message}"):
            run_first_cells(out, {**env, **change}, tmp_path)
    copy = tmp_path / "bundle"
    shutil.copytree(out, copy)
    (copy / wheel_name()).rename(copy / "ensemble_kit-0.0.1-py3-none-any.whl")
    with pytest.raises(SystemExit, match="wheel .* not found .*rerun `ek kaggle`"):
        run_first_cells(copy, {**env, "EK_BUNDLE": str(copy)}, tmp_path)
    (copy / "ensemble_kit-0.0.1-py3-none-any.whl").rename(copy / wheel_name())
    manifest = json.loads((copy / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps({**manifest, "torch_min": "99.0"}))
    with pytest.raises(SystemExit, match="older than 99.0; Settings > Environment"):
        run_first_cells(copy, {**env, "EK_BUNDLE": str(copy)}, tmp_path)


def test_relative_paths_are_taken_from_where_the_notebook_was_launched(bundle, tmp_path):
    out, _ = bundle
    launched = tmp_path / "launch"
    (launched / "data" / "test").mkdir(parents=True)
    shutil.copytree(out, launched / "submissions" / "kaggle")
    elsewhere = tmp_path / "notebook-folder"
    elsewhere.mkdir()
    env = {"PWD": str(launched), "EK_DATA": "data", "EK_BUNDLE": "submissions/kaggle",
           "EK_OUT": "out/submission.csv"}  # fmt: skip
    scope = run_first_cells(launched / "submissions" / "kaggle", env, elsewhere)
    assert scope["BUNDLE"] == launched / "submissions" / "kaggle"
    assert scope["DATA"] == launched / "data"
    assert scope["SITE"] == launched / "out" / "ek-site"


OLD_TORCH_INDEX = "https://download.pytorch.org/whl/cpu"
OLD_TORCH_VENV = Path.home() / ".cache" / "ek-oldtorch"


def old_torch_python(version: str) -> Path:
    """A cached venv with torch ``version``.* and numpy < 2 (what old torch wheels need),
    from PyTorch's CPU index when it answers, else from pip's configured index; the test is
    skipped when neither lists that torch."""
    import socket

    venv = OLD_TORCH_VENV / f"torch-{version}"
    python = venv / "bin" / "python"
    if (venv / "complete").is_file():
        return python
    try:
        socket.create_connection(("download.pytorch.org", 443), timeout=10).close()
        index = ["--index-url", OLD_TORCH_INDEX]
    except OSError:
        index = []  # pip's own configuration (a mirror of PyPI): CUDA wheels, larger
    listed = subprocess.run(
        [sys.executable, "-m", "pip", "index", "versions", "torch", *index],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    if f"{version}." not in listed.stdout:
        pytest.skip(f"no package index lists torch {version}: cannot build {venv}")
    shutil.rmtree(venv, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "--quiet"]
    subprocess.run(pip + [f"torch=={version}.*", *index], check=True)
    subprocess.run(pip + ["numpy<2", "pandas", "numba", "pyyaml", "tqdm"], check=True)
    (venv / "complete").write_text(version)
    return python


@pytest.fixture
def oldest_torch_python() -> Path:
    """Built (or skipped) before the fixtures that train: no training for a skip."""
    from ensemble_kit.inference.bundle import TORCH_MIN

    return old_torch_python(TORCH_MIN)


@pytest.mark.slow
def test_notebook_under_the_oldest_torch_writes_the_same_csv(
    oldest_torch_python, trained, submitted, bundle, tmp_path
):
    """The notebook's code cells, run as one script by torch ``TORCH_MIN``'s Python."""
    import nbformat

    from ensemble_kit.inference.bundle import TORCH_MIN

    _, root = trained
    out, _ = bundle
    python = oldest_torch_python
    notebook = nbformat.read(out / "inference.ipynb", as_version=4)
    script = tmp_path / "notebook.py"
    script.write_text("\n\n".join(c.source for c in notebook.cells if c.cell_type == "code"))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PWD=str(tmp_path), EK_DATA=str(root), EK_BUNDLE=str(out),
               EK_OUT=str(tmp_path / "working" / "submission.csv"), HF_HUB_OFFLINE="1")  # fmt: skip
    (tmp_path / "working").mkdir()
    run = subprocess.run([str(python), str(script)], env=env, cwd=tmp_path, capture_output=True,
                         text=True)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"torch {TORCH_MIN}" in run.stdout
    assert (tmp_path / "working" / "submission.csv").read_bytes() == submitted.read_bytes()

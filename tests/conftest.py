import contextlib
import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]

TINY_RECIPE = {
    "name": "tiny",
    "seed": 1,
    "data": {"dataset": "synthetic", "val_fraction": 0.1, "test_fraction": 0.25,
             "synthetic": {"num_samples": 240, "num_classes": 4, "image_size": 8, "channels": 1, "noise": 0.5}},
    "teacher": {"arch": "cnn", "args": {"width": 8, "stages": 2},
                "train": {"epochs": 5, "batch_size": 32, "lr": 0.01}},
    "students": {"sizes": [{"d_model": 16, "depth": 1, "d_state": 4, "patch_size": 2},
                           {"d_model": 8, "depth": 1, "d_state": 2, "patch_size": 2}]},
    "distill": {"strategies": ["chain", "ensemble"], "temperature": 2.0, "alpha": 0.5,
                "train": {"epochs": 3, "batch_size": 32, "lr": 0.01}},
}


@pytest.fixture
def tiny_recipe(tmp_path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY_RECIPE, sort_keys=False))
    return path


def invoke(*args: str):
    """``edgepkd ARGS`` in this process through click's CliRunner: (exit code, stdout, stderr)."""
    from click.testing import CliRunner

    from edgepkd.cli import cli

    res = CliRunner().invoke(cli, [str(a) for a in args])
    return res.exit_code, res.stdout, res.stderr


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """TINY_RECIPE distilled once for the session (``edgepkd distill tiny.yaml --quiet --json``; its stdout kept as
    ``distill-stdout.json`` next to ``runs/``). Tests that change a run work on a copy (``run_copy``)."""
    root = tmp_path_factory.mktemp("tiny")
    recipe = root / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(TINY_RECIPE, sort_keys=False))
    code, out, err = invoke("distill", recipe, "--out", root / "runs", "--quiet", "--json")
    assert code == 0, err
    (root / "distill-stdout.json").write_text(out)
    return root / "runs" / "tiny"


def loose_target(builtin: str, folder: Path, max_accuracy_drop: float) -> str:
    """A copy of built-in int8 target ``builtin`` named 'loose-BUILTIN' in ``folder`` with its accuracy tolerance
    opened: a 60-image synthetic test split is not what int8 tolerances are for."""
    from edgepkd.compress.targets import BUILTIN_DIR

    data = yaml.safe_load((BUILTIN_DIR / f"{builtin}.yaml").read_text())
    name = f"loose-{builtin}"
    folder.mkdir(exist_ok=True)
    (folder / f"{name}.yaml").write_text(yaml.safe_dump({**data, "name": name,
                                                         "verify": {"max_accuracy_drop": max_accuracy_drop}}))
    return name


def _installed(*modules: str) -> bool:
    return all(importlib.util.find_spec(m) is not None for m in modules)


@pytest.fixture(scope="session")
def tiny_exported_run(tiny_run, tmp_path_factory) -> Path:
    """A copy of ``tiny_run`` with the exports the bench and ExecuTorch tests read: every model to tflite-fp32,
    chain/s1 to onnx-fp32, chain/s2 to loose-tflite-int8 (when the TFLite and ONNX modules are installed);
    chain/s1 and chain/s2 to executorch-fp32, chain/s2 to loose-executorch-int8 (when ExecuTorch is)."""
    with built_once(tmp_path_factory, "exported") as (root, done):
        if not done:
            _export_tiny(tiny_run, root)
    return root / "tiny"


@contextlib.contextmanager
def built_once(tmp_path_factory, name: str):
    """A folder that a session fixture builds once per test session, also under pytest-xdist (`-n`), whose
    workers share it: (folder, whether it is already built). The first worker builds it while holding a lock;
    the others wait for it instead of building it again. Tests only read it (the ones that change a run work on a
    copy, ``run_copy``)."""
    from filelock import FileLock  # a dependency of torch

    if not os.environ.get("PYTEST_XDIST_WORKER"):
        yield tmp_path_factory.mktemp(name), False
        return
    shared = tmp_path_factory.getbasetemp().parent  # this session's, common to its workers
    root, marker = shared / name, shared / f"{name}.built"
    with FileLock(str(shared / f"{name}.lock")):
        done = marker.is_file()
        if not done:
            shutil.rmtree(root, ignore_errors=True)
            root.mkdir()
        yield root, done
        marker.touch()


def _export_tiny(tiny_run: Path, root: Path) -> None:
    run = root / "tiny"
    shutil.copytree(tiny_run, run)
    loose = root / "targets"
    exports = []
    if _installed("onnxruntime", "onnxscript", "litert_torch", "ai_edge_litert", "torchao"):
        exports += [["--target", "tflite-fp32"], ["--target", "onnx-fp32", "--model", "chain/s1"],
                    ["--target", loose_target("tflite-int8", loose, 100.0), "--model", "chain/s2"]]
    if _installed("executorch", "torchao"):
        exports += [["--target", "executorch-fp32", "--model", "chain/s1", "--model", "chain/s2"],
                    ["--target", loose_target("executorch-int8", loose, 50.0), "--model", "chain/s2"]]
    for args in exports:
        code, _, err = invoke("export", run, *args, "--targets-dir", loose)
        assert code == 0, err


@pytest.fixture
def run_copy(run_dir, tmp_path) -> Path:
    """A copy of the module's ``run_dir`` for a test that changes it."""
    dst = tmp_path / "run"
    shutil.copytree(run_dir, dst)
    return dst


def manifest(run: Path, target: str) -> dict:
    """file -> entry of RUN/export/TARGET/manifest.json."""
    return {e["file"]: e for e in json.loads((run / "export" / target / "manifest.json").read_text())["artifacts"]}


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("edgepkd: error: ") and err.count("\n") == 1, err
    return err


def data_dir() -> Path | None:
    """Real datasets (MNIST, CIFAR-10) live under $EDGEPKD_DATA; tests that need them skip otherwise."""
    d = os.environ.get("EDGEPKD_DATA")
    return Path(d) if d and Path(d).is_dir() else None


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None):
    """Run ``python -m edgepkd`` in a subprocess (what a user's shell does)."""
    import subprocess

    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "edgepkd", *args], capture_output=True, text=True,
                          cwd=cwd, env=full_env, timeout=600)


def registered_student(name: str, num_classes: int, in_chans: int, image_size: int, **args):
    """Registered student ``name`` built as a run builds one (``build_model``): the recipes' architecture
    (``STUDENT_ARCH``) takes the smallest d_model of the presets, which fix their own."""
    from edgepkd.models import STUDENT_ARCH, build_model

    fixed = {"d_model": 8} if name == STUDENT_ARCH else {}
    return build_model(name, {**fixed, **args}, num_classes, in_chans, image_size)

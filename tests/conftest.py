import os
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

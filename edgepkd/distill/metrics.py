"""The metrics.json of a run: what ``edgepkd distill`` writes once every stage is trained, the numbers the report,
``evaluate``, ``export`` and ``pick`` read back."""

from __future__ import annotations

import os
import platform

import torch

import edgepkd
from edgepkd.data import Dataset
from edgepkd.distill.distributed import DistContext
from edgepkd.distill.pipeline import Member, evaluate_members
from edgepkd.models.flops import FLOP_CONVENTION
from edgepkd.recipe import Recipe
from edgepkd.rundir import RunDir


def environment(scan_backend: str, device: str) -> dict:
    """Where a run trained: machine, CPUs, versions, the scan backend and the device kind (cpu | cuda)."""
    return {"machine": f"{platform.system()} {platform.machine()}", "cpus": os.cpu_count(),
            "torch": torch.__version__, "python": platform.python_version(), "edgepkd": edgepkd.__version__,
            "scan_backend": scan_backend, "cuda": torch.cuda.is_available(), "device": device,
            "gpu": torch.cuda.get_device_name(0) if device == "cuda" else None}


def run_metrics(recipe: Recipe, run: RunDir, data: Dataset, members: list[Member], *, scan_backend: str,
                dist: DistContext, wall_time_s: float, resumed: bool) -> dict:
    """metrics.json of a finished run: the dataset, the conventions, the environment and, from
    ``evaluate_members``, every model's and every ensemble prefix's test accuracy and cost."""
    return {
        "recipe": recipe.name, "run": str(run.path), "edgepkd_version": edgepkd.__version__,
        "dataset": {"name": data.name, "train": len(data.train), "val": len(data.val), "test": len(data.test),
                    "input_shape": list(data.input_shape), "classes": data.classes,
                    "preprocessing": data.preprocessing()},
        "flop_convention": FLOP_CONVENTION,
        "wall_time_s": wall_time_s,
        "environment": environment(scan_backend, dist.device.type),
        "resumed": resumed,  # wall_time_s then covers this process only; train_time_s of each
                             # model covers all of its training, across processes
        "distributed": dist.describe(),
        **evaluate_members(members, data, device=dist.device, shrinkage=recipe.distill.ensemble_shrinkage),
    }

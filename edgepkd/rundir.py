"""The run directory and its files. Every write goes to a temporary name first, then is renamed.

    runs/<name>/
      recipe.yaml              the resolved recipe (every default filled in)
      state.json               finished stages (train time, val accuracy, per-epoch history); data_dir: where the
                               dataset's files were read (the default data location of evaluate/export/bench/pick)
      weights/<stage>.safetensors   finished models; metadata carries architecture, preprocessing, labels
      checkpoints/<stage>.safetensors  the stage in progress (model + optimizer after its last finished epoch)
      metrics.json, report.md, accuracy_vs_mflops.png
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from edgepkd.errors import RunError, first_line

if TYPE_CHECKING:  # torch is imported where tensors are handled: `edgepkd bench` / `pick` read runs without it
    import torch

FORMAT_VERSION = 1


def read_json(path: Path, keys: dict[str, type], what: str, fix: str, default: dict | None = None) -> dict:
    """A JSON object edgepkd wrote, holding ``keys`` with values of the given types; ``default`` when the file is
    absent (when given). Anything else is a one-line RunError naming the file, ``what`` it should be and the
    ``fix``."""
    path = Path(path)
    if not path.exists() and default is not None:
        return default
    try:
        data = json.loads(path.read_text())
    except OSError as e:
        raise RunError(f"{path}: cannot read it ({e.strerror or type(e).__name__}); {fix}") from None
    except ValueError:  # JSONDecodeError, UnicodeDecodeError
        raise RunError(f"{path}: not {what} edgepkd wrote (invalid JSON); {fix}") from None
    wrong = [k for k, kind in keys.items() if not isinstance(data.get(k), kind)] if isinstance(data, dict) \
        else list(keys)
    if wrong:
        raise RunError(f"{path}: not {what} edgepkd wrote (no valid {', '.join(wrong)}); {fix}")
    return data


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def save_safetensors(path: Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Save tensors (no pickle) with ``meta`` as JSON under the 'edgepkd' metadata key."""
    from safetensors.torch import save

    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    atomic_write_bytes(path, save(tensors, metadata={"edgepkd": json.dumps(meta)}))


def load_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise RunError(f"{path}: no such weights file")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("edgepkd", "{}"))
        return load_file(str(path)), meta
    except Exception as e:  # not safetensors, truncated, bad header
        raise RunError(f"{path}: not a readable safetensors file ({first_line(e, 200)})") from None


def _flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    import torch

    tensors, scalars = {}, {}
    for pid, pstate in state["state"].items():
        for key, value in pstate.items():
            if torch.is_tensor(value):
                tensors[f"optim.{pid}.{key}"] = value
            else:
                scalars[f"{pid}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], info: dict) -> dict:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, pid, key = name.split(".", 2)
            state.setdefault(int(pid), {})[key] = value
    for name, value in info["scalars"].items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    return {"state": state, "param_groups": info["param_groups"]}


class RunDir:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    # -- layout
    @property
    def recipe_path(self) -> Path:
        return self.path / "recipe.yaml"

    @property
    def state_path(self) -> Path:
        return self.path / "state.json"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.json"

    def weights_path(self, stage: str) -> Path:
        return self.path / "weights" / f"{stage.replace('/', '-')}.safetensors"

    def checkpoint_path(self, stage: str) -> Path:
        return self.path / "checkpoints" / f"{stage.replace('/', '-')}.safetensors"

    # -- creation / resume
    def create(self, recipe: dict, resume: bool) -> None:
        """Start a new run, or check that ``--resume`` continues the same recipe."""
        if self.recipe_path.exists():
            if not resume:
                raise RunError(f"{self.path} already holds a run: pass --resume to continue it, "
                               "or --name NEW to start another")
            saved = yaml.safe_load(self.recipe_path.read_text())
            diff = _first_difference(saved, recipe)
            if diff:
                raise RunError(f"{self.path}: --resume with a different recipe ({diff}); "
                               "resume with the same recipe and --set values, or use --name NEW")
            return
        if resume:
            raise RunError(f"{self.path}: nothing to resume (no recipe.yaml); drop --resume to start the run")
        atomic_write_text(self.recipe_path, yaml.safe_dump(recipe, sort_keys=False))

    def require_complete(self) -> None:
        """A finished run: its directory, recipe.yaml and metrics.json exist (else a one-line RunError)."""
        if not self.path.is_dir():
            raise RunError(f"{self.path}: no such run directory")
        for needed in (self.recipe_path, self.metrics_path):
            if not needed.is_file():
                raise RunError(f"{self.path}: incomplete run, {needed.name} is missing "
                               "(finish it with: edgepkd distill RECIPE --resume)")

    def state(self) -> dict:
        return read_json(self.state_path, {"stages": dict}, "a run state", "move it away and distill again "
                         "(finished stages are then trained again)", default={"format": FORMAT_VERSION, "stages": {}})

    def record_data_dir(self, location: Path | None) -> None:
        """Remember where the run read its dataset's files (None: a dataset without files, e.g. digits)."""
        state = self.state()
        if location is None:
            state.pop("data_dir", None)
        else:
            state["data_dir"] = os.path.abspath(location)
        atomic_write_json(self.state_path, state)

    def recorded_data_dir(self) -> str | None:
        """The data location recorded when the run was made (None for runs without one)."""
        if not self.state_path.is_file():
            return None
        value = self.state().get("data_dir")
        return value if isinstance(value, str) and value else None

    def finish_stage(self, stage: str, info: dict) -> None:
        state = self.state()
        state["stages"][stage] = info
        atomic_write_json(self.state_path, state)
        self.checkpoint_path(stage).unlink(missing_ok=True)

    # -- per-epoch checkpoints of the stage in progress
    def save_checkpoint(self, stage: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                        info: dict) -> None:
        tensors, opt_info = _flatten_optimizer(optimizer.state_dict())
        tensors.update({f"model.{k}": v for k, v in model.state_dict().items()})
        # One file, renamed into place: weights, optimizer and progress can never disagree.
        save_safetensors(self.checkpoint_path(stage), tensors, {**info, "stage": stage, "optimizer": opt_info})

    def load_checkpoint(self, stage: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict | None:
        path = self.checkpoint_path(stage)
        if not path.exists():
            return None
        tensors, info = load_safetensors(path)
        model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        optimizer.load_state_dict(_unflatten_optimizer(tensors, info.pop("optimizer")))
        return info


def _first_difference(a: Any, b: Any, path: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in list(a) + [k for k in b if k not in a]:
            d = _first_difference(a.get(key), b.get(key), f"{path}.{key}" if path else key)
            if d:
                return d
        return ""
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            d = _first_difference(x, y, f"{path}.{i}")
            if d:
                return d
        return ""
    return "" if a == b else f"{path}: {a!r} in the run, {b!r} now"

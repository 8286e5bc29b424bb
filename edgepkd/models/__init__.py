"""Model zoo: teachers (``TEACHERS``), Mamba students (``STUDENTS``) and the scan backends they use."""

from __future__ import annotations

import inspect

import torch.nn as nn

from edgepkd.errors import ConfigError
from edgepkd.models.mamba import MambaStudent, export_mode, set_scan_backend
from edgepkd.models.teachers import TEACHERS
from edgepkd.registry import Registry, closest

# Named student presets (timm style: a registered entry point holds only an architecture dict).
STUDENTS: Registry = Registry("student")
_PRESETS = {
    "mamba_nano": dict(d_model=8, depth=1, d_state=4),
    "mamba_tiny": dict(d_model=16, depth=1, d_state=4),
    "mamba_small": dict(d_model=32, depth=2, d_state=8),
    "mamba_base": dict(d_model=64, depth=4, d_state=16),
    "mamba_small_bi": dict(d_model=32, depth=2, d_state=8, bidirectional=True),
}
for _name, _arch in _PRESETS.items():
    STUDENTS.register(_name, lambda num_classes, in_chans, image_size, _a=_arch, **kw:
                      MambaStudent(num_classes, in_chans, image_size, **{**_a, **kw}))


def build_student(spec: dict, num_classes: int, in_chans: int, image_size: int) -> MambaStudent:
    return MambaStudent(num_classes, in_chans, image_size, **spec)


def build_teacher(arch: str, args: dict, num_classes: int, in_chans: int, image_size: int) -> nn.Module:
    builder = TEACHERS.get(arch)
    params = inspect.signature(builder).parameters
    allowed = [p for p in params if p not in ("num_classes", "in_chans", "image_size")]
    for key in args:
        if key not in allowed:
            raise ConfigError(f"teacher.args.{key}: not an argument of teacher '{arch}'{closest(key, allowed)} "
                              f"(allowed: {', '.join(allowed) or 'none'})")
    try:
        return builder(num_classes, in_chans, image_size, **args)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"teacher '{arch}': {e}") from None


__all__ = ["TEACHERS", "STUDENTS", "MambaStudent", "build_student", "build_teacher", "export_mode", "load_model",
           "set_scan_backend"]


def load_model(path) -> tuple[nn.Module, dict]:
    """Rebuild a model saved by ``edgepkd distill`` from its safetensors file alone (architecture in metadata)."""
    from edgepkd.rundir import load_safetensors

    state, meta = load_safetensors(path)
    c = meta["preprocessing"]["input_shape"][0]
    size = meta["preprocessing"]["input_shape"][1]
    if meta["arch"] == "mamba":
        model = build_student(meta["spec"], meta["num_classes"], c, size)
    else:
        model = build_teacher(meta["arch"], meta["spec"], meta["num_classes"], c, size)
    model.load_state_dict(state)
    return model.eval(), meta

"""Model zoo: teachers (``TEACHERS``), Mamba students (``STUDENTS``), the scan backends they use, and analytic
FLOP / parameter accounting (``flops``)."""

from __future__ import annotations

import functools
import inspect

import torch.nn as nn

from edgepkd.errors import ConfigError
from edgepkd.models.mamba import MambaStudent, export_mode, set_scan_backend
from edgepkd.models.teachers import TEACHERS
from edgepkd.registry import Registry, closest

# Students (timm style: a registered entry point holds only an architecture dict). "mamba" is the architecture of
# a recipe's students (its args are the recipe's student spec); the presets fix one for Python use.
STUDENT_ARCH = "mamba"
STUDENTS: Registry = Registry("student")
STUDENTS.register(STUDENT_ARCH, MambaStudent)
_PRESETS = {
    "mamba_nano": dict(d_model=8, depth=1, d_state=4),
    "mamba_tiny": dict(d_model=16, depth=1, d_state=4),
    "mamba_small": dict(d_model=32, depth=2, d_state=8),
    "mamba_base": dict(d_model=64, depth=4, d_state=16),
    "mamba_small_bi": dict(d_model=32, depth=2, d_state=8, bidirectional=True),
    "mamba_small_heads": dict(d_model=32, depth=2, d_state=16, heads=4),  # Mamba-2's scalar SSM: the 'ssd' export
}
for _name, _arch in _PRESETS.items():
    STUDENTS.register(_name, functools.partial(MambaStudent, **_arch))


def _build(registry: Registry, arch: str, args: dict, num_classes: int, in_chans: int, image_size: int) -> nn.Module:
    """``registry``'s builder ``arch`` called with ``args``, each checked against its signature."""
    builder = registry.get(arch)
    kind = registry.kind
    params = inspect.signature(builder).parameters
    allowed = [p for p in params if p not in ("num_classes", "in_chans", "image_size")]
    for key in args:
        if key not in allowed:
            raise ConfigError(f"{kind}.args.{key}: not an argument of {kind} '{arch}'{closest(key, allowed)} "
                              f"(allowed: {', '.join(allowed) or 'none'})")
    try:
        return builder(num_classes, in_chans, image_size, **args)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{kind} '{arch}': {e}") from None


def build_teacher(arch: str, args: dict, num_classes: int, in_chans: int, image_size: int) -> nn.Module:
    """A registered teacher (or baseline) by name."""
    return _build(TEACHERS, arch, args, num_classes, in_chans, image_size)


def build_model(arch: str, args: dict, num_classes: int, in_chans: int, image_size: int) -> nn.Module:
    """Any registered model by name, student or teacher (what a run's weights file records as its ``arch``)."""
    if arch not in STUDENTS and arch not in TEACHERS:
        raise ConfigError(f"unknown model '{arch}'{closest(arch, [*STUDENTS, *TEACHERS])} (teachers: "
                          f"{', '.join(TEACHERS.names())}; students: {', '.join(STUDENTS.names())})")
    registry = STUDENTS if arch in STUDENTS else TEACHERS
    return _build(registry, arch, args, num_classes, in_chans, image_size)


__all__ = ["TEACHERS", "STUDENTS", "STUDENT_ARCH", "MambaStudent", "build_model", "build_teacher",
           "export_mode", "load_model", "set_scan_backend"]


def load_model(path) -> tuple[nn.Module, dict]:
    """Rebuild a model saved by ``edgepkd distill`` from its safetensors file alone (architecture in metadata)."""
    from edgepkd.rundir import load_safetensors

    state, meta = load_safetensors(path)
    c = meta["preprocessing"]["input_shape"][0]
    size = meta["preprocessing"]["input_shape"][1]
    model = build_model(meta["arch"], meta["spec"], meta["num_classes"], c, size)
    model.load_state_dict(state)
    return model.eval(), meta

"""Device profiles: ``devices/*.yaml`` loaded into typed dataclasses, looked up through a registry.

A profile says where a model must run (CPU, accelerator, the runtime there and its threads), which precisions to
consider, the budgets a model must meet (p90 latency, RAM, storage), how edgepkd reaches the device (``local``,
``ssh://user@host[:port]``, or ``none``: estimated only, from MACs and a calibrated throughput, or for .tflite
files from a per-op cycle table, ``calibration.per_op``, see edgepkd/measure/opcost.py).

Built-in profiles live in the repository's ``devices/`` folder (an installed wheel carries a copy: see
``edgepkd/builtins.py``); a user adds one by dropping a YAML file into
``./devices/`` (or ``--devices-dir``), exactly as for export targets.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from edgepkd.builtins import builtin_dir
from edgepkd.config import check, load_named, load_named_dirs
from edgepkd.compress.formats import FORMATS, device_runtimes, runtime_format
from edgepkd.registry import Registry, closest

BUILTIN_DIR = builtin_dir("devices")
SSH_URL = re.compile(r"^ssh://(?:(?P<user>[^@/:\s]+)@)?(?P<host>[^@/:\s\[\]]+|\[[0-9A-Fa-f:.]+\])(?::(?P<port>\d+))?/?$")
MIB = 1024 * 1024


@dataclass
class Budget:
    latency_ms: float       # p90 of batch-1 latency (MLPerf single-stream's metric)
    ram_mib: float          # measured: the model's peak-RSS growth; tflite-micro: the measured arena;
                            # estimated: the activation upper bound
    storage_mib: float      # the artifact file's bytes

    def __post_init__(self):
        for name in ("latency_ms", "ram_mib", "storage_mib"):
            check(getattr(self, name) > 0, name, "must be positive")


@dataclass
class SSHConfig:
    identity_file: str | None = None   # ssh -i; else $EDGEPKD_SSH_IDENTITY, else ssh's own defaults
    options: list[str] = field(default_factory=list)  # extra `ssh -o` settings, e.g. "StrictHostKeyChecking=accept-new"
    connect_timeout_s: int = 10

    def __post_init__(self):
        check(self.connect_timeout_s >= 1, "connect_timeout_s", "must be at least 1")
        for i, opt in enumerate(self.options):
            check("=" in opt and not opt.startswith("-"), f"options.{i}",
                  f"expected KEY=VALUE as for `ssh -o`, got {opt!r}")


@dataclass
class MacRates:
    """MACs per cycle of the operators that multiply-accumulate (edgepkd.measure.opcost counts their MACs from the
    tensor shapes). TRANSPOSE_CONV runs at conv_2d's rate."""
    conv_2d: float
    depthwise_conv_2d: float
    fully_connected: float
    batch_matmul: float

    def __post_init__(self):
        for name in ("conv_2d", "depthwise_conv_2d", "fully_connected", "batch_matmul"):
            check(getattr(self, name) > 0, name, "must be positive (MACs per cycle)")


@dataclass
class ElementCycles:
    """Cycles per element of every other operator, by class (edgepkd.measure.opcost.OP_CLASSES says which op is
    which and what it counts: output elements, or the elements a pooling window or a reduction reads). A class left
    out (null) has no figure: its ops are reported as not modelled and cost nothing."""
    elementwise: float | None = None      # ADD, SUB, MUL, MAXIMUM, ABS, RELU, comparisons, SELECT_V2, ...
    division: float | None = None         # DIV, SQRT (RSQRT counts two: a square root and a division)
    transcendental: float | None = None   # EXP, LOG, TANH, ELU, SIN, COS (LOGISTIC adds a division, SOFTMAX an
                                          # elementwise)
    reduction: float | None = None        # per element read: pooling windows, MEAN, SUM, REDUCE_*, ARG_*, CUMSUM
    movement: float | None = None         # TRANSPOSE, CONCATENATION, SLICE, STRIDED_SLICE, PAD, GATHER, SPLIT, ...
    quantize: float | None = None         # QUANTIZE, DEQUANTIZE (float -> int QUANTIZE adds a division)

    def __post_init__(self):
        for name in ("elementwise", "division", "transcendental", "reduction", "movement", "quantize"):
            value = getattr(self, name)
            check(value is None or value >= 0, name, "must be zero or positive (cycles per element)")


@dataclass
class PrecisionCycles:
    """The cost of one precision's kernels: an op is float32 when any tensor it reads or writes is floating point,
    else int8 (the integer kernels)."""
    macs_per_cycle: MacRates
    cycles_per_element: ElementCycles


@dataclass
class PerOpCalibration:
    """``calibration.per_op``: latency = the sum over a .tflite's operators of their cycles / the clock."""
    clock_mhz: float
    int8: PrecisionCycles
    float32: PrecisionCycles
    source: str = ""                      # where the figures come from (the profile's comments cite each)

    def __post_init__(self):
        check(self.clock_mhz > 0, "clock_mhz", "must be positive")


@dataclass
class Calibration:
    macs_per_second: float | None = None  # estimated mode: latency = (FLOPs / 2) / this
    source: str = ""                      # where the figure comes from
    per_op: PerOpCalibration | None = None  # per-op mode for .tflite files (bench); macs_per_second stays the
                                            # FLOPs-only estimate where no file exists (distill's latency table)

    def __post_init__(self):
        check(self.macs_per_second is None or self.macs_per_second > 0, "macs_per_second", "must be positive")


@dataclass
class DeviceProfile:
    name: str
    runtime: str                          # a runtime some export format runs in (compress/formats.py)
    budget: Budget
    description: str = ""
    cpu: str = ""
    accelerator: str = ""                 # what the device has; the runner uses the runtime's CPU path
    threads: int = 1                      # interpreter / intra-op threads
    precisions: list[Literal["fp32", "int8"]] = field(default_factory=lambda: ["fp32", "int8"])
    connect: str = "local"                # local | ssh://user@host[:port] | none (estimated only)
    python: str | None = None             # the device's Python (local: this one; ssh: python3)
    ssh: SSHConfig = field(default_factory=SSHConfig)
    calibration: Calibration = field(default_factory=Calibration)
    export_targets: list[str] = field(default_factory=list)  # distill --device: these targets (default: every
                                                              # target of the runtime's format and precisions)

    def __post_init__(self):
        check(self.runtime in device_runtimes(), "runtime", f"{self.runtime!r} is not allowed"
              f"{closest(self.runtime, device_runtimes())} (allowed: {', '.join(device_runtimes())})")
        check(self.threads >= 1, "threads", "must be at least 1")
        check(bool(self.precisions), "precisions", "must name at least one of fp32, int8")
        check(self.connect in ("local", "none") or SSH_URL.match(self.connect) is not None, "connect",
              f"expected local, none or ssh://user@host[:port], got {self.connect!r}")
        check(self.connect != "none" or self.calibration.macs_per_second is not None,
              "calibration.macs_per_second", "a device with connect: none can only be estimated; give its "
              "calibrated MAC/s (e.g. a published benchmark's MACs / latency)")
        check(self.calibration.per_op is None or self.connect == "none", "calibration.per_op",
              "only an estimated device (connect: none) uses a per-op cycle table")
        check(self.calibration.per_op is None or FORMATS.get(self.format).suffix == ".tflite", "calibration.per_op",
              f"the per-op estimate reads .tflite operators; runtime {self.runtime} runs "
              f"{FORMATS.get(self.format).suffix} files")
        check(self.runtime != "tflite-micro" or self.connect == "none", "connect",
              "runtime tflite-micro runs TFLite Micro's interpreter on this host (no board is reached) and "
              "estimates latency: use connect: none with calibration.macs_per_second")
        check(self.connect != "none" or self.runtime != "executorch", "connect",
              "estimated devices (connect: none) read activation sizes from .tflite or .onnx graphs; an "
              "executorch device must be measured (local or ssh://)")

    @property
    def format(self) -> str:
        return runtime_format(self.runtime)

    @property
    def estimated(self) -> bool:
        return self.connect == "none"

    def ssh_target(self) -> tuple[str, str, int]:
        """(user@host or host, host, port) of an ssh:// profile."""
        m = SSH_URL.match(self.connect)
        host = m["host"].strip("[]")
        return (f"{m['user']}@{host}" if m["user"] else host), host, int(m["port"] or 22)

    def identity_file(self) -> str | None:
        return self.ssh.identity_file or os.environ.get("EDGEPKD_SSH_IDENTITY") or None


def load_device(path: Path) -> DeviceProfile:
    return load_named(DeviceProfile, path)


def load_devices(extra_dirs: list[Path] = ()) -> Registry[DeviceProfile]:
    """Built-in profiles, then ``./devices/`` and ``extra_dirs``; a later file with a known name fails."""
    return load_named_dirs(DeviceProfile, "device", BUILTIN_DIR, "devices", extra_dirs, "--devices-dir")

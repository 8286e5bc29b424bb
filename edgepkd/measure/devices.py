"""Device profiles: ``devices/*.yaml`` loaded into typed dataclasses, looked up through a registry.

A profile says where a model must run (CPU, accelerator, the runtime there and its threads), which precisions to
consider, the budgets a model must meet (p90 latency, RAM, storage), how edgepkd reaches the device (``local``,
``ssh://user@host[:port]``, or ``none``: estimated only, from MACs and a calibrated throughput).

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
from edgepkd.compress.formats import device_runtimes, runtime_format
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
class Calibration:
    macs_per_second: float | None = None  # estimated mode: latency = (FLOPs / 2) / this
    source: str = ""                      # where the figure comes from

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

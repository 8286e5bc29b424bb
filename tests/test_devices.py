"""Device profiles: every shipped profile loads, malformed ones fail with one line naming the key path, and the
microcontroller's calibrated throughput is the published MLPerf Tiny figure over edgepkd's own MAC count."""

import sys

import pytest
import yaml

from edgepkd.cli import main
from edgepkd.errors import ConfigError
from edgepkd.measure.devices import BUILTIN_DIR, load_device, load_devices

SHIPPED = sorted(p.stem for p in BUILTIN_DIR.glob("*.yaml"))   # every profile of the built-in devices/ folder
GOOD = {"name": "mine", "runtime": "tflite", "connect": "local",
        "budget": {"latency_ms": 5, "ram_mib": 64, "storage_mib": 8}}
RATES = {"conv_2d": 1.0, "depthwise_conv_2d": 1.0, "fully_connected": 1.0, "batch_matmul": 1.0}
PER_OP = {"clock_mhz": 100, "int8": {"macs_per_cycle": dict(RATES), "cycles_per_element": {"elementwise": 2}},
          "float32": {"macs_per_cycle": dict(RATES), "cycles_per_element": {"elementwise": 3, "transcendental": 50}}}


def per_op(**changes) -> dict:
    """An estimated TFLite profile with a per-op table, ``changes`` applied at dotted key paths of ``per_op``."""
    import copy

    table = copy.deepcopy(PER_OP)
    for path, value in changes.items():
        *parents, last = path.split("__")
        node = table
        for key in parents:
            node = node[key]
        if value is None:
            del node[last]
        else:
            node[last] = value
    return {"connect": "none", "calibration": {"macs_per_second": 1e9, "per_op": table}}


def write(folder, data, name="mine"):
    folder.mkdir(exist_ok=True)
    (folder / f"{name}.yaml").write_text(yaml.safe_dump(data))
    return folder


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_profile_loads_and_exports_to_a_known_target(name):
    from edgepkd.workflow import device_targets

    p = load_devices().get(name)
    assert p.name == name and p.budget.latency_ms > 0 and p.threads >= 1
    chosen = device_targets(p)
    assert chosen and all(t.format == p.format for t in chosen)   # distill --device has something to export


def test_shipped_profiles_load_and_are_listed(capsys):
    devices = load_devices()
    assert set(SHIPPED) <= set(devices.names()) and len(SHIPPED) >= 9
    assert devices.get("host").connect == "local"
    assert devices.get("host-executorch").format == "executorch" and devices.get("host-executorch").connect == "local"
    phone, phone_et = devices.get("android-pixel"), devices.get("android-pixel-executorch")
    assert (phone_et.format, phone_et.connect, phone_et.cpu) == ("executorch", phone.connect, phone.cpu)
    assert devices.get("raspberry-pi-4").ssh_target() == ("pi@raspberrypi.local", "raspberrypi.local", 22)
    assert devices.get("android-pixel").ssh_target()[2] == 8022
    m7 = devices.get("cortex-m7")
    assert m7.estimated and m7.calibration.macs_per_second and m7.calibration.source
    assert m7.calibration.per_op.clock_mhz == 280 and m7.calibration.per_op.source   # per-op for .tflite files
    assert (m7.runtime, m7.format) == ("tflite-micro", "tflite-micro")   # measured in TFLite Micro, latency estimated
    assert main(["bench", "--list-devices"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in SHIPPED) and "estimated" in out


def test_cortex_m7_calibration_is_mlperf_tiny_resnet8_on_stm32h7a3():
    """12.5 M MACs (ResNet-8, counted by edgepkd) x 18.401 inferences/s (ST's MLPerf Tiny v1.0 result)."""
    from edgepkd.models.flops import count_flops
    from edgepkd.models import TEACHERS

    macs = count_flops(TEACHERS.get("resnet8")(num_classes=10, in_chans=3, image_size=32), (3, 32, 32)).macs
    print("resnet8 MACs", macs)
    assert macs == 12_501_632
    rate = load_devices().get("cortex-m7").calibration.macs_per_second
    assert rate == pytest.approx(macs * 18.401, rel=1e-3)
    assert 1e3 * macs / rate == pytest.approx(54.3, abs=0.1)  # ms per ResNet-8 image, as published


def test_profile_name_must_match_file(tmp_path):
    folder = write(tmp_path / "d", {**GOOD, "name": "other"})
    with pytest.raises(ConfigError, match="must match the file name 'mine'"):
        load_device(folder / "mine.yaml")


@pytest.mark.parametrize("change, message", [
    ({"budgt": {}}, "mine.yaml: budgt: unknown key; did you mean 'budget'?"),
    ({"runtime": "tensorrt"}, "runtime: 'tensorrt' is not allowed"),
    ({"connect": "pi@raspberrypi"}, "connect: expected local, none or ssh://user@host[:port], got 'pi@raspberrypi'"),
    ({"connect": "none"}, "calibration.macs_per_second: a device with connect: none can only be estimated"),
    ({"budget": {"latency_ms": "fast", "ram_mib": 1, "storage_mib": 1}}, "budget.latency_ms: expected float, got 'fast'"),
    ({"budget": {"latency_ms": 0, "ram_mib": 1, "storage_mib": 1}}, "budget.latency_ms: must be positive"),
    ({"precisions": ["fp16"]}, "precisions.0: 'fp16' is not allowed"),
    ({"ssh": {"options": ["-v"]}}, "ssh.options.0: expected KEY=VALUE"),
    ({"runtime": "tflite-micro"}, "connect: runtime tflite-micro runs TFLite Micro's interpreter on this host"),
    ({"runtime": "executorch", "connect": "none", "calibration": {"macs_per_second": 1e9}},
     "connect: estimated devices (connect: none) read activation sizes from .tflite or .onnx graphs"),
    # the per-op cycle table (edgepkd/measure/opcost.py): unknown keys, wrong values, and where it cannot apply
    (per_op(int8__cycles_per_element__elementwse=2),
     "calibration.per_op.int8.cycles_per_element.elementwse: unknown key; did you mean 'elementwise'?"),
    (per_op(float32__macs_per_cycle__conv2d=1.0),
     "calibration.per_op.float32.macs_per_cycle.conv2d: unknown key; did you mean 'conv_2d'?"),
    (per_op(int16={"macs_per_cycle": RATES}), "calibration.per_op.int16: unknown key; did you mean 'int8'?"),
    (per_op(float32__macs_per_cycle__conv_2d=0), "calibration.per_op.float32.macs_per_cycle.conv_2d: must be positive"),
    (per_op(int8__cycles_per_element__movement=-1),
     "calibration.per_op.int8.cycles_per_element.movement: must be zero or positive"),
    (per_op(int8__macs_per_cycle__batch_matmul=None),
     "calibration.per_op.int8.macs_per_cycle.batch_matmul: required key is missing"),
    (per_op(clock_mhz="fast"), "calibration.per_op.clock_mhz: expected float, got 'fast'"),
    ({**per_op(), "connect": "local"},
     "calibration.per_op: only an estimated device (connect: none) uses a per-op cycle table"),
    ({**per_op(), "runtime": "onnxruntime"},
     "calibration.per_op: the per-op estimate reads .tflite operators; runtime onnxruntime runs .onnx files"),
])
def test_malformed_profile_is_one_line(tmp_path, capsys, change, message):
    folder = write(tmp_path / "d", {**GOOD, **change})
    assert main(["bench", "--list-devices", "--devices-dir", str(folder)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def test_unknown_device_suggests(capsys):
    assert main(["bench", "runs/x", "--device", "hots"]) == 2
    err = capsys.readouterr().err
    assert "unknown device 'hots'; did you mean 'host'?" in err and err.count("\n") == 1


def test_duplicate_profile_name_fails(tmp_path, capsys):
    write(tmp_path / "d", {**GOOD, "name": "host"}, name="host")
    assert main(["bench", "--list-devices", "--devices-dir", str(tmp_path / "d")]) == 2
    assert "device 'host' is already defined by another file" in capsys.readouterr().err


def test_builtin_profiles_have_published_or_assumed_comments():
    """Every shipped profile says where its figures come from: each budget line is marked as an assumption or the
    file cites what it states."""
    for name in SHIPPED:
        text = (BUILTIN_DIR / f"{name}.yaml").read_text()
        for key in ("latency_ms", "ram_mib", "storage_mib"):
            line = next(line for line in text.splitlines() if line.strip().startswith(key + ":"))
            assert "assumption" in line, f"{name}.yaml: {line.strip()} is not marked as an assumption"


def test_bench_and_pick_modules_import_without_torch():
    """`edgepkd bench` / `pick` on an estimated device read runs and manifests only: torch stays unloaded."""
    import subprocess

    code = ("import sys; sys.modules['torch'] = None; "
            "import edgepkd.cli, edgepkd.measure.bench, edgepkd.measure.pick, edgepkd.rundir")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr

"""``edgepkd bench ARTIFACT... --device NAME``: time exported models on a device, in that device's runtime.

    runs/<run>/bench/<device>.json     per artifact ("<target>/<file>"): the runner's JSON (latency percentiles,
                                       load time, peak RSS, runtime and version, threads, top-1 on the test
                                       images) or an estimate, with the artifact's sha256; artifacts the device
                                       cannot run are kept under "errors"
    runs/<run>/bench/test-images.npz   the run's test split as uint8 images + labels (what the runner reads)

How a device is reached is its profile's ``connect``:
  * ``local``: the runner (``edgepkd/measure/runner.py``, torch-free) in a subprocess of the profile's Python
    (default: this one);
  * ``ssh://user@host[:port]``: runner, artifacts, manifests and test images are copied with ``scp`` into a
    temporary folder on the device, the runner runs there with the profile's ``python``, its JSON comes back,
    and the folder is removed (``ssh``/``scp`` with BatchMode, so a password prompt fails instead of hanging);
  * ``none``: estimated, never run: latency = (FLOPs / 2) / the profile's calibrated MAC/s, or, for .tflite files
    of a profile with ``calibration.per_op``, the sum of each operator's cycles from that table over the clock
    (edgepkd/measure/opcost.py; the result's ``latency_estimate`` has the cycles by op type); RAM = the sum of
    the non-constant tensors (an upper bound on the activation memory), storage = the file's bytes.
  * ``runtime: tflite-micro`` (with ``none``): each file runs in TFLite Micro's interpreter on this host for op
    coverage, the exact arena, flash and top-1; latency is estimated as for ``none``.

Every artifact is checked against its manifest entry (size and sha256) before anything runs or is written: a
truncated or changed file stops the command with one line naming it (re-export it), and earlier results stay.
Results are written after each artifact (to a temporary name, then renamed): a failure leaves earlier results.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

import edgepkd
from edgepkd.config import to_dict
from edgepkd.errors import ConfigError, EdgepkdError, RunError
from edgepkd.compress.formats import FORMATS
from edgepkd.measure.devices import MIB, DeviceProfile
from edgepkd.rundir import RunDir, atomic_write_bytes, atomic_write_json, read_json

RUNNER = Path(__file__).with_name("runner.py")


class DeviceError(EdgepkdError):
    """The device cannot be reached, or has no Python / numpy / runtime to run the runner."""

    exit_code = 1


@dataclass
class BenchOptions:
    threads: int | None = None          # default: the profile's
    python: str | None = None           # default: the profile's (local: this interpreter; ssh: python3)
    images: bool = True                 # time on (and score) the run's test images; False: one random input
    data_dir: str | None = None
    warmup_runs: int = 1                # TFLite benchmark_model's defaults
    warmup_seconds: float = 0.5
    min_runs: int = 50
    min_seconds: float = 1.0
    max_seconds: float = 150.0

    def runner_args(self, profile: DeviceProfile, images: str | None) -> list[str]:
        """runner.py's options for ``profile`` (threads: ours, else the profile's), reading test ``images``."""
        return ["--threads", str(self.threads or profile.threads), "--warmup-runs", str(self.warmup_runs),
                "--warmup-seconds", repr(self.warmup_seconds), "--min-runs", str(self.min_runs),
                "--min-seconds", repr(self.min_seconds), "--max-seconds", repr(self.max_seconds)] + \
            (["--images", images] if images is not None else [])


@dataclass
class Artifact:
    path: Path
    entry: dict                 # its manifest.json entry
    target: str                 # the folder under export/
    run: Path | None            # the run directory holding it (None: a loose export folder)

    @property
    def key(self) -> str:
        return f"{self.target}/{self.path.name}"

    @property
    def label(self) -> str:
        return f"{self.entry.get('model', self.path.stem)} ({self.target})"


@dataclass
class Outcome:
    results: list[tuple[Artifact, dict]] = field(default_factory=list)
    errors: list[tuple[Artifact, str]] = field(default_factory=list)


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------------------------------- finding artifacts
def _manifest(folder: Path) -> list[dict]:
    return read_json(folder / "manifest.json", {"artifacts": list}, "a manifest", "export again")["artifacts"]


def _run_of(folder: Path) -> Path | None:
    run = folder.parent.parent                      # runs/<run>/export/<target>/
    return run if folder.parent.name == "export" and (run / "recipe.yaml").is_file() else None


def _check_format(a: Artifact, profile: DeviceProfile) -> None:
    fmt = a.entry.get("format") or a.path.suffix.lstrip(".")
    if fmt != profile.format:
        runtime = FORMATS.get(fmt).runtime if fmt in FORMATS else fmt
        raise ConfigError(f"{a.path}: a {a.path.suffix} artifact, but device '{profile.name}' runs "
                          f"{profile.runtime} ({_suffix(profile.format)} files); bench the run's "
                          f"{_suffix(profile.format)} exports instead (e.g. export/{profile.format}-fp32/), or pick "
                          f"a device with runtime {runtime}")


def _suffix(fmt: str) -> str:
    return FORMATS.get(fmt).suffix


def _from_folder(folder: Path, profile: DeviceProfile, explicit: bool) -> list[Artifact]:
    arts = [Artifact(folder / e["file"], e, folder.name, _run_of(folder)) for e in _manifest(folder)]
    arts = [a for a in arts if a.path.is_file()]
    if explicit:
        for a in arts:
            _check_format(a, profile)
    # an ensemble's standalone members (early exit, edgepkd.measure.early_exit) are not models on their own
    return [a for a in arts if a.entry.get("format") == profile.format and a.entry.get("precision") in
            profile.precisions and "ensemble_member" not in a.entry]


def resolve(paths: list[str], profile: DeviceProfile) -> list[Artifact]:
    """Artifact files, export folders (``runs/r/export/tflite-fp32``) or run directories (every export folder of
    the device's format, at the device's precisions) -> the artifacts to bench, each with its manifest entry."""
    found: dict[Path, Artifact] = {}
    for raw in paths:
        p = Path(raw)
        if p.is_file():
            if not (p.parent / "manifest.json").is_file():
                raise RunError(f"{p}: no manifest.json next to it (bench reads preprocessing and MACs from the "
                               "export manifest: bench artifacts where edgepkd export wrote them)")
            entry = next((e for e in _manifest(p.parent) if e.get("file") == p.name), None)
            if entry is None:
                raise RunError(f"{p}: not listed in {p.parent / 'manifest.json'} (export it again)")
            a = Artifact(p, entry, p.parent.name, _run_of(p.parent))
            _check_format(a, profile)
            arts = [a]
        elif p.is_dir() and (p / "manifest.json").is_file():
            arts = _from_folder(p, profile, explicit=True)
        elif p.is_dir() and (p / "export").is_dir():
            arts = [a for m in sorted((p / "export").glob("*/manifest.json"))
                    for a in _from_folder(m.parent, profile, explicit=False)]
            if not arts:
                raise RunError(f"{p}: no exported {profile.format} artifacts at precision "
                               f"{' or '.join(profile.precisions)} for device '{profile.name}'; export them first "
                               f"(edgepkd export {p} --target {profile.format}-fp32)")
        elif p.is_dir():
            raise RunError(f"{p}: neither an artifact, an export folder (with manifest.json) nor a run directory "
                           "with export/")
        else:
            raise RunError(f"{p}: no such file or directory")
        for a in arts:
            found.setdefault(a.path.resolve(), a)
    return list(found.values())


def check_artifact(a: Artifact) -> None:
    """``a`` is the file its manifest entry describes (same size and sha256), else a one-line RunError naming the
    file and the export that rewrites it. bench and pick call this before running or choosing anything."""
    from edgepkd.measure.runner import integrity_problem

    h = hashlib.sha256()
    try:
        with open(a.path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        size = a.path.stat().st_size
    except OSError as e:
        raise RunError(f"{a.path}: cannot read it ({e.strerror or type(e).__name__})") from None
    problem = integrity_problem(size, h.hexdigest(), a.entry)
    if problem:
        model = a.entry.get("model")
        again = (f"edgepkd export {a.run} --target {a.target}" + (f" --model '{model}'" if model else "")
                 if a.run is not None else f"edgepkd export RUN --target {a.target}")
        raise RunError(f"{a.path}: {problem.replace('manifest.json', str(a.path.parent / 'manifest.json'), 1)}; "
                       f"re-export it: {again}")


# ----------------------------------------------------------------------------------------------- test images
def test_images(run: Path, data_dir: str | None, log=print) -> Path:
    """The run's test split as uint8 images (N, C, H, W) + labels, written once to runs/<run>/bench/; the data is
    read where the run read it (unless ``data_dir`` or $EDGEPKD_DATA say otherwise)."""
    path = run / "bench" / "test-images.npz"
    if path.is_file():
        return path
    import io

    import numpy as np

    from edgepkd.data import load_run_dataset
    from edgepkd.recipe import load_recipe

    recipe = load_recipe(run / "recipe.yaml")
    test = load_run_dataset(RunDir(run), recipe, data_dir, log).test
    buf = io.BytesIO()
    np.savez(buf, images=test.x.numpy(), labels=test.y.numpy())
    atomic_write_bytes(path, buf.getvalue())
    return path


# -------------------------------------------------------------------------------------------------- storage
class BenchStore:
    """runs/<run>/bench/<device>.json: results and errors per artifact key, rewritten after each artifact."""

    def __init__(self, run: Path, profile: DeviceProfile, opts: BenchOptions):
        self.path = run / "bench" / f"{profile.name}.json"
        self.profile = profile
        self.settings = _settings(profile, opts)
        empty = {"device": profile.name, "results": {}, "errors": {}}
        self.data = read_json(self.path, {"results": dict, "errors": dict}, "a bench file",
                              "move it away and bench again", default=empty)

    def current(self, a: Artifact) -> tuple[dict | None, str | None]:
        """(result, error) recorded for ``a`` with the same file contents and device settings, else (None, None)."""
        sha = a.entry.get("sha256")
        r = self.data["results"].get(a.key)
        if r is not None and r.get("sha256") == sha and r.get("settings") == self.settings:
            return r, None
        e = self.data["errors"].get(a.key)
        if e is not None and e.get("sha256") == sha and e.get("settings") == self.settings:
            return None, e["error"]
        return None, None

    def record(self, a: Artifact, result: dict | None, error: str | None = None) -> None:
        if result is not None:
            self.data["results"][a.key] = {"model": a.entry.get("model"), **result, "target": a.target,
                                           "export_accuracy": (a.entry.get("verification") or {}).get("accuracy"),
                                           "settings": self.settings, "at": now()}
            self.data["errors"].pop(a.key, None)
        else:
            self.data["errors"][a.key] = {"error": error, "sha256": a.entry.get("sha256"),
                                          "settings": self.settings, "at": now()}
        self.data.update({"device": self.profile.name, "profile": to_dict(self.profile),
                          "edgepkd_version": edgepkd.__version__})
        atomic_write_json(self.path, self.data)


def _settings(profile: DeviceProfile, opts: BenchOptions) -> dict:
    """What a result depends on besides the artifact: where and with which Python and threads it ran, or the
    calibration it was estimated from. A result with other settings is not current (pick benches again)."""
    if profile.runtime == "tflite-micro":
        from edgepkd.compress import tflm

        return {"mode": "tflite-micro on this host, latency estimated", "runtime_version": tflm.version(),
                "macs_per_second": profile.calibration.macs_per_second, "per_op": _per_op(profile),
                "images": opts.images}
    if profile.estimated:
        return {"mode": "estimated", "macs_per_second": profile.calibration.macs_per_second,
                "per_op": _per_op(profile)}
    # "ram": how model_rss_bytes is measured; results from before it excluded the test images are not current
    return {"mode": "measured", "connect": profile.connect, "python": device_python(profile, opts),
            "runtime": profile.runtime, "threads": opts.threads or profile.threads, "ram": "load and first run"}


def _per_op(profile: DeviceProfile) -> dict | None:
    """The per-op cycle table a result was estimated with (None: FLOPs / MAC/s); a changed table re-estimates."""
    table = profile.calibration.per_op
    return None if table is None else {k: v for k, v in to_dict(table).items() if k != "source"}


# --------------------------------------------------------------------------------------------- measurement
def ram_bytes(result: dict) -> int | None:
    """The RAM figure budgets are checked against: TFLite Micro, the measured arena; measured, the model's
    peak-RSS growth; estimated, the activation upper bound."""
    mem = result.get("memory") or {}
    if mem.get("arena_bytes") is not None:
        return mem["arena_bytes"]
    return mem.get("activation_bytes") if result.get("estimated") else mem.get("model_rss_bytes")


def activation_bytes(path: Path, fmt: str) -> int:
    """Sum of the non-constant tensors' bytes (an upper bound on the activation memory a runtime needs)."""
    if FORMATS.get(fmt).suffix == ".tflite":
        from edgepkd.measure.runner import tflite_activation_bytes

        return tflite_activation_bytes(path.read_bytes())
    import numpy as np
    import onnx
    from onnx import helper, shape_inference

    model = shape_inference.infer_shapes(onnx.load(str(path)))
    g = model.graph
    constant = {i.name for i in g.initializer} | {o for n in g.node if n.op_type == "Constant" for o in n.output}
    total = 0
    for vi in [*g.input, *g.value_info, *g.output]:
        t = vi.type.tensor_type
        if vi.name in constant or not t.elem_type:
            continue
        count = int(np.prod([d.dim_value or 1 for d in t.shape.dim])) if t.shape.dim else 1
        total += count * np.dtype(helper.tensor_dtype_to_np_dtype(t.elem_type)).itemsize
    return total


def estimate(a: Artifact, profile: DeviceProfile) -> dict:
    """Estimated figures: latency per op from the .tflite's operators and the profile's cycle table
    (``calibration.per_op``, edgepkd.measure.opcost), else from FLOPs and the calibrated MAC/s; RAM from the
    artifact's tensors."""
    flops, macs = a.entry.get("flops"), a.entry.get("macs")
    cal = profile.calibration
    flops_ms = None
    if cal.macs_per_second is not None and (flops is not None or macs is not None):
        mac_equivalents = flops / 2 if flops is not None else macs   # the scan's FLOPs count as half a MAC each
        flops_ms = 1e3 * mac_equivalents / cal.macs_per_second
    if cal.per_op is not None and a.path.suffix == ".tflite":
        from edgepkd.measure import opcost

        est = opcost.estimate(a.path.read_bytes(), cal.per_op)
        ms = est["ms"]
        skipped = ", ".join(f"{k} x{n}" for k, n in est["not_modelled"].items())
        latency = (f"latency estimated (per-op): {sum(r['count'] for r in est['by_op'].values())} operators, MACs / "
                   f"MACs-per-cycle and elements x cycles-per-element of calibration.per_op "
                   f"({cal.per_op.source or 'profile'}), {est['cycles']:,.0f} cycles at {cal.per_op.clock_mhz:g} MHz"
                   + (f"; not modelled (0 cycles): {skipped}" if skipped else ""))
        detail = {"method": "per-op", "cycles": est["cycles"], "clock_mhz": est["clock_mhz"], "by_op": est["by_op"],
                  "not_modelled": est["not_modelled"], "flops_ms": flops_ms}
    else:
        if flops_ms is None:
            raise EdgepkdError(f"{a.path}: its manifest entry has no MACs or FLOPs to estimate from (export it "
                               "again)")
        ms = flops_ms
        latency = (f"latency estimated (MACs): (FLOPs / 2 = {1e-3 * ms * cal.macs_per_second:,.0f} "
                   f"MAC-equivalents) / {cal.macs_per_second:.4g} MAC/s ({cal.source or 'profile'})")
        detail = {"method": "macs-per-second", "macs_per_second": cal.macs_per_second}
    return {
        "artifact": a.path.name, "format": a.entry["format"], "bytes": a.path.stat().st_size,
        "sha256": a.entry.get("sha256"), "model": a.entry.get("model"), "precision": a.entry.get("precision"),
        "estimated": True, "runtime": profile.runtime, "runtime_version": None, "threads": profile.threads,
        "method": f"{latency}; RAM = sum of non-constant tensor bytes (upper bound); storage = file bytes",
        "latency_method": latency, "latency_estimate": detail,
        "latency_ms": {"p50": ms, "p90": ms, "p99": ms, "mean": ms, "std": None, "min": ms, "max": ms},
        "memory": {"activation_bytes": activation_bytes(a.path, a.entry["format"]), "peak_rss_bytes": None,
                   "model_rss_bytes": None},
        "accuracy": None, "load_ms": None, "runs": 0,
    }


def device_python(profile: DeviceProfile, opts: BenchOptions) -> str:
    return opts.python or profile.python or (sys.executable if profile.connect == "local" else "python3")


def _handle_line(line: str, by_path: dict[str, Artifact], store_of, outcome: Outcome, log, device: str) -> None:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError:
        return  # a runtime's own chatter on stdout
    a = by_path.get(obj.get("path"))
    if a is None:
        return
    if "error" in obj:
        # integrity: the file matched its manifest here, so the runner's copy differs (a failed copy)
        if obj.get("kind") in ("environment", "integrity"):
            raise DeviceError(f"device '{device}': {obj['error']}")
        store_of(a).record(a, None, obj["error"])
        outcome.errors.append((a, obj["error"]))
        log(f"  {a.key:<34} cannot run: {obj['error']}")
        return
    if obj.get("sha256") != a.entry.get("sha256"):
        raise DeviceError(f"device '{device}': the {a.key} that ran has sha256 {str(obj.get('sha256'))[:12]}..., "
                          f"its manifest says {str(a.entry.get('sha256'))[:12]}... (changed since export, or a "
                          "failed copy); export it again")
    result = {**obj, "estimated": False}
    store_of(a).record(a, result)
    outcome.results.append((a, result))
    log(f"  {a.key:<34} p90 {result['latency_ms']['p90']:.4f} ms")


def _stream(cmd: list[str], on_line, what: str, timeout: float) -> tuple[int, str]:
    """Run ``cmd``, hand each stdout line to ``on_line`` as it comes; return (exit status, stderr)."""
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    except FileNotFoundError:
        raise DeviceError(f"{what}: '{cmd[0]}' not found") from None
    with tempfile.TemporaryFile("w+") as err_sink:
        pump = threading.Thread(target=lambda: shutil.copyfileobj(proc.stderr, err_sink), daemon=True)
        pump.start()
        try:
            for line in proc.stdout:
                on_line(line)
            proc.wait(timeout=timeout)
        except BaseException:
            proc.kill()
            proc.wait()
            pump.join()  # before the sink closes
            raise
        pump.join()
        err_sink.seek(0)
        return proc.returncode, err_sink.read()


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def _measure_local(arts: list[Artifact], profile, opts: BenchOptions, images: Path | None, handle) -> None:
    python = device_python(profile, opts)
    cmd = [python, str(RUNNER), *[str(a.path) for a in arts],
           *opts.runner_args(profile, str(images) if images is not None else None)]
    code, err = _stream(cmd, handle, f"device '{profile.name}': python", _timeout(len(arts), opts))
    if code not in (0, 2):
        raise DeviceError(f"device '{profile.name}': the runner failed under {python} (exit status {code}): "
                          f"{_last_line(err)}")


def _timeout(n: int, opts: BenchOptions) -> float:
    return n * (opts.max_seconds * 2 + 120)


def _ssh_base(profile: DeviceProfile) -> list[str]:
    base = ["-o", "BatchMode=yes", "-o", f"ConnectTimeout={profile.ssh.connect_timeout_s}",
            "-o", "ServerAliveInterval=15", "-o", "ServerAliveCountMax=4"]  # a device that vanishes ends the run
    if profile.identity_file():
        base += ["-i", profile.identity_file()]
    for opt in profile.ssh.options:
        base += ["-o", opt]
    return base


def _unreachable(profile: DeviceProfile, err: str) -> DeviceError:
    target, _, port = profile.ssh_target()
    return DeviceError(
        f"device '{profile.name}': cannot reach {target} port {port} over ssh ({_last_line(err) or 'no answer'}); "
        f"check that the device is on and runs sshd, and that `ssh -p {port} {target} true` logs in without a "
        "prompt (set ssh.identity_file in the profile or $EDGEPKD_SSH_IDENTITY, and accept its host key once)")


def _measure_ssh(arts: list[Artifact], profile, opts: BenchOptions, images: Path | None, handle) -> None:
    from edgepkd.measure.runner import device_files

    for tool in ("ssh", "scp"):
        if shutil.which(tool) is None:
            raise DeviceError(f"device '{profile.name}': '{tool}' not found; install the OpenSSH client "
                              "(apt-get install openssh-client)")
    target, _, port = profile.ssh_target()
    base = _ssh_base(profile)
    ssh = ["ssh", *base, "-p", str(port), target]
    try:
        made = subprocess.run([*ssh, 'mktemp -d "${TMPDIR:-/tmp}/edgepkd-bench.XXXXXX"'], capture_output=True,
                              text=True, timeout=profile.ssh.connect_timeout_s + 60)
    except subprocess.TimeoutExpired:
        raise _unreachable(profile, "timed out") from None
    if made.returncode != 0 or not made.stdout.strip():
        raise _unreachable(profile, made.stderr)
    remote = made.stdout.strip().splitlines()[-1]
    try:
        with tempfile.TemporaryDirectory(prefix="edgepkd-bench-") as tmp:
            stage = Path(tmp)
            for file in device_files():             # runner.py and the runtimes.py beside it
                shutil.copy2(file, stage / Path(file).name)
            for a in arts:
                (stage / a.target).mkdir(exist_ok=True)
                shutil.copy2(a.path, stage / a.target / a.path.name)
                shutil.copy2(a.path.parent / "manifest.json", stage / a.target / "manifest.json")
            if images is not None:
                shutil.copy2(images, stage / "test-images.npz")
            copy = subprocess.run(["scp", "-q", "-r", *base, "-P", str(port), *sorted(map(str, stage.iterdir())),
                                   f"{target}:{remote}/"], capture_output=True, text=True,
                                  timeout=profile.ssh.connect_timeout_s + 600)
            if copy.returncode != 0:
                raise DeviceError(f"device '{profile.name}': copying the runner and artifacts to {target}:{remote} "
                                  f"failed ({_last_line(copy.stderr)}); check free space and permissions there")
        python = device_python(profile, opts)
        args = [python, "runner.py", *[a.key for a in arts],
                *opts.runner_args(profile, "test-images.npz" if images is not None else None)]
        command = f"cd {shlex.quote(remote)} && " + " ".join(shlex.quote(x) for x in args)
        code, err = _stream([*ssh, command], handle, f"device '{profile.name}'", _timeout(len(arts), opts))
        if code == 255:
            raise _unreachable(profile, err)
        if code == 127:
            raise DeviceError(f"device '{profile.name}': '{python}' not found on {target}; set python: in the "
                              "profile to the device's Python (with numpy and a runtime)")
        if code not in (0, 2):
            raise DeviceError(f"device '{profile.name}': the runner failed on {target} (exit status {code}): "
                              f"{_last_line(err)}")
    finally:
        subprocess.run([*ssh, f"rm -rf {shlex.quote(remote)}"], capture_output=True, timeout=60)


def bench_artifacts(arts: list[Artifact], profile: DeviceProfile, opts: BenchOptions, log=print) -> Outcome:
    """Measure (or estimate) ``arts`` on ``profile``'s device; each result is stored as soon as it arrives."""
    outcome = Outcome()
    stores: dict[Path, BenchStore] = {}

    def store_of(a: Artifact) -> BenchStore:
        if a.run is None:
            return _NoStore()
        if a.run not in stores:
            stores[a.run] = BenchStore(a.run, profile, opts)
        return stores[a.run]

    for a in arts:
        check_artifact(a)  # a truncated or changed file fails before anything runs or is written
    for a in arts:
        store_of(a)  # an unreadable bench file fails before anything runs
    if profile.runtime == "tflite-micro":
        _measure_tflm(arts, profile, opts, store_of, outcome, log)
        _plot(stores.values())
        return outcome
    if profile.estimated:
        for a in arts:
            result = estimate(a, profile)
            store_of(a).record(a, result)
            outcome.results.append((a, result))
        _plot(stores.values())
        return outcome
    by_run: dict[Path | None, list[Artifact]] = {}
    for a in arts:
        by_run.setdefault(a.run, []).append(a)
    local = profile.connect == "local"
    for run, group in by_run.items():
        images = test_images(run, opts.data_dir, log) if opts.images and run is not None else None
        # the runner names each result by the path it was given: local paths, or <target>/<file> on the device
        by_path = {(str(a.path) if local else a.key): a for a in group}
        handle = lambda line: _handle_line(line, by_path, store_of, outcome, log, profile.name)  # noqa: E731
        (_measure_local if local else _measure_ssh)(group, profile, opts, images, handle)
        done = {id(a) for a, _ in outcome.results} | {id(a) for a, _ in outcome.errors}
        missing = [a.key for a in group if id(a) not in done]
        if missing:
            raise DeviceError(f"device '{profile.name}': the runner returned nothing for {', '.join(missing)}")
    _plot(stores.values())
    return outcome


def tflm_measure(path, images=None, labels=None, preprocessing: dict | None = None) -> dict:
    """What a tflite-micro device reports for ``path``, measured in TFLite Micro's interpreter on this host: its
    ops and their coverage, the exact arena, the flash the model takes, and top-1 on ``images`` (uint8 (N, C, H,
    W), preprocessed as ``preprocessing`` says) with ``labels``."""
    import numpy as np  # noqa: F401  (runner.preprocess reads it from sys.modules)

    from edgepkd.compress.tflm import TFLM_OPS, TFLMError, TFLMModel, find_arena, ops, problems_of, version
    from edgepkd.measure.runner import preprocess

    with open(path, "rb") as f:
        buf = f.read()
    listed = ops(buf)                                                   # parsed once: names, inputs
    missing = problems_of(listed)
    covered = sum(1 for name, _ in listed if name in TFLM_OPS)
    if missing:
        raise TFLMError(f"{Path(path).name}: TFLite Micro cannot run it ({covered} of {len(listed)} "
                        f"ops are TFLite Micro builtins): {', '.join(missing)}")
    arena = find_arena(path)
    out = {"ops": sorted({name for name, _ in listed}), "op_count": len(listed), "op_coverage": covered / len(listed) if listed else 1.0,
           "arena_bytes": arena, "flash_bytes": len(buf) + (-len(buf)) % 16,
           "flash_counts": "the model's byte array (the .tflite file, padded to 16 bytes); TFLite Micro's kernel "
                           "code and the application are not counted",
           "runtime": "tflite_micro", "runtime_version": version(), "accuracy": None}
    if images is not None:
        model = TFLMModel(path, arena)
        x = preprocess(images, preprocessing or {})            # float32 (N, C, H, W)
        pred = [int(model(x[i:i + 1]).argmax()) for i in range(len(x))]
        correct = sum(int(p == int(y)) for p, y in zip(pred, labels))
        out["accuracy"] = {"top1": 100.0 * correct / len(pred), "images": len(pred)}
    return out


def _measure_tflm(arts: list[Artifact], profile: DeviceProfile, opts: BenchOptions, store_of, outcome: Outcome,
                  log) -> None:
    """runtime tflite-micro: each artifact in TFLite Micro's interpreter on this host (edgepkd.compress.tflm): op
    coverage, the exact arena (RAM), flash, top-1 on the run's test images; latency estimated from MACs."""
    import numpy as np

    from edgepkd.compress import tflm

    tflm.runtime()                                      # missing tflite-micro: one line, nothing recorded
    images: dict[Path | None, tuple] = {}
    for a in arts:
        if a.run not in images:
            if opts.images and a.run is not None:
                with np.load(test_images(a.run, opts.data_dir, log)) as f:
                    images[a.run] = (f["images"], f["labels"])
            else:
                images[a.run] = (None, None)
        try:
            measured = tflm_measure(a.path, *images[a.run], preprocessing=a.entry.get("preprocessing"))
        except tflm.TFLMError as e:
            store_of(a).record(a, None, str(e))
            outcome.errors.append((a, str(e)))
            log(f"  {a.key:<34} cannot run: {e}")
            continue
        result = estimate(a, profile)
        result.update({k: measured[k] for k in ("ops", "op_count", "op_coverage", "flash_bytes", "flash_counts",
                                                "runtime", "runtime_version", "accuracy")})
        result["memory"]["arena_bytes"] = measured["arena_bytes"]
        result["method"] = (f"TFLite Micro {measured['runtime_version']} on this host: ops, arena (smallest "
                            "arena_size that allocates and invokes, by bisection), flash (" +
                            measured["flash_counts"] + ") and top-1 measured; " + result["latency_method"])
        store_of(a).record(a, result)
        outcome.results.append((a, result))
        acc = measured["accuracy"]
        log(f"  {a.key:<34} ops {measured['op_count']} ({100 * measured['op_coverage']:.0f} % TFLite Micro "
            f"builtins), arena {measured['arena_bytes']:,} B, flash {measured['flash_bytes']:,} B" +
            (f", top-1 {acc['top1']:.2f}%" if acc else ""))


def _plot(stores) -> None:
    """bench/<device>.png for every run benched: accuracy against p50 (edgepkd/measure/plot.py)."""
    from edgepkd.measure.plot import write_device_plot

    for store in stores:
        write_device_plot(store.path, store.data)


def plot_path(run: Path, profile: DeviceProfile) -> Path:
    return Path(run) / "bench" / f"{profile.name}.png"


class _NoStore:
    """Artifacts outside a run directory: results are printed, not stored."""

    def record(self, *args, **kwargs) -> None:
        pass


# ---------------------------------------------------------------------------------------------------- table
def format_table(headers: list[str], rows: list[list[str]], right: set[int]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]

    def line(cells):
        return "  ".join(str(c).rjust(w) if i in right else str(c).ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, rows)])


def _ms(v) -> str:
    """Milliseconds with about four significant digits."""
    if v is None:
        return "-"
    return f"{v:.4f}" if v < 1 else f"{v:.3f}" if v < 10 else f"{v:.2f}" if v < 100 else f"{v:.1f}"


def _latency_rule(profile: DeviceProfile) -> str:
    table = profile.calibration.per_op
    if table is not None:
        return (f"(per-op) = sum of each operator's cycles (calibration.per_op: int8 conv "
                f"{table.int8.macs_per_cycle.conv_2d:g} MACs/cycle, float32 MACs "
                f"{table.float32.macs_per_cycle.fully_connected:.3g}/cycle, float ops per element) / "
                f"{table.clock_mhz:g} MHz")
    return f"(MACs) = MAC-equivalents / {profile.calibration.macs_per_second:.4g} MAC/s"


def render_bench(outcome: Outcome, profile: DeviceProfile) -> str:
    rows = []
    for a, r in sorted(outcome.results, key=lambda x: x[0].key):
        lat, est = r["latency_ms"], r.get("estimated")
        ram = ram_bytes(r)
        acc = r.get("accuracy")
        ver = (a.entry.get("verification") or {}).get("accuracy")
        rows.append([a.key, str(a.entry.get("model")), _ms(lat["p50"]), _ms(lat["p90"]) + (" est." if est else ""),
                     _ms(lat["p99"]), _ms(lat["std"]), _ms(r.get("load_ms")),
                     "-" if ram is None else f"{ram / MIB:.2f}", f"{r['bytes'] / 1024:.1f}",
                     "-" if acc is None else f"{acc['top1']:.2f}", "-" if ver is None else f"{ver:.2f}"])
    first = outcome.results[0][1] if outcome.results else {}
    if profile.runtime == "tflite-micro":
        head = (f"device '{profile.name}': TFLite Micro {first.get('runtime_version')} on this host: RAM = the "
                f"measured arena, top-1 measured; latency ESTIMATED {_latency_rule(profile)}")
    elif profile.estimated:
        head = (f"device '{profile.name}': ESTIMATED (not run): latency {_latency_rule(profile)}; RAM = activation "
                "upper bound")
    else:
        threads = first.get("threads")
        head = (f"device '{profile.name}' ({profile.connect}): {first.get('runtime')} {first.get('runtime_version')}, "
                f"{f'{threads} thread(s)' if threads else 'its default thread pool'}, "
                f"{first.get('host', {}).get('system')} "
                f"{first.get('host', {}).get('machine')}; batch 1, {first.get('inputs')}; "
                f"RAM = peak-RSS growth from loading the model")
    headers = ["artifact", "model", "p50 ms", "p90 ms", "p99 ms", "std ms", "load ms", "RAM MiB", "KiB",
               "top-1 %", "export top-1 %"]
    return head + "\n" + format_table(headers, rows, right=set(range(2, len(headers))))


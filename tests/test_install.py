"""edgepkd installed the way a user installs a release: the sdist built from this checkout, the wheel built from
that sdist (as `python -m build` does), the wheel installed non-editable into a fresh venv, and the commands run
there from an empty folder.

The fresh venv gets edgepkd from the wheel only (`pip install --no-deps`); its dependencies (torch, the export
extra) are this venv's, reached through a .pth file holding this venv's site-packages path. Python appends such a
path without processing the .pth files inside it, so this venv's editable-install finder is not activated there:
`import edgepkd` in the fresh venv finds the wheel's copy (checked). Reinstalling torch instead would download
gigabytes for nothing the test checks."""

import json
import os
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest
import yaml

from conftest import REPO, TINY_RECIPE
from edgepkd.builtins import KINDS

pytestmark = [pytest.mark.slow, pytest.mark.export]
for module in ("onnxruntime", "onnxscript", "litert_torch", "ai_edge_litert", "torchao"):
    pytest.importorskip(module, reason=f"needs {module}: pip install -e '.[export]'")
pytest.importorskip("setuptools", reason="needs setuptools to build the sdist and wheel: pip install -e '.[dev]'")

BUILD = "import sys; from setuptools import build_meta; print(getattr(build_meta, sys.argv[1])(sys.argv[2]))"


def build(hook: str, src: Path, out: Path) -> Path:
    """Run a PEP 517 hook of setuptools (this venv's, no build isolation: nothing is downloaded) in ``src``."""
    proc = subprocess.run([sys.executable, "-c", BUILD, hook, str(out)], cwd=src, capture_output=True, text=True,
                          env=clean_env(), timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out / proc.stdout.strip().splitlines()[-1]


def clean_env(**extra) -> dict:
    """The environment without anything that would make Python import edgepkd from the checkout."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    return {**env, **extra}


def checkout_files(kind: str) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((REPO / kind).glob("*.yaml"))}


def package_files() -> dict[str, bytes]:
    """Every module and C++ source of the checkout's edgepkd package, by path inside the package."""
    files = [p for p in (REPO / "edgepkd").rglob("*") if p.suffix in (".py", ".cpp") and "__pycache__" not in p.parts]
    return {p.relative_to(REPO).as_posix(): p.read_bytes() for p in files}


def source_copy(dst: Path) -> Path:
    """The checkout's files (tracked, and untracked ones git does not ignore) copied to ``dst``: the sdist is built
    there, so no build output of the checkout (build/, *.egg-info/) can slip into it, and none is left behind."""
    import shutil

    try:
        listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                                capture_output=True, check=True).stdout.decode().split("\0")
    except (OSError, subprocess.CalledProcessError):  # not a git checkout (e.g. an unpacked sdist)
        shutil.copytree(REPO, dst, ignore=shutil.ignore_patterns(".git", ".venv", "venv", "runs", "build", "dist",
                                                                 "*.egg-info", "__pycache__", ".pytest_cache"))
        return dst
    for name in filter(None, listed):
        if (REPO / name).is_file():
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dst / name)
    return dst


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    sdist = build("build_sdist", source_copy(out / "checkout"), out)
    with tarfile.open(sdist) as tar:
        top = tar.getnames()[0].split("/")[0]
        members = {m.name[len(top) + 1:]: m for m in tar.getmembers() if m.isfile()}
        for kind in KINDS:  # the sdist carries the top-level folders as they are
            shipped = {name.split("/", 1)[1]: tar.extractfile(m).read() for name, m in members.items()
                       if name.startswith(f"{kind}/")}
            assert shipped == checkout_files(kind), f"the sdist's {kind}/ differs from the checkout's"
        tar.extractall(out / "src", filter="data") if sys.version_info >= (3, 12) else tar.extractall(out / "src")
    return build("build_wheel", out / "src" / top, out)  # from the sdist, as pip and `python -m build` do


def test_wheel_carries_the_builtins_and_the_whole_package(wheel):
    """The packaged built-ins are the checkout's top-level folders byte for byte (a copy that drifted, or a file
    left out, fails here), and so is every module and C++ source (a subpackage missing from pyproject's packages
    fails here too)."""
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        for kind in KINDS:
            prefix = f"edgepkd/_builtins/{kind}/"
            packaged = {n[len(prefix):]: z.read(n) for n in sorted(names) if n.startswith(prefix)}
            assert packaged == checkout_files(kind), f"the wheel's {prefix} differs from the checkout's {kind}/"
        for path, data in package_files().items():
            assert path in names, f"{path} is in the checkout but not in the wheel: list its package in " \
                                  "pyproject.toml's [tool.setuptools] packages"
            assert z.read(path) == data, f"the wheel's {path} differs from the checkout's"
        entry_points = z.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    assert "edgepkd = edgepkd.cli:main" in entry_points


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    """A fresh venv holding the wheel, installed non-editable, and this venv's site-packages after its own."""
    venv = tmp_path_factory.mktemp("venv") / "fresh"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    proc = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index",
                           "--quiet", str(wheel)], capture_output=True, text=True, env=clean_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    ours = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    (site / "zz-edgepkd-test-dependencies.pth").write_text("".join(f"{p}\n" for p in ours))
    return venv


def test_installed_wheel_runs_from_an_empty_folder(venv, tmp_path):
    """From an empty folder, the installed wheel lists its targets and devices, dry-runs a shipped recipe by name,
    distills a tiny run, exports it and benches it here: all from the packaged copies."""
    empty = tmp_path / "empty"
    empty.mkdir()
    # the C++ scan kernel is built from the wheel's source, into a folder of its own
    env = clean_env(TORCH_EXTENSIONS_DIR=str(tmp_path / "torch_extensions"))
    env.pop("EDGEPKD_DATA", None)

    def edgepkd(*args: str, code: int = 0) -> str:
        cmd = [str(venv / "bin" / "edgepkd"), *args]
        proc = subprocess.run(cmd, cwd=empty, capture_output=True, text=True, env=env, timeout=900)
        print(f"$ edgepkd {' '.join(args)}  -> exit {proc.returncode}\n{proc.stdout[-1500:]}{proc.stderr[-1500:]}")
        assert proc.returncode == code, proc.stderr[-3000:]
        return proc.stdout

    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import edgepkd, edgepkd.builtins as b; "
                            "print(edgepkd.__file__); print(b.builtin_dir('export'))"],
                           cwd=empty, capture_output=True, text=True, env=env, check=True).stdout.split()
    site = str(venv / "lib")
    print("edgepkd imported from", where[0], "built-in targets from", where[1])
    assert where[0].startswith(site) and where[1].startswith(site) and where[1].endswith("edgepkd/_builtins/export")

    targets = [line.split()[0] for line in edgepkd("export", "--list-targets").splitlines()]
    assert targets == sorted(Path(n).stem for n in checkout_files("export"))
    devices = {line.split()[0] for line in edgepkd("bench", "--list-devices").splitlines()}
    assert devices == {Path(n).stem for n in checkout_files("devices")}
    recipes = dict(line.split() for line in edgepkd("list", "recipes").splitlines())
    assert set(recipes) == {Path(n).stem for n in checkout_files("recipes")}
    assert all(path.startswith(site) for path in recipes.values())
    assert "digits: 4 students on digits" in edgepkd("distill", "digits", "--dry-run")

    (empty / "tiny.yaml").write_text(yaml.safe_dump(TINY_RECIPE))
    edgepkd("distill", "tiny.yaml", "--quiet", "--set", "teacher.train.epochs=1", "--set", "distill.train.epochs=1")
    edgepkd("export", "runs/tiny", "--target", "tflite-fp32", "--model", "chain/s2")
    (entry,) = json.loads((empty / "runs/tiny/export/tflite-fp32/manifest.json").read_text())["artifacts"]
    assert entry["verification"]["passed"] and entry["file"] == "chain-s2.tflite"
    edgepkd("bench", "runs/tiny", "--device", "host", "--min-runs", "3", "--min-seconds", "0")
    (result,) = json.loads((empty / "runs/tiny/bench/host.json").read_text())["results"].values()
    assert result["sha256"] == entry["sha256"]
    assert result["accuracy"]["top1"] == pytest.approx(entry["verification"]["accuracy"])

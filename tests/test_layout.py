"""The packages follow the pipeline: each module imports (at its top or inside a function) only modules of its own
rank or below, so that data -> models -> distill -> compress -> measure -> workflow -> cli reads bottom-up."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "edgepkd"

RANK = {"data": 1, "models": 2, "distill": 3, "compress": 4, "measure": 5, "workflow": 6, "cli": 7, "__main__": 7}
# shared below every stage: errors, registry, config, builtins, recipe, rundir, report, progress (rank 0)
# What the device runner needs on a device (numpy and one runtime) -> the edgepkd modules each may import: the
# runtime adapters import nothing of edgepkd; the runner imports only them (edgepkd bench copies the two files).
STANDALONE = {"edgepkd.compress.runtimes": set(), "edgepkd.measure.runner": {"edgepkd.compress.runtimes"}}


def unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "edgepkd"


def imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("edgepkd.")}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.startswith("edgepkd."):
                out.add(node.module)
            elif node.module == "edgepkd":  # from edgepkd import workflow, models, ...
                out |= {f"edgepkd.{a.name}" for a in node.names if a.name != "__version__"}
    return out


MODULES = {".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__"): p
           for p in sorted(PACKAGE.rglob("*.py"))}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_nothing_imports_upward(module):
    rank = RANK.get(unit(module), 0)
    upward = sorted(m for m in imports(MODULES[module]) if RANK.get(unit(m), 0) > rank)
    assert not upward, f"{module} (rank {rank}) imports {upward}"


@pytest.mark.parametrize("module", sorted(STANDALONE))
def test_the_device_runners_modules_import_only_each_other(module):
    assert imports(MODULES[module]) == STANDALONE[module], module


def test_distill_does_not_import_measure():
    for module, path in MODULES.items():
        if unit(module) == "distill":
            assert not [m for m in imports(path) if unit(m) == "measure"], module


def test_the_runtime_adapters_format_tables_agree_with_the_registry():
    """compress/runtimes.py cannot import the format registry (it travels to devices alone with the runner), so it
    lists its formats itself: every format a device runtime runs through the runner (tflite-micro devices are
    measured in TFLite Micro on the host), with its suffix, the runtimes to try, and what to install."""
    from edgepkd.compress import runtimes
    from edgepkd.compress.formats import FORMATS

    run_by_runner = {name: f for name, f in FORMATS.items() if f.runtime not in (None, "tflite-micro")}
    assert runtimes.SUFFIXES == {f.suffix: name for name, f in run_by_runner.items()}
    assert set(runtimes.RUNTIMES) == set(runtimes.INSTALL) == set(run_by_runner)

"""The packages follow the pipeline: each module imports (at its top or inside a function) only modules of its own
rank or below, so that data -> models -> distill -> compress -> measure -> workflow -> cli reads bottom-up."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "edgepkd"

RANK = {"data": 1, "models": 2, "distill": 3, "compress": 4, "measure": 5, "workflow": 6, "cli": 7, "__main__": 7}
# shared below every stage: errors, registry, config, builtins, recipe, rundir, report, progress (rank 0)
# measure/runner.py is the device runner, a standalone file (numpy and one runtime): importing it depends on
# nothing else of measure/, so export verification may use its adapters
STANDALONE = {"edgepkd.measure.runner"}


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
    upward = sorted(m for m in imports(MODULES[module]) - STANDALONE if RANK.get(unit(m), 0) > rank)
    assert not upward, f"{module} (rank {rank}) imports {upward}"


def test_standalone_modules_import_nothing_of_edgepkd():
    for module in STANDALONE:
        assert imports(MODULES[module]) == set(), module


def test_distill_does_not_import_measure():
    for module, path in MODULES.items():
        if unit(module) == "distill":
            assert not [m for m in imports(path) if unit(m) == "measure"], module

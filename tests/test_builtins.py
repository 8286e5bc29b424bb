"""Built-in recipes, export targets and device profiles: read from the checkout's top-level folders here (the
wheel's copy is checked in test_install.py), shipped recipes by name, and an empty registry is one line, not a
traceback."""

import json

import pytest
import yaml

from conftest import REPO
from edgepkd.builtins import KINDS, builtin_dir, checkout_root
from edgepkd.cli import main


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("edgepkd: error: ") and err.count("\n") == 1, err
    return err


def test_a_checkout_reads_its_top_level_folders():
    assert checkout_root() == REPO
    for kind in KINDS:
        assert builtin_dir(kind) == REPO / kind
    from edgepkd.compress.targets import BUILTIN_DIR as targets
    from edgepkd.measure.devices import BUILTIN_DIR as devices

    assert (targets, devices) == (REPO / "export", REPO / "devices")


def test_list_recipes_shows_the_shipped_ones(capsys):
    assert main(["list", "recipes"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert {name: path for name, path in rows} == {p.stem: str(p) for p in (REPO / "recipes").glob("*.yaml")}
    assert {"digits", "mnist", "cifar10", "cifar10-gpu"} <= {name for name, _ in rows}


def test_distill_takes_a_shipped_recipe_by_name(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no recipes/ here: the name is what finds it
    assert main(["distill", "digits", "--dry-run", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["recipe"] == "digits" and plan["dataset"] == "digits" and len(plan["students"]) == 4
    assert main(["distill", "digts", "--dry-run"]) == 2
    err = one_line_error(capsys)
    assert "digts: no such file; did you mean 'digits'?" in err and "edgepkd list recipes" in err
    assert main(["distill", "recipes/mnist.yaml", "--dry-run"]) == 2
    assert "the shipped recipe is named without a folder or suffix: edgepkd distill mnist" in one_line_error(capsys)
    # a file of that name wins over the shipped recipe
    (tmp_path / "digits").write_text(yaml.safe_dump({"name": "mine", "distill": {"temprature": 2}}))
    assert main(["distill", "digits", "--dry-run"]) == 2
    assert "digits: distill.temprature: unknown key" in one_line_error(capsys)


@pytest.fixture
def no_builtins(tmp_path, monkeypatch):
    """What a wheel without its built-ins looked like: no built-in folders, run from an empty folder."""
    import edgepkd.compress.targets as targets
    import edgepkd.measure.devices as devices
    import edgepkd.recipe as recipe

    missing = tmp_path / "site-packages" / "edgepkd" / "_builtins"
    monkeypatch.setattr(targets, "BUILTIN_DIR", missing / "export")
    monkeypatch.setattr(devices, "BUILTIN_DIR", missing / "devices")
    monkeypatch.setattr(recipe, "builtin_dir", lambda kind: missing / kind)
    work = tmp_path / "empty"
    work.mkdir()
    monkeypatch.chdir(work)
    return missing


def test_empty_registries_are_one_line_and_exit_non_zero(no_builtins, capsys):
    cases = [
        (["export", "--list-targets"], "no export targets found: the built-in folder "
                                       f"{no_builtins / 'export'} is missing; none in ./export/ either"),
        (["export", "runs/x", "--target", "onnx-fp32"], "no export targets found"),
        (["bench", "--list-devices"], f"no devices found: the built-in folder {no_builtins / 'devices'} is missing"),
        (["bench", "runs/x", "--device", "host"], "no devices found"),
        (["list", "recipes"], f"no recipes found: the built-in folder {no_builtins / 'recipes'} is missing"),
        (["distill", "mnist", "--dry-run"], "no recipes found"),
    ]
    for args, message in cases:
        assert main(args) == 2, args
        err = one_line_error(capsys)
        assert message in err and "reinstall edgepkd" in err, err
        assert capsys.readouterr().out == ""


def test_local_folders_are_still_read_after_the_builtins(no_builtins, capsys):
    """The lookup order is unchanged: built-ins, then ./export/ (./devices/) and --targets-dir (--devices-dir)."""
    (no_builtins / "export").mkdir(parents=True)
    (no_builtins / "export" / "onnx-fp32.yaml").write_text((REPO / "export" / "onnx-fp32.yaml").read_text())
    local = no_builtins.parents[2] / "empty" / "export"
    local.mkdir()
    (local / "mine.yaml").write_text(yaml.safe_dump({"name": "mine", "format": "onnx", "precision": "fp32"}))
    assert main(["export", "--list-targets"]) == 0
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()] == ["mine", "onnx-fp32"]
    (local / "onnx-fp32.yaml").write_text((REPO / "export" / "onnx-fp32.yaml").read_text())
    assert main(["export", "--list-targets"]) == 2
    assert "export target 'onnx-fp32' is already defined by another file" in one_line_error(capsys)
    devices = no_builtins.parents[2] / "mine-devices"
    devices.mkdir()
    (devices / "board.yaml").write_text(yaml.safe_dump({"name": "board", "runtime": "tflite", "connect": "local",
                                                        "budget": {"latency_ms": 1, "ram_mib": 1, "storage_mib": 1}}))
    assert main(["bench", "--list-devices", "--devices-dir", str(devices)]) == 0
    assert capsys.readouterr().out.split()[0] == "board"

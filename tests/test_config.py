from pathlib import Path

import pytest
import yaml

from conftest import REPO, run_cli
from edgepkd.config import to_dict
from edgepkd.errors import ConfigError
from edgepkd.recipe import Recipe, load_recipe


def write(tmp_path, data) -> Path:
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def test_digits_recipe_is_the_embedded_demo():
    assert load_recipe(REPO / "recipes" / "digits.yaml") == Recipe()


@pytest.mark.parametrize("name", sorted(p.stem for p in (REPO / "recipes").glob("*.yaml")))
def test_shipped_recipes_load(name):
    recipe = load_recipe(REPO / "recipes" / f"{name}.yaml")
    assert recipe.name == name
    assert from_roundtrip(recipe) == recipe


def from_roundtrip(recipe):
    from edgepkd.config import from_dict

    return from_dict(Recipe, to_dict(recipe))


def test_typo_key_names_path_and_suggests(tmp_path):
    p = write(tmp_path, {"distill": {"temprature": 2.0}})
    with pytest.raises(ConfigError) as e:
        load_recipe(p)
    assert str(e.value).startswith(f"{p}: distill.temprature: unknown key; did you mean 'temperature'?")


def test_wrong_type_names_path(tmp_path):
    p = write(tmp_path, {"distill": {"temperature": "high"}})
    with pytest.raises(ConfigError, match=r"distill\.temperature: expected float, got 'high'"):
        load_recipe(p)


def test_nested_list_item_path(tmp_path):
    p = write(tmp_path, {"students": {"sizes": [{"d_model": 8}, {"d_model": 4, "dept": 2}]}})
    with pytest.raises(ConfigError, match=r"students\.sizes\.1\.dept: unknown key; did you mean 'depth'"):
        load_recipe(p)


def test_bad_value_lists_allowed(tmp_path):
    p = write(tmp_path, {"distill": {"strategies": ["chain", "ensamble"]}})
    with pytest.raises(ConfigError, match=r"strategies\.1: 'ensamble' is not allowed; did you mean 'ensemble'"):
        load_recipe(p)
    p = write(tmp_path, {"distill": {"alpha": 1.5}})
    with pytest.raises(ConfigError, match=r"distill\.alpha: must be in \[0, 1\]"):
        load_recipe(p)


def test_int_field_rejects_float_and_bool(tmp_path):
    for bad in (2.5, True):
        with pytest.raises(ConfigError, match="teacher.train.epochs: expected int"):
            load_recipe(write(tmp_path, {"teacher": {"train": {"epochs": bad}}}))


def test_missing_required_key(tmp_path):
    with pytest.raises(ConfigError, match=r"students\.sizes\.0\.d_model: required key is missing"):
        load_recipe(write(tmp_path, {"students": {"sizes": [{"depth": 1}]}}))


def test_sizes_and_progression_exclusive(tmp_path):
    with pytest.raises(ConfigError, match="exactly one of 'sizes'"):
        load_recipe(write(tmp_path, {"students": {"sizes": [{"d_model": 8}], "progression": {"count": 2}}}))


def test_overrides_are_type_checked():
    r = load_recipe(None, ["distill.temperature=2", "students.sizes.0.d_model=40", "data.dataset=synthetic"])
    assert r.distill.temperature == 2.0 and isinstance(r.distill.temperature, float)
    assert r.students.sizes[0].d_model == 40 and r.data.dataset == "synthetic"
    with pytest.raises(ConfigError, match=r"distill\.train\.epochs: expected int, got 'many'"):
        load_recipe(None, ["distill.train.epochs=many"])
    with pytest.raises(ConfigError, match=r"distill\.temprature: unknown key; did you mean 'temperature'"):
        load_recipe(None, ["distill.temprature=2"])
    with pytest.raises(ConfigError, match="not an index"):
        load_recipe(None, ["students.sizes.9.d_model=4"])
    with pytest.raises(ConfigError, match="expected key.path=value"):
        load_recipe(None, ["distill.temperature"])


def test_invalid_yaml_one_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("distill: [unclosed\n")
    with pytest.raises(ConfigError, match=r"invalid YAML \(line"):
        load_recipe(p)


@pytest.mark.parametrize("content, expected", [
    ({"distill": {"temprature": 2.0}}, "distill.temprature: unknown key; did you mean 'temperature'?"),
    ({"teacher": {"train": {"lr": "fast"}}}, "teacher.train.lr: expected float, got 'fast'"),
    ({"teacher": {"arch": "resnet-18"}}, "teacher.arch: unknown teacher 'resnet-18'; did you mean 'resnet18'?"),
    ({"teacher": {"args": {"widht": 8}}}, "teacher.args.widht: not an argument of teacher 'cnn'; did you mean 'width'?"),
])
def test_cli_bad_recipe_exits_2_with_one_line(tmp_path, content, expected):
    p = write(tmp_path, content)
    res = run_cli("distill", str(p), "--dry-run", "--out", str(tmp_path / "runs"))
    assert res.returncode == 2, res.stderr
    assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr
    assert expected in res.stderr
    assert not (tmp_path / "runs").exists()


def test_cli_missing_dataset_files_exit_2(tmp_path):
    res = run_cli("distill", str(REPO / "recipes" / "mnist.yaml"), "--data-dir", str(tmp_path / "nodata"),
                  "--set", "data.download=false", "--out", str(tmp_path / "runs"))
    assert res.returncode == 2
    assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr
    assert "MNIST/raw/train-images-idx3-ubyte" in res.stderr and "--data-dir" in res.stderr
    assert not (tmp_path / "runs").exists()


def test_float_written_without_a_dot_is_a_float(tmp_path):
    # YAML 1.1 reads 1e-3 as a string; users write learning rates that way
    r = load_recipe(write(tmp_path, {"distill": {"train": {"lr": "1e-3"}}}), ["teacher.train.lr=5e-4"])
    assert r.distill.train.lr == 1e-3 and r.teacher.train.lr == 5e-4


def test_unknown_scan_backend_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"scan_backend: 'cuda' is not allowed"):
        load_recipe(write(tmp_path, {"scan_backend": "cuda"}))


def test_every_training_scan_backend_is_a_registered_one_and_ssd_trains_headed_students(tmp_path):
    import typing

    from edgepkd.models.scan import backend_names

    allowed = typing.get_args(typing.get_type_hints(Recipe)["scan_backend"])
    assert set(allowed) <= set(backend_names()) and "ssd" in allowed
    assert load_recipe(write(tmp_path, {"scan_backend": "ssd"})).scan_backend == "ssd"

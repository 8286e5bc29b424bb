import json

import pytest
import torch

from edgepkd.cli import main
from edgepkd.rundir import RunDir, load_safetensors

pytestmark = pytest.mark.slow


def distill(recipe, out, *extra):
    return main(["distill", str(recipe), "--out", str(out), "--quiet", *extra])


@pytest.fixture
def metrics(tiny_run) -> dict:
    """What ``distill --json`` printed for the session's tiny run."""
    return json.loads((tiny_run.parents[1] / "distill-stdout.json").read_text())


def test_the_run_directory_holds_every_file(tiny_run):
    for name in ("recipe.yaml", "state.json", "metrics.json", "report.md", "accuracy_vs_mflops.png"):
        assert (tiny_run / name).is_file(), name
    assert (tiny_run / "accuracy_vs_mflops.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list((tiny_run / "checkpoints").glob("*")), "finished stages leave no checkpoints"


def test_json_output_is_metrics_json(tiny_run, metrics):
    assert json.loads((tiny_run / "metrics.json").read_text()) == metrics
    assert metrics["environment"]["device"] == "cpu" and metrics["resumed"] is False
    assert metrics["run"] == str(tiny_run) and metrics["recipe"] == "tiny"


def test_every_stage_has_a_weights_file_that_describes_it(tiny_run, metrics):
    names = [m["name"] for m in metrics["models"]]
    assert names == ["teacher", "chain/s1", "chain/s2", "ensemble/e1", "ensemble/e2"]
    for stage in names:
        tensors, meta = load_safetensors(RunDir(tiny_run).weights_path(stage))
        assert meta["stage"] == stage and meta["classes"] == ["class0", "class1", "class2", "class3"]
        assert meta["preprocessing"]["input_shape"] == [1, 8, 8]


def test_metrics_rows_shrink_and_prefixes_sum_their_members(metrics):
    chain = [m for m in metrics["models"] if m["role"] == "chain"]
    assert chain[0]["macs"] > chain[1]["macs"] and chain[0]["flops"] > chain[1]["flops"]
    assert [p["name"] for p in metrics["ensemble_prefixes"]] == ["ensemble[1..1]", "ensemble[1..2]"]
    members = {m["name"]: m for m in metrics["models"]}
    for p in metrics["ensemble_prefixes"]:
        for key in ("params", "macs", "flops"):
            assert p[key] == sum(members[m][key] for m in p["members"]), (p["name"], key)
    teacher = metrics["models"][0]
    assert teacher["pct_teacher_flops"] == 100.0 and teacher["test_acc"] > 60  # 4 classes: chance is 25%
    n_test = metrics["dataset"]["test"]
    for m in metrics["models"] + metrics["ensemble_prefixes"]:
        # an accuracy on n_test images is a whole number of them (up to the float32 mean it is computed with)
        assert m["test_acc"] * n_test / 100 == pytest.approx(round(m["test_acc"] * n_test / 100), abs=1e-4)
        assert m["params"] > 0 and m["flops"] > 0


def test_report_lists_every_model_and_prefix(tiny_run, metrics):
    report = (tiny_run / "report.md").read_text()
    for m in metrics["models"] + metrics["ensemble_prefixes"]:
        assert f"| {m['name']} |" in report
    assert "% teacher FLOPs" in report
    for m in metrics["models"][1:]:  # the student architectures table: every student, not the teacher
        assert f"| {m['name']} | {m['spec']['d_model']} |" in report
    assert "| teacher | 8 |" not in report


def test_evaluate_rederives_every_number_exactly(tiny_run, metrics, capsys):
    assert main(["evaluate", str(tiny_run), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    recorded = {m["name"]: m["test_acc"] for m in metrics["models"] + metrics["ensemble_prefixes"]}
    assert {r["name"]: r["test_acc"] for r in out["results"]} == recorded
    assert out["ok"] and out["max_diff"] == 0.0 and out["tolerance"] == 1e-6 and out["missing"] == []


def test_evaluate_from_python_is_what_the_command_prints(tiny_run, capsys):
    from edgepkd.distill.evaluate import evaluate_run

    assert main(["evaluate", str(tiny_run), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == evaluate_run(str(tiny_run), log=lambda *a: None).as_dict()


@pytest.fixture
def rewrite_metrics(tiny_run, tmp_path):
    """A copy of the tiny run and a function that rewrites its metrics.json: the device it was trained on and
    a shift of chain/s1's recorded accuracy."""
    import shutil

    run = tmp_path / "tiny"
    shutil.copytree(tiny_run, run)
    original = json.loads((run / "metrics.json").read_text())

    def rewrite(device: str, shift: float):
        m = json.loads(json.dumps(original))
        m["environment"]["device"] = device
        m["models"][1]["test_acc"] += shift
        (run / "metrics.json").write_text(json.dumps(m))
        return run

    return rewrite


def test_evaluate_is_exact_on_the_device_kind_it_trained_on(rewrite_metrics):
    run = rewrite_metrics("cpu", 0.05)
    assert main(["evaluate", str(run), "--device", "cpu"]) == 1           # same kind: any difference is a mismatch


def test_evaluate_allows_a_tenth_of_a_point_across_device_kinds(rewrite_metrics, capsys):
    run = rewrite_metrics("cuda", 0.05)
    assert main(["evaluate", str(run), "--device", "cpu"]) == 0          # a GPU run checked on a CPU: borderline flips
    assert "trained on cuda; tolerance 0.1" in capsys.readouterr().out
    run = rewrite_metrics("cuda", 0.5)
    assert main(["evaluate", str(run), "--device", "cpu"]) == 1
    assert main(["evaluate", str(run), "--device", "cpu", "--tolerance", "1"]) == 0


def test_evaluate_names_missing_weights(rewrite_metrics, capsys):
    run = rewrite_metrics("cpu", 0.0)
    RunDir(run).weights_path("teacher").unlink()
    capsys.readouterr()
    assert main(["evaluate", str(run), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert "weights missing for teacher" in err and "--skip-missing" in err and len(err.splitlines()) == 1
    assert main(["evaluate", str(run), "--device", "cpu", "--skip-missing", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["missing"] == ["teacher"] and "teacher" not in [r["name"] for r in out["results"]]
    assert len(out["results"]) == 4 + 2                                    # 4 students, 2 prefixes


def test_refuses_to_overwrite_and_resume_needs_a_run(tiny_recipe, tmp_path, capsys):
    assert distill(tiny_recipe, tmp_path / "runs", "--resume") == 2
    assert "nothing to resume" in capsys.readouterr().err
    assert distill(tiny_recipe, tmp_path / "runs") == 0
    before = (tmp_path / "runs" / "tiny" / "metrics.json").read_bytes()
    assert distill(tiny_recipe, tmp_path / "runs") == 2
    assert "already holds a run" in capsys.readouterr().err
    assert distill(tiny_recipe, tmp_path / "runs", "--resume", "--set", "distill.alpha=0.9") == 2
    assert "different recipe (distill.alpha" in capsys.readouterr().err
    assert (tmp_path / "runs" / "tiny" / "metrics.json").read_bytes() == before


def test_resume_after_interruption_gives_the_same_final_metrics(tiny_recipe, tmp_path, monkeypatch):
    assert distill(tiny_recipe, tmp_path / "straight") == 0

    calls = {"n": 0}
    original = RunDir.save_checkpoint

    def interrupt_after_some_epochs(self, *args, **kwargs):
        original(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 10:  # teacher has 5 epochs, chain/s1 3: this is epoch 2 of chain/s2
            raise KeyboardInterrupt

    monkeypatch.setattr(RunDir, "save_checkpoint", interrupt_after_some_epochs)
    assert distill(tiny_recipe, tmp_path / "resumed") == 130
    run = RunDir(tmp_path / "resumed" / "tiny")
    assert set(run.state()["stages"]) == {"teacher", "chain/s1"}
    assert run.checkpoint_path("chain/s2").exists()
    monkeypatch.setattr(RunDir, "save_checkpoint", original)
    assert distill(tiny_recipe, tmp_path / "resumed", "--resume") == 0

    a = json.loads((tmp_path / "straight" / "tiny" / "metrics.json").read_text())
    b = json.loads(run.metrics_path.read_text())
    for ra, rb in zip(a["models"] + a["ensemble_prefixes"], b["models"] + b["ensemble_prefixes"]):
        assert (ra["name"], ra["test_acc"], ra["val_acc"] if "val_acc" in ra else None) == \
               (rb["name"], rb["test_acc"], rb["val_acc"] if "val_acc" in rb else None)
    wa, _ = load_safetensors(RunDir(tmp_path / "straight" / "tiny").weights_path("ensemble/e2"))
    wb, _ = load_safetensors(run.weights_path("ensemble/e2"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa), "resumed weights differ from the uninterrupted run"


def test_chain_from_teacher_and_ensemble_descending(tiny_recipe, tmp_path, capsys):
    assert distill(tiny_recipe, tmp_path / "runs", "--json", "--set", "distill.chain_source=teacher",
                   "--set", "distill.ensemble_order=descending", "--set", "distill.train.epochs=1",
                   "--set", "teacher.train.epochs=1") == 0
    metrics = json.loads(capsys.readouterr().out)
    ens = [m for m in metrics["models"] if m["role"] == "ensemble"]
    assert ens[0]["flops"] > ens[1]["flops"]  # descending: the largest student first


def test_progression_rule_halves_flops(tiny_recipe, tmp_path, capsys):
    assert distill(tiny_recipe, tmp_path / "runs", "--dry-run", "--json",
                   "--set", "students.sizes=null",
                   "--set", "students.progression={start: {d_model: 32, depth: 2, d_state: 8}, count: 4}") == 0
    plan = json.loads(capsys.readouterr().out)["students"]
    flops = [s["mflops"] for s in plan]
    assert len(flops) == 4 and all(b < a for a, b in zip(flops, flops[1:]))
    assert all(0.3 < b / a < 0.75 for a, b in zip(flops, flops[1:])), flops
    macs = [s["macs"] for s in plan]
    assert all(b < a for a, b in zip(macs, macs[1:]))


def test_students_must_shrink(tiny_recipe, tmp_path, capsys):
    code = distill(tiny_recipe, tmp_path / "runs", "--dry-run", "--set", "students.sizes.1.d_model=32")
    assert code == 2
    assert "students.sizes.1:" in capsys.readouterr().err


def test_baseline_conv_stem_and_per_stage_augmentation(tiny_recipe, tmp_path, capsys):
    """A labels-only CNN baseline is trained, reported, plotted and re-evaluated beside the students; a
    conv-stem student trains; the teacher may augment while the students (cached logits) do not."""
    code = distill(tiny_recipe, tmp_path / "runs", "--json",
                   "--set", "baselines=[{arch: cnn, args: {width: 8, stages: 2}, train: {epochs: 5, batch_size: 32, lr: 0.01}}]",
                   "--set", "students.sizes.0.stem=conv",
                   "--set", "teacher.train.augment=crop_flip",
                   "--set", "distill.strategies=[chain]")
    assert code == 0
    metrics = json.loads(capsys.readouterr().out)
    rows = {m["name"]: m for m in metrics["models"]}
    assert list(rows) == ["teacher", "baseline/cnn", "chain/s1", "chain/s2"]
    assert rows["baseline/cnn"]["role"] == "baseline" and rows["baseline/cnn"]["test_acc"] > 25
    assert rows["chain/s1"]["spec"]["stem"] == "conv" and rows["chain/s2"]["spec"]["stem"] == "patch"
    run = tmp_path / "runs" / "tiny"
    assert "| baseline/cnn | baseline |" in (run / "report.md").read_text()
    assert main(["evaluate", str(run)]) == 0


def test_bad_baseline_arch_names_its_index(tiny_recipe, tmp_path, capsys):
    code = distill(tiny_recipe, tmp_path / "runs", "--dry-run", "--set", "baselines=[{arch: resnet9}]")
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert "error:" in err and "baselines.0" in err and "resnet8" in err and len(err.splitlines()) == 1


def test_per_student_epochs(tiny_recipe, tmp_path, capsys):
    """students.epochs gives each student (and its ensemble twin) its own number of epochs."""
    assert distill(tiny_recipe, tmp_path / "runs", "--set", "students.epochs=[1, 3]",
                   "--set", "distill.strategies=[chain, ensemble]") == 0
    state = json.loads((tmp_path / "runs" / "tiny" / "state.json").read_text())["stages"]
    epochs = {name: len(info["history"]) for name, info in state.items()}
    # ensemble is trained smallest first: e1 is the second (smaller) student
    assert epochs["chain/s1"] == 1 and epochs["chain/s2"] == 3
    assert epochs["ensemble/e1"] == 3 and epochs["ensemble/e2"] == 1
    assert distill(tiny_recipe, tmp_path / "runs2", "--dry-run", "--set", "students.epochs=[1]") == 2
    assert "students.epochs: must list one value per student (2), got 1" in capsys.readouterr().err

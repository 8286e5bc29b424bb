import json

import pytest
import torch

from edgepkd.cli import main
from edgepkd.rundir import RunDir, load_safetensors

pytestmark = pytest.mark.slow


def distill(recipe, out, *extra):
    return main(["distill", str(recipe), "--out", str(out), "--quiet", *extra])


def test_end_to_end_synthetic_run_directory(tiny_recipe, tmp_path, capsys):
    assert distill(tiny_recipe, tmp_path / "runs", "--json") == 0
    metrics = json.loads(capsys.readouterr().out)
    run = tmp_path / "runs" / "tiny"
    for name in ("recipe.yaml", "state.json", "metrics.json", "report.md", "accuracy_vs_mflops.png"):
        assert (run / name).is_file(), name
    assert (run / "accuracy_vs_mflops.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list((run / "checkpoints").glob("*")), "finished stages leave no checkpoints"
    names = [m["name"] for m in metrics["models"]]
    assert names == ["teacher", "chain/s1", "chain/s2", "ensemble/e1", "ensemble/e2"]
    for stage in names:
        tensors, meta = load_safetensors(RunDir(run).weights_path(stage))
        assert meta["stage"] == stage and meta["classes"] == ["class0", "class1", "class2", "class3"]
        assert meta["preprocessing"]["input_shape"] == [1, 8, 8]
    chain = [m for m in metrics["models"] if m["role"] == "chain"]
    assert chain[0]["macs"] > chain[1]["macs"] and chain[0]["flops"] > chain[1]["flops"]
    assert [p["name"] for p in metrics["ensemble_prefixes"]] == ["ensemble[1..1]", "ensemble[1..2]"]
    teacher = metrics["models"][0]
    assert teacher["pct_teacher_flops"] == 100.0 and teacher["test_acc"] > 60  # 4 classes: chance is 25%
    for m in metrics["models"] + metrics["ensemble_prefixes"]:
        assert 0 <= m["test_acc"] <= 100 and m["params"] > 0 and m["flops"] > 0
    report = (run / "report.md").read_text()
    for m in metrics["models"]:
        assert f"| {m['name']} |" in report
    assert "ensemble[1..2]" in report and "% teacher FLOPs" in report
    # evaluate re-derives every number from the saved weights
    assert main(["evaluate", str(run)]) == 0
    assert metrics["environment"]["device"] == "cpu" and metrics["resumed"] is False
    check_evaluate_tolerance_and_missing_weights(run, capsys)


def check_evaluate_tolerance_and_missing_weights(run, capsys):
    """Exact on the device kind the run trained on; 0.1 points across kinds; missing weights named."""
    path = run / "metrics.json"
    original = json.loads(path.read_text())
    capsys.readouterr()

    def evaluate_with(device: str, shift: float, *extra) -> int:
        m = json.loads(json.dumps(original))
        m["environment"]["device"] = device
        m["models"][1]["test_acc"] += shift
        path.write_text(json.dumps(m))
        return main(["evaluate", str(run), "--device", "cpu", *extra])

    try:
        assert evaluate_with("cpu", 0.05) == 1           # same kind: any difference is a mismatch
        assert evaluate_with("cuda", 0.05) == 0          # a GPU run checked on a CPU: borderline flips allowed
        assert "trained on cuda; tolerance 0.1" in capsys.readouterr().out
        assert evaluate_with("cuda", 0.5) == 1
        assert evaluate_with("cuda", 0.5, "--tolerance", "1") == 0
        weights = RunDir(run).weights_path("teacher")
        weights.rename(weights.with_suffix(".bak"))
        try:
            capsys.readouterr()
            assert evaluate_with("cpu", 0.0) == 2
            err = capsys.readouterr().err.strip()
            assert "weights missing for teacher" in err and "--skip-missing" in err and len(err.splitlines()) == 1
            assert evaluate_with("cpu", 0.0, "--skip-missing", "--json") == 0
            out = json.loads(capsys.readouterr().out)
            assert out["missing"] == ["teacher"] and "teacher" not in [r["name"] for r in out["results"]]
        finally:
            weights.with_suffix(".bak").rename(weights)
    finally:
        path.write_text(json.dumps(original))


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

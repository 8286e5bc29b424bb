"""Issue #15's ensemble switches: shrinkage, live residuals, the corrective step, and their exports."""

import json

import numpy as np
import pytest
import torch
import torch.nn as nn
import yaml

from conftest import TINY_RECIPE
from edgepkd.cli import main
from edgepkd.models.ensemble import Corrective, EnsemblePrefix, combine, prefix_weights
from edgepkd.rundir import RunDir, load_safetensors

SWITCHES = ["--set", "distill.ensemble_shrinkage=0.5", "--set", "distill.ensemble_corrective_epochs=2",
            "--set", "distill.ensemble_residual=live", "--set", "distill.ensemble_augment=crop"]


def distill(recipe, out, *extra):
    return main(["distill", str(recipe), "--out", str(out), "--quiet", *extra])


def test_combine_is_the_weighted_sum_in_tensors_and_arrays():
    g = torch.Generator().manual_seed(0)
    fs = [torch.randn(5, 3, generator=g) for _ in range(4)]
    for s in (1.0, 0.5, 0.8):
        want = sum(w * f for w, f in zip(prefix_weights(4, s), fs))
        torch.testing.assert_close(combine(fs, s), want)
        np.testing.assert_allclose(combine([f.numpy() for f in fs], s), want.numpy(), rtol=1e-6, atol=1e-6)
    assert prefix_weights(3, 0.5) == [0.25, 0.5, 1.0]
    assert torch.equal(combine(fs, 1.0), fs[0] + fs[1] + fs[2] + fs[3])   # s = 1: the plain sum, bit for bit


def test_corrective_stops_gradients_at_the_earlier_prefix():
    torch.manual_seed(0)
    a, b = nn.Linear(4, 3), nn.Linear(4, 3)
    net = Corrective([a, b], shrinkage=0.5).train()
    x = torch.randn(6, 4)
    out = net(x)                                                             # (B, M, K)
    assert out.shape == (6, 2, 3)
    torch.testing.assert_close(out[:, 1], 0.5 * a(x) + b(x))
    out[:, 1].sum().backward()                                               # prefix 2's loss only
    assert a.weight.grad is None or torch.count_nonzero(a.weight.grad) == 0
    assert torch.count_nonzero(b.weight.grad) > 0
    net.eval()
    torch.testing.assert_close(net(x), EnsemblePrefix([a, b], 0.5)(x))


@pytest.mark.parametrize("sets, key", [
    (["distill.ensemble_residual=live"], "distill.ensemble_residual"),
    (["distill.ensemble_augment=crop"], "distill.ensemble_augment"),
    (["distill.ensemble_shrinkage=0"], "distill.ensemble_shrinkage"),
    (["distill.ensemble_corrective_epochs=-1"], "distill.ensemble_corrective_epochs"),
])
def test_bad_switches_are_one_line_errors_naming_the_key(tiny_recipe, tmp_path, capsys, sets, key):
    args = [a for s in sets for a in ("--set", s)]
    assert distill(tiny_recipe, tmp_path / "runs", "--dry-run", *args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and key in err, err


@pytest.fixture(scope="module")
def switched_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("switched")
    recipe = root / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(TINY_RECIPE, sort_keys=False))
    assert distill(recipe, root / "runs", *SWITCHES) == 0
    return recipe, root / "runs" / "tiny"


@pytest.mark.slow
def test_switched_run_records_corrected_prefixes_and_evaluate_reproduces_them(switched_run, capsys):
    _, run = switched_run
    m = json.loads((run / "metrics.json").read_text())
    assert [p["members"] for p in m["ensemble_prefixes"]] == [["ensemble/c1"], ["ensemble/c1", "ensemble/c2"]]
    assert all(p["shrinkage"] == 0.5 for p in m["ensemble_prefixes"])
    assert [p["members"] for p in m["ensemble_prefixes_uncorrected"]] == [["ensemble/e1"],
                                                                           ["ensemble/e1", "ensemble/e2"]]
    assert 0 <= m["ensemble_corrective"]["best_epoch"] <= 2
    assert (run / "weights" / "ensemble-c2.safetensors").is_file()
    assert not list((run / "checkpoints").glob("*")), "stage checkpoints (and the -best one) are removed"
    capsys.readouterr()
    assert main(["evaluate", str(run), "--json"]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert ev["max_diff"] == 0 and {r["name"] for r in ev["results"]} >= {"ensemble[1..2]", "ensemble/c2"}


@pytest.mark.slow
def test_shrunk_corrected_prefix_exports_and_matches_pytorch(switched_run, tmp_path, capsys):
    import onnxruntime as ort

    from edgepkd.data import load_run_dataset
    from edgepkd.models import load_model
    from edgepkd.recipe import load_recipe

    _, run = switched_run
    assert main(["export", str(run), "--target", "onnx-fp32", "--model", "ensemble[1..2]", "--json"]) == 0
    path = run / "export" / "onnx-fp32" / "ensemble-1-2.onnx"
    from edgepkd.compress.onnx_export import read_metadata

    sess = ort.InferenceSession(str(path))
    meta = read_metadata(path)
    assert meta["shrinkage"] == 0.5 and meta["members"] == ["ensemble/c1", "ensemble/c2"]
    rd = RunDir(run)
    data = load_run_dataset(rd, load_recipe(rd.recipe_path), None, lambda *a: None)
    x = data.normalize(data.test.x)                                          # (N, C, H, W)
    members = [load_model(rd.weights_path(n))[0] for n in meta["members"]]
    with torch.no_grad():
        want = EnsemblePrefix(members, 0.5)(x).numpy()                       # (N, K)
        plain = EnsemblePrefix(members, 1.0)(x).numpy()
    got = np.concatenate([sess.run(None, {"input": x[i:i + 1].numpy()})[0] for i in range(len(x))])
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    assert np.abs(got - plain).max() > 1e-3, "the export must apply the shrinkage, not the plain sum"


@pytest.mark.slow
def test_resume_mid_corrective_step_is_bit_identical(switched_run, tmp_path, monkeypatch):
    recipe, straight = switched_run
    calls = {"n": 0}
    original = RunDir.save_checkpoint

    def interrupt(self, stage, *args, **kwargs):
        original(self, stage, *args, **kwargs)
        if stage == "ensemble/corrective":
            calls["n"] += 1
            if calls["n"] == 1:   # after the corrective step's first epoch
                raise KeyboardInterrupt

    monkeypatch.setattr(RunDir, "save_checkpoint", interrupt)
    assert distill(recipe, tmp_path / "runs", *SWITCHES) == 130
    run = RunDir(tmp_path / "runs" / "tiny")
    assert "ensemble/e2" in run.state()["stages"] and "ensemble/corrective" not in run.state()["stages"]
    monkeypatch.setattr(RunDir, "save_checkpoint", original)
    assert distill(recipe, tmp_path / "runs", "--resume", *SWITCHES) == 0
    a = json.loads((straight / "metrics.json").read_text())
    b = json.loads(run.metrics_path.read_text())
    assert [(p["name"], p["test_acc"]) for p in a["ensemble_prefixes"]] == \
           [(p["name"], p["test_acc"]) for p in b["ensemble_prefixes"]]
    for name in ("ensemble/e2", "ensemble/c1", "ensemble/c2"):
        wa, _ = load_safetensors(RunDir(straight).weights_path(name))
        wb, _ = load_safetensors(run.weights_path(name))
        assert all(torch.equal(wa[k], wb[k]) for k in wa), f"{name}: resumed weights differ"


@pytest.mark.slow
def test_early_exit_at_theta_one_is_the_full_prefix_and_thresholds_cut_work(switched_run):
    from edgepkd.compress.runtimes import open_model
    from edgepkd.measure import early_exit as ee
    from edgepkd.measure.runner import preprocess

    _, run = switched_run
    assert main(["export", str(run), "--target", "tflite-fp32", "--model", "ensemble-members",
                 "--model", "ensemble[1..2]", "--model", "chain/s1"]) == 0
    folder = run / "export" / "tflite-fp32"
    manifest = json.loads((folder / "manifest.json").read_text())["artifacts"]
    members = [e for e in manifest if "ensemble_member" in e]
    assert [e["model"] for e in members] == ["ensemble/c1", "ensemble/c2"]
    assert all(e["verification"]["passed"] for e in members)
    res = ee.measure(str(run), "tflite-fp32", thetas=(0.0, 0.9, 1.0), repeats=1, log=lambda *a: None)
    assert res["reference"]["model"] == "chain/s1"
    assert (run / "bench" / "early-exit-tflite-fp32.json").is_file()
    by = {r["theta"]: r for r in res["sweep"]}
    assert by[1.0]["mean_members"] == 2 and by[0.0]["mean_members"] == 1   # θ = 0: every image exits at once
    # θ = 1 answers as the exported full prefix does, image by image
    with np.load(run / "bench" / "test-images.npz") as z:
        images, labels = z["images"], z["labels"]
    full = open_model(str(folder / "ensemble-1-2.tflite"))
    x = preprocess(images, members[0]["preprocessing"])
    want = np.array([int(full.logits(full.run(full.prepare(x[i:i + 1])))[0].argmax()) for i in range(len(x))])
    models = [open_model(str(folder / e["file"])) for e in members]
    tr = ee.trace(models, x, members[0]["ensemble_member"]["shrinkage"], repeats=1)
    k = ee.exits(tr, 1.0)
    np.testing.assert_array_equal(tr.pred[np.arange(len(k)), k], want)
    assert by[1.0]["accuracy"] == pytest.approx(100.0 * (want == labels).mean())
    # bench leaves the members out: they are not models on their own
    from edgepkd.measure.bench import resolve
    from edgepkd.measure.devices import load_devices

    names = {a.entry["model"] for a in resolve([str(run)], load_devices().get("host"))}
    assert "ensemble[1..2]" in names and not names & {"ensemble/c1", "ensemble/c2"}


@pytest.mark.slow
def test_early_exit_command_exports_what_is_missing_and_prints_the_sweep(switched_run, tmp_path, capsys,
                                                                         monkeypatch):
    import shutil

    _, src = switched_run
    run = tmp_path / "tiny"
    shutil.copytree(src, run, ignore=shutil.ignore_patterns("export", "bench"))
    assert main(["early-exit", str(run), "--target", "tflite-fp32", "--device", "cortex-m7"]) == 2
    assert "estimated (connect: none)" in capsys.readouterr().err
    assert main(["early-exit", str(run), "--target", "tflite-fp32", "--device", "host", "--thetas", "0,0.9,1",
                 "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "exporting the ensemble's members" in out and "exporting the reference chain/s1" in out
    assert "worst case, all 2 members (no exit)" in out and "reference chain/s1" in out
    res = json.loads((run / "bench" / "early-exit-tflite-fp32.json").read_text())
    assert res["device"] == "host" and res["threads"] == 1 and [r["theta"] for r in res["sweep"]] == [0, 0.9, 1]
    manifest = {e["file"]: e for e in json.loads((run / "export" / "tflite-fp32" / "manifest.json").read_text())
                ["artifacts"]}
    assert [f["sha256"] for f in res["files"]] == [manifest[f["file"]]["sha256"] for f in res["files"]]
    assert res["ram_bytes"] is None or res["ram_bytes"] > 0
    # the chain cascade: the other chain student exported too and timed beside the reference, each row naming
    # the models it loads, cheapest first and the reference last
    assert "exporting chain/s2 to tflite-fp32 for the chain cascade" in out
    if "left out of the chain cascade" not in out:
        assert {tuple(r["stages"]) for r in res["chain_cascade"]} == {("chain/s2", "chain/s1")}
        assert {r["theta"] for r in res["chain_cascade"]} == {0, 0.9, 1}
        by = {r["theta"]: r for r in res["chain_cascade"]}
        assert by[1]["reference_share"] == 1.0 and by[1]["accuracy"] == pytest.approx(res["reference"]["accuracy"])
        assert by[0]["reference_share"] == 0.0 and by[0]["accuracy"] == pytest.approx(
            res["stage_accuracy"]["chain/s2"])
        assert "chain cascade at the reference's accuracy" in out
        assert all(r["ram_bytes"] is None or r["ram_bytes"] > 0 for r in res["chain_cascade"])
    assert all(res["stage_files"][m]["sha256"] == manifest[res["stage_files"][m]["file"]]["sha256"]
               for m in res["stage_files"])
    assert all(r["stages"][-1] == "chain/s1" for r in res["cascade"])
    # --no-chain-cascade (the library's chain=False): measure is told so, whatever the reference default
    from edgepkd import workflow
    from edgepkd.measure import early_exit as ee

    seen = {}
    monkeypatch.setattr(ee, "measure", lambda *a, **kw: seen.update(kw) or {})
    workflow.early_exit(run, "tflite-fp32", chain=False, log=lambda *a: None)
    assert seen["chain"] is False and seen["reference"] == "chain/s1"
    from edgepkd.measure.early_exit import load_result

    assert load_result(run / "bench" / "early-exit-tflite-fp32.json")["members"] == res["members"]


def test_early_exit_does_not_export_again_what_verification_refused_with_the_same_weights(switched_run, tmp_path,
                                                                                         monkeypatch):
    """A chain student whose refusal is recorded under the current key is skipped by export_run itself
    (skip_refused), left out of the chain cascade, and exported once its weights change."""
    import shutil

    from edgepkd import workflow
    from edgepkd.compress import export as export_mod
    from edgepkd.compress.targets import load_targets
    from edgepkd.measure import early_exit as ee
    from edgepkd.rundir import RunDir, load_safetensors, save_safetensors

    _, src = switched_run
    run = tmp_path / "tiny"
    shutil.copytree(src, run, ignore=shutil.ignore_patterns("export", "bench"))
    tgt = load_targets().get("onnx-fp32")
    folder = run / "export" / "onnx-fp32"
    folder.mkdir(parents=True)
    record = {"model": "chain/s2", **export_mod.refusal_key(RunDir(run), ["chain/s2"], tgt), "failures": ["x"]}
    (folder / "manifest.json").write_text(json.dumps({"artifacts": [], "refused": [record]}))
    real, calls, logs = export_mod.export_run, [], []

    def recording(run_path, target, models=None, **kw):
        calls.append((models, kw.get("skip_refused", False)))
        return real(run_path, target, models=models, **kw)

    monkeypatch.setattr(export_mod, "export_run", recording)
    monkeypatch.setattr(ee, "measure", lambda *a, **kw: {})
    workflow.early_exit(run, "onnx-fp32", log=logs.append)

    def manifest():
        return json.loads((folder / "manifest.json").read_text())

    assert (["ensemble-members"], False) in calls and (["chain/s1"], True) in calls and (["chain/s2"], True) in calls
    assert "chain/s2" not in {e["model"] for e in manifest()["artifacts"]} >= {"chain/s1"}
    assert [r["model"] for r in manifest()["refused"]] == ["chain/s2"]
    assert any("skipped: refused before" in line and "(x)" in line for line in logs), logs
    assert any("chain/s2 failed verification for onnx-fp32: left out of the chain cascade" in line
               for line in logs), logs
    # retrained (other weights): exported again, and the record goes
    weights = run / "weights" / "chain-s2.safetensors"
    tensors, meta = load_safetensors(weights)
    name = next(k for k, v in tensors.items() if v.is_floating_point())
    tensors[name] = tensors[name] * 1.001
    save_safetensors(weights, tensors, meta)
    calls.clear()
    workflow.early_exit(run, "onnx-fp32", log=logs.append)
    assert calls == [(["chain/s2"], True)], calls
    assert "chain/s2" in {e["model"] for e in manifest()["artifacts"]} and "refused" not in manifest()


def test_choose_theta_meets_the_mean_budget_or_the_accuracy():
    from edgepkd.measure.early_exit import choose

    rows = [{"theta": 0.5, "accuracy": 97.0, "mean_ms": 0.1}, {"theta": 0.9, "accuracy": 98.5, "mean_ms": 0.2},
            {"theta": 1.0, "accuracy": 98.6, "mean_ms": 0.5}]
    assert choose(rows, mean_ms=0.25)["theta"] == 0.9
    assert choose(rows, mean_ms=0.05) is None
    assert choose(rows, min_accuracy=98.0)["theta"] == 0.9
    assert choose(rows)["theta"] == 1.0


def test_cascade_runs_the_reference_only_on_images_no_early_prefix_is_sure_of():
    import numpy as np

    from edgepkd.measure import early_exit as ee

    # 3 images, 3 members (1 ms each), a reference of 5 ms; labels 0, 1, 2
    tr = ee.Trace(step_s=np.full((3, 3), 1e-3), pred=np.array([[0, 0, 0], [2, 1, 1], [0, 0, 0]]),
                  conf=np.array([[0.99, 0.99, 0.99], [0.5, 0.95, 0.99], [0.6, 0.7, 0.8]]),
                  ref_s=np.full(3, 5e-3), ref_pred=np.array([0, 1, 2]))
    labels = np.array([0, 1, 2])
    rows = {(r["after"], r["theta"]): r for r in ee.cascade_sweep(tr, labels, thetas=(0.9, 1.0))}
    assert set(rows) == {(1, 0.9), (1, 1.0), (2, 0.9), (2, 1.0)}          # K < M: the last stage is the reference
    # K = 2, θ = 0.9: image 0 exits after member 1 (1 ms), image 1 after member 2 (2 ms), image 2 runs the
    # reference after both (7 ms) and takes its answer
    r = rows[2, 0.9]
    assert r["accuracy"] == pytest.approx(100.0) and r["mean_ms"] == pytest.approx(10 / 3)
    assert r["max_ms"] == pytest.approx(7.0) and r["reference_share"] == pytest.approx(1 / 3)
    # K = 1: image 1 is not sure after member 1 and goes to the reference too
    assert rows[1, 0.9]["mean_ms"] == pytest.approx((1 + 6 + 6) / 3) and rows[1, 0.9]["accuracy"] == 100.0
    # θ = 1: the reference's answer on every image, K members late
    assert rows[1, 1.0]["mean_ms"] == pytest.approx(6.0) and rows[1, 1.0]["reference_share"] == 1.0
    best = ee.choose(list(rows.values()), min_accuracy=100.0)
    assert (best["after"], best["theta"]) == (2, 0.9)


@pytest.mark.parametrize("k", [1, 10, 64, 65, 1000])
def test_confidence_is_the_maximum_softmax_probability_on_both_paths(k):
    from edgepkd.measure.early_exit import confidence

    z = torch.randn(k, generator=torch.Generator().manual_seed(k), dtype=torch.float64) * 8
    want = float(torch.softmax(z, 0).max())
    assert confidence(z.float().numpy()) == pytest.approx(float(torch.softmax(z.float().double(), 0).max()), rel=1e-12)
    assert confidence(z.numpy()) == pytest.approx(want, rel=1e-12)
    assert confidence(list(z.tolist())) == pytest.approx(want, rel=1e-12)


def test_chain_cascade_runs_the_cheapest_stage_first_and_the_reference_only_when_none_is_sure():
    import numpy as np

    from edgepkd.measure import early_exit as ee

    # 3 images; stages "a" (2 ms) and "b" (1 ms, so it runs first); the reference 5 ms; labels 0, 1, 2
    tr = ee.Trace(step_s=np.full((3, 1), 1e-3), pred=np.zeros((3, 1), dtype=int), conf=np.ones((3, 1)),
                  ref_s=np.full(3, 5e-3), ref_pred=np.array([0, 1, 2]),
                  stage_s=np.array([[2e-3, 1e-3]] * 3), stage_pred=np.array([[0, 9], [1, 1], [9, 9]]),
                  stage_conf=np.array([[0.99, 0.5], [0.5, 0.95], [0.6, 0.7]]))
    labels = np.array([0, 1, 2])
    rows = {(tuple(r["stages"]), r["theta"]): r
            for r in ee.chain_cascade_sweep(tr, labels, ["a", "b"], "ref", thetas=(0.9, 1.0))}
    assert set(rows) == {(s, t) for s in [("a", "ref"), ("b", "ref"), ("b", "a", "ref")] for t in (0.9, 1.0)}
    # b then a: image 0 is unsure after b (1 ms) and exits at a (3 ms), image 1 exits at b (1 ms), image 2 runs
    # both and the reference (8 ms) and takes the reference's answer
    r = rows[("b", "a", "ref"), 0.9]
    assert r["accuracy"] == pytest.approx(100.0) and r["mean_ms"] == pytest.approx(12 / 3)
    assert r["reference_share"] == pytest.approx(1 / 3) and r["worst"]["max"] == pytest.approx(8.0)
    # b alone: image 0 goes on to the reference (6 ms) and is right there; b's wrong answer on image 2 never counts
    r = rows[("b", "ref"), 0.9]
    assert r["accuracy"] == 100.0 and r["mean_ms"] == pytest.approx((6 + 1 + 6) / 3)
    # a alone: image 1 is unsure (0.5) and reaches the reference
    assert rows[("a", "ref"), 0.9]["mean_ms"] == pytest.approx((2 + 7 + 7) / 3)
    # θ = 1: every image reaches the reference, after every stage
    assert rows[("b", "a", "ref"), 1.0]["reference_share"] == 1.0
    assert rows[("b", "a", "ref"), 1.0]["mean_ms"] == pytest.approx(8.0)
    best = ee.choose(list(rows.values()), min_accuracy=100.0)
    assert (tuple(best["stages"]), best["theta"]) == (("b", "a", "ref"), 0.9)


def test_early_exit_members_share_one_prepared_input_only_when_their_inputs_agree():
    import numpy as np

    from edgepkd.measure import early_exit as ee

    class Fake:  # a runner model: io / prepare / run / logits, counting prepare calls
        def __init__(self, scale, out):
            self.scale, self.out, self.prepared = scale, np.asarray([out], dtype=np.float32), 0

        def io(self):
            return {"input": {"shape": [1, 1, 2, 2], "dtype": "int8", "quantization": {"scale": self.scale,
                                                                                        "zero_point": 0}}}

        def prepare(self, x):
            self.prepared += 1
            return np.round(x / self.scale).astype(np.int8)

        def run(self, prepared):
            return self.out + 0 * prepared.sum()

        def logits(self, raw):
            return raw

    x = np.zeros((3, 1, 2, 2), dtype=np.float32)
    same = [Fake(0.5, [1.0, 0.0]), Fake(0.5, [0.0, 2.0])]
    tr = ee.trace(same, x, shrinkage=0.5, repeats=1)
    assert [m.prepared for m in same] == [3, 0]                     # quantized once per image
    np.testing.assert_array_equal(tr.pred[:, 1], [1, 1, 1])        # 0.5 * [1, 0] + [0, 2]
    differ = [Fake(0.5, [1.0, 0.0]), Fake(0.25, [0.0, 2.0])]
    ee.trace(differ, x, shrinkage=0.5, repeats=1)
    assert [m.prepared for m in differ] == [3, 3]                   # each its own quantization


def test_exit_points_give_the_segments_between_them():
    from edgepkd.errors import ConfigError
    from edgepkd.measure import early_exit as ee

    assert ee.segments([3, 5, 7], 7) == [(1, 3), (4, 5), (6, 7)]
    assert ee.segments([2], 4) == [(1, 2), (3, 4)]                        # the last member always ends it
    assert ee.segments([1, 2, 3], 3) == [(1, 1), (2, 2), (3, 3)]           # every member: the default's steps
    assert [ee.segment_name(a, b, ["e1", "e2", "e3"]) for a, b in ee.segments([1, 3], 3)] == ["e1", "ensemble[2..3]"]
    for bad in ([0, 3], [4], [2, 2], []):
        with pytest.raises(ConfigError, match="--exits"):
            ee.segments(bad, 3)


@pytest.fixture(scope="module")
def three_member_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("three")
    recipe = {**TINY_RECIPE, "students": {"sizes": [{"d_model": 16, "depth": 1, "d_state": 4, "patch_size": 2},
                                                    {"d_model": 12, "depth": 1, "d_state": 2, "patch_size": 2},
                                                    {"d_model": 8, "depth": 1, "d_state": 2, "patch_size": 2}]}}
    path = root / "three.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    assert distill(path, root / "runs", "--set", "distill.ensemble_shrinkage=0.5") == 0
    return root / "runs" / "tiny"


@pytest.mark.slow
def test_early_exit_with_exit_points_runs_segments_and_answers_as_the_full_prefix(three_member_run, capsys):
    from edgepkd.compress.runtimes import open_model
    from edgepkd.measure.runner import preprocess

    run = three_member_run
    assert main(["export", str(run), "--target", "tflite-fp32", "--model", "ensemble[3..5]"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "1 <= a <= b <= 3" in err, err
    assert main(["early-exit", str(run), "--target", "tflite-fp32", "--exits", "0,3"]) == 2
    assert "--exits" in capsys.readouterr().err
    assert main(["early-exit", str(run), "--target", "tflite-fp32", "--exits", "1", "--thetas", "0,0.9,1",
                 "--repeats", "1", "--no-chain-cascade"]) == 0
    out = capsys.readouterr().out
    assert "exporting the segments ensemble[2..3]" in out and "exits after 1, 3" in out
    assert "worst case, all 2 segments (3 members)" in out
    res = json.loads((run / "bench" / "early-exit-tflite-fp32.json").read_text())
    m = json.loads((run / "metrics.json").read_text())["ensemble_prefixes"][-1]
    assert res["members"] == [m["members"][0], "ensemble[2..3]"] and res["exits"] == [1, 3]
    assert res["ensemble"] == m["members"]
    folder = run / "export" / "tflite-fp32"
    manifest = {e["file"]: e for e in json.loads((folder / "manifest.json").read_text())["artifacts"]}
    seg = manifest["ensemble-2-3.tflite"]
    assert seg["members"] == m["members"][1:] and seg["ensemble_segment"] == {"first": 2, "last": 3, "of": 3}
    assert seg["verification"]["passed"] and seg["verification"]["max_abs_diff"] <= 1e-4
    # θ = 1: the answer of the exported full prefix ensemble[1..3], image by image
    assert main(["export", str(run), "--target", "tflite-fp32", "--model", "ensemble[1..3]"]) == 0
    with np.load(run / "bench" / "test-images.npz") as z:
        images, labels = z["images"], z["labels"]
    full = open_model(str(folder / "ensemble-1-3.tflite"))
    x = preprocess(images, seg["preprocessing"])
    want = np.array([int(full.logits(full.run(full.prepare(x[i:i + 1])))[0].argmax()) for i in range(len(x))])
    by = {r["theta"]: r for r in res["sweep"]}
    assert by[1.0]["accuracy"] == pytest.approx(100.0 * (want == labels).mean())
    assert by[1.0]["mean_members"] == 2 and by[0.0]["mean_members"] == 1
    # exit points 2, 3: prefix ensemble[1..2] (an ordinary prefix export) is the first segment
    assert main(["early-exit", str(run), "--target", "tflite-fp32", "--exits", "2,3", "--thetas", "1",
                 "--repeats", "1", "--no-chain-cascade"]) == 0
    res2 = json.loads((run / "bench" / "early-exit-tflite-fp32.json").read_text())
    assert res2["members"] == ["ensemble[1..2]", m["members"][2]]
    assert res2["sweep"][0]["accuracy"] == pytest.approx(by[1.0]["accuracy"])


def test_early_exit_default_thetas_match_the_cli_help():
    """The sweep's default θ grid reaches below 1 in steps of 10x (issue #15) and --help states it as it is."""
    from click.testing import CliRunner

    from edgepkd.cli import cli
    from edgepkd.measure.early_exit import DEFAULT_THETAS

    assert DEFAULT_THETAS[-1] == 1.0 and 0.999999 in DEFAULT_THETAS and list(DEFAULT_THETAS) == sorted(DEFAULT_THETAS)
    text = "".join(CliRunner().invoke(cli, ["early-exit", "--help"]).output.split())  # click wraps inside the list
    assert "(default:" + ",".join(format(t, "g") for t in DEFAULT_THETAS) + ")" in text

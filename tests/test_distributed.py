"""Data-parallel training: 2 CPU processes (gloo) against one process."""

import json
import os
import textwrap

import pytest
import torch
import torch.distributed as torch_dist
import yaml

from conftest import TINY_RECIPE, run_cli
from edgepkd.cli import main
from edgepkd.data import Dataset, Split
from edgepkd.distill.distributed import DistContext
from edgepkd.distill.trainer import StageTargets, fit, init_seeded, predict, predict_sharded
from edgepkd.errors import ConfigError
from edgepkd.recipe import TrainConfig
from edgepkd.rundir import RunDir, load_safetensors

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (torch_dist.is_available() and torch_dist.is_gloo_available()),
                       reason="this torch build has no torch.distributed with the gloo backend"),
]

# 8 distillation epochs: the tiny recipe's students have converged, so their accuracy is not a coin toss
EPOCHS = ("--set", "distill.train.epochs=8")
STAGES = ["teacher", "chain/s1", "chain/s2", "ensemble/e1", "ensemble/e2"]


# ------------------------------------------------------------------------ the collectives, in 2 processes
def _toy_data() -> Dataset:
    g = torch.Generator().manual_seed(0)
    y = torch.arange(42) % 3
    x = (torch.rand(42, 1, 4, 4, generator=g) * 120 + y.view(-1, 1, 1, 1) * 60).to(torch.uint8)
    return Dataset("toy", Split(x[:30], y[:30]), Split(x[30:], y[30:]), Split(x[:0], y[:0]),
                   ["a", "b", "c"], [0.5], [0.25])


def _toy_model() -> torch.nn.Module:  # no BatchNorm, no dropout: DDP must then equal one process
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


TOY_TRAIN = TrainConfig(epochs=3, batch_size=10, lr=0.05)


def _worker(rank: int, world: int, init_file: str, out: str) -> None:
    torch.set_num_threads(1)
    torch_dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    dist = DistContext(rank=rank, world_size=world, local_rank=rank, local_world_size=world)
    try:
        data = _toy_data()
        rows = []
        probe = init_seeded(lambda: torch.nn.Linear(16, 3), 5)  # the same frozen model on every rank
        table = predict_sharded(lambda x: (rows.append(len(x)), probe(x.flatten(1)))[1], data, data.train.x, dist)
        model = init_seeded(_toy_model, 7)
        info = fit(model, data, TOY_TRAIN, stage="toy", seed=3, augment_mode="none", targets=StageTargets(),
                   run=None, dist=dist)
        def fails_on_rank_1():
            if rank == 1:
                raise ConfigError("bad input seen by rank 1")

        try:
            dist.agree(fails_on_rank_1)
            agreed = "no error"
        except SystemExit as e:
            agreed = f"exit {e.code}"
        except ConfigError as e:
            agreed = f"{e.exit_code}: {e}"
        torch.save({"rows": sum(rows), "table": table, "probe": probe.state_dict(), "weights": model.state_dict(),
                    "history": info["history"], "agreed": agreed}, f"{out}/rank{rank}.pt")
    finally:
        torch_dist.destroy_process_group()


def test_ddp_training_equals_one_process_and_logits_are_computed_once(tmp_path):
    torch.multiprocessing.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    data = _toy_data()

    # each rank ran the frozen model on its own 15 of the 30 rows; both hold the whole table
    assert r0["rows"] == r1["rows"] == 15
    probe = torch.nn.Linear(16, 3)
    probe.load_state_dict(r0["probe"])
    full = predict(lambda x: probe(x.flatten(1)), data, data.train.x)
    assert torch.equal(r0["table"], r1["table"])
    print("max |sharded - full| logits", (r0["table"] - full).abs().max().item())
    assert torch.allclose(r0["table"], full, atol=1e-6)

    # DDP keeps both ranks identical; same global batches + averaged gradients = one process's training
    # (up to float summation order: the model has no BatchNorm or dropout, the only other differences)
    assert all(torch.equal(r0["weights"][k], r1["weights"][k]) for k in r0["weights"])
    model = init_seeded(_toy_model, 7)
    single = fit(model, data, TOY_TRAIN, stage="toy", seed=3, augment_mode="none", targets=StageTargets(),
                 run=None)
    diff = max((r0["weights"][k] - v).abs().max().item() for k, v in model.state_dict().items())
    print("max |DDP - single| weight", diff)
    assert diff < 1e-5
    for h1, h2 in zip(single["history"], r0["history"]):
        assert h1["loss"] == pytest.approx(h2["loss"], rel=1e-5) and h1["train_acc"] == h2["train_acc"]
        assert h1["val_acc"] == h2["val_acc"]
    assert len(r0["history"]) == len(single["history"]) == TOY_TRAIN.epochs

    # an error on one rank stops every rank; rank 0 reports it, once, naming the rank
    assert r0["agreed"] == "2: rank 1 of 2: bad input seen by rank 1"
    assert r1["agreed"] == "exit 2"


def test_batch_size_must_split_over_processes():
    assert DistContext(world_size=4).local_batch(64) == 16
    with pytest.raises(ConfigError, match="distill.train.batch_size: 30 is not divisible by the 4 processes"):
        DistContext(world_size=4).local_batch(30, "distill.train.batch_size")


# ------------------------------------------------------------------------ the command, 2 processes
@pytest.fixture(scope="module")
def recipe_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("recipe") / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY_RECIPE, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def ddp_run(recipe_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    res = run_cli("distill", str(recipe_file), "--out", str(out), "--quiet", "--json", "--nproc", "2", *EPOCHS)
    return out, res


def test_two_processes_reach_the_accuracy_of_one(recipe_file, ddp_run, tmp_path, capsys):
    out, res = ddp_run
    assert res.returncode == 0, res.stderr
    assert [p.name for p in out.iterdir()] == ["tiny"], "one run directory"
    run = RunDir(out / "tiny")
    for name in ("recipe.yaml", "state.json", "metrics.json", "report.md", "accuracy_vs_mflops.png"):
        assert (run.path / name).is_file(), name
    assert not list((run.path / "checkpoints").glob("*")), "finished stages leave no checkpoints"
    assert not list(run.path.rglob("*.tmp")), "a half-written file: more than one rank wrote"
    two = json.loads(res.stdout)  # rank 0 alone prints: stdout is one JSON document
    assert two["distributed"] == {"world_size": 2, "backend": "gloo"}
    assert json.loads(run.metrics_path.read_text())["models"] == two["models"]

    assert main(["distill", str(recipe_file), "--out", str(tmp_path), "--quiet", "--json", *EPOCHS]) == 0
    one = json.loads(capsys.readouterr().out)
    assert one["distributed"] == {"world_size": 1, "backend": None}
    # Tolerance: 3 of the 60 test images per model, 1 on average. Both runs take the same global batches (each
    # process half of each) with the same schedule, but BatchNorm statistics are per process, dropout is drawn
    # per rank and float sums run in another order, so borderline test images can flip. Measured on seeds 1-6:
    # at most 2 images apart (0.95 on average), while another seed moves a student by up to 40 points.
    image = 100.0 / one["dataset"]["test"]
    diffs = []
    for a, b in zip(one["models"] + one["ensemble_prefixes"], two["models"] + two["ensemble_prefixes"]):
        print(f"{a['name']:<16} 1 process {a['test_acc']:6.2f}  2 processes {b['test_acc']:6.2f}")
        assert a["name"] == b["name"]
        diffs.append(abs(a["test_acc"] - b["test_acc"]))
        assert diffs[-1] <= 3 * image + 1e-4, a["name"]  # accuracies are float32: 1e-4 of slack
    assert sum(diffs) / len(diffs) <= image + 1e-4
    steps = {s: len(i["history"]) for s, i in RunDir(tmp_path / "tiny").state()["stages"].items()}
    assert {s: len(i["history"]) for s, i in run.state()["stages"].items()} == steps
    # the weights carry the plain module's names (not DDP's 'module.'): they rebuild and re-evaluate
    tensors, _ = load_safetensors(run.weights_path("chain/s1"))
    assert not any(k.startswith("module.") for k in tensors)
    assert main(["evaluate", str(run.path)]) == 0


# Injected into the workers through PYTHONPATH: rank 1 fails at the start of chain/s1's second epoch.
FAIL_ON_RANK_1 = textwrap.dedent('''
    import os
    if os.environ.get("RANK") == "1":
        from edgepkd.distill import trainer
        _epoch = trainer._epoch
        def _failing(*args, **kwargs):
            if kwargs["stage"] == "chain/s1" and kwargs["epoch"] == 1:
                raise RuntimeError("injected failure")
            return _epoch(*args, **kwargs)
        trainer._epoch = _failing
''')


def test_a_failing_rank_ends_the_run_and_it_resumes(recipe_file, ddp_run, tmp_path):
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(FAIL_ON_RANK_1)
    pythonpath = os.pathsep.join(p for p in (str(hook), os.environ.get("PYTHONPATH")) if p)
    args = ("distill", str(recipe_file), "--out", str(tmp_path / "runs"), "--quiet", "--nproc", "2", *EPOCHS)
    res = run_cli(*args, env={"PYTHONPATH": pythonpath})
    print(res.stderr)
    assert res.returncode == 1
    assert "Traceback" not in res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("edgepkd: error:")]
    assert errors and errors[0] == ("edgepkd: error: rank 1 of 2 failed: RuntimeError: injected failure; the last "
                                    "finished epoch is checkpointed: rerun the same command with --resume")
    run = RunDir(tmp_path / "runs" / "tiny")
    assert set(run.state()["stages"]) == {"teacher"}
    _, meta = load_safetensors(run.checkpoint_path("chain/s1"))
    assert meta["epoch"] == 1

    res = run_cli(*args, "--resume")
    assert res.returncode == 0, res.stderr
    # every rank resumed from the same checkpoint: the weights are those of the uninterrupted 2-process run
    straight = RunDir(ddp_run[0] / "tiny")
    for stage in STAGES:
        a, _ = load_safetensors(straight.weights_path(stage))
        b, _ = load_safetensors(run.weights_path(stage))
        assert all(torch.equal(a[k], b[k]) for k in a), stage


def test_nproc_is_dropped_from_the_relaunched_command():
    from edgepkd.distill.distributed import strip_nproc

    assert strip_nproc(["distill", "r.yaml", "--nproc", "2", "--quiet"]) == ["distill", "r.yaml", "--quiet"]
    assert strip_nproc(["distill", "--nproc=4", "r.yaml", "--npro", "3"]) == ["distill", "r.yaml"]
    assert strip_nproc(["distill", "r.yaml", "--name", "n", "--set", "a=1"]) == ["distill", "r.yaml", "--name", "n",
                                                                                   "--set", "a=1"]

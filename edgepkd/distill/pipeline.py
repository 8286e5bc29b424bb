"""Progressive distillation over a whole recipe: teacher -> students, as a chain and/or an ensemble.

chain     teacher -> S1 -> S2 -> ...: each student is distilled from its predecessor (or from the teacher,
          ``distill.chain_source: teacher``), so every step bridges a smaller capacity gap.
ensemble  students trained one after another as weak learners: student k learns so that the running sum of
          logits of students 1..k matches the teacher, i.e. what the ensemble so far still misses; samples
          where that ensemble is furthest from the teacher (KL) weigh more. Every prefix 1..k is an anytime
          model whose logits are the sum of its members' logits.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

import edgepkd
from edgepkd.config import to_dict
from edgepkd.data import Dataset
from edgepkd.distill.trainer import (DistContext, Reporter, StageTargets, accuracy, ensemble_predictor, fit,
                                     init_seeded, predict, predict_sharded, stage_seed)
from edgepkd.errors import ConfigError, first_line
from edgepkd.models import STUDENT_ARCH, build_model, build_teacher, set_scan_backend
from edgepkd.models.ensemble import Corrective, combine
from edgepkd.models.flops import FlopReport, count_flops
from edgepkd.recipe import Recipe
from edgepkd.rundir import RunDir, load_safetensors, save_safetensors


@dataclass
class Member:
    stage: str                   # "teacher", "chain/s1", "ensemble/e2", ...
    role: str                    # teacher | chain | ensemble
    arch: str                    # a registered model: a teacher's name, or STUDENT_ARCH
    spec: dict                   # builder arguments
    model: nn.Module
    flops: FlopReport
    info: dict = field(default_factory=dict)   # train time, val accuracy, history


# ------------------------------------------------------------------------------------------ students plan
LatencyFn = Callable[[list[dict]], list[float]]   # student specs -> p50 ms each on a device (random weights)


def plan_students(recipe: Recipe, input_shape: tuple[int, int, int], num_classes: int,
                  latency: LatencyFn | None = None) -> list[tuple[dict, FlopReport]]:
    """Resolve ``recipe.students`` to concrete specs with their FLOPs, largest first, strictly decreasing.
    ``latency`` times candidates on a device (``progression.by: latency``; edgepkd.measure.latency_table
    provides one): distill does not import measure, the caller hands it in."""
    c, h, _ = input_shape

    def measure(spec: dict) -> FlopReport:
        return count_flops(build_model(STUDENT_ARCH, spec, num_classes, c, h), input_shape)

    if recipe.students.sizes is not None:
        specs = [to_dict(s) for s in recipe.students.sizes]
        for i, spec in enumerate(specs):
            if h % spec["patch_size"]:
                raise ConfigError(f"students.sizes.{i}.patch_size: {spec['patch_size']} does not divide the "
                                  f"image size {h} of dataset '{recipe.data.dataset}'")
        planned = [(spec, measure(spec)) for spec in specs]
        for i in range(1, len(planned)):
            (_, a), (_, b) = planned[i - 1], planned[i]
            if not (b.flops < a.flops and b.macs < a.macs):
                raise ConfigError(f"students.sizes.{i}: {b.mflops:.3f} MFLOPs / {b.macs} MACs is not smaller than "
                                  f"student {i - 1} ({a.mflops:.3f} MFLOPs / {a.macs} MACs); list students "
                                  "largest first, each strictly smaller")
        return planned
    return _progression(recipe, input_shape, num_classes, measure, latency)


def _progression(recipe: Recipe, input_shape, num_classes, measure, latency: LatencyFn | None = None
                 ) -> list[tuple[dict, FlopReport]]:
    """Each next student: a candidate (d_model, depth, d_state, patch size), no wider or deeper than the previous
    one and with fewer FLOPs, whose FLOPs (``by: flops``) or measured p50 (``by: latency``) are closest in log
    ratio to the ratio times the previous student's; ties go to the wider. By latency, only the
    ``max_measured`` candidates nearest in FLOPs to the previous student's FLOPs x latency_ratio are timed per
    step (each timing is an export and a run on the device; the latency table caches them)."""
    prog = recipe.students.progression
    start = to_dict(prog.start)
    patches = prog.patch_sizes or [start["patch_size"]]
    for p in dict.fromkeys([start["patch_size"], *patches]):
        if input_shape[1] % p:
            raise ConfigError(f"students.progression: patch_size {p} does not divide the image size {input_shape[1]}")
    if prog.by == "latency" and latency is None:
        raise ConfigError("students.progression.by: latency needs a device to time candidates on: pass "
                          "edgepkd distill --device NAME, or set students.progression.device")
    step = 4 if start["d_model"] >= 8 else 1
    d_models = sorted({d for d in range(step, start["d_model"] + 1, step) if d >= prog.min_d_model}
                      | {max(prog.min_d_model, 1)})
    d_states = sorted({max(1, start["d_state"] // 2 ** k) for k in range(3)})
    candidates = [{**start, "d_model": d, "depth": depth, "d_state": n, "patch_size": p, "dt_rank": None}
                  for d in d_models for depth in range(1, start["depth"] + 1) for n in d_states
                  for p in dict.fromkeys(patches)
                  if start.get("heads") is None or (start["expand"] * d) % start["heads"] == 0]  # heads divide d_inner
    scored = [(spec, measure(spec)) for spec in candidates]
    planned = [(start, measure(start))]
    lat = latency([start])[0] if prog.by == "latency" else None
    while len(planned) < prog.count:
        prev_spec, prev = planned[-1]
        # a family that only shrinks: no student wider or deeper than the one before it, and fewer FLOPs
        smaller = [(s, f) for s, f in scored if f.flops < prev.flops and f.macs < prev.macs
                   and s["d_model"] <= prev_spec["d_model"] and s["depth"] <= prev_spec["depth"]]
        if prog.by == "latency":
            near = sorted(smaller, key=lambda sf: abs(math.log(sf[1].flops / (prev.flops * prog.latency_ratio))))
            near = near[:prog.max_measured]
            times = latency([s for s, _ in near]) if near else []
            smaller = [(s, f) for (s, f), t in zip(near, times) if t < lat]
            target = lat * prog.latency_ratio
            key_of = {id(s): t for (s, _), t in zip(near, times)}
            rank = lambda sf: (abs(math.log(key_of[id(sf[0])] / target)), -sf[0]["d_model"])  # noqa: E731
        else:
            target = prev.flops * prog.flops_ratio
            rank = lambda sf: (abs(math.log(sf[1].flops / target)), -sf[0]["d_model"])  # noqa: E731
        if not smaller:
            what = f"{prev.mflops:.3f} MFLOPs" + (f" and {lat:.4f} ms" if lat is not None else "")
            raise ConfigError(f"students.progression.count: only {len(planned)} students fit below {what} "
                              f"with min_d_model {prog.min_d_model}; lower count or the ratio, or start larger")
        planned.append(min(smaller, key=rank))
        if prog.by == "latency":
            lat = key_of[id(planned[-1][0])]
    return planned


def check_recipe(recipe: Recipe, data: Dataset, latency: LatencyFn | None = None) -> list[tuple[dict, FlopReport]]:
    """Everything that needs the data's shape: the teacher builds, the students plan. Returns the plan."""
    from edgepkd.models import TEACHERS

    c, h, w = data.input_shape
    if h != w:
        raise ConfigError(f"data.image_size: images of '{recipe.data.dataset}' are {h}x{w}; students need square "
                          "images: set data.image_size to resize them")
    try:
        TEACHERS.get(recipe.teacher.arch)
    except ConfigError as e:
        raise ConfigError(f"teacher.arch: {e}") from None
    build_teacher(recipe.teacher.arch, dict(recipe.teacher.args), data.num_classes, c, h)
    for i, b in enumerate(recipe.baselines):
        try:
            build_teacher(b.arch, dict(b.args), data.num_classes, c, h)
        except ConfigError as e:
            raise ConfigError(f"baselines.{i}: {e}") from None
    if recipe.teacher.checkpoint is not None and not Path(recipe.teacher.checkpoint).is_file():
        raise ConfigError(f"teacher.checkpoint: {recipe.teacher.checkpoint}: no such file")
    return plan_students(recipe, data.input_shape, data.num_classes, latency)


# ------------------------------------------------------------------------------------------ the run
def baseline_stage(recipe: Recipe, i: int) -> str:
    """'baseline/resnet8', or 'baseline/resnet8-2' when the recipe lists that arch more than once."""
    arch = recipe.baselines[i].arch
    n = sum(b.arch == arch for b in recipe.baselines[:i])
    return f"baseline/{arch}" + (f"-{n + 1}" if n else "")


def _weights_meta(member: Member, recipe: Recipe, data: Dataset) -> dict:
    return {"edgepkd_version": edgepkd.__version__, "stage": member.stage, "role": member.role,
            "arch": member.arch, "spec": member.spec, "num_classes": data.num_classes,
            "classes": data.classes, "preprocessing": data.preprocessing(), "recipe": recipe.name,
            "dataset": recipe.data.dataset, "macs": member.flops.macs, "flops": member.flops.flops,
            "params": member.flops.params}


class _LogitSource:
    """Frozen logits of a sum of models: a table over the training set, computed once when caching is allowed
    (under DDP each rank computes its block of rows and they are gathered), else the models run on each batch.
    ``plus`` adds one more model reusing the table, so an ensemble's k-th member costs one pass, not k."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], table: torch.Tensor | None):
        self.fn, self.table = fn, table                                     # table: (N_train, K) or None

    @classmethod
    def of(cls, models: list[nn.Module], data: Dataset, cache: bool, dist: DistContext) -> "_LogitSource":
        fn = ensemble_predictor(models)
        return cls(fn, predict_sharded(fn, data, data.train.x, dist) if cache else None)

    def plus(self, model: nn.Module, data: Dataset, dist: DistContext, shrinkage: float = 1.0) -> "_LogitSource":
        """The next prefix: these logits shrunk, plus ``model``'s, in the order ``combine`` uses (bit-identical
        to evaluation and export)."""
        one = _LogitSource.of([model], data, self.table is not None, dist)
        table = combine([self.table, one.table], shrinkage) if self.table is not None else None
        before, after = self.fn, one.fn                                     # not self / one: their tables go
        return _LogitSource(lambda x: combine([before(x), after(x)], shrinkage), table)

    def scaled(self, s: float) -> "_LogitSource":
        """These logits times ``s`` (the frozen prefix as the next member sees it); itself when s == 1."""
        if s == 1.0:
            return self
        fn = self.fn
        return _LogitSource(lambda x: fn(x) * s, self.table * s if self.table is not None else None)

    def __call__(self, idx: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
        return self.table[idx].to(x.device) if self.table is not None and idx is not None else self.fn(x)


class Distiller:
    """Runs one recipe into one run directory; every finished stage is kept, so ``--resume`` skips it."""

    def __init__(self, recipe: Recipe, data: Dataset, run: RunDir, reporter: Reporter | None = None,
                 dist: DistContext | None = None):
        self.recipe, self.data, self.run = recipe, data, run
        self.reporter = reporter
        self.dist = dist or DistContext()
        self.cache = recipe.distill.cache_teacher and self._augment(recipe.distill.train) == "none"

    def _augment(self, train_cfg) -> str:
        return train_cfg.augment if train_cfg.augment is not None else self.recipe.data.augment

    def _build(self, arch: str, spec: dict, seed_stage: str) -> nn.Module:
        c, h, _ = self.data.input_shape
        k = self.data.num_classes
        model = init_seeded(lambda: build_model(arch, spec, k, c, h), stage_seed(self.recipe.seed, seed_stage))
        set_scan_backend(model, self.recipe.scan_backend)   # its SSM branches (a teacher has none)
        return model.to(self.dist.device)

    def _stage(self, stage: str, role: str, arch: str, spec: dict, targets: StageTargets | None,
               train_cfg) -> Member:
        """Train (or load, when finished earlier) one model and keep its weights in the run directory."""
        model = self._build(arch, spec, stage)
        member = Member(stage, role, arch, spec, model, count_flops(model, self.data.input_shape))
        done = self.run.state()["stages"].get(stage)
        path = self.run.weights_path(stage)
        if done is not None and path.exists():
            model.load_state_dict({k: v.to(self.dist.device) for k, v in load_safetensors(path)[0].items()})
            member.info = done
        else:
            member.info = fit(model, self.data, train_cfg, stage=stage, seed=self.recipe.seed,
                              augment_mode=self._augment(train_cfg), targets=targets, run=self.run,
                              reporter=self.reporter, dist=self.dist)
            if self.dist.is_main:
                save_safetensors(path, model.state_dict(), _weights_meta(member, self.recipe, self.data))
                self.run.finish_stage(stage, member.info)
        model.eval()
        return member

    def teacher(self) -> Member:
        t = self.recipe.teacher
        if t.checkpoint is None:
            return self._stage("teacher", "teacher", t.arch, dict(t.args), StageTargets(alpha=1.0), t.train)
        model = self._build(t.arch, dict(t.args), "teacher")
        state, _ = load_safetensors(Path(t.checkpoint))
        try:
            model.load_state_dict({k: v.to(self.dist.device) for k, v in state.items()})
        except RuntimeError as e:
            raise ConfigError(f"teacher.checkpoint: {t.checkpoint} does not fit teacher '{t.arch}' "
                              f"{t.args}: {first_line(e)}") from None
        model.eval()
        return Member("teacher", "teacher", t.arch, dict(t.args), model,
                      count_flops(model, self.data.input_shape), {"loaded_from": t.checkpoint, "train_time_s": 0.0})

    def run_all(self, plan: list[tuple[dict, FlopReport]] | None = None) -> list[Member]:
        """Train every stage; ``plan`` is ``check_recipe``'s result when the caller already has it."""
        d = self.recipe.distill
        plan = plan if plan is not None else plan_students(self.recipe, self.data.input_shape, self.data.num_classes)
        specs = [s for s, _ in plan]
        epochs = self.recipe.students.epochs or [d.train.epochs] * len(specs)
        train = [dataclasses.replace(d.train, epochs=e) for e in epochs]   # per student, largest first
        teacher = self.teacher()
        members = [teacher]
        for i, b in enumerate(self.recipe.baselines):
            members.append(self._stage(baseline_stage(self.recipe, i), "baseline", b.arch, dict(b.args),
                                       StageTargets(alpha=1.0), b.train))
        teacher_src = _LogitSource.of([teacher.model], self.data, self.cache, self.dist)
        if "chain" in d.strategies:
            src = teacher_src
            for i, spec in enumerate(specs):
                m = self._stage(f"chain/s{i + 1}", "chain", STUDENT_ARCH, spec,
                                StageTargets(soft=src, temperature=d.temperature, alpha=d.alpha), train[i])
                members.append(m)
                if d.chain_source == "previous" and i + 1 < len(specs):
                    src = _LogitSource.of([m.model], self.data, self.cache, self.dist)
        if "ensemble" in d.strategies:
            members += self._ensemble(specs, train, teacher, teacher_src)
        return members

    def _ensemble(self, specs: list[dict], train: list, teacher: Member, teacher_src: "_LogitSource"
                  ) -> list[Member]:
        """Members trained one after another on the frozen prefix so far (shrunk), then, with
        ``ensemble_corrective_epochs``, the corrective step: stages ``ensemble/c1..cM`` hold the corrected
        members (the prefixes of metrics.json use them), ``ensemble/e1..eM`` stay as trained."""
        d = self.recipe.distill
        augment = d.ensemble_augment if d.ensemble_augment is not None else self._augment(d.train)
        live = d.ensemble_residual == "live"
        cache = self.cache and not live and augment == "none"
        if cache != self.cache:   # live: the teacher and the frozen members run on each batch as the member sees it
            teacher_src = _LogitSource.of([teacher.model], self.data, cache, self.dist)
        order = list(zip(specs, [dataclasses.replace(t, augment=augment) for t in train]))
        order = order if d.ensemble_order == "descending" else order[::-1]
        prefix: _LogitSource | None = None                                  # the frozen ensemble so far
        out = []
        for k, (spec, train_cfg) in enumerate(order):
            base = prefix.scaled(d.ensemble_shrinkage) if prefix is not None else None
            m = self._stage(f"ensemble/e{k + 1}", "ensemble", STUDENT_ARCH, spec,
                            StageTargets(soft=teacher_src, base=base, temperature=d.temperature,
                                         alpha=d.alpha, hard_weight=d.ensemble_hard_weight), train_cfg)
            out.append(m)
            if k + 1 < len(order):
                prefix = (prefix.plus(m.model, self.data, self.dist, d.ensemble_shrinkage) if prefix is not None
                          else _LogitSource.of([m.model], self.data, cache, self.dist))
        if d.ensemble_corrective_epochs and len(out) > 1:
            out += self._corrective(out, teacher_src, order[-1][1])
        return out

    def _corrective(self, trained: list[Member], teacher_src: "_LogitSource", last_cfg) -> list[Member]:
        """BoostNet's corrective step: all members fine-tuned together on the sum of the per-prefix losses,
        at a low learning rate, keeping the best validation epoch (epoch 0, the members as trained, included)."""
        d = self.recipe.distill
        stage = "ensemble/corrective"
        models = []
        for m in trained:                       # fresh copies: the trained members stay as they are
            copy = self._build(STUDENT_ARCH, m.spec, m.stage)
            copy.load_state_dict(m.model.state_dict())
            models.append(copy)
        net = Corrective(models, d.ensemble_shrinkage).to(self.dist.device)
        names = [f"ensemble/c{k + 1}" for k in range(len(trained))]
        done = self.run.state()["stages"].get(stage)
        if done is not None and all(self.run.weights_path(n).exists() for n in names):
            for model, name in zip(models, names):
                model.load_state_dict({k: v.to(self.dist.device)
                                       for k, v in load_safetensors(self.run.weights_path(name))[0].items()})
            info = done
        else:
            cfg = dataclasses.replace(last_cfg, epochs=d.ensemble_corrective_epochs, lr=d.ensemble_corrective_lr,
                                      warmup_epochs=0.0)
            info = fit(net, self.data, cfg, stage=stage, seed=self.recipe.seed, augment_mode=cfg.augment,
                       targets=StageTargets(soft=teacher_src, temperature=d.temperature, alpha=d.alpha),
                       run=self.run, reporter=self.reporter, dist=self.dist, keep_best=True)
        out = []
        for m, model, name in zip(trained, models, names):
            model.eval()
            out.append(Member(name, "ensemble", STUDENT_ARCH, m.spec, model, m.flops,
                              {"corrected_from": m.stage, "train_time_s": m.info.get("train_time_s"),
                               "val_acc": None, "corrective": {k: info.get(k) for k in
                                                               ("train_time_s", "best_epoch", "val_acc")}}))
        if done is None and self.dist.is_main:
            for member in out:
                save_safetensors(self.run.weights_path(member.stage), member.model.state_dict(),
                                 _weights_meta(member, self.recipe, self.data))
            self.run.finish_stage(stage, info)
        return out


def evaluate_members(members: list[Member], data: Dataset, device="cpu", shrinkage: float = 1.0) -> dict:
    """Test-split metrics for every model and every ensemble prefix (the numbers in metrics.json). After a
    corrective step the prefixes are those of the corrected members; ``ensemble_prefixes_uncorrected`` keeps
    the members' as trained."""
    teacher_flops = members[0].flops.flops
    logits = {m.stage: predict(ensemble_predictor([m.model]), data, data.test.x, device=device) for m in members}
    rows = []
    for m in members:
        rows.append({
            "name": m.stage, "role": m.role, "arch": m.arch, "spec": m.spec,
            "params": m.flops.params, "macs": m.flops.macs, "flops": m.flops.flops,
            "mflops": m.flops.flops / 1e6, "pct_teacher_flops": 100.0 * m.flops.flops / teacher_flops,
            "bytes": m.flops.bytes(), "test_acc": accuracy(logits[m.stage], data.test.y),
            "val_acc": m.info.get("val_acc"), "train_time_s": m.info.get("train_time_s"),
            **({"corrected_from": m.info["corrected_from"]} if "corrected_from" in m.info else {}),
        })

    def prefixes(ens: list[Member]) -> list[dict]:
        out = []
        for k in range(1, len(ens) + 1):
            flops = sum(e.flops.flops for e in ens[:k])
            extra = ens[0].info.get("corrective", {}).get("train_time_s") or 0.0
            out.append({
                "name": f"ensemble[1..{k}]", "members": [e.stage for e in ens[:k]], "shrinkage": shrinkage,
                "params": sum(e.flops.params for e in ens[:k]), "macs": sum(e.flops.macs for e in ens[:k]),
                "flops": flops, "mflops": flops / 1e6, "pct_teacher_flops": 100.0 * flops / teacher_flops,
                "test_acc": accuracy(combine([logits[e.stage] for e in ens[:k]], shrinkage), data.test.y),
                "train_time_s": sum(e.info.get("train_time_s") or 0.0 for e in ens[:k]) + extra,
            })
        return out

    ens = [m for m in members if m.role == "ensemble" and "corrected_from" not in m.info]
    corrected = [m for m in members if m.role == "ensemble" and "corrected_from" in m.info]
    result = {"models": rows, "ensemble_prefixes": prefixes(corrected or ens)}
    if corrected:
        result["ensemble_prefixes_uncorrected"] = prefixes(ens)
        result["ensemble_corrective"] = corrected[0].info["corrective"]
    return result

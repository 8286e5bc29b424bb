"""One training stage: a model learns from labels, optionally from soft targets, optionally on top of the
frozen logits of an ensemble so far. Resumable per epoch, deterministic, single-process or DDP.

Determinism: every random choice (initialisation, batch order, augmentation, dropout) is drawn from a seed
derived from (recipe seed, stage name, epoch), so a run resumed from its last finished epoch reproduces the
uninterrupted run exactly on CPU. Dropout uses torch's global CPU RNG, seeded per epoch inside ``fork_rng``
and restored afterwards.

Data parallel (``edgepkd.distill.distributed``): the batch order is torch's ``DistributedSampler``, reseeded
per (seed, stage, epoch) with ``set_epoch``. The recipe's batch size is the global batch: each of the N
processes takes batch_size / N of it, so a step sees the same images (the epoch permutation's next batch_size)
and the same learning-rate schedule whatever N is; DDP averages the gradients. What still differs from one
process: BatchNorm statistics per process, dropout and augmentation drawn per rank, float summation order.
Only rank 0 writes checkpoints; every rank resumes from the same one.
"""

from __future__ import annotations

import math
import time
import zlib
from dataclasses import dataclass
from typing import Callable, Protocol

import torch
import torch.nn as nn
from torch.utils.data.distributed import DistributedSampler

from edgepkd.data import Dataset, augment
from edgepkd.distill.distributed import DistContext
from edgepkd.distill.losses import hardness_weights, kd_loss
from edgepkd.models.ensemble import combine
from edgepkd.recipe import TrainConfig
from edgepkd.rundir import RunDir

Logits = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (train indices, normalised batch) -> (B, K)


def stage_seed(seed: int, stage: str, epoch: int = -1) -> int:
    """A stable 63-bit seed for (recipe seed, stage, epoch); epoch -1 is the initialisation."""
    return (seed * 1_000_003 + zlib.crc32(stage.encode()) * 7919 + (epoch + 1) * 104_729) % (2 ** 63)


def init_seeded(build: Callable[[], nn.Module], seed: int) -> nn.Module:
    """Build a model with parameters drawn from ``seed`` without disturbing torch's global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


class Reporter(Protocol):
    def stage_start(self, stage: str, epochs: int, steps_per_epoch: int, start_epoch: int) -> None: ...
    def step(self, loss: torch.Tensor) -> None: ...  # a 0-d tensor: read it (a device sync) sparingly
    def epoch_end(self, stage: str, epoch: int, epochs: int, stats: dict) -> None: ...
    def stage_end(self, stage: str) -> None: ...


class SilentReporter:
    def stage_start(self, *a, **k): pass
    def step(self, *a, **k): pass
    def epoch_end(self, *a, **k): pass
    def stage_end(self, *a, **k): pass


def lr_at(cfg: TrainConfig, step: int, total_steps: int, steps_per_epoch: int) -> float:
    warmup = int(cfg.warmup_epochs * steps_per_epoch)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    if cfg.schedule == "constant":
        return cfg.lr
    progress = (step - warmup) / max(1, total_steps - warmup)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """No weight decay on 1-D parameters (norms, biases, A_log, D) nor position embeddings."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 or name.endswith(("A_log", "pos_embed")) else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=True)
    # fused: one kernel per step on CUDA instead of a launch-bound loop over the many tiny tensors of a student
    return torch.optim.AdamW(groups, lr=cfg.lr, fused=next(model.parameters()).is_cuda)


@torch.no_grad()
def predict(fn: Callable[[torch.Tensor], torch.Tensor], data: Dataset, x_uint8: torch.Tensor,
            batch_size: int = 512, device: torch.device | str = "cpu") -> torch.Tensor:
    """Logits of ``fn`` on uint8 images (N, C, H, W), normalised as ``data`` prescribes -> (N, K) on CPU."""
    out = [fn(data.normalize(x_uint8[i:i + batch_size]).to(device)).float().cpu()
           for i in range(0, len(x_uint8), batch_size)]
    return torch.cat(out) if out else torch.zeros(0, data.num_classes)


def predict_sharded(fn: Callable[[torch.Tensor], torch.Tensor], data: Dataset, x_uint8: torch.Tensor,
                    dist: DistContext) -> torch.Tensor:
    """``predict`` over all of ``x_uint8`` with each rank computing only its block of rows: (N, K) on every rank."""
    rows = dist.shard(len(x_uint8))
    return dist.gather_rows(predict(fn, data, x_uint8[rows], device=dist.device), len(x_uint8))


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> float | None:
    """Top-1 accuracy in percent; None for an empty split."""
    return 100.0 * (logits.argmax(-1) == y).float().mean().item() if len(y) else None


def ensemble_predictor(models: list[nn.Module], shrinkage: float = 1.0) -> Callable[[torch.Tensor], torch.Tensor]:
    """The models in eval mode, their logits combined as an ensemble prefix (``models.ensemble.combine``);
    one model: its logits."""
    for m in models:
        m.eval()
    return lambda x: combine([m(x) for m in models], shrinkage)


@dataclass
class StageTargets:
    """What a stage learns from besides labels."""

    soft: Logits | None = None     # teacher / previous student logits
    base: Logits | None = None     # frozen logits of the ensemble so far, shrunk (added to the model's output)
    temperature: float = 4.0
    alpha: float = 1.0             # 1.0: labels only
    hard_weight: float = 0.0       # ensemble: sample weight = KL(soft || base) ** hard_weight


def fit(model: nn.Module, data: Dataset, cfg: TrainConfig, *, stage: str, seed: int, augment_mode: str,
        targets: StageTargets, run: RunDir | None, reporter: Reporter | None = None,
        dist: DistContext | None = None, keep_best: bool = False) -> dict:
    """Train ``model`` for ``cfg.epochs`` epochs, resuming from the stage checkpoint in ``run`` if any.

    A model whose training-mode output is (B, M, K) (``models.ensemble.Corrective``) learns from the sum of
    its M prefixes' losses. ``keep_best``: validation early stopping; the model ends with the weights of its
    best validation epoch, the weights it started with (epoch 0) included, kept in the run as ``STAGE-best``.

    Returns {"train_time_s", "history": [per-epoch stats], "val_acc"} (+ "best_epoch" with keep_best).
    """
    dist = dist or DistContext()
    reporter = reporter or SilentReporter()
    model.to(dist.device)
    optimizer = make_optimizer(model, cfg)
    local_batch = dist.local_batch(cfg.batch_size, f"{stage}: train.batch_size")
    steps_per_epoch = max(1, len(data.train) // cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    info = run.load_checkpoint(stage, model, optimizer) if run is not None else None  # every rank, same file
    start_epoch = info["epoch"] if info else 0
    history = info["history"] if info else []
    train_time = info["train_time_s"] if info else 0.0
    trained = dist.wrap(model)  # DDP after loading: its construction broadcasts rank 0's state
    # rank r's k-th batch of its shard [r::N] is rows r::N of the permutation's k-th global batch. The sampler
    # seeds its generator with seed + epoch: seed 0 and set_epoch(stage_seed(...)) draw the epoch's order from
    # (recipe seed, stage, epoch) like every other random choice here.
    sampler = DistributedSampler(data.train, num_replicas=dist.world_size, rank=dist.rank, shuffle=True, seed=0,
                                 drop_last=False)
    rank_tag = f"/rank{dist.rank}" if dist.rank else ""  # rank 0 draws what a single process draws
    # the frozen ensemble's validation logits do not change during the stage: computed once, not every epoch
    val_base = (predict(lambda x: targets.base(None, x), data, data.val.x[dist.shard(len(data.val))],
                        device=dist.device) if targets.base is not None else None)  # (rows, K)

    best_stage = stage + "-best"
    if keep_best and (info is None or "best_val" not in info):
        # epoch 0: the weights the stage starts from compete with every epoch's (val of the full model)
        best_val = _val_acc(model, data, val_base, dist)
        best_epoch = 0
        if run is not None and dist.is_main:
            run.save_checkpoint(best_stage, model, optimizer, {"epoch": 0, "val_acc": best_val})
    elif keep_best:
        best_val, best_epoch = info["best_val"], info["best_epoch"]

    reporter.stage_start(stage, cfg.epochs, steps_per_epoch, start_epoch)
    for epoch in range(start_epoch, cfg.epochs):
        sampler.set_epoch(stage_seed(seed, stage, epoch))
        with torch.random.fork_rng(devices=[]):  # dropout draws from the global RNG: seed it per epoch, locally
            torch.manual_seed(stage_seed(seed, stage + "/dropout" + rank_tag, epoch))
            stats = _epoch(trained, model, optimizer, data, cfg, stage=stage, epoch=epoch,
                           indices=torch.tensor(list(sampler)), local_batch=local_batch,
                           augment_gen=torch.Generator().manual_seed(
                               stage_seed(seed, stage + "/augment" + rank_tag, epoch)),
                           steps_per_epoch=steps_per_epoch, total_steps=total_steps, augment_mode=augment_mode,
                           targets=targets, val_base=val_base, reporter=reporter, dist=dist)
        train_time += stats.pop("train_s")
        history.append(stats)
        extra = {}
        if keep_best:
            if stats["val_acc"] is not None and stats["val_acc"] > best_val:
                best_val, best_epoch = stats["val_acc"], epoch + 1
                if run is not None and dist.is_main:
                    run.save_checkpoint(best_stage, model, optimizer, {"epoch": epoch + 1, "val_acc": best_val})
            extra = {"best_val": best_val, "best_epoch": best_epoch}
        if run is not None and dist.is_main:
            run.save_checkpoint(stage, model, optimizer,
                                {"epoch": epoch + 1, "history": history, "train_time_s": train_time, **extra})
        dist.barrier()  # no rank starts the next epoch before this one is on disk: a failure can resume it
        reporter.epoch_end(stage, epoch + 1, cfg.epochs, stats)
    reporter.stage_end(stage)
    model.eval()
    result = {"train_time_s": train_time, "history": history,
              "val_acc": history[-1]["val_acc"] if history else None}
    if keep_best:
        if best_epoch != len(history) and run is not None:
            run.load_checkpoint(best_stage, model, optimizer)
        if run is not None and dist.is_main:
            run.checkpoint_path(best_stage).unlink(missing_ok=True)
        model.eval()
        result.update(val_acc=best_val, best_epoch=best_epoch)
    return result


def _val_acc(model: nn.Module, data: Dataset, val_base: torch.Tensor | None, dist: DistContext) -> float | None:
    """Validation top-1 of ``model`` (+ the frozen base), every rank its block, counts summed."""
    model.eval()
    rows = dist.shard(len(data.val))
    logits = predict(model, data, data.val.x[rows], device=dist.device)                  # (rows, K)
    if val_base is not None:
        logits = logits + val_base
    correct, = dist.sum([(logits.argmax(-1) == data.val.y[rows]).sum().item()])
    return 100.0 * correct / len(data.val) if len(data.val) else None


def _epoch(trained: nn.Module, model: nn.Module, optimizer, data: Dataset, cfg: TrainConfig, *, stage: str,
           epoch: int, indices: torch.Tensor, local_batch: int, augment_gen: torch.Generator,
           steps_per_epoch: int, total_steps: int, augment_mode: str, targets: StageTargets,
           val_base: torch.Tensor | None, reporter: Reporter, dist: DistContext) -> dict:
    """One epoch of training then validation; returns its stats (and 'train_s', the training time).

    ``trained`` is ``model`` itself or its DDP wrapper; ``indices`` this rank's share of the epoch's order.
    """
    t0 = time.perf_counter()
    trained.train()
    # sums stay on the device: a .item() per step would stall a GPU pipeline on every step
    loss_sum = torch.zeros((), device=dist.device)
    correct = torch.zeros((), dtype=torch.long, device=dist.device)
    seen = 0
    for step in range(steps_per_epoch):
        idx = indices[step * local_batch:(step + 1) * local_batch]
        lr = lr_at(cfg, epoch * steps_per_epoch + step, total_steps, steps_per_epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x = data.normalize(augment(data.train.x[idx], augment_mode, augment_gen)).to(dist.device)  # (B, C, H, W)
        y = data.train.y[idx].to(dist.device)                                              # (B,)
        with torch.no_grad():
            soft = targets.soft(idx, x) if targets.soft is not None else None             # (B, K)
            base = targets.base(idx, x) if targets.base is not None else None             # (B, K)
            weight = (hardness_weights(soft, base, targets.temperature, targets.hard_weight)
                      if base is not None and soft is not None and targets.hard_weight > 0 else None)
        logits = trained(x)                                                    # (B, K), or (B, M, K) prefixes
        if base is not None:
            logits = logits + base
        if logits.ndim == 3:   # every prefix of an ensemble: the sum of their losses; stats of the full one
            loss = sum(kd_loss(logits[:, k], y, soft, targets.temperature, targets.alpha, cfg.label_smoothing,
                               weight) for k in range(logits.shape[1]))
            logits = logits[:, -1]                                                         # (B, K)
        else:
            loss = kd_loss(logits, y, soft, targets.temperature, targets.alpha, cfg.label_smoothing, weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip is not None:
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        loss_sum += loss.detach() * len(idx)
        correct += (logits.argmax(-1) == y).sum()
        seen += len(idx)
        reporter.step(loss.detach())
    train_s = time.perf_counter() - t0
    dist.sync_buffers(model)
    model.eval()
    # validation: each rank its block of the split; counts summed with the training ones in one all-reduce
    rows = dist.shard(len(data.val))
    val_logits = predict(model, data, data.val.x[rows], device=dist.device)                 # (rows, K)
    if val_base is not None:
        val_logits = val_logits + val_base
    val_correct = (val_logits.argmax(-1) == data.val.y[rows]).sum().item()
    loss_sum, correct, seen, val_correct = dist.sum([loss_sum.item(), correct.item(), seen, val_correct])
    n_val = len(data.val)
    return {"epoch": epoch + 1, "loss": loss_sum / max(1, seen), "train_acc": 100.0 * correct / max(1, seen),
            "val_acc": 100.0 * val_correct / n_val if n_val else None, "lr": lr,
            "time_s": time.perf_counter() - t0, "train_s": train_s}

"""Data-parallel training across processes with PyTorch's own engine: torchrun + DistributedDataParallel.

    edgepkd distill RECIPE --nproc N                         N processes on this machine (runs torchrun)
    torchrun --nproc_per_node=N -m edgepkd distill RECIPE    the same with any torchrun flags (multi-node)

A process started by torchrun (RANK, WORLD_SIZE > 1 and MASTER_ADDR in its environment) joins the process
group: nccl with one GPU per process (cuda:LOCAL_RANK), gloo on CPU. ``DistContext`` carries its rank and the
few collectives the trainer needs; each of them is a no-op in a single process, so one code path serves both.

EDGEPKD_DIST_TIMEOUT_S (default 1800) is how long a rank waits for the others in a collective before it gives
up, so a rank that hangs ends the run (with the last finished epoch checkpointed) instead of stalling it.
"""

from __future__ import annotations

import datetime
import math
import os
import signal
import sys
from dataclasses import dataclass, field
from typing import Callable, TypeVar

import torch
import torch.nn as nn

from edgepkd.errors import ConfigError, EdgepkdError, first_line

T = TypeVar("T")
TIMEOUT_ENV = "EDGEPKD_DIST_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 1800.0
RESUME_HINT = "the last finished epoch is checkpointed: rerun the same command with --resume"


@dataclass
class DistContext:
    """Where this process stands in the run; the defaults are a single process."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    local_rank: int = 0          # rank on this machine (picks the GPU)
    local_world_size: int = 1    # processes on this machine (shares its CPU cores)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def backend(self) -> str | None:
        return torch.distributed.get_backend() if self.distributed else None

    def describe(self) -> dict:
        return {"world_size": self.world_size, "backend": self.backend}

    # -- splitting work
    def local_batch(self, batch_size: int, where: str = "train.batch_size") -> int:
        """This rank's share of a global batch: the recipe's batch size means the same with any process count."""
        if batch_size % self.world_size:
            raise ConfigError(f"{where}: {batch_size} is not divisible by the {self.world_size} processes; "
                              f"use a multiple of {self.world_size} (each process takes an equal share)")
        return batch_size // self.world_size

    def shard(self, n: int) -> slice:
        """This rank's contiguous block of rows 0..n-1 (blocks of ceil(n / world_size), the last one shorter)."""
        chunk = math.ceil(n / self.world_size)
        return slice(min(n, self.rank * chunk), min(n, (self.rank + 1) * chunk))

    # -- collectives (no-ops in a single process)
    def wrap(self, model: nn.Module) -> nn.Module:
        """The module to train: DDP around ``model`` (gradients all-reduced in backward), or ``model`` itself.
        Save and evaluate ``model``, never the wrapper, so weights have the same names either way."""
        if not self.distributed:
            return model
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[self.device] if self.device.type == "cuda" else None)

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over ranks (float64)."""
        if not self.distributed:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return t.tolist()

    def sync_buffers(self, model: nn.Module) -> None:
        """Copy rank 0's buffers (BatchNorm running statistics) to every rank. DDP keeps parameters equal but
        each rank's last forward updates its own running statistics: after this, every rank holds exactly
        the state rank 0 checkpoints."""
        if self.distributed:
            for b in model.buffers():
                torch.distributed.broadcast(b.data, src=0)

    def gather_rows(self, local: torch.Tensor, n: int) -> torch.Tensor:
        """Concatenate every rank's ``shard(n)`` rows (``local``: (rows, ...)) into all n rows, on every rank."""
        if not self.distributed:
            return local
        chunk = math.ceil(n / self.world_size)
        padded = torch.zeros((chunk, *local.shape[1:]), dtype=local.dtype, device=self.device)
        padded[:len(local)] = local.to(self.device)
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        torch.distributed.all_gather(parts, padded)
        return torch.cat(parts)[:n].to(local.device)                                  # (n, ...)

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()

    def agree(self, fn: Callable[[], T], local_first: bool = False) -> T:
        """Run ``fn`` on every rank; when it raises an EdgepkdError on any rank, every rank stops with it and
        only rank 0 prints it (one line, not one per process). ``local_first``: each machine's local rank 0
        runs ``fn`` before the others do (a dataset download must not race itself)."""
        if not self.distributed:
            return fn()
        if local_first:
            first = self._agree(fn if self.local_rank == 0 else lambda: None)
            return self._agree(lambda: first if self.local_rank == 0 else fn())
        return self._agree(fn)

    def _agree(self, fn: Callable[[], T]) -> T:
        result, error = None, None
        try:
            result = fn()
        except EdgepkdError as e:
            error = (type(e), e.exit_code, str(e))
        errors: list = [None] * self.world_size
        torch.distributed.all_gather_object(errors, error)
        failed = [(r, e) for r, e in enumerate(errors) if e is not None]
        if not failed:
            return result
        rank, (cls, code, message) = failed[0]
        if not self.is_main:
            raise SystemExit(code)  # rank 0 reports it
        err = cls(message if rank == 0 else f"rank {rank} of {self.world_size}: {message}")
        err.exit_code, err.agreed = code, True
        raise err

    def explain(self, e: BaseException) -> BaseException:
        """What a rank raises when ``e`` ends its part of a distributed run: one line naming the rank."""
        who = f"rank {self.rank} of {self.world_size}"
        if isinstance(e, SystemExit):
            return e
        if isinstance(e, KeyboardInterrupt):
            return e if self.is_main else SystemExit(130)  # rank 0 prints the resume hint
        if isinstance(e, EdgepkdError) and getattr(e, "agreed", False):
            return e  # every rank stops with it; its message already names the rank when it is not 0
        if isinstance(e, EdgepkdError):
            err = type(e)(f"{who}: {e}")
            err.exit_code = e.exit_code
            return err
        low = first_line(e).lower()
        # a collective that failed (nccl: DistBackendError; gloo: RuntimeError from gloo/...): the cause is elsewhere
        if isinstance(e, torch.distributed.DistError) or "gloo" in low or "nccl" in low:
            if "timed out" in low or "timeout" in low:
                return EdgepkdError(f"{who}: no answer from the other ranks within {timeout_s():.0f} s "
                                    f"({TIMEOUT_ENV}); one of them hangs or died; {RESUME_HINT}")
            return EdgepkdError(f"{who} stopped: another rank failed (see its message); {RESUME_HINT}")
        return EdgepkdError(f"{who} failed: {first_line(e, with_type=True)}; {RESUME_HINT}")


def timeout_s() -> float:
    raw = os.environ.get(TIMEOUT_ENV, "")
    if not raw:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ConfigError(f"{TIMEOUT_ENV}={raw!r}: expected a positive number of seconds (default "
                          f"{DEFAULT_TIMEOUT_S:.0f})")
    return value


def launched_by_torchrun() -> bool:
    env = os.environ
    return all(k in env for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR")) and int(env["WORLD_SIZE"]) > 1


def cpu_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def init_from_env(device: torch.device) -> DistContext:
    """Join torchrun's process group when this process was started by it; else a single-process context.
    ``device``: where a single process would train; under DDP a CUDA device becomes cuda:LOCAL_RANK."""
    if not launched_by_torchrun():
        return DistContext(device=device)
    env = os.environ
    rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
    local_rank = int(env.get("LOCAL_RANK", "0"))
    local_world = int(env.get("LOCAL_WORLD_SIZE", str(world)))
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(f"rank {rank}: LOCAL_RANK {local_rank} but this machine has "
                              f"{torch.cuda.device_count()} GPUs; start at most one process per GPU")
        device, backend = torch.device("cuda", local_rank), "nccl"
        torch.cuda.set_device(device)
    elif device.type == "cpu":
        backend = "gloo"
    else:
        raise ConfigError(f"distributed training runs on cpu (gloo) or cuda (nccl), not '{device.type}'")
    if "OMP_NUM_THREADS" not in env:  # processes on one machine share its cores
        torch.set_num_threads(max(1, cpu_cores() // local_world))
    timeout = datetime.timedelta(seconds=timeout_s())
    if backend == "nccl":
        torch.distributed.init_process_group(backend, timeout=timeout, device_id=device)
    else:
        torch.distributed.init_process_group(backend, timeout=timeout)
    return DistContext(rank, world, device, local_rank, local_world)


def shutdown(dist: DistContext) -> None:
    if dist.distributed and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def run_rank(fn: Callable[[DistContext], T], device: torch.device) -> T:
    """Run ``fn`` as this process's part of the run (joining torchrun's group when started by it). Under DDP
    an error ends this rank with one line naming it (torchrun's agent then stops the others)."""
    dist = init_from_env(device)
    try:
        result = fn(dist)
    except BaseException as e:
        if not dist.distributed:
            raise
        raise dist.explain(e) from None  # the group is left as is: the process exits next
    shutdown(dist)
    return result


def check_batch_sizes(recipe, world_size: int) -> None:
    """Every ``train.batch_size`` in the recipe (teacher, distill, any other stage) splits evenly over the
    processes: each takes batch_size / world_size of every global batch."""
    from dataclasses import fields, is_dataclass

    from edgepkd.recipe import TrainConfig

    def walk(obj, path: str) -> None:
        if isinstance(obj, TrainConfig):
            DistContext(world_size=world_size).local_batch(obj.batch_size, f"{path}.batch_size")
        elif is_dataclass(obj):
            for f in fields(obj):
                walk(getattr(obj, f.name), f"{path}.{f.name}" if path else f.name)
        elif isinstance(obj, (list, tuple)):
            for i, item in enumerate(obj):
                walk(item, f"{path}.{i}")

    walk(recipe, "")


# ------------------------------------------------------------------------------------------ launcher
def strip_nproc(argv: list[str]) -> list[str]:
    """``argv`` without ``--nproc N`` / ``--nproc=N`` (or an abbreviation argparse would accept)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if len(name) >= 4 and "--nproc".startswith(name):
            skip = "=" not in arg
            continue
        out.append(arg)
    return out


def launch(nproc: int, argv: list[str]) -> int:
    """Run ``python -m edgepkd <argv>`` in ``nproc`` processes on this machine under torchrun (standalone
    rendezvous on a free port) and wait for them. Returns 0, or the exit code of the failed run."""
    import logging

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    if launched_by_torchrun():
        raise ConfigError(f"--nproc: this process was already started by torchrun (WORLD_SIZE="
                          f"{os.environ['WORLD_SIZE']}); drop --nproc")
    timeout_s()  # a bad value: one line here rather than one per process
    omp = os.environ.get("OMP_NUM_THREADS")
    if omp is None:  # else torchrun sets 1; the workers split the cores instead
        os.environ["OMP_NUM_THREADS"] = str(max(1, cpu_cores() // nproc))
    # the workers report their own errors in one line each; the agent's log would repeat them (each of its
    # loggers has its own level, so set them one by one)
    for name in list(logging.root.manager.loggerDict):
        if name.startswith(("torch.distributed.elastic", "torch.distributed.run", "torch.distributed.launcher")):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        run(parse_args(["--standalone", f"--nproc-per-node={nproc}", "--module", "edgepkd", *argv]))
        return 0
    except ChildFailedError as e:
        failures = e.failures
    except SignalException as e:  # Ctrl-C or a kill: the agent has stopped the workers
        return 130 if e.sigval == signal.SIGINT else 128 + int(e.sigval)
    finally:
        if omp is None:
            os.environ.pop("OMP_NUM_THREADS", None)
    codes = [f.exitcode for f in failures.values()]
    # A worker that exits with a code printed its reason; one killed by a signal the agent did not send
    # (e.g. SIGKILL from the out-of-memory killer) could not: say it here.
    for rank, f in sorted(failures.items()):
        if f.exitcode < 0 and -f.exitcode not in (signal.SIGTERM, signal.SIGINT):
            print(f"edgepkd: error: rank {rank} of {nproc} was killed by {f.signal_name()} (out of memory?); "
                  f"{RESUME_HINT}", file=sys.stderr)
    positive = [c for c in codes if c > 0]
    return max(positive) if positive else 128 - min(codes)  # all killed by signals: 128 + signal, as a shell

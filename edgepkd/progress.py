"""Progress display for training: a rich bar per epoch on a terminal, one line per epoch otherwise."""

from __future__ import annotations

import sys
import time


class RichReporter:
    """Rich progress bar (loss) while an epoch runs, then a summary line (loss, train/val accuracy, time)."""

    def __init__(self, stream=None):
        from rich.console import Console

        self.console = Console(file=stream or sys.stderr, highlight=False)
        self.progress = None
        self.task = None
        self._shown = 0.0

    def stage_start(self, stage: str, epochs: int, steps_per_epoch: int, start_epoch: int) -> None:
        self.stage, self.epochs, self.steps = stage, epochs, steps_per_epoch
        note = f" (resumed after epoch {start_epoch})" if start_epoch else ""
        self.console.print(f"[bold]{stage}[/bold]: {epochs} epochs x {steps_per_epoch} steps{note}")
        self._new_bar(start_epoch + 1)

    def _new_bar(self, epoch: int) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        if not self.console.is_terminal or epoch > self.epochs:
            self.progress = None
            return
        self.progress = Progress(TextColumn("  {task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("loss {task.fields[loss]:.4f}"), TimeRemainingColumn(),
                                 console=self.console, transient=True)
        self.progress.start()
        self.task = self.progress.add_task(f"epoch {epoch}/{self.epochs}", total=self.steps, loss=float("nan"))

    def step(self, loss) -> None:
        """``loss``: a 0-d tensor. It is read (a GPU sync) at most every 0.2 s, when the bar can show it."""
        if self.progress is not None:
            now = time.monotonic()
            if now - self._shown >= 0.2:
                self._shown = now
                self.progress.update(self.task, advance=1, loss=float(loss))
            else:
                self.progress.update(self.task, advance=1)

    def epoch_end(self, stage: str, epoch: int, epochs: int, stats: dict) -> None:
        if self.progress is not None:
            self.progress.stop()
        val = "n/a" if stats["val_acc"] is None else f"{stats['val_acc']:.2f}"
        self.console.print(f"  epoch {epoch:>3}/{epochs}  loss {stats['loss']:.4f}  train acc "
                           f"{stats['train_acc']:6.2f}  val acc {val:>6}  {stats['time_s']:.1f}s")
        if epoch < epochs:
            self._new_bar(epoch + 1)

    def stage_end(self, stage: str) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

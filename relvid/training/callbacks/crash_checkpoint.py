"""CrashCheckpoint: saves the training state when a run dies of an exception between two steps."""

from __future__ import annotations

from pathlib import Path

import lightning as L

from relvid.training.safety import INTERRUPT_CHECKPOINT


class CrashCheckpoint(L.Callback):
    """Writes `<dirpath>/on_exception.ckpt` when an exception ends the run at a step boundary.

    An exception inside a step (in the forward, the backward or the optimizer step, or between two
    micro-batches of one step under gradient accumulation) leaves half a step in the weights, the
    gradients, the optimizer or the memory bank: resuming it would not reproduce the run, so
    nothing is written then and the run's last step checkpoint stays the newest. Lightning's
    OnExceptionCheckpoint also makes `fit(ckpt_path=None)` silently mean "last"; relvid decides what to
    resume itself (training.run.resolve_resume), so it uses this plain callback instead.

    With several processes nothing is written either: saving is collective (every rank meets in a
    barrier), and an exception usually ends one rank alone (a CUDA out-of-memory error on one GPU), so
    the others would never arrive and the run would hang instead of failing.
    """

    FILENAME = INTERRUPT_CHECKPOINT

    def __init__(self, dirpath: str | Path) -> None:
        self.dirpath = Path(dirpath)
        self.at_boundary = True
        self._step_before: int | None = None

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx) -> None:
        self.at_boundary = False
        self._step_before = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        # Under gradient accumulation a batch that did not end an optimizer step leaves accumulated gradients
        # (and its features in the memory bank) that no checkpoint holds: still inside the step.
        self.at_boundary = trainer.global_step != self._step_before

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if trainer.global_step == 0:
            return  # nothing trained yet: nothing to save
        if trainer.world_size > 1:
            print(f"relvid: rank {trainer.global_rank} failed ({trainer.global_step} steps done); no "
                  "crash checkpoint is written with several processes (saving needs every rank, and the others "
                  "may never get there). resume=last continues from the newest step checkpoint.", flush=True)
            return
        if not self.at_boundary:
            print(f"relvid: the run stopped inside step {trainer.global_step + 1}; no crash checkpoint is written "
                  "(it would hold half a step). resume=last continues from the newest step checkpoint.", flush=True)
            return
        trainer.save_checkpoint(self.dirpath / self.FILENAME)

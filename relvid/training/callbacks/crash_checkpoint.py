"""CrashCheckpoint: saves the training state when a run dies of an exception (Ctrl-C included)."""

from __future__ import annotations

from pathlib import Path

import lightning as L


class CrashCheckpoint(L.Callback):
    """Writes `<dirpath>/on_exception.ckpt`, resumable with resume=<that path>.

    Lightning's OnExceptionCheckpoint also makes `fit(ckpt_path=None)` silently mean "last"; relvid
    decides what to resume itself (train.resolve_resume), so it uses this plain callback instead.
    """

    FILENAME = "on_exception.ckpt"

    def __init__(self, dirpath: str | Path) -> None:
        self.dirpath = Path(dirpath)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if trainer.global_step == 0:
            return  # nothing trained yet: nothing to save
        trainer.save_checkpoint(self.dirpath / self.FILENAME)

"""MemoryBankCallback: holds the RCL memory bank, fills it after each batch, saves it in checkpoints."""

from __future__ import annotations

from typing import Any

import lightning as L

from relvid.losses.contrastive import MemoryBank


class MemoryBankCallback(L.Callback):
    """Owns the FIFO memory bank of relational dynamics that the RCL draws positives from.

    After every batch the current videos' (detached) features go into the bank: under gradient
    accumulation every micro-batch's, so a later micro-batch of the same step can draw positives from
    an earlier one. In a multi-process run every rank's features are gathered first, so all ranks hold
    the same bank and a checkpoint written by rank zero (between optimizer steps) restores every rank
    exactly.
    """

    def __init__(self, bank: MemoryBank | int = 64) -> None:
        self.bank = MemoryBank(bank) if isinstance(bank, int) else bank  # a size: the paper's one-FIFO bank

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        pl_module.memory_bank = self.bank

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        if not isinstance(outputs, dict) or "rcl_dynamics" not in outputs:
            return
        clip_index = outputs["clip_index"]
        dynamics = outputs["rcl_dynamics"]  # (B, F-1, C)
        frames = outputs["rcl_frames"]  # (B, F, C)
        if trainer.world_size > 1:
            # (W, B, ...) -> (W * B, ...), rank-major: the same order on every rank
            clip_index = pl_module.all_gather(clip_index.to(pl_module.device)).flatten(0, 1)
            dynamics = pl_module.all_gather(dynamics.to(pl_module.device)).flatten(0, 1)
            frames = pl_module.all_gather(frames.to(pl_module.device)).flatten(0, 1)
        self.bank.push(clip_index.cpu(), dynamics.detach().float().cpu(), frames.detach().float().cpu())

    def state_dict(self) -> dict:
        return self.bank.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.bank.load_state_dict(state_dict)

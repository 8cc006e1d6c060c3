"""FinalAdapters: writes the trained triplet in relvid's own format when training ends."""

from __future__ import annotations

from pathlib import Path

import lightning as L

from relvid.models.adapter_file import ADAPTER_FILE_NAME, save_adapter_state
from relvid.training.strategies import full_adapter_state


class FinalAdapters(L.Callback):
    """Saves `<dirpath>/relvid_adapters.safetensors` (all four adapters) on rank zero at the end of fit."""

    def __init__(self, dirpath: str | Path) -> None:
        self.dirpath = Path(dirpath)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.max_steps > 0 and trainer.global_step < trainer.max_steps:
            return  # stopped early (a signal): adapters/ holds only a finished run's triplet
        # Every rank takes part: under ZeRO-3 gathering the partitioned LoRA tensors is collective.
        # The names come back plain (no FSDP wrapper prefixes), so the file loads into a fresh model.
        state = full_adapter_state(trainer, pl_module)
        if trainer.is_global_zero:
            self.dirpath.mkdir(parents=True, exist_ok=True)
            save_adapter_state(self.dirpath / ADAPTER_FILE_NAME, state, pl_module.spec,
                               metadata={"relation": str(pl_module.cfg.relation), "step": str(trainer.global_step)})

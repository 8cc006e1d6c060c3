"""FinalAdapters: writes the trained triplet in relvid's own format when training ends."""

from __future__ import annotations

from pathlib import Path

import lightning as L

from relvid.models.lora import save_adapters


class FinalAdapters(L.Callback):
    """Saves `<dirpath>/relvid_adapters.safetensors` (all four adapters) on rank zero at the end of fit."""

    FILENAME = "relvid_adapters.safetensors"

    def __init__(self, dirpath: str | Path) -> None:
        self.dirpath = Path(dirpath)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            self.dirpath.mkdir(parents=True, exist_ok=True)
            save_adapters(self.dirpath / self.FILENAME, pl_module.transformer, pl_module.spec,
                          metadata={"relation": str(pl_module.cfg.relation), "step": str(trainer.global_step)})

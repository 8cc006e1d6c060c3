"""LoRASnapshots: an inference-ready LoRA beside every checkpoint, to compare steps without exporting by hand.

At every `trainer.checkpoint_every` steps, and at the last step of a finished run, rank zero writes
`<output_dir>/loras/<relation>_step<NNNNNN>.safetensors` (diffusers format, for
MochiPipeline.load_lora_weights) and/or `..._step<NNNNNN>_mochi.safetensors` (genmo's format, for
ComfyUI), as `trainer.lora_formats` lists. The training state stays in checkpoints/.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import lightning as L
from omegaconf import DictConfig

from relvid.models.lora import TripletSpec
from relvid.models.lora_io import safe_file_stem, write_inference_lora
from relvid.training.strategies import full_adapter_state

LORAS_DIR = "loras"
_SNAPSHOT = re.compile(r"^.+_step\d{6}(_mochi)?\.safetensors$")


def snapshot_name(relation: str, step: int, fmt: str) -> str:
    """<relation>_step<NNNNNN>.safetensors (diffusers) or <relation>_step<NNNNNN>_mochi.safetensors (mochi)."""
    return f"{safe_file_stem(relation)}_step{step:06d}{'_mochi' if fmt == 'mochi' else ''}.safetensors"


class LoRASnapshots(L.Callback):
    """Writes the inference LoRA (relation + FFN, or direct) in each of `formats` every `every_n_steps`."""

    def __init__(self, dirpath: str | Path, every_n_steps: int, formats: Sequence[str], relation: str) -> None:
        self.dirpath = Path(dirpath)
        self.every_n_steps = int(every_n_steps)
        self.formats = tuple(formats)
        self.relation = str(relation)
        self._last_step: int | None = None
        self._step_before: int | None = None  # global_step when the current batch started

    @classmethod
    def from_config(cls, cfg: DictConfig) -> LoRASnapshots:
        return cls(Path(cfg.output_dir) / LORAS_DIR, int(cfg.trainer.checkpoint_every),
                   list(cfg.trainer.lora_formats), str(cfg.relation))

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # A run that starts from step 0 in a folder that held another run (overwrite=true, which deletes
        # that run's checkpoints and adapters): its step LoRAs go too, so loras/ holds this run's alone.
        if trainer.global_step == 0 and trainer.is_global_zero and self.dirpath.is_dir():
            for old in self.dirpath.iterdir():
                if old.is_file() and _SNAPSHOT.match(old.name):
                    old.unlink()

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        self._step_before = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        step = trainer.global_step  # counts optimizer steps, as ModelCheckpoint's every_n_train_steps does
        if step == self._step_before:
            return  # a batch that ended no optimizer step (gradient accumulation): the weights have not moved
        if step > 0 and step % self.every_n_steps == 0:
            self._write(trainer, pl_module, step)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.max_steps > 0 and trainer.global_step < trainer.max_steps:
            return  # stopped early (a signal): the crash checkpoint is for resuming, not for sampling
        self._write(trainer, pl_module, trainer.global_step)  # last.ckpt's step, when not a multiple

    def _write(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> None:
        if not self.formats or step == self._last_step or step == 0:
            return  # one snapshot per step (on_train_end may follow the write at the last step)
        if not isinstance(getattr(pl_module, "spec", None), TripletSpec):
            return  # a run without LoRAs (method=motion_inversion): nothing with a LoRA form to write
        self._last_step = step
        # Every rank takes part: under ZeRO-3 gathering the partitioned LoRA tensors is collective.
        state = full_adapter_state(trainer, pl_module)
        if trainer.is_global_zero:
            for fmt in self.formats:
                write_inference_lora(state, pl_module.spec, self.dirpath / snapshot_name(self.relation, step, fmt),
                                     fmt)

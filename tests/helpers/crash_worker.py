"""Run by tests/training/test_gpu_ready_strategies.py: a tiny 2-process CPU training (gloo) in which one
rank fails, as a CUDA out-of-memory error on one GPU would.

`python crash_worker.py WORKDIR STRATEGY RANK STEP WHERE [key=value ...]`: rank RANK raises at step STEP,
inside the step (WHERE=step) or between two steps (WHERE=boundary, where the crash checkpoint would be
written). Lightning's own launcher starts the other rank.
"""

import sys
from pathlib import Path

import lightning as L
import torch

from relvid.config import load_config
from relvid.training.run import run


class SimulatedOOM(RuntimeError):
    pass


class FailOnOneRank(L.Callback):
    def __init__(self, rank: int, step: int, where: str) -> None:
        self.rank, self.step, self.where = rank, step, where

    def _fail(self, trainer: L.Trainer, where: str) -> None:
        if trainer.global_rank == self.rank and self.where == where:
            print(f"worker: rank {self.rank} fails at step {self.step} ({where})", flush=True)
            raise SimulatedOOM(f"CUDA out of memory (simulated on rank {self.rank})")

    def on_train_start(self, trainer, pl_module):
        if trainer.global_rank == 0:
            print(f"worker: strategy {type(trainer.strategy).__name__}", flush=True)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step + 1 == self.step:
            self._fail(trainer, "step")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            self._fail(trainer, "boundary")


def main(workdir: str, strategy: str, rank: str, step: str, where: str, *overrides: str) -> None:
    work = Path(workdir)
    torch.set_num_threads(1)
    cfg = load_config([Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"], [
        f"trainer.strategy={strategy}", "trainer.devices=2", "trainer.max_steps=6", "trainer.checkpoint_every=1",
        "trainer.progress_bar=false", "rcl.enabled=false",
        f"data.cache_dir={work / 'cache'}", f"output_dir={work / 'run'}", *overrides,
    ])
    run(cfg, extra_callbacks=[FailOnOneRank(int(rank), int(step), where)])


if __name__ == "__main__":
    main(*sys.argv[1:])

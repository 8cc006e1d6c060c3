"""Run by tests/training/test_strategies.py and tests/training/test_multinode.py: a tiny 2-process
CPU training (gloo).

Launched either by Lightning's own launcher (`python strategy_worker.py WORKDIR STRATEGY`) or by
torchrun (`python -m torch.distributed.run --nproc_per_node 2 strategy_worker.py WORKDIR STRATEGY`),
where Lightning detects the torchrun environment. Each rank records, for every step, the
selection and which adapters moved, then its final adapters.
"""

import json
import sys
from pathlib import Path

import lightning as L
import torch

from relvid.config import load_config
from relvid.training.run import run


def _adapters(trainer, pl_module) -> dict[str, torch.Tensor]:
    from relvid.training.strategies import full_adapter_state

    return full_adapter_state(trainer, pl_module)


class RecordSteps(L.Callback):
    def __init__(self, out: Path):
        self.out = out
        self.before: dict[str, torch.Tensor] = {}
        self.moved: list[list[str]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.before = _adapters(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        after = _adapters(trainer, pl_module)
        self.moved.append(sorted({k.split("/")[0] for k in after if not torch.equal(after[k], self.before[k])}))

    def on_train_end(self, trainer, pl_module):
        rank = trainer.global_rank
        torch.save(_adapters(trainer, pl_module), self.out / f"rank{rank}_adapters.pt")
        (self.out / f"rank{rank}.json").write_text(json.dumps({
            "selections": pl_module.selections, "moved": self.moved, "world_size": trainer.world_size,
            "strategy": type(trainer.strategy).__name__,
        }))


def main(workdir: str, strategy: str, *overrides: str) -> None:
    work = Path(workdir)
    torch.set_num_threads(1)
    cfg = load_config([Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"], [
        f"trainer.strategy={strategy}", "trainer.devices=2", "trainer.max_steps=4", "trainer.checkpoint_every=4",
        "trainer.progress_bar=false", "optim.warmup_steps=0", "optim.weight_decay=0.1",
        f"data.cache_dir={work / 'cache'}", f"output_dir={work / 'run'}", *overrides,
    ])
    run(cfg, extra_callbacks=[RecordSteps(work)])


if __name__ == "__main__":
    main(*sys.argv[1:])

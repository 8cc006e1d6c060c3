"""Run by tests/training/test_ddp.py: a tiny 2-process DDP training (gloo, CPU) through Lightning's own launcher.

Lightning re-launches this script for rank 1; each rank then writes its adapters and selections.
"""

import json
import sys
from pathlib import Path

import lightning as L
import torch

from relvid.config import load_config
from relvid.models.lora import adapter_state_dict
from relvid.training.run import run


class DumpRankState(L.Callback):
    def __init__(self, out: Path):
        self.out = out

    def on_train_end(self, trainer, pl_module):
        rank = trainer.global_rank
        torch.save(adapter_state_dict(pl_module.transformer), self.out / f"rank{rank}_adapters.pt")
        (self.out / f"rank{rank}.json").write_text(json.dumps({
            "selections": pl_module.selections, "world_size": trainer.world_size, "bank": len(pl_module.memory_bank),
        }))


def main(workdir: str) -> None:
    work = Path(workdir)
    torch.set_num_threads(1)
    cfg = load_config([Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"], [
        "trainer.strategy=ddp", "trainer.devices=2", "trainer.max_steps=4", "trainer.checkpoint_every=4",
        "trainer.progress_bar=false", f"data.cache_dir={work / 'cache'}", f"output_dir={work / 'run'}",
        "lora.frozen=[ffn]",  # the ablation freeze must hold under DDP too
    ])
    run(cfg, extra_callbacks=[DumpRankState(work)])


if __name__ == "__main__":
    main(sys.argv[1])

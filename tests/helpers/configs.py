"""Small training configs and sample-command arguments: the tiny Mochi preset, alone or on the toy codec."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from relvid.config import load_config
from relvid.toy.codec import ToyCodec

# Latent channels of the toy codec: the tiny transformer's input width when it runs on the toy world.
TOY_CHANNELS = ToyCodec().latent_channels

# `relvid sample` / `relvid evaluate` arguments for a tiny toy-world model on the CPU, fast enough for a test.
TINY = ["--set", "model.preset=tiny", "--set", "model.codec=toy", "--set", "model.text_encoder=toy",
        "--set", f"model.tiny.in_channels={TOY_CHANNELS}", "--device", "cpu",
        "--steps", "2", "--frames", "7", "--height", "16", "--width", "16"]


def tiny_cfg(tmp_path: Path, *overrides: str) -> DictConfig:
    """A few-step CPU run of the tiny preset writing under ``tmp_path`` (run/ and cache/)."""
    return load_config([], [
        "model.preset=tiny", "model.gradient_checkpointing=false", "lora.rank=4", "lora.alpha=4",
        "rcl.n_pos=2", "rcl.n_neg=4", "rcl.bank_size=8", "data.num_workers=0", "optim.warmup_steps=0",
        "trainer.accelerator=cpu", "trainer.devices=1", "trainer.max_steps=6", "trainer.checkpoint_every=100",
        "trainer.progress_bar=false", f"output_dir={tmp_path / 'run'}", f"data.cache_dir={tmp_path / 'cache'}",
        *overrides,
    ])


def toy_cfg(tmp_path: Path, name: str, *overrides: str) -> DictConfig:
    """The tiny run on the toy codec and text encoder, with dropout on, into ``tmp_path / name``:
    what the callbacks that render videos need."""
    return tiny_cfg(tmp_path, "model.codec=toy", "model.text_encoder=toy", f"model.tiny.in_channels={TOY_CHANNELS}",
                    "trainer.max_steps=4", "lora.dropout=0.1", "data.caption_dropout=0.3",
                    f"output_dir={tmp_path / name}", *overrides)

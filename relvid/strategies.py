"""Lightning strategy presets by name (trainer.strategy): what each needs for a frozen base with LoRA."""

from __future__ import annotations

from omegaconf import DictConfig


def build_strategy(cfg: DictConfig):
    """A Lightning strategy object (or name) for ``cfg.trainer.strategy``."""
    name = cfg.trainer.strategy
    if name == "ddp":
        # Unselected adapters sit outside the forward in a step; DDP must not wait for their grads.
        from lightning.pytorch.strategies import DDPStrategy

        return DDPStrategy(find_unused_parameters=True)
    return name

"""Attention paths for the Mochi transformer (speed.attention)."""

from __future__ import annotations

import torch


def apply_speed_config(transformer: torch.nn.Module, speed) -> torch.nn.Module:
    """Install the configured attention path; "auto" and "diffusers" keep diffusers' processor."""
    if speed.attention not in ("auto", "diffusers"):
        raise ValueError(f"speed.attention={speed.attention!r} is not available yet")
    return transformer

"""The Mochi transformer: from a local diffusers-format folder, or a tiny random one for tests."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch
from diffusers import MochiTransformer3DModel

from relvid.config import TinyModelConfig
from relvid.models.weights import WeightsNotFoundError, check_diffusers_config, find_component_folder

__all__ = ["WeightsNotFoundError", "find_transformer_folder", "load_transformer", "tiny_transformer"]

DOWNLOAD_HINT = (
    "download genmo/mochi-1-preview in diffusers format (e.g. `huggingface-cli download "
    "genmo/mochi-1-preview --local-dir /models/mochi-1-preview` on a machine with internet) and set "
    "model.path=<that folder> or the MOCHI_PATH environment variable"
)


def resolve_dtype(name: str, on_gpu: bool) -> torch.dtype:
    """`auto` means bf16 on a GPU and fp32 on a CPU."""
    table = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    if name == "auto":
        return torch.bfloat16 if on_gpu else torch.float32
    return table[name]


def find_transformer_folder(path: str | os.PathLike | None) -> Path:
    """The folder holding the transformer's config.json and weights; clear errors otherwise."""
    return find_component_folder(path, "transformer", "MochiTransformer3DModel", "Mochi weights", DOWNLOAD_HINT)


# The tiny preset's architecture: the schema's defaults, less the init seed.
TINY_CONFIG = {f.name: f.default for f in dataclasses.fields(TinyModelConfig) if f.name != "seed"}


def tiny_transformer(seed: int = 0, **overrides: int) -> MochiTransformer3DModel:
    """A Mochi-architecture transformer with random weights, identical for a given seed."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MochiTransformer3DModel(**{**TINY_CONFIG, **overrides})
        # diffusers leaves RoPE frequencies at zero; give the tiny model non-trivial ones so that
        # position matters in tests as it does in the real model.
        with torch.no_grad():
            model.pos_frequencies.normal_(0.0, 0.5)
    return model


def load_transformer(model_cfg, on_gpu: bool = False) -> MochiTransformer3DModel:
    """Build the backbone described by a `ModelConfig`, frozen, in its training dtype."""
    dtype = resolve_dtype(model_cfg.dtype, on_gpu)
    if model_cfg.preset == "tiny":
        tiny = model_cfg.tiny
        model = tiny_transformer(**{k: tiny[k] for k in tiny})
        if dtype != torch.float32:
            model = model.to(dtype)
    else:
        folder = find_transformer_folder(model_cfg.path)
        check_diffusers_config(folder, MochiTransformer3DModel, DOWNLOAD_HINT)
        model = MochiTransformer3DModel.from_pretrained(folder, torch_dtype=dtype, local_files_only=True)
    model.requires_grad_(False)
    if model_cfg.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    return model

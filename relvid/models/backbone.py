"""The Mochi transformer: from a local diffusers-format folder, or a tiny random one for tests."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch
from diffusers import MochiTransformer3DModel

from relvid.config import TinyModelConfig

DOWNLOAD_HINT = (
    "download genmo/mochi-1-preview in diffusers format (e.g. `huggingface-cli download "
    "genmo/mochi-1-preview --local-dir /models/mochi-1-preview` on a machine with internet) and set "
    "model.path=<that folder> or the MOCHI_PATH environment variable"
)


class WeightsNotFoundError(FileNotFoundError):
    """Model weights missing or incomplete at the configured local path."""


def resolve_dtype(name: str, on_gpu: bool) -> torch.dtype:
    """`auto` means bf16 on a GPU and fp32 on a CPU."""
    table = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    if name == "auto":
        return torch.bfloat16 if on_gpu else torch.float32
    return table[name]


def find_transformer_folder(path: str | os.PathLike | None) -> Path:
    """The folder holding the transformer's config.json and weights; clear errors otherwise."""
    if path is None:
        raise WeightsNotFoundError(f"Mochi weights not configured: {DOWNLOAD_HINT}.")
    root = Path(path).expanduser()
    if not root.exists():
        raise WeightsNotFoundError(f"Mochi weights not found at {root}: {DOWNLOAD_HINT}.")
    folder = root / "transformer" if (root / "transformer" / "config.json").is_file() else root
    config = folder / "config.json"
    if not config.is_file():
        raise WeightsNotFoundError(
            f"{root} has no transformer/config.json (nor config.json): it is not a diffusers-format "
            f"Mochi folder; {DOWNLOAD_HINT}."
        )
    try:
        class_name = json.loads(config.read_text()).get("_class_name")
    except json.JSONDecodeError as err:
        raise WeightsNotFoundError(f"{config} is not valid JSON ({err}); re-download it.") from None
    if class_name != "MochiTransformer3DModel":
        raise WeightsNotFoundError(
            f"{config} describes a {class_name!r}, not a MochiTransformer3DModel; point model.path at "
            "the Mochi pipeline folder or its transformer/ subfolder."
        )
    _check_weight_files(folder)
    return folder


def _check_weight_files(folder: Path) -> None:
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    single = folder / "diffusion_pytorch_model.safetensors"
    if single.is_file():
        return
    if not index.is_file():
        raise WeightsNotFoundError(
            f"{folder} holds no diffusion_pytorch_model.safetensors (or its .index.json): the download "
            f"is incomplete; {DOWNLOAD_HINT}."
        )
    shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    missing = [s for s in shards if not (folder / s).is_file()]
    if missing:
        raise WeightsNotFoundError(
            f"{folder} is missing {len(missing)} of {len(shards)} weight shards ({', '.join(missing[:3])}"
            f"{', ...' if len(missing) > 3 else ''}): the download is incomplete; {DOWNLOAD_HINT}."
        )


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
        model = MochiTransformer3DModel.from_pretrained(folder, torch_dtype=dtype, local_files_only=True)
    model.requires_grad_(False)
    if model_cfg.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    return model

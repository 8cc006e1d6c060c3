"""Tiny Mochi transformers with LoRA triplets: a bare model, a trained-looking adapter file, and a
synthetic checkpoint in the reference implementation's key layout."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import MochiTransformer3DModel

from relvid.models.adapter_file import save_adapters
from relvid.models.backbone import TINY_CONFIG, tiny_transformer
from relvid.models.lora import TripletSpec, inject_triplet, lora_parameters
from relvid.toy.codec import ToyCodec


def tiny(seed: int = 0) -> MochiTransformer3DModel:
    """The 2-block tiny Mochi transformer, its weights drawn after ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    return MochiTransformer3DModel(**TINY_CONFIG)


def trained_adapters(tmp_path: Path) -> tuple[Path, MochiTransformer3DModel, TripletSpec]:
    """A relvid adapter file with random (non-zero) LoRA weights for the tiny toy transformer,
    at ``tmp_path/run/adapters``; with the model that holds them and their spec."""
    spec = TripletSpec(rank=4, alpha=4.0)
    model = tiny_transformer(seed=0, in_channels=ToyCodec().latent_channels)
    inject_triplet(model, spec)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in lora_parameters(model).values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return save_adapters(tmp_path / "run" / "adapters" / "relvid_adapters.safetensors", model, spec), model, spec


# (reference layer, diffusers module, in, out) for the tiny model: vision width 32, text width 16.
REF_QKV = {
    "to_q_x": ("to_q", 32, 32),
    "to_k_x": ("to_k", 32, 32),
    "to_v_x": ("to_v", 32, 32),
    "to_q_y": ("add_q_proj", 16, 32),
    "to_k_y": ("add_k_proj", 16, 32),
    "to_v_y": ("add_v_proj", 16, 32),
}
REF_OUT = {"proj_x": ("to_out.0", 32, 32), "proj_y": ("to_add_out", 32, 16)}


def reference_state(relation: str = "qk", subjects: str = "v", rank: int = 4, prefix: str = "model.",
                    seed: int = 3) -> tuple[dict, dict]:
    """A synthetic reference checkpoint for the 2-block model and where each tensor must land."""
    g = torch.Generator().manual_seed(seed)
    state, where = {}, {}

    def add(ref_key, our_key, shape):
        state[ref_key] = torch.randn(shape, generator=g)
        where[ref_key] = our_key

    for i in range(2):
        for layer, (module, d_in, d_out) in REF_QKV.items():
            proj = layer[3]
            adapters = ["relation"] if proj in relation else ["subject1", "subject2"] if proj in subjects else []
            for adapter in adapters:
                for ab, shape in (("A", (rank, d_in)), ("B", (d_out, rank))):
                    add(
                        f"{prefix}blocks.{i}.attn.{layer}.lora_{ab}.{adapter}",
                        f"{adapter}/transformer_blocks.{i}.attn1.{module}.lora_{ab}.weight",
                        shape,
                    )
        for layer, (module, d_in, d_out) in REF_OUT.items():
            if layer == "proj_y" and i == 1:
                continue  # the last block has no proj_y
            for ab, shape in (("A", (rank, d_in)), ("B", (d_out, rank))):
                add(
                    f"{prefix}blocks.{i}.attn.{layer}.lora_{ab}",
                    f"ffn/transformer_blocks.{i}.attn1.{module}.lora_{ab}.weight",
                    shape,
                )
    return state, where

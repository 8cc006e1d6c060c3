"""The tiny LoRA-injected Mochi transformer and inputs that the attention-path tests share."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from relvid.models.backbone import tiny_transformer
from relvid.models.lora import TripletSpec, activate, adapters_for_selection, inject_triplet, lora_parameters


def speed(attention="packed", sdpa_backend="auto", checkpoint="full", compile=False):
    """A speed section as apply_speed_config reads it."""
    return SimpleNamespace(attention=attention, sdpa_backend=sdpa_backend, checkpoint=checkpoint, compile=compile)


def lora_model(dtype=torch.float32, checkpointing=False):
    """The tiny transformer with the LoRA triplet (random, non-zero B), relation selection active, train mode."""
    model = tiny_transformer(seed=3)
    model.requires_grad_(False)
    if checkpointing:
        model.enable_gradient_checkpointing()
    model.train()
    spec = TripletSpec(rank=4, alpha=4.0)
    inject_triplet(model, spec)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():  # B = 0 after injection would make every LoRA gradient of A vanish
        for _name, p in lora_parameters(model).items():
            p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    if dtype != torch.float32:
        model.to(dtype)
    activate(model, adapters_for_selection("relation", spec))
    return model


def batch(lengths, L=6, holes=False, dtype=torch.float32, seed=1):
    """Transformer inputs for len(lengths) samples whose text masks hold lengths[b] valid tokens of L."""
    g = torch.Generator().manual_seed(seed)
    B = len(lengths)
    mask = torch.zeros(B, L, dtype=torch.bool)
    for b, n in enumerate(lengths):
        mask[b, :n] = True
    if holes:  # valid tokens not all at the front (the reference gathers them in order)
        mask[0] = torch.tensor([True, False, True, True, False, True])[:L]
    return dict(hidden_states=torch.randn(B, 4, 2, 4, 6, generator=g).to(dtype),
                encoder_hidden_states=torch.randn(B, L, 32, generator=g).to(dtype),
                timestep=torch.tensor([300, 800][:B]), encoder_attention_mask=mask)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected||, in fp32."""
    return float((actual.float() - expected.float()).norm() / expected.float().norm().clamp_min(1e-12))

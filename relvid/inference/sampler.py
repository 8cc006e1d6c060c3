"""Euler sampler with classifier-free guidance on Mochi's linear-quadratic sigma schedule.

Works on normalized latents (decode them with the codec afterwards). The flow-matching convention
is the one of relvid.losses.flow_matching: sigma = 1 is pure noise, the transformer predicts
v = z0 - noise and is fed timestep = (1 - sigma) * 1000.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from relvid.losses.flow_matching import model_timestep


def linear_quadratic_sigmas(num_steps: int, threshold_noise: float = 0.025, linear_steps: int | None = None) -> Tensor:
    """genmo's Mochi schedule: sigma from 1.0 down to 0.0, shape (num_steps + 1,), float64.

    Written in terms of progress x = 1 - sigma over step index i: the first `linear_steps` steps
    (default num_steps // 2) move x linearly from 0 to threshold_noise; the rest follow the quadratic
    with the same value and slope at i = linear_steps that reaches x = 1 at i = num_steps.
    """
    linear_steps = num_steps // 2 if linear_steps is None else linear_steps
    if not 1 <= linear_steps < num_steps:
        raise ValueError(
            f"linear_quadratic_sigmas: need 1 <= linear_steps < num_steps, got linear_steps={linear_steps}, "
            f"num_steps={num_steps} (num_steps must be at least 2)"
        )
    i = torch.arange(num_steps + 1, dtype=torch.float64)
    slope = threshold_noise / linear_steps
    quad_steps = num_steps - linear_steps
    # curvature chosen so that thr + slope * q + curv * q^2 = 1 at q = quad_steps
    curv = (1.0 - threshold_noise - slope * quad_steps) / quad_steps**2
    q = i - linear_steps
    progress = torch.where(i < linear_steps, slope * i, threshold_noise + slope * q + curv * q.square())
    sigmas = 1.0 - progress
    sigmas[-1] = 0.0  # exact end point, not 1 - (1 +- rounding)
    return sigmas


def _module_dtype(module: nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


def _pad_tokens(embeds: Tensor, mask: Tensor, length: int) -> tuple[Tensor, Tensor]:
    """Right-pad (B, L, D) embeddings with zeros and (B, L) masks with False up to `length` tokens."""
    pad = length - embeds.shape[1]
    if pad == 0:
        return embeds, mask.bool()
    embeds = torch.cat([embeds, embeds.new_zeros(embeds.shape[0], pad, embeds.shape[2])], dim=1)  # (B, length, D)
    mask = torch.cat([mask.bool(), mask.new_zeros(mask.shape[0], pad, dtype=torch.bool)], dim=1)  # (B, length)
    return embeds, mask


def _check_text(name: str, embeds: Tensor, mask: Tensor | None, batch: int) -> tuple[Tensor, Tensor]:
    if mask is None:
        raise ValueError(f"sample: {name} was given without its attention mask")
    if embeds.dim() != 3 or tuple(mask.shape) != tuple(embeds.shape[:2]):
        raise ValueError(
            f"sample: {name} must be (B, L, D) with a (B, L) mask, got {tuple(embeds.shape)} and {tuple(mask.shape)}"
        )
    if embeds.shape[0] == 1 and batch > 1:  # one prompt (e.g. the empty negative) for the whole batch
        embeds, mask = embeds.expand(batch, -1, -1), mask.expand(batch, -1)
    if embeds.shape[0] != batch:
        raise ValueError(f"sample: {name} has batch {embeds.shape[0]} but noise has batch {batch}")
    return embeds, mask


@torch.no_grad()
def sample(
    transformer: nn.Module,
    noise: Tensor,
    text_embeds: Tensor,
    text_mask: Tensor,
    negative_embeds: Tensor | None = None,
    negative_mask: Tensor | None = None,
    num_steps: int = 64,
    guidance_scale: float = 6.0,
    threshold_noise: float = 0.025,
    progress: bool = False,
    sigmas: Tensor | None = None,
) -> Tensor:
    """Denoise `noise` (B, C, F, H, W) to normalized latents (float32) with Euler steps from sigma 1 to 0.

    `sigmas` (decreasing, ending at 0) replaces the schedule: `noise` is then the noisy latent at
    sigmas[0], and num_steps / threshold_noise are unused (finishing a partly noised clip).

    CFG v = v_u + g (v_c - v_u), with the unconditional and conditional halves in one forward pass;
    without a negative prompt or with guidance_scale == 1 only the conditional pass runs. The
    transformer runs in its own dtype; the Euler update x += (sigma - sigma_next) v is in float32.
    """
    batch = noise.shape[0]
    device = noise.device
    dtype = _module_dtype(transformer)
    text_embeds, text_mask = _check_text("text_embeds", text_embeds, text_mask, batch)
    use_cfg = negative_embeds is not None and guidance_scale != 1.0
    if use_cfg:
        negative_embeds, negative_mask = _check_text("negative_embeds", negative_embeds, negative_mask, batch)
        length = max(text_embeds.shape[1], negative_embeds.shape[1])
        neg_e, neg_m = _pad_tokens(negative_embeds, negative_mask, length)
        pos_e, pos_m = _pad_tokens(text_embeds, text_mask, length)
        embeds = torch.cat([neg_e, pos_e])  # (2B, L, D): unconditional half first
        mask = torch.cat([neg_m, pos_m])  # (2B, L)
    else:
        embeds, mask = text_embeds, text_mask.bool()
    embeds, mask = embeds.to(device, dtype), mask.to(device)

    if sigmas is None:
        sigmas = linear_quadratic_sigmas(num_steps, threshold_noise)
    elif sigmas.dim() != 1 or len(sigmas) < 2 or bool((sigmas[1:] >= sigmas[:-1]).any()) or float(sigmas[-1]) != 0.0:
        raise ValueError(f"sample: sigmas must decrease strictly and end at 0, got {sigmas.tolist()}")
    num_steps = len(sigmas) - 1
    x = noise.to(torch.float32)
    for i in tqdm(range(num_steps), desc="sampling", disable=not progress):
        sigma, sigma_next = sigmas[i].item(), sigmas[i + 1].item()
        x_in = torch.cat([x, x]) if use_cfg else x  # (2B or B, C, F, H, W)
        # timestep stays float32 even for a bf16 transformer: bf16 spacing near 1000 is 4, too coarse
        timestep = model_timestep(torch.full((x_in.shape[0],), sigma, dtype=torch.float64)).to(device, torch.float32)
        v = transformer(
            hidden_states=x_in.to(dtype),
            encoder_hidden_states=embeds,
            timestep=timestep,
            encoder_attention_mask=mask,
            return_dict=False,
        )[0].float()
        if use_cfg:
            v_uncond, v_cond = v.chunk(2)
            v = v_uncond + guidance_scale * (v_cond - v_uncond)
        x = x + (sigma - sigma_next) * v
    return x

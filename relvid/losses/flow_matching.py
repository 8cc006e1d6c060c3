"""Rectified-flow objective of Mochi and the hybrid-mask (HMT) reconstruction loss.

Convention (genmo, diffusers Mochi; pinned by the oracle test in tests/test_sampling.py):
    z_sigma = (1 - sigma) * z0 + sigma * noise      sigma = 1 is pure noise
    v       = z0 - noise                            the velocity the transformer predicts
    timestep fed to the transformer = (1 - sigma) * 1000   (a reversed scale)
"""

from __future__ import annotations

import torch
from torch import Tensor

RELATION_MASK_MODES = ("max", "union", "sum")
MASK_WEIGHT_FORMS = ("linear", "squared")


def sample_sigmas(batch: int, generator: torch.Generator, device: torch.device | str | None = None) -> Tensor:
    """Noise levels sigma ~ U(0, 1), shape (B,), float32, drawn on the generator's device then moved."""
    sigma = torch.rand(batch, generator=generator, device=generator.device, dtype=torch.float32)
    return sigma if device is None else sigma.to(device)


def _per_sample(sigma: Tensor, like: Tensor) -> Tensor:
    """(B,) -> (B, 1, ..., 1) broadcastable against `like`, in `like`'s dtype."""
    if sigma.dim() != 1 or sigma.shape[0] != like.shape[0]:
        raise ValueError(
            f"flow_matching: sigma must have shape (B,) = ({like.shape[0]},) to match the latents, "
            f"got {tuple(sigma.shape)}"
        )
    return sigma.to(like.dtype).view(-1, *([1] * (like.dim() - 1)))


def noisy_latents(z0: Tensor, noise: Tensor, sigma: Tensor) -> Tensor:
    """z_sigma = (1 - sigma) z0 + sigma noise; z0, noise (B, C, F, H, W), sigma (B,)."""
    s = _per_sample(sigma, z0)  # (B, 1, 1, 1, 1)
    return (1 - s) * z0 + s * noise


def velocity_target(z0: Tensor, noise: Tensor) -> Tensor:
    """The rectified-flow velocity the transformer is trained to predict: z0 - noise."""
    return z0 - noise


def model_timestep(sigma: Tensor) -> Tensor:
    """The transformer's timestep input for noise level sigma: (1 - sigma) * 1000."""
    return (1 - sigma) * 1000


def relation_mask(subject_masks: Tensor, mode: str = "max", stored: Tensor | None = None) -> Tensor:
    """The relation mask M_R of hybrid mask training, (B, 2, f, h, w) subject masks -> (B, f, h, w).

    The one definition of the rule, read by the datamodule and the training step (hmt.relation_mask).
    Subject masks on the latent grid are averaged over each latent frame's video frames, so:
    max (relvid's default): max(M_S1, M_S2) of those averages, in [0, 1]; it under-weights cells the
    subjects cross in turn within one latent frame. union (paper): the union taken per video frame,
    then averaged: the clip's stored relation mask (``stored``, (B, f, h, w), clip format 2); without
    one (older caches) the max. sum (reference code): M_S1 + M_S2, cells both cover count twice.
    """
    if subject_masks.dim() != 5 or subject_masks.shape[1] != 2:
        raise ValueError(
            f"relation_mask: subject_masks must have shape (B, 2, f, h, w), got {tuple(subject_masks.shape)}"
        )
    if mode == "max":
        return subject_masks.amax(dim=1)
    if mode == "union":
        if stored is not None:
            if stored.shape != subject_masks[:, 0].shape:
                raise ValueError(f"relation_mask: the stored mask {tuple(stored.shape)} does not match the subject "
                                 f"masks' grid {tuple(subject_masks[:, 0].shape)}")
            return stored
        return subject_masks.amax(dim=1)
    if mode == "sum":
        return subject_masks.sum(dim=1)
    raise ValueError(f"relation_mask: unknown mode {mode!r}; accepted values are {RELATION_MASK_MODES}")


def hybrid_mask_weight(mask: Tensor, lambda_m: float = 50.0, form: str = "linear") -> Tensor:
    """Per-element loss weight from a latent mask, (B, f, h, w) -> (B, 1, f, h, w) (broadcasts over channels).

    linear: 1 + lambda_m * M (paper); squared: 1 + lambda_m * M**2 (what the reference code's
    MSE + lambda_m * MSE(pred * M, target * M) amounts to). Equal for binary masks.
    """
    if mask.dim() != 4:
        raise ValueError(f"hybrid_mask_weight: mask must have shape (B, f, h, w), got {tuple(mask.shape)}")
    if form == "linear":
        weight = 1 + lambda_m * mask
    elif form == "squared":
        weight = 1 + lambda_m * mask.square()
    else:
        raise ValueError(f"hybrid_mask_weight: unknown form {form!r}; accepted values are {MASK_WEIGHT_FORMS}")
    return weight.unsqueeze(1)  # (B, 1, f, h, w)


def masked_flow_loss(
    pred: Tensor, target: Tensor, mask: Tensor | None, lambda_m: float = 50.0, form: str = "linear"
) -> Tensor:
    """Mean over all elements of weight * (pred - target)^2, in float32; mask None -> plain MSE.

    pred, target (B, C, f, h, w); mask (B, f, h, w) on the latent grid (fractional in time is fine).
    """
    if pred.shape != target.shape:
        raise ValueError(
            f"masked_flow_loss: pred {tuple(pred.shape)} and target {tuple(target.shape)} must have the same shape"
        )
    # float32 even for a bf16 transformer: the weighted mean over ~10^6 elements loses precision in bf16
    err = (pred.float() - target.float()).square()  # (B, C, f, h, w)
    if mask is None:
        return err.mean()
    expected = (pred.shape[0], *pred.shape[2:])
    if tuple(mask.shape) != expected:
        raise ValueError(
            f"masked_flow_loss: mask must have shape (B, f, h, w) = {expected} to match pred "
            f"{tuple(pred.shape)}, got {tuple(mask.shape)}"
        )
    weight = hybrid_mask_weight(mask.float(), lambda_m=lambda_m, form=form)  # (B, 1, f, h, w)
    return (weight * err).mean()

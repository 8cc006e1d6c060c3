"""Text-to-video generation with a relation LoRA: seeds, settings and one video per call.

Shared by `relvid sample`, `relvid evaluate`, the preview callback and the toy world. The initial
noise is drawn on the CPU from ``torch.Generator().manual_seed(seed)``, so a seed gives the same
video on any device (up to the device's float arithmetic).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from relvid.config import SamplingConfig
from relvid.inference.sampler import sample
from relvid.models.codecs import Codec
from relvid.models.lora import TripletSpec, activate, active_adapters, inference_adapters
from relvid.models.motion_inversion import MotionSpec, motion_embeddings
from relvid.models.offload import block_offload
from relvid.models.reversion import ReVersionSpec


def sampling_record(settings: SamplingConfig) -> dict:
    """What a video was sampled with, as its sidecar's "settings" (the negative prompt, a text, is
    recorded beside it as "negative_prompt")."""
    record = {k: getattr(settings, k) for k in ("num_steps", "guidance_scale", "frames", "height", "width", "fps",
                                                "threshold_noise")}
    if settings.null_condition != "encoded":  # recorded when not the default, so older sidecars still match
        record["null_condition"] = settings.null_condition
    if not settings.vae_tiling:  # the same: recorded when not the default
        record["vae_tiling"] = False
    return record


def to_uint8_frames(video: Tensor) -> Tensor:
    """(3, T, H, W) float in [-1, 1] -> (T, H, W, 3) uint8 on the CPU."""
    frames = ((video.float().clamp(-1.0, 1.0) + 1.0) * 127.5).round()  # (3, T, H, W) in [0, 255]
    return frames.permute(1, 2, 3, 0).to("cpu", torch.uint8).contiguous()  # (T, H, W, 3)


def initial_noise(codec: Codec, settings: SamplingConfig, seed: int) -> Tensor:
    """(1, C, f, h, w) float32 standard normal noise on the CPU, a pure function of the seed."""
    shape = codec.latent_shape(settings.frames, settings.height, settings.width)
    gen = torch.Generator().manual_seed(int(seed))
    return torch.randn((1, *shape), generator=gen, dtype=torch.float32)


def unconditional_input(settings: SamplingConfig, embeds: Tensor, mask: Tensor,
                        negative: tuple[Tensor, Tensor] | None) -> tuple[Tensor | None, Tensor | None]:
    """The guidance's unconditional (embeds (L', D), mask (L',)), or (None, None) without guidance:
    the negative prompt's encoding (null_condition=encoded), or zero embeddings under an all-False
    mask, i.e. no text tokens, as training's caption dropout sees (null_condition=zeros, the
    reference code's sampler)."""
    if negative is None:
        return None, None
    if settings.null_condition == "zeros":
        return torch.zeros_like(embeds), torch.zeros_like(mask, dtype=torch.bool)
    return negative


@torch.no_grad()
def generate_video(
    transformer: nn.Module,
    codec: Codec,
    embeds: Tensor,
    mask: Tensor,
    negative: tuple[Tensor, Tensor] | None,
    seed: int,
    settings: SamplingConfig | None = None,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> Tensor:
    """One video for one prompt: uint8 (T, H, W, 3).

    embeds (L, D) / mask (L,) are the prompt's text embedding (a TextEncoder's output or the
    clip cache's prompts); `negative` is the negative prompt's (embeds, mask) for CFG, or None
    for the conditional pass only. The transformer's adapters are used as they are set.
    """
    if embeds.dim() != 2 or tuple(mask.shape) != (embeds.shape[0],):
        raise ValueError(f"generate_video: embeds must be (L, D) with an (L,) mask, got {tuple(embeds.shape)} "
                         f"and {tuple(mask.shape)}")
    settings = settings if settings is not None else SamplingConfig()
    offloaded = block_offload(transformer) is not None
    if offloaded:  # adapters injected on the host side, and whatever left for a decode, back on the device
        transformer.to(device)
    noise = initial_noise(codec, settings, seed).to(device)
    neg_e, neg_m = unconditional_input(settings, embeds, mask, negative)
    neg_e = None if neg_e is None else neg_e[None].to(device)  # (1, L', D)
    neg_m = None if neg_m is None else neg_m[None].to(device)  # (1, L')
    latents = sample(
        transformer, noise, embeds[None].to(device), mask[None].to(device),  # (1, L, D), (1, L)
        negative_embeds=neg_e, negative_mask=neg_m, num_steps=settings.num_steps,
        guidance_scale=settings.guidance_scale, threshold_noise=settings.threshold_noise, progress=progress,
    )
    # with block offload the transformer's resident part leaves the GPU before the VAE comes on
    with off_device(transformer, device) if offloaded else contextlib.nullcontext(), codec_on(codec, device), \
            codec_tiling(codec, settings.vae_tiling):
        video = codec.decode(latents)  # (1, 3, T, H, W) in [-1, 1]
    return to_uint8_frames(video[0])


@contextlib.contextmanager
def off_device(transformer: nn.Module, device: str | torch.device) -> Iterator[None]:
    """A block-offloaded transformer on the CPU for the duration (a decode), its GPU memory handed back, then
    on `device` again: its offloaded blocks wait on the host anyway, the rest (embeddings, resident blocks,
    adapters) is small beside a VAE decode. On a CPU `device`: left alone."""
    target = torch.device(device)
    if target.type != "cuda":
        yield
        return
    offload = block_offload(transformer)
    if offload is not None:
        offload.release()  # the next block, copied ahead of its use
    transformer.to("cpu")
    torch.cuda.empty_cache()
    try:
        yield
    finally:
        transformer.to(target)


@contextlib.contextmanager
def codec_tiling(codec: Codec, enabled: bool) -> Iterator[None]:
    """sampling.vae_tiling for the duration, on a codec that tiles (the Mochi VAE); others are left alone."""
    tiling = getattr(codec, "tiling", None)
    with tiling(enabled) if callable(tiling) else contextlib.nullcontext():
        yield


@contextlib.contextmanager
def codec_on(codec: Codec, device: str | torch.device) -> Iterator[None]:
    """A codec whose weights wait on the CPU is on the GPU `device` for the duration (a decode), and back
    on the CPU afterwards: `relvid sample` and `evaluate` keep the VAE off the GPU while the transformer
    samples. A codec without torch weights (the toy codec), one already on a GPU, or a CPU `device`:
    left alone."""
    module = getattr(codec, "vae", None)
    params = next(module.parameters(), None) if isinstance(module, nn.Module) else None
    target = torch.device(device)
    if params is None or params.device.type != "cpu" or target.type == "cpu":
        yield
        return
    module.to(target)
    try:
        yield
    finally:
        module.to("cpu")


@contextlib.contextmanager
def inference_scope(transformer: nn.Module, spec: TripletSpec | MotionSpec | ReVersionSpec) -> Iterator[None]:
    """Sample mid-training: inference adapters (MotionInversion: the debiased value embedding; ReVersion:
    nothing in the transformer, its token is in the prompt's embedding), eval mode, then the training state
    exactly as it was.

    Restores the active adapters, train/eval mode of every submodule, every parameter's
    requires_grad and the global CPU/CUDA random states, so a preview never shifts the training.
    """
    motion = motion_embeddings(transformer) if isinstance(spec, MotionSpec) else None
    lora = motion is None and not isinstance(spec, ReVersionSpec)
    active = active_adapters(transformer) if lora else ()
    debiased = motion.inference if motion is not None else False
    modes = {name: m.training for name, m in transformer.named_modules()}
    grads = {name: p.requires_grad for name, p in transformer.named_parameters()}
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        try:
            if lora:
                activate(transformer, inference_adapters(spec))
            elif motion is not None:
                motion.inference = True
            transformer.eval()
            yield
        finally:
            if lora:
                activate(transformer, active)
            elif motion is not None:
                motion.inference = debiased
            for name, m in transformer.named_modules():
                m.training = modes[name]
            for name, p in transformer.named_parameters():
                p.requires_grad_(grads[name])

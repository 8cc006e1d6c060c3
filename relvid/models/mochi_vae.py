"""The Mochi VAE as a relvid codec: video <-> normalized latents, weights from a local folder.

Normalization follows diffusers' MochiPipeline, which decodes with
``raw = z * latents_std / scaling_factor + latents_mean``; encoding is its inverse,
``z = (raw - latents_mean) * scaling_factor / latents_std`` (scaling_factor is 1.0 in the released
config, but a config that sets it is honoured). The posterior's log-variance moves with the same
affine map: ``logvar_z = logvar_raw + 2 log(scaling_factor / latents_std)``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor

from relvid.models.codecs import CodecError, check_video_shape
from relvid.models.weights import check_diffusers_config, find_component_folder

VAE_DOWNLOAD_HINT = (
    "download genmo/mochi-1-preview in diffusers format (e.g. `huggingface-cli download "
    "genmo/mochi-1-preview --local-dir /models/mochi-1-preview` on a machine with internet) and pass "
    "the pipeline folder (or its vae/ subfolder)"
)

# Spatial tiles for the encoder and decoder (pixels). The default 256/192 of diffusers keeps a
# 61x480x848 clip within a 24 GB GPU in bf16; smaller tiles lower memory further at some speed cost.
DEFAULT_TILE = 256
DEFAULT_TILE_STRIDE = 192


def find_vae_folder(path: str | os.PathLike | None) -> Path:
    """The folder holding AutoencoderKLMochi's config.json and weights; clear errors otherwise."""
    return find_component_folder(path, "vae", "AutoencoderKLMochi", "Mochi VAE", VAE_DOWNLOAD_HINT)


class MochiCodec:
    """Codec over a diffusers ``AutoencoderKLMochi`` (6x temporal, 8x spatial compression)."""

    name = "mochi-vae"

    def __init__(self, vae, tiling: bool = True, tile: int = DEFAULT_TILE,
                 tile_stride: int = DEFAULT_TILE_STRIDE) -> None:
        cfg = vae.config
        self.vae = vae.eval().requires_grad_(False)
        self.time_factor = int(vae.temporal_compression_ratio)
        self.space_factor = int(vae.spatial_compression_ratio)
        self.latent_channels = int(cfg.latent_channels)
        if cfg.latents_mean is None or cfg.latents_std is None:
            raise CodecError("Mochi VAE config has no latents_mean/latents_std: "
                             "cannot normalize latents like MochiPipeline")
        if len(cfg.latents_mean) != self.latent_channels or len(cfg.latents_std) != self.latent_channels:
            raise CodecError(
                f"Mochi VAE config: latents_mean/latents_std have {len(cfg.latents_mean)}/{len(cfg.latents_std)} "
                f"entries for {self.latent_channels} latent channels"
            )
        shape = (1, self.latent_channels, 1, 1, 1)
        self._mean = torch.tensor(cfg.latents_mean, dtype=torch.float32).view(shape)
        # The scale from raw to normalized latents: scaling_factor / latents_std.
        self._scale = (float(cfg.scaling_factor) / torch.tensor(cfg.latents_std, dtype=torch.float32)).view(shape)
        self.tile, self.tile_stride = int(tile), int(tile_stride)
        if tiling:
            # Integer strides: diffusers uses them as range() steps.
            vae.enable_tiling(self.tile, self.tile, self.tile_stride, self.tile_stride)

    @classmethod
    def from_folder(
        cls, path: str | os.PathLike | None, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
        **kwargs,
    ) -> MochiCodec:
        """Load the VAE from a pipeline root (with vae/) or the vae folder; fp32 on CPU, bf16 on GPU by default."""
        from diffusers import AutoencoderKLMochi

        folder = find_vae_folder(path)
        check_diffusers_config(folder, AutoencoderKLMochi, VAE_DOWNLOAD_HINT)
        if dtype is None:
            dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
        vae = AutoencoderKLMochi.from_pretrained(folder, torch_dtype=dtype, local_files_only=True)
        return cls(vae.to(device), **kwargs)

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        return check_video_shape(self, frames, height, width)

    @contextlib.contextmanager
    def tiling(self, enabled: bool) -> Iterator[None]:
        """Encode and decode in overlapping spatial tiles (``tile``/``tile_stride`` pixels) or whole frames for
        the duration (sampling.vae_tiling), then as before."""
        before = bool(self.vae.use_tiling)
        if enabled and not before:
            self.vae.enable_tiling(self.tile, self.tile, self.tile_stride, self.tile_stride)
        self.vae.use_tiling = bool(enabled)
        try:
            yield
        finally:
            self.vae.use_tiling = before

    @torch.inference_mode()
    def encode(self, video: Tensor) -> tuple[Tensor, Tensor]:
        """(B, 3, T, H, W) in [-1, 1] -> normalized (mean, logvar), float32 (B, C, f, h, w) on the VAE's device."""
        b, c, frames, height, width = video.shape
        if c != 3:
            raise CodecError(f"mochi-vae: expected 3 colour channels, got {c}")
        _, f, h, w = check_video_shape(self, frames, height, width)
        means, logvars = [], []
        for clip in video.split(1):  # one clip at a time: memory is per clip, not per batch
            posterior = self.vae.encode(clip.to(self.device, self.dtype)).latent_dist
            means.append(posterior.mean.float())
            logvars.append(posterior.logvar.float())
        mean, logvar = torch.cat(means), torch.cat(logvars)  # (B, C, f, h, w) raw
        if mean.shape[2:] != (f, h, w):
            raise CodecError(f"mochi-vae: encoder returned {tuple(mean.shape[2:])}, expected {(f, h, w)}")
        scale, shift = self._scale.to(mean.device), self._mean.to(mean.device)
        return (mean - shift) * scale, logvar + 2.0 * torch.log(scale)

    @torch.inference_mode()
    def decode(self, latents: Tensor) -> Tensor:
        """Normalized (B, C, f, h, w) -> video (B, 3, T, H, W) float32 in [-1, 1]."""
        if latents.shape[1] != self.latent_channels:
            raise CodecError(f"mochi-vae: expected {self.latent_channels} latent channels, got {latents.shape[1]}")
        z = latents.to(self.device, torch.float32)
        z = z / self._scale.to(z.device) + self._mean.to(z.device)  # MochiPipeline's denormalization
        videos = [self.vae.decode(clip.to(self.dtype)).sample.float() for clip in z.split(1)]
        return torch.cat(videos).clamp(-1.0, 1.0)

"""Latent codecs: the interface every video autoencoder of relvid meets, and how to load one.

A codec turns RGB video into the *normalized* latents the transformer sees (and back). Two
implement it: the Mochi VAE (`relvid.models.mochi_vae.MochiCodec`, weights from a local folder)
and the toy world's exact, weight-free codec (`relvid.toy.codec.ToyCodec`); `relvid.components`
loads either by name. Preprocessing, previews, sampling and evaluation only ever talk to this
interface.

Conventions shared by all codecs:
- video: float (B, 3, T, H, W) in [-1, 1]; T = time_factor * k + 1.
- latents: float (B, C, f, h, w), already normalized (zero mean, unit variance per channel as
  far as the codec knows), f = (T - 1) / time_factor + 1, h = H / space_factor.
- latent frame 0 covers video frame 0 alone; latent frame i >= 1 covers video frames
  time_factor * (i - 1) + 1 .. time_factor * i.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import Tensor

from relvid.errors import UserError


class CodecError(UserError, ValueError):
    """A video or latent whose shape the codec cannot take, or a codec that cannot be loaded."""


@runtime_checkable
class Codec(Protocol):
    name: str  # stored in the clip cache's metadata ("mochi-vae", "toy")
    time_factor: int
    space_factor: int
    latent_channels: int

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """(C, f, h, w) of a (3, frames, height, width) video; CodecError when it does not divide."""
        ...

    def encode(self, video: Tensor) -> tuple[Tensor, Tensor]:
        """(B, 3, T, H, W) in [-1, 1] -> normalized posterior (mean, logvar), each (B, C, f, h, w)."""
        ...

    def decode(self, latents: Tensor) -> Tensor:
        """Normalized (B, C, f, h, w) -> video (B, 3, T, H, W) float in [-1, 1] (clamped)."""
        ...


def check_video_shape(codec: Codec, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
    """The latent shape for a video size, or a CodecError that says which size to use instead."""
    t, s = codec.time_factor, codec.space_factor
    if frames < 1 or (frames - 1) % t:
        raise CodecError(f"{codec.name}: {frames} frames is not {t}k+1; use e.g. {t * max(1, (frames - 1) // t) + 1}")
    if height % s or width % s:
        raise CodecError(f"{codec.name}: {height}x{width} is not a multiple of {s} in both sides")
    return codec.latent_channels, (frames - 1) // t + 1, height // s, width // s


def codec_factors(codec: Codec) -> str:
    """The cache metadata string ``"t,s,s"``."""
    return f"{codec.time_factor},{codec.space_factor},{codec.space_factor}"


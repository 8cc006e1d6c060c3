"""The toy world's codec: exact and weight-free, with Mochi's temporal grouping.

Space: pixel-unshuffle by ``space_factor``. Time: latent frame 0 holds video frame 0 alone
(repeated ``time_factor`` times so every latent frame has the same channel layout), latent frame
i >= 1 stacks video frames t(i-1)+1 .. ti. decode(encode(x)) == x up to float rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from relvid.models.codecs import CodecError, check_video_shape

# A delta posterior: exp(-24 / 2) ~ 6e-6 of standard deviation, far below the pixel scale.
TOY_LOGVAR = -24.0


class ToyCodec:
    """Exact codec: C = 3 * time_factor * space_factor**2 latent channels."""

    name = "toy"

    # Default normalization: shift = the mean pixel of toy clips (dark backgrounds, two bright shapes);
    # scale = 0.35, their pixel std, so latents have unit variance. With space factor 2 a token of the
    # toy DiT (patch 2) carries 144 latent values, fewer than the base's width (160), so its output
    # layer can express every token and sampling removes all the noise.
    def __init__(self, time_factor: int = 3, space_factor: int = 2, shift: float = -0.7, scale: float = 0.35) -> None:
        if time_factor < 1 or space_factor < 1 or scale <= 0:
            raise CodecError("toy codec: factors must be >= 1 and scale > 0, "
                             f"got {time_factor}, {space_factor}, {scale}")
        self.time_factor = time_factor
        self.space_factor = space_factor
        self.latent_channels = 3 * time_factor * space_factor ** 2
        self.shift, self.scale = shift, scale  # latents = (pixels - shift) / scale

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        return check_video_shape(self, frames, height, width)

    def encode(self, video: Tensor) -> tuple[Tensor, Tensor]:
        b, c, frames, height, width = video.shape
        if c != 3:
            raise CodecError(f"toy codec: expected 3 colour channels, got {c}")
        _, f, h, w = check_video_shape(self, frames, height, width)
        t, s = self.time_factor, self.space_factor
        x = video.float()
        first = x[:, :, :1].expand(b, 3, t, height, width)  # (B, 3, t, H, W): frame 0 alone
        x = torch.cat([first, x[:, :, 1:]], dim=2)  # (B, 3, f * t, H, W)
        x = x.reshape(b, 3, f, t, height, width).permute(0, 2, 1, 3, 4, 5)  # (B, f, 3, t, H, W)
        x = x.reshape(b * f, 3 * t, height, width)
        x = F.pixel_unshuffle(x, s)  # (B f, 3 t s s, h, w)
        x = x.reshape(b, f, self.latent_channels, h, w).permute(0, 2, 1, 3, 4)  # (B, C, f, h, w)
        mean = (x - self.shift) / self.scale
        return mean.contiguous(), torch.full_like(mean, TOY_LOGVAR)

    def decode(self, latents: Tensor) -> Tensor:
        b, c, f, h, w = latents.shape
        if c != self.latent_channels:
            raise CodecError(f"toy codec: expected {self.latent_channels} latent channels, got {c}")
        t, s = self.time_factor, self.space_factor
        x = latents.float() * self.scale + self.shift
        x = x.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)
        x = F.pixel_shuffle(x, s)  # (B f, 3 t, H, W)
        x = x.reshape(b, f, 3, t, h * s, w * s).permute(0, 2, 1, 3, 4, 5)  # (B, 3, f, t, H, W)
        first = x[:, :, 0].mean(dim=2, keepdim=True)  # (B, 3, 1, H, W): the t copies of frame 0
        rest = x[:, :, 1:].reshape(b, 3, (f - 1) * t, h * s, w * s)
        return torch.cat([first, rest], dim=2).clamp(-1.0, 1.0)

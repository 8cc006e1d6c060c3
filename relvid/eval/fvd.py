"""FVD: the Frechet distance between I3D features of generated and reference videos.

The I3D network is a local TorchScript file. Two calling conventions are understood:
``forward(x)`` returning (B, D) features, and the StyleGAN-V / common FVD export
(i3d_torchscript.pt) ``forward(x, rescale, resize, return_features)``. Input: (B, 3, T, S, S)
float in [-1, 1], the first `num_frames` frames resized to S x S.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from relvid.errors import InputError, InputNotFoundError, UserError
from relvid.eval.metrics import frechet_distance


class I3DWeightsError(UserError, FileNotFoundError):
    """No usable I3D TorchScript file."""


class I3DFeatures:
    """Video features from a TorchScript I3D."""

    def __init__(self, path: str | os.PathLike | None, device: str | torch.device = "cpu", num_frames: int = 16,
                 size: int = 224) -> None:
        if path is None or not Path(path).is_file():
            raise I3DWeightsError(
                f"I3D TorchScript file {path!r} not found: get the FVD I3D export (e.g. StyleGAN-V's "
                "i3d_torchscript.pt) on a machine with internet and pass --i3d-path FILE")
        try:
            self.net = torch.jit.load(str(path), map_location=device).eval()
        except RuntimeError as err:
            raise I3DWeightsError(f"{path}: not a TorchScript file ({err})") from None
        args = [a.name for a in self.net.forward.schema.arguments]
        self.stylegan_v = "return_features" in args
        self.device = torch.device(device)
        self.num_frames, self.size = num_frames, size

    def preprocess(self, video: Tensor, name: str = "video") -> Tensor:
        """uint8 (T, H, W, 3) -> float (3, num_frames, size, size) in [-1, 1]."""
        if video.shape[0] < self.num_frames:
            raise InputError(f"FVD: {name} has {video.shape[0]} frames, fewer than the {self.num_frames} used "
                             "(set --fvd-frames lower)")
        x = video[: self.num_frames].to(self.device).permute(0, 3, 1, 2).float()  # (T, 3, H, W)
        x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True)
        x = x / 127.5 - 1.0
        return x.permute(1, 0, 2, 3).clamp(-1.0, 1.0)  # (3, T, S, S)

    @torch.no_grad()
    def __call__(self, videos: Tensor) -> Tensor:
        """(B, 3, T, S, S) -> (B, D) float64."""
        if self.stylegan_v:
            out = self.net(videos, rescale=False, resize=False, return_features=True)
        else:
            out = self.net(videos)
        return out.reshape(videos.shape[0], -1).double().cpu()

    def features(self, videos: Iterable[tuple[str, Tensor]], batch_size: int = 4) -> Tensor:
        """(N, D) features of (name, uint8 video) pairs."""
        out, batch = [], []
        for name, video in videos:
            batch.append(self.preprocess(video, name))
            if len(batch) == batch_size:
                out.append(self(torch.stack(batch)))
                batch = []
        if batch:
            out.append(self(torch.stack(batch)))
        if not out:
            raise ValueError("FVD: no videos")
        return torch.cat(out)


VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm")


def list_videos(folder: str | os.PathLike) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise InputNotFoundError(f"video folder not found: {folder}")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES and not p.name.startswith("."))
    if not files:
        raise InputNotFoundError(f"{folder} holds no videos ({', '.join(VIDEO_SUFFIXES)})")
    return files


def fvd(i3d: I3DFeatures, generated: list[Path], reference: list[Path]) -> float:
    """FVD between two lists of video files (each needs >= 2 videos)."""
    from relvid.video_io import read_video

    if len(generated) < 2 or len(reference) < 2:
        raise InputError(f"FVD needs at least 2 generated and 2 reference videos, got {len(generated)} and "
                         f"{len(reference)}")
    gen = i3d.features((str(p), read_video(p, max_frames=i3d.num_frames)) for p in generated)
    ref = i3d.features((str(p), read_video(p, max_frames=i3d.num_frames)) for p in reference)
    return frechet_distance(ref, gen)

"""Subject masks for a clip, from one of four sources, on the clip's pixel grid (2, T, H, W).

- ``skeleton``: NTU skeletons (relvid.preprocess.skeleton_masks), exact identities, no weights.
- ``grounded-sam``: Grounding DINO boxes + SAM masks (relvid.preprocess.grounded_sam), weights from local folders.
- ``sam2``: Grounding DINO boxes on one frame, then SAM 2's video tracking (relvid.preprocess.masks_sam2).
- ``files``: the user's PNG folders or mask videos (relvid.preprocess.mask_files).
A ``fallback`` maker is used when the primary one has nothing to work with for a clip (an NTU sample
without a skeleton file, a video without mask files). The latent-grid step is
``relvid.preprocess.latent_grid.masks_to_latent_grid``.
"""

from __future__ import annotations

from typing import Protocol

from torch import Tensor

from relvid.preprocess.mask_files import load_mask_files
from relvid.preprocess.ntu import parse_skeleton
from relvid.preprocess.skeleton_masks import skeleton_masks
from relvid.preprocess.sources import Source
from relvid.preprocess.video import Clip, ClipSkipped

MASK_SOURCES = ("skeleton", "grounded-sam", "sam2", "files")


class MaskMaker(Protocol):
    name: str

    def available(self, source: Source) -> str | None:
        """None when this maker can mask ``source``, else why not (for the manifest)."""
        ...

    def __call__(self, source: Source, clip: Clip) -> Tensor:
        """(2, T, H, W) float masks in [0, 1] on the clip's frames."""
        ...


class SkeletonMaskMaker:
    name = "skeleton"

    def __init__(self, dilation: int | None = None) -> None:
        self.dilation = dilation

    def available(self, source: Source) -> str | None:
        if source.skeleton is None or not source.skeleton.is_file():
            return f"no skeleton file for {source.clip_id}"
        return None

    def __call__(self, source: Source, clip: Clip) -> Tensor:
        seq = parse_skeleton(source.skeleton)
        height, width = clip.frames.shape[1:3]
        return skeleton_masks(seq, clip.source_indices, clip.crop, height, width, self.dilation, clip.source_size)


class FileMaskMaker:
    name = "files"

    def __init__(self, colours: list[tuple[int, int, int]] | None = None) -> None:
        self.colours = colours

    def available(self, source: Source) -> str | None:
        if source.masks is None:
            return f"no mask folder or mask video for {source.video.name} (expected <masks>/{source.video.stem}/ " \
                   f"or <masks>/{source.video.stem}.mp4)"
        return None

    def __call__(self, source: Source, clip: Clip) -> Tensor:
        height, width = clip.frames.shape[1:3]
        return load_mask_files(source.masks, clip.source_indices, clip.crop, clip.source_size, height, width,
                               self.colours)


def make_masks(source: Source, clip: Clip, maker: MaskMaker, fallback: MaskMaker | None = None) -> tuple[Tensor, str]:
    """(masks (2, T, H, W), name of the maker used); ClipSkipped with the reasons when none can."""
    why = maker.available(source)
    if why is None:
        return maker(source, clip), maker.name
    if fallback is not None:
        why_fallback = fallback.available(source)
        if why_fallback is None:
            return fallback(source, clip), fallback.name
        raise ClipSkipped(f"{why}; fallback {fallback.name}: {why_fallback}")
    raise ClipSkipped(f"{why} (use --mask-fallback grounded-sam to mask such clips with a detector)")

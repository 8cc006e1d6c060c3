"""One prepared clip (video + subject masks + caption embedding) -> a ClipRecord for the cache."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from relvid.data.cache import ClipRecord
from relvid.models.codecs import Codec, codec_factors
from relvid.preprocess.latent_grid import masks_to_latent_grid
from relvid.preprocess.video import Clip, ClipSpec, to_model_range

LATENT_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class PreparedClip:
    """A clip ready to encode, from any source (a decoded video file, the toy world's renderer)."""

    video: Tensor  # (1, 3, T, H, W) float in [-1, 1], the codec's input
    masks: Tensor  # (2, T, H, W) subject masks in [0, 1] on the video's pixels, subject 1 first
    frame_range: str  # "first-last" frames of the source
    fps: float  # the clip's frame rate
    mask_source: str  # what made the masks (skeleton, grounded-sam, files, renderer ...)


def prepare_video_clip(clip: Clip, spec: ClipSpec, masks: Tensor, mask_source: str) -> PreparedClip:
    """A decoded video file's clip (``load_clip``) and its pixel masks as a PreparedClip."""
    first, last = clip.source_indices[0], clip.source_indices[-1]
    return PreparedClip(to_model_range(clip.frames), masks, f"{first}-{last}", spec.fps, mask_source)


def encode_clip(
    clip: PreparedClip,
    caption_embedding: tuple[Tensor, Tensor],
    codec: Codec,
    meta: dict[str, str],
    spatial_rule: str = "any",
    latent_dtype: str = "bf16",
) -> ClipRecord:
    """Encode the clip's video with ``codec`` and put its (2, T, H, W) pixel masks on the latent grid.

    ``meta`` gives clip_id, relation, caption, source and text_encoder; the codec, frame range, fps
    and mask source are filled here.
    """
    frames, height, width = clip.video.shape[2:]
    if clip.masks.shape != (2, frames, height, width):
        raise ValueError(f"subject masks have shape {tuple(clip.masks.shape)}, expected (2, {frames}, {height}, "
                         f"{width})")
    c, f, h, w = codec.latent_shape(frames, height, width)
    mean, logvar = codec.encode(clip.video)  # (1, C, f, h, w) each
    latent_masks = masks_to_latent_grid(clip.masks, codec.time_factor, codec.space_factor, spatial_rule)
    if latent_masks.shape != (2, f, h, w):
        raise ValueError(f"latent masks {tuple(latent_masks.shape)} do not match the latent grid {(2, f, h, w)}")
    subjects = latent_masks.clamp(0.0, 1.0).float()  # (2, f, h, w)
    embeds, text_mask = caption_embedding
    dtype = LATENT_DTYPES[latent_dtype]
    full_meta = {
        **meta,
        "frame_range": clip.frame_range,
        "fps": f"{clip.fps:g}",
        "mask_source": clip.mask_source,
        "codec": codec.name,
        "codec_factors": codec_factors(codec),
    }
    return ClipRecord(
        latent_mean=mean[0].to("cpu", dtype),
        latent_logvar=logvar[0].to("cpu", dtype),
        text_embeds=embeds.float().cpu(),
        text_mask=text_mask.bool().cpu(),
        subject_masks=subjects,
        # the paper's M_R: the union of the subjects in each video frame, then on the latent grid
        relation_mask=masks_to_latent_grid(clip.masks.amax(dim=0), codec.time_factor, codec.space_factor,
                                           spatial_rule).clamp(0.0, 1.0).float(),  # (f, h, w)
        meta=full_meta,
    )

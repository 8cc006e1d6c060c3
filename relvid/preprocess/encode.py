"""One prepared clip (frames + subject masks + caption embedding) -> a ClipRecord for the cache."""

from __future__ import annotations

import torch
from torch import Tensor

from relvid.data.cache import ClipRecord
from relvid.models.codecs import Codec, codec_factors
from relvid.preprocess.latent_grid import masks_to_latent_grid
from relvid.preprocess.video import Clip, to_model_range

LATENT_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def encode_clip(
    clip: Clip,
    masks: Tensor,
    caption_embedding: tuple[Tensor, Tensor],
    codec: Codec,
    meta: dict[str, str],
    spatial_rule: str = "any",
    latent_dtype: str = "bf16",
    fps: float = 30.0,
) -> ClipRecord:
    """Encode ``clip.frames`` with ``codec`` and put the (2, T, H, W) pixel masks on its latent grid.

    ``meta`` gives clip_id, relation, caption, source and text_encoder; the codec, frame range and
    fps (the clip's, after resampling) are filled here.
    """
    frames, height, width = clip.frames.shape[:3]
    if masks.shape != (2, frames, height, width):
        raise ValueError(f"subject masks have shape {tuple(masks.shape)}, expected (2, {frames}, {height}, {width})")
    c, f, h, w = codec.latent_shape(frames, height, width)
    mean, logvar = codec.encode(to_model_range(clip.frames))  # (1, C, f, h, w) each
    latent_masks = masks_to_latent_grid(masks, codec.time_factor, codec.space_factor, spatial_rule)  # (2, f, h, w)
    if latent_masks.shape != (2, f, h, w):
        raise ValueError(f"latent masks {tuple(latent_masks.shape)} do not match the latent grid {(2, f, h, w)}")
    embeds, text_mask = caption_embedding
    dtype = LATENT_DTYPES[latent_dtype]
    first, last = clip.source_indices[0], clip.source_indices[-1]
    full_meta = {
        **meta,
        "frame_range": f"{first}-{last}",
        "fps": f"{fps:g}",
        "codec": codec.name,
        "codec_factors": codec_factors(codec),
    }
    return ClipRecord(
        latent_mean=mean[0].to("cpu", dtype),
        latent_logvar=logvar[0].to("cpu", dtype),
        text_embeds=embeds.float().cpu(),
        text_mask=text_mask.bool().cpu(),
        subject_masks=latent_masks.clamp(0.0, 1.0).float(),
        meta=full_meta,
    )

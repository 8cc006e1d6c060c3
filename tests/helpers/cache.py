"""Hand-built clip records for the clip cache's tests."""

from __future__ import annotations

import torch

from relvid.data.cache import ClipRecord


def make_record(clip_id: str = "clip_a", relation: str = "hugging", c: int = 2, f: int = 3, h: int = 4, w: int = 6,
                n_tokens: int = 3, dim: int = 8, relation_mask: bool = True,
                dtype: torch.dtype = torch.bfloat16) -> ClipRecord:
    """A small, valid record with fixed random tensors and two disjoint subject masks."""
    g = torch.Generator().manual_seed(0)
    subjects = torch.zeros(2, f, h, w)
    subjects[0, :, :2, :3] = 1.0
    subjects[1, :, 2:, 3:] = 0.5
    return ClipRecord(
        latent_mean=torch.randn(c, f, h, w, generator=g).to(dtype),
        latent_logvar=torch.full((c, f, h, w), -4.0).to(dtype),
        text_embeds=torch.randn(n_tokens, dim, generator=g),
        text_mask=torch.ones(n_tokens, dtype=torch.bool),
        subject_masks=subjects,
        relation_mask=subjects.amax(0) if relation_mask else None,
        meta={"clip_id": clip_id, "relation": relation, "caption": "A person is hugging a person.",
              "source": f"videos/{clip_id}.mp4", "frame_range": "0-12", "fps": "30", "codec": "toy",
              "codec_factors": "6,8,8", "text_encoder": "toy-words"})

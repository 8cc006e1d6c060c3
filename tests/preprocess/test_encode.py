"""One prepared clip -> its cache record: the relation mask is the union of the subjects in each
video frame, put on the latent grid afterwards (the paper's M_R; clip format 2)."""

import torch

from relvid.losses.flow_matching import relation_mask
from relvid.preprocess.encode import PreparedClip, encode_clip
from relvid.toy.codec import ToyCodec


def test_the_relation_mask_is_the_per_frame_union_of_the_subjects():
    codec = ToyCodec()
    t, s = codec.time_factor, codec.space_factor
    frames, size = 1 + 2 * t, 4 * s
    masks = torch.zeros(2, frames, size, size)
    # one latent cell, crossed in turn within latent frame 1: subject 1 in its first half, subject 2 after
    half = 1 + t // 2
    masks[0, 1:half, :s, :s] = 1.0
    masks[1, half:1 + t, :s, :s] = 1.0
    masks[0, :, -s:, -s:] = 1.0  # a cell subject 1 holds all the time
    clip = PreparedClip(video=torch.zeros(1, 3, frames, size, size), masks=masks, frame_range=f"0-{frames - 1}",
                        fps=30.0, mask_source="test")
    record = encode_clip(clip, (torch.zeros(3, 8), torch.ones(3, dtype=torch.bool)), codec,
                         {"clip_id": "c", "relation": "r", "caption": "x", "source": "s", "text_encoder": "toy"})
    assert record.relation_mask[1, 0, 0] == 1.0  # covered in every video frame of latent frame 1
    by_max = relation_mask(record.subject_masks[None], "max")[0]
    assert by_max[1, 0, 0] == max((half - 1) / t, (1 + t - half) / t) < 1.0  # the max of the two averages
    assert relation_mask(record.subject_masks[None], "union", stored=record.relation_mask[None])[0][1, 0, 0] == 1.0
    assert record.relation_mask[1, -1, -1] == by_max[1, -1, -1] == 1.0
    assert relation_mask(record.subject_masks[None], "sum")[0][1, 0, 0] == 1.0  # 1/2 + 1/2 (t even)

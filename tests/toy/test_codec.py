"""The toy codec is exact (decode(encode(x)) == x) with Mochi's temporal grouping; the word encoder
is deterministic and binds each colour to the shape it precedes."""

import pytest
import torch

from relvid.components import load_codec, load_text_encoder
from relvid.models.codecs import CodecError, codec_factors
from relvid.toy.codec import ToyCodec
from relvid.toy.world import FRAMES, SIZE


def test_round_trip_is_exact_and_latents_have_mochi_grouping():
    codec = load_codec("toy")
    video = torch.rand(2, 3, FRAMES, SIZE, SIZE, generator=torch.Generator().manual_seed(0)) * 2 - 1
    mean, logvar = codec.encode(video)
    assert mean.shape == (2, *codec.latent_shape(FRAMES, SIZE, SIZE)) == (2, 36, 5, 16, 16)
    assert torch.allclose(codec.decode(mean), video, atol=1e-5)
    assert bool((logvar < -20).all())  # a delta posterior: sampling it changes nothing visible
    # latent frame 1 holds video frames 1..3 only: changing frame 4 leaves it alone
    changed = video.clone()
    changed[:, :, 4] = 0.0
    mean2, _ = codec.encode(changed)
    assert torch.equal(mean2[:, :, :2], mean[:, :, :2]) and not torch.equal(mean2[:, :, 2], mean[:, :, 2])
    assert codec_factors(codec) == "3,2,2"


def test_wrong_sizes_name_the_fix():
    with pytest.raises(CodecError, match="3k\\+1"):
        ToyCodec().latent_shape(24, SIZE, SIZE)
    with pytest.raises(CodecError, match="multiple of 2"):
        ToyCodec().latent_shape(FRAMES, 31, SIZE)


def test_text_encoder_is_deterministic_and_binds_colours_to_shapes():
    enc = load_text_encoder("toy")
    a = enc.encode(["A red circle and a blue square are resting."])[0][0]
    again = type(enc)().encode(["A red circle and a blue square are resting."])[0][0]
    swapped = enc.encode(["A blue circle and a red square are resting."])[0][0]
    assert torch.equal(a, again)
    assert a.shape == (10, enc.dim)  # 9 words + end token
    # same bag of words, different binding: the shape tokens differ
    assert not torch.allclose(a, swapped)
    empty, mask = enc.encode([""])[0]
    assert empty.shape == (1, enc.dim) and bool(mask.all())

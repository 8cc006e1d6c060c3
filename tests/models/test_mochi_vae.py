"""MochiCodec over a tiny random AutoencoderKLMochi saved to a local folder."""

import json

import pytest
import torch

from relvid.components import load_codec
from relvid.models.backbone import WeightsNotFoundError
from relvid.models.codecs import Codec, CodecError
from relvid.models.mochi_vae import MochiCodec
from tests.helpers.preprocess import TINY_LATENTS_MEAN, TINY_LATENTS_STD, save_tiny_vae, tiny_vae


@pytest.fixture(scope="module")
def vae_root(tmp_path_factory):
    return save_tiny_vae(tmp_path_factory.mktemp("mochi"))


def test_loads_pipeline_root_or_vae_folder_and_meets_the_protocol(vae_root):
    for path in (vae_root, vae_root / "vae"):
        codec = MochiCodec.from_folder(path)
        assert isinstance(codec, Codec)
        assert (codec.name, codec.time_factor, codec.space_factor, codec.latent_channels) == ("mochi-vae", 6, 8, 4)
        assert codec.latent_shape(13, 32, 48) == (4, 3, 4, 6)
    assert isinstance(load_codec("mochi", str(vae_root)), MochiCodec)


def test_encode_shapes_and_normalization_against_the_raw_posterior(vae_root):
    codec = MochiCodec.from_folder(vae_root, tiling=False)
    video = torch.rand(2, 3, 13, 32, 48, generator=torch.Generator().manual_seed(0)) * 2 - 1
    mean, logvar = codec.encode(video)
    assert mean.shape == logvar.shape == (2, 4, 3, 4, 6) and mean.dtype == torch.float32
    with torch.no_grad():
        raw = codec.vae.encode(video[1:]).latent_dist
    m = torch.tensor(TINY_LATENTS_MEAN).view(1, 4, 1, 1, 1)
    s = torch.tensor(TINY_LATENTS_STD).view(1, 4, 1, 1, 1)
    torch.testing.assert_close(mean[1:], (raw.mean - m) / s, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logvar[1:], raw.logvar - 2 * torch.log(s), rtol=1e-4, atol=1e-5)
    # A normalized latent's noise keeps the same relative size: std_n = std_raw / s.
    torch.testing.assert_close(torch.exp(0.5 * logvar[1:]), raw.std / s, rtol=1e-4, atol=1e-6)


def test_scaling_factor_in_the_config_is_honoured(tmp_path):
    root = save_tiny_vae(tmp_path, scaling_factor=2.0)
    codec = MochiCodec.from_folder(root, tiling=False)
    video = torch.zeros(1, 3, 7, 16, 16)
    mean, _ = codec.encode(video)
    with torch.no_grad():
        raw = codec.vae.encode(video).latent_dist.mean
    m = torch.tensor(TINY_LATENTS_MEAN).view(1, 4, 1, 1, 1)
    s = torch.tensor(TINY_LATENTS_STD).view(1, 4, 1, 1, 1)
    torch.testing.assert_close(mean, (raw - m) * 2.0 / s, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(codec.decode(mean), codec.vae.decode(raw).sample.clamp(-1, 1), rtol=1e-4, atol=1e-4)


def test_decode_matches_mochi_pipeline_output(tmp_path):
    """Our decode of the pipeline's latents equals MochiPipeline's own decoded video (12-channel VAE)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, MochiPipeline

    from relvid.models.backbone import tiny_transformer
    from tests.helpers.preprocess import tiny_t5, tiny_t5_tokenizer

    vae = tiny_vae(latent_channels=12)
    pipe = MochiPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=tiny_t5(), tokenizer=tiny_t5_tokenizer(),
        transformer=tiny_transformer(in_channels=12, text_embed_dim=32),
    )
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(prompt="a dog", num_frames=7, height=32, width=48, num_inference_steps=2, max_sequence_length=16)
    latents = pipe(**kwargs, generator=torch.Generator().manual_seed(0), output_type="latent").frames
    video = pipe(**kwargs, generator=torch.Generator().manual_seed(0),
                 output_type="pt").frames  # (B, T, 3, H, W) in [0, 1]
    ours = MochiCodec(vae, tiling=False).decode(latents)  # (B, 3, T, H, W) in [-1, 1]
    torch.testing.assert_close(ours.permute(0, 2, 1, 3, 4) / 2 + 0.5, video.float(), rtol=1e-4, atol=1e-4)


def test_round_trip_through_normalization_is_the_vae_round_trip(vae_root):
    codec = MochiCodec.from_folder(vae_root, tiling=False)
    video = torch.rand(1, 3, 7, 16, 24, generator=torch.Generator().manual_seed(1)) * 2 - 1
    mean, _ = codec.encode(video)
    with torch.no_grad():
        direct = codec.vae.decode(codec.vae.encode(video).latent_dist.mean).sample.clamp(-1, 1)
    out = codec.decode(mean)
    assert out.shape == video.shape
    torch.testing.assert_close(out, direct, rtol=1e-4, atol=1e-4)


def test_tiled_encode_keeps_the_shape(vae_root):
    codec = MochiCodec.from_folder(vae_root, tile=32, tile_stride=24)
    assert codec.vae.use_tiling
    video = torch.rand(1, 3, 7, 48, 64, generator=torch.Generator().manual_seed(2)) * 2 - 1
    mean, logvar = codec.encode(video)
    assert mean.shape == logvar.shape == (1, 4, 2, 6, 8)
    assert torch.isfinite(mean).all() and torch.isfinite(logvar).all()
    assert codec.decode(mean).shape == video.shape


def test_bad_sizes_and_missing_weights_are_clear_errors(vae_root, tmp_path):
    codec = MochiCodec.from_folder(vae_root)
    with pytest.raises(CodecError, match="6k\\+1"):
        codec.encode(torch.zeros(1, 3, 8, 16, 16))
    with pytest.raises(CodecError, match="multiple of 8"):
        codec.latent_shape(7, 20, 16)
    with pytest.raises(WeightsNotFoundError, match="genmo/mochi-1-preview"):
        MochiCodec.from_folder(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsNotFoundError, match="vae/config.json"):
        MochiCodec.from_folder(tmp_path / "empty")
    broken = tmp_path / "broken" / "vae"
    broken.mkdir(parents=True)
    (broken / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKLMochi"}))
    with pytest.raises(WeightsNotFoundError, match="incomplete"):
        MochiCodec.from_folder(broken.parent)
    with pytest.raises(WeightsNotFoundError, match="not configured"):
        MochiCodec.from_folder(None)

"""`relvid sample` / `evaluate` sample with the fast attention path of the config's speed section, free the
text encoder before the transformer loads, hold one VAE and bring it to the GPU for the decode only."""

import gc
import weakref

import pytest
import torch
from diffusers.models.attention_processor import MochiAttnProcessor2_0

import relvid.components as components
from relvid.cli import main
from relvid.config import SamplingConfig, load_config
from relvid.inference.generate import generate_video
from relvid.inference.sampler import sample
from relvid.models.attention import PackedMochiAttnProcessor
from relvid.video_io import read_video
from tests.helpers.configs import TINY, TOY_CHANNELS

TOY_MODEL = ["model.preset=tiny", "model.codec=toy", "model.text_encoder=toy", f"model.tiny.in_channels={TOY_CHANNELS}"]


def processors(transformer) -> set[type]:
    return {type(block.attn1.processor) for block in transformer.transformer_blocks}


def test_generation_parts_take_the_speed_section_and_match_the_reference():
    cfg = load_config([], TOY_MODEL)
    transformer, codec, text = components.load_generation_parts(cfg.model, torch.device("cpu"), speed=cfg.speed)
    assert processors(transformer) == {PackedMochiAttnProcessor}  # the default: speed.attention=auto
    assert transformer._relvid_text_plan_hook is not None
    # one sample, CFG with prompts of different lengths (a padded batch of 2), packed vs diffusers' processor
    (pos_e, pos_m), (neg_e, neg_m) = text.encode(["a dog is shaking hands with a cat", ""])
    noise = torch.randn(1, *codec.latent_shape(7, 16, 16), generator=torch.Generator().manual_seed(0))
    args = (noise, pos_e[None], pos_m[None], neg_e[None], neg_m[None])
    packed = sample(transformer, *args, num_steps=3, guidance_scale=4.0)
    reference_cfg = load_config([], [*TOY_MODEL, "speed.attention=diffusers"])
    reference, _, _ = components.load_generation_parts(reference_cfg.model, torch.device("cpu"),
                                                       speed=reference_cfg.speed, text_encoder=False)
    assert processors(reference) == {MochiAttnProcessor2_0}
    torch.testing.assert_close(packed, sample(reference, *args, num_steps=3, guidance_scale=4.0),
                               atol=1e-5, rtol=1e-5)


def test_save_attention_is_a_training_setting_only():
    """Sampling has no gradients: a transformer without checkpointing still takes a training speed section."""
    cfg = load_config([], [*TOY_MODEL, "speed.checkpoint=save_attention", "speed.sdpa_backend=math"])
    cfg.model.gradient_checkpointing = False
    transformer, _, _ = components.load_generation_parts(cfg.model, torch.device("cpu"), speed=cfg.speed,
                                                         text_encoder=False)
    assert processors(transformer) == {PackedMochiAttnProcessor}
    assert transformer.transformer_blocks[0].attn1.processor.sdpa_backend == "math"


def test_relvid_sample_uses_the_speed_section(tmp_path, monkeypatch):
    built = []
    real = components.load_generation_parts

    def spy(*args, **kwargs):
        parts = real(*args, **kwargs)
        built.append(parts[0])
        return parts

    monkeypatch.setattr(components, "load_generation_parts", spy)
    videos = {}
    for name, extra in (("packed", []), ("diffusers", ["--set", "speed.attention=diffusers"])):
        out = tmp_path / name
        assert main(["sample", "--prompt", "a dog is shaking hands with a cat", "--out", str(out), "--base",
                     *TINY, *extra]) == 0
        videos[name] = read_video(next(out.glob("*.mp4")))
    assert processors(built[0]) == {PackedMochiAttnProcessor}
    assert processors(built[1]) == {MochiAttnProcessor2_0}
    # the two transformers agree to float rounding ...
    g = torch.Generator().manual_seed(0)
    inputs = dict(hidden_states=torch.randn(1, built[0].config.in_channels, 2, 4, 4, generator=g),
                  encoder_hidden_states=torch.randn(1, 5, built[0].config.text_embed_dim, generator=g),
                  timestep=torch.tensor([500.0]), encoder_attention_mask=torch.tensor([[1, 1, 1, 0, 0]]).bool(),
                  return_dict=False)
    with torch.no_grad():
        assert torch.allclose(built[0](**inputs)[0], built[1](**inputs)[0], atol=1e-5)
    # ... so the videos agree up to mp4 coding, where a pixel rounded the other way can move a whole block
    difference = (videos["packed"].float() - videos["diffusers"].float()).abs()
    assert difference.mean() < 4


@pytest.fixture(scope="module")
def mochi_folder(tmp_path_factory):
    """A pipeline root with a tiny Mochi VAE and a tiny T5 (d_model 32, the tiny transformer's text width)."""
    from tests.helpers.preprocess import save_tiny_t5, save_tiny_vae

    root = tmp_path_factory.mktemp("mochi")
    save_tiny_vae(root)
    save_tiny_t5(root, d_model=32)
    return root


def test_relvid_sample_frees_t5_before_the_transformer_and_loads_one_vae(tmp_path, monkeypatch, mochi_folder):
    import diffusers

    from relvid.models import backbone, t5

    encoders, alive_at_transformer_load, vaes = [], [], []
    real_t5, real_transformer = t5.T5TextEncoder.from_folder.__func__, backbone.load_transformer
    real_vae = diffusers.AutoencoderKLMochi.from_pretrained.__func__

    def spy_t5(cls, *args, **kwargs):
        encoder = real_t5(cls, *args, **kwargs)
        encoders.append(weakref.ref(encoder.model))
        return encoder

    def spy_transformer(*args, **kwargs):
        alive_at_transformer_load.append([ref() is not None for ref in encoders])
        return real_transformer(*args, **kwargs)

    def spy_vae(cls, *args, **kwargs):
        vaes.append(args[0] if args else kwargs)
        return real_vae(cls, *args, **kwargs)

    monkeypatch.setattr(t5.T5TextEncoder, "from_folder", classmethod(spy_t5))
    monkeypatch.setattr(backbone, "load_transformer", spy_transformer)
    monkeypatch.setattr(diffusers.AutoencoderKLMochi, "from_pretrained", classmethod(spy_vae))
    args = ["sample", "--prompt", "a dog is shaking hands with a cat", "--out", str(tmp_path / "out"), "--base",
            "--model-path", str(mochi_folder), "--set", "model.preset=tiny", "--device", "cpu", "--steps", "2",
            "--frames", "7", "--height", "32", "--width", "32", "--seed", "4"]
    assert main(args) == 0
    assert len(encoders) == 1 and alive_at_transformer_load == [[False]]  # encoded, freed, then the transformer
    assert len(vaes) == 1
    assert read_video(next((tmp_path / "out").glob("*.mp4"))).shape == (7, 32, 32, 3)


def test_encode_texts_returns_cpu_embeddings_and_frees_the_encoder(monkeypatch, mochi_folder):
    from relvid.models import t5

    cfg = load_config([], ["model.preset=tiny", f"model.path={mochi_folder}"])
    held = []
    real = t5.T5TextEncoder.from_folder.__func__

    def spy(cls, *args, **kwargs):
        encoder = real(cls, *args, **kwargs)
        held.append(weakref.ref(encoder.model))
        return encoder

    monkeypatch.setattr(t5.T5TextEncoder, "from_folder", classmethod(spy))
    encoded = components.encode_texts(cfg.model, ["a dog", ""], "cpu")
    assert set(encoded) == {"a dog", ""} and held[0]() is None
    embeds, mask = encoded["a dog"]
    assert embeds.device.type == "cpu" and embeds.dim() == 2 and mask.shape == embeds.shape[:1]
    assert components.encode_texts(cfg.model, [], "cpu") == {} and len(held) == 1  # nothing to encode: no load


def test_load_codec_shares_one_vae_while_it_is_held(mochi_folder):
    first = components.load_codec("mochi", mochi_folder)
    assert components.load_codec("mochi", str(mochi_folder)) is first  # e.g. previews and relation accuracy
    assert components.load_codec("mochi", mochi_folder, tiling=False) is not first  # other settings: its own
    held = weakref.ref(first)
    del first
    gc.collect()
    assert held() is None  # shared, not kept: a VAE nobody holds is freed as before


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_a_gpu_the_vae_is_there_for_the_decode_only(mochi_folder):
    cfg = load_config([], ["model.preset=tiny", f"model.path={mochi_folder}"])
    device = torch.device("cuda")
    encoded = components.encode_texts(cfg.model, ["a dog is shaking hands with a cat", ""], device)
    assert {e.device.type for e, _ in encoded.values()} == {"cpu"}  # T5's outputs do not stay on the GPU
    transformer, codec, text = components.load_generation_parts(cfg.model, device, speed=cfg.speed,
                                                                 text_encoder=False)
    assert text is None and next(codec.vae.parameters()).device.type == "cpu"
    assert next(codec.vae.parameters()).dtype == torch.bfloat16  # the dtype it decodes in on a GPU
    seen = []
    codec.vae.decoder.register_forward_pre_hook(lambda module, args: seen.append(args[0].device.type))
    frames = generate_video(transformer, codec, *encoded["a dog is shaking hands with a cat"], encoded[""], seed=0,
                            settings=SamplingConfig(num_steps=2, frames=7, height=32, width=32), device=device)
    assert frames.shape == (7, 32, 32, 3)
    assert seen and set(seen) == {"cuda"}  # decoded on the GPU
    assert next(codec.vae.parameters()).device.type == "cpu"  # and back on the CPU afterwards

"""generate_video with the toy codec and a tiny Mochi transformer: shape, seeds, negative prompt."""

import pytest
import torch

from relvid.config import SamplingConfig
from relvid.inference.generate import generate_video, initial_noise
from relvid.models.backbone import tiny_transformer
from relvid.toy.codec import ToyCodec
from relvid.toy.text import ToyTextEncoder

SETTINGS = SamplingConfig(num_steps=3, guidance_scale=4.0, frames=7, height=16, width=16)


@pytest.fixture(scope="module")
def parts():
    codec, text = ToyCodec(), ToyTextEncoder()
    model = tiny_transformer(seed=0, in_channels=codec.latent_channels, text_embed_dim=text.dim).eval()
    (pos, neg) = text.encode(["A dog is shaking hands with a cat.", ""])
    return model, codec, pos, neg


def test_video_shape_and_seed_reproducibility(parts):
    model, codec, (e, m), neg = parts
    a = generate_video(model, codec, e, m, neg, seed=3, settings=SETTINGS)
    b = generate_video(model, codec, e, m, neg, seed=3, settings=SETTINGS)
    c = generate_video(model, codec, e, m, neg, seed=4, settings=SETTINGS)
    assert a.shape == (7, 16, 16, 3) and a.dtype == torch.uint8
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_noise_is_a_function_of_the_seed_only(parts):
    _, codec, _, _ = parts
    torch.manual_seed(123)  # the global stream does not matter
    n1 = initial_noise(codec, SETTINGS, 5)
    torch.manual_seed(999)
    n2 = initial_noise(codec, SETTINGS, 5)
    assert n1.shape == (1, *codec.latent_shape(SETTINGS.frames, SETTINGS.height, SETTINGS.width))
    assert torch.equal(n1, n2)


def test_guidance_uses_the_negative_prompt(parts):
    model, codec, (e, m), neg = parts
    with_cfg = generate_video(model, codec, e, m, neg, seed=0, settings=SETTINGS)
    no_neg = generate_video(model, codec, e, m, None, seed=0, settings=SETTINGS)
    assert not torch.equal(with_cfg, no_neg)


def test_bad_settings_are_refused(parts):
    with pytest.raises(ValueError, match="num_steps"):
        SamplingConfig(num_steps=1)
    model, codec, (e, m), neg = parts
    with pytest.raises(ValueError, match="is not 3k\\+1"):
        generate_video(model, codec, e, m, neg, seed=0,
                       settings=SamplingConfig(num_steps=2, frames=8, height=16, width=16))


# --- relvid sample: adapters from every accepted source, sidecars, reproducibility ---------------

import json  # noqa: E402

from relvid.cli import main  # noqa: E402
from relvid.models.adapter_file import apply_adapter_source  # noqa: E402
from relvid.models.lora import adapter_state_dict, lora_parameters  # noqa: E402
from relvid.models.lora_io import export_state_dict  # noqa: E402
from relvid.video_io import read_video  # noqa: E402
from tests.helpers.configs import TINY  # noqa: E402


def sample(tmp_path, name, *extra):
    assert main(["sample", "--prompt", "A dog is shaking hands with a cat.", "--out", str(tmp_path / name),
                 *TINY, *extra]) == 0
    return sorted((tmp_path / name).glob("*.mp4"))


def test_sample_writes_videos_and_sidecars_reproducibly(tmp_path, trained_adapters):
    adapters, model, spec = trained_adapters
    a = sample(tmp_path, "a", "--adapters", str(adapters.parent), "--seeds", "0", "1")
    b = sample(tmp_path, "b", "--adapters", str(adapters), "--seed", "0")
    base = sample(tmp_path, "base", "--base", "--seeds", "0")
    assert len(a) == 2 and len(b) == 1
    saved = (tmp_path / "a" / "config.yaml").read_text()  # the resolved config, beside the videos
    assert "  num_steps: 2\n" in saved and "adapters: " + str(adapters.parent) in saved
    assert torch.equal(read_video(a[0]), read_video(b[0]))  # same seed, same video
    assert not torch.equal(read_video(a[0]), read_video(a[1]))  # other seed
    assert not torch.equal(read_video(a[0]), read_video(base[0]))  # the adapters act
    side = json.loads(a[0].with_suffix(".json").read_text())
    assert side["prompt"] == "A dog is shaking hands with a cat." and side["seed"] == 0
    assert side["settings"]["num_steps"] == 2 and side["settings"]["fps"] == 30
    import hashlib

    assert side["adapters_sha256"] == hashlib.sha256(adapters.read_bytes()).hexdigest()
    assert side["adapters"]["kind"] == "relvid"
    assert json.loads(base[0].with_suffix(".json").read_text())["adapters_sha256"] is None


def test_sample_accepts_diffusers_exports_and_checkpoints(tmp_path, trained_adapters):
    adapters, model, spec = trained_adapters
    ours = sample(tmp_path, "ours", "--adapters", str(adapters))
    export = export_state_dict(adapter_state_dict(model), spec, tmp_path / "export")
    via_diffusers = sample(tmp_path, "diffusers", "--adapters", str(export))
    assert json.loads(via_diffusers[0].with_suffix(".json").read_text())["adapters"]["kind"] == "diffusers"
    # The two sources make the same transformer (to float precision) ...
    inputs = dict(hidden_states=torch.randn(1, 4, 2, 8, 8, generator=torch.Generator().manual_seed(0)),
                  encoder_hidden_states=torch.randn(1, 6, 32, generator=torch.Generator().manual_seed(1)),
                  timestep=torch.tensor([500.0]), encoder_attention_mask=torch.ones(1, 6, dtype=torch.bool),
                  return_dict=False)
    outputs = []
    for source in (adapters, export):
        transformer = tiny_transformer()
        apply_adapter_source(transformer, source)
        with torch.no_grad():
            outputs.append(transformer(**inputs)[0])
    assert torch.allclose(outputs[0], outputs[1], atol=1e-5)
    # ... and so the same video, up to mp4 coding of pixels that rounded the other way
    difference = (read_video(ours[0]).float() - read_video(via_diffusers[0]).float()).abs()
    assert difference.mean() < 4  # a pixel rounded the other way can move a whole mp4 block
    # a training checkpoint holds the LoRA tensors under "transformer.<module>.lora_A.<adapter>.weight"
    state = {f"transformer.{k}": v for k, v in lora_parameters(model).items()}
    torch.save({"state_dict": state, "relvid": {"spec": spec.to_dict()}}, tmp_path / "step8.ckpt")
    via_ckpt = sample(tmp_path, "ckpt", "--adapters", str(tmp_path / "step8.ckpt"))
    assert torch.equal(read_video(ours[0]), read_video(via_ckpt[0]))


def test_sample_errors_are_one_line(tmp_path, capsys, monkeypatch):
    assert main(["sample", "--prompt", "x", "--adapters", str(tmp_path / "nope"), "--out", str(tmp_path), *TINY]) == 2
    assert "adapter source not found" in capsys.readouterr().err
    monkeypatch.chdir(tmp_path)  # without --adapters: the relation's run, outputs/<relation>/adapters
    assert main(["sample", "--prompt", "x", "--out", str(tmp_path), *TINY]) == 2
    assert "--base" in capsys.readouterr().err
    assert main(["sample", "--relation", "handshake", *TINY]) == 2
    assert "outputs/shaking_hands/adapters" in capsys.readouterr().err


def test_sample_with_tiny_mochi_vae_and_t5_folders(tmp_path):
    """The real pipeline pieces (AutoencoderKLMochi, T5) read from a pipeline-root folder."""
    from tests.helpers.preprocess import save_tiny_t5, save_tiny_vae

    root = tmp_path / "mochi"
    save_tiny_vae(root)
    save_tiny_t5(root, d_model=32)
    args = ["sample", "--prompt", "a dog is shaking hands with a cat", "--out", str(tmp_path / "out"),
            "--base", "--model-path", str(root), "--set", "model.preset=tiny", "--device", "cpu", "--steps", "2",
            "--frames", "7", "--height", "32", "--width", "32", "--seed", "4"]
    assert main(args) == 0
    assert main([*args[:4], str(tmp_path / "again"), *args[5:]]) == 0
    first, again = next((tmp_path / "out").glob("*.mp4")), next((tmp_path / "again").glob("*.mp4"))
    video = read_video(first)
    assert video.shape == (7, 32, 32, 3)
    assert torch.equal(video, read_video(again))

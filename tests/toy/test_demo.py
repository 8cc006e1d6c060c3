"""The toy world end to end on a tiny random base: exemplar cache -> DreamRelation and direct LoRA
through relvid.training.run.run -> sampling -> judging -> results.json, grid, mp4s, TensorBoard logs, and
a diffusers LoRA file that MochiPipeline.load_lora_weights loads into the base folder."""

import dataclasses
import json

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, MochiPipeline, MochiTransformer3DModel

from relvid.data.cache import CacheError, ClipCache
from relvid.models.backbone import find_transformer_folder
from relvid.toy.codec import ToyCodec
from relvid.toy.drivers.base import BASE_CONFIG, BASE_DIR
from relvid.toy.drivers.customize import load_customized
from relvid.toy.drivers.datasets import build_exemplar_cache
from relvid.toy.drivers.demo import run_demo
from relvid.toy.drivers.evaluate import METRICS, TOY_SAMPLING
from relvid.toy.text import ToyTextEncoder
from relvid.toy.world import FRAMES, SIZE
from relvid.video_io import read_video
from tests.helpers.tiny_models import tiny_toy_base


def test_exemplar_cache_follows_the_clip_cache_contract(tmp_path):
    cache = build_exemplar_cache(tmp_path / "cache", ["orbiting"], clips=3, progress=False)
    assert cache.validate() == []
    record = ClipCache(tmp_path / "cache").read("orbiting_000")
    assert record.meta["caption"] == "A white circle is orbiting a white square."
    assert record.meta["codec"] == "toy" and record.meta["codec_factors"] == "3,2,2"
    assert record.latent_mean.shape == (36, 5, 16, 16) and record.subject_masks.shape == (2, 5, 16, 16)
    assert torch.equal(record.relation_mask, record.subject_masks.amax(dim=0))
    prompts = cache.read_prompts()
    assert "" in prompts and "A red circle is orbiting a green square." in prompts


def test_exemplar_cache_of_other_clips_is_refused_and_a_grown_one_keeps_its_relations(tmp_path):
    cache = build_exemplar_cache(tmp_path / "cache", ["orbiting"], clips=1, progress=False)
    build_exemplar_cache(tmp_path / "cache", ["pushing"], clips=1, progress=False)  # grows the same cache
    assert ClipCache(tmp_path / "cache").manifest["config"]["relations"] == ["orbiting", "pushing"]
    manifest = json.loads(cache.manifest_path.read_text())
    del manifest["config"]["staging"]  # a cache made before exemplars were staged
    cache.manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(CacheError, match=r"staging.*Fix: delete"):
        build_exemplar_cache(tmp_path / "cache", ["orbiting"], clips=1, progress=False)


def test_demo_end_to_end_on_a_tiny_toy_base(tmp_path):
    base = tmp_path / "base"
    tiny_toy_base(base)
    out = tmp_path / "demo"
    results = run_demo(out, relation="orbiting", n_prompts=2, base_dir=base, progress=False,
                       overrides=["trainer.max_steps=2", "data.batch_size=2", "optim.warmup_steps=1"],
                       settings=dataclasses.replace(TOY_SAMPLING, num_steps=3))

    saved = json.loads((out / "results.json").read_text())
    assert saved == results and set(saved) == {"base", "direct_lora", "dreamrelation"}
    for row in saved.values():
        assert set(row) == set(METRICS) and all(0.0 <= v <= 1.0 for v in row.values())
    assert (out / "grid.png").stat().st_size > 0 and (out / "table.md").is_file()
    info = json.loads((out / "demo.json").read_text())  # what was run is saved with the results
    assert info["relation"] == "orbiting" and len(info["prompts"]) == 2
    assert info["overrides"][-1] == "optim.warmup_steps=1"
    assert info["sampling"]["num_steps"] == 3 and info["sampling"]["guidance_scale"] == TOY_SAMPLING.guidance_scale
    videos = sorted((out / "videos" / "dreamrelation").glob("*.mp4"))
    assert len(videos) == 2 and read_video(videos[0]).shape == (FRAMES, 128, 128, 3)
    assert list((out / "runs" / "dreamrelation" / "tensorboard").rglob("events.out.tfevents.*"))

    # The exported diffusers LoRA loads into the base folder and reproduces our inference model.
    ours = load_customized(out / "runs" / "dreamrelation" / "adapters" / "relvid_adapters.safetensors", base)
    pipe = MochiPipeline(scheduler=FlowMatchEulerDiscreteScheduler(invert_sigmas=True), vae=None,
                         text_encoder=None, tokenizer=None,
                         transformer=MochiTransformer3DModel.from_pretrained(base))
    pipe.load_lora_weights(out / "dreamrelation_lora")
    embeds, mask = ToyTextEncoder().encode(["A red circle is orbiting a green square."])[0]
    x = dict(hidden_states=torch.randn(1, *ToyCodec().latent_shape(FRAMES, SIZE, SIZE),
                                       generator=torch.Generator().manual_seed(0)),
             encoder_hidden_states=embeds[None], timestep=torch.tensor([500.0]), encoder_attention_mask=mask[None],
             return_dict=False)
    with torch.no_grad():
        assert torch.allclose(pipe.transformer(**x)[0], ours(**x)[0], atol=1e-5)


def test_demo_command_samples_at_the_guidance_asked(tmp_path):
    from relvid.cli import main

    base = tmp_path / "base"
    tiny_toy_base(base)
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--relation", "pushing", "--prompts", "1", "--base", str(base),
                 "--guidance", "2.5", "--quiet", "--set", "trainer.max_steps=1", "--set", "data.batch_size=1",
                 "--set", "optim.warmup_steps=1"]) == 0
    info = json.loads((out / "demo.json").read_text())
    assert info["sampling"]["guidance_scale"] == 2.5 and info["relation"] == "pushing"
    assert set(json.loads((out / "results.json").read_text())) == {"base", "direct_lora", "dreamrelation"}


def test_committed_base_loads_and_fits_the_toy_codec_and_encoder():
    folder = find_transformer_folder(BASE_DIR)
    config = json.loads((folder / "config.json").read_text())
    assert {k: config[k] for k in BASE_CONFIG} == BASE_CONFIG
    assert config["in_channels"] == ToyCodec().latent_channels and config["text_embed_dim"] == ToyTextEncoder().dim
    size = sum(f.stat().st_size for f in folder.iterdir())
    assert size < 8_000_000  # a few MB, committed to git


def _tiny_customization(tmp_path, method: str, steps: int, *overrides: str):
    """A few steps of a toy method on 'bouncing' (2 exemplars) over a tiny random base: (adapter file, base)."""
    from relvid.toy.drivers.customize import customize

    base = tmp_path / "base"
    tiny_toy_base(base)
    build_exemplar_cache(tmp_path / "cache", ["bouncing"], clips=2, progress=False)
    path = customize(method, "bouncing", tmp_path / "cache", tmp_path / "run", base_dir=base,
                     overrides=[f"trainer.max_steps={steps}", "trainer.progress_bar=false", "data.batch_size=1",
                                "optim.warmup_steps=1", *overrides])
    return path, base


def test_ablation_keeps_the_removed_adapters_at_zero(tmp_path):
    from relvid.models.adapter_file import load_adapters

    path, _ = _tiny_customization(tmp_path, "wo_subject_lora", 4, "hmt.probs=[0.5,0.5,0.0]")
    _, state, _ = load_adapters(path)
    moved = {k.split("/")[0] for k, v in state.items() if "lora_B" in k and bool(v.abs().max() > 0)}
    assert moved == {"relation", "ffn"}  # subject LoRAs never left their zero init


def test_customized_model_activates_the_asked_adapter_set(tmp_path):
    from relvid.models.lora import TripletSpec, active_adapters
    from relvid.toy.drivers.customize import adapters_in_set

    path, base = _tiny_customization(tmp_path, "dreamrelation", 2)
    assert set(active_adapters(load_customized(path, base))) == {"relation", "ffn"}
    everything = load_customized(path, base, adapters="all")
    assert set(active_adapters(everything)) == {"relation", "subject1", "subject2", "ffn"}
    no_relation = load_customized(path, base, adapters="subjects")
    assert set(active_adapters(no_relation)) == {"subject1", "subject2", "ffn"}
    with pytest.raises(ValueError, match="adapters must be one of"):
        load_customized(path, base, adapters="relation")
    direct = TripletSpec(placement="direct")
    assert adapters_in_set(direct, "inference") == adapters_in_set(direct, "all") == ("direct",)
    with pytest.raises(ValueError, match="no subject LoRAs"):
        adapters_in_set(direct, "subjects")

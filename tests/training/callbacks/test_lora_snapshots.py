"""LoRASnapshots: a tiny run leaves inference-ready LoRAs under loras/ at its checkpoint steps."""

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, MochiPipeline

from relvid.config import ConfigError
from relvid.models.adapter_file import adapters_from_checkpoint
from relvid.models.backbone import tiny_transformer
from relvid.models.lora import activate, inference_adapters, inject_triplet, load_adapter_state_dict
from relvid.models.lora_io import inference_state_to_mochi
from relvid.training.run import run


def inputs() -> dict:
    g = torch.Generator().manual_seed(0)
    return dict(hidden_states=torch.randn(1, 4, 3, 8, 8, generator=g),
                encoder_hidden_states=torch.randn(1, 5, 32, generator=g), timestep=torch.tensor([700.0]),
                encoder_attention_mask=torch.tensor([[True, True, True, False, False]]), return_dict=False)


def relvid_output(ckpt) -> torch.Tensor:
    """relvid's own inference-set output with the adapters a training checkpoint holds."""
    spec, state = adapters_from_checkpoint(ckpt)
    model = tiny_transformer()  # the tiny preset's base (model.tiny.seed=0)
    inject_triplet(model, spec)
    load_adapter_state_dict(model, state)
    activate(model, inference_adapters(spec))
    with torch.no_grad():
        return model(**inputs())[0]


def pipeline_output(lora_file) -> torch.Tensor:
    pipe = MochiPipeline(scheduler=FlowMatchEulerDiscreteScheduler(invert_sigmas=True), vae=None,
                         text_encoder=None, tokenizer=None, transformer=tiny_transformer())
    pipe.load_lora_weights(lora_file.parent, weight_name=lora_file.name)
    with torch.no_grad():
        return pipe.transformer(**inputs())[0]


def test_every_checkpoint_leaves_a_lora_the_mochi_pipeline_loads(random_cache, tiny_cfg):
    random_cache(n_clips=3, relation="shaking_hands", seed=1)
    out = run(tiny_cfg("trainer.max_steps=3", "trainer.checkpoint_every=2", "trainer.lora_formats=[diffusers,mochi]"))
    loras = out / "loras"
    # step 2 (checkpoint_every) and step 3 (the last checkpoint of the finished run); no temporary files left
    assert sorted(p.name for p in loras.iterdir()) == [
        "shaking_hands_step000002.safetensors", "shaking_hands_step000002_mochi.safetensors",
        "shaking_hands_step000003.safetensors", "shaking_hands_step000003_mochi.safetensors"]

    ckpt = out / "checkpoints" / "step000002.ckpt"
    ours = relvid_output(ckpt)
    theirs = pipeline_output(loras / "shaking_hands_step000002.safetensors")
    assert torch.equal(theirs, ours)
    assert not torch.equal(theirs, pipeline_output(loras / "shaking_hands_step000003.safetensors"))  # its own step

    from safetensors.torch import load_file

    spec, state = adapters_from_checkpoint(ckpt)
    expected, _ = inference_state_to_mochi(state, spec)
    mochi = load_file(loras / "shaking_hands_step000002_mochi.safetensors")
    assert mochi.keys() == expected.keys() and all(torch.equal(mochi[k], expected[k]) for k in expected)

    # a fresh run over it (overwrite=true) starts loras/ afresh; [] writes no snapshot
    run(tiny_cfg("trainer.max_steps=1", "overwrite=true", "trainer.lora_formats=[]"))
    assert list(loras.iterdir()) == []


@pytest.mark.parametrize("formats", ["[onnx]", "[mochi,mochi]"])
def test_unknown_or_repeated_formats_are_refused_naming_the_key(tiny_cfg, formats):
    with pytest.raises(ConfigError, match=r"trainer\.lora_formats"):
        tiny_cfg(f"trainer.lora_formats={formats}")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="Lightning's DeepSpeed strategy needs CUDA")
def test_zero3_snapshots_hold_the_whole_lora_not_its_partitions(tmp_path, repo_root, random_cache):
    """Under ZeRO-3 each rank holds a share of every LoRA tensor: the snapshot gathers them (on every rank)."""
    from safetensors.torch import load_file

    from relvid.config import load_config
    from relvid.models.adapter_file import load_adapters

    pytest.importorskip("deepspeed")
    random_cache(n_clips=2, seed=1)
    cfg = load_config([repo_root / "configs" / "tiny.yaml", repo_root / "configs" / "strategy" /
                       "deepspeed_stage_3.yaml"],
                      ["trainer.devices=1", "rcl.enabled=false", "trainer.max_steps=2", "trainer.checkpoint_every=2",
                       "trainer.progress_bar=false", "trainer.lora_formats=[diffusers,mochi]",
                       f"data.cache_dir={tmp_path / 'cache'}", f"output_dir={tmp_path / 'run'}"])
    out = run(cfg)
    names = sorted(p.name for p in (out / "loras").iterdir())
    assert names == [f"{cfg.relation}_step000002.safetensors", f"{cfg.relation}_step000002_mochi.safetensors"]
    spec, final, _ = load_adapters(out / "adapters" / "relvid_adapters.safetensors")  # the same step
    expected, _ = inference_state_to_mochi(final, spec)
    got = load_file(out / "loras" / names[1])
    assert got.keys() == expected.keys()
    assert all(got[k].shape == expected[k].shape and torch.equal(got[k], expected[k]) for k in expected)

"""model.offload=blocks: the frozen base's blocks wait off the device and come on one at a time; the outputs,
samples and training steps are those of the plain model."""

import gc
from pathlib import Path

import pytest
import torch

from relvid.components import load_generation_parts
from relvid.config import ConfigError, SamplingConfig
from relvid.data.datamodule import RelationDataModule
from relvid.inference.generate import generate_video, sampling_record
from relvid.models.adapter_file import apply_adapter_source
from relvid.models.backbone import load_transformer
from relvid.models.lora import adapter_state_dict
from relvid.models.offload import OffloadError, apply_block_offload, block_offload
from relvid.toy.codec import ToyCodec
from relvid.training.module import RelationModule
from relvid.training.run import build_trainer
from relvid.training.strategies import StrategyConfigError, check_strategy
from tests.helpers.configs import TOY_CHANNELS
from tests.helpers.tiny_models import forward_no_grad, padded_batch


def _resident(block: torch.nn.Module) -> list[bool]:
    """Per base parameter of `block` (LoRA weights left out): does it hold its weights (storage of its full size)?"""
    return [p.untyped_storage().nbytes() >= p.numel() * p.element_size() for name, p in block.named_parameters()
            if "lora_" not in name]


def _offload(tmp_path: Path, resident: int = 1, *more: str) -> tuple[str, ...]:
    return ("model.tiny.num_layers=3", "model.offload=blocks", f"model.resident_blocks={resident}",
            f"model.offload_dir={tmp_path / 'offload'}", *more)


def test_disk_offload_gives_the_plain_output_with_blocks_off_between_uses(tiny_cfg, tmp_path):
    plain = load_transformer(tiny_cfg("model.tiny.num_layers=3").model)
    model = load_transformer(tiny_cfg(*_offload(tmp_path, resident=1)).model)
    blocks = model.transformer_blocks
    assert all(_resident(blocks[0])) and not any(_resident(blocks[1])) and not any(_resident(blocks[2]))
    for name, p in plain.transformer_blocks[0].named_parameters():  # the resident block: untouched
        assert torch.equal(blocks[0].get_parameter(name), p)
    seen = {}

    def watch(i):
        def hook(block, args, kwargs):
            # inside block i's forward (hooks run in order of registration: the offload's first)
            seen[i] = [all(_resident(b)) if j == i else any(_resident(b)) for j, b in enumerate(blocks) if j >= 1]
        return hook

    for i in (1, 2):
        blocks[i].register_forward_pre_hook(watch(i), with_kwargs=True)
    inputs = padded_batch(4, 32)
    torch.testing.assert_close(forward_no_grad(model, inputs), forward_no_grad(plain, inputs), rtol=0, atol=0)
    assert seen == {1: [True, False], 2: [False, True]}  # each offloaded block on only for its own forward
    assert not any(_resident(blocks[1])) and not any(_resident(blocks[2]))  # and off again afterwards
    files = sorted(p.name for p in (tmp_path / "offload").rglob("*.safetensors"))
    assert files == ["block_001.safetensors", "block_002.safetensors"]


def test_resident_blocks_covering_the_model_offload_nothing(tiny_cfg, tmp_path):
    model = load_transformer(tiny_cfg(*_offload(tmp_path, resident=3)).model)
    assert block_offload(model).blocks == [] and all(all(_resident(b)) for b in model.transformer_blocks)


def test_offload_folder_is_removed_with_the_model(tiny_cfg, tmp_path):
    model = load_transformer(tiny_cfg(*_offload(tmp_path)).model)
    folder = block_offload(model).folder
    assert folder.parent == tmp_path / "offload" and folder.is_dir()
    del model
    gc.collect()
    assert not folder.exists()


def test_fp8_storage_and_offload_together_give_the_fp8_output(tiny_cfg, tmp_path):
    fp8 = "model.storage_dtype=float8_e4m3fn"
    plain = load_transformer(tiny_cfg("model.tiny.num_layers=3", fp8).model)
    model = load_transformer(tiny_cfg(*_offload(tmp_path, 1, fp8)).model)
    weight = model.transformer_blocks[2].ff.net[0].proj.weight
    assert weight.dtype == torch.float8_e4m3fn and not _resident(model.transformer_blocks[2])[0]
    inputs = padded_batch(4, 32, seed=1)
    torch.testing.assert_close(forward_no_grad(model, inputs), forward_no_grad(plain, inputs), rtol=0, atol=0)


def test_offloaded_weights_refuse_a_dtype_change(tiny_cfg, tmp_path):
    model = load_transformer(tiny_cfg(*_offload(tmp_path)).model)
    model.to("cpu")  # a move: fine (nothing to move on the CPU)
    before = {name: p.dtype for name, p in model.named_parameters()}
    with pytest.raises(OffloadError, match="model.dtype"):
        model.to(torch.bfloat16)
    # refused before anything is cast: the embedders and the resident block keep their dtype too
    assert {name: p.dtype for name, p in model.named_parameters()} == before
    with pytest.raises(OffloadError, match="already installed"):
        apply_block_offload(model)


def test_two_step_sample_with_adapters_equals_the_plain_one(tiny_cfg, tmp_path):
    toy = ("model.codec=toy", "model.text_encoder=toy", f"model.tiny.in_channels={TOY_CHANNELS}")
    settings = SamplingConfig(num_steps=2, guidance_scale=3.0, frames=7, height=16, width=16)
    g = torch.Generator().manual_seed(0)
    embeds, mask = torch.randn(5, 32, generator=g), torch.ones(5, dtype=torch.bool)
    negative = (torch.zeros(1, 32), torch.ones(1, dtype=torch.bool))
    # adapters that change the output, loaded after the offload as `relvid sample` does
    source = load_transformer(tiny_cfg("model.tiny.num_layers=3", *toy).model)
    from relvid.models.adapter_file import save_adapters
    from relvid.models.lora import TripletSpec, inject_triplet, lora_parameters

    spec = TripletSpec(rank=4, alpha=4.0)
    inject_triplet(source, spec)
    with torch.no_grad():
        for name, p in lora_parameters(source).items():
            if "lora_B" in name:
                p.normal_(0.0, 0.2, generator=g)
    adapters = save_adapters(tmp_path / "relvid_adapters.safetensors", source, spec)
    videos = []
    for overrides in ((), _offload(tmp_path, 1)):
        cfg = tiny_cfg("model.tiny.num_layers=3", *toy, *overrides)
        transformer, codec, _ = load_generation_parts(cfg.model, "cpu", text_encoder=False)
        apply_adapter_source(transformer, str(adapters))
        videos.append(generate_video(transformer, codec, embeds, mask, negative, seed=3, settings=settings))
    assert isinstance(codec, ToyCodec)
    assert videos[0].float().std() > 0 and torch.equal(videos[0], videos[1])


def _fit(cfg, random_cache):
    """(the adapters before training, the module after 2 steps) on the 4-clip random cache at data.cache_dir."""
    if not Path(cfg.data.cache_dir, "manifest.json").exists():
        random_cache(cfg.data.cache_dir, n_clips=4, relation=cfg.relation, seed=1)
    dm = RelationDataModule(cfg.data.cache_dir, relation=cfg.relation, batch_size=int(cfg.data.batch_size),
                            num_workers=0, seed=int(cfg.seed), caption_dropout=float(cfg.data.caption_dropout),
                            total_steps=int(cfg.trainer.max_steps))
    torch.manual_seed(0)  # the LoRA's initial weights
    module = RelationModule(cfg)
    before = adapter_state_dict(module.transformer)
    build_trainer(cfg, ()).fit(module, datamodule=dm)
    return before, module


@pytest.mark.parametrize("checkpointing", [True, False])
def test_training_with_offload_learns_the_same_loras(tiny_cfg, tmp_path, random_cache, checkpointing):
    common = ("trainer.max_steps=2", f"model.gradient_checkpointing={str(checkpointing).lower()}",
              "model.tiny.num_layers=3")
    before, plain = _fit(tiny_cfg(*common), random_cache)
    _, offloaded = _fit(tiny_cfg(*common, *_offload(tmp_path, 1), f"output_dir={tmp_path / 'run2'}"), random_cache)
    assert block_offload(offloaded.transformer) is not None
    assert not any(_resident(offloaded.transformer.transformer_blocks[2]))  # off again after the steps
    a, b = adapter_state_dict(plain.transformer), adapter_state_dict(offloaded.transformer)
    assert a.keys() == b.keys() and any(not torch.equal(a[k], before[k]) for k in a)  # the steps trained
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6)


def test_training_step_under_checkpointing_onloads_blocks_again_in_backward(tiny_cfg, tmp_path):
    cfg = tiny_cfg("model.gradient_checkpointing=true", *_offload(tmp_path, 1))
    module = RelationModule(cfg)
    blocks = module.transformer.transformer_blocks
    calls = []
    blocks[2].register_forward_pre_hook(
        lambda block, args, kwargs: calls.append((torch.is_grad_enabled(), all(_resident(block)),
                                                  any(_resident(blocks[1])))), with_kwargs=True)
    z, text, t, mask = padded_batch(4, 32)
    out = module.transformer(z, text, t, mask, return_dict=False)[0]
    out.square().mean().backward()
    # the forward, then the recomputation in backward: block 2 on each time, block 1 off meanwhile
    assert calls == [(True, True, False), (True, True, False)]
    grads = [p.grad for n, p in module.transformer.named_parameters() if "lora_" in n and p.requires_grad]
    assert grads and any(g is not None and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("overrides, match", [
    (("model.offload=disk",), "must be none or blocks"),
    (("model.resident_blocks=-1",), "model.resident_blocks"),
    (("model.offload_dir=/tmp/x",), "only applies with model.offload=blocks"),
    (("model.offload=blocks", "trainer.strategy=fsdp"), "trainer.strategy=fsdp"),
    (("model.offload=blocks", "trainer.strategy=deepspeed_stage_2"), "trainer.strategy=deepspeed_stage_2"),
    (("model.offload=blocks", "trainer.strategy=ddp"), "trainer.strategy=ddp"),
    (("model.offload=blocks", "speed.compile=true"), "speed.compile=false"),
])
def test_offload_refusals_name_the_keys(tiny_cfg, overrides, match):
    with pytest.raises(ConfigError, match=match) as err:
        tiny_cfg(*overrides)
    assert "model." in str(err.value)


def test_offload_refuses_several_training_processes(tiny_cfg):
    with pytest.raises(StrategyConfigError, match="trainer.devices=1"):
        check_strategy(tiny_cfg("model.offload=blocks", "trainer.devices=2"))
    check_strategy(tiny_cfg("model.offload=blocks"))  # one device: fine


def test_vae_tiling_is_recorded_only_when_off():
    assert "vae_tiling" not in sampling_record(SamplingConfig())
    assert sampling_record(SamplingConfig(vae_tiling=False))["vae_tiling"] is False


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_offload_keeps_blocks_on_the_host_and_matches_the_plain_model(tiny_cfg, tmp_path):
    device = torch.device("cuda")
    plain = load_transformer(tiny_cfg("model.tiny.num_layers=3", "model.dtype=bf16").model, True, device)
    for extra in ((), (f"model.offload_dir={tmp_path / 'offload'}",)):
        cfg = tiny_cfg("model.tiny.num_layers=3", "model.dtype=bf16", "model.offload=blocks",
                       "model.resident_blocks=1", *extra)
        model = load_transformer(cfg.model, True, device)
        assert {p.device.type for p in model.transformer_blocks[0].parameters()} == {"cuda"}
        assert {p.device.type for p in model.transformer_blocks[2].parameters()} == {"cpu"}
        seen = []

        def watch(block, args, kwargs, seen=seen, other=model.transformer_blocks[1]):
            seen.append(({p.device.type for p in block.parameters()}, {p.device.type for p in other.parameters()}))

        model.transformer_blocks[2].register_forward_pre_hook(watch, with_kwargs=True)
        inputs = [t.to(device) for t in padded_batch(4, 32)]
        inputs[0], inputs[1] = inputs[0].bfloat16(), inputs[1].bfloat16()
        for _ in range(2):  # the second pass uses the copies made ahead on the side stream
            torch.testing.assert_close(forward_no_grad(model, inputs), forward_no_grad(plain, inputs), rtol=0, atol=0)
        assert seen == [({"cuda"}, {"cpu"})] * 2
        assert {p.device.type for p in model.transformer_blocks[2].parameters()} == {"cpu"}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_transformer_leaves_before_the_decode(tiny_cfg, tmp_path):
    device = torch.device("cuda")
    cfg = tiny_cfg("model.codec=toy", "model.text_encoder=toy", f"model.tiny.in_channels={TOY_CHANNELS}",
                   "model.offload=blocks", "model.resident_blocks=1")
    transformer, codec, _ = load_generation_parts(cfg.model, device, text_encoder=False)
    on_gpu = []
    decode = codec.decode
    codec.decode = lambda latents: (on_gpu.append({p.device.type for p in transformer.parameters()}),
                                    decode(latents))[1]
    settings = SamplingConfig(num_steps=2, frames=7, height=16, width=16)
    generate_video(transformer, codec, torch.randn(5, 32), torch.ones(5, dtype=torch.bool), None, seed=0,
                   settings=settings, device=device)
    assert on_gpu == [{"cpu"}]  # during the decode
    assert next(transformer.proj_out.parameters()).device.type == "cuda"  # and back afterwards

"""model.storage_dtype: the frozen base's linear layers stored in fp8, computed in model.dtype; LoRAs untouched."""

import pytest
import torch

from relvid.components import load_generation_parts
from relvid.config import ConfigError
from relvid.errors import UserError
from relvid.inference.sampler import sample
from relvid.models.backbone import load_transformer, parameter_bytes
from relvid.models.lora import TripletSpec, activate, cast_lora, inference_adapters, inject_triplet, lora_parameters
from tests.helpers.tiny_models import forward_no_grad, padded_batch

FP8 = "model.storage_dtype=float8_e4m3fn"


def _inputs(model, seed: int = 0):
    return padded_batch(model.config.in_channels, model.config.text_embed_dim, seed)


def test_fp8_storage_keeps_linear_weights_in_fp8_and_the_rest_in_the_compute_dtype(tiny_cfg):
    model = load_transformer(tiny_cfg(FP8).model)
    dtypes = {name: p.dtype for name, p in model.named_parameters()}
    linear = [f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    # Mochi's precision-critical parts stay in the compute dtype (fp32 on the CPU): embeddings, the
    # modulating norms, the output projection; every other linear layer (attention, feed-forward) is fp8
    critical = ("patch_embed", "norm", "proj_out")
    assert {dtypes[n] for n in linear if not any(c in n for c in critical)} == {torch.float8_e4m3fn}
    assert {dtypes[n] for n in linear if any(c in n for c in critical)} == {torch.float32}
    assert dtypes["patch_embed.proj.weight"] == torch.float32 and dtypes["pos_frequencies"] == torch.float32
    assert model.dtype == torch.float32  # what callers that ask the model for its dtype get
    stored = parameter_bytes(model.parameters())["cpu"]  # fp8: one byte per weight
    assert stored["float8_e4m3fn"] == sum(p.numel() for p in model.parameters() if p.dtype == torch.float8_e4m3fn)
    assert stored["float32"] == 4 * sum(p.numel() for p in model.parameters() if p.dtype == torch.float32)


@pytest.mark.parametrize("lora_dtype", [torch.float32, torch.bfloat16])
def test_lora_weights_keep_their_dtype_on_an_fp8_base_and_learn(tiny_cfg, lora_dtype):
    model = load_transformer(tiny_cfg(FP8).model)
    spec = TripletSpec(rank=4, alpha=4.0)
    inject_triplet(model, spec)
    if lora_dtype == torch.bfloat16:
        cast_lora(model, torch.bfloat16)  # lora.dtype=bf16
    loras = lora_parameters(model)
    assert loras and {p.dtype for p in loras.values()} == {lora_dtype}
    activate(model, inference_adapters(spec))
    with torch.no_grad():
        for name, p in loras.items():
            if "lora_B" in name:
                p.normal_(0.0, 0.1)  # a LoRA that changes the output
    model.train()
    out = model(*_inputs(model), return_dict=False)[0]
    out.float().square().mean().backward()
    grads = [p.grad for p in loras.values() if p.grad is not None]  # the active adapters'
    assert grads and all(g.dtype == lora_dtype for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    # after a forward and backward the base is back in fp8 storage, and never asked for a gradient
    base = {n: p for n, p in model.named_parameters() if n not in loras}
    assert base["transformer_blocks.0.attn1.to_q.base_layer.weight"].dtype == torch.float8_e4m3fn
    assert all(p.grad is None for p in base.values())


def test_fp8_output_is_the_unquantized_model_with_fp8_rounded_weights(tiny_cfg):
    """fp8 storage changes the linear weights by their fp8 rounding and nothing else: the output equals the
    full-precision model whose linear weights were rounded through fp8, and stays close to the original."""
    reference = load_transformer(tiny_cfg().model).eval()
    fp8 = load_transformer(tiny_cfg(FP8).model).eval()
    rounded = load_transformer(tiny_cfg().model).eval()
    with torch.no_grad():
        for name, p in rounded.named_parameters():
            if fp8.get_parameter(name).dtype == torch.float8_e4m3fn:
                p.copy_(p.to(torch.float8_e4m3fn).float())
    inputs = _inputs(reference)
    out_ref, out_fp8, out_rounded = (forward_no_grad(m, inputs) for m in (reference, fp8, rounded))
    torch.testing.assert_close(out_fp8, out_rounded, rtol=0, atol=1e-6)
    rel = float((out_fp8 - out_ref).abs().max() / out_ref.abs().max())
    assert 0 < rel < 0.1, rel  # really quantized, and still the same model


def test_sampling_loads_the_base_in_fp8_and_samples_close_to_full_precision(tiny_cfg):
    outs = {}
    for name, overrides in (("full", ()), ("fp8", (FP8,))):
        cfg = tiny_cfg("model.codec=toy", "model.text_encoder=toy", *overrides)
        transformer, _, _ = load_generation_parts(cfg.model, "cpu", text_encoder=False)
        if name == "fp8":
            assert transformer.transformer_blocks[0].ff.net[0].proj.weight.dtype == torch.float8_e4m3fn
        z, text, _, mask = _inputs(transformer, seed=3)
        outs[name] = sample(transformer, z[:1], text[:1], mask[:1], text[1:], mask[1:], num_steps=3,
                            guidance_scale=4.0)
    assert torch.isfinite(outs["fp8"]).all()
    rel = float((outs["fp8"] - outs["full"]).abs().max() / outs["full"].abs().max())
    assert rel < 0.1, rel


@pytest.mark.parametrize("overrides, match", [
    (("model.storage_dtype=fp8",), "float8_e4m3fn, float8_e5m2"),
    (("trainer.strategy=fsdp",), "trainer.strategy=fsdp"),
    (("trainer.strategy=deepspeed_stage_2",), "trainer.strategy=deepspeed_stage_2"),
    (("speed.compile=true",), "speed.compile=false"),
])
def test_unsupported_storage_settings_are_refused_naming_the_key(tiny_cfg, overrides, match):
    extra = () if overrides[0].startswith("model.storage_dtype") else (FP8,)
    with pytest.raises(ConfigError, match=match) as err:
        tiny_cfg(*extra, *overrides)
    assert isinstance(err.value, UserError) and "model.storage_dtype" in str(err.value)


@pytest.mark.gpu
def test_fp8_storage_on_a_gpu_halves_the_base_and_computes_in_bf16(tiny_cfg):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    full = load_transformer(tiny_cfg("trainer.accelerator=gpu").model, on_gpu=True, device="cuda")
    fp8 = load_transformer(tiny_cfg("trainer.accelerator=gpu", FP8).model, on_gpu=True, device="cuda")
    full_bytes = sum(parameter_bytes(full.parameters())["cuda:0"].values())
    fp8_bytes = parameter_bytes(fp8.parameters())["cuda:0"]
    assert fp8_bytes["float8_e4m3fn"] > 0 and sum(fp8_bytes.values()) < full_bytes
    inputs = [t.cuda() for t in _inputs(full)]
    inputs[0], inputs[1] = inputs[0].bfloat16(), inputs[1].bfloat16()
    out_full, out_fp8 = forward_no_grad(full.eval(), inputs), forward_no_grad(fp8.eval(), inputs)
    assert out_fp8.dtype == torch.bfloat16
    rel = float((out_fp8.float() - out_full.float()).abs().max() / out_full.float().abs().max())
    assert rel < 0.1, rel


def test_relvid_sample_with_adapters_on_an_fp8_base(tmp_path, trained_adapters):
    """`relvid sample --set model.storage_dtype=float8_e4m3fn` loads the adapters onto the fp8 base and
    renders the video the full-precision base renders, up to fp8 rounding."""
    from relvid.cli import main
    from relvid.video_io import read_video
    from tests.helpers.configs import TINY

    adapters = trained_adapters[0]
    videos = {}
    for name, extra in (("full", []), ("fp8", ["--set", FP8])):
        out = tmp_path / name
        assert main(["sample", "--prompt", "A dog is shaking hands with a cat.", "--out", str(out), *TINY,
                     "--adapters", str(adapters), *extra]) == 0
        (video,) = sorted(out.glob("*.mp4"))
        videos[name] = read_video(video).float()  # (T, H, W, 3)
    diff = (videos["fp8"] - videos["full"]).abs().mean()
    print(f"fp8 vs full precision: mean abs pixel difference {diff:.3f} of 255")
    assert diff < 8.0, f"mean abs pixel difference {diff:.2f} of 255"


# --- configs/memory presets -------------------------------------------------------------------------
PRESETS = ("80gb", "40gb", "24gb")
# keys that mean the same for every method and every command: the base's storage and the speed paths
PRESET_KEYS = {"model.storage_dtype", "model.gradient_checkpointing", "speed.checkpoint", "speed.compile",
               "model.offload", "model.resident_blocks"}


def _keys(tree: dict, prefix: str = "") -> set[str]:
    out = set()
    for key, value in tree.items():
        out |= _keys(value, f"{prefix}{key}.") if isinstance(value, dict) else {prefix + key}
    return out


@pytest.mark.parametrize("preset", PRESETS)
def test_memory_presets_set_method_independent_keys_and_compose_after_any_config(repo_root, preset):
    import yaml

    from relvid.config import load_config

    path = repo_root / "configs" / "memory" / f"{preset}.yaml"
    assert _keys(yaml.safe_load(path.read_text())) <= PRESET_KEYS
    shipped = [repo_root / "configs" / "tiny.yaml", repo_root / "configs" / "train.yaml",
               *sorted((repo_root / "configs" / "baselines").glob("*.yaml"))]
    assert len(shipped) > 2
    for base in shipped:
        cfg = load_config([base, path], [])
        assert cfg.model.storage_dtype == (FP8.split("=")[1] if preset == "24gb" else None), base
        assert cfg.model.gradient_checkpointing


def test_the_24gb_preset_trains_the_tiny_model_with_its_base_in_fp8(tmp_path, repo_root, random_cache):
    """`relvid train configs/tiny.yaml configs/memory/24gb.yaml ...`, as a user types it (with the preset's
    gradient checkpointing: each block's recomputation casts its fp8 weights again)."""
    import json

    from relvid.cli import main

    cache = random_cache(n_clips=2, relation="shaking_hands", seed=0).root
    out = tmp_path / "run"
    configs = [str(repo_root / "configs" / "tiny.yaml"), str(repo_root / "configs" / "memory" / "24gb.yaml")]
    assert main(["train", *configs, f"data.cache_dir={cache}", f"output_dir={out}", "trainer.max_steps=2",
                 "trainer.progress_bar=false"]) == 0
    info = json.loads((out / "run_info.json").read_text())["transformer"]
    assert info["storage_dtype"] == "float8_e4m3fn" and info["parameter_bytes"]["cpu"]["float8_e4m3fn"] > 0

"""The packed attention path matches diffusers' reference processor: outputs and LoRA gradients."""

from types import SimpleNamespace

import pytest
import torch
from diffusers.models.attention_processor import MochiAttnProcessor2_0
from torch.nn.attention import SDPBackend

from relvid.models.attention import (
    PackedMochiAttnProcessor,
    SpeedConfigError,
    apply_speed_config,
    make_text_plan,
    sdpa_backends,
)
from relvid.models.backbone import tiny_transformer
from relvid.models.lora import TripletSpec, activate, adapters_for_selection, inject_triplet, lora_parameters


def speed(attention="packed", sdpa_backend="auto", checkpoint="full", compile=False):
    return SimpleNamespace(attention=attention, sdpa_backend=sdpa_backend, checkpoint=checkpoint, compile=compile)


def lora_model(dtype=torch.float32, checkpointing=False):
    model = tiny_transformer(seed=3)
    model.requires_grad_(False)
    if checkpointing:
        model.enable_gradient_checkpointing()
    model.train()
    spec = TripletSpec(rank=4, alpha=4.0)
    inject_triplet(model, spec)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():  # B = 0 after injection would make every LoRA gradient of A vanish
        for _name, p in lora_parameters(model).items():
            p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    if dtype != torch.float32:
        model.to(dtype)
    activate(model, adapters_for_selection("relation", spec))
    return model


def batch(lengths, L=6, holes=False, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    B = len(lengths)
    mask = torch.zeros(B, L, dtype=torch.bool)
    for b, n in enumerate(lengths):
        mask[b, :n] = True
    if holes:  # valid tokens not all at the front (the reference gathers them in order)
        mask[0] = torch.tensor([True, False, True, True, False, True])[:L]
    return dict(hidden_states=torch.randn(B, 4, 2, 4, 6, generator=g).to(dtype),
                encoder_hidden_states=torch.randn(B, L, 32, generator=g).to(dtype),
                timestep=torch.tensor([300, 800][:B]), encoder_attention_mask=mask)


def run(model, inputs, path, **kw):
    apply_speed_config(model, speed(attention=path, **kw))
    model.zero_grad(set_to_none=True)
    out = model(**inputs, return_dict=False)[0]
    (out.float() * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    grads = {n: p.grad.detach().clone() for n, p in lora_parameters(model).items() if p.grad is not None}
    return out.detach().float(), grads


def assert_match(model, inputs, atol, rtol, **kw):
    ref_out, ref_grads = run(model, inputs, "diffusers")
    out, grads = run(model, inputs, "packed", **kw)
    assert isinstance(model.transformer_blocks[0].attn1.processor, PackedMochiAttnProcessor)
    torch.testing.assert_close(out, ref_out, atol=atol, rtol=rtol)
    assert grads.keys() == ref_grads.keys() and len(grads) > 0
    for name in grads:
        torch.testing.assert_close(grads[name].float(), ref_grads[name].float(), atol=atol, rtol=rtol, msg=name)
    return out, ref_out


@pytest.mark.parametrize("lengths,holes", [((6,), False), ((4,), False), ((6, 3), False), ((5, 5), False),
                                           ((4, 6), True)])
def test_packed_matches_reference_fp32(lengths, holes):
    model = lora_model()
    assert_match(model, batch(lengths, holes=holes), atol=2e-5, rtol=1e-4)


def test_packed_matches_reference_with_checkpointing_and_selective_saving():
    model = lora_model(checkpointing=True)
    inputs = batch((6, 2))
    assert_match(model, inputs, atol=2e-5, rtol=1e-4)
    # save_attention keeps the CPU flash kernel's output instead of recomputing it: same gradients
    assert_match(model, inputs, atol=2e-5, rtol=1e-4, sdpa_backend="flash", checkpoint="save_attention")


def test_packed_matches_reference_bf16():
    model = lora_model(dtype=torch.bfloat16)
    out, ref = assert_match(model, batch((6, 3), dtype=torch.bfloat16), atol=3e-2, rtol=3e-2)
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()


def test_padded_text_positions_do_not_leak_into_the_video():
    """A padded sample's output equals the same sample unpadded (batch 1, no padding)."""
    model = lora_model()
    apply_speed_config(model, speed())
    padded = batch((6, 3))
    alone = {k: v[1:2] for k, v in padded.items()}
    alone["encoder_hidden_states"] = alone["encoder_hidden_states"][:, :3]
    alone["encoder_attention_mask"] = alone["encoder_attention_mask"][:, :3]
    with torch.no_grad():
        both = model(**padded, return_dict=False)[0]
        single = model(**alone, return_dict=False)[0]
    torch.testing.assert_close(both[1:2], single, atol=1e-5, rtol=1e-5)


def test_one_host_read_of_the_mask_per_forward():
    model = lora_model()
    apply_speed_config(model, speed())
    inputs = batch((6, 3))
    calls = []
    original = torch.Tensor.tolist

    def counting(self):
        calls.append(tuple(self.shape))
        return original(self)

    torch.Tensor.tolist = counting
    try:
        with torch.no_grad():
            model(**inputs, return_dict=False)
    finally:
        torch.Tensor.tolist = original
    assert calls == [(2, 2)]  # the pre-hook's plan: not one per block


def test_text_plan_lengths_and_order():
    mask = torch.tensor([[True, True, False], [False, True, True]])
    plan = make_text_plan(mask)
    assert plan.lengths == (2, 2) and plan.uniform
    assert plan.order[1, :2].tolist() == [1, 2]
    assert make_text_plan(torch.tensor([[True, False]])).order is None


def test_diffusers_path_restores_the_reference_processor():
    model = tiny_transformer()
    apply_speed_config(model, speed("auto"))
    apply_speed_config(model, speed("diffusers"))
    assert all(isinstance(b.attn1.processor, MochiAttnProcessor2_0) for b in model.transformer_blocks)
    assert model._relvid_text_plan_hook is None


def test_backend_choice_and_refusals():
    assert sdpa_backends("auto", torch.device("cpu")) == [SDPBackend.MATH]
    assert sdpa_backends("flash", torch.device("cpu")) == [SDPBackend.FLASH_ATTENTION]
    with pytest.raises(SpeedConfigError, match="speed.sdpa_backend=cudnn needs a CUDA device"):
        sdpa_backends("cudnn", torch.device("cpu"))
    model = tiny_transformer()
    with pytest.raises(SpeedConfigError, match="model.gradient_checkpointing=true"):
        apply_speed_config(model, speed(checkpoint="save_attention"))
    with pytest.raises(SpeedConfigError, match="speed.attention=packed"):
        apply_speed_config(model, speed("diffusers", sdpa_backend="math"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["auto", "flash", "efficient", "cudnn"])
def test_packed_matches_reference_on_gpu(backend):
    model = lora_model(dtype=torch.bfloat16).cuda()
    inputs = {k: v.cuda() for k, v in batch((6, 3), dtype=torch.bfloat16).items()}
    assert_match(model, inputs, atol=3e-2, rtol=3e-2, sdpa_backend=backend)


@pytest.mark.slow
def test_regional_compile_matches_reference():
    model = lora_model(checkpointing=True)
    assert_match(model, batch((6, 3)), atol=1e-4, rtol=1e-3, compile=True)

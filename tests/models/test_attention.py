"""The packed attention path matches diffusers' reference processor: outputs and LoRA gradients."""

import pytest
import torch
from diffusers.models.attention_processor import MochiAttnProcessor2_0
from torch.nn.attention import SDPBackend
from torch.utils._python_dispatch import TorchDispatchMode

from relvid.models.attention import (
    PackedMochiAttnProcessor,
    SpeedConfigError,
    apply_speed_config,
    is_attention_op,
    make_text_plan,
    sdpa_backends,
)
from relvid.models.backbone import tiny_transformer
from relvid.models.lora import lora_parameters
from tests.helpers.attention import batch, lora_model, relative_error, speed


def run(model, inputs, path, **kw):
    apply_speed_config(model, speed(attention=path, **kw))
    model.zero_grad(set_to_none=True)
    out = model(**inputs, return_dict=False)[0]
    weights = torch.linspace(-1, 1, out.numel(), device=out.device).view_as(out)  # on the output's device
    (out.float() * weights).sum().backward()
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


class CountAttentionKernels(TorchDispatchMode):
    """Counts the fused SDPA forward kernels that actually run (a cached, saved output is not a run)."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if is_attention_op(func):
            self.calls += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("policy,recomputed_per_block", [("full", 2), ("save_attention", 0)])
def test_save_attention_keeps_the_attention_outputs_for_backward(policy, recomputed_per_block):
    """Under full checkpointing backward runs every block's attention kernel again (two per block for a
    padded batch of two); save_attention keeps their outputs, so backward runs none."""
    model = lora_model(checkpointing=True)
    apply_speed_config(model, speed(sdpa_backend="flash", checkpoint=policy))  # flash: a fused kernel on CPU
    out = model(**batch((6, 3)), return_dict=False)[0]
    with CountAttentionKernels() as counter:
        out.sum().backward()
    assert counter.calls == recomputed_per_block * len(model.transformer_blocks)


def test_attention_ops_match_every_overload():
    """The checkpoint policy is called with OpOverloads (e.g. ...flash_attention_for_cpu.default)."""
    assert is_attention_op(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default)
    assert is_attention_op(torch.ops.aten._scaled_dot_product_flash_attention.default)
    assert not is_attention_op(torch.ops.aten.mm.default)
    assert not is_attention_op(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default)


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
    if backend == "cudnn" and torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("cuDNN attention needs an Ampere or newer GPU")
    torch.manual_seed(0)
    model = lora_model(dtype=torch.bfloat16).cuda()
    inputs = {k: v.cuda() for k, v in batch((6, 3), dtype=torch.bfloat16).items()}
    ref_out, ref_grads = run(model, inputs, "diffusers")
    out, grads = run(model, inputs, "packed", sdpa_backend=backend)
    assert out.device.type == "cuda" and isinstance(model.transformer_blocks[0].attn1.processor,
                                                    PackedMochiAttnProcessor)
    # bf16 with different kernels: compare norms of the difference (a wrong mask or order is off by O(1))
    assert relative_error(out, ref_out) < 3e-2
    assert grads.keys() == ref_grads.keys() and len(grads) > 0
    for name in grads:
        assert relative_error(grads[name], ref_grads[name]) < 6e-2, name


@pytest.mark.slow
def test_regional_compile_matches_reference():
    model = lora_model(checkpointing=True)
    assert_match(model, batch((6, 3)), atol=1e-4, rtol=1e-3, compile=True)

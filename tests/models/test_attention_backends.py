"""speed.sdpa_backend=auto falls back once from a kernel that fails at run time; the kernels at Mochi's shape."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import relvid.models.attention as attention
from relvid.models.attention import SDPAFallbackWarning, apply_speed_config, failed_backends, sdpa_with_fallback
from tests.helpers.attention import batch, lora_model, relative_error, speed

# auto's order on Hopper, cuDNN first; on the CPU cuDNN cannot run, so it raises as it might at run time on a GPU
HOPPER_LIKE = [SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH]


@pytest.fixture
def no_failed_backends(monkeypatch):
    """A process that has not given up on any backend yet (the set is process-wide)."""
    monkeypatch.setattr(attention, "_FAILED_BACKENDS", set())


@pytest.fixture
def kernel_calls(monkeypatch):
    """The backend lists SDPA ran under, in order."""
    calls = []
    real = attention.sdpa_kernel

    def spy(backends, *args, **kwargs):
        calls.append(list(backends) if isinstance(backends, list) else [backends])
        return real(backends, *args, **kwargs)

    monkeypatch.setattr(attention, "sdpa_kernel", spy)
    return calls


def test_auto_falls_back_once_with_one_warning(no_failed_backends, kernel_calls, monkeypatch):
    real = attention.sdpa_backends
    monkeypatch.setattr(attention, "sdpa_backends", lambda name, device: HOPPER_LIKE if name == "auto"
                        else real(name, device))
    model = lora_model()
    inputs = batch((6, 3))
    apply_speed_config(model, speed(sdpa_backend="auto"))
    with warnings.catch_warnings(record=True) as seen, torch.no_grad():
        warnings.simplefilter("always")
        first = model(**inputs, return_dict=False)[0]
        second = model(**inputs, return_dict=False)[0]
    fallbacks = [w for w in seen if issubclass(w.category, SDPAFallbackWarning)]
    assert len(fallbacks) == 1, [str(w.message) for w in seen]
    message = str(fallbacks[0].message)
    assert "cudnn attention kernel failed" in message and "using math" in message
    assert failed_backends() == {SDPBackend.CUDNN_ATTENTION}
    # cuDNN was tried once (the first attention call), every later call went straight to the rest
    alone = [c for c in kernel_calls if c == [SDPBackend.CUDNN_ATTENTION]]
    assert len(alone) == 1 and kernel_calls[0] == [SDPBackend.CUDNN_ATTENTION]
    assert all(SDPBackend.CUDNN_ATTENTION not in c for c in kernel_calls[1:])
    apply_speed_config(model, speed(sdpa_backend="math"))
    with torch.no_grad():
        reference = model(**inputs, return_dict=False)[0]
    assert torch.equal(first, reference) and torch.equal(second, reference)


def test_an_explicit_backend_never_falls_back(no_failed_backends):
    q = torch.randn(1, 2, 5, 8)
    with pytest.raises(RuntimeError):
        sdpa_with_fallback(q, q, q, [SDPBackend.CUDNN_ATTENTION], fallback=False)
    with pytest.raises(RuntimeError):  # one backend: nothing to fall back to
        sdpa_with_fallback(q, q, q, [SDPBackend.CUDNN_ATTENTION], fallback=True)
    assert failed_backends() == frozenset()


def test_fallback_result_and_gradients_equal_the_math_kernel(no_failed_backends):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 7, 8, generator=g, requires_grad=True) for _ in range(3))
    with pytest.warns(SDPAFallbackWarning):
        out = sdpa_with_fallback(q, k, v, HOPPER_LIKE)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    with sdpa_kernel([SDPBackend.MATH]):
        ref = F.scaled_dot_product_attention(q, k, v)
    ref_grads = torch.autograd.grad(ref.sum(), (q, k, v))
    assert torch.equal(out, ref)
    assert all(torch.equal(a, b) for a, b in zip(grads, ref_grads, strict=True))


# --- on a GPU: the kernels auto picks, at the full model's attention shape ------------------------------

MOCHI_TOKENS = 17_490 + 256  # 61x480x848 vision tokens + the T5 prompt
MOCHI_HEADS, MOCHI_HEAD_DIM = 24, 128


def mochi_qkv(seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    shape = (1, MOCHI_HEADS, MOCHI_TOKENS, MOCHI_HEAD_DIM)
    return [torch.randn(shape, generator=g, device="cuda", dtype=torch.bfloat16).requires_grad_() for _ in range(3)]


def forward_backward(q, k, v, backends, fallback):
    out = sdpa_with_fallback(q, k, v, backends, fallback)
    grads = torch.autograd.grad(out.float().square().mean(), (q, k, v))
    return out.detach(), grads


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cudnn_attention_runs_at_mochis_shape_and_matches_flash():
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("auto tries cuDNN first on Hopper and newer only")
    q, k, v = mochi_qkv()
    flash, flash_grads = forward_backward(q, k, v, [SDPBackend.FLASH_ATTENTION], fallback=False)
    cudnn, cudnn_grads = forward_backward(q, k, v, [SDPBackend.CUDNN_ATTENTION], fallback=False)
    assert relative_error(cudnn, flash) < 1e-2
    for a, b in zip(cudnn_grads, flash_grads, strict=True):
        assert relative_error(a, b) < 2e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_auto_at_mochis_shape_matches_flash(no_failed_backends):
    q, k, v = mochi_qkv(seed=1)
    flash, _ = forward_backward(q, k, v, [SDPBackend.FLASH_ATTENTION], fallback=False)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        auto, _ = forward_backward(q, k, v, attention.sdpa_backends("auto", q.device), fallback=True)
    assert relative_error(auto, flash) < 1e-2
    if torch.cuda.get_device_capability() >= (9, 0):  # the first choice must not have needed the fallback
        assert not [w for w in seen if issubclass(w.category, SDPAFallbackWarning)], failed_backends()

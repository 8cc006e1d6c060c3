"""Attention paths for the Mochi transformer (speed.attention, speed.sdpa_backend, speed.checkpoint, speed.compile).

diffusers' MochiAttnProcessor2_0 loops over the batch and calls torch.nonzero on the text mask in
every block (one host sync per block, 48 per forward) and leaves the SDPA backend to torch. The
packed path here reads the text mask once per transformer forward (a forward pre-hook builds a
`TextPlan` with the valid lengths as Python ints), packs the valid text tokens behind the vision
tokens with plain slicing, and runs SDPA under the chosen backend. Its outputs follow the
reference exactly: valid text outputs first, zeros at the padded text positions before to_add_out.

sdpa_backend=auto on Hopper tries cuDNN first; if the cuDNN kernel fails at run time, the process
warns once and uses flash (then efficient, then math) from then on. speed.compile compiles each
block's forward; the text length is a dynamic dimension and dynamo's per-code-object recompile
limit is raised to cover the few variants a run needs (adapter sets, the last block, grad mode).
"""

from __future__ import annotations

import functools
import threading
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from relvid.errors import UserError

ATTENTION_PATHS = ("auto", "diffusers", "packed")
SDPA_BACKENDS = ("auto", "flash", "cudnn", "efficient", "math")
CHECKPOINT_POLICIES = ("full", "save_attention")

_BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}
_PLAN_ATTR = "_relvid_text_plan"
_HOOK_ATTR = "_relvid_text_plan_hook"


class SpeedConfigError(UserError, ValueError):
    """A speed.* setting that cannot work on this device or model."""


@dataclass(frozen=True)
class TextPlan:
    """Where the valid text tokens of each sample are, read from the mask once per forward."""

    lengths: tuple[int, ...]  # valid text tokens per sample
    order: torch.Tensor | None  # (B, L) indices putting valid tokens first; None when every mask is a prefix
    version: int  # the mask's _version when planned: an in-place edit invalidates the plan

    @property
    def uniform(self) -> bool:
        return len(set(self.lengths)) == 1


def make_text_plan(mask: torch.Tensor) -> TextPlan:
    """Plan for a (B, L) text mask; costs one host sync (call it once per forward, not per block)."""
    valid = mask.to(torch.bool)
    counts = valid.sum(dim=1)  # (B,)
    prefix = valid.to(torch.int32).cumprod(dim=1).sum(dim=1)  # (B,) length of the leading run of True
    counts_list, prefix_list = torch.stack([counts, prefix]).tolist()  # the one sync
    order = None
    if counts_list != prefix_list:
        # stable sort of "is padding" keeps valid tokens first and in their order (the reference's gather)
        order = torch.sort((~valid).to(torch.int8), dim=1, stable=True).indices  # (B, L)
    return TextPlan(lengths=tuple(int(n) for n in counts_list), order=order, version=mask._version)


def text_plan(mask: torch.Tensor | None, batch: int, length: int, device: torch.device) -> TextPlan:
    """The plan attached to `mask` by the transformer's pre-hook, or a fresh one (block called directly)."""
    if mask is None:
        return TextPlan(lengths=(length,) * batch, order=None, version=0)
    plan = getattr(mask, _PLAN_ATTR, None)
    if plan is None or plan.version != mask._version:
        plan = make_text_plan(mask)
    return plan


def sdpa_backends(name: str, device: torch.device) -> list[SDPBackend]:
    """SDPA backends to allow, in priority order, for speed.sdpa_backend=`name` on `device`."""
    if name not in SDPA_BACKENDS:
        raise SpeedConfigError(f"speed.sdpa_backend={name!r} is unknown; use one of {SDPA_BACKENDS}")
    if device.type != "cuda":
        if name in ("cudnn", "efficient"):
            raise SpeedConfigError(f"speed.sdpa_backend={name} needs a CUDA device (the model is on {device}); "
                                   "use auto, math or flash")
        return [SDPBackend.MATH] if name == "auto" else [_BACKENDS[name]]
    if name != "auto":
        return [_BACKENDS[name]]
    major, _ = torch.cuda.get_device_capability(device)
    if major >= 9:  # Hopper and later: cuDNN attention is ~1.7x torch's flash kernel at Mochi's shape
        return [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    return [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


class SDPAFallbackWarning(RuntimeWarning):
    """sdpa_backend=auto stopped using a kernel that failed at run time."""


# Backends that raised at run time in this process (sdpa_backend=auto only): skipped from then on.
_FAILED_BACKENDS: set[SDPBackend] = set()
_FAILED_LOCK = threading.Lock()


def failed_backends() -> frozenset[SDPBackend]:
    """The SDPA backends that sdpa_backend=auto gave up on in this process."""
    return frozenset(_FAILED_BACKENDS)


def _eligible(backend: SDPBackend, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    # torch's own check: inputs it would never route to cuDNN (fp32, odd head dims) are no failure of cuDNN
    if backend != SDPBackend.CUDNN_ATTENTION or not q.is_cuda:
        return True
    from torch.backends.cuda import SDPAParams, can_use_cudnn_attention

    try:
        params = SDPAParams(q, k, v, None, 0.0, False, False)
    except TypeError:  # another torch signature: let the kernel decide
        return True
    return can_use_cudnn_attention(params, False)


def sdpa_with_fallback(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backends: list[SDPBackend],
                       fallback: bool = True) -> torch.Tensor:
    """SDPA over (B, H, S, D) under `backends` (priority order).

    With `fallback` and more than one backend, the first runs alone; a RuntimeError from it (e.g.
    cuDNN at a shape it cannot plan) warns once, drops it for the rest of the process and runs the
    others. Without `fallback` (an explicit speed.sdpa_backend) an error propagates.
    """
    first = backends[0]
    if fallback and len(backends) > 1 and first not in _FAILED_BACKENDS and _eligible(first, q, k, v):
        try:
            with sdpa_kernel([first]):
                return F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False)
        except RuntimeError as err:
            with _FAILED_LOCK:
                new = first not in _FAILED_BACKENDS
                _FAILED_BACKENDS.add(first)
            if new:
                names = {backend: name for name, backend in _BACKENDS.items()}
                rest = ", ".join(names[b] for b in backends[1:])
                reason = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
                warnings.warn(f"speed.sdpa_backend=auto: the {names[first]} attention kernel failed on "
                              f"{tuple(q.shape)} {q.dtype} ({reason}); using {rest} from now on in this process "
                              "(set speed.sdpa_backend=flash to skip the attempt)", SDPAFallbackWarning, stacklevel=2)
    if fallback:
        backends = [b for b in backends if b not in _FAILED_BACKENDS] or backends[-1:]
    with sdpa_kernel(backends, set_priority=True):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False)


def _rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x (B, N, H, D) with interleaved (even, odd) pairs; cos/sin (N, H, D/2); fp32 math as in diffusers
    even, odd = x[..., 0::2].float(), x[..., 1::2].float()
    out = torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1)  # (B, N, H, D/2, 2)
    return out.flatten(-2).to(x.dtype)


def _projections(attn: nn.Module, x: torch.Tensor, to_q, to_k, to_v, norm_q, norm_k):
    q = to_q(x).unflatten(2, (attn.heads, -1))  # (B, S, H, D)
    k = to_k(x).unflatten(2, (attn.heads, -1))
    v = to_v(x).unflatten(2, (attn.heads, -1))
    return norm_q(q), norm_k(k), v


class PackedMochiAttnProcessor:
    """Drop-in for diffusers' MochiAttnProcessor2_0: packed valid text tokens, no per-block host sync."""

    def __init__(self, sdpa_backend: str = "auto", dynamic_text: bool = False) -> None:
        if sdpa_backend not in SDPA_BACKENDS:
            raise SpeedConfigError(f"speed.sdpa_backend={sdpa_backend!r} is unknown; use one of {SDPA_BACKENDS}")
        self.sdpa_backend = sdpa_backend
        self.dynamic_text = dynamic_text  # the block is compiled: mark the text length of our output dynamic

    def __call__(self, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                 attention_mask: torch.Tensor | None,
                 image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None):
        q, k, v = _projections(attn, hidden_states, attn.to_q, attn.to_k, attn.to_v, attn.norm_q, attn.norm_k)
        eq, ek, ev = _projections(attn, encoder_hidden_states, attn.add_q_proj, attn.add_k_proj, attn.add_v_proj,
                                  attn.norm_added_q, attn.norm_added_k)
        if image_rotary_emb is not None:
            q = _rotary(q, *image_rotary_emb)
            k = _rotary(k, *image_rotary_emb)
        vision, text = self._attend(q, k, v, eq, ek, ev, attention_mask)
        vision = attn.to_out[1](attn.to_out[0](vision))
        if hasattr(attn, "to_add_out"):  # the last block is context_pre_only: its text output is unused
            text = attn.to_add_out(text)
        return vision, text

    @torch.compiler.disable  # the plan holds Python ints: keep it out of a compiled block's graph
    def _attend(self, q, k, v, eq, ek, ev, mask):
        # q, k, v (B, N, H, D) vision; eq, ek, ev (B, L, H, D) text
        batch, n_vis = q.shape[0], q.shape[1]
        length = eq.shape[1]
        plan = text_plan(mask, batch, length, q.device)
        if plan.order is not None:
            index = plan.order[:, :, None, None].expand(-1, -1, eq.shape[2], eq.shape[3])  # (B, L, H, D)
            eq, ek, ev = (t.gather(1, index) for t in (eq, ek, ev))
        backends = sdpa_backends(self.sdpa_backend, q.device)
        fallback = self.sdpa_backend == "auto"
        if plan.uniform:
            outs = [self._sdpa(q, k, v, eq, ek, ev, plan.lengths[0], backends, fallback)]
        else:  # padded batch: one dense call per sample, lengths are already Python ints
            outs = [self._sdpa(q[b:b + 1], k[b:b + 1], v[b:b + 1], eq[b:b + 1], ek[b:b + 1], ev[b:b + 1], n, backends,
                               fallback)
                    for b, n in enumerate(plan.lengths)]
        vision = torch.cat([o[:, :n_vis] for o in outs]) if len(outs) > 1 else outs[0][:, :n_vis]  # (B, N, H*D)
        text = [F.pad(o[:, n_vis:], (0, 0, 0, length - (o.shape[1] - n_vis))) for o in outs]  # zeros at padding
        text = torch.cat(text) if len(text) > 1 else text[0]  # (B, L, H*D)
        if self.dynamic_text:  # the block is compiled; this function runs eagerly
            # slices of the SDPA output have a batch stride of (N + valid text) * H*D: fresh layouts keep the
            # compiled rest of the block from specialising on it; the text length is dynamic (one graph for any L)
            vision = vision.clone(memory_format=torch.contiguous_format)
            text = text.clone(memory_format=torch.contiguous_format)
            torch._dynamo.maybe_mark_dynamic(text, 1)
        return vision, text

    @staticmethod
    def _sdpa(q, k, v, eq, ek, ev, n_text: int, backends: list[SDPBackend], fallback: bool) -> torch.Tensor:
        # (b, N + n, H, D) -> (b, H, N + n, D) for SDPA, back to (b, N + n, H*D)
        qq = torch.cat([q, eq[:, :n_text]], dim=1).transpose(1, 2)
        kk = torch.cat([k, ek[:, :n_text]], dim=1).transpose(1, 2)
        vv = torch.cat([v, ev[:, :n_text]], dim=1).transpose(1, 2)
        out = sdpa_with_fallback(qq, kk, vv, backends, fallback)
        return out.transpose(1, 2).flatten(2)


def _attach_plan(module: nn.Module, args: tuple, kwargs: dict) -> None:
    # MochiTransformer3DModel.forward(hidden_states, encoder_hidden_states, timestep, encoder_attention_mask)
    mask = kwargs.get("encoder_attention_mask", args[3] if len(args) > 3 else None)
    if mask is not None:
        setattr(mask, _PLAN_ATTR, make_text_plan(mask))


# Saved (not recomputed) under speed.checkpoint=save_attention: the attention kernels' outputs. The
# policy is called with an OpOverload (e.g. aten._scaled_dot_product_flash_attention.default); these are
# the packets, so the policy compares the overload's packet (every overload of each kernel).
ATTENTION_OPS = frozenset(
    getattr(torch.ops.aten, name) for name in (
        "_scaled_dot_product_flash_attention", "_scaled_dot_product_cudnn_attention",
        "_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention_for_cpu",
    ) if hasattr(torch.ops.aten, name)
)


def is_attention_op(op) -> bool:
    """True for any overload (or the packet) of a fused SDPA kernel."""
    return getattr(op, "overloadpacket", op) in ATTENTION_OPS


def _save_attention_policy(ctx, op, *args, **kwargs):
    from torch.utils.checkpoint import CheckpointPolicy

    if is_attention_op(op):
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def _selective_checkpoint(module: nn.Module, *args):
    from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts

    context = functools.partial(create_selective_checkpoint_contexts, _save_attention_policy)
    return checkpoint(module.__call__, *args, use_reentrant=False, context_fn=context)


def mochi_blocks(transformer: nn.Module) -> list[nn.Module]:
    blocks = getattr(transformer, "transformer_blocks", None)
    if blocks is None:
        raise TypeError("expected a MochiTransformer3DModel (with transformer_blocks), "
                        f"got {type(transformer).__name__}")
    return list(blocks)


# Dynamo keeps one cache per code object, with `recompile_limit` (8) entries before it gives up and runs
# eagerly: the 48 blocks share MochiTransformerBlock.forward and the frames after the graph break at the
# packed attention. The entries a run needs: the adapter sets (relation, subject1, subject2 in training,
# relation + ffn for previews) x the last block (context_pre_only, no text output) x grad mode
# (training / preview) x the first block's input layout, about 32, with the text length dynamic.
COMPILE_RECOMPILE_LIMIT = 64
_COMPILED_ATTR = "_relvid_compiled_forward"


def _mark_text_dynamic(block: nn.Module, args: tuple, kwargs: dict) -> None:
    # MochiTransformerBlock.forward(hidden_states, encoder_hidden_states, temb, encoder_attention_mask, ...):
    # positional under gradient checkpointing, keywords otherwise. Runs eagerly, before the compiled forward.
    for index, name in ((1, "encoder_hidden_states"), (3, "encoder_attention_mask")):
        tensor = kwargs.get(name, args[index] if len(args) > index else None)
        if isinstance(tensor, torch.Tensor) and tensor.dim() >= 2:
            torch._dynamo.maybe_mark_dynamic(tensor, 1)  # (B, L, ...): one graph for every text length


def compile_blocks(transformer: nn.Module, backend: str = "inductor") -> None:
    """Regional torch.compile: each block's forward compiled, the text length dynamic, the recompile
    limit raised to COMPILE_RECOMPILE_LIMIT (never lowered). Idempotent."""
    import torch._dynamo

    config = torch._dynamo.config
    for key in ("recompile_limit", "cache_size_limit"):  # the name changed across torch versions
        if hasattr(config, key):
            setattr(config, key, max(getattr(config, key), COMPILE_RECOMPILE_LIMIT))
    if hasattr(config, "accumulated_recompile_limit"):
        config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, 4 * COMPILE_RECOMPILE_LIMIT)
    for block in mochi_blocks(transformer):
        if getattr(block, _COMPILED_ATTR, None) is not None:
            continue
        hook = block.register_forward_pre_hook(_mark_text_dynamic, with_kwargs=True)
        # the instance's forward, not block.compile(): the pre-hook must run eagerly to mark the inputs
        block.forward = torch.compile(block.forward, backend=backend)
        setattr(block, _COMPILED_ATTR, hook)


def uncompile_blocks(transformer: nn.Module) -> None:
    """Undo compile_blocks: the blocks run eagerly again."""
    for block in mochi_blocks(transformer):
        hook = getattr(block, _COMPILED_ATTR, None)
        if hook is not None:
            hook.remove()
            del block.forward  # the class's forward again
            setattr(block, _COMPILED_ATTR, None)


def apply_speed_config(transformer: nn.Module, speed, compile_backend: str = "inductor") -> nn.Module:
    """Install speed.attention / sdpa_backend / checkpoint / compile on a Mochi transformer (in place).

    attention: "auto" and "packed" install PackedMochiAttnProcessor; "diffusers" restores the reference.
    For sampling, use inference_speed(speed): the same paths without checkpointing.
    `compile_backend` is torch.compile's backend ("eager" traces without code generation: tests).
    """
    from diffusers.models.attention_processor import MochiAttnProcessor2_0

    if speed.attention not in ATTENTION_PATHS:
        raise SpeedConfigError(f"speed.attention={speed.attention!r} is unknown; use one of {ATTENTION_PATHS}")
    if speed.sdpa_backend not in SDPA_BACKENDS:
        raise SpeedConfigError(f"speed.sdpa_backend={speed.sdpa_backend!r} is unknown; use one of {SDPA_BACKENDS}")
    if speed.checkpoint not in CHECKPOINT_POLICIES:
        raise SpeedConfigError(f"speed.checkpoint={speed.checkpoint!r} is unknown; use one of {CHECKPOINT_POLICIES}")
    packed = speed.attention in ("auto", "packed")
    if not packed and speed.sdpa_backend != "auto":
        raise SpeedConfigError("speed.sdpa_backend only applies to the packed path; set speed.attention=packed "
                               "(or auto), or sdpa_backend=auto with attention=diffusers")
    blocks = mochi_blocks(transformer)
    for block in blocks:
        block.attn1.processor = PackedMochiAttnProcessor(speed.sdpa_backend, dynamic_text=bool(speed.compile)) \
            if packed else MochiAttnProcessor2_0()
    hook = getattr(transformer, _HOOK_ATTR, None)
    if hook is not None:
        hook.remove()
        setattr(transformer, _HOOK_ATTR, None)
    if packed:
        setattr(transformer, _HOOK_ATTR, transformer.register_forward_pre_hook(_attach_plan, with_kwargs=True))
    if speed.checkpoint == "save_attention":
        if not getattr(transformer, "gradient_checkpointing", False):
            raise SpeedConfigError("speed.checkpoint=save_attention refines gradient checkpointing: set "
                                   "model.gradient_checkpointing=true (or use speed.checkpoint=full)")
        transformer.enable_gradient_checkpointing(_selective_checkpoint)
    if speed.compile:
        compile_blocks(transformer, compile_backend)
    else:
        uncompile_blocks(transformer)
    return transformer


@dataclass(frozen=True)
class InferenceSpeed:
    """The speed settings a sampling transformer uses: no gradients, so no checkpointing policy."""

    attention: str = "auto"
    sdpa_backend: str = "auto"
    compile: bool = False
    checkpoint: str = "full"


def inference_speed(speed=None) -> InferenceSpeed:
    """speed.attention / sdpa_backend / compile of a config's speed section (defaults when None), for sampling."""
    if speed is None:
        return InferenceSpeed()
    return InferenceSpeed(attention=str(speed.attention), sdpa_backend=str(speed.sdpa_backend),
                          compile=bool(speed.compile))

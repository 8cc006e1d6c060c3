"""Reading Q, K, V features and attention probabilities out of a Mochi transformer's forward without
changing it: a forward pre-hook on every block's attention recomputes its projections on the side.

The hooks return nothing and draw no random numbers, so the model's outputs stay bit-identical; the
recomputation costs one more set of Q, K, V projections per block on the steps that are read. Only the
last sample of a batch is read: the conditional half of a classifier-free-guidance batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

# Vision queries per chunk when the softmax over all keys is formed: bounds the (chunk, keys) score block.
QUERY_CHUNK = 2048


def _rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    # x (N, H, D) with interleaved (even, odd) pairs; cos/sin (N, H, D/2): diffusers' Mochi rotation
    even, odd = x[..., 0::2].float(), x[..., 1::2].float()
    return torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1).flatten(-2).to(x.dtype)


def _heads(attn: nn.Module, x: Tensor, proj: nn.Module, norm: nn.Module | None) -> Tensor:
    y = proj(x).unflatten(-1, (attn.heads, -1))  # (S, H, D)
    return norm(y) if norm is not None else y


@dataclass
class BlockQKV:
    """One sample's attention inputs in one block, as the processor forms them."""

    q: Tensor  # (N, H, D) vision queries after the QK norm, before the rotation
    k: Tensor  # (N, H, D)
    v: Tensor  # (N, H, D)
    q_rot: Tensor | None  # (N, H, D) after the rotation (None when the model passes no RoPE)
    k_rot: Tensor | None
    eq: Tensor  # (Lv, H, D) the valid text tokens' queries, keys and values
    ek: Tensor
    ev: Tensor
    text_index: Tensor  # (Lv,) positions of the valid text tokens in the prompt

    def keys(self) -> Tensor:
        """(N + Lv, H, D): every key a query attends to, vision first."""
        return torch.cat([self.k_rot if self.k_rot is not None else self.k, self.ek])

    def values(self) -> Tensor:
        return torch.cat([self.v, self.ev])

    def vision_queries(self) -> Tensor:
        return self.q_rot if self.q_rot is not None else self.q


def block_qkv(attn: nn.Module, hidden: Tensor, text: Tensor, mask: Tensor | None, rope) -> BlockQKV:
    """The last sample's Q, K, V of one block's attention; hidden (B, N, W), text (B, L, W'), mask (B, L)."""
    x, e = hidden[-1], text[-1]  # (N, W), (L, W')
    q = _heads(attn, x, attn.to_q, attn.norm_q)
    k = _heads(attn, x, attn.to_k, attn.norm_k)
    v = _heads(attn, x, attn.to_v, None)
    index = torch.arange(e.shape[0], device=e.device) if mask is None else mask[-1].bool().nonzero().flatten()
    e = e[index]
    eq = _heads(attn, e, attn.add_q_proj, attn.norm_added_q)
    ek = _heads(attn, e, attn.add_k_proj, attn.norm_added_k)
    ev = _heads(attn, e, attn.add_v_proj, None)
    q_rot = k_rot = None
    if rope is not None:
        cos, sin = rope
        q_rot, k_rot = _rotary(q, cos, sin), _rotary(k, cos, sin)
    return BlockQKV(q, k, v, q_rot, k_rot, eq, ek, ev, index)


def phrase_attention(qkv: BlockQKV, phrase: Tensor, chunk: int = QUERY_CHUNK) -> tuple[Tensor, Tensor]:
    """Attention probabilities (softmax over all keys, float32), averaged over heads and phrase tokens:
    (N,) from each vision query to the phrase's keys, and (N,) from the phrase's queries to each vision key.

    `phrase` holds prompt positions; each must be a valid text token."""
    where = torch.searchsorted(qkv.text_index, phrase)  # (P,) places among the valid text tokens
    if bool((where >= len(qkv.text_index)).any()) or bool((qkv.text_index[where.clamp(max=len(qkv.text_index) - 1)]
                                                             != phrase).any()):
        raise ValueError(f"phrase positions {phrase.tolist()} are not all valid text tokens")
    queries, keys = qkv.vision_queries(), qkv.keys()  # (N, H, D), (S, H, D)
    n, heads, dim = queries.shape
    scale = dim ** -0.5
    to_phrase = torch.zeros(n, dtype=torch.float32, device=queries.device)
    from_phrase = torch.zeros(n, dtype=torch.float32, device=queries.device)
    for h in range(heads):
        kh = keys[:, h].float()  # (S, D)
        for start in range(0, n, chunk):
            probs = (queries[start:start + chunk, h].float() @ kh.T * scale).softmax(-1)  # (c, S)
            to_phrase[start:start + chunk] += probs[:, n + where].mean(-1)
        probs = (qkv.eq[where, h].float() @ kh.T * scale).softmax(-1)  # (P, S)
        from_phrase += probs[:, :n].mean(0)
    return to_phrase / heads, from_phrase / heads


@dataclass
class StepRecord:
    """Sums over blocks of one forward's readings (divide by `blocks` for the mean over layers)."""

    blocks: int = 0
    features: dict[str, Tensor] = field(default_factory=dict)  # "q" | "k" | "v" -> (N, D): mean over heads
    to_phrase: Tensor | None = None  # (N,)
    from_phrase: Tensor | None = None  # (N,)

    def mean(self, name: str) -> Tensor:
        value = self.features[name] if name in "qkv" else getattr(self, name)
        return value / self.blocks


class CaptureDone(Exception):
    """Raised after the last step to read when the capture was asked to stop the forward loop there."""


class AttentionCapture:
    """Context manager: reads the transformer forwards whose index (0, 1, ... from entry) is in `steps`.

    features: the Q, K, V of the vision tokens, mean over heads (before the rotation); phrase: prompt
    positions whose attention maps are read. `records[step]` holds the readings. With `stop`, the
    forward after which nothing is left to read raises CaptureDone (a sampling loop need not finish)."""

    def __init__(self, transformer: nn.Module, steps, features: bool = True, phrase: Tensor | None = None,
                 stop: bool = False) -> None:
        self.transformer = transformer
        self.steps = {int(s) for s in steps}
        self.features = features
        self.phrase = None if phrase is None else torch.as_tensor(phrase, dtype=torch.long)
        self.stop = stop
        self.records: dict[int, StepRecord] = {}
        self.call = -1
        self._handles: list = []

    def __enter__(self) -> AttentionCapture:
        self._handles.append(self.transformer.register_forward_pre_hook(self._count))
        if self.stop:
            self._handles.append(self.transformer.register_forward_hook(self._maybe_stop))
        for block in self.transformer.transformer_blocks:
            self._handles.append(block.attn1.register_forward_pre_hook(self._read, with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _count(self, module, args) -> None:
        self.call += 1

    def _maybe_stop(self, module, args, output) -> None:
        if self.call >= max(self.steps):
            raise CaptureDone

    @torch.no_grad()
    def _read(self, attn: nn.Module, args: tuple, kwargs: dict) -> None:
        if self.call not in self.steps:
            return
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        qkv = block_qkv(attn, hidden, kwargs["encoder_hidden_states"], kwargs.get("attention_mask"),
                        kwargs.get("image_rotary_emb"))
        record = self.records.setdefault(self.call, StepRecord())
        record.blocks += 1
        if self.features:
            for name in "qkv":
                value = getattr(qkv, name).float().mean(1)  # (N, D): mean over heads
                record.features[name] = record.features.get(name, 0) + value
        if self.phrase is not None:
            to_p, from_p = phrase_attention(qkv, self.phrase.to(qkv.text_index.device))
            record.to_phrase = to_p if record.to_phrase is None else record.to_phrase + to_p
            record.from_phrase = from_p if record.from_phrase is None else record.from_phrase + from_p

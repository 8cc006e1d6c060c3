"""The relation LoRA triplet: relation, subject1, subject2 and FFN LoRAs injected with peft.

DreamRelation puts relation LoRAs on some attention projections (Q, K by default), two subject
LoRAs on the others (V by default) and an "FFN" LoRA on the attention output projections, in both
the vision and the text branch of every MM-DiT block. Each training step selects one of
{relation, subject1, subject2}; `activate` puts exactly the selected set in the forward.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import torch
from torch import nn

from relvid.config import ADAPTERS, BRANCHES, PLACEMENTS
from relvid.errors import UserError

SELECTIONS = ("relation", "subject1", "subject2")

# Projections (q, k, v) carried by the relation and the subject LoRAs for each placement.
_PLACEMENT_PROJECTIONS: dict[str, tuple[str, str]] = {
    "QK/V": ("qk", "v"),
    "Q/KV": ("q", "kv"),
    "KV/Q": ("kv", "q"),
    "V/QK": ("v", "qk"),
}
# diffusers Mochi module names (inside `transformer_blocks.{i}.attn1.`) per projection and branch.
_MODULES = {
    "vision": {"q": "to_q", "k": "to_k", "v": "to_v", "out": "to_out.0"},
    "text": {"q": "add_q_proj", "k": "add_k_proj", "v": "add_v_proj", "out": "to_add_out"},
}
# Limits targets to the MM-DiT blocks: a bare "to_q" would also hit time_embed.pooler.to_q.
BLOCK_PATTERN = r"transformer_blocks\.\d+\.attn1\."
# peft parameter names: "<module>.lora_A.<adapter>.weight".
_LORA_PARAM = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])\.(?P<adapter>[^.]+)\.weight$")


class LoRAConfigError(UserError, ValueError):
    """A LoRA spec, adapter selection or adapter file that cannot be used as asked."""


@dataclass(frozen=True)
class TripletSpec:
    """Where the LoRA triplet goes and how big it is (JSON-able, stored with every adapter file)."""

    placement: str = "QK/V"
    rank: int = 16
    alpha: float = 16.0
    dropout: float = 0.0
    branches: str = "both"
    ranks: dict[str, int] | None = None
    alphas: dict[str, float] | None = None

    def __post_init__(self) -> None:
        # Own plain copies: callers may pass OmegaConf nodes or keep mutating their dicts.
        for field in ("ranks", "alphas"):
            value = getattr(self, field)
            if value is not None:
                object.__setattr__(self, field, {str(k): v for k, v in dict(value).items()})
        if self.placement not in PLACEMENTS:
            raise LoRAConfigError(f"lora.placement={self.placement!r} is unknown; use one of {PLACEMENTS}")
        if self.branches not in BRANCHES:
            raise LoRAConfigError(f"lora.branches={self.branches!r} is unknown; use one of {BRANCHES}")
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise LoRAConfigError(f"lora.rank={self.rank!r} must be an integer >= 1")
        if not self.alpha > 0:
            raise LoRAConfigError(f"lora.alpha={self.alpha!r} must be > 0")
        if not 0.0 <= self.dropout < 1.0:
            raise LoRAConfigError(f"lora.dropout={self.dropout!r} must be in [0, 1)")
        names = adapter_names(self)
        for field, values in (("ranks", self.ranks), ("alphas", self.alphas)):
            unknown = sorted(set(values or {}) - set(names))
            if unknown:
                raise LoRAConfigError(
                    f"lora.{field} names adapters {unknown} that placement {self.placement!r} "
                    f"does not have; its adapters are {names}"
                )
        for name, r in (self.ranks or {}).items():
            if isinstance(r, bool) or not isinstance(r, int) or r < 1:
                raise LoRAConfigError(f"lora.ranks[{name!r}]={r!r} must be an integer >= 1")
        for name, a in (self.alphas or {}).items():
            if not a > 0:
                raise LoRAConfigError(f"lora.alphas[{name!r}]={a!r} must be > 0")

    def rank_of(self, adapter: str) -> int:
        return (self.ranks or {}).get(adapter, self.rank)

    def alpha_of(self, adapter: str) -> float:
        return float((self.alphas or {}).get(adapter, self.alpha))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["alpha"] = float(self.alpha)
        d["dropout"] = float(self.dropout)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> TripletSpec:
        unknown = sorted(set(d) - set(cls.__dataclass_fields__))
        if unknown:
            raise LoRAConfigError(
                f"unknown LoRA spec keys {unknown}; known: {sorted(cls.__dataclass_fields__)}"
            )
        return cls(**d)


def adapter_names(spec: TripletSpec) -> tuple[str, ...]:
    """All adapters the spec injects."""
    return ("direct",) if spec.placement == "direct" else ADAPTERS


def inference_adapters(spec: TripletSpec) -> tuple[str, ...]:
    """Adapters used at inference: subject LoRAs are dropped (they absorb appearance)."""
    return ("direct",) if spec.placement == "direct" else ("relation", "ffn")


def adapters_for_selection(selection: str, spec: TripletSpec) -> tuple[str, ...]:
    """Adapters in the forward (and trained) when `selection` is drawn in hybrid mask training."""
    if spec.placement == "direct":
        # the Direct-LoRA baseline has one adapter, trained every step ("direct" selection)
        if selection not in (*SELECTIONS, "direct"):
            raise LoRAConfigError(f"LoRA selection {selection!r} is unknown; use 'direct' or one of {SELECTIONS}")
        return ("direct",)
    if selection not in SELECTIONS:
        raise LoRAConfigError(f"LoRA selection {selection!r} is unknown; use one of {SELECTIONS}")
    if selection == "relation":
        return ("relation", "subject1", "subject2", "ffn")
    return (selection, "ffn")


def _projections(adapter: str, spec: TripletSpec) -> tuple[str, ...]:
    if adapter not in adapter_names(spec):
        raise LoRAConfigError(
            f"adapter {adapter!r} is not part of placement {spec.placement!r}; "
            f"its adapters are {adapter_names(spec)}"
        )
    if adapter == "direct":
        return ("q", "k", "v", "out")
    if adapter == "ffn":
        return ("out",)
    relation, subject = _PLACEMENT_PROJECTIONS[spec.placement]
    return tuple(relation if adapter == "relation" else subject)


def module_suffixes(adapter: str, spec: TripletSpec) -> list[str]:
    """Module names inside `transformer_blocks.{i}.attn1.` that carry `adapter`."""
    branches = ("vision", "text") if spec.branches == "both" else (spec.branches,)
    return [_MODULES[b][p] for b in branches for p in _projections(adapter, spec)]


def target_modules(adapter: str, spec: TripletSpec) -> str:
    """peft target regex (full match against module names) for one adapter."""
    alternatives = "|".join(re.escape(s) for s in module_suffixes(adapter, spec))
    return f"{BLOCK_PATTERN}({alternatives})"


def _lora_layers(transformer: nn.Module) -> list[tuple[str, nn.Module]]:
    from peft.tuners.lora import LoraLayer

    return [(n, m) for n, m in transformer.named_modules() if isinstance(m, LoraLayer)]


def _injected_adapters(transformer: nn.Module) -> set[str]:
    names: set[str] = set()
    for _, layer in _lora_layers(transformer):
        names.update(layer.lora_A.keys())
    return names


def inject_triplet(transformer: nn.Module, spec: TripletSpec) -> tuple[str, ...]:
    """Add every adapter of `spec` (fp32 LoRA weights, B = 0), freeze the base, activate inference set."""
    from diffusers.loaders.peft import PeftAdapterMixin
    from peft import LoraConfig
    from peft.tuners.tuners_utils import cast_adapter_dtype

    if not isinstance(transformer, PeftAdapterMixin):
        raise TypeError(
            f"inject_triplet needs a diffusers model with PeftAdapterMixin (e.g. MochiTransformer3DModel), "
            f"got {type(transformer).__name__}"
        )
    names = adapter_names(spec)
    clash = sorted(set(names) & (_injected_adapters(transformer) | set(getattr(transformer, "peft_config", {}))))
    if clash:
        raise LoRAConfigError(f"adapters {clash} are already injected into this transformer; inject once")
    linear_names = [n for n, m in transformer.named_modules() if isinstance(m, nn.Linear)]
    # Check every adapter before touching the model so a bad spec leaves it unchanged.
    for name in names:
        pattern = target_modules(name, spec)
        if not any(re.fullmatch(pattern, n) for n in linear_names):
            raise LoRAConfigError(
                f"LoRA adapter {name!r} (placement {spec.placement!r}, branches {spec.branches!r}) "
                f"matches no linear layer of {type(transformer).__name__} (pattern {pattern!r})"
            )
    for name in names:
        config = LoraConfig(
            r=spec.rank_of(name),
            lora_alpha=spec.alpha_of(name),
            lora_dropout=spec.dropout,
            target_modules=target_modules(name, spec),
            init_lora_weights=True,  # A: kaiming-uniform, B: zeros, so injection changes nothing
        )
        with warnings.catch_warnings():
            # peft warns whenever a second adapter joins a model; several adapters is the point here.
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            transformer.add_adapter(config, adapter_name=name)
        # diffusers' add_adapter keeps LoRA weights in the base dtype; bf16 LoRA updates would be lossy.
        cast_adapter_dtype(transformer, adapter_name=name, autocast_adapter_dtype=True)
    for param_name, param in transformer.named_parameters():
        if not _LORA_PARAM.match(param_name):
            param.requires_grad_(False)
    activate(transformer, inference_adapters(spec))
    return names


def activate(transformer: nn.Module, adapters: Iterable[str], zeroed: Iterable[str] = ()) -> None:
    """Put exactly `adapters` in the forward of every LoRA layer; all LoRA params keep requires_grad.

    Which adapters learn is decided by the forward alone: an adapter outside it gets grad None and
    AdamW skips it (no momentum, no weight decay), while DDP still sees a fixed parameter set.
    `zeroed` adapters are in the forward too, with their output multiplied by 0 (the reference
    code's rule for unselected LoRAs, hmt.unselected=zero_grad): they change nothing, get a zero
    gradient, and AdamW's momentum and weight decay still move them. Every call restores the scale
    alpha / rank of the adapters it does not zero.
    """
    wanted = list(dict.fromkeys(adapters))
    zero = [a for a in dict.fromkeys(zeroed) if a not in wanted]
    layers = _lora_layers(transformer)
    if not layers:
        raise LoRAConfigError("this transformer has no LoRA layers; call inject_triplet first")
    unknown = sorted(set(wanted + zero) - _injected_adapters(transformer))
    if unknown:
        raise LoRAConfigError(
            f"cannot activate {unknown}: not injected (injected: {sorted(_injected_adapters(transformer))})"
        )
    for name, layer in layers:
        if layer.merged:
            raise LoRAConfigError(f"LoRA layer {name} is merged into its base weight; unmerge it first")
        if layer.disable_adapters:
            layer.enable_adapters(True)
        # the scales peft set at injection (alpha / rank), kept before any is zeroed
        scales = layer.__dict__.setdefault("_relvid_scales", dict(layer.scaling))
        for adapter, scale in scales.items():
            layer.scaling[adapter] = 0.0 if adapter in zero else scale
        # peft's set_adapter also flips requires_grad; reset below. Layers lacking a name skip it.
        layer.set_adapter(wanted + zero)
    for param_name, param in transformer.named_parameters():
        if _LORA_PARAM.match(param_name):
            param.requires_grad_(True)


def cast_lora(transformer: nn.Module, dtype: torch.dtype) -> None:
    """Every LoRA weight to `dtype` (lora.dtype=bf16: the reference code casts them with the base)."""
    for param in lora_parameters(transformer).values():
        param.data = param.data.to(dtype)


def active_adapters(transformer: nn.Module) -> tuple[str, ...]:
    """The adapters in the forward; () when there are no LoRA layers or they are disabled."""
    found = {
        tuple(layer.active_adapters) for _, layer in _lora_layers(transformer) if not layer.disable_adapters
    }
    if not found:
        return ()
    if len(found) > 1:
        raise LoRAConfigError(f"LoRA layers disagree on the active adapters {sorted(found)}; call activate()")
    return found.pop()


def lora_parameters(transformer: nn.Module, adapters: Iterable[str] | None = None) -> dict[str, nn.Parameter]:
    """LoRA parameters (of `adapters`, default all), keyed as in named_parameters()."""
    wanted = None if adapters is None else set(adapters)
    out = {}
    for name, param in transformer.named_parameters():
        m = _LORA_PARAM.match(name)
        if m and (wanted is None or m["adapter"] in wanted):
            out[name] = param
    return out


def adapter_state_dict(transformer: nn.Module, adapters: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """Detached CPU copies keyed "<adapter>/<module>.lora_A.weight" (and lora_B)."""
    wanted = None if adapters is None else list(adapters)
    if wanted is not None:
        missing = sorted(set(wanted) - _injected_adapters(transformer))
        if missing:
            raise LoRAConfigError(f"adapters {missing} are not injected into this transformer")
    out = {}
    for name, param in lora_parameters(transformer, wanted).items():
        m = _LORA_PARAM.match(name)
        out[f"{m['adapter']}/{m['module']}.lora_{m['ab']}.weight"] = param.detach().to("cpu", copy=True)
    return out


def load_adapter_state_dict(transformer: nn.Module, state: dict[str, torch.Tensor], strict: bool = True) -> None:
    """Copy `state` (adapter_state_dict keys) into the injected LoRA weights.

    strict: every key must name an injected weight, and every injected weight of the adapters
    present in `state` must be given. Shapes must always match.
    """
    params = {}
    for name, param in lora_parameters(transformer).items():
        m = _LORA_PARAM.match(name)
        params[f"{m['adapter']}/{m['module']}.lora_{m['ab']}.weight"] = param
    unexpected = sorted(k for k in state if k not in params)
    given_adapters = {k.split("/", 1)[0] for k in state}
    missing = sorted(k for k in params if k.split("/", 1)[0] in given_adapters and k not in state)
    bad_shape = sorted(
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(params[k].shape)}"
        for k in state
        if k in params and tuple(state[k].shape) != tuple(params[k].shape)
    )
    if bad_shape:
        raise LoRAConfigError(f"LoRA weights with the wrong shape (rank or model size differs): {bad_shape}")
    if strict and (unexpected or missing):
        raise LoRAConfigError(
            f"adapter state does not match the injected LoRAs: unexpected keys {unexpected}, "
            f"missing keys {missing}"
        )
    with torch.no_grad():
        for key, tensor in state.items():
            if key in params:
                params[key].copy_(tensor)

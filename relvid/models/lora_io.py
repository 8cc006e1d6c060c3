"""LoRA interchange: export the inference set as a diffusers or a Mochi LoRA, import reference checkpoints.

The diffusers file is what `MochiPipeline.load_lora_weights` reads: one LoRA (relation + FFN, or
the direct LoRA) with its peft config stored as adapter metadata, so alpha != rank and different
relation/FFN ranks load with the right scale. The mochi file is genmo's own LoRA format (what genmo's
fine-tuner saves and its pipeline and ComfyUI's native Mochi loader read): the same inference set on
genmo's fused layers `blocks.{i}.attn.{qkv_x,qkv_y,proj_x,proj_y}`, scale folded into B. The reference
import reads the DreamRelation reference code's checkpoints (a fork of genmo's Mochi LoRA fine-tuner).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import re
import warnings
from collections import defaultdict
from pathlib import Path

import safetensors.torch
import torch
from torch import nn

from relvid.errors import InputError, InputNotFoundError, OutputExistsError
from relvid.files import atomic_path
from relvid.models.adapter_file import ADAPTER_FILE_NAME, DIFFUSERS_WEIGHT_NAME, save_adapter_state
from relvid.models.lora import (
    BLOCK_PATTERN,
    SELECTIONS,
    LoRAConfigError,
    TripletSpec,
    adapter_state_dict,
    inference_adapters,
    module_suffixes,
    target_modules,
)

# Reference attention layer names -> diffusers Mochi `attn1` module names.
_REF_QKV = {
    "to_q_x": ("vision", "q", "to_q"),
    "to_k_x": ("vision", "k", "to_k"),
    "to_v_x": ("vision", "v", "to_v"),
    "to_q_y": ("text", "q", "add_q_proj"),
    "to_k_y": ("text", "k", "add_k_proj"),
    "to_v_y": ("text", "v", "add_v_proj"),
}
_REF_OUT = {"proj_x": ("vision", "to_out.0"), "proj_y": ("text", "to_add_out")}
_REF_KEY = re.compile(
    r"^(?P<prefix>(?:.*\.)?)blocks\.(?P<block>\d+)\.attn\."
    r"(?:(?P<qkv>to_[qkv]_[xy])\.lora_(?P<ab>[AB])\.(?P<adapter>relation|subject1|subject2)"
    r"|(?P<out>proj_[xy])\.lora_(?P<ab_out>[AB]))$"
)
# (relation projections, subject projections) -> placement.
_PLACEMENT_OF = {
    (frozenset(rel), frozenset(sub)): name
    for name, (rel, sub) in {"QK/V": ("qk", "v"), "Q/KV": ("q", "kv"), "KV/Q": ("kv", "q"), "V/QK": ("v", "qk")}.items()
}


def _inference_state_to_diffusers(
    state: dict[str, torch.Tensor], spec: TripletSpec
) -> tuple[dict[str, torch.Tensor], dict]:
    """Our adapter-keyed inference tensors -> one diffusers LoRA (keys + peft config as a dict)."""
    names = inference_adapters(spec)
    out: dict[str, torch.Tensor] = {}
    owner: dict[str, str] = {}
    for key, tensor in state.items():
        adapter, rest = key.split("/", 1)
        if adapter not in names:
            continue
        module = rest.rsplit(".lora_", 1)[0]
        # One diffusers LoRA has one A/B per module; the placements keep inference adapters disjoint.
        if owner.setdefault(module, adapter) != adapter:
            raise LoRAConfigError(f"{module} carries both {owner[module]!r} and {adapter!r}; cannot export as one LoRA")
        out[f"transformer.{rest}"] = tensor.detach().to("cpu", torch.float32).contiguous()
    if not out:
        raise LoRAConfigError(f"no weights of the inference adapters {names} to export")
    main = names[0]
    config: dict = {
        "r": spec.rank_of(main),
        "lora_alpha": spec.alpha_of(main),
        "lora_dropout": 0.0,
        "bias": "none",
        "init_lora_weights": True,
        "target_modules": BLOCK_PATTERN + "(" + "|".join(
            re.escape(s) for name in names for s in module_suffixes(name, spec)
        ) + ")",
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    for other in names[1:]:
        # peft matches pattern keys as `(.*\.)?(key)$` against module names: our target regex fits.
        if spec.rank_of(other) != spec.rank_of(main):
            config["rank_pattern"][target_modules(other, spec)] = spec.rank_of(other)
        if spec.alpha_of(other) != spec.alpha_of(main):
            config["alpha_pattern"][target_modules(other, spec)] = spec.alpha_of(other)
    return out, config


def diffusers_lora_state_dict(transformer: nn.Module, spec: TripletSpec) -> tuple[dict[str, torch.Tensor], dict]:
    """The inference set (relation + FFN, or direct) as one diffusers LoRA: (tensors, LoraConfig kwargs).

    Keys look like "transformer.transformer_blocks.0.attn1.to_q.lora_A.weight". The config holds
    only the LoraConfig fields that matter, so it loads across peft versions.
    """
    return _inference_state_to_diffusers(adapter_state_dict(transformer, inference_adapters(spec)), spec)


def refuse_existing(paths: list[Path], overwrite: bool) -> None:
    """Raise OutputExistsError for the first of `paths` that exists, unless `overwrite`.

    Called before anything is written, so a refused export leaves no part of itself behind.
    """
    if overwrite:
        return
    for path in paths:
        if path.exists():
            raise OutputExistsError(f"{path} already exists: refusing to replace it; pass --overwrite "
                                    "(overwrite=True) to replace it, or choose another --out folder")


def _write_diffusers(state: dict[str, torch.Tensor], config: dict, path: Path) -> Path:
    from diffusers.loaders import Mochi1LoraLoaderMixin  # MochiPipeline's own save_lora_weights

    layers = {k.removeprefix("transformer."): v for k, v in state.items()}
    with atomic_path(path) as tmp:  # no half-written LoRA file on a crash
        Mochi1LoraLoaderMixin.save_lora_weights(
            tmp.parent,
            transformer_lora_layers=layers,
            weight_name=tmp.name,
            transformer_lora_adapter_metadata=dict(config),
        )
    return path


# --- genmo's Mochi LoRA format -------------------------------------------------------------------------
# genmo's DiT fuses Q, K and V of each branch into one linear layer whose output rows are [q; k; v]
# (diffusers' conversion splits it in three), and puts its LoRA there: "blocks.{i}.attn.qkv_x.lora_A" is
# (rank, in), "...lora_B" (3 * width, rank), applied as W + B @ A * alpha / rank, with one rank and alpha
# for every qkv layer and one for every output projection, stored as JSON `kwargs` metadata.
EXPORT_FORMATS = ("diffusers", "mochi")
MOCHI_WEIGHT_NAME = "mochi_lora.safetensors"  # the default name of `relvid export --format mochi`
# diffusers `attn1` module -> (genmo's fused layer, the row block it fills: 0 q, 1 k, 2 v)
_FUSED_QKV = {
    "to_q": ("qkv_x", 0), "to_k": ("qkv_x", 1), "to_v": ("qkv_x", 2),
    "add_q_proj": ("qkv_y", 0), "add_k_proj": ("qkv_y", 1), "add_v_proj": ("qkv_y", 2),
}
_FUSED_OUT = {"to_out.0": "proj_x", "to_add_out": "proj_y"}
_ATTN_KEY = re.compile(r"^(?P<adapter>[^/]+)/transformer_blocks\.(?P<block>\d+)\.attn1\.(?P<module>.+)"
                       r"\.lora_(?P<ab>[AB])\.weight$")


def inference_state_to_mochi(state: dict[str, torch.Tensor], spec: TripletSpec) -> tuple[dict[str, torch.Tensor], dict]:
    """The inference set (relation + FFN, or direct) of an adapter state as genmo's Mochi LoRA:
    (tensors keyed "blocks.{i}.attn.{qkv_x,qkv_y,proj_x,proj_y}.lora_{A,B}", genmo's model kwargs).

    Per fused layer A stacks the A of the projections the placement puts a LoRA on ([A_q; A_k] for
    QK/V) and B is block-diagonal, with zero rows for the projection it leaves out, so B @ A equals
    the three separate updates. alpha / rank is folded into B and the kwargs store alpha = rank:
    genmo applies scale 1, and ComfyUI, which stores no alpha then, applies scale 1 too.
    """
    names = inference_adapters(spec)
    qkv: dict[tuple[int, str], dict[int, dict[str, torch.Tensor]]] = defaultdict(dict)
    out: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        m = _ATTN_KEY.match(key)
        if m is None:
            raise LoRAConfigError(f"adapter state key {key!r} is not a Mochi attention LoRA "
                                  "('<adapter>/transformer_blocks.<i>.attn1.<module>.lora_A|B.weight')")
        if m["adapter"] not in names:
            continue  # subject LoRAs stay out of the inference set
        block, module, ab = int(m["block"]), m["module"], m["ab"]
        weight = tensor.detach().to("cpu", torch.float32)
        if ab == "B":  # scale folded into B: genmo and ComfyUI then apply B @ A as it is
            weight = weight * (spec.alpha_of(m["adapter"]) / spec.rank_of(m["adapter"]))
        if module in _FUSED_QKV:
            layer, slot = _FUSED_QKV[module]
            qkv[(block, layer)].setdefault(slot, {})[ab] = weight
        elif module in _FUSED_OUT:
            out.setdefault((block, _FUSED_OUT[module]), {})[ab] = weight
        else:
            raise LoRAConfigError(f"{key}: genmo's Mochi LoRA format has no place for a LoRA on {module!r}")
    if not qkv and not out:
        raise LoRAConfigError(f"no weights of the inference adapters {names} to export")

    tensors: dict[str, torch.Tensor] = {}
    qkv_ranks, out_ranks = set(), set()
    for (block, layer), slots in sorted(qkv.items()):
        half = sorted(slot for slot, pair in slots.items() if set(pair) != {"A", "B"})
        if half:
            raise LoRAConfigError(f"block {block} {layer}: LoRA rows {half} lack their A or B partner")
        order = sorted(slots)
        a = torch.cat([slots[s]["A"] for s in order])  # (sum of ranks, in)
        width = {slots[s]["B"].shape[0] for s in order}
        if len(width) != 1:
            raise LoRAConfigError(f"block {block} {layer}: q/k/v LoRAs of different widths {sorted(width)}")
        rows = width.pop()
        b = a.new_zeros(3 * rows, a.shape[0])  # (3 * width, sum of ranks): block-diagonal
        col = 0
        for s in order:
            r = slots[s]["B"].shape[1]
            b[s * rows:(s + 1) * rows, col:col + r] = slots[s]["B"]
            col += r
        tensors[f"blocks.{block}.attn.{layer}.lora_A"] = a.contiguous()
        tensors[f"blocks.{block}.attn.{layer}.lora_B"] = b.contiguous()
        qkv_ranks.add(a.shape[0])
    for (block, layer), pair in sorted(out.items()):
        if set(pair) != {"A", "B"}:
            raise LoRAConfigError(f"block {block} {layer}: LoRA lacks its A or B partner")
        tensors[f"blocks.{block}.attn.{layer}.lora_A"] = pair["A"].contiguous()
        tensors[f"blocks.{block}.attn.{layer}.lora_B"] = pair["B"].contiguous()
        out_ranks.add(pair["A"].shape[0])
    if len(qkv_ranks) > 1 or len(out_ranks) > 1:
        raise LoRAConfigError(f"genmo's Mochi LoRA has one rank for every qkv layer and one for every output "
                              f"projection; these LoRAs have qkv ranks {sorted(qkv_ranks)} and output ranks "
                              f"{sorted(out_ranks)}")
    qkv_rank, out_rank = (next(iter(qkv_ranks)) if qkv_ranks else 0), (next(iter(out_ranks)) if out_ranks else 0)
    kwargs = {
        "qkv_proj_lora_rank": qkv_rank, "qkv_proj_lora_alpha": qkv_rank, "qkv_proj_lora_dropout": 0.0,
        "out_proj_lora_rank": out_rank, "out_proj_lora_alpha": out_rank, "out_proj_lora_dropout": 0.0,
    }
    return tensors, kwargs


def _write_mochi(tensors: dict[str, torch.Tensor], kwargs: dict, spec: TripletSpec, path: Path) -> Path:
    # genmo's loaders read the `kwargs` entry (JSON: safetensors metadata is string to string)
    metadata = {"format": "pt", "kwargs": json.dumps(kwargs), "relvid_spec": json.dumps(spec.to_dict(), sort_keys=True)}
    with atomic_path(path) as tmp:
        safetensors.torch.save_file(tensors, str(tmp), metadata=metadata)
    return path


def default_export_name(fmt: str, relation: str | None = None) -> str:
    """pytorch_lora_weights.safetensors (diffusers: the name MochiPipeline.load_lora_weights looks for in a
    folder); <relation>_mochi.safetensors (mochi: a name that reads well in ComfyUI's LoRA list), or
    mochi_lora.safetensors when the relation is not known."""
    _check_format(fmt)
    if fmt == "diffusers":
        return DIFFUSERS_WEIGHT_NAME
    return f"{safe_file_stem(relation)}_mochi.safetensors" if relation else MOCHI_WEIGHT_NAME


def safe_file_stem(text: str) -> str:
    """``text`` with anything but letters, digits, '.', '_', '+' and '-' replaced by '_' (a file name part)."""
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", str(text)).strip(".") or "lora"


def _check_format(fmt: str) -> None:
    if fmt not in EXPORT_FORMATS:
        raise InputError(f"LoRA format {fmt!r} is unknown; use one of {', '.join(EXPORT_FORMATS)} (diffusers: "
                         "MochiPipeline.load_lora_weights; mochi: genmo's format, ComfyUI's LoraLoader)")


def write_inference_lora(state: dict[str, torch.Tensor], spec: TripletSpec, path: str | os.PathLike,
                         fmt: str = "diffusers") -> Path:
    """Write the inference set of an adapter state ("<adapter>/<module>...") to ``path`` in ``fmt``
    (diffusers | mochi), atomically, replacing any file there. The subject LoRAs are dropped."""
    _check_format(fmt)
    path = Path(path)
    keep = tuple(f"{name}/" for name in inference_adapters(spec))
    inference = {k: v for k, v in state.items() if k.startswith(keep)}
    if not inference:
        raise LoRAConfigError(f"no tensors of the inference adapters {inference_adapters(spec)} to export")
    if fmt == "mochi":
        return _write_mochi(*inference_state_to_mochi(inference, spec), spec, path)
    return _write_diffusers(*_inference_state_to_diffusers(inference, spec), path)


def export_diffusers(transformer: nn.Module, spec: TripletSpec, out_dir: str | os.PathLike,
                     overwrite: bool = False) -> Path:
    """Write out_dir/pytorch_lora_weights.safetensors for MochiPipeline.load_lora_weights.

    An existing file there is replaced only with `overwrite` (else OutputExistsError).
    """
    return export_state_dict(adapter_state_dict(transformer, inference_adapters(spec)), spec, out_dir,
                             overwrite=overwrite)


def export_state_dict(state: dict[str, torch.Tensor], spec: TripletSpec, out_dir: str | os.PathLike,
                      overwrite: bool = False, fmt: str = "diffusers", name: str | None = None) -> Path:
    """Like export_diffusers, from an adapter state ("<adapter>/<module>...") without any model, in
    ``fmt`` (diffusers | mochi), as out_dir/``name`` (default: default_export_name(fmt)).

    Only the inference adapters are written; the subject LoRAs in `state` are dropped.
    """
    target = Path(out_dir) / check_export_name(name or default_export_name(fmt))
    refuse_existing([target], overwrite)
    return write_inference_lora(state, spec, target, fmt)


def check_export_name(name: str) -> str:
    """``name`` when it is a plain file name ending in .safetensors; else InputError."""
    if Path(name).name != name or name in (".", "..") or not name.endswith(".safetensors"):
        raise InputError(f"--name {name!r}: give a file name ending in .safetensors, without a folder "
                         "(the folder is --out)")
    return name


def convert_reference_state_dict(state: dict[str, torch.Tensor], qkv_alpha: float | None = None,
                                 out_alpha: float | None = None) -> tuple[dict[str, torch.Tensor], TripletSpec]:
    """Reference-code LoRA tensors -> our adapter_state_dict keys for all four adapters, and the spec.

    Accepts any prefix before "blocks." (model., module., _orig_mod., ...); refuses anything it does
    not recognise. Alphas default to the ranks (scale 1, as the released checkpoints use);
    ``import_reference`` passes those the file stores (qkv_proj_lora_alpha -> qkv_alpha,
    out_proj_lora_alpha -> out_alpha).
    """
    if not state:
        raise LoRAConfigError("reference state dict is empty: expected blocks.{i}.attn.* LoRA tensors")
    unknown = sorted(k for k in state if not _REF_KEY.match(k))
    if unknown:
        raise LoRAConfigError(
            f"unrecognised reference keys {unknown[:20]}{' ...' if len(unknown) > 20 else ''}; expected "
            "[prefix]blocks.{i}.attn.{to_q_x,to_k_x,to_v_x,to_q_y,to_k_y,to_v_y}.lora_{A,B}.{relation,subject1,"
            "subject2} and [prefix]blocks.{i}.attn.{proj_x,proj_y}.lora_{A,B}"
        )
    prefixes = sorted({_REF_KEY.match(k)["prefix"] for k in state})
    if len(prefixes) > 1:
        raise LoRAConfigError(f"reference keys mix prefixes {prefixes}; pass one model's LoRA weights")

    # (adapter, module path) -> {"A": tensor, "B": tensor}; plus what sits where, to infer the spec.
    pairs: dict[tuple[str, str], dict[str, torch.Tensor]] = defaultdict(dict)
    projections: dict[str, set[str]] = defaultdict(set)  # adapter -> {"q", "k", "v"}
    branches: set[str] = set()
    blocks: set[int] = set()
    for key, tensor in state.items():
        m = _REF_KEY.match(key)
        block = int(m["block"])
        blocks.add(block)
        if m["qkv"]:
            branch, proj, module = _REF_QKV[m["qkv"]]
            adapter, ab = m["adapter"], m["ab"]
            projections[adapter].add(proj)
        else:
            branch, module = _REF_OUT[m["out"]]
            adapter, ab = "ffn", m["ab_out"]
        branches.add(branch)
        if not isinstance(tensor, torch.Tensor) or tensor.ndim != 2:
            raise LoRAConfigError(f"reference key {key}: expected a 2-D tensor, got {_describe(tensor)}")
        pairs[(adapter, f"transformer_blocks.{block}.attn1.{module}")][ab] = tensor

    half = sorted(f"{a}/{mod} has only lora_{next(iter(t))}" for (a, mod), t in pairs.items() if len(t) != 2)
    if half:
        raise LoRAConfigError(f"reference LoRAs without their A/B partner: {half}")
    ranks: dict[str, int] = {}
    bad_rank = []
    for (adapter, module), t in sorted(pairs.items()):
        r_a, r_b = t["A"].shape[0], t["B"].shape[1]
        if r_a != r_b or ranks.setdefault(adapter, r_a) != r_a:
            bad_rank.append(f"{adapter}/{module}: A {tuple(t['A'].shape)}, B {tuple(t['B'].shape)}")
    if bad_rank:
        raise LoRAConfigError(
            f"reference LoRA ranks disagree (A is (rank, in), B is (out, rank); one rank per adapter): {bad_rank}"
        )

    spec = _infer_spec(projections, branches, ranks)
    expected = _expected_modules(spec, num_blocks=max(blocks) + 1)
    present = set(pairs)
    missing = sorted(f"{a}/{m}" for a, m in expected - present)
    extra = sorted(f"{a}/{m}" for a, m in present - expected)
    if missing or extra:
        raise LoRAConfigError(
            f"reference LoRAs do not form a {spec.placement} triplet over {max(blocks) + 1} blocks "
            f"(branches {spec.branches}; the last block has no proj_y): missing {missing}, unexpected {extra}"
        )
    out = {
        f"{adapter}/{module}.lora_{ab}.weight": t[ab].detach().to("cpu", torch.float32).contiguous()
        for (adapter, module), t in pairs.items()
        for ab in ("A", "B")
    }
    if qkv_alpha is not None or out_alpha is not None:
        alphas = {a: float(qkv_alpha if qkv_alpha is not None else spec.rank_of(a)) for a in SELECTIONS}
        alphas["ffn"] = float(out_alpha if out_alpha is not None else spec.rank_of("ffn"))
        spec = dataclasses.replace(spec, alpha=alphas["relation"], alphas=alphas)
    return out, spec


def _describe(x: object) -> str:
    return f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__


def _infer_spec(projections: dict[str, set[str]], branches: set[str], ranks: dict[str, int]) -> TripletSpec:
    absent = [a for a in ("relation", "subject1", "subject2", "ffn") if a not in ranks]
    if absent:
        raise LoRAConfigError(f"reference checkpoint has no {absent} LoRAs; expected the full triplet + FFN LoRA")
    rel = frozenset(projections["relation"])
    subs = {frozenset(projections["subject1"]), frozenset(projections["subject2"])}
    placement = _PLACEMENT_OF.get((rel, subs.pop())) if len(subs) == 1 else None
    if placement is None:
        raise LoRAConfigError(
            f"cannot infer the placement: relation LoRAs on {sorted(projections['relation'])}, subject1 on "
            f"{sorted(projections['subject1'])}, subject2 on {sorted(projections['subject2'])}; expected one of "
            "QK/V, Q/KV, KV/Q, V/QK (subjects on the same projections, relation on the rest)"
        )
    base = ranks["relation"]
    overrides = {a: r for a, r in ranks.items() if r != base}
    return TripletSpec(
        placement=placement,
        rank=base,
        alpha=float(base),
        dropout=0.0,
        branches="both" if len(branches) == 2 else branches.pop(),
        ranks=overrides or None,
        alphas={a: float(r) for a, r in overrides.items()} or None,
    )


def _expected_modules(spec: TripletSpec, num_blocks: int) -> set[tuple[str, str]]:
    out = set()
    for adapter in ("relation", "subject1", "subject2", "ffn"):
        for suffix in module_suffixes(adapter, spec):
            for block in range(num_blocks):
                if suffix == "to_add_out" and block == num_blocks - 1:
                    continue  # Mochi's last block never updates text tokens
                out.add((adapter, f"transformer_blocks.{block}.attn1.{suffix}"))
    return out


def _unwrap(obj: object, file: Path) -> dict[str, torch.Tensor]:
    # Training checkpoints often nest the weights under "state_dict" or "model".
    while isinstance(obj, dict) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        inner = [k for k in ("state_dict", "model") if isinstance(obj.get(k), dict)]
        if not inner:
            non_tensor = sorted(k for k, v in obj.items() if not isinstance(v, torch.Tensor))[:10]
            raise LoRAConfigError(
                f"{file}: not a LoRA state dict (non-tensor entries {non_tensor} and no 'state_dict'/'model' key)"
            )
        obj = obj[inner[0]]
    if not isinstance(obj, dict):
        raise LoRAConfigError(f"{file}: expected a dict of tensors, got {type(obj).__name__}")
    return obj


def stored_alphas(kwargs: object) -> tuple[float | None, float | None]:
    """(qkv alpha, out alpha) from a reference checkpoint's model kwargs (its YAML's ``model.kwargs``:
    ``qkv_proj_lora_alpha``, ``out_proj_lora_alpha``); None where absent."""
    if not isinstance(kwargs, dict):
        return None, None
    found = []
    for key in ("qkv_proj_lora_alpha", "out_proj_lora_alpha"):
        value = kwargs.get(key)
        found.append(float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None)
    return found[0], found[1]


def read_reference(file: Path) -> tuple[dict[str, torch.Tensor], dict | None]:
    """A reference checkpoint's LoRA tensors and the model kwargs it stores (None when it stores
    none): ``.pt`` as {"state_dict", "kwargs"}, ``.safetensors`` with a JSON ``kwargs`` metadata entry."""
    if file.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(file), framework="pt") as handle:
                metadata = handle.metadata() or {}
                tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118 (not a dict)
        except Exception as e:  # a truncated or foreign file: its own error, named
            raise LoRAConfigError(f"{file}: cannot be read as a safetensors file: {str(e).splitlines()[0][:200]}") \
                from None
        try:
            kwargs = json.loads(metadata["kwargs"]) if "kwargs" in metadata else None
        except json.JSONDecodeError:
            raise LoRAConfigError(f"{file}: its 'kwargs' metadata is not JSON") from None
        return tensors, kwargs
    try:
        raw = torch.load(file, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError, ValueError) as e:
        raise LoRAConfigError(f"{file}: cannot be read as a torch checkpoint (weights_only=True): "
                              f"{str(e).splitlines()[0][:200]}") from None
    kwargs = raw.get("kwargs") if isinstance(raw, dict) and isinstance(raw.get("kwargs"), dict) else None
    if isinstance(raw, dict) and "kwargs" in raw:
        raw = {k: v for k, v in raw.items() if k != "kwargs"}
    return _unwrap(raw, file), kwargs


def import_reference(file: str | os.PathLike, out_dir: str | os.PathLike, qkv_alpha: float | None = None,
                     out_alpha: float | None = None, overwrite: bool = False) -> Path:
    """Convert a reference checkpoint: writes the diffusers inference LoRA and our full-triplet file.

    The LoRA alphas are those the file stores (the reference saves its model kwargs with the
    weights); ``qkv_alpha`` / ``out_alpha`` override them. A file that stores none is read as
    alpha = rank (scale 1, as the released checkpoints use), with a warning.
    Returns out_dir/pytorch_lora_weights.safetensors; the triplet goes to out_dir/relvid_adapters.safetensors.
    If either file exists, nothing is written unless `overwrite` (else OutputExistsError).
    """
    file, out_dir = Path(file), Path(out_dir)
    if not file.is_file():
        raise InputNotFoundError(f"reference checkpoint not found: {file}")
    refuse_existing([out_dir / DIFFUSERS_WEIGHT_NAME, out_dir / ADAPTER_FILE_NAME], overwrite)
    tensors, kwargs = read_reference(file)
    not_finite = sorted(k for k, v in tensors.items()
                        if torch.is_tensor(v) and v.is_floating_point() and not bool(torch.isfinite(v).all()))
    if not_finite:
        raise LoRAConfigError(f"{file}: non-finite (NaN or infinite) LoRA weights in {not_finite[:3]}: the run that "
                              "saved it had diverged; import an earlier checkpoint of it")
    file_qkv, file_out = stored_alphas(kwargs)
    qkv_alpha = qkv_alpha if qkv_alpha is not None else file_qkv
    out_alpha = out_alpha if out_alpha is not None else file_out
    if qkv_alpha is None or out_alpha is None:
        missing = [name for name, value in (("qkv_proj_lora_alpha", qkv_alpha), ("out_proj_lora_alpha", out_alpha))
                   if value is None]
        warnings.warn(f"{file} stores no {' or '.join(missing)}: reading it as alpha = rank (scale 1, as the "
                      "released checkpoints use); pass --qkv-alpha / --out-alpha if the run used other values",
                      stacklevel=2)
    try:
        state, spec = convert_reference_state_dict(tensors, qkv_alpha=qkv_alpha, out_alpha=out_alpha)
    except LoRAConfigError as e:
        raise LoRAConfigError(f"{file}: {e}") from e
    save_adapter_state(out_dir / ADAPTER_FILE_NAME, state, spec, metadata={"source": str(file)})
    return _write_diffusers(*_inference_state_to_diffusers(state, spec), out_dir / DIFFUSERS_WEIGHT_NAME)

"""relvid's adapter file, the one home of everything about it: its name, writing, reading and
validating it, reading the adapters out of a training checkpoint, and loading any adapter source
(a .ckpt, our triplet file, a run's adapters/ folder, a diffusers LoRA file) into a transformer.

The triplet file is safetensors with every adapter's LoRA weights under "<adapter>/<module>.lora_A|B.weight"
and the TripletSpec (placement, ranks, alpha, branches) as JSON metadata, so it loads without a config.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import safetensors
import safetensors.torch
import torch
from torch import nn

from relvid.errors import UserError
from relvid.files import atomic_path
from relvid.models.lora import (
    LoRAConfigError,
    TripletSpec,
    activate,
    adapter_names,
    adapter_state_dict,
    inference_adapters,
    inject_triplet,
    load_adapter_state_dict,
)

ADAPTER_FILE_NAME = "relvid_adapters.safetensors"
RUN_ADAPTER_FILE = Path("adapters") / ADAPTER_FILE_NAME  # where a training run writes it
DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # `relvid export` / diffusers' name
FORMAT_NAME = "relvid-adapters"
FORMAT_VERSION = "1"
# "<adapter>/<module>.lora_A.weight": the keys of an adapter state (adapter_state_dict)
_STATE_KEY = re.compile(r"^(?P<adapter>[^/]+)/(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$")


def save_adapter_state(
    path: str | os.PathLike,
    state: dict[str, torch.Tensor],
    spec: TripletSpec,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write adapter_state_dict-style tensors in our format (safetensors, atomic)."""
    path = Path(path)
    reserved = {"format", "version", "spec"} & set(metadata or {})
    if reserved:
        raise LoRAConfigError(f"metadata keys {sorted(reserved)} are reserved by the adapter format")
    _check_state_keys(state, spec, where="adapter state to save")
    header = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "spec": json.dumps(spec.to_dict(), sort_keys=True)}
    for k, v in (metadata or {}).items():
        if not isinstance(v, str):
            raise LoRAConfigError(f"metadata[{k!r}] must be a string, got {type(v).__name__}")
        header[k] = v
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    with atomic_path(path) as tmp:  # a crash never leaves a half-written adapter file
        safetensors.torch.save_file(tensors, str(tmp), metadata=header)
    return path


def save_adapters(
    path: str | os.PathLike,
    transformer: nn.Module,
    spec: TripletSpec,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Save the full triplet (all adapters of `spec`) in our format."""
    return save_adapter_state(path, adapter_state_dict(transformer, adapter_names(spec)), spec, metadata)


def load_adapters(path: str | os.PathLike) -> tuple[TripletSpec, dict[str, torch.Tensor], dict[str, str]]:
    """Read an adapter file: (spec, adapter_state_dict-style tensors, the extra metadata given at save)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"adapter file not found: {path}")
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            header = dict(f.metadata() or {})
            state = {k: f.get_tensor(k) for k in f.keys()}
    except safetensors.SafetensorError as e:
        raise LoRAConfigError(f"{path}: not a readable safetensors file ({e})") from e
    if header.get("format") != FORMAT_NAME:
        raise LoRAConfigError(
            f"{path}: not a relvid adapter file (metadata format={header.get('format')!r}, "
            f"expected {FORMAT_NAME!r}); diffusers LoRA files are loaded with MochiPipeline.load_lora_weights"
        )
    if header.get("version") != FORMAT_VERSION:
        raise LoRAConfigError(
            f"{path}: adapter format version {header.get('version')!r} is not supported (expected {FORMAT_VERSION!r})"
        )
    try:
        spec = TripletSpec.from_dict(json.loads(header["spec"]))
    except (KeyError, json.JSONDecodeError, TypeError, LoRAConfigError) as e:
        raise LoRAConfigError(f"{path}: bad 'spec' metadata ({e})") from e
    _check_state_keys(state, spec, where=str(path))
    extra = {k: v for k, v in header.items() if k not in ("format", "version", "spec")}
    return spec, state, extra


def _check_state_keys(state: dict[str, torch.Tensor], spec: TripletSpec, where: str) -> None:
    names = adapter_names(spec)
    bad = sorted(k for k in state if not (m := _STATE_KEY.match(k)) or m["adapter"] not in names)
    if bad:
        raise LoRAConfigError(
            f"{where}: keys {bad} are not '<adapter>/<module>.lora_A|B.weight' with an adapter of {names}"
        )
    absent = sorted(set(names) - {k.split("/", 1)[0] for k in state})
    if absent:
        raise LoRAConfigError(f"{where}: adapters {absent} of placement {spec.placement!r} have no weights")
    not_finite = sorted(k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all()))
    if not_finite:
        raise LoRAConfigError(f"{where}: non-finite (NaN or infinite) LoRA weights in {not_finite[:3]}"
                              f"{' ...' if len(not_finite) > 3 else ''}: the run that made them diverged; "
                              "use an earlier checkpoint")


# "transformer.transformer_blocks.3.attn1.to_q.lora_A.relation.weight"
_LORA_KEY = re.compile(r"^transformer\.(?P<module>.+)\.(?P<ab>lora_[AB])\.(?P<adapter>[A-Za-z0-9_]+)\.weight$")


class CheckpointError(UserError, ValueError):
    """A file that is not a readable relvid checkpoint."""


def adapters_from_checkpoint(path: str | Path) -> tuple[TripletSpec, dict[str, torch.Tensor]]:
    """(spec, adapter state with keys "<adapter>/<module>.lora_{A,B}.weight") from a .ckpt file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle/zip errors of many kinds: report the file
        raise CheckpointError(f"{path} is not a readable checkpoint ({type(err).__name__}: "
                              f"{str(err).splitlines()[0][:200]})") from None
    meta = ckpt.get("relvid") if isinstance(ckpt, dict) else None
    if meta is None:
        raise CheckpointError(f"{path} has no 'relvid' section: it was not written by `relvid train`")
    state: dict[str, torch.Tensor] = {}
    for key, value in ckpt.get("state_dict", {}).items():
        match = _LORA_KEY.match(key)
        if match is None:
            raise CheckpointError(f"{path}: unexpected tensor {key!r} in state_dict (expected LoRA weights only)")
        state[f"{match['adapter']}/{match['module']}.{match['ab']}.weight"] = value
    if not state:
        raise CheckpointError(f"{path} holds no LoRA tensors")
    return TripletSpec.from_dict(meta["spec"]), state


DIFFUSERS_ADAPTER_NAME = "relvid_inference"


@dataclass(frozen=True)
class AdapterSource:
    """Which file was loaded, in which format, and its sha256 (recorded next to every video)."""

    path: Path
    kind: str  # "checkpoint" | "relvid" | "diffusers"
    sha256: str
    spec: TripletSpec | None  # None for a diffusers file (its peft config is in the file)

    def to_dict(self) -> dict:
        return {"path": str(self.path), "kind": self.kind, "sha256": self.sha256,
                "spec": None if self.spec is None else self.spec.to_dict()}


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def resolve_adapter_file(source: str | os.PathLike) -> tuple[Path, str]:
    """(file, kind) for a checkpoint, an adapter file or a folder holding one."""
    path = Path(source).expanduser()
    if path.is_dir():
        # import-reference writes both files; our triplet file carries the exact spec, so prefer it.
        for name, kind in ((ADAPTER_FILE_NAME, "relvid"), (DIFFUSERS_WEIGHT_NAME, "diffusers")):
            if (path / name).is_file():
                return path / name, kind
        raise FileNotFoundError(f"{path} holds neither {ADAPTER_FILE_NAME} nor {DIFFUSERS_WEIGHT_NAME}: pass a "
                                "run's adapters/ folder, an export folder, a .ckpt or an adapter file")
    if not path.is_file():
        raise FileNotFoundError(f"adapter source not found: {path}")
    if path.suffix == ".ckpt":
        return path, "checkpoint"
    if path.suffix != ".safetensors":
        raise LoRAConfigError(f"{path}: expected a .ckpt or a .safetensors adapter file")
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            fmt = (f.metadata() or {}).get("format")
    except safetensors.SafetensorError as err:
        raise LoRAConfigError(f"{path}: not a readable safetensors file ({err})") from None
    return path, "relvid" if fmt == FORMAT_NAME else "diffusers"


def read_triplet(source: str | os.PathLike) -> tuple[TripletSpec, dict]:
    """(spec, adapter state) of a relvid checkpoint, triplet file or a folder holding one."""
    path, kind = resolve_adapter_file(source)
    if kind == "diffusers":
        raise LoRAConfigError(f"{path} is a diffusers LoRA file: it holds the inference set only, not relvid's "
                              f"triplet; pass a .ckpt, a {ADAPTER_FILE_NAME} or a run's adapters/ folder")
    if kind == "checkpoint":
        spec, state = adapters_from_checkpoint(path)
        _check_state_keys(state, spec, where=str(path))  # the same checks as a triplet file, NaN included
        return spec, state
    spec, state, _ = load_adapters(path)
    return spec, state


def apply_adapter_source(transformer: nn.Module, source: str | os.PathLike,
                         select: Callable[[TripletSpec], Sequence[str]] = inference_adapters) -> AdapterSource:
    """Load `source` into `transformer` (which must have no LoRAs yet), eval mode, with the adapters
    ``select(spec)`` names active: by default the inference set (relation + FFN, or the direct LoRA).
    A diffusers file holds the inference set only and is loaded as it is."""
    path, kind = resolve_adapter_file(source)
    spec = None
    if kind == "diffusers":
        from diffusers.loaders import Mochi1LoraLoaderMixin

        state, metadata = Mochi1LoraLoaderMixin.lora_state_dict(str(path), return_lora_metadata=True,
                                                                local_files_only=True)
        if not state or not all("lora" in k for k in state):
            raise LoRAConfigError(f"{path}: not a diffusers LoRA file (keys without 'lora')")
        not_finite = sorted(k for k, v in state.items() if not bool(torch.isfinite(v).all()))
        if not_finite:
            raise LoRAConfigError(f"{path}: non-finite (NaN or infinite) LoRA weights in {not_finite[:3]}")
        Mochi1LoraLoaderMixin.load_lora_into_transformer(state, transformer, adapter_name=DIFFUSERS_ADAPTER_NAME,
                                                         metadata=metadata)
        transformer.set_adapters([DIFFUSERS_ADAPTER_NAME])
    else:
        spec, state = read_triplet(path)
        inject_triplet(transformer, spec)
        load_adapter_state_dict(transformer, state)
        activate(transformer, list(select(spec)))
    transformer.eval()  # LoRA dropout off at inference
    return AdapterSource(path=path, kind=kind, sha256=file_sha256(path), spec=spec)

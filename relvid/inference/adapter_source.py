"""Put a trained relation LoRA into a fresh transformer, whatever file it came in.

Accepted: a relvid training checkpoint (.ckpt); our triplet file relvid_adapters.safetensors (or
a run's adapters/ folder); a diffusers LoRA file pytorch_lora_weights.safetensors (from
`relvid export` or `relvid import-reference`, or a folder holding one). The triplet is injected
and only the inference set (relation + FFN) is active: the subject LoRAs are dropped.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import safetensors
from torch import nn

from relvid.models.lora import (
    FORMAT_NAME,
    LoRAConfigError,
    TripletSpec,
    activate,
    inference_adapters,
    inject_triplet,
    load_adapter_state_dict,
    load_adapters,
)
from relvid.models.lora_io import DIFFUSERS_WEIGHT_NAME, TRIPLET_WEIGHT_NAME

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
        for name, kind in ((TRIPLET_WEIGHT_NAME, "relvid"), (DIFFUSERS_WEIGHT_NAME, "diffusers")):
            if (path / name).is_file():
                return path / name, kind
        raise FileNotFoundError(f"{path} holds neither {TRIPLET_WEIGHT_NAME} nor {DIFFUSERS_WEIGHT_NAME}: pass a "
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
                              f"triplet; pass a .ckpt, a {TRIPLET_WEIGHT_NAME} or a run's adapters/ folder")
    if kind == "checkpoint":
        from relvid.inference.checkpoints import adapters_from_checkpoint

        return adapters_from_checkpoint(path)
    spec, state, _ = load_adapters(path)
    return spec, state


def apply_adapter_source(transformer: nn.Module, source: str | os.PathLike) -> AdapterSource:
    """Load `source` into `transformer` (which must have no LoRAs yet) with the inference set active."""
    path, kind = resolve_adapter_file(source)
    spec = None
    if kind == "diffusers":
        from diffusers.loaders import Mochi1LoraLoaderMixin

        state, metadata = Mochi1LoraLoaderMixin.lora_state_dict(str(path), return_lora_metadata=True,
                                                                local_files_only=True)
        if not state or not all("lora" in k for k in state):
            raise LoRAConfigError(f"{path}: not a diffusers LoRA file (keys without 'lora')")
        Mochi1LoraLoaderMixin.load_lora_into_transformer(state, transformer, adapter_name=DIFFUSERS_ADAPTER_NAME,
                                                         metadata=metadata)
        transformer.set_adapters([DIFFUSERS_ADAPTER_NAME])
    else:
        spec, state = read_triplet(path)
        inject_triplet(transformer, spec)
        load_adapter_state_dict(transformer, state)
        activate(transformer, inference_adapters(spec))
    transformer.eval()  # LoRA dropout off at inference
    return AdapterSource(path=path, kind=kind, sha256=file_sha256(path), spec=spec)

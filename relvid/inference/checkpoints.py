"""Reading relvid training checkpoints without building a model (export, inspection)."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from relvid.models.lora import TripletSpec

# "transformer.transformer_blocks.3.attn1.to_q.lora_A.relation.weight"
_LORA_KEY = re.compile(r"^transformer\.(?P<module>.+)\.(?P<ab>lora_[AB])\.(?P<adapter>[A-Za-z0-9_]+)\.weight$")


class CheckpointError(ValueError):
    """A file that is not a readable relvid checkpoint."""


def adapters_from_checkpoint(path: str | Path) -> tuple[TripletSpec, dict[str, torch.Tensor]]:
    """(spec, adapter state with keys "<adapter>/<module>.lora_{A,B}.weight") from a .ckpt file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle/zip errors of many kinds: report the file
        raise CheckpointError(f"{path} is not a readable checkpoint ({type(err).__name__}: {err})") from None
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

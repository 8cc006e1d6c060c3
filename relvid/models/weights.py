"""Finding a diffusers component (transformer, VAE) in a local folder, with errors that say what to fix."""

from __future__ import annotations

import json
import os
from pathlib import Path

from relvid.errors import UserError


class WeightsNotFoundError(UserError, FileNotFoundError):
    """Model weights missing or incomplete at the configured local path."""


def find_component_folder(path: str | os.PathLike | None, subfolder: str, class_name: str, what: str,
                          hint: str) -> Path:
    """``path/<subfolder>`` (a pipeline root) or ``path`` itself, checked to hold ``class_name``'s
    config and every weight shard. ``what`` names the component in errors; ``hint`` says how to get it."""
    if path is None:
        raise WeightsNotFoundError(f"{what} not configured: {hint}.")
    root = Path(path).expanduser()
    if not root.exists():
        raise WeightsNotFoundError(f"{what} not found at {root}: {hint}.")
    folder = root / subfolder if (root / subfolder / "config.json").is_file() else root
    config = folder / "config.json"
    if not config.is_file():
        raise WeightsNotFoundError(
            f"{root} has no {subfolder}/config.json (nor config.json): it is not a diffusers-format Mochi folder; "
            f"{hint}."
        )
    try:
        found = json.loads(config.read_text()).get("_class_name")
    except json.JSONDecodeError as err:
        raise WeightsNotFoundError(f"{config} is not valid JSON ({err}); re-download it.") from None
    if found != class_name:
        raise WeightsNotFoundError(
            f"{config} describes a {found!r}, not a {class_name}; point the path at the Mochi pipeline folder "
            f"or its {subfolder}/ subfolder."
        )
    check_weight_files(folder, hint)
    return folder


def check_weight_files(folder: Path, hint: str) -> None:
    """The single safetensors file, or the index and every shard it names."""
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    if (folder / "diffusion_pytorch_model.safetensors").is_file():
        return
    if not index.is_file():
        raise WeightsNotFoundError(
            f"{folder} holds no diffusion_pytorch_model.safetensors (or its .index.json): the download "
            f"is incomplete; {hint}."
        )
    shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    missing = [s for s in shards if not (folder / s).is_file()]
    if missing:
        raise WeightsNotFoundError(
            f"{folder} is missing {len(missing)} of {len(shards)} weight shards ({', '.join(missing[:3])}"
            f"{', ...' if len(missing) > 3 else ''}): the download is incomplete; {hint}."
        )

"""Finding a diffusers component (transformer, VAE) in a local folder, with errors that say what to fix."""

from __future__ import annotations

import hashlib
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


# How much of each weight file's start and end goes into its fingerprint: enough to tell two
# trainings of one architecture apart, without reading gigabytes.
_SAMPLE_BYTES = 1 << 20


def _file_sample(path: Path) -> bytes:
    """The file's first and last ``_SAMPLE_BYTES`` (the whole file when it is smaller than both)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        if size <= 2 * _SAMPLE_BYTES:
            return f.read()
        head = f.read(_SAMPLE_BYTES)
        f.seek(size - _SAMPLE_BYTES)
        return head + f.read()


def weights_identity(path: str | os.PathLike) -> str:
    """A cheap fingerprint of the transformer weights at ``path`` (a pipeline root or its transformer/).

    Hashes the transformer's config.json, the pipeline's model_index.json when there is one, and
    every weight file's name, size and first and last MiB: two folders holding other weights (or
    another architecture) differ, the same folder always gives the same value, and the
    gigabytes of a real checkpoint are never read whole."""
    root = Path(path).expanduser()
    folder = root / "transformer" if (root / "transformer" / "config.json").is_file() else root
    config = folder / "config.json"
    if not config.is_file():
        raise WeightsNotFoundError(f"{root} has no transformer/config.json (nor config.json): point model.path at "
                                   "a diffusers-format Mochi folder")
    digest = hashlib.sha256()
    digest.update(b"config.json\0" + config.read_bytes())
    # the pipeline root's model_index.json, whether path names the root or its transformer/ folder
    index = (folder.parent if folder.name == "transformer" else root) / "model_index.json"
    if index.is_file():
        digest.update(b"model_index.json\0" + index.read_bytes())
    weights = sorted(p for p in folder.iterdir()
                     if p.is_file() and not p.name.startswith(".") and p.name.endswith((".safetensors", ".bin",
                                                                                         ".index.json")))
    if not weights:
        raise WeightsNotFoundError(f"{folder} holds no weight files (*.safetensors, *.bin): the download is "
                                   "incomplete; download the model again")
    for weight in weights:
        digest.update(f"{weight.name}\0{weight.stat().st_size}\0".encode())
        digest.update(_file_sample(weight))
    return f"sha256:{digest.hexdigest()}"

"""Finding a diffusers component (transformer, VAE) in a local folder, with errors that say what to fix.

Besides the files being there, the checks read what is cheap to read and would otherwise end in a
raw traceback deep in diffusers / transformers: each safetensors file's header (a truncated or
corrupted download), the tensor shapes it declares against those the folder's config.json builds
(a config from another download), and a pipeline root's model_index.json."""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from relvid.errors import UserError

if TYPE_CHECKING:
    import torch


class WeightsNotFoundError(UserError, FileNotFoundError):
    """Model weights missing or incomplete at the configured local path."""


def read_json(path: Path, hint: str) -> object:
    """``path`` parsed as JSON; a WeightsNotFoundError naming it when it is not (the download is damaged)."""
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise WeightsNotFoundError(f"{path} is not valid JSON ({err}): the download is damaged; {hint}.") from None


def check_model_index(root: Path, component: str, class_names: Iterable[str] | None, hint: str) -> None:
    """A pipeline root's model_index.json, when there is one, must be a JSON object listing
    ``component`` as ``[library, class]`` (class one of ``class_names`` when they are given)."""
    index = root / "model_index.json"
    if not index.is_file():
        return
    data = read_json(index, hint)
    if not isinstance(data, dict):
        raise WeightsNotFoundError(
            f"{index} holds a JSON {type(data).__name__}, not the object of a diffusers pipeline: the download is "
            f"damaged; {hint}.")
    entry = data.get(component)
    if entry is None:
        listed = sorted(k for k in data if not k.startswith("_"))
        raise WeightsNotFoundError(
            f"{index} lists no {component!r} component (it lists {', '.join(listed) or 'none'}): it is not a Mochi "
            f"pipeline's model_index.json, or it is damaged; {hint}.")
    if not (isinstance(entry, list) and len(entry) == 2):
        raise WeightsNotFoundError(
            f"{index}: {component!r} is {entry!r}, not a [library, class] pair: the file is damaged; {hint}.")
    names = tuple(class_names or ())
    if names and entry[1] not in names:
        raise WeightsNotFoundError(
            f"{index} says {component}/ holds a {entry[1]!r}, not a {' or '.join(names)}: it is not a Mochi "
            f"pipeline; {hint}.")


def describe_folder(folder: Path) -> str:
    """What a model folder holds, from its config.json: its transformers model_type or diffusers
    _class_name (for errors about a folder passed where another kind of model was expected)."""
    config = folder / "config.json"
    if not config.is_file():
        names = sorted(p.name for p in folder.iterdir())[:5] if folder.is_dir() else []
        return f"no config.json (it holds {', '.join(names) or 'nothing'})"
    try:
        data = json.loads(config.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return "a config.json that is not valid JSON"
    if not isinstance(data, dict):
        return "a config.json that is not a JSON object"
    if data.get("model_type"):
        return f"a transformers model of model_type {data['model_type']!r}"
    if data.get("_class_name"):
        return f"a diffusers {data['_class_name']!r}"
    return "a config.json with neither model_type nor _class_name"


def find_component_folder(path: str | os.PathLike | None, subfolder: str, class_name: str, what: str,
                          hint: str) -> Path:
    """``path/<subfolder>`` (a pipeline root) or ``path`` itself, checked to hold ``class_name``'s
    config and every weight shard, each readable. ``what`` names the component in errors; ``hint``
    says how to get it."""
    if path is None:
        raise WeightsNotFoundError(f"{what} not configured: {hint}.")
    root = Path(path).expanduser()
    if not root.exists():
        raise WeightsNotFoundError(f"{what} not found at {root}: {hint}.")
    check_model_index(root, subfolder, (class_name,), hint)
    folder = root / subfolder if (root / subfolder / "config.json").is_file() else root
    config = folder / "config.json"
    if not config.is_file():
        raise WeightsNotFoundError(
            f"{root} has no {subfolder}/config.json (nor config.json): it is not a diffusers-format Mochi folder; "
            f"{hint}."
        )
    data = read_json(config, hint)
    found = data.get("_class_name") if isinstance(data, dict) else None
    if found != class_name:
        raise WeightsNotFoundError(
            f"{config} describes a {found!r}, not a {class_name}; point the path at the Mochi pipeline folder "
            f"or its {subfolder}/ subfolder."
        )
    check_weight_files(folder, hint)
    return folder


def check_weight_files(folder: Path, hint: str) -> None:
    """The single safetensors file, or the index and every shard it names, each with a readable header."""
    files = safetensors_files(folder, "diffusion_pytorch_model", hint)
    if not files:
        raise WeightsNotFoundError(
            f"{folder} holds no diffusion_pytorch_model.safetensors (or its .index.json): the download "
            f"is incomplete; {hint}."
        )
    for file in files:
        safetensors_header(file, hint)


def safetensors_files(folder: Path, stem: str, hint: str) -> list[Path]:
    """``<stem>.safetensors``, or every shard ``<stem>.safetensors.index.json`` names (refused when one
    is missing or the index is unreadable); [] when there is neither."""
    single = folder / f"{stem}.safetensors"
    if single.is_file():
        return [single]
    index = folder / f"{stem}.safetensors.index.json"
    if not index.is_file():
        return []
    data = read_json(index, hint)
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise WeightsNotFoundError(f"{index} has no \"weight_map\" of tensor names to shard files: the download is "
                                   f"damaged; {hint}.")
    shards = sorted(set(weight_map.values()))
    missing = [s for s in shards if not (folder / s).is_file()]
    if missing:
        raise WeightsNotFoundError(
            f"{folder} is missing {len(missing)} of {len(shards)} weight shards ({', '.join(missing[:3])}"
            f"{', ...' if len(missing) > 3 else ''}): the download is incomplete; {hint}."
        )
    return [folder / s for s in shards]


# safetensors refuses headers over 100 MB; a larger size field means the file is not safetensors.
_MAX_HEADER_BYTES = 100_000_000


def safetensors_header(path: Path, hint: str) -> dict[str, dict]:
    """The tensor entries (name -> dtype, shape, data_offsets) of a safetensors file, read from its
    header alone; a WeightsNotFoundError naming the file when the header is cut or corrupted or the
    file is shorter (or longer) than the header says."""
    size = path.stat().st_size

    def unreadable(why: str) -> WeightsNotFoundError:
        return WeightsNotFoundError(
            f"{path} is truncated or unreadable ({why}): the download was cut short or the file is corrupted; "
            f"delete it and download it again ({hint}).")

    with open(path, "rb") as f:
        raw_len = f.read(8)
        if len(raw_len) < 8:
            raise unreadable(f"{size} bytes, too short for a safetensors header")
        (header_len,) = struct.unpack("<Q", raw_len)
        if header_len > _MAX_HEADER_BYTES or 8 + header_len > size:
            raise unreadable(f"its header claims {header_len} bytes but the file holds {size}")
        try:
            header = json.loads(f.read(header_len).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise unreadable(f"its header is not JSON: {err}") from None
    if not isinstance(header, dict):
        raise unreadable("its header is not a JSON object")
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    try:
        end = max((int(v["data_offsets"][1]) for v in tensors.values()), default=0)
        for v in tensors.values():
            [int(n) for n in v["shape"]]
    except (TypeError, KeyError, IndexError, ValueError):
        raise unreadable("its header lacks tensor shapes or offsets") from None
    expected = 8 + header_len + end
    if size != expected:
        raise unreadable(f"{size} bytes where its header describes {expected}")
    return tensors


def check_config_matches_weights(folder: Path, files: list[Path], build: Callable[[], torch.nn.Module],
                                 hint: str) -> None:
    """Refuse a folder whose config.json builds tensors of other shapes than its weight files hold.

    ``build`` makes the model from ``folder``'s config; it runs on the meta device (no memory, no
    init), so the check costs the headers and a model skeleton. Tensors present on one side only are
    left to the loader."""
    import torch

    with torch.device("meta"):
        model = build()
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    mismatched: list[tuple[str, tuple, tuple, str]] = []
    for file in files:
        for name, entry in safetensors_header(file, hint).items():
            shape = tuple(int(n) for n in entry["shape"])
            if name in expected and expected[name] != shape:
                mismatched.append((name, expected[name], shape, file.name))
    if mismatched:
        order = {name: i for i, name in enumerate(expected)}
        name, want, got, file = min(mismatched, key=lambda m: order[m[0]])  # the model's first such tensor
        raise WeightsNotFoundError(
            f"{folder}: config.json does not match the weights ({len(mismatched)} tensors differ, e.g. {name}: "
            f"config.json builds {list(want)}, {file} holds {list(got)}). The config and the weights come from "
            f"different downloads (or config.json was edited): download the whole folder again from one source; "
            f"{hint}.")


def check_diffusers_config(folder: Path, model_class, hint: str) -> None:
    """check_config_matches_weights for a diffusers model folder found by find_component_folder."""
    files = safetensors_files(folder, "diffusion_pytorch_model", hint)
    check_config_matches_weights(folder, files, lambda: model_class.from_config(model_class.load_config(folder)), hint)


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

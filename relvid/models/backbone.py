"""The Mochi transformer: from a local diffusers-format folder, or a tiny random one for tests."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable
from pathlib import Path

import torch
from diffusers import MochiTransformer3DModel

from relvid.config import TinyModelConfig
from relvid.models.weights import WeightsNotFoundError, check_diffusers_config, find_component_folder

__all__ = ["WeightsNotFoundError", "apply_storage_dtype", "find_transformer_folder", "load_transformer",
           "parameter_bytes", "resolve_storage_dtype", "tiny_transformer", "weights_variant"]

DOWNLOAD_HINT = (
    "download genmo/mochi-1-preview in diffusers format (e.g. `huggingface-cli download "
    "genmo/mochi-1-preview --local-dir /models/mochi-1-preview` on a machine with internet) and set "
    "model.path=<that folder> or the MOCHI_PATH environment variable"
)


def resolve_dtype(name: str, on_gpu: bool) -> torch.dtype:
    """`auto` means bf16 on a GPU and fp32 on a CPU."""
    table = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    if name == "auto":
        return torch.bfloat16 if on_gpu else torch.float32
    return table[name]


# model.storage_dtype: the frozen base's weights between uses (torch's spelling)
STORAGE_DTYPES = {"float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2}


def resolve_storage_dtype(name: str | None) -> torch.dtype | None:
    """None: the weights stay in the compute dtype."""
    return None if name is None else STORAGE_DTYPES[name]


def apply_storage_dtype(model: MochiTransformer3DModel, storage: torch.dtype, compute: torch.dtype) -> None:
    """Keep the linear layers of `model` in `storage` and cast each one to `compute` for its own forward only
    (diffusers' layerwise casting). Patch embedding and norms stay in `compute` (Mochi's skip list); adapters
    injected afterwards are new modules, outside the casting, in their own dtype."""
    model.enable_layerwise_casting(storage_dtype=storage, compute_dtype=compute)


def parameter_bytes(tensors: Iterable[torch.Tensor]) -> dict[str, dict[str, int]]:
    """Bytes of `tensors` (e.g. a module's parameters()) by device, then dtype: {"cuda:0": {"float8_e4m3fn": n}}."""
    out: dict[str, dict[str, int]] = {}
    for tensor in tensors:
        by_dtype = out.setdefault(str(tensor.device), {})
        name = str(tensor.dtype).removeprefix("torch.")
        by_dtype[name] = by_dtype.get(name, 0) + tensor.numel() * tensor.element_size()
    return out


def find_transformer_folder(path: str | os.PathLike | None) -> Path:
    """The folder holding the transformer's config.json and weights; clear errors otherwise."""
    return find_component_folder(path, "transformer", "MochiTransformer3DModel", "Mochi weights", DOWNLOAD_HINT)


# The tiny preset's architecture: the schema's defaults, less the init seed.
TINY_CONFIG = {f.name: f.default for f in dataclasses.fields(TinyModelConfig) if f.name != "seed"}


def tiny_transformer(seed: int = 0, **overrides: int) -> MochiTransformer3DModel:
    """A Mochi-architecture transformer with random weights, identical for a given seed."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MochiTransformer3DModel(**{**TINY_CONFIG, **overrides})
        # diffusers leaves RoPE frequencies at zero; give the tiny model non-trivial ones so that
        # position matters in tests as it does in the real model.
        with torch.no_grad():
            model.pos_frequencies.normal_(0.0, 0.5)
    return model


def weights_variant(folder: Path, dtype: torch.dtype) -> str | None:
    """"bf16" when the folder also holds the weights stored in bf16 (diffusers' variant files, as
    genmo/mochi-1-preview ships them) and the model is wanted in bf16: read as stored, they stay
    memory-mapped, where converting the default files would copy every tensor."""
    from diffusers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFETENSORS_WEIGHTS_NAME
    from diffusers.utils.hub_utils import _add_variant

    if dtype != torch.bfloat16:
        return None
    names = (_add_variant(SAFETENSORS_WEIGHTS_NAME, "bf16"), _add_variant(SAFE_WEIGHTS_INDEX_NAME, "bf16"))
    return "bf16" if any((folder / name).is_file() for name in names) else None


def load_transformer(model_cfg, on_gpu: bool = False,
                     device: torch.device | str | None = None) -> MochiTransformer3DModel:
    """Build the backbone described by a `ModelConfig`, frozen, in its training dtype, on `device`
    (None: the CPU).

    From a folder the safetensors files are memory-mapped: on the CPU, weights stored in the wanted
    dtype are not copied, so the processes of one machine share one copy (the page cache). On a GPU
    each tensor goes straight from the file to the device, so host memory never holds the whole model.
    With model.storage_dtype the linear layers are stored in that dtype (cast on the host, then moved) and
    computed in model.dtype. With model.offload=blocks the blocks after the first model.resident_blocks keep
    their weights on the host (pinned memory, or files under model.offload_dir) and come onto `device` one
    block at a time for their forward (relvid.models.offload); the rest of the model goes to `device`.
    """
    dtype = resolve_dtype(model_cfg.dtype, on_gpu)
    storage = resolve_storage_dtype(getattr(model_cfg, "storage_dtype", None))
    target = torch.device(device) if device is not None else torch.device("cpu")
    offload = getattr(model_cfg, "offload", "none") == "blocks"
    if model_cfg.preset == "tiny":
        tiny = model_cfg.tiny
        model = tiny_transformer(**{k: tiny[k] for k in tiny})
        if dtype != torch.float32:
            model = model.to(dtype)
    else:
        folder = find_transformer_folder(model_cfg.path)
        check_diffusers_config(folder, MochiTransformer3DModel, DOWNLOAD_HINT)
        # With fp8 storage the weights are cast on the host (memory-mapped, one layer at a time) and only
        # the fp8 copy goes to the GPU: loading there in bf16 first would need the bf16 model's memory.
        # With block offload the offloaded blocks stay on the host: the model is built there too.
        host_first = target.type == "cpu" or storage is not None or offload
        placement = {} if host_first else {"device_map": {"": target}}
        model = MochiTransformer3DModel.from_pretrained(folder, torch_dtype=dtype, local_files_only=True,
                                                        low_cpu_mem_usage=True,
                                                        variant=weights_variant(folder, dtype), **placement)
    if storage is not None:
        apply_storage_dtype(model, storage, dtype)
    if offload:  # before .to(target): that then moves all but the offloaded blocks' weights
        from relvid.models.offload import apply_block_offload

        apply_block_offload(model, int(model_cfg.resident_blocks), model_cfg.offload_dir,
                            pin=target.type == "cuda")
    if device is not None and (model_cfg.preset == "tiny" or storage is not None or offload):
        model = model.to(target)  # else from_pretrained placed it
    model.requires_grad_(False)
    if model_cfg.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    return model

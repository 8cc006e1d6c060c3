"""Customizing the toy base with relvid's own training (relvid.training.run.run), and loading the result.

A method (a row of the toy tables) is configs/toy/dreamrelation.yaml plus its own file in
configs/toy/methods/; the toy-specific keys (the relation, the cache, the base model folder, the
seed, the output folder) are set here. Table 2's "w/o relation / subject / FFN LoRA" ablations are
the core key lora.frozen: the triplet and the hybrid-mask schedule stay as they are, the named
adapters just never learn, so they contribute nothing in training or at inference.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from relvid.config import SHIPPED_CONFIGS, ModelConfig, load_config
from relvid.errors import InputError
from relvid.models.adapter_file import RUN_ADAPTER_FILE, apply_adapter_source
from relvid.models.backbone import load_transformer
from relvid.models.lora import TripletSpec, inference_adapters
from relvid.toy.drivers.base import BASE_DIR


def config_dir() -> Path:
    """The toy configs shipped with the package (the repository's configs/toy links here)."""
    return SHIPPED_CONFIGS / "toy"


def method_names() -> tuple[str, ...]:
    """The rows of the toy tables: one file each in configs/toy/methods/, layered on dreamrelation.yaml."""
    return tuple(sorted(p.stem for p in (config_dir() / "methods").glob("*.yaml")))


def method_files(method: str) -> list[Path]:
    """The config files of a method: the toy world's DreamRelation run, then what the method changes."""
    path = config_dir() / "methods" / f"{method}.yaml"
    if not path.is_file():
        raise InputError(f"unknown toy method {method!r}: use one of {', '.join(method_names())} "
                         f"(files in {path.parent})")
    return [config_dir() / "dreamrelation.yaml", path]


def method_config(method: str, relation: str, cache_dir: str | Path, out_dir: str | Path, seed: int = 0,
                  base_dir: str | Path = BASE_DIR, overrides: Sequence[str] = ()) -> DictConfig:
    return load_config(method_files(method), [
        f"relation={relation}", "custom_relation=true", f"data.cache_dir={Path(cache_dir).resolve()}",
        f"output_dir={Path(out_dir).resolve()}", f"model.path={Path(base_dir).resolve()}", f"seed={seed}",
        *overrides])


def customize(method: str, relation: str, cache_dir: str | Path, out_dir: str | Path, seed: int = 0,
              base_dir: str | Path = BASE_DIR, overrides: Sequence[str] = ()) -> Path:
    """Train one method with relvid.training.run.run; returns its adapter file."""
    from relvid.training.run import run  # Lightning trainer assembly: imported only when training

    cfg = method_config(method, relation, cache_dir, out_dir, seed, base_dir, overrides)
    run(cfg)
    return Path(cfg.output_dir) / RUN_ADAPTER_FILE


def load_base(base_dir: str | Path = BASE_DIR, device: str = "cpu") -> torch.nn.Module:
    """The toy base transformer, frozen, fp32 (the same loader as training)."""
    cfg = OmegaConf.structured(ModelConfig(path=str(base_dir), dtype="fp32", gradient_checkpointing=False))
    return load_transformer(cfg).to(device).eval()


# Adapter sets a triplet run can be sampled with: the method's inference set (relation + FFN), every
# trained adapter, or both subject LoRAs with the FFN LoRA and no relation LoRA. Side by side they
# tell which adapters hold the learned relation (the method assumes relation LoRAs on Q/K do).
ADAPTER_SET_DESCRIPTIONS = {
    "inference": "each method's inference adapters",
    "all": "every trained adapter active (subject LoRAs kept: a diagnostic, not the method)",
    "subjects": "subject and FFN LoRAs active, relation LoRA dropped (a diagnostic, not the method)",
}
ADAPTER_SETS = tuple(ADAPTER_SET_DESCRIPTIONS)


# run.py --adapters -> the subset of `relvid analyze attribution` it activates (one definition of the subsets)
SET_SUBSETS = {"inference": "relation+ffn", "all": "all", "subjects": "subjects+ffn"}


def adapters_in_set(spec: TripletSpec, adapters: str) -> tuple[str, ...]:
    """The adapter names `adapters` (one of ADAPTER_SETS) activates for a run of `spec`: the subsets of
    relvid.analysis.attribution."""
    from relvid.analysis.attribution import subset_adapters

    if adapters not in ADAPTER_SETS:
        raise ValueError(f"adapters must be one of {ADAPTER_SETS}, got {adapters!r}")
    names = subset_adapters(SET_SUBSETS[adapters], spec)
    if names is None and adapters == "inference":
        return inference_adapters(spec)  # a direct LoRA's inference set is its one adapter
    if names is None:
        raise ValueError("adapters='subjects': a direct LoRA run has one adapter and no subject LoRAs; "
                         "use 'inference' or 'all'")
    return tuple(names)


def load_customized(adapter_file: str | Path, base_dir: str | Path = BASE_DIR, device: str = "cpu",
                    adapters: str = "inference") -> torch.nn.Module:
    """The base with a run's adapters. `adapters="inference"` activates the method's inference set
    (relation + FFN, or direct); "all" also keeps the subject LoRAs, the set a hybrid-mask "relation"
    step trains; "subjects" keeps the subject and FFN LoRAs and drops the relation LoRA. The last two
    are diagnostics: how much of the relation the adapters the method drops (or keeps) hold.

    A MotionInversion run installs its motion embeddings (no set to choose). A ReVersion run (method=reversion)
    puts nothing in the transformer: this is the base, and the run samples through its prompts, which carry
    its token (relvid.models.adapter_file.read_reversion, then evaluate.generate(..., learned=...))."""
    if adapters not in ADAPTER_SETS:  # before the base is loaded
        raise ValueError(f"adapters must be one of {ADAPTER_SETS}, got {adapters!r}")
    model = load_base(base_dir, device="cpu")
    apply_adapter_source(model, adapter_file, select=lambda spec: adapters_in_set(spec, adapters))
    return model.to(device).eval()

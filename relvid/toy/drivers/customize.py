"""Customizing the toy base with relvid's own training (relvid.training.run.run), and loading the result.

A method is a list of YAML files from configs/toy/ plus overrides; the toy-specific keys (the
relation, the cache, the base model folder, the seed, the output folder) are set here. Table 2's
"w/o relation / subject / FFN LoRA" ablations keep the named adapters at their initial zero
update (FrozenAdapters): the triplet and the hybrid-mask schedule stay as they are, the adapter
just never learns, so it contributes nothing in training or at inference.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from relvid.config import SHIPPED_CONFIGS, ModelConfig, load_config
from relvid.models.backbone import load_transformer
from relvid.models.lora import (
    TripletSpec,
    activate,
    adapter_names,
    inference_adapters,
    inject_triplet,
    load_adapter_state_dict,
    load_adapters,
    lora_parameters,
)
from relvid.toy.drivers.base import BASE_DIR

ADAPTER_FILE = Path("adapters") / "relvid_adapters.safetensors"


def config_dir() -> Path:
    """The toy method configs shipped with the package (the repository's configs/toy links here)."""
    return SHIPPED_CONFIGS / "toy"


@dataclass(frozen=True)
class Method:
    """A row of the toy tables: config files (relative to configs/toy), overrides, frozen adapters."""

    name: str
    files: tuple[str, ...] = ("dreamrelation.yaml",)
    overrides: tuple[str, ...] = ()
    frozen: tuple[str, ...] = field(default=())


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("dreamrelation"),
    Method("direct_lora", ("dreamrelation.yaml", "direct_lora.yaml")),
    Method("wo_hmt", ("dreamrelation.yaml", "ablations/no_hmt.yaml")),
    Method("wo_rcl", ("dreamrelation.yaml", "ablations/no_rcl.yaml")),
    Method("wo_relation_lora", frozen=("relation",)),
    Method("wo_subject_lora", frozen=("subject1", "subject2")),
    Method("wo_ffn_lora", frozen=("ffn",)),
    Method("placement_qk_v", ("dreamrelation.yaml", "placements/qk_v.yaml")),
    Method("placement_q_kv", ("dreamrelation.yaml", "placements/q_kv.yaml")),
    Method("placement_kv_q", ("dreamrelation.yaml", "placements/kv_q.yaml")),
    Method("placement_v_qk", ("dreamrelation.yaml", "placements/v_qk.yaml")),
    # Table 6: the hybrid-mask weight lambda_m (DreamRelation's own run is lambda_m = 50)
    *(Method(f"hmt_lambda_{lm:g}", overrides=(f"hmt.lambda_m={lm:g}",)) for lm in (1, 25, 100)),
)}


class FrozenAdapters(L.Callback):
    """Keeps the named adapters at their initial weights: their gradients are dropped before each
    optimizer step (grad None, so AdamW applies neither an update nor weight decay)."""

    def __init__(self, adapters: Sequence[str]) -> None:
        self.adapters = tuple(adapters)

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        for param in lora_parameters(pl_module.transformer, self.adapters).values():
            param.grad = None


def method_config(method: Method, relation: str, cache_dir: str | Path, out_dir: str | Path, seed: int = 0,
                  base_dir: str | Path = BASE_DIR, overrides: Sequence[str] = ()) -> DictConfig:
    folder = config_dir()
    return load_config([folder / f for f in method.files], [
        f"relation={relation}", "custom_relation=true", f"data.cache_dir={Path(cache_dir).resolve()}",
        f"output_dir={Path(out_dir).resolve()}", f"model.path={Path(base_dir).resolve()}", f"seed={seed}",
        *method.overrides, *overrides])


def customize(method: Method, relation: str, cache_dir: str | Path, out_dir: str | Path, seed: int = 0,
              base_dir: str | Path = BASE_DIR, overrides: Sequence[str] = ()) -> Path:
    """Train one method with relvid.training.run.run; returns its adapter file."""
    from relvid.training.run import run  # Lightning trainer assembly: imported only when training

    cfg = method_config(method, relation, cache_dir, out_dir, seed, base_dir, overrides)
    callbacks = [FrozenAdapters(method.frozen)] if method.frozen else []
    run(cfg, extra_callbacks=callbacks)
    return Path(cfg.output_dir) / ADAPTER_FILE


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


def adapters_in_set(spec: TripletSpec, adapters: str) -> tuple[str, ...]:
    """The adapter names `adapters` (one of ADAPTER_SETS) activates for a run of `spec`."""
    if adapters not in ADAPTER_SETS:
        raise ValueError(f"adapters must be one of {ADAPTER_SETS}, got {adapters!r}")
    if adapters == "inference":
        return inference_adapters(spec)
    if adapters == "all":
        return adapter_names(spec)
    if spec.placement == "direct":
        raise ValueError("adapters='subjects': a direct LoRA run has one adapter and no subject LoRAs; "
                         "use 'inference' or 'all'")
    return tuple(name for name in adapter_names(spec) if name != "relation")


def load_customized(adapter_file: str | Path, base_dir: str | Path = BASE_DIR, device: str = "cpu",
                    adapters: str = "inference") -> torch.nn.Module:
    """The base with a run's adapters. `adapters="inference"` activates the method's inference set
    (relation + FFN, or direct); "all" also keeps the subject LoRAs, the set a hybrid-mask "relation"
    step trains; "subjects" keeps the subject and FFN LoRAs and drops the relation LoRA. The last two
    are diagnostics: how much of the relation the adapters the method drops (or keeps) hold."""
    spec, state, _ = load_adapters(adapter_file)
    names = adapters_in_set(spec, adapters)
    model = load_base(base_dir, device="cpu")
    inject_triplet(model, spec)
    load_adapter_state_dict(model, state)
    activate(model, names)
    return model.to(device).eval()

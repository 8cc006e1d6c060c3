"""The configuration schema (structured OmegaConf dataclasses) and its loader.

The schema lives here; YAML files in configs/ only set values. Unknown keys and wrong types are
errors that name the key, and every run saves the resolved config next to its outputs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional, Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from relvid import relations

PLACEMENTS = ("QK/V", "Q/KV", "KV/Q", "V/QK", "direct")


class ConfigError(ValueError):
    """A configuration file or override that does not fit the schema."""


@dataclass
class TinyModelConfig:
    """A Mochi-architecture transformer small enough for CPU tests and the toy world."""

    num_layers: int = 2
    num_attention_heads: int = 2
    attention_head_dim: int = 16
    pooled_projection_dim: int = 16
    text_embed_dim: int = 32
    time_embed_dim: int = 16
    in_channels: int = 4
    seed: int = 0  # random init seed (the tiny preset has no weights on disk)


@dataclass
class ModelConfig:
    # Local diffusers-format folder of genmo/mochi-1-preview (the pipeline root with transformer/,
    # or the transformer folder itself). Falls back to the MOCHI_PATH environment variable.
    path: Optional[str] = None
    preset: str = "mochi"  # "mochi" (weights from path) | "tiny" (random weights, for tests)
    dtype: str = "auto"  # auto: bf16 on GPU, fp32 on CPU | bf16 | fp16 | fp32
    gradient_checkpointing: bool = True
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    # Codec and text encoder for previews and sampling (training reads cached latents and
    # embeddings): "mochi" VAE / "t5" from local folders, or the toy world's "toy" pair.
    codec: str = "mochi"
    vae_path: Optional[str] = None  # default: <model.path>/vae (pipeline root layout)
    text_encoder: str = "t5"
    text_encoder_path: Optional[str] = None  # default: <model.path> (text_encoder/ + tokenizer/)


@dataclass
class LoRAConfig:
    placement: str = "QK/V"  # relation/subject projections: QK/V, Q/KV, KV/Q, V/QK, or direct
    rank: int = 16
    alpha: float = 16.0
    dropout: float = 0.0
    branches: str = "both"  # both | vision | text


@dataclass
class HMTConfig:
    """Hybrid mask training: per-step LoRA selection and mask-weighted reconstruction loss."""

    enabled: bool = True
    probs: List[float] = field(default_factory=lambda: [1 / 3, 1 / 3, 1 / 3])  # relation, subject1, subject2
    lambda_m: float = 50.0
    weighting: str = "linear"  # linear: 1 + lambda_m * M (paper) | squared: 1 + lambda_m * M^2 (reference code)
    relation_mask: str = "union"  # union (paper) | sum (reference code)
    # The mask weight applies to samples drawn with noise level sigma <= max_sigma; above it the loss is
    # plain. 1.0: every level (paper). A probe, not the method: see experiments/toy/NOTES.md.
    max_sigma: float = 1.0


@dataclass
class RCLConfig:
    """Space-time relational contrastive loss and its memory bank."""

    enabled: bool = True
    lambda_1: float = 0.01
    n_pos: int = 4
    n_neg: int = 10
    bank_size: int = 64
    tau: float = 0.07


@dataclass
class DataConfig:
    # Clip cache folder written by `relvid preprocess` (falls back to RELVID_CACHE).
    cache_dir: Optional[str] = None
    batch_size: int = 1
    num_workers: int = 2
    caption_dropout: float = 0.1
    sample_posterior: bool = True  # draw a fresh latent from the cached VAE posterior every step


@dataclass
class OptimConfig:
    lr: float = 2e-4
    weight_decay: float = 0.01
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    warmup_steps: int = 200
    schedule: str = "cosine"  # cosine | constant (after warm-up)
    min_lr_ratio: float = 0.0  # cosine floor as a fraction of lr
    grad_clip: float = 0.0  # max grad norm; 0 disables


@dataclass
class TrainerConfig:
    max_steps: int = 2400
    accelerator: str = "auto"
    devices: Any = "auto"
    num_nodes: int = 1
    strategy: str = "auto"  # auto | ddp | fsdp | deepspeed_stage_2 | deepspeed_stage_3 (configs/strategy/)
    precision: str = "auto"  # auto: bf16 autocast on GPU, 32 on CPU
    log_every_n_steps: int = 1
    checkpoint_every: int = 200
    progress_bar: bool = True
    # steps between progress-bar redraws; 0: every step on a terminal, about 50 redraws per run
    # otherwise (a log file, a Slurm job, CI), so a log holds lines a person can read
    progress_refresh: int = 0
    deterministic: bool = False


@dataclass
class SpeedConfig:
    """Fast paths for the transformer; each matches the reference diffusers path within bf16 tolerance."""

    attention: str = "auto"  # auto (= packed) | diffusers (reference) | packed (no host syncs, packed text tokens)
    sdpa_backend: str = "auto"  # auto (cuDNN on Hopper+, else flash; math on CPU) | flash | cudnn | efficient | math
    checkpoint: str = "full"  # full | save_attention (keep attention outputs, recompute the rest; ~5 GiB at 61x480x848)
    compile: bool = False  # regional torch.compile of each transformer block


@dataclass
class PreviewConfig:
    """Preview videos during training (rank zero only; never changes the training's random stream)."""

    every_n_steps: int = 0  # 0 disables previews
    # Prompts whose embeddings are in the cache's prompts.safetensors; empty: the cache's first
    # max_prompts prompts. The negative prompt is the cache's "".
    prompts: List[str] = field(default_factory=list)
    max_prompts: int = 2
    num_steps: int = 16
    guidance_scale: float = 6.0
    frames: int = 25  # a multiple of the codec's time factor + 1 (Mochi: 6k+1)
    height: int = 240  # latent sides must be even: multiples of 16 for Mochi
    width: int = 432
    seed: int = 0  # one fixed noise per prompt: previews at different steps are comparable
    fps: int = 30


@dataclass
class RelationAccuracyConfig:
    """Judged relation accuracy on a few prompts during training."""

    every_n_steps: int = 0  # 0 disables the callback
    # Prompts with embeddings in the cache's prompts.safetensors; empty: the relation's evaluation
    # prompts (relvid.prompts) that the cache holds, at most max_prompts of them.
    prompts: List[str] = field(default_factory=list)
    max_prompts: int = 3
    repeats: int = 3  # judge calls per video (the paper's protocol uses 10)
    num_steps: int = 16
    guidance_scale: float = 6.0
    frames: int = 25
    height: int = 240
    width: int = 432
    seed: int = 0
    judge: str = "api"  # api (OpenAI-compatible chat completions) | local (transformers VLM)
    api_base_url: Optional[str] = None  # e.g. http://localhost:8000/v1 (vLLM) or DashScope's compatible-mode URL
    api_model: Optional[str] = None  # e.g. qwen-vl-max, Qwen/Qwen2.5-VL-7B-Instruct
    api_key_env: str = "RELVID_JUDGE_API_KEY"  # name of the environment variable holding the key
    timeout_s: float = 60.0
    max_retries: int = 5
    requests_per_minute: float = 60.0
    cache_dir: Optional[str] = None  # answer cache; default: <output_dir>/judge_cache
    vlm_path: Optional[str] = None  # local judge: a transformers VLM folder (Qwen2.5-VL)


@dataclass
class RelvidConfig:
    relation: str = "shaking_hands"  # canonical name or alias (handshake -> shaking_hands)
    custom_relation: bool = False  # allow a relation name that is not in the registry
    seed: int = 0
    output_dir: str = "outputs/${relation}"
    resume: Optional[str] = None  # a checkpoint path, or "last" for output_dir/checkpoints/last.ckpt
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    hmt: HMTConfig = field(default_factory=HMTConfig)
    rcl: RCLConfig = field(default_factory=RCLConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    speed: SpeedConfig = field(default_factory=SpeedConfig)
    preview: PreviewConfig = field(default_factory=PreviewConfig)
    relation_accuracy: RelationAccuracyConfig = field(default_factory=RelationAccuracyConfig)


# Configs shipped inside the package, so an installed relvid finds them from any folder; the
# repository's configs/relations and configs/toy are links to these folders.
SHIPPED_CONFIGS = Path(__file__).resolve().parent / "resources" / "configs"


def relation_config_path(name: str, configs_dir: str | Path | None = None) -> Path | None:
    """<configs_dir>/relations/<canonical>.yaml for a relation name or alias, if that file exists
    (``configs_dir`` None: the configs shipped with the package)."""
    folder = Path(configs_dir) if configs_dir is not None else SHIPPED_CONFIGS
    path = folder / "relations" / f"{relations.resolve(name).name}.yaml"
    return path if path.is_file() else None


def schema() -> DictConfig:
    cfg = OmegaConf.structured(RelvidConfig)
    OmegaConf.set_struct(cfg, True)
    return cfg


def _merge(cfg: DictConfig, other: Any, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(cfg, other)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "?"
        raise ConfigError(f"{source}: bad key {key!r}: {_short(err)}") from None


def _short(err: Exception) -> str:
    # OmegaConf appends a multi-line "full_key/object_type" trailer; keep the first line.
    return str(err).splitlines()[0]


def load_config(paths: Sequence[str | Path] = (), overrides: Sequence[str] = ()) -> DictConfig:
    """Schema <- each YAML file in order <- `key=value` overrides; then validated and resolved."""
    cfg = schema()
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            values = OmegaConf.load(path)
        except Exception as err:  # yaml.YAMLError and friends: report which file
            raise ConfigError(f"{path}: not valid YAML: {err}") from None
        cfg = _merge(cfg, values, str(path))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. optim.lr=1e-4)")
        try:
            dot = OmegaConf.from_dotlist([item])
        except OmegaConfBaseException as err:
            raise ConfigError(f"override {item!r}: {_short(err)}") from None
        cfg = _merge(cfg, dot, f"override {item!r}")
    return finalize(cfg)


def finalize(cfg: DictConfig) -> DictConfig:
    """Canonicalize the relation, apply environment fallbacks and check value ranges."""
    if relations.is_known(cfg.relation):
        cfg.relation = relations.resolve(cfg.relation).name
    elif not cfg.custom_relation:
        try:
            relations.resolve(cfg.relation)
        except relations.UnknownRelationError as err:
            raise ConfigError(f"relation: {err}; for a relation of your own set custom_relation=true") from None
    if cfg.model.path is None and os.environ.get("MOCHI_PATH"):
        cfg.model.path = os.environ["MOCHI_PATH"]
    if cfg.data.cache_dir is None and os.environ.get("RELVID_CACHE"):
        cfg.data.cache_dir = os.environ["RELVID_CACHE"]
    _check(cfg)
    return cfg


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def _check(cfg: DictConfig) -> None:
    _require(cfg.model.preset in ("mochi", "tiny"), "model.preset", "must be 'mochi' or 'tiny'")
    _require(cfg.model.dtype in ("auto", "bf16", "fp16", "fp32"), "model.dtype", "must be auto, bf16, fp16 or fp32")
    _require(cfg.lora.placement in PLACEMENTS, "lora.placement", f"must be one of {', '.join(PLACEMENTS)}")
    _require(cfg.lora.branches in ("both", "vision", "text"), "lora.branches", "must be both, vision or text")
    _require(cfg.lora.rank >= 1, "lora.rank", "must be >= 1")
    _require(0.0 <= cfg.lora.dropout < 1.0, "lora.dropout", "must be in [0, 1)")
    probs = list(cfg.hmt.probs)
    _require(len(probs) == 3 and all(p >= 0 for p in probs), "hmt.probs",
             "must be three non-negative numbers (relation, subject1, subject2)")
    _require(abs(sum(probs) - 1.0) < 1e-6, "hmt.probs", f"must sum to 1, got {sum(probs):.6f}")
    _require(cfg.hmt.weighting in ("linear", "squared"), "hmt.weighting", "must be linear or squared")
    _require(cfg.hmt.relation_mask in ("union", "sum"), "hmt.relation_mask", "must be union or sum")
    _require(cfg.hmt.lambda_m >= 0, "hmt.lambda_m", "must be >= 0")
    _require(0 <= cfg.hmt.max_sigma <= 1, "hmt.max_sigma", f"must lie in [0, 1], got {cfg.hmt.max_sigma}")
    _require(cfg.rcl.n_pos >= 1 and cfg.rcl.n_neg >= 1, "rcl.n_pos/rcl.n_neg", "must be >= 1")
    _require(cfg.rcl.bank_size >= 1, "rcl.bank_size", "must be >= 1")
    _require(cfg.rcl.tau > 0, "rcl.tau", "must be > 0")
    _require(cfg.data.batch_size >= 1, "data.batch_size", "must be >= 1")
    _require(0.0 <= cfg.data.caption_dropout <= 1.0, "data.caption_dropout", "must be in [0, 1]")
    _require(cfg.optim.lr > 0, "optim.lr", "must be > 0")
    _require(cfg.optim.schedule in ("cosine", "constant"), "optim.schedule", "must be cosine or constant")
    _require(len(cfg.optim.betas) == 2, "optim.betas", "must be two numbers")
    _require(not str(cfg.trainer.precision).endswith("-true") or str(cfg.trainer.precision) in ("32-true", "64-true"),
             "trainer.precision", "a '-true' half precision would cast the LoRA weights too; use bf16-mixed "
             "(the base is already bf16 via model.dtype) or auto")
    _require(not (cfg.lora.placement == "direct" and cfg.hmt.enabled), "lora.placement",
             "direct is the Direct-LoRA baseline, which trains without hybrid masks: set hmt.enabled=false "
             "(configs/baselines/direct_lora.yaml does)")
    _require(cfg.trainer.max_steps >= 1, "trainer.max_steps", "must be >= 1")
    _require(cfg.trainer.checkpoint_every >= 1, "trainer.checkpoint_every", "must be >= 1")
    _require(cfg.trainer.progress_refresh >= 0, "trainer.progress_refresh",
             "must be >= 0 (0: every step on a terminal, about 50 redraws per run in a log)")
    _require(cfg.model.codec in ("mochi", "toy"), "model.codec", "must be mochi or toy")
    _require(cfg.model.text_encoder in ("t5", "toy"), "model.text_encoder", "must be t5 or toy")
    _check_speed(cfg)
    _check_callbacks(cfg)


def _check_speed(cfg: DictConfig) -> None:
    speed = cfg.speed
    _require(speed.attention in ("auto", "diffusers", "packed"), "speed.attention", "must be auto, diffusers or packed")
    _require(speed.sdpa_backend in ("auto", "flash", "cudnn", "efficient", "math"), "speed.sdpa_backend",
             "must be auto, flash, cudnn, efficient or math")
    _require(speed.attention != "diffusers" or speed.sdpa_backend == "auto", "speed.sdpa_backend",
             "only applies to the packed path: set speed.attention=packed (or auto)")
    _require(speed.checkpoint in ("full", "save_attention"), "speed.checkpoint", "must be full or save_attention")
    _require(speed.checkpoint == "full" or cfg.model.gradient_checkpointing, "speed.checkpoint",
             "save_attention refines gradient checkpointing: set model.gradient_checkpointing=true")


def _check_callbacks(cfg: DictConfig) -> None:
    _require(cfg.preview.every_n_steps >= 0, "preview.every_n_steps", "must be >= 0 (0 disables previews)")
    _require(cfg.relation_accuracy.every_n_steps >= 0, "relation_accuracy.every_n_steps", "must be >= 0 (0 disables)")
    for name in ("preview", "relation_accuracy"):
        sec = cfg[name]
        _require(sec.num_steps >= 2, f"{name}.num_steps", "must be >= 2 (the Mochi schedule needs two steps)")
        _require(sec.max_prompts >= 1, f"{name}.max_prompts", "must be >= 1")
        _require(min(sec.frames, sec.height, sec.width) >= 1, f"{name}.frames/height/width", "must be >= 1")
        _require(sec.guidance_scale >= 1.0, f"{name}.guidance_scale", "must be >= 1 (1 disables guidance)")
    _require(cfg.preview.fps >= 1, "preview.fps", "must be >= 1")
    ra = cfg.relation_accuracy
    _require(ra.repeats >= 1, "relation_accuracy.repeats", "must be >= 1")
    _require(ra.judge in ("api", "local"), "relation_accuracy.judge", "must be api or local")
    if ra.every_n_steps > 0 and ra.judge == "api":
        _require(bool(ra.api_base_url) and bool(ra.api_model), "relation_accuracy.api_base_url/api_model",
                 "the api judge needs both (e.g. http://localhost:8000/v1 and the served model name)")
    if ra.every_n_steps > 0 and ra.judge == "local":
        _require(bool(ra.vlm_path), "relation_accuracy.vlm_path", "the local judge needs a VLM folder (Qwen2.5-VL)")
    _require(ra.timeout_s > 0 and ra.requests_per_minute > 0 and ra.max_retries >= 0,
             "relation_accuracy.timeout_s/requests_per_minute/max_retries", "must be > 0, > 0 and >= 0")


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def save_config(cfg: DictConfig, path: str | Path) -> Path:
    """Write the resolved config (interpolations expanded) atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(to_yaml(cfg), encoding="utf-8")
    os.replace(tmp, path)
    return path

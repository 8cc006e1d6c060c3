"""The configuration schema (structured OmegaConf dataclasses) and its loader.

The schema lives here; YAML files in configs/ only set values. Unknown keys and wrong types are
errors that name the key, and every run saves the resolved config next to its outputs.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional, Sequence

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from relvid import relations
from relvid.errors import UserError

# The LoRA triplet's vocabulary, shared by the schema's checks and relvid.models.lora.
ADAPTERS = ("relation", "subject1", "subject2", "ffn")
PLACEMENTS = ("QK/V", "Q/KV", "KV/Q", "V/QK", "direct")
BRANCHES = ("both", "vision", "text")
METHODS = ("lora", "motion_inversion", "reversion")

# The run seed goes to Lightning's seed_everything, which (like numpy) takes [0, 2**32 - 1]; other seeds
# only feed torch generators and relvid.seeding, which take any 63-bit non-negative integer.
RUN_SEED_MAX = 2**32 - 1
SEED_MAX = 2**63 - 1
# A custom relation name becomes a folder name (outputs/<relation>, data/cache/<relation>).
_RELATION_NAME = re.compile(r"[A-Za-z0-9_.+-]+")


class ConfigError(UserError, ValueError):
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
    # The frozen base's linear layers kept in this dtype between uses and cast to model.dtype for each
    # layer's forward (Mochi: 11.9 GiB of weights instead of 18.7): null (stored in model.dtype) |
    # float8_e4m3fn | float8_e5m2. LoRA weights keep lora.dtype. See docs/memory.md.
    storage_dtype: Optional[str] = None
    # Block offload of the frozen base: none | blocks (the transformer blocks after the first
    # model.resident_blocks wait off the GPU and come onto it one block at a time for their forward; LoRA
    # weights stay on the GPU). Not with trainer.strategy ddp/fsdp/deepspeed_*, nor speed.compile.
    offload: str = "none"
    resident_blocks: int = 0  # blocks that stay on the GPU with model.offload=blocks (Mochi has 48)
    # null: offloaded blocks wait in pinned host memory; a folder: they are written there (a fresh
    # subfolder per load, removed at exit) and read back for each use, for hosts short of RAM
    offload_dir: Optional[str] = None
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
    # Adapters kept at their initial (zero) update, the paper's Table 2 ablations "w/o relation /
    # subject / FFN LoRA": they stay in the triplet and the selection schedule but never learn.
    frozen: List[str] = field(default_factory=list)  # any of relation, subject1, subject2, ffn
    # fp32 (ours: the LoRA and its AdamW state in full precision) | bf16 (reference code: cast with the base)
    dtype: str = "fp32"


@dataclass
class HMTConfig:
    """Hybrid mask training: per-step LoRA selection and mask-weighted reconstruction loss."""

    enabled: bool = True
    probs: List[float] = field(default_factory=lambda: [1 / 3, 1 / 3, 1 / 3])  # relation, subject1, subject2
    lambda_m: float = 50.0
    weighting: str = "linear"  # linear: 1 + lambda_m * M (paper) | squared: 1 + lambda_m * M^2 (reference code)
    # max (relvid: max of the subjects' time-averaged latent masks) | union (paper: per video frame, then
    # averaged; needs a cache of clip format 2) | sum (reference code: subject 1 + subject 2)
    relation_mask: str = "max"
    # The mask weight applies to samples drawn with noise level sigma <= max_sigma; above it the loss is
    # plain. 1.0: every level (paper). A probe, not the method: see experiments/toy/NOTES.md.
    max_sigma: float = 1.0
    # Adapters outside this step's selection. skip (paper's words): left out of the forward, grad None,
    # AdamW leaves them exactly as they are. zero_grad (reference code): in the forward multiplied by 0,
    # so their gradient is zero and AdamW's momentum and weight decay still move them.
    unselected: str = "skip"


@dataclass
class RCLConfig:
    """Space-time relational contrastive loss and its memory bank."""

    enabled: bool = True
    lambda_1: float = 0.01
    n_pos: int = 4
    n_neg: int = 10
    bank_size: int = 64
    tau: float = 0.07
    # videos (paper): one FIFO of bank_size videos, positives and negatives drawn from it | split
    # (reference code): positives from the last positive_videos videos, negatives from the last
    # negative_frames single frames
    bank: str = "videos"
    positive_videos: int = 10
    negative_frames: int = 64
    exclude_same_clip: bool = True  # positives never come from the current clip (reference: they may)
    # sample (ours): n_neg negatives, the current frames drawn at random when there are >= n_neg of them |
    # all_current (reference): every current frame, plus max(n_neg - frames, 0) from the bank
    negatives: str = "sample"


@dataclass
class MotionInversionConfig:
    """The MotionInversion baseline (method=motion_inversion): a temporal embedding added to the input of
    the vision Q and K projections and a value embedding added to the input of V, the base frozen."""

    blocks: List[int] = field(default_factory=list)  # transformer blocks that carry the embeddings; empty: all
    # vision tokens per value-embedding cell, per side: 2 (one cell per 32x32 pixels on Mochi, the resolution
    # of the layers the official code uses); 1: one value embedding per token
    value_stride: int = 2
    # the value embedding at sampling: frame_difference (official, for object motion) | none | remove
    inference: str = "frame_difference"


@dataclass
class ReVersionConfig:
    """The ReVersion baseline (method=reversion): one new token learned in the text encoder's input table,
    the transformer and the encoder frozen (configs/baselines/reversion.yaml)."""

    token: str = "<R>"
    init_word: str = "and"  # the token's row starts as this word's row
    caption: str = "A person is <R> a person."  # the caption of every training clip (it must hold the token)
    steer_weight: float = 0.01  # weight of the relation-steering contrastive loss
    temperature: float = 0.07
    n_positives: int = 4  # prepositions drawn as positives per sample and step
    importance_sampling: bool = True  # noise levels drawn with density 1 - alpha cos(pi sigma)
    importance_alpha: float = 0.5
    # T5 on the GPU during training: recompute its blocks in the backward (bf16 weights on a GPU)
    text_encoder_checkpointing: bool = True


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
    # first_step (ours): the first step at lr / warmup_steps | zero (reference code): at lr 0
    warmup_from: str = "first_step"
    schedule: str = "cosine"  # cosine | constant (after warm-up)
    # the cosine's horizon in steps; null: trainer.max_steps (reference code: 3000, stopped at 2000 / 1800)
    schedule_steps: Optional[int] = None
    min_lr_ratio: float = 0.0  # cosine floor as a fraction of lr
    grad_clip: float = 0.0  # max grad norm; 0 disables


@dataclass
class WandbConfig:
    """Weights & Biases, when trainer.logger is wandb or both (pip install wandb)."""

    project: str = "relvid"
    entity: Optional[str] = None  # a W&B team or user; null: the account's default
    name: Optional[str] = None  # the run's display name; null: the output folder's name
    # online: streams to the server (needs `wandb login` or WANDB_API_KEY) | offline: writes the run
    # under <output_dir>/wandb only, with no network; upload it later with `wandb sync`
    mode: str = "online"
    tags: List[str] = field(default_factory=list)


@dataclass
class TrainerConfig:
    max_steps: int = 2400
    # batches (micro-batches) per optimizer step: the effective batch is data.batch_size x this x the devices;
    # optim.lr is used as set (not scaled with it); every step count (max_steps, checkpoint_every, warm-up) counts
    # optimizer steps
    accumulate_grad_batches: int = 1
    accelerator: str = "auto"
    devices: Any = "auto"
    num_nodes: int = 1
    strategy: str = "auto"  # auto | ddp | fsdp | deepspeed_stage_2 | deepspeed_stage_3 (configs/strategy/)
    precision: str = "auto"  # auto: bf16 autocast on GPU, 32 on CPU
    log_every_n_steps: int = 1
    checkpoint_every: int = 200
    # inference-ready LoRAs written at every checkpoint, <output_dir>/loras/<relation>_step<NNNNNN>.safetensors:
    # diffusers (MochiPipeline.load_lora_weights) and/or mochi (genmo's format, for ComfyUI; name ends _mochi);
    # [] writes none
    lora_formats: List[str] = field(default_factory=lambda: ["diffusers"])
    progress_bar: bool = True
    # steps between progress-bar redraws; 0: every step on a terminal, about 50 redraws per run
    # otherwise (a log file, a Slurm job, CI), so a log holds lines a person can read
    progress_refresh: int = 0
    # true: bit-exact reruns and resumes on the same GPU model and software (deterministic kernels,
    # memory-efficient attention on a GPU; slower); false: on GPUs equal in distribution only
    deterministic: bool = False
    # where metrics and preview videos go: tensorboard (<output_dir>/tensorboard) | wandb (trainer.wandb) | both
    logger: str = "tensorboard"
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class SpeedConfig:
    """Fast paths for the transformer; each matches the reference diffusers path within bf16 tolerance.
    Training reads them all; sample and evaluate read attention, sdpa_backend and compile."""

    attention: str = "auto"  # auto (= packed) | diffusers (reference) | packed (no host syncs, packed text tokens)
    # auto: cuDNN on Hopper+ (falls back to flash, once, if it fails at run time), else flash; math on CPU
    sdpa_backend: str = "auto"  # auto | flash | cudnn | efficient | math (an explicit one never falls back)
    checkpoint: str = "full"  # full | save_attention (keep attention outputs, recompute the rest; ~5 GiB at 61x480x848)
    compile: bool = False  # regional torch.compile of each transformer block (text length dynamic)


# The clip size of the paper's exemplars and samples: 61 frames of 480x848 at 30 fps.
PAPER_FRAMES, PAPER_HEIGHT, PAPER_WIDTH, PAPER_FPS = 61, 480, 848, 30


@dataclass
class SamplingConfig:
    """How a video is sampled: Euler steps on Mochi's linear-quadratic schedule, classifier-free
    guidance, video size and frame rate (``sampling`` of sample / evaluate; previews nest their own)."""

    num_steps: int = 64
    guidance_scale: float = 6.0  # 1 disables guidance
    negative_prompt: str = ""
    frames: int = PAPER_FRAMES  # the codec's time factor times k, plus 1 (Mochi: 6k+1)
    height: int = PAPER_HEIGHT  # multiples of 16 for Mochi (even latent sides)
    width: int = PAPER_WIDTH
    fps: int = PAPER_FPS
    threshold_noise: float = 0.025  # where the schedule's linear part ends
    # The guidance's unconditional input. encoded: the negative prompt through the text encoder
    # (diffusers' MochiPipeline; "" is one </s> token) | zeros: no text tokens at all (reference code,
    # like training's caption dropout; the negative prompt must then be empty)
    null_condition: str = "encoded"
    # decode the VAE in overlapping spatial tiles (256 px, stride 192): lower peak memory at 61x480x848,
    # at some speed cost; false decodes whole frames (more memory)
    vae_tiling: bool = True

    def __post_init__(self) -> None:  # settings built in code are checked like a config's
        _check_sampling(self, "sampling")


def _small_sampling() -> SamplingConfig:
    """Previews and in-training relation accuracy: short, small videos."""
    return SamplingConfig(num_steps=16, frames=25, height=240, width=432)


@dataclass
class JudgeConfig:
    """The VLM that judges relation accuracy (``judge`` of evaluate; ``relation_accuracy.judge``)."""

    kind: str = "none"  # none | api (OpenAI-compatible chat completions) | local (transformers VLM)
    base_url: Optional[str] = None  # e.g. http://localhost:8000/v1 (vLLM) or DashScope's compatible-mode URL
    model: Optional[str] = None  # e.g. qwen-vl-max, Qwen/Qwen2.5-VL-72B-Instruct
    api_key_env: str = "RELVID_JUDGE_API_KEY"  # the environment variable holding the key (unset: no header)
    timeout_s: float = 60.0
    max_retries: int = 5
    backoff_s: float = 1.0  # the first retry waits this long, then twice as long each time
    max_backoff_s: float = 60.0
    requests_per_minute: float = 60.0
    temperature: float = 1.0  # > 0: the repeats are independent draws, as in the paper's 10 judgements
    max_tokens: int = 32
    repeats: int = 10  # judgements per video (the paper: 10)
    cache_dir: Optional[str] = None  # answer cache; default: judge_cache/ in the command's output folder
    vlm_path: Optional[str] = None  # local judge: a Qwen2.5-VL folder

    def __post_init__(self) -> None:  # settings built in code (APIJudge(JudgeConfig(...))) are checked too
        _check_judge(self, "judge", active=False)


@dataclass
class PreviewConfig:
    """Preview videos during training (rank zero only; never changes the training's random stream)."""

    every_n_steps: int = 0  # 0 disables previews
    # Prompts whose embeddings are in the cache's prompts.safetensors; empty: the cache's first
    # max_prompts prompts. The negative prompt must be in the cache too ("" always is). method=reversion:
    # prompts that carry reversion.token, encoded at each preview with its current vectors (empty: reversion.caption).
    prompts: List[str] = field(default_factory=list)
    max_prompts: int = 2
    seed: int = 0  # one fixed noise per prompt: previews at different steps are comparable
    sampling: SamplingConfig = field(default_factory=_small_sampling)
    at_start: bool = False  # also preview the untouched base before the first step (step000000; fresh runs only)


@dataclass
class RelationAccuracyConfig:
    """Judged relation accuracy on a few prompts during training."""

    every_n_steps: int = 0  # 0 disables the callback
    # Prompts with embeddings in the cache's prompts.safetensors; empty: the relation's evaluation
    # prompts (relvid.prompts) that the cache holds, at most max_prompts of them.
    prompts: List[str] = field(default_factory=list)
    max_prompts: int = 3
    seed: int = 0
    sampling: SamplingConfig = field(default_factory=_small_sampling)
    judge: JudgeConfig = field(default_factory=lambda: JudgeConfig(kind="api", repeats=3))


@dataclass
class SampleConfig:
    """`relvid sample`: what to render and with which adapters."""

    prompts: List[str] = field(default_factory=list)  # empty: the relation's ten evaluation prompts
    prompts_file: Optional[str] = None  # one prompt per line, after `prompts`
    seeds: List[int] = field(default_factory=lambda: [0])
    # A .ckpt, relvid_adapters.safetensors, a run's adapters/ folder or a diffusers LoRA file;
    # default: <output_dir>/adapters, the relation's training run.
    adapters: Optional[str] = None
    base: bool = False  # the base model without adapters
    out: str = "${output_dir}/samples"
    device: Optional[str] = None  # default: cuda:LOCAL_RANK when a GPU is present, else cpu


@dataclass
class EvaluateConfig(SampleConfig):
    """`relvid evaluate`: the test videos of one method, then the paper's metrics (a row of the table)."""

    videos: Optional[str] = None  # evaluate this folder of videos (with sidecars) instead of rendering
    method: Optional[str] = None  # the table row's name; default: Mochi for base, else the adapters' name
    out: str = "outputs/eval/${relation}"  # one folder per relation, shared by its methods
    clip_path: Optional[str] = None  # CLIP folder for CLIP-T and temporal consistency
    i3d_path: Optional[str] = None  # I3D TorchScript file for FVD
    reference_videos: Optional[str] = None  # reference videos for FVD (the paper: AnimalKingdom's test set)
    fvd_frames: int = 16
    wait_timeout_s: float = 4 * 3600.0  # rank 0 waits this long for the other ranks' videos


@dataclass
class PreprocessConfig:
    """`relvid preprocess`: exemplar videos -> the clip cache at data.cache_dir (weights: model.*)."""

    ntu_root: Optional[str] = None  # NTU RGB+D *_rgb.avi files, searched recursively
    videos: Optional[str] = None  # your own videos, each with a caption (<stem>.txt or captions_csv)
    skeletons: Optional[str] = None  # NTU .skeleton files (default: under ntu_root)
    captions_csv: Optional[str] = None  # columns video,caption
    masks: Optional[str] = None  # a PNG folder <video stem>/ or a mask video <video stem>.mp4 per video
    mask_source: str = "skeleton"  # skeleton | grounded-sam | sam2 | files
    mask_fallback: str = "none"  # none | grounded-sam | sam2 | files: for clips the main source cannot mask
    mask_colors: Optional[List[List[int]]] = None  # subject colours in the mask files, subject 1 first
    detect_prompt: str = "person"  # Grounding DINO's text prompt
    box_threshold: float = 0.3
    text_threshold: float = 0.25
    gdino_path: Optional[str] = None  # a local Grounding DINO folder (transformers format)
    sam_path: Optional[str] = None  # a local SAM folder (transformers format)
    sam2_path: Optional[str] = None  # a local SAM 2 / SAM 2.1 folder (transformers format); default $RELVID_SAM2_PATH
    clips: int = 20  # NTU clips to pick (seeded); 0: every matching one
    seed: int = 0
    setups: Optional[List[int]] = None  # NTU setups, cameras, performers, replications to keep
    cameras: Optional[List[int]] = None
    performers: Optional[List[int]] = None
    replications: Optional[List[int]] = None
    frames: int = PAPER_FRAMES
    height: int = PAPER_HEIGHT
    width: int = PAPER_WIDTH
    fps: float = float(PAPER_FPS)
    allow_upscale: bool = False  # enlarge videos smaller than the target instead of skipping them
    # Which frames each clip takes (docs/preprocessing.md#clip-windows); a captions CSV row's own
    # start_frame/start_time wins for that video.
    window: str = "start"  # start: from start_frame/start_time (the first frames without one) | closest
    start_frame: Optional[int] = None  # the clip's first source frame (closest: the earliest one searched)
    start_time: Optional[float] = None  # the same in seconds (the frame on screen then)
    windows: int = 1  # clips per video (ids <video>_w1, _w2, ...)
    window_stride: Optional[float] = None  # seconds between window starts (window=start); None: the clip's length
    spatial_rule: str = "any"  # a latent cell is foreground if any pixel is (reference code) | area
    latent_dtype: str = "bf16"  # bf16 | fp16 | fp32
    device: str = "auto"  # auto (a GPU when present) | cpu | cuda | cuda:1 ...
    vae_tile: int = 256  # spatial VAE tile in pixels (stride 3/4 of it); 0: no tiling (far more memory)
    t5_path: Optional[str] = None  # default: $T5_PATH, else model.text_encoder_path, else model.path
    prompts: List[str] = field(default_factory=list)  # extra preview prompts to embed
    dry_run: bool = False  # list what would be processed and exit
    progress: bool = True


ANALYZE_SUBSETS = ("none", "relation+ffn", "subjects+ffn", "all")  # the default ones
ANALYZE_MORE_SUBSETS = ("subject1+ffn", "subject2+ffn")  # the adapters a subject step of hybrid mask training trains
ANALYZE_JUDGES = ("auto", "toy", "vlm", "none")


@dataclass
class AnalyzeConfig:
    """`relvid analyze <kind>`: the paper's analyses and adapter attribution (docs/analysis.md)."""

    # Adapter sources (anything `relvid sample` takes), each compared with the base model.
    adapters: List[str] = field(default_factory=list)
    prompts: List[str] = field(default_factory=list)  # features / attention: one prompt; attribution: all
    prompts_file: Optional[str] = None  # one prompt per line, after `prompts`
    phrase: Optional[str] = None  # attention: words of the prompt whose attention is mapped (e.g. orbiting)
    clip: Optional[str] = None  # features: a clip file of a cache instead of a prompt (noised to the step's sigma)
    # Sampling step indices where features and attention are read; negative ones count from the end
    # (-4: step 60 of the 64-step schedule, the paper's choice, near the clean end).
    steps: List[int] = field(default_factory=lambda: [-4])
    ranks: List[int] = field(default_factory=lambda: [1, 4, 16, 64])  # qkv-subspace: top-r subspaces compared
    subsets: List[str] = field(default_factory=lambda: list(ANALYZE_SUBSETS))  # attribution, exemplar-fit
    judge: str = "auto"  # attribution: auto (toy for the toy codec, else vlm if judge.kind is set) | toy | vlm | none
    seeds: List[int] = field(default_factory=lambda: [0])
    # exemplar-fit: the clip cache (with subject masks) whose exemplars are scored; default data.cache_dir
    cache_dir: Optional[str] = None
    # exemplar-fit: noise levels in [0, 1], each reported on its own; empty: drawn uniformly, as in training
    sigmas: List[float] = field(default_factory=list)
    draws: int = 4  # exemplar-fit: noise draws per exemplar (the same noise for every model)
    out: str = "${output_dir}/analysis"
    device: Optional[str] = None  # default: cuda:LOCAL_RANK when a GPU is present, else cpu


@dataclass
class RelvidConfig:
    relation: str = "shaking_hands"  # canonical name or alias (handshake -> shaking_hands)
    custom_relation: bool = False  # allow a relation name that is not in the registry
    seed: int = 0
    output_dir: str = "outputs/${relation}"
    resume: Optional[str] = None  # a checkpoint path, or "last": the newest consistent checkpoint of output_dir
    overwrite: bool = False  # start afresh in an output_dir that holds another run's config, adapters or checkpoints
    # what is learned: lora (the DreamRelation triplet, or lora.placement=direct) | motion_inversion (the base
    # frozen, motion embeddings learned: configs/baselines/motion_inversion.yaml) | reversion (one new text token
    # learned: configs/baselines/reversion.yaml)
    method: str = "lora"
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    hmt: HMTConfig = field(default_factory=HMTConfig)
    rcl: RCLConfig = field(default_factory=RCLConfig)
    motion_inversion: MotionInversionConfig = field(default_factory=MotionInversionConfig)
    reversion: ReVersionConfig = field(default_factory=ReVersionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    speed: SpeedConfig = field(default_factory=SpeedConfig)
    preview: PreviewConfig = field(default_factory=PreviewConfig)
    relation_accuracy: RelationAccuracyConfig = field(default_factory=RelationAccuracyConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    analyze: AnalyzeConfig = field(default_factory=AnalyzeConfig)


# Configs shipped inside the package, so an installed relvid finds them from any folder; the
# repository's configs/relations and configs/toy are links to these folders.
SHIPPED_CONFIGS = Path(__file__).resolve().parent / "resources" / "configs"


def relation_config_path(name: str, configs_dir: str | Path | None = None) -> Path | None:
    """<configs_dir>/relations/<canonical>.yaml for a relation name or alias, if that file exists
    (``configs_dir`` None: the configs shipped with the package)."""
    if not relations.is_known(name):  # a relation of your own (custom_relation=true) has no file
        return None
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


def load_config(paths: Sequence[str | Path] = (), overrides: Sequence[str] = (),
                values: dict | None = None) -> DictConfig:
    """Schema <- each YAML file in order <- ``values`` (a nested dict, e.g. from command-line flags)
    <- `key=value` overrides; then validated and resolved."""
    cfg = schema()
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = OmegaConf.load(path)
        except Exception as err:  # yaml.YAMLError and friends: report which file
            raise ConfigError(f"{path}: not valid YAML: {err}") from None
        cfg = _merge(cfg, loaded, str(path))
    if values:
        cfg = _merge(cfg, values, "command-line flags")
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
    else:
        _check_relation_name(str(cfg.relation))
    if cfg.model.path is None and os.environ.get("MOCHI_PATH"):
        cfg.model.path = os.environ["MOCHI_PATH"]
    if cfg.data.cache_dir is None and os.environ.get("RELVID_CACHE"):
        cfg.data.cache_dir = os.environ["RELVID_CACHE"]
    _check(cfg)
    return cfg


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def _finite(value: Any) -> bool:
    """A real number that is neither NaN nor infinite. Range checks written as ``_finite(x) and x >= 0``
    refuse NaN too, where ``not x < 0`` would let it through."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_relation_name(name: str) -> None:
    """A custom relation's name is used as a folder name, so it must be one: no separators, no '..'."""
    _require(bool(_RELATION_NAME.fullmatch(name)) and ".." not in name and name.strip(".") != "", "relation",
             f"{name!r} is used as a folder name (outputs/<relation>, the cache's <relation>/): use letters, "
             "digits and _ . + - only, without '..' (e.g. relation=high_five)")


def _devices_ok(devices: Any) -> bool:
    """What Lightning's ``devices`` takes: auto, a count (>= 1, or -1 for all), or device indices."""
    if isinstance(devices, bool):
        return False
    if isinstance(devices, int):
        return devices >= 1 or devices == -1
    if isinstance(devices, str):
        text = devices.strip()
        return (text in ("auto", "-1") or (text.isdigit() and int(text) >= 1)
                or re.fullmatch(r"\d+(\s*,\s*\d+)*\s*,\s*(\d+)?", text) is not None)
    if isinstance(devices, (list, tuple, ListConfig)):
        items = list(devices)
        return (bool(items) and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in items)
                and len(set(items)) == len(items))
    return False


def _check_seed(value: Any, key: str, high: int = SEED_MAX) -> None:
    _require(isinstance(value, int) and 0 <= value <= high, key,
             f"must be an integer in [0, {high}], got {value!r}")


def check_accelerator(cfg: DictConfig) -> None:
    """Refuse a GPU accelerator on a machine that shows none, before any model is built.

    Not part of load_config: a config that names GPUs is still loaded, printed and saved where none is
    visible (a login node, a laptop preparing a Slurm job); the command that trains on it calls this.
    """
    accel = str(cfg.trainer.accelerator)
    if accel in ("gpu", "cuda"):
        import torch

        _require(torch.cuda.is_available(), "trainer.accelerator",
                 f"{accel} needs a CUDA GPU, but no GPU is visible here (torch.cuda.is_available() is False: "
                 "no driver, an empty CUDA_VISIBLE_DEVICES or a CPU-only torch build); set "
                 "trainer.accelerator=cpu or auto, or run on a machine with a GPU")


def _check(cfg: DictConfig) -> None:
    _require(cfg.model.preset in ("mochi", "tiny"), "model.preset", "must be 'mochi' or 'tiny'")
    _require(cfg.model.dtype in ("auto", "bf16", "fp16", "fp32"), "model.dtype", "must be auto, bf16, fp16 or fp32")
    _check_storage_dtype(cfg)
    _check_offload(cfg)
    _require(cfg.lora.placement in PLACEMENTS, "lora.placement", f"must be one of {', '.join(PLACEMENTS)}")
    _require(cfg.lora.branches in BRANCHES, "lora.branches", f"must be one of {', '.join(BRANCHES)}")
    _require(cfg.lora.rank >= 1, "lora.rank", "must be >= 1")
    frozen = list(cfg.lora.frozen)
    _require(set(frozen) <= set(ADAPTERS), "lora.frozen",
             f"must list adapters among {', '.join(ADAPTERS)}; got {frozen}")
    _require(not frozen or cfg.lora.placement != "direct", "lora.frozen",
             "the direct LoRA is a single adapter: freezing it would train nothing")
    _require(len(set(frozen)) < len(ADAPTERS), "lora.frozen", "freezing all four adapters would train nothing")
    _require(0.0 <= cfg.lora.dropout < 1.0, "lora.dropout", "must be in [0, 1)")
    _require(_finite(cfg.lora.alpha) and cfg.lora.alpha > 0, "lora.alpha",
             f"must be a finite number > 0 (the LoRA scale is alpha / rank), got {cfg.lora.alpha}")
    probs = list(cfg.hmt.probs)
    _require(len(probs) == 3 and all(p >= 0 for p in probs), "hmt.probs",
             "must be three non-negative numbers (relation, subject1, subject2)")
    _require(abs(sum(probs) - 1.0) < 1e-6, "hmt.probs", f"must sum to 1, got {sum(probs):.6f}")
    _require(cfg.hmt.weighting in ("linear", "squared"), "hmt.weighting", "must be linear or squared")
    _require(cfg.hmt.relation_mask in ("max", "union", "sum"), "hmt.relation_mask", "must be max, union or sum")
    _require(cfg.hmt.unselected in ("skip", "zero_grad"), "hmt.unselected", "must be skip or zero_grad")
    _require(cfg.lora.dtype in ("fp32", "bf16"), "lora.dtype", "must be fp32 or bf16")
    _require(cfg.rcl.bank in ("videos", "split"), "rcl.bank", "must be videos or split")
    _require(cfg.rcl.positive_videos >= 1 and cfg.rcl.negative_frames >= 1, "rcl.positive_videos/negative_frames",
             "must be >= 1")
    _require(cfg.rcl.negatives in ("sample", "all_current"), "rcl.negatives", "must be sample or all_current")
    _require(_finite(cfg.hmt.lambda_m) and cfg.hmt.lambda_m >= 0, "hmt.lambda_m",
             f"must be a finite number >= 0, got {cfg.hmt.lambda_m}")
    _require(0 <= cfg.hmt.max_sigma <= 1, "hmt.max_sigma", f"must lie in [0, 1], got {cfg.hmt.max_sigma}")
    _require(cfg.rcl.n_pos >= 1 and cfg.rcl.n_neg >= 1, "rcl.n_pos/rcl.n_neg", "must be >= 1")
    _require(cfg.rcl.bank_size >= 1, "rcl.bank_size", "must be >= 1")
    _require(_finite(cfg.rcl.tau) and cfg.rcl.tau > 0, "rcl.tau", f"must be a finite number > 0, got {cfg.rcl.tau}")
    _require(_finite(cfg.rcl.lambda_1) and cfg.rcl.lambda_1 >= 0, "rcl.lambda_1",
             f"must be a finite number >= 0 (0 turns the contrastive loss's weight off), got {cfg.rcl.lambda_1}")
    _require(cfg.data.batch_size >= 1, "data.batch_size", "must be >= 1")
    _require(cfg.data.num_workers >= 0, "data.num_workers",
             f"must be >= 0 (0 loads in the main process), got {cfg.data.num_workers}")
    _require(0.0 <= cfg.data.caption_dropout <= 1.0, "data.caption_dropout", "must be in [0, 1]")
    _check_optim(cfg.optim)
    _check_seed(cfg.seed, "seed", RUN_SEED_MAX)
    for key in ("preview.seed", "relation_accuracy.seed", "preprocess.seed", "model.tiny.seed"):
        _check_seed(OmegaConf.select(cfg, key), key)
    for key in ("sample.seeds", "evaluate.seeds", "analyze.seeds"):
        for seed in OmegaConf.select(cfg, key):
            _check_seed(seed, key)
    _require(_devices_ok(cfg.trainer.devices), "trainer.devices",
             f"must be auto, a device count >= 1 (-1: all), or a list of distinct device indices >= 0 "
             f"(e.g. [0,1]); got {cfg.trainer.devices!r}")
    _require(not str(cfg.trainer.precision).endswith("-true") or str(cfg.trainer.precision) in ("32-true", "64-true"),
             "trainer.precision", "a '-true' half precision would cast the LoRA weights too; use bf16-mixed "
             "(the base is already bf16 via model.dtype) or auto")
    _require(not (cfg.lora.placement == "direct" and cfg.hmt.enabled), "lora.placement",
             "direct is the Direct-LoRA baseline, which trains without hybrid masks: set hmt.enabled=false "
             "(configs/baselines/direct_lora.yaml does)")
    _require(cfg.trainer.max_steps >= 1, "trainer.max_steps", "must be >= 1")
    _require(cfg.trainer.checkpoint_every >= 1, "trainer.checkpoint_every", "must be >= 1")
    _require(cfg.trainer.accumulate_grad_batches >= 1, "trainer.accumulate_grad_batches",
             f"must be an integer >= 1 (1: no gradient accumulation), got {cfg.trainer.accumulate_grad_batches}")
    formats = list(cfg.trainer.lora_formats)
    _require(set(formats) <= {"diffusers", "mochi"} and len(set(formats)) == len(formats), "trainer.lora_formats",
             f"must list each of diffusers, mochi at most once ([] for none), got {formats}")
    _require(cfg.trainer.progress_refresh >= 0, "trainer.progress_refresh",
             "must be >= 0 (0: every step on a terminal, about 50 redraws per run in a log)")
    _require(cfg.trainer.logger in ("tensorboard", "wandb", "both"), "trainer.logger",
             f"must be tensorboard, wandb or both, got {cfg.trainer.logger!r}")
    _require(cfg.trainer.wandb.mode in ("online", "offline"), "trainer.wandb.mode",
             "must be online or offline (offline: no network; `wandb sync` uploads later), "
             f"got {cfg.trainer.wandb.mode!r}")
    _require(not cfg.trainer.deterministic or cfg.speed.sdpa_backend in ("auto", "efficient", "math"),
             "speed.sdpa_backend", f"{cfg.speed.sdpa_backend}'s attention backward is not deterministic, which "
             "trainer.deterministic=true asks for: use auto (efficient on a GPU), efficient or math")
    _require(cfg.model.codec in ("mochi", "toy"), "model.codec", "must be mochi or toy")
    _require(cfg.model.text_encoder in ("t5", "toy"), "model.text_encoder", "must be t5 or toy")
    _check_speed(cfg)
    _check_callbacks(cfg)
    _check_analyze(cfg)
    _check_method(cfg)


STORAGE_DTYPES = ("float8_e4m3fn", "float8_e5m2")


def _check_storage_dtype(cfg: DictConfig) -> None:
    """model.storage_dtype, and what it cannot be combined with."""
    storage = cfg.model.storage_dtype
    if storage is None:
        return
    _require(storage in STORAGE_DTYPES, "model.storage_dtype",
             f"must be null (weights stored in model.dtype) or one of {', '.join(STORAGE_DTYPES)}, got {storage!r}")
    strategy = str(cfg.trainer.strategy)
    _require(not strategy.startswith(("fsdp", "deepspeed")), "model.storage_dtype",
             f"fp8 storage of the base is not supported with trainer.strategy={strategy} (its sharding flattens the "
             "base's weights and would cast them back): use trainer.strategy=ddp or auto, or set "
             "model.storage_dtype=null")
    _require(not cfg.speed.compile, "model.storage_dtype",
             "fp8 storage casts each layer's weights in a hook that speed.compile does not trace: set "
             "speed.compile=false, or model.storage_dtype=null")


OFFLOAD_MODES = ("none", "blocks")


def _check_offload(cfg: DictConfig) -> None:
    """model.offload / resident_blocks / offload_dir, and what block offload cannot be combined with."""
    model = cfg.model
    _require(model.offload in OFFLOAD_MODES, "model.offload", f"must be none or blocks, got {model.offload!r}")
    _require(model.resident_blocks >= 0, "model.resident_blocks",
             f"must be >= 0 (blocks kept on the GPU with model.offload=blocks), got {model.resident_blocks}")
    _require(model.offload_dir is None or model.offload == "blocks", "model.offload_dir",
             "only applies with model.offload=blocks: set model.offload=blocks, or model.offload_dir=null")
    if model.offload == "none":
        return
    strategy = str(cfg.trainer.strategy)
    _require(strategy == "auto", "model.offload",
             f"block offload is not supported with trainer.strategy={strategy} (ddp would broadcast the offloaded "
             "weights, fsdp and deepspeed shard them themselves): train on one GPU with trainer.strategy=auto, "
             "or set model.offload=none")
    _require(not cfg.speed.compile, "model.offload",
             "block offload swaps each block's weights in a hook that speed.compile does not trace: set "
             "speed.compile=false, or model.offload=none")


def _check_method(cfg: DictConfig) -> None:
    """method, and the keys that make no sense with motion_inversion."""
    _require(cfg.method in METHODS, "method", f"must be one of {', '.join(METHODS)}")
    mi = cfg.motion_inversion
    _require(mi.value_stride >= 1, "motion_inversion.value_stride", f"must be >= 1, got {mi.value_stride}")
    _require(all(b >= 0 for b in mi.blocks) and len(set(mi.blocks)) == len(mi.blocks), "motion_inversion.blocks",
             f"must be distinct block indices >= 0 (empty: every block), got {list(mi.blocks)}")
    _require(mi.inference in ("frame_difference", "none", "remove"), "motion_inversion.inference",
             "must be frame_difference, none or remove")
    _check_reversion(cfg)
    if cfg.method != "motion_inversion":
        return
    _require_no_lora(cfg, "method=motion_inversion learns motion embeddings with the base frozen and no LoRA",
                     "configs/baselines/motion_inversion.yaml")
    _require(str(cfg.trainer.strategy) in ("auto", "ddp"), "trainer.strategy",
             f"{cfg.trainer.strategy} is not supported with method=motion_inversion (its embeddings are kept whole "
             "on every rank, which the fsdp and deepspeed presets do for LoRAs only): use ddp or auto")


def _require_no_lora(cfg: DictConfig, why: str, preset: str) -> None:
    """The LoRA keys a method without LoRAs (motion_inversion, reversion) refuses, each named with
    ``why`` and the preset file that sets it right."""
    _require(not cfg.hmt.enabled, "hmt.enabled", f"{why}, so there is no LoRA to select and no hybrid mask "
             f"loss: set hmt.enabled=false ({preset} does)")
    _require(cfg.lora.placement != "direct", "lora.placement",
             f"direct names the Direct-LoRA baseline; {why}: drop lora.placement=direct")
    _require(not list(cfg.lora.frozen), "lora.frozen", f"{why}, so there is no adapter to freeze: drop lora.frozen")
    _require(not list(cfg.trainer.lora_formats), "trainer.lora_formats",
             f"{why}, so there is no LoRA to write at checkpoints: set trainer.lora_formats=[] ({preset} does)")


def _check_reversion(cfg: DictConfig) -> None:
    """The reversion section, and the keys that make no sense with method=reversion."""
    rv = cfg.reversion
    _require(bool(rv.token) and not any(c.isspace() for c in rv.token), "reversion.token",
             f"must be one word without spaces, e.g. <R>; got {rv.token!r}")
    _require(rv.token in rv.caption, "reversion.caption",
             f"must hold the token {rv.token!r}, e.g. 'A person is {rv.token} a person.'")
    _require(rv.temperature > 0, "reversion.temperature", f"must be > 0, got {rv.temperature}")
    _require(rv.steer_weight >= 0, "reversion.steer_weight", f"must be >= 0, got {rv.steer_weight}")
    _require(rv.n_positives >= 1, "reversion.n_positives", f"must be >= 1, got {rv.n_positives}")
    _require(0 <= rv.importance_alpha < 1, "reversion.importance_alpha",
             f"must be in [0, 1), got {rv.importance_alpha}")
    if cfg.method != "reversion":
        return
    why = "method=reversion learns one text token with the transformer frozen and no LoRA"
    _require_no_lora(cfg, why, "configs/baselines/reversion.yaml")
    _require(not cfg.rcl.enabled, "rcl.enabled", f"{why}; its contrastive term is the steering loss "
             "(reversion.steer_weight): set rcl.enabled=false (configs/baselines/reversion.yaml does)")
    _require(cfg.data.caption_dropout == 0, "data.caption_dropout",
             f"{why} from its caption (reversion.caption), which every step must see: set data.caption_dropout=0")
    _require(str(cfg.trainer.strategy) in ("auto", "ddp"), "trainer.strategy",
             f"{cfg.trainer.strategy} is not supported with method=reversion (the text encoder and the token are "
             "kept whole on every rank): use ddp or auto")
    _require(int(cfg.relation_accuracy.every_n_steps) == 0, "relation_accuracy.every_n_steps",
             "judged relation accuracy during training samples the cache's pre-encoded prompts, which cannot hold "
             f"the learned token {cfg.reversion.token}: set relation_accuracy.every_n_steps=0 and judge the run's "
             f"file afterwards (relvid evaluate --adapters <output_dir>/adapters with prompts that carry "
             f"{cfg.reversion.token})")


def _check_analyze(cfg: DictConfig) -> None:
    an = cfg.analyze  # analyze.steps are checked against the schedule where they are read
    _require(len(an.steps) >= 1, "analyze.steps", "must list schedule steps, e.g. [-4] (step 60 of 64)")
    _require(len(an.ranks) >= 1 and all(r >= 1 for r in an.ranks), "analyze.ranks",
             f"must list ranks >= 1, e.g. [1, 4, 16, 64]; got {list(an.ranks)}")
    subsets = ANALYZE_SUBSETS + ANALYZE_MORE_SUBSETS
    _require(len(an.subsets) >= 1 and set(an.subsets) <= set(subsets), "analyze.subsets",
             f"must list subsets among {', '.join(subsets)}; got {list(an.subsets)}")
    _require(an.judge in ANALYZE_JUDGES, "analyze.judge", f"must be one of {', '.join(ANALYZE_JUDGES)}")
    _require(an.phrase is None or an.phrase.strip() != "", "analyze.phrase",
             "must be words of the prompt (e.g. orbiting), not empty")
    _require(all(_finite(s) and 0 <= s <= 1 for s in an.sigmas), "analyze.sigmas",
             f"must be noise levels in [0, 1], e.g. [0.5, 0.98], or empty (drawn uniformly); got {list(an.sigmas)}")
    _require(an.draws >= 1, "analyze.draws", f"must be >= 1 noise draws per exemplar, got {an.draws}")


def _check_optim(optim) -> None:
    _require(_finite(optim.lr) and optim.lr > 0, "optim.lr", f"must be a finite number > 0, got {optim.lr}")
    _require(optim.schedule in ("cosine", "constant"), "optim.schedule", "must be cosine or constant")
    _require(optim.warmup_from in ("first_step", "zero"), "optim.warmup_from", "must be first_step or zero")
    _require(optim.schedule_steps is None or optim.schedule_steps > optim.warmup_steps, "optim.schedule_steps",
             f"must be null (trainer.max_steps) or larger than optim.warmup_steps ({optim.warmup_steps})")
    betas = list(optim.betas)
    _require(len(betas) == 2 and all(0.0 <= b < 1.0 for b in betas), "optim.betas",
             f"must be two numbers in [0, 1) (AdamW's moment decays, e.g. [0.9, 0.999]), got {betas}")
    _require(_finite(optim.weight_decay) and optim.weight_decay >= 0, "optim.weight_decay",
             f"must be a finite number >= 0, got {optim.weight_decay}")
    _require(_finite(optim.eps) and optim.eps > 0, "optim.eps",
             f"must be a finite number > 0 (AdamW divides by sqrt(v) + eps), got {optim.eps}")
    _require(optim.warmup_steps >= 0, "optim.warmup_steps", f"must be >= 0 (0: no warm-up), got {optim.warmup_steps}")
    _require(0.0 <= optim.min_lr_ratio <= 1.0, "optim.min_lr_ratio",
             f"must lie in [0, 1] (a fraction of optim.lr), got {optim.min_lr_ratio}")
    _require(_finite(optim.grad_clip) and optim.grad_clip >= 0, "optim.grad_clip",
             f"must be a finite number >= 0 (0 disables clipping), got {optim.grad_clip}")


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


def _check_sampling(sec, key: str) -> None:
    _require(sec.num_steps >= 2, f"{key}.num_steps", "must be >= 2 (the Mochi schedule needs two steps)")
    _require(_finite(sec.guidance_scale) and sec.guidance_scale >= 1.0, f"{key}.guidance_scale",
             f"must be a finite number >= 1 (1 disables guidance), got {sec.guidance_scale}")
    _require(min(sec.frames, sec.height, sec.width, sec.fps) >= 1, f"{key}.frames/height/width/fps", "must be >= 1")
    _require(0.0 < sec.threshold_noise < 1.0, f"{key}.threshold_noise", "must lie in (0, 1)")
    _require(sec.null_condition in ("encoded", "zeros"), f"{key}.null_condition", "must be encoded or zeros")
    _require(sec.null_condition == "encoded" or sec.negative_prompt == "", f"{key}.negative_prompt",
             f"must be empty with {key}.null_condition=zeros (the unconditional input then has no text at all)")


def _check_judge(judge, key: str, active: bool) -> None:
    """`active`: the judge will be asked (its kind is not none and its command or callback runs)."""
    _require(judge.kind in ("none", "api", "local"), f"{key}.kind", "must be none, api or local")
    _require(judge.repeats >= 1, f"{key}.repeats", "must be >= 1")
    _require(_finite(judge.timeout_s) and judge.timeout_s > 0, f"{key}.timeout_s",
             f"must be a finite number of seconds > 0 (each request is abandoned after it), got {judge.timeout_s}")
    _require(judge.requests_per_minute > 0, f"{key}.requests_per_minute",
             f"must be > 0 (requests are spaced 60 / requests_per_minute s apart), got {judge.requests_per_minute}")
    _require(judge.max_retries >= 0, f"{key}.max_retries",
             f"must be >= 0 (0: one try, no retry), got {judge.max_retries}")
    for name in ("backoff_s", "max_backoff_s", "temperature"):
        value = getattr(judge, name)
        _require(_finite(value) and value >= 0, f"{key}.{name}", f"must be a finite number >= 0, got {value}")
    _require(judge.max_tokens >= 1, f"{key}.max_tokens", f"must be >= 1, got {judge.max_tokens}")
    if active and judge.kind == "api":
        _require(bool(judge.base_url) and bool(judge.model), f"{key}.base_url/model",
                 "the api judge needs both (e.g. http://localhost:8000/v1 and the served model name)")
    if active and judge.kind == "local":
        _require(bool(judge.vlm_path), f"{key}.vlm_path", "the local judge needs a VLM folder (Qwen2.5-VL)")


def _check_callbacks(cfg: DictConfig) -> None:
    for name in ("preview", "relation_accuracy"):
        sec = cfg[name]
        _require(sec.every_n_steps >= 0, f"{name}.every_n_steps", "must be >= 0 (0 disables it)")
        _require(sec.max_prompts >= 1, f"{name}.max_prompts", "must be >= 1")
        _check_sampling(sec.sampling, f"{name}.sampling")
    ra = cfg.relation_accuracy
    _require(ra.judge.kind != "none" or ra.every_n_steps == 0, "relation_accuracy.judge.kind",
             "must be api or local when relation_accuracy.every_n_steps > 0")
    _check_judge(ra.judge, "relation_accuracy.judge", active=ra.every_n_steps > 0)
    _check_sampling(cfg.sampling, "sampling")
    _check_judge(cfg.judge, "judge", active=False)  # `relvid evaluate` checks its own judge before use


# The keys each command reads: what its --print-config shows and what it saves beside its outputs.
COMMAND_KEYS = {
    "train": ("relation", "custom_relation", "seed", "output_dir", "resume", "overwrite", "method", "model", "lora",
              "hmt", "rcl", "motion_inversion", "reversion", "data", "optim", "trainer", "speed", "preview",
              "relation_accuracy"),
    "sample": ("relation", "custom_relation", "output_dir", "model", "speed", "sampling", "sample"),
    "evaluate": ("relation", "custom_relation", "output_dir", "model", "speed", "sampling", "judge", "evaluate"),
    "preprocess": ("relation", "custom_relation", "model", "data", "preprocess"),
    "analyze": ("relation", "custom_relation", "output_dir", "model", "speed", "sampling", "judge", "analyze"),
}


def command_view(cfg: DictConfig, command: str) -> DictConfig:
    """The part of the config that ``command`` reads, interpolations resolved."""
    view = OmegaConf.masked_copy(cfg, list(COMMAND_KEYS[command]))
    OmegaConf.resolve(view)
    return view


def to_yaml(cfg: DictConfig, command: str | None = None) -> str:
    """The resolved config as YAML; with ``command``, only the keys that command reads."""
    return OmegaConf.to_yaml(command_view(cfg, command) if command else cfg, resolve=True)


def save_config(cfg: DictConfig, path: str | Path, command: str | None = None) -> Path:
    """Write the resolved config (interpolations expanded; with ``command``, the keys it reads) atomically."""
    from relvid.files import atomic_write

    return atomic_write(path, to_yaml(cfg, command))

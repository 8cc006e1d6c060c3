"""MotionInversion on Mochi: learned motion embeddings added to the inputs of full attention.

MotionInversion (Wang et al., "Motion Inversion for Video Customization") freezes the video model and
learns two embeddings per attention layer: a temporal embedding (frames x channels) added to the
input that feeds the query and key projections, and a value embedding (spatial positions x frames x
channels) added to the input that feeds the value projection. At inference the value embedding is
debiased by frame differencing: frame 0 keeps its embedding, frame i >= 1 gets e_i - e_{i-1}.

On Mochi both act on the vision tokens of the chosen MM-DiT blocks (`transformer_blocks.{i}.attn1`:
`to_q`, `to_k` take x + temporal, `to_v` takes x + value); the text tokens are untouched. A
per-token value embedding at 61x480x848 would hold 11 x 30 x 53 x 3072 numbers per block, so it lives
on a coarser grid: one cell per `stride` x `stride` vision tokens (stride 2: 1/32 of the pixels, the
resolution of the layers the official code puts it in), repeated over the tokens of its cell.

The embeddings train on the clip cache's token grid. A forward on another grid resamples them: fewer
frames take the first ones (as the official code slices), more frames interpolate linearly, another
height or width interpolates the value field bilinearly.
"""

from __future__ import annotations

import functools
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import safetensors
import safetensors.torch
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from relvid.errors import InputNotFoundError, UserError
from relvid.files import atomic_path, read_safetensors
from relvid.models.attention import mochi_blocks

# the attribute of the transformer that holds the embeddings (its parameters: "motion_embeddings.*")
ATTR = "motion_embeddings"
METHOD = "motion_inversion"
FORMAT_NAME = "relvid-motion-inversion"
FORMAT_VERSION = "1"
# what the value embedding becomes at inference: frame_difference (official, object motion) | none (as
# trained) | remove (official's camera-motion setting: no value embedding at all)
INFERENCE_MODES = ("frame_difference", "none", "remove")


class MotionInversionError(UserError, ValueError):
    """A MotionInversion spec, file or model that cannot be used as asked."""


@dataclass(frozen=True)
class MotionSpec:
    """Where the motion embeddings go and how big they are (JSON-able, stored with every file)."""

    blocks: tuple[int, ...]  # transformer block indices carrying both embeddings
    frames: int  # latent frames of the longest training clip: the embeddings' length in time
    height: int  # the training clips' vision-token grid (latent / patch size)
    width: int
    stride: int  # vision tokens per value-embedding cell, per side
    channels: int  # the vision stream's width (3072 on Mochi)
    inference: str = "frame_difference"
    method: str = field(default=METHOD)

    def __post_init__(self) -> None:
        object.__setattr__(self, "blocks", tuple(int(b) for b in self.blocks))
        for name in ("frames", "height", "width", "stride", "channels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise MotionInversionError(f"motion embedding {name}={value!r} must be an integer >= 1")
        if not self.blocks or len(set(self.blocks)) != len(self.blocks) or min(self.blocks) < 0:
            raise MotionInversionError(f"motion_inversion.blocks={list(self.blocks)} must be distinct block "
                                       "indices >= 0 (empty or null: every block)")
        if self.inference not in INFERENCE_MODES:
            raise MotionInversionError(f"motion_inversion.inference={self.inference!r} is unknown; use one of "
                                       f"{', '.join(INFERENCE_MODES)}")
        if self.method != METHOD:
            raise MotionInversionError(f"spec method {self.method!r} is not {METHOD!r}")

    @property
    def value_grid(self) -> tuple[int, int]:
        """(rows, columns) of the value embedding: one cell per stride x stride tokens."""
        return math.ceil(self.height / self.stride), math.ceil(self.width / self.stride)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["blocks"] = list(self.blocks)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> MotionSpec:
        unknown = sorted(set(d) - set(cls.__dataclass_fields__))
        if unknown:
            raise MotionInversionError(f"unknown motion spec keys {unknown}; known: {sorted(cls.__dataclass_fields__)}")
        return cls(**d)


def is_motion_spec_dict(d: object) -> bool:
    """True for the JSON form of a MotionSpec (a checkpoint's or file's 'spec')."""
    return isinstance(d, dict) and d.get("method") == METHOD


def parameter_count(spec: MotionSpec) -> dict[str, int]:
    """Numbers of learned values: temporal, value and total."""
    rows, cols = spec.value_grid
    temporal = len(spec.blocks) * spec.frames * spec.channels
    value = len(spec.blocks) * spec.frames * rows * cols * spec.channels
    return {"temporal": temporal, "value": value, "total": temporal + value}


# --- the pure parts: resampling and debiasing ------------------------------------------------------
def fit_frames(embed: Tensor, frames: int) -> Tensor:
    """(Fe, ...) -> (frames, ...): the first `frames` entries, or linear interpolation in time when
    more frames are asked for than were trained."""
    if frames <= embed.shape[0]:
        return embed[:frames]
    rest = embed.shape[1:]
    flat = embed.reshape(embed.shape[0], -1).t()[None]  # (1, X, Fe)
    out = F.interpolate(flat, size=frames, mode="linear", align_corners=False)  # (1, X, frames)
    return out[0].t().reshape(frames, *rest)


def frame_difference(embed: Tensor) -> Tensor:
    """MotionInversion's debiasing, over dim 0 (frames): out[0] = e[0], out[i] = e[i] - e[i-1]."""
    return torch.cat([embed[:1], embed[1:] - embed[:-1]], dim=0)


def value_field(embed: Tensor, height: int, width: int, stride: int, grid: tuple[int, int] | None = None) -> Tensor:
    """(F, rows, cols, C) cells -> (F, h, w, C) per token. Each cell covers stride x stride tokens of the
    trained height x width grid (the last row and column cropped); another `grid` (h, w) is reached from
    there by bilinear interpolation."""
    tokens = embed.repeat_interleave(stride, dim=1).repeat_interleave(stride, dim=2)[:, :height, :width]
    if grid is None or tuple(grid) == (height, width):
        return tokens
    resized = F.interpolate(tokens.permute(0, 3, 1, 2), size=tuple(grid), mode="bilinear", align_corners=False)
    return resized.permute(0, 2, 3, 1)  # (F, h, w, C)


# --- the module ------------------------------------------------------------------------------------
class MotionEmbeddings(nn.Module):
    """The temporal and value embeddings of every chosen block, zero at the start (as the official code)."""

    def __init__(self, spec: MotionSpec) -> None:
        super().__init__()
        self.spec = spec
        rows, cols = spec.value_grid
        self.temporal = nn.ParameterDict({str(b): nn.Parameter(torch.zeros(spec.frames, spec.channels))
                                          for b in spec.blocks})
        self.value = nn.ParameterDict({str(b): nn.Parameter(torch.zeros(spec.frames, rows, cols, spec.channels))
                                       for b in spec.blocks})
        self.inference = False  # True: the value embedding as spec.inference says (debiased)
        self.grid: tuple[int, int, int] | None = None  # (F, h, w) of this forward's vision tokens
        self._handles: list = []

    def _tokens(self, x: Tensor) -> tuple[int, int, int]:
        if self.grid is None:
            raise MotionInversionError("motion embeddings need the token grid: call the transformer itself, "
                                       "not a block alone")
        frames, h, w = self.grid
        if x.shape[1] != frames * h * w:
            raise MotionInversionError(f"a block's vision input has {x.shape[1]} tokens, the grid {self.grid} "
                                       f"has {frames * h * w}")
        return frames, h, w

    def add_temporal(self, block: int, x: Tensor) -> Tensor:
        """x (B, N, C) vision tokens + the temporal embedding of their frame."""
        frames, h, w = self._tokens(x)
        emb = fit_frames(self.temporal[str(block)], frames).to(x.dtype)  # (F, C)
        out = x.unflatten(1, (frames, h * w)) + emb[None, :, None]  # (B, F, h*w, C)
        return out.flatten(1, 2)  # (B, N, C)

    def add_value(self, block: int, x: Tensor) -> Tensor:
        """x (B, N, C) vision tokens + the value embedding at their frame and position."""
        frames, h, w = self._tokens(x)
        if self.inference and self.spec.inference == "remove":
            return x
        emb = fit_frames(self.value[str(block)], frames)  # (F, rows, cols, C)
        if self.inference and self.spec.inference == "frame_difference":
            emb = frame_difference(emb)
        tokens = value_field(emb, self.spec.height, self.spec.width, self.spec.stride, (h, w))  # (F, h, w, C)
        return x + tokens.reshape(1, frames * h * w, -1).to(x.dtype)


def _record_grid(motion: MotionEmbeddings, patch: int, module: nn.Module, args: tuple, kwargs: dict) -> None:
    # MochiTransformer3DModel.forward(hidden_states (B, C, F, H, W), ...)
    hidden = kwargs.get("hidden_states", args[0] if args else None)
    _, _, frames, height, width = hidden.shape
    motion.grid = (int(frames), int(height) // patch, int(width) // patch)


def _qk_input(motion: MotionEmbeddings, block: int, module: nn.Module, args: tuple):
    return (motion.add_temporal(block, args[0]), *args[1:])


def _v_input(motion: MotionEmbeddings, block: int, module: nn.Module, args: tuple):
    return (motion.add_value(block, args[0]), *args[1:])


def spec_for(transformer: nn.Module, blocks: list[int] | None, frames: int, latent_height: int, latent_width: int,
             stride: int, inference: str = "frame_difference") -> MotionSpec:
    """The spec for `transformer` trained on clips of (frames, latent_height, latent_width) latents; blocks
    None or empty: every block. Refuses block indices the model does not have, naming the key."""
    count = len(mochi_blocks(transformer))
    chosen = list(range(count)) if not blocks else [int(b) for b in blocks]
    bad = [b for b in chosen if not 0 <= b < count]
    if bad:
        raise MotionInversionError(f"motion_inversion.blocks: {bad} are not blocks of this model, which has "
                                   f"{count} (0 .. {count - 1}); leave it empty for every block")
    patch = int(transformer.config.patch_size)
    first = mochi_blocks(transformer)[0].attn1.to_q
    return MotionSpec(blocks=tuple(chosen), frames=int(frames), height=int(latent_height) // patch,
                      width=int(latent_width) // patch, stride=int(stride), channels=int(first.in_features),
                      inference=inference)


def motion_embeddings(transformer: nn.Module) -> MotionEmbeddings | None:
    """The embeddings installed in `transformer`, or None."""
    found = getattr(transformer, ATTR, None)
    return found if isinstance(found, MotionEmbeddings) else None


def inject_motion_embeddings(transformer: nn.Module, spec: MotionSpec) -> MotionEmbeddings:
    """Install zero embeddings of `spec` (fp32, trainable) into a frozen Mochi transformer: a submodule
    `motion_embeddings` and forward pre-hooks on the chosen blocks' vision to_q, to_k and to_v."""
    if motion_embeddings(transformer) is not None:
        raise MotionInversionError("this transformer already has motion embeddings; install them once")
    blocks = mochi_blocks(transformer)
    bad = [b for b in spec.blocks if b >= len(blocks)]
    if bad:
        raise MotionInversionError(f"motion embeddings for blocks {bad}, but the model has {len(blocks)} blocks: "
                                   "the file or checkpoint was made for another model")
    width = int(blocks[0].attn1.to_q.in_features)
    if width != spec.channels:
        raise MotionInversionError(f"motion embeddings are {spec.channels} wide, the model's vision stream is "
                                   f"{width}: the file or checkpoint was made for another model")
    device = next(transformer.parameters()).device
    motion = MotionEmbeddings(spec).to(device)
    setattr(transformer, ATTR, motion)  # registered as a submodule: moves with .to(), in named_parameters()
    patch = int(transformer.config.patch_size)
    motion._handles.append(transformer.register_forward_pre_hook(functools.partial(_record_grid, motion, patch),
                                                                 with_kwargs=True))
    for b in spec.blocks:
        attn = blocks[b].attn1
        for proj in (attn.to_q, attn.to_k):
            motion._handles.append(proj.register_forward_pre_hook(functools.partial(_qk_input, motion, b)))
        motion._handles.append(attn.to_v.register_forward_pre_hook(functools.partial(_v_input, motion, b)))
    return motion


def motion_parameters(transformer: nn.Module) -> dict[str, nn.Parameter]:
    """The embeddings' parameters keyed as in transformer.named_parameters() ("motion_embeddings.value.3")."""
    motion = motion_embeddings(transformer)
    if motion is None:
        return {}
    return {f"{ATTR}.{name}": p for name, p in motion.named_parameters()}


def motion_state(transformer: nn.Module) -> dict[str, Tensor]:
    """Detached CPU copies keyed "temporal.<block>" and "value.<block>" (the file's keys)."""
    motion = motion_embeddings(transformer)
    if motion is None:
        raise MotionInversionError("this transformer has no motion embeddings")
    return {name: p.detach().to("cpu", copy=True) for name, p in motion.named_parameters()}


def expected_shapes(spec: MotionSpec) -> dict[str, tuple[int, ...]]:
    rows, cols = spec.value_grid
    out: dict[str, tuple[int, ...]] = {}
    for b in spec.blocks:
        out[f"temporal.{b}"] = (spec.frames, spec.channels)
        out[f"value.{b}"] = (spec.frames, rows, cols, spec.channels)
    return out


def check_state(state: dict[str, Tensor], spec: MotionSpec, where: str) -> None:
    """Every key of `spec` present with its shape, nothing else, every value finite."""
    expected = expected_shapes(spec)
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise MotionInversionError(f"{where}: motion embeddings do not match their spec: missing {missing[:4]}, "
                                   f"unexpected {unexpected[:4]}")
    bad = sorted(f"{k}: {tuple(state[k].shape)} vs {v}" for k, v in expected.items() if tuple(state[k].shape) != v)
    if bad:
        raise MotionInversionError(f"{where}: motion embeddings of the wrong shape: {bad[:3]}")
    not_finite = sorted(k for k, v in state.items() if not bool(torch.isfinite(v).all()))
    if not_finite:
        raise MotionInversionError(f"{where}: non-finite (NaN or infinite) motion embeddings in {not_finite[:3]}: "
                                   "the run that made them diverged; use an earlier checkpoint")


def load_motion_state(transformer: nn.Module, state: dict[str, Tensor]) -> None:
    motion = motion_embeddings(transformer)
    if motion is None:
        raise MotionInversionError("this transformer has no motion embeddings; inject them first")
    check_state(state, motion.spec, "motion state")
    with torch.no_grad():
        for name, p in motion.named_parameters():
            p.copy_(state[name])


# --- the file ---------------------------------------------------------------------------------------
def save_motion_file(path: str | os.PathLike, state: dict[str, Tensor], spec: MotionSpec,
                     metadata: dict[str, str] | None = None) -> Path:
    """Write the embeddings (safetensors, atomic) with the spec as JSON metadata, so the file loads
    without a config."""
    path = Path(path)
    reserved = {"format", "version", "spec"} & set(metadata or {})
    if reserved:
        raise MotionInversionError(f"metadata keys {sorted(reserved)} are reserved by the file format")
    check_state(state, spec, "motion embeddings to save")
    header = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "spec": json.dumps(spec.to_dict(), sort_keys=True)}
    for k, v in (metadata or {}).items():
        if not isinstance(v, str):
            raise MotionInversionError(f"metadata[{k!r}] must be a string, got {type(v).__name__}")
        header[k] = v
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}
    with atomic_path(path) as tmp:
        safetensors.torch.save_file(tensors, str(tmp), metadata=header)
    return path


def load_motion_file(path: str | os.PathLike) -> tuple[MotionSpec, dict[str, Tensor], dict[str, str]]:
    """(spec, state, the extra metadata) of a MotionInversion file, checked."""
    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(f"motion embedding file not found: {path}")
    header, state = read_safetensors(path, MotionInversionError)
    if header.get("format") != FORMAT_NAME:
        raise MotionInversionError(f"{path}: not a MotionInversion file (metadata format={header.get('format')!r})")
    if header.get("version") != FORMAT_VERSION:
        raise MotionInversionError(f"{path}: MotionInversion file version {header.get('version')!r} is not "
                                   f"supported (expected {FORMAT_VERSION!r})")
    try:
        spec = MotionSpec.from_dict(json.loads(header["spec"]))
    except (KeyError, json.JSONDecodeError, TypeError) as err:
        raise MotionInversionError(f"{path}: bad 'spec' metadata ({err})") from None
    check_state(state, spec, str(path))
    return spec, state, {k: v for k, v in header.items() if k not in ("format", "version", "spec")}


def is_motion_file(path: str | os.PathLike) -> bool:
    """A safetensors file whose metadata names the MotionInversion format."""
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("format") == FORMAT_NAME
    except (safetensors.SafetensorError, OSError):
        return False


def apply_motion_state(transformer: nn.Module, spec: MotionSpec, state: dict[str, Tensor]) -> MotionEmbeddings:
    """Install `spec`'s embeddings into a fresh transformer, load `state`, and switch to inference (the
    value embedding debiased as spec.inference says)."""
    motion = inject_motion_embeddings(transformer, spec)
    load_motion_state(transformer, state)
    motion.requires_grad_(False)
    motion.inference = True
    return motion

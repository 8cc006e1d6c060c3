"""Pretraining the toy world's base model: a tiny MochiTransformer3DModel, fully trained on
generic-motion clips (subjects + "resting/drifting/wandering", never a relation).

The objective is relvid's rectified flow (relvid.losses.flow_matching), so the base model speaks
the same convention as customization and sampling. Clips are rendered on the fly, each a pure
function of (seed, stage, step, position in batch), so a run is reproducible and never repeats a
clip. Two stages, as video models are trained: first frames alone (one latent frame, 64 tokens:
five times cheaper, and where subjects are learned), then whole clips (motion and consistency).
The saved model is an exponential moving average of the weights, which samples cleaner.
"""

from __future__ import annotations

import copy
import json
import math
import random
import time
from pathlib import Path

import torch
from diffusers import MochiTransformer3DModel
from tqdm.auto import tqdm

from relvid.errors import UserError
from relvid.files import atomic_path
from relvid.losses.flow_matching import model_timestep, noisy_latents, sample_sigmas, velocity_target
from relvid.seeding import derive_seed
from relvid.toy.codec import ToyCodec
from relvid.toy.render import render_clip
from relvid.toy.text import ToyTextEncoder
from relvid.toy.world import FRAMES, GENERIC_MOTIONS, all_subjects, generic_caption, pretraining_pair_allowed

# The committed base model (relvid/toy/base_model), loaded with model.preset=mochi, model.path=BASE_DIR.
BASE_DIR = Path(__file__).resolve().parents[1] / "base_model"
INFO_NAME = "toy_base.json"

# 4 blocks of width 160 (5 heads x 32), text stream 64 wide: about 2.2 M parameters.
BASE_CONFIG = {
    "num_layers": 4,
    "num_attention_heads": 5,
    "attention_head_dim": 32,
    "pooled_projection_dim": 64,
    "text_embed_dim": 32,  # ToyTextEncoder().dim
    "time_embed_dim": 64,
    "in_channels": 36,  # ToyCodec().latent_channels
}
CAPTION_DROPOUT = 0.1  # dropped captions become "", the sampler's negative prompt
EMA_DECAY = 0.998
STATE_NAME = "pretrain_state.pt"  # resumable training state, removed when a stage finishes
_PAIR_STREAM, _BATCH_STREAM, _NOISE_STREAM, _STAGE_STREAM = 201, 202, 203, 204


class PretrainStateMismatch(UserError, RuntimeError):
    """A resumable pretraining state in the output folder belongs to a run with other settings."""


def rope_frequencies(num_heads: int, head_dim: int, tokens_h: int = 8, tokens_w: int = 8) -> torch.Tensor:
    """Axis-aligned 3D RoPE frequencies (3, heads, head_dim // 2) at the toy token grid's scale.

    Mochi's RoPE places tokens `192 / tokens` apart in space (1 apart in time) and learns its
    frequencies; diffusers starts them at zero, i.e. no positions at all, and N(0, 1) would turn a
    step of one token into a ~24-radian rotation, i.e. positions without locality. Instead each
    rotary pair gets one axis and a geometric ladder of wavelengths from 2 to 16 tokens (space)
    or 2 to 12 latent frames (time), as a standard RoPE has.
    """
    pairs = head_dim // 2
    n_t = max(1, pairs // 4)
    n_h = (pairs - n_t) // 2
    n_w = pairs - n_t - n_h
    step_h, step_w = 192.0 / tokens_h, 192.0 / tokens_w  # Mochi's spacing of neighbouring tokens

    def ladder(n: int, longest: float) -> torch.Tensor:  # angular step per unit spacing
        return math.pi / torch.logspace(0.0, math.log10(longest / 2), n) if n > 1 else torch.tensor([math.pi / 2])

    freqs = torch.zeros(3, num_heads, pairs)
    freqs[0, :, :n_t] = ladder(n_t, 12.0)
    freqs[1, :, n_t:n_t + n_h] = ladder(n_h, 16.0) / step_h
    freqs[2, :, n_t + n_h:] = ladder(n_w, 16.0) / step_w
    return freqs


def new_base_model(seed: int = 0) -> MochiTransformer3DModel:
    """The untrained base: random weights from `seed`, and RoPE frequencies with locality
    (rope_frequencies) instead of diffusers' zeros."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MochiTransformer3DModel(**BASE_CONFIG)
        with torch.no_grad():
            model.pos_frequencies.copy_(rope_frequencies(BASE_CONFIG["num_attention_heads"],
                                                         BASE_CONFIG["attention_head_dim"]))
    return model


class GenericClips:
    """Batches of generic-motion training clips as (latents, text embeds, text mask)."""

    def __init__(self, seed: int = 0, frames: int = FRAMES) -> None:
        self.seed = seed
        self.frames = frames  # the first `frames` frames of each clip (1: still images)
        self.codec = ToyCodec()
        self.text = ToyTextEncoder()
        self.subjects = all_subjects()
        self.motions = list(GENERIC_MOTIONS)

    def sample(self, index: int) -> tuple[torch.Tensor, str]:
        rng = random.Random(derive_seed(self.seed, index, _PAIR_STREAM))
        while True:
            a, b = rng.sample(self.subjects, 2)
            if pretraining_pair_allowed(a, b):
                break
        motion = rng.choice(self.motions)
        clip = render_clip(motion, a, b, derive_seed(self.seed, index, _BATCH_STREAM))
        return clip.video[:, : self.frames], generic_caption(motion, a, b)

    def batch(self, step: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        videos, texts = [], []
        drop = random.Random(derive_seed(self.seed, step, _NOISE_STREAM))
        for j in range(batch_size):
            video, caption = self.sample(step * batch_size + j)
            videos.append(video)
            texts.append("" if drop.random() < CAPTION_DROPOUT else caption)
        latents, _ = self.codec.encode(torch.stack(videos))  # (B, C, f, h, w), normalized
        encoded = self.text.encode(texts)
        length = max(e.shape[0] for e, _ in encoded)
        embeds = torch.zeros(batch_size, length, self.text.dim)  # (B, L, D), zero-padded
        mask = torch.zeros(batch_size, length, dtype=torch.bool)
        for b, (e, m) in enumerate(encoded):
            embeds[b, : e.shape[0]], mask[b, : e.shape[0]] = e, m
        return latents, embeds, mask


def _lr_factor(step: int, steps: int) -> float:
    """Linear warm-up, then cosine decay to 5 %."""
    warmup = min(100, max(1, steps // 10))
    if step < warmup:
        return (step + 1) / warmup
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def stage_settings(stage: str, steps: int, batch_size: int, lr: float, seed: int, frames: int,
                   init: str | Path | None) -> dict:
    """What identifies a pretraining stage: kept in its resumable state and in its toy_base.json, and
    compared before a finished or interrupted stage is reused."""
    return {"stage": stage, "steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed, "frames": frames,
            "init": None if init is None else str(init)}


def pretrain(out_dir: str | Path = BASE_DIR, steps: int = 2000, batch_size: int = 16, lr: float = 1e-3,
             seed: int = 0, device: str | None = None, progress: bool = True, save_every: int = 250,
             init: str | Path | None = None, frames: int = FRAMES, stage: str = "video",
             save_dtype: torch.dtype = torch.float16, stop_after: int | None = None) -> Path | None:
    """One pretraining stage: train the base (from scratch, or on from the model in `init`) on
    clips of `frames` frames and save the moving average of its weights to `out_dir` (diffusers
    format, in `save_dtype`: fp16 halves the committed file, and loading upcasts). Every
    `save_every` steps the training state is saved too, and a rerun with the same arguments
    resumes from it, so an interrupted stage loses at most `save_every` steps.
    `stop_after` ends this call after that many steps with the state saved (a time-boxed job on a
    shared machine): it returns None, and a rerun goes on."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    out_dir = Path(out_dir)
    state_path = out_dir / STATE_NAME
    stage_seed = derive_seed(seed, sum(map(ord, stage)), _STAGE_STREAM)
    torch.manual_seed(stage_seed)
    if init is None:
        model = new_base_model(seed)
    else:
        model = MochiTransformer3DModel.from_pretrained(init, torch_dtype=torch.float32, local_files_only=True)
    model = model.to(device).train()
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.99))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, steps))
    first, seconds = 0, 0.0
    settings = stage_settings(stage, steps, batch_size, lr, seed, frames, init)
    if state_path.is_file():
        try:
            state = torch.load(state_path, map_location=device, weights_only=True)  # a crafted file runs no code
        except Exception as err:  # truncated, foreign or crafted: refused by name, never executed
            raise PretrainStateMismatch(
                f"{state_path} is not a readable toy-base pretraining state ({type(err).__name__}: "
                f"{str(err).splitlines()[0][:200]}); delete it to start this stage from the beginning") from None
        if not isinstance(state, dict) or "settings" not in state:
            raise PretrainStateMismatch(f"{state_path} is not a toy-base pretraining state (no 'settings'); "
                                        "delete it to start this stage from the beginning")
        if state["settings"] != settings:
            raise PretrainStateMismatch(f"{state_path} belongs to a different pretraining run ({state['settings']}); "
                               f"delete it to start this one ({settings})")
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        first, seconds = state["step"], state["seconds"]
        print(f"[toy-base] resuming stage {stage!r} at step {first} from {state_path}", flush=True)
    data = GenericClips(stage_seed, frames)
    start, loss_ema = time.time() - seconds, None
    last = steps if stop_after is None else min(steps, first + stop_after)
    bar = tqdm(range(first, last), desc=f"toy base ({stage})", disable=not progress, initial=first, total=steps)
    for step in bar:
        z0, embeds, mask = data.batch(step, batch_size)
        z0, embeds, mask = z0.to(device), embeds.to(device), mask.to(device)
        gen = torch.Generator().manual_seed(derive_seed(stage_seed, step, _NOISE_STREAM))
        noise = torch.randn(z0.shape, generator=gen).to(device)
        sigma = sample_sigmas(z0.shape[0], gen, device=device)  # (B,)
        pred = model(hidden_states=noisy_latents(z0, noise, sigma), encoder_hidden_states=embeds,
                     timestep=model_timestep(sigma), encoder_attention_mask=mask, return_dict=False)[0]
        loss = (pred.float() - velocity_target(z0, noise)).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        decay = min(EMA_DECAY, (1 + step) / (10 + step))  # a short average early on
        with torch.no_grad():
            for avg, param in zip(ema.parameters(), model.parameters(), strict=True):
                avg.lerp_(param, 1 - decay)
        value = float(loss.detach())
        loss_ema = value if loss_ema is None else 0.98 * loss_ema + 0.02 * value
        bar.set_postfix(loss=f"{loss_ema:.4f}")
        if (save_every and (step + 1) % save_every == 0 or step + 1 == last) and step + 1 < steps:
            with atomic_path(state_path) as tmp:  # a crash mid-save keeps the previous state
                torch.save({"settings": settings, "step": step + 1, "seconds": time.time() - start,
                            "model": model.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict(),
                            "scheduler": sched.state_dict()}, tmp)
    if last < steps:
        return None
    info = {**settings, "device": device, "seconds": round(time.time() - start, 1),
            "loss_ema": round(loss_ema if loss_ema is not None else float("nan"), 5)}
    path = _save(ema.cpu().to(save_dtype), out_dir, info)
    state_path.unlink(missing_ok=True)
    return path


def _save(model: MochiTransformer3DModel, out_dir: Path, info: dict) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    (out_dir / INFO_NAME).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return out_dir

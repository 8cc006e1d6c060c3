"""Pretraining the toy world's base model: a tiny MochiTransformer3DModel, fully fine-tuned on
generic-motion clips (subjects + "resting/drifting/wandering", never a relation).

The objective is relvid's rectified flow (relvid.losses.flow_matching), so the base model speaks
the same convention as customization and sampling. Clips are rendered on the fly, each a pure
function of (seed, step, position in batch), so a run is reproducible and never repeats a clip.
"""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path

import torch
from diffusers import MochiTransformer3DModel
from tqdm.auto import tqdm

from relvid.losses.flow_matching import model_timestep, noisy_latents, sample_sigmas, velocity_target
from relvid.seeding import derive_seed
from relvid.toy.codec import ToyCodec
from relvid.toy.render import render_clip
from relvid.toy.text import ToyTextEncoder
from relvid.toy.world import GENERIC_MOTIONS, all_subjects, generic_caption, pretraining_pair_allowed

# The committed base model (relvid/toy/base_model), loaded with model.preset=mochi, model.path=BASE_DIR.
BASE_DIR = Path(__file__).resolve().parent / "base_model"
INFO_NAME = "toy_base.json"

# 4 blocks of width 128 (4 heads x 32), text stream 64 wide: about 1.6 M parameters.
BASE_CONFIG = {
    "num_layers": 4,
    "num_attention_heads": 4,
    "attention_head_dim": 32,
    "pooled_projection_dim": 64,
    "text_embed_dim": 32,  # ToyTextEncoder().dim
    "time_embed_dim": 64,
    "in_channels": 144,  # ToyCodec().latent_channels
}
CAPTION_DROPOUT = 0.1  # dropped captions become "", the sampler's negative prompt
_PAIR_STREAM, _BATCH_STREAM, _NOISE_STREAM = 201, 202, 203


def new_base_model(seed: int = 0) -> MochiTransformer3DModel:
    """The untrained base: random weights from `seed`, with non-zero RoPE frequencies.

    diffusers initialises Mochi's learned RoPE frequencies at zero, which would leave the model
    blind to token positions (patch embedding has no positional term): start them random instead.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MochiTransformer3DModel(**BASE_CONFIG)
        with torch.no_grad():
            model.pos_frequencies.normal_(0.0, 1.0)
    return model


class GenericClips:
    """Batches of generic-motion training clips as (latents, text embeds, text mask)."""

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self.codec = ToyCodec()
        self.text = ToyTextEncoder()
        self.subjects = all_subjects()
        self.motions = list(GENERIC_MOTIONS)
        self.empty = self.text.encode([""])[0]

    def sample(self, index: int) -> tuple[torch.Tensor, str]:
        rng = random.Random(derive_seed(self.seed, index, _PAIR_STREAM))
        while True:
            a, b = rng.sample(self.subjects, 2)
            if pretraining_pair_allowed(a, b):
                break
        motion = rng.choice(self.motions)
        clip = render_clip(motion, a, b, derive_seed(self.seed, index, _BATCH_STREAM))
        return clip.video, generic_caption(motion, a, b)

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


def pretrain(out_dir: str | Path = BASE_DIR, steps: int = 3000, batch_size: int = 16, lr: float = 1e-3,
             seed: int = 0, device: str | None = None, progress: bool = True,
             save_every: int = 0, init: str | Path | None = None) -> Path:
    """Train the base model (from scratch, or on from the weights in `init`) and save it
    (diffusers format) to `out_dir`."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(seed)
    if init is None:
        model = new_base_model(seed)
    else:
        model = MochiTransformer3DModel.from_pretrained(init, torch_dtype=torch.float32, local_files_only=True)
    model = model.to(device).train()
    data = GenericClips(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.99))
    warmup = min(200, steps // 10)

    def factor(step: int) -> float:  # linear warm-up, cosine decay to 5 %
        if step < warmup:
            return (step + 1) / warmup
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    out_dir = Path(out_dir)
    start, ema = time.time(), None
    bar = tqdm(range(steps), desc="toy base", disable=not progress)
    for step in bar:
        z0, embeds, mask = data.batch(step, batch_size)
        z0, embeds, mask = z0.to(device), embeds.to(device), mask.to(device)
        gen = torch.Generator().manual_seed(derive_seed(seed, step, _NOISE_STREAM))
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
        ema = float(loss) if ema is None else 0.98 * ema + 0.02 * float(loss)
        bar.set_postfix(loss=f"{ema:.4f}")
        if save_every and (step + 1) % save_every == 0 and step + 1 < steps:
            _save(model, out_dir, {"steps": step + 1, "loss_ema": ema})
    info = {"steps": steps, "init": None if init is None else str(init), "batch_size": batch_size, "lr": lr, "seed": seed, "device": device,
            "seconds": round(time.time() - start, 1), "loss_ema": round(ema or float("nan"), 5)}
    return _save(model, out_dir, info)


def _save(model: MochiTransformer3DModel, out_dir: Path, info: dict) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    (out_dir / INFO_NAME).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return out_dir

"""A small valid clip cache of random tensors, for tests and the CPU smoke config."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from relvid.data.cache import MANIFEST_NAME, PROMPTS_NAME, ClipCache, ClipRecord
from relvid.errors import InputError, OutputExistsError
from relvid.losses.flow_matching import relation_mask


def _moving_box(f: int, h: int, w: int, g: torch.Generator) -> Tensor:
    """(f, h, w) binary rectangle drifting across the grid at a constant random velocity."""
    bh, bw = max(1, h // 3), max(1, w // 3)
    y0 = float(torch.randint(0, h - bh + 1, (1,), generator=g))
    x0 = float(torch.randint(0, w - bw + 1, (1,), generator=g))
    vy, vx = (torch.rand(2, generator=g) * 2 - 1).tolist()  # cells per latent frame
    mask = torch.zeros(f, h, w)
    for t in range(f):
        # Clamp so the box stays on the grid: a subject never leaves the frame here.
        y = int(min(max(round(y0 + vy * t), 0), h - bh))
        x = int(min(max(round(x0 + vx * t), 0), w - bw))
        mask[t, y:y + bh, x:x + bw] = 1.0
    return mask


def _random_text(max_tokens: int, text_dim: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    n = int(torch.randint(1, max_tokens + 1, (1,), generator=g))
    return torch.randn(n, text_dim, generator=g), torch.ones(n, dtype=torch.bool)


def _remove_cache(root: Path) -> None:
    """Delete the cache in ``root``: its listed clip files, prompts and manifest (other files stay)."""
    try:
        names = [entry["file"] for entry in ClipCache(root).manifest["clips"]]
    except ValueError:  # an unreadable manifest (CacheError): nothing listed can be trusted, drop just it
        names = []
    for name in [*names, PROMPTS_NAME, MANIFEST_NAME]:
        (root / name).unlink(missing_ok=True)


def write_random_cache(root: str | Path, n_clips: int = 4, relation: str = "shaking_hands",
                       latent_shape: tuple[int, int, int, int] = (4, 3, 8, 8), text_dim: int = 32,
                       max_tokens: int = 6, seed: int = 0,
                       prompts: Sequence[str] = ("A dog is shaking hands with a cat.",),
                       overwrite: bool = False) -> ClipCache:
    """Write ``n_clips`` random clips of ``relation`` (plus prompt embeddings) into ``root``.

    Latent means ~ N(0, 1) and log-variances ~ -4 (stored bf16, like a real VAE posterior), text
    embeddings of 1..max_tokens valid tokens, two moving-box subject masks and their union as the
    relation mask. Deterministic from ``seed``. A folder that already holds a cache (a manifest.json)
    is refused unless ``overwrite``, which first removes that cache's clips, prompts and manifest.
    """
    if n_clips < 1 or max_tokens < 1:
        raise InputError(f"random-cache: --clips and --max-tokens must be >= 1, got {n_clips} and {max_tokens}")
    root = Path(root)
    if (root / MANIFEST_NAME).exists():
        if not overwrite:
            raise OutputExistsError(
                f"{root} already holds a clip cache ({root / MANIFEST_NAME}): a random cache would replace its "
                "prompts and config and mix random clips into it. Fix: pick another folder, or pass --overwrite "
                "(write_random_cache(..., overwrite=True)) to delete that cache and write a random one")
        _remove_cache(root)
    c, f, h, w = latent_shape
    g = torch.Generator().manual_seed(seed)
    cache = ClipCache(root, create=True)
    cache.set_config({"generator": "relvid.data.random_cache", "n_clips": n_clips, "relation": relation,
                      "latent_shape": list(latent_shape), "text_dim": text_dim,
                      "max_tokens": max_tokens, "seed": seed})
    for i in range(n_clips):
        embeds, mask = _random_text(max_tokens, text_dim, g)
        subjects = torch.stack([_moving_box(f, h, w, g), _moving_box(f, h, w, g)])  # (2, f, h, w)
        cache.add(ClipRecord(
            latent_mean=torch.randn(c, f, h, w, generator=g).bfloat16(),
            latent_logvar=(-4.0 + 0.1 * torch.randn(c, f, h, w, generator=g)).bfloat16(),
            text_embeds=embeds, text_mask=mask, subject_masks=subjects,
            relation_mask=relation_mask(subjects[None])[0],  # (f, h, w)
            meta={"clip_id": f"{relation}_{i:03d}", "relation": relation,
                  "caption": f"Random clip {i} of {relation}.", "source": f"random:{seed}:{i}",
                  "frame_range": f"0-{6 * (f - 1)}", "fps": "30", "codec": "random",
                  "codec_factors": "6,8,8", "text_encoder": "random"}))
    cache.write_prompts({text: _random_text(max_tokens, text_dim, g) for text in [*prompts, ""]})
    return cache

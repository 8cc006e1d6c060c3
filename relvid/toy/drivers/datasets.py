"""Toy exemplar sets in relvid's clip cache: the same format `relvid preprocess` writes for NTU.

Each relation gets `clips` exemplar videos of the fixed exemplar subjects (a white circle and a
white square, the toy world's "a person and a person"), captioned in the paper's form, with exact
subject masks from the renderer put on the latent grid by relvid's own rule. Exemplars are staged
as NTU films its actors (render.EXEMPLAR_STAGING: on their marks in mid-frame, each take a little
different), unlike the freely placed pretraining clips. The cache's prompt
file holds the relations' test prompts and "" (the negative prompt).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable
from pathlib import Path

import torch

from relvid.data.cache import CacheError, ClipCache
from relvid.preprocess.encode import PreparedClip
from relvid.preprocess.pipeline import ClipJob, write_clips, write_prompt_embeddings
from relvid.seeding import derive_seed
from relvid.toy.codec import ToyCodec
from relvid.toy.render import EXEMPLAR_STAGING, render_clip
from relvid.toy.text import ToyTextEncoder
from relvid.toy.world import EXEMPLAR_SUBJECTS, FPS, FRAMES, RELATIONS, relation_caption, test_pairs

EXEMPLAR_CLIPS = 20
_EXEMPLAR_STREAM = 401
# Config keys that decide what a cached clip holds: a cache made with other values is refused.
_CLIP_DEFINING = ("generator", "seed", "subjects", "staging")


def exemplar_seed(seed: int, relation: str, index: int) -> int:
    return derive_seed(seed, list(RELATIONS).index(relation), index, _EXEMPLAR_STREAM)


def _render_exemplar(relation: str, index: int, seed: int) -> PreparedClip:
    """Exemplar ``index`` of ``relation`` from the renderer, with its exact subject masks."""
    clip = render_clip(relation, *EXEMPLAR_SUBJECTS, exemplar_seed(seed, relation, index), EXEMPLAR_STAGING)
    return PreparedClip(clip.video[None], clip.masks, f"0-{FRAMES - 1}", FPS, "renderer")


def exemplar_jobs(relations: Iterable[str], clips: int = EXEMPLAR_CLIPS, seed: int = 0) -> list[ClipJob]:
    """The toy world as a source of the preprocessing pipeline: `clips` rendered exemplars per relation."""
    s1, s2 = EXEMPLAR_SUBJECTS
    return [ClipJob(f"{r}_{i:03d}", relation_caption(r, s1, s2), r, f"toy:{seed}:{r}:{i}",
                    functools.partial(_render_exemplar, r, i, seed))
            for r in relations for i in range(clips)]


def build_exemplar_cache(root: str | Path, relations: Iterable[str] | None = None, clips: int = EXEMPLAR_CLIPS,
                         seed: int = 0, progress: bool = True) -> ClipCache:
    """Render, encode and cache `clips` exemplars per relation (default: all) through the preprocessing
    pipeline's writer; finished clips are kept."""
    relations = list(RELATIONS) if relations is None else list(relations)
    unknown = sorted(set(relations) - set(RELATIONS))
    if unknown:
        raise KeyError(f"unknown toy relations {unknown}; toy relations are {sorted(RELATIONS)}")
    codec, text = ToyCodec(), ToyTextEncoder()
    cache = ClipCache(root, create=True)
    config = {"generator": "relvid.toy.drivers.datasets", "relations": relations, "clips": clips, "seed": seed,
              "subjects": [str(s) for s in EXEMPLAR_SUBJECTS], "staging": dataclasses.asdict(EXEMPLAR_STAGING)}
    found = cache.manifest["config"]
    made = {k: found.get(k) for k in _CLIP_DEFINING}
    makes = {k: config[k] for k in _CLIP_DEFINING}
    if found and made != makes:
        raise CacheError(f"{cache.manifest_path}: its clips were made with {made}, this relvid makes {makes}. "
                         f"Fix: delete {cache.root} (and the runs trained on it) and run again")
    if found:  # the cache grows: keep every relation it already holds
        config["relations"] = list(dict.fromkeys([*found.get("relations", []), *relations]))
    cache.set_config(config)
    # The toy posterior is a delta (exact codec): latents are kept in full precision.
    summary = write_clips(cache, exemplar_jobs(relations, clips, seed), codec, text, latent_dtype="fp32",
                          progress=progress, desc="toy exemplars")
    if summary.failed:
        raise CacheError(f"{cache.root}: toy exemplars failed to render or encode: {summary.failed}")
    write_prompt_embeddings(cache, text, [relation_caption(r, a, b) for r in relations for a, b in test_pairs()])
    return cache


def exemplar_frames(relation: str, index: int = 0, seed: int = 0) -> torch.Tensor:
    """One exemplar as uint8 (T, H, W, 3), for grids and READMEs."""
    clip = render_clip(relation, *EXEMPLAR_SUBJECTS, exemplar_seed(seed, relation, index), EXEMPLAR_STAGING)
    return ((clip.video + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 3, 0)

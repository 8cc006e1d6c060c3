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
from collections.abc import Iterable
from pathlib import Path

import torch
from tqdm.auto import tqdm

from relvid.data.cache import CacheError, ClipCache, ClipRecord
from relvid.models.codecs import codec_factors
from relvid.preprocess.latent_grid import masks_to_latent_grid
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


def build_exemplar_cache(root: str | Path, relations: Iterable[str] | None = None, clips: int = EXEMPLAR_CLIPS,
                         seed: int = 0, progress: bool = True) -> ClipCache:
    """Render, encode and cache `clips` exemplars per relation (default: all); finished clips are kept."""
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
    s1, s2 = EXEMPLAR_SUBJECTS
    jobs = [(r, i) for r in relations for i in range(clips) if not cache.is_done(f"{r}_{i:03d}")]
    for relation, i in tqdm(jobs, desc="toy exemplars", disable=not progress or not jobs):
        clip = render_clip(relation, s1, s2, exemplar_seed(seed, relation, i), EXEMPLAR_STAGING)
        mean, logvar = codec.encode(clip.video[None])  # (1, C, f, h, w) each, normalized
        subjects = masks_to_latent_grid(clip.masks, codec.time_factor, codec.space_factor)  # (2, f, h, w)
        caption = relation_caption(relation, s1, s2)
        embeds, mask = text.encode([caption])[0]
        cache.add(ClipRecord(
            latent_mean=mean[0], latent_logvar=logvar[0].bfloat16(),  # the toy posterior is a constant delta
            text_embeds=embeds, text_mask=mask, subject_masks=subjects, relation_mask=subjects.amax(dim=0),
            meta={"clip_id": f"{relation}_{i:03d}", "relation": relation, "caption": caption,
                  "source": f"toy:{seed}:{relation}:{i}", "frame_range": f"0-{FRAMES - 1}", "fps": str(FPS),
                  "codec": codec.name, "codec_factors": codec_factors(codec), "text_encoder": text.name}))
    prompts = [relation_caption(r, a, b) for r in relations for a, b in test_pairs()] + [""]
    cache.write_prompts(dict(zip(prompts, text.encode(prompts), strict=True)))
    return cache


def exemplar_frames(relation: str, index: int = 0, seed: int = 0) -> torch.Tensor:
    """One exemplar as uint8 (T, H, W, 3), for grids and READMEs."""
    clip = render_clip(relation, *EXEMPLAR_SUBJECTS, exemplar_seed(seed, relation, index), EXEMPLAR_STAGING)
    return ((clip.video + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 3, 0)

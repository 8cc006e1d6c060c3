"""The preprocessing driver: sources -> clips -> masks -> latents + embeddings -> the clip cache.

Each clip is written atomically as soon as it is done; a rerun skips the clips the manifest lists;
a clip that cannot be cached (too short, no skeleton, undecodable ...) is recorded with its reason
in the manifest and the run goes on. Prompt embeddings for previews and evaluation (and the empty
negative prompt) are written in the same pass, so training never loads the text encoder.
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from relvid import relations
from relvid.data.cache import ClipCache
from relvid.data.encode import encode_clip
from relvid.data.masks import MaskMaker, make_masks
from relvid.data.sources import Source
from relvid.data.video import ClipSpec, load_clip
from relvid.models.codecs import Codec
from relvid.models.text_encoders import TextEncoder


@dataclass
class Summary:
    written: list[str] = field(default_factory=list)
    skipped_done: list[str] = field(default_factory=list)  # already in the cache
    failed: dict[str, str] = field(default_factory=dict)  # source -> reason
    seconds: float = 0.0

    def line(self) -> str:
        return (f"{len(self.written)} clips written, {len(self.skipped_done)} already cached, "
                f"{len(self.failed)} failed ({self.seconds:.1f} s)")


def relation_name(relation: str) -> str:
    """The canonical name of a known relation, or a custom relation's name in the same form (``High five`` -> ``high_five``)."""
    if relations.is_known(relation):
        return relations.resolve(relation).name
    name = relation.strip().lower().replace("-", "_").replace(" ", "_")
    if not re.fullmatch(r"[a-z0-9][a-z0-9_]*", name):
        raise ValueError(f"relation name {relation!r}: use letters, digits, spaces, '-' or '_' (e.g. high_five)")
    return name


def preview_prompts(relation: str, extra: list[str] | tuple[str, ...] = ()) -> list[str]:
    """The relation's evaluation prompts (when it has some), the user's extra prompts, and ``""``."""
    prompts: list[str] = []
    if relations.is_known(relation):
        from relvid.eval.prompts import eval_prompts

        prompts += eval_prompts(relation)
    prompts += [p for p in extra if p]
    prompts.append("")  # the negative prompt of classifier-free guidance
    return list(dict.fromkeys(prompts))


def plan(sources: list[Source], cache_root: str | Path) -> list[tuple[Source, str]]:
    """(source, "cached" | "todo") per source, without loading anything heavy (for --dry-run)."""
    root = Path(cache_root)
    cache = ClipCache(root) if (root / "manifest.json").is_file() else None
    return [(s, "cached" if cache is not None and cache.is_done(s.clip_id) else "todo") for s in sources]


def run_preprocess(
    sources: list[Source],
    cache_root: str | Path,
    relation: str,
    codec: Codec,
    text_encoder: TextEncoder,
    mask_maker: MaskMaker,
    spec: ClipSpec = ClipSpec(),
    fallback: MaskMaker | None = None,
    spatial_rule: str = "any",
    latent_dtype: str = "bf16",
    prompts: list[str] | None = None,
    config: dict | None = None,
    progress: bool = True,
) -> Summary:
    """Cache every source not cached yet; returns what was written, skipped and why clips failed."""
    start = time.perf_counter()
    relation = relation_name(relation)
    codec.latent_shape(spec.frames, spec.height, spec.width)  # a size the codec cannot take fails now, once
    cache = ClipCache(cache_root, create=True)
    cache.set_config({**(config or {}), "relation": relation, "spec": asdict(spec), "codec": codec.name,
                      "text_encoder": text_encoder.name, "mask_source": mask_maker.name,
                      "mask_fallback": fallback.name if fallback else None, "spatial_rule": spatial_rule})
    summary = Summary()
    todo = [s for s in sources if not cache.is_done(s.clip_id)]
    summary.skipped_done = [s.clip_id for s in sources if cache.is_done(s.clip_id)]

    captions = sorted({s.caption for s in todo})
    embedded = dict(zip(captions, text_encoder.encode(captions))) if captions else {}
    if prompts is not None:
        texts = list(dict.fromkeys([*prompts, ""]))
        cache.write_prompts(dict(zip(texts, text_encoder.encode(texts))))

    for source in tqdm(todo, desc="preprocess", unit="clip", disable=not progress):
        try:
            clip = load_clip(source.video, spec)
            masks, used = make_masks(source, clip, mask_maker, fallback)
            meta = {"clip_id": source.clip_id, "relation": relation, "caption": source.caption,
                    "source": str(source.video), "text_encoder": text_encoder.name, "mask_source": used}
            record = encode_clip(clip, masks, embedded[source.caption], codec, meta, spatial_rule, latent_dtype,
                                 spec.fps)
        # One bad clip never stops the others: every error a clip can raise (decoding, parsing, masks,
        # codec, out of memory) is a ValueError, OSError or RuntimeError subclass; it goes to the manifest.
        except (ValueError, OSError, RuntimeError) as err:
            reason = getattr(err, "reason", None) or f"{type(err).__name__}: {err}"
            cache.record_failure(str(source.video), reason)
            summary.failed[str(source.video)] = reason
            continue
        cache.add(record)
        summary.written.append(source.clip_id)
    summary.seconds = time.perf_counter() - start
    return summary

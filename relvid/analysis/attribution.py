"""`relvid analyze attribution`: which adapter carries the relation? The same prompts and seeds sampled
with each adapter subset (none, relation + FFN, subjects + FFN, all) and scored with the evaluation's
metrics: the toy judge in the toy world (through relvid.components), the VLM judge of the `judge`
section, or temporal consistency alone."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import numpy as np
from torch import Tensor, nn

from relvid.errors import InputError
from relvid.files import atomic_write

# subset -> the adapters of a triplet it activates ("none" is the base model, "all" every adapter);
# subject1+ffn and subject2+ffn are what a subject step of hybrid mask training trains
SUBSET_ADAPTERS = {"relation+ffn": ("relation", "ffn"), "subjects+ffn": ("subject1", "subject2", "ffn"),
                   "subject1+ffn": ("subject1", "ffn"), "subject2+ffn": ("subject2", "ffn")}


class VideoScorer(Protocol):
    """Metrics of a set of generated videos (fractions or means), for the attribution table."""

    name: str

    def score(self, videos: list[Tensor], prompts: list[str], relation: str) -> dict[str, float]:
        """videos: uint8 (T, H, W, 3), one per prompt."""
        ...


def pixel_consistency(videos: list[Tensor]) -> float:
    """Temporal consistency on raw pixels: mean cosine similarity of consecutive frames."""
    from relvid.eval.metrics import temporal_consistency

    return sum(temporal_consistency(v.float().flatten(1) / 255.0) for v in videos) / len(videos)


class PixelScorer:
    """No judge: temporal consistency only."""

    name = "none"

    def score(self, videos: list[Tensor], prompts: list[str], relation: str) -> dict[str, float]:
        return {"temporal_consistency": pixel_consistency(videos)}


class VLMScorer:
    """Relation accuracy by the `judge` section's VLM (api or local), with the paper's question."""

    def __init__(self, judge_cfg, device, cache: Path) -> None:
        from relvid.eval.evaluate import build_judge

        self.judge = build_judge(judge_cfg, device, default_cache=cache)
        self.repeats = int(judge_cfg.repeats)
        self.name = f"vlm ({self.judge.name})"

    def score(self, videos: list[Tensor], prompts: list[str], relation: str) -> dict[str, float]:
        from relvid.eval.judge import judge_question, judge_videos

        result = judge_videos(self.judge, videos, judge_question(relation), repeats=self.repeats, progress=True)
        return {"relation_accuracy": result["mean"], "temporal_consistency": pixel_consistency(videos)}


def make_scorer(cfg, device, toy_scorer=None) -> VideoScorer:
    """The scorer analyze.judge names; ``toy_scorer`` makes the toy world's (the command line passes it,
    so this module never imports the toy world)."""
    kind = cfg.analyze.judge
    if kind == "auto":
        kind = "toy" if cfg.model.codec == "toy" else ("vlm" if cfg.judge.kind != "none" else "none")
    if kind == "toy":
        if toy_scorer is None:
            raise InputError("analyze.judge=toy: no toy scorer was given (run `relvid analyze attribution`, or "
                             "pass toy_scorer=relvid.commands.toy.toy_video_scorer); use analyze.judge=none")
        return toy_scorer()
    if kind == "vlm":
        if cfg.judge.kind == "none":
            raise InputError("analyze.judge=vlm needs a judge: set judge.kind=api (judge.base_url, judge.model) or "
                             "judge.kind=local (judge.vlm_path)")
        return VLMScorer(cfg.judge, device, Path(cfg.analyze.out) / "judge_cache")
    return PixelScorer()


def subset_adapters(subset: str, spec) -> tuple[str, ...] | None:
    """The adapters a subset activates for a triplet `spec`; None when the subset has no meaning for it
    (a direct LoRA has one adapter: only "all"). The one definition of the subsets, for attribution,
    exemplar-fit and the toy grid's re-sampling with an adapter set."""
    from relvid.models.lora import adapter_names

    if subset == "all":
        return adapter_names(spec)
    if spec.placement == "direct":
        return None
    return SUBSET_ADAPTERS[subset]


def source_labels(sources: list[str]) -> list[str]:
    """Short names of adapter sources (parts.label_of), made unique with as many of their folders as it
    takes: runs/a/seed0/train/adapters and runs/b/seed0/train/adapters are a/seed0 and b/seed0."""
    from relvid.analysis.parts import label_of

    def folders(source: str) -> list[str]:
        return [p for p in Path(source).parts if p not in ("adapters", "checkpoints", "train", "/")
                and not p.endswith((".safetensors", ".ckpt"))]

    labels = [label_of(s) for s in sources]
    for n in range(2, 1 + max((len(folders(s)) for s in sources), default=0)):
        dup = {x for x in labels if labels.count(x) > 1}
        if not dup:
            break
        labels = ["/".join(folders(s)[-n:]) if x in dup else x for s, x in zip(sources, labels, strict=True)]
    return labels


def subset_models(cfg, device, skipped: list[str]) -> Iterator[tuple[str, str, tuple[str, ...], nn.Module]]:
    """(source label, subset, active adapters, model with exactly those adapters on) for every subset of
    analyze.subsets: the base model first ("none"), then each source of analyze.adapters, loaded once.
    Subsets that have no meaning for a source are noted in `skipped` instead."""
    from relvid.analysis.parts import load_model
    from relvid.models.adapter_file import resolve_adapter_file
    from relvid.models.lora import TripletSpec, activate

    an = cfg.analyze
    for source in an.adapters:  # a missing or unknown source is refused before any model runs
        resolve_adapter_file(source)
    if "none" in an.subsets:
        model, _ = load_model(cfg, device)
        yield "base", "none", (), model
        del model
    for source, label in zip(an.adapters, source_labels(list(an.adapters)), strict=True):
        model, info = load_model(cfg, device, source)
        spec = info["adapters"]["spec"]
        for subset in [s for s in an.subsets if s != "none"]:
            if spec is None:  # a diffusers LoRA file holds the inference set only, loaded as it is
                if subset == "relation+ffn":
                    yield label, "inference set (diffusers file)", ("relvid_inference",), model
                else:
                    skipped.append(f"{label}: {subset} (a diffusers LoRA file holds the inference set only)")
                continue
            names = subset_adapters(subset, TripletSpec.from_dict(spec))
            if names is None:
                skipped.append(f"{label}: {subset} (placement {spec['placement']} has one adapter: see 'all')")
                continue
            activate(model, list(names))
            yield label, subset, names, model
        del model


def render(model, codec, encoded: dict, jobs, cfg, desc: str) -> list[Tensor]:
    from tqdm.auto import tqdm

    from relvid.inference.generate import generate_video

    settings = cfg.sampling
    negative = encoded[settings.negative_prompt] if settings.guidance_scale != 1.0 else None
    device = next(model.parameters()).device
    return [generate_video(model, codec, *encoded[job.prompt], negative, job.seed, settings, device=device)
            for job in tqdm(jobs, desc=desc)]


def run(cfg, toy_scorer=None) -> dict[str, Path]:
    from relvid.analysis.figures import number_table, save_png, stack, tile_grid
    from relvid.analysis.parts import device_of
    from relvid.components import encode_texts, load_codec
    from relvid.eval.metrics import keyframe_indices
    from relvid.inference.render import plan_jobs, texts_to_encode
    from relvid.prompts import collect_prompts

    an = cfg.analyze
    device = device_of(cfg)
    prompts = collect_prompts(list(an.prompts), an.prompts_file, cfg.relation)
    jobs = plan_jobs(prompts, list(an.seeds))
    scorer = make_scorer(cfg, device, toy_scorer)
    encoded = encode_texts(cfg.model, texts_to_encode(jobs, cfg.sampling), device)
    codec = load_codec(cfg.model.codec, cfg.model.vae_path or cfg.model.path, device="cpu")
    rows: list[dict] = []
    strips: list[tuple[str, list]] = []

    def add(adapters: str, subset: str, active, model) -> None:
        videos = render(model, codec, encoded, jobs, cfg, desc=f"{adapters}: {subset}")
        metrics = scorer.score(videos, [job.prompt for job in jobs], cfg.relation)
        rows.append({"adapters": adapters, "subset": subset, "active": list(active), **metrics})
        first = videos[0]
        strips.append((f"{adapters}: {subset}", [(f"t={t}", first[t].numpy())
                                                 for t in keyframe_indices(first.shape[0], min(7, first.shape[0]))]))

    skipped: list[str] = []
    for adapters, subset, active, model in subset_models(cfg, device, skipped):
        add(adapters, subset, active, model)
    for note in skipped:
        print(f"skipped {note}")
    out = Path(an.out)
    metrics = [k for k in rows[0] if k not in ("adapters", "subset", "active")] if rows else []
    report = {"relation": cfg.relation, "scorer": scorer.name, "prompts": prompts, "seeds": list(an.seeds),
              "sampling": {k: cfg.sampling[k] for k in ("num_steps", "guidance_scale", "frames", "height", "width")},
              "rows": rows, "skipped": skipped}
    lines = ["| adapters | subset | " + " | ".join(metrics) + " |", "|---|---|" + "---:|" * len(metrics)]
    lines += [f"| {r['adapters']} | {r['subset']} | " + " | ".join(f"{r[m]:.3f}" for m in metrics) + " |"
              for r in rows]
    table = number_table(f"attribution on {len(jobs)} videos per row, scored by {scorer.name}",
                         [f"{r['adapters']}: {r['subset']}" for r in rows], metrics,
                         np.array([[r[m] for m in metrics] for r in rows]))
    return {"json": atomic_write(out / "attribution.json", json.dumps(report, indent=1)),
            "md": atomic_write(out / "attribution.md", "\n".join(lines) + "\n"),
            "png": save_png(stack([table, tile_grid(strips, 64, f"first video: {jobs[0].prompt}")]),
                            out / "attribution.png")}

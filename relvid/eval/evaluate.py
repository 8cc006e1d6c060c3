"""`relvid evaluate`: test videos for one adapter (or baseline), then the paper's metrics and table.

Layout of the output folder (one per relation; several methods share it):
    <out>/<method>/videos/*.mp4 + *.json   the test videos and their sidecars
    <out>/<method>/metrics.json            per-video scores, judge answers, what was skipped
    <out>/results.{md,csv,json}            one row per method evaluated into this folder
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from relvid.inference.generate import SampleSettings
from relvid.inference.render import (
    VideoJob,
    dist_env,
    plan_jobs,
    render_jobs,
    shard,
    sidecar_path,
    wait_for,
)


@dataclass
class JudgeOptions:
    kind: str = "none"  # none | api | local
    base_url: str | None = None
    model: str | None = None
    api_key_env: str = "RELVID_JUDGE_API_KEY"
    timeout_s: float = 60.0
    max_retries: int = 5
    requests_per_minute: float = 60.0
    temperature: float = 1.0
    cache_dir: str | None = None
    vlm_path: str | None = None


@dataclass
class EvalOptions:
    relation: str
    out_dir: Path
    method: str = "Mochi"
    adapters: str | None = None  # None: the base model (the paper's "Mochi" row)
    videos_dir: str | None = None  # evaluate existing videos (with sidecars) instead of generating
    model_cfg: object = None  # a ModelConfig node (model.* of the config schema)
    settings: SampleSettings = field(default_factory=SampleSettings)
    prompts: list[str] | None = None  # default: relvid.prompts.eval_prompts(relation)
    seeds: list[int] = field(default_factory=lambda: [0])
    negative: str = ""
    judge: JudgeOptions = field(default_factory=JudgeOptions)
    repeats: int = 10
    clip_path: str | None = None
    i3d_path: str | None = None
    reference_videos: str | None = None
    fvd_frames: int = 16
    device: str | None = None
    wait_timeout_s: float = 4 * 3600.0


def method_dir(opts: EvalOptions) -> Path:
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", opts.method)
    return Path(opts.out_dir) / safe


def _device(opts: EvalOptions) -> torch.device:
    from relvid.inference.render import default_device

    return torch.device(opts.device) if opts.device else default_device()


def generate_stage(opts: EvalOptions) -> list[Path]:
    """This rank's share of the test videos (skipping finished ones); returns ALL expected paths."""
    from relvid.prompts import eval_prompts

    prompts = opts.prompts or eval_prompts(opts.relation)
    jobs = plan_jobs(prompts, opts.seeds)
    videos = method_dir(opts) / "videos"
    all_paths = [videos / f"{j.stem}.mp4" for j in jobs]
    rank, world, _ = dist_env()
    mine: list[VideoJob] = shard(jobs, rank, world)
    todo = [j for j in mine if not sidecar_path(videos / f"{j.stem}.mp4").is_file()]
    meta = {"relation": opts.relation, "method": opts.method}
    info: dict = {}
    if todo:
        device = _device(opts)
        from relvid.components import load_generation_parts

        transformer, codec, text = load_generation_parts(opts.model_cfg, device)
        if opts.adapters:
            from relvid.inference.adapter_source import apply_adapter_source

            info["adapters"] = apply_adapter_source(transformer, opts.adapters).to_dict()
            meta["adapters_sha256"] = info["adapters"]["sha256"]
        else:
            meta["adapters_sha256"] = None
        # encode every prompt first, then free the text encoder (T5-XXL is ~9 GB)
        texts = sorted({j.prompt for j in todo} | {opts.negative})
        encoded = dict(zip(texts, text.encode(texts), strict=True))
        del text
        if device.type == "cuda":
            torch.cuda.empty_cache()
        render_jobs(mine, videos, transformer, codec, None, opts.settings, negative=opts.negative, device=device,
                    meta=meta, encoded=encoded, info=info)
    elif mine:
        # nothing to render here, but a finished folder made with other settings is still an error
        from relvid.inference.render import is_done

        for j in mine:
            is_done(videos / f"{j.stem}.mp4", {"settings": opts.settings.to_dict(), "negative_prompt": opts.negative})
    return all_paths


def _video_list(opts: EvalOptions, generated: list[Path] | None) -> list[tuple[Path, dict]]:
    if generated is not None:
        files = generated
    else:
        from relvid.eval.fvd import list_videos

        files = list_videos(opts.videos_dir)
    out = []
    for f in files:
        side = sidecar_path(f)
        if not side.is_file():
            raise FileNotFoundError(f"{side} missing: each video needs a JSON sidecar with its 'prompt' (as "
                                    "`relvid sample` writes) for CLIP-T and the judge")
        out.append((f, json.loads(side.read_text(encoding="utf-8"))))
    return out


def build_judge(opts: JudgeOptions, device: torch.device):
    if opts.kind == "api":
        from relvid.eval.api_judge import APIJudge, APIJudgeSettings

        return APIJudge(APIJudgeSettings(base_url=opts.base_url, model=opts.model, api_key_env=opts.api_key_env,
                                         timeout_s=opts.timeout_s, max_retries=opts.max_retries,
                                         requests_per_minute=opts.requests_per_minute,
                                         temperature=opts.temperature, cache_dir=opts.cache_dir))
    if opts.kind == "local":
        from relvid.eval.local_judge import LocalVLMJudge

        return LocalVLMJudge.from_folder(opts.vlm_path, device=device, temperature=opts.temperature)
    raise ValueError(f"judge kind {opts.kind!r}: use api, local or none")


def metrics_stage(opts: EvalOptions, generated: list[Path] | None) -> dict:
    """The metrics of one method's videos; writes <method>/metrics.json and returns the table row."""
    from relvid.eval.judge import judge_question, judge_videos
    from relvid.video_io import read_video

    videos = _video_list(opts, generated)
    device = _device(opts)
    row: dict = {"method": opts.method}
    detail: dict = {"relation": opts.relation, "method": opts.method, "videos": [str(p) for p, _ in videos],
                    "skipped": {}}
    frames = {p: read_video(p) for p, _ in videos}

    if opts.judge.kind == "none":
        detail["skipped"]["relation_accuracy"] = "no judge (--judge api|local)"
    else:
        judge = build_judge(opts.judge, device)
        question = judge_question(opts.relation)
        result = judge_videos(judge, [frames[p] for p, _ in videos], question, repeats=opts.repeats, progress=True)
        row["relation_accuracy"] = {"mean": result["mean"], "std": result["std"]}
        row["unparseable"] = result["unparseable"]
        detail["relation_accuracy"] = {"judge": judge.name, "question": question, "repeats": opts.repeats, **result}

    if opts.clip_path is None:
        detail["skipped"]["clip_t"] = detail["skipped"]["temporal_consistency"] = "no CLIP model (--clip-path)"
    else:
        from relvid.eval.clip_metrics import CLIPFeatures

        clip = CLIPFeatures.from_folder(opts.clip_path, device=device)
        per_video = [clip.video_scores(frames[p], side["prompt"]) for p, side in videos]
        row["clip_t"] = sum(v["clip_t"] for v in per_video) / len(per_video)
        row["temporal_consistency"] = sum(v["temporal_consistency"] for v in per_video) / len(per_video)
        detail["clip"] = {"model": str(opts.clip_path), "per_video": per_video}

    if opts.i3d_path is None or opts.reference_videos is None:
        detail["skipped"]["fvd"] = "needs --i3d-path and --reference-videos"
    else:
        from relvid.eval.fvd import I3DFeatures, fvd, list_videos

        i3d = I3DFeatures(opts.i3d_path, device=device, num_frames=opts.fvd_frames)
        reference = list_videos(opts.reference_videos)
        row["fvd"] = fvd(i3d, [p for p, _ in videos], reference)
        detail["fvd"] = {"i3d": str(opts.i3d_path), "reference": str(opts.reference_videos),
                         "reference_count": len(reference), "frames": opts.fvd_frames}
    row["videos"] = len(videos)
    out = method_dir(opts)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps({"row": row, **detail}, indent=2) + "\n", encoding="utf-8")
    return row


def update_results(out_dir: str | os.PathLike, row: dict) -> dict[str, Path]:
    """Add (or replace) the method's row in <out>/results.json and rewrite the three tables."""
    from relvid.eval.report import write_results

    path = Path(out_dir) / "results.json"
    rows = json.loads(path.read_text(encoding="utf-8"))["rows"] if path.is_file() else []
    rows = [r for r in rows if r["method"] != row["method"]] + [row]
    return write_results(rows, out_dir)


def evaluate(opts: EvalOptions) -> dict[str, Path] | None:
    """Generate (sharded, resumable) then measure on rank zero; returns the table paths (None off rank zero)."""
    generated = None
    if opts.videos_dir is None:
        generated = generate_stage(opts)
    rank, world, _ = dist_env()
    if rank != 0:
        return None
    if generated is not None and world > 1:
        wait_for(generated, opts.wait_timeout_s)
    return update_results(opts.out_dir, metrics_stage(opts, generated))

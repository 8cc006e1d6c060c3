"""`relvid evaluate`: test videos for one adapter (or baseline), then the paper's metrics and table.

Layout of the output folder (one per relation; several methods share it):
    <out>/<method>/videos/*.mp4 + *.json   the test videos and their sidecars
    <out>/<method>/metrics.json            per-video scores, judge answers, what was skipped
    <out>/<method>/config.yaml             the resolved config of the last evaluation
    <out>/results.{md,csv,json}            one row per method evaluated into this folder
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from omegaconf import OmegaConf

from relvid.errors import InputError, InputNotFoundError
from relvid.files import atomic_write
from relvid.inference.render import (
    VideoJob,
    adapters_sha256,
    base_weights,
    dist_env,
    pending,
    plan_jobs,
    read_sidecar,
    render_jobs,
    shard,
    sidecar_path,
    wait_for,
)


def method_name(cfg) -> str:
    """The table row's name: evaluate.method, else Mochi for the base model, else the adapters' (or
    videos') folder name, and the run's name for a run's adapters/ folder."""
    ev = cfg.evaluate
    if ev.method:
        return str(ev.method)
    if ev.base:
        return "Mochi"
    source = Path(str(ev.videos or evaluate_adapters(cfg)))
    return source.resolve().parent.name if source.name == "adapters" and not ev.videos else source.name


def evaluate_adapters(cfg) -> str | None:
    """The adapters under evaluation (as for `relvid sample`); None for the base model or existing videos."""
    from relvid.inference.render import choose_adapters

    ev = cfg.evaluate
    if ev.videos:
        if ev.adapters or ev.base:
            raise InputError("evaluate.videos evaluates existing videos: drop --adapters/--base")
        return None
    return choose_adapters(ev.base, ev.adapters, cfg.output_dir, cfg.relation)


def method_dir(cfg) -> Path:
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", method_name(cfg))
    return Path(cfg.evaluate.out) / safe


def _device(cfg) -> torch.device:
    from relvid.inference.render import default_device

    return torch.device(cfg.evaluate.device) if cfg.evaluate.device else default_device()


def _jobs_and_meta(cfg) -> tuple[list[VideoJob], dict]:
    """Every test video's job, and what all of them share (recorded in and checked against each
    sidecar): relation, method, adapters' sha256 and base weights; settings are added by render."""
    from relvid.prompts import collect_prompts

    ev = cfg.evaluate
    jobs = plan_jobs(collect_prompts(ev.prompts, ev.prompts_file, cfg.relation), list(ev.seeds))
    meta = {"relation": cfg.relation, "method": method_name(cfg),
            "adapters_sha256": adapters_sha256(evaluate_adapters(cfg)), "base_weights": base_weights(cfg.model)}
    return jobs, meta


def generate_stage(cfg) -> list[Path]:
    """This rank's share of the test videos (reusing finished ones whose sidecar matches, refusing
    ones made otherwise); returns ALL expected paths."""
    settings = cfg.sampling
    adapters = evaluate_adapters(cfg)
    jobs, meta = _jobs_and_meta(cfg)
    videos = method_dir(cfg) / "videos"
    all_paths = [videos / f"{j.stem}.mp4" for j in jobs]
    rank, world, _ = dist_env()
    mine: list[VideoJob] = shard(jobs, rank, world)
    # checked before any model is loaded: a folder made with other adapters/weights/settings fails at once
    todo = [j for j, _ in pending(mine, videos, settings, meta)]
    info: dict = {}
    if todo:
        device = _device(cfg)
        from relvid.components import load_generation_parts
        from relvid.inference.render import encode_prompts

        # every prompt first (with a ReVersion token in place, when the adapters hold one), then T5 (~9 GB)
        # is freed before the transformer loads
        encoded = encode_prompts(cfg.model, sorted({j.prompt for j in todo} | {settings.negative_prompt}), device,
                                 adapters)
        transformer, codec, _ = load_generation_parts(cfg.model, device, speed=cfg.speed, text_encoder=False)
        if adapters:
            from relvid.models.adapter_file import apply_adapter_source

            info["adapters"] = apply_adapter_source(transformer, adapters).to_dict()
            if info["adapters"]["sha256"] != meta["adapters_sha256"]:
                raise InputError(f"{adapters} changed while it was loaded; run `relvid evaluate` again")
        render_jobs(mine, videos, transformer, codec, None, settings, device=device, meta=meta, encoded=encoded,
                    info=info)
    return all_paths


def check_all_videos(cfg) -> None:
    """Rank zero, once every rank is done: every test video's sidecar matches this evaluation (so
    another rank's leftovers from another experiment are never measured)."""
    jobs, meta = _jobs_and_meta(cfg)
    missing = pending(jobs, method_dir(cfg) / "videos", cfg.sampling, meta)
    if missing:
        raise InputNotFoundError(f"{len(missing)} test videos missing after waiting, e.g. {missing[0][1]}; rerun "
                                "`relvid evaluate` (finished videos are kept)")


def _video_list(cfg, generated: list[Path] | None) -> list[tuple[Path, dict]]:
    if generated is not None:
        files = generated
    else:
        from relvid.eval.fvd import list_videos

        files = list_videos(cfg.evaluate.videos)
    out = []
    for f in files:
        side = sidecar_path(f)
        if not side.is_file():
            raise InputNotFoundError(f"{side} missing: each video needs a JSON sidecar with its 'prompt' (as "
                                    "`relvid sample` writes) for CLIP-T and the judge")
        out.append((f, read_sidecar(side, required=("prompt",))))
    return out


def build_judge(judge, device: torch.device, default_cache: Path):
    """The judge a JudgeConfig describes; the API judge's answers are cached (default: ``default_cache``)."""
    if judge.kind == "api":
        from relvid.eval.api_judge import APIJudge

        if not judge.cache_dir:
            judge = OmegaConf.merge(judge, {"cache_dir": str(default_cache)})
        return APIJudge(judge)
    if judge.kind == "local":
        from relvid.eval.local_judge import LocalVLMJudge

        return LocalVLMJudge.from_folder(judge.vlm_path, device=device, temperature=judge.temperature)
    raise InputError(f"judge.kind {judge.kind!r}: use api, local or none")


def metrics_stage(cfg, generated: list[Path] | None) -> dict:
    """The metrics of one method's videos; writes <method>/metrics.json and returns the table row."""
    from relvid.eval.judge import NUM_KEYFRAMES as MIN_FRAMES  # 5 distinct keyframes; CLIP needs >= 2
    from relvid.eval.judge import judge_question, judge_videos
    from relvid.video_io import read_video

    ev, method = cfg.evaluate, method_name(cfg)
    videos = _video_list(cfg, generated)
    device = _device(cfg)
    row: dict = {"method": method}
    detail: dict = {"relation": cfg.relation, "method": method, "videos": [str(p) for p, _ in videos],
                    "skipped": {}}
    frames = {p: read_video(p) for p, _ in videos}
    short = [f"{p} ({frames[p].shape[0]} frame{'s' if frames[p].shape[0] != 1 else ''})" for p, _ in videos
             if frames[p].shape[0] < MIN_FRAMES]
    if short:
        raise InputError(f"{len(short)} video(s) too short to score (the metrics need >= {MIN_FRAMES} frames): "
                         f"{', '.join(short[:3])}{', ...' if len(short) > 3 else ''}")

    if cfg.judge.kind == "none":
        detail["skipped"]["relation_accuracy"] = "no judge (judge.kind=api|local)"
    else:
        judge = build_judge(cfg.judge, device, default_cache=Path(ev.out) / "judge_cache")
        question = judge_question(cfg.relation)
        repeats = int(cfg.judge.repeats)
        result = judge_videos(judge, [frames[p] for p, _ in videos], question, repeats=repeats, progress=True)
        row["relation_accuracy"] = {"mean": result["mean"], "std": result["std"]}
        row["unparseable"] = result["unparseable"]
        detail["relation_accuracy"] = {"judge": judge.name, "question": question, "repeats": repeats, **result}

    if ev.clip_path is None:
        detail["skipped"]["clip_t"] = detail["skipped"]["temporal_consistency"] = "no CLIP model (--clip-path)"
    else:
        from relvid.eval.clip_metrics import CLIPFeatures

        clip = CLIPFeatures.from_folder(ev.clip_path, device=device)
        per_video = [clip.video_scores(frames[p], side["prompt"]) for p, side in videos]
        row["clip_t"] = sum(v["clip_t"] for v in per_video) / len(per_video)
        row["temporal_consistency"] = sum(v["temporal_consistency"] for v in per_video) / len(per_video)
        detail["clip"] = {"model": str(ev.clip_path), "per_video": per_video}

    if ev.i3d_path is None or ev.reference_videos is None:
        detail["skipped"]["fvd"] = "needs --i3d-path and --reference-videos"
    else:
        from relvid.eval.fvd import I3DFeatures, fvd, list_videos

        i3d = I3DFeatures(ev.i3d_path, device=device, num_frames=ev.fvd_frames)
        reference = list_videos(ev.reference_videos)
        row["fvd"] = fvd(i3d, [p for p, _ in videos], reference)
        detail["fvd"] = {"i3d": str(ev.i3d_path), "reference": str(ev.reference_videos),
                         "reference_count": len(reference), "frames": ev.fvd_frames}
    row["videos"] = len(videos)
    out = method_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "metrics.json", json.dumps({"row": row, **detail}, indent=2) + "\n")
    return row


def update_results(out_dir: str | os.PathLike, row: dict) -> dict[str, Path]:
    """Add (or replace) the method's row in <out>/results.json and rewrite the three tables."""
    from relvid.eval.report import write_results

    path = Path(out_dir) / "results.json"
    rows = json.loads(path.read_text(encoding="utf-8"))["rows"] if path.is_file() else []
    rows = [r for r in rows if r["method"] != row["method"]] + [row]
    return write_results(rows, out_dir)


def evaluate(cfg) -> dict[str, Path] | None:
    """`relvid evaluate`: generate (sharded, resumable), then measure on rank zero; returns the table
    paths (None off rank zero). ``cfg``: the resolved config (relation, model, sampling, judge, evaluate)."""
    from relvid.config import save_config

    ev = cfg.evaluate
    if cfg.judge.kind == "api" and not (cfg.judge.base_url and cfg.judge.model):
        raise InputError("judge.kind=api needs judge.base_url (e.g. http://localhost:8000/v1) and judge.model "
                         "(--judge-url, --judge-model)")
    if cfg.judge.kind == "local" and not cfg.judge.vlm_path:
        raise InputError("judge.kind=local needs judge.vlm_path (a local Qwen2.5-VL folder)")
    generated = None if ev.videos else generate_stage(cfg)
    rank, world, _ = dist_env()
    if rank != 0:
        return None
    save_config(cfg, method_dir(cfg) / "config.yaml", command="evaluate")
    if generated is not None and world > 1:
        wait_for(generated, ev.wait_timeout_s)
        check_all_videos(cfg)
    return update_results(ev.out, metrics_stage(cfg, generated))

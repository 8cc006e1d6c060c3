"""Render many (prompt, seed) videos to mp4 + JSON sidecars: sharded over ranks, resumable.

A video counts as done when its sidecar exists (written after the mp4 is in place), so an
interrupted run resumes where it stopped. A sidecar made with other settings or other adapters
is an error, not a silent mix of two experiments.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from relvid.config import SamplingConfig
from relvid.errors import UserError
from relvid.files import atomic_write
from relvid.inference.generate import generate_video, sampling_record
from relvid.models.codecs import Codec
from relvid.models.text_encoders import TextEncoder


class RenderMismatchError(UserError, ValueError):
    """Existing videos in the output folder were made with different settings or adapters."""


@dataclass(frozen=True)
class VideoJob:
    index: int  # the prompt's position in the prompt list
    prompt: str
    seed: int

    @property
    def stem(self) -> str:
        words = re.sub(r"[^a-z0-9]+", "_", self.prompt.lower()).strip("_")[:48]
        return f"p{self.index:03d}_s{self.seed}_{words}"


def plan_jobs(prompts: list[str], seeds: list[int]) -> list[VideoJob]:
    """Every prompt with every seed, prompt-major."""
    if not prompts or not seeds:
        raise ValueError("nothing to render: give at least one prompt and one seed")
    return [VideoJob(i, p, int(s)) for i, p in enumerate(prompts) for s in seeds]


def dist_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) otherwise."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def default_device() -> torch.device:
    _, _, local_rank = dist_env()
    return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")


def shard(jobs: list, rank: int, world: int) -> list:
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is outside world size {world}")
    return jobs[rank::world]


def sidecar_path(video: Path) -> Path:
    return video.with_suffix(".json")


def is_done(video: Path, expected: dict) -> bool:
    """True when the video and its sidecar exist and the sidecar matches `expected` on its keys."""
    side = sidecar_path(video)
    if not (video.is_file() and side.is_file()):
        return False
    meta = json.loads(side.read_text(encoding="utf-8"))
    for key, value in expected.items():
        if meta.get(key) != value:
            raise RenderMismatchError(
                f"{side}: made with {key}={meta.get(key)!r}, now asked for {value!r}; use a new output folder "
                "(or delete the old videos) instead of mixing two settings")
    return True


def render_jobs(jobs: list[VideoJob], out_dir: str | os.PathLike, transformer: nn.Module, codec: Codec,
                text_encoder: TextEncoder | None, settings: SamplingConfig, device: str | torch.device = "cpu",
                meta: dict | None = None, progress: bool = True, encoded: dict | None = None,
                info: dict | None = None) -> list[Path]:
    """Render the jobs not done yet; returns every job's mp4 path (done before or now).

    `meta` (e.g. the adapter file's hash) goes into every sidecar and must match existing ones;
    `info` (e.g. where the adapter file was) goes into new sidecars unchecked.
    `encoded` may hold precomputed text -> (embeds, mask); otherwise text_encoder encodes.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    negative = settings.negative_prompt
    expected = {"settings": sampling_record(settings), "negative_prompt": negative, **(meta or {})}
    expected = json.loads(json.dumps(expected))  # the form it takes in a sidecar (tuples -> lists)
    paths = [out / f"{job.stem}.mp4" for job in jobs]
    todo = [(job, path) for job, path in zip(jobs, paths, strict=True) if not is_done(path, expected)]
    if not todo:
        return paths
    texts = sorted({job.prompt for job, _ in todo} | ({negative} if settings.guidance_scale != 1.0 else set()))
    encoded = dict(encoded or {})
    missing = [t for t in texts if t not in encoded]
    if missing:
        if text_encoder is None:
            raise ValueError(f"no text encoder and no embeddings for {missing[:3]}")
        encoded.update(zip(missing, text_encoder.encode(missing), strict=True))
    neg = encoded[negative] if settings.guidance_scale != 1.0 else None
    for job, path in tqdm(todo, desc="videos", disable=not progress):
        t0 = time.time()
        embeds, mask = encoded[job.prompt]
        frames = generate_video(transformer, codec, embeds, mask, neg, seed=job.seed, settings=settings, device=device)
        from relvid.video_io import write_mp4

        write_mp4(path, frames, fps=settings.fps)
        sidecar = {**expected, **(info or {}), "prompt": job.prompt, "prompt_index": job.index, "seed": job.seed,
                   "seconds": round(time.time() - t0, 2), "device": str(device)}
        atomic_write(sidecar_path(path), json.dumps(sidecar, indent=2))
    return paths


def sample_videos(cfg) -> list[Path]:
    """`relvid sample`: load the model (and the adapters, unless sample.base) and render every prompt x seed.

    ``cfg`` is the resolved config (relation, output_dir, model, sampling, sample)."""
    from relvid.components import load_generation_parts

    opts = cfg.sample
    adapters = choose_adapters(opts.base, opts.adapters, cfg.output_dir, cfg.relation)
    prompts = read_prompts(opts.prompts, opts.prompts_file, cfg.relation)
    device = torch.device(opts.device) if opts.device else default_device()
    transformer, codec, text = load_generation_parts(cfg.model, device)
    meta: dict = {"adapters_sha256": None}
    info: dict = {"model_path": cfg.model.path}
    if adapters:
        from relvid.models.adapter_file import apply_adapter_source

        source = apply_adapter_source(transformer, adapters)
        meta["adapters_sha256"] = source.sha256
        info["adapters"] = source.to_dict()
        print(f"adapters: {source.path} ({source.kind}, sha256 {source.sha256[:12]}); relation + ffn active")
    else:
        print("--base: sampling the base model without adapters")
    from relvid.config import save_config

    save_config(cfg, Path(opts.out) / "config.yaml", command="sample")
    return render_jobs(plan_jobs(prompts, list(opts.seeds)), opts.out, transformer, codec, text, cfg.sampling,
                       device=device, meta=meta, info=info)


def choose_adapters(base: bool, adapters: str | None, output_dir: str, relation: str) -> str | None:
    """The adapters to load: ``adapters``, else the relation's run (<output_dir>/adapters); None for
    the base model (``base``)."""
    if base:
        if adapters:
            raise ValueError("--base (base=true) uses the model without adapters: drop --adapters or --base")
        return None
    if adapters:
        return str(adapters)
    default = Path(output_dir) / "adapters"
    if not default.is_dir():
        raise FileNotFoundError(f"no adapters given and {default} (the run of relation {relation}) does not "
                                "exist: pass --adapters <.ckpt | adapters folder | LoRA file>, or --base")
    return str(default)


def read_prompts(prompts, prompts_file: str | None, relation: str) -> list[str]:
    """The listed prompts, then the file's lines; neither: the relation's ten evaluation prompts."""
    out = list(prompts or [])
    if prompts_file:
        path = Path(prompts_file)
        if not path.is_file():
            raise FileNotFoundError(f"prompts_file {path} not found")
        out += [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if out:
        return out
    from relvid.prompts import eval_prompts

    return eval_prompts(relation)


def wait_for(paths: list[Path], timeout_s: float, poll_s: float = 5.0) -> None:
    """Block until every video's sidecar exists (other ranks finishing their shards)."""
    deadline = time.monotonic() + timeout_s
    missing = [p for p in paths if not sidecar_path(p).is_file()]
    with tqdm(total=len(paths), initial=len(paths) - len(missing), desc="waiting for other ranks") as bar:
        while missing:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(missing)} videos still missing after {timeout_s:.0f} s, e.g. {missing[0]}; "
                                   "rerun `relvid evaluate` when the other ranks are done (finished videos are kept)")
            time.sleep(poll_s)
            still = [p for p in missing if not sidecar_path(p).is_file()]
            bar.update(len(missing) - len(still))
            missing = still

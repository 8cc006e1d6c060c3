"""Render many (prompt, seed) videos to mp4 + JSON sidecars: sharded over ranks, resumable.

A video counts as done when its sidecar exists (written after the mp4 is in place), so an
interrupted run resumes where it stopped. Each sidecar records everything that defines its video:
the full prompt, the seed, the sampling settings and negative prompt, the adapters' sha256 and
the base weights' identity. A rerun reuses a video only when all of these match; a sidecar that
differs is refused (never re-rendered over), not a silent mix of two experiments.
"""

from __future__ import annotations

import hashlib
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
from relvid.errors import InputError, InputNotFoundError, UserError
from relvid.files import atomic_write
from relvid.inference.generate import generate_video, sampling_record
from relvid.models.codecs import Codec
from relvid.models.text_encoders import TextEncoder
from relvid.prompts import collect_prompts


class RenderMismatchError(UserError, ValueError):
    """Existing videos in the output folder were made with different settings, adapters, weights or prompt."""


class SidecarError(UserError, ValueError):
    """A video's JSON sidecar is unreadable or lacks a key relvid needs."""


@dataclass(frozen=True)
class VideoJob:
    index: int  # the prompt's position in the prompt list
    prompt: str
    seed: int

    @property
    def stem(self) -> str:
        """p<index>_s<seed>_<prompt's first words>_<hash of the full prompt>: unique per full prompt."""
        words = re.sub(r"[^a-z0-9]+", "_", self.prompt.lower()).strip("_")[:48]
        return f"p{self.index:03d}_s{self.seed}_{words}_{prompt_hash(self.prompt)}"


def prompt_hash(prompt: str) -> str:
    """8 hex digits of the full prompt's sha256: tells apart prompts that share their first words."""
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:8]


def plan_jobs(prompts: list[str], seeds: list[int]) -> list[VideoJob]:
    """Every prompt with every seed, prompt-major."""
    if not prompts or not seeds:
        raise InputError("nothing to render: give at least one prompt and one seed")
    return [VideoJob(i, p, int(s)) for i, p in enumerate(prompts) for s in seeds]


def dist_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) otherwise."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def default_device() -> torch.device:
    _, _, local_rank = dist_env()
    return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")


def shard(jobs: list, rank: int, world: int) -> list:
    if not 0 <= rank < world:
        raise InputError(f"RANK={rank} is outside WORLD_SIZE={world} (set by the launcher): check the environment")
    return jobs[rank::world]


def sidecar_path(video: Path) -> Path:
    return video.with_suffix(".json")


def read_sidecar(side: Path, required: tuple[str, ...] = ()) -> dict:
    """A sidecar's JSON object, checked to hold the ``required`` keys."""
    try:
        meta = json.loads(side.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SidecarError(f"{side} is not valid JSON ({err}): fix or delete it (and its video)") from None
    if not isinstance(meta, dict):
        raise SidecarError(f"{side} holds a {type(meta).__name__}, not a JSON object: fix or delete it")
    missing = [k for k in required if k not in meta]
    if missing:
        raise SidecarError(f"{side} lacks the key(s) {', '.join(map(repr, missing))}: add them (e.g. "
                           '{"prompt": "<the video\'s prompt>"}) or delete the video and its sidecar')
    return meta


def job_record(expected: dict, job: VideoJob) -> dict:
    """`expected` (what every video of the run shares) plus what this job alone defines."""
    return {**expected, "prompt": job.prompt, "seed": job.seed}


def is_done(video: Path, expected: dict) -> bool:
    """True when the video and its sidecar exist and the sidecar matches `expected` on its keys.

    A sidecar that differs on any key is refused with a RenderMismatchError (the video is never
    re-rendered over: it may be another experiment's result)."""
    side = sidecar_path(video)
    if not side.is_file():
        return False
    meta = read_sidecar(side)
    for key, value in expected.items():
        if meta.get(key) != value:
            old = meta[key] if key in meta else "(not recorded)"
            raise RenderMismatchError(
                f"{video.parent}: {video.name} was made with {key}={old!r}, this run asks for {key}={value!r}; "
                "refusing to reuse or re-render over it (it belongs to another experiment): write to another "
                "folder (--out, or --method for `relvid evaluate`), or delete the old videos first")
    return video.is_file()


def expected_record(settings: SamplingConfig, meta: dict | None = None) -> dict:
    """What every video of a run shares, in the form it takes in a sidecar (tuples -> lists)."""
    record = {"settings": sampling_record(settings), "negative_prompt": settings.negative_prompt, **(meta or {})}
    return json.loads(json.dumps(record))


def pending(jobs: list[VideoJob], out_dir: str | os.PathLike, settings: SamplingConfig,
            meta: dict | None = None) -> list[tuple[VideoJob, Path]]:
    """The jobs still to render in ``out_dir``; raises RenderMismatchError on any video made otherwise."""
    out = Path(out_dir)
    expected = expected_record(settings, meta)
    todo = []
    for job in jobs:
        path = out / f"{job.stem}.mp4"
        if not is_done(path, job_record(expected, job)):
            todo.append((job, path))
    return todo


def base_weights(model_cfg) -> str:
    """The base transformer's identity, recorded as every sidecar's "base_weights": the tiny preset's
    architecture and init seed, or ``weights_identity`` of the model.path folder."""
    if model_cfg.preset == "tiny":
        from omegaconf import OmegaConf

        tiny = OmegaConf.to_container(model_cfg.tiny, resolve=True) if OmegaConf.is_config(model_cfg.tiny) \
            else dict(model_cfg.tiny)
        return f"tiny preset {json.dumps(tiny, sort_keys=True)}"
    from relvid.models.backbone import find_transformer_folder
    from relvid.models.weights import weights_identity

    return weights_identity(find_transformer_folder(model_cfg.path))


def adapters_sha256(adapters: str | None) -> str | None:
    """The sha256 of the adapter file ``adapters`` resolves to (None for the base model), read
    before any model is loaded."""
    if not adapters:
        return None
    from relvid.models.adapter_file import file_sha256, resolve_adapter_file

    return file_sha256(resolve_adapter_file(adapters)[0])


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
    expected = expected_record(settings, meta)
    paths = [out / f"{job.stem}.mp4" for job in jobs]
    todo = pending(jobs, out, settings, meta)
    if not todo:
        return paths
    texts = texts_to_encode([job for job, _ in todo], settings)
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
        sidecar = {**(info or {}), **job_record(expected, job), "prompt_index": job.index,
                   "seconds": round(time.time() - t0, 2), "device": str(device)}
        atomic_write(sidecar_path(path), json.dumps(sidecar, indent=2))
    return paths


def texts_to_encode(jobs: list[VideoJob], settings: SamplingConfig) -> list[str]:
    """The prompts of `jobs`, and the negative prompt when guidance is on: what the text encoder must embed."""
    return sorted({job.prompt for job in jobs} | ({settings.negative_prompt} if settings.guidance_scale != 1.0
                                                  else set()))


def encode_prompts(model_cfg, texts: list[str], device, adapters: str | None = None) -> dict[str, tuple]:
    """text -> (embeds, mask) on the CPU by the model's text encoder, loaded for this call only. With a
    ReVersion token among ``adapters`` (its file, a run's adapters/ folder or .ckpt), the prompts are
    encoded with the learned token in place (write it in them: "A dog is <R> a cat.")."""
    from relvid.components import encode_texts, free_memory, load_text_encoder

    learned = None
    if adapters and texts:
        from relvid.models.adapter_file import read_reversion

        learned = read_reversion(adapters)
    if learned is None:
        return encode_texts(model_cfg, texts, device)
    from relvid.models.reversion import encode_with_token

    spec, state = learned
    encoder = load_text_encoder(model_cfg.text_encoder, model_cfg.text_encoder_path or model_cfg.path,
                                device=str(device))
    try:
        outputs = encode_with_token(encoder, list(texts), spec, state)
    finally:
        del encoder
        free_memory(device)
    return {t: (e.cpu(), m.cpu()) for t, (e, m) in zip(texts, outputs, strict=True)}


def sample_videos(cfg) -> list[Path]:
    """`relvid sample`: load the model (and the adapters, unless sample.base) and render every prompt x seed.

    ``cfg`` is the resolved config (relation, output_dir, model, sampling, sample)."""
    from relvid.components import load_generation_parts

    opts = cfg.sample
    adapters = choose_adapters(opts.base, opts.adapters, cfg.output_dir, cfg.relation)
    prompts = collect_prompts(opts.prompts, opts.prompts_file, cfg.relation)
    device = torch.device(opts.device) if opts.device else default_device()
    jobs = plan_jobs(prompts, list(opts.seeds))
    # what defines the videos, known before any model is loaded: a folder made otherwise is refused at once
    meta: dict = {"adapters_sha256": adapters_sha256(adapters), "base_weights": base_weights(cfg.model)}
    todo = pending(jobs, opts.out, cfg.sampling, meta)
    # the prompts first, then the text encoder is freed: T5-XXL never shares the GPU with the transformer
    encoded = encode_prompts(cfg.model, texts_to_encode([job for job, _ in todo], cfg.sampling), device, adapters)
    transformer, codec, _ = load_generation_parts(cfg.model, device, speed=cfg.speed, text_encoder=False)
    info: dict = {"model_path": cfg.model.path}
    if adapters:
        from relvid.models.adapter_file import apply_adapter_source
        from relvid.models.motion_inversion import MotionSpec

        source = apply_adapter_source(transformer, adapters)
        if source.sha256 != meta["adapters_sha256"]:
            raise InputError(f"{source.path} changed while it was loaded; run `relvid sample` again")
        info["adapters"] = source.to_dict()
        from relvid.models.reversion import ReVersionSpec

        active = ("motion embeddings, value debiased" if isinstance(source.spec, MotionSpec)
                  else f"relation token {source.spec.token} in the prompts" if isinstance(source.spec, ReVersionSpec)
                  else "relation + ffn active")
        print(f"adapters: {source.path} ({source.kind}, sha256 {source.sha256[:12]}); {active}")
    else:
        print("--base: sampling the base model without adapters")
    from relvid.config import save_config

    save_config(cfg, Path(opts.out) / "config.yaml", command="sample")
    return render_jobs(jobs, opts.out, transformer, codec, None, cfg.sampling, device=device, meta=meta, info=info,
                       encoded=encoded)


def choose_adapters(base: bool, adapters: str | None, output_dir: str, relation: str) -> str | None:
    """The adapters to load: ``adapters``, else the relation's run (<output_dir>/adapters); None for
    the base model (``base``)."""
    if base:
        if adapters:
            raise InputError("--base (base=true) uses the model without adapters: drop --adapters or --base")
        return None
    if adapters:
        return str(adapters)
    default = Path(output_dir) / "adapters"
    if not default.is_dir():
        raise InputNotFoundError(f"no adapters given and {default} (the run of relation {relation}) does not "
                                "exist: pass --adapters <.ckpt | adapters folder | LoRA file>, or --base")
    return str(default)


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

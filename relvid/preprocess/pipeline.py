"""The preprocessing driver: sources -> clips -> masks -> latents + embeddings -> the clip cache.

Each clip is written atomically as soon as it is done; a rerun skips the clips the manifest lists;
a clip that cannot be cached (too short, no skeleton, undecodable ...) is recorded with its reason
in the manifest and the run goes on. Prompt embeddings for previews and evaluation (and the empty
negative prompt) are written in the same pass, so training never loads the text encoder.

On a GPU the models take turns: the text encoder embeds every text first and is freed, then the mask
models (Grounded-SAM) and the VAE share the device clip by clip, each moved to the CPU while the other
works, so peak GPU memory is that of the largest model, not their sum.
"""

from __future__ import annotations

import functools
import gc
import os
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from relvid import relations
from relvid.data.cache import MANIFEST_NAME, CacheError, ClipCache
from relvid.errors import InputError, UserError
from relvid.models.codecs import Codec
from relvid.models.text_encoders import TextEncoder
from relvid.preprocess.encode import PreparedClip, encode_clip, prepare_video_clip
from relvid.preprocess.masks import MaskMaker, make_masks
from relvid.preprocess.sources import Source
from relvid.preprocess.video import ClipSpec, load_clip
from relvid.preprocess.windows import WindowPlanner, WindowSettings, clip_ids


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
    """The canonical name of a known relation, or a custom relation's name in the same form
    (``High five`` -> ``high_five``)."""
    if relations.is_known(relation):
        return relations.resolve(relation).name
    name = relation.strip().lower().replace("-", "_").replace(" ", "_")
    if not re.fullmatch(r"[a-z0-9][a-z0-9_]*", name):
        raise InputError(f"relation name {relation!r}: use letters, digits, spaces, '-' or '_' (e.g. high_five)")
    return name


def preview_prompts(relation: str, extra: list[str] | tuple[str, ...] = ()) -> list[str]:
    """The relation's evaluation prompts (when it has some), the user's extra prompts, and ``""``."""
    prompts: list[str] = []
    if relations.is_known(relation):
        from relvid.prompts import eval_prompts

        prompts += eval_prompts(relation)
    prompts += [p for p in extra if p]
    prompts.append("")  # the negative prompt of classifier-free guidance
    return list(dict.fromkeys(prompts))


def plan(sources: list[Source], cache_root: str | Path,
         windows: WindowSettings | None = None) -> list[tuple[Source, str, str]]:
    """(source, clip id, "cached" | "todo") per clip (one per window of each source), without loading anything
    heavy (for --dry-run)."""
    windows = windows or WindowSettings()
    root = Path(cache_root)
    cache = ClipCache(root) if (root / "manifest.json").is_file() else None
    return [(s, cid, "cached" if cache is not None and cache.is_done(cid) else "todo")
            for s in sources for cid in clip_ids(s, windows)]


@dataclass(frozen=True)
class ClipJob:
    """One clip to cache: its id, caption and relation, where it comes from, and how to prepare it."""

    clip_id: str
    caption: str
    relation: str
    origin: str  # the clip's "source" (a video path, toy:<seed>:<relation>:<index>); failures are keyed by it
    prepare: Callable[[], PreparedClip]
    meta: dict[str, str] = field(default_factory=dict)  # more metadata for the clip file (window: how it was chosen)
    one_of_several: bool = False  # one of several clips (windows) of the same origin


class EmbeddedTexts:
    """A TextEncoder that serves embeddings made beforehand, so that the real encoder (T5-XXL, ~9 GB) can
    be freed before the VAE and the mask models need the GPU."""

    def __init__(self, encoder: TextEncoder, texts: list[str]) -> None:
        self.name, self.dim = encoder.name, encoder.dim
        texts = list(dict.fromkeys(texts))
        self._table = dict(zip(texts, encoder.encode(texts), strict=True)) if texts else {}

    def encode(self, texts: list[str]) -> list[tuple]:
        missing = [t for t in texts if t not in self._table]
        if missing:
            raise LookupError(f"texts not embedded beforehand: {missing[:3]}")
        return [self._table[t] for t in texts]


def free_device_memory(device: str) -> None:
    """Collect what was just dropped and, on a GPU, return its memory to the pool for the next model."""
    gc.collect()
    import torch

    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        torch.cuda.empty_cache()


class DeviceTurns:
    """Models that take turns on one device: the one about to work is moved there and the one there
    before goes to the CPU first. On the CPU nothing moves."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.current: object | None = None

    @staticmethod
    def modules(component: object) -> list:
        """The torch modules a component holds (MochiCodec.vae, GroundedSam.detector and .sam, ...)."""
        import torch

        return [v for v in vars(component).values() if isinstance(v, torch.nn.Module)]

    def use(self, component: object) -> None:
        if self.device == "cpu" or component is self.current or not self.modules(component):
            return  # a weight-free component (skeleton masks, mask files, the toy codec) needs no turn
        if self.current is not None:
            for module in self.modules(self.current):
                module.to("cpu")
            free_device_memory(self.device)
        for module in self.modules(component):
            module.to(self.device)
        self.current = component


class _MakerOnTurn:
    """A MaskMaker that takes its turn on the device each time it masks a clip."""

    def __init__(self, maker: MaskMaker, turns: DeviceTurns) -> None:
        self.maker, self.turns, self.name = maker, turns, maker.name

    def available(self, source: Source) -> str | None:
        return self.maker.available(source)

    def __call__(self, source: Source, clip):
        self.turns.use(self.maker)
        return self.maker(source, clip)


def write_clips(cache: ClipCache, jobs: list[ClipJob], codec: Codec, text_encoder: TextEncoder,
                spatial_rule: str = "any", latent_dtype: str = "bf16", progress: bool = True,
                desc: str = "preprocess", turns: DeviceTurns | None = None) -> Summary:
    """The one cache writer: every job not cached yet is prepared, encoded and added (atomically,
    one clip at a time); a clip that fails is recorded in the manifest with its reason and the others
    go on. With ``turns`` the codec takes its turn on the device before each clip's encode."""
    start = time.perf_counter()
    summary = Summary()
    todo = [j for j in jobs if not cache.is_done(j.clip_id)]
    summary.skipped_done = [j.clip_id for j in jobs if cache.is_done(j.clip_id)]
    captions = sorted({j.caption for j in todo})
    embedded = dict(zip(captions, text_encoder.encode(captions), strict=True)) if captions else {}
    for job in tqdm(todo, desc=desc, unit="clip", disable=not progress):
        try:
            meta = {"clip_id": job.clip_id, "relation": job.relation, "caption": job.caption, "source": job.origin,
                    "text_encoder": text_encoder.name, **job.meta}
            prepared = job.prepare()  # decode, masks (a mask model takes its turn on the device here)
            if turns is not None:
                turns.use(codec)
            record = encode_clip(prepared, embedded[job.caption], codec, meta, spatial_rule, latent_dtype)
        # One bad clip never stops the others: every error a clip can raise (decoding, parsing, masks,
        # codec, out of memory) is a ValueError, OSError or RuntimeError subclass; it goes to the manifest.
        except (ValueError, OSError, RuntimeError) as err:
            reason = getattr(err, "reason", None) or f"{type(err).__name__}: {err}"
            if job.one_of_several:
                reason = f"{job.clip_id}: {reason}"  # one window of a video: say which
            cache.record_failure(job.origin, reason)
            summary.failed[f"{job.origin} ({job.clip_id})" if job.one_of_several else job.origin] = reason
            continue
        cache.add(record)
        summary.written.append(job.clip_id)
    summary.seconds = time.perf_counter() - start
    return summary


def write_prompt_embeddings(cache: ClipCache, text_encoder: TextEncoder, prompts: list[str]) -> None:
    """The prompts previews and evaluation sample, and "" (the negative prompt), embedded once."""
    texts = list(dict.fromkeys([*prompts, ""]))
    cache.write_prompts(dict(zip(texts, text_encoder.encode(texts), strict=True)))


def _prepare_file_source(source: Source, spec: ClipSpec, maker: MaskMaker, fallback: MaskMaker | None,
                         windows: WindowPlanner | None = None, k: int = 0) -> PreparedClip:
    clip = load_clip(source.video, spec, windows.window(k).start if windows is not None else 0)
    masks, used = make_masks(source, clip, maker, fallback)
    return prepare_video_clip(clip, spec, masks, used)


# Mochi's transformer (and the tiny/toy ones) embeds 2x2 latent patches: latent sides must be even.
TRANSFORMER_PATCH = 2
SPEC_KEYS = ("frames", "height", "width", "fps")  # what every clip of a cache shares (allow_upscale does not count)


class ClipSizeError(UserError, ValueError):
    """A clip size (--frames/--height/--width) the codec and transformer cannot take."""


def check_clip_size(codec: Codec, spec: ClipSpec, patch: int = TRANSFORMER_PATCH) -> tuple[int, int, int, int]:
    """The latent shape of ``spec``'s clips, or ClipSizeError naming the flag, the key and a valid value: the
    sides must be multiples of the codec's space factor times the patch (Mochi 8 x 2 = 16, toy 2 x 2 = 4)."""
    t, multiple = codec.time_factor, codec.space_factor * patch
    if spec.frames < 1 or (spec.frames - 1) % t:
        k = max(1, round((spec.frames - 1) / t))
        raise ClipSizeError(f"--frames {spec.frames} (preprocess.frames): the {codec.name} codec needs {t}k+1 "
                            f"frames; use e.g. {t * k + 1}")
    for flag, value in (("height", spec.height), ("width", spec.width)):
        if value % multiple:
            lower, upper = value // multiple * multiple, (value // multiple + 1) * multiple
            use = f"{lower} or {upper}" if lower > 0 else f"{upper}"
            raise ClipSizeError(
                f"--{flag} {value} (preprocess.{flag}): the {codec.name} codec needs a multiple of {multiple} "
                f"({codec.space_factor}x downsampling times the transformer's {patch}x{patch} patches, so the "
                f"latent sides stay even); use {use}")
    return codec.latent_shape(spec.frames, spec.height, spec.width)


def check_same_spec(cache: ClipCache, spec: ClipSpec, codec: str, text_encoder: str) -> None:
    """Refuse to add clips of another size, fps, codec or text encoder to a cache that holds clips."""
    if not cache.clip_ids():
        return
    config = cache.manifest["config"]
    old_spec = config.get("spec")
    fix = (f"write to another folder (--out / data.cache_dir), or delete {cache.root} to rebuild it with the "
           "new settings")
    if not isinstance(old_spec, dict):
        raise CacheError(f"{cache.manifest_path}: field 'config.spec': the cache holds clips not written by "
                         f"`relvid preprocess` (no clip spec recorded). Fix: {fix}")
    old = {k: old_spec.get(k) for k in SPEC_KEYS} | {k: config.get(k) for k in ("codec", "text_encoder")}
    new = {k: getattr(spec, k) for k in SPEC_KEYS} | {"codec": codec, "text_encoder": text_encoder}
    differ = [k for k in new if old[k] is not None and old[k] != new[k]]
    if differ:
        def show(d: dict) -> str:
            return ", ".join(f"{k}={d[k]}" for k in differ)

        raise CacheError(f"{cache.manifest_path}: field 'config.spec': the cache holds {len(cache.clip_ids())} clips "
                         f"made with {show(old)}, this run asks for {show(new)}; the old clips would keep their "
                         f"size under a config that no longer describes them. Fix: {fix}")


# WindowSettings field -> its preprocess key
WINDOW_KEYS = {"mode": "window", "start_frame": "start_frame", "start_time": "start_time", "count": "windows",
               "stride": "window_stride"}


def window_jobs(sources: list[Source], windows: WindowSettings) -> list[tuple[Source, int, str, str]]:
    """(source, window number k, clip id, window request) for every clip the sources give."""
    return [(s, k, cid, windows.for_source(s).request()) for s in sources for k, cid in enumerate(clip_ids(s, windows))]


def check_same_windows(cache: ClipCache, windows: WindowSettings, jobs: list[tuple[Source, int, str, str]]) -> None:
    """Refuse to add clips cut with other window settings to a cache that holds clips: the run's settings, and
    each cached clip's own window (e.g. a changed start in the captions CSV)."""
    if not cache.clip_ids():
        return
    fix = (f"write to another folder (--out / data.cache_dir), or delete {cache.root} to rebuild it with the "
           "new settings")
    # caches written before windows existed hold the first frames of each video: the default settings
    old = {**asdict(WindowSettings()), **(cache.manifest["config"].get("window") or {})}
    new = asdict(windows)
    differ = [k for k in new if old.get(k) != new[k]]
    if differ:
        def keys(d: dict) -> str:
            return ", ".join(f"{WINDOW_KEYS[k]}={d.get(k)}" for k in differ)

        raise CacheError(f"{cache.manifest_path}: field 'config.window': the cache holds {len(cache.clip_ids())} "
                         f"clips whose windows were chosen with {keys(old)}, this run asks for {keys(new)}; "
                         f"the cache would mix clips of both. Fix: {fix}")
    for source, _, clip_id, request in jobs:
        if cache.is_done(clip_id) and (was := _cached_window(cache, clip_id)) != request:
            raise CacheError(
                f"{cache.path(clip_id)}: field 'meta.window': clip {clip_id} was cut with window {was!r}, this run "
                f"asks for {request!r} (for {source.video}). Fix: delete {cache.path(clip_id).name} from "
                f"{cache.root} (the rerun caches it again with the new window), or write to another folder "
                "(--out / data.cache_dir)")


def _cached_window(cache: ClipCache, clip_id: str) -> str:
    """How a cached clip's window was asked for (``meta.window``; older clips hold the first frames)."""
    from safetensors import safe_open

    with safe_open(str(cache.path(clip_id)), framework="pt") as f:
        return (f.metadata() or {}).get("window", "first")


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
    turns: DeviceTurns | None = None,
    windows: WindowSettings | None = None,
    mask_colours: list[tuple[int, int, int]] | None = None,
) -> Summary:
    """Cache every video source not cached yet; returns what was written, skipped and why clips failed.
    With ``turns`` the mask models and the codec take turns on its device. ``windows`` says which frames of
    each video its clip (or clips) take; ``mask_colours`` are the mask files' subject colours (for
    ``windows.mode == "closest"``)."""
    relation = relation_name(relation)
    windows = windows or WindowSettings()  # the first frames of each video
    check_clip_size(codec, spec)  # a size the codec cannot take fails now, once
    names = (mask_maker.name, fallback.name if fallback else None)
    if turns is not None:
        mask_maker = _MakerOnTurn(mask_maker, turns)
        fallback = _MakerOnTurn(fallback, turns) if fallback is not None else None
    planned = window_jobs(sources, windows)
    if (Path(cache_root) / MANIFEST_NAME).is_file():
        old = ClipCache(cache_root)
        check_same_spec(old, spec, codec.name, text_encoder.name)
        check_same_windows(old, windows, planned)
    # one planner per video, shared by the clips of its windows
    planners = {id(s): WindowPlanner(s, windows, spec, mask_colours) for s in sources}
    # Absolute sources: `relvid mask-sheet` re-reads the video from any working folder.
    jobs = [ClipJob(cid, s.caption, relation, str(Path(s.video).resolve()),
                    functools.partial(_prepare_file_source, s, spec, mask_maker, fallback, planners[id(s)], k),
                    {"window": request}, windows.count > 1) for s, k, cid, request in planned]
    cache = ClipCache(cache_root, create=True)
    cache.set_config({**(config or {}), "relation": relation, "spec": asdict(spec), "codec": codec.name,
                      "text_encoder": text_encoder.name, "mask_source": names[0], "mask_fallback": names[1],
                      "spatial_rule": spatial_rule, "window": asdict(windows)})
    if prompts is not None:
        write_prompt_embeddings(cache, text_encoder, prompts)
    return write_clips(cache, jobs, codec, text_encoder, spatial_rule, latent_dtype, progress, turns=turns)


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def _dtype(name: str, device: str):
    """model.dtype for ``device``; auto: bf16 on a GPU, fp32 on the CPU (what the loaders pick there)."""
    import torch

    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def _mask_maker(kind: str, opts, device: str) -> MaskMaker:
    from relvid.preprocess.masks import FileMaskMaker, SkeletonMaskMaker

    if kind == "skeleton":
        return SkeletonMaskMaker()
    if kind == "files":
        colours = [tuple(c) for c in opts.mask_colors] if opts.mask_colors else None
        return FileMaskMaker(colours)
    if kind == "sam2":
        from relvid.preprocess.masks_sam2 import Sam2VideoMasks

        return Sam2VideoMasks.from_folders(opts.gdino_path, opts.sam2_path, prompt=opts.detect_prompt, device=device,
                                           box_threshold=opts.box_threshold, text_threshold=opts.text_threshold)
    from relvid.preprocess.grounded_sam import GroundedSam

    return GroundedSam.from_folders(opts.gdino_path, opts.sam_path, prompt=opts.detect_prompt, device=device,
                                    box_threshold=opts.box_threshold, text_threshold=opts.text_threshold)


def _sources(opts, relation: str) -> list[Source]:
    from relvid.preprocess.sources import folder_sources, ntu_sources

    def ints(values):
        return list(values) if values is not None else None

    if opts.ntu_root:
        return ntu_sources(opts.ntu_root, relation, opts.clips, opts.seed, ints(opts.setups), ints(opts.cameras),
                           ints(opts.performers), ints(opts.replications), opts.skeletons, opts.masks)
    return folder_sources(opts.videos, opts.captions_csv, opts.masks)


def _check(opts) -> None:
    if bool(opts.ntu_root) == bool(opts.videos):
        raise InputError("give exactly one source: --ntu-root (preprocess.ntu_root) or --videos (preprocess.videos)")
    for key, value, allowed in (("mask_source", opts.mask_source, ("skeleton", "grounded-sam", "sam2", "files")),
                                ("mask_fallback", opts.mask_fallback, ("none", "grounded-sam", "sam2", "files")),
                                ("spatial_rule", opts.spatial_rule, ("any", "area")),
                                ("latent_dtype", opts.latent_dtype, ("bf16", "fp16", "fp32"))):
        if value not in allowed:
            raise InputError(f"preprocess.{key}={value!r}: use one of {', '.join(allowed)}")
    if opts.mask_colors is not None and (len(opts.mask_colors) != 2 or any(len(c) != 3 for c in opts.mask_colors)):
        raise InputError("preprocess.mask_colors: give two R,G,B colours, subject 1 first (e.g. --mask-colors "
                         "'255,0,0;0,255,0')")
    if opts.mask_source == "files" and not opts.masks:
        raise InputError("--mask-source files needs --masks DIR (a <video stem>/ PNG folder or <stem>.mp4 per video)")
    if opts.mask_source == "skeleton" and opts.videos and opts.mask_fallback == "none":
        raise InputError("your own videos have no NTU skeletons: use --mask-source grounded-sam, sam2 or files")
    if opts.vae_tile < 0 or opts.vae_tile % 8:
        raise InputError(f"--vae-tile {opts.vae_tile}: use a multiple of 8 pixels (e.g. 256), or 0 for no tiling")
    window_settings(opts)  # a bad window setting fails here, before any model loads
    if opts.window == "closest" and opts.videos and not opts.masks:
        raise InputError("--window closest (preprocess.window) needs where the two subjects are in every frame: "
                         "your own videos need mask files (--mask-source files --masks DIR); NTU videos use "
                         "their skeletons")


def window_settings(opts) -> WindowSettings:
    """The ``preprocess`` keys that choose each clip's frames."""
    return WindowSettings(opts.window, opts.start_frame, opts.start_time, opts.windows, opts.window_stride)


def preprocess(cfg) -> int:
    """`relvid preprocess`: the sources of ``cfg.preprocess`` -> the clip cache at data.cache_dir (default
    data/cache/<relation>), with the codec and text encoder of ``cfg.model``; returns the exit code."""
    from omegaconf import OmegaConf

    from relvid.components import load_codec, load_text_encoder
    from relvid.config import command_view

    opts = cfg.preprocess
    _check(opts)
    relation = relation_name(cfg.relation)
    spec = ClipSpec(opts.frames, opts.height, opts.width, opts.fps, opts.allow_upscale)
    windows = window_settings(opts)
    out = Path(cfg.data.cache_dir or f"data/cache/{relation}")
    sources = _sources(opts, relation)
    if (out / MANIFEST_NAME).is_file():  # before any model loads
        check_same_windows(ClipCache(out), windows, window_jobs(sources, windows))
    if opts.dry_run:
        for source, clip_id, state in plan(sources, out, windows):
            extra = f"skeleton={source.skeleton.name if source.skeleton else 'MISSING'}" if opts.ntu_root else ""
            print(f"{state:6s} {clip_id:32s} {source.video}  {extra} window={windows.for_source(source).request()} "
                  f"caption={source.caption!r}")
        print(f"{len(sources)} sources for {relation} -> {out} (dry run: nothing written)")
        return 0

    model = cfg.model
    device = _device(opts.device)
    dtype = _dtype(model.dtype, device)
    mochi = model.path  # MOCHI_PATH is already its fallback
    tiling = {"tiling": opts.vae_tile > 0, "tile": opts.vae_tile or 256,
              "tile_stride": max(8, opts.vae_tile * 3 // 4 // 8 * 8)} if model.codec == "mochi" else {}
    # The VAE and the mask models wait on the CPU (in the dtype they work in) until their turn on the device.
    codec = load_codec(model.codec, model.vae_path or mochi, device="cpu", dtype=dtype, **tiling)
    check_clip_size(codec, spec)  # before the text encoder, the mask models and any clip
    prompts = preview_prompts(relation, list(opts.prompts))
    captions = [s.caption for s, _, state in plan(sources, out, windows) if state == "todo"]
    t5 = opts.t5_path or os.environ.get("T5_PATH") or model.text_encoder_path or mochi
    text_encoder = load_text_encoder(model.text_encoder, t5, device=device, dtype=dtype)
    texts = EmbeddedTexts(text_encoder, [*prompts, *captions])  # every text the run writes, in one pass
    del text_encoder  # freed before the VAE and mask models take the device
    free_device_memory(device)
    maker = _mask_maker(opts.mask_source, opts, "cpu")
    fallback = None if opts.mask_fallback == "none" else _mask_maker(opts.mask_fallback, opts, "cpu")
    config = OmegaConf.to_container(command_view(cfg, "preprocess"))
    summary = run_preprocess(
        sources, out, relation, codec, texts, maker, spec, fallback, opts.spatial_rule, opts.latent_dtype,
        prompts=prompts, config=config, progress=opts.progress, turns=DeviceTurns(device), windows=windows,
        mask_colours=[tuple(c) for c in opts.mask_colors] if opts.mask_colors else None,
    )
    for source, reason in summary.failed.items():
        print(f"FAILED {source}: {reason}")
    print(f"{summary.line()} -> {out}")
    return 0 if summary.written or summary.skipped_done else 1

"""The clip cache: the contract between preprocessing (`relvid preprocess`) and training.

One safetensors file per clip, ``<clip_id>.safetensors``, holding the VAE posterior of the clip
latent, its caption's text embedding (trimmed to the valid tokens), the two subject masks and
optionally the relation mask on the latent grid, plus string metadata. The folder also holds
``manifest.json`` (clips, producing config, per-source failures) and ``prompts.safetensors``
(prompt embeddings for previews, evaluation and the CFG negative prompt ``""``).
All writes are atomic (temp file in the same folder + ``os.replace``), so a crash never leaves a
half-written file under a final name, and a rerun sees exactly the clips that were finished.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as save_safetensors
from torch import Tensor

from relvid.errors import UserError
from relvid.files import atomic_write

FORMAT_VERSION: int = 1  # the manifest's and the prompts file's
# A clip file's format. 2: relation_mask is the union of the subjects taken per video frame, then put on
# the latent grid (the paper's M_R). 1 (still read): relation_mask is the max of the two subjects'
# latent-grid masks, which are averaged over time first.
CLIP_FORMAT_VERSION: int = 2
READABLE_CLIP_FORMATS = ("1", "2")
MANIFEST_NAME = "manifest.json"
PROMPTS_NAME = "prompts.safetensors"
CLIP_SUFFIX = ".safetensors"
META_KEYS = ("format_version", "clip_id", "relation", "caption", "source", "frame_range", "fps",
             "codec", "codec_factors", "text_encoder")
LATENT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_CLIP_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
_REBUILD = "delete the file and rerun `relvid preprocess` (finished clips are skipped)"
# A VAE posterior's log-variance: diffusers clamps it to [-30, 20] and normalizing the latents shifts
# it by -2 log(std); far outside that, sampling the posterior gives latents of 1e10 and more.
LOGVAR_RANGE = (-40.0, 20.0)
CACHE_WIDE = "(cache)"  # the "clip id" of a problem of the whole cache in ClipCache.validate()


class CacheError(UserError, ValueError):
    """A clip cache (folder, manifest, clip or prompt file) that is missing or invalid."""


def _error(path: str | Path, field: str, problem: str, fix: str = _REBUILD) -> CacheError:
    return CacheError(f"{path}: field '{field}': {problem}. Fix: {fix}")


@dataclass
class ClipRecord:
    """One cached clip: latent posterior (C, f, h, w), trimmed text embedding, latent masks."""

    latent_mean: Tensor  # (C, f, h, w)
    latent_logvar: Tensor  # (C, f, h, w)
    text_embeds: Tensor  # (L, D), L >= 1 valid tokens
    text_mask: Tensor  # (L,) bool
    subject_masks: Tensor  # (2, f, h, w) in [0, 1]
    meta: dict[str, str]
    relation_mask: Tensor | None = None  # (f, h, w) in [0, 1]; None -> max of the subjects

    @property
    def clip_id(self) -> str:
        return self.meta["clip_id"]

    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        return tuple(self.latent_mean.shape)  # type: ignore[return-value]

    def tensors(self) -> dict[str, Tensor]:
        out = {"latent_mean": self.latent_mean, "latent_logvar": self.latent_logvar,
               "text_embeds": self.text_embeds, "text_mask": self.text_mask,
               "subject_masks": self.subject_masks}
        if self.relation_mask is not None:
            out["relation_mask"] = self.relation_mask
        return out


def check_clip_id(clip_id: str) -> None:
    """Clip ids become file names: letters, digits and ``._+-`` only, not starting with a dot."""
    if not isinstance(clip_id, str) or not _CLIP_ID.match(clip_id):
        raise CacheError(f"clip id {clip_id!r} is not a valid file name: use letters, digits and "
                         "'._+-' only, starting with a letter or digit")


def _to_cpu(t: Tensor) -> Tensor:
    # clone: safetensors refuses tensors that share storage (e.g. slices of one buffer).
    return t.detach().to("cpu").contiguous().clone()


def _check_unit_range(t: Tensor, path: str | Path, field: str) -> None:
    if not t.is_floating_point():
        raise _error(path, field, f"dtype {t.dtype} is not floating point (expected masks in [0, 1])")
    lo, hi = float(t.min()), float(t.max())
    if lo < 0.0 or hi > 1.0:
        raise _error(path, field, f"values must lie in [0, 1], found range [{lo:g}, {hi:g}]")


def _check_meta(meta: dict, path: str | Path) -> None:
    for key in META_KEYS:
        if key not in meta:
            raise _error(path, f"meta.{key}", "missing metadata key")
    for key, value in meta.items():
        if not isinstance(value, str):
            raise _error(path, f"meta.{key}", f"metadata values must be str, got {type(value).__name__}",
                         "convert the value with str() before writing")
    if meta["format_version"] not in READABLE_CLIP_FORMATS:
        raise _error(path, "meta.format_version",
                     f"format version {meta['format_version']!r}, this relvid reads {', '.join(READABLE_CLIP_FORMATS)}",
                     "rebuild the cache with this relvid version (`relvid preprocess`)")
    check_clip_id(meta["clip_id"])
    factors = meta["codec_factors"].split(",")
    if len(factors) != 3 or not all(f.strip().isdigit() and int(f) > 0 for f in factors):
        raise _error(path, "meta.codec_factors",
                     f"{meta['codec_factors']!r} is not three positive integers (temporal,spatial,spatial)")
    if not re.fullmatch(r"\d+-\d+", meta["frame_range"]):
        raise _error(path, "meta.frame_range", f"{meta['frame_range']!r} is not 'start-end'")
    try:
        fps = float(meta["fps"])
    except ValueError:
        fps = math.nan
    if not fps > 0:
        raise _error(path, "meta.fps", f"{meta['fps']!r} is not a positive number")


def validate_record(record: ClipRecord, path: str | Path) -> None:
    """Raise CacheError (naming ``path`` and the field) if ``record`` breaks the cache contract."""
    _check_meta(record.meta, path)
    mean, logvar = record.latent_mean, record.latent_logvar
    if mean.ndim != 4:
        raise _error(path, "latent_mean", f"expected rank 4 (C, f, h, w), got shape {tuple(mean.shape)}")
    for name, t in (("latent_mean", mean), ("latent_logvar", logvar)):
        if t.dtype not in LATENT_DTYPES:
            raise _error(path, name, f"dtype {t.dtype} is not one of bf16/fp16/fp32")
    if logvar.shape != mean.shape:
        raise _error(path, "latent_logvar",
                     f"shape {tuple(logvar.shape)} differs from latent_mean {tuple(mean.shape)}")
    _, f, h, w = mean.shape
    emb, tmask = record.text_embeds, record.text_mask
    if emb.ndim != 2 or emb.shape[0] < 1 or not emb.is_floating_point():
        raise _error(path, "text_embeds",
                     f"expected a float (L, D) tensor with L >= 1, got {emb.dtype} {tuple(emb.shape)}")
    if tmask.shape != (emb.shape[0],):
        raise _error(path, "text_mask", f"shape {tuple(tmask.shape)} does not match text_embeds "
                     f"{tuple(emb.shape)} (expected ({emb.shape[0]},))")
    if tmask.dtype not in (torch.bool, torch.uint8) or (tmask.dtype == torch.uint8 and tmask.max() > 1):
        raise _error(path, "text_mask", f"expected bool (or uint8 0/1), got {tmask.dtype}")
    if not bool(tmask.bool().any()):
        raise _error(path, "text_mask", "all false: the caption has no valid token (the model would see no text)")
    subj = record.subject_masks
    if subj.shape != (2, f, h, w):
        raise _error(path, "subject_masks", f"shape {tuple(subj.shape)} does not match the latent grid; "
                     f"expected (2, {f}, {h}, {w}) for latent {tuple(mean.shape)}")
    rel = record.relation_mask
    if rel is not None and rel.shape != (f, h, w):
        raise _error(path, "relation_mask", f"shape {tuple(rel.shape)} does not match the latent grid; "
                     f"expected ({f}, {h}, {w}) for latent {tuple(mean.shape)}")
    for name, t in record.tensors().items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise _error(path, name, "contains NaN or infinite values")
    lo, hi = float(logvar.float().min()), float(logvar.float().max())
    if lo < LOGVAR_RANGE[0] or hi > LOGVAR_RANGE[1]:
        raise _error(path, "latent_logvar", f"values in [{lo:g}, {hi:g}], outside the sane range "
                     f"[{LOGVAR_RANGE[0]:g}, {LOGVAR_RANGE[1]:g}] of a VAE posterior's log-variance (sampling it "
                     "would give absurd latents)", "re-encode the clip with the codec (`relvid preprocess`)")
    _check_unit_range(subj, path, "subject_masks")
    if rel is not None:
        _check_unit_range(rel, path, "relation_mask")


def frame_counts(records: list[ClipRecord]) -> dict[int, list[str]]:
    """Latent frame count f -> the ids of the clips that have it."""
    out: dict[int, list[str]] = {}
    for rec in records:
        out.setdefault(rec.latent_shape[1], []).append(rec.clip_id)
    return dict(sorted(out.items()))


def mixed_frames_problem(records: list[ClipRecord], where: str | Path) -> str | None:
    """Why clips of several latent frame counts cannot share a batch (batch_size > 1); None when they can."""
    counts = frame_counts(records)
    if len(counts) < 2:
        return None
    listed = "; ".join(f"f={f}: {', '.join(ids[:3])}{' ...' if len(ids) > 3 else ''}" for f, ids in counts.items())
    return (f"{where}: field 'latent_mean': clips have different latent frame counts ({listed}); batch_size > 1 "
            "stacks clips and needs one frame count. Fix: train with data.batch_size=1, or cache every clip "
            "with one --frames (preprocess.frames)")


def cache_wide_problems(records: list[ClipRecord], where: str | Path, batch_size: int = 1) -> list[str]:
    """Problems no single clip shows: subject masks empty in every clip; mixed frame counts for batches > 1."""
    problems = []
    if records and all(not bool((rec.subject_masks > 0).any()) for rec in records):
        problems.append(f"{where}: field 'subject_masks': all zero in every clip ({len(records)} clips): the "
                        "relation and subject losses would see no subject. Fix: rebuild the cache with working "
                        "masks (check --mask-source and the mask files; `relvid mask-sheet` shows them)")
    if batch_size > 1:
        mixed = mixed_frames_problem(records, where)
        if mixed:
            problems.append(mixed)
    return problems


def write_clip(path: str | Path, record: ClipRecord) -> Path:
    """Validate and atomically write one clip file; stamps ``format_version`` if absent."""
    path = Path(path)
    record = replace(record, meta={"format_version": str(CLIP_FORMAT_VERSION), **record.meta})
    validate_record(record, path)
    tensors = {k: _to_cpu(v) for k, v in record.tensors().items()}
    tensors["text_mask"] = tensors["text_mask"].bool()
    atomic_write(path, save_safetensors(tensors, metadata=dict(record.meta)))
    return path


def _open_safetensors(path: Path, what: str) -> tuple[dict[str, Tensor], dict[str, str]]:
    if not path.is_file():
        raise _error(path, what, "file not found", "rerun `relvid preprocess` to (re)build the cache")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise _error(path, what, f"unreadable or corrupt safetensors file ({e})") from e
    return tensors, meta


def read_clip(path: str | Path) -> ClipRecord:
    """Read and validate one clip file; CacheError names the file, the field and the fix."""
    path = Path(path)
    tensors, meta = _open_safetensors(path, "file")
    for name in ("latent_mean", "latent_logvar", "text_embeds", "text_mask", "subject_masks"):
        if name not in tensors:
            raise _error(path, name, "missing tensor")
    record = ClipRecord(
        latent_mean=tensors["latent_mean"], latent_logvar=tensors["latent_logvar"],
        text_embeds=tensors["text_embeds"], text_mask=tensors["text_mask"],
        subject_masks=tensors["subject_masks"], meta=dict(meta),
        relation_mask=tensors.get("relation_mask"))
    validate_record(record, path)
    record.text_mask = record.text_mask.bool()
    return record


def _empty_manifest() -> dict:
    return {"format_version": FORMAT_VERSION, "config": {}, "clips": [], "failures": []}


class ClipCache:
    """A cache folder: clip files + manifest.json (+ prompts.safetensors)."""

    def __init__(self, root: str | Path, create: bool = False) -> None:
        self.root = Path(root)
        self.manifest_path = self.root / MANIFEST_NAME
        build = "run `relvid preprocess` to build the cache, or point data.cache_dir at an existing one"
        if not self.root.is_dir():
            if not create:
                raise CacheError(f"clip cache folder {self.root} not found. Fix: {build}")
            self.root.mkdir(parents=True, exist_ok=True)
        if not self.manifest_path.is_file():
            if not create:
                raise CacheError(f"{self.manifest_path} not found, {self.root} is not a clip cache. "
                                 f"Fix: {build}")
            self.manifest = _empty_manifest()
            self._save_manifest()
        else:
            self.manifest = self._load_manifest()

    def _load_manifest(self) -> dict:
        fix = "delete manifest.json and rerun `relvid preprocess` (it rebuilds the cache)"
        try:
            manifest = json.loads(self.manifest_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise _error(self.manifest_path, "manifest", f"not valid JSON ({e})", fix) from e
        if not isinstance(manifest, dict):
            raise _error(self.manifest_path, "manifest", "not a JSON object", fix)
        if manifest.get("format_version") != FORMAT_VERSION:
            raise _error(self.manifest_path, "format_version",
                         f"format version {manifest.get('format_version')!r}, this relvid reads "
                         f"{FORMAT_VERSION}", fix)
        for key, kind in (("config", dict), ("clips", list), ("failures", list)):
            if not isinstance(manifest.get(key), kind):
                raise _error(self.manifest_path, key, f"missing or not a JSON {kind.__name__}", fix)
        for entry in manifest["clips"]:
            if not isinstance(entry, dict) or not {"id", "file", "relation", "caption"} <= entry.keys():
                raise _error(self.manifest_path, "clips",
                             f"entry {entry!r} lacks one of id/file/relation/caption", fix)
            # Ids and file names are paths below the cache folder: '../x' would read outside it.
            clip_id, name = entry["id"], entry["file"]
            if not isinstance(clip_id, str) or not _CLIP_ID.match(clip_id) or name != f"{clip_id}{CLIP_SUFFIX}":
                raise _error(self.manifest_path, "clips",
                             f"entry {clip_id!r} (file {name!r}) is not a clip file inside {self.root}: ids use "
                             f"letters, digits and '._+-' only and the file is '<id>{CLIP_SUFFIX}'",
                             "remove the entry from manifest.json or rebuild the cache with `relvid preprocess`")
        return manifest

    def _save_manifest(self) -> None:
        data = json.dumps(self.manifest, indent=2, ensure_ascii=False) + "\n"
        atomic_write(self.manifest_path, data.encode("utf-8"))

    def path(self, clip_id: str) -> Path:
        check_clip_id(clip_id)
        return self.root / f"{clip_id}{CLIP_SUFFIX}"

    def add(self, record: ClipRecord) -> Path:
        """Write the clip file, then list it in the manifest (both atomic; the clip first)."""
        path = write_clip(self.path(record.clip_id), record)
        meta = record.meta
        clips = [c for c in self.manifest["clips"] if c["id"] != record.clip_id]
        entry = {"id": record.clip_id, "file": path.name, "relation": meta["relation"], "caption": meta["caption"]}
        first, sep, last = meta.get("frame_range", "").partition("-")
        if sep and first.isdigit() and last.isdigit():  # the source frames the clip took, and how they were chosen
            entry["window"] = {"start": int(first), "end": int(last), "how": meta.get("window", "first")}
        clips.append(entry)
        self.manifest["clips"] = sorted(clips, key=lambda c: c["id"])
        # A source that now succeeded no longer counts as failed.
        self.manifest["failures"] = [x for x in self.manifest["failures"] if x["source"] != meta["source"]]
        self._save_manifest()
        return path

    def record_failure(self, source: str, reason: str) -> None:
        """Note that ``source`` could not be cached and why (replaces an older note)."""
        failures = [x for x in self.manifest["failures"] if x["source"] != source]
        failures.append({"source": str(source), "reason": str(reason)})
        self.manifest["failures"] = failures
        self._save_manifest()

    def set_config(self, cfg: dict) -> None:
        """Save the producing config (a plain JSON-serialisable dict) in the manifest."""
        try:
            json.dumps(cfg)
        except TypeError as e:
            raise TypeError(f"cache config must be a plain JSON-serialisable dict ({e}); convert an "
                            "OmegaConf config with OmegaConf.to_container(cfg, resolve=True)") from e
        self.manifest["config"] = cfg
        self._save_manifest()

    def _entry(self, clip_id: str) -> dict | None:
        return next((c for c in self.manifest["clips"] if c["id"] == clip_id), None)

    def is_done(self, clip_id: str) -> bool:
        """True when the clip is in the manifest and its file exists (a rerun can skip it)."""
        return self._entry(clip_id) is not None and self.path(clip_id).is_file()

    def clip_ids(self, relation: str | None = None) -> list[str]:
        return sorted(c["id"] for c in self.manifest["clips"] if relation is None or c["relation"] == relation)

    def relations(self) -> list[str]:
        return sorted({c["relation"] for c in self.manifest["clips"]})

    def read(self, clip_id: str) -> ClipRecord:
        """Read a listed clip, checking it matches its manifest entry."""
        entry = self._entry(clip_id)
        if entry is None:
            raise CacheError(f"{self.manifest_path}: clip {clip_id!r} is not listed. Fix: rerun "
                             "`relvid preprocess` or pick a listed clip (ClipCache.clip_ids())")
        path = self.root / entry["file"]
        record = read_clip(path)
        for key, value in (("clip_id", entry["id"]), ("relation", entry["relation"])):
            if record.meta[key] != value:
                raise _error(path, f"meta.{key}", f"{record.meta[key]!r} differs from the manifest's "
                             f"{value!r}")
        return record

    def inspect(self, batch_size: int = 1) -> tuple[list[tuple[str, str]], list[str]]:
        """(problems, notes): problems as in validate(); notes say what only limits training (clips of
        several frame counts cannot share a batch)."""
        problems, records = [], []
        ids = self.clip_ids()
        if not ids:
            problems.append((CACHE_WIDE, f"{self.manifest_path}: field 'clips': the manifest lists no clips, "
                             "there is nothing to train on. Fix: run `relvid preprocess` into this folder (see "
                             "the manifest's 'failures' for why earlier clips were not cached)"))
        for clip_id in ids:
            try:
                records.append(self.read(clip_id))
            except CacheError as e:
                problems.append((clip_id, str(e)))
        problems += [(CACHE_WIDE, p) for p in cache_wide_problems(records, self.manifest_path, batch_size)]
        mixed = mixed_frames_problem(records, self.manifest_path)
        notes = [mixed] if mixed and batch_size <= 1 else []
        return problems, notes

    def validate(self, batch_size: int = 1) -> list[tuple[str, str]]:
        """(clip_id, problem) for every listed clip that fails to read, plus problems of the whole cache
        (id ``"(cache)"``: no clips, subject masks all zero, mixed frame counts when ``batch_size`` > 1);
        empty when the cache can train."""
        return self.inspect(batch_size)[0]

    def write_prompts(self, prompts: dict[str, tuple[Tensor, Tensor]]) -> None:
        """Save prompt embeddings text -> (embeds (L, D), mask (L,)); ``""`` is the negative prompt."""
        path = self.root / PROMPTS_NAME
        tensors, meta = {}, {"format_version": str(FORMAT_VERSION), "count": str(len(prompts))}
        # Texts go in the metadata and tensors are keyed by position: any text stays a valid key.
        for i, (text, (embeds, mask)) in enumerate(prompts.items()):
            _check_prompt(path, text, embeds, mask)
            meta[f"prompt.{i}"] = text
            tensors[f"embeds.{i}"] = _to_cpu(embeds)
            tensors[f"mask.{i}"] = _to_cpu(mask).bool()
        atomic_write(path, save_safetensors(tensors, metadata=meta))

    def read_prompts(self) -> dict[str, tuple[Tensor, Tensor]]:
        path = self.root / PROMPTS_NAME
        tensors, meta = _open_safetensors(path, "prompts")
        if meta.get("format_version") != str(FORMAT_VERSION) or "count" not in meta:
            raise _error(path, "meta.format_version", f"not a prompts file of format {FORMAT_VERSION}")
        out = {}
        for i in range(int(meta["count"])):
            keys = (f"prompt.{i}", f"embeds.{i}", f"mask.{i}")
            if keys[0] not in meta or keys[1] not in tensors or keys[2] not in tensors:
                raise _error(path, f"prompt {i}", "missing text, embeds or mask")
            text, embeds, mask = meta[keys[0]], tensors[keys[1]], tensors[keys[2]]
            _check_prompt(path, text, embeds, mask)
            out[text] = (embeds, mask.bool())
        return out


def _check_prompt(path: Path, text: str, embeds: Tensor, mask: Tensor) -> None:
    field = f"prompt {text!r}"
    if embeds.ndim != 2 or embeds.shape[0] < 1 or not embeds.is_floating_point():
        raise _error(path, field, f"embeds must be a float (L, D) tensor with L >= 1, got "
                     f"{embeds.dtype} {tuple(embeds.shape)}")
    if mask.shape != (embeds.shape[0],):
        raise _error(path, field, f"mask shape {tuple(mask.shape)} does not match embeds {tuple(embeds.shape)}")
    if not bool(torch.isfinite(embeds).all()):
        raise _error(path, field, "embeds contain NaN or infinite values")

"""PreviewCallback: a few fixed prompts sampled every N steps, saved as mp4 and shown in TensorBoard and W&B.

Each preview is ``step<step>_p<i>_<key>.mp4`` with a JSON sidecar (prompt, seed, sampling settings,
negative prompt, step): ``<key>`` hashes what defines the video besides the step, so a run resumed
with other preview prompts or settings into the same folder writes beside the old previews, never
over them or under a name that looks like theirs. With ``at_start`` the untouched base is previewed
too, before the first step of a fresh run (``step000000_...``). With gradient accumulation a step is
previewed once, after its last micro-batch (its optimizer step), not once per micro-batch.

A ReVersion run (method=reversion) learns a token the cache's pre-encoded prompts cannot hold: its
previews condition on prompts carrying the token (``preview.prompts``, each must hold it; by default
``reversion.caption``), encoded at every preview by the run's own text encoder with the token's current
vectors, as ``relvid sample`` encodes them with the run's file. The negative prompt still comes from the
cache (it holds no token).
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import lightning as L
import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm

from relvid.config import ReVersionConfig, SamplingConfig
from relvid.errors import UserError
from relvid.files import atomic_write
from relvid.inference.generate import generate_video, inference_scope, sampling_record
from relvid.models.reversion import ATTR as TOKEN_ATTR
from relvid.models.reversion import METHOD as REVERSION
from relvid.models.reversion import encode_with_token, encoder_inference_scope


class PreviewPromptError(UserError, ValueError):
    """A preview prompt whose embedding is not in the clip cache (or, for ReVersion, without its token)."""


def gif_bytes(frames: torch.Tensor, fps: int) -> bytes:
    """uint8 (T, H, W, 3) -> an endlessly looping animated GIF."""
    from PIL import Image

    images = [Image.fromarray(f.numpy()) for f in frames]
    buf = io.BytesIO()
    images[0].save(buf, format="GIF", save_all=True, append_images=images[1:], duration=max(1, round(1000 / fps)),
                   loop=0)
    return buf.getvalue()


def log_video(writer, tag: str, frames: torch.Tensor, step: int, fps: int) -> None:
    """Log a video to a TensorBoard SummaryWriter as an animated GIF (what add_video writes).

    SummaryWriter.add_video needs moviepy's removed `editor` module and silently logs nothing
    without it, so the GIF is encoded here with Pillow.
    """
    from tensorboard.compat.proto.summary_pb2 import Summary

    _, h, w, c = frames.shape
    image = Summary.Image(height=h, width=w, colorspace=c, encoded_image_string=gif_bytes(frames, fps))
    writer._get_file_writer().add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), step)


def log_preview(trainer: L.Trainer, tag: str, frames: torch.Tensor, path: Path, step: int, fps: int,
                caption: str) -> None:
    """Show a preview in each of the run's loggers that takes videos: TensorBoard (an animated GIF) and
    W&B (the mp4 file, captioned with its prompt). Others (CSV) keep only the file on disk."""
    from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

    for logger in getattr(trainer, "loggers", None) or ():
        if isinstance(logger, TensorBoardLogger):
            writer = logger.experiment
            if hasattr(writer, "_get_file_writer"):
                log_video(writer, tag, frames, step, fps)
        elif isinstance(logger, WandbLogger):
            import wandb

            logger.log_metrics({tag: wandb.Video(str(path), caption=caption)}, step=step)


def preview_record(prompt: str, seed: int, settings: SamplingConfig) -> dict:
    """What defines a preview besides the step and the adapters' training state (its sidecar's keys)."""
    record = {"prompt": prompt, "seed": int(seed), "settings": sampling_record(settings),
              "negative_prompt": settings.negative_prompt}
    return json.loads(json.dumps(record))  # the form it takes in the sidecar (tuples -> lists)


def preview_key(record: dict) -> str:
    """8 hex digits of the record's sha256: previews of other prompts or settings get other names."""
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode("utf-8")).hexdigest()[:8]


def select_prompts(available: dict, wanted: list[str], max_prompts: int, where: str) -> list[str]:
    """`wanted` (all must be in the cache) or the cache's first non-empty prompts, at most max_prompts."""
    if wanted:
        missing = [p for p in wanted if p not in available]
        if missing:
            raise PreviewPromptError(
                f"{where}: prompts {missing} have no embedding in the cache's prompts.safetensors; add them to "
                "the preprocessing's prompt list and re-run `relvid preprocess`, or pick from "
                f"{[p for p in available if p][:5]}"
            )
        return list(wanted)[:max_prompts]
    texts = [p for p in available if p]
    if not texts:
        raise PreviewPromptError(f"{where}: the cache's prompts.safetensors holds no prompt besides the negative ''")
    return texts[:max_prompts]


def select_token_prompts(wanted: list[str], token: str, caption: str, max_prompts: int, where: str) -> list[str]:
    """ReVersion's preview prompts: `wanted` (each must hold `token`), else the training caption alone."""
    missing = [p for p in wanted if token not in p]
    if missing:
        raise PreviewPromptError(
            f"{where}: prompts {missing} lack the learned token {token}: a method=reversion run previews prompts "
            f"that carry it, e.g. {caption!r}; write {token} where the relation goes ('A dog is {token} a cat.'), or "
            "leave preview.prompts empty to preview reversion.caption")
    return list(wanted)[:max_prompts] if wanted else [caption]


class PreviewCallback(L.Callback):
    """Every `every_n_steps` optimizer steps (0: never), and before the first step of a fresh run when
    `at_start`, rank zero samples the fixed prompts with the inference adapters.

    `token` (ReVersion's learned token; None for the other methods): the prompts carry it and are encoded
    at each preview by the module's text encoder with the token's current vectors; `caption` (the
    training caption) is the prompt when `prompts` is empty."""

    def __init__(self, every_n_steps: int, cache_dir: str, out_dir: str | Path, settings: SamplingConfig,
                 prompts: list[str] | None = None, max_prompts: int = 2, seed: int = 0,
                 codec: str = "mochi", codec_path: str | None = None, at_start: bool = False,
                 token: str | None = None, caption: str | None = None) -> None:
        if every_n_steps < 0 or (every_n_steps == 0 and not at_start):
            raise ValueError(f"preview.every_n_steps must be >= 1 here (0 only with at_start), got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self.at_start = at_start
        self.cache_dir = cache_dir
        self.out_dir = Path(out_dir)
        self.settings = settings
        self.wanted = list(prompts or [])
        self.max_prompts = max_prompts
        self.seed = seed
        self.codec_name, self.codec_path = codec, codec_path
        self.token = token
        # without a caption: the schema's default caption, with this token in it
        default = ReVersionConfig()
        self.caption = caption if caption is not None else (
            default.caption.replace(default.token, token) if token else None)
        self._codec = None
        self._prompts: dict | None = None  # text -> (embeds, mask), plus "" as the negative
        self._last_step: int | None = None  # the optimizer step the last training batch ended at
        self.written: list[Path] = []

    @classmethod
    def from_config(cls, cfg: DictConfig) -> PreviewCallback:
        p = cfg.preview
        reversion = str(cfg.method) == REVERSION
        return cls(int(p.every_n_steps), cfg.data.cache_dir, Path(cfg.output_dir) / "previews", p.sampling,
                   prompts=list(p.prompts), max_prompts=int(p.max_prompts), seed=int(p.seed),
                   codec=cfg.model.codec, codec_path=cfg.model.vae_path or cfg.model.path,
                   at_start=bool(p.at_start), token=str(cfg.reversion.token) if reversion else None,
                   caption=str(cfg.reversion.caption) if reversion else None)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not trainer.is_global_zero:
            return
        from relvid.data.cache import ClipCache

        # Read and check the prompts before training starts, not at the first preview.
        available = ClipCache(self.cache_dir).read_prompts()
        if self.token is not None:  # encoded with the learned token at each preview, not read from the cache
            texts = select_token_prompts(self.wanted, self.token, self.caption, self.max_prompts, "preview.prompts")
        else:
            texts = select_prompts(available, self.wanted, self.max_prompts, "preview.prompts")
        negative = self.settings.negative_prompt
        if self.settings.guidance_scale != 1.0 and negative not in available:
            raise PreviewPromptError("preview: the cache's prompts.safetensors lacks the negative prompt "
                                     f"{negative!r}; re-run `relvid preprocess` (it always embeds '') or set "
                                     "preview.sampling.guidance_scale=1")
        self._prompts = {t: available[t] for t in [*texts, negative] if t in available}
        self._texts = texts

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # global_step is the restored one here: a resumed run has no untouched base to show
        if self.at_start and trainer.global_step == 0 and trainer.is_global_zero:
            self.render(trainer, pl_module, 0)
        # the steps up to here are done (previewed by the run that made them, or just above)
        self._last_step = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        step = trainer.global_step  # optimizer steps done, already counting this batch
        if step == self._last_step:
            return  # a micro-batch of gradient accumulation: no optimizer step since the last batch
        self._last_step = step
        if self.every_n_steps and step % self.every_n_steps == 0 and trainer.is_global_zero:
            self.render(trainer, pl_module, step)

    def render(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> list[Path]:
        from relvid.components import load_codec
        from relvid.video_io import write_mp4

        if self._codec is None:
            self._codec = load_codec(self.codec_name, self.codec_path, device=str(pl_module.device))
        negative = self._prompts.get(self.settings.negative_prompt) if self.settings.guidance_scale != 1.0 else None
        extra = {"learned_token": self.token} if self.token is not None else {}
        paths = []
        with inference_scope(pl_module.transformer, pl_module.spec):
            prompts = self._encode_with_token(pl_module) if self.token is not None else self._prompts
            for i, text in enumerate(tqdm(self._texts, desc=f"preview step {step}", leave=False)):
                embeds, mask = prompts[text]
                record = preview_record(text, self.seed + i, self.settings)
                frames = generate_video(pl_module.transformer, self._codec, embeds, mask, negative,
                                        seed=record["seed"], settings=self.settings, device=pl_module.device)
                path = write_mp4(self.out_dir / f"step{step:06d}_p{i}_{preview_key(record)}.mp4", frames,
                                 fps=self.settings.fps)
                atomic_write(path.with_suffix(".json"), json.dumps({**record, **extra, "step": step}, indent=2))
                paths.append(path)
                log_preview(trainer, f"preview/p{i}", frames, path, step, self.settings.fps, text)
        self.written.extend(paths)
        return paths

    def _encode_with_token(self, pl_module: L.LightningModule) -> dict:
        """ReVersion: text -> (embeds, mask) of the preview prompts by the module's text encoder with the token's
        current vectors (no gradient; the encoder's modes and requires_grad flags restored afterwards)."""
        encoder = pl_module.text_encoder
        if encoder is None or not hasattr(pl_module, TOKEN_ATTR):
            raise RuntimeError(f"preview: the prompts carry {self.token}, but this module learns no token "
                               "(method=reversion builds PreviewCallback with token=...)")
        vectors = getattr(pl_module, TOKEN_ATTR).vectors()
        with encoder_inference_scope(encoder):
            encoded = encode_with_token(encoder, self._texts, pl_module.spec, vectors)
        return dict(zip(self._texts, encoded, strict=True))

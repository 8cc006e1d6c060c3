"""Assemble and run a training job from a validated config: data, module, callbacks, trainer."""

from __future__ import annotations

import os
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

import lightning as L
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from omegaconf import DictConfig, OmegaConf

from relvid.config import ConfigError, check_accelerator, save_config
from relvid.data.datamodule import RelationDataModule
from relvid.errors import OutputExistsError
from relvid.files import writable_folder
from relvid.losses.contrastive import make_memory_bank
from relvid.models.adapter_file import ADAPTER_FILE_NAME
from relvid.training.callbacks.adapter_export import FinalAdapters
from relvid.training.callbacks.crash_checkpoint import CrashCheckpoint
from relvid.training.callbacks.lora_snapshots import LoRASnapshots
from relvid.training.callbacks.memory_bank import MemoryBankCallback
from relvid.training.module import RelationModule, wants_gpu
from relvid.training.safety import AtomicCheckpointIO, NonFiniteError, StopOnSignal
from relvid.training.strategies import build_strategy


class RunExistsError(OutputExistsError):
    """The output folder already holds a run and no resume was asked for."""


# Redraws of the progress bar in a whole run when it writes to a log rather than a terminal.
LOG_REDRAWS = 50


def progress_refresh_rate(setting: int, max_steps: int, stream: TextIO | None = None) -> int:
    """Steps between progress-bar redraws. A setting >= 1 is kept. 0 picks: every step when the bar's
    stream (stderr, where tqdm writes) is a terminal; otherwise about LOG_REDRAWS redraws per run, since
    a log keeps every redraw (a 2400-step run would otherwise leave 2400 redraws in a Slurm log)."""
    if setting >= 1:
        return setting
    if (sys.stderr if stream is None else stream).isatty():
        return 1
    return max(1, max_steps // LOG_REDRAWS)


def checkpoint_dir(cfg: DictConfig) -> Path:
    return Path(cfg.output_dir) / "checkpoints"


def checkpoint_step(path: Path) -> int | None:
    """The global step a checkpoint holds (a file, or a DeepSpeed checkpoint folder, checked to be whole
    with every file readable), or None when it cannot be read (truncated, partial, foreign)."""
    import torch

    from relvid.models.adapter_file import read_deepspeed_checkpoint

    try:
        if path.is_dir():
            return int(read_deepspeed_checkpoint(path)["global_step"])
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return int(checkpoint["global_step"]) if isinstance(checkpoint, dict) and "relvid" in checkpoint else None
    except Exception:  # any unreadable checkpoint is simply not a candidate
        return None


def newest_checkpoint(ckpt_dir: Path, skipped: list[Path] | None = None) -> tuple[Path, int] | None:
    """The run's checkpoint with the most steps, skipping those that cannot be read (appended to
    ``skipped`` when given). Candidates: the checkpoints in ``ckpt_dir`` (step checkpoints, last.ckpt,
    on_exception.ckpt; files, or folders under DeepSpeed) and the Slurm requeue checkpoints
    (hpc_ckpt_<n>.ckpt) that Lightning writes into the run's folder, ``ckpt_dir``'s parent. On equal
    steps a step or on_exception checkpoint wins, then last.ckpt (which DeepSpeed rewrites in place, file
    by file), then a requeue checkpoint (written when the signal came, not between two steps); then the
    newest."""
    candidates = [*sorted(ckpt_dir.glob("*.ckpt")), *sorted(ckpt_dir.parent.glob("hpc_ckpt_*.ckpt"))]
    found = []
    for path in candidates:
        if path.name.startswith("."):  # a write in progress (relvid.files.atomic_path)
            continue
        step = checkpoint_step(path)
        if step is not None:
            rank = 0 if path.name.startswith("hpc_ckpt_") else 1 if path.name == "last.ckpt" else 2
            found.append((step, rank, path.stat().st_mtime, path))
        elif skipped is not None:
            skipped.append(path)
    if not found:
        return None
    step, _, _, path = max(found)
    return path, step


def resolve_resume(cfg: DictConfig) -> str | None:
    """The checkpoint to resume from (None for a fresh run); refuses to write over another run."""
    import shutil

    out, ckpt_dir = Path(cfg.output_dir), checkpoint_dir(cfg)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output_dir: {out} is a file; give a folder")
    if cfg.resume is None:
        # Lightning resumes a Slurm job from hpc_ckpt_<n>.ckpt by itself when no checkpoint is given
        saved = [*sorted(ckpt_dir.glob("*.ckpt")), *sorted(out.glob("hpc_ckpt_*.ckpt"))] if out.is_dir() else []
        left = [p.name for p in (*saved, out / "config.yaml", out / "adapters") if p.exists()]
        # Rank 0 decides: the other ranks start once it has begun writing this very run's files.
        other_rank = int(os.environ.get("LOCAL_RANK", "0")) > 0 or int(os.environ.get("RANK", "0")) > 0
        if left and not other_rank:
            if not cfg.overwrite:
                raise RunExistsError(
                    f"{out} already holds another run ({', '.join(left[:3])}{', ...' if len(left) > 3 else ''}): "
                    "resume it with resume=last, train into a new output_dir, or set overwrite=true to start "
                    "afresh there (its checkpoints and adapters are then deleted)")
            for ckpt in saved:  # overwrite=true: the old run's state goes, so resume=last can never pick it up
                if ckpt.is_dir() and not ckpt.is_symlink():
                    shutil.rmtree(ckpt)  # a DeepSpeed checkpoint folder
                else:
                    ckpt.unlink()
            (out / "adapters" / ADAPTER_FILE_NAME).unlink(missing_ok=True)
        return None
    if cfg.resume == "last":
        skipped: list[Path] = []
        newest = newest_checkpoint(ckpt_dir, skipped)
        unreadable = f" (unreadable: {', '.join(str(p) for p in skipped)})" if skipped else ""
        if newest is None:
            raise ConfigError(f"resume=last: {ckpt_dir} holds no readable checkpoint{unreadable}; leave resume unset "
                              "to start this run from the beginning")
        path, step = newest
        kind = ", the Slurm requeue checkpoint" if path.name.startswith("hpc_ckpt_") else ""
        print(f"relvid: resuming from {path} (step {step}{kind}){'; skipped' + unreadable if skipped else ''}",
              flush=True)
    else:
        from relvid.training.safety import load_checkpoint_file

        path = Path(cfg.resume)
        load_checkpoint_file(path)  # a missing, truncated, partial or foreign checkpoint fails here, with its name
    strategy = str(cfg.trainer.strategy)
    if path.is_dir() and not strategy.startswith("deepspeed"):
        raise ConfigError(f"resume: {path} is a DeepSpeed checkpoint folder, which trainer.strategy={strategy} "
                          "cannot read: resume with the deepspeed_stage_N strategy that wrote it")
    if strategy.startswith("deepspeed"):
        if not path.is_dir():
            raise ConfigError(f"resume: {path} is a checkpoint file; trainer.strategy={strategy} resumes DeepSpeed "
                              "checkpoint folders only: resume with the strategy that wrote it (ddp, fsdp or auto)")
        from relvid.models.adapter_file import open_deepspeed_checkpoint

        stage = open_deepspeed_checkpoint(path)[0].stage
        if f"deepspeed_stage_{stage}" != strategy:
            raise ConfigError(f"resume: {path} was written by ZeRO stage {stage}; trainer.strategy={strategy} "
                              f"cannot read it: resume with trainer.strategy=deepspeed_stage_{stage}")
    return str(path)


def check_cache_fits_model(records, transformer, cache_dir: str | Path) -> None:
    """The cache's latents and text embeddings against the backbone's input widths, before step 0
    (otherwise a raw matmul or reshape error at the first forward)."""
    from relvid.data.cache import CacheError

    config = transformer.config
    patch = int(config.patch_size)
    first = records[0]
    c, _, h, w = first.latent_shape
    where = f"{cache_dir}: clip {first.clip_id}"
    fix = ("cache the clips with the codec and text encoder of this model (model.codec, model.text_encoder; "
           "`relvid preprocess`), or point model.path / model.preset at the model the cache was made for")
    if c != int(config.in_channels):
        raise CacheError(f"{where}: latents have {c} channels, the model takes {config.in_channels}. Fix: {fix}")
    if int(first.text_embeds.shape[1]) != int(config.text_embed_dim):
        raise CacheError(f"{where}: text embeddings are {first.text_embeds.shape[1]} wide, the model takes "
                         f"{config.text_embed_dim}. Fix: {fix}")
    if h % patch or w % patch:
        raise CacheError(f"{where}: the latent grid {h}x{w} does not divide into the model's {patch}x{patch} "
                         "patches. Fix: preprocess the clips at a height and width the codec maps to an even "
                         "latent grid (multiples of 16 for Mochi)")


def precision(cfg: DictConfig) -> str:
    if cfg.trainer.precision != "auto":
        return str(cfg.trainer.precision)
    return "bf16-mixed" if wants_gpu(cfg) else "32-true"


# The DataModule's sampler resumes mid-run exactly (it starts at the restored global step), so
# Lightning's generic warning about resuming inside an epoch does not apply.
warnings.filterwarnings("ignore", message=r".*resuming from a checkpoint that ended before the epoch ended.*")
# diffusers' Mochi RoPE asks for fp32 autocast, which the CPU does not have: harmless, and noisy.
warnings.filterwarnings("ignore", message="In CPU autocast, but the target dtype is not supported")
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")  # inside Lightning


RUN_INFO_NAME = "run_info.json"


class RunInfo(L.Callback):
    """<output_dir>/run_info.json when training starts (the model on its device, a resumed run's step
    restored, before the first step): the transformer's parameter bytes by device and dtype, all of them and
    those trained, so a user sees where the base is and in what dtype it is stored (model.storage_dtype)."""

    def __init__(self, out: Path) -> None:
        self.path = out / RUN_INFO_NAME

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        import json

        import torch

        from relvid.files import atomic_write
        from relvid.models.backbone import parameter_bytes
        from relvid.models.offload import block_offload

        if not trainer.is_global_zero:
            return
        transformer = pl_module.transformer
        trained = pl_module.trained_parameters()
        model = pl_module.cfg.model
        # blocks offloaded to model.offload_dir hold no host memory: their bytes are listed under "disk"
        offload = block_offload(transformer)
        on_disk = offload.managed if offload is not None and offload.folder is not None else set()
        where = parameter_bytes(p for p in transformer.parameters() if id(p) not in on_disk)
        if on_disk:
            where["disk"] = parameter_bytes(p for p in transformer.parameters() if id(p) in on_disk)["cpu"]
        info = {
            "step": int(trainer.global_step),
            "transformer": {
                # the dtype each layer computes in, and the one the base's linear weights are kept in between uses
                "compute_dtype": str(getattr(transformer, "dtype", "")).removeprefix("torch."),
                "storage_dtype": model.storage_dtype,
                "parameter_bytes": where,
                "trained_parameter_bytes": parameter_bytes(trained.values()),
                "parameters": sum(p.numel() for p in transformer.parameters()),
                "trained_parameters": sum(p.numel() for p in trained.values()),
            },
            "torch": torch.__version__,
        }
        atomic_write(self.path, json.dumps(info, indent=2) + "\n")


def skip_stored_base_in_ddp_sync(module: L.LightningModule) -> None:
    """DDP broadcasts every parameter from rank 0 when it wraps the model, and gloo (and older NCCL) cannot
    send fp8 tensors. The base stored in model.storage_dtype is frozen and loaded alike on every rank, so
    DDP leaves those parameters out."""
    from torch.nn.parallel import DistributedDataParallel

    from relvid.models.backbone import resolve_storage_dtype

    storage = resolve_storage_dtype(module.cfg.model.storage_dtype)
    if storage is not None:
        stored = [name for name, p in module.named_parameters() if p.dtype == storage and not p.requires_grad]
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, stored)


def optional_callbacks(cfg: DictConfig) -> list[L.Callback]:
    """Previews and judged relation accuracy, when their every_n_steps is set."""
    out: list[L.Callback] = []
    if cfg.preview.every_n_steps > 0 or cfg.preview.at_start:
        from relvid.training.callbacks.preview import PreviewCallback

        out.append(PreviewCallback.from_config(cfg))
    if cfg.relation_accuracy.every_n_steps > 0:
        from relvid.training.callbacks.relation_accuracy import RelationAccuracyCallback

        out.append(RelationAccuracyCallback.from_config(cfg))
    return out


class RunWandbLogger(WandbLogger):
    """Lightning's W&B logger that ends the W&B run it started when the fit ends, with everything written
    out: Lightning leaves the run open (the next run in the same process would log into it), and W&B's
    finish returns before its service has written an offline run's log."""

    def __init__(self, **kwargs) -> None:
        import wandb

        super().__init__(**kwargs)
        self._owns_run = wandb.run is None  # Lightning logs into a W&B run the caller already started
        self._finished = False

    def finalize(self, status: str) -> None:
        import wandb

        super().finalize(status)
        if self._experiment is not None and self._owns_run and not self._finished:
            self._finished = True
            self._experiment.finish(exit_code=0 if status in ("success", "finished") else 1)
            wandb.teardown()  # waits for W&B's service to write the run out and stop


def wandb_logger(cfg: DictConfig, out: Path) -> RunWandbLogger:
    """W&B as trainer.wandb says, writing under <out>/wandb; a resumed run continues the folder's last W&B run."""
    from relvid.config import command_view

    try:
        import wandb  # noqa: F401  (Lightning's WandbLogger imports it only when the run starts)
    except ImportError:
        raise ConfigError(f"trainer.logger={cfg.trainer.logger}: Weights & Biases is not installed; pip install "
                          "wandb, or set trainer.logger=tensorboard") from None
    w = cfg.trainer.wandb
    latest = out / "wandb" / "latest-run"  # W&B's link to the folder's newest run: <mode>-run-<time>-<id>
    run_id = latest.resolve().name.rsplit("-", 1)[-1] if cfg.resume is not None and latest.exists() else None
    return RunWandbLogger(project=w.project, entity=w.entity, name=w.name or out.name, save_dir=str(out),
                          id=run_id, mode=w.mode, tags=list(w.tags),
                          config=OmegaConf.to_container(command_view(cfg, "train")))


def training_logger(cfg: DictConfig, out: Path) -> list:
    """The loggers trainer.logger names. TensorBoard logs in <out>/tensorboard; where tensorboard is not
    installed (a bare GPU image), CSV files in <out>/csv instead, said in one line, so training still runs.
    W&B (wandb, both): see wandb_logger."""
    import importlib.util

    loggers = []
    if cfg.trainer.logger in ("tensorboard", "both"):
        if importlib.util.find_spec("tensorboard") is not None or importlib.util.find_spec("tensorboardX") is not None:
            loggers.append(TensorBoardLogger(save_dir=str(out), name="tensorboard", version=""))
        else:
            from lightning.pytorch.loggers import CSVLogger

            print(f"relvid: tensorboard is not installed; metrics go to {out / 'csv'} (pip install tensorboard for "
                  "TensorBoard logs and preview videos)", flush=True)
            loggers.append(CSVLogger(save_dir=str(out), name="csv", version=""))
    if cfg.trainer.logger in ("wandb", "both"):
        loggers.append(wandb_logger(cfg, out))
    return loggers


def build_trainer(cfg: DictConfig, extra_callbacks: Sequence[L.Callback] = ()) -> L.Trainer:
    out = Path(cfg.output_dir)
    callbacks: list[L.Callback] = [
        MemoryBankCallback(make_memory_bank(cfg.rcl)),
        LearningRateMonitor(logging_interval="step"),
        FinalAdapters(out / "adapters"),
        LoRASnapshots.from_config(cfg),  # loras/<relation>_step<NNNNNN>.safetensors at each checkpoint
        ModelCheckpoint(dirpath=checkpoint_dir(cfg), filename="step{step:06d}", auto_insert_metric_name=False,
                        every_n_train_steps=int(cfg.trainer.checkpoint_every), save_top_k=-1, save_last=True),
        CrashCheckpoint(checkpoint_dir(cfg)),
        StopOnSignal(checkpoint_dir(cfg)),
        RunInfo(out),
        *extra_callbacks,
    ]
    if cfg.trainer.progress_bar:
        batches = int(cfg.trainer.max_steps) * int(cfg.trainer.accumulate_grad_batches)  # what the bar counts
        refresh = progress_refresh_rate(int(cfg.trainer.progress_refresh), batches)
        callbacks.append(TQDMProgressBar(refresh_rate=refresh))
    callbacks.extend(optional_callbacks(cfg))
    strategy = build_strategy(cfg)
    deepspeed = str(cfg.trainer.strategy).startswith("deepspeed")  # writes its own checkpoint folders
    return L.Trainer(
        plugins=None if deepspeed else [AtomicCheckpointIO()],
        default_root_dir=str(out),
        max_steps=int(cfg.trainer.max_steps),  # optimizer steps
        # micro-batches per optimizer step; Lightning divides each one's loss by it before the backward
        accumulate_grad_batches=int(cfg.trainer.accumulate_grad_batches),
        accelerator=cfg.trainer.accelerator,
        devices=cfg.trainer.devices,
        num_nodes=int(cfg.trainer.num_nodes),
        strategy=strategy,
        precision=precision(cfg),
        logger=training_logger(cfg, out),
        callbacks=callbacks,
        log_every_n_steps=int(cfg.trainer.log_every_n_steps),
        gradient_clip_val=float(cfg.optim.grad_clip) or None,
        enable_progress_bar=bool(cfg.trainer.progress_bar),
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,  # RelationDataModule shards by rank itself
        deterministic=bool(cfg.trainer.deterministic),
    )


def run(cfg: DictConfig, extra_callbacks: Sequence[L.Callback] = ()) -> Path:
    """Train as configured; returns the output folder (config, checkpoints, logs, adapters)."""
    check_accelerator(cfg)  # before anything slow: a GPU config on a machine without one
    if not cfg.data.cache_dir:
        raise ConfigError("data.cache_dir: not set; point it at a clip cache made by `relvid preprocess` "
                          "(or set RELVID_CACHE)")
    ckpt_path = resolve_resume(cfg)
    out = Path(cfg.output_dir)
    problem = writable_folder(out)  # before the cache is read or a model loaded
    if problem is not None:
        raise ConfigError(f"output_dir: cannot write into {out} ({problem}); give a folder you can write to")
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    datamodule = RelationDataModule(
        cfg.data.cache_dir, relation=cfg.relation,
        batch_size=int(cfg.data.batch_size), num_workers=int(cfg.data.num_workers), seed=int(cfg.seed),
        caption_dropout=float(cfg.data.caption_dropout), total_steps=int(cfg.trainer.max_steps),
        sample_posterior=bool(cfg.data.sample_posterior),
    )
    datamodule.setup("fit")  # fail on a bad cache before the (slow) backbone load
    old_format = [r.meta["clip_id"] for r in datamodule.dataset.records if r.meta.get("format_version") == "1"]
    if cfg.hmt.relation_mask == "union" and old_format:
        warnings.warn(f"hmt.relation_mask=union: {len(old_format)} clip(s) of {cfg.data.cache_dir} (e.g. "
                      f"{old_format[0]}) were cached before clip format 2 and hold no per-frame union; they train "
                      "with the max of the subjects' masks (hmt.relation_mask=max). Re-run `relvid preprocess` "
                      "into a new cache for the union", stacklevel=2)
    trainer = build_trainer(cfg, extra_callbacks)
    if trainer.is_global_zero:
        name = "config.yaml" if ckpt_path is None else f"config.resume-{time.strftime('%Y%m%d-%H%M%S')}.yaml"
        save_config(cfg, out / name, command="train")
    module = RelationModule(cfg)
    skip_stored_base_in_ddp_sync(module)
    check_cache_fits_model(datamodule.dataset.records, module.transformer, cfg.data.cache_dir)
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    except NonFiniteError as err:  # name what is left to go on from
        newest = newest_checkpoint(checkpoint_dir(cfg))
        kept = (f"the last good checkpoint is {newest[0]} (step {newest[1]})" if newest
                else "no checkpoint was written before it")
        raise NonFiniteError(f"{err}; {kept}") from None
    stop = next(c for c in trainer.callbacks if isinstance(c, StopOnSignal))
    interrupted = stop.interruption()
    if interrupted is not None:
        raise interrupted
    return out

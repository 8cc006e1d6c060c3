"""Assemble and run a training job from a validated config: data, module, callbacks, trainer."""

from __future__ import annotations

import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

import lightning as L
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import TensorBoardLogger
from omegaconf import DictConfig

from relvid.config import ConfigError, save_config
from relvid.data.datamodule import RelationDataModule
from relvid.errors import OutputExistsError
from relvid.training.callbacks.adapter_export import FinalAdapters
from relvid.training.callbacks.crash_checkpoint import CrashCheckpoint
from relvid.training.callbacks.memory_bank import MemoryBankCallback
from relvid.training.module import RelationModule, wants_gpu
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


def resolve_resume(cfg: DictConfig) -> str | None:
    """The checkpoint to resume from (None for a fresh run); refuses to overwrite a finished run."""
    ckpt_dir = checkpoint_dir(cfg)
    if cfg.resume is None:
        existing = sorted(ckpt_dir.glob("*.ckpt")) if ckpt_dir.is_dir() else []
        if existing:
            raise RunExistsError(
                f"{cfg.output_dir} already holds checkpoints ({existing[-1].name}, ...): resume it with "
                "resume=last, or set output_dir=<a new folder>"
            )
        return None
    path = ckpt_dir / "last.ckpt" if cfg.resume == "last" else Path(cfg.resume)
    if not path.is_file():
        raise ConfigError(f"resume: checkpoint {path} not found (resume=last looks for {ckpt_dir}/last.ckpt)")
    return str(path)


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


def optional_callbacks(cfg: DictConfig) -> list[L.Callback]:
    """Previews and judged relation accuracy, when their every_n_steps is set."""
    out: list[L.Callback] = []
    if cfg.preview.every_n_steps > 0:
        from relvid.training.callbacks.preview import PreviewCallback

        out.append(PreviewCallback.from_config(cfg))
    if cfg.relation_accuracy.every_n_steps > 0:
        from relvid.training.callbacks.relation_accuracy import RelationAccuracyCallback

        out.append(RelationAccuracyCallback.from_config(cfg))
    return out


def build_trainer(cfg: DictConfig, extra_callbacks: Sequence[L.Callback] = ()) -> L.Trainer:
    out = Path(cfg.output_dir)
    callbacks: list[L.Callback] = [
        MemoryBankCallback(int(cfg.rcl.bank_size)),
        LearningRateMonitor(logging_interval="step"),
        FinalAdapters(out / "adapters"),
        ModelCheckpoint(dirpath=checkpoint_dir(cfg), filename="step{step:06d}", auto_insert_metric_name=False,
                        every_n_train_steps=int(cfg.trainer.checkpoint_every), save_top_k=-1, save_last=True),
        CrashCheckpoint(checkpoint_dir(cfg)),
        *extra_callbacks,
    ]
    if cfg.trainer.progress_bar:
        refresh = progress_refresh_rate(int(cfg.trainer.progress_refresh), int(cfg.trainer.max_steps))
        callbacks.append(TQDMProgressBar(refresh_rate=refresh))
    callbacks.extend(optional_callbacks(cfg))
    strategy = build_strategy(cfg)
    return L.Trainer(
        default_root_dir=str(out),
        max_steps=int(cfg.trainer.max_steps),
        accelerator=cfg.trainer.accelerator,
        devices=cfg.trainer.devices,
        num_nodes=int(cfg.trainer.num_nodes),
        strategy=strategy,
        precision=precision(cfg),
        logger=TensorBoardLogger(save_dir=str(out), name="tensorboard", version=""),
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
    if not cfg.data.cache_dir:
        raise ConfigError("data.cache_dir: not set; point it at a clip cache made by `relvid preprocess` "
                          "(or set RELVID_CACHE)")
    ckpt_path = resolve_resume(cfg)
    out = Path(cfg.output_dir)
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    datamodule = RelationDataModule(
        cfg.data.cache_dir, relation=cfg.relation,
        batch_size=int(cfg.data.batch_size), num_workers=int(cfg.data.num_workers), seed=int(cfg.seed),
        caption_dropout=float(cfg.data.caption_dropout), total_steps=int(cfg.trainer.max_steps),
        sample_posterior=bool(cfg.data.sample_posterior),
    )
    datamodule.setup("fit")  # fail on a bad cache before the (slow) backbone load
    trainer = build_trainer(cfg, extra_callbacks)
    if trainer.is_global_zero:
        name = "config.yaml" if ckpt_path is None else f"config.resume-{time.strftime('%Y%m%d-%H%M%S')}.yaml"
        save_config(cfg, out / name, command="train")
    module = RelationModule(cfg)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    return out

"""What keeps a training run from going silently wrong or losing work: checkpoints written whole in
their own folder and read without running code, a stop at the first non-finite loss or gradient,
and SIGINT / SIGTERM turned into a stop at the next step boundary with a consistent checkpoint."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from relvid.errors import UserError
from relvid.files import atomic_path

INTERRUPT_CHECKPOINT = "on_exception.ckpt"  # written at a step boundary, so resuming it is exact


class NonFiniteError(UserError):
    """The loss or a gradient is NaN or infinite: training stops before the weights take it."""


class TrainingInterrupted(UserError):
    """SIGINT or SIGTERM stopped the run at a step boundary; the state is in a checkpoint."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum  # the shell's convention for "ended by a signal"


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written through a temporary file in their own folder and renamed (Lightning's own
    writer stages them in the system temp folder and then moves them: a copy that a full disk cuts
    short when outputs live on another file system), and read with weights_only=True, so a crafted
    checkpoint cannot run code."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO.save_checkpoint takes no storage_options")
        with atomic_path(path) as tmp:
            torch.save(checkpoint, tmp)

    def load_checkpoint(self, path, map_location: Any | None = None, weights_only: bool | None = None):
        return load_checkpoint_file(path, map_location or "cpu")


def load_checkpoint_file(path, map_location: Any = "cpu") -> dict[str, Any]:
    """A training checkpoint read with weights_only=True; a clear error for a missing, truncated or
    foreign file. A DeepSpeed checkpoint folder is checked whole, every file in it read with
    weights_only=True (memory-mapped), and rank 0's model states (Lightning's checkpoint) returned."""
    from relvid.config import ConfigError

    path = Path(path)
    if path.is_dir():
        from relvid.models.adapter_file import CheckpointError, read_deepspeed_checkpoint

        try:
            return read_deepspeed_checkpoint(path)
        except CheckpointError as err:
            raise ConfigError(f"resume: {err}") from None
    if not path.is_file():
        raise ConfigError(f"resume: checkpoint {path} not found")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # unpickling, zip and EOF errors of many kinds: name the file
        raise ConfigError(f"resume: {path} is not a readable relvid checkpoint ({type(err).__name__}: "
                          f"{str(err).splitlines()[0][:200]}); resume from another checkpoint of the run") from None
    if not isinstance(checkpoint, dict) or "relvid" not in checkpoint or "global_step" not in checkpoint:
        raise ConfigError(f"resume: {path} was not written by `relvid train` (no relvid section)")
    return checkpoint


def check_finite_loss(loss: torch.Tensor, step: int, parts: dict[str, torch.Tensor]) -> None:
    """Stop at the first non-finite loss, naming its parts, before backward touches the weights."""
    if bool(torch.isfinite(loss)):
        return
    detail = ", ".join(f"{k}={float(v):.4g}" for k, v in parts.items())
    raise NonFiniteError(f"non-finite loss at step {step} ({detail}): training stopped before the weights "
                         "took it. Lower optim.lr, check the cache with `relvid validate-cache`, or set "
                         "optim.grad_clip")


def check_finite_gradients(named: dict[str, torch.nn.Parameter], step: int) -> None:
    """Stop at the first non-finite gradient, before the optimizer applies it."""
    for name, param in named.items():
        if param.grad is not None and not bool(torch.isfinite(param.grad).all()):
            raise NonFiniteError(f"non-finite gradient of {name} at step {step}: training stopped before the "
                                 "optimizer applied it. Lower optim.lr or set optim.grad_clip")


class StopOnSignal(L.Callback):
    """SIGINT (Ctrl-C) and SIGTERM (Slurm preemption, docker stop) ask the run to stop; it stops at the
    next step boundary, on every rank together, after saving a consistent checkpoint. A second Ctrl-C
    stops at once (with no checkpoint of the half-done step)."""

    def __init__(self, dirpath: str | Path) -> None:
        self.dirpath = Path(dirpath)
        self.requested: int | None = None  # the signal received
        self.stopped_at: tuple[int, Path] | None = None  # (step, checkpoint) when it stopped
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame) -> None:
        if self.requested is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # asked twice: stop now
        self.requested = signum
        print(f"\nrelvid: {signal.Signals(signum).name} received: stopping after this step "
              "(Ctrl-C again to stop at once)", flush=True)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        import threading

        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous[signum] = signal.signal(signum, self._handle)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx) -> None:
        self._step_before = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        # Only where an optimizer step ended (trainer.accumulate_grad_batches > 1: not after every micro-batch), so
        # the checkpoint holds a whole step; every rank is at the same micro-batch, so all decide together here.
        if trainer.global_step == getattr(self, "_step_before", -1):
            return
        # Every rank takes part in the decision, so all of them stop at the same step.
        if not trainer.strategy.reduce_boolean_decision(self.requested is not None, all=False):
            return
        path = self.dirpath / INTERRUPT_CHECKPOINT
        trainer.save_checkpoint(path)
        self.stopped_at = (trainer.global_step, path)
        trainer.should_stop = True

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def interruption(self) -> TrainingInterrupted | None:
        """The error the run ends with when a signal stopped it, else None."""
        if self.stopped_at is None:
            return None
        step, path = self.stopped_at
        signum = self.requested if self.requested is not None else signal.SIGTERM
        return TrainingInterrupted(f"{signal.Signals(signum).name}: stopped at step {step}; the state is in {path}. "
                                   "Continue with resume=last (make resume)", signum)


"""A training run never goes silently wrong or loses work: it stops at the first non-finite loss,
stops at a step boundary on SIGINT / SIGTERM with a checkpoint that resumes exactly, never writes
over another run, writes checkpoints whole and never runs code from a checkpoint."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch

from relvid.cli import main
from relvid.config import ConfigError
from relvid.errors import UserError
from relvid.models.adapter_file import load_adapters
from relvid.training.run import RunExistsError, run
from relvid.training.safety import NonFiniteError, TrainingInterrupted


@pytest.fixture
def cache(random_cache):
    return random_cache(n_clips=4, relation="shaking_hands", seed=1).root


def adapters_of(out: Path) -> dict:
    return load_adapters(out / "adapters" / "relvid_adapters.safetensors")[1]


def test_a_diverging_run_stops_at_the_first_non_finite_loss_and_names_what_is_kept(tmp_path, cache, tiny_cfg):
    cfg = tiny_cfg("optim.lr=1e30", "trainer.max_steps=6", "trainer.checkpoint_every=1", "optim.warmup_steps=0")
    with pytest.raises(NonFiniteError, match=r"non-finite (loss|gradient).*step \d.*last good checkpoint is .*step"):
        run(cfg)
    assert not (tmp_path / "run" / "adapters").exists()  # no final adapters from a diverged run
    assert not (tmp_path / "run" / "checkpoints" / "on_exception.ckpt").exists()  # nothing half-stepped


def test_the_command_line_reports_divergence_in_one_line(tmp_path, cache, repo_root, capsys):
    code = main(["train", str(repo_root / "configs" / "tiny.yaml"), f"data.cache_dir={cache}",
                 f"output_dir={tmp_path / 'cli'}", "optim.lr=1e30", "optim.warmup_steps=0",
                 "trainer.progress_bar=false"])
    assert code == 2
    assert "non-finite" in capsys.readouterr().err


class SignalInsideTheOptimizerStep(L.Callback):
    """Sends a real signal to this process from inside the optimizer step of `step` (1-based)."""

    def __init__(self, step: int, signum: int) -> None:
        self.step, self.signum = step, signum

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if trainer.global_step + 1 == self.step:
            os.kill(os.getpid(), self.signum)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_at_the_step_boundary_and_resume_last_is_exact(tmp_path, cache, tiny_cfg, signum, capsys):
    whole = run(tiny_cfg("trainer.max_steps=6", "trainer.checkpoint_every=100", f"output_dir={tmp_path / 'whole'}"))
    cfg = tiny_cfg("trainer.max_steps=6", "trainer.checkpoint_every=2")
    # the handler the process had before (Python's default_int_handler; SIG_IGN in a job started with nohup or `&`)
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(TrainingInterrupted, match=r"stopped at step 3.*on_exception.ckpt.*resume=last") as stop:
        run(cfg, extra_callbacks=[SignalInsideTheOptimizerStep(3, signum)])
    assert stop.value.exit_code == 128 + signum  # a non-zero exit: `train && export` stops here
    ckpt = tmp_path / "run" / "checkpoints" / "on_exception.ckpt"
    assert torch.load(ckpt, weights_only=True)["global_step"] == 3  # the whole step, not half of it
    assert not (tmp_path / "run" / "adapters").exists()
    assert signal.getsignal(signal.SIGINT) is before  # handlers are given back
    # resume=last picks the newest consistent checkpoint (on_exception.ckpt at step 3, not step000002.ckpt)
    out = run(tiny_cfg("trainer.max_steps=6", "trainer.checkpoint_every=2", "resume=last"))
    assert f"resuming from {ckpt} (step 3)" in capsys.readouterr().out
    a, b = adapters_of(whole), adapters_of(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class SignalInFirstMicroBatch(L.Callback):
    """Sends a real signal after the first micro-batch of optimizer step `step` (1-based)."""

    def __init__(self, step: int, signum: int) -> None:
        self.step, self.signum, self.sent = step, signum, False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step + 1 == self.step and not self.sent:
            self.sent = True
            os.kill(os.getpid(), self.signum)


def test_a_signal_between_micro_batches_stops_after_the_whole_step_and_resumes_exactly(tmp_path, cache, tiny_cfg):
    accumulate = ("trainer.accumulate_grad_batches=2", "trainer.max_steps=4")
    whole = run(tiny_cfg(*accumulate, "trainer.checkpoint_every=100", f"output_dir={tmp_path / 'whole'}"))
    cfg = tiny_cfg(*accumulate, "trainer.checkpoint_every=100")
    with pytest.raises(TrainingInterrupted, match=r"stopped at step 3"):
        run(cfg, extra_callbacks=[SignalInFirstMicroBatch(3, signal.SIGTERM)])
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "on_exception.ckpt", weights_only=True)
    assert ckpt["global_step"] == 3  # both micro-batches of step 3, not the first alone
    out = run(tiny_cfg(*accumulate, "trainer.checkpoint_every=100", "resume=last"))
    a, b = adapters_of(whole), adapters_of(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.distributed
def test_sigterm_to_a_training_process_checkpoints_and_exits_non_zero(tmp_path, cache, repo_root):
    args = [sys.executable, "-m", "relvid.cli", "train", str(repo_root / "configs" / "tiny.yaml"),
            f"data.cache_dir={cache}", f"output_dir={tmp_path / 'run'}", "trainer.max_steps=100000",
            "trainer.checkpoint_every=1", "trainer.progress_bar=false", "rcl.enabled=false"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(repo_root))
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "run" / "checkpoints" / "step000002.ckpt").exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-2000:]
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "SIGTERM: stopped at step" in err and "resume=last" in err
    assert torch.load(tmp_path / "run" / "checkpoints" / "on_exception.ckpt", weights_only=True)["global_step"] >= 2
    assert not (tmp_path / "run" / "adapters").exists()


def test_resume_last_without_checkpoints_and_unreadable_checkpoints_are_clear_errors(tmp_path, cache, tiny_cfg):
    with pytest.raises(ConfigError, match="resume=last: .* holds no readable checkpoint; leave resume unset"):
        run(tiny_cfg("resume=last"))
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"not a checkpoint" * 10)
    with pytest.raises(ConfigError, match=r"junk.ckpt is not a readable relvid checkpoint"):
        run(tiny_cfg(f"resume={junk}"))
    out = run(tiny_cfg("trainer.max_steps=2", "trainer.checkpoint_every=1", f"output_dir={tmp_path / 'good'}"))
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes((out / "checkpoints" / "last.ckpt").read_bytes()[:300])
    with pytest.raises(ConfigError, match="truncated.ckpt is not a readable relvid checkpoint"):
        run(tiny_cfg(f"resume={truncated}"))


def test_a_new_run_never_writes_over_another_runs_folder(tmp_path, cache, tiny_cfg):
    out = run(tiny_cfg("trainer.max_steps=2"))
    for ckpt in (out / "checkpoints").glob("*.ckpt"):
        ckpt.unlink()  # a finished run whose checkpoints were cleaned up: its adapters and config remain
    before = (out / "adapters" / "relvid_adapters.safetensors").read_bytes()
    with pytest.raises(RunExistsError, match="already holds another run.*overwrite=true"):
        run(tiny_cfg("trainer.max_steps=2", "seed=5"))
    assert (out / "adapters" / "relvid_adapters.safetensors").read_bytes() == before
    run(tiny_cfg("trainer.max_steps=2", "seed=5", "overwrite=true"))
    assert (out / "adapters" / "relvid_adapters.safetensors").read_bytes() != before
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ConfigError, match="output_dir: .*afile is a file"):
        run(tiny_cfg(f"output_dir={tmp_path / 'afile'}"))


def test_a_full_disk_keeps_the_previous_checkpoint_whole(tmp_path):
    """RLIMIT_FSIZE makes the next write fail midway, as a full disk does."""
    import resource

    from relvid.training.safety import AtomicCheckpointIO

    good = tmp_path / "last.ckpt"
    torch.save({"global_step": 1, "relvid": {}, "w": torch.zeros(4)}, good)
    before = good.read_bytes()
    limits, xfsz = resource.getrlimit(resource.RLIMIT_FSIZE), signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, limits[1]))
    try:
        with pytest.raises((OSError, RuntimeError)):  # EFBIG, seen through torch's zip writer
            AtomicCheckpointIO().save_checkpoint({"global_step": 2, "w": torch.zeros(100_000)}, good)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, xfsz)
    assert good.read_bytes() == before  # the good checkpoint is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # and no temporary file is left


class Payload:
    """Runs code when unpickled without weights_only: creates a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def crafted_checkpoint(path: Path, marker: Path) -> Path:
    torch.save({"global_step": 1, "relvid": {"spec": {}}, "state_dict": {}, "evil": Payload(marker)}, path)
    return path


@pytest.mark.parametrize("strategy", ["auto", "ddp", "fsdp"])
def test_resuming_a_crafted_checkpoint_runs_no_code_under_any_strategy(tmp_path, cache, tiny_cfg, strategy):
    from relvid.training.run import build_trainer

    marker = tmp_path / "pwned"
    ckpt = crafted_checkpoint(tmp_path / "evil.ckpt", marker)
    with pytest.raises(ConfigError, match="evil.ckpt is not a readable relvid checkpoint"):
        run(tiny_cfg(f"resume={ckpt}"))
    cfg = tiny_cfg(f"trainer.strategy={strategy}", "trainer.devices=1")
    trainer = build_trainer(cfg)
    with pytest.raises(Exception, match="not a readable relvid checkpoint|Weights only load failed"):
        trainer.strategy.checkpoint_io.load_checkpoint(ckpt)
    if strategy == "fsdp":  # its own loader reads the file itself
        with pytest.raises(ConfigError, match="not a readable relvid checkpoint"):
            trainer.strategy.load_checkpoint(ckpt)
    assert not marker.exists()


def test_no_command_that_reads_a_checkpoint_runs_code_from_it(tmp_path, capsys):
    from tests.helpers.configs import TINY

    marker = tmp_path / "pwned"
    ckpt = crafted_checkpoint(tmp_path / "evil.ckpt", marker)
    assert main(["export", str(ckpt), "--out", str(tmp_path / "export")]) == 2
    assert main(["import-reference", str(ckpt), "--out", str(tmp_path / "imported")]) == 2
    assert main(["sample", "--prompt", "x", "--adapters", str(ckpt), "--out", str(tmp_path / "s"), *TINY]) == 2
    assert main(["evaluate", "--relation", "hug", "--adapters", str(ckpt), "--out", str(tmp_path / "e"), *TINY]) == 2
    from relvid.toy.drivers.base import STATE_NAME, pretrain

    state = tmp_path / "toy" / STATE_NAME
    state.parent.mkdir()
    torch.save({"settings": {}, "evil": Payload(marker)}, state)

    with pytest.raises(UserError, match=f"{state} is not a readable toy-base pretraining state.*delete it"):
        pretrain(state.parent, steps=1, batch_size=1, save_every=1)
    assert not marker.exists()
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 4
    for line, command in zip(lines, ["export", "import-reference", "sample", "evaluate"], strict=True):
        assert line.startswith(f"relvid {command}: error: ") and "evil.ckpt" in line  # the file is named


def test_export_and_import_refuse_non_finite_weights(tmp_path, trained_adapters, capsys):
    from relvid.models.adapter_file import save_adapter_state

    adapters, _, spec = trained_adapters
    _, state, _ = load_adapters(adapters)
    key = next(k for k in state if "lora_B" in k)
    state[key] = torch.full_like(state[key], float("nan"))
    with pytest.raises(Exception, match=f"non-finite.*{key.split('/')[0]}"):
        save_adapter_state(tmp_path / "bad.safetensors", state, spec)
    from safetensors.torch import save_file

    save_file(state, tmp_path / "nan.safetensors", metadata=load_adapters_metadata(adapters))
    assert main(["export", str(tmp_path / "nan.safetensors"), "--out", str(tmp_path / "export")]) == 2
    assert "non-finite" in capsys.readouterr().err
    assert not (tmp_path / "export").exists()


def load_adapters_metadata(path: Path) -> dict:
    import safetensors

    with safetensors.safe_open(str(path), framework="pt") as f:
        return dict(f.metadata())


@pytest.mark.parametrize("options,message", [
    ({"latent_shape": (8, 3, 8, 8)}, "latents have 8 channels, the model takes 4"),
    ({"text_dim": 48}, "text embeddings are 48 wide, the model takes 32"),
    ({"latent_shape": (4, 3, 7, 8)}, "latent grid 7x8 does not divide into the model's 2x2 patches"),
])
def test_a_cache_that_does_not_fit_the_model_is_refused_before_step_0(tmp_path, random_cache, tiny_cfg, options,
                                                                       message):
    from relvid.data.cache import CacheError

    random_cache(n_clips=2, relation="shaking_hands", seed=1, **options)
    with pytest.raises(CacheError, match=message):
        run(tiny_cfg("trainer.max_steps=2"))
    assert not (tmp_path / "run" / "checkpoints").exists()  # refused before any step


def test_overwrite_starts_afresh_without_the_old_runs_checkpoints(tmp_path, cache, tiny_cfg):
    run(tiny_cfg("trainer.max_steps=4", "trainer.checkpoint_every=1"))
    out = run(tiny_cfg("trainer.max_steps=2", "trainer.checkpoint_every=1", "overwrite=true"))
    names = sorted(p.name for p in (out / "checkpoints").glob("*.ckpt"))
    assert names == ["last.ckpt", "step000001.ckpt", "step000002.ckpt"]  # no old step 3/4, no "-v1" copies
    assert torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2


def test_a_checkpoint_with_non_finite_adapters_is_refused_by_export_and_sample(tmp_path, trained_adapters, capsys):
    from relvid.models.lora import lora_parameters
    from tests.helpers.configs import TINY

    _, model, spec = trained_adapters
    state = {f"transformer.{k}": v.detach().clone() for k, v in lora_parameters(model).items()}
    key = next(k for k in state if ".lora_B." in k)
    state[key].fill_(float("inf"))
    ckpt = tmp_path / "step8.ckpt"
    torch.save({"state_dict": state, "relvid": {"spec": spec.to_dict()}}, ckpt)
    assert main(["export", str(ckpt), "--out", str(tmp_path / "export")]) == 2
    assert main(["sample", "--prompt", "x", "--adapters", str(ckpt), "--out", str(tmp_path / "s"), *TINY]) == 2
    err = capsys.readouterr().err
    assert err.count("non-finite") == 2 and not (tmp_path / "export").exists() and not (tmp_path / "s").exists()

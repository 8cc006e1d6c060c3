"""Training draws its noise from CPU streams (the same numbers on every GPU model), and
trainer.deterministic=true makes a resumed run equal the uninterrupted one bit for bit."""

import os
import subprocess
import sys

import lightning as L
import pytest
import torch

from relvid.config import ConfigError
from relvid.losses.flow_matching import sample_sigmas
from relvid.models.adapter_file import load_adapters
from relvid.seeding import derive_seed
from relvid.training.module import _NOISE_STREAM, training_noise, training_speed
from relvid.training.run import run


@pytest.fixture
def cache(random_cache):
    return random_cache(n_clips=4, relation="shaking_hands", seed=1).root


@pytest.fixture
def restore_determinism(monkeypatch):
    """Lightning's deterministic=true switches torch's deterministic algorithms on for the whole process
    and sets CUBLAS_WORKSPACE_CONFIG: give both back to the tests that follow."""
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", "")  # remembers the value before (or its absence) ...
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG")  # ... and the run starts without one
    before = torch.are_deterministic_algorithms_enabled()
    yield
    torch.use_deterministic_algorithms(before)


def test_training_noise_is_a_cpu_stream_of_seed_step_and_rank():
    shape = (2, 4, 3, 4, 4)  # (B, C, f, h, w)
    noise, sigma = training_noise(shape, 7, 5, 1)
    gen = torch.Generator().manual_seed(derive_seed(7, 5, 1, _NOISE_STREAM))
    assert torch.equal(noise, torch.randn(shape, generator=gen))  # the CPU generator's numbers ...
    assert torch.equal(sigma, sample_sigmas(2, gen))  # ... then sigma from the same stream
    assert noise.dtype == sigma.dtype == torch.float32 and sigma.shape == (2,)
    for seed, step, rank in ((7, 6, 1), (7, 5, 0), (8, 5, 1)):  # another step, rank or seed: other noise
        assert not torch.equal(noise, training_noise(shape, seed, step, rank)[0])


def test_deterministic_mode_picks_a_deterministic_attention_kernel(tiny_cfg):
    gpu = ("trainer.accelerator=gpu", "trainer.deterministic=true")
    assert training_speed(tiny_cfg(*gpu)).sdpa_backend == "efficient"  # cuDNN's / flash's backward is not exact
    assert training_speed(tiny_cfg(*gpu, "speed.sdpa_backend=math")).sdpa_backend == "math"
    assert training_speed(tiny_cfg("trainer.accelerator=gpu")).sdpa_backend == "auto"  # fast kernels otherwise
    assert training_speed(tiny_cfg("trainer.deterministic=true")).sdpa_backend == "auto"  # the CPU's math kernel
    for backend in ("flash", "cudnn"):
        with pytest.raises(ConfigError, match=f"speed.sdpa_backend: {backend}'s attention backward is not determ"):
            tiny_cfg("trainer.deterministic=true", f"speed.sdpa_backend={backend}")


class DeterministicProbe(L.Callback):
    """Records whether torch's deterministic algorithms are on while the steps run."""

    def __init__(self) -> None:
        self.on: list[bool] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.on.append(torch.are_deterministic_algorithms_enabled())


def test_deterministic_resume_equals_the_uninterrupted_run_bit_for_bit(tmp_path, cache, tiny_cfg,
                                                                         restore_determinism):
    settings = ("trainer.deterministic=true", "trainer.max_steps=6", "trainer.checkpoint_every=3",
                "optim.warmup_steps=2", "data.caption_dropout=0.3", "lora.dropout=0.1")
    probe = DeterministicProbe()
    whole = run(tiny_cfg(*settings), extra_callbacks=[probe])
    assert probe.on == [True] * 6
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"  # cuBLAS's deterministic workspace, for GPUs
    resumed = run(tiny_cfg(*settings, f"output_dir={tmp_path / 'resumed'}",
                           f"resume={whole / 'checkpoints' / 'step000003.ckpt'}"))
    _, a, _ = load_adapters(whole / "adapters" / "relvid_adapters.safetensors")
    _, b, _ = load_adapters(resumed / "adapters" / "relvid_adapters.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_training_noise_on_the_gpu_is_the_cpu_stream():
    noise, sigma = training_noise((1, 12, 4, 8, 8), 3, 2, 0, device="cuda")
    assert noise.device.type == sigma.device.type == "cuda"
    cpu_noise, cpu_sigma = training_noise((1, 12, 4, 8, 8), 3, 2, 0)
    assert torch.equal(noise.cpu(), cpu_noise) and torch.equal(sigma.cpu(), cpu_sigma)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_two_deterministic_gpu_runs_are_bit_identical(tmp_path, repo_root, random_cache):
    """Each run in a fresh `relvid train` process, as a user starts it (cuBLAS reads its workspace setting once)."""
    cache = random_cache(n_clips=4, relation="shaking_hands", seed=1).root
    adapters = []
    for name in ("a", "b"):
        subprocess.run([sys.executable, "-m", "relvid.cli", "train", str(repo_root / "configs" / "tiny.yaml"),
                        f"data.cache_dir={cache}", f"output_dir={tmp_path / name}", "trainer.accelerator=gpu",
                        "trainer.deterministic=true", "trainer.max_steps=3", "trainer.progress_bar=false",
                        "lora.dropout=0.1"], check=True, cwd=repo_root, timeout=300)
        adapters.append(load_adapters(tmp_path / name / "adapters" / "relvid_adapters.safetensors")[1])
    a, b = adapters
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

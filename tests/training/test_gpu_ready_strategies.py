"""What several GPUs meet first: the strategy `auto` picks, one rank failing, clipping under FSDP, DeepSpeed's
casts, and where each process loads the frozen base."""

import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
from lightning.pytorch.plugins.precision import DeepSpeedPrecision, FSDPPrecision
from lightning.pytorch.strategies import SingleDeviceStrategy
from lightning.pytorch.utilities import GradClipAlgorithmType

from relvid.config import load_config
from relvid.models.backbone import load_transformer, tiny_transformer
from relvid.training.run import build_trainer
from relvid.training.strategies import (
    SelectionGuard,
    StrategyConfigError,
    base_load_device,
    build_strategy,
    check_strategy,
    watch_ranks,
)
from tests.helpers import HELPERS_DIR


def preset(repo_root, name, *overrides):
    files = [repo_root / "configs" / "tiny.yaml"]
    if name != "auto":
        files.append(repo_root / "configs" / "strategy" / f"{name}.yaml")
    return load_config(files, list(overrides))


# --- trainer.strategy=auto ----------------------------------------------------------------------


def test_auto_with_several_processes_is_relvids_ddp(tmp_path, repo_root):
    cfg = preset(repo_root, "auto", "trainer.devices=2", f"output_dir={tmp_path / 'run'}")
    strategy = build_strategy(cfg)
    assert type(strategy).__name__ == "RelvidDDPStrategy" and isinstance(strategy, SelectionGuard)
    assert strategy._ddp_kwargs["find_unused_parameters"] is True  # as configs/strategy/ddp.yaml gets
    trainer = build_trainer(cfg)
    assert type(trainer.strategy).__name__ == "RelvidDDPStrategy" and trainer.world_size == 2
    # several nodes of one device each are several processes too
    nodes = build_strategy(preset(repo_root, "auto", "trainer.num_nodes=2"))
    assert type(nodes).__name__ == "RelvidDDPStrategy"
    # one device stays Lightning's single-device strategy (no DDP wrapper around one process)
    single = build_trainer(preset(repo_root, "auto", f"output_dir={tmp_path / 'one'}"))
    assert isinstance(single.strategy, SingleDeviceStrategy)


@pytest.mark.distributed
def test_a_failing_rank_ends_the_run_without_a_collective_crash_checkpoint(tmp_path, repo_root, random_cache):
    """Rank 1 fails between steps 2 and 3 (where a crash checkpoint used to be written): the run must end,
    non-zero, with no rank waiting in the checkpoint's barrier; the step checkpoints stay what resume takes."""
    random_cache(n_clips=4, relation="shaking_hands", seed=2)
    env = dict(os.environ, PYTHONPATH=str(repo_root), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, str(HELPERS_DIR / "crash_worker.py"), str(tmp_path), "auto", "1", "2",
                             "boundary"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=tmp_path, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=150)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the rank Lightning started too
        raise
    assert proc.returncode != 0, output[-3000:]
    assert "worker: strategy RelvidDDPStrategy" in output  # trainer.strategy=auto on 2 devices
    assert "worker: rank 1 fails at step 2" in output
    assert "no crash checkpoint is written with several processes" in output, output[-3000:]
    checkpoints = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert "on_exception.ckpt" not in checkpoints and "step000001.ckpt" in checkpoints, checkpoints


def test_watch_ranks_ends_the_others_when_one_fails():
    """What rank 0 runs for the ranks Lightning's launcher started: one failing ends the rest (real processes)."""
    failing = subprocess.Popen([sys.executable, "-c", "import sys; sys.exit(3)"])
    waiting = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])  # as if in a collective
    try:
        start = time.monotonic()
        failed = watch_ranks([failing, waiting], threading.Event(), grace_s=0.2, poll_s=0.05)
        assert failed == (failing.pid, 3)
        assert waiting.wait(timeout=10) != 0 and time.monotonic() - start < 30
    finally:
        waiting.kill()
    # ranks that all succeed, or this process ending by itself, end the watch without killing anything
    done = [subprocess.Popen([sys.executable, "-c", "pass"]) for _ in range(2)]
    assert watch_ranks(done, threading.Event(), grace_s=0.2, poll_s=0.05) is None
    stopping = threading.Event()
    stopping.set()
    survivor = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        assert watch_ranks([survivor], stopping, grace_s=0.2, poll_s=0.05) is None and survivor.poll() is None
    finally:
        survivor.kill()


# --- FSDP: optim.grad_clip ---------------------------------------------------------------------------


def test_fsdp_clips_the_lora_gradient_norm(repo_root):
    """Lightning's FSDPPrecision refuses norm clipping (optim.grad_clip > 0 crashed at the first optimizer
    step); relvid's clips the LoRA, which FSDP leaves whole on every rank, by its global norm."""
    strategy = build_strategy(preset(repo_root, "fsdp", "optim.grad_clip=1.0"))
    strategy.precision_plugin = FSDPPrecision("bf16-mixed")  # what the Trainer hands a strategy
    plugin = strategy.precision_plugin
    params = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(4))]
    params[0].grad, params[1].grad = torch.full((3,), 2.0), torch.full((4,), -2.0)  # norm 2 * sqrt(7)
    optimizer = torch.optim.AdamW(params)
    plugin.clip_gradients(optimizer, 1.0, GradClipAlgorithmType.NORM)
    norm = torch.linalg.vector_norm(torch.cat([p.grad for p in params]))
    torch.testing.assert_close(norm, torch.tensor(1.0))
    torch.testing.assert_close(params[0].grad, torch.full((3,), 7 ** -0.5))  # scaled, not clamped


# --- DeepSpeed: no bf16 casts of the LoRA or the batch ----------------------------------------------------


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_keeps_the_batch_and_the_lora_in_fp32(repo_root, stage):
    from lightning.fabric.strategies.deepspeed import _format_precision_config

    strategy = build_strategy(preset(repo_root, f"deepspeed_stage_{stage}"))
    config = dict(strategy.config)
    # what Lightning's setup does to the config for trainer.precision=bf16-mixed (auto on a GPU)
    _format_precision_config(config, "bf16-mixed", 0, 1000, 1, 16, 2)
    assert config["bf16"] == {"enabled": False} and config["fp16"] == {"enabled": False}
    strategy.precision_plugin = DeepSpeedPrecision("bf16-mixed")  # what the Trainer hands a strategy
    plugin = strategy.precision_plugin
    assert plugin.precision == "bf16-mixed"
    batch = {"latents": torch.randn(1, 4, 2, 4, 4), "text_mask": torch.ones(1, 3, dtype=torch.bool)}
    converted = plugin.convert_input(batch)
    assert converted["latents"].dtype == torch.float32 and torch.equal(converted["latents"], batch["latents"])
    lora = torch.nn.Linear(2, 2)
    assert plugin.convert_module(lora).weight.dtype == torch.float32


def test_deepspeed_engine_leaves_the_lora_fp32(repo_root, monkeypatch, tmp_path):
    """The real DeepSpeed engine (on the CPU, one process) with relvid's ZeRO-2 config: the LoRA stays fp32 and
    the frozen base keeps its bf16 (with DeepSpeed's bf16 mode the LoRA would come out bf16)."""
    import importlib

    deepspeed = pytest.importorskip("deepspeed")
    ds_torch = importlib.import_module("deepspeed.comm.torch")  # the module (deepspeed.comm.torch is torch)
    from lightning.fabric.strategies.deepspeed import _format_precision_config

    from relvid.training.module import RelationModule

    # DeepSpeed compiles a shared-memory fast path for CPU collectives first (minutes); it plays no part here
    monkeypatch.setattr(ds_torch, "build_shm_op", lambda: None)
    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(29400 + os.getpid() % 500), "RANK": "0",
                       "WORLD_SIZE": "1", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(key, value)
    cfg = preset(repo_root, "deepspeed_stage_2", "model.dtype=bf16")
    config = dict(build_strategy(cfg).config, train_micro_batch_size_per_gpu=1)
    _format_precision_config(config, "bf16-mixed", 0, 1000, 1, 16, 2)
    module = RelationModule(cfg)
    trainable = [p for p in module.parameters() if p.requires_grad]
    deepspeed.init_distributed("gloo", auto_mpi_discovery=False)
    try:
        deepspeed.initialize(model=module, optimizer=torch.optim.AdamW(trainable), model_parameters=trainable,
                             config=config, dist_init_required=False)
        dtypes = {("lora" if ".lora_" in n else "base", p.dtype) for n, p in module.named_parameters()}
        assert dtypes == {("lora", torch.float32), ("base", torch.bfloat16)}
    finally:
        torch.distributed.destroy_process_group()


def test_deepspeed_with_fp16_autocast_is_refused(repo_root):
    with pytest.raises(StrategyConfigError, match="trainer.precision=16-mixed would train the LoRA in fp16"):
        check_strategy(preset(repo_root, "deepspeed_stage_2", "trainer.precision=16-mixed"))


# --- where the frozen base is loaded --------------------------------------------------------------------------


def _mapped(path) -> list[tuple[int, int]]:
    """Address ranges of this process's memory maps of `path` (Linux /proc/self/maps)."""
    ranges = []
    for line in open("/proc/self/maps"):
        parts = line.split()
        if len(parts) >= 6 and parts[5] == str(path.resolve()):
            start, end = (int(x, 16) for x in parts[0].split("-"))
            ranges.append((start, end))
    return ranges


def _model_cfg(path, dtype="bf16"):
    return load_config([], ["model.preset=mochi", f"model.path={path}", f"model.dtype={dtype}",
                            "model.gradient_checkpointing=false"]).model


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads Linux memory maps")
def test_the_base_is_memory_mapped_not_copied(tmp_path):
    """Weights stored as they are wanted are read in place: every parameter lies in the file's memory map, so
    the processes of one machine share one copy. A folder with diffusers' bf16 variant files next to fp32
    ones (as genmo/mochi-1-preview ships) is read from the bf16 files for a bf16 model."""
    model = tiny_transformer()
    model.save_pretrained(tmp_path / "fp32_and_bf16")  # fp32 default files ...
    model.to(torch.bfloat16).save_pretrained(tmp_path / "fp32_and_bf16", variant="bf16")  # ... and the variant
    loaded = load_transformer(_model_cfg(tmp_path / "fp32_and_bf16"), device="cpu")
    ranges = _mapped(tmp_path / "fp32_and_bf16" / "diffusion_pytorch_model.bf16.safetensors")
    params = list(loaded.parameters())
    assert ranges and all(p.dtype == torch.bfloat16 for p in params)
    assert all(any(a <= p.data_ptr() < b for a, b in ranges) for p in params)
    torch.testing.assert_close(dict(loaded.named_parameters())["proj_out.weight"],
                               model.proj_out.weight.to(torch.bfloat16))


def test_each_process_loads_the_base_where_its_strategy_keeps_it(repo_root, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert base_load_device(preset(repo_root, "auto", "trainer.devices=2")) == torch.device("cpu")  # a CPU run
    if torch.cuda.device_count() >= 2:
        gpu = ("trainer.accelerator=gpu", "trainer.devices=2")
        assert base_load_device(preset(repo_root, "ddp", *gpu)) == torch.device("cuda", 1)
        assert base_load_device(preset(repo_root, "auto", *gpu)) == torch.device("cuda", 1)
        assert base_load_device(preset(repo_root, "fsdp", *gpu)) == torch.device("cpu")  # FSDP shards from there


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_base_loads_straight_onto_the_gpu(tmp_path, repo_root):
    tiny_transformer().to(torch.bfloat16).save_pretrained(tmp_path / "base")
    loaded = load_transformer(_model_cfg(tmp_path / "base"), on_gpu=True, device="cuda:0")
    assert {p.device for p in loaded.parameters()} == {torch.device("cuda", 0)}
    assert base_load_device(preset(repo_root, "auto", "trainer.accelerator=gpu", "trainer.devices=1")) == \
        torch.device("cuda", 0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_deepspeed_on_one_gpu_saves_fp32_adapters(tmp_path, repo_root, random_cache):
    pytest.importorskip("deepspeed")
    from relvid.models.adapter_file import load_adapters
    from relvid.training.run import run

    random_cache(n_clips=2, seed=1)
    cfg = preset(repo_root, "deepspeed_stage_2", "trainer.devices=1", "trainer.max_steps=2",
                 "trainer.progress_bar=false", "rcl.enabled=false", f"data.cache_dir={tmp_path / 'cache'}",
                 f"output_dir={tmp_path / 'run'}")
    run(cfg)
    _, state, _ = load_adapters(tmp_path / "run" / "adapters" / "relvid_adapters.safetensors")
    assert state and {v.dtype for v in state.values()} == {torch.float32}

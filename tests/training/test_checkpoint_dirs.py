"""Checkpoint folders and Slurm requeue checkpoints: under the DeepSpeed strategies every checkpoint is a
folder of DeepSpeed's files; resume=last, resume=<folder>, `relvid export` and `--adapters` read them like
checkpoint files, refuse partial ones by name, and a requeued Slurm job goes on from the newest state,
Lightning's hpc_ckpt_<n>.ckpt included.

The folders are real: this file, run as a script in a child process, has DeepSpeed 0.19.8 itself write
them on the CPU (gloo, one rank), from the tiny training module, with the tag, the frozen-parameter
exclusion and the checkpoint content (Lightning's checkpoint less its state_dict and optimizer states)
that Lightning's DeepSpeedStrategy.save_checkpoint passes to DeepSpeedEngine.save_checkpoint. Lightning's
strategy itself refuses to start without CUDA; the gpu-marked test at the end runs it on one GPU.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from relvid.config import ConfigError
from relvid.models.adapter_file import CheckpointError, adapters_from_checkpoint, apply_adapter_source, file_sha256
from relvid.models.lora import adapter_state_dict
from relvid.training.run import RunExistsError, newest_checkpoint, resolve_resume

REPO_ROOT = Path(__file__).resolve().parents[2]
STEP = "checkpoint"  # Lightning's tag: DeepSpeedStrategy.save_checkpoint(..., tag="checkpoint")


def _lightning_checkpoint(module, step: int, state_dict: dict) -> dict:
    """What Lightning hands a strategy's save_checkpoint: its own keys and relvid's section."""
    import lightning as L

    checkpoint = {"epoch": 0, "global_step": step, "pytorch-lightning_version": L.__version__,
                  "state_dict": state_dict, "loops": {}, "callbacks": {}, "lr_schedulers": []}
    module.on_save_checkpoint(checkpoint)  # keeps the LoRA in state_dict, adds the relvid section
    return checkpoint


def write_deepspeed_runs(root: Path) -> None:
    """root/zero{2,3}/checkpoints/step00000{2,4}.ckpt (folders, written by DeepSpeed) and
    root/zero{2,3}/file.ckpt: the same LoRA as a checkpoint file (what DDP/FSDP runs write)."""
    import deepspeed

    from relvid.models.lora import lora_parameters
    from relvid.training.module import RelationModule
    from tests.helpers.configs import tiny_cfg

    os.environ.update(MASTER_ADDR="127.0.0.1", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    # one process needs no shared-memory all-reduce: skip building DeepSpeed's optional C++ kernel for it
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="gloo", distributed_port=int(os.environ["MASTER_PORT"]))
    for stage in (2, 3):
        run = root / f"zero{stage}"
        module = RelationModule(tiny_cfg(root, f"seed={stage}"))
        lora = lora_parameters(module.transformer)
        with torch.no_grad():  # trained-looking LoRA (B starts at zero)
            for i, p in enumerate(lora.values()):
                p.normal_(0.0, 0.02 * (1 + i % 3))
        whole = {"transformer." + k: p.detach().clone() for k, p in lora.items()}
        run.mkdir(parents=True)
        torch.save(_lightning_checkpoint(module, 4, whole), run / "file.ckpt")
        engine, *_ = deepspeed.initialize(
            model=module, model_parameters=list(lora.values()),
            optimizer=torch.optim.AdamW(list(lora.values()), lr=1e-4),
            config={"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": stage}})
        for step in (2, 4):
            client = {k: v for k, v in _lightning_checkpoint(module, step, {}).items()
                      if k not in ("state_dict", "optimizer_states")}
            engine.save_checkpoint(str(run / "checkpoints" / f"step{step:06d}.ckpt"), client_state=client, tag=STEP,
                                   exclude_frozen_parameters=True)


@pytest.fixture(scope="module")
def deepspeed_runs(tmp_path_factory) -> Path:
    pytest.importorskip("deepspeed")  # the `deepspeed` extra
    root = tmp_path_factory.mktemp("deepspeed")
    import socket

    with socket.socket() as s:  # a free port for gloo's rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1", MASTER_PORT=str(port))
    done = subprocess.run([sys.executable, __file__, str(root)], env=env, cwd=root, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    return root


@pytest.fixture
def ds_run(deepspeed_runs, tmp_path):
    """A copy of the ZeRO-2 run (tests change it) and a config factory for it."""
    run = tmp_path / "run"
    shutil.copytree(deepspeed_runs / "zero2", run)
    return run


def cfg_for(tiny_cfg, run: Path, *overrides: str):
    return tiny_cfg("trainer.strategy=deepspeed_stage_2", "hmt.enabled=false", f"output_dir={run}", *overrides)


def optim_file(folder: Path) -> Path:
    return folder / STEP / "zero_pp_rank_0_mp_rank_00_optim_states.pt"


def truncate(file: Path) -> None:
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])


def test_deepspeed_writes_folders_of_its_own_layout(deepspeed_runs):
    for stage, states in ((2, "mp_rank_00_model_states.pt"), (3, "zero_pp_rank_0_mp_rank_00_model_states.pt")):
        folder = deepspeed_runs / f"zero{stage}" / "checkpoints" / "step000004.ckpt"
        assert (folder / "latest").read_text() == STEP
        assert (folder / STEP / states).is_file() and optim_file(folder).is_file()


def test_resume_last_takes_the_newest_whole_deepspeed_folder(ds_run, tiny_cfg, capsys):
    ckpts = ds_run / "checkpoints"
    assert resolve_resume(cfg_for(tiny_cfg, ds_run, "resume=last")) == str(ckpts / "step000004.ckpt")
    assert "resuming from" in capsys.readouterr().out
    truncate(optim_file(ckpts / "step000004.ckpt"))  # a save cut short on some rank
    assert resolve_resume(cfg_for(tiny_cfg, ds_run, "resume=last")) == str(ckpts / "step000002.ckpt")
    out = capsys.readouterr().out
    assert f"resuming from {ckpts / 'step000002.ckpt'} (step 2)" in out
    assert f"skipped (unreadable: {ckpts / 'step000004.ckpt'})" in out
    (ckpts / "step000002.ckpt" / "latest").unlink()  # DeepSpeed writes 'latest' at the end of a save
    with pytest.raises(ConfigError, match="holds no readable checkpoint"):
        resolve_resume(cfg_for(tiny_cfg, ds_run, "resume=last"))


def test_resume_a_named_deepspeed_folder_and_refuse_a_partial_one(ds_run, tiny_cfg):
    folder = ds_run / "checkpoints" / "step000002.ckpt"
    assert resolve_resume(cfg_for(tiny_cfg, ds_run, f"resume={folder}")) == str(folder)
    with pytest.raises(ConfigError, match="trainer.strategy=ddp cannot read: resume with the deepspeed_stage_N"):
        resolve_resume(cfg_for(tiny_cfg, ds_run, f"resume={folder}", "trainer.strategy=ddp"))
    with pytest.raises(ConfigError, match="written by ZeRO stage 2; .*trainer.strategy=deepspeed_stage_2"):
        resolve_resume(cfg_for(tiny_cfg, ds_run, f"resume={folder}", "trainer.strategy=deepspeed_stage_3"))
    truncate(optim_file(folder))
    with pytest.raises(ConfigError, match=f"resume: {optim_file(folder)} is not readable"):
        resolve_resume(cfg_for(tiny_cfg, ds_run, f"resume={folder}"))
    optim_file(folder).unlink()
    with pytest.raises(ConfigError, match=r"incomplete DeepSpeed checkpoint .*zero_pp_rank_0_mp_rank_00_optim_states"):
        resolve_resume(cfg_for(tiny_cfg, ds_run, f"resume={folder}"))
    (folder / "latest").unlink()
    with pytest.raises(ConfigError, match=f"{folder} is an incomplete DeepSpeed checkpoint \\(no 'latest' file"):
        resolve_resume(cfg_for(tiny_cfg, ds_run, f"resume={folder}"))


@pytest.mark.parametrize("stage", [2, 3])
def test_export_reads_a_deepspeed_folder_like_the_checkpoint_file(deepspeed_runs, tmp_path, stage):
    import safetensors.torch

    from relvid.cli import main

    run = deepspeed_runs / f"zero{stage}"
    spec, from_folder = adapters_from_checkpoint(run / "checkpoints" / "step000004.ckpt")
    spec_file, from_file = adapters_from_checkpoint(run / "file.ckpt")
    assert spec == spec_file and from_folder.keys() == from_file.keys()
    assert all(torch.equal(from_folder[k], from_file[k]) for k in from_file)
    for name, source in (("folder", run / "checkpoints" / "step000004.ckpt"), ("file", run / "file.ckpt")):
        assert main(["export", str(source), "--out", str(tmp_path / name), "--triplet"]) == 0
    for written in ("pytorch_lora_weights.safetensors", "relvid_adapters.safetensors"):
        a = safetensors.torch.load_file(tmp_path / "folder" / written)
        b = safetensors.torch.load_file(tmp_path / "file" / written)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sample_adapters_from_a_deepspeed_folder_load_the_same_lora(deepspeed_runs, tmp_path):
    from relvid.inference.render import adapters_sha256
    from relvid.models.backbone import tiny_transformer

    run = deepspeed_runs / "zero2"
    folder, loaded, info = run / "checkpoints" / "step000004.ckpt", {}, {}
    for source in (folder, run / "file.ckpt"):
        transformer = tiny_transformer()
        info[source] = apply_adapter_source(transformer, source)  # what `relvid sample --adapters` runs
        assert info[source].kind == "checkpoint" and info[source].path == source
        loaded[source] = adapter_state_dict(transformer)
    assert loaded[folder].keys() == loaded[run / "file.ckpt"].keys()
    assert all(torch.equal(loaded[folder][k], loaded[run / "file.ckpt"][k]) for k in loaded[folder])
    assert adapters_sha256(str(folder)) == info[folder].sha256 == file_sha256(folder)  # recorded beside videos
    copy = tmp_path / "copy.ckpt"
    shutil.copytree(folder, copy)
    assert file_sha256(copy) == file_sha256(folder)  # names and contents, not where the folder lies
    truncate(optim_file(copy))
    assert file_sha256(copy) != file_sha256(folder)
    shutil.rmtree(copy / STEP)
    with pytest.raises(CheckpointError, match="incomplete DeepSpeed checkpoint"):
        apply_adapter_source(tiny_transformer(), copy)


def write_checkpoint(path: Path, step: int) -> Path:
    """A checkpoint file as far as choosing one goes: its step and relvid's section."""
    torch.save({"global_step": step, "relvid": {"format": "test"}, "state_dict": {}}, path)
    return path


def test_a_newer_slurm_requeue_checkpoint_wins_over_last_ckpt(tmp_path, tiny_cfg, capsys):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    last = write_checkpoint(run / "checkpoints" / "last.ckpt", 100)
    write_checkpoint(run / "checkpoints" / "step000100.ckpt", 100)
    hpc = write_checkpoint(run / "hpc_ckpt_1.ckpt", 130)  # Lightning's requeue checkpoint, in the run's folder
    assert resolve_resume(tiny_cfg("resume=last")) == str(hpc)
    assert f"resuming from {hpc} (step 130, the Slurm requeue checkpoint)" in capsys.readouterr().out
    write_checkpoint(run / "checkpoints" / "on_exception.ckpt", 130)  # at a step boundary: wins a tie
    assert newest_checkpoint(run / "checkpoints") == (run / "checkpoints" / "on_exception.ckpt", 130)
    (run / "checkpoints" / "on_exception.ckpt").unlink()
    write_checkpoint(run / "hpc_ckpt_2.ckpt", 90)  # numbering is not age: the step decides
    assert newest_checkpoint(run / "checkpoints") == (hpc, 130)
    write_checkpoint(run / "checkpoints" / "step000130.ckpt", 130)
    write_checkpoint(last, 130)  # written after it; under DeepSpeed rewritten in place: the step one wins
    assert newest_checkpoint(run / "checkpoints") == (run / "checkpoints" / "step000130.ckpt", 130)


def test_a_requeue_checkpoint_or_checkpoint_folder_is_another_run(tmp_path, tiny_cfg):
    run = tmp_path / "run"
    run.mkdir()
    write_checkpoint(run / "hpc_ckpt_1.ckpt", 5)
    with pytest.raises(RunExistsError, match="hpc_ckpt_1.ckpt"):
        resolve_resume(tiny_cfg())
    (run / "checkpoints" / "step000002.ckpt" / STEP).mkdir(parents=True)
    assert resolve_resume(tiny_cfg("overwrite=true")) is None
    # Lightning would otherwise resume a Slurm job from the old run's hpc_ckpt by itself
    assert not (run / "hpc_ckpt_1.ckpt").exists() and not (run / "checkpoints" / "step000002.ckpt").exists()


SBATCH = REPO_ROOT / "experiments" / "cluster" / "train.sbatch"


@pytest.mark.parametrize("saved, start", [
    ((), "overwrite=true"),
    (("checkpoints/step000200.ckpt/checkpoint/",), "resume=last"),  # DeepSpeed: a folder
    (("checkpoints/last.ckpt",), "resume=last"),
    (("hpc_ckpt_1.ckpt",), "resume=last"),  # stopped by the requeue signal before its first checkpoint
])
def test_sbatch_requeue_resumes_from_any_checkpoint(tmp_path, saved, start):
    """The script itself under bash, with an `srun` that records its command line."""
    out = tmp_path / "outputs" / "handshake-77"
    for name in saved:
        target = out / name
        if name.endswith("/"):
            target.mkdir(parents=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(b"x")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    srun = bin_dir / "srun"
    srun.write_text(f'#!/bin/bash\nprintf "%s\\n" "$@" > {tmp_path / "srun.args"}\n')
    srun.chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_SUBMIT_DIR=str(tmp_path), SLURM_JOB_ID="77",
               SLURM_NNODES="2", SLURM_NTASKS_PER_NODE="8", SLURM_CPUS_PER_TASK="8")
    env.pop("OUT", None)
    done = subprocess.run(["bash", str(SBATCH), "handshake", "/data/cache", "/models/mochi"], env=env,
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    args = (tmp_path / "srun.args").read_text().splitlines()
    assert "output_dir=outputs/handshake-77" in args and args[-1] == start
    assert args[0] == "--kill-on-bad-exit=1"  # a failed task ends the job, not an NCCL timeout


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="Lightning's DeepSpeed strategy needs CUDA")
def test_deepspeed_on_one_gpu_writes_folders_that_resume_and_export(tmp_path, repo_root, random_cache, capsys):
    from relvid.cli import main
    from relvid.config import load_config
    from relvid.models.adapter_file import load_adapters
    from relvid.training.run import run

    pytest.importorskip("deepspeed")
    random_cache(n_clips=2, seed=1)

    def cfg(*overrides):
        return load_config([repo_root / "configs" / "tiny.yaml", repo_root / "configs" / "strategy" /
                            "deepspeed_stage_2.yaml"],
                           ["trainer.devices=1", "rcl.enabled=false", "trainer.checkpoint_every=2",
                            "trainer.progress_bar=false", f"data.cache_dir={tmp_path / 'cache'}",
                            f"output_dir={tmp_path / 'run'}", *overrides])

    out = run(cfg("trainer.max_steps=4"))
    folder = out / "checkpoints" / "step000004.ckpt"
    assert folder.is_dir() and (folder / "latest").is_file()
    assert main(["export", str(folder), "--out", str(tmp_path / "export"), "--triplet"]) == 0
    _, exported, _ = load_adapters(tmp_path / "export" / "relvid_adapters.safetensors")
    _, final, _ = load_adapters(out / "adapters" / "relvid_adapters.safetensors")
    assert all(torch.equal(exported[k], final[k].to(exported[k].dtype)) for k in final)
    run(cfg("trainer.max_steps=6", "resume=last"))
    assert f"resuming from {out / 'checkpoints'}" in capsys.readouterr().out
    assert (out / "checkpoints" / "step000006.ckpt").is_dir()


if __name__ == "__main__":
    write_deepspeed_runs(Path(sys.argv[1]))

"""MotionInversion (method=motion_inversion), alone and with RCL, under two-process data parallel on the
CPU (gloo).

The run is what a user starts with ``relvid train configs/tiny.yaml configs/baselines/motion_inversion.yaml
trainer.strategy=ddp trainer.devices=2 [rcl.enabled=true]``: relvid's DDP strategy through Lightning's own
launcher, which re-runs this file as a script for rank 1 (the ``__main__`` part at the bottom). Each rank
writes its transformer's whole state, the clips it trained on and its memory bank; the test then checks
that the ranks agree, that only the motion embeddings moved, and that the run's file and checkpoint load
as a MotionInversion adapter source.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

PROMPT = "A dog is shaking hands with a cat."
STEPS = 4


# --- the worker: run by the test below, then re-run by Lightning for rank 1 ---------------------------
class DumpRank(L.Callback):
    """Per step: the clips this rank trained on and whether the RCL loss found positives; at the end: the
    transformer's whole state and the memory bank."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.clips: list[list[int]] = []
        self.rcl_steps = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.clips.append([int(i) for i in batch["clip_index"]])
        self.rcl_steps += int(any(outputs.get("rcl_draws") or []))  # a video that drew positives from the bank

    def on_train_end(self, trainer, pl_module):
        rank = trainer.global_rank
        state = {k: v.detach().to("cpu", copy=True) for k, v in pl_module.transformer.state_dict().items()}
        torch.save(state, self.out / f"rank{rank}_state.pt")
        bank = pl_module.memory_bank  # None or empty without RCL
        (self.out / f"rank{rank}.json").write_text(json.dumps({
            "world_size": trainer.world_size, "strategy": type(trainer.strategy).__name__,
            "clips": self.clips, "selections": pl_module.selections, "rcl_steps": self.rcl_steps,
            "bank": None if bank is None else len(bank),
            "bank_clips": None if bank is None else [int(i) for i in bank.state_dict()["clip_index"]],
        }))


def worker_config(work: Path, rcl: bool):
    from relvid.config import load_config
    from tests.helpers.configs import TOY_CHANNELS

    repo = Path(__file__).resolve().parents[2]
    return load_config([repo / "configs" / "tiny.yaml", repo / "configs" / "baselines" / "motion_inversion.yaml"], [
        "trainer.strategy=ddp", "trainer.devices=2", f"trainer.max_steps={STEPS}", "trainer.checkpoint_every=2",
        "trainer.progress_bar=false", "optim.warmup_steps=0", f"rcl.enabled={str(rcl).lower()}",
        # the toy codec and text encoder, so that `relvid sample` can render with the run's file
        "model.codec=toy", "model.text_encoder=toy", f"model.tiny.in_channels={TOY_CHANNELS}",
        f"data.cache_dir={work / 'cache'}", f"output_dir={work / 'run'}",
    ])


def worker(workdir: str, rcl: str) -> None:
    from relvid.training.run import run

    work = Path(workdir)
    torch.set_num_threads(1)
    run(worker_config(work, rcl == "rcl"), extra_callbacks=[DumpRank(work)])


# --- the test --------------------------------------------------------------------------------------
@pytest.mark.distributed
@pytest.mark.parametrize("rcl", [False, True], ids=["plain", "rcl"])
def test_two_process_ddp_trains_identical_motion_embeddings_and_nothing_else(tmp_path, repo_root, random_cache, rcl):
    from relvid.cli import main
    from relvid.models.adapter_file import apply_adapter_source
    from relvid.models.backbone import load_transformer
    from relvid.models.motion_inversion import ATTR, load_motion_file, motion_embeddings
    from relvid.video_io import read_video
    from tests.helpers.configs import TINY, TOY_CHANNELS

    # 4 clips of a 3 x 4 x 4 token grid (the toy codec's at 7 frames of 16 x 16): 2 per rank per epoch
    random_cache(n_clips=4, relation="shaking_hands", latent_shape=(TOY_CHANNELS, 3, 8, 8), seed=2, prompts=(PROMPT,))
    env = dict(os.environ, PYTHONPATH=str(repo_root), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), str(tmp_path),
                           "rcl" if rcl else "plain"], env=env,
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]

    # (a) both ranks trained every step under relvid's DDP, on different clips (with RCL: on one shared bank)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["world_size"] == r1["world_size"] == 2
    assert r0["strategy"] == r1["strategy"] == "RelvidDDPStrategy"
    assert r0["selections"] == r1["selections"] == ["motion"] * STEPS
    assert len(r0["clips"]) == len(r1["clips"]) == STEPS and r0["clips"] != r1["clips"]
    if rcl:  # both ranks' videos went into one bank, and the contrastive term took part in the loss
        assert r0["bank"] == r1["bank"] == 2 * STEPS and r0["bank_clips"] == r1["bank_clips"]
        assert r0["rcl_steps"] > 0 and r1["rcl_steps"] > 0
    else:
        assert not r0["bank"] and not r1["bank"] and r0["rcl_steps"] == r1["rcl_steps"] == 0

    # (b) the ranks end with the same embeddings: the gradients of their different clips were all-reduced
    s0, s1 = (torch.load(tmp_path / f"rank{r}_state.pt", weights_only=True) for r in (0, 1))
    assert s0.keys() == s1.keys()
    assert all(torch.equal(s0[k], s1[k]) for k in s0), "the ranks differ: their gradients were not all-reduced"

    # (c) the embeddings moved away from zero in every block; the frozen base did not move at all
    cfg = worker_config(tmp_path, rcl)
    base = load_transformer(cfg.model).state_dict()
    learned = {k: v for k, v in s0.items() if k.startswith(f"{ATTR}.")}
    assert set(s0) == set(base) | set(learned)
    assert sorted(learned) == sorted(f"{ATTR}.{kind}.{b}" for kind in ("temporal", "value") for b in (0, 1))
    assert all(v.abs().sum() > 0 for v in learned.values()), "an embedding did not learn"
    assert all(torch.equal(s0[k], v) for k, v in base.items()), "the frozen base changed"

    # (d) the run's file and its last checkpoint (written by rank zero) hold exactly those embeddings ...
    out = tmp_path / "run"
    file = out / "adapters" / "relvid_adapters.safetensors"
    spec, state, meta = load_motion_file(file)
    assert spec.blocks == (0, 1) and (spec.frames, spec.height, spec.width) == (3, 4, 4)
    assert meta["step"] == str(STEPS)
    assert all(torch.equal(state[k], learned[f"{ATTR}.{k}"]) for k in state) and len(state) == len(learned)
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    assert sorted(ckpt["state_dict"]) == sorted(f"transformer.{k}" for k in learned)  # never the base
    assert all(torch.equal(ckpt["state_dict"][f"transformer.{k}"], v) for k, v in learned.items())
    # ... and load as a MotionInversion source from the folder, the file and the checkpoint alike
    last = out / "checkpoints" / "last.ckpt"
    for source, kind in ((out / "adapters", "motion"), (file, "motion"), (last, "checkpoint")):
        fresh = load_transformer(cfg.model)
        assert apply_adapter_source(fresh, source).kind == kind
        loaded = motion_embeddings(fresh)
        assert loaded is not None and loaded.inference and loaded.spec == spec
        assert all(torch.equal(p, learned[f"{ATTR}.{k}"]) for k, p in loaded.named_parameters())
    # `relvid sample --adapters` renders with them, and they change the video
    videos = tmp_path / "videos"
    for name, extra in (("motion", ["--adapters", str(out / "adapters")]), ("base", ["--base"])):
        assert main(["sample", "--prompt", PROMPT, "--seed", "0", "--out", str(videos / name), *TINY, *extra]) == 0
    (motion_video,), (base_video,) = sorted((videos / "motion").glob("*.mp4")), sorted((videos / "base").glob("*.mp4"))
    side = json.loads(motion_video.with_suffix(".json").read_text())
    assert side["adapters"]["kind"] == "motion"
    assert not torch.equal(read_video(motion_video), read_video(base_video))


if __name__ == "__main__":
    worker(*sys.argv[1:])

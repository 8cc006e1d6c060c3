"""A whole tiny run through `relvid.training.run`: outputs, checkpoints, logs, resume."""

import io
import os

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import TQDMProgressBar

from relvid.data.cache import ClipCache
from relvid.models.adapter_file import load_adapters
from relvid.training.run import RunExistsError, build_trainer, progress_refresh_rate, run
from tests.helpers.logs import scalars


@pytest.fixture
def cache(random_cache):
    return random_cache(n_clips=4, relation="shaking_hands", seed=1).root


def test_tiny_run_writes_config_checkpoints_logs_and_adapters(cache, tiny_cfg):
    cfg = tiny_cfg("trainer.max_steps=4", "trainer.checkpoint_every=2")
    out = run(cfg)
    assert (out / "config.yaml").is_file() and "max_steps: 4" in (out / "config.yaml").read_text()
    ckpts = sorted(p.name for p in (out / "checkpoints").glob("*.ckpt"))
    assert ckpts == ["last.ckpt", "step000002.ckpt", "step000004.ckpt"]
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["state_dict"] and all("lora_" in k for k in ckpt["state_dict"])  # never the frozen base
    assert ckpt["optimizer_states"] and ckpt["lr_schedulers"]
    assert ckpt["relvid"]["spec"]["placement"] == "QK/V"
    assert any("MemoryBank" in k for k in ckpt["callbacks"])
    logs = scalars(out / "tensorboard")
    for tag in ("train/loss", "train/loss_rec", "train/loss_rcl", "train/selected_lora", "train/rcl_skipped"):
        assert tag in logs, sorted(logs)
    assert len(logs["train/loss"]) == 4
    assert logs["train/rcl_skipped"][0] == 1.0  # empty bank on the first step: RCL skipped and logged
    assert any(t.startswith("lr-") for t in logs)
    spec, state, meta = load_adapters(out / "adapters" / "relvid_adapters.safetensors")
    assert {k.split("/")[0] for k in state} == {"relation", "subject1", "subject2", "ffn"}
    assert meta["relation"] == "shaking_hands"


def test_a_finished_run_is_not_overwritten(cache, tiny_cfg):
    cfg = tiny_cfg("trainer.max_steps=2", "trainer.checkpoint_every=2")
    run(cfg)
    with pytest.raises(RunExistsError, match="resume=last"):
        run(cfg)


def test_resume_equals_an_uninterrupted_run(tmp_path, cache, tiny_cfg):
    full = tiny_cfg("trainer.max_steps=6", "trainer.checkpoint_every=3", "optim.warmup_steps=2",
                    "data.caption_dropout=0.3", "lora.dropout=0.1")
    out = run(full)
    resumed = tiny_cfg("trainer.max_steps=6", "trainer.checkpoint_every=3", "optim.warmup_steps=2",
                       "data.caption_dropout=0.3", "lora.dropout=0.1", f"output_dir={tmp_path / 'resumed'}",
                       f"resume={out / 'checkpoints' / 'step000003.ckpt'}")
    out2 = run(resumed)
    _, a, _ = load_adapters(out / "adapters" / "relvid_adapters.safetensors")
    _, b, _ = load_adapters(out2 / "adapters" / "relvid_adapters.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the uninterrupted run"
    ca = torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)
    cb = torch.load(out2 / "checkpoints" / "last.ckpt", weights_only=False)
    bank_a = next(v for k, v in ca["callbacks"].items() if "MemoryBank" in k)
    bank_b = next(v for k, v in cb["callbacks"].items() if "MemoryBank" in k)
    assert bank_a.keys() == bank_b.keys()
    for key in bank_a:
        va, vb = bank_a[key], bank_b[key]
        assert torch.equal(va, vb) if isinstance(va, torch.Tensor) else va == vb


def test_custom_relation_trains_only_its_own_clips(tmp_path, tiny_cfg, random_cache):
    """A relation of the user's own, in a cache shared with others, trains on its clips alone."""
    random_cache(n_clips=2, relation="shaking_hands", seed=1)
    other = random_cache("other", n_clips=2, relation="juggling_together", seed=2)
    shared = ClipCache(tmp_path / "cache")
    for clip_id in other.clip_ids():
        record = other.read(clip_id)
        record.meta["clip_id"] = "j-" + clip_id
        shared.add(record)

    class SeenRelations(L.Callback):
        seen = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            records = trainer.datamodule.dataset.records
            self.seen += [records[int(i)].meta["relation"] for i in batch["clip_index"]]

    cfg = tiny_cfg("relation=juggling_together", "custom_relation=true", "trainer.max_steps=4")
    run(cfg, extra_callbacks=[SeenRelations()])
    assert SeenRelations.seen == ["juggling_together"] * 4


def test_a_crash_leaves_a_resumable_checkpoint(tmp_path, cache, tiny_cfg):
    class Boom(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 3:
                raise RuntimeError("simulated crash")

    cfg = tiny_cfg("trainer.max_steps=5", "trainer.checkpoint_every=100")
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(cfg, extra_callbacks=[Boom()])
    crash = tmp_path / "run" / "checkpoints" / "on_exception.ckpt"
    assert torch.load(crash, weights_only=False)["global_step"] == 3
    out = run(tiny_cfg("trainer.max_steps=5", "trainer.checkpoint_every=100", f"resume={crash}"))
    assert torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 5


def test_the_progress_bar_redraws_every_step_on_a_terminal_and_about_50_times_in_a_log(tiny_cfg):
    leader, follower = os.openpty()  # a real terminal
    with os.fdopen(follower, "w") as tty:
        assert progress_refresh_rate(0, 2400, tty) == 1
        assert progress_refresh_rate(7, 2400, tty) == 7  # a setting is kept
    os.close(leader)
    log = io.StringIO()  # a log file, a Slurm job, CI
    assert progress_refresh_rate(0, 2400, log) == 48
    assert progress_refresh_rate(0, 30, log) == 1
    assert progress_refresh_rate(5, 2400, log) == 5
    # pytest captures stderr, so the trainer's bar writes to a log here
    for overrides, rate in ((["trainer.max_steps=500"], 10),
                            (["trainer.max_steps=500", "trainer.progress_refresh=3"], 3)):
        cfg = tiny_cfg(*overrides, "trainer.progress_bar=true")
        bars = [c for c in build_trainer(cfg).callbacks if isinstance(c, TQDMProgressBar)]
        assert [b.refresh_rate for b in bars] == [rate]


def test_without_tensorboard_metrics_go_to_csv(tmp_path, cache, tiny_cfg, monkeypatch, capsys):
    """A bare GPU image may lack tensorboard: training still runs, logging CSV, and says so."""
    import sys

    monkeypatch.setitem(sys.modules, "tensorboard", None)  # find_spec and import now fail, as when absent
    monkeypatch.setitem(sys.modules, "tensorboardX", None)
    out = run(tiny_cfg("trainer.max_steps=2", f"output_dir={tmp_path / 'run'}"))
    assert "tensorboard is not installed" in capsys.readouterr().out
    metrics = (out / "csv" / "metrics.csv").read_text().splitlines()
    assert "train/loss" in metrics[0] and len(metrics) >= 2
    assert (out / "adapters" / "relvid_adapters.safetensors").is_file() and not (out / "tensorboard").exists()


def test_union_on_a_cache_made_before_clip_format_2_says_it_trains_with_the_max(tmp_path, random_cache, tiny_cfg):
    """hmt.relation_mask=union needs the per-frame union that clip format 2 stores; an older cache still
    loads and trains, with a warning naming the clip, the key and the fix."""
    import dataclasses

    cache = random_cache(n_clips=2, relation="shaking_hands", seed=1)
    old = cache.read("shaking_hands_000")
    cache.add(dataclasses.replace(old, meta={**old.meta, "format_version": "1"}))  # rewrites it in place
    with pytest.warns(UserWarning, match=r"union: 1 clip\(s\).*shaking_hands_000.*relvid preprocess"):
        run(tiny_cfg("trainer.max_steps=1", "hmt.relation_mask=union", f"data.cache_dir={cache.root}"))

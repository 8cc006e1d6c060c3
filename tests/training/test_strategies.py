"""Strategy presets: each builds, refuses what would train wrong, and keeps unselected adapters still."""

import json

import lightning as L
import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy, SingleDeviceStrategy

from relvid.config import load_config
from relvid.data.datamodule import RelationDataModule
from relvid.models.adapter_file import load_adapters
from relvid.models.lora import adapter_state_dict, load_adapter_state_dict
from relvid.training.module import RelationModule
from relvid.training.strategies import SelectionGuard, StrategyConfigError, build_strategy, check_strategy, clean_name
from tests.helpers import HELPERS_DIR


def preset(repo_root, name, *overrides):
    return load_config([repo_root / "configs" / "tiny.yaml", repo_root / "configs" / "strategy" / f"{name}.yaml"],
                       list(overrides))


def test_ddp_preset(repo_root):
    strategy = build_strategy(preset(repo_root, "ddp"))
    assert isinstance(strategy, DDPStrategy) and strategy._ddp_kwargs["find_unused_parameters"]
    assert isinstance(strategy, SelectionGuard)


def test_fsdp_preset_wraps_blocks_and_guards_selection(repo_root):
    from diffusers.models.transformers.transformer_mochi import MochiTransformerBlock

    strategy = build_strategy(preset(repo_root, "fsdp"))
    assert isinstance(strategy, FSDPStrategy) and isinstance(strategy, SelectionGuard)
    assert strategy.kwargs["use_orig_params"] is True
    assert strategy.kwargs["auto_wrap_policy"]._module_classes == {MochiTransformerBlock}


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_presets_turn_hmt_off(repo_root, stage):
    cfg = preset(repo_root, f"deepspeed_stage_{stage}")
    assert cfg.hmt.enabled is False and cfg.trainer.accelerator == "gpu"
    strategy = build_strategy(cfg)
    assert isinstance(strategy, DeepSpeedStrategy)
    assert strategy.config["zero_optimization"]["stage"] == stage


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_with_hybrid_masks_is_refused(repo_root, stage):
    cfg = preset(repo_root, f"deepspeed_stage_{stage}", "hmt.enabled=true")
    with pytest.raises(StrategyConfigError, match=r"trainer.strategy=deepspeed_stage_\d with hmt.enabled=true"):
        build_strategy(cfg)


@pytest.mark.parametrize("key", ["preview", "relation_accuracy"])
def test_rank_zero_sampling_callbacks_are_refused_with_sharded_models(repo_root, key):
    for name in ("fsdp", "ddp"):
        cfg = preset(repo_root, name)
        cfg[key].every_n_steps = 10  # set after loading: the callbacks' own settings are not the point here
        if name == "ddp":
            check_strategy(cfg)
            continue
        with pytest.raises(StrategyConfigError, match=f"trainer.strategy=fsdp with {key}.every_n_steps>0 would hang"):
            check_strategy(cfg)


def test_deepspeed_refuses_frozen_adapters(repo_root):
    with pytest.raises(StrategyConfigError, match=r"lora.frozen=\['ffn'\] would train wrong"):
        check_strategy(preset(repo_root, "deepspeed_stage_2", "lora.frozen=[ffn]"))


def test_deepspeed_on_cpu_and_unknown_names_are_refused(repo_root):
    with pytest.raises(StrategyConfigError, match="needs CUDA"):
        check_strategy(preset(repo_root, "deepspeed_stage_2", "trainer.accelerator=cpu"))
    with pytest.raises(StrategyConfigError, match="trainer.strategy='zero9' is unknown"):
        check_strategy(preset(repo_root, "ddp", "trainer.strategy=zero9"))


def test_state_key_matches_adapter_state_dict(repo_root):
    from relvid.models.lora import lora_parameters
    from relvid.training.strategies import _state_key

    module = RelationModule(load_config([repo_root / "configs" / "tiny.yaml"], []))
    assert {_state_key(n) for n in lora_parameters(module.transformer)} == set(adapter_state_dict(module.transformer))


def test_clean_name_drops_wrapper_pieces():
    name = ("transformer.transformer_blocks.0._fsdp_wrapped_module._checkpoint_wrapped_module"
            ".attn1.to_q.lora_A.relation.weight")
    assert clean_name(name) == "transformer.transformer_blocks.0.attn1.to_q.lora_A.relation.weight"


class ZeroFillGrads(L.Callback):
    """What FSDP's flat parameters do: adapters outside the forward get zero gradients, not None."""

    def on_after_backward(self, trainer, pl_module):
        for name, p in pl_module.transformer.named_parameters():
            if "lora_" in name and p.grad is None:
                p.grad = torch.zeros_like(p)


class Moved(L.Callback):
    def __init__(self):
        self.records = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.before = adapter_state_dict(pl_module.transformer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        after = adapter_state_dict(pl_module.transformer)
        self.records.append((outputs["selection"], {k.split("/")[0] for k in after
                                                    if not torch.equal(after[k], self.before[k])}))


class GuardedSingleDevice(SelectionGuard, SingleDeviceStrategy):
    pass


def _train(tmp_path, strategy, random_cache):
    cfg = load_config([], [
        "model.preset=tiny", "model.gradient_checkpointing=false", "lora.rank=4", "lora.alpha=4", "rcl.enabled=false",
        "data.num_workers=0", "optim.warmup_steps=0", "optim.weight_decay=0.1", "trainer.max_steps=5", "seed=4",
        f"data.cache_dir={tmp_path / 'cache'}",
    ])
    random_cache(tmp_path / "cache", n_clips=2, seed=1)
    data = RelationDataModule(cfg.data.cache_dir, relation=cfg.relation, batch_size=1, num_workers=0, seed=4,
                              caption_dropout=0.0, total_steps=5, sample_posterior=False)
    moved = Moved()
    trainer = L.Trainer(max_steps=5, strategy=strategy, accelerator="cpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[ZeroFillGrads(), moved], default_root_dir=str(tmp_path))
    trainer.fit(RelationModule(cfg), datamodule=data)
    return moved.records


def test_selection_guard_keeps_unselected_adapters_still_under_zero_grads(tmp_path, random_cache):
    expected = {"relation": {"relation", "subject1", "subject2", "ffn"}, "subject1": {"subject1", "ffn"},
                "subject2": {"subject2", "ffn"}}
    guarded = _train(tmp_path / "a", GuardedSingleDevice(torch.device("cpu")), random_cache)
    assert {s for s, _ in guarded} - {"relation"}  # some step selected a subject LoRA
    assert all(changed == expected[s] for s, changed in guarded), guarded
    # without the guard the same zero gradients let weight decay move unselected adapters
    plain = _train(tmp_path / "b", SingleDeviceStrategy(torch.device("cpu")), random_cache)
    assert any(changed != expected[s] for s, changed in plain), plain


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="FSDP needs CUDA")
def test_fsdp_on_one_gpu_keeps_unselected_adapters_still(tmp_path, repo_root, random_cache):
    cfg = preset(repo_root, "fsdp", "trainer.devices=1", "rcl.enabled=false", "optim.weight_decay=0.1",
                 "optim.warmup_steps=0", "trainer.max_steps=4", "trainer.progress_bar=false",
                 f"data.cache_dir={tmp_path / 'cache'}", f"output_dir={tmp_path / 'run'}")
    random_cache(n_clips=2, seed=1)
    from relvid.training.run import run
    from tests.helpers.strategy_worker import RecordSteps

    run(cfg, extra_callbacks=[RecordSteps(tmp_path)])  # reads the adapters under summon_full_params
    record = json.loads((tmp_path / "rank0.json").read_text())
    expected = {"relation": 4, "subject1": 2, "subject2": 2}
    assert [expected[s] for s in record["selections"]] == [len(m) for m in record["moved"]]
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["state_dict"] and not any("_fsdp_wrapped_module" in k for k in ckpt["state_dict"])


def test_full_adapter_state_is_the_plain_adapter_state_without_sharding(repo_root):
    from relvid.training.strategies import full_adapter_state

    module = RelationModule(load_config([repo_root / "configs" / "tiny.yaml"], []))
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False)
    trainer.strategy.connect(module)
    got, want = full_adapter_state(trainer, module), adapter_state_dict(module.transformer)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)


SELECTED = {"relation": ["ffn", "relation", "subject1", "subject2"], "subject1": ["ffn", "subject1"],
            "subject2": ["ffn", "subject2"]}


def launch(work, repo_root, strategy, *overrides):
    """tests/helpers/strategy_worker.py in 2 CPU processes (gloo) through Lightning's own launcher."""
    import os
    import signal
    import subprocess
    import sys

    env = dict(os.environ, PYTHONPATH=str(repo_root), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, str(HELPERS_DIR / "strategy_worker.py"), str(work), strategy,
                             *overrides], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=work, start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher's child rank too
        raise
    assert proc.returncode == 0, stderr[-4000:]
    ranks = [json.loads((work / f"rank{r}.json").read_text()) for r in (0, 1)]
    adapters = [torch.load(work / f"rank{r}_adapters.pt") for r in (0, 1)]
    assert ranks[0] == ranks[1] and ranks[0]["world_size"] == 2
    assert adapters[0].keys() == adapters[1].keys()
    assert all(torch.equal(adapters[0][k], adapters[1][k]) for k in adapters[0])
    return ranks[0], adapters[0]


@pytest.mark.distributed
def test_fsdp_two_cpu_processes_keep_the_selection_rule_and_lora_only_checkpoints_and_clip(tmp_path, repo_root,
                                                                                          random_cache):
    random_cache(n_clips=4, relation="shaking_hands", seed=2)
    # optim.grad_clip > 0: Lightning's FSDP precision refused norm clipping at the first optimizer step
    record, _ = launch(tmp_path, repo_root, "fsdp", "optim.grad_clip=0.01")
    assert record["strategy"] == "RelvidFSDPStrategy"
    assert set(record["selections"]) - {"relation"}  # subject LoRAs were selected at some step
    assert [SELECTED[s] for s in record["selections"]] == record["moved"]
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    keys = set(ckpt["state_dict"])
    assert len(keys) == 38 and not any("_fsdp_wrapped_module" in k for k in keys)  # the LoRA, plain names
    assert all(k.startswith("transformer.transformer_blocks.") and ".lora_" in k for k in keys)
    # the final adapter file has plain names and loads into a fresh (unwrapped) model
    _, state, _ = load_adapters(tmp_path / "run" / "adapters" / "relvid_adapters.safetensors")
    assert not any("_fsdp_wrapped_module" in k for k in state)
    fresh = RelationModule(load_config([repo_root / "configs" / "tiny.yaml"], []))
    load_adapter_state_dict(fresh.transformer, state)


@pytest.mark.distributed
def test_frozen_adapters_never_move_under_fsdp(tmp_path, repo_root, random_cache):
    """lora.frozen (the Table 2 ablations) holds under FSDP (tests/training/test_ddp.py: under DDP): the
    FFN LoRA is in every step's forward and gets gradients, yet keeps its initial zero B; the selection
    rule holds for the rest."""
    random_cache(n_clips=4, relation="shaking_hands", seed=2)
    record, adapters = launch(tmp_path, repo_root, "fsdp", "lora.frozen=[ffn]")
    assert [[a for a in SELECTED[s] if a != "ffn"] for s in record["selections"]] == record["moved"]
    ffn_b = [v for k, v in adapters.items() if k.startswith("ffn/") and "lora_B" in k]
    assert ffn_b and all(bool((v == 0).all()) for v in ffn_b)


@pytest.mark.slow
@pytest.mark.distributed
def test_fsdp_matches_ddp_and_resumes_like_it(tmp_path, repo_root, random_cache):
    results = {}
    for strategy in ("fsdp", "ddp"):
        work = tmp_path / strategy
        work.mkdir()
        random_cache(work / "cache", n_clips=4, relation="shaking_hands", seed=2)
        launch(work, repo_root, strategy)
        _, results[strategy] = launch(work, repo_root, strategy, "resume=last", "trainer.max_steps=6")
    fsdp, ddp = results["fsdp"], results["ddp"]
    for key in ddp:
        torch.testing.assert_close(fsdp[key], ddp[key], atol=1e-6, rtol=1e-5)


@pytest.mark.distributed
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_zero_grad_unselected_adapters_still_move_under_ddp_and_fsdp(tmp_path, repo_root, random_cache, strategy):
    """hmt.unselected=zero_grad (configs/reference.yaml) holds with several processes: no SelectionGuard
    turns the zero gradients back into None, so AdamW's weight decay (and, once there, momentum) moves
    every adapter at every step, selected or not, where the default rule moves the selected ones only;
    both ranks stay identical (launch checks that)."""
    random_cache(n_clips=4, relation="shaking_hands", seed=2)
    record, _ = launch(tmp_path, repo_root, strategy, "hmt.unselected=zero_grad")
    assert any(SELECTED[s] != ["ffn", "relation", "subject1", "subject2"] for s in record["selections"])
    assert all(moved == ["ffn", "relation", "subject1", "subject2"] for moved in record["moved"])

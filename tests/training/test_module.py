"""The training step: what moves, what must not, and how the LoRA group is chosen."""

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf

from relvid.config import load_config
from relvid.data.datamodule import RelationDataModule
from relvid.models.lora import adapter_state_dict, adapters_for_selection, lora_parameters
from relvid.training.module import RelationModule, lr_factor
from relvid.training.run import build_trainer


class StepWatcher(L.Callback):
    """Records, around every optimizer step, which adapters changed."""

    def __init__(self):
        self.records = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._before = adapter_state_dict(pl_module.transformer)
        self._base_before = {k: v.clone() for k, v in pl_module.transformer.state_dict().items() if "lora_" not in k}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        after = adapter_state_dict(pl_module.transformer)
        changed = {k.split("/")[0] for k in after if not torch.equal(after[k], self._before[k])}
        base_after = {k: v for k, v in pl_module.transformer.state_dict().items() if "lora_" not in k}
        base_same = all(torch.equal(base_after[k], v) for k, v in self._base_before.items())
        self.records.append((outputs["selection"], changed, base_same))


@pytest.fixture
def fit(random_cache):
    """Factory ``fit(cfg, callbacks=())``: trains on a fresh 4-clip random cache at the config's cache_dir
    and returns (module, trainer)."""

    def train(cfg, callbacks=()):
        random_cache(cfg.data.cache_dir, n_clips=4, relation=cfg.relation, seed=1)
        dm = RelationDataModule(cfg.data.cache_dir, relation=cfg.relation, batch_size=int(cfg.data.batch_size),
                                num_workers=0, seed=int(cfg.seed), caption_dropout=float(cfg.data.caption_dropout),
                                total_steps=int(cfg.trainer.max_steps))
        module = RelationModule(cfg)
        trainer = build_trainer(cfg, callbacks)
        trainer.fit(module, datamodule=dm)
        return module, trainer

    return train


def test_only_selected_lora_weights_move_and_base_is_frozen(tiny_cfg, fit):
    cfg = tiny_cfg("trainer.max_steps=9")
    watcher = StepWatcher()
    module, _ = fit(cfg, [watcher])
    assert len(watcher.records) == 9
    seen = set()
    for selection, changed, base_same in watcher.records:
        seen.add(selection)
        assert base_same, "a frozen base weight moved"
        assert changed == set(adapters_for_selection(selection, module.spec)), (selection, changed)
    assert seen == {"relation", "subject1", "subject2"}


def test_selection_is_a_pure_function_of_seed_and_step(tiny_cfg):
    cfg = tiny_cfg("hmt.probs=[0.5,0.25,0.25]")
    a, b = RelationModule(cfg), RelationModule(cfg)
    seq = [a.select_lora(s) for s in range(400)]
    assert seq == [b.select_lora(s) for s in range(400)]
    assert 0.42 < seq.count("relation") / 400 < 0.58
    other = RelationModule(tiny_cfg("seed=7"))
    assert [other.select_lora(s) for s in range(50)] != seq[:50]


def test_without_hmt_and_direct_lora_train_everything_every_step(tiny_cfg):
    assert RelationModule(tiny_cfg("hmt.enabled=false")).select_lora(3) == "relation"
    direct = RelationModule(tiny_cfg("lora.placement=direct", "hmt.enabled=false"))
    assert direct.select_lora(3) == "direct"
    assert set(k.split("/")[0] for k in direct.adapter_state()) == {"direct"}


def test_direct_lora_baseline_config_trains(repo_root, tiny_cfg, fit):
    """configs/baselines/direct_lora.yaml: its single adapter trains every step, the base stays frozen."""
    base = tiny_cfg("trainer.max_steps=3")
    cfg = load_config([repo_root / "configs" / "baselines" / "direct_lora.yaml"],
                      [f"{key}={OmegaConf.select(base, key)}" for key in (
                          "model.preset", "model.gradient_checkpointing", "lora.rank", "lora.alpha",
                          "data.num_workers", "optim.warmup_steps", "trainer.accelerator", "trainer.devices",
                          "trainer.checkpoint_every", "trainer.progress_bar", "output_dir", "data.cache_dir")]
                      + ["trainer.max_steps=3"])
    watcher = StepWatcher()
    module, _ = fit(cfg, [watcher])
    assert module.selections == ["direct"] * 3
    records = [(sel, changed, base_same) for sel, changed, base_same in watcher.records]
    assert records == [("direct", {"direct"}, True)] * 3


def test_hybrid_mask_follows_the_selection(tiny_cfg):
    module = RelationModule(tiny_cfg())
    subjects = torch.rand(1, 2, 3, 4, 4)
    batch = {"subject_masks": subjects, "relation_mask": torch.maximum(subjects[:, 0], subjects[:, 1])}
    assert torch.equal(module._hybrid_mask("subject1", batch), subjects[:, 0])
    assert torch.equal(module._hybrid_mask("subject2", batch), subjects[:, 1])
    assert torch.equal(module._hybrid_mask("relation", batch), batch["relation_mask"])
    summed = RelationModule(tiny_cfg("hmt.relation_mask=sum"))
    assert torch.equal(summed._hybrid_mask("relation", batch), subjects.sum(1))
    assert RelationModule(tiny_cfg("hmt.enabled=false"))._hybrid_mask("relation", batch) is None


def test_hybrid_mask_spares_samples_noisier_than_max_sigma(tiny_cfg):
    subjects = torch.rand(3, 2, 3, 4, 4)
    batch = {"subject_masks": subjects, "relation_mask": torch.maximum(subjects[:, 0], subjects[:, 1])}
    sigma = torch.tensor([0.2, 0.5, 0.9])
    gated = RelationModule(tiny_cfg("hmt.max_sigma=0.5"))._hybrid_mask("subject2", batch, sigma)
    assert torch.equal(gated[:2], subjects[:2, 1]) and not gated[2].any()
    # the default (the paper's) weights every noise level
    assert torch.equal(RelationModule(tiny_cfg())._hybrid_mask("relation", batch, sigma), batch["relation_mask"])


def test_mask_weighting_changes_the_gradient(tmp_path, tiny_cfg, fit):
    """lambda_m enters the loss the module optimizes: 0 and 50 give different updates."""
    finals = []
    for lam in (0, 50):
        cfg = tiny_cfg(f"hmt.lambda_m={lam}", "trainer.max_steps=2", "rcl.enabled=false", root=tmp_path / f"l{lam}")
        module, _ = fit(cfg)
        finals.append(module.adapter_state())
    assert any(not torch.equal(finals[0][k], finals[1][k]) for k in finals[0])


def test_lora_weights_are_fp32_and_only_they_are_optimized(tiny_cfg):
    module = RelationModule(tiny_cfg("model.dtype=bf16"))
    params = lora_parameters(module.transformer)
    assert params and all(p.dtype == torch.float32 and p.requires_grad for p in params.values())
    opt = module.configure_optimizers()["optimizer"]
    assert sum(len(g["params"]) for g in opt.param_groups) == len(params)
    assert opt.param_groups[0]["lr"] == pytest.approx(2e-4) and opt.param_groups[0]["weight_decay"] == 0.01


def test_lr_schedule_warmup_then_cosine():
    assert lr_factor(0, 200, 2400, "cosine", 0.0) == pytest.approx(1 / 200)
    assert lr_factor(199, 200, 2400, "cosine", 0.0) == pytest.approx(1.0)
    assert lr_factor(200, 200, 2400, "cosine", 0.0) == pytest.approx(1.0)
    assert lr_factor(1300, 200, 2400, "cosine", 0.0) == pytest.approx(0.5)
    assert lr_factor(2400, 200, 2400, "cosine", 0.1) == pytest.approx(0.1)
    assert lr_factor(2000, 200, 2400, "constant", 0.0) == 1.0


def test_lr_schedule_of_the_reference_code():
    """optim.warmup_from=zero and optim.schedule_steps=3000 (configs/reference.yaml): the reference's
    LambdaLR (train.py:153-159), transcribed in tests/helpers/reference_dreamrelation.py."""
    from tests.helpers.reference_dreamrelation import reference_lr_lambda

    for step in (0, 1, 100, 199, 200, 1000, 1799, 2000, 2999):
        assert lr_factor(step, 200, 3000, "cosine", 0.0, "zero") == pytest.approx(reference_lr_lambda(step), abs=1e-12)
    assert lr_factor(0, 200, 3000, "cosine", 0.0, "zero") == 0.0
    assert lr_factor(2000, 200, 3000, "cosine", 0.0, "zero") == pytest.approx(0.2830, abs=1e-4)


def test_bf16_lora_weights_and_optimizer_state(tiny_cfg, fit):
    module, _ = fit(tiny_cfg("lora.dtype=bf16", "trainer.max_steps=2"))
    params = lora_parameters(module.transformer)
    assert params and all(p.dtype == torch.bfloat16 for p in params.values())
    state = module.trainer.optimizers[0].state
    assert state and all(s["exp_avg"].dtype == torch.bfloat16 for s in state.values())
    assert any(bool(p.detach().float().abs().sum() > 0) for k, p in params.items() if "lora_B" in k)


def test_padded_batches_train(tiny_cfg, fit):
    module, trainer = fit(tiny_cfg("data.batch_size=2", "trainer.max_steps=3"))
    assert trainer.global_step == 3 and len(module.memory_bank) == 6


def test_bf16_base_with_mixed_precision_keeps_fp32_loras(tiny_cfg, fit):
    """The GPU recipe (bf16 base, bf16-mixed autocast, fp32 LoRA), run on the CPU."""
    cfg = tiny_cfg("model.dtype=bf16", "trainer.precision=bf16-mixed", "trainer.max_steps=3",
                   "model.gradient_checkpointing=true")
    watcher = StepWatcher()
    module, _ = fit(cfg, [watcher])
    assert all(p.dtype == torch.float32 for p in lora_parameters(module.transformer).values())
    assert all(changed == set(adapters_for_selection(sel, module.spec)) and base
               for sel, changed, base in watcher.records)
    assert all(torch.isfinite(v).all() for v in module.adapter_state().values())

"""Preview videos during a tiny training run: files, TensorBoard, and an unchanged training."""

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from relvid.models.adapter_file import load_adapters
from relvid.models.lora import adapter_state_dict
from relvid.training.callbacks.preview import PreviewCallback, PreviewPromptError
from relvid.training.run import run
from relvid.video_io import read_video
from tests.helpers.configs import TOY_CHANNELS

PROMPTS = ("A dog is shaking hands with a cat.", "A bear is shaking hands with a raccoon in a forest.")


@pytest.fixture
def cache(random_cache):
    return random_cache(n_clips=3, relation="shaking_hands", latent_shape=(TOY_CHANNELS, 2, 4, 4), seed=1,
                        prompts=PROMPTS).root


PREVIEW = ("preview.every_n_steps=2", "preview.sampling.num_steps=2", "preview.sampling.frames=7",
           "preview.sampling.height=16", "preview.sampling.width=24", "preview.max_prompts=2")


def test_previews_are_written_logged_and_leave_training_unchanged(cache, toy_cfg):
    plain = run(toy_cfg("plain"))
    with_previews = run(toy_cfg("previews", *PREVIEW))
    _, a, _ = load_adapters(plain / "adapters" / "relvid_adapters.safetensors")
    _, b, _ = load_adapters(with_previews / "adapters" / "relvid_adapters.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "previews changed the training"

    files = sorted(p.name for p in (with_previews / "previews").glob("*.mp4"))
    assert [f[:13] for f in files] == ["step000002_p0", "step000002_p1", "step000004_p0", "step000004_p1"]
    assert files[0][13:] == files[2][13:] and files[0][13:] != files[1][13:]  # a key per prompt, not per step
    assert read_video(with_previews / "previews" / files[0]).shape == (7, 16, 24, 3)
    acc = EventAccumulator(str(with_previews / "tensorboard"))
    acc.Reload()
    assert {"preview/p0", "preview/p1"} <= set(acc.Tags()["images"])
    events = acc.Images("preview/p0")
    assert [e.step for e in events] == [2, 4] and events[0].encoded_image_string[:6] == b"GIF89a"
    assert not (plain / "previews").exists()


class _Trainer:
    is_global_zero = True
    logger = None


def test_preview_restores_adapters_modes_and_grads(cache, toy_cfg):
    from relvid.models.lora import activate, active_adapters, adapters_for_selection
    from relvid.training.module import RelationModule

    cfg = toy_cfg("direct", *PREVIEW)
    module = RelationModule(cfg)
    activate(module.transformer, adapters_for_selection("subject1", module.spec))
    module.transformer.train()
    before = adapter_state_dict(module.transformer)
    rng = torch.get_rng_state()
    cb = PreviewCallback.from_config(cfg)
    cb.setup(_Trainer(), module, "fit")
    first = cb.render(_Trainer(), module, step=7)
    again = cb.render(_Trainer(), module, step=8)
    assert active_adapters(module.transformer) == ("subject1", "ffn")
    assert module.transformer.training and all(m.training for m in module.transformer.modules())
    assert torch.equal(torch.get_rng_state(), rng)
    after = adapter_state_dict(module.transformer)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(read_video(first[0]), read_video(again[0]))  # fixed noise: comparable across steps


def test_unknown_preview_prompt_is_refused_before_training(cache, toy_cfg):
    cfg = toy_cfg("bad", *PREVIEW, "preview.prompts=[A unicorn is hugging a whale.]")
    with pytest.raises(PreviewPromptError, match="unicorn.*relvid preprocess"):
        run(cfg)


@pytest.mark.parametrize("override,key", [("preview.sampling.num_steps=1", "preview.sampling.num_steps"),
                                          ("relation_accuracy.max_prompts=0", "relation_accuracy.max_prompts"),
                                          ("relation_accuracy.judge.kind=gpt", "relation_accuracy.judge.kind"),
                                          ("sampling.guidance_scale=0.5", "sampling.guidance_scale"),
                                          ("judge.repeats=0", "judge.repeats")])
def test_bad_callback_settings_name_the_key(override, key, toy_cfg):
    from relvid.config import ConfigError

    with pytest.raises(ConfigError, match=key):
        toy_cfg("x", override)


def test_previews_of_other_prompts_never_overwrite_old_ones_and_carry_sidecars(cache, toy_cfg):
    """A run resumed with other preview prompts/settings into the same folder writes beside the old previews."""
    import json

    from relvid.training.module import RelationModule

    first_cfg = toy_cfg("resumed", *PREVIEW, f"preview.prompts=[{PROMPTS[0]}]")
    module = RelationModule(first_cfg)
    first = PreviewCallback.from_config(first_cfg)
    first.setup(_Trainer(), module, "fit")
    [old] = first.render(_Trainer(), module, step=2)
    old_bytes = old.read_bytes()
    side = json.loads(old.with_suffix(".json").read_text())
    assert side["prompt"] == PROMPTS[0] and side["seed"] == 0 and side["step"] == 2
    assert side["settings"]["num_steps"] == 2 and side["settings"]["width"] == 24

    for overrides in ([f"preview.prompts=[{PROMPTS[1]}]"], [f"preview.prompts=[{PROMPTS[0]}]", "preview.seed=3"],
                      [f"preview.prompts=[{PROMPTS[0]}]", "preview.sampling.num_steps=3"]):
        cfg = toy_cfg("resumed", *PREVIEW, *overrides)
        again = PreviewCallback.from_config(cfg)
        again.setup(_Trainer(), module, "fit")
        [new] = again.render(_Trainer(), module, step=2)
        assert new != old and new.name.startswith("step000002_p0")
        assert old.read_bytes() == old_bytes and json.loads(old.with_suffix(".json").read_text()) == side
    sides = [json.loads(p.read_text()) for p in sorted(first.out_dir.glob("*.json"))]
    assert len(sides) == 4 and {s["prompt"] for s in sides} == set(PROMPTS)


def fit_with_previews(cfg, accumulate: int, ckpt_path=None) -> PreviewCallback:
    """Lightning's own Trainer with gradient accumulation, the preview callback and a checkpoint every 2 steps."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from relvid.data.datamodule import RelationDataModule
    from relvid.training.module import RelationModule

    steps = int(cfg.trainer.max_steps)
    datamodule = RelationDataModule(cfg.data.cache_dir, relation=cfg.relation, batch_size=1, num_workers=0,
                                    seed=int(cfg.seed), caption_dropout=0.0, total_steps=steps)
    previews = PreviewCallback.from_config(cfg)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, accumulate_grad_batches=accumulate,
                        logger=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0, use_distributed_sampler=False, default_root_dir=cfg.output_dir,
                        callbacks=[previews, ModelCheckpoint(dirpath=f"{cfg.output_dir}/ckpt", filename="{step}",
                                                             every_n_train_steps=2, save_top_k=-1)])
    trainer.fit(RelationModule(cfg), datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    assert trainer.global_step == steps
    return previews


def test_gradient_accumulation_previews_each_step_once_and_resume_does_not_repeat_it(cache, toy_cfg):
    """Two micro-batches per optimizer step: on_train_batch_end runs twice per step with the same global_step."""
    cfg = toy_cfg("accumulate", *PREVIEW, "preview.max_prompts=1", "rcl.enabled=false")
    full = fit_with_previews(cfg, accumulate=2)
    assert [p.name[:13] for p in full.written] == ["step000002_p0", "step000004_p0"]  # no step 0, none twice

    resumed_cfg = toy_cfg("accumulate_resumed", *PREVIEW, "preview.max_prompts=1", "rcl.enabled=false")
    resumed = fit_with_previews(resumed_cfg, accumulate=2, ckpt_path=f"{cfg.output_dir}/ckpt/step=2.ckpt")
    assert [p.name[:13] for p in resumed.written] == ["step000004_p0"]  # step 2 was previewed before the stop
    assert torch.equal(read_video(resumed.written[0]), read_video(full.written[1]))

"""Preview videos during a tiny training run: files, TensorBoard, and an unchanged training."""

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from relvid.training.callbacks.preview import PreviewCallback, PreviewPromptError
from relvid.data.random_cache import write_random_cache
from relvid.video_io import read_video
from relvid.models.lora import adapter_state_dict, load_adapters
from relvid.toy.codec import ToyCodec
from relvid.training.run import run
from tests.test_module import tiny_cfg

TOY_CHANNELS = ToyCodec().latent_channels
PROMPTS = ("A dog is shaking hands with a cat.", "A bear is shaking hands with a raccoon in a forest.")


def toy_cfg(tmp_path, name, *overrides):
    return tiny_cfg(tmp_path, "model.codec=toy", "model.text_encoder=toy", f"model.tiny.in_channels={TOY_CHANNELS}",
                    "trainer.max_steps=4", "lora.dropout=0.1", "data.caption_dropout=0.3",
                    f"output_dir={tmp_path / name}", *overrides)


@pytest.fixture
def cache(tmp_path):
    write_random_cache(tmp_path / "cache", n_clips=3, relation="shaking_hands", latent_shape=(TOY_CHANNELS, 2, 4, 4),
                       seed=1, prompts=PROMPTS)
    return tmp_path / "cache"


PREVIEW = ("preview.every_n_steps=2", "preview.num_steps=2", "preview.frames=7", "preview.height=16",
           "preview.width=24", "preview.max_prompts=2")


def test_previews_are_written_logged_and_leave_training_unchanged(tmp_path, cache):
    plain = run(toy_cfg(tmp_path, "plain"))
    with_previews = run(toy_cfg(tmp_path, "previews", *PREVIEW))
    _, a, _ = load_adapters(plain / "adapters" / "relvid_adapters.safetensors")
    _, b, _ = load_adapters(with_previews / "adapters" / "relvid_adapters.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "previews changed the training"

    files = sorted(p.name for p in (with_previews / "previews").glob("*.mp4"))
    assert files == ["step000002_p0.mp4", "step000002_p1.mp4", "step000004_p0.mp4", "step000004_p1.mp4"]
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


def test_preview_restores_adapters_modes_and_grads(tmp_path, cache):
    from relvid.models.lora import active_adapters, adapters_for_selection, activate
    from relvid.training.module import RelationModule

    cfg = toy_cfg(tmp_path, "direct", *PREVIEW)
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


def test_unknown_preview_prompt_is_refused_before_training(tmp_path, cache):
    cfg = toy_cfg(tmp_path, "bad", *PREVIEW, "preview.prompts=[A unicorn is hugging a whale.]")
    with pytest.raises(PreviewPromptError, match="unicorn.*relvid preprocess"):
        run(cfg)


@pytest.mark.parametrize("override,key", [("preview.num_steps=1", "preview.num_steps"),
                                          ("relation_accuracy.max_prompts=0", "relation_accuracy.max_prompts"),
                                          ("relation_accuracy.judge=gpt", "relation_accuracy.judge")])
def test_bad_callback_settings_name_the_key(tmp_path, override, key):
    from relvid.config import ConfigError

    with pytest.raises(ConfigError, match=key):
        toy_cfg(tmp_path, "x", override)

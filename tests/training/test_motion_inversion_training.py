"""MotionInversion (method=motion_inversion) through the one training path: only the motion embeddings
learn, the run's file reproduces the video the trained module samples, resume equals an uninterrupted
run, and the command line trains it from configs/baselines/motion_inversion.yaml."""

import lightning as L
import pytest
import torch

from relvid.cli import main
from relvid.config import SamplingConfig
from relvid.data.cache import ClipCache
from relvid.inference.generate import generate_video, inference_scope
from relvid.models.adapter_file import apply_adapter_source
from relvid.models.backbone import load_transformer
from relvid.models.lora import lora_parameters
from relvid.models.motion_inversion import ATTR, load_motion_file
from relvid.toy.codec import ToyCodec
from relvid.training.run import run
from tests.helpers.configs import TOY_CHANNELS

PROMPT = "A dog is shaking hands with a cat."
SETTINGS = SamplingConfig(num_steps=2, frames=7, height=16, width=16, guidance_scale=2.0)  # the cache's grid
MI = ("method=motion_inversion", "hmt.enabled=false", "trainer.lora_formats=[]", "rcl.enabled=true",
      "optim.warmup_steps=1", "trainer.checkpoint_every=2", "trainer.max_steps=4")


@pytest.fixture
def cache(random_cache):
    # latents (C, 3, 8, 8): a 3 x 4 x 4 token grid, the toy codec's at 7 frames of 16 x 16
    return random_cache(n_clips=3, relation="shaking_hands", latent_shape=(TOY_CHANNELS, 3, 8, 8), seed=1,
                        prompts=(PROMPT,)).root


class Capture(L.Callback):
    """At the end of training: the module's transformer state, and a video it samples as a preview does."""

    def on_train_end(self, trainer, pl_module):
        self.state = {k: v.detach().clone() for k, v in pl_module.transformer.state_dict().items()}
        embeds, mask = ClipCache(pl_module.cfg.data.cache_dir).read_prompts()[PROMPT]
        negative = ClipCache(pl_module.cfg.data.cache_dir).read_prompts()[""]
        with inference_scope(pl_module.transformer, pl_module.spec):
            self.video = generate_video(pl_module.transformer, ToyCodec(), embeds, mask, negative, seed=3,
                                        settings=SETTINGS)
        self.lora = lora_parameters(pl_module.transformer)


def test_only_the_motion_embeddings_learn_and_the_file_reproduces_the_sampled_video(cache, toy_cfg):
    capture = Capture()
    cfg = toy_cfg("run", *MI)
    out = run(cfg, extra_callbacks=[capture])
    base = load_transformer(cfg.model).state_dict()
    learned = {k: v for k, v in capture.state.items() if k.startswith(f"{ATTR}.")}
    assert capture.lora == {}  # no LoRA anywhere
    assert set(capture.state) == set(base) | set(learned)
    assert all(torch.equal(capture.state[k], v) for k, v in base.items()), "the frozen base changed"
    assert learned and all(v.abs().sum() > 0 for v in learned.values()), "an embedding did not learn"
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    assert sorted(ckpt["state_dict"]) == sorted(f"transformer.{k}" for k in learned)  # never the base

    spec, state, meta = load_motion_file(out / "adapters" / "relvid_adapters.safetensors")
    assert spec.blocks == (0, 1) and (spec.frames, spec.height, spec.width) == (3, 4, 4) and meta["step"] == "4"
    fresh = load_transformer(cfg.model)
    source = apply_adapter_source(fresh, out / "adapters")
    assert source.kind == "motion"
    embeds, mask = ClipCache(cache).read_prompts()[PROMPT]
    video = generate_video(fresh, ToyCodec(), embeds, mask, ClipCache(cache).read_prompts()[""], seed=3,
                           settings=SETTINGS)
    assert torch.equal(video, capture.video)
    with torch.no_grad():  # and the debiasing is on: the run's raw embeddings sample another video
        fresh.motion_embeddings.inference = False
    raw = generate_video(fresh, ToyCodec(), embeds, mask, ClipCache(cache).read_prompts()[""], seed=3,
                         settings=SETTINGS)
    assert not torch.equal(raw, video)


def test_resume_equals_an_uninterrupted_run(cache, toy_cfg, tmp_path):
    out = run(toy_cfg("full", *MI))
    resumed = run(toy_cfg("resumed", *MI, f"resume={out / 'checkpoints' / 'step000002.ckpt'}"))
    _, a, _ = load_motion_file(out / "adapters" / "relvid_adapters.safetensors")
    _, b, _ = load_motion_file(resumed / "adapters" / "relvid_adapters.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ca = torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)
    cb = torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=False)
    bank_a = next(v for k, v in ca["callbacks"].items() if "MemoryBank" in k)
    bank_b = next(v for k, v in cb["callbacks"].items() if "MemoryBank" in k)
    for key in bank_a:  # RCL's memory bank too (MotionInversion + RCL)
        va, vb = bank_a[key], bank_b[key]
        assert torch.equal(va, vb) if isinstance(va, torch.Tensor) else va == vb


def test_the_command_line_trains_the_baseline_config_on_the_cpu(random_cache, tmp_path, repo_root):
    cache = random_cache(n_clips=2, relation="shaking_hands", seed=2).root
    code = main(["train", str(repo_root / "configs" / "tiny.yaml"),
                 str(repo_root / "configs" / "baselines" / "motion_inversion.yaml"), f"data.cache_dir={cache}",
                 "trainer.max_steps=3", f"output_dir={tmp_path / 'cli'}", "trainer.progress_bar=false"])
    assert code == 0
    spec, state, _ = load_motion_file(tmp_path / "cli" / "adapters" / "relvid_adapters.safetensors")
    assert spec.inference == "frame_difference" and spec.stride == 2 and len(state) == 2 * len(spec.blocks)
    assert "method: motion_inversion" in (tmp_path / "cli" / "config.yaml").read_text()

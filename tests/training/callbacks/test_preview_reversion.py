"""Previews of a ReVersion run (method=reversion): prompts carrying the learned token, encoded by the run's
text encoder with the token's current vectors, the same video `relvid sample` gives with the run's file,
and a training and a text encoder left as they were."""

import json
from pathlib import Path

import pytest
import torch

from relvid.data.cache import ClipCache
from relvid.inference.generate import generate_video
from relvid.models.backbone import load_transformer
from relvid.models.reversion import ATTR, encode_with_token, load_reversion_file
from relvid.toy.codec import ToyCodec
from relvid.toy.text import ToyTextEncoder
from relvid.training.callbacks.preview import PreviewCallback, PreviewPromptError
from relvid.training.run import run
from relvid.video_io import read_video, write_mp4
from tests.helpers.configs import TOY_CHANNELS
from tests.helpers.preprocess import save_tiny_t5

CAPTION = "A person is <R> a person."
RV = ("method=reversion", "hmt.enabled=false", "rcl.enabled=false", "trainer.lora_formats=[]",
      "data.caption_dropout=0", "optim.lr=0.05", "trainer.max_steps=4")
PREVIEW = ("preview.every_n_steps=2", "preview.sampling.num_steps=2", "preview.sampling.frames=7",
           "preview.sampling.height=16", "preview.sampling.width=16", "preview.sampling.guidance_scale=2.0")


@pytest.fixture
def cache(random_cache):
    return random_cache(n_clips=3, relation="shaking_hands", latent_shape=(TOY_CHANNELS, 3, 8, 8), seed=1).root


def test_previews_carry_the_current_token_and_equal_sampling_with_the_runs_file(cache, toy_cfg, tmp_path):
    plain = run(toy_cfg("plain", *RV))
    cfg = toy_cfg("previews", *RV, *PREVIEW)
    out = run(cfg)
    spec, state, _ = load_reversion_file(out / "adapters" / "relvid_adapters.safetensors")
    _, without, _ = load_reversion_file(plain / "adapters" / "relvid_adapters.safetensors")
    assert all(torch.equal(state[k], without[k]) for k in state), "previews changed the training"

    files = sorted((out / "previews").glob("*.mp4"))
    assert [f.name[:13] for f in files] == ["step000002_p0", "step000004_p0"]  # the caption alone by default
    side = json.loads(files[1].with_suffix(".json").read_text())
    assert side["prompt"] == CAPTION and side["learned_token"] == "<R>" and side["step"] == 4
    # the last preview is what sampling the run's file gives (the token's vectors after step 4)
    [(embeds, mask)] = encode_with_token(ToyTextEncoder(), [CAPTION], spec, state)
    negative = ClipCache(cache).read_prompts()[""]
    expected = generate_video(load_transformer(cfg.model).eval(), ToyCodec(), embeds, mask, negative, seed=0,
                              settings=cfg.preview.sampling)
    assert torch.equal(read_video(files[1]), mp4_round_trip(expected, cfg.preview.sampling.fps, tmp_path / "x.mp4"))
    # the transformer is frozen: step 2's preview differs only through the token's vectors then
    assert not torch.equal(read_video(files[0]), read_video(files[1]))


def mp4_round_trip(frames: torch.Tensor, fps: int, path: Path) -> torch.Tensor:
    """`frames` as a preview file holds them (written to mp4 and read back)."""
    return read_video(write_mp4(path, frames, fps=fps))


def test_preview_prompts_of_a_reversion_run_must_hold_the_token(cache, toy_cfg):
    cfg = toy_cfg("bad", *RV, *PREVIEW, "preview.prompts=[A dog is shaking hands with a cat.]")
    with pytest.raises(PreviewPromptError, match=r"preview\.prompts.*lack the learned token <R>"):
        run(cfg)
    assert not list(Path(cfg.output_dir).glob("**/*.ckpt")), "refused only after training"

    cfg = toy_cfg("own", *RV, *PREVIEW, "trainer.max_steps=2", "preview.prompts=[A dog is <R> a cat.]")
    [video] = sorted((run(cfg) / "previews").glob("*.mp4"))
    assert json.loads(video.with_suffix(".json").read_text())["prompt"] == "A dog is <R> a cat."


class _Trainer:
    is_global_zero = True
    logger = None


def test_preview_encodes_in_eval_mode_and_restores_the_text_encoder(cache, toy_cfg, tmp_path):
    """T5 is held in train mode for its recomputed blocks during training: a preview encodes in eval mode and
    leaves every mode, requires_grad flag, the token's vectors and the random state as they were."""
    from relvid.training.module import RelationModule

    t5 = save_tiny_t5(tmp_path / "t5")
    cfg = toy_cfg("t5", *RV, *PREVIEW, "model.text_encoder=t5", f"model.text_encoder_path={t5}")
    module = RelationModule(cfg)
    model = module.text_encoder.model
    assert model.training  # reversion.text_encoder_checkpointing puts it there
    model.encoder.block[0].requires_grad_(True)  # flags of any kind come back as they were
    modes = {n: m.training for n, m in model.named_modules()}
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    seen = []
    model.register_forward_pre_hook(lambda m, args: seen.append(m.training))
    token = getattr(module, ATTR)
    before = {k: v.detach().clone() for k, v in token.vectors().items()}
    rng = torch.get_rng_state()

    cb = PreviewCallback.from_config(cfg)
    cb.setup(_Trainer(), module, "fit")
    [first] = cb.render(_Trainer(), module, step=1)
    assert seen == [False]
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
    assert all(torch.equal(v, before[k]) and v.requires_grad and v.grad is None for k, v in token.vectors().items())
    assert torch.equal(torch.get_rng_state(), rng)

    with torch.no_grad():  # a step's update of the token: the next preview conditions on it
        token.embedding.add_(1.0)
    [second] = cb.render(_Trainer(), module, step=2)
    assert not torch.equal(read_video(first), read_video(second))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_previews_on_the_gpu_encode_with_the_encoder_where_training_keeps_it(cache, toy_cfg, tmp_path):
    """On a GPU the run's T5 is moved there at fit start (bf16) and stays: previews encode with it in place and
    leave it there, in the train mode its recomputed blocks need."""
    import lightning as L

    seen = []

    class Probe(L.Callback):
        def on_train_end(self, trainer, pl_module):
            seen.append((pl_module.text_encoder.device.type, pl_module.text_encoder.model.training))

    t5 = save_tiny_t5(tmp_path / "t5")
    cfg = toy_cfg("gpu", *RV, *PREVIEW, "model.text_encoder=t5", f"model.text_encoder_path={t5}",
                  "trainer.accelerator=gpu")
    out = run(cfg, extra_callbacks=[Probe()])
    files = sorted((out / "previews").glob("*.mp4"))
    assert [f.name[:13] for f in files] == ["step000002_p0", "step000004_p0"]
    assert json.loads(files[0].with_suffix(".json").read_text())["learned_token"] == "<R>"
    assert seen == [("cuda", True)]

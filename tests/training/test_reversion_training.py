"""ReVersion (method=reversion) through the one training path: only the token's vectors learn (the
transformer and the text encoder, T5's table included, stay as they were), the run's file reproduces the
video the trained module samples, resume equals an uninterrupted run, and the command line trains the
baseline config with a tiny T5 on the CPU."""

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf

from relvid.cli import main
from relvid.config import SamplingConfig, load_config
from relvid.inference.generate import generate_video, inference_scope
from relvid.inference.render import encode_prompts
from relvid.models.adapter_file import apply_adapter_source
from relvid.models.backbone import load_transformer
from relvid.models.reversion import ATTR, encode_with_token, load_reversion_file
from relvid.models.t5 import T5TextEncoder
from relvid.toy.codec import ToyCodec
from relvid.training.run import run
from tests.helpers.configs import TOY_CHANNELS
from tests.helpers.preprocess import save_tiny_t5

TEST_PROMPT = "A dog is <R> a cat."
SETTINGS = SamplingConfig(num_steps=2, frames=7, height=16, width=16, guidance_scale=2.0)  # the cache's grid
RV = ("method=reversion", "hmt.enabled=false", "rcl.enabled=false", "trainer.lora_formats=[]",
      "data.caption_dropout=0", "optim.lr=0.05", "trainer.checkpoint_every=2", "trainer.max_steps=4")


@pytest.fixture
def cache(random_cache):
    # latents (C, 3, 8, 8): a 3 x 4 x 4 token grid, the toy codec's at 7 frames of 16 x 16
    return random_cache(n_clips=3, relation="shaking_hands", latent_shape=(TOY_CHANNELS, 3, 8, 8), seed=1).root


class Capture(L.Callback):
    """At the start and end of training: the transformer's and the text encoder's weights, the token's
    vectors; at the end, a video sampled with the trained token as a preview would (with `video`)."""

    def __init__(self, video: bool = True) -> None:
        self.with_video = video

    def on_train_start(self, trainer, pl_module):
        self.start = {k: v.detach().clone() for k, v in getattr(pl_module, ATTR).vectors().items()}

    def on_train_end(self, trainer, pl_module):
        self.state = {k: v.detach().clone() for k, v in pl_module.transformer.state_dict().items()}
        encoder = pl_module.text_encoder
        self.encoder_state = ({k: v.detach().clone() for k, v in encoder.model.state_dict().items()}
                              if hasattr(encoder, "model") else None)
        self.vectors = {k: v.detach().clone() for k, v in getattr(pl_module, ATTR).vectors().items()}
        if not self.with_video:
            return
        (embeds, mask), negative = encode_with_token(encoder, [TEST_PROMPT, ""], pl_module.spec, self.vectors)
        with inference_scope(pl_module.transformer, pl_module.spec):
            self.video = generate_video(pl_module.transformer, ToyCodec(), embeds, mask, negative, seed=3,
                                        settings=SETTINGS)


def test_only_the_token_learns_and_the_file_reproduces_the_sampled_video(cache, toy_cfg):
    capture = Capture()
    cfg = toy_cfg("run", *RV)
    out = run(cfg, extra_callbacks=[capture])
    base = load_transformer(cfg.model).state_dict()
    assert set(capture.state) == set(base)  # nothing added to the transformer
    assert all(torch.equal(capture.state[k], v) for k, v in base.items()), "the frozen transformer changed"
    assert all(not torch.equal(capture.vectors[k], capture.start[k]) for k in ("embedding", "previous"))
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    assert sorted(ckpt["state_dict"]) == [f"{ATTR}.embedding", f"{ATTR}.previous"]

    spec, state, meta = load_reversion_file(out / "adapters" / "relvid_adapters.safetensors")
    assert spec.encoder == "toy-words" and meta["step"] == "4"
    assert all(torch.equal(state[k], capture.vectors[k]) for k in state)
    fresh = load_transformer(cfg.model)
    source = apply_adapter_source(fresh, out / "adapters")
    assert source.kind == "reversion" and source.spec == spec
    encoded = encode_prompts(cfg.model, [TEST_PROMPT, ""], "cpu", str(out / "adapters"))
    video = generate_video(fresh, ToyCodec(), *encoded[TEST_PROMPT], encoded[""], seed=3, settings=SETTINGS)
    assert torch.equal(video, capture.video)
    plain = encode_prompts(cfg.model, [TEST_PROMPT, ""], "cpu", None)  # without the file: another video
    other = generate_video(fresh, ToyCodec(), *plain[TEST_PROMPT], plain[""], seed=3, settings=SETTINGS)
    assert not torch.equal(other, video)


def test_resume_equals_an_uninterrupted_run(cache, toy_cfg):
    out = run(toy_cfg("full", *RV))
    resumed = run(toy_cfg("resumed", *RV, f"resume={out / 'checkpoints' / 'step000002.ckpt'}"))
    _, a, _ = load_reversion_file(out / "adapters" / "relvid_adapters.safetensors")
    _, b, _ = load_reversion_file(resumed / "adapters" / "relvid_adapters.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    short = run(toy_cfg("short", *RV[:-1], "trainer.max_steps=2"))  # and the resume did train on
    _, c, _ = load_reversion_file(short / "adapters" / "relvid_adapters.safetensors")
    assert not torch.equal(a["embedding"], c["embedding"])


def test_the_command_line_trains_the_baseline_on_a_tiny_t5_and_only_the_new_row_changes(random_cache, tmp_path,
                                                                                        repo_root):
    cache = random_cache(n_clips=2, relation="shaking_hands", seed=2).root
    t5 = save_tiny_t5(tmp_path / "t5")
    capture = Capture(video=False)
    overrides = [f"data.cache_dir={cache}", "model.text_encoder=t5", f"model.text_encoder_path={t5}",
                 "trainer.max_steps=2", "data.batch_size=1",  # the config accumulates 4: some micro-batches draw no
                 # preposition the tiny tokenizer knows, and skip the steering term
                 "trainer.progress_bar=false"]
    configs = [repo_root / "configs" / "tiny.yaml", repo_root / "configs" / "baselines" / "reversion.yaml"]
    code = main(["train", *map(str, configs), *overrides, f"output_dir={tmp_path / 'cli'}"])
    assert code == 0
    saved = OmegaConf.load(tmp_path / "cli" / "config.yaml")
    assert saved.method == "reversion"
    spec, state, _ = load_reversion_file(tmp_path / "cli" / "adapters" / "relvid_adapters.safetensors")
    fresh = T5TextEncoder.from_folder(t5)
    table = fresh.model.get_input_embeddings().weight
    assert spec.encoder == "t5" and spec.token_id == len(fresh.tokenizer)  # the first free id
    and_id = fresh.tokenizer("and", add_special_tokens=False).input_ids[-1]
    assert not torch.equal(state["embedding"], table[and_id].detach()), "the token did not learn"
    # T5 itself is untouched by a run that holds it (the module's encoder, after training)
    run(load_config(configs, [*overrides, f"output_dir={tmp_path / 'again'}"]), extra_callbacks=[capture])
    assert capture.encoder_state is not None
    # (the tiny tokenizer fills its table, so the row is appended; T5-XXL's table has spare rows)
    assert capture.encoder_state.keys() == fresh.model.state_dict().keys()
    assert all(torch.equal(capture.encoder_state[k][: w.shape[0]], w) for k, w in fresh.model.state_dict().items())

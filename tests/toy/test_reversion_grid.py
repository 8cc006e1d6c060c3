"""The toy grid's ReVersion rows (Table 1v): the test prompts carry the learned token in place of the relation's
phrase, encoded with the run's vectors; the run's metrics say so, and they are the videos `generate_video`
gives on `encode_with_token`'s output. Other methods' settings (and so their kept metrics) are unchanged."""

import dataclasses
import json
from argparse import Namespace

import pytest
import torch

from relvid.inference.generate import generate_video
from relvid.models.adapter_file import read_reversion
from relvid.models.reversion import ReVersionSpec, encode_with_token
from relvid.toy.codec import ToyCodec
from relvid.toy.drivers import evaluate
from relvid.toy.drivers.customize import customize, load_base, load_customized, method_config
from relvid.toy.drivers.datasets import build_exemplar_cache
from relvid.toy.drivers.evaluate import TOY_SAMPLING, generate, video_record
from relvid.toy.judge import judge
from relvid.toy.text import ToyTextEncoder
from tests.helpers.scripts import load_script

RELATION = "moving_apart"
CHEAP = dataclasses.replace(TOY_SAMPLING, num_steps=4)  # for comparisons only


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A two-step ReVersion run where the grid keeps it (<out>/runs/reversion/<relation>/seed0/train)."""
    out = tmp_path_factory.mktemp("grid")
    build_exemplar_cache(out / "cache", [RELATION], clips=2, progress=False)
    customize("reversion", RELATION, out / "cache", out / "runs" / "reversion" / RELATION / "seed0" / "train",
              overrides=["trainer.max_steps=2", "trainer.progress_bar=false", "trainer.log_every_n_steps=1",
                         "optim.lr=0.05"])
    return out


def test_the_grid_samples_reversion_with_its_token_and_records_it(work):
    grid = load_script("run")
    args = Namespace(out=str(work), runs=str(work / "kept"), prompts=1, guidance=TOY_SAMPLING.guidance_scale,
                     adapters="all", steps=800, world="test-world", finished_only=True)
    record = grid.run_one("reversion", RELATION, 0, args)  # sampled: its adapters exist, its metrics do not
    assert record["settings"]["test_prompts"] == "A <subject> is <R> a <subject>."
    assert record["settings"]["adapters"] == "inference"  # no LoRA: --adapters all has nothing to add

    [prompt] = evaluate.test_prompts(RELATION, 1, seed=0, token="<R>")
    assert prompt.text == "A red circle is <R> a green square."
    [video] = record["videos"]
    assert video["prompt"] == prompt.text
    # the grid's video is generate_video on encode_with_token's output with the run's file, judged as any other
    spec, vectors = read_reversion(work / "runs" / "reversion" / RELATION / "seed0" / "train" / "adapters")
    [(embeds, mask)] = encode_with_token(ToyTextEncoder(), [prompt.text], spec, vectors)
    negative = ToyTextEncoder().encode([TOY_SAMPLING.negative_prompt])[0]
    frames = generate_video(load_base(), ToyCodec(), embeds, mask, negative, prompt.seed, TOY_SAMPLING)
    assert video == video_record(frames, prompt, judge(frames, prompt.s1, prompt.s2))

    kept = json.loads((work / "kept" / "reversion" / f"{RELATION}_s0.json").read_text())
    assert kept["settings"] == record["settings"]
    assert grid.run_one("reversion", RELATION, 0, args)["videos"] == kept["videos"]  # reused, not sampled again


def test_the_learned_vectors_make_the_videos(work):
    adapters = work / "runs" / "reversion" / RELATION / "seed0" / "train" / "adapters"
    spec, vectors = read_reversion(adapters)
    model = load_customized(adapters)
    prompts = evaluate.test_prompts(RELATION, 1, seed=0, token=spec.token)
    initial = ToyTextEncoder().initial_token_vectors(spec.token, spec.init_word)
    assert all(not torch.equal(vectors[k], initial[k]) for k in vectors)
    [learned] = generate(model, prompts, CHEAP, progress=False, learned=(spec, vectors))
    [untrained] = generate(model, prompts, CHEAP, progress=False, learned=(spec, initial))
    [plain] = generate(model, evaluate.test_prompts(RELATION, 1, seed=0), CHEAP, progress=False)
    assert not torch.equal(learned, untrained) and not torch.equal(learned, plain)


def test_prompts_with_a_token_and_learned_vectors_go_together():
    encoder = ToyTextEncoder()
    spec = ReVersionSpec(encoder=encoder.name, dim=encoder.dim, vectors=("embedding", "previous"))
    learned = (spec, encoder.initial_token_vectors("<R>", "and"))
    model = torch.nn.Identity()  # refused before any sampling
    with pytest.raises(ValueError, match="learned vectors"):
        generate(model, evaluate.test_prompts(RELATION, 1, token="<R>"), progress=False)
    with pytest.raises(ValueError, match=r"token='<R>'"):
        generate(model, evaluate.test_prompts(RELATION, 1), progress=False, learned=learned)


def test_only_reversion_records_its_prompts_so_other_kept_metrics_still_match(tmp_path):
    grid = load_script("run")
    args = Namespace(world="w", steps=800, prompts=10, guidance=4.0)
    for method in ("dreamrelation", "direct_lora", "motion_inversion", "reference"):
        cfg = method_config(method, RELATION, tmp_path / "cache", tmp_path / "out")
        assert set(grid.run_settings(method, cfg, "inference", args)) == {
            "world", "steps", "prompts", "sampling_steps", "guidance", "adapters", "null_condition"}
    cfg = method_config("reversion", RELATION, tmp_path / "cache", tmp_path / "out")
    assert grid.run_settings("reversion", cfg, "inference", args)["test_prompts"] == "A <subject> is <R> a <subject>."

"""Judged relation accuracy during a tiny training run, with the API judge on loopback."""

import json

import pytest
import torch

from relvid.config import ConfigError
from relvid.models.adapter_file import load_adapters
from relvid.prompts import eval_prompts
from relvid.training.run import run
from tests.helpers.configs import TOY_CHANNELS
from tests.helpers.logs import scalars

RA = ("relation_accuracy.every_n_steps=2", "relation_accuracy.sampling.num_steps=2",
      "relation_accuracy.sampling.frames=7", "relation_accuracy.sampling.height=16",
      "relation_accuracy.sampling.width=16", "relation_accuracy.max_prompts=2", "relation_accuracy.judge.repeats=2",
      "relation_accuracy.judge.kind=api", "relation_accuracy.judge.model=tiny-judge",
      "relation_accuracy.judge.timeout_s=5")


def test_relation_accuracy_is_logged_and_leaves_training_unchanged(random_cache, chat_server, toy_cfg):
    random_cache(n_clips=3, relation="shaking_hands", latent_shape=(TOY_CHANNELS, 2, 4, 4), seed=1,
                 prompts=eval_prompts("shaking_hands")[:3])
    # step 2: video0 yes, no ; video1 yes, garbage-then-"unsure" -> 2 of 4 yes, 1 unparseable
    # step 4: all yes
    script = [("answer", "Yes"), ("answer", "no"), ("answer", "yes"), ("garbage", None), ("answer", "unsure")]
    with chat_server(script) as server:
        out = run(toy_cfg("judged", *RA, f"relation_accuracy.judge.base_url={server.url}"))
    plain = run(toy_cfg("plain"))
    logs = scalars(out / "tensorboard")
    assert logs["val/relation_accuracy"] == [0.5, 1.0]  # repeat 0: 2/2 yes, repeat 1: 0/2 yes; then all yes
    assert logs["val/relation_accuracy_std"] == [0.5, 0.0]
    assert logs["val/judge_unparseable"] == [1.0, 0.0]
    records = [json.loads(line) for line in (out / "relation_accuracy.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4] and records[0]["prompts"] == eval_prompts("shaking_hands")[:2]
    assert "human-like handshaking interactions" in server.requests[0]["body"]["messages"][0]["content"][-1]["text"]
    _, a, _ = load_adapters(out / "adapters" / "relvid_adapters.safetensors")
    _, b, _ = load_adapters(plain / "adapters" / "relvid_adapters.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a), "judging changed the training"


def test_api_judge_needs_url_and_model(toy_cfg):
    with pytest.raises(ConfigError, match="relation_accuracy.judge.base_url/model"):
        toy_cfg("x", "relation_accuracy.every_n_steps=2")
    with pytest.raises(ConfigError, match="vlm_path"):
        toy_cfg("x", "relation_accuracy.every_n_steps=2", "relation_accuracy.judge.kind=local")

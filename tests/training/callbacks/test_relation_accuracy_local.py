"""The local VLM judge of judged relation accuracy: loaded at the first evaluation on the model's device
(bf16 on a GPU), not at setup on the CPU; a large one is let go after each evaluation."""

import json

import lightning as L
import pytest
import torch

from relvid.eval.local_judge import VLMWeightsError
from relvid.prompts import eval_prompts
from relvid.training.callbacks import relation_accuracy
from relvid.training.callbacks.relation_accuracy import RelationAccuracyCallback
from relvid.training.run import run
from tests.helpers.configs import TOY_CHANNELS
from tests.helpers.tiny_models import tiny_qwen_vl_folder

RA = ("relation_accuracy.every_n_steps=2", "relation_accuracy.sampling.num_steps=2",
      "relation_accuracy.sampling.frames=7", "relation_accuracy.sampling.height=16",
      "relation_accuracy.sampling.width=16", "relation_accuracy.max_prompts=1", "relation_accuracy.judge.repeats=1",
      "relation_accuracy.judge.kind=local")


class JudgeProbe(L.Callback):
    """Records, before each training step, whether the relation-accuracy judge exists and where its weights are."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, str | None, torch.dtype | None]] = []

    def _record(self, trainer: L.Trainer) -> None:
        callback = next(c for c in trainer.callbacks if isinstance(c, RelationAccuracyCallback))
        judge = callback._judge
        param = next(judge.model.parameters()) if judge is not None else None
        self.seen.append((trainer.global_step, None if param is None else param.device.type,
                          None if param is None else param.dtype))

    def on_train_start(self, trainer, pl_module) -> None:  # every setup() has run
        self._record(trainer)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._record(trainer)


@pytest.fixture
def judged_run(tmp_path, random_cache, toy_cfg):
    """Factory: a 4-step toy run judged at steps 2 and 4 by a tiny local Qwen2.5-VL; returns (probe, output)."""
    random_cache(n_clips=3, relation="shaking_hands", latent_shape=(TOY_CHANNELS, 2, 4, 4), seed=1,
                 prompts=eval_prompts("shaking_hands")[:3])
    vlm = tiny_qwen_vl_folder(tmp_path / "qwen")

    def train(name: str, *overrides: str):
        probe = JudgeProbe()
        out = run(toy_cfg(name, *RA, f"relation_accuracy.judge.vlm_path={vlm}", *overrides), extra_callbacks=[probe])
        return probe, out

    return train


def test_the_local_judge_is_built_at_the_first_evaluation_on_the_models_device(judged_run):
    probe, out = judged_run("cpu")
    # nothing at setup (train start) nor before step 2; then the judge stays, in float32 on the CPU
    assert probe.seen == [(0, None, None), (0, None, None), (1, None, None),
                          (2, "cpu", torch.float32), (3, "cpu", torch.float32)]
    records = [json.loads(line) for line in (out / "relation_accuracy.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4] and records[0]["judge"] == "local:qwen"


def test_a_large_local_judge_is_freed_after_each_evaluation(judged_run, monkeypatch):
    monkeypatch.setattr(relation_accuracy, "LARGE_JUDGE_BYTES", 0)  # the tiny judge counts as large
    probe, out = judged_run("freed")
    assert [device for _, device, _ in probe.seen] == [None] * 5  # gone again after step 2's evaluation
    records = [json.loads(line) for line in (out / "relation_accuracy.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4]  # and loaded again for step 4


def test_a_missing_judge_folder_fails_at_setup_before_training(tmp_path, random_cache, toy_cfg):
    random_cache(n_clips=3, relation="shaking_hands", latent_shape=(TOY_CHANNELS, 2, 4, 4), seed=1,
                 prompts=eval_prompts("shaking_hands")[:3])
    with pytest.raises(VLMWeightsError, match="no config.json"):
        run(toy_cfg("missing", *RA, f"relation_accuracy.judge.vlm_path={tmp_path / 'nothing'}"))
    assert not list((tmp_path / "missing").glob("checkpoints/*.ckpt"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_local_judge_lands_on_the_gpu_in_bf16(judged_run):
    probe, _ = judged_run("gpu", "trainer.accelerator=gpu")
    assert probe.seen[:3] == [(0, None, None), (0, None, None), (1, None, None)]
    assert probe.seen[3:] == [(2, "cuda", torch.bfloat16), (3, "cuda", torch.bfloat16)]

"""The local transformers judge with a tiny random Qwen2.5-VL built from a config (CPU)."""

import pytest
import torch

from relvid.eval.judge import judge_question, judge_videos
from relvid.eval.local_judge import LocalVLMJudge, VLMWeightsError
from tests.helpers.tiny_models import tiny_qwen_vl_folder


@pytest.fixture(scope="module")
def judge(tmp_path_factory):
    return LocalVLMJudge.from_folder(tiny_qwen_vl_folder(tmp_path_factory.mktemp("qwen")), max_new_tokens=4)


IMAGES = torch.randint(0, 256, (5, 40, 56, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def test_prompt_has_one_token_per_merged_patch_and_the_question(judge):
    question = judge_question("hugging")
    inputs = judge.prompt_inputs(IMAGES, question)
    grids = inputs["image_grid_thw"]
    assert grids.shape == (5, 3)
    pads = int((inputs["input_ids"] == judge.image_token_id).sum())
    assert pads == int(grids.prod(dim=1).sum()) // judge.image_processor.merge_size ** 2
    text = judge.tokenizer.decode(inputs["input_ids"][0])
    assert question in text and text.rstrip().endswith("assistant")


def test_answers_are_reproducible_per_repeat_and_leave_the_global_rng_alone(judge):
    state = torch.get_rng_state()
    a0, b0, a1 = judge.ask(IMAGES, "q?", 0), judge.ask(IMAGES, "q?", 0), judge.ask(IMAGES, "q?", 1)
    assert isinstance(a0, str) and a0 == b0 and a0 != a1
    assert torch.equal(torch.get_rng_state(), state)
    videos = [torch.randint(0, 256, (9, 40, 40, 3), dtype=torch.uint8) for _ in range(2)]
    result = judge_videos(judge, videos, judge_question("hugging"), repeats=2)
    assert len(result["answers"]) == 2 and all(len(a) == 2 for a in result["answers"])
    assert 0.0 <= result["mean"] <= 1.0


def test_missing_folder_says_what_to_download(tmp_path):
    with pytest.raises(VLMWeightsError, match="Qwen2.5-VL.*--vlm-path"):
        LocalVLMJudge.from_folder(tmp_path)

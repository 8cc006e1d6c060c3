"""T5TextEncoder over a tiny random T5 and a locally built tokenizer, saved like the real ones."""

import json

import pytest
import torch

from relvid.components import load_text_encoder
from relvid.models.backbone import WeightsNotFoundError
from relvid.models.t5 import T5TextEncoder
from relvid.models.text_encoders import TextEncoder
from tests.helpers.preprocess import save_tiny_t5


@pytest.fixture(scope="module")
def t5_root(tmp_path_factory):
    return save_tiny_t5(tmp_path_factory.mktemp("mochi"))


def test_loads_pipeline_root_and_single_folder(t5_root, tmp_path):
    enc = T5TextEncoder.from_folder(t5_root)
    assert isinstance(enc, TextEncoder) and enc.dim == 32 and enc.name == "t5"
    single = T5TextEncoder.from_folder(save_tiny_t5(tmp_path / "t5", pipeline_layout=False))
    a, b = enc.encode(["a dog"])[0][0], single.encode(["a dog"])[0][0]
    torch.testing.assert_close(a, b)  # same seed, same weights: the layout does not matter
    assert isinstance(load_text_encoder("t5", str(t5_root)), T5TextEncoder)


def test_trimmed_embeddings_equal_mochi_pipeline_embeddings(t5_root):
    """Trimmed (L, D) rows are exactly MochiPipeline's 256-token embeddings at its valid positions."""
    from diffusers import MochiPipeline

    enc = T5TextEncoder.from_folder(t5_root)
    pipe = MochiPipeline(scheduler=None, vae=None, text_encoder=enc.model, tokenizer=enc.tokenizer, transformer=None)
    texts = ["a person is shaking hands with a person", "a dog", ""]
    ours = enc.encode(texts)
    embeds, mask = pipe._get_t5_prompt_embeds(texts, max_sequence_length=256, device=torch.device("cpu"))
    assert embeds.shape[1] == 256
    for (e, m), full, valid in zip(ours, embeds, mask, strict=True):
        assert e.shape == (int(valid.sum()), 32) and m.dtype == torch.bool and m.all()
        torch.testing.assert_close(e, full[valid].float(), rtol=1e-5, atol=1e-5)
    assert [e.shape[0] for e, _ in ours] == [9, 3, 1]  # the empty negative keeps its </s>


def test_batching_does_not_change_embeddings(t5_root):
    enc = T5TextEncoder.from_folder(t5_root)
    texts = ["a dog", "a cat is hugging a robot", "the bear", ""]
    together = enc.encode(texts)
    enc.batch_size = 1
    alone = enc.encode(texts)
    for (a, _), (b, _) in zip(together, alone, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_long_text_is_cut_at_256_tokens(t5_root):
    enc = T5TextEncoder.from_folder(t5_root)
    with pytest.warns(UserWarning, match="cut"):
        (embeds, mask), = enc.encode(["a dog " * 300])
    assert embeds.shape == (256, 32) and mask.shape == (256,)


def test_each_cut_prompt_warns_once_with_its_counts_and_first_words(t5_root):
    import warnings

    enc = T5TextEncoder.from_folder(t5_root)
    enc.batch_size = 2  # the two long prompts fall in different batches
    long_dog = "a dog is hugging a cat " * 50  # 300 words, each one token: 301 with </s>
    long_robot = "the robot is pushing the bear " * 60  # 360 words, 361 tokens
    with pytest.warns(UserWarning) as caught:
        out = enc.encode([long_dog, "a dog", "a cat", long_robot, ""])
    messages = [str(w.message) for w in caught if "T5 prompt" in str(w.message)]
    assert len(messages) == 2 and len(out) == 5
    assert "256 of 301 tokens" in messages[0] and "'a dog is hugging a cat a dog ...'" in messages[0]
    assert "256 of 361 tokens" in messages[1] and "the robot is pushing" in messages[1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a prompt that fits (256 tokens with </s>) says nothing
        (fits, _), = enc.encode(["a dog " * 127 + "a"])
    assert fits.shape[0] == 256


def test_missing_parts_are_clear_errors(t5_root, tmp_path):
    with pytest.raises(WeightsNotFoundError, match="genmo/mochi-1-preview"):
        T5TextEncoder.from_folder(tmp_path / "nowhere")
    with pytest.raises(WeightsNotFoundError, match="not configured"):
        T5TextEncoder.from_folder(None)
    no_tok = tmp_path / "no_tok"
    (no_tok / "text_encoder").mkdir(parents=True)
    for f in (t5_root / "text_encoder").iterdir():
        (no_tok / "text_encoder" / f.name).write_bytes(f.read_bytes())
    with pytest.raises(WeightsNotFoundError, match="no tokenizer files"):
        T5TextEncoder.from_folder(no_tok)
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    (wrong / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(WeightsNotFoundError, match="not a T5"):
        T5TextEncoder.from_folder(wrong)


def test_sentencepiece_only_tokenizer_like_genmos_download(tmp_path):
    from tests.helpers.preprocess import save_spiece_t5

    enc = T5TextEncoder.from_folder(save_spiece_t5(tmp_path))
    (embeds, mask), (neg, _) = enc.encode(["a person is shaking hands", ""])
    assert embeds.shape[0] > 3 and embeds.shape[1] == 32 and neg.shape == (1, 32)
    ids = enc.tokenizer(["a dog"]).input_ids[0]
    assert ids[-1] == enc.tokenizer.eos_token_id == 1

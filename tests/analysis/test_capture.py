"""The readers: they leave the model's output bit-identical, recompute the attention the model computes,
and shape their maps as documented; a phrase the prompt lacks is refused by name."""

from __future__ import annotations

import pytest
import torch

from relvid.analysis.capture import AttentionCapture, block_qkv, phrase_attention
from relvid.analysis.maps import feature_maps, token_grid
from relvid.analysis.parts import PhraseNotFoundError, phrase_positions
from relvid.components import prepare_for_sampling
from relvid.models.backbone import tiny_transformer
from relvid.toy.text import ToyTextEncoder


def inputs(batch: int = 2, frames: int = 2, side: int = 4, text: int = 5):
    g = torch.Generator().manual_seed(3)
    mask = torch.ones(batch, text, dtype=torch.bool)
    mask[0, 3:] = False  # a shorter (unconditional) prompt padded on the right
    return dict(hidden_states=torch.randn(batch, 4, frames, side, side, generator=g),
                encoder_hidden_states=torch.randn(batch, text, 32, generator=g),
                timestep=torch.tensor([300.0, 300.0]), encoder_attention_mask=mask, return_dict=False)


@pytest.mark.parametrize("attention", ["diffusers", "packed"])
def test_reading_leaves_the_output_bit_identical(attention):
    from relvid.models.attention import InferenceSpeed

    model = prepare_for_sampling(tiny_transformer(seed=0).eval(), InferenceSpeed(attention=attention))
    x = inputs()
    with torch.no_grad():
        plain = model(**x)[0]
        with AttentionCapture(model, steps=[0], phrase=torch.tensor([1, 2])) as capture:
            read = model(**x)[0]
        again = model(**x)[0]
    assert torch.equal(plain, read) and torch.equal(plain, again)
    assert capture.records[0].blocks == 2  # every block was read, hooks gone afterwards
    assert len(model.transformer_blocks[0].attn1._forward_pre_hooks) == 0


def test_recomputed_attention_is_the_models():
    model = tiny_transformer(seed=0).eval()
    x = inputs(frames=2, side=4)
    seen = {}
    attn = model.transformer_blocks[0].attn1
    attn.register_forward_pre_hook(lambda m, a, k: seen.update(kwargs=k), with_kwargs=True)
    attn.to_out[0].register_forward_hook(lambda m, a, out: seen.update(vision_out=a[0]))
    with torch.no_grad():
        model(**x)
        k = seen["kwargs"]
        qkv = block_qkv(attn, k["hidden_states"], k["encoder_hidden_states"], k["attention_mask"],
                        k["image_rotary_emb"])
        queries, keys, values = qkv.vision_queries(), qkv.keys(), qkv.values()  # (N, H, D), (S, H, D)
        probs = torch.einsum("nhd,shd->hns", queries, keys).mul(queries.shape[-1] ** -0.5).softmax(-1)
        out = torch.einsum("hns,shd->nhd", probs, values).flatten(1)  # (N, H*D)
    torch.testing.assert_close(out, seen["vision_out"][-1], rtol=1e-5, atol=1e-5)
    # the phrase maps are those probabilities, averaged over heads and the phrase's tokens
    phrase = torch.tensor([1, 3])
    to_phrase, from_phrase = phrase_attention(qkv, phrase, chunk=5)
    n = queries.shape[0]
    torch.testing.assert_close(to_phrase, probs[:, :, n + phrase].mean((0, 2)))
    text_probs = torch.einsum("phd,shd->hps", qkv.eq[phrase], keys).mul(queries.shape[-1] ** -0.5).softmax(-1)
    torch.testing.assert_close(from_phrase, text_probs[:, :, :n].mean((0, 1)))


def test_maps_have_the_documented_shapes():
    grid = token_grid((4, 3, 8, 12), patch_size=2)
    assert grid == (3, 4, 6)
    tokens = torch.randn(3 * 4 * 6, 16)
    maps = feature_maps(tokens, grid)
    assert {k: tuple(v.shape) for k, v in maps.items()} == {"mean": (4, 6), "pca": (4, 6, 3),
                                                            "mean_frames": (3, 4, 6), "pca_frames": (3, 4, 6, 3)}
    assert float(maps["pca"].min()) >= 0 and float(maps["pca"].max()) <= 1
    torch.testing.assert_close(maps["mean"], tokens.reshape(3, 4, 6, 16).mean((0, 3)))


def test_phrase_positions_and_an_absent_phrase():
    encoder = ToyTextEncoder()
    prompt = "A red circle is moving away from a blue square."
    assert phrase_positions(encoder, prompt, "moving away").tolist() == [4, 5]
    assert phrase_positions(encoder, prompt, "Square").tolist() == [9]
    with pytest.raises(PhraseNotFoundError, match="'orbiting' is not in the prompt"):
        phrase_positions(encoder, prompt, "orbiting")
    with pytest.raises(PhraseNotFoundError):
        phrase_positions(encoder, prompt, "move")  # part of a word is no phrase


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_reading_a_bf16_model_on_a_gpu_leaves_it_bit_identical():
    model = prepare_for_sampling(tiny_transformer(seed=0).to("cuda", torch.bfloat16).eval())
    x = {k: v.to("cuda") if isinstance(v, torch.Tensor) else v for k, v in inputs().items()}
    x["hidden_states"] = x["hidden_states"].to(torch.bfloat16)
    x["encoder_hidden_states"] = x["encoder_hidden_states"].to(torch.bfloat16)
    with torch.no_grad():
        plain = model(**x)[0]
        with AttentionCapture(model, steps=[0], phrase=torch.tensor([0, 2])) as capture:
            read = model(**x)[0]
    assert torch.equal(plain, read)
    to_phrase = capture.records[0].mean("to_phrase")
    assert to_phrase.dtype == torch.float32 and bool(torch.isfinite(to_phrase).all())
    assert bool((to_phrase > 0).all() and (to_phrase < 1).all())

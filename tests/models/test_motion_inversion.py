"""MotionInversion's motion embeddings on the tiny Mochi transformer: where they enter attention, the
inference debiasing against its formula, resampling to other grids, the file and the config's refusals."""

import pytest
import torch

from relvid.config import ConfigError, load_config
from relvid.models.adapter_file import apply_adapter_source, read_triplet, resolve_adapter_file
from relvid.models.backbone import tiny_transformer
from relvid.models.lora import LoRAConfigError
from relvid.models.motion_inversion import (
    MotionInversionError,
    MotionSpec,
    fit_frames,
    frame_difference,
    inject_motion_embeddings,
    load_motion_file,
    motion_state,
    parameter_count,
    save_motion_file,
    spec_for,
    value_field,
)

# latents (C, f, h, w) = (4, 3, 8, 8): a 3 x 4 x 4 vision-token grid, value cells of 2 x 2 tokens
FRAMES, LATENT = 3, 8


def _inputs(seed: int = 0, frames: int = FRAMES, size: int = LATENT):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(1, 4, frames, size, size, generator=g)
    text = torch.randn(1, 5, 32, generator=g)
    return dict(hidden_states=latents, encoder_hidden_states=text, timestep=torch.tensor([500.0]),
                encoder_attention_mask=torch.ones(1, 5, dtype=torch.bool), return_dict=False)


def _capture(model, names):
    """Records the input each named linear layer of block 0's attention receives (after pre-hooks)."""
    seen, attn = {}, model.transformer_blocks[0].attn1
    handles = [getattr(attn, n).register_forward_hook(lambda m, a, out, n=n: seen.__setitem__(n, a[0].detach()))
               for n in names]
    return seen, handles


def _model_with_embeddings(blocks=(0,), stride=2, seed=1):
    model = tiny_transformer(0).eval()
    spec = spec_for(model, list(blocks), FRAMES, LATENT, LATENT, stride)
    motion = inject_motion_embeddings(model, spec)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # hand-made, non-zero embeddings
        for p in motion.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return model, spec, motion


def _per_token(embed: torch.Tensor, stride: int, h: int, w: int) -> torch.Tensor:
    """(F, rows, cols, C) cells -> (F*h*w, C) tokens, written out with loops (the formula, not the code)."""
    rows = [embed[f, y // stride, x // stride] for f in range(embed.shape[0]) for y in range(h) for x in range(w)]
    return torch.stack(rows)


def test_the_temporal_embedding_enters_q_and_k_and_the_value_embedding_enters_v_of_vision_tokens_only():
    base = tiny_transformer(0).eval()
    seen_base, _ = _capture(base, ("to_q", "to_k", "to_v", "add_q_proj"))
    with torch.no_grad():
        base(**_inputs())
    model, spec, motion = _model_with_embeddings(blocks=(0,))
    seen, _ = _capture(model, ("to_q", "to_k", "to_v", "add_q_proj"))
    with torch.no_grad():
        model(**_inputs())
    h = w = LATENT // 2
    temporal = motion.temporal["0"].detach().repeat_interleave(h * w, dim=0)  # (F*h*w, C): frame f's row per token
    value = _per_token(motion.value["0"].detach(), 2, h, w)  # training: no debiasing
    torch.testing.assert_close(seen["to_q"][0] - seen_base["to_q"][0], temporal, rtol=0, atol=1e-5)
    torch.testing.assert_close(seen["to_k"][0] - seen_base["to_k"][0], temporal, rtol=0, atol=1e-5)
    torch.testing.assert_close(seen["to_v"][0] - seen_base["to_v"][0], value, rtol=0, atol=1e-5)
    assert torch.equal(seen["add_q_proj"], seen_base["add_q_proj"])  # the text tokens are left alone


def test_the_inference_debiasing_equals_frame_differencing_on_hand_made_embeddings():
    cells = torch.arange(3 * 2 * 2 * 2, dtype=torch.float32).reshape(3, 2, 2, 2) ** 2  # (F, rows, cols, C)
    expected = torch.stack([cells[0], cells[1] - cells[0], cells[2] - cells[1]])
    assert torch.equal(frame_difference(cells), expected)

    base = tiny_transformer(0).eval()
    seen_base, _ = _capture(base, ("to_v",))
    with torch.no_grad():
        base(**_inputs())
    model, _, motion = _model_with_embeddings(blocks=(0,))
    motion.inference = True
    seen, _ = _capture(model, ("to_v",))
    with torch.no_grad():
        model(**_inputs())
    e = motion.value["0"].detach()
    debiased = torch.stack([e[0], e[1] - e[0], e[2] - e[1]])  # frame 0 kept, then e_i - e_{i-1}
    torch.testing.assert_close(seen["to_v"][0] - seen_base["to_v"][0], _per_token(debiased, 2, 4, 4), rtol=0,
                               atol=1e-5)


def test_inference_remove_drops_the_value_embedding_and_keeps_the_temporal_one():
    model, spec, motion = _model_with_embeddings(blocks=(0,))
    base = tiny_transformer(0).eval()
    seen_base, _ = _capture(base, ("to_v", "to_q"))
    with torch.no_grad():
        base(**_inputs())
    motion.spec = MotionSpec(**{**spec.to_dict(), "blocks": spec.blocks, "inference": "remove"})
    motion.inference = True
    seen, _ = _capture(model, ("to_v", "to_q"))
    with torch.no_grad():
        model(**_inputs())
    assert torch.equal(seen["to_v"], seen_base["to_v"])
    assert not torch.equal(seen["to_q"], seen_base["to_q"])


def test_other_grids_slice_or_interpolate_frames_and_resize_the_value_field():
    e = torch.arange(4.0)[:, None] * torch.ones(4, 3)  # (F=4, C=3), entry f = f
    assert torch.equal(fit_frames(e, 2), e[:2])  # fewer frames: the first ones, as the official code slices
    longer = fit_frames(e, 8)
    assert longer.shape == (8, 3) and longer[0, 0] == 0 and longer[-1, 0] == 3  # linear, ends kept
    assert bool((longer[1:, 0] >= longer[:-1, 0]).all())
    cells = torch.randn(2, 2, 3, 5)  # (F, rows, cols, C) for a 4 x 5 token grid at stride 2
    tokens = value_field(cells, 4, 5, 2)
    assert tokens.shape == (2, 4, 5, 5)
    assert torch.equal(tokens[:, 3, 4], cells[:, 1, 2]) and torch.equal(tokens[:, 0, 1], cells[:, 0, 0])
    assert value_field(cells, 4, 5, 2, (2, 3)).shape == (2, 2, 3, 5)
    # a forward on a smaller grid (a preview) runs and still adds the embeddings
    model, _, _ = _model_with_embeddings(blocks=(0, 1))
    with torch.no_grad():
        out = model(**_inputs(frames=2, size=4))[0]
        plain = tiny_transformer(0).eval()(**_inputs(frames=2, size=4))[0]
    assert out.shape == plain.shape and not torch.equal(out, plain)


def test_full_size_parameter_count_is_the_documented_one():
    spec = MotionSpec(blocks=tuple(range(48)), frames=11, height=30, width=53, stride=2, channels=3072)
    assert spec.value_grid == (15, 27)
    assert parameter_count(spec) == {"temporal": 1_622_016, "value": 656_916_480, "total": 658_538_496}
    per_token = MotionSpec(blocks=tuple(range(48)), frames=11, height=30, width=53, stride=1, channels=3072)
    assert parameter_count(per_token)["value"] == 2_579_005_440  # the ~2.6 B a per-token embedding would hold


def test_the_file_round_trips_is_recognised_and_is_refused_where_a_lora_is_expected(tmp_path):
    model, spec, motion = _model_with_embeddings(blocks=(0, 1))
    path = save_motion_file(tmp_path / "relvid_adapters.safetensors", motion_state(model), spec, {"relation": "x"})
    loaded_spec, state, meta = load_motion_file(path)
    assert loaded_spec == spec and meta == {"relation": "x"}
    assert all(torch.equal(state[k], v) for k, v in motion_state(model).items())
    assert resolve_adapter_file(path)[1] == "motion" and resolve_adapter_file(tmp_path)[1] == "motion"
    with pytest.raises(LoRAConfigError, match="MotionInversion"):
        read_triplet(tmp_path)  # what `relvid export` reads: a LoRA triplet
    fresh = tiny_transformer(0)
    source = apply_adapter_source(fresh, tmp_path)
    assert source.kind == "motion" and source.spec == spec
    motion.inference = True  # loaded for sampling: the value embedding debiased
    with torch.no_grad():
        assert torch.equal(fresh(**_inputs())[0], model.eval()(**_inputs())[0])
    bad = {k: v.clone() for k, v in state.items()}
    bad["value.0"][0, 0, 0, 0] = float("nan")
    with pytest.raises(MotionInversionError, match="non-finite"):
        save_motion_file(tmp_path / "bad.safetensors", bad, spec)
    with pytest.raises(MotionInversionError, match="blocks"):
        inject_motion_embeddings(tiny_transformer(0), MotionSpec(**{**spec.to_dict(), "blocks": (5,)}))


@pytest.mark.parametrize("overrides, key", [
    (["hmt.enabled=true"], "hmt.enabled"),
    (["lora.frozen=[ffn]"], "lora.frozen"),
    (["lora.placement=direct"], "lora.placement"),
    (["trainer.strategy=fsdp"], "trainer.strategy"),
    (["trainer.lora_formats=[diffusers]"], "trainer.lora_formats"),
    (["motion_inversion.value_stride=0"], "motion_inversion.value_stride"),
])
def test_combinations_that_make_no_sense_are_refused_naming_the_key(repo_root, overrides, key):
    files = [repo_root / "configs" / "tiny.yaml", repo_root / "configs" / "baselines" / "motion_inversion.yaml"]
    assert load_config(files).method == "motion_inversion"
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(files, overrides)


def test_blocks_the_model_lacks_are_refused_naming_the_key():
    with pytest.raises(MotionInversionError, match="motion_inversion.blocks"):
        spec_for(tiny_transformer(0), [0, 7], FRAMES, LATENT, LATENT, 2)

"""diffusers export (loaded by MochiPipeline.load_lora_weights) and reference-checkpoint import."""

import json
import re

import pytest
import safetensors
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, MochiPipeline, MochiTransformer3DModel

from relvid.models.adapter_file import load_adapters
from relvid.models.backbone import TINY_CONFIG
from relvid.models.lora import (
    LoRAConfigError,
    TripletSpec,
    activate,
    adapter_state_dict,
    inference_adapters,
    inject_triplet,
    load_adapter_state_dict,
    lora_parameters,
)
from relvid.models.lora_io import (
    DIFFUSERS_WEIGHT_NAME,
    convert_reference_state_dict,
    diffusers_lora_state_dict,
    export_diffusers,
    import_reference,
)
from tests.helpers.adapters import reference_state, tiny


def inputs() -> dict:
    g = torch.Generator().manual_seed(1)
    return dict(
        hidden_states=torch.randn(1, 4, 2, 4, 4, generator=g),
        encoder_hidden_states=torch.randn(1, 5, 32, generator=g),
        timestep=torch.tensor([500]),
        encoder_attention_mask=torch.ones(1, 5, dtype=torch.bool),
        return_dict=False,
    )


def fresh_pipeline(base_state: dict) -> MochiPipeline:
    fresh = MochiTransformer3DModel(**TINY_CONFIG)
    fresh.load_state_dict(base_state)
    # The pipeline accepts None for the components a LoRA load does not touch.
    return MochiPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(invert_sigmas=True),
        vae=None,
        text_encoder=None,
        tokenizer=None,
        transformer=fresh,
    )


def trained_model(spec: TripletSpec) -> tuple[MochiTransformer3DModel, dict]:
    model = tiny()
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    inject_triplet(model, spec)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in lora_parameters(model).values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model, base_state


@pytest.mark.parametrize(
    "spec",
    [
        TripletSpec(rank=4, alpha=4.0),
        TripletSpec(rank=4, alpha=8.0),
        TripletSpec(placement="V/QK", rank=4, alpha=2.0, ranks={"ffn": 6}, alphas={"ffn": 9.0}),
        TripletSpec(placement="Q/KV", rank=3, alpha=3.0, branches="vision", ranks={"ffn": 5}),
        TripletSpec(placement="direct", rank=4, alpha=6.0),
    ],
    ids=["alpha=rank", "alpha!=rank", "ffn-rank-and-alpha-differ", "vision-only", "direct"],
)
def test_exported_lora_loaded_by_mochi_pipeline_reproduces_our_inference_output(tmp_path, spec):
    model, base_state = trained_model(spec)
    activate(model, inference_adapters(spec))
    x = inputs()
    with torch.no_grad():
        ours = model(**x)[0]

    path = export_diffusers(model, spec, tmp_path / "export")
    assert path == tmp_path / "export" / DIFFUSERS_WEIGHT_NAME
    assert [p.name for p in path.parent.iterdir()] == [DIFFUSERS_WEIGHT_NAME]

    pipe = fresh_pipeline(base_state)
    with torch.no_grad():
        base_out = pipe.transformer(**x)[0]
    pipe.load_lora_weights(tmp_path / "export")
    with torch.no_grad():
        theirs = pipe.transformer(**x)[0]
    assert not torch.equal(theirs, base_out)
    assert torch.equal(theirs, ours)


def test_export_drops_subject_loras_and_describes_ranks():
    spec = TripletSpec(rank=4, alpha=4.0, ranks={"ffn": 6}, alphas={"ffn": 6.0})
    model, _ = trained_model(spec)
    state, config = diffusers_lora_state_dict(model, spec)
    assert all(k.startswith("transformer.transformer_blocks.") for k in state)
    modules = {k.split(".lora_")[0].removeprefix("transformer.") for k in state}
    assert not any(m.endswith(("to_v", "add_v_proj")) for m in modules)  # subject LoRAs dropped
    assert "transformer_blocks.0.attn1.to_add_out" in modules
    assert "transformer_blocks.1.attn1.to_add_out" not in modules
    ours = adapter_state_dict(model, ["relation"])
    key = "transformer_blocks.1.attn1.add_k_proj.lora_B.weight"
    assert torch.equal(state[f"transformer.{key}"], ours[f"relation/{key}"])
    assert (config["r"], config["lora_alpha"]) == (4, 4.0)
    assert list(config["rank_pattern"].values()) == [6]
    assert list(config["alpha_pattern"].values()) == [6.0]
    assert re.fullmatch(config["target_modules"], "transformer_blocks.0.attn1.to_out.0")
    assert not re.fullmatch(config["target_modules"], "time_embed.pooler.to_q")

    same = TripletSpec(rank=4)
    model, _ = trained_model(same)
    _, config = diffusers_lora_state_dict(model, same)
    assert config["rank_pattern"] == {} and config["alpha_pattern"] == {}


# ---- reference import (the synthetic checkpoint: tests/helpers/adapters.py) ----------------------


@pytest.mark.parametrize(
    "relation,subjects,placement", [("qk", "v", "QK/V"), ("q", "kv", "Q/KV"), ("kv", "q", "KV/Q"), ("v", "qk", "V/QK")]
)
@pytest.mark.parametrize("prefix", ["model.", "", "_orig_mod.module."])
def test_convert_reference_puts_every_tensor_in_place(relation, subjects, placement, prefix):
    ref, where = reference_state(relation, subjects, prefix=prefix)
    ours, spec = convert_reference_state_dict(ref)
    assert spec == TripletSpec(placement=placement, rank=4, alpha=4.0, dropout=0.0, branches="both")
    assert set(ours) == set(where.values())  # nothing left over, nothing invented
    for ref_key, our_key in where.items():
        assert torch.equal(ours[our_key], ref[ref_key]), ref_key
    model = tiny()
    inject_triplet(model, spec)
    load_adapter_state_dict(model, ours)  # strict: the converted triplet fits the model exactly


def test_import_reference_writes_files_the_pipeline_and_we_can_load(tmp_path):
    ref, _ = reference_state(rank=4)
    ckpt = tmp_path / "ref.pt"
    torch.save({"state_dict": ref, "step": 1200}, ckpt)
    path = import_reference(ckpt, tmp_path / "out")
    assert path == tmp_path / "out" / DIFFUSERS_WEIGHT_NAME
    spec, state, meta = load_adapters(tmp_path / "out" / "relvid_adapters.safetensors")
    assert spec.placement == "QK/V" and meta["source"] == str(ckpt)

    model = tiny()
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    inject_triplet(model, spec)
    load_adapter_state_dict(model, state)
    x = inputs()
    with torch.no_grad():
        ours = model(**x)[0]  # inject_triplet left the inference set (relation + ffn) active
    pipe = fresh_pipeline(base_state)
    pipe.load_lora_weights(tmp_path / "out")
    with torch.no_grad():
        assert torch.equal(pipe.transformer(**x)[0], ours)
    with safetensors.safe_open(str(path), framework="pt") as f:
        assert not any("to_v" in k or "add_v_proj" in k for k in f.keys())


def _drop(state, pattern):
    return {k: v for k, v in state.items() if not re.search(pattern, k)}


def _subject2_on_q(state):
    """subject2 moved from V to Q: the two subject LoRAs no longer share projections."""
    moved = {k.replace("to_v_", "to_q_"): v for k, v in state.items() if "to_v_" in k and k.endswith("subject2")}
    return _drop(state, r"to_v_.*subject2$") | moved


@pytest.mark.parametrize(
    "mutate,message",
    [
        (lambda s: {}, "empty"),
        (lambda s: dict(s, **{"model.blocks.0.attn.qkv_x.weight": torch.zeros(2, 2)}), r"unrecognised.*qkv_x"),
        (lambda s: _drop(s, r"blocks\.1\.attn\.to_k_y\.lora_B\.relation"), r"without their A/B partner.*add_k_proj"),
        (
            lambda s: dict(s, **{"model.blocks.0.attn.to_q_x.lora_A.relation": torch.zeros(8, 32)}),
            r"ranks disagree.*to_q",
        ),
        (
            lambda s: dict(
                s,
                **{
                    "model.blocks.1.attn.proj_y.lora_A": torch.zeros(4, 32),
                    "model.blocks.1.attn.proj_y.lora_B": torch.zeros(16, 4),
                },
            ),
            r"unexpected.*transformer_blocks\.1\.attn1\.to_add_out",
        ),
        (lambda s: _drop(s, r"blocks\.0\.attn\.to_q_x"), r"missing.*transformer_blocks\.0\.attn1\.to_q"),
        (lambda s: _drop(s, r"subject2"), r"no \['subject2'\]"),
        (_subject2_on_q, "cannot infer the placement"),
        (
            lambda s: {(k.replace("model.", "ema.") if "blocks.0." in k else k): v for k, v in s.items()},
            "mix prefixes",
        ),
    ],
    ids=[
        "empty", "unknown", "A-without-B", "rank", "proj_y-last-block",
        "missing", "no-subject2", "placement", "prefixes",
    ],
)
def test_convert_reference_refuses_malformed_checkpoints(mutate, message):
    ref, _ = reference_state()
    with pytest.raises(LoRAConfigError, match=message):
        convert_reference_state_dict(mutate(ref))


def test_import_reference_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        import_reference(tmp_path / "missing.pt", tmp_path / "out")
    bad = tmp_path / "bad.pt"
    torch.save({"step": 3, "optimizer": {"lr": 1.0}}, bad)
    with pytest.raises(LoRAConfigError, match="bad.pt.*not a LoRA state dict"):
        import_reference(bad, tmp_path / "out")
    wrong = tmp_path / "wrong.pt"
    torch.save({"model": {"blocks.0.attn.qkv_x.weight": torch.zeros(2, 2)}}, wrong)
    with pytest.raises(LoRAConfigError, match="wrong.pt.*unrecognised"):
        import_reference(wrong, tmp_path / "out")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x00junk")
    with pytest.raises(LoRAConfigError, match="junk.pt"):
        import_reference(junk, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", [".pt", ".safetensors"])
def test_import_reference_applies_the_alphas_the_file_stores(tmp_path, kind):
    """A rank-4 file that stores alpha 8 is a LoRA at scale 2: loaded by MochiPipeline.load_lora_weights it
    acts as the same file at scale 1 with every lora_B doubled."""
    from safetensors.torch import save_file

    def save(name, state, alphas):
        path = tmp_path / f"{name}{kind}"
        kwargs = {"qkv_proj_lora_rank": 4, "qkv_proj_lora_alpha": alphas[0], "out_proj_lora_rank": 4,
                  "out_proj_lora_alpha": alphas[1]}
        if kind == ".pt":
            torch.save({"state_dict": state, "kwargs": kwargs}, path)
        else:
            save_file({k: v.contiguous() for k, v in state.items()}, path, metadata={"kwargs": json.dumps(kwargs)})
        return path

    ref, _ = reference_state(rank=4)
    doubled = {k: v * 2 if ".lora_B" in k else v for k, v in ref.items()}
    scaled = import_reference(save("alpha8", ref, (8, 8)), tmp_path / "alpha8")
    plain = import_reference(save("alpha4", doubled, (4, 4)), tmp_path / "alpha4")
    spec, _, _ = load_adapters(tmp_path / "alpha8" / "relvid_adapters.safetensors")
    assert spec.alpha_of("relation") == 8.0 and spec.alpha_of("ffn") == 8.0 and spec.rank_of("relation") == 4
    base_state = {k: v.clone() for k, v in tiny().state_dict().items()}
    outputs = []
    for path in (scaled, plain):
        pipe = fresh_pipeline(base_state)
        pipe.load_lora_weights(path.parent)
        with torch.no_grad():
            outputs.append(pipe.transformer(**inputs())[0])
    assert torch.allclose(outputs[0], outputs[1], atol=1e-5)
    base = fresh_pipeline(base_state).transformer
    with torch.no_grad():
        assert not torch.allclose(base(**inputs())[0], outputs[0], atol=1e-3)  # the LoRA acts


def test_import_reference_warns_when_the_file_stores_no_alpha_and_flags_override(tmp_path):
    ref, _ = reference_state(rank=4)
    torch.save({"state_dict": ref}, tmp_path / "bare.pt")
    with pytest.warns(UserWarning, match="bare.pt stores no qkv_proj_lora_alpha or out_proj_lora_alpha"):
        import_reference(tmp_path / "bare.pt", tmp_path / "bare")
    assert load_adapters(tmp_path / "bare" / "relvid_adapters.safetensors")[0].alpha_of("relation") == 4.0
    torch.save({"state_dict": ref, "kwargs": {"qkv_proj_lora_alpha": 8, "out_proj_lora_alpha": 8}},
               tmp_path / "stored.pt")
    import_reference(tmp_path / "stored.pt", tmp_path / "flags", qkv_alpha=16.0)  # a flag beats the file
    spec = load_adapters(tmp_path / "flags" / "relvid_adapters.safetensors")[0]
    assert spec.alpha_of("relation") == 16.0 and spec.alpha_of("ffn") == 8.0

"""Relation LoRA triplet: injection targets, selection semantics, state dicts and our file format."""

import json

import pytest
import safetensors.torch
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders.peft import PeftAdapterMixin
from diffusers.models.modeling_utils import ModelMixin

from relvid.models.adapter_file import load_adapters, save_adapters
from relvid.models.lora import (
    LoRAConfigError,
    TripletSpec,
    activate,
    active_adapters,
    adapter_names,
    adapter_state_dict,
    adapters_for_selection,
    inference_adapters,
    inject_triplet,
    load_adapter_state_dict,
    lora_parameters,
    target_modules,
)
from tests.helpers.adapters import tiny


def inputs(seed: int = 1, dtype=torch.float32) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(1, 4, 2, 4, 4, generator=g).to(dtype),
        encoder_hidden_states=torch.randn(1, 5, 32, generator=g).to(dtype),
        timestep=torch.tensor([500]),
        encoder_attention_mask=torch.ones(1, 5, dtype=torch.bool),
        return_dict=False,
    )


def randomize_lora(model, seed: int = 2) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(model).values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def lora_modules(model, adapter: str) -> set[str]:
    """Module names carrying `adapter`, read from the parameters peft created."""
    out = set()
    for name in lora_parameters(model, [adapter]):
        out.add(name.split(".lora_")[0])
    return out


# Written out by hand (not derived from the code under test): projections per placement.
VISION = {"q": "to_q", "k": "to_k", "v": "to_v", "out": "to_out.0"}
TEXT = {"q": "add_q_proj", "k": "add_k_proj", "v": "add_v_proj", "out": "to_add_out"}
EXPECTED_PROJ = {
    "QK/V": {"relation": "qk", "subject1": "v", "subject2": "v", "ffn": ["out"]},
    "Q/KV": {"relation": "q", "subject1": "kv", "subject2": "kv", "ffn": ["out"]},
    "KV/Q": {"relation": "kv", "subject1": "q", "subject2": "q", "ffn": ["out"]},
    "V/QK": {"relation": "v", "subject1": "qk", "subject2": "qk", "ffn": ["out"]},
    "direct": {"direct": ["q", "k", "v", "out"]},
}


def expected_modules(placement: str, adapter: str, branches: str) -> set[str]:
    tables = {"both": [VISION, TEXT], "vision": [VISION], "text": [TEXT]}[branches]
    out = set()
    for block in range(2):
        for table in tables:
            for proj in EXPECTED_PROJ[placement][adapter]:
                if table is TEXT and proj == "out" and block == 1:
                    continue  # the last Mochi block has no to_add_out
                out.add(f"transformer_blocks.{block}.attn1.{table[proj]}")
    return out


@pytest.mark.parametrize("branches", ["both", "vision", "text"])
@pytest.mark.parametrize("placement", ["QK/V", "Q/KV", "KV/Q", "V/QK", "direct"])
def test_injection_hits_exactly_the_expected_modules(placement, branches):
    model = tiny()
    spec = TripletSpec(placement=placement, rank=4, alpha=4.0, branches=branches)
    names = inject_triplet(model, spec)
    assert names == adapter_names(spec)
    for adapter in names:
        assert lora_modules(model, adapter) == expected_modules(placement, adapter, branches), adapter
    all_lora = set(lora_parameters(model))
    assert not any(n.startswith("time_embed") for n in all_lora)
    assert not any("transformer_blocks.1.attn1.to_add_out" in n for n in all_lora)


def test_target_regex_does_not_hit_the_time_embedding_pooler():
    import re

    spec = TripletSpec()
    pattern = target_modules("relation", spec)
    assert re.fullmatch(pattern, "transformer_blocks.12.attn1.to_q")
    assert re.fullmatch(pattern, "transformer_blocks.0.attn1.add_k_proj")
    assert not re.fullmatch(pattern, "time_embed.pooler.to_q")
    assert not re.fullmatch(pattern, "transformer_blocks.0.attn1.to_v")


def test_injection_on_bf16_base_keeps_fp32_lora_frozen_base_and_same_output():
    model = tiny().to(torch.bfloat16)
    x = inputs(dtype=torch.bfloat16)
    with torch.no_grad():
        before = model(**x)[0]
    inject_triplet(model, TripletSpec(rank=4))
    lora = lora_parameters(model)
    assert lora and all(p.dtype == torch.float32 and p.requires_grad for p in lora.values())
    base = [p for n, p in model.named_parameters() if n not in lora]
    assert base and all(not p.requires_grad and p.dtype == torch.bfloat16 for p in base)
    assert all(torch.count_nonzero(p) == 0 for n, p in lora.items() if ".lora_B." in n)
    assert active_adapters(model) == ("relation", "ffn")
    with torch.no_grad():
        after = model(**x)[0]
    assert after.dtype == torch.bfloat16
    assert torch.equal(before, after)  # B = 0: injection alone changes nothing


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(placement="QKV"),
        dict(branches="audio"),
        dict(rank=0),
        dict(alpha=0.0),
        dict(dropout=1.0),
        dict(ranks={"relaton": 4}),
        dict(placement="direct", ranks={"relation": 4}),
        dict(alphas={"ffn": -1.0}),
    ],
)
def test_spec_refuses_bad_values(kwargs):
    with pytest.raises(LoRAConfigError):
        TripletSpec(**kwargs)


class _NoAttention(ModelMixin, ConfigMixin, PeftAdapterMixin):
    @register_to_config
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(4, 4)


def test_inject_refuses_a_model_the_spec_does_not_match_and_double_injection():
    with pytest.raises(LoRAConfigError, match="matches no linear layer"):
        inject_triplet(_NoAttention(), TripletSpec())
    model = tiny()
    inject_triplet(model, TripletSpec(rank=4))
    with pytest.raises(LoRAConfigError, match="already injected"):
        inject_triplet(model, TripletSpec(rank=4))
    with pytest.raises(TypeError, match="PeftAdapterMixin"):
        inject_triplet(torch.nn.Linear(2, 2), TripletSpec())


def test_selection_sets():
    spec = TripletSpec()
    assert adapters_for_selection("relation", spec) == ("relation", "subject1", "subject2", "ffn")
    assert adapters_for_selection("subject1", spec) == ("subject1", "ffn")
    assert adapters_for_selection("subject2", spec) == ("subject2", "ffn")
    assert inference_adapters(spec) == ("relation", "ffn")
    direct = TripletSpec(placement="direct")
    assert adapters_for_selection("subject2", direct) == ("direct",)
    assert inference_adapters(direct) == ("direct",)
    with pytest.raises(LoRAConfigError):
        adapters_for_selection("ffn", spec)


def test_unselected_adapters_are_bit_identical_after_an_adamw_step():
    model = tiny()
    inject_triplet(model, TripletSpec(rank=4))
    randomize_lora(model)
    params = lora_parameters(model)
    opt = torch.optim.AdamW(params.values(), lr=1e-2, weight_decay=0.01)
    before = {n: p.detach().clone() for n, p in params.items()}

    activate(model, adapters_for_selection("subject1", TripletSpec()))
    assert active_adapters(model) == ("subject1", "ffn")
    assert all(p.requires_grad for p in params.values())
    opt.zero_grad(set_to_none=True)
    model(**inputs())[0].square().mean().backward()
    opt.step()

    for name, p in params.items():
        adapter = name.split(".")[-2]
        if adapter in ("relation", "subject2"):
            assert p.grad is None, name
            assert torch.equal(p, before[name]), name
        else:
            assert not torch.equal(p, before[name]), name
    assert all(p.requires_grad for p in lora_parameters(model).values())
    assert not any(p.requires_grad for n, p in model.named_parameters() if n not in params)


def test_activate_changes_the_forward_and_refuses_unknown_adapters():
    model = tiny()
    inject_triplet(model, TripletSpec(rank=4))
    randomize_lora(model)
    x = inputs()
    with torch.no_grad():
        activate(model, ["subject1", "ffn"])
        a = model(**x)[0]
        activate(model, ["relation", "subject1", "subject2", "ffn"])
        b = model(**x)[0]
        activate(model, [])
        c = model(**x)[0]
    assert active_adapters(model) == ()
    assert not torch.equal(a, b) and not torch.equal(a, c)
    with pytest.raises(LoRAConfigError, match="not injected"):
        activate(model, ["relation", "subject3"])


def test_adapter_state_dict_round_trip_reproduces_outputs():
    src = tiny()
    inject_triplet(src, TripletSpec(rank=4))
    randomize_lora(src)
    state = adapter_state_dict(src)
    assert "relation/transformer_blocks.0.attn1.to_q.lora_A.weight" in state
    assert "ffn/transformer_blocks.0.attn1.to_add_out.lora_B.weight" in state
    assert len(state) == len(lora_parameters(src))
    assert all(t.device.type == "cpu" for t in state.values())
    key = "relation/transformer_blocks.0.attn1.to_q.lora_A.weight"
    state[key].zero_()  # a copy: the model must not change
    assert torch.count_nonzero(lora_parameters(src)["transformer_blocks.0.attn1.to_q.lora_A.relation.weight"]) > 0
    state = adapter_state_dict(src)

    dst = tiny()
    inject_triplet(dst, TripletSpec(rank=4))
    load_adapter_state_dict(dst, state)
    assert set(adapter_state_dict(dst, ["subject2"])) == {k for k in state if k.startswith("subject2/")}
    x = inputs()
    for selection in ("relation", "subject1", "subject2"):
        activate(src, adapters_for_selection(selection, TripletSpec()))
        activate(dst, adapters_for_selection(selection, TripletSpec()))
        with torch.no_grad():
            assert torch.equal(src(**x)[0], dst(**x)[0])


def test_load_adapter_state_dict_strict_errors_name_the_keys():
    model = tiny()
    inject_triplet(model, TripletSpec(rank=4))
    state = adapter_state_dict(model)
    missing = dict(state)
    gone = missing.pop("ffn/transformer_blocks.1.attn1.to_out.0.lora_B.weight")
    with pytest.raises(LoRAConfigError, match=r"ffn/transformer_blocks\.1\.attn1\.to_out\.0\.lora_B"):
        load_adapter_state_dict(model, missing)
    load_adapter_state_dict(model, missing, strict=False)  # partial loads are allowed when asked
    extra = dict(state, **{"ffn/transformer_blocks.1.attn1.to_add_out.lora_A.weight": gone})
    with pytest.raises(LoRAConfigError, match=r"to_add_out"):
        load_adapter_state_dict(model, extra)
    wrong = dict(state)
    wrong["relation/transformer_blocks.0.attn1.to_q.lora_A.weight"] = torch.zeros(8, 32)
    with pytest.raises(LoRAConfigError, match="wrong shape"):
        load_adapter_state_dict(model, wrong, strict=False)
    # Only the adapters present must be complete.
    load_adapter_state_dict(model, {k: v for k, v in state.items() if k.startswith("subject1/")})


def test_save_and_load_adapters_round_trip(tmp_path):
    spec = TripletSpec(placement="KV/Q", rank=4, alpha=8.0, ranks={"ffn": 2}, alphas={"ffn": 3.0})
    model = tiny()
    inject_triplet(model, spec)
    randomize_lora(model)
    path = save_adapters(tmp_path / "sub" / "step100.safetensors", model, spec, metadata={"step": "100"})
    assert path.is_file()
    assert [p.name for p in path.parent.iterdir()] == ["step100.safetensors"]  # no temp files left
    spec2, state, meta = load_adapters(path)
    assert spec2 == spec
    assert meta == {"step": "100"}
    expected = adapter_state_dict(model)
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[k], expected[k]) for k in state)
    assert json.loads(json.dumps(spec.to_dict())) == spec.to_dict()
    assert TripletSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


def test_load_adapters_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load_adapters(tmp_path / "nope.safetensors")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file at all")
    with pytest.raises(LoRAConfigError, match="garbage.safetensors"):
        load_adapters(garbage)
    foreign = tmp_path / "pytorch_lora_weights.safetensors"
    safetensors.torch.save_file({"transformer.x.lora_A.weight": torch.zeros(2, 2)}, str(foreign))
    with pytest.raises(LoRAConfigError, match="not a relvid adapter file"):
        load_adapters(foreign)
    with pytest.raises(LoRAConfigError, match="unknown LoRA spec keys"):
        TripletSpec.from_dict({"placement": "QK/V", "rnak": 4})


def test_save_adapters_refuses_reserved_metadata(tmp_path):
    model = tiny()
    spec = TripletSpec(rank=2)
    inject_triplet(model, spec)
    with pytest.raises(LoRAConfigError, match="reserved"):
        save_adapters(tmp_path / "a.safetensors", model, spec, metadata={"spec": "x"})

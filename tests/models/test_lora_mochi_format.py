"""The mochi export: genmo's fused Mochi LoRA, as genmo's pipeline and ComfyUI's native loader apply it.

How those tools read the file, pinned here (the rules the tests apply):
- genmo (genmoai/mochi, src/genmo/mochi_preview/dit/joint_model/asymm_models_joint.py and
  lora.py): each attention has fused `qkv_x` (vision, rows [q; k; v]) and `qkv_y` (text) layers and
  `proj_x` / `proj_y` output projections; a LoraLinear holds parameters `lora_A` (rank, in) and
  `lora_B` (out, rank) and adds B @ A * lora_alpha / r, with r and alpha from the file's JSON `kwargs`
  metadata (qkv_proj_lora_rank/alpha for every qkv layer, out_proj_lora_rank/alpha for every output
  projection); demos/fine_tuner/train.py saves `lora_state_dict(model)` with that metadata.
- ComfyUI: comfy/lora.py, model_lora_keys_unet, the `isinstance(model, comfy.model_base.GenmoMochi)`
  branch ("Official Mochi lora format") maps "<module>" to "diffusion_model.<module>.weight" for every
  weight of its Mochi model (same names as genmo's); comfy/weight_adapter/lora.py (commit 6fd406f),
  LoRAAdapter.load, reads "<module>.lora_B" / "<module>.lora_A" (`mochi_lora`, about line 97 and
  118-121), and calculate_weight (about line 174) scales B @ A by "<module>.alpha" / A.shape[0] when
  that key exists, else by 1.
"""

import json
import re

import pytest
import safetensors
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, MochiPipeline

from relvid.cli import main
from relvid.models.adapter_file import save_adapters
from relvid.models.lora import TripletSpec, adapter_state_dict, inject_triplet, lora_parameters
from relvid.models.lora_io import export_state_dict, inference_state_to_mochi
from tests.helpers.adapters import tiny

# Every key ComfyUI's GenmoMochi mapping + LoRAAdapter.load accepts for a LoRA on an attention layer.
COMFY_MOCHI_KEY = re.compile(r"^blocks\.\d+\.attn\.(qkv_x|qkv_y|proj_x|proj_y)\.lora_[AB]$")
# genmo's layer -> the diffusers modules it fuses, in row order
FUSED = {"qkv_x": ("to_q", "to_k", "to_v"), "qkv_y": ("add_q_proj", "add_k_proj", "add_v_proj"),
         "proj_x": ("to_out.0",), "proj_y": ("to_add_out",)}


def trained(spec: TripletSpec, seed: int = 2):
    model = tiny()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    inject_triplet(model, spec)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(model).values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return adapter_state_dict(model), base


def diffusers_merged(folder, base: dict) -> dict:
    """The transformer's weights after MochiPipeline.load_lora_weights + fuse_lora: the diffusers path."""
    model = tiny()
    model.load_state_dict(base)
    pipe = MochiPipeline(scheduler=FlowMatchEulerDiscreteScheduler(invert_sigmas=True), vae=None,
                         text_encoder=None, tokenizer=None, transformer=model)
    pipe.load_lora_weights(folder)
    pipe.fuse_lora()
    pipe.unload_lora_weights()  # keeps the fused weights, drops the LoRA layers
    return pipe.transformer.state_dict()


def read_mochi(path) -> tuple[dict, dict]:
    with safetensors.safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()  # noqa: SIM118 (not a dict)


def genmo_weight(base: dict, block: int, layer: str) -> torch.Tensor:
    """genmo's weight of a fused layer: the diffusers weights of its modules stacked by rows."""
    return torch.cat([base[f"transformer_blocks.{block}.attn1.{m}.weight"] for m in FUSED[layer]])


def comfy_apply(weight: torch.Tensor, lora: dict, layer: str) -> torch.Tensor:
    a, b = lora[f"{layer}.lora_A"], lora[f"{layer}.lora_B"]
    alpha = lora.get(f"{layer}.alpha")
    scale = float(alpha) / a.shape[0] if alpha is not None else 1.0
    return weight + scale * (b @ a).reshape(weight.shape)


def genmo_apply(weight: torch.Tensor, lora: dict, layer: str, kwargs: dict) -> torch.Tensor:
    kind = "qkv" if layer.split(".")[-1].startswith("qkv") else "out"
    r, alpha = kwargs[f"{kind}_proj_lora_rank"], kwargs[f"{kind}_proj_lora_alpha"]
    a, b = lora[f"{layer}.lora_A"], lora[f"{layer}.lora_B"]
    assert a.shape[0] == b.shape[1] == r  # genmo builds every such layer with this one rank
    return weight + (b @ a) * (alpha / r)


SPECS = [
    TripletSpec(rank=4, alpha=8.0),
    TripletSpec(placement="V/QK", rank=4, alpha=2.0, ranks={"ffn": 6}, alphas={"ffn": 9.0}),
    TripletSpec(placement="KV/Q", rank=3, alpha=6.0, branches="vision"),
    TripletSpec(placement="Q/KV", rank=2, alpha=1.0, branches="text", ranks={"ffn": 3}),
    TripletSpec(placement="direct", rank=4, alpha=6.0),
]
IDS = ["QK/V", "V/QK-ffn-rank-differs", "KV/Q-vision", "Q/KV-text", "direct"]


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_fused_file_applied_like_genmo_and_comfyui_equals_the_diffusers_merge(tmp_path, spec):
    state, base = trained(spec)
    export_state_dict(state, spec, tmp_path / "diffusers")
    path = export_state_dict(state, spec, tmp_path / "mochi", fmt="mochi")
    lora, metadata = read_mochi(path)
    kwargs = json.loads(metadata["kwargs"])
    merged = diffusers_merged(tmp_path / "diffusers", base)

    changed = 0
    for block in range(2):
        for layer, modules in FUSED.items():
            key = f"blocks.{block}.attn.{layer}"
            if f"transformer_blocks.{block}.attn1.{modules[0]}.weight" not in base:
                assert f"{key}.lora_A" not in lora  # the last block has no text output projection
                continue
            weight = genmo_weight(base, block, layer)
            if f"{key}.lora_A" not in lora:  # a branch the spec leaves alone
                assert all(torch.equal(merged[f"transformer_blocks.{block}.attn1.{m}.weight"],
                                       base[f"transformer_blocks.{block}.attn1.{m}.weight"]) for m in modules)
                continue
            comfy = comfy_apply(weight, lora, key)
            genmo = genmo_apply(weight, lora, key, kwargs)
            torch.testing.assert_close(comfy, genmo, rtol=0, atol=0)
            for piece, module in zip(comfy.chunk(len(modules)), modules, strict=True):
                name = f"transformer_blocks.{block}.attn1.{module}.weight"
                torch.testing.assert_close(piece, merged[name], rtol=1e-5, atol=1e-6, msg=f"{key} -> {module}")
                changed += not torch.equal(merged[name], base[name])
    assert changed > 0  # the LoRA moved weights: the comparison is not base against base


def test_keys_are_the_ones_comfyui_maps_and_the_file_stores_genmo_kwargs(tmp_path):
    spec = TripletSpec(rank=4, alpha=8.0, ranks={"ffn": 6}, alphas={"ffn": 3.0})  # QK/V: V is the subjects'
    state, base = trained(spec)
    path = export_state_dict(state, spec, tmp_path, fmt="mochi")
    lora, metadata = read_mochi(path)
    # ComfyUI's Mochi model has a weight for each of these layers (the last block no proj_y)
    comfy_layers = {f"blocks.{b}.attn.{layer}" for b in range(2) for layer, modules in FUSED.items()
                    if f"transformer_blocks.{b}.attn1.{modules[0]}.weight" in base}
    assert all(COMFY_MOCHI_KEY.match(k) and k.rsplit(".", 1)[0] in comfy_layers for k in lora), sorted(lora)
    assert sorted(lora) == sorted(f"{layer}.lora_{ab}" for layer in comfy_layers for ab in "AB")
    assert not any(k.endswith(".alpha") for k in lora)  # ComfyUI would divide one by the fused rank
    assert json.loads(metadata["kwargs"]) == {
        "qkv_proj_lora_rank": 8, "qkv_proj_lora_alpha": 8, "qkv_proj_lora_dropout": 0.0,  # [A_q; A_k]: 2 x 4
        "out_proj_lora_rank": 6, "out_proj_lora_alpha": 6, "out_proj_lora_dropout": 0.0,
    }
    assert lora["blocks.0.attn.qkv_x.lora_A"].shape == (8, 32)
    assert lora["blocks.0.attn.qkv_y.lora_A"].shape == (8, 16)  # the text branch reads 16-wide T5 features
    b = lora["blocks.0.attn.qkv_x.lora_B"]
    assert b.shape == (96, 8) and not b[64:].any()  # V rows zero: V carries subject LoRAs, not exported
    assert not b[:32, 4:].any() and not b[32:64, :4].any()  # block-diagonal: q from A_q, k from A_k
    assert torch.equal(b[:32, :4], state["relation/transformer_blocks.0.attn1.to_q.lora_B.weight"] * 2.0)
    assert torch.equal(lora["blocks.0.attn.proj_x.lora_B"],
                       state["ffn/transformer_blocks.0.attn1.to_out.0.lora_B.weight"] * 0.5)
    assert json.loads(metadata["relvid_spec"])["placement"] == "QK/V"


def test_inference_state_to_mochi_refuses_what_genmo_cannot_hold():
    spec = TripletSpec(rank=4)
    state, _ = trained(spec)
    # a half-missing pair
    del state["relation/transformer_blocks.0.attn1.to_k.lora_B.weight"]
    with pytest.raises(ValueError, match="A or B partner"):
        inference_state_to_mochi(state, spec)


def test_cli_export_writes_the_format_asked_under_the_name_asked(tmp_path, capsys):
    spec = TripletSpec(rank=4, alpha=4.0)
    model = tiny()
    inject_triplet(model, spec)
    source = save_adapters(tmp_path / "run" / "adapters" / "relvid_adapters.safetensors", model, spec,
                           metadata={"relation": "shaking_hands"})
    out = tmp_path / "out"
    assert main(["export", str(source.parent), "--out", str(out), "--format", "mochi"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["shaking_hands_mochi.safetensors"]
    assert "ComfyUI" in capsys.readouterr().out
    assert main(["export", str(source), "--out", str(out), "--format", "mochi"]) == 2  # no silent replace
    assert "--overwrite" in capsys.readouterr().err
    assert main(["export", str(source), "--out", str(out), "--format", "mochi", "--overwrite"]) == 0
    assert main(["export", str(source), "--out", str(out), "--name", "hands.safetensors", "--triplet"]) == 0
    assert main(["export", str(source), "--out", str(out)]) == 0  # diffusers: its own default name
    assert sorted(p.name for p in out.iterdir()) == ["hands.safetensors", "pytorch_lora_weights.safetensors",
                                                     "relvid_adapters.safetensors", "shaking_hands_mochi.safetensors"]
    assert main(["export", str(source), "--out", str(out), "--name", "sub/x.safetensors"]) == 2
    assert "--name" in capsys.readouterr().err


def test_a_genmo_format_file_given_to_sample_is_refused_not_silently_ignored(tmp_path, trained_adapters, capsys):
    from relvid.cli import main
    from tests.helpers.configs import TINY

    adapters, _, _ = trained_adapters
    assert main(["export", str(adapters), "--out", str(tmp_path / "out"), "--format", "mochi", "--name",
                 "x_mochi.safetensors"]) == 0
    capsys.readouterr()
    assert main(["sample", "--prompt", "a", "--adapters", str(tmp_path / "out" / "x_mochi.safetensors"),
                 "--out", str(tmp_path / "s"), *TINY]) == 2
    err = capsys.readouterr().err
    assert "genmo's Mochi format" in err and "diffusers file" in err and not (tmp_path / "s").exists()

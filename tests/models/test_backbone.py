import json

import pytest
import torch
from omegaconf import OmegaConf

from relvid.config import ModelConfig
from relvid.models.backbone import WeightsNotFoundError, find_transformer_folder, load_transformer, tiny_transformer


def _model_cfg(**kw):
    return OmegaConf.merge(OmegaConf.structured(ModelConfig), kw)


def test_tiny_preset_is_seeded_and_frozen():
    a = load_transformer(_model_cfg(preset="tiny"))
    b = load_transformer(_model_cfg(preset="tiny"))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    assert not any(p.requires_grad for p in a.parameters())
    assert a.gradient_checkpointing


def test_loads_a_local_diffusers_folder(tmp_path):
    model = tiny_transformer(seed=3)
    model.save_pretrained(tmp_path / "mochi" / "transformer")
    for path in (tmp_path / "mochi", tmp_path / "mochi" / "transformer"):  # pipeline root or the subfolder
        loaded = load_transformer(_model_cfg(path=str(path), gradient_checkpointing=False))
        assert torch.equal(loaded.proj_out.weight, model.proj_out.weight)
        assert not loaded.gradient_checkpointing


def test_bf16_dtype(tmp_path):
    model = load_transformer(_model_cfg(preset="tiny", dtype="bf16"))
    assert next(model.parameters()).dtype == torch.bfloat16


def test_missing_weights_say_what_to_download(tmp_path):
    with pytest.raises(WeightsNotFoundError, match="genmo/mochi-1-preview.*model.path"):
        load_transformer(_model_cfg(path=None))
    with pytest.raises(WeightsNotFoundError, match="not found"):
        find_transformer_folder(tmp_path / "nowhere")
    (tmp_path / "transformer").mkdir()
    (tmp_path / "transformer" / "config.json").write_text(json.dumps({"_class_name": "MochiTransformer3DModel"}))
    with pytest.raises(WeightsNotFoundError, match="incomplete"):
        find_transformer_folder(tmp_path)


def test_missing_shard_is_named(tmp_path):
    folder = tmp_path / "transformer"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"_class_name": "MochiTransformer3DModel"}))
    index = {"weight_map": {"a": "diffusion_pytorch_model-00001-of-00002.safetensors",
                            "b": "diffusion_pytorch_model-00002-of-00002.safetensors"}}
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    (folder / "diffusion_pytorch_model-00001-of-00002.safetensors").write_bytes(b"")
    with pytest.raises(WeightsNotFoundError, match="00002-of-00002"):
        find_transformer_folder(tmp_path)


def test_wrong_model_class_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKLMochi"}))
    with pytest.raises(WeightsNotFoundError, match="AutoencoderKLMochi"):
        find_transformer_folder(tmp_path)


def test_weights_identity_tells_other_weights_apart_and_is_stable(tmp_path):
    from relvid.models.weights import weights_identity

    tiny_transformer(seed=0).save_pretrained(tmp_path / "a" / "transformer")
    tiny_transformer(seed=1).save_pretrained(tmp_path / "b" / "transformer")
    (tmp_path / "a" / "model_index.json").write_text(json.dumps({"_class_name": "MochiPipeline"}))
    a = weights_identity(tmp_path / "a")
    assert a == weights_identity(tmp_path / "a")  # the same folder, the same identity
    assert a == weights_identity(tmp_path / "a" / "transformer")  # pipeline root or its transformer/
    assert a != weights_identity(tmp_path / "b")  # same architecture and file sizes, other weights
    (tmp_path / "a" / "model_index.json").write_text(json.dumps({"_class_name": "OtherPipeline"}))
    assert a != weights_identity(tmp_path / "a")
    with pytest.raises(WeightsNotFoundError, match="config.json"):
        weights_identity(tmp_path / "nowhere")

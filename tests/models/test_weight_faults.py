"""Damaged weight folders (truncated files, a config from another download, a garbage
model_index.json) are refused with a UserError naming the file and the fix, never a raw traceback."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from relvid.config import ModelConfig
from relvid.errors import UserError
from relvid.models.backbone import find_transformer_folder, load_transformer, tiny_transformer
from relvid.models.mochi_vae import MochiCodec
from relvid.models.t5 import T5TextEncoder
from tests.helpers.preprocess import save_tiny_t5, save_tiny_vae

MOCHI_INDEX = {
    "_class_name": "MochiPipeline", "_diffusers_version": "0.42.1",
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"], "text_encoder": ["transformers", "T5EncoderModel"],
    "tokenizer": ["transformers", "T5TokenizerFast"], "transformer": ["diffusers", "MochiTransformer3DModel"],
    "vae": ["diffusers", "AutoencoderKLMochi"],
}


def _model_cfg(path: Path):
    return OmegaConf.merge(OmegaConf.structured(ModelConfig), {"path": str(path), "gradient_checkpointing": False})


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """A pipeline root with a tiny transformer, VAE and T5 (copied per test before damaging it)."""
    root = tmp_path_factory.mktemp("mochi") / "mochi"
    tiny_transformer(seed=0).save_pretrained(root / "transformer")
    save_tiny_vae(root)
    save_tiny_t5(root)
    (root / "model_index.json").write_text(json.dumps(MOCHI_INDEX))
    return root


@pytest.fixture
def mochi(pristine, tmp_path) -> Path:
    return Path(shutil.copytree(pristine, tmp_path / "mochi"))


def _cut(path: Path, keep: int | None = None) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2 if keep is None else keep])


def _edit_config(path: Path, **changes) -> None:
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


LOADERS = {
    "transformer": (lambda p: load_transformer(_model_cfg(p)), "transformer/diffusion_pytorch_model.safetensors"),
    "vae": (lambda p: MochiCodec.from_folder(p), "vae/diffusion_pytorch_model.safetensors"),
    "t5": (lambda p: T5TextEncoder.from_folder(p), "text_encoder/model.safetensors"),
}


def test_the_intact_pipeline_root_loads(mochi):
    for load, _ in LOADERS.values():
        load(mochi)


@pytest.mark.parametrize("keep", [None, 4, 20], ids=["half", "no-header-size", "header-cut"])
@pytest.mark.parametrize("component", sorted(LOADERS))
def test_truncated_weights_are_named(mochi, component, keep):
    load, rel = LOADERS[component]
    _cut(mochi / rel, keep)
    with pytest.raises(UserError, match=re.escape(str(mochi / rel)) + r".*truncated or unreadable.*download"):
        load(mochi)


def test_garbage_header_is_unreadable(mochi):
    weights = mochi / "transformer" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[8:16] = b"\xff\xfe{{{{{{"  # not UTF-8 JSON any more
    weights.write_bytes(bytes(data))
    with pytest.raises(UserError, match="diffusion_pytorch_model.safetensors.*truncated or unreadable"):
        load_transformer(_model_cfg(mochi))


def test_truncated_shard_of_a_sharded_transformer_is_named(tmp_path):
    folder = tmp_path / "mochi" / "transformer"
    tiny_transformer(seed=0).save_pretrained(folder, max_shard_size="40KB")
    shards = sorted(folder.glob("diffusion_pytorch_model-*.safetensors"))
    assert len(shards) > 1
    _cut(shards[-1])
    with pytest.raises(UserError, match=re.escape(shards[-1].name) + ".*truncated or unreadable"):
        load_transformer(_model_cfg(tmp_path / "mochi"))
    assert len(shards) > 1


def test_unreadable_shard_index_is_named(mochi):
    folder = mochi / "transformer"
    (folder / "diffusion_pytorch_model.safetensors").unlink()
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text("{not json")
    with pytest.raises(UserError, match="diffusion_pytorch_model.safetensors.index.json"):
        find_transformer_folder(mochi)


@pytest.mark.parametrize(("component", "config", "changes", "tensor"), [
    ("transformer", "transformer/config.json", {"num_attention_heads": 4}, r"pos_frequencies: .*\[3, 4, 8\]"),
    ("transformer", "transformer/config.json", {"attention_head_dim": 8}, r"pos_frequencies: .*\[3, 2, 4\]"),
    ("vae", "vae/config.json", {"latent_channels": 8, "latents_mean": [0.0] * 8, "latents_std": [1.0] * 8},
     "proj_out"),
    ("t5", "text_encoder/config.json", {"d_ff": 128}, "DenseReluDense"),
])
def test_config_from_another_download_is_refused(mochi, component, config, changes, tensor):
    load, _ = LOADERS[component]
    _edit_config(mochi / config, **changes)
    folder = re.escape(str((mochi / config).parent))
    with pytest.raises(UserError, match=rf"{folder}.*config.json.*{tensor}.*different downloads"):
        load(mochi)


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", json.dumps({"_class_name": "MochiPipeline"}),
                                  json.dumps({**MOCHI_INDEX, "transformer": ["diffusers", "FluxTransformer2DModel"]}),
                                  json.dumps({**MOCHI_INDEX, "vae": "AutoencoderKLMochi"})],
                         ids=["invalid-json", "not-an-object", "no-components", "other-class", "malformed-entry"])
def test_garbage_model_index_is_refused(mochi, text):
    (mochi / "model_index.json").write_text(text)
    index = re.escape(str(mochi / "model_index.json"))
    expect_transformer = text != json.dumps({**MOCHI_INDEX, "vae": "AutoencoderKLMochi"})
    expect_vae = "FluxTransformer2DModel" not in text
    if expect_transformer:
        with pytest.raises(UserError, match=index):
            load_transformer(_model_cfg(mochi))
    else:
        load_transformer(_model_cfg(mochi))
    if expect_vae:
        with pytest.raises(UserError, match=index):
            MochiCodec.from_folder(mochi)
    else:
        MochiCodec.from_folder(mochi)


def test_model_index_without_the_text_encoder_is_refused_for_t5(mochi):
    index = {k: v for k, v in MOCHI_INDEX.items() if k != "text_encoder"}
    (mochi / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(UserError, match=re.escape(str(mochi / "model_index.json")) + ".*text_encoder"):
        T5TextEncoder.from_folder(mochi)
    (mochi / "model_index.json").write_text("")
    with pytest.raises(UserError, match="model_index.json"):
        T5TextEncoder.from_folder(mochi)


def test_a_component_folder_is_not_judged_by_its_parents_model_index(mochi):
    (mochi / "model_index.json").write_text("{not json")
    load_transformer(_model_cfg(mochi / "transformer"))
    MochiCodec.from_folder(mochi / "vae")

"""`relvid analyze` on the committed toy base: each kind writes its PNG, JSON (and mp4) with the documented
numbers, the toy base folder selects the toy world's parts by itself, and user mistakes are one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from relvid.cli import main
from relvid.config import ModelConfig
from relvid.models.adapter_file import save_adapters
from relvid.models.backbone import load_transformer
from relvid.models.lora import TripletSpec, inject_triplet, lora_parameters

BASE = Path(__file__).resolve().parents[2] / "relvid" / "toy" / "base_model"
PROMPT = "A red circle is orbiting a blue square."
FAST = ["--sampling-steps", "4", "--step", "-1"]  # a 4-step schedule, read at its last step


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> str:
    """A triplet for the toy base with small random weights."""
    model = load_transformer(OmegaConf.structured(ModelConfig(path=str(BASE), dtype="fp32")))
    inject_triplet(model, TripletSpec(rank=4, alpha=4.0))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in lora_parameters(model).values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    path = tmp_path_factory.mktemp("run") / "toyrun" / "adapters" / "relvid_adapters.safetensors"
    return str(save_adapters(path, model, TripletSpec(rank=4, alpha=4.0)).parent)


def test_the_toy_base_folder_selects_the_toy_world(tmp_path, capsys):
    assert main(["analyze", "attention", "--model", str(BASE), "--print-config"]) == 0
    cfg = OmegaConf.create(capsys.readouterr().out)
    assert (cfg.model.codec, cfg.model.text_encoder, cfg.sampling.frames, cfg.sampling.height) == ("toy", "toy", 13, 32)
    # what the user set stays as set
    assert main(["analyze", "attention", "--model", str(BASE), "sampling.frames=7", "--print-config"]) == 0
    assert OmegaConf.create(capsys.readouterr().out).sampling.frames == 7


def test_attention_maps_base_and_adapters(tmp_path, adapters, capsys):
    out = tmp_path / "att"
    assert main(["analyze", "attention", "--model", str(BASE), "--prompt", PROMPT, "--phrase", "orbiting",
                 "--adapters", adapters, "--out", str(out), *FAST]) == 0
    assert "step 3 of 4: sigma" in capsys.readouterr().out
    report = json.loads((out / "attention.json").read_text())
    assert report["phrase_tokens"] == [4] and list(report["models"]) == ["base", "toyrun"]
    grid = report["grid"]
    assert grid == [5, 8, 8]  # 13 frames -> 5 latent frames; 32 px -> 16 latent cells -> 8 tokens a side
    for entry in report["models"].values():
        to_phrase = torch.tensor(entry["steps"]["3"]["to_phrase"])
        assert tuple(to_phrase.shape) == tuple(grid) and bool((to_phrase > 0).all() and (to_phrase < 1).all())
    assert (out / "attention.png").stat().st_size > 0 and (out / "attention.mp4").stat().st_size > 0


def test_an_absent_phrase_is_one_line(tmp_path, capsys):
    code = main(["analyze", "attention", "--model", str(BASE), "--prompt", PROMPT, "--phrase", "pushing",
                 "--out", str(tmp_path / "x"), *FAST])
    err = capsys.readouterr().err
    assert code == 2 and "analyze.phrase 'pushing' is not in the prompt" in err and "Traceback" not in err


def test_features_of_a_prompt_and_of_a_cache_clip(tmp_path, capsys):
    from relvid.data.cache import write_clip
    from tests.helpers.cache import make_record

    out = tmp_path / "feat"
    assert main(["analyze", "features", "--model", str(BASE), "--prompt", PROMPT, "--out", str(out), *FAST]) == 0
    report = json.loads((out / "features.json").read_text())
    maps = report["models"]["base"]["steps"]["3"]
    assert torch.tensor(maps["q"]["mean"]).shape == (8, 8) and torch.tensor(maps["v"]["pca"]).shape == (8, 8, 3)
    assert torch.tensor(maps["k"]["pca_frames"]).shape == (5, 8, 8, 3)
    clip = write_clip(tmp_path / "clip.safetensors", make_record(c=36, f=2, h=8, w=12, dim=32))
    assert main(["analyze", "features", "--model", str(BASE), "--clip", str(clip), "--out", str(tmp_path / "c"),
                 "--step", "0", "-1"]) == 0
    report = json.loads((tmp_path / "c" / "features.json").read_text())
    assert report["grid"] == [2, 4, 6] and set(report["models"]["base"]["steps"]) == {"0", "63"}
    assert (tmp_path / "c" / "features.mp4").is_file()


def test_qkv_subspace_and_attribution(tmp_path, adapters):
    out = tmp_path / "an"
    assert main(["analyze", "qkv-subspace", "--model", str(BASE), "--adapters", adapters, "--out", str(out)]) == 0
    report = json.loads((out / "qkv_subspace.json").read_text())
    vision = [e for e in report["base"] if e["branch"] == "vision" and e["space"] == "output"]
    assert [e["rank"] for e in vision] == [1, 4, 16, 64] and len(vision[0]["blocks"]) == 4
    assert {e["adapter"] for e in report["adapters"]["toyrun"]["entries"]} == {"relation", "subject1", "subject2",
                                                                              "ffn"}
    assert main(["analyze", "attribution", "--model", str(BASE), "--adapters", adapters, "--prompt", PROMPT,
                 "--judge", "none", "--out", str(out), "--sampling-steps", "3"]) == 0
    rows = json.loads((out / "attribution.json").read_text())["rows"]
    assert [(r["adapters"], r["subset"]) for r in rows] == [("base", "none"), ("toyrun", "relation+ffn"),
                                                           ("toyrun", "subjects+ffn"), ("toyrun", "all")]
    assert rows[1]["active"] == ["relation", "ffn"] and 0 < rows[0]["temporal_consistency"] <= 1
    assert len({r["temporal_consistency"] for r in rows}) == 4  # each subset changes the videos


def test_attribution_with_the_toy_judge_through_the_registry(tmp_path, adapters, capsys):
    """--judge toy (and auto on the toy base) reaches the toy world's judge through relvid.components."""
    out = tmp_path / "an"
    assert main(["analyze", "attribution", "--model", str(BASE), "--adapters", adapters, "--prompt",
                 "A red circle is pushing a blue square.", "--relation", "pushing", "--judge", "toy", "--out", str(out),
                 "--sampling-steps", "3"]) == 0  # pushing: an NTU relation and a toy one
    rows = json.loads((out / "attribution.json").read_text())["rows"]
    assert len(rows) == 4
    for row in rows:
        assert 0.0 <= row["relation_accuracy"] <= 1.0 and 0.0 <= row["appearance_leakage"] <= 1.0
    capsys.readouterr()
    assert main(["analyze", "attribution", "--model", str(BASE), "--prompt", PROMPT, "--judge", "toy",
                 "--out", str(tmp_path / "bad"), "--sampling-steps", "3"]) == 2  # shaking_hands is no toy relation
    assert "--relation" in capsys.readouterr().err

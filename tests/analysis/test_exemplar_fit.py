"""`relvid analyze exemplar-fit`: the flow-matching error on a cache's exemplars inside and outside the
subjects, per adapter subset, on the committed toy base and on a tiny Mochi transformer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from relvid.analysis.exemplar_fit import subject_direction
from relvid.cli import main
from relvid.config import ModelConfig
from relvid.models.adapter_file import apply_adapter_source, save_adapters
from relvid.models.backbone import load_transformer
from relvid.models.lora import TripletSpec, activate, inject_triplet, lora_parameters

BASE = Path(__file__).resolve().parents[2] / "relvid" / "toy" / "base_model"
TOY = ["--model", str(BASE), "--relation", "moving_apart", "custom_relation=true"]


def random_triplet(model, path: Path, seed: int = 1) -> str:
    """A triplet on `model` with small random weights, saved as a run's adapters/ folder."""
    inject_triplet(model, TripletSpec(rank=4, alpha=4.0))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(model).values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return str(save_adapters(path / "adapters" / "relvid_adapters.safetensors", model,
                             TripletSpec(rank=4, alpha=4.0)).parent)


@pytest.fixture(scope="module")
def toy_cache(tmp_path_factory) -> Path:
    from relvid.toy.drivers.datasets import build_exemplar_cache

    root = tmp_path_factory.mktemp("exemplars") / "cache"
    build_exemplar_cache(root, ["moving_apart"], clips=4, progress=False)
    return root


def toy_base():
    return load_transformer(OmegaConf.structured(ModelConfig(path=str(BASE), dtype="fp32"))).eval()


@torch.no_grad()
def batched_errors(model, cache: Path, draws: int, sigmas: list[float]) -> list[dict[str, float]]:
    """The numbers as experiments/toy/NOTES.md computed them: every exemplar in one batch, noise
    drawn as one (draws, clips, C, f, h, w) tensor and the levels after it, from seed 0."""
    from relvid.data.cache import ClipCache
    from relvid.losses.flow_matching import model_timestep, noisy_latents, velocity_target

    c = ClipCache(cache)
    records = [c.read(i) for i in c.clip_ids("moving_apart")]
    z0 = torch.stack([r.latent_mean.float() for r in records])
    mask = torch.stack([r.relation_mask.float() for r in records])[:, None]
    g = torch.Generator().manual_seed(0)
    noise = torch.randn((draws, *z0.shape), generator=g)
    drawn = torch.rand(draws, len(records), generator=g)
    inside = (z0 * mask).sum((0, 2, 3, 4)) / mask.expand_as(z0).sum((0, 2, 3, 4))
    outside = (z0 * (1 - mask)).sum((0, 2, 3, 4)) / (1 - mask).expand_as(z0).sum((0, 2, 3, 4))
    direction = (inside - outside) / (inside - outside).norm()
    out = []
    for level in [drawn] + [torch.full_like(drawn, s) for s in sigmas]:
        sums = {"inside": 0.0, "outside": 0.0, "bias": 0.0}
        for k in range(draws):
            z = noisy_latents(z0, noise[k], level[k])
            pred = model(hidden_states=z, encoder_hidden_states=torch.stack([r.text_embeds for r in records]),
                         timestep=model_timestep(level[k]), return_dict=False,
                         encoder_attention_mask=torch.stack([r.text_mask for r in records]).bool())[0].float()
            err = (pred - velocity_target(z0, noise[k])) ** 2
            sums["inside"] += float((err * mask).sum() / mask.expand_as(err).sum()) / draws
            sums["outside"] += float((err * (1 - mask)).sum() / (1 - mask).expand_as(err).sum()) / draws
            clean = z + level[k].view(-1, 1, 1, 1, 1) * pred
            along = torch.einsum("bcfhw,c->bfhw", clean - z0, direction)[:, None]
            sums["bias"] += float((along * (1 - mask)).sum() / (1 - mask).sum()) / draws
        out.append(sums)
    return out


def test_subject_direction_points_from_background_to_subject():
    z0 = torch.zeros(3, 1, 2, 2)
    z0[:, 0, 0, 0] = torch.tensor([3.0, 0.0, 4.0])  # the one subject cell
    mask = torch.zeros(1, 1, 2, 2)
    mask[0, 0, 0, 0] = 1
    assert torch.allclose(subject_direction([z0], [mask]), torch.tensor([0.6, 0.0, 0.8]))
    # pooled over clips: a second clip whose subject cell is [0, 0, 0] halves the subject mean
    assert torch.allclose(subject_direction([z0, torch.zeros_like(z0)], [mask, mask]), torch.tensor([0.6, 0.0, 0.8]))


def test_the_numbers_are_the_batched_formulas_per_adapter_subset(tmp_path, toy_cache, capsys):
    """Each row equals the error of the base, or of the triplet with the subset's adapters on, computed
    with every exemplar in one batch; the subsets change the numbers; the outputs are written."""
    adapters = random_triplet(toy_base(), tmp_path / "toyrun")
    out = tmp_path / "fit"
    assert main(["analyze", "exemplar-fit", *TOY, "--cache", str(toy_cache), "--adapters", adapters, "--draws", "2",
                 "--subsets", "none", "relation+ffn", "subject1+ffn", "--out", str(out)]) == 0
    assert "| sigma ~ U(0, 1) | base | none |" in capsys.readouterr().out
    report = json.loads((out / "exemplar_fit.json").read_text())
    rows = report["rows"]
    assert [(r["adapters"], r["subset"], r["active"]) for r in rows] == [
        ("base", "none", []), ("toyrun", "relation+ffn", ["relation", "ffn"]),
        ("toyrun", "subject1+ffn", ["subject1", "ffn"])]
    assert report["levels"] == ["sigma ~ U(0, 1)"] and len(report["clips"]) == 4 and report["draws"] == 2
    expected = batched_errors(toy_base(), toy_cache, 2, [])
    model = toy_base()
    apply_adapter_source(model, adapters)
    for names in (("relation", "ffn"), ("subject1", "ffn")):
        activate(model, list(names))
        expected += batched_errors(model, toy_cache, 2, [])
    for row, want in zip(rows, expected, strict=True):
        for metric in ("inside", "outside", "bias"):
            assert row[metric] == pytest.approx(want[metric], rel=1e-4, abs=1e-6), (row, metric)
    assert len({r["outside"] for r in rows}) == 3
    base = rows[0]
    assert base["inside"] > base["outside"] > 0  # the base errs most where the subjects are
    assert (out / "exemplar_fit.md").read_text().count("\n") == 2 + 3
    assert (out / "exemplar_fit.png").stat().st_size > 0 and (out / "exemplar-fit.config.yaml").is_file()


def test_the_base_hedges_on_layout_at_high_noise_only(tmp_path, toy_cache):
    """The committed base never saw the staged exemplars' layout: from nearly pure noise its predicted clean
    video paints some subject where the exemplars have background; from little noise it does not. The
    fixed levels equal the batched formulas too."""
    out = tmp_path / "fit"
    assert main(["analyze", "exemplar-fit", *TOY, "--cache", str(toy_cache), "--sigmas", "0.1", "0.98",
                 "--subsets", "none", "--out", str(out)]) == 0
    rows = json.loads((out / "exemplar_fit.json").read_text())["rows"]
    assert [(r["level"], r["sigma"]) for r in rows] == [("sigma 0.1", 0.1), ("sigma 0.98", 0.98)]
    low, high = rows[0]["bias"], rows[1]["bias"]
    assert high > 0.5 and abs(low) < 0.1 < high - low
    want = batched_errors(toy_base(), toy_cache, 4, [0.98])[1]
    assert rows[1]["outside"] == pytest.approx(want["outside"], rel=1e-4)
    assert rows[1]["bias"] == pytest.approx(want["bias"], rel=1e-4)


def test_any_mochi_shaped_model_and_cache(tmp_path, random_cache):
    """A tiny Mochi transformer on a random cache (text of 1 to 6 tokens per clip): a row per subset, and a
    direct LoRA has only 'all'."""
    from relvid.models.backbone import tiny_transformer

    cache = random_cache("cache", n_clips=3)
    triplet = random_triplet(tiny_transformer(), tmp_path / "triplet")
    direct = tiny_transformer()
    inject_triplet(direct, TripletSpec(rank=4, alpha=4.0, placement="direct"))
    direct_src = str(save_adapters(tmp_path / "direct" / "adapters" / "relvid_adapters.safetensors", direct,
                                   TripletSpec(rank=4, alpha=4.0, placement="direct")))
    out = tmp_path / "fit"
    assert main(["analyze", "exemplar-fit", "model.preset=tiny", "--cache", str(cache.root), "--relation",
                 "shaking_hands", "--adapters", triplet, "--adapters", direct_src, "--sigmas", "0.5", "--draws", "1",
                 "--out", str(out)]) == 0
    report = json.loads((out / "exemplar_fit.json").read_text())
    assert [(r["adapters"], r["subset"]) for r in report["rows"]] == [
        ("base", "none"), ("triplet", "relation+ffn"), ("triplet", "subjects+ffn"), ("triplet", "all"),
        ("direct", "all")]
    assert all(r[m] == r[m] for r in report["rows"] for m in ("inside", "outside", "bias"))  # finite, not NaN
    assert any("direct" in note and "relation+ffn" in note for note in report["skipped"])


def test_mistakes_are_one_line(tmp_path, toy_cache, capsys):
    def refused(*args: str) -> str:
        capsys.readouterr()
        assert main(["analyze", "exemplar-fit", *TOY, "--out", str(tmp_path / "x"), *args]) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err
        return err

    assert "no clips of relation 'orbiting'" in refused("--cache", str(toy_cache), "--relation", "orbiting")
    assert "analyze.cache_dir is not set: pass --cache" in refused()
    assert "manifest.json not found" in refused("--cache", str(tmp_path))
    assert "analyze.sigmas" in refused("--cache", str(toy_cache), "--sigmas", "1.5")
    assert "analyze.draws" in refused("--cache", str(toy_cache), "--draws", "0")
    assert "nowhere" in refused("--cache", str(toy_cache), "--adapters", str(tmp_path / "nowhere"))


def test_a_cache_without_subject_masks_is_refused(tmp_path, capsys):
    from relvid.data.cache import ClipCache
    from tests.helpers.cache import make_record

    cache = ClipCache(tmp_path / "cache", create=True)
    record = make_record(relation="moving_apart", c=36, f=2, h=8, w=12, dim=32)
    record.subject_masks.zero_()
    record.relation_mask.zero_()
    cache.add(record)
    assert main(["analyze", "exemplar-fit", *TOY, "--cache", str(cache.root), "--out", str(tmp_path / "x")]) == 2
    assert "cover no cell of the latent grid" in capsys.readouterr().err


def test_the_cache_defaults_to_the_relations_cache(capsys):
    assert main(["analyze", "exemplar-fit", "--relation", "hugging", "--print-config"]) == 0
    assert OmegaConf.create(capsys.readouterr().out).analyze.cache_dir == "data/cache/hugging"


def test_rows_of_runs_in_folders_of_the_same_name_are_told_apart():
    from relvid.analysis.attribution import source_labels

    grid = "work/runs/{}/moving_apart/seed0/train/adapters"
    assert source_labels([grid.format("dreamrelation"), grid.format("direct_lora") + "/relvid_adapters.safetensors",
                          "outputs/hugging/adapters"]) == [
        "dreamrelation/moving_apart/seed0", "direct_lora/moving_apart/seed0", "hugging"]

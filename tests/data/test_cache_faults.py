"""Caches that must be refused or reported: overwritten by random-cache, escaping clip ids, caches that
cannot train (no clips, empty captions, wild log-variances, no masks, mixed frame counts)."""

import json

import pytest
import torch
from safetensors.torch import save_file

from relvid.cli import main
from relvid.data.cache import CLIP_FORMAT_VERSION, CacheError, ClipCache, ClipRecord
from relvid.data.datamodule import RelationDataModule, RelationDataset
from relvid.data.random_cache import write_random_cache
from relvid.errors import OutputExistsError
from tests.helpers.cache import make_record


def _rewrite(cache: ClipCache, clip_id: str, **tensors: torch.Tensor) -> None:
    """Replace some tensors of a stored clip, bypassing the writer's checks (a cache from elsewhere)."""
    rec = cache.read(clip_id)
    raw = {k: v.clone() for k, v in rec.tensors().items()}
    raw.update(tensors)
    save_file(raw, str(cache.path(clip_id)), metadata={"format_version": str(CLIP_FORMAT_VERSION), **rec.meta})


# Case 1 ------------------------------------------------------------------------------------------

def test_random_cache_refuses_a_folder_holding_a_cache_unless_overwrite(tmp_path, capsys):
    root = tmp_path / "cache"
    cache = ClipCache(root, create=True)
    cache.add(make_record("mine_a"))
    with pytest.raises(OutputExistsError, match=r"(?s)cache.*--overwrite"):
        write_random_cache(root, n_clips=2)
    assert ClipCache(root).clip_ids() == ["mine_a"]
    assert main(["random-cache", str(root), "--clips", "2"]) == 2
    err = capsys.readouterr().err
    assert str(root) in err and "--overwrite" in err
    assert ClipCache(root).clip_ids() == ["mine_a"] and not (root / "prompts.safetensors").exists()
    assert main(["random-cache", str(root), "--clips", "2", "--overwrite"]) == 0
    assert ClipCache(root).clip_ids() == ["shaking_hands_000", "shaking_hands_001"]
    assert not (root / "mine_a.safetensors").exists()


# Case 2 ------------------------------------------------------------------------------------------

def test_manifest_entry_escaping_the_cache_folder_is_refused_on_read(tmp_path):
    outside = tmp_path / "x.safetensors"
    ClipCache(tmp_path / "elsewhere", create=True).add(make_record("x"))
    (tmp_path / "elsewhere" / "x.safetensors").rename(outside)
    root = tmp_path / "a" / "b" / "cache"
    cache = ClipCache(root, create=True)
    cache.add(make_record("good"))
    manifest = json.loads(cache.manifest_path.read_text())
    manifest["clips"].append({"id": "../../../x", "file": "../../../x.safetensors", "relation": "hugging",
                              "caption": "c"})
    cache.manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(CacheError, match=r"manifest\.json.*\.\./\.\./\.\./x"):
        ClipCache(root).read("../../../x")
    with pytest.raises(CacheError, match=r"manifest\.json.*\.\./\.\./\.\./x"):
        ClipCache(root).clip_ids()
    with pytest.raises(CacheError, match=r"manifest\.json.*\.\./\.\./\.\./x"):
        ClipCache(root).validate()
    assert main(["validate-cache", str(root)]) == 2


def test_manifest_file_name_escaping_the_cache_folder_is_refused(tmp_path):
    cache = ClipCache(tmp_path / "cache", create=True)
    cache.add(make_record("good"))
    ClipCache(tmp_path / "other", create=True).add(make_record("good"))
    manifest = json.loads(cache.manifest_path.read_text())
    manifest["clips"][0]["file"] = "../other/good.safetensors"
    cache.manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(CacheError, match=r"manifest\.json.*\.\./other/good"):
        ClipCache(tmp_path / "cache").read("good")


# Case 5 ------------------------------------------------------------------------------------------

def test_validate_reports_a_cache_without_clips(tmp_path, capsys):
    ClipCache(tmp_path / "empty", create=True)
    problems = ClipCache(tmp_path / "empty").validate()
    assert problems and "no clips" in problems[0][1] and "manifest.json" in problems[0][1]
    assert main(["validate-cache", str(tmp_path / "empty")]) == 1
    assert "no clips" in capsys.readouterr().out


def test_validate_reports_a_clip_whose_text_mask_is_all_false(random_cache):
    cache = random_cache(n_clips=2)
    bad = cache.clip_ids()[1]
    n = cache.read(bad).text_mask.shape[0]
    _rewrite(cache, bad, text_mask=torch.zeros(n, dtype=torch.bool))
    problems = dict(cache.validate())
    assert list(problems) == [bad] and "text_mask" in problems[bad] and "no valid token" in problems[bad]


def test_validate_reports_latent_logvar_out_of_range(random_cache):
    cache = random_cache(n_clips=3)
    ids = cache.clip_ids()
    shape = cache.read(ids[0]).latent_logvar.shape
    _rewrite(cache, ids[0], latent_logvar=torch.full(shape, 80.0).bfloat16())
    _rewrite(cache, ids[2], latent_logvar=torch.full(shape, -60.0).bfloat16())
    problems = dict(cache.validate())
    assert sorted(problems) == [ids[0], ids[2]]
    assert "latent_logvar" in problems[ids[0]] and "80" in problems[ids[0]]
    assert "latent_logvar" in problems[ids[2]] and "-60" in problems[ids[2]]
    with pytest.raises(CacheError, match="latent_logvar"):
        RelationDataset(cache.root)


def test_validate_reports_subject_masks_empty_across_the_whole_cache(random_cache, capsys):
    cache = random_cache(n_clips=2)
    for clip_id in cache.clip_ids():
        rec = cache.read(clip_id)
        _rewrite(cache, clip_id, subject_masks=torch.zeros_like(rec.subject_masks),
                 relation_mask=torch.zeros_like(rec.relation_mask))
    problems = cache.validate()
    assert len(problems) == 1 and "subject_masks" in problems[0][1] and "all zero" in problems[0][1]
    assert main(["validate-cache", str(cache.root)]) == 1
    with pytest.raises(CacheError, match="subject_masks.*all zero"):
        RelationDataset(cache.root)


def _mixed_frames_cache(root) -> ClipCache:
    cache = ClipCache(root, create=True)
    cache.add(make_record("clip_a", relation="hugging", f=3))
    cache.add(make_record("clip_b", relation="hugging", f=4))
    return cache


def test_mixed_frame_counts_are_reported_and_refused_only_for_batches_above_one(tmp_path, capsys):
    cache = _mixed_frames_cache(tmp_path / "cache")
    assert cache.validate() == []  # batch 1 trains on it
    problems = dict(cache.validate(batch_size=2))
    assert "latent_mean" in " ".join(problems.values()) and "3" in " ".join(problems.values())
    assert main(["validate-cache", str(cache.root)]) == 0
    assert "frame counts" in capsys.readouterr().out  # a note, not a failure
    RelationDataModule(cache.root, batch_size=1, total_steps=2).setup("fit")
    with pytest.raises(CacheError, match=r"(?s)frame count.*batch_size"):
        RelationDataModule(cache.root, batch_size=2, total_steps=2).setup("fit")


# Case 6 ------------------------------------------------------------------------------------------

def test_no_clips_error_names_a_real_fix(random_cache):
    cache = random_cache(n_clips=2, relation="shaking_hands")
    with pytest.raises(CacheError, match="no clips") as err:
        RelationDataset(cache.root, relation="hugging")
    assert "data.relation" not in str(err.value)
    assert "--relation" in str(err.value) and "shaking_hands" in str(err.value)


def test_writer_refuses_a_record_the_reader_would_refuse(tmp_path):
    rec: ClipRecord = make_record()
    rec.latent_logvar = torch.full_like(rec.latent_logvar, 80.0)
    with pytest.raises(CacheError, match="latent_logvar"):
        ClipCache(tmp_path, create=True).add(rec)

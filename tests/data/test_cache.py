import json
import os

import pytest
import torch
from safetensors.torch import save_file

from relvid.data.cache import (
    CLIP_FORMAT_VERSION,
    CacheError,
    ClipCache,
    ClipRecord,
    read_clip,
    write_clip,
)
from tests.helpers.cache import make_record


def raw_tensors(record: ClipRecord) -> dict:
    return {k: v.clone() for k, v in record.tensors().items()}


def raw_meta(record: ClipRecord) -> dict:
    return {"format_version": str(CLIP_FORMAT_VERSION), **record.meta}


def test_round_trip_keeps_tensors_dtypes_and_metadata(tmp_path):
    rec = make_record()
    path = write_clip(tmp_path / "clip_a.safetensors", rec)
    back = read_clip(path)
    for name, t in rec.tensors().items():
        assert back.tensors()[name].dtype == t.dtype, name
        assert torch.equal(back.tensors()[name], t), name
    assert back.meta == {"format_version": "2", **rec.meta}
    assert back.clip_id == "clip_a" and back.latent_shape == (2, 3, 4, 6)


def test_optional_relation_mask_and_uint8_text_mask_on_disk(tmp_path):
    rec = make_record(relation_mask=False, dtype=torch.float16)
    tensors = raw_tensors(rec)
    tensors["text_mask"] = torch.tensor([1, 1, 0], dtype=torch.uint8)
    save_file(tensors, str(tmp_path / "c.safetensors"), metadata=raw_meta(rec))
    back = read_clip(tmp_path / "c.safetensors")
    assert back.relation_mask is None
    assert back.latent_mean.dtype == torch.float16
    assert back.text_mask.dtype == torch.bool and back.text_mask.tolist() == [True, True, False]


def test_writes_leave_only_final_files(tmp_path):
    cache = ClipCache(tmp_path / "cache", create=True)
    cache.set_config({"codec": "toy"})
    for i in range(3):
        cache.add(make_record(clip_id=f"clip_{i}"))
    cache.write_prompts({"": (torch.zeros(1, 8), torch.ones(1, dtype=torch.bool))})
    assert sorted(os.listdir(cache.root)) == ["clip_0.safetensors", "clip_1.safetensors",
                                              "clip_2.safetensors", "manifest.json",
                                              "prompts.safetensors"]


def test_failed_write_keeps_old_file_and_removes_temp(tmp_path, monkeypatch):
    path = write_clip(tmp_path / "clip_a.safetensors", make_record())
    before = path.read_bytes()

    def crash(src, dst):  # the process dies between writing the temp file and renaming it
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        write_clip(path, make_record(n_tokens=5))
    assert os.listdir(tmp_path) == ["clip_a.safetensors"]
    assert path.read_bytes() == before


def test_invalid_record_is_refused_before_writing(tmp_path):
    rec = make_record()
    rec.subject_masks = rec.subject_masks * 2
    with pytest.raises(CacheError, match="subject_masks"):
        write_clip(tmp_path / "clip_a.safetensors", rec)
    assert os.listdir(tmp_path) == []


def _write_raw(tmp_path, tensors, meta):
    path = tmp_path / "bad_clip.safetensors"
    save_file(tensors, str(path), metadata=meta)
    return path


def _without(d, key):
    return {k: v for k, v in d.items() if k != key}


def _with(d, key, value):
    return {**d, key: value}


REC = make_record()
BAD_FILES = {
    "missing tensor": (lambda: (_without(raw_tensors(REC), "subject_masks"), raw_meta(REC)), "subject_masks"),
    "masks off the latent grid": (lambda: (_with(raw_tensors(REC), "subject_masks", torch.zeros(2, 3, 4, 4)),
                                           raw_meta(REC)), "subject_masks"),
    "relation mask off the grid": (lambda: (_with(raw_tensors(REC), "relation_mask", torch.zeros(3, 2, 6)),
                                            raw_meta(REC)), "relation_mask"),
    "logvar shape": (lambda: (_with(raw_tensors(REC), "latent_logvar", torch.zeros(2, 3, 4, 5)),
                              raw_meta(REC)), "latent_logvar"),
    "latent rank": (lambda: (_with(raw_tensors(REC), "latent_mean", torch.zeros(3, 4, 6)), raw_meta(REC)),
                    "latent_mean"),
    "text mask length": (lambda: (_with(raw_tensors(REC), "text_mask", torch.ones(2, dtype=torch.bool)),
                                  raw_meta(REC)), "text_mask"),
    "mask above one": (lambda: (_with(raw_tensors(REC), "subject_masks", REC.subject_masks + 0.5),
                                raw_meta(REC)), "subject_masks"),
    "negative mask": (lambda: (_with(raw_tensors(REC), "relation_mask", -REC.relation_mask), raw_meta(REC)),
                      "relation_mask"),
    "NaN latent": (lambda: (_with(raw_tensors(REC), "latent_mean",
                                  REC.latent_mean.index_fill(0, torch.tensor([1]), float("nan"))),
                            raw_meta(REC)), "latent_mean"),
    "inf text": (lambda: (_with(raw_tensors(REC), "text_embeds", REC.text_embeds / 0.0), raw_meta(REC)),
                 "text_embeds"),
    "wrong version": (lambda: (raw_tensors(REC), _with(raw_meta(REC), "format_version", "3")),
                      "format_version"),
    "missing metadata": (lambda: (raw_tensors(REC), _without(raw_meta(REC), "codec_factors")),
                         "codec_factors"),
    "bad codec factors": (lambda: (raw_tensors(REC), _with(raw_meta(REC), "codec_factors", "8,8")),
                          "codec_factors"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_read_clip_names_file_and_field(tmp_path, case):
    build, field = BAD_FILES[case]
    path = _write_raw(tmp_path, *build())
    with pytest.raises(CacheError) as err:
        read_clip(path)
    assert "bad_clip.safetensors" in str(err.value) and field in str(err.value)
    assert "Fix:" in str(err.value)


def test_missing_truncated_and_corrupt_files(tmp_path):
    with pytest.raises(CacheError, match="nowhere.safetensors.*not found"):
        read_clip(tmp_path / "nowhere.safetensors")
    path = write_clip(tmp_path / "clip_a.safetensors", make_record())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 7])
    with pytest.raises(CacheError, match="clip_a.safetensors.*corrupt"):
        read_clip(path)
    path.write_bytes(data[:8] + b"#" * 16 + data[24:])
    with pytest.raises(CacheError, match="clip_a.safetensors.*corrupt"):
        read_clip(path)


def test_cache_folder_and_manifest_errors(tmp_path):
    with pytest.raises(CacheError, match="relvid preprocess"):
        ClipCache(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CacheError, match="manifest.json.*relvid preprocess"):
        ClipCache(tmp_path / "empty")
    cache = ClipCache(tmp_path / "c", create=True)
    cache.manifest_path.write_text("{\"format_version\": 1, \"clips\": [")
    with pytest.raises(CacheError, match="manifest.json.*not valid JSON"):
        ClipCache(tmp_path / "c")
    cache.manifest_path.write_text(json.dumps({"format_version": 1, "config": {}, "clips": {}, "failures": []}))
    with pytest.raises(CacheError, match="manifest.json.*clips"):
        ClipCache(tmp_path / "c")
    cache.manifest_path.write_text(json.dumps({"format_version": 7, "config": {}, "clips": [], "failures": []}))
    with pytest.raises(CacheError, match="manifest.json.*format_version"):
        ClipCache(tmp_path / "c")


def test_reopened_cache_sees_finished_clips_config_and_failures(tmp_path):
    cache = ClipCache(tmp_path, create=True)
    cache.set_config({"codec": "toy", "size": [32, 32]})
    cache.add(make_record(clip_id="b_clip", relation="hugging"))
    cache.add(make_record(clip_id="a_clip", relation="pushing"))
    cache.record_failure("videos/x.mp4", "no person detected")
    cache.record_failure("videos/c_clip.mp4", "decode error")
    cache.add(make_record(clip_id="c_clip", relation="hugging"))  # a retried source that now works

    again = ClipCache(tmp_path)
    assert again.clip_ids() == ["a_clip", "b_clip", "c_clip"]
    assert again.clip_ids("hugging") == ["b_clip", "c_clip"]
    assert again.is_done("a_clip") and not again.is_done("d_clip")
    assert again.manifest["config"] == {"codec": "toy", "size": [32, 32]}
    assert again.manifest["failures"] == [{"source": "videos/x.mp4", "reason": "no person detected"}]
    assert torch.equal(again.read("a_clip").latent_mean, make_record().latent_mean)
    again.path("b_clip").unlink()  # a deleted clip file is redone by the next run
    assert not again.is_done("b_clip")


def test_clip_ids_must_be_file_names(tmp_path):
    cache = ClipCache(tmp_path, create=True)
    with pytest.raises(CacheError, match="not a valid file name"):
        cache.add(make_record(clip_id="../escape"))


def test_validate_reports_every_bad_clip(tmp_path, random_cache):
    cache = random_cache(tmp_path, n_clips=4)
    ids = cache.clip_ids()
    truncated, nan = cache.path(ids[1]), cache.path(ids[3])
    truncated.write_bytes(truncated.read_bytes()[:100])
    rec = cache.read(ids[3])
    tensors = raw_tensors(rec)
    tensors["latent_mean"][0, 0, 0, 0] = float("nan")
    save_file(tensors, str(nan), metadata=rec.meta)
    cache.path(ids[0]).unlink()

    problems = dict(cache.validate())
    assert sorted(problems) == [ids[0], ids[1], ids[3]]
    assert truncated.name in problems[ids[1]] and "corrupt" in problems[ids[1]]
    assert nan.name in problems[ids[3]] and "NaN" in problems[ids[3]]
    assert "not found" in problems[ids[0]]


def test_prompt_embeddings_round_trip(tmp_path):
    cache = ClipCache(tmp_path, create=True)
    prompts = {"A dog is hugging a cat.": (torch.randn(4, 8), torch.ones(4, dtype=torch.bool)),
               "": (torch.randn(1, 8).bfloat16(), torch.ones(1, dtype=torch.uint8))}
    cache.write_prompts(prompts)
    back = ClipCache(tmp_path).read_prompts()
    assert list(back) == list(prompts)
    for text, (embeds, _mask) in prompts.items():
        assert torch.equal(back[text][0], embeds) and back[text][0].dtype == embeds.dtype
        assert back[text][1].dtype == torch.bool and back[text][1].all()


def test_missing_prompts_file_says_how_to_fix(tmp_path):
    with pytest.raises(CacheError, match="prompts.safetensors.*relvid preprocess"):
        ClipCache(tmp_path, create=True).read_prompts()


def test_random_cache_is_valid_and_deterministic(random_cache):
    a = random_cache("a", n_clips=3, seed=5)
    b = random_cache("b", n_clips=3, seed=5)
    assert a.validate() == [] and a.clip_ids() == b.clip_ids()
    lengths = set()
    for clip_id in a.clip_ids():
        ra, rb = a.read(clip_id), b.read(clip_id)
        for name, t in ra.tensors().items():
            assert torch.equal(t, rb.tensors()[name]), name
        assert ra.latent_shape == (4, 3, 8, 8) and ra.text_embeds.shape[1] == 32
        assert torch.equal(ra.relation_mask, ra.subject_masks.amax(0))
        assert ra.subject_masks.flatten(1).sum(1).min() > 0  # both subjects are visible
        lengths.add(ra.text_embeds.shape[0])
    assert set(a.read_prompts()) == {"A dog is shaking hands with a cat.", ""}
    c = random_cache("c", n_clips=3, seed=6)
    assert not torch.equal(c.read(c.clip_ids()[0]).latent_mean, a.read(a.clip_ids()[0]).latent_mean)

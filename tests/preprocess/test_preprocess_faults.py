"""Preprocessing inputs that must be refused with a message that names the file, key and fix: gaps and stray
colours in mask files, a rerun with another clip spec, sizes the codec cannot take, empty prompt files, BOM
captions; and a cache whose mask sheet works from any folder."""

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import save_file

from relvid.cli import main
from relvid.data.cache import CLIP_FORMAT_VERSION, ClipCache
from relvid.errors import UserError
from relvid.preprocess.mask_files import MaskFileError, load_mask_files
from relvid.preprocess.sources import folder_sources, read_captions_csv
from relvid.preprocess.video import ClipSpec, centre_crop
from relvid.toy.codec import ToyCodec
from tests.helpers.faults_preprocess import BLUE, GREEN, RED, write_mask_folder, write_own_videos

SIZE = ["--frames", "13", "--height", "64", "--width", "112"]


@pytest.fixture(scope="module")
def work(tmp_path_factory, mochi):
    """A cache preprocessed from relative paths (--videos videos --out cache) inside ``work/``."""
    work = tmp_path_factory.mktemp("work")
    write_own_videos(work)
    here = os.getcwd()
    os.chdir(work)
    try:
        code = main(["preprocess", "-r", "walking_together", "--videos", "videos", "--mask-source", "files",
                     "--masks", "masks", "--mochi-path", str(mochi), "--out", "cache", "--device", "cpu",
                     "--no-progress", *SIZE])
    finally:
        os.chdir(here)
    assert code == 0
    return work


# Case 3 ------------------------------------------------------------------------------------------

def test_missing_png_in_the_middle_of_a_mask_sequence_is_refused(tmp_path):
    folder = write_mask_folder(tmp_path / "walk", 14, 36, 64, skip=(3,))
    with pytest.raises(MaskFileError, match=r"(?s)walk.*frame 3\b"):
        load_mask_files(folder, list(range(13)), centre_crop(36, 64, 36, 64), (36, 64), 36, 64)


def test_mask_png_with_a_third_colour_is_refused_naming_file_and_colour(tmp_path):
    folder = write_mask_folder(tmp_path / "walk", 6, 36, 64, extra={4: BLUE})
    with pytest.raises(MaskFileError, match=r"(?s)mask4\.png.*\(0, 0, 255\).*--mask-colors"):
        load_mask_files(folder, list(range(6)), centre_crop(36, 64, 36, 64), (36, 64), 36, 64)


def test_explicit_mask_colours_ignore_other_colours(tmp_path):
    folder = write_mask_folder(tmp_path / "walk", 6, 36, 64, extra={4: BLUE})
    masks = load_mask_files(folder, list(range(6)), centre_crop(36, 64, 36, 64), (36, 64), 36, 64,
                            colours=[RED, GREEN])
    assert masks[:, 4, 9:27, 26:38].max() == 0  # the blue blob is neither subject
    assert masks[0, 4, 5:31, 4:21].min() == 1 and masks[1, 4, 5:31, 43:60].min() == 1


# Case 4 ------------------------------------------------------------------------------------------

def test_rerun_with_another_clip_spec_is_refused_naming_manifest_and_both_specs(work, mochi, capsys):
    manifest = work / "cache" / "manifest.json"
    before = manifest.read_text()
    code = main(["preprocess", "-r", "walking_together", "--videos", str(work / "videos"), "--mask-source", "files",
                 "--masks", str(work / "masks"), "--mochi-path", str(mochi), "--out", str(work / "cache"),
                 "--device", "cpu", "--no-progress", "--frames", "13", "--height", "48", "--width", "112"])
    err = capsys.readouterr().err
    assert code == 2
    assert str(manifest) in err and "64" in err and "48" in err and "--out" in err
    assert manifest.read_text() == before


# Case 8 ------------------------------------------------------------------------------------------

def test_mask_sheet_finds_relative_sources_from_another_folder(work, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    record = ClipCache(work / "cache").read("walk")
    assert Path(record.meta["source"]).is_absolute()
    assert main(["mask-sheet", str(work / "cache"), "--out", str(tmp_path / "s.png")]) == 0
    assert np.asarray(Image.open(tmp_path / "s.png")).shape[1] == 4 * 112


def test_mask_sheet_names_a_missing_source_video(work, tmp_path, capsys):
    cache = ClipCache(work / "cache")
    rec = cache.read("walk")
    copy = tmp_path / "cache"
    copy.mkdir()
    (copy / "manifest.json").write_text(cache.manifest_path.read_text())
    meta = {"format_version": str(CLIP_FORMAT_VERSION), **rec.meta, "source": "videos/gone.mp4"}
    save_file({k: v.clone() for k, v in rec.tensors().items()}, str(copy / "walk.safetensors"), metadata=meta)
    assert main(["mask-sheet", str(copy)]) == 2
    err = capsys.readouterr().err
    assert "gone.mp4" in err and "walk" in err


# Case 9 ------------------------------------------------------------------------------------------

def test_height_not_a_multiple_of_16_for_mochi_fails_before_work_naming_the_key(work, mochi, tmp_path, capsys):
    out = tmp_path / "c"
    code = main(["preprocess", "-r", "walking_together", "--videos", str(work / "videos"), "--mask-source", "files",
                 "--masks", str(work / "masks"), "--mochi-path", str(mochi), "--out", str(out), "--device", "cpu",
                 "--no-progress", "--frames", "13", "--height", "40", "--width", "112"])
    err = capsys.readouterr().err
    assert code == 2 and "--height" in err and "preprocess.height" in err and "48" in err
    assert not out.exists()


def test_clip_size_rule_comes_from_the_codec_factors():
    from relvid.preprocess.pipeline import check_clip_size

    toy = ToyCodec()  # space factor 2, patch 2: multiples of 4
    check_clip_size(toy, ClipSpec(frames=7, height=36, width=44))
    with pytest.raises(UserError, match=r"--width.*preprocess\.width.*multiple of 4.*44"):
        check_clip_size(toy, ClipSpec(frames=7, height=36, width=42))


# Case 7 ------------------------------------------------------------------------------------------

def test_captions_csv_with_a_utf8_bom_is_read(tmp_path):
    csv_path = tmp_path / "caps.csv"
    csv_path.write_bytes("video,caption\nwalk.mp4,A person walks.\n".encode("utf-8-sig"))
    assert read_captions_csv(csv_path) == {"walk.mp4": "A person walks."}
    videos, _ = write_own_videos(tmp_path, frames=7, h=32, w=32)
    (videos / "walk.txt").unlink()
    assert folder_sources(videos, csv_path)[0].caption == "A person walks."


def test_empty_prompts_file_says_it_is_empty(tmp_path):
    from relvid.prompts import read_prompts_file

    empty = tmp_path / "prompts.txt"
    empty.write_text("\n  \n")
    with pytest.raises(UserError, match=r"prompts\.txt.*empty"):
        read_prompts_file(empty)
    with pytest.raises(UserError, match="not found"):
        read_prompts_file(tmp_path / "nothing.txt")
    (tmp_path / "two.txt").write_text("A dog hugs a cat.\n\nA cat hugs a dog.\n")
    assert read_prompts_file(tmp_path / "two.txt") == ["A dog hugs a cat.", "A cat hugs a dog."]



def test_empty_eval_prompts_table_says_it_is_empty():
    from relvid.prompts import PromptFileError, parse_eval_prompts

    with pytest.raises(PromptFileError, match="eval_prompts.tsv is empty"):
        parse_eval_prompts("")
    with pytest.raises(PromptFileError, match="no prompts"):
        parse_eval_prompts("relation\tindex\tprompt\n")

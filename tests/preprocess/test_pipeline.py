"""`relvid preprocess` end to end: real videos and skeletons, tiny VAE and T5, a cache that trains."""

import os

import numpy as np
import pytest
import torch
from PIL import Image

from relvid.cli import main
from relvid.data.cache import ClipCache
from relvid.preprocess.pipeline import relation_name
from relvid.prompts import eval_prompts
from tests.helpers.preprocess import (
    standing_body,
    two_people_frames,
    write_skeleton,
    write_video,
)

SIZE = ["--frames", "13", "--height", "64", "--width", "112"]  # latent (4, 3, 8, 14) with the tiny VAE
GOOD = ["S001C001P001R001A058", "S001C002P002R001A058", "S002C001P003R002A058"]


def noise_video(path, frames=14, h=108, w=192, seed=0):
    return write_video(path, np.random.default_rng(seed).integers(0, 255, (frames, h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def ntu(tmp_path_factory):
    """A small NTU tree (downscaled 192x108 videos): 3 good handshakes and 3 that must fail, plus another action."""
    root = tmp_path_factory.mktemp("ntu")
    for i, name in enumerate(GOOD + ["S003C001P001R001A058", "S003C002P001R001A058", "S003C003P001R001A058",
                                     "S001C001P001R001A050"]):
        noise_video(root / "nturgb+d_rgb" / f"{name}_rgb.avi", frames=8 if name == "S003C002P001R001A058" else 14,
                    seed=i)
    for name in GOOD + ["S003C002P001R001A058", "S001C001P001R001A050"]:
        write_skeleton(root / "skeletons" / f"{name}.skeleton", two_people_frames(14))
    write_skeleton(root / "skeletons" / "S003C003P001R001A058.skeleton", [[(5, standing_body(700))]] * 14)
    return root  # S003C001: no skeleton; S003C002: too short; S003C003: one body


@pytest.fixture(scope="module")
def cache(ntu, mochi, tmp_path_factory):
    out = tmp_path_factory.mktemp("cache") / "handshake"
    code = main(["preprocess", "--relation", "handshake", "--ntu-root", str(ntu), "--mochi-path", str(mochi),
                 "--out", str(out), "--clips", "0", "--device", "cpu", "--no-progress", "--prompt", "a cat hugs a dog",
                 *SIZE])
    assert code == 0
    return out


def test_ntu_clips_are_cached_with_latents_masks_and_embeddings(cache):
    c = ClipCache(cache)
    assert c.clip_ids("shaking_hands") == GOOD and c.validate() == []
    record = c.read(GOOD[0])
    assert record.latent_mean.shape == record.latent_logvar.shape == (4, 3, 8, 14)
    assert record.latent_mean.dtype == torch.bfloat16
    assert record.subject_masks.shape == (2, 3, 8, 14)
    assert 0 < record.subject_masks.mean() < 0.6
    assert record.text_embeds.shape[1] == 32 and record.text_mask.all()
    meta = record.meta
    assert (meta["codec"], meta["codec_factors"]) == ("mochi-vae", "6,8,8")
    assert (meta["text_encoder"], meta["fps"]) == ("t5", "30")
    assert (meta["caption"], meta["frame_range"], meta["mask_source"]) == ("A person is shaking hands with a person.",
                                                                           "0-12", "skeleton")
    # subject 1 is the left person throughout: its mask mass lies left of subject 2's
    xs = torch.arange(14).float()
    for f in range(3):
        centre = [(record.subject_masks[k, f].sum(0) * xs).sum() / record.subject_masks[k, f].sum() for k in (0, 1)]
        assert centre[0] < centre[1]
    prompts = c.read_prompts()
    assert set(eval_prompts("handshake")) | {"", "a cat hugs a dog"} == set(prompts)


def test_failures_are_listed_with_reasons_and_do_not_stop_the_others(cache):
    failures = {os.path.basename(f["source"]): f["reason"] for f in ClipCache(cache).manifest["failures"]}
    assert set(failures) == {"S003C001P001R001A058_rgb.avi", "S003C002P001R001A058_rgb.avi",
                             "S003C003P001R001A058_rgb.avi"}
    assert "no skeleton file" in failures["S003C001P001R001A058_rgb.avi"]
    assert "too short" in failures["S003C002P001R001A058_rgb.avi"]
    assert "1 body" in failures["S003C003P001R001A058_rgb.avi"]


def test_rerun_skips_finished_clips_and_dry_run_lists_them(cache, ntu, mochi, capsys):
    before = {p.name: p.stat().st_mtime_ns for p in cache.glob("*.safetensors")}
    args = ["preprocess", "-r", "shaking_hands", "--ntu-root", str(ntu), "--mochi-path", str(mochi), "--out",
            str(cache),
            "--clips", "0", "--device", "cpu", "--no-progress", *SIZE]
    assert main(args + ["--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.count("cached ") == 3 and out.count("todo ") == 3 and "skeleton=MISSING" in out
    assert main(args) == 0
    assert "0 clips written, 3 already cached, 3 failed" in capsys.readouterr().out
    after = {p.name: p.stat().st_mtime_ns for p in cache.glob("*.safetensors") if p.name != "prompts.safetensors"}
    assert all(after[k] == before[k] for k in after)


def test_seeded_choice_and_filters(ntu, tmp_path, capsys):
    args = ["preprocess", "-r", "A058", "--ntu-root", str(ntu), "--out", str(tmp_path / "c"), "--dry-run"]
    assert main(args + ["--clips", "2", "--seed", "3"]) == 0
    first = capsys.readouterr().out
    assert main(args + ["--clips", "2", "--seed", "3"]) == 0
    assert capsys.readouterr().out == first and "2 sources" in first
    assert main(args + ["--setups", "1-2", "--cameras", "1"]) == 0
    listed = capsys.readouterr().out
    assert "S001C001P001R001A058" in listed and "S002C001P003R002A058" in listed and "C002" not in listed
    assert not (tmp_path / "c").exists()


def test_the_cache_trains(cache, tmp_path):
    from relvid.config import load_config
    from relvid.training.run import run

    cfg = load_config([], [
        "relation=shaking_hands", "model.preset=tiny", "model.gradient_checkpointing=false", "lora.rank=4",
        "lora.alpha=4", "rcl.n_pos=2", "rcl.n_neg=4", "rcl.bank_size=8", "data.num_workers=0",
        "optim.warmup_steps=0", "trainer.accelerator=cpu", "trainer.devices=1", "trainer.max_steps=2",
        "trainer.checkpoint_every=100", "trainer.progress_bar=false", f"output_dir={tmp_path / 'run'}",
        f"data.cache_dir={cache}",
    ])
    out = run(cfg)
    assert (out / "adapters" / "relvid_adapters.safetensors").is_file()


def test_mask_sheet_of_a_cached_clip(cache, tmp_path):
    assert main(["mask-sheet", str(cache), "--clip", GOOD[1], "--out", str(tmp_path / "s.png"), "--mp4"]) == 0
    sheet = np.asarray(Image.open(tmp_path / "s.png"))
    assert sheet.shape[0] > 64 and sheet.shape[1] == 4 * 112
    assert (tmp_path / "s.mp4").stat().st_size > 0


def test_own_videos_with_txt_and_csv_captions_and_png_masks(mochi, tmp_path):
    """Mask latent frame i comes from video frames 6(i-1)+1 .. 6i: a subject drawn in one frame only shows there."""
    videos, masks = tmp_path / "videos", tmp_path / "masks"
    for k, stem in enumerate(["dance 1", "dance2"]):
        noise_video(videos / f"{stem}.mp4", frames=13, h=64, w=112, seed=k)
        folder = masks / stem
        folder.mkdir(parents=True)
        for t in range(13):
            m = np.zeros((64, 112, 3), np.uint8)
            m[8:56, 60:100] = (0, 0, 255)  # subject 2 (blue) in every frame
            if t == 8:  # subject 1 (red) only in frame 8 -> latent frame 2 (frames 7..12), a sixth of it
                m[8:56, 8:40] = (255, 0, 0)
            Image.fromarray(m).save(folder / f"mask{t}.png")
    (videos / "dance 1.txt").write_text("Two people are dancing together.\n")
    (tmp_path / "caps.csv").write_text("video,caption\ndance2.mp4,A person twirls a person.\n")
    out = tmp_path / "cache"
    assert main(["preprocess", "-r", "twirling", "--videos", str(videos), "--captions-csv", str(tmp_path / "caps.csv"),
                 "--mask-source", "files", "--masks", str(masks), "--mochi-path", str(mochi), "--out", str(out),
                 "--device", "cpu", "--no-progress", "--latent-dtype", "fp32", *SIZE]) == 0
    c = ClipCache(out)
    assert c.clip_ids("twirling") == ["dance2", "dance_1"]
    record = c.read("dance_1")
    assert record.meta["caption"] == "Two people are dancing together."
    assert c.read("dance2").meta["caption"] == "A person twirls a person."
    s1 = record.subject_masks[0]  # (3, 8, 14)
    assert s1[0].max() == 0 and s1[1].max() == 0
    assert s1[2, 1:7, 1:5].min() == pytest.approx(1 / 6) and s1[2].max() == pytest.approx(1 / 6)
    assert record.subject_masks[1, :, 1:7, 8:12].min() == 1.0
    assert set(c.read_prompts()) == {""}  # a custom relation has no evaluation prompts


def test_user_errors_are_one_line_exit_2(mochi, ntu, tmp_path, capsys):
    videos = tmp_path / "videos"
    noise_video(videos / "a.mp4", frames=13, h=64, w=112)
    base = ["preprocess", "-r", "hug", "--out", str(tmp_path / "c"), "--no-progress", *SIZE]
    assert main(base + ["--videos", str(videos), "--mask-source", "grounded-sam", "--dry-run"]) == 2
    assert "no caption for a.mp4" in capsys.readouterr().err
    assert main(base + ["--videos", str(videos), "--mask-source", "files"]) == 2
    assert "--masks" in capsys.readouterr().err
    assert main(base + ["--ntu-root", str(ntu), "--dry-run"]) == 2
    assert "no A055 (hugging) videos" in capsys.readouterr().err  # hugging is A055: not in the tree
    handshake = ["preprocess", "-r", "handshake", "--ntu-root", str(ntu), "--out", str(tmp_path / "c"), *SIZE]
    assert main(handshake + ["--mochi-path", str(tmp_path / "nowhere"), "--device", "cpu"]) == 2
    assert "genmo/mochi-1-preview" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()  # nothing written before the models load
    assert main(["preprocess", "-r", "nonsense", "--ntu-root", str(ntu), "--dry-run"]) == 2
    assert "unknown relation" in capsys.readouterr().err
    assert relation_name("High five") == "high_five" and relation_name("handshake") == "shaking_hands"
    with pytest.raises(ValueError, match="relation name"):
        relation_name("high/five")

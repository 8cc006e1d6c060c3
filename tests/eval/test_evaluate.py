"""`relvid evaluate` end to end on the toy pair + tiny models: sharding, resume, every metric, the table."""

import json

import pytest
import torch

from relvid.cli import main
from relvid.inference.render import VideoJob
from relvid.video_io import write_mp4
from tests.helpers.configs import TINY
from tests.helpers.tiny_models import tiny_clip_folder, tiny_i3d_file

PROMPTS = ["A cat is hugging a dog on a cozy sofa.", "A panda is hugging a koala in a green forest.",
           "A robot is hugging a plush rabbit in a bedroom."]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    root = tmp_path_factory.mktemp("weights")
    for i in range(3):
        video = torch.randint(0, 256, (8, 16, 16, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(i))
        write_mp4(root / "reference" / f"ref{i}.mp4", video)
    return {"clip": tiny_clip_folder(root / "clip"), "i3d": tiny_i3d_file(root / "i3d.pt"),
            "reference": root / "reference"}


def evaluate(out, weights, url, *extra):
    args = ["evaluate", "--relation", "hug", "--out", str(out), "--judge", "api", "--judge-url", url,
            "--judge-model", "tiny-judge", "--judge-rpm", "60000", "--repeats", "2",
            "--clip-path", str(weights["clip"]),
            "--i3d-path", str(weights["i3d"]), "--reference-videos", str(weights["reference"]), "--fvd-frames", "4",
            *[a for p in PROMPTS for a in ("--prompt", p)], *TINY, *extra]
    return main(args)


def test_sharded_resumable_evaluation_and_results_table(tmp_path, weights, monkeypatch, trained_adapters, chat_server):
    adapters, _, _ = trained_adapters
    out = tmp_path / "eval"
    videos = out / "DreamRelation" / "videos"
    answers = [("answer", a) for a in ["Yes", "no", "yes.", "Maybe.", "YES", "No."]]
    with chat_server(answers + [("answer", "yes")] * 12) as server:
        # rank 1 of 2 renders prompts 1 (its share) and stops: no metrics off rank zero
        monkeypatch.setenv("RANK", "1")
        monkeypatch.setenv("WORLD_SIZE", "2")
        assert evaluate(out, weights, server.url, "--adapters", str(adapters), "--method", "DreamRelation") == 0
        assert sorted(p.name[:7] for p in videos.glob("*.mp4")) == ["p001_s0"]
        assert not (out / "results.md").exists() and not server.requests
        first = {p.name: p.stat().st_mtime_ns for p in videos.glob("*")}

        # rank 0 renders prompts 0 and 2 (an "interrupted" half-written one is redone), then measures all three
        monkeypatch.setenv("RANK", "0")
        write_mp4(videos / f"{VideoJob(0, PROMPTS[0], 0).stem}.mp4", torch.zeros(7, 16, 16, 3, dtype=torch.uint8))
        assert evaluate(out, weights, server.url, "--adapters", str(adapters), "--method", "DreamRelation") == 0
        assert sorted(p.name[:7] for p in videos.glob("*.mp4")) == ["p000_s0", "p001_s0", "p002_s0"]
        assert all(p.stat().st_mtime_ns == first[p.name] for p in videos.glob("p001*"))  # rank 1's video kept
        from relvid.video_io import read_video

        assert read_video(next(videos.glob("p000*.mp4"))).float().std() > 1  # the half-written one was redone
        assert len(server.requests) == 6  # 3 videos x 2 repeats

        # a rerun (single process) regenerates nothing and asks the judge nothing: answers are cached
        monkeypatch.delenv("RANK")
        monkeypatch.delenv("WORLD_SIZE")
        stamps = {p.name: p.stat().st_mtime_ns for p in videos.glob("*.mp4")}
        assert evaluate(out, weights, server.url, "--adapters", str(adapters), "--method", "DreamRelation") == 0
        assert {p.name: p.stat().st_mtime_ns for p in videos.glob("*.mp4")} == stamps
        assert len(server.requests) == 6

        # the base model row in the same table
        assert evaluate(out, weights, server.url, "--base") == 0

    metrics = json.loads((out / "DreamRelation" / "metrics.json").read_text())
    ra = metrics["relation_accuracy"]
    # answers in order video0: Yes, no ; video1: yes., Maybe. ; video2: YES, No.
    assert ra["per_repeat"] == [1.0, 0.0] and ra["unparseable"] == 1
    assert "human-like hugging interactions" in ra["question"]
    assert len(server.requests[0]["body"]["messages"][0]["content"]) == 6  # 5 keyframes + the question
    results = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in results["rows"]] == ["DreamRelation", "Mochi"]
    row = results["rows"][0]
    assert row["relation_accuracy"] == {"mean": 0.5, "std": 0.5} and row["unparseable"] == 1
    assert -1 <= row["clip_t"] <= 1 and 0 < row["temporal_consistency"] <= 1 and row["fvd"] > 0
    md = (out / "results.md").read_text()
    assert "| DreamRelation | 0.5000 ± 0.5000 |" in md and "| Mochi |" in md


def test_settings_mismatch_is_refused(tmp_path, weights, chat_server, capsys):
    with chat_server([]) as server:
        assert evaluate(tmp_path / "eval", weights, server.url, "--judge", "none", "--base") == 0
        videos = sorted((tmp_path / "eval").rglob("*.mp4"))
        before = [v.read_bytes() for v in videos]
        capsys.readouterr()
        assert evaluate(tmp_path / "eval", weights, server.url, "--judge", "none", "--base", "--steps", "3") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("relvid evaluate: error: ")
    assert "num_steps" in err[0] and "--method" in err[0]  # the key that differs and the way out
    assert [v.read_bytes() for v in videos] == before  # the old videos stay as they were


def test_existing_videos_folder(tmp_path, weights, capsys):
    folder = tmp_path / "videos"
    for i, prompt in enumerate(PROMPTS[:2]):
        video = torch.randint(0, 256, (9, 16, 16, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(i))
        write_mp4(folder / f"v{i}.mp4", video)
        (folder / f"v{i}.json").write_text(json.dumps({"prompt": prompt}))
    assert main(["evaluate", "--relation", "hug", "--videos", str(folder), "--out", str(tmp_path / "out"),
                 "--clip-path", str(weights["clip"]), "--method", "ReVersion"]) == 0
    row = json.loads((tmp_path / "out" / "results.json").read_text())["rows"][0]
    assert row["method"] == "ReVersion" and "clip_t" in row and "relation_accuracy" not in row
    skipped = json.loads((tmp_path / "out" / "ReVersion" / "metrics.json").read_text())["skipped"]
    assert set(skipped) == {"relation_accuracy", "fvd"}
    (folder / "v1.json").unlink()
    assert main(["evaluate", "--relation", "hug", "--videos", str(folder), "--out", str(tmp_path / "out")]) == 2
    assert "v1.json missing" in capsys.readouterr().err


def render_only(out, *extra):
    """`relvid evaluate` with no metric: renders (or reuses) the test videos, then the table."""
    return main(["evaluate", "--relation", "hug", "--out", str(out), "--judge", "none", "--prompt", PROMPTS[0],
                 *TINY, *extra])


def test_evaluate_with_other_adapters_into_the_same_method_is_refused(tmp_path, trained_adapters, capsys):
    from relvid.models.adapter_file import save_adapters
    from relvid.models.lora import lora_parameters

    adapters, model, spec = trained_adapters
    with torch.no_grad():
        for p in lora_parameters(model).values():
            p.mul_(2.0)
    other = save_adapters(tmp_path / "other" / "adapters" / "relvid_adapters.safetensors", model, spec)
    out = tmp_path / "eval"
    assert render_only(out, "--adapters", str(adapters), "--method", "DreamRelation") == 0
    videos = out / "DreamRelation" / "videos"
    stamps = {p.name: p.stat().st_mtime_ns for p in videos.glob("*")}
    capsys.readouterr()
    assert render_only(out, "--adapters", str(other), "--method", "DreamRelation") == 2
    err = capsys.readouterr().err
    assert str(videos) in err and "adapters_sha256=" in err and "--method" in err and "--out" in err
    assert {p.name: p.stat().st_mtime_ns for p in videos.glob("*")} == stamps  # the old videos are untouched
    assert render_only(out, "--adapters", str(other), "--method", "DreamRelation2x") == 0  # another row is fine
    assert render_only(out, "--adapters", str(adapters), "--method", "DreamRelation") == 0  # and so is a rerun
    assert {p.name: p.stat().st_mtime_ns for p in videos.glob("*")} == stamps


def test_evaluate_with_other_base_weights_is_refused(tmp_path, capsys):
    from relvid.models.backbone import tiny_transformer
    from tests.helpers.configs import TOY_CHANNELS

    for name, seed in (("weights_a", 0), ("weights_b", 1)):
        tiny_transformer(seed=seed, in_channels=TOY_CHANNELS).save_pretrained(tmp_path / name / "transformer")
    out = tmp_path / "eval"
    for name, code in (("weights_a", 0), ("weights_a", 0), ("weights_b", 2)):
        assert render_only(out, "--base", "--set", "model.preset=mochi", "--model-path", str(tmp_path / name)) == code
    assert "base_weights=" in capsys.readouterr().err
    side = json.loads(next((out / "Mochi" / "videos").glob("*.json")).read_text())
    assert side["base_weights"].startswith("sha256:") and side["prompt"] == PROMPTS[0]


def test_videos_sidecar_without_prompt_is_refused_naming_the_file(tmp_path, weights, capsys):
    folder = tmp_path / "videos"
    video = torch.randint(0, 256, (9, 16, 16, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    write_mp4(folder / "v0.mp4", video)
    (folder / "v0.json").write_text(json.dumps({"seed": 0}))
    assert main(["evaluate", "--relation", "hug", "--videos", str(folder), "--out", str(tmp_path / "out"),
                 "--clip-path", str(weights["clip"]), "--judge", "none"]) == 2
    err = capsys.readouterr().err
    assert str(folder / "v0.json") in err and "'prompt'" in err


def test_videos_too_short_to_score_are_named(tmp_path, weights, capsys):
    folder = tmp_path / "videos"
    for i, frames in enumerate((9, 3)):
        write_mp4(folder / f"v{i}.mp4", torch.zeros(frames, 16, 16, 3, dtype=torch.uint8))
        (folder / f"v{i}.json").write_text(json.dumps({"prompt": PROMPTS[i]}))
    assert main(["evaluate", "--relation", "hug", "--videos", str(folder), "--out", str(tmp_path / "out"),
                 "--clip-path", str(weights["clip"])]) == 2
    err = capsys.readouterr().err.strip()
    assert "v1.mp4 (3 frames)" in err and "v0.mp4" not in err and ">= 5 frames" in err

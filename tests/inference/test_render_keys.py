"""`relvid sample` reruns into one folder: a video is reused only when its sidecar matches the full
prompt, seed, settings, adapters and base weights; anything else is written beside it or refused."""

import json

from relvid.cli import main
from relvid.models.backbone import tiny_transformer
from tests.helpers.configs import TINY, TOY_CHANNELS

# two prompts that share their first 48 slug characters
LONG_A = "A dog is shaking hands with a cat in a sunny garden full of roses."
LONG_B = "A dog is shaking hands with a cat in a sunny garden full of tulips."


def _sample(out, prompt, *extra):
    return main(["sample", "--prompt", prompt, "--out", str(out), "--base", *TINY, *extra])


def _sidecars(out):
    return {p.name: json.loads(p.read_text()) for p in sorted(out.glob("*.json"))}


def test_sample_prompts_sharing_their_first_48_characters_get_their_own_videos(tmp_path):
    out = tmp_path / "out"
    assert _sample(out, LONG_A) == 0
    assert _sample(out, LONG_B) == 0  # the same index, seed and slug prefix: must not reuse LONG_A's video
    videos = sorted(out.glob("*.mp4"))
    assert len(videos) == 2
    assert sorted(side["prompt"] for side in _sidecars(out).values()) == sorted([LONG_A, LONG_B])
    assert all(v.with_suffix(".json").is_file() for v in videos)


def test_sample_rerun_refuses_a_sidecar_with_another_prompt(tmp_path, capsys):
    out = tmp_path / "out"
    assert _sample(out, LONG_A) == 0
    side = next(out.glob("*.json"))
    meta = json.loads(side.read_text())
    side.write_text(json.dumps({**meta, "prompt": LONG_B}))
    capsys.readouterr()
    assert _sample(out, LONG_A) == 2
    err = capsys.readouterr().err
    assert str(out) in err and "prompt=" in err and LONG_B in err and "--out" in err


def test_sample_rerun_reuses_matching_videos(tmp_path):
    out = tmp_path / "out"
    assert _sample(out, LONG_A) == 0
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*.mp4")}
    assert _sample(out, LONG_A) == 0
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.mp4")} == stamps


def test_sample_with_other_base_weights_is_refused(tmp_path, capsys):
    for name, seed in (("weights_a", 0), ("weights_b", 1)):
        tiny_transformer(seed=seed, in_channels=TOY_CHANNELS).save_pretrained(tmp_path / name / "transformer")
    out = tmp_path / "out"
    folder = ["--set", "model.preset=mochi", "--model-path"]
    assert _sample(out, LONG_A, *folder, str(tmp_path / "weights_a")) == 0
    assert _sample(out, LONG_A, *folder, str(tmp_path / "weights_a")) == 0  # the same folder: reused
    capsys.readouterr()
    assert _sample(out, LONG_A, *folder, str(tmp_path / "weights_b")) == 2
    err = capsys.readouterr().err
    assert "base_weights=" in err and str(out) in err
    assert _sidecars(out).popitem()[1]["base_weights"].startswith("sha256:")
    # the tiny preset is keyed by its config and init seed
    tiny_out = tmp_path / "tiny"
    assert _sample(tiny_out, LONG_A) == 0
    assert _sample(tiny_out, LONG_A, "--set", "model.tiny.seed=5") == 2
    assert "base_weights=" in capsys.readouterr().err

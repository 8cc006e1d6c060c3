"""`relvid demo` reuses a finished run only when it would train exactly that run again."""

import dataclasses
import json

import pytest

from relvid.errors import UserError
from relvid.toy.drivers.demo import run_demo
from relvid.toy.drivers.evaluate import TOY_SAMPLING
from tests.helpers.tiny_models import tiny_toy_base

FAST = ["trainer.max_steps=1", "data.batch_size=1", "optim.warmup_steps=1"]


@pytest.fixture(scope="module")
def finished_demo(tmp_path_factory):
    """A demo run on a tiny base (1 step, 1 prompt): (out folder, base folder, adapter file mtimes)."""
    tmp = tmp_path_factory.mktemp("demo")
    base = tmp / "base"
    tiny_toy_base(base)
    out = tmp / "demo"
    run_demo(out, relation="orbiting", n_prompts=1, base_dir=base, progress=False, overrides=FAST,
             settings=dataclasses.replace(TOY_SAMPLING, num_steps=2))
    return out, base


def _again(out, base, relation="orbiting", seed=0, overrides=FAST, base_dir=None, progress=False):
    return run_demo(out, relation=relation, n_prompts=1, seed=seed, base_dir=base_dir or base, progress=progress,
                    overrides=list(overrides), settings=dataclasses.replace(TOY_SAMPLING, num_steps=2))


@pytest.mark.parametrize("change,key,old,new,delete", [
    ({"overrides": ["trainer.max_steps=2", *FAST[1:]]}, "trainer.max_steps", "1", "2", "runs"),
    ({"relation": "pushing"}, "relation", "orbiting", "pushing", ""),  # the cache and results go too
    ({"seed": 1}, "seed", "0", "1", ""),
], ids=["max_steps", "relation", "seed"])
def test_demo_refuses_a_finished_run_made_with_other_settings(finished_demo, change, key, old, new, delete):
    out, base = finished_demo
    adapters = out / "runs" / "dreamrelation" / "adapters" / "relvid_adapters.safetensors"
    before = adapters.stat().st_mtime_ns
    with pytest.raises(UserError) as err:
        _again(out, base, **change)
    message = str(err.value)
    assert str(out / "runs") in message and key in message and old in message and new in message
    assert "--out" in message and "OUT=" in message and message.endswith(f"delete {out / delete}")
    assert adapters.stat().st_mtime_ns == before  # nothing retrained, nothing replaced
    assert json.loads((out / "demo.json").read_text())["relation"] == "orbiting"


def test_demo_refuses_a_finished_run_of_another_base(finished_demo, tmp_path):
    out, base = finished_demo
    other = tmp_path / "other_base"
    tiny_toy_base(other)
    with pytest.raises(UserError, match=r"runs.*model\.path.*other_base.*--out"):
        _again(out, base, base_dir=other)


def test_demo_reuses_identical_work_whatever_the_progress_bars(finished_demo, capsys):
    out, base = finished_demo
    adapters = out / "runs" / "direct_lora" / "adapters" / "relvid_adapters.safetensors"
    before = adapters.stat().st_mtime_ns
    _again(out, base, progress=True)
    assert "direct_lora: reusing" in capsys.readouterr().out
    assert adapters.stat().st_mtime_ns == before


def test_demo_refuses_a_cache_and_videos_of_another_relation(tmp_path):
    from relvid.toy.drivers.datasets import build_exemplar_cache

    build_exemplar_cache(tmp_path / "demo" / "cache", ["orbiting"], clips=1, progress=False)
    with pytest.raises(UserError, match=r"cache.*relations.*orbiting.*pushing.*--out.*delete"):
        _again(tmp_path / "demo", tmp_path / "no_base_needed", relation="pushing")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "demo.json").write_text(json.dumps({"relation": "orbiting", "seed": 0}))
    with pytest.raises(UserError, match=r"demo\.json.*relation.*orbiting.*pushing.*--out.*delete"):
        _again(tmp_path / "other", tmp_path / "no_base_needed", relation="pushing")


def test_a_bad_prompt_count_fails_before_any_training(tmp_path, capsys):
    from relvid.cli import main

    assert main(["demo", "--out", str(tmp_path / "demo"), "--prompts", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("relvid demo: error: --prompts must be in 1..") and not (tmp_path / "demo").exists()

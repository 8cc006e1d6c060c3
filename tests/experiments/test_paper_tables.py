"""experiments/paper/run.py: every table row's config loads, rows with equal configs share a run, and
Table 4 runs end to end on tiny models (train, sample, evaluate with the API judge against a loopback
server, tiny CLIP and I3D), resumably, into a table of the paper's shape."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from relvid.config import load_config
from relvid.video_io import write_mp4
from tests.helpers.configs import TOY_CHANNELS
from tests.helpers.tiny_models import tiny_clip_folder, tiny_i3d_file

REPO = Path(__file__).resolve().parents[2]
PROMPTS = ["A dog is shaking hands with a cat.", "A robot is shaking hands with a bear."]  # FVD needs two


@pytest.fixture(scope="module")
def paper():
    spec = importlib.util.spec_from_file_location("paper_run", REPO / "experiments" / "paper" / "run.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_every_row_of_tables_1_to_7_has_a_config_and_equal_rows_share_a_run(paper):
    assert sorted(paper.TABLES) == ["1", "2", "3", "4", "5", "6", "7"]
    names = paper.run_names()  # every row's config loaded and checked as `relvid train` checks it
    assert {r.config for _, rows in paper.TABLES.values() for r in rows if r.config} == set(names)
    # DreamRelation's own settings appear in Tables 1, 2, 3 (QK/V), 5, 6 and 7: one run
    shared = {names[c] for c in ("table1/dreamrelation.yaml", "table3/qk_v.yaml", "table5/lambda_1_0_01.yaml",
                                 "table6/lambda_m_50.yaml", "table7/n_pos_4_n_neg_10.yaml")}
    assert shared == {"dreamrelation"}
    assert names["table4/motion_inversion.yaml"] == names["table1/motion_inversion.yaml"] == "motion_inversion"
    cfg = load_config([paper.TRAIN_BASE, paper.HERE / "table4/motion_inversion_rcl.yaml"])
    assert cfg.method == "motion_inversion" and cfg.rcl.enabled and cfg.trainer.max_steps == 3000
    assert (cfg.optim.lr, cfg.optim.weight_decay) == (2e-4, 0.01)
    assert len({names[r.config] for _, rows in paper.TABLES.values() for r in rows if r.config}) == 22


def test_table_4_end_to_end_on_tiny_models(paper, tmp_path, random_cache, chat_server):
    random_cache("cache/shaking_hands", n_clips=3, relation="shaking_hands", latent_shape=(TOY_CHANNELS, 3, 8, 8),
                 seed=1)
    for i in range(3):
        video = torch.randint(0, 256, (8, 16, 16, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(i))
        write_mp4(tmp_path / "reference" / f"ref{i}.mp4", video)
    model = ["model.preset=tiny", "model.codec=toy", "model.text_encoder=toy", f"model.tiny.in_channels={TOY_CHANNELS}"]
    train = ["model.gradient_checkpointing=false", "trainer.max_steps=1", "trainer.accelerator=cpu",
             "trainer.devices=1", "trainer.progress_bar=false", "trainer.checkpoint_every=100", "data.num_workers=0",
             "optim.warmup_steps=1", "rcl.n_pos=2", "rcl.n_neg=4", "rcl.bank_size=8"]
    out = tmp_path / "paper"
    with chat_server([("answer", "yes"), ("answer", "no")] * 8) as server:
        evaluate = ["--device", "cpu", "--steps", "2", "--guidance", "1", "--frames", "7", "--height", "16",
                    "--width", "16",
                    "--judge", "api", "--judge-url", server.url, "--judge-model", "tiny-judge", "--judge-rpm", "60000",
                    "--repeats", "1", "--clip-path", str(tiny_clip_folder(tmp_path / "clip")),
                    "--i3d-path", str(tiny_i3d_file(tmp_path / "i3d.pt")), "--reference-videos",
                    str(tmp_path / "reference"), "--fvd-frames", "4", *[a for p in PROMPTS for a in ("--prompt", p)]]
        argv = ["--tables", "4", "--relations", "handshake", "--cache", str(tmp_path / "cache" / "{relation}"),
                "--out", str(out), *[a for s in model for a in ("--set", s)],
                *[a for s in train for a in ("--train-set", s)], "--", *evaluate]
        assert paper.main(argv) == 0
        served = len(server.requests)
        assert paper.main(argv) == 0  # everything done: nothing trained, sampled or judged again
        assert len(server.requests) == served
    for run in ("motion_inversion", "motion_inversion_rcl"):
        saved = (out / "runs" / "shaking_hands" / run / "config.yaml").read_text()
        assert "method: motion_inversion" in saved and "max_steps: 1" in saved
        assert (out / "runs" / "shaking_hands" / run / "adapters" / "relvid_adapters.safetensors").is_file()
    assert "enabled: true" in saved.split("rcl:")[1].split("\n\n")[0]  # the + RCL row trains with RCL
    rows = {r["method"]: r for r in json.loads((out / "eval" / "shaking_hands" / "results.json").read_text())["rows"]}
    assert set(rows) == {"motion_inversion", "motion_inversion_rcl"}
    assert all(set(paper.METRICS) <= set(r) and r["videos"] == 2 for r in rows.values())
    table = (out / "tables.md").read_text()
    assert "| Method | Relation Accuracy | CLIP-T | Temporal Consistency | FVD |" in table
    assert "| MotionInversion | " in table and "| MotionInversion + RCL | " in table
    assert "runs found: 2 of 2" in table and "relations: shaking_hands" in table

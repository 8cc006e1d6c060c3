"""Tracking: trainer.logger=tensorboard|wandb|both, previews and metrics in each, a preview of the base at step 0.

W&B runs here in offline mode only (no network, no account): the run is read back from the transaction log
it writes, <output_dir>/wandb/offline-run-*/run-<id>.wandb, with W&B's own record protobuf (read_wandb_log).
"""

from __future__ import annotations

import json
import re
import struct
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from relvid.config import ConfigError
from relvid.prompts import eval_prompts
from relvid.training.run import run
from tests.helpers.configs import TOY_CHANNELS
from tests.helpers.logs import scalars

PROMPTS = ("A dog is shaking hands with a cat.", "A bear is shaking hands with a raccoon in a forest.")
PREVIEW = ("preview.every_n_steps=2", "preview.sampling.num_steps=2", "preview.sampling.frames=7",
           "preview.sampling.height=16", "preview.sampling.width=24", "preview.max_prompts=2")
RA = ("relation_accuracy.every_n_steps=2", "relation_accuracy.sampling.num_steps=2",
      "relation_accuracy.sampling.frames=7", "relation_accuracy.sampling.height=16",
      "relation_accuracy.sampling.width=16", "relation_accuracy.max_prompts=1", "relation_accuracy.judge.repeats=1",
      "relation_accuracy.judge.kind=api", "relation_accuracy.judge.model=tiny-judge",
      "relation_accuracy.judge.timeout_s=5")
OFFLINE = ("trainer.wandb.mode=offline", "trainer.wandb.project=relvid-test")


@pytest.fixture
def cache(random_cache):
    return random_cache(n_clips=3, relation="shaking_hands", latent_shape=(TOY_CHANNELS, 2, 4, 4), seed=1,
                        prompts=(*PROMPTS, *eval_prompts("shaking_hands")[:1])).root


@pytest.fixture
def wandb_home(tmp_path, monkeypatch):
    """W&B's own settings, cache and data folders under tmp_path; a server is never asked."""
    pytest.importorskip("wandb")
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb_home" / var.lower()))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # should anything try the network, it fails here


# The transaction log: a 7-byte header, then LevelDB's log format (32 KiB blocks of chunks, each with a
# crc32, a length and a type: 1 full, 2 first, 3 middle, 4 last) around serialized wandb Record messages.
_BLOCK, _CHUNK = 32768, 7


def read_wandb_log(path: Path) -> list:
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    records, pos, pending = [], 7, b""
    while pos + _CHUNK <= len(data):
        if _BLOCK - pos % _BLOCK < _CHUNK:  # a block's tail too short for a chunk header is padding
            pos += _BLOCK - pos % _BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + _CHUNK])
        pending += data[pos + _CHUNK:pos + _CHUNK + length]
        pos += _CHUNK + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def wandb_history(run_dir: Path) -> list[dict]:
    """Every row the run's W&B logs hold, in order: {key: value} with the values decoded from JSON."""
    logs = sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert logs, f"no offline W&B run under {run_dir / 'wandb'}"
    rows = []
    for log in logs:
        for record in read_wandb_log(log):
            if record.WhichOneof("record_type") != "history":
                continue
            row: dict = {}
            for item in record.history.item:  # media come as nested keys: (tag, field) -> {tag: {field: value}}
                *outer, last = [item.key] if item.key else list(item.nested_key)
                place = row
                for key in outer:
                    place = place.setdefault(key, {})
                place[last] = json.loads(item.value_json)
            rows.append(row)
    return rows


def wandb_scalars(rows: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(trainer/global_step, value)]} of every number logged with the trainer's step."""
    out: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        if "trainer/global_step" not in row:
            continue
        for key, value in row.items():
            if not key.startswith(("_", "trainer/")) and isinstance(value, (int, float)):
                out.setdefault(key, []).append((int(row["trainer/global_step"]), float(value)))
    return out


def tensorboard_scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(logdir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_both_loggers_receive_the_same_scalars_and_previews(cache, toy_cfg, wandb_home, chat_server):
    with chat_server([("answer", "no")]) as judge:
        out = run(toy_cfg("both", "trainer.logger=both", *OFFLINE, *PREVIEW, *RA, f"preview.prompts=[{PROMPTS[0]}]",
                          "preview.max_prompts=2", f"relation_accuracy.judge.base_url={judge.url}"))

    tb = tensorboard_scalars(out / "tensorboard")
    assert scalars(out / "tensorboard") == {tag: [v for _, v in events] for tag, events in tb.items()}
    rows = wandb_history(out)
    wb = wandb_scalars(rows)
    assert {"train/loss", "train/loss_rec", "train/sigma"} <= set(tb)
    assert set(wb) == set(tb), (sorted(wb), sorted(tb))
    for tag, events in tb.items():
        assert [s for s, _ in wb[tag]] == [s for s, _ in events], tag
        # TensorBoard stores float32; W&B the float the trainer logged
        assert [v for _, v in wb[tag]] == pytest.approx([v for _, v in events], rel=1e-6, abs=1e-7), tag
    assert [s for s, _ in tb["train/loss"]] == [0, 1, 2, 3]  # Lightning logs a step under the steps done before it
    assert wb["val/relation_accuracy"][0] == (2, 0.0)  # the judged accuracy reaches both

    # the previews: GIFs in TensorBoard, the mp4 files in W&B, at the same steps
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Images("preview/p0")] == [2, 4]
    videos = [(row["trainer/global_step"], key, row[key]) for row in rows for key in row
              if key.startswith("preview/")]
    assert sorted((s, k) for s, k, _ in videos) == [(2, "preview/p0"), (4, "preview/p0")]
    [media] = sorted((out / "wandb").glob("offline-run-*"))
    for _, _, video in videos:
        assert video["_type"] == "video-file" and video["path"].endswith(".mp4")
        assert (media / "files" / video["path"]).stat().st_size == video["size"] > 0
    assert len({video["path"] for _, _, video in videos}) == 2


def test_wandb_alone_writes_no_tensorboard_and_ends_its_run(cache, toy_cfg, wandb_home):
    import wandb

    out = run(toy_cfg("wandb", "trainer.logger=wandb", *OFFLINE, "trainer.max_steps=2"))
    assert not (out / "tensorboard").exists()
    assert wandb.run is None  # ended with the fit: a second run in this process gets a run of its own
    rows = wandb_history(out)
    assert [s for s, _ in wandb_scalars(rows)["train/loss"]] == [0, 1]
    [run_folder] = (out / "wandb").glob("offline-run-*")
    records = read_wandb_log(next(run_folder.glob("run-*.wandb")))
    [config] = [r.run.config for r in records if r.WhichOneof("record_type") == "run"]
    logged = {item.key: json.loads(item.value_json) for item in config.update}
    assert logged["trainer"]["max_steps"] == 2 and logged["relation"] == "shaking_hands"


def test_a_resumed_run_continues_its_wandb_run(cache, toy_cfg, wandb_home):
    steps = ("trainer.logger=wandb", *OFFLINE, "trainer.checkpoint_every=2")
    out = run(toy_cfg("resumed", *steps, "trainer.max_steps=2"))
    run(toy_cfg("resumed", *steps, "trainer.max_steps=4", "resume=last"))
    folders = sorted((out / "wandb").glob("offline-run-*"))
    # one W&B run id; wandb names a folder offline-run-<date>_<time>-<id>, with "-1" added when two runs of the
    # same id start within the same second
    ids = {re.match(r"offline-run-\d{8}_\d{6}-([a-z0-9]+)", f.name)[1] for f in folders}
    assert len(folders) == 2 and len(ids) == 1
    assert [s for s, _ in wandb_scalars(wandb_history(out))["train/loss"]] == [0, 1, 2, 3]


def test_preview_at_start_shows_the_untouched_base_at_step_0(cache, toy_cfg):
    out = run(toy_cfg("start", *PREVIEW, "preview.at_start=true", "preview.max_prompts=1"))
    files = sorted(p.name[:13] for p in (out / "previews").glob("*.mp4"))
    assert files == ["step000000_p0", "step000002_p0", "step000004_p0"]
    side = json.loads(next((out / "previews").glob("step000000_p0_*.json")).read_text())
    assert side["step"] == 0
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Images("preview/p0")] == [0, 2, 4]


def test_missing_wandb_is_a_clear_error(cache, toy_cfg, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # what `import wandb` meets where it is not installed
    with pytest.raises(ConfigError, match=r"trainer\.logger=both.*pip install wandb"):
        run(toy_cfg("missing", "trainer.logger=both"))


@pytest.mark.parametrize("override,key", [("trainer.logger=mlflow", "trainer.logger"),
                                          ("trainer.wandb.mode=dryrun", "trainer.wandb.mode")])
def test_bad_tracking_settings_name_the_key(override, key, toy_cfg):
    with pytest.raises(ConfigError, match=key):
        toy_cfg("x", override)

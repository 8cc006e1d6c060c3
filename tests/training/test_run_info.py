"""run_info.json, and a run whose base is stored in fp8: same selections, exact resume, same exports."""

import json

import lightning as L
import pytest
import torch
from safetensors.torch import load_file

from relvid.models.adapter_file import load_adapters
from relvid.training.run import RUN_INFO_NAME, run

FP8 = "model.storage_dtype=float8_e4m3fn"


@pytest.fixture
def cache(random_cache):
    return random_cache(n_clips=4, relation="shaking_hands", seed=1).root


class Selections(L.Callback):
    """The LoRA each step trained."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def on_train_end(self, trainer, pl_module):
        self.seen = list(pl_module.selections)


def _info(out) -> dict:
    return json.loads((out / RUN_INFO_NAME).read_text())


def test_run_info_shows_the_base_stored_in_fp8_and_the_loras_in_fp32(cache, tiny_cfg, tmp_path):
    fp8 = _info(run(tiny_cfg(FP8, "trainer.max_steps=2", f"output_dir={tmp_path / 'fp8'}")))["transformer"]
    full = _info(run(tiny_cfg("trainer.max_steps=2", f"output_dir={tmp_path / 'full'}")))["transformer"]
    assert fp8["storage_dtype"] == "float8_e4m3fn" and full["storage_dtype"] is None
    assert fp8["compute_dtype"] == full["compute_dtype"] == "float32"
    assert set(fp8["parameter_bytes"]) == {"cpu"} and fp8["parameter_bytes"]["cpu"]["float8_e4m3fn"] > 0
    assert "float8_e4m3fn" not in full["parameter_bytes"]["cpu"]
    assert fp8["trained_parameter_bytes"] == full["trained_parameter_bytes"] == {
        "cpu": {"float32": 4 * fp8["trained_parameters"]}}
    # the same parameters, most of the base's bytes gone: each fp8 weight takes 1 byte where it took 4
    assert fp8["parameters"] == full["parameters"]
    fp8_total, full_total = sum(fp8["parameter_bytes"]["cpu"].values()), sum(full["parameter_bytes"]["cpu"].values())
    assert full_total - fp8_total == 3 * fp8["parameter_bytes"]["cpu"]["float8_e4m3fn"]


def test_run_info_puts_blocks_offloaded_to_disk_on_the_disk(cache, tiny_cfg, tmp_path):
    common = ("trainer.max_steps=1", "model.tiny.num_layers=3")
    plain = _info(run(tiny_cfg(*common, f"output_dir={tmp_path / 'plain'}")))["transformer"]
    disk = _info(run(tiny_cfg(*common, "model.offload=blocks", "model.resident_blocks=1",
                              f"model.offload_dir={tmp_path / 'offload'}", f"output_dir={tmp_path / 'disk'}")))
    disk = disk["transformer"]
    assert set(disk["parameter_bytes"]) == {"cpu", "disk"} and disk["parameters"] == plain["parameters"]
    on_disk, in_memory = disk["parameter_bytes"]["disk"]["float32"], disk["parameter_bytes"]["cpu"]["float32"]
    # two of the three blocks are on the disk; the total is the plain run's
    assert on_disk > 0 and on_disk + in_memory == plain["parameter_bytes"]["cpu"]["float32"]


def test_fp8_run_selects_as_before_resumes_exactly_and_exports_fp32_loras(cache, tiny_cfg, tmp_path):
    common = ("trainer.max_steps=4", "trainer.checkpoint_every=2", "lora.dropout=0.1")
    plain_sel, fp8_sel = Selections(), Selections()
    run(tiny_cfg(*common, f"output_dir={tmp_path / 'plain'}"), extra_callbacks=[plain_sel])
    out = run(tiny_cfg(FP8, *common, f"output_dir={tmp_path / 'fp8'}"), extra_callbacks=[fp8_sel])
    assert fp8_sel.seen == plain_sel.seen and len(fp8_sel.seen) == 4  # the selection rule does not see the dtype
    resumed = run(tiny_cfg(FP8, *common, f"output_dir={tmp_path / 'resumed'}",
                           f"resume={out / 'checkpoints' / 'step000002.ckpt'}"))
    assert _info(resumed)["step"] == 2
    spec, a, _ = load_adapters(out / "adapters" / "relvid_adapters.safetensors")
    _, b, _ = load_adapters(resumed / "adapters" / "relvid_adapters.safetensors")
    _, plain, _ = load_adapters(tmp_path / "plain" / "adapters" / "relvid_adapters.safetensors")
    assert a.keys() == b.keys() == plain.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "the resumed fp8 run differs from the uninterrupted one"
    assert {t.dtype for t in a.values()} == {torch.float32}
    assert any(not torch.equal(a[k], plain[k]) for k in a)  # it trained on the fp8 base, not a copy of the other
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["state_dict"] and all("lora_" in k for k in ckpt["state_dict"])  # never the (fp8) base
    assert {v.dtype for v in ckpt["state_dict"].values()} == {torch.float32}
    snapshots = sorted((out / "loras").glob("*.safetensors"))
    plain_snapshots = sorted((tmp_path / "plain" / "loras").glob("*.safetensors"))
    assert [p.name for p in snapshots] == [p.name for p in plain_snapshots] and snapshots
    diffusers_lora, plain_lora = load_file(snapshots[-1]), load_file(plain_snapshots[-1])
    assert diffusers_lora.keys() == plain_lora.keys()
    assert {t.dtype for t in diffusers_lora.values()} == {t.dtype for t in plain_lora.values()}


DDP_WORKER = '''
import json, sys
from pathlib import Path

import lightning as L
import torch

from relvid.config import load_config
from relvid.models.lora import adapter_state_dict
from relvid.training.run import run


class Dump(L.Callback):
    def on_train_end(self, trainer, pl_module):
        rank = trainer.global_rank
        torch.save(adapter_state_dict(pl_module.transformer), WORK / f"rank{rank}_adapters.pt")
        (WORK / f"rank{rank}.json").write_text(json.dumps({"selections": pl_module.selections}))


WORK = Path(sys.argv[1])
torch.set_num_threads(1)
run(load_config([sys.argv[2]], ["trainer.strategy=ddp", "trainer.devices=2", "trainer.max_steps=2",
    "trainer.progress_bar=false", f"data.cache_dir={WORK / 'cache'}", f"output_dir={WORK / 'run'}",
    "model.storage_dtype=float8_e4m3fn"]), extra_callbacks=[Dump()])
'''


@pytest.mark.slow
@pytest.mark.distributed
def test_two_process_ddp_trains_on_an_fp8_base(tmp_path, repo_root, random_cache):
    """DDP's start-up broadcast cannot send fp8 over gloo: the stored base is left out of it (every rank
    loads the same base), and the ranks still end identical."""
    import os
    import subprocess
    import sys

    random_cache(n_clips=4, relation="shaking_hands", seed=2)
    worker = tmp_path / "worker.py"
    worker.write_text(DDP_WORKER)
    env = dict(os.environ, PYTHONPATH=str(repo_root), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(worker), str(tmp_path), str(repo_root / "configs" / "tiny.yaml")],
                          env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["selections"] == r1["selections"] and len(r0["selections"]) == 2
    a, b = (torch.load(tmp_path / f"rank{r}_adapters.pt") for r in (0, 1))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _info(tmp_path / "run")["transformer"]["parameter_bytes"]["cpu"]["float8_e4m3fn"] > 0

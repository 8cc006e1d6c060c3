"""Launch by torchrun (the multi-node path): Lightning detects the torchrun environment, ranks agree."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from tests.helpers import HELPERS_DIR

pytestmark = pytest.mark.distributed

EXPECTED = {"relation": ["ffn", "relation", "subject1", "subject2"], "subject1": ["ffn", "subject1"],
            "subject2": ["ffn", "subject2"]}


def test_torchrun_two_processes_train_in_step(tmp_path, repo_root, random_cache):
    random_cache(n_clips=4, relation="shaking_hands", seed=2)
    env = dict(os.environ, PYTHONPATH=str(repo_root), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(HELPERS_DIR / "strategy_worker.py"), str(tmp_path), "ddp"]
    # own process group: a hung launch is killed whole (torchrun's workers included)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                            start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    assert proc.returncode == 0, stderr[-4000:]
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    assert r0["world_size"] == r1["world_size"] == 2 and r0["strategy"] == "RelvidDDPStrategy"
    assert r0["selections"] == r1["selections"] and len(r0["selections"]) == 4
    assert r0["moved"] == r1["moved"]
    # the selection rule across processes: exactly the selected adapters moved at each step
    assert [EXPECTED[s] for s in r0["selections"]] == r0["moved"]
    a = torch.load(tmp_path / "rank0_adapters.pt")
    b = torch.load(tmp_path / "rank1_adapters.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()  # rank 0 wrote the checkpoint

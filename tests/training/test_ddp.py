"""Two-process data parallel on CPU (gloo): ranks agree on every selection and end identical."""

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.helpers import HELPERS_DIR

pytestmark = pytest.mark.distributed


def test_two_process_ddp_ranks_stay_identical_and_keep_frozen_adapters_still(tmp_path, repo_root, random_cache):
    random_cache(n_clips=4, relation="shaking_hands", seed=2)
    env = dict(os.environ, PYTHONPATH=str(repo_root), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(HELPERS_DIR / "ddp_worker.py"), str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    assert r0["world_size"] == r1["world_size"] == 2
    assert r0["selections"] == r1["selections"] and len(r0["selections"]) == 4
    assert r0["bank"] == r1["bank"] == 8  # both ranks' videos gathered into one bank (4 steps x 2 ranks)
    a = torch.load(tmp_path / "rank0_adapters.pt")
    b = torch.load(tmp_path / "rank1_adapters.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the ranks trained on different clips, yet the weights moved (gradients were all-reduced) ...
    assert any(v.abs().sum() > 0 for k, v in a.items() if "lora_B" in k and not k.startswith("ffn/"))
    # ... except the frozen FFN LoRA (lora.frozen=[ffn]), which is in every step's forward
    ffn_b = [v for k, v in a.items() if k.startswith("ffn/") and "lora_B" in k]
    assert ffn_b and all(bool((v == 0).all()) for v in ffn_b)

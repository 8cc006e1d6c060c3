"""Every `relvid` command of docs/reproduce.md's shaking-hands block, in order, on tiny random models:
a tiny NTU folder (real videos and skeletons), a tiny Mochi folder (VAE + T5), the tiny transformer,
a tiny CLIP, a loopback judge server and a tiny reference checkpoint. The commands are read from the
page itself; only sizes, steps and devices are added, so the guide cannot drift from the CLI."""

import json
import os
import re
import shlex
from pathlib import Path

import numpy as np
import torch

from relvid.cli import main
from tests.helpers.adapters import reference_state
from tests.helpers.preprocess import save_tiny_t5, save_tiny_vae, two_people_frames, write_skeleton, write_video
from tests.helpers.tiny_models import tiny_clip_folder

REPO = Path(__file__).resolve().parents[2]
# per command: what makes it tiny (added after the page's own arguments)
TINY = {
    "preprocess": ["--frames", "13", "--height", "64", "--width", "112", "--device", "cpu", "--no-progress"],
    "train": ["model.preset=tiny", "model.gradient_checkpointing=false", "lora.rank=4", "lora.alpha=4",
              "trainer.max_steps=2", "trainer.checkpoint_every=1", "trainer.accelerator=cpu", "trainer.devices=1",
              "trainer.progress_bar=false", "data.num_workers=0", "optim.warmup_steps=1", "optim.schedule_steps=4"],
    "export": [],
    "import-reference": [],
    "evaluate": ["--set", "model.preset=tiny", "--device", "cpu", "--steps", "2", "--frames", "7", "--height", "16",
                 "--width", "16", "--repeats", "1"],
}


def guide_commands() -> list[str]:
    text = (REPO / "docs" / "reproduce.md").read_text()
    block = re.search(r"```bash\n(.*?)```", text[text.index("## A Table 1 row"):], re.S).group(1)
    return [line for line in block.splitlines() if line.startswith("relvid ")]


def tiny_ntu(root: Path) -> Path:
    for i, name in enumerate(["S001C001P001R001A058", "S001C002P002R001A058", "S002C001P003R002A058"]):
        frames = np.random.default_rng(i).integers(0, 255, (14, 108, 192, 3), dtype=np.uint8)
        write_video(root / "nturgb+d_rgb" / f"{name}_rgb.avi", frames)
        write_skeleton(root / "skeletons" / f"{name}.skeleton", two_people_frames(14))
    return root


def test_every_command_of_the_reproduction_guide_runs(tmp_path, chat_server, monkeypatch):
    commands = guide_commands()
    assert [c.split()[1] for c in commands] == ["preprocess", "train", "export", "import-reference", "evaluate",
                                                "evaluate", "evaluate"]
    mochi = tmp_path / "mochi"
    save_tiny_vae(mochi)
    save_tiny_t5(mochi)
    ref, _ = reference_state(rank=4)
    work = tmp_path / "work"
    work.mkdir()
    torch.save({"state_dict": {k: v * 0.05 for k, v in ref.items()},
                "kwargs": {"qkv_proj_lora_alpha": 4, "out_proj_lora_alpha": 4}}, work / "model_2000.lora.pt")
    (work / "configs").symlink_to(REPO / "configs")
    monkeypatch.chdir(work)
    with chat_server([("answer", "yes"), ("answer", "no")] * 20) as server:
        env = {"NTU_ROOT": str(tiny_ntu(tmp_path / "ntu")), "MOCHI": str(mochi),
               "CLIP": str(tiny_clip_folder(tmp_path / "clip")), "JUDGE_URL": server.url, "JUDGE_MODEL": "qwen-vl-max"}
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        for line in commands:
            argv = shlex.split(os.path.expandvars(line))[1:]
            assert main([*argv, *TINY[argv[0]]]) == 0, line
    rows = json.loads((work / "outputs" / "repro" / "eval" / "results.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["mochi", "authors_step2000", "relvid_reference"]
    assert all("relation_accuracy" in r and "clip_t" in r for r in rows)
    saved = (work / "outputs" / "repro" / "shaking_hands" / "config.yaml").read_text()
    assert "unselected: zero_grad" in saved and "bank: split" in saved and "n_pos: 1" in saved
    lora = work / "outputs" / "repro" / "shaking_hands" / "diffusers_lora" / "pytorch_lora_weights.safetensors"
    assert lora.is_file()

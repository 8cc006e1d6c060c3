"""`make gpu-check` (experiments/bench/gpu_check.py): refuses without a GPU, rehearses on the CPU through
the real command line, and a step that hangs costs its time limit, not the stage."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "experiments" / "bench" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def run_script(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)


def test_without_a_gpu_it_says_so_exits_3_and_writes_nothing(tmp_path):
    out = tmp_path / "gpu-check"
    done = run_script("--out", str(out), env={"CUDA_VISIBLE_DEVICES": ""})  # no GPU, even on a GPU machine
    assert done.returncode == 3
    assert "no CUDA GPU here" in done.stderr and "--rehearse" in done.stderr
    assert done.stdout == "" and not out.exists()


def test_rehearsal_runs_stage_one_through_the_cli_and_writes_its_table(gpu_check, tmp_path, capsys):
    out = tmp_path / "gpu-check"
    code = gpu_check.main(["--rehearse", "--stage", "1", "--skip", "tests", "--out", str(out)])
    table = json.loads((out / "stage1.json").read_text())
    rows = {row["step"]: row for row in table["rows"]}
    assert code == 0 and table["ok"] and table["rehearsal"] and not (out / "stage2.json").exists()
    assert rows["Python packages"]["status"] == "ok"
    train = rows["tiny training (relvid train)"]
    assert train["status"] == "ok" and "trainer.accelerator=cpu, adapters written" in train["result"]
    sdpa = rows["SDPA backend"]  # the packed path on the CPU runs the math kernel (relvid's choice there)
    assert sdpa["status"] == "ok" and sdpa["figures"]["relvid_runs"] == ["math"]
    assert set(sdpa["figures"]["backends"]) == {"flash", "math"}
    md = (out / "stage1.md").read_text()
    assert "| tiny training (relvid train) | ok |" in md and "rehearsal on the CPU" in md
    assert "done:" in (out / "logs" / "stage1-train.log").read_text()  # the CLI's own closing line


def test_a_hanging_step_is_stopped_at_its_limit_with_everything_it_started(gpu_check, tmp_path):
    check = gpu_check.Check(tmp_path, rehearse=True, python=sys.executable, env=dict(os.environ))
    start = time.perf_counter()
    # a step that starts a child of its own and then hangs
    code, output = gpu_check.run_logged(["sh", "-c", "sleep 60 & echo $!; wait"], check, "hang.log", timeout=1.5)
    assert code is None and time.perf_counter() - start < 10
    child = int(output.split()[0])
    for _ in range(50):  # the child went with the step (gone, or a zombie until its new parent reaps it)
        status = Path(f"/proc/{child}/status")
        if not status.exists() or "zombie" in status.read_text():
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the step's child {child} still runs")
    row = gpu_check.step_row("hang", code, output, 1.5, "logs/hang.log", 1.5, str)
    assert row.status == "timeout" and row.result.startswith("no result within 2 s (stopped)")
    assert (tmp_path / "logs" / "hang.log").read_text().startswith("$ sh -c")


def test_bench_rows_and_error_lines_are_read_from_the_output(gpu_check):
    output = ("relvid benchmark on NVIDIA H100 80GB HBM3, torch 2.13.0, checkpoint=full\n"
              "| what | median s | peak GiB | tokens/s | TFLOP/s |\n|---|---|---|---|---|\n"
              "| (b) relvid step [packed]           |     2.140 |     38.2 |         8173 |       312 |\n")
    assert gpu_check.bench_table(output) == [{"what": "(b) relvid step [packed]", "median_s": 2.14, "peak_gib": 38.2,
                                              "tokens_per_s": 8173.0, "tflops": 312.0}]
    traceback = ("Traceback (most recent call last):\n  File \"x.py\", line 1\n"
                 "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB\n")
    assert gpu_check.error_line(traceback).startswith("torch.OutOfMemoryError: CUDA out of memory")
    row = gpu_check.step_row("x", 1, traceback, 1.0, "", 10, str)
    assert row.status == "failed" and "exit code 1: torch.OutOfMemoryError" in row.result

"""`make gpu-check`: does relvid run on this CUDA machine? Two stages, each table written as soon as it ends.

Stage 1 (<= 3 min): which SDPA backend relvid's attention runs at Mochi's head dim 128 (and how fast each
one is at Mochi's sequence length), the gpu-marked tests, and a few `relvid train` steps of the tiny model
on the GPU through the command line.
Stage 2 (<= 9 min): full-size Mochi (10B, random weights, no download) training steps with step time and
peak memory, and a 2-step CFG sample, both through experiments/bench/bench.py, with relvid's defaults (the
40gb memory preset); then the training step under the 80gb and 24gb presets (configs/memory/) and the
24gb preset's sample (its fp8 base).

Every step runs in its own process group under a time limit: a hang or a crash becomes a row with its
error, and the next step runs. Tables go to <out>/stage<N>.md and .json, each step's whole output to
<out>/logs/. Exit code: 0 every row ok, 1 a row failed, 3 no CUDA GPU (then nothing runs and nothing is
written). --rehearse runs the same steps on the CPU (tiny shapes, bench --tiny): it checks an
installation up to its first CUDA call.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "experiments" / "bench" / "bench.py"
EXIT_NO_GPU = 3
STAGE_LIMITS = {1: 180.0, 2: 540.0}  # seconds per stage
# Mochi-1 attention: 24 heads of dim 128 over 17,490 vision tokens (61x480x848) + up to 256 text tokens.
MOCHI_HEADS, MOCHI_HEAD_DIM, MOCHI_TOKENS = 24, 128, 17_490 + 256
MOCHI_LATENT = (12, 11, 60, 106)  # (C, f, h, w) of a 61x480x848 clip
SDPA_OPS = {  # aten op -> the backend that ran it
    "aten::_scaled_dot_product_cudnn_attention": "cudnn",
    "aten::_scaled_dot_product_flash_attention": "flash",
    "aten::_scaled_dot_product_efficient_attention": "efficient",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "flash (CPU)",
    "aten::_scaled_dot_product_attention_math": "math",
}


@dataclass
class Row:
    step: str
    status: str  # ok | failed | timeout | skipped
    seconds: float
    result: str  # what it measured or found, or its error
    log: str = ""  # the step's output, relative to the output folder
    figures: dict = field(default_factory=dict)  # numbers for the JSON table


@dataclass
class Check:
    out: Path
    rehearse: bool
    python: str
    env: dict[str, str]
    environment: dict = field(default_factory=dict)


def child_env(rehearse: bool) -> dict[str, str]:
    """The steps' environment: this repository importable, no hub downloads, unbuffered output; a
    rehearsal hides every GPU so that nothing reaches CUDA."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    if rehearse:
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def run_logged(cmd: list[str], check: Check, log_name: str, timeout: float) -> tuple[int | None, str]:
    """Run ``cmd`` in its own process group; (exit code, or None when it ran past ``timeout``, output).
    The output is also written to <out>/logs/<log_name>."""
    from relvid.files import atomic_write

    proc = subprocess.Popen(cmd, cwd=REPO, env=check.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=max(1.0, timeout))
        code = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the step and everything it started (workers, compilers)
        output, _ = proc.communicate()
        code = None
    text = output.decode(errors="replace")
    atomic_write(check.out / "logs" / log_name, f"$ {' '.join(cmd)}\n{text}")
    return code, text


def error_line(output: str) -> str:
    """The line of ``output`` that says what went wrong: the last exception or error line, else the last line."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    pattern = re.compile(r"^([\w.]+(Error|Exception|Exit|Interrupt)\b|error:|relvid \w[\w-]*: error)|Error: ")
    chosen = next((line for line in reversed(lines) if pattern.search(line)), lines[-1] if lines else "no output")
    return chosen if len(chosen) <= 300 else chosen[:297] + "..."


def step_row(name: str, code: int | None, output: str, seconds: float, log: str, timeout: float,
             ok: Callable[[str], str]) -> Row:
    """A row from a finished step: ``ok(output)`` gives the result of a step that exited 0."""
    if code is None:
        return Row(name, "timeout", seconds, f"no result within {timeout:.0f} s (stopped); last line: "
                   f"{error_line(output)}", log)
    if code != 0:
        return Row(name, "failed", seconds, f"exit code {code}: {error_line(output)}", log)
    try:
        return Row(name, "ok", seconds, ok(output), log)
    except ValueError as err:  # exited 0 without what it should have printed
        return Row(name, "failed", seconds, str(err), log)


# --- stage 1 -------------------------------------------------------------------------------------------------
def requirements() -> list[str]:
    """relvid's install_requires, as setup.cfg lists them."""
    import configparser

    parser = configparser.ConfigParser()
    parser.read(REPO / "setup.cfg")
    return [line.strip() for line in parser["options"]["install_requires"].splitlines() if line.strip()]


def packages_step(check: Check, timeout: float) -> Row:
    """Every package relvid needs installed, at a version setup.cfg allows (in this process: no CUDA)."""
    import importlib.metadata as metadata

    start = time.perf_counter()
    missing, wrong, found = [], [], {}
    for line in requirements():
        name = re.split(r"[<>=!~ ;\[]", line, maxsplit=1)[0]
        try:
            version = metadata.version(name)
        except metadata.PackageNotFoundError:
            missing.append(line)
            continue
        found[name] = version
        try:
            from packaging.requirements import Requirement

            if not Requirement(line).specifier.contains(version, prereleases=True):
                wrong.append(f"{name} {version} (relvid needs {line})")
        except ImportError:  # no packaging: presence is all that is checked
            pass
    seconds = time.perf_counter() - start
    main_ones = ("torch", "lightning", "diffusers", "transformers", "peft")
    key = ", ".join(f"{n} {found[n]}" for n in main_ones if n in found)
    if missing or wrong:
        fix = "pip install " + " ".join(f"'{m}'" if re.search(r"[<>= ]", m) else m for m in missing)
        problems = ([f"missing {', '.join(missing)} ({fix})"] if missing else []) + wrong
        return Row("Python packages", "failed", seconds, "; ".join(problems), figures={"installed": found})
    return Row("Python packages", "ok", seconds, f"all {len(found)} of relvid's packages ({key})",
               figures={"installed": found})


def sdpa_step(check: Check, timeout: float) -> Row:
    cmd = [check.python, str(Path(__file__).resolve()), "--probe-sdpa", *(["--rehearse"] if check.rehearse else [])]
    start = time.perf_counter()
    code, output = run_logged(cmd, check, "stage1-sdpa.log", timeout)
    seconds = time.perf_counter() - start
    figures: dict = {}

    def ok(text: str) -> str:
        lines = [line for line in text.splitlines() if line.startswith("{")]
        if not lines:
            raise ValueError("the probe printed no result")
        figures.update(json.loads(lines[-1]))
        check.environment.update(figures.pop("environment"))
        timings = ", ".join(f"{name} {r['ms']:.1f} ms" if r["ok"] else f"{name} fails ({r['error']})"
                            for name, r in figures["backends"].items())
        used = " + ".join(figures["relvid_runs"]) or "no SDPA op seen"
        return (f"relvid (speed.sdpa_backend=auto) runs {used}; forward+backward at {figures['shape']}: {timings}")

    row = step_row("SDPA backend", code, output, seconds, "logs/stage1-sdpa.log", timeout, ok)
    row.figures = figures
    return row


def gpu_files() -> list[str]:
    """The test files that hold gpu-marked tests (collecting only these keeps the step short)."""
    return sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").rglob("test_*.py")
                  if "mark.gpu" in p.read_text(errors="replace"))


def tests_step(check: Check, timeout: float) -> Row:
    name = "gpu-marked tests"
    if importlib.util.find_spec("pytest") is None:
        return Row(name, "skipped", 0.0, f"pytest is not installed for {check.python} (`pip install pytest` to run "
                   "them); the other steps do not need it")
    files = gpu_files()
    if not files:
        return Row(name, "skipped", 0.0, "no gpu-marked tests under tests/")
    cmd = [check.python, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", *files]
    start = time.perf_counter()
    code, output = run_logged(cmd, check, "stage1-tests.log", timeout)
    seconds = time.perf_counter() - start
    last = next((line for line in reversed(output.splitlines()) if re.search(r"\d+ (passed|failed|skipped|"
                 r"errors?|deselected)", line)), "")  # pytest's closing line
    counts = {kind.removesuffix("s") if kind == "errors" else kind: int(n) for n, kind in
              re.findall(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed|deselected)", last)}
    summary = ", ".join(f"{n} {kind}" for kind, n in counts.items() if kind != "deselected") or "no summary"
    if code == 5:
        return Row(name, "failed", seconds, "pytest collected no gpu-marked test", "logs/stage1-tests.log", counts)
    if code not in (0, None):
        failing = [line.split(" - ")[0] for line in output.splitlines() if line.startswith(("FAILED", "ERROR"))]
        return Row(name, "failed", seconds, f"{summary}: {'; '.join(failing[:4]) or error_line(output)}",
                   "logs/stage1-tests.log", counts)
    row = step_row(name, code, output, seconds, "logs/stage1-tests.log", timeout, lambda _: summary)
    row.figures = counts
    return row


def train_step(check: Check, timeout: float) -> Row:
    name = "tiny training (relvid train)"
    deadline = time.perf_counter() + timeout
    accelerator = "cpu" if check.rehearse else "gpu"
    with tempfile.TemporaryDirectory(prefix="relvid-gpu-check-") as tmp:
        cache, run_dir = Path(tmp) / "cache", Path(tmp) / "run"
        cli = [check.python, "-m", "relvid.cli"]
        start = time.perf_counter()
        code, output = run_logged([*cli, "random-cache", str(cache), "--clips", "2"], check,
                                  "stage1-random-cache.log", timeout)
        if code != 0:
            return step_row(name, code, output, time.perf_counter() - start, "logs/stage1-random-cache.log",
                            timeout, str)
        steps = 4
        cmd = [*cli, "train", str(REPO / "configs" / "tiny.yaml"), f"data.cache_dir={cache}", f"output_dir={run_dir}",
               f"trainer.accelerator={accelerator}", f"trainer.max_steps={steps}", "trainer.checkpoint_every=2",
               "trainer.progress_bar=false"]
        code, output = run_logged(cmd, check, "stage1-train.log", deadline - time.perf_counter())
        seconds = time.perf_counter() - start

        def ok(text: str) -> str:
            adapters = run_dir / "adapters" / "relvid_adapters.safetensors"
            if not adapters.is_file():
                raise ValueError(f"exited 0 but wrote no {adapters.name}")
            used = re.search(r"GPU available: (\w+)[^,]*, used: (\w+)", text)
            on = f"; Lightning: GPU available {used[1]}, used {used[2]}" if used else ""
            if not check.rehearse and (used is None or used[2] != "True"):
                raise ValueError(f"trained, but not on the GPU{on or ' (Lightning did not say it used one)'}")
            return f"{steps} steps of the tiny model with trainer.accelerator={accelerator}, adapters written{on}"

        return step_row(name, code, output, seconds, "logs/stage1-train.log", timeout, ok)


# --- stage 2 -------------------------------------------------------------------------------------------------
def bench_table(output: str) -> list[dict]:
    """The rows of bench.py's markdown table: what, median s, peak GiB, tokens/s, TFLOP/s."""
    rows = []
    for line in output.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| (") and len(cells) >= 5:
            rows.append({"what": cells[0], "median_s": float(cells[1]),
                         "peak_gib": None if cells[2] == "-" else float(cells[2]),
                         "tokens_per_s": float(cells[3]), "tflops": float(cells[4])})
    return rows


def bench_step(check: Check, timeout: float, name: str, log: str, flags: list[str]) -> Row:
    cmd = [check.python, str(BENCH), "--attention", "packed", *flags, *(["--tiny"] if check.rehearse else [])]
    start = time.perf_counter()
    code, output = run_logged(cmd, check, log, timeout)
    seconds = time.perf_counter() - start
    figures: dict = {}

    def ok(text: str) -> str:
        rows = bench_table(text)
        if not rows:
            raise ValueError("bench.py printed no table row")
        header = next((line for line in text.splitlines() if line.startswith("relvid benchmark on")), "")
        figures.update(rows[0], bench=header)
        peak = "-" if rows[0]["peak_gib"] is None else f"{rows[0]['peak_gib']:.1f} GiB"
        return (f"{rows[0]['what']}: {rows[0]['median_s']:.3f} s, peak {peak}, {rows[0]['tokens_per_s']:,.0f} "
                f"tokens/s, {rows[0]['tflops']:.3g} TFLOP/s")

    row = step_row(name, code, output, seconds, f"logs/{log}", timeout, ok)
    row.figures = figures
    return row


def train_bench_step(check: Check, timeout: float) -> Row:
    size = "tiny (rehearsal)" if check.rehearse else "full-size"
    return bench_step(check, timeout, f"{size} training step", "stage2-train.log",
                      ["--steps", "3", "--warmup", "1", "--skip", "plain", "sample", "check"])


def sample_bench_step(check: Check, timeout: float) -> Row:
    size = "tiny (rehearsal)" if check.rehearse else "full-size"
    return bench_step(check, timeout, f"{size} 2-step CFG sample", "stage2-sample.log",
                      ["--sample-steps", "2", "--skip", "plain", "relvid", "check"])


def preset_bench_step(preset: str, kind: str) -> Callable[[Check, float], Row]:
    """Stage 2's row for configs/memory/<preset>.yaml: its training step or its 2-step CFG sample."""
    flags = (["--steps", "3", "--warmup", "1", "--skip", "plain", "sample", "check"] if kind == "train"
             else ["--sample-steps", "2", "--skip", "plain", "relvid", "check"])

    def step(check: Check, timeout: float) -> Row:
        size = "tiny (rehearsal)" if check.rehearse else "full-size"
        what = "training step" if kind == "train" else "2-step CFG sample"
        return bench_step(check, timeout, f"{size} {what}, {preset} preset", f"stage2-{kind}-{preset}.log",
                          [*flags, "--preset", preset])

    step.__name__ = f"{kind}_bench_{preset}_step"
    return step


# configs/memory presets measured in stage 2 besides the defaults (= 40gb): (preset, train or sample)
PRESET_ROWS = (("80gb", "train"), ("24gb", "train"), ("24gb", "sample"))

# (step, share of the stage's limit it may take at most); a step also stops at the stage's end
STAGES: dict[int, list[tuple[Callable[[Check, float], Row], float]]] = {
    1: [(packages_step, 0.1), (sdpa_step, 0.3), (tests_step, 0.5), (train_step, 0.5)],
    2: [(train_bench_step, 0.4), (sample_bench_step, 0.3),
        *((preset_bench_step(preset, kind), 0.3) for preset, kind in PRESET_ROWS)],
}
TITLES = {1: "does relvid run on this GPU", 2: "full-size Mochi on this GPU (random weights)"}


def environment_line(check: Check) -> str:
    import torch

    env = check.environment
    where = "rehearsal on the CPU (no CUDA call)" if check.rehearse else env.get("device", "GPU")
    parts = [where, f"torch {torch.__version__}", f"CUDA {torch.version.cuda or '-'}"]
    if env.get("cudnn"):
        parts.append(f"cuDNN {env['cudnn']}")
    if env.get("memory_gib"):
        parts.append(f"{env['memory_gib']:.0f} GiB")
    return " · ".join([*parts, f"Python {sys.version.split()[0]}"])


def write_stage(check: Check, stage: int, rows: list[Row], limit: float) -> Path:
    from relvid.files import atomic_write

    stamp = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    lines = [f"# relvid gpu-check, stage {stage}: {TITLES[stage]}", "", f"{stamp} · {environment_line(check)} · "
             f"limit {limit:.0f} s", "", "| step | status | seconds | result |", "|---|---|---:|---|"]
    lines += [f"| {r.step} | {r.status} | {r.seconds:.1f} | {r.result.replace('|', '/')} |" for r in rows]
    logs = sorted({r.log for r in rows if r.log})
    lines += ["", f"Whole output of each step: {', '.join(logs) or '-'}", ""]
    atomic_write(check.out / f"stage{stage}.md", "\n".join(lines))
    payload = {"stage": stage, "time": stamp, "rehearsal": check.rehearse, "limit_s": limit,
               "environment": check.environment, "ok": all(r.status in ("ok", "skipped") for r in rows),
               "rows": [asdict(r) for r in rows]}
    atomic_write(check.out / f"stage{stage}.json", json.dumps(payload, indent=2) + "\n")
    return check.out / f"stage{stage}.md"


def run_stage(check: Check, stage: int, limit: float, skip: set[str]) -> list[Row]:
    end = time.perf_counter() + limit
    rows = []
    for step, share in STAGES[stage]:
        name = step.__name__.removesuffix("_step")
        if name in skip:
            continue
        left = end - time.perf_counter()
        if left < 5:
            rows.append(Row(name, "timeout", 0.0, f"not started: the stage's {limit:.0f} s were spent"))
            continue
        rows.append(step(check, min(share * limit, left)))
        print(f"  {rows[-1].status:8s} {rows[-1].step}: {rows[-1].result}", flush=True)
    return rows


# --- the SDPA probe (run in its own process by sdpa_step) ---------------------------------------------------
def probe_sdpa(rehearse: bool) -> dict:
    """Time each SDPA backend at Mochi's attention shape and find the one relvid's packed path runs."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.profiler import ProfilerActivity, profile

    from relvid.config import SpeedConfig
    from relvid.models.attention import apply_speed_config
    from relvid.models.backbone import tiny_transformer

    device = torch.device("cpu" if rehearse else "cuda")
    dtype = torch.float32 if rehearse else torch.bfloat16
    heads, tokens = (2, 512) if rehearse else (MOCHI_HEADS, MOCHI_TOKENS)
    environment = {"device": "CPU" if rehearse else torch.cuda.get_device_name(device)}
    if not rehearse:
        props = torch.cuda.get_device_properties(device)
        environment.update(capability=f"sm_{props.major}{props.minor}", memory_gib=props.total_memory / 2**30,
                           cudnn=torch.backends.cudnn.version())
        environment["device"] += f" ({environment['capability']})"
    candidates = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
                  "efficient": SDPBackend.EFFICIENT_ATTENTION}
    if rehearse:  # on CUDA the math backend would need ~30 GiB at this length: the last resort, not timed
        candidates = {"flash": SDPBackend.FLASH_ATTENTION, "math": SDPBackend.MATH}
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, heads, tokens, MOCHI_HEAD_DIM, generator=g).to(device, dtype).requires_grad_()
               for _ in range(3))

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    backends = {}
    for name, backend in candidates.items():
        try:
            with sdpa_kernel([backend]):
                for i in range(4):  # one warm-up, three timed
                    if i == 1:
                        sync()
                        start = time.perf_counter()
                    F.scaled_dot_product_attention(q, k, v).sum().backward()
                sync()
            backends[name] = {"ok": True, "ms": (time.perf_counter() - start) / 3 * 1e3}
        except RuntimeError as err:
            backends[name] = {"ok": False, "error": str(err).strip().splitlines()[0][:160]}
    del q, k, v
    # relvid's own path: one Mochi block (head dim 128) through speed.attention=packed, sdpa_backend=auto
    latent = (4, 2, 8, 8) if rehearse else (4, *MOCHI_LATENT[1:])
    model = tiny_transformer(num_layers=1, num_attention_heads=heads, attention_head_dim=MOCHI_HEAD_DIM)
    model = apply_speed_config(model.to(device, dtype), SpeedConfig(attention="packed", sdpa_backend="auto"))
    cfg = model.config
    z = torch.randn(1, *latent, generator=g).to(device, dtype)
    text = torch.randn(1, 16, cfg.text_embed_dim, generator=g).to(device, dtype)
    mask = torch.ones(1, 16, dtype=torch.bool, device=device)
    t = torch.tensor([500.0], device=device)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        model(z, text, t, mask, return_dict=False)[0].float().mean().backward()
        sync()
    # the block's attention only: the caption embedding's attention pool also calls SDPA (one query token)
    seen = {e.name for e in prof.events() if e.input_shapes and len(e.input_shapes[0]) == 4
            and e.input_shapes[0][-1] == MOCHI_HEAD_DIM and e.input_shapes[0][-2] > 1}
    runs = [backend for op, backend in SDPA_OPS.items() if op in seen]
    shape = f"{tokens:,} tokens x {heads} heads x {MOCHI_HEAD_DIM} ({str(dtype).removeprefix('torch.')})"
    return {"environment": environment, "shape": shape, "backends": backends, "relvid_runs": runs}


def no_gpu_message(rehearse: bool) -> str | None:
    """Why this machine cannot run the check, or None when a CUDA GPU is visible (or a rehearsal needs none)."""
    try:
        import torch
    except ImportError as err:
        return (f"relvid gpu-check: {sys.executable} cannot import torch ({err}). Nothing was run and nothing "
                "written. Install torch 2.13.0 (a CUDA build) for it, or name another interpreter: make gpu-check "
                "PY=<python>.")
    if rehearse or torch.cuda.is_available():
        return None
    if torch.version.cuda is None:
        why = f"this torch ({torch.__version__}) is a CPU-only build: install a CUDA build of torch 2.13.0"
    elif os.environ.get("CUDA_VISIBLE_DEVICES") is not None and not os.environ["CUDA_VISIBLE_DEVICES"].strip(","):
        why = "CUDA_VISIBLE_DEVICES is empty: unset it or name a GPU"
    else:
        why = (f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no CUDA device: check `nvidia-smi` "
               "and that the driver supports this CUDA version")
    return (f"relvid gpu-check: no CUDA GPU here ({why}). Nothing was run and nothing written. Run it on the GPU "
            "machine; `--rehearse` runs the same steps on the CPU to check the installation up to the first CUDA "
            "call.")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", choices=("1", "2", "all"), default="all", help="which stage to run (default all)")
    p.add_argument("--out", type=Path, default=Path("outputs/gpu-check"), help="folder for the tables and logs")
    p.add_argument("--timeout", type=float, default=None,
                   help="time limit of each stage in seconds (default 180 for stage 1, 540 for stage 2)")
    p.add_argument("--rehearse", action="store_true",
                   help="run the steps on the CPU (tiny shapes): checks an installation without a GPU")
    p.add_argument("--skip", nargs="*", default=(), metavar="STEP",
                   choices=("packages", "sdpa", "tests", "train", "train_bench", "sample_bench",
                            *(f"{kind}_bench_{preset}" for preset, kind in PRESET_ROWS)),
                   help="steps to leave out: packages sdpa tests train (stage 1), train_bench sample_bench "
                        "train_bench_80gb train_bench_24gb sample_bench_24gb (stage 2)")
    p.add_argument("--probe-sdpa", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.probe_sdpa:
        print(json.dumps(probe_sdpa(args.rehearse)), flush=True)
        return 0
    message = no_gpu_message(args.rehearse)
    if message:
        print(message, file=sys.stderr)
        return EXIT_NO_GPU
    out = args.out if args.out.is_absolute() else Path.cwd() / args.out
    check = Check(out, args.rehearse, sys.executable, child_env(args.rehearse))
    stages = (1, 2) if args.stage == "all" else (int(args.stage),)
    failed = False
    for stage in stages:
        limit = args.timeout or STAGE_LIMITS[stage]
        print(f"stage {stage}: {TITLES[stage]} (at most {limit:.0f} s)", flush=True)
        rows = run_stage(check, stage, limit, set(args.skip))
        table = write_stage(check, stage, rows, limit)
        print(f"stage {stage} table: {table}\n{table.read_text()}", flush=True)
        failed |= any(r.status not in ("ok", "skipped") for r in rows)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())

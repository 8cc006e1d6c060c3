"""The toy world's experiment grid: Table 1 (base, direct LoRA, DreamRelation), Table 2 (w/o HMT,
w/o RCL, w/o relation / subject / FFN LoRA) and Table 3 (placements) over toy relations and seeds;
on request (--tables 6) the paper's Table 6, the hybrid-mask weight lambda_m (1, 25, 50, 100), and
(--tables 1r) Table 1 with rows trained the reference code's way (configs/reference.yaml's keys)
and Direct LoRA at the paper's share of steps.

Training steps: --steps (default 800), unless a method's own file in configs/toy/methods/ sets
trainer.max_steps (direct_lora_paper_steps: 333); the report shows each row's steps.

Resumable: every (method, relation, seed) keeps its adapters and writes its metrics to
<out>/runs/.../metrics.json, and a rerun skips finished ones. <out>/grid.json records the world (a
fingerprint of rendered clips and of the base model) and the run settings; a rerun against another
world or other settings refuses instead of mixing old and new runs. Every finished run's metrics
file (a few KB: the metrics, the settings and each test video's verdicts, prompt and seed) is also
kept as <runs>/<method>/<relation>_s<seed>.json (--runs, default <results>/runs, i.e. the committed
experiments/toy/runs/): a run found there is neither trained nor sampled again, so tables build
from it when <out> is gone.
Writes RESULTS.md below its marker line, keeping the hand-written summary above it (per table: mean
+- std over seeds of the mean over relations; then relation accuracy per relation) and
results.{md,csv,json}.

    python experiments/toy/run.py                       # the full grid (hours on 2 CPU cores)
    python experiments/toy/run.py --relations orbiting --seeds 0 --methods base dreamrelation
    python experiments/toy/run.py --relations moving_apart --tables 6   # the lambda_m sweep
    python experiments/toy/run.py --relations moving_apart --tables 1r  # Table 1, reference semantics
    python experiments/toy/run.py --relations moving_apart --tables 1v  # ReVersion: prompts carry its token <R>
    python experiments/toy/run.py --finished-only       # report what is done; train nothing
    python experiments/toy/run.py --finished-only --guidance 8 --results /tmp/cfg8
                                                        # re-sample finished adapters at guidance 8
    python experiments/toy/run.py --finished-only --adapters all --results /tmp/all
                                                        # ... with the subject LoRAs kept at inference
    python experiments/toy/run.py --finished-only --adapters subjects --results /tmp/subjects
                                                        # ... with subject + FFN LoRAs, no relation LoRA
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from relvid.eval.metrics import mean_std
from relvid.eval.report import markdown_table, write_results
from relvid.models.adapter_file import RUN_ADAPTER_FILE, read_reversion
from relvid.toy.drivers.base import BASE_DIR
from relvid.toy.drivers.customize import (
    ADAPTER_SET_DESCRIPTIONS,
    ADAPTER_SETS,
    customize,
    load_base,
    load_customized,
    method_config,
    method_files,
)
from relvid.toy.drivers.datasets import build_exemplar_cache, exemplar_frames
from relvid.toy.drivers.evaluate import METRICS, TOY_SAMPLING, generate, score_videos, test_prompts, token_prompt_form
from relvid.toy.render import render_clip
from relvid.toy.world import EXEMPLAR_SUBJECTS, GENERIC_MOTIONS, RELATIONS

HERE = Path(__file__).resolve().parent
TABLES = {  # the paper's table number -> its rows
    "1": ["base", "direct_lora", "dreamrelation"],
    "2": ["dreamrelation", "wo_hmt", "wo_rcl", "wo_relation_lora", "wo_subject_lora", "wo_ffn_lora"],
    "3": ["placement_qk_v", "placement_q_kv", "placement_kv_q", "placement_v_qk"],
    "6": ["hmt_lambda_1", "hmt_lambda_25", "dreamrelation", "hmt_lambda_100"],
    # Table 1 again, beside rows run the authors' way: DreamRelation with the reference code's
    # zero_grad for unselected LoRAs, every semantic key of configs/reference.yaml, and Direct LoRA
    # trained the paper's 1000 iterations scaled as the toy budget scales 2400 (x 1/3)
    "1r": ["base", "direct_lora", "dreamrelation", "dreamrelation_zero_grad", "direct_lora_paper_steps", "reference"],
    # Table 4: MotionInversion alone and with the RCL (1000 steps: the paper's 3000 x 1/3)
    "4": ["motion_inversion", "motion_inversion_rcl"],
    # ReVersion (1000 steps: the paper's 3000 x 1/3): its test prompts carry the learned token <R> in place
    # of the relation's phrase ("A red circle is <R> a blue square."), encoded with the run's vectors
    "1v": ["reversion"],
}
TABLE_TITLES = {"1r": "Table 1 (reference semantics)", "4": "Table 4 (MotionInversion + RCL)",
                "1v": "Table 1 (ReVersion)"}
DEFAULT_TABLES = ["1", "2", "3"]  # the paper's Tables 1-3; Table 6 (lambda_m) and 1r on request


def table_methods(tables: list[str]) -> list[str]:
    """The methods of the named tables ("1", "6", ...), each once, in table order."""
    return list(dict.fromkeys(m for t in tables for m in TABLES[t]))


ALL_METHODS = table_methods(list(TABLES))
# Rows that are another row's run: QK/V is DreamRelation's own placement (methods/placement_qk_v.yaml only
# restates the default), so Table 3's QK/V row reuses the DreamRelation run instead of training it again.
SAME_RUN = {"placement_qk_v": "dreamrelation"}
GRID_FILE = "grid.json"


def method_steps(method: str, default: int) -> int:
    """A method's training steps: its own file's trainer.max_steps, else `default` (--steps); 0 for the base."""
    if method == "base":
        return 0
    own = OmegaConf.select(OmegaConf.load(method_files(method)[-1]), "trainer.max_steps", default=None)
    return int(own) if own is not None else int(default)


def kept_path(runs: str | Path, method: str, relation: str, seed: int, name: str = "metrics.json") -> Path:
    """The kept copy of a run's metrics file `name`: <runs>/<method>/<relation>_s<seed>.json, or
    <relation>_s<seed>_<variant>.json for metrics_<variant>.json (another guidance or adapter set)."""
    variant = name.removeprefix("metrics").removesuffix(".json")
    return Path(runs) / method / f"{relation}_s{seed}{variant}.json"


def world_fingerprint(base_dir: Path = BASE_DIR) -> str:
    """A hash of what the runs depend on: exemplar 0 of every relation, a clip of every generic
    motion, and the base model's files. Any change to the renderer, the exemplar seeds or the base
    changes it (a comment in the code does not)."""
    h = hashlib.sha256()
    for relation in RELATIONS:
        h.update(exemplar_frames(relation, 0).numpy().tobytes())
    for motion in GENERIC_MOTIONS:
        h.update(render_clip(motion, *EXEMPLAR_SUBJECTS, seed=0).video.numpy().tobytes())
    for f in sorted(Path(base_dir).iterdir()):
        if f.suffix in (".json", ".safetensors"):
            h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()[:16]


def check_work_folder(out: Path, steps: int, prompts: int, world: str | None = None) -> None:
    """Refuse to mix runs of another world or other settings into one grid."""
    expected = {"world": world or world_fingerprint(), "steps": steps, "prompts": prompts}
    path = out / GRID_FILE
    if path.is_file():
        found = json.loads(path.read_text())
        if found != expected:
            raise SystemExit(f"{out} holds runs of another grid ({path}: {found}; this one: {expected}). "
                             f"Delete {out} to start over, or pass --out <another folder>.")
        return
    if (out / "runs").is_dir() and any((out / "runs").iterdir()):
        raise SystemExit(f"{out}/runs has runs but no {GRID_FILE} to say which world and settings made them. "
                         f"Delete {out} to start over, or pass --out <another folder>.")
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(expected, indent=2) + "\n")


def metrics_name(guidance: float, adapters: str = "inference") -> str:
    """metrics.json at the toy sampler's guidance with the method's inference adapters; otherwise
    metrics[_all|_subjects][_cfg<g>].json beside it."""
    parts = ["metrics"] + ([adapters] if adapters != "inference" else []) + (
        [f"cfg{guidance:g}"] if guidance != TOY_SAMPLING.guidance_scale else [])
    return "_".join(parts) + ".json"


def run_settings(method: str, cfg, adapter_set: str, args: argparse.Namespace) -> dict:
    """What a run's metrics depend on besides (method, relation, seed), kept in its metrics file and
    compared before a finished run is reused."""
    settings = {"world": args.world, "steps": method_steps(method, args.steps), "prompts": args.prompts,
                "sampling_steps": TOY_SAMPLING.num_steps, "guidance": args.guidance, "adapters": adapter_set,
                "null_condition": "encoded" if cfg is None else str(cfg.sampling.null_condition)}
    if cfg is not None and cfg.method == "reversion":  # its test prompts carry the learned token
        settings["test_prompts"] = token_prompt_form(str(cfg.reversion.token))
    return settings


def check_run_settings(path: Path, found: dict, expected: dict) -> None:
    """Refuse a finished run's metrics made with other settings (files written before settings were
    kept have none and are taken as they are)."""
    settings = found.get("settings")
    if settings is not None and settings != expected:
        diffs = ", ".join(f"{k}: {settings.get(k)!r} there, {v!r} here" for k, v in expected.items()
                          if settings.get(k) != v)
        raise SystemExit(f"{path} was made with other settings ({diffs}). Delete it to run it again, or "
                         f"pass --out / --runs <other folders>.")


def run_one(method: str, relation: str, seed: int, args: argparse.Namespace) -> dict | None:
    """A run's metrics: read when done (in <out>, else its kept copy in --runs), else trained (unless
    --finished-only) and sampled. None when --finished-only and the run has neither adapters nor
    metrics yet. A finished run's metrics file is copied to --runs."""
    method = SAME_RUN.get(method, method)
    folder = Path(args.out) / "runs" / method / relation / f"seed{seed}"
    cfg = None if method == "base" else method_config(method, relation, Path(args.out) / "cache",
                                                      folder / "train")
    # the base has no adapters, a direct placement has one and ReVersion none (its token is in the prompts):
    # "all" is their inference set
    one_set = cfg is None or cfg.lora.placement == "direct" or cfg.method == "reversion"
    adapter_set = "inference" if one_set else args.adapters
    expected = run_settings(method, cfg, adapter_set, args)
    name = metrics_name(args.guidance, adapter_set)
    done, kept = folder / name, kept_path(args.runs, method, relation, seed, name)
    for path in (done, kept):
        if path.is_file():
            found = json.loads(path.read_text())
            check_run_settings(path, found, expected)
            if not kept.is_file() and "settings" in found:
                kept.parent.mkdir(parents=True, exist_ok=True)
                kept.write_text(path.read_text())
            return found
    if method == "base":
        model = load_base()
    else:
        adapters = folder / "train" / RUN_ADAPTER_FILE
        if not adapters.is_file():
            if args.finished_only:
                return None
            shutil.rmtree(folder / "train", ignore_errors=True)  # an interrupted run starts again
            customize(method, relation, Path(args.out) / "cache", folder / "train", seed=seed,
                      overrides=[f"trainer.max_steps={expected['steps']}", "trainer.progress_bar=false"])
        model = load_customized(adapters, adapters=adapter_set)
    # a ReVersion run's test prompts carry its token, encoded with the vectors it learned
    learned = read_reversion(adapters) if cfg is not None and cfg.method == "reversion" else None
    prompts = test_prompts(relation, args.prompts, seed=seed, token=None if learned is None else learned[0].token)
    # the toy sampler, at --guidance, with the method's own unconditional input (sampling.null_condition)
    settings = dataclasses.replace(TOY_SAMPLING, guidance_scale=args.guidance,
                                   null_condition=expected["null_condition"])
    frames = generate(model, prompts, settings=settings, progress=False, learned=learned)
    metrics, videos, _ = score_videos(frames, prompts)
    record = {**metrics, "method": method, "relation": relation, "seed": seed, "settings": expected,
              "videos": videos}
    text = json.dumps(record, indent=1) + "\n"
    for path in (done, kept):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return record


def table_rows(results: dict, methods: list[str], relations: list[str], seeds: list[int],
               steps: dict[str, int] | None = None) -> tuple[list[dict], list[str]]:
    """Rows of one table over the relations every one of its methods finished for every seed: per
    metric, mean +- std over seeds of the mean over those relations; with `steps` ({method: training
    steps}) a steps column. Returns (rows, relations)."""
    common = [r for r in relations if all((m, r, s) in results for m in methods for s in seeds)]
    rows = []
    for m in methods:
        row: dict = {"method": m}
        if steps is not None:
            row["steps"] = steps[m]
        for metric in METRICS:
            # a metric some finished run predates (metrics files older than the metric) stays empty
            if common and all(metric in results[(m, r, s)] for r in common for s in seeds):
                per_seed = [sum(results[(m, r, s)][metric] for r in common) / len(common) for s in seeds]
                row[metric] = {k: v for k, v in mean_std(per_seed).items() if k != "n"}
            else:
                row[metric] = None
        rows.append(row)
    return rows, common


def report(results: dict, args: argparse.Namespace, command: str, minutes: float) -> str:
    sections, all_rows, counted = [], [], set()
    for number, rows_of in TABLES.items():
        methods = [m for m in rows_of if m in args.methods]
        if number not in args.tables or not methods:
            continue
        title = TABLE_TITLES.get(number, f"Table {number}")
        steps = {m: method_steps(SAME_RUN.get(m, m), args.steps) for m in methods}
        rows, common = table_rows(results, methods, args.relations, args.seeds, steps)
        all_rows += [{"table": title, **row} for row in rows]
        counted |= {(m, r) for m in methods for r in common}
        over = ", ".join(common) if common else "none: no relation has every row finished for every seed"
        sections += [f"## {title}", "", f"Relations: {over}.", "", markdown_table(rows)]
    write_results(all_rows, args.results, stem="results")
    per_relation = ["| method | " + " | ".join(args.relations) + " |", "|---" * (len(args.relations) + 1) + "|"]
    for m in args.methods:
        cells = []
        for r in args.relations:
            done = [results[(m, r, s)]["relation_accuracy"] for s in args.seeds if (m, r, s) in results]
            if len(done) == len(args.seeds):
                stats = mean_std(done)
                cells.append(f"{stats['mean']:.2f} ± {stats['std']:.2f}")
            else:
                cells.append("—" if not done else f"{len(done)}/{len(args.seeds)} seeds")
        per_relation.append(f"| {m} | " + " | ".join(cells) + " |")
    missing = sorted(set(args.methods) - {m for (m, r, s) in results})
    outside = [(m, r, s) for m in args.methods for r in args.relations for s in args.seeds
               if (m, r, s) in results and (m, r) not in counted]
    if outside:  # finished runs no table averages yet: each on its own line
        sections += ["## Finished runs outside the tables", "",
                     "Their relation lacks a row or a seed in every table that holds them; one line per run.", "",
                     "| method | relation | seed | steps | " + " | ".join(METRICS) + " |",
                     "|---|---|---:|---:|" + "---:|" * len(METRICS)]
        for m, r, s in outside:
            cells = [f"{results[(m, r, s)][k]:.4f}" if k in results[(m, r, s)] else "–" for k in METRICS]
            sections.append(f"| {m} | {r} | {s} | {method_steps(SAME_RUN.get(m, m), args.steps)} | "
                            + " | ".join(cells) + " |")
        sections.append("")
    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, " \
              f"{'CUDA ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'CPU only'}"
    text = [
        f"- command: `{command.strip()}`",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; wall time "
        f"{minutes:.1f} min (finished runs are reused from {args.out})",
        f"- machine: {machine}",
        f"- grid asked: {len(args.relations)} relations x seeds {args.seeds} x {len(args.methods)} methods; "
        f"{args.steps} training steps per customization unless a method sets its own (the tables' steps "
        f"column); {args.prompts} test prompts per relation; "
        f"sampling: {TOY_SAMPLING.num_steps} Euler steps, guidance {args.guidance:g}, "
        + ADAPTER_SET_DESCRIPTIONS[args.adapters],
        f"- runs found: {len(results)} of {len(args.methods) * len(args.relations) * len(args.seeds)}"
        + (f"; methods with none: {', '.join(missing)}" if missing else "")
        + f" (per-run metrics and per-video verdicts: {_shown(args.runs)}/<method>/<relation>_s<seed>.json)",
        "- metrics: fractions; per table, mean ± std over seeds of the mean over the listed relations", "",
        *sections, "",
        "## Relation accuracy per relation (mean ± std over seeds; — not run)", "", *per_relation, "",
    ]
    if (Path(args.results) / "NOTES.md").is_file():
        text += ["Notes and probes behind these figures: [NOTES.md](NOTES.md).", ""]
    return "\n".join(text)


def _shown(path: str | Path) -> str:
    """A folder as the report shows it: relative to the repository when inside it."""
    path = Path(path).resolve()
    root = HERE.parents[1]
    return str(path.relative_to(root)) if path.is_relative_to(root) else str(path)


# RESULTS.md keeps what stands above this line (a hand-written summary of the current state);
# the script rewrites everything below it.
GENERATED_MARKER = "<!-- Everything below this line is written by experiments/toy/run.py. -->"


def write_report(path: Path, text: str) -> None:
    """Write the generated report below the marker, keeping the hand-written part above it."""
    old = path.read_text(encoding="utf-8") if path.is_file() else ""
    head = old[: old.index(GENERATED_MARKER)] if GENERATED_MARKER in old else "# Toy-world experiment grid\n\n"
    path.write_text(f"{head}{GENERATED_MARKER}\n{text}", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--relations", nargs="+", default=list(RELATIONS), choices=list(RELATIONS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--tables", nargs="+", choices=list(TABLES),
                   help="tables to run and report (default: 1 2 3, or with --methods the tables holding them; "
                        "6 is the lambda_m sweep)")
    p.add_argument("--methods", nargs="+", choices=ALL_METHODS,
                   help="only these rows (default: every row of --tables)")
    p.add_argument("--steps", type=int, default=800,
                   help="training steps per customization, for methods whose file sets no trainer.max_steps")
    p.add_argument("--prompts", type=int, default=10, help="test prompts per relation (1-10)")
    p.add_argument("--guidance", type=float, default=TOY_SAMPLING.guidance_scale,
                   help="classifier-free guidance when sampling the test prompts (metrics at another "
                        "guidance than the default are kept beside the default's)")
    p.add_argument("--adapters", default="inference", choices=ADAPTER_SETS,
                   help="adapters active when sampling: the method's inference set (default), all "
                        "trained adapters (subject LoRAs included), or the subject and FFN LoRAs without "
                        "the relation LoRA (metrics kept beside the default's)")
    p.add_argument("--finished-only", action="store_true",
                   help="train nothing: report the runs whose adapters exist (sampling them if this "
                        "guidance has no metrics yet)")
    p.add_argument("--out", default=str(HERE / "work"), help="per-run results and caches")
    p.add_argument("--results", default=str(HERE), help="where RESULTS.md and results.* go")
    p.add_argument("--runs", help="where every finished run's metrics file is kept as <method>/<relation>_s<seed>.json "
                                 "and read from when --out lacks it (default: <results>/runs, i.e. "
                                 "experiments/toy/runs)")
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args(argv)
    if args.tables is None:  # --methods alone: the tables that hold them (--methods hmt_lambda_1 -> Table 6)
        args.tables = ([t for t, rows in TABLES.items() if set(rows) & set(args.methods)] if args.methods
                       else DEFAULT_TABLES)
    args.methods = args.methods or table_methods(args.tables)
    args.runs = args.runs or str(Path(args.results) / "runs")  # experiments/toy/runs, committed
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.time()
    args.world = world_fingerprint()
    check_work_folder(Path(args.out), args.steps, args.prompts, args.world)
    if not args.finished_only:
        build_exemplar_cache(Path(args.out) / "cache", args.relations, progress=True)
    jobs = [(m, r, s) for m in args.methods for r in args.relations for s in args.seeds]
    results: dict[tuple[str, str, int], dict] = {}
    for i, (m, r, s) in enumerate(jobs, 1):
        t0 = time.time()
        metrics = run_one(m, r, s, args)
        if metrics is None:
            continue
        results[(m, r, s)] = metrics
        print(f"[{i}/{len(jobs)}] {m:18s} {r:13s} seed {s}: relation accuracy "
              f"{metrics['relation_accuracy']:.2f} ({time.time() - t0:.0f} s)", flush=True)
    command = "python experiments/toy/run.py " + " ".join(sys.argv[1:] if argv is None else argv)
    text = report(results, args, command, (time.time() - start) / 60)
    Path(args.results).mkdir(parents=True, exist_ok=True)
    write_report(Path(args.results) / "RESULTS.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

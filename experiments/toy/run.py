"""The toy world's experiment grid: Table 1 (base, direct LoRA, DreamRelation), Table 2 (w/o HMT,
w/o RCL, w/o relation / subject / FFN LoRA) and Table 3 (placements) over toy relations and seeds.

Resumable: every (method, relation, seed) writes its metrics to <out>/runs/.../metrics.json, and a
rerun skips finished ones. Writes experiments/toy/RESULTS.md (mean +- std over seeds of the mean
over relations, plus per-relation relation accuracy), results.{md,csv,json}.

    python experiments/toy/run.py                       # the full grid (hours on 2 CPU cores)
    python experiments/toy/run.py --relations orbiting --seeds 0 --methods base dreamrelation
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import torch

from relvid.eval.metrics import mean_std
from relvid.eval.report import write_results
from relvid.toy.customize import ADAPTER_FILE, METHODS, customize, load_base, load_customized
from relvid.toy.datasets import build_exemplar_cache
from relvid.toy.evaluate import METRICS, generate, score, test_prompts
from relvid.toy.world import RELATIONS

HERE = Path(__file__).resolve().parent
TABLES = {
    "Table 1": ["base", "direct_lora", "dreamrelation"],
    "Table 2": ["dreamrelation", "wo_hmt", "wo_rcl", "wo_relation_lora", "wo_subject_lora", "wo_ffn_lora"],
    "Table 3": ["placement_qk_v", "placement_q_kv", "placement_kv_q", "placement_v_qk"],
}
ALL_METHODS = list(dict.fromkeys(m for rows in TABLES.values() for m in rows))
# Rows that are another row's run: QK/V is DreamRelation's own placement (placements/qk_v.yaml only
# restates the default), so Table 3's QK/V row reuses the DreamRelation run instead of training it again.
SAME_RUN = {"placement_qk_v": "dreamrelation"}


def run_one(method: str, relation: str, seed: int, args: argparse.Namespace) -> dict:
    method = SAME_RUN.get(method, method)
    folder = Path(args.out) / "runs" / method / relation / f"seed{seed}"
    done = folder / "metrics.json"
    if done.is_file():
        return json.loads(done.read_text())
    if method == "base":
        model = load_base()
    else:
        adapters = folder / "train" / ADAPTER_FILE
        if not adapters.is_file():
            shutil.rmtree(folder / "train", ignore_errors=True)  # an interrupted run starts again
            customize(METHODS[method], relation, Path(args.out) / "cache", folder / "train", seed=seed,
                      overrides=[f"trainer.max_steps={args.steps}", "trainer.progress_bar=false"])
        model = load_customized(adapters)
    prompts = test_prompts(relation, args.prompts, seed=seed)
    metrics, _ = score(generate(model, prompts, progress=False), prompts)
    folder.mkdir(parents=True, exist_ok=True)
    done.write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--relations", nargs="+", default=list(RELATIONS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", default=ALL_METHODS, choices=ALL_METHODS)
    p.add_argument("--steps", type=int, default=800, help="training steps per customization")
    p.add_argument("--prompts", type=int, default=10, help="test prompts per relation (1-10)")
    p.add_argument("--out", default=str(HERE / "work"), help="per-run results and caches")
    p.add_argument("--results", default=str(HERE), help="where RESULTS.md and results.* go")
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.time()
    build_exemplar_cache(Path(args.out) / "cache", args.relations, progress=True)
    jobs = [(m, r, s) for m in args.methods for r in args.relations for s in args.seeds]
    results: dict[tuple[str, str, int], dict] = {}
    for i, (m, r, s) in enumerate(jobs, 1):
        t0 = time.time()
        results[(m, r, s)] = run_one(m, r, s, args)
        print(f"[{i}/{len(jobs)}] {m:18s} {r:13s} seed {s}: relation accuracy "
              f"{results[(m, r, s)]['relation_accuracy']:.2f} ({time.time() - t0:.0f} s)", flush=True)
    rows = []
    for m in args.methods:
        row: dict = {"method": m}
        for metric in METRICS:
            per_seed = [sum(results[(m, r, s)][metric] for r in args.relations) / len(args.relations)
                        for s in args.seeds]
            row[metric] = {k: v for k, v in mean_std(per_seed).items() if k != "n"}
        rows.append(row)
    write_results(rows, args.results, stem="results")
    per_relation = ["| method | " + " | ".join(args.relations) + " |", "|---" * (len(args.relations) + 1) + "|"]
    for m in args.methods:
        cells = []
        for r in args.relations:
            stats = mean_std([results[(m, r, s)]["relation_accuracy"] for s in args.seeds])
            cells.append(f"{stats['mean']:.2f} ± {stats['std']:.2f}")
        per_relation.append(f"| {m} | " + " | ".join(cells) + " |")
    table = (HERE / "results.md").read_text() if Path(args.results) == HERE else \
        (Path(args.results) / "results.md").read_text()
    command = "python experiments/toy/run.py " + " ".join(sys.argv[1:] if argv is None else argv)
    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, " \
              f"{'CUDA ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'CPU only'}"
    text = [
        "# Toy-world experiment grid", "",
        f"- command: `{command.strip()}`",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; wall time "
        f"{(time.time() - start) / 60:.1f} min (finished runs are reused from {args.out})",
        f"- machine: {machine}",
        f"- grid: {len(args.relations)} relations x seeds {args.seeds} x {len(args.methods)} methods; "
        f"{args.steps} training steps per customization; {args.prompts} test prompts per relation",
        "- metrics: fractions; mean ± std over seeds of the mean over relations", "",
        "## All rows", "", table, "",
        "## Relation accuracy per relation (mean ± std over seeds)", "", *per_relation, "",
    ]
    notes = HERE / "NOTES.md"
    if notes.is_file():
        text += ["## Notes", "", notes.read_text()]
    (Path(args.results) / "RESULTS.md").write_text("\n".join(text) + "\n", encoding="utf-8")
    print("\n".join(text))
    return 0


if __name__ == "__main__":
    sys.exit(main())

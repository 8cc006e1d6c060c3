"""The paper's Tables 1-7 on Mochi: train every row, sample and evaluate it, and write each table in the
paper's shape, for the relations you choose.

Every row is a config file in table<N>/ layered after configs/train.yaml (the paper's settings); rows
whose resolved training configs are equal (DreamRelation appears in six tables) share one run. A job
is one (run, relation): `relvid train` into <out>/runs/<relation>/<run>, then `relvid evaluate` into
<out>/eval/<relation>/ with the run's name as its method. Everything resumes: a finished run is not
trained again, an interrupted one goes on from its newest checkpoint (resume=last), evaluation reuses
its videos and judge answers, and an evaluated run is skipped.

    # one GPU machine, Table 4 on two relations (the base model from MOCHI_PATH)
    python experiments/paper/run.py --tables 4 --relations shaking_hands high_five \
        --cache 'data/cache/{relation}' -- --judge api --judge-url $URL --judge-model qwen-vl-max \
        --clip-path $CLIP --i3d-path $I3D --reference-videos $ANIMALKINGDOM
    # a SLURM array, one job per run (experiments/paper/paper.sbatch), then the tables
    python experiments/paper/run.py --tables 4 --relations shaking_hands high_five --list
    python experiments/paper/run.py --tables 4 --relations shaking_hands high_five --job $SLURM_ARRAY_TASK_ID ...
    python experiments/paper/run.py --tables 4 --relations shaking_hands high_five --report

Arguments after `--` go to every `relvid evaluate` (judge, metrics, sampling); --set KEY=VALUE goes
to both commands (model.path, model.dtype, ...), --train-set to training alone.

ReVersion's row learns a token, not a relation prompt: it is evaluated on its own prompts, one subject
pair per line written around the token ("A dog is <R> a cat."), in <out>/prompts/reversion.txt
(REVERSION_PAIRS; --reversion-prompts names another file, with a {relation} field for one per relation).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
TRAIN_BASE = REPO / "configs" / "train.yaml"
METRICS = ("relation_accuracy", "clip_t", "temporal_consistency", "fvd")
TITLES = {"relation_accuracy": "Relation Accuracy", "clip_t": "CLIP-T", "temporal_consistency": "Temporal Consistency",
          "fvd": "FVD"}
BASE = "mochi"  # the base model's row: sampled without adapters, never trained
# ReVersion's test prompts: "A dog is <R> a cat." for ten subject pairs of the evaluation prompts
REVERSION_PAIRS = (("dog", "cat"), ("fox", "rabbit"), ("bear", "wolf"), ("panda", "koala"), ("penguin", "seal"),
                   ("robot", "teddy bear"), ("astronaut", "alien"), ("monkey", "parrot"), ("kangaroo", "wallaby"),
                   ("clown", "mime"))


@dataclass(frozen=True)
class Row:
    label: str  # as the paper prints it
    config: str | None  # table<N>/<name>.yaml; None: the base model
    missing: str | None = None  # why relvid cannot run this row


TABLES: dict[str, tuple[str, list[Row]]] = {
    "1": ("Table 1: comparison with baselines", [
        Row("Mochi", None),
        Row("ReVersion", "table1/reversion.yaml"),
        Row("Direct LoRA", "table1/direct_lora.yaml"),
        Row("MotionInversion", "table1/motion_inversion.yaml"),
        Row("DreamRelation", "table1/dreamrelation.yaml"),
    ]),
    "2": ("Table 2: ablation of the components", [
        Row("w/o HMT", "table2/wo_hmt.yaml"),
        Row("w/o RCL", "table2/wo_rcl.yaml"),
        Row("w/o Relation LoRA", "table2/wo_relation_lora.yaml"),
        Row("w/o Subject LoRA", "table2/wo_subject_lora.yaml"),
        Row("w/o FFN LoRA", "table2/wo_ffn_lora.yaml"),
        Row("DreamRelation", "table2/dreamrelation.yaml"),
    ]),
    "3": ("Table 3: placement of the relation / subject LoRAs", [
        Row("V/QK", "table3/v_qk.yaml"),
        Row("Q/KV", "table3/q_kv.yaml"),
        Row("KV/Q", "table3/kv_q.yaml"),
        Row("QK/V", "table3/qk_v.yaml"),
    ]),
    "4": ("Table 4: RCL added to MotionInversion", [
        Row("MotionInversion", "table4/motion_inversion.yaml"),
        Row("MotionInversion + RCL", "table4/motion_inversion_rcl.yaml"),
    ]),
    "5": ("Table 5: the RCL weight lambda_1", [
        Row("lambda_1 = 0.01", "table5/lambda_1_0_01.yaml"),
        Row("lambda_1 = 0.1", "table5/lambda_1_0_1.yaml"),
        Row("lambda_1 = 1.0", "table5/lambda_1_1.yaml"),
    ]),
    "6": ("Table 6: the hybrid mask weight lambda_m", [
        Row(f"lambda_m = {m}", f"table6/lambda_m_{m}.yaml") for m in (1, 25, 50, 100)
    ]),
    "7": ("Table 7: positives and negatives of RCL (n_pos, n_neg)", [
        Row(f"({p}, {n})", f"table7/n_pos_{p}_n_neg_{n}.yaml") for p, n in ((1, 10), (2, 10), (4, 10), (2, 30), (4, 60))
    ]),
}


@functools.lru_cache(maxsize=1)
def _train_base():
    from relvid.config import load_config

    return load_config([TRAIN_BASE], ["data.cache_dir=x", "output_dir=x"])


def row_config(config: str):
    """A row's training config: schema <- configs/train.yaml <- the row, checked as `relvid train` checks it."""
    from relvid.config import ConfigError, finalize

    try:
        return finalize(OmegaConf.merge(_train_base(), OmegaConf.load(HERE / config)))
    except Exception as err:  # OmegaConf's key and type errors: name the row's file
        if isinstance(err, ConfigError):
            raise ConfigError(f"{HERE / config}: {err}") from None
        raise ConfigError(f"{HERE / config}: {str(err).splitlines()[0]}") from None


def run_key(config: str) -> str:
    """The resolved training config of a row, hashed: rows with equal keys are one run."""
    return hashlib.sha256(OmegaConf.to_yaml(row_config(config), resolve=True).encode()).hexdigest()


@functools.lru_cache(maxsize=1)
def run_names() -> dict[str, str]:
    """Row config -> its run's name: the file stem of the first row (in table order) with that config."""
    names: dict[str, str] = {}
    first: dict[str, str] = {}
    for _, rows in TABLES.values():
        for row in rows:
            if row.config is None or row.config in names:
                continue
            key = run_key(row.config)
            first.setdefault(key, Path(row.config).stem)
            names[row.config] = first[key]
    return names


def row_run(row: Row, names: dict[str, str]) -> str | None:
    if row.missing:
        return None
    return BASE if row.config is None else names[row.config]


def plan(tables: list[str], relations: list[str]) -> list[tuple[str, str, str | None]]:
    """The jobs (run, relation, row config or None for the base), each once, run-major."""
    names = run_names()
    runs: dict[str, str | None] = {}
    for table in tables:
        for row in TABLES[table][1]:
            name = row_run(row, names)
            if name is not None:
                runs.setdefault(name, row.config)
    return [(name, relation, config) for name, config in runs.items() for relation in relations]


def _article(noun: str) -> str:
    return f"{'An' if noun[0] in 'aeiou' else 'A'} {noun}"


def reversion_prompts(token: str) -> list[str]:
    """ReVersion's test prompts: each pair of REVERSION_PAIRS around the token."""
    return [f"{_article(a)} is {token} {_article(b).lower()}." for a, b in REVERSION_PAIRS]


def reversion_prompts_file(out: Path, relation: str, token: str, given: str | None) -> Path:
    """The prompts file a ReVersion row is evaluated on: `given` (its {relation} filled in) or
    <out>/prompts/reversion.txt, written from REVERSION_PAIRS."""
    if given:
        return Path(given.format(relation=relation))
    from relvid.files import atomic_write

    path = out / "prompts" / "reversion.txt"
    text = "\n".join(reversion_prompts(token)) + "\n"
    if not path.is_file() or path.read_text() != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, text)
    return path


def run_job(job: tuple[str, str, str | None], args: argparse.Namespace) -> None:
    """Train (unless the base model or finished) and evaluate (unless evaluated) one run on one relation."""
    from relvid.cli import main

    name, relation, config = job
    out = Path(args.out)
    run_dir = out / "runs" / relation / name
    eval_dir = out / "eval" / relation
    shared = [f"--set={item}" for item in args.set]
    if config is not None and not (run_dir / "adapters" / "relvid_adapters.safetensors").is_file():
        started = any((run_dir / "checkpoints").glob("*.ckpt"))
        argv = ["train", str(TRAIN_BASE), str(HERE / config), "--relation", relation,
                f"data.cache_dir={args.cache.format(relation=relation)}", f"output_dir={run_dir}",
                "resume=last" if started else "overwrite=true", *args.set, *args.train_set]
        print("relvid", " ".join(argv), flush=True)
        if not args.dry_run and main(argv) != 0:
            raise SystemExit(f"training {name} on {relation} failed")
    if (eval_dir / name / "metrics.json").is_file():
        return
    what = ["--base"] if config is None else ["--adapters", str(run_dir / "adapters")]
    if config is not None and row_config(config).method == "reversion":  # prompts written around its token
        token = str(row_config(config).reversion.token)
        prompts = reversion_prompts_file(out, relation, token, args.reversion_prompts)
        what.append(f"evaluate.prompts_file={prompts}")
    argv = ["evaluate", "--relation", relation, *what, "--method", name, "--out", str(eval_dir), *shared,
            *args.evaluate_args]
    print("relvid", " ".join(argv), flush=True)
    if not args.dry_run and main(argv) != 0:
        raise SystemExit(f"evaluating {name} on {relation} failed")


def _value(entry) -> float | None:
    if entry is None:
        return None
    return float(entry["mean"]) if isinstance(entry, dict) else float(entry)


def table_markdown(table: str, relations: list[str], out: Path) -> tuple[str, int, int]:
    """The table in the paper's shape: its rows, its metrics, each the mean (± std) over the relations
    evaluated for every row; with the runs found and asked for."""
    title, rows = TABLES[table]
    names = run_names()
    results: dict[tuple[str, str], dict] = {}
    for relation in relations:
        path = out / "eval" / relation / "results.json"
        if path.is_file():
            for r in json.loads(path.read_text())["rows"]:
                results[(r["method"], relation)] = r
    runnable = [(row, row_run(row, names)) for row in rows]
    asked = [(name, rel) for _, name in runnable if name for rel in relations]
    found = sum(1 for key in asked if key in results)
    common = [rel for rel in relations if all((name, rel) in results for _, name in runnable if name)]
    lines = [f"### {title}", "", f"relations: {', '.join(common) or 'none complete yet'}", "",
             "| Method | " + " | ".join(TITLES[m] for m in METRICS) + " |", "|---" * (len(METRICS) + 1) + "|"]
    for row, name in runnable:
        if name is None:
            lines.append(f"| {row.label} | " + " | ".join(["n/a"] * len(METRICS)) + f" |  ({row.missing})")
            continue
        cells = []
        for metric in METRICS:
            values = [_value(results[(name, rel)].get(metric)) for rel in common]
            values = [v for v in values if v is not None]
            if not values:
                cells.append("-")
                continue
            mean = sum(values) / len(values)
            std = (sum((v - mean) ** 2 for v in values) / len(values)) ** 0.5
            digits = 0 if metric == "fvd" else 4
            cells.append(f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if len(values) > 1 else ""))
        lines.append(f"| {row.label} | " + " | ".join(cells) + " |")
    lines += ["", f"runs found: {found} of {len(asked)}", ""]
    return "\n".join(lines), found, len(asked)


def write_report(tables: list[str], relations: list[str], out: Path) -> Path:
    from relvid.files import atomic_write

    parts = [table_markdown(t, relations, out)[0] for t in tables]
    path = out / "tables.md"
    atomic_write(path, "\n".join(["# The paper's tables on Mochi (experiments/paper/run.py)", "", *parts]))
    return path


def parse(argv: list[str]) -> argparse.Namespace:
    if "--" in argv:
        i = argv.index("--")
        argv, evaluate_args = argv[:i], argv[i + 1:]
    else:
        evaluate_args = []
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tables", nargs="+", default=["1"], choices=sorted(TABLES), help="the paper's tables to run")
    p.add_argument("--relations", nargs="+", default=["shaking_hands"], help="relations (names or aliases)")
    p.add_argument("--cache", default="data/cache/{relation}", help="each relation's clip cache ({relation} is "
                                                                     "replaced)")
    p.add_argument("--out", default="outputs/paper", help="runs/, eval/ and tables.md go here")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="for train and evaluate")
    p.add_argument("--train-set", action="append", default=[], metavar="KEY=VALUE", help="for train only")
    p.add_argument("--reversion-prompts", metavar="FILE", help="ReVersion's evaluation prompts, one per line with "
                   "its token ({relation} is replaced); default: <out>/prompts/reversion.txt from REVERSION_PAIRS")
    p.add_argument("--job", type=int, help="run only this job (a SLURM array index; --list shows them)")
    p.add_argument("--list", action="store_true", help="print the jobs, one per line, and exit")
    p.add_argument("--report", action="store_true", help="only write the tables from what is evaluated")
    p.add_argument("--dry-run", action="store_true", help="print the commands without running them")
    args = p.parse_args(argv)
    args.evaluate_args = evaluate_args
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    from relvid import relations

    args.relations = [relations.resolve(r).name if relations.is_known(r) else r for r in args.relations]
    jobs = plan(args.tables, args.relations)
    if args.list:
        for i, (name, relation, config) in enumerate(jobs):
            print(f"{i}\t{name}\t{relation}\t{config or '(base model)'}")
        return 0
    if args.job is not None:
        if not 0 <= args.job < len(jobs):
            raise SystemExit(f"--job {args.job}: there are {len(jobs)} jobs (0 .. {len(jobs) - 1}); see --list")
        run_job(jobs[args.job], args)
        return 0
    if not args.report:
        for job in jobs:
            run_job(job, args)
    path = write_report(args.tables, args.relations, Path(args.out))
    print(path.read_text(), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""`relvid analyze <kind>`: the paper's explainability analyses and adapter attribution (docs/analysis.md).

Every kind reads the one config schema (sections analyze, sampling, model, judge); the flags are short
aliases of its keys. A toy base folder in --model selects the toy codec, text encoder and clip size."""

from __future__ import annotations

import argparse

from relvid.commands.options import add_config_arguments, alias, command_config

RELATION_HELP = "relation or alias: names the output folder (<output_dir>/analysis) and the judge's question"
KINDS = {
    "qkv-subspace": "subspace similarity of the Q, K, V weights per block (Fig. 5b) and of each adapter's update",
    "features": "Q, K, V feature maps of the vision tokens at a sampling step (Fig. 3, 5a)",
    "attention": "attention maps between the vision tokens and a phrase of the prompt (Fig. 7a)",
    "attribution": "the evaluation's metrics with each adapter subset: which adapter carries the relation",
    "exemplar-fit": "flow-matching error on a cache's exemplars inside and outside the subjects, per adapter subset",
}


def _run(kind: str, cfg) -> dict:
    # one branch per kind, so that each analysis module is imported only when it runs
    if kind == "qkv-subspace":
        from relvid.analysis.qkv_subspace import run
    elif kind == "features":
        from relvid.analysis.features import run
    elif kind == "attention":
        from relvid.analysis.attention import run
    elif kind == "exemplar-fit":
        from relvid.analysis.exemplar_fit import run
    else:
        from relvid.analysis.attribution import run
        from relvid.commands.toy import toy_video_scorer

        return run(cfg, toy_scorer=toy_video_scorer)  # the toy judge, for --judge toy (or auto on the toy base)
    return run(cfg)


def cmd_analyze(args: argparse.Namespace) -> int:
    from pathlib import Path

    from relvid.analysis.parts import apply_model_folder
    from relvid.config import save_config, to_yaml

    cfg = command_config(args)
    apply_model_folder(cfg)
    if cfg.analyze.cache_dir is None:  # exemplar-fit reads the relation's cache unless told another
        cfg.analyze.cache_dir = cfg.data.cache_dir
    if args.print_config:
        print(to_yaml(cfg, "analyze"), end="")
        return 0
    save_config(cfg, Path(cfg.analyze.out) / f"{args.kind}.config.yaml", command="analyze")
    for path in _run(args.kind, cfg).values():
        print(f"wrote {path}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("analyze", help="the paper's analyses (Q/K/V subspaces, features, attention maps) "
                                              "and adapter attribution, as figures and JSON")
    kinds = p.add_subparsers(dest="kind", required=True, metavar="KIND")
    for kind, text in KINDS.items():
        q = kinds.add_parser(kind, help=text, description=text)
        add_config_arguments(q, RELATION_HELP)
        alias(q, "--model", "--model-path", key="model.path",
              help="a local Mochi folder (diffusers format) or a toy base folder (relvid/toy/base_model)")
        alias(q, "--adapters", key="analyze.adapters", action="append",
              help="repeatable: anything `relvid sample` takes (.ckpt, adapters/ folder, adapter or diffusers file)")
        alias(q, "--out", key="analyze.out", help="output folder (default <output_dir>/analysis)")
        alias(q, "--device", key="analyze.device", help="default: a GPU when present (bf16), else the CPU (fp32)")
        q.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="config override (the same as a bare KEY=VALUE)")
        q.set_defaults(func=cmd_analyze)
        if kind == "qkv-subspace":
            alias(q, "--ranks", key="analyze.ranks", type=int, nargs="+", help="e.g. --ranks 1 4 16 64")
            continue
        if kind == "exemplar-fit":
            alias(q, "--cache", key="analyze.cache_dir",
                  help="a clip cache with subject masks, e.g. the one the adapters trained on (default data.cache_dir)")
            alias(q, "--sigmas", key="analyze.sigmas", type=float, nargs="+",
                  help="noise levels in [0, 1], each reported on its own, e.g. --sigmas 0.5 0.98 "
                       "(default: levels drawn uniformly, as in training)")
            alias(q, "--subsets", key="analyze.subsets", nargs="+",
                  help="none relation+ffn subjects+ffn all (default), subject1+ffn subject2+ffn")
            alias(q, "--seed", "--seeds", key="analyze.seeds", type=int, nargs="+", help="the noise seed (the first)")
            alias(q, "--draws", key="analyze.draws", type=int, help="noise draws per exemplar (default 4)")
            continue
        alias(q, "--prompt", "-p", key="analyze.prompts", action="append",
              help="the prompt" + (" (repeatable)" if kind == "attribution" else ""))
        alias(q, "--seed", "--seeds", key="analyze.seeds", type=int, nargs="+",
              help="sampling seeds" if kind == "attribution" else "the noise seed (the first is used)")
        alias(q, "--sampling-steps", key="sampling.num_steps", type=int, help="Euler steps of the schedule")
        alias(q, "--guidance", key="sampling.guidance_scale", type=float, help="CFG scale")
        if kind in ("features", "attention"):
            alias(q, "--step", "--steps", key="analyze.steps", type=int, nargs="+",
                  help="schedule step indices to read; negative from the end (-4: step 60 of 64, the paper's)")
        if kind == "features":
            alias(q, "--clip", key="analyze.clip", help="a clip file of a cache instead of a prompt")
        if kind == "attention":
            alias(q, "--phrase", key="analyze.phrase", help="words of the prompt, e.g. orbiting")
        if kind == "attribution":
            alias(q, "--prompts-file", key="analyze.prompts_file", help="one prompt per line")
            alias(q, "--subsets", key="analyze.subsets", nargs="+",
                  help="none relation+ffn subjects+ffn all (default), subject1+ffn subject2+ffn")
            alias(q, "--judge", key="analyze.judge", choices=("auto", "toy", "vlm", "none"),
                  help="auto: the toy judge for a toy model, the `judge` section's VLM if set, else none")

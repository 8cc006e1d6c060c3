"""`relvid train`: YAML files and key=value overrides -> a trained relation LoRA triplet."""

from __future__ import annotations

import argparse


def split_config_args(items: list[str]) -> tuple[list[str], list[str]]:
    """YAML paths and key=value overrides may be given in any order."""
    return [i for i in items if "=" not in i], [i for i in items if "=" in i]


def cmd_train(args: argparse.Namespace) -> int:
    from relvid.config import load_config, relation_config_path, to_yaml
    from relvid.training.run import run

    paths, overrides = split_config_args(args.config)
    if args.relation:
        rel_cfg = relation_config_path(args.relation, args.configs_dir)
        if rel_cfg is not None:
            paths.append(str(rel_cfg))
        overrides.insert(0, f"relation={args.relation}")
    cfg = load_config(paths, overrides)
    if args.print_config:
        print(to_yaml(cfg))
        return 0
    out = run(cfg)
    print(f"done: {out} (adapters in {out / 'adapters'}, logs: tensorboard --logdir {out / 'tensorboard'})")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("train", help="train a relation LoRA triplet")
    p.add_argument("config", nargs="*", help="YAML files and key=value overrides, merged in order")
    p.add_argument("--relation", "-r", help="relation or alias; also merges relations/<name>.yaml from the configs")
    p.add_argument("--configs-dir", help="folder holding relations/<name>.yaml (default: the configs shipped with "
                                         "relvid, which the repository's configs/ links to)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.set_defaults(func=cmd_train, takes_overrides=True)

"""`relvid train`: YAML files and key=value overrides -> a trained relation LoRA triplet."""

from __future__ import annotations

import argparse

from relvid.commands.options import add_config_arguments, config_for


def cmd_train(args: argparse.Namespace) -> int:
    from relvid.training.run import run

    cfg = config_for(args, "train")
    if cfg is None:
        return 0
    out = run(cfg)
    print(f"done: {out} (adapters in {out / 'adapters'}, logs: tensorboard --logdir {out / 'tensorboard'})")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("train", help="train a relation LoRA triplet")
    add_config_arguments(p, relation_help="relation or alias")
    p.set_defaults(func=cmd_train)

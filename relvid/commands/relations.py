"""`relvid relations`: list the known relations, or resolve an alias."""

from __future__ import annotations

import argparse


def cmd_relations(args: argparse.Namespace) -> int:
    from relvid import relations

    if args.resolve:
        print(relations.resolve(args.resolve).name)
        return 0
    for rel in relations.registry().values():
        print(f"{rel.name:22s} {rel.ntu_action}  aliases: {', '.join(rel.aliases):32s} {rel.training_prompt}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("relations", help="list the known relations (or resolve an alias with --resolve)")
    p.add_argument("--resolve", metavar="NAME")
    p.set_defaults(func=cmd_relations)

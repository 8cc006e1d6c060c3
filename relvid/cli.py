"""`relvid <command>`: train, preprocess, sample, evaluate, export, demo and helpers (`relvid <command> -h`)."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

# Weights and tokenizers are only ever read from local folders: make any accidental hub access
# fail fast instead of hanging on a machine without internet.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _split_config_args(items: list[str]) -> tuple[list[str], list[str]]:
    """YAML paths and key=value overrides may be given in any order."""
    paths = [i for i in items if "=" not in i]
    overrides = [i for i in items if "=" in i]
    return paths, overrides


def relation_config_path(name: str, configs_dir: Path) -> Path | None:
    """configs/relations/<canonical>.yaml for a relation name or alias, if that file exists."""
    from relvid import relations

    path = configs_dir / "relations" / f"{relations.resolve(name).name}.yaml"
    return path if path.is_file() else None


def cmd_train(args: argparse.Namespace) -> int:
    from relvid.config import load_config
    from relvid.train import run

    paths, overrides = _split_config_args(args.config)
    if args.relation:
        rel_cfg = relation_config_path(args.relation, Path(args.configs_dir))
        if rel_cfg is not None:
            paths.append(str(rel_cfg))
        overrides.insert(0, f"relation={args.relation}")
    cfg = load_config(paths, overrides)
    if args.print_config:
        from relvid.config import to_yaml

        print(to_yaml(cfg))
        return 0
    out = run(cfg)
    print(f"done: {out} (adapters in {out / 'adapters'}, logs: tensorboard --logdir {out / 'tensorboard'})")
    return 0


def _load_adapter_source(path: Path):
    """(spec, adapter state) from a relvid checkpoint (.ckpt) or a relvid_adapters.safetensors."""
    from relvid.models.lora import load_adapters

    if path.is_dir():
        path = path / "relvid_adapters.safetensors"
    if path.suffix == ".ckpt":
        from relvid.checkpoints import adapters_from_checkpoint

        return adapters_from_checkpoint(path)
    spec, state, _ = load_adapters(path)
    return spec, state


def cmd_export(args: argparse.Namespace) -> int:
    from relvid.models.lora_io import export_state_dict

    spec, state = _load_adapter_source(Path(args.source))
    out = export_state_dict(state, spec, Path(args.out))
    print(f"wrote {out} (inference set: relation + ffn; load with MochiPipeline.load_lora_weights)")
    if args.triplet:
        from relvid.models.lora import save_adapter_state

        triplet = save_adapter_state(Path(args.out) / "relvid_adapters.safetensors", state, spec)
        print(f"wrote {triplet} (full triplet, relvid format)")
    return 0


def cmd_import_reference(args: argparse.Namespace) -> int:
    from relvid.models.lora_io import import_reference

    out = import_reference(Path(args.file), Path(args.out), qkv_alpha=args.qkv_alpha, out_alpha=args.out_alpha)
    print(f"wrote {out}")
    return 0


def cmd_validate_cache(args: argparse.Namespace) -> int:
    from relvid.data.cache import ClipCache

    cache = ClipCache(args.cache_dir)
    problems = cache.validate()
    ids = cache.clip_ids()
    for clip_id, problem in problems:
        print(f"BAD  {clip_id}: {problem}")
    print(f"{len(ids) - len(problems)} of {len(ids)} clips valid in {args.cache_dir}; "
          f"{len(cache.manifest.get('failures', []))} preprocessing failures listed in the manifest")
    return 1 if problems else 0


def cmd_random_cache(args: argparse.Namespace) -> int:
    from relvid import relations
    from relvid.data.random_cache import write_random_cache

    rel = relations.resolve(args.relation).name
    write_random_cache(args.out, n_clips=args.clips, relation=rel, seed=args.seed)
    print(f"wrote a random {args.clips}-clip cache for {rel} to {args.out} (for smoke tests with model.preset=tiny)")
    return 0


def cmd_relations(args: argparse.Namespace) -> int:
    from relvid import relations

    if args.resolve:
        print(relations.resolve(args.resolve).name)
        return 0
    for rel in relations.registry().values():
        print(f"{rel.name:22s} {rel.ntu_action}  aliases: {', '.join(rel.aliases):32s} {rel.training_prompt}")
    return 0


# Each module defines register(subparsers); heavy imports stay inside the command functions.
COMMAND_MODULES = (
    "relvid.commands.preprocess",  # preprocess, mask-sheet
    "relvid.commands.generate",  # sample, evaluate
    "relvid.commands.toy",  # toy-base, demo
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="relvid", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a relation LoRA triplet")
    p.add_argument("config", nargs="*", help="YAML files and key=value overrides, merged in order")
    p.add_argument("--relation", "-r", help="relation or alias; also merges configs/relations/<name>.yaml")
    p.add_argument("--configs-dir", default="configs", help="where configs/relations/ lives (default: ./configs)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("export", help="write the inference LoRA (relation + ffn) as a diffusers file")
    p.add_argument("source", help="a relvid checkpoint (.ckpt), relvid_adapters.safetensors, or a run's adapters/ folder")
    p.add_argument("--out", required=True, help="output folder for pytorch_lora_weights.safetensors")
    p.add_argument("--triplet", action="store_true", help="also write the full triplet in relvid's format")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("import-reference", help="convert a reference-implementation *.lora.pt to a diffusers LoRA")
    p.add_argument("file")
    p.add_argument("--out", required=True)
    p.add_argument("--qkv-alpha", type=float, default=None,
                   help="LoRA alpha of the Q/K/V LoRAs in the reference run (its qkv_proj_lora_alpha); default = rank")
    p.add_argument("--out-alpha", type=float, default=None,
                   help="LoRA alpha of the FFN (attention-out) LoRA (its out_proj_lora_alpha); default = rank")
    p.set_defaults(func=cmd_import_reference)

    p = sub.add_parser("validate-cache", help="check every clip of a clip cache")
    p.add_argument("cache_dir")
    p.set_defaults(func=cmd_validate_cache)

    p = sub.add_parser("random-cache", help="write a small random clip cache (smoke tests, tiny model)")
    p.add_argument("out")
    p.add_argument("--relation", default="shaking_hands")
    p.add_argument("--clips", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_random_cache)

    p = sub.add_parser("relations", help="list the known relations (or resolve an alias with --resolve)")
    p.add_argument("--resolve", metavar="NAME")
    p.set_defaults(func=cmd_relations)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from relvid.config import ConfigError
    from relvid.relations import UnknownRelationError

    parser = build_parser()
    # Overrides may come after options (`train configs/train.yaml --relation hug optim.lr=1e-4`),
    # which argparse's positional list does not collect by itself.
    args, rest = parser.parse_known_args(argv)
    if rest:
        if args.command != "train" or any(r.startswith("-") for r in rest):
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        args.config = [*args.config, *rest]
    try:
        return args.func(args)
    except (ConfigError, UnknownRelationError, FileNotFoundError, FileExistsError, ValueError) as err:
        # Expected user errors: one clear line, no traceback.
        print(f"relvid {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

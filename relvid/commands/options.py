"""The command line every config-driven command shares: YAML files and key=value overrides against
the one schema (relvid.config), ``--relation`` (which also merges the relation's config file),
``--print-config``, and short flags that are aliases of schema keys."""

from __future__ import annotations

import argparse

from omegaconf import DictConfig

_KEY = "key:"  # argparse dest prefix of a flag that sets a schema key


def add_config_arguments(p: argparse.ArgumentParser, relation_help: str) -> None:
    """Positional YAML files / key=value overrides, --relation, --configs-dir and --print-config."""
    p.add_argument("config", nargs="*", help="YAML files and key=value overrides, merged in order")
    p.add_argument("--relation", "-r", help=relation_help + "; also merges relations/<name>.yaml from the configs")
    p.add_argument("--configs-dir", help="folder holding relations/<name>.yaml (default: the configs shipped with "
                                         "relvid, which the repository's configs/ links to)")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config this command would use and exit (loads no model)")
    p.set_defaults(takes_overrides=True)


def alias(p, *flags: str, key: str, help: str = "", **kwargs) -> None:
    """A flag that sets schema key ``key`` (given flags win over YAML files, key=value overrides over both)."""
    if kwargs.get("action") == "store_true":
        kwargs.update(action="store_const", const=True)
    p.add_argument(*flags, dest=_KEY + key, default=None, help=f"{help} (= {key})".lstrip(), **kwargs)


def split_config_args(items: list[str]) -> tuple[list[str], list[str]]:
    """YAML paths and key=value overrides may be given in any order."""
    return [i for i in items if "=" not in i], [i for i in items if "=" in i]


def flag_values(args: argparse.Namespace) -> dict:
    """The keys set by alias flags, as a nested dict (``{"sampling": {"num_steps": 7}}``)."""
    values: dict = {}
    for dest, value in vars(args).items():
        if dest.startswith(_KEY) and value is not None:
            *parents, leaf = dest[len(_KEY):].split(".")
            node = values
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = value
    return values


def command_config(args: argparse.Namespace, implied: tuple[str, ...] = ()) -> DictConfig:
    """Schema <- the relation's config file <- YAML files <- flags <- ``implied`` <- key=value overrides.

    The relation's file (its cache and output folders) comes first: anything you write wins over it."""
    from relvid.config import load_config, relation_config_path

    paths, overrides = split_config_args([*args.config, *getattr(args, "set", [])])
    if args.relation:
        rel_cfg = relation_config_path(args.relation, args.configs_dir)
        if rel_cfg is not None:
            paths.insert(0, str(rel_cfg))
        overrides.insert(0, f"relation={args.relation}")
    return load_config(paths, [*implied, *overrides], values=flag_values(args))


def config_for(args: argparse.Namespace, command: str, implied: tuple[str, ...] = ()) -> DictConfig | None:
    """The command's resolved config; None when --print-config asked for it to be printed instead."""
    from relvid.config import to_yaml

    cfg = command_config(args, implied)
    if args.print_config:
        print(to_yaml(cfg, command), end="")
        return None
    return cfg

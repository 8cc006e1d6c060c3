"""`relvid <command>`: preprocess, train, sample, evaluate, export, demo and helpers (`relvid <command> -h`)."""

from __future__ import annotations

import argparse
import errno
import os
import sys

from relvid.commands import adapters, analyze, cache, generate, preprocess, relations, toy, train

# Weights and tokenizers are only ever read from local folders: make any accidental hub access
# fail fast instead of hanging on a machine without internet.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# In pipeline order; each module defines register(subparsers) and keeps heavy imports inside its
# command functions, so `relvid -h` starts fast.
COMMANDS = (preprocess, train, generate, adapters, cache, relations, analyze, toy)

# OS errors that come from the machine's state rather than from relvid's code.
_ENVIRONMENT_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENOTDIR,
                                 errno.EISDIR, errno.EFBIG, errno.ENAMETOOLONG})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="relvid", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for module in COMMANDS:
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from relvid.errors import UserError

    parser = build_parser()
    # Overrides may come after options (`train configs/train.yaml --relation hug optim.lr=1e-4`),
    # which argparse's positional list does not collect by itself.
    args, rest = parser.parse_known_args(argv)
    if rest:
        if not getattr(args, "takes_overrides", False) or any(r.startswith("-") for r in rest):
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        args.config = [*args.config, *rest]
    try:
        return args.func(args)
    # A user's mistake: one clear line, exit code 2. Any other exception is a bug of ours and keeps
    # its traceback.
    except UserError as err:
        print(f"relvid {args.command}: error: {err}", file=sys.stderr)
        return getattr(err, "exit_code", 2)
    except BrokenPipeError:  # `relvid ... | head`: the reader left; not an error of ours
        sys.stdout = open(os.devnull, "w")  # so the interpreter's final flush does not fail again
        return 0
    except OSError as err:
        if err.errno not in _ENVIRONMENT_ERRNOS:
            raise
        # The machine refused a file operation (permissions, a full disk, a file where a folder
        # should be): the user's to fix, and the file is named.
        where = f" {err.filename}" if err.filename else ""
        print(f"relvid {args.command}: error: cannot use{where}: {err.strerror or err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

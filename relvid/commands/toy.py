"""`relvid toy-base` (pretrain the toy world's base model) and `relvid demo` (the toy world end to end)."""

from __future__ import annotations

import argparse
import dataclasses


def toy_video_scorer():
    """The toy world's scorer of sampled videos, for `relvid analyze attribution --judge toy`."""
    from relvid.toy.drivers.scorer import ToyScorer

    return ToyScorer()


def cmd_toy_base(args: argparse.Namespace) -> int:
    from relvid.toy.drivers.base_command import toy_base

    toy_base(args)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    import torch

    from relvid.toy.drivers.base import BASE_DIR
    from relvid.toy.drivers.demo import DEMO_RELATION, run_demo
    from relvid.toy.drivers.evaluate import TOY_SAMPLING

    if args.threads:
        torch.set_num_threads(args.threads)
    settings = (TOY_SAMPLING if args.guidance is None
                else dataclasses.replace(TOY_SAMPLING, guidance_scale=args.guidance))
    run_demo(args.out, relation=args.relation or DEMO_RELATION, n_prompts=args.prompts, seed=args.seed,
             base_dir=args.base or BASE_DIR, overrides=list(args.set), progress=not args.quiet, settings=settings)
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("toy-base", help="pretrain the toy world's base model (GPU if present)")
    p.add_argument("--out", help="output folder (default: relvid/toy/base_model, the committed base)")
    p.add_argument("--work", default="outputs/toy-base", help="folder for the image stage (default: %(default)s)")
    p.add_argument("--image-steps", type=int, default=6000, help="stage 1: steps on first frames alone (0 skips it)")
    p.add_argument("--image-batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=2000, help="stage 2: steps on whole clips")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", help="default: cuda when available, else cpu")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's choice)")
    p.add_argument("--save-every", type=int, default=250,
                   help="save the training state every N steps; a rerun resumes from it (0: never)")
    p.add_argument("--init", help="start from this base folder instead of random weights")
    p.add_argument("--eval-prompts", type=int, default=10,
                   help="test prompts (unseen subject pairs) per relation for the fidelity check afterwards; "
                        "default: all 10 (0 skips it)")
    p.add_argument("--evaluate-only", action="store_true",
                   help="train nothing: measure the base in --out (default: the committed one) and write the "
                        "figures into its toy_base.json")
    p.set_defaults(func=cmd_toy_base)

    p = subparsers.add_parser("demo", help="the toy world end to end on a CPU: customize, sample, judge, table")
    p.add_argument("--out", default="outputs/demo", help="output folder (default: %(default)s)")
    p.add_argument("--relation", help="toy relation (default: the demo's, relvid.toy.drivers.demo.DEMO_RELATION)")
    p.add_argument("--prompts", type=int, default=10, help="test prompts (unseen subject pairs), 1-10")
    p.add_argument("--base", help="base model folder (default: the committed relvid/toy/base_model)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's choice)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="training config override for both customizations, e.g. trainer.max_steps=100")
    p.add_argument("--guidance", type=float,
                   help="classifier-free guidance when sampling (default: the toy sampler's, 4)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_demo)

"""`relvid toy-base` (pretrain the toy world's base model) and `relvid demo` (the toy world end to end)."""

from __future__ import annotations

import argparse
import dataclasses


def cmd_toy_base(args: argparse.Namespace) -> int:
    import json
    import sys
    from pathlib import Path

    import torch

    from relvid.toy.base import BASE_DIR, INFO_NAME, pretrain, stage_settings
    from relvid.toy.world import test_pairs

    pairs = len(test_pairs())
    lowest = 1 if args.evaluate_only else 0  # after training, 0 skips the measurement
    if not lowest <= args.eval_prompts <= pairs:  # checked before any training, not after it
        print(f"relvid toy-base: --eval-prompts must be {lowest}-{pairs}, got {args.eval_prompts}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out or BASE_DIR)
    info_path = out / INFO_NAME
    if args.evaluate_only:
        if not (out / "config.json").is_file():
            print(f"relvid toy-base --evaluate-only: {out} holds no base model (no config.json); "
                  f"pass --out <a folder written by relvid toy-base>", file=sys.stderr)
            return 2
        info = json.loads(info_path.read_text()) if info_path.is_file() else {}  # its training record is kept
        info["evaluation"] = _base_evaluation(out, args.eval_prompts, args.seed)
        info["evaluation_command"] = (f"relvid toy-base --evaluate-only --eval-prompts {args.eval_prompts} "
                                      f"--seed {args.seed}")
        info_path.write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        print(f"wrote the figures into {info_path}")
        return 0
    image_dir = Path(args.work) / "image_stage"
    stages = []
    if args.image_steps:
        wanted = stage_settings("image", args.image_steps, args.image_batch_size, args.lr, args.seed, 1, args.init)
        if (image_dir / INFO_NAME).is_file():  # a finished image stage is reused, if it is this one
            done = json.loads((image_dir / INFO_NAME).read_text())
            if {k: done.get(k) for k in wanted} != wanted:
                raise ValueError(f"{image_dir} holds an image stage trained with other settings "
                                 f"({ {k: done.get(k) for k in wanted} }); delete it or pass another --work")
        else:
            pretrain(image_dir, steps=args.image_steps, batch_size=args.image_batch_size, lr=args.lr, seed=args.seed,
                     device=args.device, save_every=args.save_every, init=args.init, frames=1, stage="image",
                     save_dtype=torch.float32)  # the next stage starts from it: keep full precision
        stages.append(json.loads((image_dir / INFO_NAME).read_text()))
    init = image_dir if args.image_steps else args.init
    pretrain(out, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed, device=args.device,
             save_every=args.save_every, init=init, stage="video")
    stages.append(json.loads(info_path.read_text()))
    command = (f"relvid toy-base --image-steps {args.image_steps} --image-batch-size {args.image_batch_size} "
               f"--steps {args.steps} --batch-size {args.batch_size} --lr {args.lr} --seed {args.seed}"
               + (f" --init {args.init}" if args.init else ""))
    info = {"stages": stages, "command": command}
    print(f"wrote the toy base model to {out}")
    if args.eval_prompts:
        info["evaluation"] = _base_evaluation(out, args.eval_prompts, args.seed)
    info_path.write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return 0


def _base_evaluation(folder, n_prompts: int, seed: int) -> dict:
    """The base in `folder` sampled and judged on n_prompts unseen pairs x every relation verb."""
    from relvid.toy.customize import load_base
    from relvid.toy.evaluate import base_report

    report = base_report(load_base(folder), n_prompts=n_prompts, seed=seed)
    print(f"subject fidelity on unseen subject pairs: {report['subject_fidelity']:.3f} "
          f"({report['videos']} videos); relations by chance: {report['relation_accuracy_by_relation']}")
    return report


def cmd_demo(args: argparse.Namespace) -> int:
    import torch

    from relvid.toy.demo import DEMO_RELATION, run_demo

    if args.threads:
        torch.set_num_threads(args.threads)
    from relvid.toy.base import BASE_DIR

    from relvid.toy.evaluate import TOY_SETTINGS

    settings = TOY_SETTINGS if args.guidance is None else dataclasses.replace(TOY_SETTINGS, guidance_scale=args.guidance)
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
    p.add_argument("--relation", help="toy relation (default: the demo's, relvid.toy.demo.DEMO_RELATION)")
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

"""`relvid validate-cache` (check every clip of a cache) and `relvid random-cache` (a smoke-test cache)."""

from __future__ import annotations

import argparse


def cmd_validate_cache(args: argparse.Namespace) -> int:
    from relvid.data.cache import CACHE_WIDE, ClipCache

    cache = ClipCache(args.cache_dir)
    problems, notes = cache.inspect(batch_size=args.batch_size)
    ids = cache.clip_ids()
    for clip_id, problem in problems:
        print(f"BAD  {clip_id}: {problem}")
    for note in notes:
        print(f"NOTE {note}")
    bad_clips = {clip_id for clip_id, _ in problems if clip_id != CACHE_WIDE}
    print(f"{len(ids) - len(bad_clips)} of {len(ids)} clips valid in {args.cache_dir}; "
          f"{len(cache.manifest.get('failures', []))} preprocessing failures listed in the manifest")
    return 1 if problems else 0


def cmd_random_cache(args: argparse.Namespace) -> int:
    from relvid import relations
    from relvid.data.random_cache import write_random_cache

    rel = relations.resolve(args.relation).name
    write_random_cache(args.out, n_clips=args.clips, relation=rel, seed=args.seed, overwrite=args.overwrite)
    print(f"wrote a random {args.clips}-clip cache for {rel} to {args.out} (for smoke tests with model.preset=tiny)")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("validate-cache", help="check every clip of a clip cache")
    p.add_argument("cache_dir")
    p.add_argument("--batch-size", type=int, default=1,
                   help="the training batch size to check for (> 1 needs one latent frame count)")
    p.set_defaults(func=cmd_validate_cache)

    p = subparsers.add_parser("random-cache", help="write a small random clip cache (smoke tests, tiny model)")
    p.add_argument("out")
    p.add_argument("--relation", default="shaking_hands")
    p.add_argument("--clips", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true",
                   help="replace a clip cache already in the folder (its clips, manifest and prompts)")
    p.set_defaults(func=cmd_random_cache)

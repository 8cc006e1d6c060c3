"""`relvid preprocess` (exemplar videos -> clip cache) and `relvid mask-sheet` (a look at the masks)."""

from __future__ import annotations

import argparse


def int_list(text: str) -> list[int]:
    """``"1,3,5-7"`` -> [1, 3, 5, 6, 7] (NTU setups, cameras, performers, replications)."""
    out: list[int] = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        lo, sep, hi = part.partition("-")
        try:
            out += list(range(int(lo), int(hi) + 1)) if sep else [int(part)]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: use numbers and ranges, e.g. 1,3,5-7") from None
    return out


def colour_list(text: str) -> list[tuple[int, int, int]]:
    """``"255,0,0;0,255,0"`` -> [(255, 0, 0), (0, 255, 0)] (subject 1 first)."""
    try:
        colours = [tuple(int(v) for v in c.split(",")) for c in text.split(";") if c.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: use R,G,B;R,G,B e.g. 255,0,0;0,255,0") from None
    if len(colours) != 2 or any(len(c) != 3 for c in colours):
        raise argparse.ArgumentTypeError(f"{text!r}: give two R,G,B colours separated by ';'")
    return colours  # type: ignore[return-value]


def cmd_preprocess(args: argparse.Namespace) -> int:
    from relvid.preprocess.pipeline import preprocess

    return preprocess(args)


def cmd_mask_sheet(args: argparse.Namespace) -> int:
    from relvid.preprocess.contact_sheet import mask_sheet

    for path in mask_sheet(args.cache, clip_id=args.clip, out=args.out, mp4=args.mp4):
        print(f"wrote {path}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("preprocess", help="cache exemplar videos (NTU RGB+D or your own) for training")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--ntu-root", help="folder of NTU RGB+D *_rgb.avi files (searched recursively)")
    src.add_argument("--videos", help="folder of your own videos, each with a caption (<stem>.txt or --captions-csv)")
    p.add_argument("--relation", "-r", required=True, help="relation name or alias (or a new name for your own videos)")
    p.add_argument("--skeletons", help="folder of NTU .skeleton files (default: under --ntu-root)")
    p.add_argument("--captions-csv", help="CSV with columns video,caption (for --videos)")
    p.add_argument("--mask-source", choices=("skeleton", "grounded-sam", "files"), default="skeleton")
    p.add_argument("--mask-fallback", choices=("none", "grounded-sam", "files"), default="none",
                   help="masks for clips the main source cannot mask (e.g. NTU samples without a skeleton)")
    p.add_argument("--masks", help="folder with a PNG folder <video stem>/ or a mask video <video stem>.mp4 per video")
    p.add_argument("--mask-colors", type=colour_list, help="subject colours in the mask files, e.g. '255,0,0;0,255,0'")
    p.add_argument("--detect-prompt", default="person", help="Grounding DINO text prompt (default: person)")
    p.add_argument("--box-threshold", type=float, default=0.3, help="Grounding DINO box score threshold")
    p.add_argument("--text-threshold", type=float, default=0.25, help="Grounding DINO text score threshold")
    p.add_argument("--mochi-path", help="Mochi pipeline folder (diffusers format); default $MOCHI_PATH")
    p.add_argument("--vae-path", help="Mochi VAE folder (default: <mochi-path>/vae)")
    p.add_argument("--t5-path", help="T5 folder (default: $T5_PATH, else <mochi-path> with text_encoder/ + tokenizer/)")
    p.add_argument("--gdino-path", help="local Grounding DINO folder (transformers format)")
    p.add_argument("--sam-path", help="local SAM folder (transformers format)")
    p.add_argument("--codec", choices=("mochi", "toy"), default="mochi")
    p.add_argument("--text-encoder", choices=("t5", "toy"), default="t5")
    p.add_argument("--out", help="cache folder (default: data/cache/<relation>)")
    p.add_argument("--clips", type=int, default=20, help="NTU clips to pick (seeded); 0 = all matching")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--frames", type=int, default=61, help="frames per clip, 6k+1 (default 61)")
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=848)
    p.add_argument("--fps", type=float, default=30.0)
    p.add_argument("--allow-upscale", action="store_true",
                   help="enlarge videos smaller than the target instead of skipping")
    for name in ("setups", "cameras", "performers", "replications"):
        p.add_argument(f"--{name}", type=int_list, help=f"NTU {name} to keep, e.g. 1,2,5-8")
    p.add_argument("--spatial-rule", choices=("any", "area"), default="any",
                   help="latent cell = any foreground pixel (reference code) or covered fraction")
    p.add_argument("--latent-dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    p.add_argument("--device", default="auto", help="auto (GPU when present), cpu, cuda, cuda:1 ...")
    p.add_argument("--dtype", choices=("auto", "bf16", "fp16", "fp32"), default="auto",
                   help="VAE and T5 weights: auto = bf16 on a GPU, fp32 on the CPU (genmo runs both in fp32)")
    p.add_argument("--vae-tile", type=int, default=256,
                   help="spatial VAE tile in pixels (stride 3/4 of it); 0 = no tiling (needs far more GPU memory)")
    p.add_argument("--prompt", action="append", default=[], help="extra preview prompt to embed (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="list what would be processed and exit")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_preprocess)

    p = subparsers.add_parser("mask-sheet", help="PNG contact sheet (and mp4) of a cached clip with its subject masks")
    p.add_argument("cache", help="clip cache folder")
    p.add_argument("--clip", help="clip id (default: the first)")
    p.add_argument("--out", help="PNG path (default: <cache>/sheets/<clip>.png)")
    p.add_argument("--mp4", action="store_true", help="also write an mp4 of every overlaid frame")
    p.set_defaults(func=cmd_mask_sheet)

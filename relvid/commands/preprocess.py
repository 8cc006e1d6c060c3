"""`relvid preprocess` (exemplar videos -> clip cache) and `relvid mask-sheet` (a look at the masks)."""

from __future__ import annotations

import argparse

from relvid.commands.options import add_config_arguments, alias, config_for
from relvid.errors import InputError


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


def colour_list(text: str) -> list[list[int]]:
    """``"255,0,0;0,255,0"`` -> [[255, 0, 0], [0, 255, 0]] (subject 1 first)."""
    try:
        colours = [[int(v) for v in c.split(",")] for c in text.split(";") if c.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: use R,G,B;R,G,B e.g. 255,0,0;0,255,0") from None
    if len(colours) != 2 or any(len(c) != 3 for c in colours):
        raise argparse.ArgumentTypeError(f"{text!r}: give two R,G,B colours separated by ';'")
    return colours


def seconds(text: str) -> float:
    """``"2.5"`` or ``"2.5s"`` -> 2.5 (a start or a stride in seconds)."""
    try:
        value = float(text.strip().removesuffix("s"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give seconds, e.g. 2.5 or 2.5s") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give seconds >= 0")
    return value


def cmd_preprocess(args: argparse.Namespace) -> int:
    from relvid.preprocess.pipeline import preprocess

    if not args.relation and not any(c.startswith("relation=") for c in args.config):
        raise InputError("name the relation: --relation NAME (a known relation, an alias, or a new name for your "
                         "own videos)")
    # a relation of your own needs no registry entry here: preprocessing is where new relations start
    cfg = config_for(args, "preprocess", implied=("custom_relation=true",))
    return 0 if cfg is None else preprocess(cfg)


def cmd_mask_sheet(args: argparse.Namespace) -> int:
    from relvid.preprocess.contact_sheet import mask_sheet

    for path in mask_sheet(args.cache, clip_id=args.clip, out=args.out, mp4=args.mp4):
        print(f"wrote {path}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("preprocess", help="cache exemplar videos (NTU RGB+D or your own) for training")
    add_config_arguments(p, relation_help="relation name or alias (or a new name for your own videos)")
    src = p.add_argument_group("sources (give preprocess.ntu_root or preprocess.videos)")
    alias(src, "--ntu-root", key="preprocess.ntu_root",
          help="folder of NTU RGB+D *_rgb.avi files (searched recursively)")
    alias(src, "--videos", key="preprocess.videos",
          help="folder of your own videos, each with a caption (<stem>.txt or --captions-csv)")
    alias(src, "--skeletons", key="preprocess.skeletons",
          help="folder of NTU .skeleton files (default: under --ntu-root)")
    alias(src, "--captions-csv", key="preprocess.captions_csv", help="CSV with columns video,caption (for --videos)")
    alias(src, "--clips", key="preprocess.clips", type=int, help="NTU clips to pick (seeded); 0 = all matching")
    alias(src, "--seed", key="preprocess.seed", type=int, help="the seed of the NTU pick")
    for name in ("setups", "cameras", "performers", "replications"):
        alias(src, f"--{name}", key=f"preprocess.{name}", type=int_list, help=f"NTU {name} to keep, e.g. 1,2,5-8")
    m = p.add_argument_group("subject masks")
    alias(m, "--mask-source", key="preprocess.mask_source", choices=("skeleton", "grounded-sam", "sam2", "files"))
    alias(m, "--mask-fallback", key="preprocess.mask_fallback", choices=("none", "grounded-sam", "sam2", "files"),
          help="masks for clips the main source cannot mask (e.g. NTU samples without a skeleton)")
    alias(m, "--masks", key="preprocess.masks",
          help="folder with a PNG folder <video stem>/ or a mask video <video stem>.mp4 per video")
    alias(m, "--mask-colors", key="preprocess.mask_colors", type=colour_list,
          help="subject colours in the mask files, e.g. '255,0,0;0,255,0'")
    alias(m, "--detect-prompt", key="preprocess.detect_prompt", help="Grounding DINO text prompt")
    alias(m, "--box-threshold", key="preprocess.box_threshold", type=float, help="Grounding DINO box score threshold")
    alias(m, "--text-threshold", key="preprocess.text_threshold", type=float,
          help="Grounding DINO text score threshold")
    alias(m, "--gdino-path", key="preprocess.gdino_path", help="local Grounding DINO folder (transformers format)")
    alias(m, "--sam-path", key="preprocess.sam_path", help="local SAM folder (transformers format)")
    alias(m, "--sam2-path", key="preprocess.sam2_path",
          help="local SAM 2 / SAM 2.1 folder (transformers format) for --mask-source sam2; default $RELVID_SAM2_PATH")
    alias(m, "--spatial-rule", key="preprocess.spatial_rule", choices=("any", "area"),
          help="latent cell = any foreground pixel (reference code) or covered fraction")
    e = p.add_argument_group("clips and encoding")
    alias(e, "--frames", key="preprocess.frames", type=int, help="frames per clip, 6k+1")
    alias(e, "--height", key="preprocess.height", type=int)
    alias(e, "--width", key="preprocess.width", type=int)
    alias(e, "--fps", key="preprocess.fps", type=float)
    alias(e, "--allow-upscale", key="preprocess.allow_upscale", action="store_true",
          help="enlarge videos smaller than the target instead of skipping")
    w = p.add_argument_group("clip windows (default: the first frames of each video)")
    alias(w, "--start", key="preprocess.start_time", type=seconds,
          help="start each clip at this time, e.g. 2.5s (a captions CSV row's start_time/start_frame wins)")
    alias(w, "--start-frame", key="preprocess.start_frame", type=int, help="start each clip at this source frame")
    alias(w, "--window", key="preprocess.window", choices=("start", "closest"),
          help="closest: the window where the two subjects are closest (skeletons or mask files)")
    alias(w, "--windows", key="preprocess.windows", type=int,
          help="clips per video, as <video>_w1, _w2, ... (back to back, or --window-stride apart)")
    alias(w, "--window-stride", key="preprocess.window_stride", type=seconds,
          help="seconds between the starts of a video's windows (default: the clip's length)")
    alias(e, "--mochi-path", key="model.path", help="Mochi pipeline folder (diffusers format); default $MOCHI_PATH")
    alias(e, "--vae-path", key="model.vae_path", help="Mochi VAE folder (default: <mochi-path>/vae)")
    alias(e, "--t5-path", key="preprocess.t5_path",
          help="T5 folder (default: $T5_PATH, else <mochi-path> with text_encoder/ + tokenizer/)")
    alias(e, "--codec", key="model.codec", choices=("mochi", "toy"))
    alias(e, "--text-encoder", key="model.text_encoder", choices=("t5", "toy"))
    alias(e, "--latent-dtype", key="preprocess.latent_dtype", choices=("bf16", "fp16", "fp32"))
    alias(e, "--device", key="preprocess.device", help="auto (GPU when present), cpu, cuda, cuda:1 ...")
    alias(e, "--dtype", key="model.dtype", choices=("auto", "bf16", "fp16", "fp32"),
          help="VAE and T5 weights: auto = bf16 on a GPU, fp32 on the CPU (genmo runs both in fp32)")
    alias(e, "--vae-tile", key="preprocess.vae_tile", type=int,
          help="spatial VAE tile in pixels (stride 3/4 of it); 0 = no tiling (needs far more GPU memory)")
    alias(p, "--out", key="data.cache_dir", help="cache folder (default: data/cache/<relation>)")
    alias(p, "--prompt", key="preprocess.prompts", action="append", help="extra preview prompt to embed (repeatable)")
    alias(p, "--dry-run", key="preprocess.dry_run", action="store_true", help="list what would be processed and exit")
    p.add_argument("--no-progress", dest="key:preprocess.progress", action="store_const", const=False,
                   help="no progress bar (= preprocess.progress=false)")
    p.set_defaults(func=cmd_preprocess)

    p = subparsers.add_parser("mask-sheet", help="PNG contact sheet (and mp4) of a cached clip with its subject masks")
    p.add_argument("cache", help="clip cache folder")
    p.add_argument("--clip", help="clip id (default: the first)")
    p.add_argument("--out", help="PNG path (default: <cache>/sheets/<clip>.png)")
    p.add_argument("--mp4", action="store_true", help="also write an mp4 of every overlaid frame")
    p.set_defaults(func=cmd_mask_sheet)

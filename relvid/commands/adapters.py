"""`relvid export` (adapters -> a diffusers or Mochi LoRA file) and `relvid import-reference` (the authors' LoRAs)."""

from __future__ import annotations

import argparse
from pathlib import Path

# What the reference implementation (genmo's Mochi LoRA fine-tuner, forked) saves its LoRAs as: "*.lora.pt".
REFERENCE_SUFFIXES = (".pt", ".pth")


def refuse_reference_checkpoint(source: str, out: str) -> None:
    """`relvid export` reads relvid's own files; a reference *.lora.pt goes through import-reference."""
    from relvid.models.lora import LoRAConfigError

    path = Path(source).expanduser()
    if path.is_file() and path.suffix in REFERENCE_SUFFIXES:
        raise LoRAConfigError(
            f"{path} looks like a reference-implementation checkpoint (*.lora.pt), which `relvid export` does "
            f"not read: convert it with `relvid import-reference {path} --out {out}` (it writes the diffusers "
            "LoRA and relvid's triplet file)")


def source_relation(source: str | Path) -> str | None:
    """The relation a relvid adapter source was trained for (the triplet file's metadata, a checkpoint's
    config), or None where it does not say."""
    import torch

    from relvid.models.adapter_file import load_adapters, open_deepspeed_checkpoint, resolve_adapter_file

    path, kind = resolve_adapter_file(source)
    try:
        if kind == "relvid":
            return load_adapters(path)[2].get("relation") or None
        meta = (open_deepspeed_checkpoint(path)[1] if path.is_dir()
                else torch.load(path, map_location="cpu", weights_only=True, mmap=True))
        return str(meta["relvid"]["config"]["relation"]) or None
    except Exception:  # a name is only a default: read_triplet reports a bad source
        return None


# Which tool reads each export format: said after the file is written.
LOADED_BY = {
    "diffusers": "load with MochiPipeline.load_lora_weights",
    "mochi": "genmo's Mochi LoRA format: ComfyUI's LoraLoader on its native Mochi model, genmo's --lora_path",
}


def cmd_export(args: argparse.Namespace) -> int:
    from relvid.models.adapter_file import ADAPTER_FILE_NAME, read_triplet, save_adapter_state
    from relvid.models.lora_io import check_export_name, default_export_name, export_state_dict, refuse_existing

    refuse_reference_checkpoint(args.source, args.out)
    out_dir = Path(args.out)
    name = check_export_name(args.name) if args.name else None
    if name is None:
        name = default_export_name(args.format, source_relation(args.source) if args.format == "mochi" else None)
    # Both files are checked before either is written: a refused export leaves nothing half-done.
    refuse_existing([out_dir / name, *([out_dir / ADAPTER_FILE_NAME] if args.triplet else [])], args.overwrite)
    spec, state = read_triplet(args.source)
    out = export_state_dict(state, spec, out_dir, overwrite=args.overwrite, fmt=args.format, name=name)
    print(f"wrote {out} (inference set: relation + ffn; {LOADED_BY[args.format]})")
    if args.triplet:
        triplet = save_adapter_state(out_dir / ADAPTER_FILE_NAME, state, spec)
        print(f"wrote {triplet} (full triplet, relvid format)")
    return 0


def cmd_import_reference(args: argparse.Namespace) -> int:
    from relvid.models.lora_io import import_reference

    out = import_reference(Path(args.file), Path(args.out), qkv_alpha=args.qkv_alpha, out_alpha=args.out_alpha,
                           overwrite=args.overwrite)
    print(f"wrote {out}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("export", help="write the inference LoRA (relation + ffn) as a diffusers or Mochi file")
    p.add_argument("source",
                   help="a relvid checkpoint (.ckpt file, or .ckpt folder under DeepSpeed), "
                        "relvid_adapters.safetensors, or a run's adapters/ folder")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--format", choices=("diffusers", "mochi"), default="diffusers",
                   help="diffusers (default): for MochiPipeline.load_lora_weights; mochi: genmo's fused format, "
                        "for ComfyUI's native LoraLoader and genmo's pipeline")
    p.add_argument("--name", default=None,
                   help="file name inside --out (ending in .safetensors); default: pytorch_lora_weights.safetensors "
                        "(diffusers), <relation>_mochi.safetensors (mochi)")
    p.add_argument("--triplet", action="store_true", help="also write the full triplet in relvid's format")
    p.add_argument("--overwrite", action="store_true", help="replace the files if --out already holds them")
    p.set_defaults(func=cmd_export)

    p = subparsers.add_parser("import-reference",
                              help="convert a reference-implementation *.lora.pt to a diffusers LoRA")
    p.add_argument("file")
    p.add_argument("--out", required=True)
    p.add_argument("--qkv-alpha", type=float, default=None,
                   help="LoRA alpha of the Q/K/V LoRAs (qkv_proj_lora_alpha); default: the value the file stores, "
                        "else the rank")
    p.add_argument("--out-alpha", type=float, default=None,
                   help="LoRA alpha of the FFN (attention-out) LoRA (out_proj_lora_alpha); default: the value the "
                        "file stores, else the rank")
    p.add_argument("--overwrite", action="store_true", help="replace the two files if --out already holds them")
    p.set_defaults(func=cmd_import_reference)

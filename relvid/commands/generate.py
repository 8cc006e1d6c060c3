"""`relvid sample` (videos with a relation LoRA) and `relvid evaluate` (the paper's metrics)."""

from __future__ import annotations

import argparse
from pathlib import Path


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("base model (local folders; MOCHI_PATH is the default for --model-path)")
    g.add_argument("--model-path", "--mochi-path",
                   help="diffusers-format genmo/mochi-1-preview folder (transformer/, vae/, text_encoder/, tokenizer/)")
    g.add_argument("--vae-path", help="VAE folder if not <model-path>/vae")
    g.add_argument("--text-encoder-path", help="T5 folder if not <model-path>")
    g.add_argument("--config", action="append", default=[], help="YAML config whose model.* section to use")
    g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, e.g. model.dtype=bf16 (tests: model.preset=tiny model.codec=toy ...)")
    g.add_argument("--device", help="default: cuda:LOCAL_RANK when a GPU is present, else cpu")


def _add_sampling_args(p: argparse.ArgumentParser, steps: int = 64) -> None:
    g = p.add_argument_group("sampling (the paper's defaults)")
    g.add_argument("--steps", type=int, default=steps, help="Euler steps (default %(default)s)")
    g.add_argument("--guidance", type=float, default=6.0, help="CFG scale (default %(default)s)")
    g.add_argument("--frames", type=int, default=61)
    g.add_argument("--height", type=int, default=480)
    g.add_argument("--width", type=int, default=848)
    g.add_argument("--fps", type=int, default=30)
    g.add_argument("--negative", default="", help="negative prompt (default: empty)")
    g.add_argument("--seed", "--seeds", type=int, nargs="+", action="extend", dest="seeds",
                   help="one or more seeds, e.g. --seeds 0 1 2 (default: 0)")


def _model_cfg(args: argparse.Namespace):
    from relvid.config import load_config

    overrides = ["model.gradient_checkpointing=false"]
    for key, value in (("path", args.model_path), ("vae_path", args.vae_path),
                       ("text_encoder_path", args.text_encoder_path)):
        if value:
            overrides.append(f"model.{key}={value}")
    return load_config(args.config, [*overrides, *args.set]).model


def _settings(args: argparse.Namespace):
    from relvid.inference.generate import SampleSettings

    return SampleSettings(num_steps=args.steps, guidance_scale=args.guidance, frames=args.frames,
                          height=args.height, width=args.width, fps=args.fps)


def _read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt or [])
    if getattr(args, "prompts_file", None):
        path = Path(args.prompts_file)
        if not path.is_file():
            raise FileNotFoundError(f"--prompts-file {path} not found")
        prompts += [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return prompts


def _adapter_source(args: argparse.Namespace) -> str | None:
    """--adapters, else the relation's run (outputs/<relation>/adapters); --base for the base model."""
    if args.base:
        if args.adapters:
            raise ValueError("--base samples the model without adapters: drop --adapters or --base")
        return None
    if args.adapters:
        return args.adapters
    if args.relation:
        from relvid import relations

        default = Path("outputs") / relations.resolve(args.relation).name / "adapters"
        if not default.is_dir():
            raise FileNotFoundError(f"no --adapters given and {default} (the default run of --relation) does not "
                                    "exist: pass --adapters <.ckpt | adapters folder | LoRA file>, or --base")
        return str(default)
    raise ValueError("give --adapters, --relation (uses outputs/<relation>/adapters) or --base (no adapters)")


def cmd_sample(args: argparse.Namespace) -> int:
    import torch

    from relvid.inference.render import sample_videos

    prompts = _read_prompts(args)
    if not prompts:
        if not args.relation:
            raise ValueError("give --prompt (repeatable), --prompts-file, or --relation for its evaluation prompts")
        from relvid.prompts import eval_prompts

        prompts = eval_prompts(args.relation)
    out = args.out or (Path("outputs") / relations_name(args.relation) / "samples" if args.relation
                       else "outputs/samples")
    paths = sample_videos(prompts, args.seeds or [0], out, _model_cfg(args), _settings(args),
                          adapters=_adapter_source(args), negative=args.negative,
                          device=torch.device(args.device) if args.device else None)
    for path in paths:
        print(path)
    return 0


def relations_name(name: str) -> str:
    from relvid import relations

    return relations.resolve(name).name


def _judge_options(args: argparse.Namespace, out_dir: Path):
    from relvid.eval.evaluate import JudgeOptions

    return JudgeOptions(kind=args.judge, base_url=args.judge_url, model=args.judge_model,
                        api_key_env=args.judge_key_env, timeout_s=args.judge_timeout,
                        max_retries=args.judge_retries, requests_per_minute=args.judge_rpm,
                        temperature=args.judge_temperature,
                        cache_dir=args.judge_cache or str(out_dir / "judge_cache"), vlm_path=args.vlm_path)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from relvid import relations
    from relvid.eval.evaluate import EvalOptions, evaluate

    relation = relations.resolve(args.relation).name
    out_dir = Path(args.out) if args.out else Path("outputs") / "eval" / relation
    if args.judge == "api" and not (args.judge_url and args.judge_model):
        raise ValueError("--judge api needs --judge-url (e.g. http://localhost:8000/v1) and --judge-model")
    if args.judge == "local" and not args.vlm_path:
        raise ValueError("--judge local needs --vlm-path (a local Qwen2.5-VL folder)")
    if args.videos and (args.adapters or args.base):
        raise ValueError("--videos evaluates existing videos: drop --adapters/--base")
    adapters = None if args.videos else _adapter_source(args)
    method = args.method or ("Mochi" if args.base else Path(adapters or args.videos).name)
    if method == "adapters" and adapters:  # a run's adapters/ folder: name the row after the run
        method = Path(adapters).resolve().parent.name
    opts = EvalOptions(
        relation=relation, out_dir=out_dir, method=method, adapters=adapters, videos_dir=args.videos,
        model_cfg=None if args.videos else _model_cfg(args), settings=_settings(args),
        prompts=_read_prompts(args) or None, seeds=args.seeds or [0], negative=args.negative,
        judge=_judge_options(args, out_dir), repeats=args.repeats, clip_path=args.clip_path, i3d_path=args.i3d_path,
        reference_videos=args.reference_videos, fvd_frames=args.fvd_frames, device=args.device,
        wait_timeout_s=args.wait_timeout,
    )
    paths = evaluate(opts)
    if paths is not None:
        print(paths["md"].read_text(encoding="utf-8"), end="")
        print(f"wrote {paths['md']}, {paths['csv']}, {paths['json']}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("sample", help="generate videos with a relation LoRA (mp4 + JSON sidecar)")
    p.add_argument("--adapters", help="a .ckpt, relvid_adapters.safetensors, a run's adapters/ folder, or a diffusers "
                                      "LoRA (relvid export / import-reference output); omit for the base model")
    p.add_argument("--prompt", "-p", action="append", help="repeatable")
    p.add_argument("--prompts-file", help="one prompt per line")
    p.add_argument("--base", action="store_true", help="sample the base model without adapters")
    p.add_argument("--relation", "-r", help="default --adapters outputs/<relation>/adapters; without --prompt: "
                                            "sample the relation's ten evaluation prompts")
    p.add_argument("--out", help="output folder (default outputs/<relation>/samples or outputs/samples)")
    _add_sampling_args(p)
    _add_model_args(p)
    p.set_defaults(func=cmd_sample)

    p = subparsers.add_parser("evaluate", help="test videos + Relation Accuracy, CLIP-T, temporal consistency, FVD")
    p.add_argument("--relation", "-r", required=True)
    p.add_argument("--adapters", help="the adapter to evaluate (as for sample; default outputs/<relation>/adapters)")
    p.add_argument("--base", action="store_true", help="evaluate the base model (the table's Mochi row)")
    p.add_argument("--videos", help="evaluate this folder of videos (with sidecars) instead of generating")
    p.add_argument("--method", help="row name in the results table (default: Mochi, or the adapters' name)")
    p.add_argument("--out", help="output folder shared by all methods of a relation (default outputs/eval/<relation>)")
    p.add_argument("--prompt", "-p", action="append", help="override the ten evaluation prompts (repeatable)")
    p.add_argument("--prompts-file")
    j = p.add_argument_group("relation accuracy judge")
    j.add_argument("--judge", choices=("api", "local", "none"), default="none")
    j.add_argument("--judge-url", help="OpenAI-compatible base URL, e.g. http://localhost:8000/v1 or "
                                       "https://dashscope.aliyuncs.com/compatible-mode/v1")
    j.add_argument("--judge-model", help="e.g. qwen-vl-max or Qwen/Qwen2.5-VL-72B-Instruct")
    j.add_argument("--judge-key-env", default="RELVID_JUDGE_API_KEY", help="env variable with the API key")
    j.add_argument("--judge-timeout", type=float, default=60.0)
    j.add_argument("--judge-retries", type=int, default=5)
    j.add_argument("--judge-rpm", type=float, default=60.0, help="requests per minute")
    j.add_argument("--judge-temperature", type=float, default=1.0)
    j.add_argument("--judge-cache", help="answer cache folder (default <out>/judge_cache)")
    j.add_argument("--vlm-path", help="local judge: a Qwen2.5-VL folder")
    j.add_argument("--repeats", type=int, default=10, help="judgements per video (paper: 10)")
    m = p.add_argument_group("other metrics")
    m.add_argument("--clip-path", help="CLIP folder for CLIP-T and temporal consistency (e.g. clip-vit-large-patch14)")
    m.add_argument("--i3d-path", help="I3D TorchScript file for FVD (e.g. i3d_torchscript.pt)")
    m.add_argument("--reference-videos", help="folder of reference videos for FVD (paper: AnimalKingdom test set)")
    m.add_argument("--fvd-frames", type=int, default=16)
    m.add_argument("--wait-timeout", type=float, default=4 * 3600.0,
                   help="rank 0 waits this long (s) for the other ranks' videos")
    _add_sampling_args(p)
    _add_model_args(p)
    p.set_defaults(func=cmd_evaluate)

"""`relvid sample` (videos with a relation LoRA) and `relvid evaluate` (the paper's metrics).

Both read the one config schema (sections model, sampling, sample / judge, evaluate); the flags
below are short aliases of its keys."""

from __future__ import annotations

import argparse

from relvid.commands.options import add_config_arguments, alias, config_for

RELATION_HELP = "relation or alias: its run's adapters (<output_dir>/adapters) and evaluation prompts are the defaults"


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("base model (local folders; MOCHI_PATH is the default for model.path)")
    alias(g, "--model-path", "--mochi-path", key="model.path",
          help="diffusers-format genmo/mochi-1-preview folder (transformer/, vae/, text_encoder/, tokenizer/)")
    alias(g, "--vae-path", key="model.vae_path", help="VAE folder if not <model-path>/vae")
    alias(g, "--text-encoder-path", key="model.text_encoder_path", help="T5 folder if not <model-path>")
    g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, e.g. model.dtype=bf16 (the same as a bare KEY=VALUE)")


def _add_sampling_flags(p: argparse.ArgumentParser, section: str) -> None:
    g = p.add_argument_group("sampling (defaults: the paper's)")
    alias(g, "--steps", key="sampling.num_steps", type=int, help="Euler steps")
    alias(g, "--guidance", key="sampling.guidance_scale", type=float, help="CFG scale")
    alias(g, "--frames", key="sampling.frames", type=int)
    alias(g, "--height", key="sampling.height", type=int)
    alias(g, "--width", key="sampling.width", type=int)
    alias(g, "--fps", key="sampling.fps", type=int)
    alias(g, "--negative", key="sampling.negative_prompt", help="negative prompt")
    alias(g, "--seed", "--seeds", key=f"{section}.seeds", type=int, nargs="+",
          help="one or more seeds, e.g. --seeds 0 1 2")
    alias(g, "--device", key=f"{section}.device", help="default: cuda:LOCAL_RANK when a GPU is present, else cpu")


def _add_what_flags(p: argparse.ArgumentParser, section: str) -> None:
    alias(p, "--adapters", key=f"{section}.adapters",
          help="a .ckpt (file, or folder under DeepSpeed), relvid_adapters.safetensors, a run's adapters/ folder, "
               "or a diffusers LoRA (relvid export / import-reference output); default: <output_dir>/adapters")
    alias(p, "--base", key=f"{section}.base", action="store_true", help="the base model without adapters")
    alias(p, "--prompt", "-p", key=f"{section}.prompts", action="append", help="repeatable")
    alias(p, "--prompts-file", key=f"{section}.prompts_file", help="one prompt per line")


def cmd_sample(args: argparse.Namespace) -> int:
    from relvid.inference.render import sample_videos

    cfg = config_for(args, "sample")
    if cfg is None:
        return 0
    for path in sample_videos(cfg):
        print(path)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from relvid.eval.evaluate import evaluate

    cfg = config_for(args, "evaluate")
    if cfg is None:
        return 0
    paths = evaluate(cfg)
    if paths is not None:
        print(paths["md"].read_text(encoding="utf-8"), end="")
        print(f"wrote {paths['md']}, {paths['csv']}, {paths['json']}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("sample", help="generate videos with a relation LoRA (mp4 + JSON sidecar)")
    add_config_arguments(p, RELATION_HELP)
    _add_what_flags(p, "sample")
    alias(p, "--out", key="sample.out", help="output folder (default <output_dir>/samples)")
    _add_sampling_flags(p, "sample")
    _add_model_flags(p)
    p.set_defaults(func=cmd_sample)

    p = subparsers.add_parser("evaluate", help="test videos + Relation Accuracy, CLIP-T, temporal consistency, FVD")
    add_config_arguments(p, RELATION_HELP)
    _add_what_flags(p, "evaluate")
    alias(p, "--videos", key="evaluate.videos", help="evaluate this folder of videos (with sidecars) instead")
    alias(p, "--method", key="evaluate.method", help="row name in the results table (default: Mochi, or the "
                                                     "adapters' name)")
    alias(p, "--out", key="evaluate.out", help="output folder shared by all methods of a relation "
                                               "(default outputs/eval/<relation>)")
    j = p.add_argument_group("relation accuracy judge")
    alias(j, "--judge", key="judge.kind", choices=("api", "local", "none"))
    alias(j, "--judge-url", key="judge.base_url", help="OpenAI-compatible base URL, e.g. http://localhost:8000/v1")
    alias(j, "--judge-model", key="judge.model", help="e.g. qwen-vl-max or Qwen/Qwen2.5-VL-72B-Instruct")
    alias(j, "--judge-key-env", key="judge.api_key_env", help="environment variable with the API key")
    alias(j, "--judge-timeout", key="judge.timeout_s", type=float)
    alias(j, "--judge-retries", key="judge.max_retries", type=int)
    alias(j, "--judge-rpm", key="judge.requests_per_minute", type=float, help="requests per minute")
    alias(j, "--judge-temperature", key="judge.temperature", type=float)
    alias(j, "--judge-cache", key="judge.cache_dir", help="answer cache folder (default <out>/judge_cache)")
    alias(j, "--vlm-path", key="judge.vlm_path", help="local judge: a Qwen2.5-VL folder")
    alias(j, "--repeats", key="judge.repeats", type=int, help="judgements per video (paper: 10)")
    m = p.add_argument_group("other metrics")
    alias(m, "--clip-path", key="evaluate.clip_path", help="CLIP folder for CLIP-T and temporal consistency")
    alias(m, "--i3d-path", key="evaluate.i3d_path", help="I3D TorchScript file for FVD")
    alias(m, "--reference-videos", key="evaluate.reference_videos", help="reference videos for FVD")
    alias(m, "--fvd-frames", key="evaluate.fvd_frames", type=int)
    alias(m, "--wait-timeout", key="evaluate.wait_timeout_s", type=float,
          help="rank 0 waits this long (s) for the other ranks' videos")
    _add_sampling_flags(p, "evaluate")
    _add_model_flags(p)
    p.set_defaults(func=cmd_evaluate)

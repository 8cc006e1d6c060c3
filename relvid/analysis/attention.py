"""`relvid analyze attention`: where the relation words look (the paper's Fig. 7a).

At the stated sampling steps, the attention probabilities from every vision query to the phrase's key
tokens (softmax over all keys), averaged over the phrase's tokens, heads and layers; and, the other
way, from the phrase's queries to each vision key. Shown per frame over the decoded video, the base
and each adapter set side by side."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from relvid.analysis.figures import colormap, overlay, save_mp4, save_png, tile_grid
from relvid.analysis.maps import to_grid, token_grid
from relvid.errors import InputError
from relvid.files import atomic_write

TILE = 128
PANELS = (("to_phrase", "vision -> phrase"), ("from_phrase", "phrase -> vision"))


def latent_frame(t: int, time_factor: int) -> int:
    """The latent frame that covers video frame t (frame 0 alone, then time_factor frames each)."""
    return 0 if t == 0 else (t - 1) // time_factor + 1


def run(cfg) -> dict[str, Path]:
    from relvid.analysis.capture import AttentionCapture
    from relvid.analysis.parts import device_of, encode_prompt, label_of, load_model, resolve_steps, sample_and_capture
    from relvid.components import load_codec
    from relvid.eval.metrics import keyframe_indices
    from relvid.inference.sampler import linear_quadratic_sigmas

    an, settings = cfg.analyze, cfg.sampling
    if len(an.prompts) != 1 or not an.phrase:
        raise InputError("relvid analyze attention reads one prompt (--prompt) and words of it (--phrase); got "
                         f"{len(an.prompts)} prompts and phrase {an.phrase!r}")
    prompt, device = an.prompts[0], device_of(cfg)
    steps = resolve_steps(an.steps, settings.num_steps)
    schedule = linear_quadratic_sigmas(settings.num_steps, settings.threshold_noise)
    sigmas = [float(schedule[s]) for s in steps]
    for s, sigma in zip(steps, sigmas, strict=True):
        print(f"step {s} of {settings.num_steps}: sigma {sigma:.4f}")
    enc = encode_prompt(cfg, prompt, an.phrase, device)
    codec = load_codec(cfg.model.codec, cfg.model.vae_path or cfg.model.path, device="cpu")
    shape = codec.latent_shape(settings.frames, settings.height, settings.width)
    seed = int(an.seeds[0])
    report: dict = {"prompt": prompt, "phrase": an.phrase, "phrase_tokens": enc.phrase.tolist(), "seed": seed,
                    "num_steps": settings.num_steps,
                    "steps": [{"step": s, "sigma": g} for s, g in zip(steps, sigmas, strict=True)], "models": {}}
    results = []
    for source in [None, *an.adapters]:
        label = "base" if source is None else label_of(source)
        model, info = load_model(cfg, device, source)
        grid = token_grid(shape, int(model.config.patch_size))
        capture = AttentionCapture(model, steps, features=False, phrase=enc.phrase)
        video = sample_and_capture(model, cfg, enc, codec, seed, capture)
        del model
        maps = {}
        for key, _ in PANELS:
            per_step = {s: to_grid(capture.records[s].mean(key).cpu(), grid) for s in steps}  # (f, h, w)
            maps[key] = torch.stack(list(per_step.values())).mean(0)
            report["models"].setdefault(label, {"adapters": info["adapters"], "steps": {}})
            for s, m in per_step.items():
                report["models"][label]["steps"].setdefault(str(s), {})[key] = m.tolist()
            report["models"][label][f"{key}_mean_over_steps"] = maps[key].tolist()
        results.append((label, video, maps))
    report["grid"] = list(grid)

    def frame_tiles(video, maps, t: int, caption: str) -> list:
        f = latent_frame(t, codec.time_factor)
        frame = video[t].numpy()
        return [(f"{name} {caption}", overlay(frame, colormap(maps[key][f], 0.0, float(maps[key].max()))))
                for key, name in PANELS]

    head = f"attention of '{an.phrase}' in '{prompt}', steps {steps}, mean over heads, layers and phrase tokens"
    rows = []
    for label, video, maps in results:
        tiles = []
        for t in keyframe_indices(video.shape[0], min(5, video.shape[0])):
            tiles += frame_tiles(video, maps, t, f"t={t}")
        rows.append((label, tiles))
    frames = []
    for t in range(results[0][1].shape[0]):
        row = [(label, frame_tiles(video, maps, t, f"t={t}")) for label, video, maps in results]
        side_by_side = [(" | ".join(label for label, _ in row), [tile for _, tiles in row for tile in tiles])]
        frames.append(tile_grid(side_by_side, TILE, head))
    out = Path(an.out)
    return {"json": atomic_write(out / "attention.json", json.dumps(report)),
            "png": save_png(tile_grid(rows, TILE, head), out / "attention.png"),
            "mp4": save_mp4(frames, out / "attention.mp4", fps=int(settings.fps))}

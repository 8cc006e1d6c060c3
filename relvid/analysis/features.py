"""`relvid analyze features`: the Q, K and V features of the vision tokens at a sampling step (the paper's
Fig. 3 and 5a), averaged over layers, heads and frames, as h x w maps (mean over channels, and a
3-component PCA as RGB), for the base and for the base with each adapter set."""

from __future__ import annotations

import json
from pathlib import Path

from relvid.analysis.figures import colormap, rgb_image, save_mp4, save_png, tile_grid
from relvid.analysis.maps import feature_maps, token_grid
from relvid.errors import InputError
from relvid.files import atomic_write

TILE = 96  # pixels per map in the pictures


def _subject(cfg):
    """(prompt, clip record or None): a cache clip (analyze.clip) or the one prompt."""
    an = cfg.analyze
    if an.clip:
        from relvid.data.cache import read_clip

        if an.prompts:
            raise InputError("analyze.clip and analyze.prompts both given: the clip's own caption is used; "
                             "drop --prompt or --clip")
        record = read_clip(an.clip)
        return record.meta.get("caption", ""), record
    if len(an.prompts) != 1:
        raise InputError(f"relvid analyze features reads one prompt (--prompt) or a cache clip (--clip); got "
                         f"{len(an.prompts)} prompts")
    return an.prompts[0], None


def _tiles(maps: dict, frame: int | None = None) -> list[tuple[str, object]]:
    tiles = []
    for name in "qkv":
        m = maps[name]["mean"] if frame is None else maps[name]["mean_frames"][frame]
        tiles.append((f"{name.upper()} mean", colormap(m)))
    for name in "qkv":
        m = maps[name]["pca"] if frame is None else maps[name]["pca_frames"][frame]
        tiles.append((f"{name.upper()} PCA", rgb_image(m)))
    return tiles


def run(cfg) -> dict[str, Path]:
    from relvid.analysis.capture import AttentionCapture
    from relvid.analysis.parts import (
        Encoded,
        device_of,
        encode_prompt,
        forward_clip,
        label_of,
        load_model,
        resolve_steps,
        sample_and_capture,
    )
    from relvid.components import load_codec
    from relvid.inference.sampler import linear_quadratic_sigmas

    an, settings = cfg.analyze, cfg.sampling
    device = device_of(cfg)
    prompt, record = _subject(cfg)
    latents = None if record is None else record.latent_mean
    steps = resolve_steps(an.steps, settings.num_steps)
    schedule = linear_quadratic_sigmas(settings.num_steps, settings.threshold_noise)
    sigmas = [float(schedule[s]) for s in steps]
    for s, sigma in zip(steps, sigmas, strict=True):
        print(f"step {s} of {settings.num_steps}: sigma {sigma:.4f}")
    # a clip brings its cached text embedding, the one training saw
    enc = encode_prompt(cfg, prompt, None, device) if record is None else \
        Encoded(record.text_embeds.float(), record.text_mask.bool(), None, None)
    codec = load_codec(cfg.model.codec, cfg.model.vae_path or cfg.model.path, device="cpu")
    shape = tuple(latents.shape) if latents is not None else codec.latent_shape(settings.frames, settings.height,
                                                                               settings.width)
    seed = int(an.seeds[0])
    report: dict = {"prompt": prompt, "clip": an.clip, "seed": seed, "num_steps": settings.num_steps,
                    "steps": [{"step": s, "sigma": g} for s, g in zip(steps, sigmas, strict=True)], "models": {}}
    rows, frame_rows = [], []
    for source in [None, *an.adapters]:
        label = "base" if source is None else label_of(source)
        model, info = load_model(cfg, device, source)
        grid = token_grid(shape, int(model.config.patch_size))
        if latents is not None:
            capture = AttentionCapture(model, range(len(steps)))
            forward_clip(model, latents, enc, sigmas, seed, capture)
            records = dict(zip(steps, (capture.records[i] for i in range(len(steps))), strict=True))
        else:
            capture = AttentionCapture(model, steps, stop=True)
            sample_and_capture(model, cfg, enc, codec, seed, capture)
            records = capture.records
        del model
        entry = {"adapters": info["adapters"], "steps": {}}
        for s, sigma in zip(steps, sigmas, strict=True):
            maps = {name: feature_maps(records[s].mean(name), grid) for name in "qkv"}
            entry["steps"][str(s)] = {name: {k: v.tolist() for k, v in m.items()} for name, m in maps.items()}
            title = f"{label}, step {s} (sigma {sigma:.3f})"
            rows.append((title, _tiles(maps)))
            frame_rows.append([(f"{title}, latent frame {f}", _tiles(maps, f)) for f in range(grid[0])])
        report["models"][label] = entry
    report["grid"] = list(grid)
    out = Path(an.out)
    head = f"Q/K/V features of the vision tokens, mean over layers and heads: {prompt}"
    frames = [tile_grid([row[f] for row in frame_rows], TILE, head) for f in range(grid[0])]
    return {"json": atomic_write(out / "features.json", json.dumps(report)),
            "png": save_png(tile_grid(rows, TILE, head + " (mean over frames)"), out / "features.png"),
            "mp4": save_mp4(frames, out / "features.mp4", fps=2)}

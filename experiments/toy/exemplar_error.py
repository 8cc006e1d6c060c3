"""Where a customized toy model fits its exemplars: plain flow-matching error inside the subjects'
relation mask and outside it, for the base and for each adapter set of trained runs.

The same noise and noise levels for every model (4 draws per exemplar, seed 0), so the figures
compare directly. It answers "did a method learn the exemplars, and what did it cost elsewhere?"
without sampling: a method that fits the subjects as well as direct LoRA but raises the error
outside them above the base's has damaged what the base rendered right.

`bias` is where the model's predicted clean video errs outside the subjects: the mean of
(predicted - true clean latent) there, along the unit direction from the exemplars' mean background
latent to their mean subject latent. Positive: the model paints subject where the exemplar has
background. At high noise the subjects' places are uncertain, and a model that has learned the
exemplars' layout stops hedging there (bias near 0).

By default the noise level of each draw is uniform in (0, 1), as in training; `--sigmas` instead
reports each given level on its own (sampling decides the layout at the first, noisiest steps).

    python experiments/toy/exemplar_error.py --cache experiments/toy/work/cache --relation moving_apart \
        experiments/toy/work/runs/dreamrelation/moving_apart/seed0/train \
        experiments/toy/work/runs/direct_lora/moving_apart/seed0/train
    python experiments/toy/exemplar_error.py ... --sigmas 0.1,0.5,0.9,0.98
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from relvid.data.cache import ClipCache
from relvid.losses.flow_matching import model_timestep, noisy_latents, velocity_target
from relvid.models.adapter_file import RUN_ADAPTER_FILE, load_adapters
from relvid.models.lora import activate, adapter_names, inference_adapters
from relvid.toy.drivers.customize import load_base, load_customized
from relvid.toy.drivers.evaluate import noise_levels

DRAWS = 4


def adapter_sets(names: tuple[str, ...], inference: tuple[str, ...]) -> list[tuple[str, ...]]:
    """Every adapter, the inference set, then each trained set of a hybrid-mask step, then one by one."""
    sets = [tuple(names), tuple(inference)]
    if {"subject1", "subject2", "ffn"} <= set(names):
        sets += [("subject1", "ffn"), ("subject2", "ffn")]
    sets += [(n,) for n in names if len(names) > 1]
    return list(dict.fromkeys(sets))


def subject_direction(z0: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Unit vector over latent channels from the mean latent outside the mask to the mean inside.

    z0 (B, C, f, h, w); mask (B, 1, f, h, w) in [0, 1]."""
    inside = (z0 * mask).sum((0, 2, 3, 4)) / mask.expand_as(z0).sum((0, 2, 3, 4))
    outside = (z0 * (1 - mask)).sum((0, 2, 3, 4)) / (1 - mask).expand_as(z0).sum((0, 2, 3, 4))
    d = inside - outside
    return d / d.norm()


@torch.no_grad()
def errors(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, float]:
    sums = {"inside": 0.0, "outside": 0.0, "bias": 0.0}
    z0, mask, direction = batch["z0"], batch["mask"], batch["direction"]
    for k in range(DRAWS):
        noise, sigma = batch["noise"][k], batch["sigma"][k]
        z_sigma = noisy_latents(z0, noise, sigma)
        pred = model(hidden_states=z_sigma, encoder_hidden_states=batch["embeds"], timestep=model_timestep(sigma),
                     encoder_attention_mask=batch["text_mask"], return_dict=False)[0].float()
        err = (pred - velocity_target(z0, noise)) ** 2
        sums["inside"] += float((err * mask).sum() / mask.expand_as(err).sum()) / DRAWS
        sums["outside"] += float((err * (1 - mask)).sum() / (1 - mask).expand_as(err).sum()) / DRAWS
        # the clean latent the prediction implies: z_sigma = (1 - s) z0 + s n and v = z0 - n give z0 = z_sigma + s v
        clean = z_sigma + sigma.view(-1, 1, 1, 1, 1) * pred
        along = torch.einsum("bcfhw,c->bfhw", clean - z0, direction)[:, None]
        sums["bias"] += float((along * (1 - mask)).sum() / (1 - mask).sum()) / DRAWS
    return sums


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="*", type=Path, help="run folders (each holding adapters/relvid_adapters.safetensors)")
    p.add_argument("--cache", type=Path, required=True, help="the exemplar cache the runs were trained on")
    p.add_argument("--relation", required=True)
    p.add_argument("--sigmas", type=noise_levels, default=[],
                   help="comma-separated fixed noise levels in [0, 1], each reported on its own, e.g. 0.5,0.98 "
                        "(default: one report over levels drawn uniformly)")
    args = p.parse_args()

    cache = ClipCache(args.cache)
    records = [cache.read(c) for c in cache.clip_ids(args.relation)]
    if not records:
        raise SystemExit(f"{args.cache}: no clips of relation {args.relation!r}; it holds {cache.relations()}")
    z0 = torch.stack([r.latent_mean.float() for r in records])
    g = torch.Generator().manual_seed(0)
    batch = {"z0": z0, "embeds": torch.stack([r.text_embeds for r in records]),
             "text_mask": torch.stack([r.text_mask for r in records]).bool(),
             "mask": torch.stack([r.relation_mask.float() for r in records])[:, None],
             "noise": torch.randn((DRAWS, *z0.shape), generator=g),
             "sigma": torch.rand(DRAWS, len(records), generator=g)}
    batch["direction"] = subject_direction(z0, batch["mask"])
    levels = [(f"sigma {s:g}", torch.full_like(batch["sigma"], s)) for s in args.sigmas]
    levels = levels or [("sigma ~ U(0, 1)", batch["sigma"])]

    models: list[tuple[str, torch.nn.Module, tuple[str, ...] | None]] = [("base", load_base(), None)]
    for run in args.runs:
        adapter_file = run / RUN_ADAPTER_FILE
        if not adapter_file.is_file():
            raise SystemExit(f"{adapter_file} not found: pass a run folder of relvid.toy.drivers.customize")
        spec, _, _ = load_adapters(adapter_file)
        model = load_customized(adapter_file, adapters="all")
        models += [(f"{run}: {'+'.join(names)}", model, names)
                   for names in adapter_sets(adapter_names(spec), inference_adapters(spec))]
    for title, sigma in levels:
        print(f"{title}:", flush=True)
        for name, model, names in models:
            if names is not None:
                activate(model, list(names))
            e = errors(model, dict(batch, sigma=sigma))
            print(f"{name:60s} inside {e['inside']:.4f}   outside {e['outside']:.4f}   "
                  f"bias {e['bias']:+.4f}", flush=True)


if __name__ == "__main__":
    main()

"""`relvid analyze exemplar-fit`: where a model fits its exemplars. The plain flow-matching error on a
cache's exemplars of the relation, inside the subjects' relation mask and outside it, plus `bias`, for the
base model and each adapter subset (the attribution's subsets). Nothing is sampled.

Every model gets the same noise and noise levels (analyze.draws draws per exemplar from seed
analyze.seeds[0]), so the figures compare directly. A model that fits the subjects well but errs more
outside them than the base does has damaged what the base rendered right.

`bias` is where the model's predicted clean latent errs outside the subjects: the mean of (predicted -
true clean latent) there, along the unit direction from the exemplars' mean background latent to their
mean subject latent. Positive: the model paints subject where the exemplar has background. At high
noise the subjects' places are uncertain; a model that has learned the exemplars' layout stops hedging
there (bias near 0).

By default the noise level of each draw is uniform in (0, 1), as in training; analyze.sigmas reports
each given level on its own instead (sampling decides the layout at its first, noisiest steps)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from relvid.errors import InputError
from relvid.files import atomic_write

UNIFORM = "sigma ~ U(0, 1)"
METRICS = ("inside", "outside", "bias")
# Clips of one latent shape and text length go through the model together, up to this many vision tokens
# per forward (the toy world's clips: all at once; full-size Mochi, 44,520 tokens a clip: one by one).
BATCH_TOKENS = 8192


@dataclass
class Exemplars:
    """A relation's clips of a cache with the noise every model is scored on."""

    ids: list[str]
    z0: list[Tensor]  # (C, f, h, w) clean latents (the posterior means)
    embeds: list[Tensor]  # (L, D)
    text_mask: list[Tensor]  # (L,) bool
    mask: list[Tensor]  # (1, f, h, w) relation masks in [0, 1]
    noise: list[Tensor]  # (draws, C, f, h, w)
    sigma: Tensor  # (draws, clips), uniform in [0, 1)
    direction: Tensor  # (C,) unit vector from the background's mean latent to the subjects'


def subject_direction(z0: list[Tensor], mask: list[Tensor]) -> Tensor:
    """Unit vector over latent channels from the mean latent outside the masks to the mean inside, over
    all clips; z0 (C, f, h, w) and mask (1, f, h, w) in [0, 1] per clip (zero when the means agree)."""
    pairs = list(zip(z0, mask, strict=True))
    inside = sum((z * m).sum((1, 2, 3)) for z, m in pairs) / sum(float(m.sum()) for m in mask)
    outside = sum((z * (1 - m)).sum((1, 2, 3)) for z, m in pairs) / sum(float((1 - m).sum()) for m in mask)
    d = inside - outside
    norm = d.norm()
    return d / norm if norm > 0 else torch.zeros_like(d)


def batches(ex: Exemplars, patch: int = 2) -> list[list[int]]:
    """Clip indices in forward batches: consecutive clips of one latent shape and text length, each batch
    within BATCH_TOKENS vision tokens (at least one clip)."""
    groups: list[list[int]] = []
    for i, z in enumerate(ex.z0):
        tokens = z.shape[1] * (z.shape[2] // patch) * (z.shape[3] // patch)
        if groups:
            j = groups[-1][0]
            same = ex.z0[j].shape == z.shape and ex.embeds[j].shape == ex.embeds[i].shape
            if same and (len(groups[-1]) + 1) * tokens <= BATCH_TOKENS:
                groups[-1].append(i)
                continue
        groups.append([i])
    return groups


def read_exemplars(cache_dir: str | Path, relation: str, draws: int, seed: int) -> Exemplars:
    """The relation's clips of the cache (each with its stored relation mask, else the larger of its two
    subject masks: relation_mask's union rule) and `draws` noises and noise levels per clip from `seed`."""
    from relvid.data.cache import ClipCache
    from relvid.losses.flow_matching import relation_mask

    cache = ClipCache(cache_dir)
    ids = cache.clip_ids(relation)
    if not ids:
        raise InputError(f"analyze.cache_dir {cache_dir}: no clips of relation {relation!r}; it holds "
                         f"{cache.relations()}. Pass --relation one of them (custom_relation=true for one outside "
                         "the registry) or --cache the cache of this relation")
    records = [cache.read(i) for i in ids]
    z0 = [r.latent_mean.float() for r in records]
    masks = []
    for r in records:
        stored = None if r.relation_mask is None else r.relation_mask.float()[None]
        masks.append(relation_mask(r.subject_masks.float()[None], "union", stored))  # (1, f, h, w)
    inside, total = sum(float(m.sum()) for m in masks), sum(m.numel() for m in masks)
    if inside == 0 or inside == total:
        where = "no cell" if inside == 0 else "every cell"
        raise InputError(f"analyze.cache_dir {cache_dir}: the subject masks of relation {relation!r} cover {where} "
                         "of the latent grid, so there is no inside and outside to compare: exemplar-fit needs a "
                         "cache with subject masks (relvid preprocess with a mask source)")
    # One stream for every clip: the noise of draw k is one row of a (draws, all latent cells) draw, so a
    # cache whose clips share a shape gets the same numbers as drawing (draws, clips, C, f, h, w) at once.
    g = torch.Generator().manual_seed(int(seed))
    flat = torch.randn((draws, sum(z.numel() for z in z0)), generator=g)
    sigma = torch.rand(draws, len(records), generator=g)
    noise, start = [], 0
    for z in z0:
        noise.append(flat[:, start:start + z.numel()].reshape(draws, *z.shape))
        start += z.numel()
    return Exemplars(ids=ids, z0=z0, embeds=[r.text_embeds for r in records],
                     text_mask=[r.text_mask.bool() for r in records], mask=masks, noise=noise, sigma=sigma,
                     direction=subject_direction(z0, masks))


@torch.no_grad()
def fit_errors(model: nn.Module, ex: Exemplars, sigma: Tensor, bar=None) -> dict[str, float]:
    """Mean over draws of the squared velocity error inside and outside the relation masks (pooled over
    the clips and channels) and of the bias; sigma (draws, clips) are the noise levels."""
    from relvid.losses.flow_matching import model_timestep, noisy_latents, velocity_target

    param = next(model.parameters())
    device = param.device
    direction = ex.direction.to(device)
    groups = batches(ex, int(getattr(getattr(model, "config", None), "patch_size", 2)))
    draws = sigma.shape[0]
    result = dict.fromkeys(METRICS, 0.0)
    for k in range(draws):
        sums = dict.fromkeys(("inside", "inside_n", "outside", "outside_n", "bias", "bias_n"), 0.0)
        for idx in groups:
            z0 = torch.stack([ex.z0[i] for i in idx]).to(device)
            noise = torch.stack([ex.noise[i][k] for i in idx]).to(device)
            mask = torch.stack([ex.mask[i] for i in idx]).to(device)  # (B, 1, f, h, w)
            s = sigma[k, idx].float().to(device)
            z = noisy_latents(z0, noise, s)
            pred = model(hidden_states=z.to(param.dtype), timestep=model_timestep(s),
                         encoder_hidden_states=torch.stack([ex.embeds[i] for i in idx]).to(device, param.dtype),
                         encoder_attention_mask=torch.stack([ex.text_mask[i] for i in idx]).to(device),
                         return_dict=False)[0].float()
            err = (pred - velocity_target(z0, noise)) ** 2
            sums["inside"] += float((err * mask).sum())
            sums["inside_n"] += float(mask.expand_as(err).sum())
            sums["outside"] += float((err * (1 - mask)).sum())
            sums["outside_n"] += float((1 - mask).expand_as(err).sum())
            # the clean latent the prediction implies: z = (1 - s) z0 + s n and v = z0 - n give z0 = z + s v
            clean = z + s.view(-1, 1, 1, 1, 1) * pred
            along = torch.einsum("bcfhw,c->bfhw", clean - z0, direction)[:, None]
            sums["bias"] += float((along * (1 - mask)).sum())
            sums["bias_n"] += float((1 - mask).sum())
            if bar is not None:
                bar.update(len(idx))
        for name in METRICS:
            result[name] += sums[name] / sums[f"{name}_n"] / draws
    return result


def check_channels(model: nn.Module, ex: Exemplars, cache_dir) -> None:
    channels = getattr(getattr(model, "config", None), "in_channels", None)
    if channels is not None and channels != ex.z0[0].shape[0]:
        raise InputError(f"analyze.cache_dir {cache_dir}: its latents have {ex.z0[0].shape[0]} channels, the model "
                         f"(model.path) takes {channels}: pass the cache made with this model's VAE")


def noise_levels(ex: Exemplars, sigmas) -> list[tuple[str, float | None, Tensor]]:
    """(title, fixed level or None, (draws, clips) levels): the drawn ones, or each given level alone."""
    if not sigmas:
        return [(UNIFORM, None, ex.sigma)]
    return [(f"sigma {s:g}", float(s), torch.full_like(ex.sigma, float(s))) for s in sigmas]


def markdown(rows: list[dict]) -> str:
    lines = ["| noise level | adapters | subset | inside | outside | bias |", "|---|---|---|---:|---:|---:|"]
    lines += [f"| {r['level']} | {r['adapters']} | {r['subset']} | {r['inside']:.4f} | {r['outside']:.4f} | "
              f"{r['bias']:+.4f} |" for r in rows]
    return "\n".join(lines) + "\n"


def figure(rows: list[dict], titles: list[str], clips: int):
    """One heat-map table per metric: a row per model and subset, a column per noise level."""
    from relvid.analysis.figures import number_table, stack

    labels = list(dict.fromkeys(f"{r['adapters']}: {r['subset']}" for r in rows))
    short = ["U(0,1)" if t == UNIFORM else t.removeprefix("sigma ") for t in titles]
    meaning = {"inside": "error inside the subjects", "outside": "error outside the subjects",
               "bias": "bias towards the subjects outside them"}
    tables = []
    for metric in METRICS:
        values = np.full((len(labels), len(titles)), np.nan)
        for r in rows:
            values[labels.index(f"{r['adapters']}: {r['subset']}"), titles.index(r["level"])] = r[metric]
        tables.append(number_table(f"{meaning[metric]} ({clips} exemplars), by noise level", labels, short, values,
                                   low=float(np.nanmin(values)), high=float(np.nanmax(values))))
    return stack(tables)


def run(cfg) -> dict[str, Path]:
    from tqdm.auto import tqdm

    from relvid.analysis.attribution import subset_models
    from relvid.analysis.figures import save_png
    from relvid.analysis.parts import device_of

    an = cfg.analyze
    cache_dir = an.cache_dir or cfg.data.cache_dir
    if not cache_dir:
        raise InputError("analyze.cache_dir is not set: pass --cache DIR, a clip cache with subject masks (the one "
                         "the adapters trained on), or set data.cache_dir")
    ex = read_exemplars(cache_dir, cfg.relation, int(an.draws), int(an.seeds[0]))
    levels = noise_levels(ex, list(an.sigmas))
    device = device_of(cfg)
    rows: list[dict] = []
    skipped: list[str] = []
    for adapters, subset, active, model in subset_models(cfg, device, skipped):
        check_channels(model, ex, cache_dir)
        with tqdm(total=len(levels) * len(ex.ids) * int(an.draws), desc=f"{adapters}: {subset}") as bar:
            for title, level, sigma in levels:
                rows.append({"adapters": adapters, "subset": subset, "active": list(active), "level": title,
                             "sigma": level, **fit_errors(model, ex, sigma, bar)})
    for note in skipped:
        print(f"skipped {note}")
    titles = [title for title, _, _ in levels]
    rows.sort(key=lambda r: titles.index(r["level"]))  # stable: by noise level, then in the order computed
    out = Path(an.out)
    report = {"relation": cfg.relation, "cache": str(cache_dir), "clips": ex.ids, "draws": int(an.draws),
              "seed": int(an.seeds[0]), "levels": titles, "rows": rows, "skipped": skipped}
    table = markdown(rows)
    print(table, end="")
    return {"json": atomic_write(out / "exemplar_fit.json", json.dumps(report, indent=1)),
            "md": atomic_write(out / "exemplar_fit.md", table),
            "png": save_png(figure(rows, titles, len(ex.ids)), out / "exemplar_fit.png")}

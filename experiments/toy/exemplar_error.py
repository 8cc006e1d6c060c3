"""Where a customized toy model fits its exemplars: plain flow-matching error inside the subjects'
relation mask and outside it, for the base and for each adapter set of trained runs.

The same noise and noise levels for every model (4 draws per exemplar, seed 0), so the figures
compare directly. It answers "did a method learn the exemplars, and what did it cost elsewhere?"
without sampling: a method that fits the subjects as well as direct LoRA but raises the error
outside them above the base's has damaged what the base rendered right.

    python experiments/toy/exemplar_error.py --cache experiments/toy/work/cache --relation moving_apart \
        experiments/toy/work/runs/dreamrelation/moving_apart/seed0/train \
        experiments/toy/work/runs/direct_lora/moving_apart/seed0/train
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from relvid.data.cache import ClipCache
from relvid.losses.flow_matching import model_timestep, noisy_latents, velocity_target
from relvid.models.lora import activate, adapter_names, inference_adapters, load_adapters
from relvid.toy.customize import ADAPTER_FILE, load_base, load_customized

DRAWS = 4


def adapter_sets(names: tuple[str, ...], inference: tuple[str, ...]) -> list[tuple[str, ...]]:
    """Every adapter, the inference set, then each trained set of a hybrid-mask step, then one by one."""
    sets = [tuple(names), tuple(inference)]
    if {"subject1", "subject2", "ffn"} <= set(names):
        sets += [("subject1", "ffn"), ("subject2", "ffn")]
    sets += [(n,) for n in names if len(names) > 1]
    return list(dict.fromkeys(sets))


@torch.no_grad()
def errors(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, float]:
    sums = {"inside": 0.0, "outside": 0.0}
    mask = batch["mask"]
    for k in range(DRAWS):
        noise, sigma = batch["noise"][k], batch["sigma"][k]
        pred = model(hidden_states=noisy_latents(batch["z0"], noise, sigma), encoder_hidden_states=batch["embeds"],
                     timestep=model_timestep(sigma), encoder_attention_mask=batch["text_mask"], return_dict=False)[0]
        err = (pred.float() - velocity_target(batch["z0"], noise)) ** 2
        sums["inside"] += float((err * mask).sum() / mask.expand_as(err).sum()) / DRAWS
        sums["outside"] += float((err * (1 - mask)).sum() / (1 - mask).expand_as(err).sum()) / DRAWS
    return sums


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="*", type=Path, help="run folders (each holding adapters/relvid_adapters.safetensors)")
    p.add_argument("--cache", type=Path, required=True, help="the exemplar cache the runs were trained on")
    p.add_argument("--relation", required=True)
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
             "noise": torch.randn((DRAWS, *z0.shape), generator=g), "sigma": torch.rand(DRAWS, len(records), generator=g)}

    def show(name: str, e: dict[str, float]) -> None:
        print(f"{name:60s} inside {e['inside']:.4f}   outside {e['outside']:.4f}", flush=True)

    show("base", errors(load_base(), batch))
    for run in args.runs:
        adapter_file = run / ADAPTER_FILE
        if not adapter_file.is_file():
            raise SystemExit(f"{adapter_file} not found: pass a run folder of relvid.toy.customize")
        spec, _, _ = load_adapters(adapter_file)
        model = load_customized(adapter_file, adapters="all")
        for names in adapter_sets(adapter_names(spec), inference_adapters(spec)):
            activate(model, list(names))
            show(f"{run}: {'+'.join(names)}", errors(model, batch))


if __name__ == "__main__":
    main()

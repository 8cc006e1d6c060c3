"""`relvid analyze qkv-subspace`: the Q/K/V subspace similarity of the base (Fig. 5b) and of each adapter's
update against the base weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from relvid.analysis.figures import number_table, save_png, stack
from relvid.analysis.subspace import PAIRS, adapter_similarity, qkv_similarity
from relvid.files import atomic_write


def base_figure(entries: list[dict], title: str):
    """One heat map per branch and space: rows (pair, rank), columns blocks."""
    panels = []
    for branch in ("vision", "text"):
        for space in ("output", "input"):
            chosen = [e for e in entries if e["branch"] == branch and e["space"] == space]
            if not chosen:
                continue
            blocks = [b["block"] for b in chosen[0]["blocks"]]
            rows, values = [], []
            for a, b in PAIRS:
                for e in chosen:
                    rows.append(f"{a.upper()}-{b.upper()} r={e['rank']} (chance {e['chance']:.2f})")
                    values.append([blk[f"{a}_{b}"] for blk in e["blocks"]])
            panels.append(number_table(f"{title}: {branch} branch, {space} space of the weight", rows,
                                       [str(b) for b in blocks], np.array(values)))
    return stack(panels)


def adapter_figure(entries: list[dict], title: str):
    """Per adapter and space: mean similarity over blocks of its update to the base Q, K, V, out weights."""
    rows, values = [], []
    top = max(e["rank"] for e in entries)  # the figure shows the largest rank; the JSON holds every one
    keys = sorted({(e["adapter"], e["branch"], e["module"], e["space"], e["rank"]) for e in entries
                   if e["rank"] == top})
    for adapter, branch, module, space, rank in keys:
        chosen = [e for e in entries if (e["adapter"], e["branch"], e["module"], e["space"], e["rank"])
                  == (adapter, branch, module, space, rank)]
        rows.append(f"{adapter} on {branch} {module.upper()}, {space}, r={rank}")
        values.append([np.mean([e[p] for e in chosen]) if chosen[0].get(p) is not None else np.nan
                       for p in ("q", "k", "v", "out")])
    return number_table(f"{title}: adapter update vs base weight (mean over blocks)", rows,
                        ["Q", "K", "V", "out"], np.array(values))


def run(cfg) -> dict[str, Path]:
    from tqdm.auto import tqdm

    from relvid.analysis.parts import device_of, label_of, load_model

    out = Path(cfg.analyze.out)
    ranks = list(cfg.analyze.ranks)
    device = device_of(cfg)
    model, _ = load_model(cfg, device)
    report: dict = {"base": qkv_similarity(model, ranks, progress=True), "adapters": {}}
    del model
    images = [base_figure(report["base"], "base")]
    for source in tqdm(list(cfg.analyze.adapters), desc="adapters", disable=not cfg.analyze.adapters):
        model, info = load_model(cfg, device, source)
        entries = adapter_similarity(model, ranks)
        report["adapters"][label_of(source)] = {"source": info["adapters"], "entries": entries}
        if entries:
            images.append(adapter_figure(entries, label_of(source)))
    paths = {"json": atomic_write(out / "qkv_subspace.json", json.dumps(report, indent=1)),
             "png": save_png(stack(images), out / "qkv_subspace.png")}
    return paths

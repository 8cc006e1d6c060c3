"""`relvid demo`: the whole method on a CPU in minutes, in the toy world.

1. exemplars of one relation (white circle + white square) into a clip cache;
2. customize the committed base with DreamRelation and with direct LoRA (relvid.training.run.run);
3. sample the relation's test prompts (unseen subject pairs) with base, direct LoRA, DreamRelation;
4. judge them and write results.json, a Markdown/CSV table, a PNG grid, mp4s, and the
   DreamRelation adapter as a diffusers LoRA file; print a Table-1-like table.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

from omegaconf import OmegaConf

from relvid.config import SamplingConfig, to_yaml
from relvid.errors import InputError, UserError
from relvid.eval.report import write_results
from relvid.models.adapter_file import RUN_ADAPTER_FILE, load_adapters
from relvid.models.lora_io import export_state_dict
from relvid.toy.drivers.base import BASE_DIR
from relvid.toy.drivers.customize import customize, load_base, load_customized, method_config
from relvid.toy.drivers.datasets import build_exemplar_cache, exemplar_frames
from relvid.toy.drivers.evaluate import METRICS, TOY_SAMPLING, generate, score, test_prompts
from relvid.toy.drivers.figures import save_grid
from relvid.toy.world import RELATIONS
from relvid.video_io import write_mp4

# Subject 1 starts touching subject 2 (8.5 px apart) and moves about 9.5 px away. The base (generic
# moves of <= 5 px) does it by chance in 0.03 of test videos; it is the toy relation customization
# learns best (direct LoRA on all 10 test prompts of seed 0, experiments/toy/RESULTS.md).
DEMO_RELATION = "moving_apart"
DEMO_METHODS = ("base", "direct_lora", "dreamrelation")
MP4_ZOOM = 4  # 32 px clips are written 128 px wide so a player shows them
DEMO_RUNS = ("dreamrelation", "direct_lora")
# Keys of a run's config.yaml that do not change what it learns: where it was written (a demo folder
# may be moved as a whole; the cache is checked on its own) and how it reports progress.
_NOT_LEARNED = ("output_dir", "data.cache_dir", "resume", "overwrite", "trainer.progress_bar",
                "trainer.progress_refresh")
_ABSENT = "(absent)"


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def _flatten(tree: object, prefix: str = "") -> dict[str, object]:
    """{"a.b.c": leaf} of a nested dict (lists are leaves)."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat: dict[str, object] = {}
    for key, value in tree.items():
        flat.update(_flatten(value, f"{prefix}{key}" if not prefix else f"{prefix}.{key}"))
    return flat


def _differences(old: dict[str, object], new: dict[str, object]) -> list[tuple[str, object, object]]:
    """(key, old, new) for every key whose value differs, in the order of `new` (then keys only in `old`)."""
    keys = [*new, *(k for k in old if k not in new)]
    return [(k, old.get(k, _ABSENT), new.get(k, _ABSENT)) for k in keys
            if k not in _NOT_LEARNED and old.get(k, _ABSENT) != new.get(k, _ABSENT)]


def _refuse(folder: Path, what: str, diffs: list[tuple[str, object, object]], delete: Path) -> None:
    key, old, new = diffs[0]
    more = f"; {len(diffs) - 1} more key{'s differ' if len(diffs) > 2 else ' differs'}" if len(diffs) > 1 else ""
    raise UserError(f"{folder} holds {what} made with other settings ({key}: {old!r} there, {new!r} asked now"
                    f"{more}); the demo reuses only identical work. Fix: pass another --out "
                    f"(make demo OUT=...), or delete {delete}")


def check_reusable(out: Path, relation: str, cache: Path, seed: int, base_dir: str | Path,
                   overrides: Sequence[str]) -> None:
    """Refuse (UserError) when `out` holds demo work made with other settings than these.

    A finished run is compared with the config this demo would train it with; the exemplar cache
    and the sampled results with the relation and seed. Nothing is written here.
    """
    stale: dict[str, list[tuple[str, object, object]]] = {}
    for method in DEMO_RUNS:
        run_dir = out / "runs" / method
        if not (run_dir / RUN_ADAPTER_FILE).is_file():
            continue  # nothing finished to reuse (an interrupted run is trained again)
        saved = run_dir / "config.yaml"
        if not saved.is_file():
            raise UserError(f"{run_dir} holds finished adapters but no config.yaml, so the demo cannot tell "
                            f"what settings trained them. Fix: pass another --out (make demo OUT=...), "
                            f"or delete {run_dir}")
        wanted = method_config(method, relation, cache, run_dir, seed=seed, base_dir=base_dir, overrides=overrides)
        new = _flatten(OmegaConf.to_container(OmegaConf.create(to_yaml(wanted, "train"))))
        old = _flatten(OmegaConf.to_container(OmegaConf.load(saved)))
        if diffs := _differences(old, new):
            stale[method] = diffs
    if stale:
        method, diffs = next(iter(stale.items()))
        # Another relation or seed makes the cache and results stale too; else only the runs that differ.
        delete = out / "runs" / method if len(stale) == 1 else out / "runs"
        if any(key in ("relation", "seed") for d in stale.values() for key, _, _ in d):
            delete = out
        _refuse(out / "runs" / method, f"a finished {method} run (its config.yaml)", diffs, delete)
    manifest = cache / "manifest.json"
    if manifest.is_file():
        found = json.loads(manifest.read_text(encoding="utf-8")).get("config", {})
        diffs = _differences({"relations": found.get("relations", _ABSENT), "seed": found.get("seed", _ABSENT)},
                             {"relations": [relation], "seed": seed})
        if diffs:
            _refuse(cache, "an exemplar cache", diffs, out)
    info = out / "demo.json"
    if info.is_file():
        found = json.loads(info.read_text(encoding="utf-8"))
        diffs = _differences({"relation": found.get("relation", _ABSENT), "seed": found.get("seed", _ABSENT)},
                             {"relation": relation, "seed": seed})
        if diffs:
            _refuse(out, "the results and videos (demo.json) of a demo", diffs, out)


def _train(method: str, relation: str, cache: Path, out: Path, seed: int, base_dir: str | Path,
           overrides: list[str]) -> Path:
    run_dir = out / "runs" / method
    adapters = run_dir / RUN_ADAPTER_FILE
    if adapters.is_file():  # check_reusable made sure it was trained with these very settings
        print(f"[demo] {method}: reusing {adapters} (delete {run_dir} to retrain)", flush=True)
        return adapters
    if run_dir.exists():  # an interrupted run of the demo: start it again from scratch
        shutil.rmtree(run_dir)
    print(f"[demo] customizing with {method} ...", flush=True)
    return customize(method, relation, cache, run_dir, seed=seed, base_dir=base_dir, overrides=overrides)


def format_table(results: dict[str, dict[str, float]]) -> str:
    head = f"{'method':<15}" + "".join(f"{m:>22}" for m in METRICS)
    lines = [head, "-" * len(head)]
    for method, row in results.items():
        lines.append(f"{method:<15}" + "".join(f"{row[m]:>22.3f}" for m in METRICS))
    return "\n".join(lines)


def run_demo(out: str | Path = "outputs/demo", relation: str = DEMO_RELATION, n_prompts: int = 10,
             seed: int = 0, base_dir: str | Path = BASE_DIR, overrides: list[str] | None = None,
             progress: bool = True, settings: SamplingConfig = TOY_SAMPLING) -> dict[str, dict[str, float]]:
    """Run the demo into `out`; returns {method: {metric: fraction}}."""
    if relation not in RELATIONS:
        raise InputError(f"--relation {relation!r} is not a toy relation; use one of {sorted(RELATIONS)}")
    prompts = test_prompts(relation, n_prompts, seed=seed)  # a bad --prompts fails before any training
    start = time.time()
    out = Path(out)
    overrides = [f"trainer.progress_bar={str(progress).lower()}", *(overrides or [])]
    cache = out / "cache"
    check_reusable(out, relation, cache, seed, base_dir, overrides)
    out.mkdir(parents=True, exist_ok=True)
    build_exemplar_cache(cache, [relation], seed=seed, progress=progress)

    adapters = {m: _train(m, relation, cache, out, seed, base_dir, overrides) for m in DEMO_RUNS}

    videos, results, verdicts = {}, {}, {}
    for method in DEMO_METHODS:
        model = (load_base(base_dir) if method == "base" else
                 load_customized(adapters[method], base_dir))
        videos[method] = generate(model, prompts, settings, progress=progress, desc=f"sampling {method}")
        results[method], verdicts[method] = score(videos[method], prompts)
        for i, (prompt, video) in enumerate(zip(prompts, videos[method], strict=True)):
            big = video.repeat_interleave(MP4_ZOOM, dim=1).repeat_interleave(MP4_ZOOM, dim=2)  # (T, 4H, 4W, 3)
            write_mp4(out / "videos" / method / f"{i:02d}_{_slug(prompt.text)}.mp4", big, fps=settings.fps)
        del model

    spec, state, _ = load_adapters(adapters["dreamrelation"])
    # The demo's own export of the run it just reused or trained: written afresh every time.
    lora_file = export_state_dict(state, spec, out / "dreamrelation_lora", overwrite=True)

    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    run_info = {"relation": relation, "prompts": [p.text for p in prompts], "seeds": [p.seed for p in prompts],
                "seed": seed, "base": str(base_dir), "overrides": list(overrides),
                "sampling": dataclasses.asdict(settings)}
    (out / "demo.json").write_text(json.dumps(run_info, indent=2) + "\n", encoding="utf-8")
    write_results([{"method": m, **results[m]} for m in DEMO_METHODS], out, stem="table")
    per_video = [{"method": m, "prompt": p.text, "seed": p.seed, "relation": v.relation, "shapes": list(v.shapes),
                  "subjects_ok": v.subjects_ok, "leakage": v.leakage}
                 for m in DEMO_METHODS for p, v in zip(prompts, verdicts[m], strict=True)]
    (out / "judgements.json").write_text(json.dumps(per_video, indent=2) + "\n", encoding="utf-8")
    shown = min(4, len(prompts))
    bands = [("exemplar", [(f"white circle {RELATIONS[relation]} white square", exemplar_frames(relation, i, seed))
                           for i in range(2)])]
    bands += [(m, [(f"{p.text} [judged: {v.relation}]", vid) for p, v, vid in
                   zip(prompts[:shown], verdicts[m][:shown], videos[m][:shown], strict=True)]) for m in DEMO_METHODS]
    save_grid(out / "grid.png", bands)

    minutes = (time.time() - start) / 60
    print(f"\nToy world, relation '{relation}': {len(prompts)} test prompts with unseen subject pairs "
          f"({minutes:.1f} min)\n")
    print(format_table(results))
    print(f"\nresults: {out / 'results.json'}  grid: {out / 'grid.png'}  videos: {out / 'videos'}\n"
          f"diffusers LoRA: {lora_file}  TensorBoard: {out / 'runs'}")
    return results

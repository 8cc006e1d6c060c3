"""`relvid toy-base`: the two pretraining stages, the reuse of a finished image stage, and the
fidelity measurement afterwards (or alone, with --evaluate-only)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from relvid.errors import InputError
from relvid.toy.drivers.base import BASE_DIR, INFO_NAME, pretrain, stage_settings
from relvid.toy.drivers.customize import load_base
from relvid.toy.drivers.evaluate import base_report
from relvid.toy.world import test_pairs


def toy_base(opts) -> None:
    """Run `relvid toy-base` with its options (the attributes its parser defines)."""
    pairs = len(test_pairs())
    lowest = 1 if opts.evaluate_only else 0  # after training, 0 skips the measurement
    if not lowest <= opts.eval_prompts <= pairs:  # checked before any training, not after it
        raise InputError(f"--eval-prompts must be {lowest}-{pairs}, got {opts.eval_prompts}")
    if opts.threads:
        torch.set_num_threads(opts.threads)
    out = Path(opts.out or BASE_DIR)
    info_path = out / INFO_NAME
    if opts.evaluate_only:
        if not (out / "config.json").is_file():
            raise InputError(f"--evaluate-only: {out} holds no base model (no config.json); "
                             "pass --out <a folder written by relvid toy-base>")
        info = json.loads(info_path.read_text()) if info_path.is_file() else {}  # its training record is kept
        info["evaluation"] = base_evaluation(out, opts.eval_prompts, opts.seed)
        info["evaluation_command"] = (f"relvid toy-base --evaluate-only --eval-prompts {opts.eval_prompts} "
                                      f"--seed {opts.seed}")
        info_path.write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        print(f"wrote the figures into {info_path}")
        return
    image_dir = Path(opts.work) / "image_stage"
    stages = []
    if opts.image_steps:
        wanted = stage_settings("image", opts.image_steps, opts.image_batch_size, opts.lr, opts.seed, 1, opts.init)
        if (image_dir / INFO_NAME).is_file():  # a finished image stage is reused, if it is this one
            done = json.loads((image_dir / INFO_NAME).read_text())
            if {k: done.get(k) for k in wanted} != wanted:
                raise InputError(f"{image_dir} holds an image stage trained with other settings "
                                 f"({ {k: done.get(k) for k in wanted} }); delete it or pass another --work")
        else:
            pretrain(image_dir, steps=opts.image_steps, batch_size=opts.image_batch_size, lr=opts.lr, seed=opts.seed,
                     device=opts.device, save_every=opts.save_every, init=opts.init, frames=1, stage="image",
                     save_dtype=torch.float32)  # the next stage starts from it: keep full precision
        stages.append(json.loads((image_dir / INFO_NAME).read_text()))
    init = image_dir if opts.image_steps else opts.init
    pretrain(out, steps=opts.steps, batch_size=opts.batch_size, lr=opts.lr, seed=opts.seed, device=opts.device,
             save_every=opts.save_every, init=init, stage="video")
    stages.append(json.loads(info_path.read_text()))
    command = (f"relvid toy-base --image-steps {opts.image_steps} --image-batch-size {opts.image_batch_size} "
               f"--steps {opts.steps} --batch-size {opts.batch_size} --lr {opts.lr} --seed {opts.seed}"
               + (f" --init {opts.init}" if opts.init else ""))
    info = {"stages": stages, "command": command}
    print(f"wrote the toy base model to {out}")
    if opts.eval_prompts:
        info["evaluation"] = base_evaluation(out, opts.eval_prompts, opts.seed)
    info_path.write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")


def base_evaluation(folder, n_prompts: int, seed: int) -> dict:
    """The base in `folder` sampled and judged on n_prompts unseen pairs x every relation verb."""
    report = base_report(load_base(folder), n_prompts=n_prompts, seed=seed)
    print(f"subject fidelity on unseen subject pairs: {report['subject_fidelity']:.3f} "
          f"({report['videos']} videos); relations by chance: {report['relation_accuracy_by_relation']}")
    return report

"""RelationAccuracyCallback: judged relation accuracy on a few prompts every N steps, in the run's loggers.

Rank zero samples each prompt with the inference adapters (fixed seeds, so values at different
steps are comparable), asks the VLM judge the paper's question `repeats` times per video and logs
val/relation_accuracy (mean over repeats), its std and the unparseable answers to every logger
the run has (TensorBoard, W&B); each evaluation is also appended to <output_dir>/relation_accuracy.jsonl.

A local judge is loaded at the first evaluation, not at setup: by then Lightning has moved the
model to its GPU, so the judge's weights go straight there in bf16 instead of through host memory
in float32. One larger than LARGE_JUDGE_BYTES is dropped after each evaluation and read again at
the next, so that it does not hold GPU memory the training needs.
"""

from __future__ import annotations

import gc
import json
from pathlib import Path

import lightning as L
import torch
from omegaconf import DictConfig

from relvid.inference.generate import generate_video, inference_scope
from relvid.training.callbacks.preview import PreviewPromptError, select_prompts

# A local judge with more weights than this (bytes) is freed after each evaluation (a 7B VLM in bf16: ~16 GB).
LARGE_JUDGE_BYTES = 1 << 30


class RelationAccuracyCallback(L.Callback):
    """Every `every_n_steps` optimizer steps: sample, judge, log."""

    def __init__(self, cfg: DictConfig) -> None:
        ra = cfg.relation_accuracy
        self.cfg = cfg
        self.every_n_steps = int(ra.every_n_steps)
        self.settings = ra.sampling
        self.repeats = int(ra.judge.repeats)
        self.seed = int(ra.seed)
        self.out_dir = Path(cfg.output_dir)
        self._judge = None
        self._codec = None
        self._step_before: int | None = None  # global_step when the current batch started
        self.history: list[dict] = []

    @classmethod
    def from_config(cls, cfg: DictConfig) -> RelationAccuracyCallback:
        return cls(cfg)

    def _wanted_prompts(self) -> list[str]:
        ra = self.cfg.relation_accuracy
        if ra.prompts:
            return list(ra.prompts)
        from relvid import relations
        from relvid.prompts import eval_prompts

        if not relations.is_known(self.cfg.relation):
            raise PreviewPromptError(f"relation_accuracy.prompts: {self.cfg.relation!r} has no evaluation prompts; "
                                     "list prompts (embedded in the cache) in relation_accuracy.prompts")
        return eval_prompts(self.cfg.relation)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not trainer.is_global_zero:
            return
        from relvid.data.cache import ClipCache
        from relvid.eval.judge import judge_question

        available = ClipCache(self.cfg.data.cache_dir).read_prompts()
        wanted = self._wanted_prompts()
        if not self.cfg.relation_accuracy.prompts:
            # the relation's evaluation prompts: use those the cache embeds (named prompts must all be there)
            wanted = [p for p in wanted if p in available]
        if not wanted:
            raise PreviewPromptError(
                f"relation_accuracy: none of the evaluation prompts of {self.cfg.relation} is embedded in "
                f"{self.cfg.data.cache_dir}/prompts.safetensors; re-run `relvid preprocess` (it embeds them) or set "
                "relation_accuracy.prompts")
        self._texts = select_prompts(available, wanted, int(self.cfg.relation_accuracy.max_prompts),
                                     "relation_accuracy.prompts")
        negative = self.settings.negative_prompt
        if self.settings.guidance_scale != 1.0 and negative not in available:
            raise PreviewPromptError(f"relation_accuracy: the cache's prompts.safetensors lacks the negative prompt "
                                     f"{negative!r}")
        self._prompts = {t: available[t] for t in [*self._texts, negative] if t in available}
        self.question = judge_question(self.cfg.relation)
        judge = self.cfg.relation_accuracy.judge
        if judge.kind == "local":  # a wrong folder fails now, not steps later; the weights load at first use
            from relvid.eval.local_judge import check_vlm_folder

            check_vlm_folder(judge.vlm_path)

    def _build_judge(self, pl_module: L.LightningModule):
        """The judge, on the module's device (where Lightning has put it by the first evaluation)."""
        from relvid.eval.evaluate import build_judge

        return build_judge(self.cfg.relation_accuracy.judge, pl_module.device,
                           default_cache=self.out_dir / "judge_cache")

    def _release_judge(self) -> None:
        """Drop a large local judge (its GPU memory goes back to the training); keep anything smaller."""
        model = getattr(self._judge, "model", None)
        if model is None:
            return  # the API judge holds no weights
        size = sum(p.numel() * p.element_size() for p in model.parameters())
        if size > LARGE_JUDGE_BYTES:
            device = self._judge.device
            self._judge = None
            del model
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx) -> None:
        self._step_before = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step == self._step_before:
            return  # a micro-batch inside an optimizer step (gradient accumulation): measured once the step ends
        if step % self.every_n_steps == 0 and trainer.is_global_zero:
            self.measure(trainer, pl_module, step)

    def measure(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> dict:
        from relvid.components import load_codec
        from relvid.eval.judge import judge_videos

        if self._codec is None:
            model = self.cfg.model
            self._codec = load_codec(model.codec, model.vae_path or model.path, device=str(pl_module.device))
        negative = self._prompts.get(self.settings.negative_prompt) if self.settings.guidance_scale != 1.0 else None
        with inference_scope(pl_module.transformer, pl_module.spec):
            videos = [generate_video(pl_module.transformer, self._codec, *self._prompts[text], negative,
                                     seed=self.seed + i, settings=self.settings, device=pl_module.device)
                      for i, text in enumerate(self._texts)]
        if self._judge is None:
            self._judge = self._build_judge(pl_module)
        result = judge_videos(self._judge, videos, self.question, repeats=self.repeats)
        metrics = {"val/relation_accuracy": result["mean"], "val/relation_accuracy_std": result["std"],
                   "val/judge_unparseable": float(result["unparseable"])}
        for logger in getattr(trainer, "loggers", None) or ():
            logger.log_metrics(metrics, step=step)
        record = {"step": step, "judge": self._judge.name, "prompts": self._texts, **result}
        self._release_judge()
        self.history.append(record)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with open(self.out_dir / "relation_accuracy.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        return record

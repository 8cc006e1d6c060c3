"""Training data: the clip cache as a stream of samples indexed by a global sample index k.

Every random choice for sample k (which clip, the posterior draw, caption dropout) is a pure
function of (seed, k), and the sampler derives k from (batch, rank, position in batch), where a
run's batches are its optimizer steps, or under gradient accumulation each step's micro-batches.
Resuming at any step or changing the number of data workers therefore reproduces the stream
exactly, with no RNG state in checkpoints.
"""

from __future__ import annotations

import operator
from collections.abc import Iterator
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from relvid.data.cache import CacheError, ClipCache, ClipRecord, cache_wide_problems, mixed_frames_problem
from relvid.errors import InputError
from relvid.losses.flow_matching import relation_mask
from relvid.seeding import derive_seed

# Stream tags (last argument of derive_seed) keep the seeds of different kinds of draws apart;
# relvid.training.module uses 1-4, the data stream 101 and up.
STREAM_EPOCH_PERMUTATION = 101
STREAM_SAMPLE = 102


class RelationDataset(Dataset):
    """All clips of a cache (or of one relation), sampled by global sample index k."""

    def __init__(self, cache: ClipCache | str | Path, relation: str | None = None, seed: int = 0,
                 caption_dropout: float = 0.1, sample_posterior: bool = True) -> None:
        if not 0.0 <= caption_dropout <= 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1], got {caption_dropout}")
        self.cache = cache if isinstance(cache, ClipCache) else ClipCache(cache)
        self.seed, self.caption_dropout, self.sample_posterior = seed, caption_dropout, sample_posterior
        self.clip_ids = self.cache.clip_ids(relation)
        if not self.clip_ids:
            which = f"for relation {relation!r} " if relation is not None else ""
            present = self.cache.relations()
            pick = (f", or train a relation the cache holds ({', '.join(present)}) with `relvid train --relation "
                    "NAME` (config key: relation)") if present else ""
            raise CacheError(f"{self.cache.manifest_path}: no clips {which}in the cache (relations present: "
                             f"{present or 'none'}). Fix: cache clips of this relation with `relvid preprocess "
                             f"--relation {relation or 'NAME'} --out {self.cache.root}`{pick}")
        self.records: list[ClipRecord] = [self.cache.read(i) for i in self.clip_ids]
        self._check_consistent()
        problems = cache_wide_problems(self.records, self.cache.manifest_path)
        if problems:
            raise CacheError(problems[0])
        self._perm_epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def _check_consistent(self) -> None:
        # The latent frame count f may differ between clips (batch 1 handles that); C, h, w and
        # the text width D may not: one model consumes every clip.
        first = self.records[0]
        c, _, h, w = first.latent_shape
        for rec in self.records[1:]:
            rc, _, rh, rw = rec.latent_shape
            if (rc, rh, rw) != (c, h, w):
                raise CacheError(f"{self.cache.path(first.clip_id)} and {self.cache.path(rec.clip_id)}: "
                                 f"field 'latent_mean': (C, h, w) {(c, h, w)} vs {(rc, rh, rw)}. Fix: "
                                 "cache all clips with the same codec and resolution")
            if rec.text_embeds.shape[1] != first.text_embeds.shape[1]:
                raise CacheError(f"{self.cache.path(first.clip_id)} and {self.cache.path(rec.clip_id)}: "
                                 f"field 'text_embeds': width D {first.text_embeds.shape[1]} vs "
                                 f"{rec.text_embeds.shape[1]}. Fix: cache all clips with one text encoder")

    def __len__(self) -> int:
        return len(self.records)

    def clip_for_index(self, k: int) -> int:
        """Clip position for sample k: position k % n of epoch k // n's permutation."""
        k = _check_index(k)
        n = len(self.records)
        epoch = k // n
        if epoch != self._perm_epoch:  # one permutation per epoch, kept while the epoch lasts
            g = torch.Generator().manual_seed(derive_seed(self.seed, epoch, STREAM_EPOCH_PERMUTATION))
            self._perm_epoch, self._perm = epoch, torch.randperm(n, generator=g)
        return int(self._perm[k % n])

    def __getitem__(self, k: int) -> dict:
        k = _check_index(k)
        i = self.clip_for_index(k)
        rec = self.records[i]
        g = torch.Generator().manual_seed(derive_seed(self.seed, k, STREAM_SAMPLE))
        # The dropout coin comes first, so it does not depend on the latent shape or posterior flag.
        dropped = bool(torch.rand((), generator=g) < self.caption_dropout)
        mean = rec.latent_mean.to(torch.float32, copy=True)
        if self.sample_posterior:
            eps = torch.randn(mean.shape, generator=g)
            latents = mean + torch.exp(0.5 * rec.latent_logvar.float()) * eps  # (C, f, h, w)
        else:
            latents = mean
        embeds = rec.text_embeds.to(torch.float32, copy=True)  # (L, D)
        mask = rec.text_mask.to(torch.bool, copy=True)  # (L,)
        if dropped:
            embeds.zero_()
            mask.zero_()
        subjects = rec.subject_masks.to(torch.float32, copy=True)  # (2, f, h, w)
        # the stored per-frame union (clip format 2); older clips store the max of the subjects'
        # time-averaged masks, which is what relation_mask(..., "max") computes
        stored = rec.relation_mask if rec.meta.get("format_version") != "1" else None
        stored = None if stored is None else stored.to(torch.float32, copy=True)[None]
        relation = relation_mask(subjects[None], "union", stored=stored)[0]  # (f, h, w)
        return {"latents": latents, "text_embeds": embeds, "text_mask": mask,
                "subject_masks": subjects, "relation_mask": relation, "clip_index": i, "index": k}


def _check_index(k: int) -> int:
    k = operator.index(k)
    if k < 0:
        raise IndexError(f"global sample index must be >= 0, got {k}")
    return k


class StepSampler(Sampler[int]):
    """Yields this rank's global sample indices, starting at a given optimizer step.

    Step s, rank r, position j in the batch -> k = (s * world_size + r) * batch_size + j, so every
    rank sees a disjoint slice and the stream from ``start_step`` is the tail of the full stream.
    """

    def __init__(self, total_steps: int, batch_size: int, start_step: int = 0, rank: int = 0,
                 world_size: int = 1) -> None:
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need batch_size >= 1 and 0 <= rank < world_size, got batch_size="
                             f"{batch_size}, rank={rank}, world_size={world_size}")
        if not 0 <= start_step <= total_steps:
            raise ValueError(f"need 0 <= start_step <= total_steps, got start_step={start_step}, "
                             f"total_steps={total_steps} (resuming a run that already finished?)")
        self.total_steps, self.batch_size, self.start_step = total_steps, batch_size, start_step
        self.rank, self.world_size = rank, world_size

    def __iter__(self) -> Iterator[int]:
        for step in range(self.start_step, self.total_steps):
            base = (step * self.world_size + self.rank) * self.batch_size
            yield from range(base, base + self.batch_size)

    def __len__(self) -> int:
        return (self.total_steps - self.start_step) * self.batch_size


class _TrainerStepSampler(StepSampler):
    """A StepSampler for a Lightning run: one epoch is the whole run, resumed where it stopped.

    Its steps are batches: optimizer step s with trainer.accumulate_grad_batches = a reads batches
    s * a ... s * a + a - 1, so a run resumed from a checkpoint (written between optimizer steps) reads
    exactly the clips the uninterrupted run read after that step.

    On a mid-run resume Lightning restores its batch counter of the epoch (step s) and ends the
    epoch when that counter reaches ``len(dataloader)``; reporting the whole run's length makes
    that happen exactly when the stream ends, so no spurious epoch boundary is crossed. Should an
    epoch still end early, the next one re-reads the trainer's step and continues the stream.
    """

    def __init__(self, trainer: L.Trainer, total_steps: int, batch_size: int) -> None:
        self._trainer = trainer
        # One optimizer step consumes `accumulate_grad_batches` batches: the sampler counts batches.
        self._accumulate = trainer.accumulate_grad_batches
        super().__init__(total_steps * self._accumulate, batch_size, start_step=self._start(),
                         rank=trainer.global_rank, world_size=trainer.world_size)

    def _start(self) -> int:
        return self._trainer.global_step * self._accumulate

    def __iter__(self) -> Iterator[int]:
        self.start_step = min(self._start(), self.total_steps)
        return super().__iter__()

    def __len__(self) -> int:
        return self.total_steps * self.batch_size


def collate_clips(items: list[dict]) -> dict:
    """Stack samples into a batch; text is zero-padded (mask False) to the longest L."""
    if not items:
        raise ValueError("collate_clips got an empty batch")
    shapes = {tuple(x["latents"].shape) for x in items}
    if len(shapes) > 1:
        raise ValueError(f"clips with different latent shapes {sorted(shapes)} in one batch: batch_size "
                         "> 1 needs clips of equal frame count; use batch_size 1 or cache equal-length clips")
    n_tokens = max(1, max(x["text_embeds"].shape[0] for x in items))
    dim = items[0]["text_embeds"].shape[1]
    embeds = torch.zeros(len(items), n_tokens, dim)  # (B, L, D)
    mask = torch.zeros(len(items), n_tokens, dtype=torch.bool)  # (B, L)
    for b, x in enumerate(items):
        n = x["text_embeds"].shape[0]
        embeds[b, :n] = x["text_embeds"]
        mask[b, :n] = x["text_mask"]
    return {
        "latents": torch.stack([x["latents"] for x in items]),  # (B, C, f, h, w)
        "text_embeds": embeds, "text_mask": mask,
        "subject_masks": torch.stack([x["subject_masks"] for x in items]),  # (B, 2, f, h, w)
        "relation_mask": torch.stack([x["relation_mask"] for x in items]),  # (B, f, h, w)
        "clip_index": torch.tensor([x["clip_index"] for x in items], dtype=torch.long),
        "index": torch.tensor([x["index"] for x in items], dtype=torch.long),
    }


class RelationDataModule(L.LightningDataModule):
    """Training batches from a clip cache, as one deterministic stream of ``total_steps`` steps."""

    def __init__(self, cache_dir: str | Path, relation: str | None = None, batch_size: int = 1,
                 num_workers: int = 0, seed: int = 0, caption_dropout: float = 0.1,
                 total_steps: int = 2400, sample_posterior: bool = True) -> None:
        super().__init__()
        self.cache_dir, self.relation = Path(cache_dir), relation
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.caption_dropout, self.total_steps = caption_dropout, total_steps
        self.sample_posterior = sample_posterior
        self.dataset: RelationDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.dataset is None:
            dataset = RelationDataset(self.cache_dir, relation=self.relation, seed=self.seed,
                                      caption_dropout=self.caption_dropout, sample_posterior=self.sample_posterior)
            # Batch 1 takes clips of any length; a larger batch stacks them and cannot.
            mixed = mixed_frames_problem(dataset.records, dataset.cache.manifest_path) if self.batch_size > 1 else None
            if mixed:
                raise CacheError(f"{mixed} (data.batch_size is {self.batch_size})")
            self.dataset = dataset

    def train_dataloader(self) -> DataLoader:
        self.setup("fit")
        if self.trainer is None:
            sampler = StepSampler(self.total_steps, self.batch_size)
        else:
            max_steps = self.trainer.max_steps
            # The sampler is one pass over the whole run: a second pass would replay samples.
            if max_steps == -1 or max_steps > self.total_steps:
                raise InputError(f"trainer max_steps={max_steps} but the data stream has total_steps="
                                 f"{self.total_steps}: set both to the same number of optimizer steps")
            sampler = _TrainerStepSampler(self.trainer, self.total_steps, self.batch_size)
        return DataLoader(self.dataset, batch_size=self.batch_size, sampler=sampler,
                          collate_fn=collate_clips, num_workers=self.num_workers,
                          persistent_workers=False, pin_memory=torch.cuda.is_available())

"""Space-time relational contrastive loss (RCL) and its memory bank.

The model output (velocity prediction) of a video, averaged over space, gives per-frame features;
their frame differences are the video's relational dynamics. Each frame difference (anchor) is
pulled toward the dynamics of OTHER videos of the same relation at the same frame-difference index
(positives, from the memory bank) and pushed away from single-frame features (negatives:
appearance without dynamics, from the current video and the bank).

Choices where the paper is silent (facts from the public reference code, ali-vilab/DreamRelation):
- Positives and negatives are drawn afresh for every anchor (the reference draws inside its
  per-anchor loop). Positives exclude entries of the same clip (the reference does not track clips,
  so with ~20 clips it sometimes contrasts a video with an older copy of itself; we do not).
- Negatives are the current video's single-frame features first, then single frames from the bank
  fill up to n_neg. The current frames KEEP their gradient, as in the reference. When the video has
  at least n_neg frames, n_neg of them are drawn at random (the reference would use all of them,
  e.g. 11 on Mochi with n_neg = 10).
- The bank holds one entry per video (dynamics and frames together), FIFO, detached, CPU, float32.
  The caller pushes after the optimizer step; rcl_loss_for_batch never pushes.
"""

from __future__ import annotations

import contextlib
from collections import deque
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


def float32_region(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast off on `device`: under Lightning's bf16-mixed the cosines would otherwise be bf16,
    rounded by up to ~4e-3 before the division by tau (0.07) magnifies the error ~14 times."""
    if not torch.amp.is_autocast_available(device.type):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, enabled=False)


def frame_features(output: Tensor) -> Tensor:
    """Per-frame features: (B, C, F, H, W) -> (B, F, C), mean over H, W."""
    if output.dim() != 5:
        raise ValueError(f"frame_features: output must have shape (B, C, F, H, W), got {tuple(output.shape)}")
    return output.mean(dim=(-2, -1)).transpose(1, 2)  # (B, C, F) -> (B, F, C)


def relational_dynamics(frames: Tensor) -> Tensor:
    """Relational dynamics: frame differences, (B, F, C) -> (B, F-1, C)."""
    if frames.dim() != 3 or frames.shape[1] < 2:
        raise ValueError(
            f"relational_dynamics: frames must have shape (B, F, C) with F >= 2, got {tuple(frames.shape)}"
        )
    return frames[:, 1:] - frames[:, :-1]  # (B, F-1, C)


def relational_contrastive_loss(anchors: Tensor, positives: Tensor, negatives: Tensor, tau: float = 0.07) -> Tensor:
    """Multi-positive InfoNCE, mean over anchors, in float32 (also inside an autocast region).

    anchors (N, C), positives (N, P, C) with P >= 1, negatives (N, Q, C). Features are L2-normalized,
    logits = cosine / tau; per anchor -log(sum_pos exp / (sum_pos exp + sum_neg exp)).
    """
    n, c = anchors.shape
    if positives.dim() != 3 or positives.shape[0] != n or positives.shape[2] != c or positives.shape[1] < 1:
        raise ValueError(
            f"relational_contrastive_loss: positives must have shape (N={n}, P>=1, C={c}), got {tuple(positives.shape)}"
        )
    if negatives.dim() != 3 or negatives.shape[0] != n or negatives.shape[2] != c:
        raise ValueError(
            f"relational_contrastive_loss: negatives must have shape (N={n}, Q, C={c}), got {tuple(negatives.shape)}"
        )
    with float32_region(anchors.device):
        a = F.normalize(anchors.float(), dim=-1)  # (N, C)
        others = F.normalize(torch.cat([positives, negatives], dim=1).float(), dim=-1)  # (N, P+Q, C)
        logits = torch.einsum("nc,nkc->nk", a, others) / tau  # (N, P+Q)
        n_pos = positives.shape[1]
        # logsumexp keeps exp(1/0.07) ~ 1.6e6 per term from overflowing
        loss = torch.logsumexp(logits, dim=1) - torch.logsumexp(logits[:, :n_pos], dim=1)  # (N,)
        return loss.mean()


def _randperm(n: int, generator: torch.Generator | None) -> Tensor:
    """A permutation of range(n) on CPU, drawn with `generator` (CPU or CUDA) or the global RNG."""
    device = generator.device if generator is not None else "cpu"
    return torch.randperm(n, generator=generator, device=device).cpu()


class _Entry(NamedTuple):
    clip: int
    dynamics: Tensor  # (F-1, C)
    frames: Tensor  # (F, C)


class MemoryBank:
    """FIFO bank of past videos' relational dynamics and single-frame features (detached, CPU, float32)."""

    def __init__(self, size: int = 64) -> None:
        if size < 1:
            raise ValueError(f"MemoryBank: size must be >= 1, got {size}")
        self.size = size
        self._entries: deque[_Entry] = deque(maxlen=size)

    def __len__(self) -> int:
        return len(self._entries)

    def push(self, clip_index: Tensor | list[int], dynamics: Tensor, frames: Tensor) -> None:
        """Append one entry per video, in batch order; the oldest entries fall out beyond `size`.

        dynamics (B, F-1, C), frames (B, F, C). All entries must share F and C (positives are stacked).
        """
        clips = _clip_list(clip_index)
        b = len(clips)
        if frames.dim() != 3 or frames.shape[0] != b:
            raise ValueError(f"MemoryBank.push: frames must have shape (B={b}, F, C), got {tuple(frames.shape)}")
        _, f, c = frames.shape
        if tuple(dynamics.shape) != (b, f - 1, c):
            raise ValueError(
                f"MemoryBank.push: dynamics must have shape (B, F-1, C) = {(b, f - 1, c)} to match frames, "
                f"got {tuple(dynamics.shape)}"
            )
        if self._entries and self._entries[0].frames.shape != (f, c):
            have = tuple(self._entries[0].frames.shape)
            raise ValueError(
                f"MemoryBank.push: got videos with (F, C) = {(f, c)} but the bank holds {have}; all clips of a "
                "run must have the same number of latent frames and channels"
            )
        # clone so a later in-place change of the caller's tensors cannot reach the bank
        dynamics = dynamics.detach().to("cpu", torch.float32).clone()
        frames = frames.detach().to("cpu", torch.float32).clone()
        for i, clip in enumerate(clips):
            self._entries.append(_Entry(clip, dynamics[i], frames[i]))

    def positives(self, exclude_clip: int | None, n_pos: int, generator: torch.Generator | None) -> Tensor | None:
        """Dynamics (P, F-1, C) of up to n_pos random entries whose clip != exclude_clip (any entry when
        exclude_clip is None); None if none."""
        return self.draw_positives(exclude_clip, n_pos, generator)[0]

    def draw_positives(self, exclude_clip: int | None, n_pos: int, generator: torch.Generator | None
                       ) -> tuple[Tensor | None, list[int]]:
        """positives() and the drawn entries' places in the bank (oldest first)."""
        if n_pos < 1:
            raise ValueError(f"MemoryBank.positives: n_pos must be >= 1, got {n_pos}")
        places = [i for i, e in enumerate(self._positive_entries())
                  if exclude_clip is None or e.clip != int(exclude_clip)]
        if not places:
            return None, []
        picked = [places[i] for i in _randperm(len(places), generator)[:n_pos].tolist()]
        entries = self._positive_entries()
        return torch.stack([entries[i].dynamics for i in picked]), picked  # (P, F-1, C)

    def negatives(self, n: int, generator: torch.Generator | None) -> Tensor | None:
        """Up to n random single-frame features (n', C) from all frames in the bank; None if empty or n < 1."""
        return self.draw_negatives(n, generator)[0]

    def draw_negatives(self, n: int, generator: torch.Generator | None) -> tuple[Tensor | None, list[int]]:
        """negatives() and the drawn frames' places in the bank's frame pool (oldest first)."""
        pool = self._frame_pool()
        if n < 1 or pool is None:
            return None, []
        picked = _randperm(pool.shape[0], generator)[:n]
        return pool[picked], picked.tolist()  # (n', C)

    def _positive_entries(self) -> list[_Entry]:
        return list(self._entries)

    def _frame_pool(self) -> Tensor | None:
        return torch.cat([e.frames for e in self._entries]) if self._entries else None  # (N * F, C)

    def state_dict(self) -> dict:
        if not self._entries:
            empty = torch.zeros(0)
            no_clips = torch.zeros(0, dtype=torch.long)
            return {"size": self.size, "clip_index": no_clips, "dynamics": empty, "frames": empty}
        return {
            "size": self.size,
            "clip_index": torch.tensor([e.clip for e in self._entries], dtype=torch.long),  # (N,)
            "dynamics": torch.stack([e.dynamics for e in self._entries]),  # (N, F-1, C)
            "frames": torch.stack([e.frames for e in self._entries]),  # (N, F, C)
        }

    def load_state_dict(self, state: dict) -> None:
        """Replace the contents with a saved state (oldest first); the saved size must match this bank's."""
        missing = {"size", "clip_index", "dynamics", "frames"} - set(state)
        if missing:
            raise KeyError(f"MemoryBank.load_state_dict: state is missing {sorted(missing)}")
        if int(state["size"]) != self.size:
            raise ValueError(
                f"MemoryBank.load_state_dict: the saved bank has size {int(state['size'])} but this one has "
                f"{self.size}; set the bank size to the saved value to resume, or start without the saved bank"
            )
        self._entries.clear()
        clips = state["clip_index"].tolist()
        if clips:
            self.push(clips, state["dynamics"], state["frames"])


class SplitMemoryBank(MemoryBank):
    """The reference code's two FIFOs: the dynamics of the last `positive_videos` videos (positives)
    and the last `negative_frames` single-frame features (negatives), filled by the same push."""

    def __init__(self, positive_videos: int = 10, negative_frames: int = 64) -> None:
        super().__init__(positive_videos)
        if negative_frames < 1:
            raise ValueError(f"SplitMemoryBank: negative_frames must be >= 1, got {negative_frames}")
        self.negative_frames = negative_frames
        self._frames: deque[Tensor] = deque(maxlen=negative_frames)  # (C,) each

    def push(self, clip_index: Tensor | list[int], dynamics: Tensor, frames: Tensor) -> None:
        super().push(clip_index, dynamics, frames)
        for video in frames.detach().to("cpu", torch.float32).clone():
            self._frames.extend(video)  # frame by frame, oldest first

    def _frame_pool(self) -> Tensor | None:
        return torch.stack(list(self._frames)) if self._frames else None  # (n, C)

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["negative_frames"] = self.negative_frames
        state["frame_pool"] = self._frame_pool() if self._frames else torch.zeros(0)
        return state

    def load_state_dict(self, state: dict) -> None:
        if int(state.get("negative_frames", -1)) != self.negative_frames:
            raise ValueError(
                "SplitMemoryBank.load_state_dict: the saved bank is not a split bank of "
                f"{self.negative_frames} frames (rcl.bank / rcl.negative_frames differ from the run that saved it)")
        super().load_state_dict(state)
        self._frames.clear()
        self._frames.extend(state["frame_pool"])


def make_memory_bank(rcl) -> MemoryBank:
    """The bank rcl.bank names: videos (one FIFO of rcl.bank_size videos) or split (reference code)."""
    if rcl.bank == "split":
        return SplitMemoryBank(int(rcl.positive_videos), int(rcl.negative_frames))
    return MemoryBank(int(rcl.bank_size))


def _clip_list(clip_index: Tensor | list[int]) -> list[int]:
    if isinstance(clip_index, Tensor):
        if clip_index.dim() != 1:
            raise ValueError(f"contrastive: clip_index must have shape (B,), got {tuple(clip_index.shape)}")
        return [int(i) for i in clip_index.tolist()]
    return [int(i) for i in clip_index]


def _negatives_for_anchor(
    frames: Tensor, bank: MemoryBank, n_neg: int, generator: torch.Generator | None, all_current: bool = False
) -> tuple[Tensor, dict]:
    """n_neg single-frame features (fewer if the bank is short): current frames first, bank fills the
    rest. With more than n_neg current frames, n_neg of them at random, or all of them (all_current,
    the reference code). Also returns the draws: {"current": frame indices or None (all), "bank": places}."""
    f = frames.shape[0]
    if f >= n_neg and not all_current:
        picked = _randperm(f, generator)[:n_neg]
        return frames[picked.to(frames.device)], {"current": picked.tolist(), "bank": []}  # (n_neg, C)
    from_bank, places = bank.draw_negatives(n_neg - f, generator)
    if from_bank is None:
        return frames, {"current": None, "bank": []}  # (F, C)
    return torch.cat([frames, from_bank.to(frames.device, torch.float32)]), {"current": None, "bank": places}


def rcl_loss_for_batch(
    output: Tensor,
    clip_index: Tensor | list[int],
    bank: MemoryBank,
    n_pos: int = 4,
    n_neg: int = 10,
    tau: float = 0.07,
    generator: torch.Generator | None = None,
    exclude_same_clip: bool = True,
    all_current_negatives: bool = False,
) -> tuple[Tensor | None, dict]:
    """RCL of a batch of model outputs (B, C, F, H, W) against the memory bank, in float32 even inside an
    autocast region; does not push.

    Anchors are each video's F-1 frame differences; videos without positives (no other clip in the
    bank) are skipped, and the loss is the mean over the anchors of the remaining videos, or None
    when none remain. info: "frames" (B, F, C) and "dynamics" (B, F-1, C) detached, for the caller's
    push after the optimizer step; "n_pos" / "n_neg": positives / negatives per anchor (smallest over
    the videos used; 0 when the loss is None); "draws": per video, per anchor, the bank places of its
    positives and its negatives' draws (for tests that replay them). exclude_same_clip=False lets a
    clip's own older entries be its positives; all_current_negatives: see _negatives_for_anchor.
    """
    if n_pos < 1 or n_neg < 0:
        raise ValueError(f"rcl_loss_for_batch: need n_pos >= 1 and n_neg >= 0, got n_pos={n_pos}, n_neg={n_neg}")
    with float32_region(output.device):  # the loss of each video is float32 too (relational_contrastive_loss)
        frames = frame_features(output.float())  # (B, F, C)
        dynamics = relational_dynamics(frames)  # (B, F-1, C)
    clips = _clip_list(clip_index)
    if len(clips) != output.shape[0]:
        raise ValueError(f"rcl_loss_for_batch: {len(clips)} clip indices for a batch of {output.shape[0]} videos")
    info: dict = {"frames": frames.detach(), "dynamics": dynamics.detach(), "n_pos": 0, "n_neg": 0, "draws": []}
    n_anchor = dynamics.shape[1]
    per_video, used_pos, used_neg = [], [], []
    for b, clip in enumerate(clips):
        pos_rows, neg_rows, draws = [], [], []
        info["draws"].append(draws)
        for i in range(n_anchor):
            pos, places = bank.draw_positives(clip if exclude_same_clip else None, n_pos, generator)  # (P, F-1, C)
            if pos is None:
                break
            if pos.shape[1:] != dynamics.shape[1:]:
                raise ValueError(
                    f"rcl_loss_for_batch: bank dynamics {tuple(pos.shape[1:])} do not match this batch's "
                    f"{tuple(dynamics.shape[1:])}; all clips must have the same latent frames and channels"
                )
            pos_rows.append(pos[:, i].to(output.device, torch.float32))  # (P, C), same frame-difference index
            negatives_i, negative_draws = _negatives_for_anchor(frames[b], bank, n_neg, generator,
                                                                all_current_negatives)
            neg_rows.append(negatives_i)  # (Q, C)
            draws.append({"positives": places, "negatives": negative_draws})
        if not pos_rows:
            continue
        positives = torch.stack(pos_rows)  # (F-1, P, C)
        negatives = torch.stack(neg_rows)  # (F-1, Q, C)
        per_video.append(relational_contrastive_loss(dynamics[b], positives, negatives, tau=tau))
        used_pos.append(positives.shape[1])
        used_neg.append(negatives.shape[1])
    if not per_video:
        return None, info
    info["n_pos"], info["n_neg"] = min(used_pos), min(used_neg)
    # every video has F-1 anchors, so the mean of per-video means is the mean over all anchors
    return torch.stack(per_video).mean(), info

"""Relation Accuracy with a VLM judge, the paper's protocol.

Five evenly spaced keyframes (first and last included) go to the judge with the question
"Based on the keyframes of the video, analyze whether the two subjects are performing human-like
{phrase} interactions. The answer should be 'yes' or 'no'."; each video is judged `repeats`
times (10 in the paper). Accuracy of repeat r = share of videos answered yes in that repeat;
reported as mean +- std over the repeats. An answer that is neither yes nor no counts as not yes
and is reported in `unparseable`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from relvid import relations
from relvid.eval.metrics import keyframe_indices, mean_std

QUESTION_TEMPLATE = (
    "Based on the keyframes of the video, analyze whether the two subjects are performing human-like {} "
    "interactions. The answer should be 'yes' or 'no'."
)
NUM_KEYFRAMES = 5

_LEADING = re.compile(r"^[\s\"'`*_#>\-:.(\[{]*(?:answer\s*[:=]\s*)?[\s\"'`*_(\[]*(yes|no)\b", re.IGNORECASE)
_WORD = re.compile(r"\b(yes|no)\b", re.IGNORECASE)
_BOTH = re.compile(r"\b(yes|no)\s*(?:or|/)\s*(yes|no)\b", re.IGNORECASE)  # "yes or no": repeats the question


def judge_question(relation: str) -> str:
    """The paper's prompt with the relation's judge phrase (e.g. 'handshaking')."""
    phrase = relations.resolve(relation).judge_phrase if relations.is_known(relation) else relation.replace("_", " ")
    return QUESTION_TEMPLATE.format(phrase)


def parse_yes_no(answer: str) -> bool | None:
    """True for yes, False for no, None when the answer does not say which.

    An answer that starts with yes/no (after quotes, markdown or "Answer:") decides by that word;
    otherwise exactly one of the two words must occur ("The subjects ... so the answer is no.").
    """
    if not isinstance(answer, str) or _BOTH.search(answer):
        return None
    m = _LEADING.match(answer)
    if m:
        return m.group(1).lower() == "yes"
    words = {w.lower() for w in _WORD.findall(answer)}
    if len(words) == 1:
        return words.pop() == "yes"
    return None


def keyframes(video: Tensor, n: int = NUM_KEYFRAMES) -> Tensor:
    """uint8 (T, H, W, 3) -> its n keyframes (n, H, W, 3)."""
    return video[keyframe_indices(video.shape[0], n)]


@dataclass(frozen=True)
class Verdict:
    answer: str  # the judge's raw text
    yes: bool | None  # parsed; None = unparseable


class Judge(Protocol):
    """A VLM that answers a question about a few images; `repeat` selects an independent draw."""

    name: str

    def ask(self, images: Tensor, question: str, repeat: int) -> str:
        """images: uint8 (N, H, W, 3) keyframes; returns the raw answer text."""
        ...


def judge_videos(judge: Judge, videos: Sequence[Tensor], question: str, repeats: int = 10,
                 progress: bool = False) -> dict:
    """Relation Accuracy over videos: {"mean", "std", "per_repeat", "per_video", "unparseable", "answers"}."""
    from tqdm.auto import tqdm

    if not videos:
        raise ValueError("judge_videos: no videos to judge")
    if repeats < 1:
        raise ValueError(f"judge_videos: repeats must be >= 1, got {repeats}")
    verdicts: list[list[Verdict]] = []  # [video][repeat]
    frames = [keyframes(v) for v in videos]
    bar = tqdm(total=len(videos) * repeats, desc="judging", disable=not progress)
    for kf in frames:
        row = []
        for r in range(repeats):
            text = judge.ask(kf, question, r)
            row.append(Verdict(text, parse_yes_no(text)))
            bar.update()
        verdicts.append(row)
    bar.close()
    per_repeat = [sum(v[r].yes is True for v in verdicts) / len(verdicts) for r in range(repeats)]
    stats = mean_std(per_repeat)
    return {
        "mean": stats["mean"], "std": stats["std"], "per_repeat": per_repeat,
        "per_video": [sum(x.yes is True for x in v) / repeats for v in verdicts],
        "unparseable": sum(x.yes is None for v in verdicts for x in v),
        "answers": [[x.answer for x in v] for v in verdicts],
    }


def jpeg_bytes(image: Tensor, quality: int = 90) -> bytes:
    """uint8 (H, W, 3) -> JPEG bytes."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image.to(torch.uint8).numpy()).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()

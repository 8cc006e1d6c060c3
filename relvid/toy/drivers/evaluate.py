"""Sample toy test prompts with a transformer (base, or with adapters) and score them with the judge.

Metrics (fractions, toy counterparts of the paper's): relation accuracy (judged relation == the
prompted one), subject fidelity (both prompted subjects with the right colour and shape, CLIP-T's
role), colour fidelity (both prompted colours present and no exemplar-coloured shape: subject
fidelity without the shapes, which the committed base rarely draws), appearance leakage (an
exemplar-coloured shape in a video whose prompt has none) and temporal consistency (mean cosine
similarity of consecutive frames, relvid.eval.metrics).

A ReVersion run learns a token, not adapters: its test prompts carry the token in place of the relation's
phrase, in its training caption's form ("A person is <R> a person." -> "A red circle is <R> a blue
square."), and are encoded with the run's learned vectors (relvid.models.reversion.encode_with_token). The
judge reads the videos only, so they are scored as every other method's.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from torch import Tensor, nn
from tqdm.auto import tqdm

from relvid.config import SamplingConfig
from relvid.errors import InputError
from relvid.eval.metrics import temporal_consistency
from relvid.inference.generate import generate_video
from relvid.models.reversion import ReVersionSpec, encode_with_token
from relvid.seeding import derive_seed
from relvid.toy.codec import ToyCodec
from relvid.toy.judge import Judgement, judge
from relvid.toy.text import ToyTextEncoder
from relvid.toy.world import FPS, FRAMES, RELATIONS, SIZE, Subject, relation_caption, test_pairs

# The toy world's sampling: fewer Euler steps than Mochi's 64 (the toy base converges sooner).
TOY_SAMPLING = SamplingConfig(num_steps=24, guidance_scale=4.0, frames=FRAMES, height=SIZE, width=SIZE, fps=FPS)
METRICS = ("relation_accuracy", "subject_fidelity", "colour_fidelity", "appearance_leakage", "temporal_consistency")
_SAMPLE_STREAM = 301
# ReVersion's test prompts: its training caption ("A person is <R> a person.") with the test pair.
TOKEN_PROMPT = "A {s1} is {token} a {s2}."


def token_prompt_form(token: str) -> str:
    """How ReVersion's test prompts read, as recorded in its metrics: "A <subject> is <R> a <subject>."."""
    return TOKEN_PROMPT.format(s1="<subject>", s2="<subject>", token=token)


@dataclass(frozen=True)
class TestPrompt:
    relation: str
    s1: Subject
    s2: Subject
    seed: int
    token: str | None = None  # ReVersion's learned token, in place of the relation's phrase

    @property
    def text(self) -> str:
        if self.token is not None:
            return TOKEN_PROMPT.format(s1=self.s1, s2=self.s2, token=self.token)
        return relation_caption(self.relation, self.s1, self.s2)


def test_prompts(relation: str, n_prompts: int = 10, n_seeds: int = 1, seed: int = 0,
                 token: str | None = None) -> list[TestPrompt]:
    """n_prompts unseen subject pairs x n_seeds sampling seeds for one relation; with `token` (ReVersion's),
    the prompts carry it instead of the relation's phrase (the same pairs and seeds)."""
    pairs = test_pairs()
    if not 1 <= n_prompts <= len(pairs):
        raise InputError(f"--prompts must be in 1..{len(pairs)}, got {n_prompts}")
    return [TestPrompt(relation, a, b, derive_seed(seed, i, k, _SAMPLE_STREAM), token)
            for i, (a, b) in enumerate(pairs[:n_prompts]) for k in range(n_seeds)]


def encode_test_prompts(text: ToyTextEncoder, prompts: list[TestPrompt],
                        learned: tuple[ReVersionSpec, dict[str, Tensor]] | None = None) -> list[tuple[Tensor, Tensor]]:
    """Per prompt (embeds, mask): by the toy encoder, or with a ReVersion token's learned vectors `learned`
    ((spec, vectors), relvid.models.adapter_file.read_reversion), which every prompt must then carry."""
    tokens = {p.token for p in prompts}
    if learned is None:
        if tokens != {None}:
            raise ValueError(f"prompts carrying {sorted(t for t in tokens if t)} need the token's learned vectors "
                             "(learned=read_reversion(<the run's adapters>))")
        return text.encode([p.text for p in prompts])
    spec, vectors = learned
    if tokens != {spec.token}:
        raise ValueError(f"a learned token ({spec.token}) samples prompts that carry it: "
                         f"test_prompts(..., token={spec.token!r})")
    return encode_with_token(text, [p.text for p in prompts], spec, vectors)


def generate(transformer: nn.Module, prompts: list[TestPrompt], settings: SamplingConfig = TOY_SAMPLING,
             device: str = "cpu", progress: bool = True, desc: str = "sampling",
             learned: tuple[ReVersionSpec, dict[str, Tensor]] | None = None) -> list[Tensor]:
    """One uint8 (T, H, W, 3) video per prompt, with the transformer's adapters as they are set, and with
    `learned` (a ReVersion run's (spec, vectors)) its token in the prompts. The negative prompt is plain."""
    codec, text = ToyCodec(), ToyTextEncoder()
    negative = text.encode([settings.negative_prompt])[0]
    encoded = encode_test_prompts(text, prompts, learned)
    transformer.eval()
    videos = []
    for prompt, (embeds, mask) in tqdm(list(zip(prompts, encoded, strict=True)), desc=desc, disable=not progress):
        videos.append(generate_video(transformer, codec, embeds, mask, negative, prompt.seed, settings, device=device))
    return videos


def noise_levels(text: str) -> list[float]:
    """An argparse type for the toy probes' --sigmas: "0.5,0.98" -> [0.5, 0.98], each in [0, 1]."""
    try:
        levels = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers such as 0.5,0.98, got {text!r}") from None
    if not levels or not all(0 <= s <= 1 for s in levels):
        raise argparse.ArgumentTypeError(f"noise levels must lie in [0, 1], got {text!r}")
    return levels


def frame_similarity(video: Tensor) -> float:
    """Temporal consistency of a uint8 (T, H, W, 3) video on its raw pixels as frame features."""
    return temporal_consistency(video.float().flatten(1) / 255.0)  # (T, H*W*3)


def video_record(video: Tensor, prompt: TestPrompt, verdict: Judgement) -> dict:
    """One video's verdict as plain data: its prompt and sampling seed, what the judge saw, and
    every metric for this video alone (a bool, or temporal consistency as a float)."""
    return {
        "prompt": prompt.text, "seed": prompt.seed, "judged_relation": verdict.relation,
        "present": list(verdict.present), "shapes": list(verdict.shapes),
        "relation_accuracy": verdict.relation == prompt.relation,
        "subject_fidelity": verdict.subjects_ok,
        "colour_fidelity": verdict.colours_ok,
        "appearance_leakage": verdict.leakage,
        "temporal_consistency": frame_similarity(video),
    }


def metrics_of(records: list[dict]) -> dict[str, float]:
    """The metrics of a set of videos: each one's mean over the per-video records (video_record)."""
    if not records:
        raise ValueError("metrics_of: no videos")
    return {m: sum(float(r[m]) for r in records) / len(records) for m in METRICS}


def score_videos(videos: list[Tensor], prompts: list[TestPrompt]) -> tuple[dict[str, float], list[dict],
                                                                          list[Judgement]]:
    """The metrics over a set of generated videos, each video's record (video_record) and judgement."""
    if len(videos) != len(prompts) or not videos:
        raise ValueError(f"score: {len(videos)} videos for {len(prompts)} prompts")
    verdicts = [judge(v, p.s1, p.s2) for v, p in zip(videos, prompts, strict=True)]
    records = [video_record(v, p, j) for v, p, j in zip(videos, prompts, verdicts, strict=True)]
    return metrics_of(records), records, verdicts


def score(videos: list[Tensor], prompts: list[TestPrompt]) -> tuple[dict[str, float], list[Judgement]]:
    """The metrics over a set of generated videos, and each video's judgement."""
    metrics, _, verdicts = score_videos(videos, prompts)
    return metrics, verdicts


def base_report(transformer: nn.Module, n_prompts: int = 10, seed: int = 0, device: str = "cpu",
                progress: bool = True) -> dict:
    """The base model on every relation's test prompts (unseen pairs, unseen verbs): subject fidelity
    overall, and how often each relation comes out by chance.

    Prompt i of every relation has the same subject pair and sampling seed (only the verb differs), so
    the len(RELATIONS) * n_prompts videos share n_prompts pairs and noise draws: the default uses all
    ten pairs."""
    prompts = [p for r in RELATIONS for p in test_prompts(r, n_prompts, seed=seed)]
    videos = generate(transformer, prompts, device=device, progress=progress, desc="base fidelity")
    metrics, verdicts = score(videos, prompts)
    chance = {r: sum(v.relation == r for v, p in zip(verdicts, prompts, strict=True) if p.relation == r) / n_prompts
              for r in RELATIONS}
    colours = sum(all(v.present) for v in verdicts) / len(verdicts)  # shape left out: a weaker bar
    return {"videos": len(prompts), **metrics, "both_colours_present": colours,
            "relation_accuracy_by_relation": chance}

"""The judge on rendered ground truth: relations right, generic motion not taken for a relation,
subjects (colour + shape) recognised, exemplar-coloured shapes reported as leakage, colour fidelity
(the prompted colours, no exemplar shape) apart from the shapes."""

import random

import pytest
import torch

from relvid.toy.drivers import evaluate
from relvid.toy.judge import judge
from relvid.toy.render import EXEMPLAR_STAGING, draw, render_clip
from relvid.toy.world import COLOURS, EXEMPLAR_COLOUR, GENERIC_MOTIONS, RELATIONS, Subject, all_subjects


def pairs(n: int, seed: int, allow_white: bool = True) -> list[tuple[Subject, Subject]]:
    rng = random.Random(seed)
    subjects = [s for s in all_subjects() if allow_white or s.colour != "white"]
    out = []
    while len(out) < n:
        a, b = rng.sample(subjects, 2)
        if a.colour != b.colour:
            out.append((a, b))
    return out


def accuracy(kind: str, n: int, seed: int) -> tuple[float, float]:
    right = subjects = 0
    for i, (a, b) in enumerate(pairs(n, seed)):
        verdict = judge(render_clip(kind, a, b, 10_000 * seed + i).video, a, b)
        right += verdict.relation == (kind if kind in RELATIONS else None)
        subjects += verdict.subjects_ok
    return right / n, subjects / n


@pytest.mark.parametrize("relation", sorted(RELATIONS))
def test_relations_on_ground_truth(relation):
    rel_acc, subj_acc = accuracy(relation, 8, seed=1)
    assert rel_acc >= 0.97 and subj_acc >= 0.87


@pytest.mark.parametrize("relation", sorted(RELATIONS))
def test_staged_exemplar_tracks_are_their_relation(relation):
    # The exemplars' own tracks (staged in mid-frame), drawn with two judgeable colours.
    a, b = Subject("red", "circle"), Subject("blue", "square")
    verdicts = [judge(render_clip(relation, a, b, seed, EXEMPLAR_STAGING).video, a, b).relation for seed in range(8)]
    assert verdicts == [relation] * 8


def test_generic_motion_is_no_relation():
    errors = sum(accuracy(kind, 8, seed=2)[0] < 1.0 for kind in GENERIC_MOTIONS)
    assert errors == 0  # 24 generic clips, no false positive (the bar is <= 5 %)


@pytest.mark.slow
@pytest.mark.parametrize("kind", [*sorted(RELATIONS), *GENERIC_MOTIONS])
def test_ground_truth_at_scale(kind):
    rel_acc, subj_acc = accuracy(kind, 60, seed=3)
    assert rel_acc >= 0.97 and subj_acc >= 0.9


def test_wrong_subject_is_not_fidelity_and_white_shape_is_leakage():
    red_circle, blue_square = Subject("red", "circle"), Subject("blue", "square")
    clip = render_clip("orbiting", red_circle, blue_square, 5)
    assert judge(clip.video, red_circle, blue_square).subjects_ok
    assert not judge(clip.video, Subject("red", "cross"), blue_square).subjects_ok  # wrong shape
    assert not judge(clip.video, red_circle, Subject("green", "square")).subjects_ok  # colour absent
    assert not judge(clip.video, red_circle, blue_square).leakage
    # the same tracks with a white square instead of the blue one: an exemplar subject appears
    white = Subject("white", "square")
    video, _ = draw(red_circle, white, (clip.tracks[0], clip.tracks[1]), clip.radii, clip.background)
    assert judge(video, red_circle, Subject("green", "cross")).leakage


def test_noise_does_not_fool_the_judge():
    a, b = Subject("yellow", "triangle"), Subject("magenta", "square")
    clip = render_clip("swapping", a, b, 11)
    noisy = (clip.video + 0.1 * torch.randn(clip.video.shape, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)
    verdict = judge(noisy, a, b)
    assert verdict.relation == "swapping" and verdict.subjects_ok


def test_colour_fidelity_asks_the_colours_and_no_exemplar_shape_not_the_shapes():
    red_circle, blue_square = Subject("red", "circle"), Subject("blue", "square")
    clip = render_clip("approaching", red_circle, blue_square, 7)
    right = judge(clip.video, red_circle, blue_square)
    assert right.colours_ok and right.subjects_ok
    # the prompted colours with other shapes: colour fidelity holds where subject fidelity fails
    wrong_shapes = judge(clip.video, Subject("red", "cross"), Subject("blue", "triangle"))
    assert wrong_shapes.colours_ok and not wrong_shapes.subjects_ok
    # a prompted colour absent: neither
    absent = judge(clip.video, red_circle, Subject("green", "square"))
    assert not absent.colours_ok and absent.present == (True, False)
    # both prompted colours present and an exemplar-white square in a corner of every frame: leakage,
    # so no colour fidelity, although both subjects are still found
    leaked = clip.video.clone()  # (3, T, H, W) in [-1, 1]
    leaked[:, :, 1:6, 1:6] = torch.tensor(COLOURS[EXEMPLAR_COLOUR])[:, None, None, None] * 2 - 1
    verdict = judge(leaked, red_circle, blue_square)
    assert all(verdict.present) and verdict.leakage and not verdict.colours_ok


def test_per_video_records_hold_every_metric_and_average_to_the_metrics():
    prompts = evaluate.test_prompts("approaching", 2)
    videos = [render_clip("approaching", p.s1, p.s2, i).video for i, p in enumerate(prompts)]
    videos[1] = torch.zeros_like(videos[1])  # a blank video: nothing present
    metrics, records, verdicts = evaluate.score_videos(videos, prompts)
    assert set(metrics) == set(evaluate.METRICS) and "colour_fidelity" in evaluate.METRICS
    assert [r["prompt"] for r in records] == [p.text for p in prompts]
    assert [r["seed"] for r in records] == [p.seed for p in prompts]
    assert records[0]["colour_fidelity"] and not records[1]["colour_fidelity"]
    assert metrics["colour_fidelity"] == 0.5 and records[1]["present"] == [False, False]
    for m in evaluate.METRICS:
        assert metrics[m] == pytest.approx(sum(float(r[m]) for r in records) / 2)
    assert metrics == evaluate.score(videos, prompts)[0] and [v.colours_ok for v in verdicts] == [True, False]

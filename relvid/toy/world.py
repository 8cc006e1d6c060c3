"""The toy world's vocabulary: video size, subjects (shape x colour), relations and captions.

Everything here is a constant: the renderer, the datasets, the judge and the base model agree on
it. Relations are judged symmetrically (are the two subjects performing X?), as the paper's VLM
judge is asked.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

FRAMES = 13  # 3k + 1 for the toy codec's temporal factor 3 -> 5 latent frames
SIZE = 32  # square frames, 32 x 32 px -> 16 x 16 latent cells, 8 x 8 tokens with patch 2
FPS = 8

SHAPES = ("circle", "square", "triangle", "cross")
# RGB in [0, 1]: saturated colours far apart from each other and from the dark backgrounds.
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.95, 0.15, 0.15),
    "green": (0.15, 0.85, 0.2),
    "blue": (0.25, 0.4, 1.0),
    "yellow": (0.95, 0.9, 0.15),
    "magenta": (0.9, 0.2, 0.9),
    "cyan": (0.15, 0.9, 0.9),
    "white": (0.95, 0.95, 0.95),
}
# The exemplar colour plays the role of NTU's people: a white shape in a test video is leakage.
EXEMPLAR_COLOUR = "white"


@dataclass(frozen=True)
class Subject:
    colour: str
    shape: str

    def __str__(self) -> str:
        return f"{self.colour} {self.shape}"


# Exemplar subjects ("a person and a person"): fixed for every relation.
EXEMPLAR_SUBJECTS = (Subject("white", "circle"), Subject("white", "square"))

# relation name -> the verb phrase between the two subjects ("A red circle is orbiting a blue square.")
RELATIONS: dict[str, str] = {
    "approaching": "is approaching",
    "moving_apart": "is moving away from",
    "orbiting": "is orbiting",
    "following": "is following",
    "pushing": "is pushing",
    "swapping": "is swapping places with",
    "bouncing": "is bouncing off",
}
# Generic motion of the base model's pretraining clips (small movements only, never a relation).
GENERIC_MOTIONS: dict[str, str] = {"static": "resting", "drift": "drifting", "wander": "wandering"}


def all_subjects() -> list[Subject]:
    return [Subject(c, s) for c in COLOURS for s in SHAPES]


def test_pairs() -> list[tuple[Subject, Subject]]:
    """Subject pairs of the test prompts: no exemplar colour, distinct colours and shapes, and
    never shown together in the base model's pretraining (see pretraining_pair_allowed)."""
    colours = [c for c in COLOURS if c != EXEMPLAR_COLOUR]
    pairs = []
    # A fixed, spread-out walk over colour and shape pairs (deterministic, no RNG needed).
    for i, (c1, c2) in enumerate(itertools.permutations(colours, 2)):
        s1 = SHAPES[i % len(SHAPES)]
        s2 = SHAPES[(i + 1 + i // len(SHAPES)) % len(SHAPES)]
        if s1 == s2:
            s2 = SHAPES[(SHAPES.index(s1) + 1) % len(SHAPES)]
        pairs.append((Subject(c1, s1), Subject(c2, s2)))
    return pairs[::3][:10]


def pretraining_pair_allowed(a: Subject, b: Subject) -> bool:
    """Pretraining pairs: distinct colours, and no test pair in either order."""
    if a.colour == b.colour:
        return False
    held_out = {frozenset((x, y)) for x, y in test_pairs()}
    return frozenset((a, b)) not in held_out


def relation_caption(relation: str, s1: Subject, s2: Subject) -> str:
    if relation not in RELATIONS:
        raise KeyError(f"unknown toy relation {relation!r}; toy relations are {sorted(RELATIONS)}")
    return f"A {s1} {RELATIONS[relation]} a {s2}."


def generic_caption(motion: str, s1: Subject, s2: Subject) -> str:
    return f"A {s1} and a {s2} are {GENERIC_MOTIONS[motion]}."

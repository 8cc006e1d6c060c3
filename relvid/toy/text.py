"""The toy world's text encoder: frozen, weight-free and deterministic per word.

Each lower-cased word maps to a fixed random vector seeded by a hash of the word, and every text
ends with an end token (so the empty negative prompt has one valid token, like T5's EOS). Like a
frozen T5 under a DiT that never saw a verb, an unseen word is a vector the model has no meaning for.

Mochi gives text tokens no positions of their own (T5 supplies context), so a bag of word vectors
could not tell "a red circle and a blue square" from "a blue circle and a red square". Like T5's
contextual output, each token therefore also carries a fixed vector of the word before it and of
its position: "circle" after "red" differs from "circle" after "blue".
"""

from __future__ import annotations

import hashlib
import math
import re

import torch
from torch import Tensor

END_TOKEN = "</s>"
START_TOKEN = "<s>"  # the "previous word" of the first word
_WORD = re.compile(r"[a-z0-9]+")
# Weights of the previous word's and the position's vectors relative to the word's own vector.
PREVIOUS_WEIGHT = 0.8
POSITION_WEIGHT = 0.4


def _word_seed(word: str) -> int:
    return int.from_bytes(hashlib.blake2b(word.encode(), digest_size=8).digest(), "little") >> 1


class ToyTextEncoder:
    """Deterministic contextual word embeddings, (L, dim) float32 with about unit-variance entries."""

    name = "toy-words"

    def __init__(self, dim: int = 32, max_tokens: int = 32) -> None:
        self.dim = dim
        self.max_tokens = max_tokens
        self._table: dict[str, Tensor] = {}

    def words(self, text: str) -> list[str]:
        return [*_WORD.findall(text.lower())][: self.max_tokens - 1] + [END_TOKEN]

    def _vector(self, key: str) -> Tensor:
        if key not in self._table:
            g = torch.Generator().manual_seed(_word_seed(key))
            self._table[key] = torch.randn(self.dim, generator=g)
        return self._table[key]

    def encode(self, texts: list[str]) -> list[tuple[Tensor, Tensor]]:
        norm = math.sqrt(1 + PREVIOUS_WEIGHT ** 2 + POSITION_WEIGHT ** 2)
        out = []
        for text in texts:
            words = self.words(text)
            previous = [START_TOKEN, *words[:-1]]
            embeds = torch.stack([
                (self._vector(w) + PREVIOUS_WEIGHT * self._vector(f"prev:{p}")
                 + POSITION_WEIGHT * self._vector(f"pos:{i}")) / norm
                for i, (w, p) in enumerate(zip(words, previous, strict=True))
            ])  # (L, dim)
            out.append((embeds, torch.ones(embeds.shape[0], dtype=torch.bool)))
        return out

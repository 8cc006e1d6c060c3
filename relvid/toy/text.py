"""The toy world's text encoder: frozen, weight-free and deterministic per word.

Each lower-cased word maps to a fixed random vector seeded by a hash of the word, and every text
ends with an end token (so the empty negative prompt has one valid token, like T5's EOS). Like a
frozen T5 under a DiT that never saw a verb, an unseen word is a vector the model has no meaning for.
"""

from __future__ import annotations

import hashlib
import re

import torch
from torch import Tensor

END_TOKEN = "</s>"
_WORD = re.compile(r"[a-z0-9]+")


def _word_seed(word: str) -> int:
    return int.from_bytes(hashlib.blake2b(word.encode(), digest_size=8).digest(), "little") >> 1


class ToyTextEncoder:
    """Deterministic word embeddings, (L, dim) float32 with unit-variance entries."""

    name = "toy-words"

    def __init__(self, dim: int = 32, max_tokens: int = 32) -> None:
        self.dim = dim
        self.max_tokens = max_tokens
        self._table: dict[str, Tensor] = {}

    def words(self, text: str) -> list[str]:
        return [*_WORD.findall(text.lower())][: self.max_tokens - 1] + [END_TOKEN]

    def _vector(self, word: str) -> Tensor:
        if word not in self._table:
            g = torch.Generator().manual_seed(_word_seed(word))
            self._table[word] = torch.randn(self.dim, generator=g)
        return self._table[word]

    def encode(self, texts: list[str]) -> list[tuple[Tensor, Tensor]]:
        out = []
        for text in texts:
            embeds = torch.stack([self._vector(w) for w in self.words(text)])  # (L, dim)
            out.append((embeds, torch.ones(embeds.shape[0], dtype=torch.bool)))
        return out

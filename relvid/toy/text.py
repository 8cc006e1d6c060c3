"""The toy world's text encoder: frozen, weight-free and deterministic per word.

Each lower-cased word maps to a fixed random vector seeded by a hash of the word, and every text
ends with an end token (so the empty negative prompt has one valid token, like T5's EOS). Like a
frozen T5 under a DiT that never saw a verb, an unseen word is a vector the model has no meaning for.

Mochi gives text tokens no positions of their own (T5 supplies context), so a bag of word vectors
could not tell "a red circle and a blue square" from "a blue circle and a red square". Like T5's
contextual output, each token therefore also carries a fixed vector of the word before it and of
its position: "circle" after "red" differs from "circle" after "blue".

A word in angle brackets ("<R>") is one token. ReVersion learns such a new token: the toy encoder has no
table of input rows, so what it learns are the two vectors that stand for a word here, its own vector
and its vector as the previous word of the token after it (``encode_learned``).
"""

from __future__ import annotations

import hashlib
import math
import re

import torch
from torch import Tensor

END_TOKEN = "</s>"
START_TOKEN = "<s>"  # the "previous word" of the first word
_WORD = re.compile(r"<[a-z0-9]+>|[a-z0-9]+")
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

    def _embed(self, words: list[str], learned: dict[str, Tensor]) -> Tensor:
        """(L, dim) for ``words``; ``learned`` replaces the vectors of some keys (word, "prev:word")."""
        norm = math.sqrt(1 + PREVIOUS_WEIGHT ** 2 + POSITION_WEIGHT ** 2)
        previous = [START_TOKEN, *words[:-1]]

        def vec(key: str) -> Tensor:
            return learned[key] if key in learned else self._vector(key)

        return torch.stack([
            (vec(w) + PREVIOUS_WEIGHT * vec(f"prev:{p}") + POSITION_WEIGHT * self._vector(f"pos:{i}")) / norm
            for i, (w, p) in enumerate(zip(words, previous, strict=True))
        ])  # (L, dim)

    def encode(self, texts: list[str]) -> list[tuple[Tensor, Tensor]]:
        out = []
        for text in texts:
            embeds = self._embed(self.words(text), {})
            out.append((embeds, torch.ones(embeds.shape[0], dtype=torch.bool)))
        return out

    # --- a learned token (ReVersion) -------------------------------------------------------------
    def _token_word(self, token: str) -> str:
        word = token.lower()
        if not re.fullmatch(r"<[a-z0-9]+>", word):
            raise ValueError(f"the toy text encoder learns tokens written in angle brackets, e.g. <R>; got {token!r}")
        return word

    def add_token(self, token: str) -> None:
        """The toy encoder knows every word already: no id to give (a token is its word in brackets)."""
        self._token_word(token)
        return None

    def initial_token_vectors(self, token: str, init_word: str) -> dict[str, Tensor]:
        """The token's two vectors taken from ``init_word``'s: embedding (own) and previous."""
        word = init_word.lower()
        return {"embedding": self._vector(word).clone(), "previous": self._vector(f"prev:{word}").clone()}

    def encode_learned(self, texts: list[str], token: str, vectors: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """(embeds (B, L, dim), mask (B, L)), padded, differentiable with respect to ``vectors``: the token's
        own vector (embedding) and, when given, its previous-word vector (previous)."""
        word = self._token_word(token)
        learned = {word: vectors["embedding"]}
        if "previous" in vectors:
            learned[f"prev:{word}"] = vectors["previous"]
        rows = [self._embed(self.words(text), {k: v.float().cpu() for k, v in learned.items()}) for text in texts]
        length = max(r.shape[0] for r in rows)
        embeds = torch.stack([torch.cat([r, r.new_zeros(length - r.shape[0], self.dim)]) for r in rows])
        mask = torch.stack([torch.arange(length) < r.shape[0] for r in rows])
        device = vectors["embedding"].device
        return embeds.to(device), mask.to(device)

    def input_vectors(self, text: str) -> list[tuple[str, Tensor]]:
        """(word, its own vector) for each word of ``text`` (the end token left out): the toy encoder's inputs."""
        return [(w, self._vector(w)) for w in self.words(text) if w != END_TOKEN]

"""Text encoders: the interface shared by T5-XXL (Mochi) and the toy world's word encoder.

``encode(texts)`` returns one (embeds (L, D), mask (L,)) pair per text, trimmed to its valid
tokens (L >= 1: even the empty negative prompt keeps its end token), exactly what the clip cache
stores and the sampler pads.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import Tensor

from relvid.errors import UserError


class TextEncoderError(UserError, ValueError):
    """A text encoder that cannot be loaded or a text it cannot take."""


@runtime_checkable
class TextEncoder(Protocol):
    name: str  # stored in the clip cache's metadata ("t5-v1_1-xxl", "toy-words")
    dim: int  # embedding width D (4096 for T5-XXL)

    def encode(self, texts: list[str]) -> list[tuple[Tensor, Tensor]]:
        """Per text: embeds (L, D) float32 on the CPU and mask (L,) bool, trimmed to valid tokens."""
        ...


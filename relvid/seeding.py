"""Stateless seeds: every random draw is a pure function of a tuple of integers.

Resuming at any step, or splitting work over processes, then reproduces a run exactly without
saving RNG state. End the tuple with a constant "stream" tag distinct for each kind of draw
(e.g. ``derive_seed(seed, step, rank, NOISE_STREAM)``) so that different draws never share a seed.
"""

from __future__ import annotations

import hashlib
import operator

import torch

SEED_BITS = 63


def derive_seed(*ints: int) -> int:
    """A 63-bit seed from a tuple of integers, stable across processes, platforms and versions.

    Uses blake2b of the decimal text, not Python's ``hash()``, which is salted per process.
    """
    if not ints:
        raise TypeError("derive_seed needs at least one integer (e.g. the run seed)")
    # operator.index accepts ints, numpy ints and 0-d integer tensors, and rejects floats/str.
    parts = [str(operator.index(x)) for x in ints]
    digest = hashlib.blake2b(",".join(parts).encode("ascii"), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> (64 - SEED_BITS)


def generator_for(*ints: int, device: str | torch.device = "cpu") -> torch.Generator:
    """A fresh ``torch.Generator`` seeded with ``derive_seed(*ints)``.

    Keep the default CPU generator for draws that must be the same everywhere and move the result:
    a CUDA generator's numbers depend on the GPU model, since its kernels split the draw by the
    number of multiprocessors.
    """
    return torch.Generator(device=device).manual_seed(derive_seed(*ints))

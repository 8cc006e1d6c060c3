"""ReVersion on Mochi: relation inversion into one new token of the text encoder's input table.

ReVersion (Huang et al., "ReVersion: Diffusion-Based Relation Inversion from Images") freezes the whole
generator and learns a single new word, ``<R>``: its row of the text encoder's token-embedding table,
initialised from the row of "and". Two terms train it: the denoising loss of captions such as
"A person is <R> a person.", and the relation-steering contrastive loss, an InfoNCE over the input
table that pulls ``<R>`` toward a few prepositions ("above", "with", ...) and pushes it from the
caption's other words (its nouns). Noise levels are importance-sampled toward the noisy end, where the
layout (and so the relation) is decided.

On Mochi the table is T5-XXL's ``shared`` embedding (4096 wide): ``<R>`` is added to the tokenizer and
takes the first free id (32100 with Mochi's tokenizer; the table has 32128 rows, so the id needs no
resize). The encoder runs in the training step with its weights frozen; only the new row gets a
gradient. In the toy world the text encoder has no table: there ``<R>`` learns its own word vector and
its vector as the previous word of the next token (the toy encoder's two per-word inputs).

The file (``relvid_adapters.safetensors`` in a run's ``adapters/``) holds ``embedding`` (dim,) and, for
the toy encoder, ``previous`` (dim,), with the spec (token, id, encoder) in its metadata.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import safetensors
import safetensors.torch
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from relvid.errors import InputNotFoundError, UserError
from relvid.files import atomic_path, read_safetensors

METHOD = "reversion"
FORMAT_NAME = "relvid-reversion"
FORMAT_VERSION = "1"
TOKEN = "<R>"
ATTR = "reversion_token"  # the training module's attribute holding the learned vectors

# The positive basis of the steering loss: English prepositions, the words relations are spoken in.
PREPOSITIONS = (
    "aboard", "about", "above", "across", "after", "against", "along", "alongside", "amid", "among",
    "around", "astride", "at", "atop", "before", "behind", "below", "beneath", "beside", "between",
    "beyond", "by", "down", "from", "in", "inside", "into", "near", "of", "off", "on", "onto", "opposite",
    "out", "outside", "over", "past", "round", "through", "throughout", "to", "toward", "towards", "under",
    "underneath", "up", "upon", "versus", "with", "within",
)
# Words of a caption that are never negatives: articles, pronouns, auxiliaries, conjunctions (and the
# prepositions above). What remains are the content words, the subjects the relation must not absorb.
FUNCTION_WORDS = frozenset((
    "a", "an", "the", "and", "or", "but", "nor", "so", "yet", "if", "then", "than", "as", "because", "while",
    "is", "are", "was", "were", "be", "been", "being", "am", "has", "have", "had", "having", "do", "does",
    "did", "will", "would", "can", "could", "shall", "should", "may", "might", "must",
    "i", "me", "my", "we", "us", "our", "you", "your", "he", "him", "his", "she", "her", "it", "its", "they",
    "them", "their", "this", "that", "these", "those", "who", "whom", "which", "what", "each", "other",
    "another", "some", "any", "all", "both", "no", "not", "very", "too", "just", "only", "s", "t",
)) | frozenset(PREPOSITIONS)


class ReVersionError(UserError, ValueError):
    """A ReVersion spec, file or text encoder that cannot be used as asked."""


@dataclass(frozen=True)
class ReVersionSpec:
    """The learned token: its text, which encoder it belongs to, its row (JSON-able, stored with every file)."""

    encoder: str  # the text encoder's name: "t5" or "toy-words"
    dim: int  # the width of the encoder's input vectors (4096 for T5-XXL)
    token: str = TOKEN
    token_id: int | None = None  # the row of the input table (T5); None for the toy encoder (no table)
    init_word: str = "and"
    vectors: tuple[str, ...] = ("embedding",)  # what is learned: embedding (+ previous, toy encoder)
    method: str = field(default=METHOD)

    def __post_init__(self) -> None:
        object.__setattr__(self, "vectors", tuple(self.vectors))
        if isinstance(self.dim, bool) or not isinstance(self.dim, int) or self.dim < 1:
            raise ReVersionError(f"reversion spec dim={self.dim!r} must be an integer >= 1")
        if not self.token or any(c.isspace() for c in self.token):
            raise ReVersionError(f"reversion.token={self.token!r} must be one word without spaces, e.g. <R>")
        if not set(self.vectors) <= {"embedding", "previous"} or "embedding" not in self.vectors:
            raise ReVersionError(f"reversion spec vectors={list(self.vectors)} must be embedding (+ previous)")
        if self.method != METHOD:
            raise ReVersionError(f"spec method {self.method!r} is not {METHOD!r}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["vectors"] = list(self.vectors)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ReVersionSpec:
        unknown = sorted(set(d) - set(cls.__dataclass_fields__))
        if unknown:
            raise ReVersionError(f"unknown reversion spec keys {unknown}; known: {sorted(cls.__dataclass_fields__)}")
        return cls(**d)


def is_reversion_spec_dict(d: object) -> bool:
    """True for the JSON form of a ReVersionSpec (a checkpoint's or file's 'spec')."""
    return isinstance(d, dict) and d.get("method") == METHOD


class TokenEncoder(Protocol):
    """What ReVersion needs of a text encoder beyond ``encode``: relvid.models.t5.T5TextEncoder and the
    toy world's encoder provide it."""

    name: str
    dim: int

    def add_token(self, token: str) -> int | None: ...

    def initial_token_vectors(self, token: str, init_word: str) -> dict[str, Tensor]: ...

    def encode_learned(self, texts: list[str], token: str, vectors: dict[str, Tensor]) -> tuple[Tensor, Tensor]: ...

    def input_vectors(self, text: str) -> list[tuple[str, Tensor]]: ...


# --- the learned vectors ----------------------------------------------------------------------------
class RelationToken(nn.Module):
    """The learned vectors of ``<R>`` (float32 parameters): ``embedding`` (its input row) and, for the toy
    encoder, ``previous`` (its vector as the previous word of the next token)."""

    def __init__(self, spec: ReVersionSpec, vectors: dict[str, Tensor]) -> None:
        super().__init__()
        self.spec = spec
        check_state(vectors, spec, "the initial token vectors")
        for name in spec.vectors:
            self.register_parameter(name, nn.Parameter(vectors[name].detach().float().clone()))

    def vectors(self) -> dict[str, Tensor]:
        return {name: getattr(self, name) for name in self.spec.vectors}


def build_token(encoder: TokenEncoder, token: str = TOKEN, init_word: str = "and") -> RelationToken:
    """Add ``token`` to ``encoder`` and return its learned vectors, initialised from ``init_word``."""
    token_id = encoder.add_token(token)
    init = encoder.initial_token_vectors(token, init_word)
    spec = ReVersionSpec(encoder=encoder.name, dim=int(encoder.dim), token=token, token_id=token_id,
                         init_word=init_word, vectors=tuple(init))
    return RelationToken(spec, init)


def check_state(state: dict[str, Tensor], spec: ReVersionSpec, where: str) -> None:
    if set(state) != set(spec.vectors):
        raise ReVersionError(f"{where}: holds {sorted(state)}, expected {list(spec.vectors)}")
    for name, value in state.items():
        if tuple(value.shape) != (spec.dim,):
            raise ReVersionError(f"{where}: {name} has shape {tuple(value.shape)}, expected ({spec.dim},)")
        if not bool(torch.isfinite(value).all()):
            raise ReVersionError(f"{where}: {name} is not finite (NaN or infinite)")


def check_encoder(spec: ReVersionSpec, encoder: TokenEncoder, where: str) -> None:
    """Refuse to use a token with an encoder it was not learned in."""
    if spec.encoder != encoder.name or spec.dim != int(encoder.dim):
        raise ReVersionError(
            f"{where} holds a token learned in the {spec.encoder!r} text encoder (width {spec.dim}), but this model "
            f"uses {encoder.name!r} (width {encoder.dim}): set model.text_encoder as in the run that trained it")


# --- the steering loss and the noise levels -----------------------------------------------------------
def steering_loss(relation: Tensor, positives: Tensor, negatives: Tensor, temperature: float = 0.07) -> Tensor:
    """Relation-steering InfoNCE of ``relation`` (D,) against ``positives`` (P, D) and ``negatives`` (N, D):
    logsumexp over all cosine similarities / temperature minus logsumexp over the positives'. Only
    ``relation`` receives a gradient."""
    if positives.shape[0] < 1:
        raise ValueError("steering_loss needs at least one positive")
    dtype = torch.promote_types(relation.dtype, torch.float32)  # float64 stays float64
    rel = F.normalize(relation.reshape(1, -1).to(dtype), dim=-1)  # (1, D)
    basis = torch.cat([positives, negatives.reshape(-1, positives.shape[1])]).detach().to(dtype)  # (P + N, D)
    logits = rel @ F.normalize(basis, dim=-1).t() / temperature  # (1, P + N)
    return (torch.logsumexp(logits, dim=1) - torch.logsumexp(logits[:, : positives.shape[0]], dim=1)).mean()


def importance_cdf(sigma: Tensor, alpha: float) -> Tensor:
    """CDF of ReVersion's noise-level density p(sigma) = 1 - alpha cos(pi sigma) on [0, 1] (sigma 1: pure noise).

    ReVersion weights diffusion step t of T by 1 - alpha cos(pi t / T), favouring the noisy steps; on the
    flow-matching scale that is this density, already normalised (the cosine integrates to 0)."""
    return sigma - alpha * torch.sin(math.pi * sigma) / math.pi


def importance_sigmas(batch: int, generator: torch.Generator, alpha: float) -> Tensor:
    """Noise levels (B,) float32 drawn from p(sigma) = 1 - alpha cos(pi sigma), by inverting its CDF."""
    if not 0.0 <= alpha < 1.0:
        raise ValueError(f"importance sampling alpha must be in [0, 1), got {alpha}")
    u = torch.rand(batch, generator=generator, device=generator.device, dtype=torch.float64).cpu()
    lo, hi = torch.zeros_like(u), torch.ones_like(u)
    for _ in range(60):  # bisection: the CDF is increasing
        mid = (lo + hi) / 2
        below = importance_cdf(mid, alpha) < u
        lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
    return ((lo + hi) / 2).float()


def draw_positives(generator: torch.Generator, count: int) -> list[str]:
    """``count`` distinct prepositions, drawn without replacement from PREPOSITIONS."""
    order = torch.randperm(len(PREPOSITIONS), generator=generator)[:count]
    return [PREPOSITIONS[int(i)] for i in order]


def steering_terms(encoder: TokenEncoder, text: str, token: str, positive_words: list[str]) -> tuple[Tensor, Tensor]:
    """(positives (P, D), negatives (N, D)) of one caption: the input vectors of the positive words, and of
    the caption's words that are not function words, prepositions nor the token."""
    positives = [v for words in positive_words for _, v in encoder.input_vectors(words)]
    negatives = [v for word, v in encoder.input_vectors(text)
                 if word != token.lower() and word != token and word not in FUNCTION_WORDS]
    dim = int(encoder.dim)
    return (torch.stack(positives) if positives else torch.zeros(0, dim),
            torch.stack(negatives) if negatives else torch.zeros(0, dim))


# --- the file --------------------------------------------------------------------------------------------
def save_reversion_file(path: str | os.PathLike, state: dict[str, Tensor], spec: ReVersionSpec,
                        metadata: dict[str, str] | None = None) -> Path:
    """Write the token's vectors and spec (safetensors, atomic)."""
    path = Path(path)
    check_state(state, spec, "token vectors to save")
    reserved = {"format", "version", "spec"} & set(metadata or {})
    if reserved:
        raise ReVersionError(f"metadata keys {sorted(reserved)} are reserved by the ReVersion format")
    header = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "spec": json.dumps(spec.to_dict(), sort_keys=True)}
    header.update({k: str(v) for k, v in (metadata or {}).items()})
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}
    with atomic_path(path) as tmp:
        safetensors.torch.save_file(tensors, str(tmp), metadata=header)
    return path


def is_reversion_file(path: str | os.PathLike) -> bool:
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("format") == FORMAT_NAME
    except (safetensors.SafetensorError, OSError):
        return False


def load_reversion_file(path: str | os.PathLike) -> tuple[ReVersionSpec, dict[str, Tensor], dict[str, str]]:
    """(spec, vectors, the extra metadata) of a ReVersion file."""
    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(f"ReVersion file not found: {path}")
    meta, state = read_safetensors(path, ReVersionError)  # a truncated file: a ReVersionError naming it
    if meta.get("format") != FORMAT_NAME:
        raise ReVersionError(f"{path} is not a ReVersion file (format {meta.get('format')!r})")
    if meta.get("version") != FORMAT_VERSION:
        raise ReVersionError(f"{path}: ReVersion format version {meta.get('version')!r}, this relvid reads "
                             f"{FORMAT_VERSION}")
    spec = ReVersionSpec.from_dict(json.loads(meta["spec"]))
    check_state(state, spec, str(path))
    extra = {k: v for k, v in meta.items() if k not in ("format", "version", "spec")}
    return spec, state, extra


@contextlib.contextmanager
def encoder_inference_scope(encoder: object) -> Iterator[None]:
    """The text encoder's torch module (T5's ``model``; the toy encoder has none) in eval mode for the
    duration, then every submodule's train/eval mode and every parameter's requires_grad as they were: how
    a preview encodes mid-training (training may hold T5 in train mode for its recomputed blocks)."""
    model = getattr(encoder, "model", None)
    if not isinstance(model, nn.Module):
        yield
        return
    modes = {name: m.training for name, m in model.named_modules()}
    grads = {name: p.requires_grad for name, p in model.named_parameters()}
    try:
        model.eval()
        yield
    finally:
        for name, m in model.named_modules():
            m.training = modes[name]
        for name, p in model.named_parameters():
            p.requires_grad_(grads[name])


def encode_with_token(encoder: TokenEncoder, texts: list[str], spec: ReVersionSpec,
                      state: dict[str, Tensor]) -> list[tuple[Tensor, Tensor]]:
    """Per text, (embeds (L, D) float32 on the CPU, mask (L,)) as ``encoder.encode`` gives them, with the
    learned token in place: what sampling with a ReVersion file conditions on."""
    check_encoder(spec, encoder, "the ReVersion file")
    token_id = encoder.add_token(spec.token)
    if spec.token_id is not None and token_id != spec.token_id:
        raise ReVersionError(f"{spec.token} takes id {token_id} in this tokenizer, but was learned as row "
                             f"{spec.token_id}: use the tokenizer of the run that trained it")
    out = []
    with torch.no_grad():
        for text in texts:
            embeds, mask = encoder.encode_learned([text], spec.token, state)
            valid = mask[0].cpu()
            out.append((embeds[0].float().cpu()[valid].clone(), torch.ones(int(valid.sum()), dtype=torch.bool)))
    return out

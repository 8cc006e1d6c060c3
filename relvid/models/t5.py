"""T5 text encoder (Mochi's T5-XXL) as a relvid TextEncoder, weights from local folders.

Tokenization matches diffusers' MochiPipeline: at most 256 tokens, special tokens added (so every
text ends with ``</s>``), attention mask passed to the encoder. Each embedding is then trimmed to
its valid tokens, which is what the clip cache stores and the sampler pads again.

ReVersion adds one token to the tokenizer (``add_token``: the first free id, a row the table already
has on Mochi) and trains that row only: ``encode_learned`` runs the frozen encoder on input rows in
which the token's row is the learned vector, so the gradient reaches that vector and nothing else.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from torch import Tensor

from relvid.models.text_encoders import TextEncoderError
from relvid.models.weights import (
    WeightsNotFoundError,
    check_config_matches_weights,
    check_model_index,
    read_json,
    safetensors_files,
    safetensors_header,
)

MAX_TOKENS = 256  # MochiPipeline's max_sequence_length
T5_DOWNLOAD_HINT = (
    "download genmo/mochi-1-preview in diffusers format (it holds text_encoder/ and tokenizer/) on a machine "
    "with internet and pass the pipeline folder, or a folder holding both a T5 encoder and its tokenizer"
)
_TOKENIZER_FILES = ("tokenizer.json", "spiece.model", "tokenizer_config.json")
_TORCH_WEIGHT_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json")
# How many words of a cut prompt its warning quotes.
_QUOTED_WORDS = 8


def find_t5_folders(path: str | os.PathLike | None) -> tuple[Path, Path]:
    """(encoder folder, tokenizer folder) under a pipeline root or a single folder holding both."""
    if path is None:
        raise WeightsNotFoundError(f"T5 path not configured: {T5_DOWNLOAD_HINT}.")
    root = Path(path).expanduser()
    if not root.exists():
        raise WeightsNotFoundError(f"T5 weights not found at {root}: {T5_DOWNLOAD_HINT}.")
    for component in ("text_encoder", "tokenizer"):
        check_model_index(root, component, None, T5_DOWNLOAD_HINT)
    encoder = root / "text_encoder" if (root / "text_encoder" / "config.json").is_file() else root
    tokenizer = root / "tokenizer" if (root / "tokenizer").is_dir() else root
    config = encoder / "config.json"
    if not config.is_file():
        raise WeightsNotFoundError(f"{root} has no text_encoder/config.json (nor config.json); {T5_DOWNLOAD_HINT}.")
    data = read_json(config, T5_DOWNLOAD_HINT)
    model_type = data.get("model_type") if isinstance(data, dict) else None
    if model_type not in ("t5", "umt5", "mt5"):
        raise WeightsNotFoundError(f"{config} describes a {model_type!r} model, not a T5 encoder; {T5_DOWNLOAD_HINT}.")
    weights = safetensors_files(encoder, "model", T5_DOWNLOAD_HINT)
    if not weights and not any((encoder / name).is_file() for name in _TORCH_WEIGHT_FILES):
        raise WeightsNotFoundError(
            f"{encoder} holds no model.safetensors: the download is incomplete; {T5_DOWNLOAD_HINT}.")
    for file in weights:
        safetensors_header(file, T5_DOWNLOAD_HINT)
    if not any((tokenizer / name).is_file() for name in _TOKENIZER_FILES):
        raise WeightsNotFoundError(
            f"no tokenizer files ({', '.join(_TOKENIZER_FILES)}) in {tokenizer}: the download is incomplete; "
            f"{T5_DOWNLOAD_HINT}."
        )
    return encoder, tokenizer


class T5TextEncoder:
    """A frozen T5 encoder and its tokenizer; ``encode`` gives trimmed (embeds, mask) per text."""

    name = "t5"

    def __init__(self, model, tokenizer, max_tokens: int = MAX_TOKENS, batch_size: int = 8) -> None:
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens
        self.batch_size = batch_size
        self.dim = int(model.config.d_model)

    @classmethod
    def from_folder(
        cls, path: str | os.PathLike | None, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
        **kwargs,
    ) -> T5TextEncoder:
        """Load tokenizer + T5EncoderModel; fp32 on CPU, bf16 on GPU by default."""
        from transformers import AutoTokenizer, T5EncoderModel

        encoder_dir, tokenizer_dir = find_t5_folders(path)
        if dtype is None:
            dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
        check_config_matches_weights(
            encoder_dir, safetensors_files(encoder_dir, "model", T5_DOWNLOAD_HINT),
            lambda: T5EncoderModel(T5EncoderModel.config_class.from_pretrained(encoder_dir, local_files_only=True)),
            T5_DOWNLOAD_HINT)
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
        model = T5EncoderModel.from_pretrained(encoder_dir, dtype=dtype, local_files_only=True)
        return cls(model.to(device), tokenizer, **kwargs)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _warn_if_cut(self, texts: list[str]) -> None:
        """One warning per text longer than ``max_tokens`` (what the encoder sees is its start)."""
        counts = self.tokenizer(texts, add_special_tokens=True, truncation=False, verbose=False).input_ids
        for text, ids in zip(texts, counts, strict=True):
            if len(ids) > self.max_tokens:
                words = text.split()
                start = " ".join(words[:_QUOTED_WORDS]) + (" ..." if len(words) > _QUOTED_WORDS else "")
                warnings.warn(
                    f"T5 prompt cut to its first {self.max_tokens} of {len(ids)} tokens (MochiPipeline's limit): "
                    f"{start!r}; the rest of it does not reach the model, shorten the prompt to keep it all",
                    UserWarning, stacklevel=3)

    @torch.inference_mode()
    def encode(self, texts: list[str]) -> list[tuple[Tensor, Tensor]]:
        """Per text: embeds (L, D) float32 on the CPU and mask (L,) all-True, L = its token count (>= 1)."""
        if isinstance(texts, str):
            raise TypeError("T5TextEncoder.encode takes a list of texts, not a single string")
        out: list[tuple[Tensor, Tensor]] = []
        for start in range(0, len(texts), self.batch_size):
            batch = list(texts[start : start + self.batch_size])
            self._warn_if_cut(batch)
            tokens = self.tokenizer(
                batch, padding="longest", max_length=self.max_tokens, truncation=True,
                add_special_tokens=True, return_tensors="pt",
            )
            ids = tokens.input_ids.to(self.device)  # (B, L)
            mask = tokens.attention_mask.bool().to(self.device)  # (B, L)
            embeds = self.model(ids, attention_mask=mask)[0].float().cpu()  # (B, L, D)
            for text, row, valid in zip(batch, embeds, mask.cpu(), strict=True):
                if not valid.any():
                    raise TextEncoderError(f"the T5 tokenizer gave no tokens for {text!r}: it must add </s>")
                kept = row[valid]  # (L, D): the valid tokens, whichever side the tokenizer pads
                out.append((kept.clone(), torch.ones(kept.shape[0], dtype=torch.bool)))
        return out

    # --- a learned token (ReVersion) -------------------------------------------------------------
    def add_token(self, token: str) -> int:
        """Add ``token`` to the tokenizer (once) and return its id: the row of the input table it reads.
        The table grows only when the id lies past its rows (T5-XXL's has 28 spare rows)."""
        if token not in self.tokenizer.get_vocab():
            self.tokenizer.add_tokens([token])
        token_id = int(self.tokenizer.convert_tokens_to_ids(token))
        table = self.model.get_input_embeddings()
        if token_id >= table.weight.shape[0]:
            self.model.resize_token_embeddings(token_id + 1, mean_resizing=False)
            self.model.get_input_embeddings().requires_grad_(False)
        return token_id

    def _single_id(self, word: str) -> int:
        ids = self.tokenizer(word, add_special_tokens=False).input_ids
        pieces = [i for i in ids if self.tokenizer.convert_ids_to_tokens(i) != "\u2581"]
        if len(pieces) != 1:
            raise TextEncoderError(f"{word!r} is {len(pieces)} T5 tokens, not one: reversion.init_word must be a "
                                   "word the tokenizer keeps whole, e.g. and")
        return int(pieces[0])

    def initial_token_vectors(self, token: str, init_word: str) -> dict[str, Tensor]:
        """The token's row taken from ``init_word``'s row of the input table (float32, CPU)."""
        row = self.model.get_input_embeddings().weight[self._single_id(init_word)]
        return {"embedding": row.detach().float().cpu().clone()}

    def enable_checkpointing(self) -> None:
        """Recompute each T5 block in the backward (activations of one block held at a time): how T5-XXL's
        backward to its input rows fits beside the transformer. The weights stay frozen and dropout off."""
        for module in self.model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        kwargs = {"use_reentrant": False}
        if hasattr(self.model, "activation_checkpointing_enable"):  # transformers >= 5.2x names it so
            self.model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        self.model.train()  # transformers checkpoints only in train mode; dropout is 0 above

    def encode_learned(self, texts: list[str], token: str, vectors: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """(embeds (B, L, D) float32, mask (B, L)) on the encoder's device, padded to the longest text, with
        ``token``'s input row replaced by ``vectors["embedding"]`` (differentiable with respect to it)."""
        token_id = int(self.tokenizer.convert_tokens_to_ids(token))
        tokens = self.tokenizer(list(texts), padding="longest", max_length=self.max_tokens, truncation=True,
                                add_special_tokens=True, return_tensors="pt")
        ids = tokens.input_ids.to(self.device)  # (B, L)
        mask = tokens.attention_mask.bool().to(self.device)  # (B, L)
        table = self.model.get_input_embeddings()
        rows = table(ids)  # (B, L, D), frozen
        learned = vectors["embedding"].to(self.device, rows.dtype)
        rows = torch.where((ids == token_id)[..., None], learned.expand_as(rows), rows)
        embeds = self.model(inputs_embeds=rows, attention_mask=mask)[0].float()
        return embeds * mask[..., None], mask

    def input_vectors(self, text: str) -> list[tuple[str, Tensor]]:
        """(piece, its input row float32 on the CPU) for each token of ``text`` (no special tokens): the pieces
        lower-cased without sentencepiece's word marker."""
        ids = self.tokenizer(text, add_special_tokens=False).input_ids
        table = self.model.get_input_embeddings().weight
        out = []
        special = set(self.tokenizer.all_special_ids)
        for i in ids:
            if int(i) in special:
                continue
            piece = self.tokenizer.convert_ids_to_tokens(int(i)).replace("\u2581", "").lower()
            if piece:
                out.append((piece, table[int(i)].detach().float().cpu()))
        return out

"""What every analysis loads: the model folder's own settings, the transformer with or without
adapters, the prompt's encoding and where a phrase's tokens are in it."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from relvid.errors import InputError

# A folder written by `relvid toy-base` holds this file; it describes a toy-world base, which needs the
# toy codec and text encoder and the toy world's clip size.
TOY_BASE_MARKER = "toy_base.json"
# The toy world's clip size (13 frames of 32x32 at 8 fps) and guidance (4), applied where
# the config still holds the schema's Mochi defaults.
TOY_SETTINGS = {"model.codec": "toy", "model.text_encoder": "toy", "sampling.frames": 13, "sampling.height": 32,
                "sampling.width": 32, "sampling.fps": 8, "sampling.guidance_scale": 4.0}


class PhraseNotFoundError(InputError):
    """analyze.phrase names words that are not in the prompt."""


def is_toy_base(path: str | None) -> bool:
    return path is not None and (Path(path).expanduser() / TOY_BASE_MARKER).is_file()


def apply_model_folder(cfg) -> list[str]:
    """A toy base folder in model.path sets the toy codec, text encoder and clip size wherever the config
    still holds the schema's (Mochi) default; returns the keys it set. Call before validating steps."""
    from omegaconf import OmegaConf

    from relvid.config import RelvidConfig

    if not is_toy_base(cfg.model.path):
        return []
    defaults = OmegaConf.structured(RelvidConfig)
    changed = []
    for key, value in TOY_SETTINGS.items():
        if OmegaConf.select(cfg, key) == OmegaConf.select(defaults, key):
            OmegaConf.update(cfg, key, value)
            changed.append(key)
    return changed


def device_of(cfg) -> torch.device:
    from relvid.inference.render import default_device

    return torch.device(cfg.analyze.device) if cfg.analyze.device else default_device()


def resolve_steps(steps, num_steps: int) -> list[int]:
    """Step indices of the schedule, negative ones counted from the end, each once, in order."""
    bad = [s for s in steps if not -num_steps <= s < num_steps]
    if bad:
        raise InputError(f"analyze.steps {bad} lie outside the {num_steps}-step schedule (sampling.num_steps): "
                         f"use 0..{num_steps - 1} or -1..-{num_steps}")
    return sorted({s % num_steps for s in steps})


def load_model(cfg, device: torch.device, adapters: str | None = None, select=None) -> tuple[nn.Module, dict]:
    """The transformer (eval, no compilation: the readers hook its blocks) with `adapters` loaded and
    `select(spec)` active (default: the inference set); returns it and a description of the adapters."""
    from relvid.components import prepare_for_sampling
    from relvid.models.adapter_file import apply_adapter_source
    from relvid.models.attention import InferenceSpeed
    from relvid.models.backbone import load_transformer

    model = load_transformer(cfg.model, on_gpu=device.type == "cuda", device=device).to(device).eval()
    prepare_for_sampling(model, InferenceSpeed(attention=str(cfg.speed.attention),
                                               sdpa_backend=str(cfg.speed.sdpa_backend)))
    info: dict = {"adapters": None}
    if adapters:
        kwargs = {} if select is None else {"select": select}
        info = {"adapters": apply_adapter_source(model, adapters, **kwargs).to_dict()}
    return model, info


def label_of(source: str) -> str:
    """A short name for an adapter source: its run folder's name (runs/<name>/adapters/...) or its own."""
    for part in reversed(Path(source).parts):
        if part not in ("adapters", "checkpoints", "train") and not part.endswith((".safetensors", ".ckpt")):
            return part
    return Path(source).stem


@dataclass
class Encoded:
    embeds: Tensor  # (L, D)
    mask: Tensor  # (L,)
    negative: tuple[Tensor, Tensor] | None  # the guidance's unconditional input
    phrase: Tensor | None  # (P,) positions of the phrase's tokens


def encode_prompt(cfg, prompt: str, phrase: str | None, device: torch.device) -> Encoded:
    """The prompt's (and the negative prompt's) embedding by the config's text encoder, which is freed
    before returning, and the phrase's token positions."""
    from relvid.components import free_memory, load_text_encoder
    from relvid.inference.generate import unconditional_input

    encoder = load_text_encoder(cfg.model.text_encoder, cfg.model.text_encoder_path or cfg.model.path,
                                device=str(device))
    try:
        texts = [prompt] + ([cfg.sampling.negative_prompt] if cfg.sampling.guidance_scale != 1.0 else [])
        out = encoder.encode(texts)
        positions = phrase_positions(encoder, prompt, phrase) if phrase else None
    finally:
        del encoder
        free_memory(device)
    embeds, mask = out[0]
    negative = unconditional_input(cfg.sampling, embeds, mask, out[1]) if len(out) > 1 else None
    return Encoded(embeds, mask, negative, positions)


def phrase_positions(encoder, prompt: str, phrase: str) -> Tensor:
    """Token positions of `phrase` inside `prompt` as `encoder` tokenizes it; PhraseNotFoundError when the
    prompt does not hold the phrase as whole words."""
    match = re.search(r"(?<![\w])" + re.escape(phrase.strip()) + r"(?![\w])", prompt, flags=re.IGNORECASE)
    if match is None:
        raise PhraseNotFoundError(f"analyze.phrase {phrase!r} is not in the prompt {prompt!r}: give words the "
                                  "prompt holds (--phrase), e.g. its relation verb")
    if hasattr(encoder, "tokenizer"):  # a subword tokenizer (T5): tokens whose characters overlap the phrase
        tokens = encoder.tokenizer(prompt, add_special_tokens=True, truncation=True, max_length=encoder.max_tokens,
                                   return_offsets_mapping=True)
        start, end = match.span()
        found = [i for i, (a, b) in enumerate(tokens["offset_mapping"]) if b > a and a < end and b > start]
    elif hasattr(encoder, "words"):  # a word-level encoder: the phrase's words as a run of the prompt's
        words, wanted = encoder.words(prompt), encoder.words(phrase)[:-1]  # both end with the end token
        before = len(encoder.words(prompt[:match.start()])) - 1
        found = list(range(before, before + len(wanted))) if words[before:before + len(wanted)] == wanted else []
    else:
        raise InputError(f"text encoder {encoder.name!r} does not say where its tokens are: attention maps of a "
                         "phrase need a tokenizer with character offsets or a word-level encoder")
    if not found:
        raise PhraseNotFoundError(f"analyze.phrase {phrase!r} maps to no token of the prompt {prompt!r} (it may "
                                  "lie beyond the text encoder's token limit)")
    return torch.tensor(found, dtype=torch.long)


def sample_and_capture(model: nn.Module, cfg, enc: Encoded, codec, seed: int, capture) -> Tensor | None:
    """Sample the prompt with `capture` reading the model; the decoded uint8 (T, H, W, 3) video, or None
    when the capture stopped the loop after its last step."""
    from relvid.analysis.capture import CaptureDone
    from relvid.inference.generate import generate_video

    try:
        with capture:
            return generate_video(model, codec, enc.embeds, enc.mask, enc.negative, seed, cfg.sampling,
                                  device=next(model.parameters()).device, progress=True)
    except CaptureDone:
        return None


def forward_clip(model: nn.Module, latents: Tensor, enc: Encoded, sigmas: list[float], seed: int, capture) -> None:
    """One forward per noise level of a clip's latents (C, f, h, w), noised with the seed's noise, under
    `capture` (forward k is sigmas[k])."""
    from relvid.losses.flow_matching import model_timestep

    param = next(model.parameters())
    z0 = latents.float()[None]  # (1, C, f, h, w)
    noise = torch.randn(z0.shape, generator=torch.Generator().manual_seed(int(seed)))
    with capture, torch.no_grad():
        for sigma in sigmas:
            z = (1 - sigma) * z0 + sigma * noise
            model(hidden_states=z.to(param.device, param.dtype),
                  encoder_hidden_states=enc.embeds[None].to(param.device, param.dtype),
                  timestep=model_timestep(torch.tensor([sigma], dtype=torch.float64)).to(param.device, torch.float32),
                  encoder_attention_mask=enc.mask[None].to(param.device), return_dict=False)

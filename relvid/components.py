"""Names -> implementations of the codec and text-encoder protocols: the one registry.

The config (``model.codec``, ``model.text_encoder``) and the ``preprocess`` flags name a component;
this module turns the name into an object. It is the only place where the core meets the toy world:
nothing else outside ``relvid.toy`` and the toy commands imports it.
"""

from __future__ import annotations

import gc
import os
import threading
import weakref

import torch

from relvid.models.codecs import Codec, CodecError
from relvid.models.text_encoders import TextEncoder, TextEncoderError

CODECS = ("mochi", "toy")
TEXT_ENCODERS = ("t5", "toy")

# Codecs in use, by what loaded them: a second load_codec with the same arguments (the preview and the
# relation-accuracy callbacks of one run) gets the same object, so one VAE is held, not two. Weak: a
# codec nobody holds any more is freed as before.
_CODECS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
_CODECS_LOCK = threading.Lock()


def load_codec(name: str, path: str | os.PathLike | None = None, device: str = "cpu", dtype=None,
               **options) -> Codec:
    """``"mochi"``: the Mochi VAE from a local folder (pipeline root or its vae/), ``options`` go to
    ``MochiCodec.from_folder`` (tiling, tile, tile_stride); ``"toy"``: the toy world's exact codec.

    A Mochi VAE still held by someone from an earlier call with the same arguments is shared (it is
    read-only), not loaded a second time."""
    if name == "toy":
        from relvid.toy.codec import ToyCodec

        return ToyCodec()
    if name == "mochi":
        from relvid.models.mochi_vae import MochiCodec

        key = (name, os.path.abspath(os.fspath(path)) if path is not None else None, str(torch.device(device)),
               str(dtype), tuple(sorted(options.items())))
        with _CODECS_LOCK:
            codec = _CODECS.get(key)
            if codec is None:
                codec = MochiCodec.from_folder(path, device=device, dtype=dtype, **options)
                _CODECS[key] = codec
        return codec
    raise CodecError(f"unknown codec {name!r}: use one of {', '.join(CODECS)}")


def load_text_encoder(name: str, path: str | os.PathLike | None = None, device: str = "cpu",
                      dtype=None) -> TextEncoder:
    """``"t5"``: T5-XXL from a local folder (pipeline root with text_encoder/ + tokenizer/, or a folder
    holding both); ``"toy"``: the toy world's deterministic word encoder."""
    if name == "toy":
        from relvid.toy.text import ToyTextEncoder

        return ToyTextEncoder()
    if name == "t5":
        from relvid.models.t5 import T5TextEncoder

        return T5TextEncoder.from_folder(path, device=device, dtype=dtype)
    raise TextEncoderError(f"unknown text encoder {name!r}: use one of {', '.join(TEXT_ENCODERS)}")


def free_memory(device: torch.device | str) -> None:
    """After the last reference to a large model was dropped: collect it and, on a GPU, hand its
    memory back to the driver's pool so the next model can use it."""
    gc.collect()
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        torch.cuda.empty_cache()


def encode_texts(model_cfg, texts: list[str], device: torch.device | str) -> dict[str, tuple]:
    """text -> (embeds (L, D), mask (L,)) on the CPU, by the config's text encoder on ``device``.

    The encoder (T5-XXL: ~9 GB in bf16) is loaded for this call only and freed before it returns, so
    it never shares the GPU with the transformer."""
    if not texts:
        return {}
    encoder = load_text_encoder(model_cfg.text_encoder, model_cfg.text_encoder_path or model_cfg.path,
                                device=str(device))
    try:
        outputs = encoder.encode(list(texts))
    finally:
        del encoder
        free_memory(device)
    return {t: (e.cpu(), m.cpu()) for t, (e, m) in zip(texts, outputs, strict=True)}


def prepare_for_sampling(transformer, speed=None):
    """Install the fast paths of the config's ``speed`` section (defaults when None) on a transformer
    used for sampling: speed.attention, sdpa_backend and compile; no checkpointing (no gradients)."""
    from relvid.models.attention import apply_speed_config, inference_speed

    return apply_speed_config(transformer, inference_speed(speed))


def load_generation_parts(model_cfg, device, speed=None, text_encoder: bool = True):
    """(transformer, codec, text encoder) from the config's model section (eval mode).

    The transformer is on ``device`` with ``speed``'s attention path (the defaults when None, as in
    training). The codec's weights stay on the CPU, in the dtype ``device`` decodes in, until
    ``generate_video`` moves them over for the decode. ``text_encoder=False`` returns None in its place
    (encode first with encode_texts, so T5 and the transformer are never on the GPU together).
    """
    from relvid.models.backbone import load_transformer

    device = torch.device(device)
    # straight from the (memory-mapped) files to the device: host memory never holds the whole model
    transformer = load_transformer(model_cfg, on_gpu=device.type == "cuda", device=device).to(device).eval()
    prepare_for_sampling(transformer, speed)
    codec_dtype = torch.bfloat16 if device.type == "cuda" else None  # what MochiCodec picks on a GPU
    codec = load_codec(model_cfg.codec, model_cfg.vae_path or model_cfg.path, device="cpu", dtype=codec_dtype)
    text = None
    if text_encoder:
        text = load_text_encoder(model_cfg.text_encoder, model_cfg.text_encoder_path or model_cfg.path,
                                 device=str(device))
    return transformer, codec, text


"""Names -> implementations of the codec and text-encoder protocols: the one registry.

The config (``model.codec``, ``model.text_encoder``) and the ``preprocess`` flags name a component;
this module turns the name into an object. It is the only place where the core meets the toy world:
nothing else outside ``relvid.toy`` and the toy commands imports it.
"""

from __future__ import annotations

import os

from relvid.models.codecs import Codec, CodecError
from relvid.models.text_encoders import TextEncoder, TextEncoderError

CODECS = ("mochi", "toy")
TEXT_ENCODERS = ("t5", "toy")


def load_codec(name: str, path: str | os.PathLike | None = None, device: str = "cpu", dtype=None,
               **options) -> Codec:
    """``"mochi"``: the Mochi VAE from a local folder (pipeline root or its vae/), ``options`` go to
    ``MochiCodec.from_folder`` (tiling, tile, tile_stride); ``"toy"``: the toy world's exact codec."""
    if name == "toy":
        from relvid.toy.codec import ToyCodec

        return ToyCodec()
    if name == "mochi":
        from relvid.models.mochi_vae import MochiCodec

        return MochiCodec.from_folder(path, device=device, dtype=dtype, **options)
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


def load_generation_parts(model_cfg, device):
    """(transformer, codec, text encoder) from the config's model section, on ``device`` (eval mode)."""
    from relvid.models.backbone import load_transformer

    transformer = load_transformer(model_cfg, on_gpu=device.type == "cuda").to(device).eval()
    codec = load_codec(model_cfg.codec, model_cfg.vae_path or model_cfg.path, device=str(device))
    text = load_text_encoder(model_cfg.text_encoder, model_cfg.text_encoder_path or model_cfg.path, device=str(device))
    return transformer, codec, text

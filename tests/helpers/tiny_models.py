"""Tiny random stand-ins built from configs and saved to local folders: CLIP, I3D, a VLM judge."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


def _bytes_to_unicode() -> list[str]:
    """GPT-2/CLIP's reversible byte -> printable character table (public algorithm)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = [], 0
    for b in range(256):
        if b in keep:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def tiny_clip_folder(root: Path) -> Path:
    """A random CLIPModel (32-px images) + a byte-level CLIP tokenizer with no merges + an image processor."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    root.mkdir(parents=True, exist_ok=True)
    chars = _bytes_to_unicode()
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": 256 + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = 512, 513
    tokenizer = CLIPTokenizer(vocab=dict(vocab), merges=[])
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(root)
    config = CLIPConfig(
        text_config=dict(vocab_size=514, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=512, eos_token_id=513,
                         pad_token_id=513),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2),
        projection_dim=16,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(root)
    return root


class TinyI3D(nn.Module):
    """(B, 3, T, H, W) -> (B, 8): a 3-D conv, pooled: enough to tell videos apart."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(3, 8, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.conv(x)).mean(dim=(2, 3, 4))  # (B, 8)


class TinyStyleGANVI3D(TinyI3D):
    """The same network with the i3d_torchscript.pt calling convention."""

    def forward(self, x: torch.Tensor, rescale: bool = False, resize: bool = False,
                return_features: bool = True) -> torch.Tensor:
        assert not rescale and not resize and return_features
        return torch.tanh(self.conv(x)).mean(dim=(2, 3, 4))


def tiny_i3d_file(path: Path, stylegan_v: bool = False) -> Path:
    torch.manual_seed(0)
    module = TinyStyleGANVI3D() if stylegan_v else TinyI3D()
    torch.jit.script(module).save(str(path))
    return path


QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|image_pad|>", "<|video_pad|>"]
# Our own minimal chat template: images then text in one user turn, ChatML markers.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_qwen_vl_folder(root: Path) -> Path:
    """A random 2-layer Qwen2.5-VL with a byte-level tokenizer (no merges) and its processor."""
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2TokenizerFast,
        Qwen2VLImageProcessor,
    )

    root.mkdir(parents=True, exist_ok=True)
    chars = _bytes_to_unicode()
    vocab = {c: i for i, c in enumerate(chars)}
    for i, tok in enumerate(QWEN_SPECIALS):
        vocab[tok] = 256 + i
    tokenizer = Qwen2TokenizerFast(vocab=dict(vocab), merges=[],
                                   unk_token="<|endoftext|>", eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=QWEN_SPECIALS[1:])
    tokenizer.save_pretrained(root)
    Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=56 * 56).save_pretrained(root)
    (root / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                         bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                         pad_token_id=ids["<|endoftext|>"],
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                           fullatt_block_indexes=[1]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(config)
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.save_pretrained(root)
    return root


def tiny_toy_base(folder: Path) -> Path:
    """A toy-world base transformer (the shipped base's config, 2 layers, 2 heads) with random weights,
    saved in diffusers format to ``folder``."""
    from diffusers import MochiTransformer3DModel

    from relvid.toy.drivers.base import BASE_CONFIG

    torch.manual_seed(0)
    model = MochiTransformer3DModel(**{**BASE_CONFIG, **TINY_TOY_BASE})
    with torch.no_grad():
        model.pos_frequencies.normal_(0.0, 1.0)
    model.save_pretrained(folder)
    return Path(folder)


TINY_TOY_BASE = {"num_layers": 2, "num_attention_heads": 2, "attention_head_dim": 16, "pooled_projection_dim": 16,
                 "time_embed_dim": 16}



def padded_batch(in_channels: int, text_dim: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """A transformer input of 2 clips (3 x 8 x 8 latents), the second's text padded after 4 of 6 tokens:
    (latents (B, C, f, h, w), text (B, L, D), timesteps (B,), text mask (B, L))."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(2, in_channels, 3, 8, 8, generator=g)
    text = torch.randn(2, 6, text_dim, generator=g)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 4:] = False
    return z, text, torch.tensor([300.0, 800.0]), mask


def forward_no_grad(model: nn.Module, inputs) -> torch.Tensor:
    """The transformer's output on `inputs` (padded_batch's order), without gradients."""
    with torch.no_grad():
        return model(*inputs, return_dict=False)[0]

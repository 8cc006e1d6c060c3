"""A VLM judge running locally with transformers (Qwen2.5-VL, or any image-text-to-text chat model).

The model and its processor come from a local folder (e.g. Qwen/Qwen2.5-VL-7B-Instruct downloaded
with huggingface-cli). Each repeat samples with its own seed, so the repeats are independent
draws like the paper's ten judgements, and a rerun gives the same answers.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor

from relvid.errors import UserError
from relvid.seeding import derive_seed

_JUDGE_STREAM = 11


class VLMWeightsError(UserError, FileNotFoundError):
    """No usable local VLM folder."""


def check_vlm_folder(path: str | os.PathLike | None) -> Path:
    """The folder of a local VLM, checked to hold a config.json (without loading anything)."""
    if path is None or not (Path(path) / "config.json").is_file():
        raise VLMWeightsError(
            f"VLM folder {path!r} has no config.json: download Qwen/Qwen2.5-VL-7B-Instruct (or -72B) with "
            "`huggingface-cli download ... --local-dir DIR` on a machine with internet and pass --vlm-path DIR")
    return Path(path)


class LocalVLMJudge:
    """Judge.ask with a Qwen2.5-VL-class model: keyframes as images in one user turn, then sampled generation.

    Built from the tokenizer and the image processor rather than AutoProcessor: the processor
    also loads a video processor, which needs torchvision, and the judge only sends images. The
    image placeholders are expanded the way Qwen2-VL's processor does (one token per merged patch).
    """

    def __init__(self, model, tokenizer, image_processor, chat_template: str | None = None,
                 device: str | torch.device = "cpu", temperature: float = 1.0, max_new_tokens: int = 16,
                 seed: int = 0, name: str = "local-vlm") -> None:
        self.model = model.to(device).eval()
        self.tokenizer, self.image_processor = tokenizer, image_processor
        self.chat_template = chat_template
        self.device = torch.device(device)
        self.temperature, self.max_new_tokens, self.seed = temperature, max_new_tokens, seed
        self.name = name
        self.image_token = "<|image_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        if self.image_token_id != getattr(model.config, "image_token_id", None):
            raise VLMWeightsError(f"{name}: tokenizer's {self.image_token} id {self.image_token_id} differs from the "
                                  f"model's image_token_id {getattr(model.config, 'image_token_id', None)}: not a "
                                  "Qwen2-VL / Qwen2.5-VL folder?")

    @classmethod
    def from_folder(cls, path: str | os.PathLike | None, device: str | torch.device = "cpu",
                    dtype: torch.dtype | None = None, **kwargs) -> LocalVLMJudge:
        """The judge from a local folder, its weights loaded onto `device` in `dtype` (default: bf16 on
        a GPU, float32 on the CPU)."""
        import json

        from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

        path = check_vlm_folder(path)
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if dtype is None:
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        # device_map: the weights are read straight onto the device, never whole into host memory first
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype, device_map=device,
                                                            local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        image_processor = AutoImageProcessor.from_pretrained(path, local_files_only=True)
        template = None  # the processor's template (chat_template.json/.jinja) knows image items
        if (path / "chat_template.jinja").is_file():
            template = (path / "chat_template.jinja").read_text(encoding="utf-8")
        elif (path / "chat_template.json").is_file():
            template = json.loads((path / "chat_template.json").read_text(encoding="utf-8"))["chat_template"]
        return cls(model, tokenizer, image_processor, template, device, name=f"local:{path.name}", **kwargs)

    def prompt_inputs(self, images: Tensor, question: str) -> dict[str, Tensor]:
        from PIL import Image

        pil = [Image.fromarray(img.to(torch.uint8).numpy()) for img in images]
        content = [*({"type": "image"} for _ in pil), {"type": "text", "text": question}]
        messages = [{"role": "user", "content": content}]
        text = self.tokenizer.apply_chat_template(messages, chat_template=self.chat_template,
                                                  add_generation_prompt=True, tokenize=False)
        vision = self.image_processor(images=pil, return_tensors="pt")
        merge = self.image_processor.merge_size ** 2
        grids = vision["image_grid_thw"]  # (N, 3): t, h, w patches per image
        if text.count(self.image_token) != len(pil):
            raise VLMWeightsError(f"{self.name}: the chat template rendered {text.count(self.image_token)} image "
                                  f"placeholders for {len(pil)} images")
        pieces = text.split(self.image_token)
        text = pieces[0] + "".join(self.image_token * (int(g.prod()) // merge) + rest
                                   for g, rest in zip(grids, pieces[1:], strict=True))
        ids = self.tokenizer(text, return_tensors="pt")
        return {"input_ids": ids["input_ids"], "attention_mask": ids["attention_mask"],
                "pixel_values": vision["pixel_values"].to(self.model.dtype), "image_grid_thw": grids}

    @torch.no_grad()
    def ask(self, images: Tensor, question: str, repeat: int) -> str:
        inputs = {k: v.to(self.device) for k, v in self.prompt_inputs(images, question).items()}
        # generate() draws from the global generator: seed it per repeat, leave the caller's state alone
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(derive_seed(self.seed, repeat, _JUDGE_STREAM))
            out = self.model.generate(**inputs, do_sample=self.temperature > 0,
                                      temperature=self.temperature if self.temperature > 0 else None,
                                      max_new_tokens=self.max_new_tokens)
        new = out[:, inputs["input_ids"].shape[1]:]  # (1, generated)
        return self.tokenizer.batch_decode(new, skip_special_tokens=True)[0].strip()

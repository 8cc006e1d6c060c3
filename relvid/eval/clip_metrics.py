"""CLIP-T and temporal consistency from a local CLIP model (transformers CLIPModel folder).

CLIP-T: mean over frames of the cosine similarity between CLIP image features and the prompt's
text features. Temporal consistency: mean cosine similarity of CLIP image features of
consecutive frames. Both are plain cosines (the paper's scale, 0.32 / 0.99), not CLIPScore's 100x.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import Tensor

from relvid.errors import UserError
from relvid.eval.metrics import cosine_similarity, temporal_consistency
from relvid.models.weights import describe_folder


class CLIPWeightsError(UserError, FileNotFoundError):
    """No usable CLIP model folder."""


CLIP_HINT = ("download openai/clip-vit-large-patch14 (or another CLIP) in transformers format with "
             "`huggingface-cli download ... --local-dir DIR` on a machine with internet and pass --clip-path DIR")


def check_clip_folder(path: str | os.PathLike | None) -> Path:
    """``path`` as a folder holding a transformers CLIPModel (config.json with model_type "clip");
    a CLIPWeightsError naming the folder and what it holds otherwise."""
    if path is None:
        raise CLIPWeightsError(f"no CLIP model folder given: {CLIP_HINT}")
    folder = Path(path).expanduser()
    if not folder.is_dir():
        what = "a file" if folder.exists() else "not found"
        raise CLIPWeightsError(f"CLIP model folder {folder} is {what}: expected a CLIP model folder; {CLIP_HINT}")
    if not (folder / "config.json").is_file():
        raise CLIPWeightsError(f"CLIP model folder {folder} holds {describe_folder(folder)}, not a CLIP model: "
                               f"{CLIP_HINT}")
    try:
        model_type = json.loads((folder / "config.json").read_bytes().decode("utf-8")).get("model_type")
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        model_type = None
    if model_type != "clip":
        raise CLIPWeightsError(
            f"{folder} holds {describe_folder(folder)}, not a CLIP model (expected a transformers CLIPModel folder, "
            f"config.json model_type 'clip'): --clip-path points at the wrong folder; {CLIP_HINT}")
    return folder


def _features(out) -> Tensor:
    # transformers 5 returns a model output whose pooler_output is the projected embedding
    return out if isinstance(out, Tensor) else out.pooler_output


class CLIPFeatures:
    """Image and text embeddings of a CLIP model read from a local folder (e.g. openai/clip-vit-large-patch14)."""

    def __init__(self, model, processor, device: str | torch.device = "cpu", batch_size: int = 32) -> None:
        self.model = model.to(device).eval()
        self.processor = processor
        self.device = torch.device(device)
        self.batch_size = batch_size

    @classmethod
    def from_folder(cls, path: str | os.PathLike | None, device: str | torch.device = "cpu") -> CLIPFeatures:
        from transformers import CLIPModel, CLIPProcessor

        folder = check_clip_folder(path)
        model = CLIPModel.from_pretrained(folder, local_files_only=True)
        processor = CLIPProcessor.from_pretrained(folder, local_files_only=True)
        return cls(model, processor, device)

    @torch.no_grad()
    def image_features(self, frames: Tensor) -> Tensor:
        """uint8 (T, H, W, 3) -> (T, D) float32 image embeddings (not normalized)."""
        out = []
        for i in range(0, frames.shape[0], self.batch_size):
            batch = [f.numpy() for f in frames[i:i + self.batch_size]]
            pixels = self.processor(images=batch, return_tensors="pt")["pixel_values"].to(self.device)
            out.append(_features(self.model.get_image_features(pixel_values=pixels)).float().cpu())
        return torch.cat(out)

    @torch.no_grad()
    def text_features(self, texts: list[str]) -> Tensor:
        """(N, D) float32 text embeddings; long prompts are truncated to CLIP's context."""
        inputs = self.processor(text=texts, return_tensors="pt", padding=True, truncation=True)
        inputs = {k: v.to(self.device) for k, v in inputs.items() if k in ("input_ids", "attention_mask")}
        return _features(self.model.get_text_features(**inputs)).float().cpu()

    def video_scores(self, frames: Tensor, prompt: str) -> dict[str, float]:
        """{"clip_t", "temporal_consistency"} of one video."""
        image = self.image_features(frames)  # (T, D)
        text = self.text_features([prompt])  # (1, D)
        return {"clip_t": float(cosine_similarity(image, text).mean()),
                "temporal_consistency": temporal_consistency(image)}

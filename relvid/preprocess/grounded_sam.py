"""Grounded-SAM through transformers: Grounding DINO boxes for a text prompt, SAM masks inside them.

Identities across frames: the first frame with two detections fixes subject 1 (left) and
subject 2 (right); in every later frame the two boxes are matched to the previous ones by the
assignment with the larger total IoU, so a subject keeps its index when the two cross. A subject
the detector misses in a frame keeps its last box (brief occlusions and misses do not drop it).
Weights come from local folders in transformers format (e.g. IDEA-Research/grounding-dino-base
and facebook/sam-vit-huge, downloaded beforehand).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from relvid.models.backbone import WeightsNotFoundError
from relvid.preprocess.sources import Source
from relvid.preprocess.video import Clip, ClipSkipped

HINT = ("download IDEA-Research/grounding-dino-base (--gdino-path) and facebook/sam-vit-huge (--sam-path) with "
        "`huggingface-cli download <repo> --local-dir <folder>` on a machine with internet")


def box_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU of xyxy boxes: (N, 4) x (M, 4) -> (N, M)."""
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area = lambda x: (x[:, 2:] - x[:, :2]).clamp(min=0).prod(-1)  # noqa: E731
    return inter / (area(a)[:, None] + area(b)[None, :] - inter).clamp(min=1e-9)


def track_two(detections: list[Tensor]) -> list[Tensor | None]:
    """Per frame, (2, 4) boxes of subject 1 and 2 (None before the first frame with two detections).

    ``detections[t]`` holds frame t's boxes (n, 4), best first.
    """
    tracks: list[Tensor | None] = []
    previous: Tensor | None = None
    for boxes in detections:
        boxes = boxes[:4].float()  # the few best: a spurious low-score box never outvotes them
        if previous is None:
            if len(boxes) >= 2:
                two = boxes[:2]
                previous = two[torch.argsort(two[:, 0] + two[:, 2])]  # left one first
            tracks.append(previous)
            continue
        current = previous.clone()
        if len(boxes) >= 2:
            iou = box_iou(previous, boxes)  # (2, n)
            best, pair = -1.0, (0, 1)
            for i in range(len(boxes)):
                for j in range(len(boxes)):
                    if i != j and float(iou[0, i] + iou[1, j]) > best:
                        best, pair = float(iou[0, i] + iou[1, j]), (i, j)
            current = boxes[list(pair)]
        elif len(boxes) == 1:
            k = int(box_iou(previous, boxes)[:, 0].argmax())  # the subject it overlaps most
            current[k] = boxes[0]
        tracks.append(current)
        previous = current
    return tracks


def _folder(path: str | os.PathLike | None, what: str) -> Path:
    if path is None:
        raise WeightsNotFoundError(f"{what} path not set: {HINT}.")
    folder = Path(path).expanduser()
    if not (folder / "config.json").is_file():
        raise WeightsNotFoundError(f"{what} not found at {folder} (no config.json): {HINT}.")
    return folder


class GroundedSam:
    """Subject masks from Grounding DINO + SAM; a MaskMaker for relvid.preprocess.masks."""

    name = "grounded-sam"

    def __init__(self, detector, detector_processor, sam, sam_processor, prompt: str = "person",
                 box_threshold: float = 0.3, text_threshold: float = 0.25, batch_size: int = 8) -> None:
        self.detector, self.detector_processor = detector.eval(), detector_processor
        self.sam, self.sam_processor = sam.eval(), sam_processor
        # Grounding DINO expects lower-case phrases ending with a period.
        self.prompt = prompt.strip().lower().rstrip(".") + "."
        self.box_threshold, self.text_threshold = box_threshold, text_threshold
        self.batch_size = batch_size

    @classmethod
    def from_folders(cls, gdino_path, sam_path, prompt: str = "person", device: str = "cpu", **kwargs) -> GroundedSam:
        from transformers import AutoProcessor, GroundingDinoForObjectDetection, SamModel

        gdino, sam = _folder(gdino_path, "Grounding DINO"), _folder(sam_path, "SAM")
        detector = GroundingDinoForObjectDetection.from_pretrained(gdino, local_files_only=True).to(device)
        segmenter = SamModel.from_pretrained(sam, local_files_only=True).to(device)
        return cls(detector, AutoProcessor.from_pretrained(gdino, local_files_only=True), segmenter,
                   AutoProcessor.from_pretrained(sam, local_files_only=True), prompt, **kwargs)

    @property
    def device(self) -> torch.device:
        return next(self.detector.parameters()).device

    def available(self, source: Source) -> str | None:
        return None  # any video

    @torch.inference_mode()
    def detect(self, frames: np.ndarray) -> list[Tensor]:
        """Per frame, boxes (n, 4) xyxy in pixels, best score first."""
        from PIL import Image

        out = []
        for start in range(0, len(frames), self.batch_size):
            images = [Image.fromarray(f) for f in frames[start : start + self.batch_size]]
            inputs = self.detector_processor(images=images, text=[self.prompt] * len(images), return_tensors="pt")
            outputs = self.detector(**inputs.to(self.device))
            results = self.detector_processor.post_process_grounded_object_detection(
                outputs, inputs["input_ids"], threshold=self.box_threshold, text_threshold=self.text_threshold,
                target_sizes=[img.size[::-1] for img in images],
            )
            for r in results:
                order = torch.argsort(r["scores"], descending=True)
                out.append(r["boxes"][order].float().cpu())
        return out

    @torch.inference_mode()
    def segment(self, frames: np.ndarray, boxes: list[Tensor]) -> Tensor:
        """(2, T, H, W) masks of the two boxes of each frame."""
        from PIL import Image

        t, h, w = frames.shape[:3]
        masks = torch.zeros(2, t, h, w)
        for start in range(0, t, self.batch_size):
            images = [Image.fromarray(f) for f in frames[start : start + self.batch_size]]
            prompts = [boxes[start + i].tolist() for i in range(len(images))]
            inputs = self.sam_processor(images=images, input_boxes=prompts, return_tensors="pt")
            outputs = self.sam(**inputs.to(self.device), multimask_output=False)
            full = self.sam_processor.image_processor.post_process_masks(
                outputs.pred_masks.cpu(), inputs["original_sizes"].cpu(), inputs["reshaped_input_sizes"].cpu()
            )  # per frame (2, 1, H, W) bool
            for i, m in enumerate(full):
                masks[:, start + i] = m[:, 0].float()
        return masks

    def __call__(self, source: Source, clip: Clip) -> Tensor:
        tracks = track_two(self.detect(clip.frames))
        first = next((i for i, b in enumerate(tracks) if b is not None), None)
        if first is None:
            raise ClipSkipped(f"Grounding DINO found fewer than 2 '{self.prompt}' in every frame of "
                              f"{source.video.name}")
        # Frames before the first double detection take the first known boxes.
        boxes = [b if b is not None else tracks[first] for b in tracks]
        return self.segment(clip.frames, boxes)

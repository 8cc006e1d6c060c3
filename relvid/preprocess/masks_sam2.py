"""SAM 2 video masks: Grounding DINO finds the two subjects once, SAM 2 follows them through the clip.

Which subject is which: the first of the clip's first ``SEARCH_FRAMES`` frames in which Grounding DINO
finds two boxes for the prompt; its two best boxes, the left one subject 1 (the rule grounded-sam
uses, ``relvid.preprocess.grounded_sam.track_two``). Each box prompts SAM 2 on that frame as one
object (object id 1 = subject 1, 2 = subject 2), and SAM 2's memory carries both forward to the
clip's last frame and backward to its first: identities hold through contact and crossing with no
per-frame box matching. A clip without two detections in those frames is skipped with its reason.

Weights come from local folders in transformers format: Grounding DINO (as for grounded-sam) and a
SAM 2 / SAM 2.1 checkpoint with its video memory (e.g. facebook/sam2.1-hiera-large). relvid prepares
SAM 2's inputs itself (frames resized to the model's square input, normalised with the mean and std of
the folder's processor settings; boxes scaled to that square), so torchvision, which transformers' SAM 2
processors need, is not required.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from relvid.models.weights import WeightsNotFoundError, describe_folder, read_json
from relvid.preprocess.grounded_sam import GroundedSam, track_two
from relvid.preprocess.sources import Source
from relvid.preprocess.video import Clip, ClipSkipped

SAM2_ENV = "RELVID_SAM2_PATH"  # the SAM 2 folder when preprocess.sam2_path is not set
SEARCH_FRAMES = 16  # Grounding DINO looks for the two subjects in the clip's first 16 frames (~0.5 s at 30 fps)
SUBJECT_IDS = (1, 2)  # SAM 2 object ids of subject 1 and subject 2
SAM2_MODEL_TYPES = ("sam2_video", "sam2")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # SAM 2's normalisation
SAM2_HINT = ("download a SAM 2.1 checkpoint in transformers format on a machine with internet, e.g. "
             "`huggingface-cli download facebook/sam2.1-hiera-large --local-dir <folder>`, and pass --sam2-path "
             f"<folder> (preprocess.sam2_path, or set ${SAM2_ENV})")
GDINO_HINT = ("--mask-source sam2 finds the subjects with Grounding DINO: download IDEA-Research/grounding-dino-base "
              "with `huggingface-cli download IDEA-Research/grounding-dino-base --local-dir <folder>` on a machine "
              "with internet and pass --gdino-path <folder> (preprocess.gdino_path)")


def first_pair(detections: list[Tensor]) -> tuple[int, Tensor] | None:
    """(frame index, (2, 4) boxes subject 1 first) of the first frame with two detections, else None.

    ``detections[t]`` holds frame t's boxes (n, 4) xyxy, best first."""
    for t, boxes in enumerate(track_two(detections)):
        if boxes is not None:
            return t, boxes
    return None


def gdino_folder(path: str | os.PathLike | None) -> Path:
    if path is None:
        raise WeightsNotFoundError(f"Grounding DINO path not set: {GDINO_HINT}.")
    folder = Path(path).expanduser()
    if not (folder / "config.json").is_file():
        raise WeightsNotFoundError(f"Grounding DINO not found at {folder} (no config.json): {GDINO_HINT}.")
    return folder


def sam2_folder(path: str | os.PathLike | None) -> Path:
    """The SAM 2 folder (``path``, else $RELVID_SAM2_PATH), or a WeightsNotFoundError saying what it holds instead."""
    path = path if path is not None else os.environ.get(SAM2_ENV) or None
    if path is None:
        raise WeightsNotFoundError(f"SAM 2 path not set: {SAM2_HINT}.")
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise WeightsNotFoundError(f"SAM 2 folder {folder} does not exist: {SAM2_HINT}.")
    if not (folder / "config.json").is_file():
        checkpoints = sorted(p.name for p in folder.glob("*.pt"))
        if checkpoints:
            raise WeightsNotFoundError(
                f"SAM 2 folder {folder} holds {checkpoints[0]}, a checkpoint for Meta's sam2 package, not a "
                f"transformers folder (config.json + model.safetensors): {SAM2_HINT}.")
        raise WeightsNotFoundError(f"SAM 2 folder {folder} holds {describe_folder(folder)}: {SAM2_HINT}.")
    config = read_json(folder / "config.json", SAM2_HINT)
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type not in SAM2_MODEL_TYPES:
        other = " (a SAM 1 folder goes to --sam-path with --mask-source grounded-sam)" if model_type == "sam" else ""
        raise WeightsNotFoundError(
            f"SAM 2 folder {folder} holds {describe_folder(folder)}, not SAM 2 (model_type "
            f"{' or '.join(SAM2_MODEL_TYPES)}){other}: {SAM2_HINT}.")
    if not any(folder.glob("*.safetensors")) and not (folder / "pytorch_model.bin").is_file():
        raise WeightsNotFoundError(f"SAM 2 folder {folder} has a config.json but no weights (*.safetensors): the "
                                   f"download is incomplete; {SAM2_HINT}.")
    return folder


def normalisation(folder: Path) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) from the folder's processor settings (video processor first); SAM 2's ImageNet values otherwise."""
    for name in ("video_preprocessor_config.json", "preprocessor_config.json", "processor_config.json"):
        if not (folder / name).is_file():
            continue
        data = read_json(folder / name, SAM2_HINT)
        if not isinstance(data, dict):
            continue
        for settings in (data, data.get("video_processor"), data.get("image_processor")):
            if isinstance(settings, dict) and "image_mean" in settings and "image_std" in settings:
                return tuple(settings["image_mean"]), tuple(settings["image_std"])
    return IMAGENET_MEAN, IMAGENET_STD


def pixel_values(frames: np.ndarray, size: int, mean, std) -> Tensor:
    """uint8 (T, H, W, 3) -> (T, 3, size, size) floats: SAM 2's square input, normalised."""
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float() / 255.0
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


def load_sam2(path: str | os.PathLike | None, device: str = "cpu"):
    """(Sam2VideoModel, mean, std) from a local SAM 2 folder (``path``, else $RELVID_SAM2_PATH)."""
    from transformers import Sam2VideoModel

    folder = sam2_folder(path)
    model, info = Sam2VideoModel.from_pretrained(folder, local_files_only=True, output_loading_info=True)
    missing = [k for k in info.get("missing_keys", ()) if k.startswith(("memory_", "mask_downsample"))]
    if missing:
        raise WeightsNotFoundError(
            f"SAM 2 folder {folder} has no weights for the video memory ({missing[0]} ...): it holds SAM 2's image "
            f"model only; {SAM2_HINT}.")
    return model.to(device).eval(), *normalisation(folder)


@torch.inference_mode()
def track_subjects(model, frames: np.ndarray, frame: int, boxes: Tensor, mean=IMAGENET_MEAN,
                   std=IMAGENET_STD) -> Tensor:
    """(2, T, H, W) mask logits (> 0: the subject) of the objects that ``boxes`` (2, 4) xyxy pixels prompt on clip
    frame ``frame``: row i follows boxes[i], from that frame to the clip's end and back to its first frame."""
    from transformers.models.sam2_video.modeling_sam2_video import Sam2VideoInferenceSession

    parameter = next(model.parameters())
    size = model.config.image_size
    size = int(size[0] if isinstance(size, (list, tuple)) else size)
    t, h, w = frames.shape[:3]
    session = Sam2VideoInferenceSession(
        video=pixel_values(frames, size, mean, std), video_height=h, video_width=w,
        inference_device=parameter.device, inference_state_device=parameter.device, video_storage_device="cpu",
        dtype=parameter.dtype,
    )
    # A box prompt is its two corners as points labelled 2 (top left) and 3 (bottom right), on the square input.
    scale = torch.tensor([size / w, size / h, size / w, size / h])
    for obj_id, box in zip(SUBJECT_IDS, boxes, strict=True):
        corners = (box.float().cpu() * scale).reshape(1, 1, 2, 2)
        session.add_point_inputs(session.obj_id_to_idx(obj_id), frame, {
            "point_coords": corners, "point_labels": torch.tensor([[[2, 3]]], dtype=torch.int32)})
    session.obj_with_new_inputs = list(SUBJECT_IDS)
    logits = torch.full((len(SUBJECT_IDS), t, h, w), float("nan"))
    for reverse in (False, True):  # the prompt frame to the end, then back from it to frame 0
        for out in model.propagate_in_video_iterator(session, start_frame_idx=frame, reverse=reverse):
            masks = out.pred_masks.float()  # (objects, 1, h', w') low-resolution logits
            masks = F.interpolate(masks, size=(size, size), mode="bilinear", align_corners=False)
            masks = F.interpolate(masks, size=(h, w), mode="bilinear", align_corners=False)[:, 0].cpu()
            for row, obj_id in enumerate(out.object_ids):
                logits[SUBJECT_IDS.index(obj_id), out.frame_idx] = masks[row]
    if logits.isnan().any():
        missing = sorted({int(i) for i in logits.isnan().flatten(2).any(-1).nonzero()[:, 1]})
        raise RuntimeError(f"SAM 2 gave no masks for clip frames {missing[:5]}")
    return logits


class Sam2VideoMasks:
    """Subject masks from Grounding DINO boxes on one frame + SAM 2 video propagation; a MaskMaker."""

    name = "sam2"
    # The same Grounding DINO pass as grounded-sam (it reads detector, detector_processor, prompt,
    # box_threshold, text_threshold, batch_size and device).
    detect = GroundedSam.detect

    def __init__(self, detector, detector_processor, video_model, prompt: str = "person", box_threshold: float = 0.3,
                 text_threshold: float = 0.25, batch_size: int = 8, search_frames: int = SEARCH_FRAMES,
                 mean=IMAGENET_MEAN, std=IMAGENET_STD) -> None:
        self.detector, self.detector_processor = detector.eval(), detector_processor
        self.video_model = video_model.eval()
        # Grounding DINO expects lower-case phrases ending with a period.
        self.prompt = prompt.strip().lower().rstrip(".") + "."
        self.box_threshold, self.text_threshold = box_threshold, text_threshold
        self.batch_size, self.search_frames = batch_size, search_frames
        self.mean, self.std = tuple(mean), tuple(std)

    @classmethod
    def from_folders(cls, gdino_path, sam2_path, prompt: str = "person", device: str = "cpu",
                     **kwargs) -> Sam2VideoMasks:
        from transformers import AutoProcessor, GroundingDinoForObjectDetection

        gdino = gdino_folder(gdino_path)
        video_model, mean, std = load_sam2(sam2_path, device)
        detector = GroundingDinoForObjectDetection.from_pretrained(gdino, local_files_only=True).to(device)
        return cls(detector, AutoProcessor.from_pretrained(gdino, local_files_only=True), video_model, prompt,
                   mean=mean, std=std, **kwargs)

    @property
    def device(self) -> torch.device:
        return next(self.detector.parameters()).device

    def available(self, source: Source) -> str | None:
        return None  # any video

    def find_subjects(self, frames: np.ndarray) -> tuple[int, Tensor] | None:
        """(frame, (2, 4) boxes subject 1 first) of the first of the first ``search_frames`` frames with two
        detections, else None; detection stops at the batch that finds them."""
        limit = min(len(frames), self.search_frames)
        detections: list[Tensor] = []
        for start in range(0, limit, self.batch_size):
            detections += self.detect(frames[start : min(limit, start + self.batch_size)])
            found = first_pair(detections)
            if found is not None:
                return found
        return None

    def track(self, frames: np.ndarray, frame: int, boxes: Tensor) -> Tensor:
        """(2, T, H, W) mask logits of the subjects ``boxes`` (2, 4) prompt on clip frame ``frame`` (track_subjects)."""
        return track_subjects(self.video_model, frames, frame, boxes, self.mean, self.std)

    def __call__(self, source: Source, clip: Clip) -> Tensor:
        found = self.find_subjects(clip.frames)
        if found is None:
            limit = min(len(clip.frames), self.search_frames)
            raise ClipSkipped(f"Grounding DINO found fewer than 2 '{self.prompt}' in each of the first {limit} frames "
                              f"of {source.video.name} (SAM 2 starts from a frame that shows both subjects)")
        frame, boxes = found
        return (self.track(clip.frames, frame, boxes) > 0).float()

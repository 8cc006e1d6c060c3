"""Tiny random model folders and real media files (no hub, no network): preprocessing, model and sampling tests.

Every builder writes what a user would download (diffusers / transformers ``save_pretrained``
layouts) into a folder and returns its path, so the code under test loads them exactly as it loads
the real Mochi VAE, T5-XXL, Grounding DINO and SAM.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

# Latent statistics for the tiny VAE: far from (0, 1) so that a missing normalization shows.
TINY_LATENTS_MEAN = (0.3, -0.2, 0.1, -0.4)
TINY_LATENTS_STD = (0.5, 2.0, 1.25, 0.8)
TINY_WORDS = (
    "a person is shaking hands with hugging pushing kicking punching dog cat robot bear "
    "the an and of two people each other walking towards"
).split()


def tiny_vae(latent_channels: int = 4, scaling_factor: float = 1.0, seed: int = 0):
    """A random AutoencoderKLMochi with Mochi's 6x/8x compression and 32-wide blocks."""
    from diffusers import AutoencoderKLMochi

    mean = (TINY_LATENTS_MEAN * 3)[:latent_channels]
    std = (TINY_LATENTS_STD * 3)[:latent_channels]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoencoderKLMochi(
            latent_channels=latent_channels,
            encoder_block_out_channels=(32, 32, 32, 32),
            decoder_block_out_channels=(32, 32, 32, 32),
            layers_per_block=(1, 1, 1, 1, 1),
            add_attention_block=(False, False, True, False, False),
            latents_mean=mean,
            latents_std=std,
            scaling_factor=scaling_factor,
        )


def save_tiny_vae(root: Path, pipeline_layout: bool = True, **kwargs) -> Path:
    """Save a tiny VAE as ``root/vae`` (pipeline layout) or directly in ``root``; returns root."""
    root = Path(root)
    tiny_vae(**kwargs).save_pretrained(root / "vae" if pipeline_layout else root)
    return root


def tiny_t5_tokenizer():
    """A T5 (Unigram) tokenizer over a few lower-case words, built locally."""
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [("\u2581" + w, -1.0 - 0.01 * i) for i, w in enumerate(TINY_WORDS)]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def tiny_t5(d_model: int = 32, vocab_size: int | None = None, seed: int = 0):
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(
        vocab_size=vocab_size or len(TINY_WORDS) + 4, d_model=d_model, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return T5EncoderModel(cfg).eval()


def save_tiny_t5(root: Path, pipeline_layout: bool = True, d_model: int = 32) -> Path:
    """Save tokenizer + encoder as ``root/tokenizer`` + ``root/text_encoder`` or both in ``root``."""
    root = Path(root)
    tiny_t5_tokenizer().save_pretrained(root / "tokenizer" if pipeline_layout else root)
    tiny_t5(d_model=d_model).save_pretrained(root / "text_encoder" if pipeline_layout else root)
    return root


def write_video(path: Path, frames: np.ndarray, fps: float = 30.0, codec: str = "libx264") -> Path:
    """Encode uint8 (T, H, W, 3) frames with PyAV (H.264, yuv420p) into .mp4 or .avi."""
    from fractions import Fraction

    import av

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        stream.height, stream.width = frames.shape[1], frames.shape[2]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "18", "preset": "ultrafast"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def frame_index_video(frames: int, height: int, width: int) -> np.ndarray:
    """Frames whose grey level encodes their index (8 * i), to check which frames a decoder kept."""
    levels = (np.arange(frames) * 8 % 256).astype(np.uint8)
    return np.broadcast_to(levels[:, None, None, None], (frames, height, width, 3)).copy()


# A standing Kinect v2 body, joint offsets in units of its torso length (x right, y down), origin at SpineBase.
_POSE = {
    0: (0.0, 0.0), 1: (0.0, -0.5), 20: (0.0, -1.0), 2: (0.0, -1.15), 3: (0.0, -1.4),
    4: (-0.35, -0.95), 5: (-0.45, -0.5), 6: (-0.5, -0.1), 7: (-0.52, 0.0), 21: (-0.54, 0.1), 22: (-0.45, 0.02),
    8: (0.35, -0.95), 9: (0.45, -0.5), 10: (0.5, -0.1), 11: (0.52, 0.0), 23: (0.54, 0.1), 24: (0.45, 0.02),
    12: (-0.2, 0.05), 13: (-0.22, 0.75), 14: (-0.22, 1.45), 15: (-0.22, 1.55),
    16: (0.2, 0.05), 17: (0.22, 0.75), 18: (0.22, 1.45), 19: (0.22, 1.55),
}


def standing_body(x: float, y: float = 600.0, torso: float = 200.0) -> np.ndarray:
    """(25, 2) colour-space joints of a person standing with the spine base at (x, y) in a 1920x1080 frame."""
    return np.array([[x + _POSE[j][0] * torso, y + _POSE[j][1] * torso] for j in range(25)])


def write_skeleton(path: Path, frames: list[list[tuple[int, np.ndarray]]], frame_count: int | None = None) -> Path:
    """Write an NTU .skeleton file: per frame a list of (bodyID, (25, 2) colour joints)."""
    lines = [str(len(frames) if frame_count is None else frame_count)]
    for bodies in frames:
        lines.append(str(len(bodies)))
        for body_id, joints in bodies:
            lines.append(f"{body_id} 0 1 2 1 2 0 0.1 0.2 2")
            lines.append("25")
            for _j, (cx, cy) in enumerate(joints):
                lines.append(f"0.1 0.2 3.0 {cx / 3.75:.4f} {cy / 2.55:.4f} {cx:.4f} {cy:.4f} 0.5 0.5 0.5 0.5 2")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("\n".join(lines) + "\n")
    return Path(path)


def two_people_frames(count: int, ids: tuple[int, int] = (72057594037931691, 72057594037931692),
                      left_x: float = 600.0, right_x: float = 1300.0) -> list[list[tuple[int, np.ndarray]]]:
    """Two people walking towards each other (10 px per frame), right one listed first (order must not matter)."""
    return [[(ids[1], standing_body(right_x - 10 * t)), (ids[0], standing_body(left_x + 10 * t))] for t in range(count)]


def save_tiny_grounding_dino(folder: Path, seed: int = 0) -> Path:
    """A random GroundingDinoForObjectDetection (Swin + BERT, 32-wide) with its processor, saved to ``folder``."""
    from transformers import (
        BertConfig,
        BertTokenizer,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoImageProcessor,
        GroundingDinoProcessor,
        SwinConfig,
    )

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", "person", "a", "dog", "cat"]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    processor = GroundingDinoProcessor(
        image_processor=GroundingDinoImageProcessor(size={"shortest_edge": 64, "longest_edge": 96}),
        tokenizer=BertTokenizer(vocab_file=str(folder / "vocab.txt")),
    )
    cfg = GroundingDinoConfig(
        backbone_config=SwinConfig(image_size=64, patch_size=4, embed_dim=16, depths=[1, 1, 1, 1],
                                   num_heads=[1, 1, 2, 2],
                                   window_size=4, out_features=["stage2", "stage3", "stage4"]),
        text_config=BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=32, max_position_embeddings=64),
        d_model=32, encoder_layers=1, decoder_layers=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
        encoder_attention_heads=2, decoder_attention_heads=2, num_queries=20, encoder_n_points=2, decoder_n_points=2,
        max_text_len=32,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        GroundingDinoForObjectDetection(cfg).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def save_tiny_sam(folder: Path, seed: int = 0) -> Path:
    """A random SamModel (16-wide ViT, 64-pixel input) with its processor, saved to ``folder``."""
    from transformers import (
        SamConfig,
        SamImageProcessor,
        SamMaskDecoderConfig,
        SamModel,
        SamProcessor,
        SamPromptEncoderConfig,
        SamVisionConfig,
    )

    cfg = SamConfig(
        vision_config=SamVisionConfig(hidden_size=16, output_channels=16, num_hidden_layers=1, num_attention_heads=2,
                                      image_size=64, patch_size=8, global_attn_indexes=[0], window_size=4, mlp_dim=32,
                                      num_pos_feats=8),
        prompt_encoder_config=SamPromptEncoderConfig(hidden_size=16, image_size=64, patch_size=8,
                                                     mask_input_channels=4),
        mask_decoder_config=SamMaskDecoderConfig(hidden_size=16, mlp_dim=32, num_hidden_layers=1, num_attention_heads=2,
                                                 iou_head_hidden_dim=16),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        SamModel(cfg).save_pretrained(folder)
    SamProcessor(image_processor=SamImageProcessor(size={"longest_edge": 64}, pad_size={"height": 64, "width": 64})
                 ).save_pretrained(folder)
    return Path(folder)


def save_spiece_t5(root: Path, d_model: int = 32) -> Path:
    """genmo's layout: ``tokenizer/`` holds only spiece.model (+ tokenizer_config.json), no tokenizer.json."""
    import io
    import json

    import sentencepiece as spm

    root = Path(root)
    (root / "tokenizer").mkdir(parents=True, exist_ok=True)
    text = ["a person is shaking hands with a person", "a dog is hugging a cat", "two people walking towards",
            "the robot is kicking a bear"] * 20
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text), model_writer=model, vocab_size=30,
                                   model_type="unigram",
                                   pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0, minloglevel=2)
    (root / "tokenizer" / "spiece.model").write_bytes(model.getvalue())
    (root / "tokenizer" / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "T5Tokenizer", "extra_ids": 0, "model_max_length": 512}))
    tiny_t5(d_model=d_model, vocab_size=30).save_pretrained(root / "text_encoder")
    return root

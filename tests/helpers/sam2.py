"""A tiny random SAM 2 video model folder (transformers format), built from a config: no hub, no network.

The folder looks like a downloaded SAM 2.1 checkpoint (config.json of model_type ``sam2_video``,
model.safetensors and the processor's settings), at 64 pixels with one or two blocks per stage, so that
``relvid preprocess --mask-source sam2`` loads it exactly as it loads facebook/sam2.1-hiera-large.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

SIZE = 64  # the tiny model's square input (the real checkpoints: 1024)
WIDTH, MEMORY = 128, 64  # channels past the backbone and of the memory (the real checkpoints: 256, 64)


def tiny_sam2_config():
    from transformers import Sam2VideoConfig
    from transformers.models.sam2.configuration_sam2 import Sam2HieraDetConfig, Sam2VisionConfig

    # Hiera: patches of 4 -> 16x16, then three 2x poolings -> 8, 4, 2; the FPN keeps the first three levels.
    backbone = Sam2HieraDetConfig(hidden_size=8, num_attention_heads=1, image_size=[SIZE, SIZE],
                                  blocks_per_stage=[1, 1, 2, 1], embed_dim_per_stage=[8, 16, 32, 64],
                                  num_attention_heads_per_stage=[1, 1, 2, 2], window_size_per_stage=[4, 4, 4, 2],
                                  global_attention_blocks=[3], window_positional_embedding_background_size=[2, 2])
    # The memory cross-attention reads 64 channels whatever the config says, and object pointers are split into
    # chunks of the memory width, which must be smaller than the model's (as in the real checkpoints).
    vision = Sam2VisionConfig(backbone_config=backbone, backbone_channel_list=[64, 32, 16, 8],
                              backbone_feature_sizes=[[16, 16], [8, 8], [4, 4]], fpn_hidden_size=WIDTH)
    return Sam2VideoConfig(
        vision_config=vision,
        prompt_encoder_config={"hidden_size": WIDTH, "image_size": SIZE, "patch_size": 16, "mask_input_channels": 4},
        mask_decoder_config={"hidden_size": WIDTH, "mlp_dim": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                             "iou_head_hidden_dim": 16},
        image_size=SIZE, num_maskmem=3, memory_attention_hidden_size=WIDTH, memory_attention_num_layers=1,
        memory_attention_feed_forward_hidden_size=32, memory_attention_rope_feat_sizes=[SIZE // 16, SIZE // 16],
        memory_encoder_hidden_size=WIDTH, memory_encoder_output_channels=MEMORY, mask_downsampler_embed_dim=WIDTH,
        memory_fuser_num_layers=1, memory_fuser_embed_dim=WIDTH, memory_fuser_intermediate_dim=32,
    )


def save_tiny_sam2(folder: Path, seed: int = 0) -> Path:
    """A random Sam2VideoModel with the processor settings a hub download carries, saved to ``folder``."""
    from transformers import Sam2VideoModel

    folder = Path(folder)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Sam2VideoModel(tiny_sam2_config()).eval()
        # Random init leaves the object-score head near zero: lift it so that every frame counts as "object
        # present" and the masks depend on the pixels (a real checkpoint learned this).
        with torch.no_grad():
            model.mask_decoder.pred_obj_score_head.proj_out.bias.fill_(10.0)
    model.save_pretrained(folder)
    settings = {"size": {"height": SIZE, "width": SIZE}, "image_mean": [0.485, 0.456, 0.406],
                "image_std": [0.229, 0.224, 0.225], "do_rescale": True, "rescale_factor": 1 / 255, "do_resize": True,
                "do_normalize": True}
    (folder / "preprocessor_config.json").write_text(
        json.dumps({**settings, "image_processor_type": "Sam2ImageProcessorFast"}, indent=2))
    (folder / "video_preprocessor_config.json").write_text(
        json.dumps({**settings, "video_processor_type": "Sam2VideoVideoProcessor"}, indent=2))
    (folder / "processor_config.json").write_text(json.dumps({"processor_class": "Sam2VideoProcessor"}, indent=2))
    return folder

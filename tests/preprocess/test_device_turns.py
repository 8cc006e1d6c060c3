"""`relvid preprocess` keeps one model on the GPU at a time: T5 is freed before any clip is encoded, and
Grounded-SAM and the VAE take turns clip by clip (tiny random models)."""

import weakref

import numpy as np
import pytest
import torch

import relvid.components
from relvid.cli import main
from relvid.data.cache import ClipCache
from relvid.models.mochi_vae import MochiCodec
from relvid.models.t5 import T5TextEncoder
from relvid.preprocess.grounded_sam import GroundedSam
from tests.helpers.preprocess import save_tiny_grounding_dino, save_tiny_sam, write_video


@pytest.fixture(scope="module")
def gsam(tmp_path_factory):
    root = tmp_path_factory.mktemp("gsam")
    return save_tiny_grounding_dino(root / "gdino"), save_tiny_sam(root / "sam")


@pytest.fixture
def watch(monkeypatch):
    """Records, whenever the VAE encodes a clip or Grounded-SAM masks one, whether T5 is still alive and
    where each model's weights are."""
    seen = {"t5": [], "codec": [], "encode": [], "mask": []}

    real_text, real_codec = relvid.components.load_text_encoder, relvid.components.load_codec

    def load_text_encoder(*args, **kwargs):
        encoder = real_text(*args, **kwargs)
        seen["t5"].append(weakref.ref(encoder.model))
        return encoder

    def load_codec(*args, **kwargs):
        codec = real_codec(*args, **kwargs)
        seen["codec"].append(codec)
        return codec

    def where(module):
        return next(module.parameters()).device.type

    real_encode, real_mask = MochiCodec.encode, GroundedSam.__call__

    def encode(self, video):
        seen["encode"].append({"t5_alive": any(ref() is not None for ref in seen["t5"]), "vae": where(self.vae),
                               "gsam": [where(m) for g in seen.get("gsam", []) for m in (g.detector, g.sam)]})
        return real_encode(self, video)

    def mask(self, source, clip):
        seen.setdefault("gsam", []).append(self)
        seen["mask"].append({"t5_alive": any(ref() is not None for ref in seen["t5"]),
                             "vae": [where(c.vae) for c in seen["codec"]], "gsam": where(self.detector)})
        return real_mask(self, source, clip)

    monkeypatch.setattr(relvid.components, "load_text_encoder", load_text_encoder)
    monkeypatch.setattr(relvid.components, "load_codec", load_codec)
    monkeypatch.setattr(MochiCodec, "encode", encode)
    monkeypatch.setattr(GroundedSam, "__call__", mask)
    return seen


CAPTIONS = {"hug_a": "A person is hugging a person.", "hug_b": "Two people hug."}


def preprocess(tmp_path, mochi, gsam, device: str) -> ClipCache:
    videos = tmp_path / "videos"
    for i, name in enumerate(("hug_a", "hug_b")):
        write_video(videos / f"{name}.mp4",
                    np.random.default_rng(i).integers(0, 255, (7, 32, 48, 3), dtype=np.uint8))
        (videos / f"{name}.txt").write_text(CAPTIONS[name])
    out = tmp_path / "cache"
    assert main(["preprocess", "-r", "hug", "--videos", str(videos), "--mask-source", "grounded-sam",
                 "--gdino-path", str(gsam[0]), "--sam-path", str(gsam[1]), "--box-threshold", "0",
                 "--text-threshold", "0", "--mochi-path", str(mochi), "--out", str(out), "--frames", "7",
                 "--height", "32", "--width", "48", "--device", device, "--no-progress"]) == 0
    return ClipCache(out)


def test_t5_is_freed_before_the_first_clip_and_captions_still_reach_the_cache(mochi, gsam, watch, tmp_path):
    cache = preprocess(tmp_path, mochi, gsam, "cpu")
    assert len(watch["t5"]) == 1 and len(watch["encode"]) == len(watch["mask"]) == 2
    # T5 was alive while it embedded, and gone before Grounded-SAM or the VAE saw a clip
    assert not any(call["t5_alive"] for call in watch["encode"] + watch["mask"])
    # each clip got its own caption's embedding from that one pass, and the negative prompt is there
    t5 = T5TextEncoder.from_folder(mochi)
    assert sorted(cache.clip_ids()) == sorted(CAPTIONS)
    for clip_id, caption in CAPTIONS.items():
        record, (embeds, mask) = cache.read(clip_id), t5.encode([caption])[0]
        assert record.meta["text_encoder"] == "t5" and torch.equal(record.text_mask, mask)
        torch.testing.assert_close(record.text_embeds, embeds, atol=1e-5, rtol=1e-4)  # padding differs by batch
    torch.testing.assert_close(cache.read_prompts()[""][0], t5.encode([""])[0][0], atol=1e-5, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_grounded_sam_and_the_vae_take_turns_on_the_gpu(mochi, gsam, watch, tmp_path):
    cache = preprocess(tmp_path, mochi, gsam, "cuda")
    assert sorted(cache.clip_ids()) == sorted(CAPTIONS)
    assert watch["mask"] and watch["encode"]
    for call in watch["mask"]:  # Grounded-SAM works on the GPU while the VAE waits on the CPU
        assert not call["t5_alive"] and call["gsam"] == "cuda" and set(call["vae"]) == {"cpu"}, call
    for call in watch["encode"]:  # and the other way round
        assert not call["t5_alive"] and call["vae"] == "cuda" and set(call["gsam"]) == {"cpu"}, call

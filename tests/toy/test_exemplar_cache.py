"""The toy world's exemplar cache, written by the preprocessing pipeline's one writer, holds exactly
the tensors the toy grid's committed results were trained on."""

import hashlib

import torch

from relvid.losses.flow_matching import relation_mask
from relvid.toy.drivers.datasets import build_exemplar_cache
from relvid.toy.world import RELATIONS

# sha256 (first 16 hex digits) of every tensor of the first two exemplars of each relation, as float64
# values with their shapes, from the exemplar cache the committed grid (experiments/toy) trained on.
RECORDED = {
    "approaching_000": "f54071100ca8f86e", "approaching_001": "caa66c91f57bdbe7",
    "bouncing_000": "c41316f51dd44db3", "bouncing_001": "d7bdc796125e72c5",
    "following_000": "26c56e7994796d3d", "following_001": "d09182c595343e11",
    "moving_apart_000": "422ced006a647444", "moving_apart_001": "ec7765e3535ddd49",
    "orbiting_000": "2fc8cf2f12fdb5b4", "orbiting_001": "f7a7f88ddf0f59cc",
    "pushing_000": "2d37871d35158bba", "pushing_001": "d1da3b8a8fa10996",
    "swapping_000": "5926c953d504f9fe", "swapping_001": "23c35d6544d93ae9",
}
RECORDED_PROMPTS = (71, "ade1858d5161144d")  # the test prompts of every relation and ""
TENSORS = ("latent_mean", "latent_logvar", "text_embeds", "text_mask", "subject_masks", "relation_mask")


def clip_digest(record) -> str:
    """The digest of what training reads by default: the relation mask as hmt.relation_mask=max makes
    it (what the committed grid's clips stored before clip format 2 stored the per-frame union)."""
    h = hashlib.sha256()
    for name in TENSORS:
        t = relation_mask(record.subject_masks[None], "max")[0] if name == "relation_mask" else getattr(record, name)
        h.update(f"{name}{tuple(t.shape)}".encode())
        h.update(t.to(torch.float64).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def prompts_digest(prompts: dict) -> tuple[int, str]:
    h = hashlib.sha256()
    for text in sorted(prompts):
        embeds, mask = prompts[text]
        h.update(text.encode())
        h.update(embeds.double().numpy().tobytes())
        h.update(mask.double().numpy().tobytes())
    return len(prompts), h.hexdigest()[:16]


def test_the_pipeline_writes_the_recorded_exemplars_for_every_relation(tmp_path):
    cache = build_exemplar_cache(tmp_path / "cache", list(RELATIONS), clips=2, progress=False)
    assert {clip_id: clip_digest(cache.read(clip_id)) for clip_id in cache.clip_ids()} == RECORDED
    assert prompts_digest(cache.read_prompts()) == RECORDED_PROMPTS
    # the stored per-frame union covers at least the max of the time-averaged masks, and more where the
    # subjects cross a cell in turn within one latent frame (the follower enters the leader's cells)
    grew = set()
    for clip_id in cache.clip_ids():
        record = cache.read(clip_id)
        assert record.meta["format_version"] == "2"
        floor = relation_mask(record.subject_masks[None], "max")[0]
        assert bool((record.relation_mask >= floor - 1e-6).all())
        if not torch.equal(record.relation_mask, floor):
            grew.add(clip_id.rsplit("_", 1)[0])
    assert "following" in grew
    record = cache.read("orbiting_001")
    assert record.meta["source"] == "toy:0:orbiting:1" and record.meta["mask_source"] == "renderer"
    assert record.meta["frame_range"] == "0-12" and record.meta["codec"] == "toy"
    assert cache.manifest["failures"] == []


def test_the_digest_sees_a_changed_tensor(tmp_path):
    cache = build_exemplar_cache(tmp_path / "cache", ["orbiting"], clips=1, progress=False)
    record = cache.read("orbiting_000")
    assert clip_digest(record) == RECORDED["orbiting_000"]
    record.subject_masks[0, 0, 0, 0] += 1e-6
    assert clip_digest(record) != RECORDED["orbiting_000"]

"""relvid's sampler against a transcription of the reference code's inference (pipelines.py:436-515
at ali-vilab/DreamRelation 4fa0920; tests/helpers/reference_dreamrelation.py): an imported
reference LoRA, the zeroed null prompt, CFG 6, genmo's schedule, the LoRA merged into the base."""

import pytest
import torch

from relvid.config import SamplingConfig
from relvid.inference.generate import unconditional_input
from relvid.inference.sampler import linear_quadratic_sigmas, sample
from relvid.models.adapter_file import apply_adapter_source
from relvid.models.backbone import tiny_transformer
from relvid.models.lora_io import import_reference
from tests.helpers.adapters import reference_state
from tests.helpers.reference_dreamrelation import (
    attach_reference_loras,
    linear_quadratic_schedule,
    reference_sample,
)


def test_the_schedules_agree():
    for steps in (2, 8, 64):
        assert torch.allclose(linear_quadratic_sigmas(steps), torch.tensor(linear_quadratic_schedule(steps),
                                                                              dtype=torch.float64), atol=1e-12)


@pytest.mark.parametrize("source", ["relvid", "diffusers"])
def test_sampling_with_an_imported_reference_lora_equals_the_reference_sampler(tmp_path, source):
    ref, where = reference_state(rank=4)
    ref = {k: v * 0.05 for k, v in ref.items()}  # a LoRA that changes the output, not one that swamps it
    torch.save({"state_dict": ref, "kwargs": {"qkv_proj_lora_alpha": 8, "out_proj_lora_alpha": 8}},
               tmp_path / "model_2000.lora.pt")
    diffusers_file = import_reference(tmp_path / "model_2000.lora.pt", tmp_path / "imported")

    ours = tiny_transformer()
    apply_adapter_source(ours, diffusers_file if source == "diffusers" else diffusers_file.parent /
                         "relvid_adapters.safetensors")
    theirs = tiny_transformer()
    _, named = attach_reference_loras(theirs, rank=4, alpha=8.0)
    with torch.no_grad():
        for key, tensor in ref.items():
            named[where[key]].copy_(tensor)

    g = torch.Generator().manual_seed(0)
    noise = torch.randn(1, 4, 3, 8, 8, generator=g)
    embeds, mask = torch.randn(6, 32, generator=g), torch.tensor([True] * 4 + [False] * 2)
    settings = SamplingConfig(num_steps=8, guidance_scale=6.0, null_condition="zeros")
    neg_e, neg_m = unconditional_input(settings, embeds, mask, negative=(torch.randn(1, 32), torch.ones(1).bool()))
    ours.eval()
    with torch.no_grad():
        latents = sample(ours, noise, embeds[None], mask[None], negative_embeds=neg_e[None], negative_mask=neg_m[None],
                         num_steps=settings.num_steps, guidance_scale=settings.guidance_scale,
                         threshold_noise=settings.threshold_noise)
    expected = reference_sample(theirs, embeds[None], mask[None], noise, steps=8, guidance=6.0,
                                merge=True, autocast_dtype=None)
    assert torch.allclose(latents, expected, atol=1e-5, rtol=1e-5), (latents - expected).abs().max()
    # the null condition matters: T5's encoding of "" would give other latents
    with torch.no_grad():
        encoded = sample(ours, noise, embeds[None], mask[None], negative_embeds=torch.randn(1, 1, 32, generator=g),
                         negative_mask=torch.ones(1, 1, dtype=torch.bool), num_steps=8, guidance_scale=6.0)
    assert not torch.allclose(encoded, expected, atol=1e-3)

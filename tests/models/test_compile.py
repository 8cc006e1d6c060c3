"""speed.compile: a training run that switches LoRA selections and text lengths stays compiled.

Dynamo's `eager` backend traces and guards exactly as inductor does (the recompilations are the same)
without generating code, so the test runs in seconds on a CPU; tests/models/test_attention.py
checks inductor's numbers (slow).
"""

import pytest
import torch

from relvid.models.attention import COMPILE_RECOMPILE_LIMIT, apply_speed_config
from relvid.models.lora import TripletSpec, activate, adapters_for_selection, inference_adapters, lora_parameters
from tests.helpers.attention import batch, lora_model, speed

SELECTIONS = ("relation", "subject1", "subject2")
LENGTHS = (6, 9)  # two prompt lengths (batches are padded to their longest prompt)


@pytest.fixture
def dynamo(monkeypatch):
    """A fresh dynamo with torch's default limits (restored afterwards)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    for key, value in (("recompile_limit", 8), ("accumulated_recompile_limit", 256)):
        if hasattr(torch._dynamo.config, key):
            monkeypatch.setattr(torch._dynamo.config, key, value)
    torch._dynamo.reset()
    counters.clear()
    yield counters
    torch._dynamo.reset()


def step(model, spec, index, selection, length, train=True):
    activate(model, adapters_for_selection(selection, spec) if train else inference_adapters(spec))
    inputs = batch((length,), L=length, seed=index)
    inputs["encoder_attention_mask"][0, length - 2:] = index % 4 < 2  # padded prompts too
    with torch.set_grad_enabled(train):
        out = model(**inputs, return_dict=False)[0]
    if train:
        model.zero_grad(set_to_none=True)
        out.square().mean().backward()
    return out.detach(), inputs


def test_training_with_adapter_switching_and_text_lengths_stays_compiled(dynamo):
    model = lora_model(checkpointing=True)  # gradient checkpointing on, as model.gradient_checkpointing defaults
    spec = TripletSpec(rank=4, alpha=4.0)
    apply_speed_config(model, speed(compile=True), compile_backend="eager")
    assert torch._dynamo.config.recompile_limit >= COMPILE_RECOMPILE_LIMIT
    graphs = []
    for i in range(12):  # every (selection, length) pair by step 6, then each once more
        out, inputs = step(model, spec, i, SELECTIONS[i % 3], LENGTHS[i % 2])
        if i in (3, 9):  # a preview: inference adapters, no gradients
            step(model, spec, 100 + i, "relation", LENGTHS[0], train=False)
        graphs.append(dynamo["stats"]["unique_graphs"])
    limit_hits = [k for k in dynamo["unimplemented"] if "recompile limit" in k.lower()]
    assert not limit_hits, limit_hits[0][:300]
    assert dynamo["frames"]["total"] == dynamo["frames"]["ok"]  # no frame left to run eagerly
    assert graphs[0] > 0
    assert graphs[-1] == graphs[5], graphs  # steps 6-11 (and the second preview) compile nothing new
    # the compiled blocks compute what the eager ones do
    grads = {n: p.grad.clone() for n, p in lora_parameters(model).items() if p.grad is not None}
    apply_speed_config(model, speed(compile=False))
    activate(model, adapters_for_selection(SELECTIONS[11 % 3], spec))
    model.zero_grad(set_to_none=True)
    eager = model(**inputs, return_dict=False)[0]
    eager.square().mean().backward()
    torch.testing.assert_close(out, eager.detach(), atol=1e-6, rtol=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, lora_parameters(model)[name].grad, atol=1e-6, rtol=1e-5)

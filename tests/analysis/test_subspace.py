"""Subspace similarity: the formula against a direct float64 computation, its two anchors (identical
weights, random weights), and which base subspace an adapter's update lies in."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from relvid.analysis.subspace import adapter_similarity, qkv_similarity, subspace_similarity
from relvid.models.backbone import tiny_transformer
from relvid.models.lora import TripletSpec, inject_triplet


def direct(a: torch.Tensor, b: torch.Tensor, r: int, space: str) -> float:
    """||U_a^T U_b||_F^2 / r written out with numpy in float64."""
    def basis(w):
        u, _, vt = np.linalg.svd(w.numpy().astype(np.float64))
        return (u if space == "output" else vt.T)[:, :r]
    return float(np.sum((basis(a).T @ basis(b)) ** 2) / r)


@pytest.mark.parametrize("space", ["output", "input"])
def test_similarity_equals_a_direct_float64_computation(space):
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(24, 40, generator=g), torch.randn(24, 40, generator=g)
    for r in (1, 4, 16):
        assert subspace_similarity(a, b, r, space) == pytest.approx(direct(a, b, r, space), abs=1e-12)


def test_identical_weights_give_one_and_random_ones_about_r_over_d():
    g = torch.Generator().manual_seed(0)
    d, r = 256, 16
    w = torch.randn(d, d, generator=g)
    assert subspace_similarity(w, w.clone(), r) == pytest.approx(1.0, abs=1e-9)
    randoms = [subspace_similarity(torch.randn(d, d, generator=g), torch.randn(d, d, generator=g), r)
               for _ in range(8)]
    assert np.mean(randoms) == pytest.approx(r / d, rel=0.3)
    # the output and input spaces of a (out, in) weight are told apart: a weight and its transpose swap them
    x = torch.randn(32, 48, generator=g)
    assert subspace_similarity(x.T.contiguous(), x.T.contiguous(), 4, "input") == pytest.approx(1.0)
    with pytest.raises(ValueError, match="differ in size"):
        subspace_similarity(x, x.T.contiguous(), 4, "output")


def test_qkv_report_has_every_block_branch_space_and_usable_rank():
    model = tiny_transformer(seed=0)  # width 32, text width 16 (num_layers 2)
    entries = qkv_similarity(model, [1, 4, 16, 64])
    keys = {(e["branch"], e["space"], e["rank"]) for e in entries}
    # 64 does not fit the 32-wide spaces; the text branch's input space is 16 wide (16 is the whole space)
    assert keys == {("vision", s, r) for s in ("output", "input") for r in (1, 4, 16)} | \
        {("text", "output", r) for r in (1, 4, 16)} | {("text", "input", r) for r in (1, 4)}
    entry = next(e for e in entries if (e["branch"], e["space"], e["rank"]) == ("vision", "output", 4))
    assert [b["block"] for b in entry["blocks"]] == [0, 1] and entry["chance"] == 4 / 32
    attn = model.transformer_blocks[1].attn1
    assert entry["blocks"][1]["q_k"] == pytest.approx(direct(attn.to_q.weight.detach(), attn.to_k.weight.detach(), 4,
                                                             "output"), abs=1e-12)


def test_an_update_inside_the_base_q_subspace_is_found_there():
    model = tiny_transformer(seed=0)
    inject_triplet(model, TripletSpec(rank=4, alpha=4.0))
    attn = model.transformer_blocks[0].attn1
    u, _, _ = torch.linalg.svd(attn.to_q.base_layer.weight.detach())
    layer = attn.to_q
    with torch.no_grad():  # the relation LoRA's update spans the top-4 output directions of the base Q
        layer.lora_B["relation"].weight.copy_(u[:, :4])
        layer.lora_A["relation"].weight.copy_(torch.randn(4, 32, generator=torch.Generator().manual_seed(2)))
    entries = adapter_similarity(model, [1, 4, 16])
    found = [e for e in entries if e["adapter"] == "relation" and e["block"] == 0 and e["module"] == "q"
             and e["branch"] == "vision" and e["space"] == "output"]
    assert {e["rank"] for e in found} == {1, 4}  # ranks above the LoRA's rank are left out
    top = next(e for e in found if e["rank"] == 4)
    assert top["q"] == pytest.approx(1.0, abs=1e-9) and top["k"] < 0.9
    # untrained adapters (B = 0 at injection) span nothing and are not reported
    assert {e["adapter"] for e in entries} == {"relation"}

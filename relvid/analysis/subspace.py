"""Normalized subspace similarity of the Q, K and V weights (the paper's Fig. 5b) and of LoRA updates.

For two matrices with top-r singular subspaces U_a^r and U_b^r (orthonormal columns, shape (d, r)),
phi(a, b, r) = ||U_a^r^T U_b^r||_F^2 / r lies in [0, 1]: 1 when the subspaces coincide, about r / d
for random ones. A torch ``nn.Linear`` weight is (out, in): the "output" space is spanned by the left
singular vectors of that weight, the "input" space by its right singular vectors (the left ones of
the paper's W in ``Q = X W``).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

SPACES = ("output", "input")
BRANCH_MODULES = {  # inside transformer_blocks.{i}.attn1: the Q, K, V projections of each branch
    "vision": {"q": "to_q", "k": "to_k", "v": "to_v", "out": "to_out.0"},
    "text": {"q": "add_q_proj", "k": "add_k_proj", "v": "add_v_proj", "out": "to_add_out"},
}
PAIRS = (("q", "k"), ("q", "v"), ("k", "v"))


def singular_bases(weight: Tensor) -> dict[str, Tensor]:
    """{"output": U (out, k), "input": V (in, k)} of a (out, in) weight in float64 on its device, columns by
    decreasing singular value (k = min(out, in))."""
    u, _, vh = torch.linalg.svd(weight.detach().to(torch.float64), full_matrices=False)
    return {"output": u, "input": vh.T}


def top_subspace(weight: Tensor, rank: int, space: str) -> Tensor:
    """(d, rank) orthonormal basis of the top-`rank` singular subspace of a (out, in) weight, in float64."""
    if space not in SPACES:
        raise ValueError(f"space must be one of {SPACES}, got {space!r}")
    basis = singular_bases(weight)[space]
    if rank > basis.shape[1]:
        raise ValueError(f"rank {rank} exceeds the {basis.shape[1]} singular vectors of a {tuple(weight.shape)} "
                         "weight")
    return basis[:, :rank]


def basis_similarity(ua: Tensor, ub: Tensor, rank: int) -> float:
    """||U_a[:, :r]^T U_b[:, :r]||_F^2 / r for two orthonormal bases of one space."""
    if ua.shape[0] != ub.shape[0]:
        raise ValueError(f"the spaces differ in size: {ua.shape[0]} vs {ub.shape[0]}")
    return float((ua[:, :rank].T @ ub[:, :rank].to(ua.device)).square().sum().cpu() / rank)


def subspace_similarity(a: Tensor, b: Tensor, rank: int, space: str = "output") -> float:
    """phi(a, b, rank) = ||U_a^T U_b||_F^2 / rank of the two weights' top-`rank` subspaces in `space`."""
    return basis_similarity(top_subspace(a, rank, space), top_subspace(b, rank, space), rank)


def space_dim(weight: Tensor, space: str) -> int:
    return int(weight.shape[0] if space == "output" else weight.shape[1])


def usable_ranks(ranks: Iterable[int], dim: int) -> list[int]:
    """The ranks below the space's size (at r = d every pair of subspaces is the whole space)."""
    return sorted({int(r) for r in ranks if 1 <= r < dim})


def base_weight(layer: nn.Module) -> Tensor:
    """The frozen weight of a projection, whether or not peft wrapped it in a LoRA layer."""
    inner = getattr(layer, "base_layer", layer)
    return inner.weight


def block_weights(transformer: nn.Module) -> list[dict[str, dict[str, Tensor]]]:
    """Per block: {branch: {"q"|"k"|"v"|"out": weight (out, in)}} for the branches the block has."""
    blocks = []
    for block in transformer.transformer_blocks:
        attn = block.attn1
        entry = {}
        for branch, names in BRANCH_MODULES.items():
            layers = {p: attn.get_submodule(n) for p, n in names.items() if _has(attn, n)}
            if {"q", "k", "v"} <= set(layers):
                entry[branch] = {p: base_weight(m) for p, m in layers.items()}
        blocks.append(entry)
    return blocks


def _has(module: nn.Module, name: str) -> bool:
    try:
        module.get_submodule(name)
    except AttributeError:
        return False
    return True


def qkv_similarity(transformer: nn.Module, ranks: Iterable[int], progress: bool = False) -> list[dict]:
    """Q-K, Q-V and K-V similarity per block, branch, space and rank: the entries of the JSON report."""
    from tqdm.auto import tqdm

    blocks = block_weights(transformer)
    table: dict[tuple[str, str, int], list[dict]] = {}  # (branch, space, rank) -> rows
    chance: dict[tuple[str, str, int], float] = {}
    for i, weights in enumerate(tqdm(blocks, desc="blocks (SVD)", disable=not progress)):
        for branch, w in weights.items():
            bases = {p: singular_bases(w[p]) for p in "qkv"}
            for space in SPACES:
                dim = min(space_dim(w[p], space) for p in "qkv")
                if len({space_dim(w[p], space) for p in "qkv"}) != 1:
                    continue
                for r in usable_ranks(ranks, dim):
                    row = {"block": i, **{f"{a}_{b}": basis_similarity(bases[a][space], bases[b][space], r)
                                          for a, b in PAIRS}}
                    table.setdefault((branch, space, r), []).append(row)
                    chance[(branch, space, r)] = r / dim
    order = {b: n for n, b in enumerate(BRANCH_MODULES)} | {s: n for n, s in enumerate(SPACES)}
    keys = sorted(table, key=lambda k: (order[k[0]], order[k[1]], k[2]))
    return [{"branch": b, "space": s, "rank": r, "chance": chance[(b, s, r)], "blocks": table[(b, s, r)]}
            for b, s, r in keys]


def lora_update(layer: nn.Module, adapter: str) -> Tensor:
    """scale * B @ A of one peft LoRA layer's adapter: the (out, in) change it makes to the weight when active."""
    a = layer.lora_A[adapter].weight.detach().double()  # (r, in)
    b = layer.lora_B[adapter].weight.detach().double()  # (out, r)
    # activate() may have zeroed the scale of an inactive adapter (hmt.unselected=zero_grad): use the injected one
    scale = layer.__dict__.get("_relvid_scales", layer.scaling).get(adapter, layer.scaling[adapter])
    return float(scale) * (b @ a)


def adapter_similarity(transformer: nn.Module, ranks: Iterable[int]) -> list[dict]:
    """For each injected adapter and module it sits on: the similarity of its update's top-r subspace to
    the base Q, K, V (and out) weights of the same block and branch, per space; None where sizes differ."""
    from peft.tuners.lora import LoraLayer

    blocks = block_weights(transformer)
    module_of = {n: (b, p) for b, names in BRANCH_MODULES.items() for p, n in names.items()}
    cached: dict[tuple[int, str, str], dict[str, Tensor]] = {}
    entries = []
    for name, layer in transformer.named_modules():
        if not isinstance(layer, LoraLayer) or ".attn1." not in name:
            continue
        index = int(name.split("transformer_blocks.")[1].split(".")[0])
        branch, proj = module_of[name.split(".attn1.", 1)[1]]
        for adapter in layer.lora_A:
            update = lora_update(layer, adapter)
            if not bool(update.abs().max() > 0):
                continue  # an adapter that never trained (lora.frozen) spans nothing
            lora_rank = layer.lora_A[adapter].weight.shape[0]
            mine = singular_bases(update)
            for space in SPACES:
                for r in usable_ranks(ranks, min(lora_rank + 1, space_dim(update, space))):
                    row = {"adapter": adapter, "block": index, "branch": branch, "module": proj, "space": space,
                           "rank": r}
                    for p, w in blocks[index][branch].items():
                        if space_dim(w, space) != space_dim(update, space):
                            row[p] = None
                            continue
                        if (index, branch, p) not in cached:
                            cached[(index, branch, p)] = singular_bases(w)
                        row[p] = basis_similarity(mine[space], cached[(index, branch, p)][space], r)
                    entries.append(row)
    return entries

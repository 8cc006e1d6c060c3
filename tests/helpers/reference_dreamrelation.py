"""Transcription of the DreamRelation reference training step and sampler, for parity tests.

Source: github.com/ali-vilab/DreamRelation at commit 4fa0920dc5154707067f90465f211d32d83ecc95
(a fork of genmo's Mochi LoRA fine-tuner). Every function cites "file:lines" at that commit; paths
are relative to the repository root. Written from a reading of the code, not copied: the backbone
is diffusers' MochiTransformer3DModel (the same weights relvid uses), the LoRA machinery, losses,
memory bank, optimizer, schedule and sampler follow the reference. Facts and differences from relvid:
REFERENCE_NOTES.md beside this file. No relvid training code is imported.

Conventions transcribed (relvid must match them where a parity test compares):
  z_sigma = (1 - sigma) * z0 + sigma * noise, target = z0 - noise      (demos/fine_tuner/train.py:452-454)
  transformer timestep = (1 - sigma) * 1000 in float32                 (asymm_models_joint_dreamrelation.py:689,
                                                                        pipelines.py:222, layers.py:55-58)
  Euler z += (sigma_i - sigma_{i+1}) * v, CFG v_u + g (v_c - v_u)      (pipelines.py:482-512)
"""

from __future__ import annotations

import math
from collections import deque

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

REFERENCE_COMMIT = "4fa0920dc5154707067f90465f211d32d83ecc95"
VISION = ("to_q", "to_k", "to_v", "to_out.0")
TEXT = ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
# Relation / subject projections per placement; configs/*/example.yaml:36-38 give QK/V via
# q_lora_names / k_lora_names / v_lora_names (pipelines.py:749-751, 792-794).
PLACEMENTS = {"QK/V": ("qk", "v"), "Q/KV": ("q", "kv"), "KV/Q": ("kv", "q"), "V/QK": ("v", "qk")}
_PROJ = {"to_q": "q", "to_k": "k", "to_v": "v", "add_q_proj": "q", "add_k_proj": "k", "add_v_proj": "v"}


class ReferenceLoRALinear(nn.Module):
    """A frozen nn.Linear plus named LoRAs.

    Q/K/V: src/genmo/mochi_preview/dit/joint_model/lora_dreamrelation.py:41-134 (one LoRA per name,
    fp32 at creation :64-72, scaling alpha/r :74, A kaiming_uniform(a=sqrt 5) and B zeros :84-91,
    inactive names computed then MULTIPLIED BY 0 :122-132, so they get zero grads, not None).
    Output projections ("ffn"): src/genmo/mochi_preview/dit/joint_model/lora.py:41-113, a single
    unnamed LoRA that ignores forward_lora_name (always active, :99-111), same init (:73-79).
    Merge for inference adds B @ A * scaling into the base weight (lora_dreamrelation.py:105-111 for
    test_lora_names only; lora.py:92-97 always) and then skips every LoRA branch (:118).
    """

    def __init__(self, base: nn.Linear, names: list[str], rank: int, alpha: float, always_on: bool = False,
                 branch: str = "vision", lora_dtype: torch.dtype = torch.float32,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.base = base
        base.weight.requires_grad_(False)
        if base.bias is not None:
            base.bias.requires_grad_(False)
        self.names, self.rank, self.scaling = list(names), rank, alpha / rank
        self.always_on, self.branch = always_on, branch
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        for name in self.names:  # created in fp32, A kaiming then B zero, in name order
            a = torch.zeros(rank, base.in_features, dtype=torch.float32, device=base.weight.device)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
            b = torch.zeros(base.out_features, rank, dtype=torch.float32, device=base.weight.device)
            self.lora_A[name] = nn.Parameter(a.to(lora_dtype))
            self.lora_B[name] = nn.Parameter(b.to(lora_dtype))
        self.active: set[str] = set()
        self.saved: Tensor | None = None  # the base weight before a merge; None = unmerged

    def forward(self, x: Tensor) -> Tensor:
        result = self.base(x)
        if self.saved is not None:  # lora_dreamrelation.py:118 / lora.py:103: merged -> no LoRA branch
            return result
        for name in self.names:
            a, b = self.lora_A[name], self.lora_B[name]
            c = F.linear(F.linear(x.to(a.dtype), a), b) * self.scaling  # x @ A^T @ B^T * scaling
            if not (self.always_on or name in self.active):
                c = 0 * c  # lora_dreamrelation.py:128-129
            result = result + c.to(result.dtype)
        return result

    @torch.no_grad()
    def merge(self, test_lora_names: tuple[str, ...]) -> None:
        """model.eval() in the reference: W += B @ A * scaling for test names (and the ffn LoRA)."""
        if self.saved is not None:
            return
        self.saved = self.base.weight.detach().clone()
        for name in self.names:
            if self.always_on or name in test_lora_names:
                self.base.weight += (self.lora_B[name] @ self.lora_A[name]) * self.scaling

    @torch.no_grad()
    def unmerge(self) -> None:
        # The reference subtracts the product again (:99-104), which drifts in bf16; we restore exactly.
        if self.saved is not None:
            self.base.weight.copy_(self.saved)
            self.saved = None


def _adapter_names(module: str, placement: str) -> tuple[list[str], bool]:
    if module in ("to_out.0", "to_add_out"):
        return ["ffn"], True
    relation, subject = PLACEMENTS[placement]
    names = (["relation"] if _PROJ[module] in relation else []) + (
        ["subject1", "subject2"] if _PROJ[module] in subject else [])
    return names, False


def attach_reference_loras(transformer: nn.Module, rank: int = 16, alpha: float = 16.0, placement: str = "QK/V",
                           lora_dtype: torch.dtype = torch.float32, generator: torch.Generator | None = None,
                           ) -> tuple[list[nn.Parameter], dict[str, nn.Parameter]]:
    """Wrap every attn1 projection of every block (pipelines.py:718-808 splits qkv_x/qkv_y into
    to_{q,k,v}_{x,y} LoraLinears; asymm_models_joint_dreamrelation.py:113-121 puts lora.py LoRAs on
    proj_x/proj_y; the last block has no proj_y, :121). rank/alpha 16/16 (example.yaml:33-34, 40-41).

    Init order here: block-major, modules in VISION+TEXT order; the reference initialises proj LoRAs
    at model construction and Q/K/V LoRAs later, so a parity test should copy weights, not RNG.
    Returns the LoRA params in that order and {adapter/transformer_blocks.i.attn1.module.lora_X.weight}.
    """
    ordered, named = [], {}
    for i, block in enumerate(transformer.transformer_blocks):
        attn = block.attn1
        for module in VISION + TEXT:
            base = attn.to_out[0] if module == "to_out.0" else getattr(attn, module, None)
            if base is None:
                continue
            names, always_on = _adapter_names(module, placement)
            if not names:
                continue
            wrapped = ReferenceLoRALinear(base, names, rank, alpha, always_on,
                                          "text" if module in TEXT else "vision", lora_dtype, generator)
            if module == "to_out.0":
                attn.to_out[0] = wrapped
            else:
                setattr(attn, module, wrapped)
            for name in names:
                for ab, p in (("A", wrapped.lora_A[name]), ("B", wrapped.lora_B[name])):
                    ordered.append(p)
                    named[f"{name}/transformer_blocks.{i}.attn1.{module}.lora_{ab}.weight"] = p
    return ordered, named


def reference_lora_modules(transformer: nn.Module) -> list[ReferenceLoRALinear]:
    return [m for m in transformer.modules() if isinstance(m, ReferenceLoRALinear)]


def reference_cast_dit(transformer: nn.Module, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """pipelines.py:611-621 (applied by train.py:261-263): every Linear (LoRA weights included, the
    reference's LoraLinear IS an nn.Linear) and the patch Conv2d go to bf16; norms stay fp32."""
    for m in transformer.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d, ReferenceLoRALinear)):
            m.to(dtype)
    return transformer


def set_reference_selection(transformer: nn.Module, selection: str) -> list[str]:
    """train.py:345-353: one of train_lora_names (example.yaml:8) drawn by Python random.choice;
    "relation" -> forward_lora_name [relation, subject1, subject2]; "subjectK" -> [subjectK].
    The ffn LoRA ignores the list (always on). Anything not listed is multiplied by 0."""
    forward = {"relation": ["relation", "subject1", "subject2"], "subject1": ["subject1"],
               "subject2": ["subject2"]}[selection]
    for m in reference_lora_modules(transformer):
        m.active = set(forward)
    return forward + ["ffn"]


def reference_loss_mask(subject_masks: Tensor, selection: str, lam: float = 1.0) -> Tensor:
    """train.py:350-363. The reference's mask is (F, S, H, W) (dataset_dreamrelation.py:153-160);
    here subject-major (2, F, H, W) or relvid's (1, 2, F, H, W). relation: SUM of the subjects."""
    m = subject_masks[0] if subject_masks.dim() == 5 else subject_masks  # (2, F, H, W)
    mask = m.sum(dim=0) if selection == "relation" else m[0 if selection == "subject1" else 1]
    return mask * lam  # relation/subject*_loss_mask_lam default 1 (:354-363)


def reference_losses(pred: Tensor, target: Tensor, mask: Tensor, lambda_m: float = 50.0,
                     ori_loss_lam: float = 1.0) -> Tensor:
    """train.py:468-476 (combine_mask, example.yaml:5-6): ori * MSE(pred, target) + lambda_m *
    MSE(pred * M, target * M), both F.mse_loss mean reductions over all elements, in float32.
    mask (F, H, W) broadcasts as (1, 1, F, H, W) as in the reference; (B, F, H, W) is unsqueezed."""
    m = mask.float() if mask.dim() == 3 else mask.float().unsqueeze(1)
    p, t = pred.float(), target.float()
    return ori_loss_lam * F.mse_loss(p, t) + lambda_m * F.mse_loss(p * m, t * m)


class ReferenceBank:
    """demos/fine_tuner/buffer.py:4-26: two deques, positives (one entry per video: its F-1 frame
    differences, maxlen positive_buffer_size=10) and negatives (one entry per single frame, maxlen
    negative_buffer_size=64), example.yaml:11-12. get_* draw torch.randperm(len(buffer))[:n] with the
    GLOBAL torch CPU generator (here: `generator`, None = global); entries keep no clip identity."""

    def __init__(self, positive_size: int = 10, negative_size: int = 64) -> None:
        self.positives: deque[Tensor] = deque(maxlen=positive_size)  # each (F-1, C)
        self.negatives: deque[Tensor] = deque(maxlen=negative_size)  # each (C,)

    def push(self, dynamics: Tensor, frames: Tensor) -> None:
        """train.py:522-523: one positive (F-1, C) then the F frames (C,) in frame order, detached."""
        self.positives.append(dynamics.detach())
        for f in frames.detach():
            self.negatives.append(f)

    @staticmethod
    def _draw(buf: deque, n: int, generator, indices) -> tuple[list[Tensor], list[int]]:
        if indices is None:  # buffer.py:17-19 / 23-25: randperm even when n == 0
            indices = torch.randperm(len(buf), generator=generator)[:min(n, len(buf))].tolist()
        return [buf[i] for i in indices], list(indices)

    def get_positives(self, n, generator=None, indices=None):
        return self._draw(self.positives, n, generator, indices)

    def get_negatives(self, n, generator=None, indices=None):
        return self._draw(self.negatives, n, generator, indices)


def reference_contrastive_loss(anchors: Tensor, positives: Tensor, negatives: Tensor, tau: float = 0.07) -> Tensor:
    """demos/fine_tuner/loss.py:5-34: anchors (N, D), positives (N, P, D), negatives (N, Q, D);
    L2-normalize, logits = cos / tau, mean over N of logsumexp(all) - logsumexp(positives)."""
    a = F.normalize(anchors, p=2, dim=1)
    pn = F.normalize(torch.cat([positives, negatives], dim=1), p=2, dim=2)
    logits = torch.einsum("bd,bkd->bk", a, pn) / tau
    return torch.mean(torch.logsumexp(logits, dim=1) - torch.logsumexp(logits[:, :positives.shape[1]], dim=1))


def reference_rcl(pred: Tensor, bank: ReferenceBank, n_pos: int = 1, n_neg: int = 10, tau: float = 0.07,
                  generator: torch.Generator | None = None, choices: dict | None = None,
                  push: bool = True) -> tuple[Tensor | None, dict]:
    """train.py:478-535 for a batch of one video; pred (1, C, F, H, W), the model output.

    Draws, in this order, all torch.randperm on `generator` (reference: global CPU generator):
      1. perm = randperm(F-1): the anchor order (train.py:489);
      2. for each anchor a in 0..F-2: randperm(len(positive buffer))[:n_pos] (:497); if the positive
         buffer is empty -> `continue` (no further draw for that anchor, and no loss this step);
         else randperm(len(negative buffer))[:max(n_neg - F, 0)] (:510), drawn even when that is 0.
    `choices` = {"perm": [...], "pos": [[...] per anchor], "neg": [[...] per anchor]} replaces the
    draws; info["choices"] returns what was used. Positives of anchor a: bank entries at frame
    difference perm[a] (:501), no same-clip exclusion; negatives: ALL F current frames (with grad)
    then the bank draws (:508-516). The bank is pushed after the draws (:522-523), before backward.
    """
    feats = pred[0].float().permute(1, 0, 2, 3).mean(dim=(-2, -1))  # (F, C), :483-484
    dyn = feats[1:] - feats[:-1]  # (F-1, C), :487
    n_f = feats.shape[0]
    perm = list(choices["perm"]) if choices else torch.randperm(n_f - 1, generator=generator).tolist()
    used = {"perm": perm, "pos": [], "neg": []}
    pos_rows, neg_rows = [], []
    for a in range(n_f - 1):
        pos, pi = bank.get_positives(n_pos, generator, choices["pos"][a] if choices else None)
        used["pos"].append(pi)
        if len(pos) < 1:
            continue
        pos_rows.append(torch.stack(pos)[:, perm[a]])  # (P, C)
        old, ni = bank.get_negatives(max(n_neg - n_f, 0), generator, choices["neg"][a] if choices else None)
        used["neg"].append(ni)
        neg_rows.append(torch.cat([feats, torch.stack(old)]) if old else feats)  # (F + n', C)
    if push:
        bank.push(dyn, feats)
    info = {"choices": used, "frames": feats.detach(), "dynamics": dyn.detach()}
    if not pos_rows:
        return None, info
    loss = reference_contrastive_loss(dyn[perm], torch.stack(pos_rows), torch.stack(neg_rows), tau)
    return loss, info


def reference_optimizer(params, lr: float = 2e-4, weight_decay: float = 0.01) -> torch.optim.AdamW:
    """train.py:290 with example.yaml:23-25: AdamW(model.parameters(), lr=2e-4, weight_decay=0.01);
    betas (0.9, 0.999), eps 1e-8, amsgrad False are torch defaults. Frozen params have grad None."""
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def reference_lr_lambda(step: int, warmup_steps: int = 200, total_steps: int = 3000, current_step: int = 0) -> float:
    """train.py:153-159 (cosine_annealing, the default :311): step/warmup, then 0.5(1 + cos(pi (s - w)/(T - w))).
    Optimizer step k uses lr * lambda(k): k = 0 has lr 0. T = training.num_steps = 3000 (example.yaml:46-50)."""
    s = step + current_step
    if s < warmup_steps:
        return float(s) / float(max(1, warmup_steps))
    return float(0.5 * (1 + np.cos(np.pi * (s - warmup_steps) / (total_steps - warmup_steps))))


def reference_scheduler(optimizer, warmup_steps: int = 200, total_steps: int = 3000, current_step: int = 0):
    """train.py:146-165, 312-318: LambdaLR, stepped once after every optimizer step (:556)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: reference_lr_lambda(s, warmup_steps, total_steps, current_step))


def _forward(transformer, z: Tensor, sigma: Tensor, embeds: Tensor, mask: Tensor, autocast_dtype) -> Tensor:
    """The DiT call: timestep (1 - sigma) * 1000 in float32 (t_embedder(1 - sigma), timestep_scale 1000).
    Under CUDA autocast bf16 as train.py:456 / pipelines.py:484-494; on the CPU only for a non-fp32
    (reference_cast_dit) model, which diffusers cannot run without it."""
    dtype = transformer.patch_embed.proj.weight.dtype  # cast_dit leaves norms/pos_frequencies fp32
    timestep = (1 - sigma.float()) * 1000
    use = autocast_dtype is not None and (z.device.type == "cuda" or dtype != torch.float32)
    with torch.autocast(z.device.type, dtype=autocast_dtype or torch.bfloat16, enabled=use):
        return transformer(hidden_states=z.to(dtype), encoder_hidden_states=embeds.to(dtype), timestep=timestep,
                           encoder_attention_mask=mask.bool(), return_dict=False)[0]


def reference_train_step(transformer: nn.Module, batch: dict, selection: str, bank: ReferenceBank | None,
                         optimizer: torch.optim.Optimizer, scheduler=None, *, lambda_1: float = 0.01,
                         lambda_m: float = 50.0, n_pos: int = 1, n_neg: int = 10, tau: float = 0.07,
                         rcl_generator: torch.Generator | None = None, rcl_choices: dict | None = None,
                         autocast_dtype: torch.dtype | None = torch.bfloat16, keep_grads: bool = False) -> dict:
    """One iteration of train.py:385-557 (batch size 1), every random draw passed in.

    batch: z0 (1, C, F, H, W) = the posterior sample noise*exp(logvar/2)+mean of RAW latents
    (latent_dist.py:18-32, train.py:367-368); noise (eps, :372); sigma (1,) ~ U(0, 1) float32
    (:373); text_embeds (1, L, D), text_mask (1, L); subject_masks (2, F, H, W) or (1, 2, F, H, W);
    caption_dropped: bool (random.random() < 0.1, :375-377: embeds AND mask zeroed).
    Reference draw order per step: random.choice(selection), randn (posterior), randn_like (eps),
    rand (sigma), random.random() (dropout), then the RCL randperms (reference_rcl); nothing seeded.
    """
    embeds, mask = batch["text_embeds"], batch["text_mask"].bool()
    if batch.get("caption_dropped", False):
        embeds, mask = torch.zeros_like(embeds), torch.zeros_like(mask)
    set_reference_selection(transformer, selection)
    with torch.no_grad():  # train.py:452-454
        z0, noise, sigma = batch["z0"].float(), batch["noise"].float(), batch["sigma"].float()
        s = sigma[:, None, None, None, None]
        z_sigma = (1 - s) * z0 + s * noise
        target = z0 - noise
        loss_mask = reference_loss_mask(batch["subject_masks"], selection)
    pred = _forward(transformer, z_sigma, sigma, embeds, mask, autocast_dtype)
    loss_rec = reference_losses(pred, target, loss_mask, lambda_m)
    loss, loss_rcl, info = loss_rec, None, {}
    if bank is not None:  # use_relational_contrastive_learning: every step, whatever the selection
        loss_rcl, info = reference_rcl(pred, bank, n_pos, n_neg, tau, rcl_generator, rcl_choices)
        if loss_rcl is not None:
            loss = loss + loss_rcl * lambda_1  # :535, relational_contrastive_learning_lam 0.01
    loss.backward()  # :537
    if not mask.any():
        # With an all-False mask the reference drops the text tokens before the text projections
        # (asymm_models_joint_dreamrelation.py:200-211) and the text output is zeros that reach no
        # loss (:328-330, final layer uses x only): every text-branch LoRA gets grad None, so AdamW
        # skips it. diffusers projects all tokens and slices them away (zero grads) -> emulate None.
        for m in reference_lora_modules(transformer):
            if m.branch == "text":
                for p in list(m.lora_A.values()) + list(m.lora_B.values()):
                    p.grad = None
    grads = None
    if keep_grads:
        grads = {id(p): (None if p.grad is None else p.grad.detach().clone())
                 for g in optimizer.param_groups for p in g["params"]}
    # grad_clip 0.0 (example.yaml:53) is falsy; clipping is asserted off for LoRA anyway (:545-549).
    lr = optimizer.param_groups[0]["lr"]
    optimizer.step()  # :555-557
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad()  # set_to_none=True (torch >= 2.0)
    return {"loss": loss.detach(), "loss_rec": loss_rec.detach(), "loss_rcl": None if loss_rcl is None
            else loss_rcl.detach(), "lr": lr, "pred": pred.detach(), "rcl_info": info, "grads": grads}


def linear_quadratic_schedule(num_steps: int, threshold_noise: float = 0.025, linear_steps: int | None = None
                              ) -> list[float]:
    """pipelines.py:53-67, in Python floats: num_steps + 1 sigmas from 1.0 to 0.0."""
    if linear_steps is None:
        linear_steps = num_steps // 2
    lin = [i * threshold_noise / linear_steps for i in range(linear_steps)]
    diff = linear_steps - threshold_noise * num_steps
    quad_steps = num_steps - linear_steps
    qc = diff / (linear_steps * quad_steps ** 2)
    lc = threshold_noise / linear_steps - 2 * diff / (quad_steps ** 2)
    const = qc * linear_steps ** 2
    quad = [qc * i ** 2 + lc * i + const for i in range(linear_steps, num_steps)]
    return [1.0 - x for x in lin + quad + [1.0]]


VAE_MEAN = [-0.06730895953510081, -0.038011381506090416, -0.07477820912866141, -0.05565264470995561,
            0.012767231469026969, -0.04703542746246419, 0.043896967884726704, -0.09346305707025976,
            -0.09918314763016893, -0.008729793427399178, -0.011931556316503654, -0.0321993391887285]
VAE_STD = [0.9263795028493863, 0.9248894543193766, 0.9393059390890617, 0.959253732819592, 0.8244560132752793,
           0.917259975397747, 0.9294154431013696, 1.3720942357788521, 0.881393668867029, 0.9168315692124348,
           0.9185249279345552, 0.9274757570805041]  # vae_stats.py:4-37


@torch.no_grad()
def reference_sample(transformer: nn.Module, text_embeds: Tensor, text_mask: Tensor, noise: Tensor,
                     steps: int = 64, guidance: float = 6.0, null_embeds: Tensor | None = None,
                     null_mask: Tensor | None = None, threshold_noise: float = 0.025,
                     test_lora_names: tuple[str, ...] = ("relation",), merge: bool = True,
                     autocast_dtype: torch.dtype | None = torch.bfloat16, to_vae_latents: bool = False) -> Tensor:
    """pipelines.py:436-515 (sample_model, batch_cfg False as demos/cli.py:137) with the reference's
    inference LoRAs: model.eval() merges test_lora_names (["relation"], example.yaml:39, cli
    --test_lora_names relation) and the always-on ffn LoRA into the base weights (lora*.py merge);
    subject LoRAs are dropped. noise (1, C, F, H, W): the reference draws torch.randn on the device
    after torch.manual_seed(seed) (:437-439, 464-468; its `generator` is unused).

    Null prompt: negative_prompt "" is tokenised, then its ids zeroed and its mask set all-False
    (pipelines.py:378-381); T5 still runs, but with an all-False mask the DiT ignores the features
    (no text tokens, :200-211; AttentionPool pools only its mean token, utils.py:54-95), so zero
    embeddings + all-False mask is exactly equivalent. Cond and uncond are separate forwards
    (:492-494), CFG in float32 (:495-498), Euler z += dsigma * v (:501-512).
    Returns DiT latents; to_vae_latents applies dit_latents_to_vae_latents (:515, vae_stats.py:40-55).
    """
    if null_embeds is None:
        null_embeds, null_mask = torch.zeros_like(text_embeds), torch.zeros_like(text_mask, dtype=torch.bool)
    sched = linear_quadratic_schedule(steps, threshold_noise)
    mods = reference_lora_modules(transformer)
    was_training, was_active = transformer.training, [m.active for m in mods]
    transformer.eval()
    if merge:
        for m in mods:
            m.merge(test_lora_names)
    else:  # unmerged equivalent: only test names (+ ffn) in the forward
        for m in mods:
            m.active = set(test_lora_names)
    try:
        z = noise.float().clone()
        for i in range(steps):
            sigma = sched[i]
            dsigma = sigma - sched[i + 1]
            s = torch.full([z.shape[0]], sigma, device=z.device)  # float32, pipelines.py:508
            out_cond = _forward(transformer, z, s, text_embeds, text_mask, autocast_dtype).to(z)
            out_uncond = _forward(transformer, z, s, null_embeds, null_mask, autocast_dtype).to(z)
            pred = out_uncond + guidance * (out_cond - out_uncond)
            z = z + dsigma * pred
    finally:
        for m, active in zip(mods, was_active, strict=True):
            m.unmerge()
            m.active = active
        transformer.train(was_training)
    if to_vae_latents:
        mean = torch.tensor(VAE_MEAN, device=z.device)[:, None, None, None]
        std = torch.tensor(VAE_STD, device=z.device)[:, None, None, None]
        z = z * std.to(z) + mean.to(z)
    return z

"""RelationModule: the DreamRelation training step on a Mochi backbone, and nothing else."""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from relvid.errors import UserError
from relvid.losses.contrastive import rcl_loss_for_batch
from relvid.losses.flow_matching import (
    masked_flow_loss,
    model_timestep,
    noisy_latents,
    relation_mask,
    sample_sigmas,
    velocity_target,
)
from relvid.models.attention import apply_speed_config
from relvid.models.backbone import load_transformer
from relvid.models.lora import (
    SELECTIONS,
    TripletSpec,
    activate,
    adapter_names,
    adapter_state_dict,
    adapters_for_selection,
    cast_lora,
    inference_adapters,
    inject_triplet,
    lora_parameters,
)
from relvid.models.motion_inversion import (
    METHOD,
    MotionSpec,
    inject_motion_embeddings,
    is_motion_spec_dict,
    motion_embeddings,
    motion_parameters,
    motion_state,
    spec_for,
)
from relvid.models.reversion import ATTR as TOKEN_ATTR
from relvid.models.reversion import METHOD as REVERSION
from relvid.models.reversion import (
    ReVersionError,
    ReVersionSpec,
    build_token,
    draw_positives,
    importance_sigmas,
    is_reversion_spec_dict,
    steering_loss,
    steering_terms,
)
from relvid.seeding import derive_seed
from relvid.training.safety import check_finite_gradients, check_finite_loss
from relvid.training.strategies import base_load_device

CHECKPOINT_FORMAT = 1

# Independent random streams, each a pure function of (seed, step[, rank][, micro-batch]): resuming at any
# step and every rank of a multi-process run reproduce them exactly.
_SELECT_STREAM = 1
_NOISE_STREAM = 2
_RCL_STREAM = 3
_GLOBAL_STREAM = 4
_STEER_STREAM = 5


class CheckpointMismatchError(UserError, RuntimeError):
    """A checkpoint whose adapters do not fit the configured LoRA triplet."""


def spec_from_config(cfg: DictConfig) -> TripletSpec:
    lora = cfg.lora
    return TripletSpec(placement=lora.placement, rank=int(lora.rank), alpha=float(lora.alpha),
                       dropout=float(lora.dropout), branches=lora.branches)


def wants_gpu(cfg: DictConfig) -> bool:
    accel = str(cfg.trainer.accelerator)
    return accel in ("gpu", "cuda") or (accel == "auto" and torch.cuda.is_available())


def training_speed(cfg: DictConfig) -> DictConfig:
    """The speed section the transformer is set up with: cfg.speed, except that trainer.deterministic on a
    GPU turns sdpa_backend=auto into efficient, the kernel whose backward runs deterministically under
    torch.use_deterministic_algorithms (cuDNN's and flash's backward need not)."""
    speed = cfg.speed
    if (cfg.trainer.deterministic and wants_gpu(cfg) and speed.attention != "diffusers"
            and speed.sdpa_backend == "auto"):
        speed = OmegaConf.merge(speed, {"sdpa_backend": "efficient"})
    return speed


def step_seed(seed: int, step: int, rank: int, stream: int, micro: int = 0) -> int:
    """The seed of one kind of draw (`stream`) in micro-batch `micro` of optimizer step `step` on `rank`.

    Micro-batch 0 keeps the key (seed, step, rank, stream) that every step used before gradient accumulation
    existed, so a run with trainer.accumulate_grad_batches=1 draws exactly as before; the later micro-batches of
    a step add their index (before the stream tag), so each draws its own noise, sigma, RCL and steering draws.
    """
    if micro == 0:
        return derive_seed(seed, step, rank, stream)
    return derive_seed(seed, step, rank, micro, stream)


def training_noise(shape: torch.Size | tuple[int, ...], seed: int, step: int, rank: int,
                   device: torch.device | str = "cpu",
                   importance_alpha: float | None = None, micro: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The noise (shape) and noise levels sigma (B,) of micro-batch `micro` of one training step, float32 on
    `device`; sigma uniform, or with ReVersion's importance density 1 - alpha cos(pi sigma) when importance_alpha
    is given.

    Drawn on the CPU and moved, as sampling draws its noise: a CUDA generator's stream depends on the
    GPU model, so the same run would train on other noise on another GPU (or on the CPU).
    """
    gen = torch.Generator().manual_seed(step_seed(seed, step, rank, _NOISE_STREAM, micro))  # a CPU generator
    noise = torch.randn(tuple(shape), generator=gen, dtype=torch.float32)
    if importance_alpha is None:
        sigma = sample_sigmas(shape[0], gen)  # (B,), from the same stream, after the noise
    else:
        sigma = importance_sigmas(shape[0], gen, float(importance_alpha))
    return noise.to(device), sigma.to(device)


def method_of_spec(spec: dict) -> str:
    """The method a checkpoint's or file's spec was trained with."""
    if is_motion_spec_dict(spec):
        return METHOD
    return REVERSION if is_reversion_spec_dict(spec) else "lora"


class ReVersionMemoryError(UserError, RuntimeError):
    """A GPU too small for ReVersion's training (the transformer and T5 on it together)."""


# Allowance for the activations of one checkpointed step at 61 x 480 x 848 (transformer + T5): an estimate, not
# a measurement (experiments/bench measures a step on a GPU).
REVERSION_ACTIVATION_GB = 8.0


def reversion_memory_plan(transformer_bytes: int, text_encoder_bytes: int, total_bytes: int) -> dict[str, float]:
    """GB of ReVersion's training on one GPU: the frozen transformer, the frozen text encoder (T5-XXL in bf16,
    kept on the GPU: it runs in every step) and the checkpointed activations; refused when over the GPU."""
    gb = 1024 ** 3
    plan = {"transformer": transformer_bytes / gb, "text_encoder": text_encoder_bytes / gb,
            "activations": REVERSION_ACTIVATION_GB}
    plan["total"] = sum(plan.values())
    if plan["total"] > total_bytes / gb:
        raise ReVersionMemoryError(
            f"method=reversion needs about {plan['total']:.0f} GB on the GPU (transformer {plan['transformer']:.1f}, "
            f"text encoder {plan['text_encoder']:.1f}, activations {plan['activations']:.0f}), this GPU has "
            f"{total_bytes / gb:.0f} GB: T5 runs in every step, so it cannot be offloaded between steps; train "
            "ReVersion on a GPU of 40 GB or more (an A100 40GB, an H100)")
    return plan


def _module_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def lr_factor(step: int, warmup_steps: int, max_steps: int, schedule: str, min_ratio: float,
              warmup_from: str = "first_step") -> float:
    """Linear warm-up to lr, then cosine decay to min_ratio * lr at step `max_steps` (the horizon:
    trainer.max_steps, or optim.schedule_steps) or constant. The warm-up starts at lr / warmup_steps
    (warmup_from=first_step) or at 0 (warmup_from=zero, the reference code's LambdaLR: step / warmup)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step if warmup_from == "zero" else step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    span = max(1, max_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class RelationModule(L.LightningModule):
    """Mochi backbone + what the method learns: the relation LoRA triplet (or the direct LoRA), trained
    with hybrid mask training and RCL; or MotionInversion's motion embeddings (method=motion_inversion),
    with RCL when rcl.enabled; or ReVersion's relation token in the text encoder (method=reversion).

    ReVersion runs the (frozen) text encoder in the step: pass it as `text_encoder` or it is loaded from
    the model section (T5 in bf16 when training on a GPU, moved there at fit start)."""

    def __init__(self, cfg: DictConfig, transformer: torch.nn.Module | None = None, text_encoder=None) -> None:
        super().__init__()
        self.cfg = cfg
        self.motion_inversion = str(cfg.method) == METHOD
        self.reversion = str(cfg.method) == REVERSION
        # MotionInversion's spec needs the clips' token grid: build_motion (at setup, from the cache) sets it
        self.spec: TripletSpec | MotionSpec | ReVersionSpec | None = (
            None if self.motion_inversion or self.reversion else spec_from_config(cfg))
        if transformer is None:  # each rank loads the base where its strategy keeps it (memory-mapped)
            transformer = load_transformer(cfg.model, wants_gpu(cfg), device=base_load_device(cfg))
        self.transformer = transformer
        apply_speed_config(self.transformer, training_speed(cfg))
        self.transformer.requires_grad_(False)
        # from_pretrained returns eval mode; LoRA dropout (lora.dropout) needs train mode.
        self.transformer.train()
        self.adapters: tuple[str, ...] = ()
        self._text_encoder = None  # ReVersion's; a plain attribute: never part of the module's state
        if self.reversion:
            self._setup_reversion(text_encoder)
        elif not self.motion_inversion:
            self.adapters = inject_triplet(self.transformer, self.spec)
        # the reference code's LoRA (and so its AdamW state) in bf16
        if cfg.lora.dtype == "bf16" and not self.motion_inversion and not self.reversion:
            cast_lora(self.transformer, torch.bfloat16)
        self.memory_bank = None  # attached by callbacks.MemoryBankCallback
        self.selections: list[str] = []  # the LoRA selected at each optimizer step this process ran
        # gradient accumulation: the optimizer step the last batch belonged to, and that batch's index in it
        self._micro_step: int | None = None
        self.micro = 0
        self._step_sums: dict[str, tuple[Any, int]] = {}  # logged values summed over the step's batches so far
        self.strict_loading = False  # checkpoints hold the adapters only, not the frozen base
        self._sdpa_flags: tuple[bool, bool] | None = None  # flash / cuDNN SDPA before a deterministic run

    # --- ReVersion: the relation token in the text encoder -----------------------------------------
    def _setup_reversion(self, text_encoder) -> None:
        rv = self.cfg.reversion
        if text_encoder is None:
            from relvid.components import load_text_encoder

            dtype = torch.bfloat16 if wants_gpu(self.cfg) else None  # bf16 T5-XXL: ~9 GB beside the transformer
            text_encoder = load_text_encoder(self.cfg.model.text_encoder,
                                             self.cfg.model.text_encoder_path or self.cfg.model.path, dtype=dtype)
        if not hasattr(text_encoder, "encode_learned"):
            raise ReVersionError(f"method=reversion learns a token in the text encoder, which model.text_encoder="
                                 f"{self.cfg.model.text_encoder} cannot: use t5 (or toy in the toy world)")
        self._text_encoder = text_encoder
        token = build_token(text_encoder, str(rv.token), str(rv.init_word))
        setattr(self, TOKEN_ATTR, token)  # a submodule: its vectors are the run's parameters
        self.spec = token.spec
        if rv.text_encoder_checkpointing and hasattr(text_encoder, "enable_checkpointing"):
            text_encoder.enable_checkpointing()

    @property
    def text_encoder(self):
        """ReVersion's text encoder (None for the other methods)."""
        return self._text_encoder

    def _steering(self, batch_size: int, gen: torch.Generator) -> torch.Tensor | None:
        """The steering loss of this step: the token against n_positives prepositions per sample (drawn from
        `gen`) and the caption's other words of every sample, as one InfoNCE; None when the tokenizer knows
        none of the drawn prepositions (a small test vocabulary; T5-XXL's knows them all)."""
        rv = self.cfg.reversion
        pos, neg = [], []
        for _ in range(batch_size):
            p, n = steering_terms(self._text_encoder, str(rv.caption), str(rv.token),
                                  draw_positives(gen, int(rv.n_positives)))
            pos.append(p)
            neg.append(n)
        relation = getattr(self, TOKEN_ATTR).embedding
        if not any(len(p) for p in pos):
            return None
        return steering_loss(relation, torch.cat(pos).to(relation.device), torch.cat(neg).to(relation.device),
                             float(rv.temperature))

    # --- MotionInversion: embeddings sized by the clips ------------------------------------------
    def build_motion(self, latent_shapes: list[tuple[int, ...]]) -> MotionSpec:
        """Install zero motion embeddings for clips of these latent shapes (C, f, h, w): as long as the
        longest clip, on their token grid, in the blocks and at the stride of cfg.motion_inversion."""
        if not self.motion_inversion:
            raise RuntimeError("build_motion: this run trains LoRAs (method=lora)")
        if self.spec is not None:
            return self.spec
        mi = self.cfg.motion_inversion
        _, _, h, w = latent_shapes[0]
        frames = max(int(shape[1]) for shape in latent_shapes)
        self.spec = spec_for(self.transformer, list(mi.blocks), frames, h, w, int(mi.value_stride), str(mi.inference))
        inject_motion_embeddings(self.transformer, self.spec)
        return self.spec

    def setup(self, stage: str) -> None:
        if self.motion_inversion and self.spec is None:
            datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
            dataset = getattr(datamodule, "dataset", None)
            if dataset is None:
                raise RuntimeError("method=motion_inversion sizes its embeddings by the clip cache: fit with a "
                                   "RelationDataModule, or call build_motion first")
            self.build_motion([rec.latent_shape for rec in dataset.records])

    def trained_parameters(self) -> dict[str, torch.nn.Parameter]:
        """What this run learns, keyed as in transformer.named_parameters(): every LoRA weight, or the
        motion embeddings."""
        if self.motion_inversion:
            return motion_parameters(self.transformer)
        if self.reversion:
            return dict(getattr(self, TOKEN_ATTR).named_parameters())
        return lora_parameters(self.transformer)

    # --- the step -------------------------------------------------------------------------
    def select_lora(self, step: int) -> str:
        """The LoRA group trained at `step`: the same on every rank, a pure function of the seed."""
        if self.motion_inversion:
            return "motion"  # the embeddings, every step
        if self.reversion:
            return "token"
        if self.spec.placement == "direct":
            return "direct"
        if not self.cfg.hmt.enabled:
            return "relation"  # w/o HMT: the whole triplet every step
        gen = torch.Generator().manual_seed(derive_seed(self.cfg.seed, step, _SELECT_STREAM))
        probs = torch.tensor(list(self.cfg.hmt.probs), dtype=torch.float64)
        return SELECTIONS[int(torch.multinomial(probs, 1, generator=gen))]

    def _hybrid_mask(self, selection: str, batch: dict, sigma: torch.Tensor | None = None) -> torch.Tensor | None:
        """The loss mask of this step's selection, (B, f, h, w); zero for samples noisier than
        hmt.max_sigma when `sigma` (B,) is given (their loss is then plain)."""
        if not self.cfg.hmt.enabled:
            return None
        subjects = batch["subject_masks"]  # (B, 2, f, h, w)
        if selection == "subject1":
            mask = subjects[:, 0]
        elif selection == "subject2":
            mask = subjects[:, 1]
        else:
            mask = relation_mask(subjects, self.cfg.hmt.relation_mask, stored=batch["relation_mask"])  # (B, f, h, w)
        max_sigma = float(self.cfg.hmt.max_sigma)
        if sigma is not None and max_sigma < 1.0:
            mask = mask * (sigma <= max_sigma).to(mask.dtype).view(-1, *([1] * (mask.dim() - 1)))
        return mask

    def forward(self, latents: torch.Tensor, timestep: torch.Tensor, text_embeds: torch.Tensor,
                text_mask: torch.Tensor) -> torch.Tensor:
        dtype = next(self.transformer.parameters()).dtype
        return self.transformer(
            hidden_states=latents.to(dtype),
            encoder_hidden_states=text_embeds.to(dtype),
            timestep=timestep,
            encoder_attention_mask=text_mask,
            return_dict=False,
        )[0]

    def _next_micro(self, step: int) -> int:
        """This batch's index within optimizer step `step` (0 without gradient accumulation). Counted here, not
        taken from batch_idx: it restarts whenever the step changes, and checkpoints are written between
        optimizer steps, so a resumed run starts at 0 as the uninterrupted one did at that step."""
        if step != self._micro_step:
            self._micro_step, self.micro = step, 0
            self._step_sums = {}
        else:
            self.micro += 1
        return self.micro

    def _log_step_mean(self, name: str, value: torch.Tensor | float, **kwargs: Any) -> None:
        """Logs `value`'s mean over the optimizer step's batches so far: Lightning writes the last batch's
        log, so under gradient accumulation the step shows the mean over its micro-batches, unscaled."""
        total, count = self._step_sums.get(name, (None, 0))
        total = value if total is None else total + value
        self._step_sums[name] = (total, count + 1)
        self.log(name, total if count == 0 else total / (count + 1), on_step=True, **kwargs)

    def on_train_start(self) -> None:
        self._micro_step, self.micro, self._step_sums = None, 0, {}

    def training_step(self, batch: dict, batch_idx: int) -> dict:
        step = self.global_step  # optimizer steps done: the same for every micro-batch of a step
        micro = self._next_micro(step)
        seed = int(self.cfg.seed)
        rank = self.global_rank
        # Anything else drawing from the global generators (LoRA dropout, user callbacks) is
        # reseeded per batch, so resuming needs no snapshot and previews cannot shift the stream.
        torch.manual_seed(step_seed(seed, step, rank, _GLOBAL_STREAM, micro))

        # one selection per optimizer step: every micro-batch of the step trains the same adapters
        selection = self.select_lora(step)
        if not self.motion_inversion and not self.reversion:
            active = adapters_for_selection(selection, self.spec)
            # hmt.unselected=zero_grad: the other adapters stay in the forward multiplied by 0 (reference code)
            zeroed = [a for a in self.adapters if a not in active] if self.cfg.hmt.unselected == "zero_grad" else []
            activate(self.transformer, active, zeroed=zeroed)
        if micro == 0:
            self.selections.append(selection)

        z0 = batch["latents"].float()  # (B, C, f, h, w), drawn from the cached posterior
        rv = self.cfg.reversion
        alpha = float(rv.importance_alpha) if self.reversion and rv.importance_sampling else None
        noise, sigma = training_noise(z0.shape, seed, step, rank, z0.device, alpha, micro)  # (B, C, f, h, w), (B,)
        z_sigma = noisy_latents(z0, noise, sigma)
        target = velocity_target(z0, noise)
        text_embeds, text_mask = batch["text_embeds"], batch["text_mask"]
        if self.reversion:  # the caption through the frozen encoder, the token's vectors learned
            token = getattr(self, TOKEN_ATTR)
            text_embeds, text_mask = self._text_encoder.encode_learned([str(rv.caption)] * z0.shape[0],
                                                                       str(rv.token), token.vectors())
            text_embeds, text_mask = text_embeds.to(z0.device), text_mask.to(z0.device)
        pred = self(z_sigma, model_timestep(sigma), text_embeds, text_mask)

        mask = self._hybrid_mask(selection, batch, sigma)
        loss_rec = masked_flow_loss(pred.float(), target, mask, float(self.cfg.hmt.lambda_m), self.cfg.hmt.weighting)
        loss = loss_rec
        out: dict[str, Any] = {"clip_index": batch["clip_index"], "micro": micro, "sigma": sigma.detach()}

        if self.reversion and float(rv.steer_weight) > 0:
            steer_gen = torch.Generator().manual_seed(step_seed(seed, step, rank, _STEER_STREAM, micro))
            loss_steer = self._steering(z0.shape[0], steer_gen)
            self._log_step_mean("train/steer_skipped", float(loss_steer is None))
            if loss_steer is not None:
                loss = loss + float(rv.steer_weight) * loss_steer
                self._log_step_mean("train/loss_steer", loss_steer.detach())

        rcl = self.cfg.rcl
        if rcl.enabled:
            rcl_gen = torch.Generator().manual_seed(step_seed(seed, step, rank, _RCL_STREAM, micro))
            bank = self.memory_bank
            if bank is None:
                raise RuntimeError("rcl.enabled needs a MemoryBankCallback on the trainer "
                                   "(relvid.training.run adds it)")
            loss_rcl, info = rcl_loss_for_batch(pred.float(), batch["clip_index"], bank, n_pos=int(rcl.n_pos),
                                                n_neg=int(rcl.n_neg), tau=float(rcl.tau), generator=rcl_gen,
                                                exclude_same_clip=bool(rcl.exclude_same_clip),
                                                all_current_negatives=rcl.negatives == "all_current")
            out["rcl_draws"] = info["draws"]
            out["rcl_frames"] = info["frames"]
            out["rcl_dynamics"] = info["dynamics"]
            if loss_rcl is None:
                self._log_step_mean("train/rcl_skipped", 1.0)
            else:
                loss = loss + float(rcl.lambda_1) * loss_rcl
                self._log_step_mean("train/loss_rcl", loss_rcl.detach())
                self._log_step_mean("train/rcl_skipped", 0.0)

        check_finite_loss(loss, self.global_step + 1, {"loss_rec": loss_rec.detach(), "loss": loss.detach()})
        # the loss as computed, not divided by accumulate_grad_batches (Lightning divides what it backpropagates)
        self._log_step_mean("train/loss", loss.detach(), prog_bar=True)
        self._log_step_mean("train/loss_rec", loss_rec.detach())
        if selection in SELECTIONS:
            self.log("train/selected_lora", float(SELECTIONS.index(selection)), on_step=True)
        self._log_step_mean("train/sigma", sigma.mean())
        out["loss"] = loss
        out["selection"] = selection
        return out

    # --- deterministic mode (trainer.deterministic) ---------------------------------------------
    def on_fit_start(self) -> None:
        if self.reversion and hasattr(self._text_encoder, "model"):
            if self.device.type == "cuda":
                total = torch.cuda.get_device_properties(self.device).total_memory
                reversion_memory_plan(_module_bytes(self.transformer), _module_bytes(self._text_encoder.model), total)
            self._text_encoder.model.to(self.device)  # it runs in every step: it stays on the GPU
        if self.cfg.trainer.deterministic and self.device.type == "cuda":
            # speed.attention=diffusers leaves the kernel to SDPA: keep to those with a deterministic
            # backward (the packed path names its own: training_speed)
            self._sdpa_flags = (torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.cudnn_sdp_enabled())
            torch.backends.cuda.enable_flash_sdp(False)
            torch.backends.cuda.enable_cudnn_sdp(False)

    def on_fit_end(self) -> None:
        if self._sdpa_flags is not None:
            flash, cudnn = self._sdpa_flags
            torch.backends.cuda.enable_flash_sdp(flash)
            torch.backends.cuda.enable_cudnn_sdp(cudnn)
            self._sdpa_flags = None

    # --- optimizer --------------------------------------------------------------------------
    def on_before_optimizer_step(self, optimizer) -> None:
        if str(self.trainer.precision).startswith("16"):
            return  # fp16's loss scaler skips steps with overflowing gradients itself
        check_finite_gradients(self.trained_parameters(), self.global_step + 1)

    def configure_optimizers(self):
        opt_cfg = self.cfg.optim
        # Frozen adapters (lora.frozen) never reach the optimizer: they keep their initial weights
        # under every strategy. grad None (an adapter outside this step's forward) makes AdamW skip
        # the parameter entirely: no momentum and no weight decay for LoRAs that were not selected.
        if self.motion_inversion:
            params = list(motion_parameters(self.transformer).values())
        elif self.reversion:
            params = list(self.trained_parameters().values())
        else:
            trained = [a for a in adapter_names(self.spec) if a not in set(self.cfg.lora.frozen)]
            params = list(lora_parameters(self.transformer, trained).values())
        optimizer = torch.optim.AdamW(params, lr=float(opt_cfg.lr), betas=tuple(opt_cfg.betas),
                                      eps=float(opt_cfg.eps), weight_decay=float(opt_cfg.weight_decay))
        horizon = int(opt_cfg.schedule_steps or self.cfg.trainer.max_steps)

        def factor(step: int) -> float:
            return lr_factor(step, int(opt_cfg.warmup_steps), horizon, opt_cfg.schedule, float(opt_cfg.min_lr_ratio),
                             opt_cfg.warmup_from)

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def optimizer_zero_grad(self, epoch, batch_idx, optimizer):
        optimizer.zero_grad(set_to_none=True)  # None, not zero: see configure_optimizers

    # --- checkpoints: adapters + training state, never the frozen base ---------------------
    def trainable_keys(self) -> list[str]:
        prefix = TOKEN_ATTR if self.reversion else "transformer"
        return [f"{prefix}.{name}" for name in self.trained_parameters()]

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        keep = set(self.trainable_keys())
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        checkpoint["relvid"] = {
            "format": CHECKPOINT_FORMAT,
            "spec": self.spec.to_dict(),
            "config": OmegaConf.to_container(self.cfg, resolve=True),
            "rng": {"seed": int(self.cfg.seed), "torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        meta = checkpoint.get("relvid")
        if meta is None:
            raise CheckpointMismatchError("checkpoint has no 'relvid' section: it was not written by relvid train")
        saved_method = method_of_spec(meta["spec"])
        if saved_method != str(self.cfg.method):
            raise CheckpointMismatchError(f"the checkpoint was trained with method={saved_method}, this run has "
                                          f"method={self.cfg.method}: set method as in the checkpoint's config")
        kind = {METHOD: MotionSpec, REVERSION: ReVersionSpec}.get(saved_method, TripletSpec)
        saved = kind.from_dict(meta["spec"])
        if saved != self.spec:
            what, keys = {METHOD: ("motion embeddings", "motion_inversion.* (and the same clip cache)"),
                          REVERSION: ("relation token", "reversion.* and model.text_encoder")}.get(
                              saved_method, ("LoRA spec", "lora.*"))
            raise CheckpointMismatchError(
                f"checkpoint {what} {saved} differs from the configured {self.spec}: set {keys} as in the "
                "checkpoint's config (saved under checkpoint['relvid']['config'])"
            )
        missing = sorted(set(self.trainable_keys()) - set(checkpoint["state_dict"]))
        if missing:
            raise CheckpointMismatchError(f"checkpoint lacks {len(missing)} trained tensors, e.g. {missing[:3]}")
        rng = meta.get("rng", {})
        if "torch" in rng:
            torch.set_rng_state(rng["torch"])
        if rng.get("cuda") and torch.cuda.is_available():
            # a resume may see fewer (or more) GPUs than the run that saved it
            for device, state in enumerate(rng["cuda"][: torch.cuda.device_count()]):
                torch.cuda.set_rng_state(state, device)

    # --- inference helpers --------------------------------------------------------------------
    def use_inference_adapters(self) -> None:
        """Relation + FFN LoRAs active, subject LoRAs dropped (as at sampling time); the value embedding
        debiased under MotionInversion."""
        if self.motion_inversion:
            motion_embeddings(self.transformer).inference = True
            return
        if self.reversion:
            return  # nothing in the transformer: the token conditions through the prompt's embedding
        activate(self.transformer, inference_adapters(self.spec))

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """What the run's file holds: adapter_state_dict, or the motion embeddings ("temporal.<block>", ...)."""
        if self.motion_inversion:
            return motion_state(self.transformer)
        if self.reversion:
            return {k: v.detach().to("cpu", copy=True) for k, v in self.trained_parameters().items()}
        return adapter_state_dict(self.transformer)

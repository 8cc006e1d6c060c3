"""Lightning strategy presets by name (trainer.strategy): what each needs for a frozen base with LoRA.

The LoRA selection rule (an adapter outside a step's forward must not move in that step) holds
under DDP by itself: such adapters keep grad None and AdamW skips them. FSDP's flat parameters
would hand them zero gradients instead, which AdamW would decay and push with momentum; the FSDP
preset keeps the LoRA out of FSDP's flat parameters, and every preset's SelectionGuard drops the
gradients of unselected adapters after backward whatever a strategy did to them. DeepSpeed's
ZeRO optimizer steps flat fp32 partitions and cannot skip single tensors: it is refused while
hybrid mask training selects adapters (hmt.enabled=true).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from typing import Any

import torch
from omegaconf import DictConfig

from relvid.config import ConfigError

STRATEGIES = ("auto", "ddp", "fsdp", "deepspeed_stage_2", "deepspeed_stage_3")
DEEPSPEED = ("deepspeed_stage_2", "deepspeed_stage_3")
# Module-name pieces FSDP and activation-checkpoint wrappers insert into parameter names.
_WRAPPER_PARTS = re.compile(r"(_fsdp_wrapped_module|_checkpoint_wrapped_module)\.")


class StrategyConfigError(ConfigError):
    """A trainer.strategy that cannot run, or cannot keep relvid's training rules, as configured."""


def check_strategy(cfg: DictConfig) -> None:
    """Refuse strategy combinations that would fail late or train wrong; messages name the keys."""
    name = str(cfg.trainer.strategy)
    if name not in STRATEGIES:
        raise StrategyConfigError(f"trainer.strategy={name!r} is unknown; use one of {', '.join(STRATEGIES)} "
                                  "(presets in configs/strategy/)")
    if name in ("fsdp", "deepspeed_stage_3"):
        for key in ("preview", "relation_accuracy"):
            if cfg[key].every_n_steps > 0:
                raise StrategyConfigError(
                    f"trainer.strategy={name} with {key}.every_n_steps>0 would hang: the callback samples on rank "
                    f"zero alone, while {name} shards the transformer so that every forward needs all ranks. Set "
                    f"{key}.every_n_steps=0 (evaluate the saved adapters afterwards), or use trainer.strategy=ddp")
    if name in DEEPSPEED:
        if cfg.hmt.enabled:
            raise StrategyConfigError(
                f"trainer.strategy={name} with hmt.enabled=true would train wrong: ZeRO steps flattened "
                "partitions with its own optimizer, so adapters not selected in a step would still get weight "
                "decay and momentum updates. Use trainer.strategy=ddp or fsdp for hybrid mask training, or set "
                "hmt.enabled=false (every adapter trained every step)")
        if cfg.lora.frozen:
            raise StrategyConfigError(
                f"trainer.strategy={name} with lora.frozen={list(cfg.lora.frozen)} would train wrong: ZeRO hands "
                "every trainable tensor to its own optimizer, so frozen adapters would still move. Use "
                "trainer.strategy=ddp or fsdp for the ablations")
        if str(cfg.trainer.accelerator) == "cpu":
            raise StrategyConfigError(f"trainer.strategy={name} needs CUDA GPUs (Lightning's DeepSpeed strategy); "
                                      "set trainer.accelerator=gpu or use trainer.strategy=ddp")


def clean_name(name: str) -> str:
    """A parameter name without FSDP/checkpoint wrapper pieces (as on disk and in a DDP run)."""
    return _WRAPPER_PARTS.sub("", name)


def _unselected_lora(module) -> list[torch.nn.Parameter]:
    """LoRA parameters outside the adapters of the step the module just ran."""
    from relvid.models.lora import adapters_for_selection, lora_parameters

    if not module.selections:
        return []
    selection = module.selections[-1]
    if selection not in ("relation", "subject1", "subject2"):
        return []  # "direct": the one adapter is always trained
    active = set(adapters_for_selection(selection, module.spec))
    keep = set(map(id, lora_parameters(module.transformer, active).values()))
    return [p for p in lora_parameters(module.transformer).values() if id(p) not in keep]


def full_adapter_state(trainer, module) -> dict[str, torch.Tensor]:
    """adapter_state_dict of `module.transformer` with whole tensors and plain names under any strategy.

    Collective under ZeRO-3 (parameters are partitioned there): call it on every rank.
    """
    import contextlib

    from relvid.models.lora import adapter_state_dict, lora_parameters

    context = contextlib.nullcontext()  # FSDP keeps the LoRA whole (ignored_states): nothing to gather
    if getattr(trainer.strategy, "zero_stage_3", False) is True:
        import deepspeed

        context = deepspeed.zero.GatheredParameters(list(lora_parameters(module.transformer).values()))
    with context:
        return {clean_name(k): v for k, v in adapter_state_dict(module.transformer).items()}


class SelectionGuard:
    """Strategy mixin: after backward, unselected adapters get grad None, so AdamW skips them."""

    def optimizer_step(self, optimizer, closure: Callable[[], Any], model=None, **kwargs: Any) -> Any:
        module = self.lightning_module

        def guarded() -> Any:
            out = closure()
            self.after_backward(module)
            for param in _unselected_lora(module):
                param.grad = None
            return out

        return super().optimizer_step(optimizer, guarded, model, **kwargs)

    def after_backward(self, module) -> None:
        """Gradient work a strategy owes the LoRA before the optimizer step (none by default)."""


def _ddp_strategy_class():
    from lightning.pytorch.strategies import DDPStrategy

    class RelvidDDPStrategy(SelectionGuard, DDPStrategy):
        """DDP with the selection guard."""

    return RelvidDDPStrategy


def _fsdp_strategy_class():
    from lightning.pytorch.strategies import FSDPStrategy

    from relvid.models.lora import lora_parameters

    class RelvidFSDPStrategy(SelectionGuard, FSDPStrategy):
        """FSDP shards the frozen base per Mochi block; the LoRA stays whole on every rank.

        FSDP1 flattens each unit into one tensor of one dtype, and relvid keeps fp32 LoRA on a bf16
        base: the LoRA tensors are FSDP ``ignored_states`` instead, replicated (tens of MB) and
        all-reduced here after backward like DDP does. Adapters outside a step's forward keep
        grad None on every rank, checkpoints need no gather, and AdamW sees ordinary tensors.
        """

        def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
            from torch.distributed.fsdp import FullyShardedDataParallel

            lora = list(lora_parameters(model.transformer).values())
            with torch.no_grad():
                for param in lora:  # FSDP moves only the parameters it manages
                    param.data = param.data.to(self.root_device)
            # FSDP on the CPU (gloo, tests) needs the device itself; on GPUs the index as Lightning passes it
            device_id = self.root_device if self.root_device.type == "cpu" else self.root_device.index
            return FullyShardedDataParallel(module=model, cpu_offload=self.cpu_offload,
                                            mixed_precision=self.mixed_precision_config,
                                            sharding_strategy=self.sharding_strategy, device_id=device_id,
                                            ignored_states=lora, **self.kwargs)

        @property
        def mixed_precision_config(self):
            config = super().mixed_precision_config
            if config is None:
                return None
            # FSDP would cast the root's floating inputs (the whole batch: latents, masks) to bf16;
            # relvid's step casts what it needs itself, as under DDP
            return dataclasses.replace(config, cast_root_forward_inputs=False)

        def after_backward(self, module) -> None:
            grads = [p.grad for p in lora_parameters(module.transformer).values() if p.grad is not None]
            if grads and self.world_size > 1:
                flat = torch._utils._flatten_dense_tensors(grads)  # one all-reduce for all LoRA grads
                torch.distributed.all_reduce(flat)
                flat /= self.world_size
                for grad, reduced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads), strict=True):
                    grad.copy_(reduced)

        def lightning_module_state_dict(self) -> dict[str, Any]:
            # the LoRA only (whole on every rank); keys as module.trainable_keys() spells them
            module = self.lightning_module
            return {"transformer." + name: p.detach().to("cpu", copy=True)
                    for name, p in lora_parameters(module.transformer).items()}

        def optimizer_state(self, optimizer) -> dict[str, Any]:
            return getattr(optimizer, "_optimizer", optimizer).state_dict()  # replicated: any rank's is all

        def save_checkpoint(self, checkpoint: dict, filepath, storage_options=None) -> None:
            # on disk the keys read as in a DDP run, so checkpoints work with any strategy's tools
            checkpoint = dict(checkpoint, state_dict={clean_name(k): v for k, v in checkpoint["state_dict"].items()})
            super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)

        def load_checkpoint(self, checkpoint_path, weights_only=None) -> dict[str, Any]:
            from relvid.training.safety import load_checkpoint_file

            checkpoint = load_checkpoint_file(self.broadcast(checkpoint_path))  # weights_only: no code runs
            # back to this process's (wrapped) names: module.on_load_checkpoint checks them
            wrapped = {clean_name(k): k for k in self.lightning_module.trainable_keys()}
            checkpoint["state_dict"] = {wrapped.get(k, k): v for k, v in checkpoint["state_dict"].items()}
            if checkpoint.get("optimizer_states") and self.lightning_module.trainer.state.fn == "fit":
                for optimizer, state in zip(self.optimizers, checkpoint["optimizer_states"], strict=True):
                    optimizer.load_state_dict(state)
            return checkpoint

        def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
            saved = checkpoint["state_dict"]
            with torch.no_grad():
                for name, param in lora_parameters(self.lightning_module.transformer).items():
                    param.copy_(saved["transformer." + name])

    return RelvidFSDPStrategy


def fsdp_strategy(cfg: DictConfig):
    """FSDP wrapped per MochiTransformerBlock: the frozen base sharded, the fp32 LoRA replicated."""
    from diffusers.models.transformers.transformer_mochi import MochiTransformerBlock

    cls = _fsdp_strategy_class()
    return cls(
        auto_wrap_policy={MochiTransformerBlock},
        use_orig_params=True,  # module parameters stay addressable by name (previews, callbacks)
        sharding_strategy="FULL_SHARD",
        # the checkpoint state is small (LoRA + AdamW over LoRA), written by rank 0 as one file
        state_dict_type="full",
        limit_all_gathers=True,
    )


def _deepspeed_strategy_class():
    from lightning.pytorch.strategies import DeepSpeedStrategy

    from relvid.models.lora import lora_parameters

    class RelvidDeepSpeedStrategy(DeepSpeedStrategy):
        """DeepSpeed whose resumed checkpoints still show the module its LoRA tensors."""

        def load_checkpoint(self, checkpoint_path, weights_only=None) -> dict[str, Any]:
            checkpoint = super().load_checkpoint(checkpoint_path, weights_only)
            if "state_dict" not in checkpoint:
                # the engine restored the weights; RelationModule.on_load_checkpoint checks the LoRA keys
                module = self.lightning_module
                state = full_adapter_state(module.trainer, module)
                checkpoint["state_dict"] = {
                    "transformer." + name: state[_state_key(name)] for name in lora_parameters(module.transformer)
                }
            return checkpoint

    return RelvidDeepSpeedStrategy


def _state_key(param_name: str) -> str:
    # "<module>.lora_A.<adapter>.weight" -> "<adapter>/<module>.lora_A.weight" (adapter_state_dict's key)
    module, ab, adapter, _ = clean_name(param_name).rsplit(".", 3)
    return f"{adapter}/{module}.{ab}.weight"


def deepspeed_strategy(cfg: DictConfig, stage: int):
    return _deepspeed_strategy_class()(
        stage=stage,
        # relvid's AdamW (configure_optimizers) is stepped by ZeRO; nothing offloaded by default
        offload_optimizer=False,
        offload_parameters=False,
        exclude_frozen_parameters=True,  # checkpoints hold the LoRA, not the frozen 10B base
    )


def build_strategy(cfg: DictConfig):
    """A Lightning strategy object (or name) for ``cfg.trainer.strategy``."""
    check_strategy(cfg)
    name = cfg.trainer.strategy
    if name == "ddp":
        # Unselected adapters sit outside the forward in a step; DDP must not wait for their grads.
        # DDP leaves their grads None by itself; the guard makes that independent of DDP internals.
        return _ddp_strategy_class()(find_unused_parameters=True)
    if name == "fsdp":
        return fsdp_strategy(cfg)
    if name in DEEPSPEED:
        return deepspeed_strategy(cfg, stage=int(name[-1]))
    return name

"""Lightning strategy presets by name (trainer.strategy): what each needs for a frozen base with LoRA.

The LoRA selection rule (an adapter outside a step's forward must not move in that step) holds
under DDP by itself: such adapters keep grad None and AdamW skips them. FSDP's flat parameters
would hand them zero gradients instead, which AdamW would decay and push with momentum; the FSDP
preset keeps the LoRA out of FSDP's flat parameters, and every preset's SelectionGuard drops the
gradients of unselected adapters after backward whatever a strategy did to them. DeepSpeed's
ZeRO optimizer steps flat fp32 partitions and cannot skip single tensors: it is refused while
hybrid mask training selects adapters (hmt.enabled=true).

trainer.strategy=auto is relvid's DDP whenever the run has more than one process (several devices
or nodes), never Lightning's stock DDP. A rank that fails (a CUDA out-of-memory error on one GPU)
ends the ranks Lightning's launcher started with it instead of leaving them waiting in a collective.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from relvid.config import ConfigError
from relvid.files import swap_in_folder

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
    if str(cfg.model.offload) != "none" and resolved_strategy(cfg) != "single":
        raise StrategyConfigError(
            f"model.offload={cfg.model.offload} trains on one device: this run starts {process_count(cfg)} processes "
            "(trainer.devices/num_nodes), which would run DDP over the offloaded weights. Set trainer.devices=1, "
            "or model.offload=none")
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
        if str(cfg.trainer.precision) == "16-mixed":
            raise StrategyConfigError(
                f"trainer.strategy={name} with trainer.precision=16-mixed would train the LoRA in fp16: DeepSpeed's "
                "fp16 mode casts the fp32 LoRA and every float tensor of the batch to fp16. Use "
                "trainer.precision=bf16-mixed (or auto), or trainer.strategy=ddp or fsdp for fp16 autocast")


def _uses_cuda(cfg: DictConfig) -> bool:
    accel = str(cfg.trainer.accelerator)
    return accel in ("gpu", "cuda") or (accel == "auto" and torch.cuda.is_available())


def parallel_devices(cfg: DictConfig) -> list[torch.device] | None:
    """The devices of one node as Lightning reads trainer.accelerator and trainer.devices (None when the
    accelerator is neither the CPU nor CUDA, or it names GPUs on a machine without any: Lightning then
    decides, or says what is wrong)."""
    from lightning.pytorch.accelerators import CPUAccelerator, CUDAAccelerator
    from omegaconf import OmegaConf

    accel = str(cfg.trainer.accelerator)
    if accel not in ("auto", "cpu", "gpu", "cuda"):
        return None
    gpu = _uses_cuda(cfg)
    if gpu and not torch.cuda.is_available():
        return None
    kind = CUDAAccelerator if gpu else CPUAccelerator
    devices = cfg.trainer.devices
    devices = OmegaConf.to_object(devices) if OmegaConf.is_config(devices) else devices
    if devices == "auto":
        devices = kind.auto_device_count()
    return kind.get_parallel_devices(kind.parse_devices(devices))


def process_count(cfg: DictConfig) -> int | None:
    """How many training processes the run starts (devices per node x nodes); None where unknown."""
    devices = parallel_devices(cfg)
    return None if devices is None else len(devices) * int(cfg.trainer.num_nodes)


def resolved_strategy(cfg: DictConfig) -> str:
    """trainer.strategy with `auto` decided: ddp for more than one process, else single (one device)."""
    name = str(cfg.trainer.strategy)
    if name != "auto":
        return name
    count = process_count(cfg)
    return "ddp" if int(cfg.trainer.num_nodes) > 1 or (count or 1) > 1 else "single"


def base_load_device(cfg: DictConfig) -> torch.device:
    """Where this process loads the frozen base: straight onto its own GPU where the strategy keeps a whole
    copy per GPU (one device, ddp, deepspeed_stage_2), so host memory holds no per-rank copy; on the CPU
    (memory-mapped) where a sharding wrapper takes the weights from there (fsdp, deepspeed_stage_3) and on
    CPU runs."""
    if not _uses_cuda(cfg) or resolved_strategy(cfg) in ("fsdp", "deepspeed_stage_3"):
        return torch.device("cpu")
    devices = parallel_devices(cfg)
    # the node-local rank: Lightning's launcher and torchrun set LOCAL_RANK, srun SLURM_LOCALID
    local_rank = int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0")))
    if not devices or local_rank >= len(devices):
        return torch.device("cpu")  # not this process's GPU for sure: Lightning moves the model itself
    return devices[local_rank]


def clean_name(name: str) -> str:
    """A parameter name without FSDP/checkpoint wrapper pieces (as on disk and in a DDP run)."""
    return _WRAPPER_PARTS.sub("", name)


def _unselected_lora(module) -> list[torch.nn.Parameter]:
    """LoRA parameters outside the adapters of the step the module just ran."""
    from relvid.models.lora import adapters_for_selection, lora_parameters

    if not module.selections or module.cfg.hmt.unselected == "zero_grad":
        return []  # zero_grad: every adapter has its (zero) gradient and AdamW moves it, as in the reference
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

    # MotionInversion's embeddings, ReVersion's token: whole, they run on one device or under DDP only
    if getattr(module, "motion_inversion", False) or getattr(module, "reversion", False):
        return module.adapter_state()
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


# Seconds a rank waits, once a rank it started has failed, for its own error to end it first (the same
# error on every rank reads better from the first one than as a killed process).
RANK_FAILURE_GRACE_S = 10.0


def watch_ranks(procs: list[subprocess.Popen], stopping: threading.Event, grace_s: float = RANK_FAILURE_GRACE_S,
                poll_s: float = 0.5) -> tuple[int, int] | None:
    """Wait for the processes to end. When one fails, wait up to `grace_s` for `stopping` (set when this
    process ends by itself), then kill the others and return (pid, exit code) of the failed one; None when
    they all succeeded or `stopping` was set."""
    while not stopping.is_set():
        codes = [proc.poll() for proc in procs]
        failed = next(((proc.pid, code) for proc, code in zip(procs, codes, strict=True) if code not in (None, 0)),
                      None)
        if failed is not None:
            if stopping.wait(grace_s):
                return None
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
            return failed
        if all(code == 0 for code in codes):
            return None
        stopping.wait(poll_s)
    return None


class EndRanksTogether:
    """Strategy mixin: with Lightning's own launcher (several GPUs of one machine, no torchrun or srun),
    rank 0 started the other ranks. When one of them fails (a CUDA out-of-memory error on one GPU), rank 0
    ends them all; when rank 0 fails, it ends the ranks it started. Otherwise the survivors would wait for
    the failed rank in a collective until the distributed timeout (30 minutes). torchrun ends the other
    workers itself; under srun that is `--kill-on-bad-exit=1`."""

    def setup_environment(self) -> None:
        super().setup_environment()
        self._ending = threading.Event()
        started = list(getattr(self.launcher, "procs", None) or [])  # empty on the ranks rank 0 started
        if started:
            threading.Thread(target=self._watch, args=(started,), name="relvid-ranks", daemon=True).start()

    def _watch(self, started: list[subprocess.Popen]) -> None:
        failed = watch_ranks(started, self._ending)
        if failed is not None:
            pid, code = failed
            print(f"relvid: a training process (pid {pid}) ended with exit code {code} (its error is above); "
                  "ending the other ranks, which would otherwise wait for it until the distributed timeout. "
                  "resume=last continues from the newest step checkpoint.", file=sys.stderr, flush=True)
            os._exit(1)

    def on_exception(self, exception: BaseException) -> None:
        super().on_exception(exception)
        ending = getattr(self, "_ending", None)
        if ending is not None:
            ending.set()
        if isinstance(exception, KeyboardInterrupt):
            return  # Lightning ends the ranks it started itself
        running = [proc for proc in getattr(self.launcher, "procs", None) or [] if proc.poll() is None]
        if not running:
            return
        print(f"relvid: rank {self.global_rank} failed; ending the other ranks of this machine, which would "
              "otherwise wait for it until the distributed timeout", file=sys.stderr, flush=True)
        deadline = time.monotonic() + RANK_FAILURE_GRACE_S / 2
        for proc in running:  # ranks failing with the same error end by themselves: let them say why
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()

    def teardown(self) -> None:
        ending = getattr(self, "_ending", None)
        if ending is not None:
            ending.set()  # after fit, no collective waits for another rank
        super().teardown()


def _ddp_strategy_class():
    from lightning.pytorch.strategies import DDPStrategy

    class RelvidDDPStrategy(SelectionGuard, EndRanksTogether, DDPStrategy):
        """DDP with the selection guard; a failed rank ends the others."""

    return RelvidDDPStrategy


def ddp_strategy():
    # Unselected adapters sit outside the forward in a step; DDP must not wait for their grads.
    # DDP leaves their grads None by itself; the guard makes that independent of DDP internals.
    return _ddp_strategy_class()(find_unused_parameters=True)


def _fsdp_strategy_class():
    from lightning.pytorch.plugins.precision import FSDPPrecision, Precision
    from lightning.pytorch.strategies import FSDPStrategy

    from relvid.models.lora import lora_parameters

    class LoraFSDPPrecision(FSDPPrecision):
        """FSDPPrecision whose norm clipping (optim.grad_clip) works: the optimizer holds the LoRA only,
        which FSDP leaves whole on every rank with gradients already averaged (after_backward), so the
        plain norm over it is the global norm, as under DDP. Lightning's FSDPPrecision refuses norm
        clipping because its sharded flat parameters would need FSDP's own collective clip_grad_norm_."""

        def clip_grad_by_norm(self, optimizer, clip_val: int | float) -> None:
            Precision.clip_grad_by_norm(self, optimizer, clip_val)

    class RelvidFSDPStrategy(SelectionGuard, EndRanksTogether, FSDPStrategy):
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
        def precision_plugin(self) -> FSDPPrecision:
            return FSDPStrategy.precision_plugin.fget(self)

        @precision_plugin.setter
        def precision_plugin(self, plugin) -> None:
            if type(plugin) is FSDPPrecision:  # the one Lightning makes from Trainer(precision=...)
                plugin = LoraFSDPPrecision(plugin.precision, plugin.scaler)
            FSDPStrategy.precision_plugin.fset(self, plugin)

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
    from lightning.pytorch.plugins.precision import DeepSpeedPrecision
    from lightning.pytorch.strategies import DeepSpeedStrategy

    from relvid.models.lora import lora_parameters

    class LoraDeepSpeedPrecision(DeepSpeedPrecision):
        """bf16-mixed as under DDP: autocast in the step, the batch and the fp32 LoRA left as they are.

        Lightning's DeepSpeedPrecision casts every float tensor of the batch to bf16 (the latents would be
        rounded before noise is added) and relies on DeepSpeed's bf16 mode, which casts the LoRA to bf16;
        relvid's DeepSpeed config turns that mode off (deepspeed_strategy) and casts what it needs itself.
        """

        def convert_input(self, data: Any) -> Any:
            return data

        def backward(self, tensor: torch.Tensor, model, optimizer, *args: Any, **kwargs: Any) -> None:
            # Lightning has already divided the loss by trainer.accumulate_grad_batches; DeepSpeed's backward
            # would divide it by its gradient_accumulation_steps (the same number) a second time
            kwargs.setdefault("scale_wrt_gas", False)
            super().backward(tensor, model, optimizer, *args, **kwargs)

        def forward_context(self):
            import contextlib

            if self.precision == "bf16-mixed":
                return torch.autocast("cuda", dtype=torch.bfloat16)
            return contextlib.nullcontext()

    class RelvidDeepSpeedStrategy(EndRanksTogether, DeepSpeedStrategy):
        """DeepSpeed in fp32 mode with bf16 autocast; resumed checkpoints still show the module its LoRA."""

        @property
        def precision_plugin(self) -> DeepSpeedPrecision:
            return DeepSpeedStrategy.precision_plugin.fget(self)

        @precision_plugin.setter
        def precision_plugin(self, plugin) -> None:
            if type(plugin) is DeepSpeedPrecision:  # the one Lightning makes from Trainer(precision=...)
                plugin = LoraDeepSpeedPrecision(plugin.precision)
            DeepSpeedStrategy.precision_plugin.fset(self, plugin)

        def save_checkpoint(self, checkpoint: dict, filepath, storage_options=None) -> None:
            # DeepSpeed writes a folder file by file, and rewrites last.ckpt/ in place: a crash midway
            # would leave files of two saves side by side. Every rank writes into a staging folder;
            # once all are done, rank 0 swaps it in by renames.
            target = Path(self.broadcast(str(filepath)))
            staging = target.with_name(f".{target.name}.staging")
            if self.is_global_zero and staging.exists():
                shutil.rmtree(staging)
            self.barrier("relvid_deepspeed_staging")
            super().save_checkpoint(checkpoint, staging, storage_options)
            self.barrier("relvid_deepspeed_saved")
            if self.is_global_zero:
                swap_in_folder(staging, target)
            self.barrier("relvid_deepspeed_swapped")

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
    strategy = _deepspeed_strategy_class()(
        stage=stage,
        # relvid's AdamW (configure_optimizers) is stepped by ZeRO; nothing offloaded by default
        offload_optimizer=False,
        offload_parameters=False,
        exclude_frozen_parameters=True,  # checkpoints hold the LoRA, not the frozen 10B base
    )
    # Without these keys Lightning turns on DeepSpeed's bf16 (fp16) mode for bf16-mixed (16-mixed), which
    # casts every parameter, the fp32 LoRA included, to bf16: ZeRO would step bf16 weights through fp32
    # master copies and the saved adapters would come out bf16. The frozen base is bf16 already
    # (model.dtype); autocast runs the step in bf16 as under DDP (LoraDeepSpeedPrecision).
    strategy.config["bf16"] = {"enabled": False}
    strategy.config["fp16"] = {"enabled": False}
    return strategy


def build_strategy(cfg: DictConfig):
    """A Lightning strategy object (or name) for ``cfg.trainer.strategy``."""
    check_strategy(cfg)
    name = resolved_strategy(cfg)
    if name == "ddp":  # trainer.strategy=auto too, with several processes: Lightning's stock DDP would
        return ddp_strategy()  # fail on the first step that leaves adapters out, and skip the guard
    if name == "single":
        return "auto"  # one device: Lightning's single-device strategy
    if name == "fsdp":
        return fsdp_strategy(cfg)
    if name in DEEPSPEED:
        return deepspeed_strategy(cfg, stage=int(name[-1]))
    return name

"""Benchmark one Mochi relation-training step and one CFG sample, reference vs fast attention.

One process, one device. Full size: the Mochi-1 transformer architecture (10B) with random bf16
weights built on the GPU (no download). --tiny: the tiny test config on the CPU, in seconds.

Timed:
  (a) plain diffusers + peft LoRA step (reference attention, full gradient checkpointing, AdamW)
  (b) relvid's full training step through Lightning: triplet, HMT, RCL, optimizer (per attention path)
  (c) one CFG sample as `relvid sample` runs it: the transformer prepared by relvid.components
      (speed.attention, sdpa_backend=auto, speed.compile; no autocast), relation + ffn LoRA active,
      relvid.inference.sampler.sample (per attention path)
Prints median time, peak memory, tokens/s, achieved TFLOP/s (FLOPs counted by
torch.utils.flop_counter on one extra step: recomputation included) and the ratio (b)/(a).

--preset NAME (repeatable; all: 80gb 40gb 24gb) adds rows (b) and (c) under configs/memory/NAME.yaml
(e.g. the 24gb preset's fp8 base); --set KEY=VALUE passes any config key to (b) and (c).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import torch
from diffusers import MochiTransformer3DModel
from torch.utils.flop_counter import FlopCounterMode

from relvid.components import prepare_for_sampling
from relvid.config import load_config
from relvid.data.datamodule import RelationDataModule
from relvid.data.random_cache import write_random_cache
from relvid.inference.sampler import sample
from relvid.models.attention import apply_speed_config
from relvid.models.backbone import apply_storage_dtype, resolve_storage_dtype, tiny_transformer
from relvid.training.module import RelationModule
from relvid.training.run import build_trainer

REPO = Path(__file__).resolve().parents[2]
PRESETS = ("80gb", "40gb", "24gb")  # configs/memory/<name>.yaml


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def build_model(args, device: torch.device, dtype: torch.dtype, cfg=None) -> MochiTransformer3DModel:
    """The benchmark's transformer; with `cfg`, its base stored in cfg.model.storage_dtype as relvid stores it."""
    model = _random_model(args, device, dtype)
    storage = resolve_storage_dtype(cfg.model.storage_dtype) if cfg is not None else None
    if storage is not None:  # measured peaks start after this: the bf16 model built first is gone by then
        apply_storage_dtype(model, storage, dtype)
    if cfg is not None and cfg.model.offload == "blocks":  # as load_transformer: offloaded blocks on the host
        from relvid.models.attention import mochi_blocks
        from relvid.models.offload import apply_block_offload

        for block in mochi_blocks(model)[int(cfg.model.resident_blocks):]:
            block.to("cpu")
        apply_block_offload(model, int(cfg.model.resident_blocks), cfg.model.offload_dir, pin=device.type == "cuda")
    return model


def _random_model(args, device: torch.device, dtype: torch.dtype) -> MochiTransformer3DModel:
    if args.tiny:
        return tiny_transformer(seed=0).to(device=device, dtype=dtype)
    # random init straight on the GPU in bf16: 20 GB, no fp32 copy on the host
    previous = torch.get_default_dtype()
    torch.manual_seed(0)
    try:
        torch.set_default_dtype(dtype)
        with torch.device(device):
            model = MochiTransformer3DModel()
    finally:
        torch.set_default_dtype(previous)
    return model


def shapes(args, model) -> dict:
    """Latent shape (C, f, h, w), text length and width for the benchmark's video size."""
    cfg = model.config
    if args.tiny:
        return {"latent": (cfg.in_channels, 3, 8, 8), "text_len": 6, "text_dim": cfg.text_embed_dim}
    f = (args.frames - 1) // 6 + 1
    return {"latent": (cfg.in_channels, f, args.height // 8, args.width // 8), "text_len": args.text_len,
            "text_dim": cfg.text_embed_dim}


def vision_tokens(latent: tuple, patch: int) -> int:
    c, f, h, w = latent
    return f * (h // patch) * (w // patch)


def timed(fn, n: int, warmup: int, device) -> list[float]:
    times = []
    for i in range(warmup + n):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def counted_flops(fn) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


# --- (a) plain diffusers + peft ---------------------------------------------------------------
def bench_plain(args, device, dtype) -> dict:
    from peft import LoraConfig

    model = build_model(args, device, dtype)
    model.requires_grad_(False)
    model.enable_gradient_checkpointing()
    model.train()
    modules = "to_q|to_k|to_v|to_out\\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out"
    model.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank,
                                 target_modules=rf"transformer_blocks\.\d+\.attn1\.({modules})"))
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()  # fp32 LoRA weights, as relvid keeps them
    opt = torch.optim.AdamW(params, lr=1e-4)
    sh = shapes(args, model)
    g = torch.Generator(device="cpu").manual_seed(0)
    z = torch.randn(1, *sh["latent"], generator=g).to(device)
    text = torch.randn(1, sh["text_len"], sh["text_dim"], generator=g).to(device)
    mask = torch.ones(1, sh["text_len"], dtype=torch.bool, device=device)
    t = torch.tensor([500.0], device=device)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            pred = model(z.to(dtype), text.to(dtype), t, mask, return_dict=False)[0]
        loss = (pred.float() - z).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    reset_peak(device)
    times = timed(step, args.steps, args.warmup, device)
    out = {"times": times, "peak": peak_gib(device), "flops": counted_flops(step),
           "tokens": vision_tokens(sh["latent"], 2)}
    return out


# --- (b) relvid's training step ------------------------------------------------------------------
class StepTimer(L.Callback):
    def __init__(self, device, skip: int, flop_step: int | None):
        self.device, self.skip, self.flop_step = device, skip, flop_step
        self.times: list[float] = []
        self.flops = 0
        self._counter = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.flop_step:
            self._counter = FlopCounterMode(display=False)
            self._counter.__enter__()
        if batch_idx == self.skip:
            reset_peak(self.device)
        sync(self.device)
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        sync(self.device)
        if self._counter is not None:
            self._counter.__exit__(None, None, None)
            self.flops = self._counter.get_total_flops()
            self._counter = None
        elif batch_idx >= self.skip:
            self.times.append(time.perf_counter() - self._t0)


def relvid_config(args, work: Path, attention: str, device, preset: str | None = None):
    """The run's config: the bench's settings, then configs/memory/<preset>.yaml, then --checkpoint,
    --compile and --set (a preset decides its keys unless one of those names them)."""
    overrides = [
        f"speed.attention={attention}", f"lora.rank={args.rank}", f"lora.alpha={args.rank}", "data.num_workers=0",
        f"data.cache_dir={work / 'cache'}", f"output_dir={work / ('run-' + attention + '-' + (preset or 'default'))}",
        f"trainer.max_steps={args.warmup + args.steps + 1}", "trainer.checkpoint_every=100000",
        "trainer.progress_bar=false", "trainer.devices=1", "optim.warmup_steps=0", "rcl.bank_size=8",
        f"trainer.accelerator={'cpu' if device.type == 'cpu' else 'gpu'}",
    ]
    if preset is None:
        overrides += [f"speed.checkpoint={args.checkpoint or 'full'}", f"speed.compile={args.compile}",
                      "model.gradient_checkpointing=true"]  # as in (a)
    else:
        overrides += [*([f"speed.checkpoint={args.checkpoint}"] if args.checkpoint else []),
                      *(["speed.compile=true"] if args.compile else [])]
    files = [REPO / "configs" / "tiny.yaml"] if args.tiny else []
    files += [REPO / "configs" / "memory" / f"{preset}.yaml"] if preset else []
    return load_config(files, [*overrides, *args.set])


def bench_relvid(args, device, dtype, attention: str, work: Path, preset: str | None = None) -> dict:
    cfg = relvid_config(args, work, attention, device, preset)
    model = build_model(args, device, dtype, cfg)
    if cfg.model.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    sh = shapes(args, model)
    if not (work / "cache").exists():
        write_random_cache(work / "cache", n_clips=4, latent_shape=sh["latent"], text_dim=sh["text_dim"],
                           max_tokens=sh["text_len"], seed=0)
    data = RelationDataModule(cfg.data.cache_dir, relation=cfg.relation, batch_size=1, num_workers=0,
                              seed=0, caption_dropout=0.0, total_steps=int(cfg.trainer.max_steps),
                              sample_posterior=True)
    # the FLOP-counted step runs first (warm-up), then the timed ones
    timer = StepTimer(device, skip=args.warmup + 1, flop_step=0)
    trainer = build_trainer(cfg, extra_callbacks=[timer])
    module = RelationModule(cfg, transformer=model)
    trainer.fit(module, datamodule=data)
    out = {"times": timer.times, "peak": peak_gib(device), "flops": timer.flops,
           "tokens": vision_tokens(sh["latent"], 2)}
    del trainer, module, model
    return out


# --- (c) one CFG sample ----------------------------------------------------------------------------
def bench_sample(args, device, dtype, attention: str, work: Path, preset: str | None = None) -> dict:
    from relvid.models.lora import TripletSpec, activate, inference_adapters, inject_triplet

    cfg = relvid_config(args, work, attention, device, preset)
    model = build_model(args, device, dtype, cfg).eval()
    model.requires_grad_(False)
    # what load_generation_parts does for `relvid sample` / `relvid evaluate`
    prepare_for_sampling(model, cfg.speed)
    spec = TripletSpec(rank=args.rank, alpha=float(args.rank))
    inject_triplet(model, spec)
    activate(model, inference_adapters(spec))
    model.to(device)  # LoRA weights made beside host-side (offloaded) blocks join the rest on the device
    sh = shapes(args, model)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(1, *sh["latent"], generator=g).to(device)
    embeds = torch.randn(1, sh["text_len"], sh["text_dim"], generator=g).to(device, dtype)
    mask = torch.zeros(1, sh["text_len"], dtype=torch.bool, device=device)
    mask[:, : max(1, sh["text_len"] * 3 // 4)] = True  # a padded prompt, as T5 gives
    neg = torch.randn(1, sh["text_len"], sh["text_dim"], generator=g).to(device, dtype)
    neg_mask = torch.zeros_like(mask)
    neg_mask[:, :1] = True  # the empty negative prompt: one valid token

    def run_sample(steps):  # the bf16 transformer as it is, as in relvid sample (no autocast)
        return sample(model, noise, embeds, mask, neg, neg_mask, num_steps=steps, guidance_scale=6.0)

    run_sample(2)  # warm-up (kernels, compile); the schedule needs >= 2 steps
    flops = counted_flops(lambda: run_sample(2)) // 2 * args.sample_steps
    reset_peak(device)
    times = timed(lambda: run_sample(args.sample_steps), 1, 0, device)
    out = {"times": times, "peak": peak_gib(device), "flops": flops,
           "tokens": vision_tokens(sh["latent"], 2) * 2 * args.sample_steps}
    return out


def equivalence(args, device, dtype) -> float:
    """max |packed - diffusers| / max |diffusers| of one forward at the benchmark's size (padded batch 2)."""
    model = build_model(args, device, dtype).eval()
    sh = shapes(args, model)
    g = torch.Generator().manual_seed(1)
    z = torch.randn(2, *sh["latent"], generator=g).to(device, dtype)
    text = torch.randn(2, sh["text_len"], sh["text_dim"], generator=g).to(device, dtype)
    mask = torch.zeros(2, sh["text_len"], dtype=torch.bool, device=device)
    mask[0, :] = True
    mask[1, : max(1, sh["text_len"] // 3)] = True
    t = torch.tensor([300.0, 800.0], device=device)
    outs = {}
    for path in ("diffusers", "packed"):
        speed = SimpleNamespace(attention=path, sdpa_backend="auto", checkpoint="full", compile=False)
        apply_speed_config(model, speed)
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            outs[path] = model(z, text, t, mask, return_dict=False)[0].float()
    del model
    return float((outs["packed"] - outs["diffusers"]).abs().max() / outs["diffusers"].abs().max())


def row(name: str, r: dict) -> str:
    med = statistics.median(r["times"])
    peak = "-" if r["peak"] is None else f"{r['peak']:.1f}"
    return (f"| {name:<34} | {med:9.3f} | {peak:>8} | {r['tokens'] / med:12.0f} | {r['flops'] / med / 1e12:9.3g} |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", "--cpu", action="store_true", help="tiny config on the CPU (runs anywhere in seconds)")
    p.add_argument("--steps", type=int, default=None, help="timed training steps (default 10, tiny 5)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--frames", type=int, default=61)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=848)
    p.add_argument("--text-len", type=int, default=256)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--sample-steps", type=int, default=None, help="CFG sample steps (default 64, tiny 8)")
    p.add_argument("--attention", choices=("both", "diffusers", "packed"), default="both")
    p.add_argument("--checkpoint", choices=("full", "save_attention"), default=None,
                   help="speed.checkpoint (default full, or the preset's)")
    p.add_argument("--compile", action="store_true", help="speed.compile: regional torch.compile of each block")
    p.add_argument("--skip", nargs="*", default=(), choices=("plain", "relvid", "sample", "check"))
    p.add_argument("--preset", action="append", default=[], choices=(*PRESETS, "all"),
                   help="rows (b) and (c) under configs/memory/<preset>.yaml instead of the defaults (repeatable)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a config key for rows (b) and (c), after any preset (repeatable), e.g. "
                        "model.storage_dtype=float8_e4m3fn")
    args = p.parse_args(argv)
    presets = list(PRESETS) if "all" in args.preset else list(dict.fromkeys(args.preset))
    args.steps = args.steps or (5 if args.tiny else 10)
    args.sample_steps = args.sample_steps or (8 if args.tiny else 64)
    if args.tiny:
        device, dtype = torch.device("cpu"), torch.float32
        torch.set_num_threads(min(4, torch.get_num_threads()))
    else:
        if not torch.cuda.is_available():
            raise SystemExit("full-size benchmark needs a CUDA GPU (use --tiny on a CPU)")
        device, dtype = torch.device("cuda"), torch.bfloat16
    torch.manual_seed(0)
    paths = ("diffusers", "packed") if args.attention == "both" else (args.attention,)
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="relvid-bench-") as tmp:
        work = Path(tmp)
        if "plain" not in args.skip:
            results["(a) diffusers+peft step"] = bench_plain(args, device, dtype)
        for preset in presets or [None]:
            tag = f" {preset}" if preset else ""
            if "relvid" not in args.skip:
                for path in paths:
                    results[f"(b) relvid step [{path}]{tag}"] = bench_relvid(args, device, dtype, path, work, preset)
                    reset_peak(device)
            if "sample" not in args.skip:
                for path in paths:
                    results[f"(c) {args.sample_steps}-step CFG sample [{path}]{tag}"] = bench_sample(
                        args, device, dtype, path, work, preset)
                    reset_peak(device)
        check = None if "check" in args.skip else equivalence(args, device, dtype)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (tiny config)"
    checkpoint = args.checkpoint or ("per preset" if presets else "full")
    print(f"\nrelvid benchmark on {name}, torch {torch.__version__}, checkpoint={checkpoint}, "
          f"compile={args.compile}, steps={args.steps} (+{args.warmup} warm-up)"
          f"{', presets ' + ' '.join(presets) if presets else ''}{', set ' + ' '.join(args.set) if args.set else ''}")
    print("| what                               |  median s | peak GiB |     tokens/s |  TFLOP/s |")
    print("|------------------------------------|-----------|----------|--------------|----------|")
    for key, r in results.items():
        print(row(key, r))
    plain = results.get("(a) diffusers+peft step")
    for path in paths:
        b = results.get(f"(b) relvid step [{path}]{' ' + presets[0] if presets else ''}")
        if plain and b:
            ratio = statistics.median(b["times"]) / statistics.median(plain["times"])
            print(f"ratio (b)/(a) [{path}]: {ratio:.2f}")
    if check is not None:
        print(f"packed vs diffusers forward (padded batch 2): max abs diff / max abs = {check:.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

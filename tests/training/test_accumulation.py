"""trainer.accumulate_grad_batches: draws per micro-batch, one LoRA selection per optimizer step, the mean of
the micro-batches' gradients, exact resume, callbacks once per optimizer step, and the command line."""

import json
import warnings

import lightning as L
import pytest
import torch
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file

from relvid.cli import main
from relvid.config import ConfigError
from relvid.losses.flow_matching import sample_sigmas
from relvid.models.adapter_file import adapters_from_checkpoint, load_adapters
from relvid.models.lora_io import write_inference_lora
from relvid.seeding import derive_seed
from relvid.training.callbacks.relation_accuracy import RelationAccuracyCallback
from relvid.training.module import RelationModule, step_seed, training_noise
from relvid.training.run import RUN_INFO_NAME, run
from tests.helpers.logs import scalars

# the stream tags training has always keyed its draws with: select, noise, RCL, global reseed, steering
STREAMS = (1, 2, 3, 4, 5)


@pytest.fixture
def cache(random_cache):
    return random_cache(n_clips=4, relation="shaking_hands", seed=1).root


class Batches(L.Callback):
    """Each training batch: the optimizer step it belonged to, its micro-batch index, its sigma, its samples and
    the adapters in the forward (with their scales) of one LoRA layer."""

    def __init__(self) -> None:
        self.rows: list[dict] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        layer = next(m for m in pl_module.transformer.modules() if isinstance(m, LoraLayer))
        self.rows.append({"step": self._step, "micro": outputs["micro"], "sigma": outputs["sigma"].clone(),
                          "shape": tuple(batch["latents"].shape), "index": batch["index"].tolist(),
                          "selection": outputs["selection"],
                          "forward": (sorted(layer.active_adapters), dict(layer.scaling))})
        self.selections = list(pl_module.selections)


def test_micro_batches_draw_their_own_noise_and_without_accumulation_every_draw_is_as_before(cache, tiny_cfg):
    # micro-batch 0 keeps the key every step had before accumulation existed: the same draws, bit for bit
    for stream in STREAMS:
        assert step_seed(7, 3, 1, stream) == step_seed(7, 3, 1, stream, micro=0) == derive_seed(7, 3, 1, stream)
        assert step_seed(7, 3, 1, stream, micro=1) != derive_seed(7, 3, 1, stream)
    old = torch.Generator().manual_seed(derive_seed(7, 3, 1, 2))  # the noise stream as it was drawn
    old_noise = torch.randn((2, 4, 3, 8, 8), generator=old)
    old_sigma = sample_sigmas(2, old)
    noise, sigma = training_noise((2, 4, 3, 8, 8), 7, 3, 1)
    assert torch.equal(noise, old_noise) and torch.equal(sigma, old_sigma)

    plain, accumulated = Batches(), Batches()
    cfg = tiny_cfg("trainer.max_steps=3", "seed=5", f"output_dir={cache.parent / 'plain'}")
    run(cfg, extra_callbacks=[plain])
    run(tiny_cfg("trainer.max_steps=3", "seed=5", "trainer.accumulate_grad_batches=2",
                 f"output_dir={cache.parent / 'acc'}"), extra_callbacks=[accumulated])
    assert [(r["step"], r["micro"]) for r in plain.rows] == [(0, 0), (1, 0), (2, 0)]
    for row in plain.rows:  # exactly the sigma training has always drawn at that step
        assert torch.equal(row["sigma"], training_noise(row["shape"], 5, row["step"], 0)[1])
    assert [(r["step"], r["micro"]) for r in accumulated.rows] == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]
    for row in accumulated.rows:
        assert torch.equal(row["sigma"], training_noise(row["shape"], 5, row["step"], 0, micro=row["micro"])[1])
    for first, second in zip(accumulated.rows[::2], accumulated.rows[1::2], strict=True):
        assert not torch.equal(first["sigma"], second["sigma"]), "two micro-batches of a step drew the same sigma"
        assert not torch.equal(training_noise(first["shape"], 5, first["step"], 0)[0],
                               training_noise(first["shape"], 5, first["step"], 0, micro=1)[0])


def test_one_selection_per_optimizer_step_as_without_accumulation(cache, tiny_cfg):
    plain, accumulated = Batches(), Batches()
    run(tiny_cfg("trainer.max_steps=6", "hmt.unselected=zero_grad", f"output_dir={cache.parent / 'plain'}"),
        extra_callbacks=[plain])
    run(tiny_cfg("trainer.max_steps=6", "hmt.unselected=zero_grad", "trainer.accumulate_grad_batches=2",
                 f"output_dir={cache.parent / 'acc'}"), extra_callbacks=[accumulated])
    assert len(accumulated.rows) == 12 and len(accumulated.selections) == 6  # one entry per optimizer step
    assert accumulated.selections == plain.selections == [r["selection"] for r in plain.rows]
    assert len(set(plain.selections)) > 1  # HMT picked more than one LoRA in these steps
    for first, second in zip(accumulated.rows[::2], accumulated.rows[1::2], strict=True):
        assert first["step"] == second["step"]
        assert first["selection"] == second["selection"] == accumulated.selections[first["step"]]
        assert first["forward"] == second["forward"]  # the same adapters in the forward, the same ones zeroed


class Gradients(L.Callback):
    """The trained weights before the first step, the batches of that step, the gradient the optimizer gets."""

    def __init__(self) -> None:
        self.batches: list[dict] = []

    def on_train_start(self, trainer, pl_module):
        self.initial = {k: v.detach().clone() for k, v in pl_module.trained_parameters().items()}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches.append({k: v.clone() for k, v in batch.items()})

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads = {k: None if p.grad is None else p.grad.clone() for k, p in pl_module.trained_parameters().items()}


def test_the_step_follows_the_mean_of_the_micro_batches_gradients(cache, tiny_cfg):
    """Accumulating 2 micro-batches of 1 gives the optimizer the mean of their gradients (each micro-batch's loss
    with its own draws), as one batch of 2 averages its samples' losses."""
    cfg = tiny_cfg("trainer.max_steps=1", "trainer.accumulate_grad_batches=2", "rcl.enabled=false",
                   "lora.dropout=0.1", "data.caption_dropout=0.3", "optim.grad_clip=0")
    seen = Gradients()
    run(cfg, extra_callbacks=[seen])
    assert len(seen.batches) == 2 and seen.batches[0]["index"].tolist() != seen.batches[1]["index"].tolist()

    by_hand = RelationModule(cfg)  # the same base (the tiny preset's seed), given the run's initial adapters
    params = by_hand.trained_parameters()
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(seen.initial[name])
    names = list(params)
    micro_grads = []
    for batch_idx, batch in enumerate(seen.batches):  # micro-batches 0 and 1 of step 0, as training runs them
        with warnings.catch_warnings():  # self.log outside a Trainer
            warnings.simplefilter("ignore")
            loss = by_hand.training_step(batch, batch_idx)["loss"]
        micro_grads.append(torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True))
    assert by_hand.selections == [by_hand.select_lora(0)]
    compared = 0
    for name, g0, g1 in zip(names, *micro_grads, strict=True):
        got = seen.grads[name]
        if g0 is None:  # an adapter outside this step's forward: no gradient in either
            assert got is None and g1 is None, name
            continue
        torch.testing.assert_close(got, (g0 + g1) / 2, rtol=0, atol=1e-6 * max(1.0, float(got.abs().max())))
        if got.abs().max() > 0:  # (lora_A's gradient is 0 while lora_B is still 0)
            assert not torch.allclose(got, g0) and not torch.allclose(got, g1), name  # both micro-batches count
            compared += 1
    assert compared > 0


def _last(out):
    return torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)


def test_an_accumulating_run_resumes_exactly(cache, tiny_cfg, tmp_path):
    common = ("trainer.max_steps=4", "trainer.checkpoint_every=2", "trainer.accumulate_grad_batches=2",
              "lora.dropout=0.1", "data.caption_dropout=0.3", "optim.warmup_steps=1")
    full_seen, resumed_seen = Batches(), Batches()
    out = run(tiny_cfg(*common, f"output_dir={tmp_path / 'full'}"), extra_callbacks=[full_seen])
    resumed = run(tiny_cfg(*common, f"output_dir={tmp_path / 'resumed'}",
                           f"resume={out / 'checkpoints' / 'step000002.ckpt'}"), extra_callbacks=[resumed_seen])
    # the same clips and draws per micro-batch after step 2 (the data stream and the micro-batch count)
    tail = [(r["step"], r["micro"], r["index"], r["selection"]) for r in full_seen.rows[4:]]
    assert [(r["step"], r["micro"], r["index"], r["selection"]) for r in resumed_seen.rows] == tail
    assert all(torch.equal(a["sigma"], b["sigma"]) for a, b in zip(full_seen.rows[4:], resumed_seen.rows, strict=True))
    _, a, _ = load_adapters(out / "adapters" / "relvid_adapters.safetensors")
    _, b, _ = load_adapters(resumed / "adapters" / "relvid_adapters.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "resumed adapters differ"
    ca, cb = _last(out), _last(resumed)
    assert ca["global_step"] == cb["global_step"] == 4
    sa, sb = ca["optimizer_states"][0]["state"], cb["optimizer_states"][0]["state"]
    assert sa.keys() == sb.keys() and sa
    for i in sa:
        assert all(torch.equal(sa[i][k], sb[i][k]) for k in sa[i]), f"optimizer state {i} differs"
    bank_a = next(v for k, v in ca["callbacks"].items() if "MemoryBank" in k)
    bank_b = next(v for k, v in cb["callbacks"].items() if "MemoryBank" in k)
    for key in bank_a:
        va, vb = bank_a[key], bank_b[key]
        assert torch.equal(va, vb) if isinstance(va, torch.Tensor) else va == vb


def test_a_crash_between_micro_batches_leaves_no_half_step_checkpoint(cache, tiny_cfg, tmp_path, capsys):
    class Boom(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 1 and outputs["micro"] == 0:  # step 2 has run its first micro-batch
                raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        run(tiny_cfg("trainer.max_steps=3", "trainer.accumulate_grad_batches=2"), extra_callbacks=[Boom()])
    assert not (tmp_path / "run" / "checkpoints" / "on_exception.ckpt").exists()
    assert "stopped inside step 2" in capsys.readouterr().out


class Measured(RelationAccuracyCallback):
    """The callback's scheduling with its sampling and judging left out: the steps it would measure at."""

    def setup(self, trainer, pl_module, stage):
        self.steps: list[int] = []

    def measure(self, trainer, pl_module, step):
        self.steps.append(step)
        return {}


def test_callbacks_act_once_per_optimizer_step(cache, tiny_cfg, tmp_path):
    cfg = tiny_cfg("trainer.max_steps=4", "trainer.checkpoint_every=1", "trainer.accumulate_grad_batches=2")
    accuracy = Measured(cfg)
    accuracy.every_n_steps = 2
    out = run(cfg, extra_callbacks=[accuracy])
    assert accuracy.steps == [2, 4]  # not at step 0, not once per micro-batch
    snapshots = sorted(p.name for p in (out / "loras").glob("*.safetensors"))
    assert snapshots == [f"shaking_hands_step{s:06d}.safetensors" for s in (1, 2, 3, 4)]
    # each snapshot holds the adapters of its step's checkpoint (written when the optimizer step ended)
    for step in (1, 2, 3):
        spec, state = adapters_from_checkpoint(out / "checkpoints" / f"step{step:06d}.ckpt")
        expected = tmp_path / f"expected{step}.safetensors"
        write_inference_lora(state, spec, expected, "diffusers")
        want, got = load_file(expected), load_file(out / "loras" / f"shaking_hands_step{step:06d}.safetensors")
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want), step
    logs = scalars(out / "tensorboard")
    assert len(logs["train/loss"]) == 4 and len(logs["train/selected_lora"]) == 4  # one point per optimizer step


def test_the_logged_loss_is_the_mean_of_the_micro_batches_losses(cache, tiny_cfg):
    class Losses(L.Callback):
        losses: list[float] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            # outputs["loss"] is what Lightning backpropagated: the loss divided by accumulate_grad_batches
            self.losses.append(float(outputs["loss"]) * trainer.accumulate_grad_batches)

    out = run(tiny_cfg("trainer.max_steps=2", "trainer.accumulate_grad_batches=2", "rcl.enabled=false"),
              extra_callbacks=[Losses()])
    logged = scalars(out / "tensorboard")["train/loss"]
    expected = [(Losses.losses[0] + Losses.losses[1]) / 2, (Losses.losses[2] + Losses.losses[3]) / 2]
    assert logged == pytest.approx(expected, rel=1e-5)


def test_the_command_line_trains_an_fp8_base_with_accumulation(cache, repo_root, tmp_path):
    code = main(["train", str(repo_root / "configs" / "tiny.yaml"), "--relation", "handshake",
                 f"data.cache_dir={cache}", f"output_dir={tmp_path / 'cli'}", "trainer.max_steps=3",
                 "model.storage_dtype=float8_e4m3fn", "trainer.accumulate_grad_batches=2",
                 "trainer.progress_bar=false"])
    assert code == 0
    info = json.loads((tmp_path / "cli" / RUN_INFO_NAME).read_text())["transformer"]
    assert info["storage_dtype"] == "float8_e4m3fn" and info["parameter_bytes"]["cpu"]["float8_e4m3fn"] > 0
    assert _last(tmp_path / "cli")["global_step"] == 3
    assert (tmp_path / "cli" / "adapters" / "relvid_adapters.safetensors").is_file()


def test_accumulate_grad_batches_must_be_a_positive_integer(tiny_cfg):
    for value in ("0", "-1"):
        with pytest.raises(ConfigError, match="trainer.accumulate_grad_batches: must be an integer >= 1"):
            tiny_cfg(f"trainer.accumulate_grad_batches={value}")
    with pytest.raises(ConfigError, match="trainer.accumulate_grad_batches"):
        tiny_cfg("trainer.accumulate_grad_batches=1.5")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_deepspeed_accumulates_to_the_same_step_as_one_gpu(cache, repo_root, tmp_path):
    """DeepSpeed divides the loss by its gradient_accumulation_steps, which Lightning has already done: relvid's
    DeepSpeed divides once, so its step equals the plain single-GPU one. optim.eps=1 makes AdamW's first update
    proportional to the gradient (with the usual eps it is nearly its sign, blind to a factor of 2)."""
    pytest.importorskip("deepspeed")
    from relvid.config import load_config

    def train(name, *strategy):
        cfg = load_config([repo_root / "configs" / "tiny.yaml", *strategy], [
            "trainer.devices=1", "trainer.accelerator=gpu", "trainer.precision=32-true", "trainer.max_steps=1",
            "trainer.accumulate_grad_batches=2", "trainer.progress_bar=false", "hmt.enabled=false",
            "rcl.enabled=false", "optim.eps=1.0", "trainer.lora_formats=[]", f"data.cache_dir={cache}",
            f"output_dir={tmp_path / name}"])
        run(cfg)
        return load_adapters(tmp_path / name / "adapters" / "relvid_adapters.safetensors")[1]

    plain = train("plain")
    deepspeed = train("deepspeed", repo_root / "configs" / "strategy" / "deepspeed_stage_2.yaml")
    assert plain.keys() == deepspeed.keys()
    moved = [k for k in plain if plain[k].abs().max() > 0]
    assert moved
    for key in plain:
        torch.testing.assert_close(deepspeed[key], plain[key], rtol=1e-3, atol=1e-6)

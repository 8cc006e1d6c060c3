"""ReVersion's parts: the steering loss against a direct float64 computation, the importance-sampled noise
levels, the new token in a tiny T5 and in the toy encoder, its file, and the config's refusals."""

import math

import pytest
import torch

from relvid.config import ConfigError, load_config
from relvid.models.adapter_file import read_reversion, read_triplet, resolve_adapter_file
from relvid.models.lora import LoRAConfigError
from relvid.models.reversion import (
    ReVersionError,
    build_token,
    encode_with_token,
    importance_cdf,
    importance_sigmas,
    load_reversion_file,
    save_reversion_file,
    steering_loss,
    steering_terms,
)
from relvid.models.t5 import T5TextEncoder
from relvid.toy.text import ToyTextEncoder
from relvid.training.module import ReVersionMemoryError, reversion_memory_plan
from tests.helpers.preprocess import save_tiny_t5

CAPTION = "A person is <R> a person."


@pytest.fixture(scope="module")
def t5_root(tmp_path_factory):
    return save_tiny_t5(tmp_path_factory.mktemp("mochi"))


def test_steering_loss_equals_a_direct_float64_computation():
    f64 = {"dtype": torch.float64}
    relation = torch.tensor([0.3, 0.2, 1.0], **f64, requires_grad=True)
    positives = torch.tensor([[1.0, 0.0, 0.0], [0.5, 2.0, 0.0]], **f64, requires_grad=True)
    negatives = torch.tensor([[0.0, 0.0, 3.0], [-1.0, 1.0, 1.0], [2.0, -2.0, 0.5]], **f64)
    tau = 0.07
    loss = steering_loss(relation, positives, negatives, tau)

    def cos(a, b):
        return sum(x * y for x, y in zip(a, b, strict=True)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))

    r = relation.tolist()
    pos = [math.exp(cos(r, p) / tau) for p in positives.tolist()]
    neg = [math.exp(cos(r, n) / tau) for n in negatives.tolist()]
    expected = -math.log(sum(pos) / (sum(pos) + sum(neg)))
    assert loss.dtype == torch.float64 and expected > 1.0
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    loss.backward()
    assert relation.grad is not None and relation.grad.abs().sum() > 0
    assert positives.grad is None  # only <R> is steered: the basis is a constant
    # pulled toward the positives: a step against the gradient lowers the loss
    moved = (relation - 0.01 * relation.grad).detach()
    assert steering_loss(moved, positives.detach(), negatives, tau) < loss


def test_importance_sampling_inverts_the_density_and_favours_noisy_levels():
    alpha = 0.5
    sigma = importance_sigmas(40000, torch.Generator().manual_seed(0), alpha)
    again = importance_sigmas(40000, torch.Generator().manual_seed(0), alpha)
    assert torch.equal(sigma, again) and sigma.dtype == torch.float32
    assert 0 <= float(sigma.min()) and float(sigma.max()) <= 1
    u = torch.rand(40000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert torch.allclose(importance_cdf(sigma.double(), alpha), u, atol=1e-6)  # the CDF's inverse
    # E[sigma] of 1 - alpha cos(pi sigma) is 1/2 + 2 alpha / pi^2 (uniform: 1/2)
    assert float(sigma.mean()) == pytest.approx(0.5 + 2 * alpha / math.pi ** 2, abs=0.006)
    assert float((sigma > 0.5).float().mean()) > 0.6


def test_the_new_t5_token_is_a_new_row_and_only_it_gets_a_gradient(t5_root):
    encoder = T5TextEncoder.from_folder(t5_root)
    before = len(encoder.tokenizer)
    table = encoder.model.get_input_embeddings().weight.detach().clone()
    token = build_token(encoder)
    assert token.spec.token_id == before and token.spec.encoder == "t5" and token.spec.vectors == ("embedding",)
    and_id = encoder.tokenizer("and", add_special_tokens=False).input_ids[-1]
    assert torch.equal(token.embedding.detach(), table[and_id])  # initialised from "and"
    embeds, mask = encoder.encode_learned([CAPTION, "A dog is <R> a cat."], "<R>", token.vectors())
    (embeds * mask[..., None]).sum().backward()
    assert token.embedding.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in encoder.model.parameters())
    # the token in place of "and", with "and"'s row, is the sentence with "and"
    (got, _), = encode_with_token(encoder, ["A dog is <R> a cat."], token.spec, {"embedding": table[and_id]})
    (ref, _), = encoder.encode(["A dog is and a cat."])
    assert got.shape == ref.shape and torch.allclose(got, ref, atol=1e-6)
    positives, negatives = steering_terms(encoder, CAPTION, "<R>", ["above", "with"])
    assert positives.shape[1] == negatives.shape[1] == 32 and len(negatives) == 2  # "person" twice


def test_the_toy_token_learns_its_own_and_its_previous_word_vector():
    encoder = ToyTextEncoder()
    assert encoder.words(CAPTION) == ["a", "person", "is", "<r>", "a", "person", "</s>"]
    token = build_token(encoder)
    assert token.spec.token_id is None and token.spec.vectors == ("embedding", "previous")
    init, _ = encoder.encode_learned([CAPTION], "<R>", token.vectors())
    (ref, _), = encoder.encode(["A person is and a person."])
    assert torch.allclose(init[0], ref)
    own = {"embedding": token.embedding + 1.0, "previous": token.previous.detach()}
    changed = (encoder.encode_learned([CAPTION], "<R>", own)[0][0] != init[0]).any(dim=1)
    assert changed.tolist() == [False, False, False, True, False, False, False]  # the token's own row
    prev = {"embedding": token.embedding.detach(), "previous": token.previous + 1.0}
    changed = (encoder.encode_learned([CAPTION], "<R>", prev)[0][0] != init[0]).any(dim=1)
    assert changed.tolist() == [False, False, False, False, True, False, False]  # the word after it


def test_the_file_round_trips_and_is_not_a_lora(tmp_path, t5_root):
    encoder = ToyTextEncoder()
    token = build_token(encoder)
    state = {k: v.detach() + 0.5 for k, v in token.vectors().items()}
    path = save_reversion_file(tmp_path / "relvid_adapters.safetensors", state, token.spec, {"step": "3"})
    spec, loaded, meta = load_reversion_file(path)
    assert spec == token.spec and meta == {"step": "3"} and all(torch.equal(loaded[k], state[k]) for k in state)
    assert resolve_adapter_file(tmp_path) == (path, "reversion")
    assert read_reversion(tmp_path)[0] == spec
    with pytest.raises(LoRAConfigError, match="ReVersion relation token"):
        read_triplet(path)
    with pytest.raises(ReVersionError, match="model.text_encoder"):
        encode_with_token(T5TextEncoder.from_folder(t5_root), ["A dog is <R> a cat."], spec, loaded)
    with pytest.raises(ReVersionError, match="embedding"):
        save_reversion_file(tmp_path / "bad.safetensors", {"embedding": torch.zeros(3)}, spec)


def test_the_baseline_config_and_its_refusals(repo_root):
    cfg = load_config([repo_root / "configs" / "tiny.yaml", repo_root / "configs" / "baselines" / "reversion.yaml"])
    assert cfg.method == "reversion" and cfg.reversion.caption == "A person is <R> a person."
    # ReVersion's defaults: batch 2 x gradient accumulation 4, lr 2.5e-4 x the effective batch, constant
    assert cfg.data.batch_size == 2 and cfg.trainer.accumulate_grad_batches == 4
    assert cfg.optim.lr == pytest.approx(2.5e-4 * 2 * 4) and cfg.optim.schedule == "constant"
    assert cfg.trainer.max_steps == 3000 and cfg.reversion.steer_weight == 0.01
    toy = load_config([repo_root / "configs" / "toy" / "dreamrelation.yaml",
                       repo_root / "configs" / "toy" / "methods" / "reversion.yaml"], ["data.cache_dir=x"])
    assert toy.method == "reversion" and toy.model.text_encoder == "toy" and toy.trainer.max_steps == 1000
    base = ["method=reversion", "hmt.enabled=false", "rcl.enabled=false", "trainer.lora_formats=[]",
            "data.caption_dropout=0"]
    for override, key in (("hmt.enabled=true", "hmt.enabled"), ("rcl.enabled=true", "rcl.enabled"),
                          ("data.caption_dropout=0.1", "data.caption_dropout"),
                          ("reversion.caption=A person near a person.", "reversion.caption"),
                          ("trainer.strategy=fsdp", "trainer.strategy"),
                          ("relation_accuracy.every_n_steps=5", "relation_accuracy.every_n_steps")):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config([], [*base, "relation_accuracy.judge.base_url=http://127.0.0.1:9/v1",
                             "relation_accuracy.judge.model=m", override])


def test_a_gpu_too_small_for_t5_beside_the_transformer_is_refused():
    gb = 1024 ** 3
    plan = reversion_memory_plan(20 * gb, int(9.5 * gb), 80 * gb)  # Mochi bf16 + T5-XXL bf16 on an H100
    assert plan["total"] == pytest.approx(37.5)
    with pytest.raises(ReVersionMemoryError, match="24 GB"):
        reversion_memory_plan(20 * gb, int(9.5 * gb), 24 * gb)


def test_a_truncated_reversion_file_is_named(tmp_path):
    from relvid.models.reversion import ReVersionError, load_reversion_file

    (tmp_path / "token.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\"")
    with pytest.raises(ReVersionError, match=r"token.safetensors: not a readable safetensors file"):
        load_reversion_file(tmp_path / "token.safetensors")

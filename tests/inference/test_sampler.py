"""The sampler against an oracle transformer: pins the flow-matching sign and timestep scale.

The oracle ignores its weights and returns the exact velocity toward a fixed x0 under our
convention. If the sign or the timestep scale of training (relvid.losses.flow_matching), our
sampler and diffusers' MochiPipeline disagree, sampling from pure noise misses x0.
"""

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, MochiPipeline, MochiTransformer3DModel
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.pipelines.mochi.pipeline_mochi import linear_quadratic_schedule

from relvid.inference.sampler import linear_quadratic_sigmas, sample
from relvid.models.backbone import TINY_CONFIG

SHAPE = (1, 4, 3, 4, 6)  # (B, C, F, H, W)


class OracleMochi(MochiTransformer3DModel):
    """Returns the exact velocity toward x0_cond for rows whose text embedding is non-zero, else x0_uncond.

    sigma = 1 - timestep / 1000, noise_hat = (x - (1 - sigma) x0) / sigma, v = x0 - noise_hat
    (times `sign`, to show that a wrong sign misses). Records batch sizes and timesteps.
    """

    def forward(self, hidden_states, encoder_hidden_states, timestep, encoder_attention_mask,
                attention_kwargs=None, return_dict=True):
        self.batch_sizes.append(hidden_states.shape[0])
        self.timesteps.append(timestep[0].item())
        sigma = (1 - timestep.double() / 1000).clamp_min(1e-6).view(-1, 1, 1, 1, 1)  # guard sigma ~ 0
        is_cond = encoder_hidden_states.abs().flatten(1).sum(1) > 0  # (B,)
        x0 = torch.where(is_cond.view(-1, 1, 1, 1, 1), self.x0_cond, self.x0_uncond).double()
        noise_hat = (hidden_states.double() - (1 - sigma) * x0) / sigma
        v = (self.sign * (x0 - noise_hat)).to(hidden_states.dtype)
        return Transformer2DModelOutput(sample=v) if return_dict else (v,)


def _oracle(x0_cond, x0_uncond, sign=1.0):
    model = OracleMochi(**TINY_CONFIG)
    model.x0_cond, model.x0_uncond, model.sign = x0_cond, x0_uncond, sign
    model.batch_sizes, model.timesteps = [], []
    return model


def _setup(seed=0, cond_len=5, neg_len=5):
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(SHAPE, generator=g)
    x0_cond, x0_uncond = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    text = torch.randn(1, cond_len, 32, generator=g)
    text_mask = torch.ones(1, cond_len, dtype=torch.bool)
    negative = torch.zeros(1, neg_len, 32)  # the zeroed empty prompt
    negative_mask = torch.zeros(1, neg_len, dtype=torch.bool)
    return noise, x0_cond, x0_uncond, text, text_mask, negative, negative_mask


def _pipeline_sample(model, noise, text, text_mask, negative, negative_mask, num_steps, guidance_scale):
    pipe = MochiPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(invert_sigmas=True),
        vae=None, text_encoder=None, tokenizer=None, transformer=model,
    )
    pipe.set_progress_bar_config(disable=True)
    _, _, f, h, w = noise.shape
    return pipe(
        prompt_embeds=text, prompt_attention_mask=text_mask,
        negative_prompt_embeds=negative, negative_prompt_attention_mask=negative_mask,
        guidance_scale=guidance_scale, num_inference_steps=num_steps, latents=noise.clone(),
        height=8 * h, width=8 * w, num_frames=6 * (f - 1) + 1, output_type="latent", return_dict=False,
    )[0]


@pytest.mark.parametrize("num_steps,linear_steps", [(2, None), (8, None), (8, 3), (64, None), (65, 10)])
def test_linear_quadratic_sigmas_match_diffusers(num_steps, linear_steps):
    ours = linear_quadratic_sigmas(num_steps, 0.025, linear_steps)
    theirs = torch.tensor(linear_quadratic_schedule(num_steps, 0.025, linear_steps), dtype=torch.float64)
    assert ours.shape == (num_steps + 1,)
    assert ours[0].item() == 1.0 and ours[-1].item() == 0.0
    torch.testing.assert_close(ours[:-1], theirs, rtol=0, atol=1e-12)


def test_linear_quadratic_sigmas_rejects_degenerate_splits():
    with pytest.raises(ValueError, match="linear_steps"):
        linear_quadratic_sigmas(1)
    with pytest.raises(ValueError, match="linear_steps"):
        linear_quadratic_sigmas(8, linear_steps=8)


def test_sampler_lands_on_x0_without_guidance():
    noise, x0, _, text, text_mask, *_ = _setup()
    model = _oracle(x0, torch.zeros_like(x0))
    out = sample(model, noise, text, text_mask, num_steps=16, guidance_scale=6.0)  # no negative: cond only
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-5)
    assert model.batch_sizes == [1] * 16
    # landing alone does not pin the scale (a reversed scale can land by a fluke of the uniform
    # linear part); pure noise must be fed as timestep 0, rising toward 1000
    _assert_timesteps_rise_from_zero(model.timesteps, 16)


def test_sampler_finishes_a_partly_noised_latent_from_given_sigmas():
    """Given sigmas, the sampler starts at sigmas[0] from the latent it is handed (not from pure noise)."""
    noise, x0, _, text, text_mask, *_ = _setup()
    model = _oracle(x0, torch.zeros_like(x0))
    start = 0.5 * x0 + 0.5 * noise  # x0 noised to sigma 0.5
    out = sample(model, start, text, text_mask, sigmas=torch.linspace(0.5, 0.0, 5, dtype=torch.float64))
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-5)
    assert model.timesteps == [500.0, 625.0, 750.0, 875.0]
    for bad in ([1.0, 0.5], [0.5, 0.6, 0.0], [0.0]):
        with pytest.raises(ValueError, match="must decrease strictly and end at 0"):
            sample(model, start, text, text_mask, sigmas=torch.tensor(bad, dtype=torch.float64))


def _assert_timesteps_rise_from_zero(timesteps, num_steps):
    assert len(timesteps) == num_steps and timesteps[0] == 0.0
    assert all(a < b for a, b in zip(timesteps, timesteps[1:], strict=False)) and timesteps[-1] < 1000.0


def test_sampler_with_cfg_lands_on_the_guided_target():
    # the CFG mix of two exact velocities is the exact velocity toward x0_u + g (x0_c - x0_u)
    noise, x0_c, x0_u, text, text_mask, negative, negative_mask = _setup(cond_len=5, neg_len=3)
    model = _oracle(x0_c, x0_u)
    out = sample(model, noise, text, text_mask, negative, negative_mask, num_steps=16, guidance_scale=6.0)
    torch.testing.assert_close(out, x0_u + 6.0 * (x0_c - x0_u), rtol=0, atol=1e-4)
    assert model.batch_sizes == [2] * 16  # uncond and cond in one forward, text padded to one length


def test_guidance_scale_one_skips_the_unconditional_pass():
    noise, x0_c, x0_u, text, text_mask, negative, negative_mask = _setup()
    model = _oracle(x0_c, x0_u)
    out = sample(model, noise, text, text_mask, negative, negative_mask, num_steps=8, guidance_scale=1.0)
    torch.testing.assert_close(out, x0_c, rtol=0, atol=1e-5)
    assert model.batch_sizes == [1] * 8


def test_wrong_sign_does_not_land_on_x0():
    noise, x0, _, text, text_mask, *_ = _setup()
    out = sample(_oracle(x0, torch.zeros_like(x0), sign=-1.0), noise, text, text_mask, num_steps=16)
    assert (out - x0).abs().max().item() > 0.5


@pytest.mark.parametrize("guidance_scale", [1.0, 6.0])
def test_diffusers_pipeline_lands_on_x0_and_agrees_with_our_sampler(guidance_scale):
    noise, x0_c, x0_u, text, text_mask, negative, negative_mask = _setup(seed=1)
    expected = x0_u + guidance_scale * (x0_c - x0_u)
    pipe_oracle, our_oracle = _oracle(x0_c, x0_u), _oracle(x0_c, x0_u)
    theirs = _pipeline_sample(pipe_oracle, noise, text, text_mask, negative, negative_mask, 16, guidance_scale)
    ours = sample(our_oracle, noise, text, text_mask, negative, negative_mask, num_steps=16,
                  guidance_scale=guidance_scale)
    torch.testing.assert_close(theirs, expected, rtol=0, atol=1e-4)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-4)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)
    _assert_timesteps_rise_from_zero(pipe_oracle.timesteps, 16)
    # same timesteps up to float32 rounding of (1 - sigma) * 1000
    our_t, pipe_t = torch.tensor(our_oracle.timesteps), torch.tensor(pipe_oracle.timesteps)
    torch.testing.assert_close(our_t, pipe_t, rtol=0, atol=1e-3)


@pytest.mark.filterwarnings("ignore:In CPU autocast")  # diffusers' float32 RoPE autocast on CPU
def test_sampler_runs_a_real_tiny_mochi_with_padded_text():
    torch.manual_seed(0)
    model = MochiTransformer3DModel(**TINY_CONFIG).eval()
    noise, _, _, text, text_mask, negative, negative_mask = _setup(cond_len=4, neg_len=2)
    text_mask[:, -1] = False
    out = sample(model, noise, text, text_mask, negative, negative_mask, num_steps=2, guidance_scale=6.0)
    assert out.shape == SHAPE and torch.isfinite(out).all()

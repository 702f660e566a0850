"""Every sampler x step count x prediction type x schedule, against an exact denoiser for Gaussian data.

With data x0 ~ N(MU, SD^2) per pixel, E[x0 | x_t] is known in closed form, so the only error left is the
sampler's own: a correct sampler starts in the noisiest group, visits every group, stays finite and ends
with the data's mean, and, with enough steps, its sd.
"""

import pytest
import torch
from diffusers import DDPMScheduler
from torch import nn

from tdcdiff.grouping import make_groups
from tdcdiff.pipeline import SAMPLERS, TIMESTEP_SPACING, sample
from tdcdiff.router import Router

MU, SD = 0.5, 0.2
N = 4
SHAPE = (1, 4, 4)
BATCH = 256  # 4096 pixels: the standard error of the mean is about SD / 64 = 0.003


class ExactGaussianDenoiser(nn.Module):
    """The Bayes-optimal prediction (epsilon, v or x0) for N(MU, SD^2) data; records the timesteps it saw."""

    def __init__(self, scheduler):
        super().__init__()
        self.register_buffer("alpha_bar", scheduler.alphas_cumprod.to(torch.float64))
        self.kind = scheduler.config.prediction_type
        self.seen: list[int] = []

    def forward(self, x, t):
        self.seen.extend(t.tolist())
        a = self.alpha_bar[t].view(-1, 1, 1, 1)
        x = x.double()
        x0 = MU + SD**2 * a.sqrt() / (a * SD**2 + 1 - a) * (x - a.sqrt() * MU)
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
        out = {"epsilon": eps, "sample": x0, "v_prediction": a.sqrt() * eps - (1 - a).sqrt() * x0}[self.kind]
        return out.float()


def training_schedule(T, beta_schedule, prediction_type):
    # At T != 1000 the linear betas are scaled by 1000/T (as IDDPM does) so that x_{T-1} is pure noise,
    # which is what every sampler starts from.
    scale = {"beta_start": 1e-4 * 1000 / T, "beta_end": 0.02 * 1000 / T} if beta_schedule == "linear" else {}
    return DDPMScheduler(num_train_timesteps=T, beta_schedule=beta_schedule, prediction_type=prediction_type,
                         clip_sample=True, **scale)


def step_counts(T):
    counts = {1, 2, 3, N - 1, N, 50, T - 1, T}
    if T == 1000:  # T-1 and T steps are covered at the small T, where they cost 50 calls instead of 1000
        counts -= {T - 1, T}
    return sorted(c for c in counts if c <= T)


# A sampler with enough steps gets close to the data's sd; each solver's own discretisation error at 50
# steps leaves it a little below (measured: ddpm 0.157-0.174, ddim 0.172-0.189, dpm-solver++ 0.186-0.198).
MIN_SD_AT_50_STEPS = {"ddpm": 0.145, "ddim": 0.16, "dpm-solver++": 0.175}


@pytest.mark.parametrize("T", [1000, 50])
@pytest.mark.parametrize("beta_schedule", ["linear", "squaredcos_cap_v2"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_sampler_recovers_gaussian_data_with_an_exact_denoiser(sampler, prediction_type, beta_schedule, T):
    scheduler = training_schedule(T, beta_schedule, prediction_type)
    grouping = make_groups("uniform", N, scheduler)
    experts = [ExactGaussianDenoiser(scheduler) for _ in range(N)]
    router = Router(experts, grouping)
    for steps in step_counts(T):
        for expert in experts:
            expert.seen.clear()
        result = sample(router, scheduler, sample_shape=SHAPE, sampler=sampler, steps=steps, num_images=BATCH,
                        batch_size=BATCH, seed=0, progress=False)
        where = f"{sampler}, {steps} of T={T} steps"
        images = result.images
        assert result.timestep_spacing == TIMESTEP_SPACING == "trailing"
        assert torch.isfinite(images).all(), f"{where}: non-finite pixels"
        assert len(result.timesteps) == steps and len(set(result.timesteps)) == steps, where
        assert result.timesteps[0] == T - 1, f"{where}: first step at t={result.timesteps[0]}, not T-1"
        assert experts[-1].seen[:1] == [T - 1], f"{where}: the noisiest group's expert must take the first step"
        for expert, group in zip(experts, grouping.groups):
            assert all(group.start <= t < group.end for t in expert.seen), where
            if steps >= N:
                assert expert.seen, f"{where}: group {group.index} ({group.start}-{group.end - 1}) never visited"
        mean, sd = images.mean().item(), images.std().item()
        assert abs(mean - MU) < 0.015, f"{where}: mean {mean:.3f}, data {MU}"
        if steps == 1:
            # One step from pure noise returns E[x0 | x_{T-1}], which hardly depends on the noise.
            assert sd < 0.02, f"{where}: sd {sd:.3f}; one step should give the posterior mean, sd near 0"
        elif steps >= 50:
            assert MIN_SD_AT_50_STEPS[sampler] < sd < SD + 0.01, f"{where}: sd {sd:.3f}, data {SD}"
        else:
            assert 0.005 < sd < SD + 0.01, f"{where}: sd {sd:.3f}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_half_precision_models_sample(dtype, sampler, tiny_unet, scheduler):
    full = sample(tiny_unet, scheduler, sample_shape=(1, 8, 8), sampler=sampler, steps=3, num_images=2,
                  progress=False)
    half = sample(tiny_unet.to(dtype), scheduler, sample_shape=(1, 8, 8), sampler=sampler, steps=3, num_images=2,
                  progress=False)
    assert half.images.dtype == torch.float32 and torch.isfinite(half.images).all()
    assert (half.images - full.images).abs().mean() < 0.03  # same model, rounded weights

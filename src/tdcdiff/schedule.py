"""Noise schedules (diffusers' DDPMScheduler) and the SNR helpers every later stage uses."""

from __future__ import annotations

import math

import torch
from diffusers import DDPMScheduler

from .prediction import check_prediction_type
from .settings import as_integer
from .user_warnings import warn

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
# 1: diffusers' linear and scaled_linear betas (1e-4 to 0.02, set for T=1000) at every T, as runs made before the
#    version was recorded have them; 2: those betas scaled by 1000/T, as improved-diffusion's
#    get_named_beta_schedule scales the linear ones, so alpha_bar falls to about the same level at every T.
SCHEDULE_VERSIONS = (1, 2)
SCHEDULE_VERSION = 2
BETA_START, BETA_END = 1e-4, 0.02  # DDPM's (Ho et al. 2020) for T=1000; diffusers' defaults
# A schedule whose alpha_bar at t=T-1 is above this leaves signal in x_{T-1}, where sampling starts from pure noise.
# For scale: the linear schedule at T=1000 ends at 4e-5, Stable Diffusion's scaled_linear (0.00085..0.012) at 4.7e-3,
# the unscaled linear one at T=100 at 0.364.
MAX_TERMINAL_ALPHA_BAR = 0.01
MAX_TIMESTEPS = 1_000_000  # T: far beyond any schedule in use; the schedule and the router allocate per timestep
# diffusers' DDPMScheduler variance types and those tdcdiff's samplers cannot use, with why.
VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range")
UNUSABLE_VARIANCES = {
    "fixed_large_log": "diffusers' DDPMScheduler.step takes the square root of this variance, log(beta_t) < 0: every "
                       "DDPM sample is NaN",
}


def make_scheduler(
    num_train_timesteps: int = 1000,
    beta_schedule: str = "linear",
    prediction_type: str = "epsilon",
    *,
    version: int | None = None,
) -> DDPMScheduler:
    """Build the training noise schedule.

    num_train_timesteps: T, the number of training timesteps.
    beta_schedule: "linear", "scaled_linear" or "squaredcos_cap_v2" (cosine).
    prediction_type: what the denoiser predicts: "epsilon", "v_prediction" or "sample" (x0).
    version: SCHEDULE_VERSIONS; None for the current one (SCHEDULE_VERSION). From version 2 the linear and
        scaled_linear betas, 1e-4..0.02 at T=1000, are scaled by 1000/T (improved-diffusion,
        gaussian_diffusion.get_named_beta_schedule); the same at T=1000 in every version.
    Raises ValueError for an unknown setting, a T that is not an integer (numpy's are taken), < 2 or >
    MAX_TIMESTEPS, or (version 2) a T so small that a scaled beta reaches 1.
    """
    version = SCHEDULE_VERSION if version is None else version
    num_train_timesteps = as_integer("num_train_timesteps", num_train_timesteps, note="T")
    if beta_schedule not in BETA_SCHEDULES:
        raise ValueError(f"unknown beta_schedule {beta_schedule!r}; choose one of {BETA_SCHEDULES}")
    check_prediction_type(prediction_type)
    if version not in SCHEDULE_VERSIONS:
        raise ValueError(f"unknown schedule_version {version}; choose one of {SCHEDULE_VERSIONS} (current: "
                         f"{SCHEDULE_VERSION})")
    if num_train_timesteps < 2:
        raise ValueError(f"num_train_timesteps must be at least 2, got {num_train_timesteps}")
    if num_train_timesteps > MAX_TIMESTEPS:  # the schedule allocates per timestep: refuse before torch does
        raise ValueError(f"num_train_timesteps must be at most {MAX_TIMESTEPS} (T; typical: 1000), "
                         f"got {num_train_timesteps}")
    scale = 1000 / num_train_timesteps if version >= 2 and beta_schedule != "squaredcos_cap_v2" else 1.0
    if scale * BETA_END >= 1:
        raise ValueError(
            f"num_train_timesteps (--timesteps) T={num_train_timesteps} is too few for the {beta_schedule} schedule: "
            f"its betas are scaled by 1000/T and the last, {scale * BETA_END:.3g}, would reach 1 (no signal left); "
            f"use T >= {math.floor(1000 * BETA_END) + 1} or the cosine schedule (squaredcos_cap_v2, --schedule)"
        )
    return DDPMScheduler(
        num_train_timesteps=num_train_timesteps,
        beta_schedule=beta_schedule,
        beta_start=scale * BETA_START,
        beta_end=scale * BETA_END,
        prediction_type=prediction_type,
        clip_sample=True,
    )


def sampled_alphas_cumprod(scheduler) -> torch.Tensor:
    """(T,) float32 alpha_bar_t = prod_{s<=t} (1 - beta_s) as every sampler builds it from the schedule's betas
    (samplers.make_sampler gives them `trained_betas`). A scheduler's own alphas_cumprod may differ at t=T-1:
    diffusers' DPM-Solver, UniPC and Euler classes put a zero terminal alpha_bar at 2^-24."""
    return torch.cumprod(1.0 - scheduler.betas, dim=0)


def terminal_alpha_bar(scheduler) -> float:
    """alpha_bar at t=T-1, as the samplers build it: 0 for a zero-terminal-SNR schedule (rescale_betas_zero_snr)."""
    return float(sampled_alphas_cumprod(scheduler)[-1])


def check_noise_levels(scheduler) -> None:
    """Raise ValueError unless the schedule's betas give one noise level per training timestep, alpha_bar_t =
    prod_{s<=t} (1 - beta_s), finite and falling from below 1 to above 0 (the last may be 0: zero terminal SNR),
    which training (x_t = sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) eps) and every sampler assume. A beta outside
    [0, 1) or NaN, a first beta of 0 (no noise at t=0) or a beta of 1 before t=T-1 break it: sampling then ends in
    NaN pixels, or training in a non-finite loss, blamed on the model."""
    alphas, steps = sampled_alphas_cumprod(scheduler), scheduler.config.num_train_timesteps
    if len(alphas) != steps:
        raise ValueError(f"the noise schedule has {len(alphas)} betas for num_train_timesteps={steps}; give one beta "
                         f"per training timestep")
    inside = torch.isfinite(alphas) & (alphas < 1) & torch.cat([alphas[:-1] > 0, alphas[-1:] >= 0])
    bad = (~inside | torch.cat([torch.zeros(1, dtype=torch.bool), alphas[1:] > alphas[:-1]])).nonzero()
    if len(bad):
        t = int(bad[0])
        raise ValueError(
            f"the noise schedule's betas give noise levels alpha_bar that are not finite and falling from below 1 to "
            f"above 0: alpha_bar at t={t} is {float(alphas[t]):.3g} (beta {float(scheduler.betas[t]):.3g}); every "
            f"beta must be in [0, 1), the first above 0, and 1 only at t=T-1 (zero terminal SNR); e.g. "
            f"make_scheduler(T) or DDPMScheduler(beta_schedule=...)")


def check_sampling_schedule(scheduler) -> None:
    """Raise ValueError if sampling cannot run on this schedule: noise levels that are not finite and falling within
    (0, 1] (check_noise_levels), a variance_type of UNUSABLE_VARIANCES, or epsilon prediction with zero terminal
    SNR (alpha_bar_{T-1} = 0), where x0 = (x_t - sqrt(1 - alpha_bar) eps) / sqrt(alpha_bar) divides by 0."""
    check_noise_levels(scheduler)
    variance = scheduler.config.get("variance_type")
    if variance in UNUSABLE_VARIANCES:
        raise ValueError(
            f"the noise schedule's variance_type is {variance!r}, which tdcdiff's samplers cannot use "
            f"({UNUSABLE_VARIANCES[variance]}); set variance_type to 'fixed_large' (the same variance beta_t, not "
            f"its log) or 'fixed_small' (the default)"
        )
    if scheduler.config.prediction_type == "epsilon" and terminal_alpha_bar(scheduler) == 0:
        raise ValueError(
            "the noise schedule has zero terminal SNR (alpha_bar is 0 at t=T-1, e.g. rescale_betas_zero_snr) and the "
            "model predicts epsilon, from which no x0 follows at t=T-1; use a v_prediction (or sample) model with "
            "this schedule, as Lin et al. 2024 do, or a schedule without rescale_betas_zero_snr"
        )


def check_given_schedule(scheduler, source: str) -> None:
    """Check a schedule the user gave (e.g. a pipeline's scheduler) before any work: check_sampling_schedule, and
    a warning when alpha_bar at t=T-1 is above MAX_TERMINAL_ALPHA_BAR (x_{T-1} is not noise; samples start
    from the wrong distribution). source: what the schedule came from, for the messages."""
    check_sampling_schedule(scheduler)
    last = terminal_alpha_bar(scheduler)
    if last > MAX_TERMINAL_ALPHA_BAR:
        warn(
            f"the noise schedule of {source} ends at alpha_bar = {last:.3g} at t=T-1 (x_(T-1) keeps "
            f"{math.sqrt(last):.0%} of the image), but sampling starts from pure noise there; samples start from the "
            f"wrong distribution. A schedule whose betas fit its T (e.g. linear betas scaled by 1000/T) ends near 0"
        )


def alphas_cumprod64(scheduler) -> torch.Tensor:
    """(T,) float64 alpha_bar_t = prod_{s<=t} (1 - beta_s), exact where the scheduler's float32 copy rounds
    1 - alpha_bar_t at small t (relative error ~1e-7 / beta_0)."""
    return torch.cumprod(1 - scheduler.betas.to(torch.float64), 0)


def _alpha_bar(scheduler, t) -> torch.Tensor:
    t = torch.as_tensor(t, dtype=torch.long)
    return scheduler.alphas_cumprod.to(torch.float64)[t]


def snr(scheduler, t) -> torch.Tensor:
    """Signal-to-noise ratio alpha_bar_t / (1 - alpha_bar_t) at timestep(s) t (float64)."""
    a = _alpha_bar(scheduler, t)
    return a / (1.0 - a)


def snr_db(scheduler, t) -> torch.Tensor:
    """SNR in decibels, 10 * log10(SNR(t))."""
    return 10.0 * torch.log10(snr(scheduler, t))


def training_target(scheduler, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What the denoiser should output at (x_t, t) under the scheduler's prediction type."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(x0, noise, t)
    return x0


def predict_x0(scheduler, x_t: torch.Tensor, model_output: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The clean image implied by a model output; errors here are comparable across timesteps."""
    abar = alphas_cumprod64(scheduler) if x_t.dtype == torch.float64 else scheduler.alphas_cumprod
    a = abar.to(x_t.device, x_t.dtype)[t].view(-1, 1, 1, 1)
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return (x_t - (1 - a).sqrt() * model_output) / a.sqrt()
    if kind == "v_prediction":
        return a.sqrt() * x_t - (1 - a).sqrt() * model_output
    return model_output

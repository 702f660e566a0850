"""Noise schedules (diffusers' DDPMScheduler) and the SNR helpers every later stage uses."""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def make_scheduler(
    num_train_timesteps: int = 1000,
    beta_schedule: str = "linear",
    prediction_type: str = "epsilon",
) -> DDPMScheduler:
    """Build the training noise schedule.

    num_train_timesteps: T, the number of training timesteps.
    beta_schedule: "linear", "scaled_linear" or "squaredcos_cap_v2" (cosine).
    prediction_type: what the denoiser predicts: "epsilon", "v_prediction" or "sample" (x0).
    """
    if beta_schedule not in BETA_SCHEDULES:
        raise ValueError(f"unknown beta_schedule {beta_schedule!r}; choose one of {BETA_SCHEDULES}")
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"unknown prediction_type {prediction_type!r}; choose one of {PREDICTION_TYPES}")
    if num_train_timesteps < 2:
        raise ValueError(f"num_train_timesteps must be at least 2, got {num_train_timesteps}")
    return DDPMScheduler(
        num_train_timesteps=num_train_timesteps,
        beta_schedule=beta_schedule,
        prediction_type=prediction_type,
        clip_sample=True,
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

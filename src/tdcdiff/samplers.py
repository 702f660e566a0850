"""The sampling schedulers (diffusers' DDPM, DDIM, DPM-Solver++) and the training timesteps they visit.

Every sampler is given the visited timesteps by `set_timesteps(timesteps=...)`, diffusers' custom-timestep
argument (DDPMScheduler and DPMSolverMultistepScheduler have it in diffusers 0.42.1). A diffusers scheduler
without it gets a subclass that adds it (DDIMScheduler here; in 0.42.1 UniPCMultistepScheduler and
DEISMultistepScheduler lack it too, and their steps read `timesteps` and `sigmas`, so theirs would set both),
and a factory in _FACTORIES: the sampling loop then treats every sampler alike.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

LEARNED_VARIANCES = ("learned", "learned_range")
# "trailing": the first step is at t = T-1 and the steps are evenly spaced below it, for every step count
# (diffusers' "leading" starts 1-step sampling at t=0; its "linspace" repeats a timestep at steps = T, which
# makes DPM-Solver++ divide by a zero step size).
TIMESTEP_SPACING = "trailing"


def visited_timesteps(steps: int, num_train_timesteps: int) -> list[int]:
    """The `steps` training timesteps a sampler visits, descending: T-1 first, "trailing" spacing
    (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed", table 2).

    They are diffusers' trailing timesteps, round(T - i * T / steps) - 1 for i = 0..steps-1, computed as
    diffusers computes them (np.arange with a float step), so every step count that worked keeps its
    timesteps; diffusers' float np.arange also returns a (steps+1)-th value, t = -1, at some counts (62 of
    1000 at T=1000, e.g. 61), which is dropped. Returns `steps` distinct ints in 0..T-1.
    Raises ValueError unless 1 <= steps <= T.
    """
    if not 1 <= steps <= num_train_timesteps:
        raise ValueError(f"steps must be between 1 and the training schedule's T={num_train_timesteps}, got {steps}")
    trailing = np.round(np.arange(num_train_timesteps, 0, -num_train_timesteps / steps))[:steps]
    return (trailing.astype(np.int64) - 1).tolist()


def _check_timesteps(timesteps: list[int], num_train_timesteps: int) -> None:
    if not timesteps or sorted(set(timesteps), reverse=True) != timesteps or timesteps[-1] < 0 \
            or timesteps[0] >= num_train_timesteps:
        raise ValueError(f"timesteps must be distinct and descending within 0..{num_train_timesteps - 1}, got "
                         f"{str(timesteps)[:200]}; e.g. visited_timesteps(steps, T)")


class VisitedDDIMScheduler(DDIMScheduler):
    """diffusers' DDIMScheduler stepping from each visited timestep to the next one, and from the last to x0.

    DDIMScheduler.step (diffusers 0.42.1) goes from t to t - T // steps, which is not the next visited timestep
    when steps does not divide T: at 13 of 1000 steps the last step, from t=76, ends at alpha_bar_0 instead of
    x0. Here `step` runs DDIMScheduler.step on the chain of the visited timesteps alone (their alphas_cumprod,
    ascending): there the step from index i goes to index i - 1, the next visited timestep, and from index 0 to
    final_alpha_cumprod (1, x0, with set_alpha_to_one). set_timesteps takes the visited timesteps
    (`timesteps=`, descending), as DDPMScheduler does, or a step count (then `visited_timesteps`).
    """

    def set_timesteps(self, num_inference_steps: int | None = None, device=None,
                      timesteps: list[int] | None = None) -> None:
        num_train = self.config.num_train_timesteps
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError("pass exactly one of num_inference_steps or timesteps")
        timesteps = [int(t) for t in timesteps] if timesteps is not None else visited_timesteps(
            num_inference_steps, num_train)
        _check_timesteps(timesteps, num_train)
        self.timesteps = torch.tensor(timesteps, dtype=torch.long, device=device)
        self.num_inference_steps = len(timesteps)
        self._chain_alphas = self.alphas_cumprod[timesteps[::-1]]
        self._chain_index = {t: i for i, t in enumerate(timesteps[::-1])}

    def step(self, model_output, timestep, sample, *args, **kwargs):
        full, steps = self.alphas_cumprod, self.num_inference_steps
        # DDIMScheduler.step reads alphas_cumprod[t] and alphas_cumprod[t - T // num_inference_steps]: on the
        # chain, with num_inference_steps = T, those are this step's and the next visited timestep's.
        self.alphas_cumprod, self.num_inference_steps = self._chain_alphas, self.config.num_train_timesteps
        try:
            return super().step(model_output, self._chain_index[int(timestep)], sample, *args, **kwargs)
        finally:
            self.alphas_cumprod, self.num_inference_steps = full, steps


def _ddpm(config, learned_variance: bool):
    declared = config.get("variance_type") or "fixed_small"  # not every scheduler's config has one
    if learned_variance:
        variance = declared if declared in LEARNED_VARIANCES else "learned_range"
    else:
        variance = "fixed_small" if declared in LEARNED_VARIANCES else declared
    return DDPMScheduler.from_config(config, variance_type=variance, timestep_spacing=TIMESTEP_SPACING)


def _ddim(config, learned_variance: bool):
    # set_alpha_to_one=False (Stable Diffusion's DDIM config) would end at alpha_bar_0 instead of x0
    return VisitedDDIMScheduler.from_config(config, timestep_spacing=TIMESTEP_SPACING, set_alpha_to_one=True)


def _dpm_solver(config, learned_variance: bool):
    # Its own sigma spacings (which refuse given timesteps) and a last step to sigma_min instead of x0 are off,
    # whatever a pipeline's scheduler config says.
    off = dict.fromkeys(("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas",
                         "use_flow_sigmas"), False)
    return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", variance_type=None,
                                                   timestep_spacing=TIMESTEP_SPACING, final_sigmas_type="zero", **off)


# name -> factory(training scheduler config, learned_variance) -> a scheduler taking set_timesteps(timesteps=...)
_FACTORIES = {"ddpm": _ddpm, "ddim": _ddim, "dpm-solver++": _dpm_solver}
SAMPLERS = tuple(_FACTORIES)


def make_sampler(name: str, train_scheduler, timesteps: list[int] | None = None, *, learned_variance: bool = False,
                 device=None):
    """A diffusers sampling scheduler sharing the training schedule's betas and prediction type.

    name: "ddpm", "ddim" or "dpm-solver++".
    train_scheduler: the DDPMScheduler the model was trained with.
    timesteps: the training timesteps to visit, descending (`visited_timesteps`); set on the scheduler (on
        `device`) when given. Call `set_timesteps(timesteps=...)` again before each new trajectory: it resets
        a multistep solver's history.
    learned_variance: the model outputs a variance half; DDPM then uses it (diffusers' "learned_range",
        unless the schedule says "learned"). DDIM and DPM-Solver never see it (`sample` passes them the
        prediction only), so DPM-Solver's own learned-variance slicing (`[:, :3]`, RGB only) is switched off.
    Every sampler visits exactly the given timesteps and ends at x0, whatever else the training scheduler's
    config (e.g. a pipeline's) says: trailing spacing, DDIM's set_alpha_to_one, DPM-Solver's sigma spacings and
    final sigma are set here.
    Raises ValueError for an unknown name, or timesteps that are not distinct and descending within 0..T-1.
    """
    if name not in _FACTORIES:
        raise ValueError(f"unknown sampler {name!r}; choose one of {SAMPLERS}")
    scheduler = _FACTORIES[name](train_scheduler.config, learned_variance)
    if timesteps is not None:
        timesteps = [int(t) for t in timesteps]
        _check_timesteps(timesteps, train_scheduler.config.num_train_timesteps)
        scheduler.set_timesteps(timesteps=timesteps, device=device)
    return scheduler

"""The sampler registry: diffusers' DDPM, DDIM, PNDM (PLMS), DPM-Solver++, UniPC, DEIS and Euler, and the training
timesteps they visit.

Every sampler is given the visited timesteps by `set_timesteps(timesteps=...)`, diffusers' custom-timestep
argument (DDPMScheduler and DPMSolverMultistepScheduler have it in diffusers 0.42.1). A diffusers scheduler
without it gets a mixin that adds it (DDIMScheduler, PNDMScheduler, UniPCMultistepScheduler,
DEISMultistepScheduler and EulerDiscreteScheduler here), and an entry in _SAMPLERS: the sampling loop then treats
every sampler alike, one model call per visited timestep. Every sampler is built from the training schedule's own
betas (`trained_betas`), so it follows whatever betas the training DDPMScheduler holds, also a beta_schedule its
own diffusers class lacks (e.g. "sigmoid"). A sampler's name is matched here only;
`sampler_for_scheduler` maps a pipeline's diffusers scheduler class to it.

This module imports neither torch nor diffusers (the CLI's help lists the samplers, and those imports take
seconds): a mixin is joined to its diffusers class on first use (`_scheduler_class`).
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .prediction import check_prediction_type

LEARNED_VARIANCES = ("learned", "learned_range")
# "trailing": the first step is at t = T-1 and the steps are evenly spaced below it, for every step count
# (diffusers' "leading" starts 1-step sampling at t=0; its "linspace" repeats a timestep at steps = T, which
# makes DPM-Solver++ divide by a zero step size).
TIMESTEP_SPACING = "trailing"
# A pipeline's scheduler config may choose other sigma spacings, which refuse given timesteps; they are switched
# off whatever it says (the keys a scheduler does not have are ignored by from_config).
_OWN_SIGMAS_OFF = dict.fromkeys(("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas",
                                 "use_flow_sigmas", "use_dynamic_shifting"), False)
# alpha_bar put in place of a zero-terminal-SNR schedule's alpha_bar_{T-1} = 0, so that sigma stays finite: the
# value diffusers' DPM-Solver++ and UniPC put there (scheduling_dpmsolver_multistep.py, "FP16 smallest subnormal")
ZERO_SNR_ALPHA_BAR = 2.0**-24


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


# What every sampler reads from the training schedule (make_sampler builds from its config and betas; sampling reads
# alpha_bar and the prediction type)
_SCHEDULE_NEEDS = ("config.num_train_timesteps", "config.prediction_type", "betas", "alphas_cumprod")


def check_train_scheduler(scheduler, name: str = "train_scheduler") -> None:
    """Raise ValueError unless `scheduler` is a discrete-time diffusers noise schedule of betas over T training
    timesteps (DDPMScheduler, as schedule.make_scheduler builds; DDIM's, Euler's and the other beta schedulers'
    carry the same), which the samplers, training and bundles read. A flow-matching or variance-exploding
    scheduler (FlowMatchEulerDiscreteScheduler, ScoreSdeVeScheduler, KarrasVeScheduler), a scheduler config as a
    dict, or None have no betas; a prediction_type diffusers does not take is refused too (schedule.
    check_prediction_type). name: the argument, for the message."""
    config = getattr(scheduler, "config", None)
    missing = [need for need in _SCHEDULE_NEEDS
               if not hasattr(config if need.startswith("config.") else scheduler, need.removeprefix("config."))]
    if missing:
        got = "None" if scheduler is None else f"a {type(scheduler).__name__}"
        fix = "; build it from a config dict with DDPMScheduler.from_config(config)" * isinstance(scheduler, dict)
        raise ValueError(f"{name} must be the training noise schedule, a diffusers scheduler of betas over T training "
                         f"timesteps (e.g. DDPMScheduler: a bundle's Bundle.scheduler, or make_scheduler(T)), got "
                         f"{got}, which has no {', '.join(missing)}{fix}")
    check_prediction_type(config.prediction_type, f"{name}.config.prediction_type")


def _check_timesteps(timesteps: list[int], num_train_timesteps: int) -> None:
    if not timesteps or sorted(set(timesteps), reverse=True) != timesteps or timesteps[-1] < 0 \
            or timesteps[0] >= num_train_timesteps:
        raise ValueError(f"timesteps must be distinct and descending within 0..{num_train_timesteps - 1}, got "
                         f"{str(timesteps)[:200]}; e.g. visited_timesteps(steps, T)")


def _given_timesteps(num_inference_steps: int | None, timesteps, num_train_timesteps: int) -> list[int]:
    """set_timesteps' arguments as diffusers' DDPMScheduler takes them: the timesteps (descending), or a count."""
    if (num_inference_steps is None) == (timesteps is None):
        raise ValueError("pass exactly one of num_inference_steps or timesteps")
    timesteps = [int(t) for t in timesteps] if timesteps is not None else visited_timesteps(
        num_inference_steps, num_train_timesteps)
    _check_timesteps(timesteps, num_train_timesteps)
    return timesteps


class _NextVisitedDDIM:
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
        timesteps = _given_timesteps(num_inference_steps, timesteps, self.config.num_train_timesteps)
        super().set_timesteps(len(timesteps), device=device)
        self.timesteps = self.timesteps.new_tensor(timesteps)  # int64, on device
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


class _VisitedSigmas:
    """set_timesteps(timesteps=...) for a diffusers multistep solver whose step reads `timesteps` and `sigmas`
    (DPMSolverMultistepScheduler, UniPCMultistepScheduler, DEISMultistepScheduler in diffusers 0.42.1): the
    solver's own set_timesteps resets its history, then the visited timesteps and their sigmas,
    sqrt((1 - alpha_bar) / alpha_bar) as diffusers computes them (a zero alpha_bar at ZERO_SNR_ALPHA_BAR), replace
    its own, with a last sigma of 0: the step from the last visited timestep goes to x0.
    """

    def set_timesteps(self, num_inference_steps: int | None = None, device=None,
                      timesteps: list[int] | None = None) -> None:
        timesteps = _given_timesteps(num_inference_steps, timesteps, self.config.num_train_timesteps)
        super().set_timesteps(len(timesteps), device=device)
        alpha_bar = self.alphas_cumprod[timesteps]  # a copy
        alpha_bar[alpha_bar == 0] = ZERO_SNR_ALPHA_BAR
        sigmas = alpha_bar.new_zeros(len(timesteps) + 1)  # on the CPU, as diffusers keeps them
        sigmas[:-1] = ((1 - alpha_bar) / alpha_bar) ** 0.5
        self.sigmas = sigmas
        self.timesteps = self.timesteps.new_tensor(timesteps)  # int64, on device
        self.num_inference_steps = len(timesteps)


class _DEISToX0(_VisitedSigmas):
    """DEIS whose last step, to sigma = 0, returns the model's x0.

    DEISMultistepScheduler (0.42.1) ends at sigma_min, and its updates to sigma = 0 are 0 * inf (first order:
    sigma_t (e^h - 1) with h = inf; second: rho log rho at rho = 0). The first-order update's limit there,
    (x - sigma_s eps) / alpha_s, is the model's x0: the last step returns it, first order, as DPM-Solver++ (with a
    final sigma of 0) and UniPC (lower_order_final) take their last steps. It is read from the model's output
    (epsilon, v or x0, the training schedule's prediction types) rather than from DEIS's epsilon, whose float32
    rounding divided by alpha_s would be large at t = T-1.
    """

    def step(self, model_output, timestep, sample, return_dict: bool = True):
        if self.step_index is None:
            self._init_step_index(timestep)
        if self.sigmas[self.step_index + 1] > 0:
            return super().step(model_output, timestep, sample, return_dict=return_dict)
        from diffusers.schedulers.scheduling_utils import SchedulerOutput

        alpha, sigma = self._sigma_to_alpha_sigma_t(self.sigmas[self.step_index])
        prediction = self.config.prediction_type
        if prediction == "epsilon":
            x0 = (sample - sigma * model_output) / alpha
        elif prediction == "v_prediction":
            x0 = alpha * sample - sigma * model_output
        else:
            x0 = model_output
        if self.config.thresholding:
            x0 = self._threshold_sample(x0)
        self._step_index += 1
        return SchedulerOutput(prev_sample=x0) if return_dict else (x0,)


def _epsilon_and_x0(prediction: str, alpha_bar, sample, model_output):
    """(epsilon, x0) implied by a model output of type `prediction` at noise level alpha_bar."""
    if prediction == "epsilon":
        return model_output, (sample - (1 - alpha_bar) ** 0.5 * model_output) / alpha_bar**0.5
    if prediction == "v_prediction":
        return (alpha_bar**0.5 * model_output + (1 - alpha_bar) ** 0.5 * sample,
                alpha_bar**0.5 * sample - (1 - alpha_bar) ** 0.5 * model_output)
    return (sample - alpha_bar**0.5 * model_output) / (1 - alpha_bar) ** 0.5, model_output


# Adams-Bashforth weights of the last 1..4 epsilons, newest first (PLMS, Liu et al. 2022, eq. 12 and its warm-up)
PLMS_WEIGHTS = {1: (1.0,), 2: (3 / 2, -1 / 2), 3: (23 / 12, -16 / 12, 5 / 12),
                4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}


class _PLMS:
    """PLMS, the pseudo linear multistep method of PNDM (Liu et al. 2022, "Pseudo Numerical Methods for Diffusion
    Models on Manifolds", eqs. 11-12), over the visited timesteps: each step's epsilon (converted from the model's
    epsilon, v or x0) joins a history of at most 4, their Adams-Bashforth combination (PLMS_WEIGHTS, of the order
    the history allows) is moved by the transfer of eq. 11 (diffusers' PNDMScheduler._get_prev_sample) to the next
    visited timestep, and from the last to x0 (alpha_bar 1). A first-order last step returns the model's x0.

    One model call per visited timestep, as every sampler of the registry: diffusers' PNDMScheduler with
    skip_prk_steps (Stable Diffusion's) spends two calls on its first step (a pseudo improved Euler step, n + 1
    calls for n steps, one timestep repeated); here the first step is first order and the higher orders follow
    as the history fills, as in diffusers from the second step on. A zero terminal SNR's alpha_bar_{T-1} = 0 is
    stepped from at ZERO_SNR_ALPHA_BAR, as DPM-Solver++ does (the transfer divides by alpha_bar).
    """

    def set_timesteps(self, num_inference_steps: int | None = None, device=None,
                      timesteps: list[int] | None = None) -> None:
        import torch

        timesteps = _given_timesteps(num_inference_steps, timesteps, self.config.num_train_timesteps)
        super().set_timesteps(len(timesteps), device=device)  # also empties diffusers' history (ets)
        levels = self.alphas_cumprod[timesteps]  # a copy
        levels[levels == 0] = ZERO_SNR_ALPHA_BAR
        self._levels = torch.cat([levels, levels.new_ones(1)])  # after the last visited timestep: x0
        self._index = {t: i for i, t in enumerate(timesteps)}
        self.timesteps = torch.tensor(timesteps, dtype=torch.long, device=device)

    def step(self, model_output, timestep, sample, return_dict: bool = True):
        from diffusers.schedulers.scheduling_utils import SchedulerOutput

        i = self._index[int(timestep)]
        a, a_next = self._levels[i].to(sample.device), self._levels[i + 1].to(sample.device)
        epsilon, x0 = _epsilon_and_x0(self.config.prediction_type, a, sample, model_output)
        self.ets = [epsilon, *self.ets[:3]]  # newest first
        if len(self.ets) == 1 and i + 1 == len(self.timesteps):
            prev = x0
        else:
            combined = sum(w * e for w, e in zip(PLMS_WEIGHTS[len(self.ets)], self.ets))
            # eq. 11: sqrt(a'/a) x - (a' - a) e / (a sqrt(1 - a') + sqrt(a (1 - a) a'))
            prev = (a_next / a) ** 0.5 * sample - (a_next - a) * combined / (
                a * (1 - a_next) ** 0.5 + (a * (1 - a) * a_next) ** 0.5)
        return SchedulerOutput(prev_sample=prev) if return_dict else (prev,)


class _EulerVisited(_VisitedSigmas):
    """diffusers' EulerDiscreteScheduler (Karras et al. 2022, algorithm 2 without churn: Euler's method on the
    probability-flow ODE in sigma) over the visited timesteps, to sigma = 0 after the last (x0).

    The state is x_t / alpha_t, which starts as the noise times sqrt(sigma_max^2 + 1): diffusers' trailing
    spacing starts from sigma_max alone (`init_noise_sigma`), exact only as sigma_max grows without bound. Its
    step refuses integer timesteps (they look like indices to it): the loop's ints are passed as the scheduler's
    own timestep values.
    """

    @property
    def init_noise_sigma(self):
        return float((self.sigmas.max() ** 2 + 1) ** 0.5)

    def step(self, model_output, timestep, sample, *args, **kwargs):
        return super().step(model_output, self.timesteps.new_tensor(float(timestep)), sample, *args, **kwargs)


@functools.cache
def _scheduler_class(base: str, mixin: type) -> type:
    """diffusers' scheduler class named `base` with `mixin` before it in the method order, joined on first use."""
    import diffusers

    return type(f"Visited{base}", (mixin, getattr(diffusers, base)), {"__module__": __name__, "__doc__": mixin.__doc__})


def _own_betas(train) -> dict:
    """The settings that give a sampler the training schedule's own betas, exactly: diffusers' `trained_betas`
    (every beta scheduler takes them). Rebuilt from the config instead, a beta_schedule the sampler's class lacks
    raises NotImplementedError (e.g. "sigmoid", which DDPMScheduler has and DDIM's, DPM-Solver's, PNDM's and
    Euler's schedulers do not, diffusers 0.42.1), and trained betas stay the training ones: a zero terminal SNR is
    in them already, so rescale_betas_zero_snr is off (DEIS and PNDM have no such setting: ignored there)."""
    return {"trained_betas": train.betas.tolist(), "rescale_betas_zero_snr": False}


def _ddpm(train, learned_variance: bool):
    from diffusers import DDPMScheduler

    declared = train.config.get("variance_type") or "fixed_small"  # not every scheduler's config has one
    if learned_variance:
        variance = declared if declared in LEARNED_VARIANCES else "learned_range"
    else:
        variance = "fixed_small" if declared in LEARNED_VARIANCES else declared
    return DDPMScheduler.from_config(train.config, **_own_betas(train), variance_type=variance,
                                     timestep_spacing=TIMESTEP_SPACING)


def _ddim(train, learned_variance: bool):
    # set_alpha_to_one=False (Stable Diffusion's DDIM config) would end at alpha_bar_0 instead of x0
    return _scheduler_class("DDIMScheduler", _NextVisitedDDIM).from_config(
        train.config, **_own_betas(train), timestep_spacing=TIMESTEP_SPACING, set_alpha_to_one=True)


def _dpm_solver(train, learned_variance: bool):
    # Its own sigma spacings (which refuse given timesteps) and a last step to sigma_min instead of x0 are off,
    # whatever a pipeline's scheduler config says; its sigmas are the visited timesteps' (_VisitedSigmas, which
    # puts a zero terminal SNR at ZERO_SNR_ALPHA_BAR as diffusers' rescale_betas_zero_snr does).
    return _scheduler_class("DPMSolverMultistepScheduler", _VisitedSigmas).from_config(
        train.config, **_own_betas(train), algorithm_type="dpmsolver++", variance_type=None,
        timestep_spacing=TIMESTEP_SPACING, final_sigmas_type="zero", **_OWN_SIGMAS_OFF)


def _unipc(train, learned_variance: bool):
    # bh2 at order 2, diffusers' defaults, whatever a config says.
    return _scheduler_class("UniPCMultistepScheduler", _VisitedSigmas).from_config(
        train.config, **_own_betas(train), solver_order=2, solver_type="bh2", predict_x0=True, lower_order_final=True,
        disable_corrector=[], solver_p=None, timestep_spacing=TIMESTEP_SPACING, final_sigmas_type="zero",
        **_OWN_SIGMAS_OFF)


def _deis(train, learned_variance: bool):
    return _scheduler_class("DEISMultistepScheduler", _DEISToX0).from_config(
        train.config, **_own_betas(train), solver_order=2, algorithm_type="deis", solver_type="logrho",
        lower_order_final=True, timestep_spacing=TIMESTEP_SPACING, **_OWN_SIGMAS_OFF)


def _pndm(train, learned_variance: bool):
    return _scheduler_class("PNDMScheduler", _PLMS).from_config(
        train.config, **_own_betas(train), skip_prk_steps=True, set_alpha_to_one=True,
        timestep_spacing=TIMESTEP_SPACING)


def _euler(train, learned_variance: bool):
    # No churn (deterministic), linear interpolation of sigmas at the given timesteps, whatever a pipeline's config
    # says.
    return _scheduler_class("EulerDiscreteScheduler", _EulerVisited).from_config(
        train.config, **_own_betas(train), interpolation_type="linear", timestep_type="discrete",
        timestep_spacing=TIMESTEP_SPACING, final_sigmas_type="zero", **_OWN_SIGMAS_OFF)


@dataclass(frozen=True)
class SamplerKind:
    """One sampler of the registry.

    build: (training DDPMScheduler, learned_variance) -> a diffusers scheduler taking set_timesteps(timesteps=...).
    summary: what it is, with its source, for help texts.
    reads_variance: its step takes a learned-variance model's variance half (DDPM's ancestral step).
    """

    build: Callable
    summary: str
    reads_variance: bool = False


_SAMPLERS = {
    "ddpm": SamplerKind(_ddpm, "ancestral, stochastic; Ho et al. 2020", reads_variance=True),
    "ddim": SamplerKind(_ddim, "eta 0; Song et al. 2021"),
    "dpm-solver++": SamplerKind(_dpm_solver, "2M; Lu et al. 2022"),
    "unipc": SamplerKind(_unipc, "bh2, order 2; Zhao et al. 2023"),
    "deis": SamplerKind(_deis, "log-rho, order 2; Zhang & Chen 2023"),
    "pndm": SamplerKind(_pndm, "PLMS, order 4; Liu et al. 2022"),
    "euler": SamplerKind(_euler, "no churn; Karras et al. 2022"),
}
SAMPLERS = tuple(_SAMPLERS)


# A diffusers pipeline's scheduler class -> the registry's sampler that samples as it does (its registry settings:
# see each builder). DPMSolverSinglestepScheduler has no single-step twin here: its nearest is the multistep one.
PIPELINE_SAMPLERS = {
    "DDPMScheduler": "ddpm", "DDIMScheduler": "ddim", "PNDMScheduler": "pndm",
    "DPMSolverMultistepScheduler": "dpm-solver++", "DPMSolverSinglestepScheduler": "dpm-solver++",
    "UniPCMultistepScheduler": "unipc", "DEISMultistepScheduler": "deis", "EulerDiscreteScheduler": "euler",
}
_NEAREST = {"DPMSolverSinglestepScheduler": "the multistep DPM-Solver++(2M), its nearest in the registry"}


def sampler_for_scheduler(class_name: str, source: str) -> tuple[str, str]:
    """The registry's sampler for a pipeline's diffusers scheduler class, and a note saying how it samples.

    class_name: e.g. "DDIMScheduler" (model_index.json's scheduler entry). source: what it came from, for the
    message. The registry sampler keeps its own settings (trailing timesteps, x0 at the end, order 2 solvers),
    whatever the pipeline's config says; the note names the sampler and says so.
    Raises ValueError naming the class, the supported ones and the fix for a class without a sampler here.
    """
    name = PIPELINE_SAMPLERS.get(class_name)
    if name is None:
        raise ValueError(f"{source} samples with {class_name}, which no sampler of tdcdiff follows; supported: "
                         f"{', '.join(PIPELINE_SAMPLERS)}; pass --sampler (one of {', '.join(SAMPLERS)}) to sample "
                         "with another")
    how = _NEAREST.get(class_name, f"{name} ({_SAMPLERS[name].summary})")
    return name, (f"{class_name} of {source} -> {how}, trailing timesteps ending at x0; the pipeline's own "
                  "scheduler settings are kept in the bundle's provenance")


def sampler_kind(name: str) -> SamplerKind:
    """The registry's entry for `name`. Raises ValueError for an unknown name, listing the known ones."""
    if name not in _SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {SAMPLERS}")
    return _SAMPLERS[name]


def describe_samplers() -> str:
    """The samplers, one phrase each, for help texts: "ddpm (ancestral, stochastic; Ho et al. 2020), ddim (...)"."""
    return ", ".join(f"{name} ({kind.summary})" for name, kind in _SAMPLERS.items())


def step_takes_generator(scheduler) -> bool:
    """Whether `scheduler.step` accepts a `generator` (DDPM's and DDIM's do; UniPC's and DEIS's, deterministic,
    do not)."""
    parameters = inspect.signature(scheduler.step).parameters.values()
    return any(p.name == "generator" or p.kind is p.VAR_KEYWORD for p in parameters)


def make_sampler(name: str, train_scheduler, timesteps: list[int] | None = None, *, learned_variance: bool = False,
                 device=None):
    """A diffusers sampling scheduler sharing the training schedule's betas and prediction type.

    name: one of SAMPLERS ("ddpm", "ddim", "dpm-solver++", "unipc", "deis", "pndm", "euler").
    train_scheduler: the DDPMScheduler the model was trained with.
    timesteps: the training timesteps to visit, descending (`visited_timesteps`); set on the scheduler (on
        `device`) when given. Call `set_timesteps(timesteps=...)` again before each new trajectory: it resets
        a multistep solver's history.
    learned_variance: the model outputs a variance half; DDPM then uses it (diffusers' "learned_range",
        unless the schedule says "learned"). The other samplers never see it (`sample` passes them the
        prediction only), so DPM-Solver's own learned-variance slicing (`[:, :3]`, RGB only) is switched off.
    Every sampler follows the training schedule's betas exactly (diffusers' `trained_betas`), visits exactly the
    given timesteps and ends at x0, whatever else the training scheduler's config (e.g. a pipeline's) says:
    trailing spacing, DDIM's set_alpha_to_one, the solvers' sigma spacings and final sigma are set here; UniPC is
    bh2 and UniPC and DEIS are order 2 (diffusers' defaults).
    Raises ValueError for an unknown name, a train_scheduler without betas (check_train_scheduler), or timesteps that
    are not distinct and descending within 0..T-1.
    """
    check_train_scheduler(train_scheduler)
    scheduler = sampler_kind(name).build(train_scheduler, learned_variance)
    if timesteps is not None:
        timesteps = [int(t) for t in timesteps]
        _check_timesteps(timesteps, train_scheduler.config.num_train_timesteps)
        scheduler.set_timesteps(timesteps=timesteps, device=device)
    return scheduler

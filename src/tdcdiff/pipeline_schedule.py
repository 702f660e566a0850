"""A diffusers pipeline's scheduler as a training noise schedule: the class it names, whether it is a schedule of
betas that tdcdiff can train and every sampler can follow, and the DDPMScheduler of its betas."""

from __future__ import annotations

import inspect

from .files import brief, is_count
from .samplers import PIPELINE_SAMPLERS
from .schedule import MAX_TIMESTEPS, check_sampling_schedule
from .serialization import allowed_class


def pipeline_scheduler_class(index: dict, scheduler: dict) -> str | None:
    """The scheduler class a pipeline samples with: model_index.json's ["diffusers", class] entry, else its
    scheduler_config.json's _class_name (None when neither names one)."""
    entry = index.get("scheduler")
    name = entry[1] if isinstance(entry, list) and len(entry) == 2 else scheduler.get("_class_name")
    return name if isinstance(name, str) else None


# Settings that define betas: without any, DDPMScheduler.from_config would give a config its default linear ones.
BETA_KEYS = ("trained_betas", "beta_schedule", "beta_start", "beta_end")


def check_pipeline_schedule(class_name: str | None, config: dict, source: str) -> None:
    """Raise ValueError unless a pipeline's scheduler is a noise schedule of betas, which tdcdiff trains (DDPM
    losses: epsilon, v or x0 targets at alpha_bar_t = prod(1 - beta)) and samples with every sampler: a diffusers
    class taking `trained_betas` or a `beta_schedule` (DDPM, DDIM, PNDM, DPM-Solver, UniPC, Euler, LMS, ...; None:
    DDPMScheduler), or a class diffusers lacks whose config has BETA_KEYS, not flow matching or sigmas alone (EDM,
    score SDE, consistency): no --sampler changes what such a model was trained for. Its betas must build a
    DDPMScheduler (scheduler_from_config) that schedule.check_sampling_schedule passes; a T outside
    2..MAX_TIMESTEPS is left to the settings' check. class_name: model_index.json's (pipeline_scheduler_class);
    config: scheduler_config.json's; source: the pipeline, for the message."""
    try:
        cls = allowed_class(f"diffusers.{class_name or 'DDPMScheduler'}", "SchedulerMixin", source)
    except ValueError:  # not a diffusers scheduler class: only its config can say
        cls = None
    betas = (bool({"trained_betas", "beta_schedule"} & set(inspect.signature(cls.__init__).parameters))
             if cls is not None else any(key in config for key in BETA_KEYS))
    if not betas:
        why = ("which takes no betas (a flow-matching or sigma-only schedule)" if cls is not None else "which is not "
               f"a diffusers scheduler class, and its config names no betas (none of {', '.join(BETA_KEYS)})")
        raise ValueError(
            f"{source} samples with {class_name}, {why}: its model was trained for another objective than tdcdiff's "
            f"DDPM losses (epsilon, v or x0 targets over a schedule of betas), and no --sampler changes that; start "
            f"from a diffusers pipeline whose scheduler has betas (e.g. {', '.join(PIPELINE_SAMPLERS)})")
    steps = config.get("num_train_timesteps", 1000)
    if not is_count(steps, 2) or steps > MAX_TIMESTEPS:
        return
    try:
        scheduler = scheduler_from_config(config)
    except (ValueError, TypeError, NotImplementedError) as err:  # diffusers' refusals of a setting
        raise ValueError(f"{source}: its scheduler config gives no DDPMScheduler ({type(err).__name__}: "
                             f"{brief(str(err), 200, quote=False)}); fix the pipeline's scheduler config") from None
    try:
        check_sampling_schedule(scheduler)
    except ValueError as err:
        raise ValueError(f"{err} (the schedule of {source}: fix its scheduler config)") from None


def scheduler_from_config(config: dict):
    """The training DDPMScheduler of a pipeline's scheduler config, of whatever diffusers class (DDIM, PNDM,
    DPM-Solver, Euler, ...): its betas (beta_schedule, beta_start, beta_end, trained_betas, rescale_betas_zero_snr),
    T, prediction type and the other settings a DDPMScheduler takes. The settings of the sampling class alone
    (DDIM's set_alpha_to_one, PNDM's skip_prk_steps, ...) are left out: DDPMScheduler.from_config would keep them
    in its config, where a bundle refuses them. So are unset (null) ones: DPM-Solver's variance_type null means
    "no learned variance", which a DDPMScheduler spells as its default."""
    from diffusers import DDPMScheduler

    takes = set(inspect.signature(DDPMScheduler.__init__).parameters) - {"self"}
    return DDPMScheduler.from_config({k: v for k, v in config.items() if k in takes and v is not None})

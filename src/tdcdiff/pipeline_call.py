"""The arguments of `TDCPipeline.__call__` as diffusers' pipelines name them: the ones it does not take (with the one
that does what they do), batch_size and num_inference_steps that are not integers or hold another argument's value
(diffusers' positionals differ), the seed from a torch.Generator, and prompts as one per image."""

from __future__ import annotations

import torch

from .samplers import SAMPLERS
from .settings import is_integer

# diffusers pipeline arguments TDCPipeline does not take, with the one that does what they do
_INSTEAD = {
    "eta": "tdcdiff's DDIM is deterministic, eta 0; sampler='ddpm' samples stochastically",
    "num_images_per_prompt": "batch_size is the number of images; one prompt serves all of them",
    "callback_on_step_end": "per-step callbacks are not supported; progress=True shows a progress bar",
    "callback": "per-step callbacks are not supported; progress=True shows a progress bar",
}
CALL_ARGUMENTS = ("batch_size", "num_inference_steps", "generator", "sampler", "seed", "output_type", "return_dict",
                  "progress", "class_labels", "guidance_scale", "cache_interval", "cache_depth", "prompt",
                  "negative_prompt")


def check_call(batch_size, num_inference_steps, output_type, unsupported: dict, text: bool) -> None:
    """Refuse, before sampling, TDCPipeline call arguments named as diffusers' pipelines name them that it does not
    take, an unknown output_type, and a batch_size or num_inference_steps that is not an integer, by their own names
    (sample() calls them num_images and steps). text: the pipeline takes prompts."""
    if output_type not in ("pil", "np", "pt"):
        raise ValueError(f"unknown output_type {output_type!r}; choose 'pil', 'np' or 'pt'")
    if unsupported:
        name = next(iter(unsupported))
        why = f" ({_INSTEAD[name]})" if name in _INSTEAD else ""
        raise ValueError(f"TDCPipeline takes no {name!r} argument{why}; it takes: {', '.join(CALL_ARGUMENTS)}")
    for name, value in (("batch_size", batch_size), ("num_inference_steps", num_inference_steps)):
        _check_positional(name, value, text)
        if value is not None and not is_integer(value):
            raise ValueError(f"{name} must be an integer, got {value!r:.40}")


def _check_positional(name: str, value, text: bool) -> None:
    """Refuse a value of TDCPipeline's two positionals that has the type of another argument, naming that argument:
    diffusers' DDPMPipeline takes (batch_size, generator, num_inference_steps, output_type), its text pipelines
    (prompt, ...); pipe(2, g) read the generator as a step count."""
    many = isinstance(value, (list, tuple)) and len(value) > 0
    by_name = " (only batch_size and num_inference_steps are taken by position)"
    if isinstance(value, torch.Generator) or many and all(isinstance(g, torch.Generator) for g in value):
        got, fix = f"a {type(value).__name__} of torch.Generator" if many else "a torch.Generator", "generator=..."
    elif isinstance(value, str) and (value in ("pil", "np", "pt") or value in SAMPLERS):
        got, fix = repr(value), f"{'sampler' if value in SAMPLERS else 'output_type'}={value!r}"
    elif isinstance(value, str):
        got, fix, by_name = f"the text {value!r:.40}", "", (f"pass the text as prompt={value!r:.40}" if text else
                                                             "this pipeline's model is not text-conditional, so it "
                                                             "takes no prompt")
    else:
        return
    what = ("first argument is batch_size (the number of images)" if name == "batch_size" else
            "second argument is num_inference_steps (the number of sampling steps)")
    raise ValueError(f"TDCPipeline's {what}, got {got}; " + (f"pass it by name: {fix}{by_name}" if fix else by_name))


def seed_of(seed: int | None, generator) -> int:
    """The seed to sample with: `seed`, one drawn from a torch.Generator (diffusers' way to seed a pipeline), or 0."""
    if generator is None:
        return 0 if seed is None else seed
    if seed is not None:
        raise ValueError("give seed or generator, not both")
    if not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be one torch.Generator (a list of one per image, as diffusers takes, is "
                         f"not: the batch is drawn from one seed), got {type(generator).__name__}; or give seed=")
    return int(torch.randint(0, 2**32, (1,), generator=generator, device=generator.device))


def prompt_list(prompt, batch_size: int, name: str) -> list[str]:
    """One prompt per image: a string repeated batch_size times, or a list of batch_size strings (any length when
    batch_size is 1)."""
    if isinstance(prompt, str):
        return [prompt] * batch_size
    if not isinstance(prompt, (list, tuple)) or not prompt or not all(isinstance(p, str) for p in prompt):
        raise ValueError(f"{name} must be a string or a non-empty list of strings, got {type(prompt).__name__}")
    if batch_size not in (1, len(prompt)):
        raise ValueError(f"{len(prompt)} prompts in {name} for batch_size {batch_size}; give one prompt per image "
                         "(or one string for all)")
    return list(prompt)

"""Sampling with diffusers schedulers (the registry in samplers.py), any step count, seeded and batched.

The loop calls the denoiser in exactly one place (`SamplingModel.__call__`, fast_path.py), with the whole batch
at one timestep; for a Router it picks the step's expert from a table. `SamplingModel` is also the fast path:
each expert (or the single model) traced and frozen with torch.jit, or torch.compile'd, optionally under
bf16 autocast, and with feature caching (feature_cache.py, DeepCache) its two passes are traced alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .capacity import check_sampling_memory
from .conditions import sample_conditions
from .devices import check_holds_data
from .fast_path import SamplingModel
from .feature_cache import FeatureCache
from .files import atomic_write_bytes
from .latency import device_of
from .latent import Decoder
from .models import check_denoiser, check_sample_shape, check_sample_size, evaluating, torch_device
from .pipeline_call import check_call, prompt_list, seed_of
from .progress import progress_bar
from .samplers import (
    LEARNED_VARIANCES,
    TIMESTEP_SPACING,
    check_train_scheduler,
    make_sampler,
    sampler_kind,
    step_takes_generator,
    visited_timesteps,
)
from .samplers import SAMPLERS as SAMPLERS  # re-exported: callers import the sampler names from here too
from .sampling_setting import SamplingSetting, check_cache_settings
from .schedule import check_given_schedule, check_sampling_schedule
from .settings import check_seed, is_integer, is_real, plain_number
from .user_warnings import called_by_user


@dataclass
class SampleResult:
    """Images in [-1, 1] (NCHW, float32) and the training timesteps the sampler visited, in order.

    timestep_spacing: how the steps were placed among the T training timesteps (diffusers' name).
    compile, precision: the path the model ran on (see SamplingModel).
    cache_interval, cache_depth: feature caching (DeepCache): a full pass every cache_interval steps, the shallow
        branch of that depth in between (1, None: no caching). shallow_steps: the timesteps at which the shallow
        branch alone ran (the same in every batch).
    """

    images: torch.Tensor
    timesteps: list[int]
    sampler: str
    steps: int
    seed: int
    timestep_spacing: str = TIMESTEP_SPACING
    compile: str = "none"
    precision: str = "fp32"
    cache_interval: int = 1
    cache_depth: int | None = None
    shallow_steps: list[int] = field(default_factory=list)


def _predict(runner: SamplingModel, x: torch.Tensor, t: int, labels: torch.Tensor | None = None, *,
             guidance_scale: float = 1.0, null: torch.Tensor | None = None, with_variance: bool = False,
             cache: FeatureCache | None = None) -> torch.Tensor:
    """The model's output at one t for the conditions `labels`; with guidance (null: the unconditional pass's
    conditions, the null class or the empty prompt), uncond + s * (cond - uncond) on the prediction half (a
    learned variance half comes from the conditional pass)."""
    if labels is None or null is None:
        return runner(x, t, labels, with_variance=with_variance, cache=cache)
    cond, uncond = runner(torch.cat([x, x]), t, torch.cat([labels, null]), with_variance=with_variance,
                          cache=cache).chunk(2)
    c = x.shape[1]
    guided = uncond[:, :c] + guidance_scale * (cond[:, :c] - uncond[:, :c])
    return torch.cat([guided, cond[:, c:]], dim=1)


def _check_settings(train_scheduler, sample_shape: tuple[int, int, int], sampler: str, steps: int, num_images: int,
                    batch_size: int, seed: int, guidance_scale: float, cache_interval: int,
                    cache_depth: int | None, path: tuple[str, str]) -> tuple[list[int], int | None]:
    """(the timesteps the sampler visits, the feature cache's depth or None) after checking sample()'s settings;
    path: (compile, precision), checked even where a given SamplingModel keeps its own."""
    named = isinstance(train_scheduler, str) and train_scheduler in SAMPLERS
    if named or isinstance(train_scheduler, nn.Module):  # sample(model, "ddim") / sample(scheduler, model)
        got, fix = ((f"the sampler name {train_scheduler!r}", f"pass sampler={train_scheduler!r} by name") if named
                    else (f"a model ({type(train_scheduler).__name__})", "sample(model, train_scheduler, ...) takes "
                          "the model first"))
        raise ValueError(f"sample()'s second argument is train_scheduler (the training noise schedule, e.g. a bundle's "
                         f"Bundle.scheduler), got {got}; {fix}")
    check_train_scheduler(train_scheduler)
    sampler_kind(sampler)
    SamplingModel.check_path(*path)
    _check_arguments(steps, num_images, batch_size, seed, guidance_scale)
    check_sample_shape(sample_shape)
    visited = visited_timesteps(steps, train_scheduler.config.num_train_timesteps)
    check_sampling_memory(num_images, sample_shape)  # noise and images of all of them are kept
    depth = check_cache_settings(cache_interval, cache_depth)
    check_sampling_schedule(train_scheduler)
    return visited, depth


def _check_model(model: nn.Module, train_scheduler, sample_shape: tuple[int, int, int], device,
                 conditions: dict) -> torch.device:
    """A router's groups must cover the schedule's T and its experts predict what the schedule says (a bundle's router
    records it: epsilon read as v gives wrong images, no error), the model must take the data's channels and size,
    and the conditions (name -> value) must hold data. Returns the device to sample on (_sampling_device)."""
    grouping = getattr(model, "grouping", None)
    num_train = train_scheduler.config.num_train_timesteps
    if grouping is not None and grouping.num_train_timesteps != num_train:
        raise ValueError(
            f"the scheduler has T={num_train} training timesteps but the router's groups cover "
            f"T={grouping.num_train_timesteps}; sample with the bundle's own scheduler"
        )
    predicts, scheduled = getattr(model, "prediction_type", None), train_scheduler.config.prediction_type
    if predicts is not None and predicts != scheduled:
        raise ValueError(
            f"the scheduler's prediction_type is {scheduled!r} but the router's experts predict {predicts!r} (they "
            f"were trained so); sample with the bundle's own scheduler (Bundle.scheduler), or one with "
            f"prediction_type={predicts!r}"
        )
    check_denoiser(model, sample_shape, source="sample_shape")
    check_sample_size(model, sample_shape)
    check_holds_data(conditions, "give them on the CPU or the model's device (they are moved to the model's)")
    return _sampling_device(model, device)


def _sampling_device(model: nn.Module, device) -> torch.device:
    """The device the noise and labels go to: the model's (its first parameter's; CPU for a model without any),
    which `device`, when given, must name. Raises ValueError for a device torch does not know, another device than
    the model's, or the meta device (it holds no weights, so nothing could be sampled)."""
    own = device_of(model)
    if own.type == "meta":
        raise ValueError("the model is on the meta device, which holds no weights: load them first (e.g. "
                         "model.to_empty(device='cpu') and load_state_dict) and sample on 'cpu' or 'cuda'")
    chosen = own if device is None else torch_device(  # a CUDA device not visible here: no advice to move the model
        device, fix=f"sample on the model's device ({own}), or leave device out")
    has_weights = next(model.parameters(), None) is not None
    other_index = None not in (chosen.index, own.index) and chosen.index != own.index
    if has_weights and (chosen.type != own.type or other_index):
        raise ValueError(f"device {str(chosen)!r} is not the model's device ({own}): move the model there first "
                         f"(model.to({str(chosen)!r})), or leave device out")
    return chosen


def _trajectory(runner: SamplingModel, scheduler, x: torch.Tensor, visited: list[int], labels, *, sampler: str,
                train_scheduler, generator: torch.Generator, cache: FeatureCache | None, bar, **guidance):
    """One batch's denoising, from the noise x at visited[0] to x0. Returns (x0, the scheduler): DDPM's becomes its
    learned-variance form at a 2C-channel model's first output, and is reused so by the next batches."""
    reads_variance = sampler_kind(sampler).reads_variance
    scheduler.set_timesteps(timesteps=visited, device=x.device)  # also resets a multistep solver's history
    stochastic = {"generator": generator} if step_takes_generator(scheduler) else {}
    x = x * scheduler.init_noise_sigma
    for t in visited:  # plain ints: the schedulers index with them as with 0-d tensors, only faster
        model_input = scheduler.scale_model_input(x, t)
        out = _predict(runner, model_input, t, labels, with_variance=reads_variance, cache=cache, **guidance)
        if out.shape[1] != x.shape[1] and scheduler.config.get("variance_type") not in LEARNED_VARIANCES:
            scheduler = make_sampler(sampler, train_scheduler, visited, learned_variance=True, device=x.device)
        x = scheduler.step(out, t, x, **stochastic).prev_sample
        bar.update(1)
    return x, scheduler


def _check_arguments(steps, num_images: int, batch_size: int, seed: int, guidance_scale: float) -> None:
    """Refuse what sample() cannot use as given (each used to fail deep inside, or to run as something else): a
    step or image count that is not an integer (True was 1 step; 2.5 a TypeError), a seed outside 0..2**32-1
    (-1 was taken as 2**64 - 1), a guidance scale that is not a finite number (NaN images written as a grid)."""
    for name, value in (("steps", steps), ("num_images", num_images), ("batch_size", batch_size)):
        if not is_integer(value):
            raise ValueError(f"{name} must be an integer, got {value!r}")
    if num_images < 1 or batch_size < 1:
        raise ValueError(f"num_images and batch_size must be >= 1, got {num_images} and {batch_size}")
    check_seed("seed", seed)
    if not is_real(guidance_scale) or not math.isfinite(guidance_scale):
        raise ValueError(f"guidance_scale must be a finite number (1: no guidance), got {guidance_scale!r}")


def _finite(images: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """The sampled images, unless some are NaN/inf (written as a grid they would look like black pixels)."""
    if not torch.isfinite(images).all():
        raise ValueError(f"sampling produced NaN/inf pixels (guidance_scale {guidance_scale}); lower the guidance "
                         "scale, or check the model: its outputs at the visited timesteps are not all finite")
    return images


@torch.no_grad()
def sample(
    model: nn.Module,
    train_scheduler,
    *,
    sample_shape: tuple[int, int, int],
    sampler: str = "ddim",
    steps: int = 50,
    num_images: int = 64,
    batch_size: int = 64,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: bool = True,
    class_labels=None,
    guidance_scale: float = 1.0,
    null_class: int | None = None,
    prompt_embeds: torch.Tensor | None = None,
    negative_prompt_embeds: torch.Tensor | None = None,
    compile: str = "auto",
    precision: str = "fp32",
    cache_interval: int = 1,
    cache_depth: int | None = None,
    decode=None,
    num_classes: int | None = None,
) -> SampleResult:
    """Generate images with a trained denoiser (or a Router of group models).

    model: called as model(x, t); a diffusers UNet2DModel, any denoiser, a tdcdiff Router, or a
        SamplingModel built once from one of those (then compile and precision are its own).
    train_scheduler: the training schedule (gives betas, T and the prediction type). Raises ValueError for one
        without betas (samplers.check_train_scheduler) or that no sampler can use (schedule.check_sampling_schedule);
        warns, when the user's code passed it, for one that ends far from noise (schedule.check_given_schedule).
    sample_shape: (C, H, W) of one image, at the size the model's config states (sample_size), if it does.
    sampler: one of SAMPLERS (samplers.describe_samplers()): "ddpm", "ddim", "dpm-solver++", "unipc", "deis",
        "pndm", "euler".
    steps: number of sampling steps, 1..T; the sampler visits `samplers.visited_timesteps(steps, T)` (T-1 first)
        and ends at x0.
    num_images, batch_size: how many images in total, and how many per forward pass.
    seed: the initial noise and every stochastic step are drawn from a generator seeded with it.
    class_labels: for a class-conditional model (required there): one int for all images or one per image.
    num_classes: the data's class count, when known: labels must be 0..num_classes-1 (and never null_class).
    guidance_scale: classifier-free guidance weight (1: none); needs null_class, the id the model was trained
        with for dropped labels (for a text-conditional model: a negative prompt, see below).
    prompt_embeds, negative_prompt_embeds: for a text-conditional model (models.text_width), the text embeddings
        to sample with and those of guidance's unconditional pass, (N or 1, tokens, width) float (text.TextEncoder);
        by default the empty prompt's embedding the model carries (a bundle's router does; else prompt_embeds are
        required): without prompt_embeds the samples are unconditional.
    A 2C-channel (learned-variance) model gives DDPM its variance half; the other samplers use the first C.
    compile, precision: the sampling path (see SamplingModel); "auto"/"fp32" give eager-identical images.
    cache_interval, cache_depth: feature caching (DeepCache, feature_cache.py) of UNet2DModels and routers of them:
        a full pass every cache_interval steps (1, the default: none), between them the shallow branch of depth
        cache_depth (1..the UNet's levels; default 1) on the last full pass's deep features; a step of another
        expert (group) than the cached one runs a full pass. Traced as the model is; ValueError for other models.
    device: the model's (the default; ValueError for another). decode: for latent diffusion, maps the final latents
        (sample_shape) to images in [-1, 1] (latent.Decoder); the images are then decoded, and not clamped.
    """
    steps, num_images, batch_size, seed, guidance_scale, cache_interval, cache_depth = (plain_number(v) for v in (
        steps, num_images, batch_size, seed, guidance_scale, cache_interval, cache_depth))  # numpy / 0-d tensors
    visited, depth = _check_settings(train_scheduler, sample_shape, sampler, steps, num_images, batch_size, seed,
                                     guidance_scale, cache_interval, cache_depth, (compile, precision))
    if called_by_user():  # a schedule tdcdiff made or checked where it entered is not warned about again
        check_given_schedule(train_scheduler, "the train_scheduler given to sample()")
    runner = model if isinstance(model, SamplingModel) else None
    model = runner.model if runner is not None else model
    device = _check_model(model, train_scheduler, sample_shape, device, {
        "class_labels": class_labels, "prompt_embeds": prompt_embeds, "negative_prompt_embeds": negative_prompt_embeds})
    labels, null = sample_conditions(model, num_images, guidance_scale, class_labels, null_class, num_classes,
                                     prompt_embeds, negative_prompt_embeds)
    generator = torch.Generator().manual_seed(int(seed))
    noise = torch.randn((num_images, *sample_shape), generator=generator)
    with evaluating(model):  # the caller's training flags come back afterwards (a preview inside a training loop)
        runner = runner or SamplingModel(model, compile, precision)
        if depth is not None:
            runner.prepare_cache(depth)
        images, cache = _sample_batches(runner, noise, labels, null, visited, device, batch_size, progress,
                                        sampler=sampler, train_scheduler=train_scheduler, generator=generator,
                                        guidance_scale=guidance_scale, decode=decode,
                                        caching=(cache_interval, depth))
    return SampleResult(_finite(images, guidance_scale), visited, sampler, steps, seed, TIMESTEP_SPACING,
                        runner.compile, runner.precision, cache_interval, depth,
                        cache.shallow_steps if cache is not None else [])


def _sample_batches(runner: SamplingModel, noise: torch.Tensor, labels, null, visited: list[int], device,
                    batch_size: int, progress: bool, *, sampler: str, train_scheduler, generator: torch.Generator,
                    guidance_scale: float, decode, caching: tuple[int, int | None]):
    """(the images of every batch, on the CPU, the last batch's FeatureCache or None): sample()'s loop over batches
    of the initial noise."""
    scheduler, (cache_interval, depth) = make_sampler(sampler, train_scheduler), caching
    outputs, cache, batches = [], None, range(0, len(noise), batch_size)
    bar = progress_bar(total=len(batches) * len(visited), desc=f"sample {sampler}-{len(visited)}", enabled=progress)
    for start in batches:
        cache = FeatureCache(cache_interval, depth) if depth is not None else None
        part = slice(start, start + batch_size)
        batch_labels, batch_null = (None if c is None else c[part].to(device) for c in (labels, null))
        x, scheduler = _trajectory(runner, scheduler, noise[part].to(device), visited,
                                   batch_labels, sampler=sampler, train_scheduler=train_scheduler, generator=generator,
                                   cache=cache, bar=bar, guidance_scale=guidance_scale, null=batch_null)
        outputs.append(decode(x) if decode is not None else x.clamp(-1, 1).cpu())
    bar.close()
    return torch.cat(outputs), cache


class TDCPipeline:
    """A diffusers-style pipeline over a router (or any denoiser): `pipe(batch_size=16).images`.

    denoiser: the Router of a bundle, or any model(x, t). scheduler: the training schedule.
    sample_shape: (C, H, W) of one image. null_class: the class id a class-conditional model was trained
    with for dropped labels (needed for guidance). compile, precision: the sampling path (see SamplingModel);
    it is built here, once, and reused by every call, so build a new pipeline after changing the weights.
    vae: for latent diffusion, the VAE whose latents (sample_shape) the denoiser works on; images are decoded.
    num_classes: the data's class count (class labels must be below it), when known.
    defaults: the sampling setting a call uses for what it does not give (a bundle's: Bundle.sampling; a
        SamplingSetting, its text or its dict: SamplingSetting.of); None:
        DDIM at min(50, T) steps, no feature caching.
    text_encoder: for a text-conditional denoiser, the text.TextEncoder (CLIP tokenizer and text encoder) that turns
        a call's prompts into its conditions (a bundle carries it).
    """

    def __init__(self, denoiser: nn.Module, scheduler, sample_shape: tuple[int, int, int], *,
                 null_class: int | None = None, compile: str = "auto", precision: str = "fp32", vae=None,
                 num_classes: int | None = None, defaults: SamplingSetting | str | dict | None = None,
                 text_encoder=None):
        check_train_scheduler(scheduler, "scheduler")
        if called_by_user():  # a bundle's pipeline (Bundle.pipeline) was checked when the bundle was written
            check_given_schedule(scheduler, "the scheduler given to TDCPipeline")
        self.text_encoder = text_encoder
        self.decode = Decoder(vae) if vae is not None else None
        self.denoiser = denoiser
        self.scheduler = scheduler
        self.sample_shape = tuple(sample_shape)
        self.null_class = null_class
        self.num_classes = num_classes
        self.defaults = (SamplingSetting("ddim", min(50, scheduler.config.num_train_timesteps)) if defaults is None
                         else SamplingSetting.of(defaults, "defaults"))
        with evaluating(denoiser):  # SamplingModel puts the experts in eval mode: the caller's flags come back
            self.runner = SamplingModel(denoiser, compile, precision)

    def __call__(
        self,
        batch_size: int = 1,
        num_inference_steps: int | None = None,
        *,
        generator: torch.Generator | None = None,
        sampler: str | None = None,
        seed: int | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        progress: bool = True,
        class_labels=None,
        guidance_scale: float = 1.0,
        cache_interval: int | None = None,
        cache_depth: int | None = None,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        **unsupported,
    ):
        """Sample `batch_size` images; output_type "pil" (list of PIL images), "np" (NHWC uint8) or "pt"
        (NCHW float in [-1, 1]). class_labels, guidance_scale, cache_interval, cache_depth (feature caching):
        see `sample`. num_inference_steps, sampler and the cache settings not given are the pipeline's
        `defaults`, item by item (SamplingSetting.caching_with: cache_depth alone keeps the defaults' interval).
        seed or generator (diffusers' argument: one torch.Generator, from which the seed is drawn, so the same
        generator state gives the same images): what the noise is drawn from (neither: seed 0).
        prompt: for a text-conditional pipeline (required there): one prompt for all `batch_size` images, or a list
        of one prompt per image (batch_size 1 takes its length). negative_prompt: guidance's unconditional prompt,
        one or one per image (default "", classifier-free guidance as in Stable Diffusion).
        Returns diffusers' ImagePipelineOutput, or with return_dict=False the tuple (images,), as diffusers'
        pipelines do. Raises ValueError for an argument it does not take (eta, num_images_per_prompt, ...), naming
        the one to use."""
        check_call(batch_size, num_inference_steps, output_type, unsupported, self.text_encoder is not None)
        batch_size, text = self._prompts(prompt, negative_prompt, batch_size, guidance_scale)
        d = self.defaults
        cache_interval, cache_depth = d.caching_with(cache_interval, cache_depth)
        from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
        from PIL import Image

        result = sample(
            self.runner, self.scheduler, sample_shape=self.sample_shape,
            sampler=d.sampler if sampler is None else sampler,
            steps=d.steps if num_inference_steps is None else num_inference_steps, num_images=batch_size,
            batch_size=batch_size, seed=seed_of(seed, generator), progress=progress, class_labels=class_labels,
            guidance_scale=guidance_scale, null_class=self.null_class, decode=self.decode, num_classes=self.num_classes,
            cache_interval=cache_interval, cache_depth=cache_depth, **text,
        )
        images = result.images if output_type == "pt" else to_uint8(result.images)
        if output_type == "pil":
            images = [Image.fromarray(p[..., 0] if p.shape[-1] == 1 else p) for p in images]
        return ImagePipelineOutput(images=images) if return_dict else (images,)

    def _prompts(self, prompt, negative_prompt, batch_size: int, guidance_scale: float) -> tuple[int, dict]:
        """(images to sample, sample()'s prompt_embeds and negative_prompt_embeds from the prompts)."""
        if self.text_encoder is None:
            if prompt is not None or negative_prompt is not None:
                raise ValueError("prompt was given but this pipeline has no text encoder (its model is not "
                                 "text-conditional); drop it")
            return batch_size, {}
        if prompt is None:
            raise ValueError("this pipeline is text-conditional: pass prompt=... (one string, or one per image)")
        prompts = prompt_list(prompt, batch_size, "prompt")
        text = {"prompt_embeds": self.text_encoder(prompts)}
        if guidance_scale != 1.0:
            negative = "" if negative_prompt is None else negative_prompt
            text["negative_prompt_embeds"] = self.text_encoder(prompt_list(negative, len(prompts), "negative_prompt"))
        return len(prompts), text


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """NCHW in [-1, 1] -> NHWC uint8."""
    array = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return array.permute(0, 2, 3, 1).numpy()


def save_grid(images: torch.Tensor, path: str | Path, *, nrow: int | None = None, upscale: int | None = None) -> Path:
    """Write images (NCHW in [-1, 1]) as one PNG grid, written atomically.

    nrow: images per row (default: square-ish). upscale: nearest-neighbour factor so tiny images are visible
    (default: enough to make each cell at least 64 px).
    """
    from PIL import Image

    pixels = to_uint8(images)
    n, h, w, c = pixels.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    pad = 1
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i in range(n):
        r, q = divmod(i, nrow)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + q * (w + pad) : pad + q * (w + pad) + w] = pixels[i]
    image = Image.fromarray(grid[..., 0] if c == 1 else grid)
    factor = upscale or max(1, math.ceil(64 / max(h, w)))
    image = image.resize((image.width * factor, image.height * factor), Image.NEAREST)
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())
    return Path(path)

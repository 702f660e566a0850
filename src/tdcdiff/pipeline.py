"""Sampling with diffusers schedulers (DDPM, DDIM, DPM-Solver++), any step count, seeded and batched.

The loop calls the denoiser in exactly one place (`_predict`), with the whole batch at one timestep;
a Router passed as the denoiser is what sends each step to its group's model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .models import as_denoiser, check_denoiser, num_class_embeds

SAMPLERS = ("ddpm", "ddim", "dpm-solver++")
LEARNED_VARIANCES = ("learned", "learned_range")


def make_sampler(name: str, train_scheduler, *, learned_variance: bool = False):
    """A diffusers sampling scheduler sharing the training schedule's betas and prediction type.

    name: "ddpm", "ddim" or "dpm-solver++".
    train_scheduler: the DDPMScheduler the model was trained with.
    learned_variance: the model outputs a variance half; DDPM then uses it (diffusers' "learned_range",
        unless the schedule says "learned"). DDIM and DPM-Solver never see it (`sample` passes them the
        prediction only), so DPM-Solver's own learned-variance slicing (`[:, :3]`, RGB only) is switched off.
    """
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

    config = train_scheduler.config
    if name == "ddpm":
        declared = config.get("variance_type") or "fixed_small"  # not every scheduler's config has one
        if not learned_variance:
            return DDPMScheduler.from_config(config, variance_type="fixed_small" if declared in LEARNED_VARIANCES else declared)
        return DDPMScheduler.from_config(config, variance_type=declared if declared in LEARNED_VARIANCES else "learned_range")
    if name == "ddim":
        return DDIMScheduler.from_config(config)
    if name == "dpm-solver++":
        return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", variance_type=None)
    raise ValueError(f"unknown sampler {name!r}; choose one of {SAMPLERS}")


@dataclass
class SampleResult:
    """Images in [-1, 1] (NCHW) and the training timesteps the sampler visited, in order."""

    images: torch.Tensor
    timesteps: list[int]
    sampler: str
    steps: int
    seed: int


def _predict(denoiser: nn.Module, x: torch.Tensor, t: int, labels: torch.Tensor | None = None, *,
             guidance_scale: float = 1.0, null_class: int | None = None, with_variance: bool = False) -> torch.Tensor:
    """The denoiser's output at one t; with guidance, uncond + s * (cond - uncond) on the prediction half
    (a learned variance half comes from the conditional pass)."""
    t = torch.full((x.shape[0],), int(t), dtype=torch.long, device=x.device)
    if labels is None or guidance_scale == 1.0:
        return denoiser(x, t, labels, with_variance=with_variance)
    null = torch.full_like(labels, null_class)
    cond, uncond = denoiser(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, null]),
                            with_variance=with_variance).chunk(2)
    c = x.shape[1]
    guided = uncond[:, :c] + guidance_scale * (cond[:, :c] - uncond[:, :c])
    return torch.cat([guided, cond[:, c:]], dim=1)


def _class_labels(model: nn.Module, class_labels, num_images: int, guidance_scale: float,
                  null_class: int | None) -> torch.Tensor | None:
    """class_labels as (num_images,) int64, after checking them against the model's class embedding."""
    classes = num_class_embeds(model)
    if class_labels is None:
        if classes is not None:
            raise ValueError(
                f"the model is class-conditional ({classes} class ids): pass class_labels (an int or one per "
                "image; `tdcdiff sample --class N`)"
            )
        if guidance_scale != 1.0:
            raise ValueError("guidance_scale needs class_labels (and a model trained with label dropout)")
        return None
    if classes is None:
        raise ValueError("class_labels were given but the model has no class embedding; drop them")
    labels = torch.as_tensor(class_labels, dtype=torch.long).flatten()
    if labels.numel() == 1:
        labels = labels.expand(num_images)
    if labels.numel() != num_images:
        raise ValueError(f"class_labels must be one int or one per image ({num_images}), got {labels.numel()}")
    if labels.min() < 0 or labels.max() >= classes:
        raise ValueError(f"class labels must be in 0..{classes - 1} (the model embeds {classes} ids), "
                         f"got {labels.min().item()}..{labels.max().item()}")
    if guidance_scale != 1.0:
        if null_class is None:
            raise ValueError(
                "guidance_scale != 1 needs null_class, the class id the model was trained with for dropped labels "
                "(train with TrainConfig.label_dropout > 0; bundles and runs record it)"
            )
        if not 0 <= null_class < classes:
            raise ValueError(f"null_class must be in 0..{classes - 1}, got {null_class}")
    return labels


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
) -> SampleResult:
    """Generate images with a trained denoiser (or a Router of group models).

    model: called as model(x, t); a diffusers UNet2DModel, any denoiser, or a tdcdiff Router.
    train_scheduler: the training schedule (gives betas, T and the prediction type).
    sample_shape: (C, H, W) of one image.
    sampler: "ddpm", "ddim" or "dpm-solver++".
    steps: number of sampling steps, 1..T.
    num_images, batch_size: how many images in total, and how many per forward pass.
    seed: the initial noise and every stochastic step are drawn from a generator seeded with it.
    class_labels: for a class-conditional model (required there): one int for all images or one per image.
    guidance_scale: classifier-free guidance weight (1: none); needs null_class, the id the model was trained
        with for dropped labels.
    A model that outputs 2C channels (learned variance) gives DDPM its variance half; DDIM and DPM-Solver
    use only the first C channels.
    """
    from tqdm.auto import tqdm

    num_train = train_scheduler.config.num_train_timesteps
    if not 1 <= steps <= num_train:
        raise ValueError(f"steps must be between 1 and the training schedule's T={num_train}, got {steps}")
    if num_images < 1 or batch_size < 1:
        raise ValueError(f"num_images and batch_size must be >= 1, got {num_images} and {batch_size}")
    grouping = getattr(model, "grouping", None)
    if grouping is not None and grouping.num_train_timesteps != num_train:
        raise ValueError(
            f"the scheduler has T={num_train} training timesteps but the router's groups cover "
            f"T={grouping.num_train_timesteps}; sample with the bundle's own scheduler"
        )
    labels = _class_labels(model, class_labels, num_images, guidance_scale, null_class)
    scheduler = make_sampler(sampler, train_scheduler)
    check_denoiser(model, sample_shape)
    denoiser = as_denoiser(model).eval()
    if device is None:
        param = next(denoiser.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn((num_images, *sample_shape), generator=generator)

    outputs, visited = [], []
    batches = range(0, num_images, batch_size)
    bar = tqdm(total=len(batches) * steps, desc=f"sample {sampler}-{steps}", disable=not progress)
    for start in batches:
        scheduler.set_timesteps(steps, device=device)
        x = noise[start : start + batch_size].to(device) * scheduler.init_noise_sigma
        visited = [int(t) for t in scheduler.timesteps]
        batch_labels = None if labels is None else labels[start : start + batch_size].to(device)
        for t in scheduler.timesteps:
            model_input = scheduler.scale_model_input(x, t)
            out = _predict(denoiser, model_input, t, batch_labels, guidance_scale=guidance_scale,
                           null_class=null_class, with_variance=sampler == "ddpm")
            if out.shape[1] != x.shape[1] and scheduler.config.get("variance_type") not in LEARNED_VARIANCES:
                scheduler = make_sampler(sampler, train_scheduler, learned_variance=True)  # same timesteps
                scheduler.set_timesteps(steps, device=device)
            x = scheduler.step(out, t, x, generator=generator).prev_sample
            bar.update(1)
        outputs.append(x.clamp(-1, 1).cpu())
    bar.close()
    return SampleResult(torch.cat(outputs), visited, sampler, steps, seed)


class TDCPipeline:
    """A diffusers-style pipeline over a router (or any denoiser): `pipe(batch_size=16).images`.

    denoiser: the Router of a bundle, or any model(x, t). scheduler: the training schedule.
    sample_shape: (C, H, W) of one image. null_class: the class id a class-conditional model was trained
    with for dropped labels (needed for guidance).
    """

    def __init__(self, denoiser: nn.Module, scheduler, sample_shape: tuple[int, int, int], *,
                 null_class: int | None = None):
        self.denoiser = denoiser
        self.scheduler = scheduler
        self.sample_shape = tuple(sample_shape)
        self.null_class = null_class

    def __call__(
        self,
        batch_size: int = 1,
        num_inference_steps: int = 50,
        *,
        sampler: str = "ddim",
        seed: int = 0,
        output_type: str = "pil",
        progress: bool = True,
        class_labels=None,
        guidance_scale: float = 1.0,
    ):
        """Sample `batch_size` images; output_type "pil" (list of PIL images), "np" (NHWC uint8) or "pt"
        (NCHW float in [-1, 1]). class_labels, guidance_scale: see `sample`. Returns diffusers'
        ImagePipelineOutput."""
        from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
        from PIL import Image

        result = sample(
            self.denoiser, self.scheduler, sample_shape=self.sample_shape, sampler=sampler,
            steps=num_inference_steps, num_images=batch_size, batch_size=batch_size, seed=seed, progress=progress,
            class_labels=class_labels, guidance_scale=guidance_scale, null_class=self.null_class,
        )
        if output_type == "pt":
            return ImagePipelineOutput(images=result.images)
        pixels = to_uint8(result.images)
        if output_type == "np":
            return ImagePipelineOutput(images=pixels)
        if output_type == "pil":
            return ImagePipelineOutput(images=[Image.fromarray(p[..., 0] if p.shape[-1] == 1 else p) for p in pixels])
        raise ValueError(f"unknown output_type {output_type!r}; choose 'pil', 'np' or 'pt'")


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

    from .serialization import atomic_write_bytes

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
    atomic_write_bytes(Path(path), buffer.getvalue())
    return Path(path)

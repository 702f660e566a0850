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

from .models import as_denoiser, check_denoiser

SAMPLERS = ("ddpm", "ddim", "dpm-solver++")
# "trailing": the first step is at t = T-1 and the steps are evenly spaced below it, for every step count
# (diffusers' "leading" starts 1-step sampling at t=0; its "linspace" repeats a timestep at steps = T, which
# makes DPM-Solver++ divide by a zero step size).
TIMESTEP_SPACING = "trailing"


def make_sampler(name: str, train_scheduler):
    """A diffusers sampling scheduler sharing the training schedule's betas and prediction type.

    name: "ddpm", "ddim" or "dpm-solver++".
    train_scheduler: the DDPMScheduler the model was trained with.
    Every sampler uses TIMESTEP_SPACING, whatever the training scheduler's config says.
    """
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

    config = train_scheduler.config
    if name == "ddpm":
        return DDPMScheduler.from_config(config, timestep_spacing=TIMESTEP_SPACING)
    if name == "ddim":
        return DDIMScheduler.from_config(config, timestep_spacing=TIMESTEP_SPACING)
    if name == "dpm-solver++":
        return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++",
                                                       timestep_spacing=TIMESTEP_SPACING)
    raise ValueError(f"unknown sampler {name!r}; choose one of {SAMPLERS}")


@dataclass
class SampleResult:
    """Images in [-1, 1] (NCHW, float32) and the training timesteps the sampler visited, in order.

    timestep_spacing: how the steps were placed among the T training timesteps (diffusers' name).
    """

    images: torch.Tensor
    timesteps: list[int]
    sampler: str
    steps: int
    seed: int
    timestep_spacing: str = TIMESTEP_SPACING


def _predict(denoiser: nn.Module, x: torch.Tensor, t: int) -> torch.Tensor:
    return denoiser(x, torch.full((x.shape[0],), int(t), dtype=torch.long, device=x.device))


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
) -> SampleResult:
    """Generate images with a trained denoiser (or a Router of group models).

    model: called as model(x, t); a diffusers UNet2DModel, any denoiser, or a tdcdiff Router.
    train_scheduler: the training schedule (gives betas, T and the prediction type).
    sample_shape: (C, H, W) of one image.
    sampler: "ddpm", "ddim" or "dpm-solver++".
    steps: number of sampling steps, 1..T.
    num_images, batch_size: how many images in total, and how many per forward pass.
    seed: the initial noise and every stochastic step are drawn from a generator seeded with it.
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
        for t in scheduler.timesteps:
            model_input = scheduler.scale_model_input(x, t)
            x = scheduler.step(_predict(denoiser, model_input, t), t, x, generator=generator).prev_sample
            bar.update(1)
        outputs.append(x.clamp(-1, 1).cpu())
    bar.close()
    return SampleResult(torch.cat(outputs), visited, sampler, steps, seed, scheduler.config.timestep_spacing)


class TDCPipeline:
    """A diffusers-style pipeline over a router (or any denoiser): `pipe(batch_size=16).images`.

    denoiser: the Router of a bundle, or any model(x, t). scheduler: the training schedule.
    sample_shape: (C, H, W) of one image.
    """

    def __init__(self, denoiser: nn.Module, scheduler, sample_shape: tuple[int, int, int]):
        self.denoiser = denoiser
        self.scheduler = scheduler
        self.sample_shape = tuple(sample_shape)

    def __call__(
        self,
        batch_size: int = 1,
        num_inference_steps: int = 50,
        *,
        sampler: str = "ddim",
        seed: int = 0,
        output_type: str = "pil",
        progress: bool = True,
    ):
        """Sample `batch_size` images; output_type "pil" (list of PIL images), "np" (NHWC uint8) or "pt"
        (NCHW float in [-1, 1]). Returns diffusers' ImagePipelineOutput."""
        from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
        from PIL import Image

        result = sample(
            self.denoiser, self.scheduler, sample_shape=self.sample_shape, sampler=sampler,
            steps=num_inference_steps, num_images=batch_size, batch_size=batch_size, seed=seed, progress=progress,
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

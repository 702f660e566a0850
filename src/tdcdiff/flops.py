"""FLOPs of one forward pass, one convention everywhere: FLOPs = 2 x multiply-accumulates."""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from .models import as_denoiser, check_denoiser, check_sample_shape, check_sample_size, takes_condition


def _cpu_flash_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    # torch has no formula for the CPU flash-attention kernel diffusers dispatches to: without this,
    # attention counts as zero FLOPs (about 8% of a small UNet with attention).
    return sdpa_flop_count(query_shape, key_shape, value_shape)


_CUSTOM = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_sdpa_flops}


@torch.no_grad()
def _count(model: torch.nn.Module, sample_shape: tuple[int, ...], timestep: int) -> FlopCounterMode:
    sample_shape = check_sample_shape(sample_shape)
    check_denoiser(model, sample_shape, source="sample_shape")
    check_sample_size(model, sample_shape)
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    # the input in the weights' dtype: a float16 model refuses float32 input
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    x = torch.zeros((1, *sample_shape), device=device, dtype=dtype)
    t = torch.full((1,), timestep, dtype=torch.long, device=device)
    counter = FlopCounterMode(display=False, custom_mapping=_CUSTOM)
    with counter:
        # A conditional model needs a class label or a text embedding (Denoiser gives one); other modules are
        # called as they are.
        (as_denoiser(model) if takes_condition(model) else model)(x, t)
    return counter


def count_flops(model: torch.nn.Module, sample_shape: tuple[int, ...], timestep: int = 500) -> int:
    """FLOPs (2 x MACs) of one forward pass of a denoiser on ONE sample.

    model: anything called as model(x, t) (a diffusers UNet2DModel or a tdcdiff Denoiser).
    sample_shape: (C, H, W) of one sample; the count is for batch 1.
    timestep: the timestep fed to the model (FLOPs do not depend on it for standard UNets).
    Counted in the dtype of the model's weights (FLOPs do not depend on it). Raises ValueError for a sample_shape
    that is not 3 positive integers, or not the channels and size the model was built for (models.check_sample_size).
    """
    return int(_count(model, sample_shape, timestep).get_total_flops())


def flops_by_module(model: torch.nn.Module, sample_shape: tuple[int, ...], timestep: int = 500) -> dict[str, int]:
    """FLOPs of one forward pass at batch 1 per module, keyed by qualified name as FlopCounterMode gives it
    ("Global" for the total, "<ClassName>.<path>" for submodules)."""
    return {name: int(sum(ops.values()))
            for name, ops in _count(model, sample_shape, timestep).get_flop_counts().items()}

"""Denoiser presets (diffusers UNet2DModel) and the adapter that lets any `model(x, t)` be a denoiser."""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from .devices import check_device_usable
from .settings import as_integer, is_integer


@dataclass(frozen=True)
class Preset:
    """A UNet2DModel shape sized to train on a few CPU cores."""

    sample_size: int
    in_channels: int
    block_out_channels: tuple[int, ...]
    layers_per_block: int = 1
    norm_num_groups: int = 8
    description: str = ""


PRESETS: dict[str, Preset] = {
    "digits-8": Preset(8, 1, (32, 64), description="8x8 gray (scikit-learn digits), 2 levels, ~0.6 M params"),
    "gray-28": Preset(28, 1, (32, 64, 64), description="28x28 gray (MNIST), 3 levels, ~1 M params"),
    "gray-32": Preset(32, 1, (32, 64, 64), description="32x32 gray, 3 levels, ~1 M params"),
    "rgb-32": Preset(32, 3, (32, 64, 128), layers_per_block=2, description="32x32 RGB (CIFAR-10), 3 levels"),
}


def build_unet(
    preset: str = "digits-8",
    *,
    attention: bool = False,
    sample_size: int | None = None,
    in_channels: int | None = None,
    num_train_timesteps: int | None = None,
):
    """A fresh diffusers UNet2DModel from a preset.

    preset: one of PRESETS ("digits-8", "gray-28", "gray-32", "rgb-32").
    attention: put self-attention in the lowest-resolution down/up blocks and the mid block.
    sample_size, in_channels: override the preset's image size (int, or (height, width)) / channel count; None
        (the default) keeps the preset's. Integers >= 1 (numpy's are taken).
    num_train_timesteps: stored in the model config for provenance only.
    Raises ValueError for an unknown preset, a size or channel count that is not a positive integer, or an image
    size the UNet cannot halve at every level.
    """
    from diffusers import UNet2DModel

    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; choose one of {sorted(PRESETS)}")
    p = PRESETS[preset]
    sample_size = p.sample_size if sample_size is None else _image_size(sample_size)
    channels = p.in_channels if in_channels is None else as_integer("in_channels", in_channels, 1)
    if num_train_timesteps is not None:
        num_train_timesteps = as_integer("num_train_timesteps", num_train_timesteps, 2)
    levels = len(p.block_out_channels)
    factor = 2 ** (levels - 1)  # each level but the last halves the image; the up path must meet the same sizes
    for size in (sample_size,) if isinstance(sample_size, int) else sample_size:
        if size % factor:
            lower, upper = size - size % factor, size - size % factor + factor
            sizes = f"{lower} or {upper}" if lower else f"{upper}"
            raise ValueError(
                f"images of size {size} do not fit the UNet preset {preset!r}: its {levels} levels need a size "
                f"divisible by {factor}; resize them to {sizes} (--image-size, image_size)"
            )
    down = ["DownBlock2D"] * levels
    up = ["UpBlock2D"] * levels
    if attention:
        down[-1] = "AttnDownBlock2D"
        up[0] = "AttnUpBlock2D"
    return UNet2DModel(
        sample_size=sample_size,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=p.block_out_channels,
        layers_per_block=p.layers_per_block,
        down_block_types=tuple(down),
        up_block_types=tuple(up),
        norm_num_groups=p.norm_num_groups,
        attention_head_dim=8,
        add_attention=attention,  # without this the mid block keeps an attention layer
        num_train_timesteps=num_train_timesteps,
    )


def _image_size(size) -> int | tuple[int, int]:
    """build_unet's sample_size as plain ints: one integer >= 1, or (height, width) of two."""
    if is_integer(size):
        return as_integer("sample_size", size, 1)
    if isinstance(size, (tuple, list)) and len(size) == 2 and all(is_integer(n) and n >= 1 for n in size):
        return tuple(int(n) for n in size)
    raise ValueError(f"sample_size must be an integer >= 1 or (height, width) of two, got {size!r}")


def preset_for(image_size: int, channels: int) -> str:
    """The preset that fits images of this size and channel count."""
    if channels == 3:
        return "rgb-32"
    if image_size <= 8:
        return "digits-8"
    return "gray-28" if image_size == 28 else "gray-32"


def num_class_embeds(model: nn.Module) -> int | None:
    """Number of class ids a class-conditional model embeds (its null class included), or None.

    Read from a diffusers config (UNet2DModel `num_class_embeds`; DiTTransformer2DModel `num_embeds_ada_norm`
    + 1, its null class) or from a `num_classes` attribute of any other module.
    """
    if getattr(model, "is_denoiser", False) and hasattr(model, "experts"):  # a Router: its experts share it
        model = model.experts[0]
    model = model.model if isinstance(model, Denoiser) else model
    config = getattr(model, "config", None)
    value = getattr(config, "num_class_embeds", None) if config is not None else None
    if isinstance(value, int):
        return value
    value = getattr(config, "norm_type", None) == "ada_norm_zero" and getattr(config, "num_embeds_ada_norm", None)
    if isinstance(value, int) and not isinstance(value, bool):
        return value + 1  # DiT's label table has one more row: id num_embeds_ada_norm is its null class
    value = getattr(model, "num_classes", None)
    return value if isinstance(value, int) else None


# The token count of a CLIP text embedding (openai/CLIP's context_length; Stable Diffusion pipelines pad every prompt
# to tokenizer.model_max_length = 77): what a text-conditional model is counted, traced and timed with.
CLIP_TOKENS = 77


@functools.lru_cache(maxsize=None)
def _forward_takes_text(cls: type) -> bool:
    return "encoder_hidden_states" in inspect.signature(cls.forward).parameters


def text_width(model: nn.Module) -> int | None:
    """The width of the text embedding a text-conditional model's cross-attention reads (diffusers
    UNet2DConditionModel `cross_attention_dim`: its forward takes encoder_hidden_states), or None.

    A Router or Denoiser answers for the network it wraps. A per-block list of widths counts when all are equal.
    """
    if getattr(model, "is_denoiser", False) and hasattr(model, "experts"):  # a Router: its experts share it
        model = model.experts[0]
    model = model.model if isinstance(model, Denoiser) else model
    config = getattr(model, "config", None)
    width = getattr(config, "cross_attention_dim", None) if config is not None else None
    if isinstance(width, (list, tuple)) and len(set(width)) == 1:
        width = width[0]
    if not isinstance(width, int) or isinstance(width, bool) or not _forward_takes_text(type(model)):
        return None
    return width


def takes_condition(model: nn.Module) -> bool:
    """Whether the model needs a condition in every call: class ids or a text embedding."""
    return num_class_embeds(model) is not None or text_width(model) is not None


class Denoiser(nn.Module):
    """Calls any module as `model(x, t)` (or with a condition) and returns a plain tensor.

    Accepts models that return a tensor, a diffusers output with `.sample`, or a tuple whose first
    item is the prediction. Everything in tdcdiff calls denoisers through this. x goes into the model in the
    dtype of its floating-point weights (fp16/bf16 models work); the output comes back in x's dtype, so the
    scheduler's arithmetic stays in float32.

    A model may output 2C channels for C input channels (a learned variance, as in IDDPM/ADM): the first C
    are the prediction. forward returns only those unless `with_variance=True` (the DDPM sampler's case).
    condition: for a class-conditional model, (N,) int64 class ids (`model(x, t, class_labels=...)`); for a
        text-conditional one (text_width), (N, L, width) float text embeddings (`model(x, t,
        encoder_hidden_states=...)`, as diffusers' UNet2DConditionModel). None gives a class-conditional model
        class 0 and a text-conditional one `null_text` (enough to count FLOPs or trace it; training and sampling
        pass real conditions).
    null_text: (L, width), what a text-conditional model gets when a call gives no condition: the empty prompt's
        embedding where known (its unconditional output, as in classifier-free guidance), else zeros of
        CLIP_TOKENS tokens. Kept as a plain attribute, never saved with the model.
    """

    def __init__(self, model: nn.Module, null_text: torch.Tensor | None = None):
        super().__init__()
        self.model = model
        self.null_text = null_text

    def _text(self, condition: torch.Tensor | None, batch: int, width: int, like: torch.Tensor) -> torch.Tensor:
        if condition is None:
            null = self.null_text if self.null_text is not None else like.new_zeros((CLIP_TOKENS, width))
            condition = null.expand(batch, *null.shape[-2:])
        if not condition.is_floating_point() or condition.ndim != 3 or condition.shape[-1] != width:
            raise ValueError(f"the model is text-conditional: its condition must be float text embeddings of shape "
                             f"(N, tokens, {width}), got a {str(condition.dtype).removeprefix('torch.')} tensor of "
                             f"shape {tuple(condition.shape)}")
        return condition.to(like.device, like.dtype)

    def forward(self, x: torch.Tensor, t: torch.Tensor, condition: torch.Tensor | None = None, *,
                with_variance: bool = False) -> torch.Tensor:
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        params = self.model.parameters() if isinstance(self.model, nn.Module) else ()  # a plain function: as is
        weight = next((p for p in params if p.is_floating_point()), None)
        inputs = x if weight is None else x.to(weight.dtype)
        width = text_width(self.model)
        if width is not None:
            out = self.model(inputs, t, encoder_hidden_states=self._text(condition, x.shape[0], width, inputs))
        else:
            if condition is None and num_class_embeds(self.model) is not None:
                condition = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
            out = self.model(inputs, t) if condition is None else self.model(inputs, t, class_labels=condition)
        if hasattr(out, "sample"):
            out = out.sample
        elif isinstance(out, (tuple, list)):
            out = out[0]
        channels = x.shape[1]
        if not isinstance(out, torch.Tensor) or out.shape[1] not in (channels, 2 * channels) \
                or out.shape[2:] != x.shape[2:] or out.shape[0] != x.shape[0]:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(
                f"denoiser output has shape {got} but its input has shape {tuple(x.shape)}; a denoiser "
                f"must map (x, t) to a tensor of x's shape, or with a learned variance to {2 * channels} channels "
                "(the prediction first)"
            )
        return (out if with_variance else out[:, :channels]).to(x.dtype)


def with_null_text(model: nn.Module, null_text: torch.Tensor) -> Denoiser:
    """The model as a Denoiser (itself, if it is one) whose calls without a condition get `null_text`, (L, width):
    the empty prompt's embedding of a text-conditional model, so that such a call is the unconditional one."""
    denoiser = model if isinstance(model, Denoiser) else Denoiser(model)
    denoiser.null_text = null_text
    return denoiser


def as_denoiser(model: nn.Module) -> Denoiser:
    """Wrap a model as a Denoiser unless it already is one (or a Router, which behaves like one)."""
    if isinstance(model, Denoiser) or getattr(model, "is_denoiser", False):
        return model
    return Denoiser(model)


def check_denoiser(model: nn.Module, sample_shape: tuple[int, int, int], *, source: str = "data") -> None:
    """Fail early, with the fix, when a model takes another channel count than the data has.

    source: where sample_shape came from, for the fix: "data" (the data's images: --channels) or "sample_shape"
    (the API argument of sample() and count_flops). (A model whose output shape differs from its input is caught
    by Denoiser on its first call.)
    """
    first_conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if first_conv is None or first_conv.in_channels == sample_shape[0]:
        return
    channels = first_conv.in_channels
    if source == "sample_shape":
        raise ValueError(f"the model takes {channels}-channel images but sample_shape {tuple(sample_shape)} has "
                         f"{sample_shape[0]} channels; give sample_shape {(channels, *sample_shape[1:])}")
    raise ValueError(
        f"the model takes {channels}-channel images but the data has {sample_shape[0]} channels; "
        f"load the data with channels={channels} (--channels) or build the model with "
        f"in_channels={sample_shape[0]}"
    )


class NonFiniteDenoiser(ValueError):
    """The denoiser's output (or weights) hold NaN/inf before any training: the cause is the model, not the
    learning rate."""


@torch.no_grad()
def check_finite(model: nn.Module, images: torch.Tensor, alphas_cumprod: torch.Tensor,
                 labels: torch.Tensor | None = None, *, batch: int = 8) -> None:
    """Raise NonFiniteDenoiser, naming the cause, unless the model's outputs are finite at t=0 and t=T-1 on
    a few noised images of the data.

    images: (N, C, H, W) in [-1, 1]; alphas_cumprod: (T,) of the training schedule; labels: (N,) class ids
    for a class-conditional model.
    """
    bad = [name for name, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise NonFiniteDenoiser(f"the model's weights hold NaN/inf (in {', '.join(bad[:3])}); load or initialise "
                                "finite weights")
    denoiser = as_denoiser(model)
    param = next(denoiser.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    x0 = images[:batch].to(device)
    y = None if labels is None else labels[:batch].to(device)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0)).to(device)
    failed = []
    with evaluating(denoiser):
        for t_value in (0, len(alphas_cumprod) - 1):
            a = alphas_cumprod[t_value].to(device)
            x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
            t = torch.full((len(x0),), t_value, dtype=torch.long, device=device)
            if not torch.isfinite(denoiser(x_t, t, y, with_variance=True)).all():
                failed.append(t_value)
    last = len(alphas_cumprod) - 1
    if failed == [0]:
        raise NonFiniteDenoiser(
            "the model's output is not finite at t=0: a time embedding such as log(t) fails at t=0 (diffusion "
            "timesteps are integers 0..T-1); make it finite there, e.g. embed t + 1 or use diffusers' Timesteps"
        )
    if failed == [last]:
        raise NonFiniteDenoiser(
            f"the model's output is not finite at t={last} (pure noise): its time embedding overflows for large t "
            "or it has no normalisation; scale t (e.g. t / T) or check the embedding"
        )
    if failed:
        raise NonFiniteDenoiser(
            f"the model's output is not finite at t=0 and t={last} on a batch of the data: the model itself "
            "produces NaN/inf (check its forward pass, e.g. a division or log of its input)"
        )


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """model.eval() for the block; afterwards each module's own training flag is restored (also on error), so a
    preview sampled inside a training loop leaves dropout and norms as the caller had them."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


def torch_device(device, name: str = "device", *, fix: str = "give 'cpu' or 'cuda'", visible: bool = True
                 ) -> torch.device:
    """`device` (a str or torch.device) as a torch.device, for an argument `name` of the public API. Raises
    ValueError for a device torch does not know ("CPU"), the meta device (it holds no data; `fix` says what to give
    instead), or, with `visible`, a device this process cannot use (devices.check_device_usable: a CUDA device it
    cannot see, or 'mps' and the like on a torch build or machine without them), before any work."""
    try:
        chosen = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"{name} {device!r} is not a torch device ({err}); give e.g. 'cpu' or 'cuda:0'") from None
    if chosen.type == "meta":
        raise ValueError(f"{name} 'meta' holds no data: {fix}")
    if visible:
        check_device_usable(chosen, f"{name} {str(chosen)!r}", "use 'cpu'")
    return chosen


def check_sample_size(model: nn.Module, sample_shape: tuple[int, int, int], *, source: str = "sample_shape") -> None:
    """Raise ValueError unless sample_shape (C, H, W) is the input size a model (each expert of a Router) was built
    for, where its config states one (sample_size): a convolutional model runs at other sizes, and would silently
    give images of another size, or fail deep inside (a UNet on a size it cannot halve). source: where the shape
    came from, for the fix: "sample_shape" (sample's argument) or "data" (training images)."""
    for expert in getattr(model, "experts", None) or [model]:
        inner = network(expert)
        size = getattr(getattr(inner, "config", None), "sample_size", None)
        size = [size, size] if isinstance(size, int) else list(size) if isinstance(size, (list, tuple)) else None
        if size is None or size == list(sample_shape[1:]):
            continue
        if source == "data":
            h, w = sample_shape[1:]
            raise ValueError(f"the training images are {h}x{w} but the model was built for {size[0]}x{size[1]} "
                             f"inputs (its config's sample_size); resize the images to {size[0]}x{size[1]}, or "
                             f"build the model with sample_size={h if h == w else (h, w)}")
        raise ValueError(f"sample_shape {tuple(sample_shape)} is not the {size[0]}x{size[1]} input the model was "
                         f"built for (its config's sample_size); sample at ({sample_shape[0]}, {size[0]}, {size[1]})")


def check_sample_shape(sample_shape) -> tuple[int, int, int]:
    """sample_shape as (channels, height, width) of Python ints; ValueError unless 3 positive integers (numpy's,
    0-d tensors, a torch.Size, a 1-d numpy array or tensor are taken: settings.plain_number's rule)."""
    listed = sample_shape.tolist() if callable(getattr(sample_shape, "tolist", None)) else sample_shape
    if not (isinstance(listed, (tuple, list)) and len(listed) == 3 and all(is_integer(n) and n >= 1 for n in listed)):
        raise ValueError(f"sample_shape must be (channels, height, width), 3 positive integers, got {sample_shape!r}")
    return tuple(int(n) for n in listed)


def network(model: nn.Module) -> nn.Module:
    """The network a Denoiser wraps (unit and layer names are relative to it), or the model itself."""
    return model.model if isinstance(model, Denoiser) else model

"""A bundle's experts (and VAE) checked against what its manifest says, before any sampling: the same class ids
and text width for every expert, the sample shape each takes, and one probing call per expert (its weights and
architecture fit, finite outputs, the FLOPs the manifest states) and a probing decode of the VAE. Used by
save_bundle on what it is given and by load_bundle on what it rebuilt (bundle.py)."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from .files import brief, is_count
from .flops import count_flops
from .grouping import Grouping
from .latent import Decoder
from .manifest import MANIFEST, REEXPORT, BundleError
from .models import Denoiser, num_class_embeds, text_width
from .router import Router


def check_class_ids(experts: list[nn.Module], where: str, fix: str) -> None:
    """Every expert takes the same class ids (sampling checks labels against the first one's)."""
    counts = [num_class_embeds(e) for e in experts]
    for i, count in enumerate(counts):
        if count != counts[0]:
            shown = ["no class ids" if n is None else f"{n} class ids" for n in (count, counts[0])]
            raise BundleError(f"{where}expert {i} embeds {shown[0]} but expert 0 embeds {shown[1]}; every expert of a "
                              f"bundle takes the same class ids: {fix}")


def check_text(experts: list[nn.Module], width: int | None, where: str) -> None:
    """Text-conditional experts (all with one text width) come with a text encoder of that width; others without."""
    widths = [text_width(e) for e in experts]
    for i, found in enumerate(widths):
        if found != widths[0]:
            raise BundleError(f"{where}expert {i} reads text embeddings of width {found} but expert 0 of width "
                              f"{widths[0]}; every expert of a bundle takes the same conditions: {REEXPORT}")
    if widths and widths[0] != width:
        have = f"a text encoder of width {width}" if width is not None else "no text encoder ('text' is null)"
        need = ("not text-conditional" if widths[0] is None
                else f"text-conditional (cross_attention_dim {widths[0]})")
        raise BundleError(f"{where}the experts are {need} but the bundle holds {have}: the text encoder belongs with "
                          f"the experts it was trained with; {REEXPORT}")


def check_input(expert: nn.Module, i: int, shape: list, where: str) -> None:
    """The sample shape must be what the expert takes: its first convolution's channels and, when its config
    states one, its sample_size."""
    model = expert.model if isinstance(expert, Denoiser) else expert
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if conv is not None and conv.in_channels != shape[0]:
        raise BundleError(f"{where}'sample_shape' is {shape} but expert {i} takes {conv.in_channels}-channel input "
                          f"(its first convolution); set 'sample_shape' to "
                          f"[{conv.in_channels}, {shape[1]}, {shape[2]}]")
    config = getattr(model, "config", None)
    size = config.get("sample_size") if isinstance(config, dict) else None
    if size is not None:
        size = [size, size] if is_count(size, 1) else size
        if not isinstance(size, (list, tuple)) or len(size) != 2 or not all(is_count(s, 1) for s in size):
            raise BundleError(f"{where}expert {i}'s config has sample_size {config.get('sample_size')!r}; it must be "
                              f"a positive integer or [height, width]: {REEXPORT}")
        size = list(size)
        if size != shape[1:]:
            raise BundleError(f"{where}'sample_shape' is {shape} but expert {i} was built for {size[0]}x{size[1]} "
                              f"inputs (its config's sample_size); set 'sample_shape' to "
                              f"[{shape[0]}, {size[0]}, {size[1]}]")


def check_given(experts: list[nn.Module], shape: list, width: int | None) -> None:
    """save_bundle's checks of its experts, before anything is written: one class embedding and one text width
    (`width`: the text encoder's, None without one) for every expert, and the sample shape each takes. Raises
    BundleError."""
    check_class_ids(experts, "", "give experts with one class embedding (the same num_class_embeds)")
    check_text(experts, width, "")
    for i, expert in enumerate(experts):
        check_input(expert, i, shape, "")


@torch.no_grad()
def probe_vae(vae: nn.Module, manifest: dict, path: Path) -> None:
    """The VAE's latent scale is the one the experts' latents were made with (the manifest's, written at export)
    and finite, and it decodes a latent of the bundle's sample shape to finite images."""
    scale, shift = vae.config.get("scaling_factor"), vae.config.get("shift_factor")
    recorded = manifest["latent"].get("scaling_factor")
    finite = [v is None or isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
              for v in (scale, shift)]
    if scale != recorded or not all(finite) or (scale is not None and scale <= 0):
        raise BundleError(f"cannot load the VAE of bundle {path}: its config's scaling_factor {brief(scale)} and "
                          f"shift_factor {brief(shift)} must be finite, the scale > 0 and equal to the manifest's "
                          f"'latent.scaling_factor' {brief(recorded)} (the experts' latents were scaled by it); "
                          f"{REEXPORT}")
    latents = torch.randn((1, *manifest["sample_shape"]), generator=torch.Generator().manual_seed(0))
    try:
        images = Decoder(vae)(latents)
    except Exception as err:  # whatever the rebuilt VAE raises on a latent of the bundle's own shape
        raise BundleError(f"cannot load the VAE of bundle {path}: it fails to decode a {manifest['sample_shape']} "
                          f"latent ({type(err).__name__}: {brief(str(err), 200, quote=False)}); {REEXPORT}") from None
    if not bool(torch.isfinite(images).all()):
        raise BundleError(f"cannot load the VAE of bundle {path}: it decodes a latent to non-finite images; {REEXPORT}")


@torch.no_grad()
def probe(router: Router, grouping: Grouping, shape: list, expert_flops: list[int], path: Path) -> None:
    """One denoising call per expert, at batch 1, its group's first timestep and (class-conditional) its highest
    class id: weights and architecture that do not fit together (a config the weights were not made for, class
    ids without an embedding row, float64 or non-finite weights, FLOPs other than the manifest states) fail
    here, on load, not in the middle of sampling. An expert whose weights mix dtypes runs as it samples, under
    bf16 autocast (--precision bf16)."""
    for i, (expert, group) in enumerate(zip(router.experts, grouping.groups)):
        floating = [(name, p) for name, p in expert.named_parameters() if p.is_floating_point()]
        bad = [name for name, p in floating if not torch.isfinite(p).all()]
        if bad:
            raise BundleError(f"cannot load expert {i} of bundle {path}: its weights hold NaN/inf (in "
                              f"{', '.join(bad[:3])}); {REEXPORT}")
        wide = [name for name, p in floating if p.dtype == torch.float64]
        if wide:  # nothing tdcdiff writes is float64, and a float64 tensor in a float32 model fails mid-sampling
            raise BundleError(f"cannot load expert {i} of bundle {path}: its weights hold float64 tensors (in "
                              f"{', '.join(wide[:3])}); bundles hold float32, float16 or bfloat16 weights: {REEXPORT}")
        param = next(expert.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        x = torch.randn((1, *shape), generator=torch.Generator().manual_seed(0)).to(device)
        t = torch.full((1,), group.start, dtype=torch.long, device=device)
        classes = num_class_embeds(expert)  # the highest id its config claims must have an embedding row
        labels = None if classes is None else torch.full((1,), classes - 1, dtype=torch.long, device=device)
        mixed = len({p.dtype for _, p in floating}) > 1  # kept as saved; such a model samples only under autocast
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=mixed):
            try:
                out = expert(x, t, labels, with_variance=True)
            except Exception as err:  # whatever the rebuilt model raises on an input of the bundle's own shape
                raise BundleError(f"cannot load expert {i} of bundle {path}: it fails on a {shape} input at "
                                  f"t={group.start} ({type(err).__name__}: {brief(str(err), 200, quote=False)}); its "
                                  f"architecture.json and weights do not fit together: {REEXPORT}") from None
            if not bool(torch.isfinite(out).all()):
                raise BundleError(f"cannot load expert {i} of bundle {path}: its output at t={group.start} is not "
                                  f"finite; {REEXPORT}")
            counted = count_flops(expert, tuple(shape), group.start)
        if abs(counted - expert_flops[i]) > 0.01 * max(counted, 1):  # the manifest's numbers go into every report
            raise BundleError(f"{path / MANIFEST}: 'expert_flops'[{i}] is {expert_flops[i]} but expert {i} costs "
                              f"{counted} FLOPs per forward pass (counted on load); {REEXPORT}")

"""Size attributes after surgery: what a module reads from itself in forward must follow its new shapes.

Pruning with torch-pruning, or resizing a rebuilt model to a saved state dict, changes parameter shapes but not
the attributes modules keep beside them (a conv's `out_channels`, an attention's head count, diffusers'
`Upsample2D.channels`), and forwards assert on or reshape by those. `sync_module_attributes` re-derives them.
Used by the pruning engine and by model loading, so it lives below both.
"""

from __future__ import annotations

import sys
from itertools import combinations

from torch import nn

LAYERS = (nn.modules.conv._ConvNd, nn.Linear)
HEAD_ATTRIBUTES = ("heads", "num_heads", "n_heads")


def attention_heads(module: nn.Module) -> int | None:
    """The number of heads of an attention module: diffusers Attention (`heads`), or any module with an int
    `heads` / `num_heads` / `n_heads` attribute and a fused `qkv` conv/linear child (ADM, DiT, timm); else None."""
    diffusers = sys.modules.get("diffusers.models.attention_processor")  # loaded if the model uses it
    if diffusers is not None and isinstance(module, diffusers.Attention):
        return int(module.heads)
    if isinstance(getattr(module, "qkv", None), LAYERS):
        return next((int(n) for a in HEAD_ATTRIBUTES if isinstance(n := getattr(module, a, None), int)), None)
    return None


def attention_layers(net: nn.Module, num_heads: dict[str, int] | None = None) -> dict[str, tuple[tuple[str, ...], int]]:
    """Attention modules -> (their q/k/v projections: one fused `qkv` or `to_q`/`to_k`/`to_v`, number of heads).

    Heads come from the module (units.attention_heads) or from num_heads (module name -> heads), which also
    declares attention the module's attributes do not reveal. Raises ValueError for a declared module that
    has no qkv / to_q layer.
    """
    num_heads = dict(num_heads or {})
    found = {}
    for name, m in net.named_modules():
        heads = num_heads.pop(name, None) or attention_heads(m)
        if heads is None:
            continue
        if isinstance(getattr(m, "qkv", None), LAYERS):
            found[name] = ((f"{name}.qkv",), int(heads))
        elif isinstance(getattr(m, "to_q", None), nn.Linear):
            projections = [p for p in ("to_q", "to_k", "to_v") if getattr(m, p, None) is not None]
            found[name] = (tuple(f"{name}.{p}" for p in projections), int(heads))
        else:
            raise ValueError(f"num_heads names {name!r}, which has neither a fused `qkv` layer nor "
                             "`to_q`/`to_k`/`to_v`; name the attention module that holds its q/k/v projections")
    if num_heads:
        raise ValueError(f"num_heads names {sorted(num_heads)}, which the model does not have; name attention modules "
                         "as in named_modules() of the wrapped network")
    return found


def attention_head_dims(model: nn.Module) -> dict[str, int]:
    """Attention module -> head dimension, from its head count and its q/k/v size attributes (which pruning
    with torch-pruning updates, but a model rebuilt unpruned for loading still holds)."""
    dims = {}
    for name, (qkv, heads) in attention_layers(model).items():
        layer = model.get_submodule(qkv[0])
        width = layer.out_channels if isinstance(layer, nn.modules.conv._ConvNd) else layer.out_features
        dims[name] = width // (heads * (3 if len(qkv) == 1 else 1))
    return dims


NORMS = (nn.GroupNorm, nn.LayerNorm, nn.modules.batchnorm._NormBase)


def layer_widths(model: nn.Module) -> dict[str, tuple[int, int]]:
    """Conv/linear layer or norm name -> (input width, output width), from its size attributes (what it was
    built with, until sync_module_attributes re-derives them), in registration order."""
    widths = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            widths[name] = (m.in_channels, m.out_channels)
        elif isinstance(m, nn.Linear):
            widths[name] = (m.in_features, m.out_features)
        elif isinstance(m, nn.GroupNorm):
            widths[name] = (m.num_channels, m.num_channels)
        elif isinstance(m, nn.LayerNorm):
            widths[name] = (m.normalized_shape[-1],) * 2
        elif isinstance(m, nn.modules.batchnorm._NormBase):
            widths[name] = (m.num_features, m.num_features)
    return widths


def _sync_widths(model: nn.Module, before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]) -> None:
    """Int attributes of any module (but the model itself, layers and norms) that hold its input or output width:
    an attribute equal to the old input width of the module's first conv/linear/norm (in registration order) takes
    its new input width, else one equal to the old output width of its last one takes its new output width (as
    improved-diffusion's Downsample `channels`, which its forward asserts on). Nothing changes in a module where
    this would make two of its width attributes equal that were not, or the reverse: a forward may branch on that
    (pytorch_diffusion's ResnetBlock uses its shortcut when in_channels != out_channels)."""
    for name, m in model.named_modules():
        inside = [layer for layer in before if layer.startswith(name + ".")]
        if not name or not inside or isinstance(m, LAYERS + NORMS):
            continue
        (in_old, _), (_, out_old) = before[inside[0]], before[inside[-1]]
        (in_new, _), (_, out_new) = after[inside[0]], after[inside[-1]]
        ints = {k: v for k, v in vars(m).items() if type(v) is int and k not in HEAD_ATTRIBUTES}
        new = {k: in_new if v == in_old else out_new if v == out_old else v for k, v in ints.items()}
        if new == ints:
            continue
        widths = {w for layer in inside for w in before[layer]}
        sizes = [k for k, v in ints.items() if v in widths]
        if all((ints[a] == ints[b]) == (new[a] == new[b]) for a, b in combinations(sizes, 2)):
            for k, v in new.items():
                setattr(m, k, v)


def sync_module_attributes(model: nn.Module, head_dims: dict[str, int] | None = None,
                           widths: dict[str, tuple[int, int]] | None = None) -> None:
    """Re-derive size attributes from current parameter shapes, after pruning or resizing layers.

    Covers torch layers (Conv/Linear in/out sizes, norm widths), head counts of attention (diffusers
    Attention `heads`, `inner_dim`; `heads` / `num_heads` / `n_heads` of custom attention and its children),
    the int attributes any other module keeps of its input or output width (see _sync_widths), and the diffusers
    attributes that a forward asserts on or reports: Upsample2D/Downsample2D channels, ResnetBlock2D channels.
    head_dims: attention module -> head dimension; widths: layer_widths before the layers were resized (both
    default to the size attributes before they are re-derived, right for a model rebuilt unpruned and then
    resized; torch-pruning updates a layer's attributes as it prunes it, so the pruning engine records both first).
    """
    head_dims = attention_head_dims(model) if head_dims is None else head_dims
    widths = layer_widths(model) if widths is None else widths
    for m in model.modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            w = m.weight.shape
            if m.transposed:
                m.in_channels, m.out_channels = w[0], w[1] * m.groups
            else:
                m.in_channels, m.out_channels = w[1] * m.groups, w[0]
        elif isinstance(m, nn.Linear):
            m.out_features, m.in_features = m.weight.shape
        elif isinstance(m, nn.GroupNorm) and m.weight is not None:
            m.num_channels = m.weight.shape[0]
        elif isinstance(m, nn.LayerNorm) and m.weight is not None:
            m.normalized_shape = tuple(m.weight.shape)
        elif isinstance(m, nn.modules.batchnorm._NormBase) and m.running_mean is not None:
            m.num_features = m.running_mean.shape[0]
    _sync_widths(model, widths, layer_widths(model))
    for name, dim in head_dims.items():
        _set_heads(model.get_submodule(name), dim)
    if "diffusers" not in sys.modules:  # a diffusers layer implies diffusers is imported
        return
    from diffusers.models.attention_processor import Attention
    from diffusers.models.downsampling import Downsample2D
    from diffusers.models.resnet import ResnetBlock2D
    from diffusers.models.upsampling import Upsample2D

    for m in model.modules():
        if isinstance(m, (Upsample2D, Downsample2D)):
            conv = getattr(m, "conv", None) or getattr(m, "Conv2d_0", None)
            if isinstance(conv, nn.modules.conv._ConvNd):
                m.channels, m.out_channels = conv.in_channels, conv.out_channels
        elif isinstance(m, ResnetBlock2D):
            m.in_channels, m.out_channels = m.conv1.in_channels, m.conv2.out_channels
        elif isinstance(m, Attention):
            m.query_dim, m.inner_dim = m.to_q.in_features, m.to_q.out_features
            m.inner_kv_dim = m.to_k.out_features if m.to_k is not None else m.inner_dim
            m.out_dim = m.to_out[0].out_features


def _set_heads(attention: nn.Module, head_dim: int) -> None:
    """Set an attention module's head count (and its children's, e.g. ADM's QKVAttention.n_heads) from the
    size of its q/k/v projections."""
    qkv = getattr(attention, "qkv", None)
    width = qkv.weight.shape[0] // 3 if isinstance(qkv, LAYERS) else attention.to_q.weight.shape[0]
    heads = width // head_dim
    old = attention_heads(attention)
    for m in attention.modules():
        for attribute in HEAD_ATTRIBUTES:
            if getattr(m, attribute, None) == old:
                setattr(m, attribute, heads)
    if hasattr(attention, "sliceable_head_dim"):  # diffusers Attention
        attention.sliceable_head_dim = heads

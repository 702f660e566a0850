"""torch-pruning's dependency graph of a network, with the channel mapping through reshapes taken from real shapes.

torch-pruning maps channel indices through a reshape by guessing the channel counts on either side from the
nearest layers (shape_infer), and treats any difference as a flatten. Around an attention block that guess goes
wrong: improved-diffusion's AttentionBlock reshapes its input (N, C, H, W) -> (N, C, HW) and back, the guess
sees the 3C of its qkv or the 2C of a later concatenation, and the residual stream's indices get doubled
(`IndexError: index 128 is out of bounds`) or the stream falls apart into two groups. Here every reshape's input
and output shapes are recorded during the tracing forward, and where a reshape keeps the batch dimension and its
input holds the producing layer's channels in dimension 1, the mapping is set from those shapes: one to one when
dimension 1 is unchanged, a flatten of stride k when it merges the channels with the k positions after them
(`b c h w -> b (c h) w`, einops' pixel-unshuffle), its reverse when it splits them. Other reshapes (a head
split into the batch dimension, token layouts) keep torch-pruning's mapping.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch_pruning as tp
from torch import nn
from torch.overrides import TorchFunctionMode
from torch_pruning.dependency import index_mapping, shape_infer

from ..models import CLIP_TOKENS, Denoiser, text_width
from ..surgery.attributes import LAYERS


def full_forward(net: nn.Module, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """net's whole output for inputs (x, t[, text]): a learned variance's channels are output channels too, never
    pruned."""
    return Denoiser(net)(*inputs, with_variance=True)


def example_inputs(net: nn.Module, sample_shape: tuple[int, ...]) -> tuple[torch.Tensor, ...]:
    """A fixed (x, t) for tracing: x of shape (1, *sample_shape) from seed 0, t = 0; on net's device and dtype. A
    text-conditional net also gets a text embedding (1, CLIP_TOKENS, width) from seed 1: random, not zeros, so that
    each cross-attention head's output depends on its own key and value channels (which tells the heads apart)."""
    param = next(net.parameters())
    x = torch.randn((1, *sample_shape), generator=torch.Generator().manual_seed(0))
    inputs = (x.to(param.device, param.dtype), torch.zeros(1, dtype=torch.long, device=param.device))
    width = text_width(net)
    if width is None:
        return inputs
    text = torch.randn((1, CLIP_TOKENS, width), generator=torch.Generator().manual_seed(1))
    return (*inputs, text.to(param.device, param.dtype))


class _ReshapeShapes(TorchFunctionMode):
    """Records (input shape, output shape) of every view / reshape a forward makes, by its autograd node."""

    def __init__(self):
        super().__init__()
        self.shapes: dict = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        node = getattr(out, "grad_fn", None) if isinstance(out, torch.Tensor) else None
        if node is not None and args and isinstance(args[0], torch.Tensor) and node not in self.shapes:
            name = node.name().lower()
            if "view" in name or "reshape" in name:
                self.shapes[node] = (tuple(args[0].shape), tuple(out.shape))
        return out


def _stride(before: tuple[int, ...], after: tuple[int, ...]) -> int | None:
    """k when dimension 1 of `after` is dimension 1 of `before` merged with the dimensions after it (k =
    after[1] / before[1]); -k for the reverse split; 1 when unchanged; None for any other reshape."""
    if len(before) < 2 or len(after) < 2 or before[0] != after[0]:
        return None
    if before[1] == after[1]:
        return 1
    for small, large, sign in ((before, after, 1), (after, before, -1)):
        if any(math.prod(small[1:j]) == large[1] for j in range(3, len(small) + 1)):
            return sign * (large[1] // small[1])
    return None


def _set_reshape_mapping(graph, node, stride: int) -> None:
    """Replace torch-pruning's guessed mapping through a reshape node by a flatten of `stride` (1: one to one).

    The node is then typed element-wise: torch-pruning re-guesses the mapping of every reshape-typed node each time
    it forms a group (update_index_mapping in get_pruning_group), and leaves element-wise nodes' mappings alone."""
    node.type = tp.ops.OPTYPE.ELEMENTWISE
    neighbours = [(node, n) for n in node.inputs + node.outputs] + [(n, node) for n in node.inputs + node.outputs]
    for source, target in neighbours:
        for dep in source.dependencies:
            if dep.target is target and isinstance(dep.index_mapping[0], index_mapping._FlattenIndexMapping):
                dep.index_mapping[0] = None
    if stride == 1:
        return
    side = node.inputs if stride > 0 else node.outputs  # the side with fewer channels, as torch-pruning does
    for other in side:
        for dep in node.dependencies:
            if dep.target is other:
                dep.index_mapping[0] = index_mapping._FlattenIndexMapping(stride=abs(stride), reverse=True)
        for dep in other.dependencies:
            if dep.target is node:
                dep.index_mapping[0] = index_mapping._FlattenIndexMapping(stride=abs(stride), reverse=False)


def _fix_reshapes(graph, shapes: dict) -> None:
    for node in graph.module2node.values():
        if node.type != tp.ops.OPTYPE.RESHAPE or node.grad_fn not in shapes:
            continue
        before, after = shapes[node.grad_fn]
        stride = _stride(before, after)
        channels = [shape_infer.infer_out_channels_recursively(graph, n, [0]) for n in node.inputs]
        if stride is not None and before[1] in channels:  # dimension 1 holds the producing layer's channels
            _set_reshape_mapping(graph, node, stride)


def trace(net: nn.Module, sample_shape: tuple[int, ...]):
    """torch-pruning's dependency graph of net (reshape mappings fixed, see the module doc), and the forward
    order of its conv/linear layers (dict: module -> index). net's train/eval modes are left as they were."""
    order: dict[nn.Module, int] = {}

    def record(module, args, output) -> None:  # must return None, or it replaces the output
        order.setdefault(module, len(order))

    hooks = [m.register_forward_hook(record) for m in net.modules() if isinstance(m, LAYERS)]
    modes = [m.training for m in net.modules()]
    try:
        with torch.enable_grad(), warnings.catch_warnings(), _ReshapeShapes() as recorded:  # tracing follows grad_fn
            # Parameters used outside a layer (positional embeddings): their groups are never pruned (see plan).
            warnings.filterwarnings("ignore", message=".*Unwrapped parameters.*")
            graph = tp.DependencyGraph().build_dependency(
                net, example_inputs=example_inputs(net, sample_shape), forward_fn=full_forward
            )
        _fix_reshapes(graph, recorded.shapes)
    finally:
        for hook in hooks:
            hook.remove()
        for m, mode in zip(net.modules(), modes):  # tracing switched the base to eval mode
            m.training = mode
    return graph, order

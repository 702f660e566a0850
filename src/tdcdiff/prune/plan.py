"""The pruning plan: which channels of a network torch-pruning removes together, and whose ratio cuts them.

torch-pruning's dependency graph finds which channels are coupled, and removes whole channels, so the result
is really smaller, not masked.

Coupled channels: residual streams and skip connections tie the output channels of layers in several units
together, and torch-pruning removes such a coupled set (a "group") as one. Each group follows the ratio of
ONE unit: the unit of the first layer, in forward order, that produces those channels, and is cut in the channel
order of a producer with one channel per coupled channel (the first such in forward order; a scale-shift
projection has two). So a down block's ratio also sets the width of the skip it sends to the up path, and
the mid block's residual width follows the last down block (the mid block's own ratio sets its inner widths).
How torch-pruning's graph is traced, and where its channel mapping is corrected, is prune/graph.py's business.

GroupNorm (and any subclass) removes channels evenly from every norm group, so a group with g norm groups
of s channels can only keep s, s-1, ..., 1 channels per norm group: a ratio r keeps round(s * (1 - r)) of
them, at least one. Attention loses whole heads (a ratio r keeps round(h * (1 - r)) of h heads, each keeping
its dimension): which q/k/v channels make up each head is measured from gradients, not taken from
torch-pruning's index mapping through the attention kernel's reshapes, which is unreliable there.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import torch
import torch_pruning as tp
from torch import nn

from ..surgery.attributes import LAYERS, attention_layers
from .graph import example_inputs, full_forward, trace
from .units import Decision, Unit, ignored_names, prunable_units


class PruningError(ValueError):
    """A decision cannot be applied to this architecture; the message names the unit and the layer."""


def kept_slots(ratio: float, slots: int) -> int:
    """Channels kept per norm group (or heads kept) when a ratio is applied to `slots` of them."""
    return min(slots, max(1, math.floor(slots * (1.0 - ratio) + 0.5)))


@dataclass(frozen=True)
class PlanGroup:
    """One set of coupled channels that torch-pruning removes together.

    root: a conv/linear producing them (the key of pruning_ratio_dict). unit: whose ratio applies.
    channels: how many. slots: channels per norm group (removal is even across norm groups), or for
    attention the number of heads (whole heads are removed).
    heads_into: for attention, the layer whose input channels are the heads' outputs, head after head.
    head_channels: for attention, (q/k/v layer, the output channels of each head in it) for each projection.
    """

    root: str
    unit: str
    channels: int
    slots: int
    heads_into: str | None = None
    head_channels: tuple[tuple[str, tuple[tuple[int, ...], ...]], ...] = ()


@dataclass(frozen=True)
class PruningPlan:
    """What pruning this architecture involves: its units, its prunable groups and what to leave alone."""

    units: list[Unit]
    groups: tuple[PlanGroup, ...]
    ignored: tuple[str, ...]

    def kept(self, decision: Decision) -> tuple[int, ...]:
        """Channels kept per norm group (heads kept, for attention) of each group: what determines the pruned
        shapes (and FLOPs)."""
        return tuple(kept_slots(decision.get(g.unit, 0.0), g.slots) for g in self.groups)

    def unit_of(self, module: str) -> str | None:
        """The unit holding a module (or, for a module in no unit's layer list, a sibling of it), or None."""
        prefix = module
        while prefix:
            for u in self.units:
                if any(layer == prefix or layer.startswith(prefix + ".") for layer in u.modules):
                    return u.name
            prefix = prefix.rpartition(".")[0]
        return None


def _channel_groups(graph, group) -> int:
    """Norm groups the group's channels are split into (as torch-pruning's BasePruner counts them)."""
    n = 1
    for dep, _ in group:
        m, out = dep.target.module, graph.is_out_channel_pruning_fn(dep.handler)
        if isinstance(m, nn.modules.conv._ConvNd) and m.groups == m.out_channels:
            continue  # depthwise: channels map one to one
        if (fn := graph.get_pruner_of_module(m)) is not None:  # GroupNorm and its subclasses: num_groups
            n = max(n, fn.get_out_channel_groups(m) if out else fn.get_in_channel_groups(m))
    return n


def _copies(graph, root: nn.Module, unit: str | None, name: str) -> int:
    """How many of root's output channels torch-pruning cuts together with each one: 1, or k when root's output is
    split into k equal parts that meet again element-wise (GEGLU's `proj(x).chunk(2)` then `x * gelu(gate)`, in
    every diffusers transformer block), channel i then going with i + C/k, i + 2C/k, ... The plan counts the
    C/k channels of the first part; cutting one of them cuts its copies."""
    channels = graph.get_out_channels(root)
    pruner = graph.get_pruner_of_module(root)
    cut = sorted({int(i) for i in graph.get_pruning_group(root, pruner.prune_out_channels, [0])[0].idxs})
    k = len(cut)
    if k > 1 and (channels % k or cut != [j * (channels // k) for j in range(k)]):
        raise PruningError(
            f"cannot prune {f'unit {unit!r}' if unit else 'the model'}: torch-pruning couples output channel 0 of "
            f"layer {name!r} with its channels {cut[1:]}, not with one channel in each of {k} equal parts; keep its "
            f"widths with ignored_layers=[{name!r}] (in a run: the setting search.ignored_layers)")
    return k


def _claim(claimed: dict[str, int], layers: list[str], unit_of: dict[str, str]) -> None:
    """Record the layers whose output channels one torch-pruning group cuts; a layer in two groups (its channels
    coupled two ways, which would cut some twice) is a PruningError naming it and the fix."""
    for layer in layers:
        if layer in claimed:
            unit = unit_of.get(layer)
            raise PruningError(
                f"cannot prune {f'unit {unit!r}' if unit else 'the model'}: torch-pruning couples the output channels "
                f"of layer {layer!r} in two ways (two groups hold them); keep its widths with ignored_layers="
                f"[{layer!r}] (in a run: the setting search.ignored_layers)")
        claimed[layer] = len(claimed)


def _per_channel(parameter: torch.Tensor) -> bool:
    """A parameter with one value per channel (one non-singleton dimension: a norm's gain such as
    denoising-diffusion-pytorch's RMSNorm `g` of shape (1, C, 1, 1)): it follows its channels, as a norm's weight."""
    return sum(size > 1 for size in parameter.shape) == 1


def _unclear_heads(unit: str, attention: str, n: int, why: str) -> PruningError:
    return PruningError(
        f"unit {unit!r}: cannot tell which channels belong to each of the {n} heads of attention {attention!r} "
        f"({why}); keep it whole with ignored_layers=[{attention!r}], or declare its heads with "
        f"num_heads={{{attention!r}: n}}"
    )


def _probe_heads(net: nn.Module, sample_shape: tuple[int, ...], groups: list[PlanGroup],
                 attention_of: dict[str, str]) -> list[PlanGroup]:
    """Fill in which output channels of each q/k/v projection feed each head, from gradients: head h's output
    (its slice of the next layer's input) depends only on head h's q, k and v channels. torch-pruning's own
    index mapping through an attention kernel's reshapes is not reliable (it depends on coincidences of sizes)."""
    if not groups:
        return []
    outputs, inputs = {}, {}
    layers = {name for g in groups for name, _ in g.head_channels} | {g.heads_into for g in groups}
    hooks = []
    for name in layers:
        m = net.get_submodule(name)
        hooks.append(m.register_forward_hook(lambda m, a, out, name=name: outputs.setdefault(name, out)))
        hooks.append(m.register_forward_pre_hook(lambda m, a, name=name: inputs.setdefault(name, a[0])))
    modes = [m.training for m in net.modules()]
    net.eval()
    try:
        with torch.enable_grad():
            full_forward(net, example_inputs(net, sample_shape))
            done = []
            for g in groups:
                into = net.get_submodule(g.heads_into)
                x = inputs[g.heads_into]
                dim = g.channels // g.slots
                axis = 1 if isinstance(into, nn.modules.conv._ConvNd) else -1
                per_layer = {name: [] for name, _ in g.head_channels}
                for h in range(g.slots):
                    names = list(per_layer)
                    grads = torch.autograd.grad(x.narrow(axis, h * dim, dim).sum(), [outputs[n] for n in names],
                                                retain_graph=True, allow_unused=True)
                    for name, grad in zip(names, grads):
                        layer = net.get_submodule(name)
                        layer_axis = 1 if isinstance(layer, nn.modules.conv._ConvNd) else -1
                        used = torch.zeros(outputs[name].shape[layer_axis], dtype=torch.bool) if grad is None else \
                            grad.movedim(layer_axis, 0).flatten(1).ne(0).any(1).cpu()
                        per_layer[name].append(tuple(used.nonzero().flatten().tolist()))
                for name, heads in per_layer.items():
                    flat = sorted(c for head in heads for c in head)
                    if len({len(head) for head in heads}) != 1 or flat != list(range(len(flat))) or not heads[0]:
                        why = f"{name}: heads share or miss channels"
                        raise _unclear_heads(g.unit, attention_of[name], g.slots, why)
                done.append(PlanGroup(g.root, g.unit, g.channels, g.slots, g.heads_into,
                                      tuple((name, tuple(heads)) for name, heads in per_layer.items())))
    finally:
        for hook in hooks:
            hook.remove()
        for m, mode in zip(net.modules(), modes):
            m.training = mode
    return done


def _build_plan(net: nn.Module, sample_shape: tuple[int, ...], units: list[Unit], ignored: tuple[str, ...],
                attention: dict[str, tuple[tuple[str, ...], int]]) -> PruningPlan:
    unit_of = {layer: u.name for u in units for layer in u.modules}
    name_of = {m: name for name, m in net.named_modules()}
    heads_of = {net.get_submodule(q): (name, n) for name, (qkv, n) in attention.items() for q in qkv}
    graph, order = trace(net, sample_shape)
    ignored_modules = [m for name in ignored for m in net.get_submodule(name).modules()]
    groups, heads, claimed = [], [], {}
    for group in graph.get_all_groups(ignored_layers=ignored_modules, root_module_types=LAYERS):
        nodes = [dep.target for dep, _ in group if graph.is_out_channel_pruning_fn(dep.handler)]
        _claim(claimed, [name_of[n.module] for n in nodes if isinstance(n.module, LAYERS)], unit_of)
        if any(isinstance(n.module, tp.ops._OutputOp) or not n.outputs for n in nodes):
            continue  # these are the output's channels, whichever layer produces them
        if any(n.type == tp.ops.OPTYPE.PARAMETER and not _per_channel(n.module) for n in nodes):
            continue  # added to a parameter every position reads (a positional embedding): keep whole
        outs = [n.module for n in nodes]
        producers = [m for m in outs if name_of.get(m) in unit_of]
        if not producers:
            continue
        unit = unit_of[name_of[min(producers, key=order.__getitem__)]]
        # Cut in the channels of a producer that has one per coupled channel: a scale-shift embedding projection
        # (one scale and one shift per channel) has two, and may run first (denoising-diffusion-pytorch's ResnetBlock).
        root = min(producers, key=lambda m: (graph.get_out_channels(m), order[m]))
        qkv = [m for m in outs if m in heads_of]
        if not qkv:
            channels = graph.get_out_channels(root) // _copies(graph, root, unit_of.get(name_of[root]), name_of[root])
            groups.append(PlanGroup(name_of[root], unit, channels, channels // _channel_groups(graph, group)))
            continue
        attention_name, n = heads_of[qkv[0]]
        into = [dep.target.module for dep, _ in group
                if graph.is_in_channel_pruning_fn(dep.handler) and isinstance(dep.target.module, LAYERS)]
        if len(into) != 1 or graph.get_in_channels(into[0]) % n:
            raise _unclear_heads(unit, attention_name, n, f"layers reading its heads: {[name_of[m] for m in into]}")
        heads.append(PlanGroup(name_of[root], unit, graph.get_in_channels(into[0]), n, name_of[into[0]],
                               tuple((name_of[m], ()) for m in qkv)))
    groups += _probe_heads(net, sample_shape, heads, {name: a for a, (qkv, _) in attention.items() for name in qkv})
    return PruningPlan(units, tuple(groups), ignored)


# One plan per base network and decision space, rebuilt if its layer shapes or the sample shape change.
_PLANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def plan_for(net: nn.Module, sample_shape: tuple[int, ...], *, units=None, ignored_layers=(),
             num_heads: dict[str, int] | None = None) -> PruningPlan:
    """The pruning plan of net (cached). units, ignored_layers: as for units.prunable_units; num_heads: as for
    surgery.attributes.attention_layers. Raises PruningError when an attention's heads cannot be told apart."""
    space = prunable_units(net, units=units, ignored_layers=ignored_layers)
    ignored = tuple(ignored_names(net, space, ignored_layers))
    attention = attention_layers(net, num_heads)
    key = (
        tuple(sample_shape),
        tuple((u.name, tuple(u.modules)) for u in space),
        ignored,
        tuple(sorted(attention.items())),
        tuple(
            (name, type(m).__qualname__, tuple(tuple(p.shape) for p in m.parameters(recurse=False)))
            for name, m in net.named_modules()
        ),
    )
    cached = _PLANS.get(net)
    if cached is None or cached[0] != key:
        _PLANS[net] = cached = (key, _build_plan(net, tuple(sample_shape), space, ignored, attention))
    return cached[1]

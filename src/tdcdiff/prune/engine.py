"""The pruning engine: a decision (prune/units.py) applied with torch-pruning, so the network really shrinks.

torch-pruning's dependency graph finds which channels are coupled, and removes whole channels, so the result
is really smaller, not masked.

Coupled channels: residual streams and skip connections tie the output channels of layers in several units
together, and torch-pruning removes such a coupled set (a "group") as one. Each group follows the ratio of
ONE unit: the unit of the first layer, in forward order, that produces those channels, and is cut in that
layer's channel order. So a down block's ratio also sets the width of the skip it sends to the up path, and
the mid block's residual width follows the last down block (the mid block's own ratio sets its inner widths).

GroupNorm (and any subclass) removes channels evenly from every norm group, so a group with g norm groups
of s channels can only keep s, s-1, ..., 1 channels per norm group: a ratio r keeps round(s * (1 - r)) of
them, at least one. Attention loses whole heads (a ratio r keeps round(h * (1 - r)) of h heads, each keeping
its dimension): which q/k/v channels make up each head is measured from gradients, not taken from
torch-pruning's index mapping through the attention kernel's reshapes, which is unreliable there.
"""

from __future__ import annotations

import copy
import math
import warnings
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn

from ..latency import one_thread
from ..models import Denoiser, network
from ..surgery import depth
from ..surgery.attributes import LAYERS, attention_head_dims, attention_layers, sync_module_attributes
from .units import MAX_RATIO, Decision, Unit, check_decision, ignored_names, prunable_units

IMPORTANCES = ("magnitude", "taylor")


@dataclass
class Calibration:
    """The batch that Taylor importance differentiates the denoising loss on.

    images: clean images (N, C, H, W) in [-1, 1]. scheduler: the training noise schedule (DDPMScheduler).
    timesteps: 1-D LongTensor of the timesteps to draw t from (e.g. one group's). seed: for t and noise.
    """

    images: torch.Tensor
    scheduler: object
    timesteps: torch.Tensor
    seed: int = 0


def _forward(net: nn.Module, inputs: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    # The full output: a learned variance's channels are output channels too, never pruned.
    return Denoiser(net)(*inputs, with_variance=True)


class PruningError(ValueError):
    """A decision cannot be applied to this architecture; the message names the unit and the layer."""


def kept_slots(ratio: float, slots: int) -> int:
    """Channels kept per norm group (or heads kept) when a ratio is applied to `slots` of them."""
    return min(slots, max(1, math.floor(slots * (1.0 - ratio) + 0.5)))


@dataclass(frozen=True)
class _Group:
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
class Plan:
    """What pruning this architecture involves: its units, its prunable groups and what to leave alone."""

    units: list[Unit]
    groups: tuple[_Group, ...]
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


def _example_inputs(net: nn.Module, sample_shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    param = next(net.parameters())
    x = torch.randn((1, *sample_shape), generator=torch.Generator().manual_seed(0))
    return x.to(param.device, param.dtype), torch.zeros(1, dtype=torch.long, device=param.device)


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


def _trace(net: nn.Module, sample_shape: tuple[int, ...]):
    """torch-pruning's dependency graph of net, and the forward order of its conv/linear layers."""
    order: dict[nn.Module, int] = {}

    def record(module, args, output) -> None:  # must return None, or it replaces the output
        order.setdefault(module, len(order))

    hooks = [m.register_forward_hook(record) for m in net.modules() if isinstance(m, LAYERS)]
    modes = [m.training for m in net.modules()]
    try:
        with torch.enable_grad(), warnings.catch_warnings():  # tracing follows grad_fn
            # Parameters used outside a layer (positional embeddings): their groups are never pruned (see plan).
            warnings.filterwarnings("ignore", message=".*Unwrapped parameters.*")
            graph = tp.DependencyGraph().build_dependency(
                net, example_inputs=_example_inputs(net, sample_shape), forward_fn=_forward
            )
    finally:
        for hook in hooks:
            hook.remove()
        for m, mode in zip(net.modules(), modes):  # tracing switched the base to eval mode
            m.training = mode
    return graph, order


def _unclear_heads(unit: str, attention: str, n: int, why: str) -> PruningError:
    return PruningError(
        f"unit {unit!r}: cannot tell which channels belong to each of the {n} heads of attention {attention!r} "
        f"({why}); keep it whole with ignored_layers=[{attention!r}], or declare its heads with "
        f"num_heads={{{attention!r}: n}}"
    )


def _probe_heads(net: nn.Module, sample_shape: tuple[int, ...], groups: list[_Group], attention_of: dict[str, str]):
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
            _forward(net, _example_inputs(net, sample_shape))
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
                        raise _unclear_heads(g.unit, attention_of[name], g.slots, f"{name}: heads share or miss channels")
                done.append(_Group(g.root, g.unit, g.channels, g.slots, g.heads_into,
                                   tuple((name, tuple(heads)) for name, heads in per_layer.items())))
    finally:
        for hook in hooks:
            hook.remove()
        for m, mode in zip(net.modules(), modes):
            m.training = mode
    return done


def _build_plan(net: nn.Module, sample_shape: tuple[int, ...], units: list[Unit], ignored: tuple[str, ...],
                attention: dict[str, tuple[tuple[str, ...], int]]) -> Plan:
    unit_of = {layer: u.name for u in units for layer in u.modules}
    name_of = {m: name for name, m in net.named_modules()}
    heads_of = {net.get_submodule(q): (name, n) for name, (qkv, n) in attention.items() for q in qkv}
    graph, order = _trace(net, sample_shape)
    ignored_modules = [m for name in ignored for m in net.get_submodule(name).modules()]
    groups, heads = [], []
    for group in graph.get_all_groups(ignored_layers=ignored_modules, root_module_types=LAYERS):
        nodes = [dep.target for dep, _ in group if graph.is_out_channel_pruning_fn(dep.handler)]
        if any(isinstance(n.module, tp.ops._OutputOp) or not n.outputs for n in nodes):
            continue  # these are the output's channels, whichever layer produces them
        if any(n.type == tp.ops.OPTYPE.PARAMETER for n in nodes):
            continue  # added to a parameter every position reads (a positional embedding): keep whole
        outs = [n.module for n in nodes]
        producers = [m for m in outs if name_of.get(m) in unit_of]
        if not producers:
            continue
        root = min(producers, key=order.__getitem__)
        unit = unit_of[name_of[root]]
        qkv = [m for m in outs if m in heads_of]
        if not qkv:
            channels = graph.get_out_channels(root)
            groups.append(_Group(name_of[root], unit, channels, channels // _channel_groups(graph, group)))
            continue
        attention_name, n = heads_of[qkv[0]]
        into = [dep.target.module for dep, _ in group
                if graph.is_in_channel_pruning_fn(dep.handler) and isinstance(dep.target.module, LAYERS)]
        if len(into) != 1 or graph.get_in_channels(into[0]) % n:
            raise _unclear_heads(unit, attention_name, n, f"layers reading its heads: {[name_of[m] for m in into]}")
        heads.append(_Group(name_of[root], unit, graph.get_in_channels(into[0]), n, name_of[into[0]],
                            tuple((name_of[m], ()) for m in qkv)))
    groups += _probe_heads(net, sample_shape, heads, {name: a for a, (qkv, _) in attention.items() for name in qkv})
    return Plan(units, tuple(groups), ignored)


# One plan per base network and decision space, rebuilt if its layer shapes or the sample shape change.
_PLANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def plan_for(net: nn.Module, sample_shape: tuple[int, ...], *, units=None, ignored_layers=(),
             num_heads: dict[str, int] | None = None) -> Plan:
    """The pruning plan of net (cached). units, ignored_layers: as for units.prunable_units; num_heads: as for
    attention_layers."""
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


def _taylor_gradients(net: nn.Module, calibration: Calibration) -> None:
    """Gradients of the denoising loss on the calibration batch, for first-order Taylor importance."""
    from ..schedule import training_target

    param = next(net.parameters())
    x0 = calibration.images.to(param.device, param.dtype)
    gen = torch.Generator().manual_seed(calibration.seed)
    pool = torch.as_tensor(calibration.timesteps, dtype=torch.long)
    t = pool[torch.randint(len(pool), (len(x0),), generator=gen)].to(param.device)
    noise = torch.randn(x0.shape, generator=gen).to(param.device, param.dtype)
    x_t = calibration.scheduler.add_noise(x0, noise, t)
    net.zero_grad(set_to_none=True)
    F.mse_loss(_forward(net, (x_t, t)), training_target(calibration.scheduler, x0, noise, t)).backward()


class _ByPosition(tp.importance.Importance):
    """Ranks channels by position: for FLOPs trials, where only how many channels go matters, not which."""

    def __call__(self, group, **kwargs) -> torch.Tensor:
        return torch.arange(len(group[0].idxs), 0, -1, dtype=torch.float32)


def check_importance(importance: str, calibration: Calibration | None) -> None:
    if importance not in IMPORTANCES:
        raise ValueError(f"unknown importance {importance!r}; choose one of {IMPORTANCES}")
    if importance == "taylor" and calibration is None:
        raise ValueError("importance='taylor' needs calibration=Calibration(images, scheduler, timesteps)")


def _named(plan: Plan, layer: str, err: Exception) -> PruningError:
    """err, raised while pruning or running a layer, as an error naming its unit, the layer and the fix."""
    unit = plan.unit_of(layer)
    keep = layer.rpartition(".")[0] or layer  # the module holding the layer: ignoring it keeps its widths
    return PruningError(
        f"cannot prune {f'unit {unit!r}' if unit else 'the model'}: layer {layer!r} fails after pruning "
        f"({str(err).splitlines()[0]}); keep its widths with ignored_layers=[{keep!r}] (and leave its unit out "
        "of the decision if nothing else in it is prunable)"
    )


def _importance(scorer, group) -> torch.Tensor:
    """One score per channel of the group's root (higher: keep); by position when nothing can be scored."""
    imp = scorer(group)
    return _ByPosition()(group) if imp is None else imp


def _channels_to_drop(graph, net: nn.Module, group: _Group, kept: int, scorer) -> list[int]:
    """Root channels that cut a group to `kept` per norm group: the same positions in every norm group, the
    least important averaged over the norm groups (as torch-pruning's BasePruner does)."""
    root = net.get_submodule(group.root)
    rows = group.channels // group.slots
    full = graph.get_pruning_group(root, graph.get_pruner_of_module(root).prune_out_channels, list(range(group.channels)))
    drop = torch.argsort(_importance(scorer, full).view(rows, group.slots).mean(0))[: group.slots - kept].tolist()
    return sorted(r * group.slots + d for r in range(rows) for d in drop)


def _heads_to_drop(net: nn.Module, group: _Group, kept: int, importance: str) -> list[int]:
    """The least important heads: by the summed squared weights (or |weight x gradient|) of their rows in the
    q/k/v projections and their columns in the next layer; by position (the last go first) for FLOPs trials."""
    if importance == "position":
        return list(range(kept, group.slots))

    def score(layer: nn.Module) -> torch.Tensor:  # per weight entry
        w, grad = layer.weight.detach(), layer.weight.grad
        return (w * grad).abs() if importance == "taylor" and grad is not None else w.pow(2)

    into = score(net.get_submodule(group.heads_into)).movedim(1, 0).flatten(1).sum(1)
    total = into.view(group.slots, -1).sum(1)
    for name, heads in group.head_channels:
        rows = score(net.get_submodule(name)).flatten(1).sum(1)
        total = total + torch.stack([rows[list(head)].sum() for head in heads])
    return torch.argsort(total)[: group.slots - kept].tolist()


def _drop_heads(net: nn.Module, group: _Group, drop: list[int]) -> None:
    """Remove whole heads: their channels in each q/k/v projection and where their outputs enter the next
    layer (head after head)."""
    dim = group.channels // group.slots
    _prune_layer(net.get_submodule(group.heads_into), sorted(h * dim + i for h in drop for i in range(dim)), out=False)
    for name, heads in group.head_channels:
        _prune_layer(net.get_submodule(name), sorted(c for h in drop for c in heads[h]), out=True)


def _prune_layer(layer: nn.Module, idxs: list[int], *, out: bool) -> None:
    conv = isinstance(layer, nn.modules.conv._ConvNd)
    if out:
        (tp.prune_conv_out_channels if conv else tp.prune_linear_out_channels)(layer, idxs)
    else:
        (tp.prune_conv_in_channels if conv else tp.prune_linear_in_channels)(layer, idxs)


def _check_runs(plan: Plan, net: nn.Module, inputs) -> None:
    """One forward of the pruned net; a failure names the layer that raised and its unit."""
    name_of = {m: name for name, m in net.named_modules()}
    entered: list[str] = []
    hooks = [m.register_forward_pre_hook(lambda m, args: entered.append(name_of[m])) for m in net.modules()
             if not list(m.children())]
    try:
        with torch.no_grad():
            _forward(net, inputs)
    except RuntimeError as err:
        raise _named(plan, entered[-1] if entered else "?", err) from None
    finally:
        for hook in hooks:
            hook.remove()


def prune_kept(
    base: nn.Module,
    plan: Plan,
    kept: tuple[int, ...],
    sample_shape: tuple[int, ...],
    importance: str,
    calibration: Calibration | None,
) -> nn.Module:
    """A deep copy of base with each plan group cut to kept[i] channels per norm group (heads, for attention).

    importance: one of IMPORTANCES, or "position" (first channels stay) for FLOPs trials.
    Raises PruningError naming the unit and layer when torch-pruning or the pruned model fails.
    """
    pruned = copy.deepcopy(base)
    net = network(pruned)
    cuts = [(g, k) for g, k in zip(plan.groups, kept) if k < g.slots]
    if not cuts:
        return pruned
    head_dims = attention_head_dims(net)  # before pruning: heads keep their dimension
    modes = [m.training for m in pruned.modules()]
    net.eval()
    inputs = _example_inputs(net, sample_shape)
    with torch.enable_grad():
        if importance == "taylor":
            _taylor_gradients(net, calibration)
            scorer = tp.importance.GroupTaylorImportance()
        elif importance == "magnitude":
            scorer = tp.importance.GroupMagnitudeImportance(p=2)
        else:
            scorer = _ByPosition()
        graph, _ = _trace(net, sample_shape)
        # Everything is ranked on the unpruned copy first (as BasePruner does), then cut: the groups are
        # disjoint channel sets, each indexed in its own root's channels.
        drops = [
            _channels_to_drop(graph, net, g, k, scorer) if g.heads_into is None else _heads_to_drop(net, g, k, importance)
            for g, k in cuts
        ]
        for (g, _), drop in zip(cuts, drops):
            try:
                if g.heads_into is None:
                    root = net.get_submodule(g.root)
                    graph.get_pruning_group(root, graph.get_pruner_of_module(root).prune_out_channels, drop).prune()
                else:
                    _drop_heads(net, g, drop)
            except (RuntimeError, IndexError, ValueError) as err:
                raise _named(plan, g.root, err) from None
    sync_module_attributes(net, head_dims)
    for p in pruned.parameters():
        p.grad = None
    _check_runs(plan, net, inputs)
    for m, mode in zip(pruned.modules(), modes):
        m.training = mode
    return pruned


@one_thread()
def prune(
    base: nn.Module,
    decision: Decision,
    sample_shape: tuple[int, int, int],
    *,
    importance: str = "magnitude",
    calibration: Calibration | None = None,
    units=None,
    ignored_layers=(),
    num_heads: dict[str, int] | None = None,
) -> nn.Module:
    """A structurally pruned deep copy of base (base is left untouched).

    base: a diffusers UNet2DModel, a tdcdiff Denoiser wrapping one, or any net called as model(x, t) (and
        class_labels=, for a class-conditional one).
    decision: unit name -> fraction of its channels (of an attention unit: of its heads) to remove, in
        [0, 0.95]; missing units are not pruned. Depth units (surgery/depth.py) map to 1.0 (remove the layer)
        or 0.0 (keep it).
    sample_shape: (C, H, W) of one sample, used to trace the network.
    importance: which channels go: "magnitude" (L2 norm of their weights) or "taylor" (|weight x gradient|
        of the denoising loss on `calibration`'s batch).
    units, ignored_layers: the decision space, as for units.prunable_units (default: found generically).
    num_heads: attention module name -> heads, for attention whose heads the module does not reveal.
    Returns a model of base's type with base's output shape (a learned variance included).
    Raises PruningError (a ValueError) naming the unit and layer when the decision cannot be applied.
    """
    check_importance(importance, calibration)
    width, removed = depth.split(decision, base)
    base = reduced_base(base, removed)
    plan = plan_for(network(base), tuple(sample_shape), units=units, ignored_layers=ignored_layers, num_heads=num_heads)
    check_decision(width, plan.units, MAX_RATIO)
    return prune_kept(base, plan, plan.kept(width), tuple(sample_shape), importance, calibration)


# Per base network: its copies with some depth units removed, so that each is traced (plan_for) only once.
_REDUCED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def reduced_base(base: nn.Module, removed: list[str]) -> nn.Module:
    """base with the depth units `removed` taken out (surgery/depth.py): a cached copy, or base itself for [].

    Never modify the result: later calls return the same object. Raises ValueError for unknown units.
    """
    if not removed:
        return base
    cache = _REDUCED.setdefault(base, {})
    key = tuple(sorted(removed))
    if key not in cache:
        cache[key] = depth.remove(copy.deepcopy(base), list(removed))
    return cache[key]

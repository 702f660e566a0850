"""The pruning engine: torch-pruning applied to a decision (prune/units.py) so the network really shrinks.

torch-pruning's dependency graph removes whole channels (and attention head dimensions), so the result is
really smaller, not masked.

Coupled channels: residual streams and skip connections tie the output channels of layers in several units
together, and torch-pruning removes such a coupled set (a "group") as one. Each group follows the ratio of
ONE unit: the unit of the first layer, in forward order, that produces those channels. So a down block's
ratio also sets the width of the skip it sends to the up path, and the mid block's residual width follows
the last down block (the mid block's own ratio sets its inner widths).

GroupNorm removes channels evenly from every norm group (attention: every head), so a group with g norm
groups of s channels can only keep s, s-1, ..., 1 channels per norm group: a ratio r keeps
round(s * (1 - r)) of them, at least one.
"""

from __future__ import annotations

import contextlib
import copy
import math
import sys
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn

from ..models import Denoiser
from . import depth
from .units import LAYERS, MAX_RATIO, Decision, Unit, check_decision, ignored_names, network, prunable_units

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


@contextlib.contextmanager
def one_thread():
    """Pruning and FLOPs trials are thousands of tiny ops: one intra-op thread is as fast, and immune to
    oversubscription (with another process busy on a 2-core machine, two threads were ~20x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _forward(net: nn.Module, inputs: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return Denoiser(net)(*inputs)


def kept_slots(ratio: float, slots: int) -> int:
    """Channels kept per norm group (or head) when a ratio is applied to `slots` channels per group."""
    return min(slots, max(1, math.floor(slots * (1.0 - ratio) + 0.5)))


@dataclass(frozen=True)
class _Group:
    """One set of coupled channels that torch-pruning removes together.

    root: a conv/linear producing them (the key of pruning_ratio_dict). unit: whose ratio applies.
    channels: how many. slots: channels per norm group / attention head (removal is even across those).
    """

    root: str
    unit: str
    channels: int
    slots: int


@dataclass(frozen=True)
class Plan:
    """What pruning this architecture involves: its units, its prunable groups and what to leave alone."""

    units: list[Unit]
    groups: tuple[_Group, ...]
    ignored: tuple[str, ...]
    heads: tuple[tuple[str, int], ...]  # (q/k/v linear, number of heads)

    def kept(self, decision: Decision) -> tuple[int, ...]:
        """Channels kept per norm group for each group: what determines the pruned shapes (and FLOPs)."""
        return tuple(kept_slots(decision.get(g.unit, 0.0), g.slots) for g in self.groups)


def _attention_heads(net: nn.Module) -> dict[str, int]:
    """q/k/v projections of diffusers attention layers -> number of heads (head dims are pruned evenly)."""
    if "diffusers" not in sys.modules:  # a diffusers layer implies diffusers is imported
        return {}
    from diffusers.models.attention_processor import Attention

    heads = {}
    for name, m in net.named_modules():
        if isinstance(m, Attention):
            for proj in ("to_q", "to_k", "to_v"):
                if getattr(m, proj, None) is not None:
                    heads[f"{name}.{proj}"] = m.heads
    return heads


def _example_inputs(net: nn.Module, sample_shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    param = next(net.parameters())
    x = torch.randn((1, *sample_shape), generator=torch.Generator().manual_seed(0))
    return x.to(param.device, param.dtype), torch.zeros(1, dtype=torch.long, device=param.device)


def _channel_groups(graph, group, heads: dict[nn.Module, int]) -> int:
    """Norm groups / heads the group's channels are split into (as torch-pruning's BasePruner counts them)."""
    n = 1
    for dep, _ in group:
        m, out = dep.target.module, graph.is_out_channel_pruning_fn(dep.handler)
        if out and m in heads:
            n = max(n, heads[m])
        elif isinstance(m, nn.modules.conv._ConvNd) and m.groups == m.out_channels:
            continue  # depthwise: channels map one to one
        elif (fn := graph.get_pruner_of_module(m)) is not None:
            n = max(n, fn.get_out_channel_groups(m) if out else fn.get_in_channel_groups(m))
    return n


def _build_plan(net: nn.Module, sample_shape: tuple[int, ...]) -> Plan:
    units = prunable_units(net)
    unit_of = {layer: u.name for u in units for layer in u.modules}
    ignored = ignored_names(net)
    heads = _attention_heads(net)
    name_of = {m: name for name, m in net.named_modules()}
    order: dict[nn.Module, int] = {}

    def record(module, args, output) -> None:  # must return None, or it replaces the output
        order.setdefault(module, len(order))

    hooks = [m.register_forward_hook(record) for m in net.modules() if isinstance(m, LAYERS)]
    modes = [m.training for m in net.modules()]
    try:
        with torch.enable_grad():  # tracing follows grad_fn
            graph = tp.DependencyGraph().build_dependency(
                net, example_inputs=_example_inputs(net, sample_shape), forward_fn=_forward
            )
    finally:
        for hook in hooks:
            hook.remove()
        for m, mode in zip(net.modules(), modes):  # tracing switched the base to eval mode
            m.training = mode
    head_of = {net.get_submodule(name): n for name, n in heads.items()}
    ignored_modules = [m for name in ignored for m in net.get_submodule(name).modules()]
    groups = []
    for group in graph.get_all_groups(ignored_layers=ignored_modules, root_module_types=LAYERS):
        if any(
            graph.is_out_channel_pruning_fn(dep.handler)
            and (isinstance(dep.target.module, tp.ops._OutputOp) or not dep.target.outputs)
            for dep, _ in group
        ):
            continue  # these are the output's channels, whichever layer produces them
        producers = [
            dep.target.module
            for dep, _ in group
            if graph.is_out_channel_pruning_fn(dep.handler) and name_of.get(dep.target.module) in unit_of
        ]
        if not producers:
            continue
        root = min(producers, key=order.__getitem__)
        channels = graph.get_out_channels(root)
        slots = channels // _channel_groups(graph, group, head_of)
        groups.append(_Group(name_of[root], unit_of[name_of[root]], channels, slots))
    return Plan(units, tuple(groups), tuple(ignored), tuple(heads.items()))


# One plan per base network, rebuilt if its layer shapes or the sample shape change.
_PLANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def plan_for(net: nn.Module, sample_shape: tuple[int, ...]) -> Plan:
    key = (
        tuple(sample_shape),
        tuple(
            (name, type(m).__qualname__, tuple(tuple(p.shape) for p in m.parameters(recurse=False)))
            for name, m in net.named_modules()
        ),
    )
    cached = _PLANS.get(net)
    if cached is None or cached[0] != key:
        _PLANS[net] = cached = (key, _build_plan(net, tuple(sample_shape)))
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


def prune_kept(
    base: nn.Module,
    plan: Plan,
    kept: tuple[int, ...],
    sample_shape: tuple[int, ...],
    importance: str,
    calibration: Calibration | None,
) -> nn.Module:
    """A deep copy of base with each plan group cut to kept[i] channels per norm group.

    importance: one of IMPORTANCES, or "position" (first channels stay) for FLOPs trials.
    """
    pruned = copy.deepcopy(base)
    net = network(pruned)
    # BasePruner keeps int(slots * (1 - r)) per norm group; + 0.5 keeps float error away from the edge.
    ratios = {
        net.get_submodule(g.root): 1.0 - (k + 0.5) / g.slots for g, k in zip(plan.groups, kept) if k < g.slots
    }
    if not ratios:
        return pruned
    modes = [m.training for m in pruned.modules()]
    net.eval()
    with torch.enable_grad():
        if importance == "taylor":
            _taylor_gradients(net, calibration)
            scorer = tp.importance.GroupTaylorImportance()
        elif importance == "magnitude":
            scorer = tp.importance.GroupMagnitudeImportance(p=2)
        else:
            scorer = _ByPosition()
        pruner = tp.pruner.BasePruner(
            net,
            _example_inputs(net, sample_shape),
            importance=scorer,
            pruning_ratio=0.0,  # groups missing from pruning_ratio_dict stay whole
            pruning_ratio_dict=ratios,
            ignored_layers=[net.get_submodule(name) for name in plan.ignored],
            # Fresh dicts: BasePruner fills these, and its defaults are shared between calls.
            num_heads={net.get_submodule(name): n for name, n in plan.heads},
            in_channel_groups={},
            out_channel_groups={},
            forward_fn=_forward,
        )
        pruner.step()
    sync_module_attributes(net)
    for p in pruned.parameters():
        p.grad = None
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
) -> nn.Module:
    """A structurally pruned deep copy of base (base is left untouched).

    base: a diffusers UNet2DModel, a tdcdiff Denoiser wrapping one, or any net called as model(x, t).
    decision: unit name -> fraction of its channels to remove, in [0, 0.95]; missing units are not pruned.
        Depth units (prune/depth.py) map to 1.0 (remove the layer) or 0.0 (keep it).
    sample_shape: (C, H, W) of one sample, used to trace the network.
    importance: which channels go: "magnitude" (L2 norm of their weights) or "taylor" (|weight x gradient|
        of the denoising loss on `calibration`'s batch).
    Returns a model of base's type mapping (x, t) to a tensor of x's shape.
    """
    check_importance(importance, calibration)
    width, removed = depth.split(decision, base)
    base = reduced_base(base, removed)
    plan = plan_for(network(base), tuple(sample_shape))
    check_decision(width, plan.units, MAX_RATIO)
    return prune_kept(base, plan, plan.kept(width), tuple(sample_shape), importance, calibration)


# Per base network: its copies with some depth units removed, so that each is traced (plan_for) only once.
_REDUCED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def reduced_base(base: nn.Module, removed: list[str]) -> nn.Module:
    """base with the depth units `removed` taken out (prune/depth.py): a cached copy, or base itself for [].

    Never modify the result: later calls return the same object. Raises ValueError for unknown units.
    """
    if not removed:
        return base
    cache = _REDUCED.setdefault(base, {})
    key = tuple(sorted(removed))
    if key not in cache:
        cache[key] = depth.remove(copy.deepcopy(base), list(removed))
    return cache[key]


def sync_module_attributes(model: nn.Module) -> None:
    """Re-derive size attributes from current parameter shapes, after pruning or resizing layers.

    Covers torch layers (Conv/Linear in/out sizes, norm widths) and the diffusers attributes that a forward
    asserts on or reports: Upsample2D/Downsample2D channels, Attention dims, ResnetBlock2D channels.
    Attention keeps its number of heads (pruning shortens each head instead).
    """
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

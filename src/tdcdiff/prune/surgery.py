"""Structural pruning of a denoiser into a smaller one that fits a FLOPs budget.

The decision space is one width ratio per prunable unit: each down block, the mid block and each up block
of a diffusers UNet, or each top-level child of any other `model(x, t)` network. torch-pruning's dependency
graph removes whole channels (and attention head dimensions), so the result is really smaller, not masked.

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

from ..flops import count_flops
from ..models import Denoiser

Decision = dict[str, float]
"""Unit name -> pruning ratio in [0, MAX_RATIO] (fraction of that unit's channels removed)."""

MAX_RATIO = 0.95
IMPORTANCES = ("magnitude", "taylor")
# Read by every block of a diffusers UNet, so they belong to no unit and keep their width.
NEVER_PRUNE = ("time_embedding", "time_proj", "class_embedding")
_LAYERS = (nn.modules.conv._ConvNd, nn.Linear)


@dataclass
class Unit:
    """One dimension of the decision space.

    name: "down_blocks.0", "mid_block", "up_blocks.1", ... or a top-level child's name for other nets.
    modules: qualified names (relative to the unwrapped network) of the conv/linear layers inside the unit
        whose output channels may be pruned.
    """

    name: str
    modules: list[str]


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


@dataclass
class FitResult:
    """A pruned model that fits a FLOPs budget.

    model: the pruned deep copy. decision: the repaired decision actually applied (every unit).
    flops: its measured FLOPs (count_flops, batch 1). budget: the target. scale: the common multiplier the
    bisection applied to the proposed ratios (before any per-unit repair).
    """

    model: nn.Module
    decision: Decision
    flops: int
    budget: int
    scale: float


class BudgetError(ValueError):
    """No decision reachable by pruning lands within tolerance of the FLOPs budget."""


def _network(model: nn.Module) -> nn.Module:
    """The network a Denoiser wraps (unit and layer names are relative to it), or the model itself."""
    return model.model if isinstance(model, Denoiser) else model


@contextlib.contextmanager
def _one_thread():
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


def _ignored_names(net: nn.Module) -> list[str]:
    """Modules whose output channels are never pruned: time embeddings and the output layer."""
    names = [name for name, _ in net.named_children() if name in NEVER_PRUNE]
    layers = [name for name, m in net.named_modules() if isinstance(m, _LAYERS)]
    # The prediction's channels must equal the input's. Taken here as the last layer registered; the
    # traced plan also protects whichever layers really produce the output.
    return names + layers[-1:]


def prunable_units(model: nn.Module) -> list[Unit]:
    """The decision space of a model (a diffusers UNet, a Denoiser wrapping one, or any model(x, t) net).

    Diffusers UNets: "down_blocks.i", "mid_block", "up_blocks.i". Other nets: each top-level child holding
    a conv/linear layer that may be pruned. Never pruned: time embeddings and the output layer.
    """
    net = _network(model)
    if isinstance(getattr(net, "down_blocks", None), nn.ModuleList) and isinstance(
        getattr(net, "up_blocks", None), nn.ModuleList
    ):
        names = [f"down_blocks.{i}" for i in range(len(net.down_blocks))]
        names += ["mid_block"] if getattr(net, "mid_block", None) is not None else []
        names += [f"up_blocks.{i}" for i in range(len(net.up_blocks))]
    else:
        names = [name for name, _ in net.named_children()]
    ignored = _ignored_names(net)
    units = []
    for name in names:
        layers = [
            layer
            for layer, m in net.get_submodule(name).named_modules(prefix=name)
            if isinstance(m, _LAYERS) and not any(layer == i or layer.startswith(i + ".") for i in ignored)
        ]
        if layers:
            units.append(Unit(name, layers))
    return units


def uniform_decision(units: list[Unit], ratio: float) -> Decision:
    """The same pruning ratio for every unit (the Diff-Pruning-style baseline)."""
    if not 0.0 <= ratio <= MAX_RATIO:
        raise ValueError(f"pruning ratio must be in [0, {MAX_RATIO}], got {ratio}")
    return {u.name: float(ratio) for u in units}


def _check_decision(decision: Decision, units: list[Unit], limit: float) -> None:
    names = {u.name for u in units}
    unknown = sorted(set(decision) - names)
    if unknown:
        raise ValueError(f"decision names unknown units {unknown}; this model's units are {sorted(names)}")
    for name, ratio in decision.items():
        if not (math.isfinite(ratio) and 0.0 <= ratio <= limit):
            raise ValueError(f"pruning ratio of unit {name!r} must be in [0, {limit}], got {ratio}")


def _kept_slots(ratio: float, slots: int) -> int:
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
class _Plan:
    """What pruning this architecture involves: its units, its prunable groups and what to leave alone."""

    units: list[Unit]
    groups: tuple[_Group, ...]
    ignored: tuple[str, ...]
    heads: tuple[tuple[str, int], ...]  # (q/k/v linear, number of heads)

    def kept(self, decision: Decision) -> tuple[int, ...]:
        """Channels kept per norm group for each group: what determines the pruned shapes (and FLOPs)."""
        return tuple(_kept_slots(decision.get(g.unit, 0.0), g.slots) for g in self.groups)


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


def _build_plan(net: nn.Module, sample_shape: tuple[int, ...]) -> _Plan:
    units = prunable_units(net)
    unit_of = {layer: u.name for u in units for layer in u.modules}
    ignored = _ignored_names(net)
    heads = _attention_heads(net)
    name_of = {m: name for name, m in net.named_modules()}
    order: dict[nn.Module, int] = {}

    def record(module, args, output) -> None:  # must return None, or it replaces the output
        order.setdefault(module, len(order))

    hooks = [m.register_forward_hook(record) for m in net.modules() if isinstance(m, _LAYERS)]
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
    for group in graph.get_all_groups(ignored_layers=ignored_modules, root_module_types=_LAYERS):
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
    return _Plan(units, tuple(groups), tuple(ignored), tuple(heads.items()))


# One plan per base network, rebuilt if its layer shapes or the sample shape change.
_PLANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _plan(net: nn.Module, sample_shape: tuple[int, ...]) -> _Plan:
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


def _check_importance(importance: str, calibration: Calibration | None) -> None:
    if importance not in IMPORTANCES:
        raise ValueError(f"unknown importance {importance!r}; choose one of {IMPORTANCES}")
    if importance == "taylor" and calibration is None:
        raise ValueError("importance='taylor' needs calibration=Calibration(images, scheduler, timesteps)")


def _apply(
    base: nn.Module,
    plan: _Plan,
    kept: tuple[int, ...],
    sample_shape: tuple[int, ...],
    importance: str,
    calibration: Calibration | None,
) -> nn.Module:
    """A deep copy of base with each plan group cut to kept[i] channels per norm group.

    importance: one of IMPORTANCES, or "position" (first channels stay) for FLOPs trials.
    """
    pruned = copy.deepcopy(base)
    net = _network(pruned)
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


@_one_thread()
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
    sample_shape: (C, H, W) of one sample, used to trace the network.
    importance: which channels go: "magnitude" (L2 norm of their weights) or "taylor" (|weight x gradient|
        of the denoising loss on `calibration`'s batch).
    Returns a model of base's type mapping (x, t) to a tensor of x's shape.
    """
    _check_importance(importance, calibration)
    plan = _plan(_network(base), tuple(sample_shape))
    _check_decision(decision, plan.units, MAX_RATIO)
    return _apply(base, plan, plan.kept(decision), tuple(sample_shape), importance, calibration)


def _unit_levels(plan: _Plan, unit: str) -> list[float]:
    """One ratio per distinct channel configuration of a unit, ascending, each safely inside its interval."""
    slots = {g.slots for g in plan.groups if g.unit == unit}
    # Where round(s * (1 - r)) drops from j to j - 1 channels per norm group.
    cuts = sorted({c for s in slots for j in range(2, s + 1) if 0.0 < (c := 1.0 - (j - 0.5) / s) < MAX_RATIO})
    if not cuts:
        return [0.0]
    # The last level keeps one channel per norm group: name it by that ratio (1 - 1/s) where it is allowed.
    last = min(MAX_RATIO, max(1.0 - 1.0 / s for s in slots))
    return [0.0] + [(a + b) / 2 for a, b in zip(cuts, cuts[1:])] + [last]


class _BudgetSearch:
    """Measures the FLOPs of trial decisions (once per distinct pruned shape) and keeps the closest."""

    def __init__(self, base, plan: _Plan, sample_shape, budget: int, tolerance: float):
        self.base, self.plan, self.sample_shape = base, plan, sample_shape
        self.budget, self.tolerance = budget, tolerance
        self.measured: dict[tuple[int, ...], int] = {}
        self.best: Decision | None = None
        self.best_flops = 0

    def flops(self, decision: Decision) -> int:
        kept = self.plan.kept(decision)
        if kept not in self.measured:
            model = _apply(self.base, self.plan, kept, self.sample_shape, "position", None)
            self.measured[kept] = count_flops(model, self.sample_shape)
        flops = self.measured[kept]
        if self.best is None or self.error(flops) < self.error(self.best_flops):
            self.best, self.best_flops = decision, flops
        return flops

    def error(self, flops: int) -> float:
        return abs(flops - self.budget) / self.budget

    def fits(self) -> bool:
        return self.best is not None and self.error(self.best_flops) <= self.tolerance

    def bisect(self, shape: Decision, max_iter: int) -> float:
        """Bisection on a common scale of the proposed ratios; returns the scale of the closest trial."""
        best_scale = 0.0

        def flops_at(scale: float) -> int:
            nonlocal best_scale
            trial = {name: min(MAX_RATIO, scale * r) for name, r in shape.items()}
            flops = self.flops(trial)
            if self.best is trial:
                best_scale = scale
            return flops

        positive = [r for r in shape.values() if r > 0]
        # Up to `top` the ratios keep their proportions; beyond it the largest ones saturate at MAX_RATIO.
        top = MAX_RATIO / max(positive)
        lo, hi = 0.0, top
        if flops_at(top) > self.budget:
            lo, hi = top, MAX_RATIO / min(positive)
            if flops_at(hi) > self.budget:
                return best_scale  # even full saturation is too big; refine() may still prune other units
        for _ in range(max_iter):
            if self.fits():
                break
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if flops_at(mid) > self.budget else (lo, mid)
        return best_scale

    def refine(self) -> None:
        """Greedy repair from the closest trial, in channel levels of single units (see _unit_levels).

        Moves one unit one level toward the budget while that gets closer. When stuck, measures every unit
        one and two levels either way and jumps to the combination whose summed FLOPs changes land closest
        to the budget with the fewest level changes. Stops within tolerance, or when nothing gets closer.
        """
        levels = {u.name: _unit_levels(self.plan, u.name) for u in self.plan.units}

        def config(name: str, ratio: float) -> tuple[int, ...]:
            return tuple(_kept_slots(ratio, g.slots) for g in self.plan.groups if g.unit == name)

        def nearest(name: str) -> int:
            """The level with the closest trial's pruned shapes (nearest, should a ratio sit on a cut)."""
            now = config(name, self.best[name])
            return min(
                range(len(levels[name])),
                key=lambda i: sum(abs(a - b) for a, b in zip(config(name, levels[name][i]), now)),
            )

        index = {name: nearest(name) for name in levels}

        def measure(moves: dict[str, int]) -> int | None:
            """FLOPs with some units moved by some levels (None if a move leaves the range)."""
            trial = {name: index[name] + moves.get(name, 0) for name in levels}
            if not all(0 <= i < len(levels[name]) for name, i in trial.items()):
                return None
            return self.flops({name: levels[name][i] for name, i in trial.items()})

        while not self.fits():
            before, start = self.error(self.best_flops), self.best_flops
            step = 1 if start > self.budget else -1  # a higher level prunes more
            singles = {name: measure({name: step}) for name in levels}
            closer = {name: f for name, f in singles.items() if f is not None and self.error(f) < before}
            if closer:
                name = min(closer, key=lambda n: self.error(closer[n]))
                index[name] += step
                continue
            deltas = {
                name: {0: 0} | {s: f - start for s in (-2, -1, 1, 2) if (f := measure({name: s})) is not None}
                for name in levels
            }
            moves = self._combine(deltas, start)
            if moves is None or self.error(measure(moves)) >= before:
                return  # stuck: nothing measured gets closer
            index = {name: index[name] + moves.get(name, 0) for name in levels}

    def _combine(self, deltas: dict[str, dict[int, int]], start: int) -> dict[str, int] | None:
        """Level moves (unit -> levels) whose summed FLOPs changes, each measured alone from `start`, land
        closest to the budget; among those predicted well within tolerance, the fewest level changes."""
        quantum = max(1, self.budget // 2000)  # merge near-equal sums to keep the search small
        states = {0: (0, 0, {})}  # bucket of summed change -> (summed change, levels changed, moves)
        for name, options in deltas.items():
            merged = {}
            for change, cost, moves in states.values():
                for step, delta in options.items():
                    item = (change + delta, cost + abs(step), {**moves, name: step} if step else moves)
                    key = item[0] // quantum
                    if key not in merged or item[1] < merged[key][1]:
                        merged[key] = item
            states = merged

        def rank(item) -> tuple[float, int]:
            return max(self.error(start + item[0]), self.tolerance / 2), item[1]

        best = min(states.values(), key=rank)
        return best[2] or None


@_one_thread()
def fit_to_budget(
    base: nn.Module,
    decision: Decision,
    budget_flops: int,
    sample_shape: tuple[int, int, int],
    *,
    tolerance: float = 0.03,
    importance: str = "magnitude",
    calibration: Calibration | None = None,
    max_iter: int = 12,
) -> FitResult:
    """Repair a proposed decision so the pruned model's measured FLOPs land within tolerance of a budget.

    base, sample_shape, importance, calibration: as for prune().
    decision: proposed ratios per unit; only their relative sizes matter (all zero or empty: uniform).
        They are scaled by a common factor found by bisection (clamped to [0, 0.95]); if no scale lands
        within tolerance (GroupNorm makes FLOPs a step function of the scale), single units are then
        moved one channel level at a time toward the budget.
    budget_flops: target FLOPs of one forward at batch 1 (count_flops). tolerance: allowed relative error.
    max_iter: bisection steps.
    Raises BudgetError when no reachable pruning is within tolerance.
    """
    _check_importance(importance, calibration)
    if budget_flops <= 0:
        raise ValueError(f"budget_flops must be positive, got {budget_flops}")
    sample_shape = tuple(sample_shape)
    plan = _plan(_network(base), sample_shape)
    _check_decision(decision, plan.units, math.inf)
    base_flops = count_flops(base, sample_shape)
    if budget_flops >= base_flops * (1 - tolerance / 2):
        return FitResult(copy.deepcopy(base), {u.name: 0.0 for u in plan.units}, base_flops, budget_flops, 0.0)
    if not plan.groups:
        raise BudgetError(
            f"FLOPs budget {budget_flops:,} is below the base model's {base_flops:,}, and this model has "
            "nothing prunable: use a budget of at least the base FLOPs"
        )
    shape = {u.name: float(decision.get(u.name, 0.0)) for u in plan.units}
    if not any(shape.values()):
        shape = dict.fromkeys(shape, 1.0)
    search = _BudgetSearch(base, plan, sample_shape, budget_flops, tolerance)
    scale = search.bisect(shape, max_iter)
    if not search.fits():
        search.refine()
    if not search.fits():
        raise BudgetError(
            f"cannot prune to {budget_flops:,} FLOPs ({budget_flops / base_flops:.1%} of the base's "
            f"{base_flops:,}) within {tolerance:.1%}: the closest reachable is {search.best_flops:,} "
            f"({search.best_flops / base_flops:.1%}). Give the smallest group a larger budget (raise k or "
            "lower N) or allow a larger tolerance."
        )
    model = _apply(base, plan, plan.kept(search.best), sample_shape, importance, calibration)
    return FitResult(model, search.best, count_flops(model, sample_shape), budget_flops, scale)


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

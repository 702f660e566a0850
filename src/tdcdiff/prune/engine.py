"""The pruning engine: a decision (prune/units.py) applied with torch-pruning, so the network really shrinks.

The plan (prune/plan.py) says which channels are coupled and whose ratio cuts them; an importance criterion
(prune/importance.py) ranks them; here each group is cut to the channels (or heads) it keeps, depth units are
removed first (surgery/depth.py), the modules' size attributes are synced (surgery/attributes.py), and one
forward checks that the pruned network runs.
"""

from __future__ import annotations

import copy
import weakref

import torch
import torch_pruning as tp
from torch import nn

from ..latency import one_thread
from ..models import network
from ..surgery import depth
from ..surgery.attributes import LAYERS, attention_head_dims, layer_widths, sync_module_attributes
from .graph import example_inputs, full_forward, trace
from .importance import BY_POSITION, Calibration, Importance, check_importance
from .plan import PlanGroup, PruningError, PruningPlan, plan_for
from .units import MAX_RATIO, Decision, check_decision


def _named(plan: PruningPlan, layer: str, err: Exception, stale: str = "", keep: str | None = None) -> PruningError:
    """err, raised while pruning or running a layer, as an error naming its unit, the layer and the fix (stale:
    a note on size attributes the module still holds from before pruning; keep: the module whose layers to keep,
    by default the one holding the layer)."""
    keep = keep if keep is not None else layer.rpartition(".")[0] or layer
    unit = plan.unit_of(layer) or plan.unit_of(keep)
    why = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return PruningError(
        f"cannot prune {f'unit {unit!r}' if unit else 'the model'}: layer {layer!r} fails after pruning "
        f"({why}){stale}; keep its widths with ignored_layers=[{keep!r}] (in a run: the setting "
        "search.ignored_layers; leave its unit out of the decision if nothing else in it is prunable)"
    )


def _stale_sizes(module: nn.Module, before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]) -> str:
    """A note naming the int attributes of module that still equal a width some layer had before pruning."""
    old = {w for name, pair in before.items() if pair != after.get(name) for w in pair} - {
        w for pair in after.values() for w in pair}
    stale = [f"{k}={v}" for k, v in vars(module).items() if type(v) is int and v in old]
    return f"; {type(module).__name__} still holds the unpruned width in {', '.join(stale)}" if stale else ""


def _channels_to_drop(graph, net: nn.Module, group: PlanGroup, kept: int, importance: Importance) -> list[int]:
    """Root channels that cut a group to `kept` per norm group: the same positions in every norm group, the
    least important averaged over the norm groups (as torch-pruning's BasePruner does). A channel with coupled
    copies in the same layer (plan._copies: GEGLU's halves) is scored with them, averaged."""
    root = net.get_submodule(group.root)
    rows = group.channels // group.slots
    prune_out = graph.get_pruner_of_module(root).prune_out_channels
    full = graph.get_pruning_group(root, prune_out, list(range(group.channels)))
    scores = importance(full)
    if len(scores) != group.channels:  # one score per channel of the root, copies included, in the group's order
        order = torch.as_tensor([int(i) for i in full[0].idxs])
        scores = torch.empty_like(scores).index_copy_(0, order, scores).view(-1, group.channels).mean(0)
    drop = torch.argsort(scores.view(rows, group.slots).mean(0))[: group.slots - kept].tolist()
    return sorted(r * group.slots + d for r in range(rows) for d in drop)


def _heads_to_drop(net: nn.Module, group: PlanGroup, kept: int, importance: Importance) -> list[int]:
    """The least important heads of an attention group, enough to keep `kept`."""
    return torch.argsort(importance.heads(net, group))[: group.slots - kept].tolist()


def _prune_layer(layer: nn.Module, idxs: list[int], *, out: bool) -> None:
    conv = isinstance(layer, nn.modules.conv._ConvNd)
    if out:
        (tp.prune_conv_out_channels if conv else tp.prune_linear_out_channels)(layer, idxs)
    else:
        (tp.prune_conv_in_channels if conv else tp.prune_linear_in_channels)(layer, idxs)


def _drop_heads(net: nn.Module, group: PlanGroup, drop: list[int]) -> None:
    """Remove whole heads: their channels in each q/k/v projection and where their outputs enter the next
    layer (head after head)."""
    dim = group.channels // group.slots
    _prune_layer(net.get_submodule(group.heads_into), sorted(h * dim + i for h in drop for i in range(dim)), out=False)
    for name, heads in group.head_channels:
        _prune_layer(net.get_submodule(name), sorted(c for h in drop for c in heads[h]), out=True)


def _failure(net: nn.Module, inputs, widths: dict[str, tuple[int, int]]) -> tuple[str, Exception, str] | None:
    """One forward of the pruned net: None, or what failed, of any kind (a shape error, a module's own assert on a
    width): the innermost module running when it was raised, the error, and a note on the size attributes that
    module still holds from before pruning (widths: layer_widths before)."""
    running: list[str] = []

    def leave(module, args, output) -> None:  # must return None, or it replaces the output
        running.pop()

    hooks = []
    for name, m in net.named_modules():
        hooks.append(m.register_forward_pre_hook(lambda m, args, name=name: running.append(name)))
        hooks.append(m.register_forward_hook(leave))
    try:
        with torch.no_grad():
            full_forward(net, inputs)
    except Exception as err:  # whatever the network's own code raises on its pruned shapes
        failing = running[-1] if running else ""
        return failing, err, _stale_sizes(net.get_submodule(failing), widths, layer_widths(net))
    finally:
        for hook in hooks:
            hook.remove()
    return None


def _culprit(base: nn.Module, plan: PruningPlan, cuts: list[tuple[PlanGroup, int]], sample_shape, failing: str) -> str:
    """What to keep when `failing` fails: the module holding it if that has layers, else (a module without layers
    that checks the width it is given, such as improved-diffusion's Downsample without conv) the root layer of the
    first cut whose addition makes the pruned base fail, found by bisection over prefixes of the cuts."""
    holder = failing.rpartition(".")[0]
    if holder and any(isinstance(m, LAYERS) for m in network(base).get_submodule(holder).modules()):
        return holder
    lo, hi = 1, len(cuts)
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if _apply(base, plan, cuts[:mid], sample_shape, BY_POSITION, None)[1] else (mid + 1, hi)
    return cuts[lo - 1][0].root


def _cut(net: nn.Module, plan: PruningPlan, cuts: list[tuple[PlanGroup, int]], sample_shape: tuple[int, ...],
         importance: Importance) -> None:
    """Cut each (group, kept) of net in place. Everything is ranked on the unpruned network first (as
    BasePruner does), then cut: the groups are disjoint channel sets, each indexed in its own root's channels."""
    graph, _ = trace(net, sample_shape)
    drops = []
    for g, k in cuts:
        try:
            drops.append(_channels_to_drop(graph, net, g, k, importance) if g.heads_into is None
                         else _heads_to_drop(net, g, k, importance))
        except Exception as err:  # whatever torch-pruning raises on a group it traced wrongly
            raise _named(plan, g.root, err) from None
    for (g, _), drop in zip(cuts, drops):
        try:
            if g.heads_into is None:
                root = net.get_submodule(g.root)
                graph.get_pruning_group(root, graph.get_pruner_of_module(root).prune_out_channels, drop).prune()
            else:
                _drop_heads(net, g, drop)
        except Exception as err:  # e.g. ZeroDivisionError from an index mapping of stride 0
            raise _named(plan, g.root, err) from None


def _apply(base: nn.Module, plan: PruningPlan, cuts: list[tuple[PlanGroup, int]], sample_shape: tuple[int, ...],
           importance: Importance, calibration: Calibration | None):
    """A deep copy of base with the cuts made and its size attributes synced, and its _failure (None: it runs)."""
    pruned = copy.deepcopy(base)
    net = network(pruned)
    head_dims, widths = attention_head_dims(net), layer_widths(net)  # before pruning: heads keep their dimension
    modes = [m.training for m in pruned.modules()]
    net.eval()
    inputs = example_inputs(net, sample_shape)
    with torch.enable_grad():
        importance.prepare(net, calibration)
        _cut(net, plan, cuts, sample_shape, importance)
    sync_module_attributes(net, head_dims, widths)
    for p in pruned.parameters():
        p.grad = None
    failure = _failure(net, inputs, widths)
    for m, mode in zip(pruned.modules(), modes):
        m.training = mode
    return pruned, failure


def prune_kept(
    base: nn.Module,
    plan: PruningPlan,
    kept: tuple[int, ...],
    sample_shape: tuple[int, ...],
    importance: Importance,
    calibration: Calibration | None,
) -> nn.Module:
    """A deep copy of base with each plan group cut to kept[i] channels per norm group (heads, for attention).

    importance: a criterion from importance.IMPORTANCES (checked against calibration by check_importance), or
    importance.BY_POSITION (first channels stay) for FLOPs trials.
    Raises PruningError naming the unit and layer when torch-pruning or the pruned model fails, and the layers
    to keep (ignored_layers) for it to run.
    """
    cuts = [(g, k) for g, k in zip(plan.groups, kept) if k < g.slots]
    if not cuts:
        return copy.deepcopy(base)
    pruned, failure = _apply(base, plan, cuts, sample_shape, importance, calibration)
    if failure is not None:
        raise _named(plan, *failure, keep=_culprit(base, plan, cuts, sample_shape, failure[0])) from None
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
    importance: which channels go, a name in importance.IMPORTANCES: "magnitude" (L2 norm of their weights) or
        "taylor" (|weight x gradient| of the denoising loss on `calibration`'s batch).
    units, ignored_layers: the decision space, as for units.prunable_units (default: found generically).
    num_heads: attention module name -> heads, for attention whose heads the module does not reveal.
    Returns a model of base's type with base's output shape (a learned variance included).
    Raises ValueError for an unknown importance or a missing calibration, PruningError (a ValueError) naming
    the unit and layer when the decision cannot be applied.
    """
    criterion = check_importance(importance, calibration)
    width, removed = depth.split(decision, base)
    base = reduced_base(base, removed)
    plan = plan_for(network(base), tuple(sample_shape), units=units, ignored_layers=ignored_layers, num_heads=num_heads)
    check_decision(width, plan.units, MAX_RATIO)
    return prune_kept(base, plan, plan.kept(width), tuple(sample_shape), criterion, calibration)


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

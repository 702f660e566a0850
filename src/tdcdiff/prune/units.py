"""The decision space of structural pruning: which units of a network get their own width ratio.

A decision is one pruning ratio per unit: each down block, the mid block and each up block of a diffusers
UNet, or each top-level child of any other `model(x, t)` network. What happens to the channels of a unit is
the engine's business (prune/engine.py); fitting a decision to a FLOPs budget is prune/fit.py's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

from ..models import Denoiser

Decision = dict[str, float]
"""Unit name -> pruning ratio in [0, MAX_RATIO] (fraction of that unit's channels removed)."""

MAX_RATIO = 0.95
# Read by every block of a diffusers UNet, so they belong to no unit and keep their width.
NEVER_PRUNE = ("time_embedding", "time_proj", "class_embedding")
LAYERS = (nn.modules.conv._ConvNd, nn.Linear)


@dataclass
class Unit:
    """One dimension of the decision space.

    name: "down_blocks.0", "mid_block", "up_blocks.1", ... or a top-level child's name for other nets.
    modules: qualified names (relative to the unwrapped network) of the conv/linear layers inside the unit
        whose output channels may be pruned.
    """

    name: str
    modules: list[str]


def network(model: nn.Module) -> nn.Module:
    """The network a Denoiser wraps (unit and layer names are relative to it), or the model itself."""
    return model.model if isinstance(model, Denoiser) else model


def ignored_names(net: nn.Module) -> list[str]:
    """Modules whose output channels are never pruned: time embeddings and the output layer."""
    names = [name for name, _ in net.named_children() if name in NEVER_PRUNE]
    layers = [name for name, m in net.named_modules() if isinstance(m, LAYERS)]
    # The prediction's channels must equal the input's. Taken here as the last layer registered; the
    # traced plan also protects whichever layers really produce the output.
    return names + layers[-1:]


def prunable_units(model: nn.Module) -> list[Unit]:
    """The decision space of a model (a diffusers UNet, a Denoiser wrapping one, or any model(x, t) net).

    Diffusers UNets: "down_blocks.i", "mid_block", "up_blocks.i". Other nets: each top-level child holding
    a conv/linear layer that may be pruned. Never pruned: time embeddings and the output layer.
    """
    net = network(model)
    if isinstance(getattr(net, "down_blocks", None), nn.ModuleList) and isinstance(
        getattr(net, "up_blocks", None), nn.ModuleList
    ):
        names = [f"down_blocks.{i}" for i in range(len(net.down_blocks))]
        names += ["mid_block"] if getattr(net, "mid_block", None) is not None else []
        names += [f"up_blocks.{i}" for i in range(len(net.up_blocks))]
    else:
        names = [name for name, _ in net.named_children()]
    ignored = ignored_names(net)
    units = []
    for name in names:
        layers = [
            layer
            for layer, m in net.get_submodule(name).named_modules(prefix=name)
            if isinstance(m, LAYERS) and not any(layer == i or layer.startswith(i + ".") for i in ignored)
        ]
        if layers:
            units.append(Unit(name, layers))
    return units


def uniform_decision(units: list[Unit], ratio: float) -> Decision:
    """The same pruning ratio for every unit (the Diff-Pruning-style baseline)."""
    if not 0.0 <= ratio <= MAX_RATIO:
        raise ValueError(f"pruning ratio must be in [0, {MAX_RATIO}], got {ratio}")
    return {u.name: float(ratio) for u in units}


def check_decision(decision: Decision, units: list[Unit], limit: float) -> None:
    """Raise ValueError naming the unit when a decision names an unknown unit or a ratio outside [0, limit]."""
    names = {u.name for u in units}
    unknown = sorted(set(decision) - names)
    if unknown:
        raise ValueError(f"decision names unknown units {unknown}; this model's units are {sorted(names)}")
    for name, ratio in decision.items():
        if not (math.isfinite(ratio) and 0.0 <= ratio <= limit):
            raise ValueError(f"pruning ratio of unit {name!r} must be in [0, {limit}], got {ratio}")

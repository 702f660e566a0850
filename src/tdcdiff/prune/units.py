"""The decision space of structural pruning: which units of a network get their own width ratio.

A decision is one pruning ratio per unit: a block of a UNet, the heads or the MLP of a transformer block,
a top-level child of another `model(x, t)` network, or units the user declares. Which channels of a unit are
coupled is prune/plan.py's business, which of them go prune/importance.py's, cutting them prune/engine.py's;
fitting a decision to a FLOPs budget is prune/fit.py's.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from torch import nn

from ..models import network
from ..surgery.attributes import LAYERS, attention_heads

Decision = dict[str, float]
"""Unit name -> pruning ratio in [0, MAX_RATIO] (fraction of that unit's channels, or heads, removed)."""

MAX_RATIO = 0.95
# Children of a net without recognised blocks that every block reads: conditioning, never a unit.
CONDITIONING = re.compile(r"^(time|temb|t_emb|timestep|class|label|y_emb|cond|emb)", re.IGNORECASE)


@dataclass
class Unit:
    """One dimension of the decision space.

    name: "down_blocks.0", "input_blocks.3", "blocks.1.attn.heads", "blocks.1.mlp", ... (see prunable_units).
    modules: qualified names (relative to the unwrapped network) of the conv/linear layers inside the unit
        whose output channels may be pruned.
    """

    name: str
    modules: list[str]


def _layers(net: nn.Module, prefix: str) -> list[str]:
    return [name for name, m in net.get_submodule(prefix).named_modules(prefix=prefix) if isinstance(m, LAYERS)]


def _inside(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _module_list(net: nn.Module, name: str) -> list[str]:
    blocks = getattr(net, name, None)
    return [f"{name}.{i}" for i in range(len(blocks))] if isinstance(blocks, nn.ModuleList) else []


def _transformer_units(net: nn.Module) -> dict[str, list[str]]:
    """Two kinds of units per transformer block (a ModuleList entry holding attention and other layers):
    "<attention>.heads" (its heads) and "<block>.mlp" (every other layer of the block, e.g. its MLP, except
    a time / class embedding inside the block, as in diffusers' AdaLayerNormZero)."""
    for list_name, blocks in net.named_modules():
        if not isinstance(blocks, nn.ModuleList) or not len(blocks):
            continue
        found = {}
        for i, block in enumerate(blocks):
            name = f"{list_name}.{i}"
            attentions = [f"{name}.{a}" if a else name for a, m in block.named_modules() if attention_heads(m)]
            attentions = [a for a in attentions if a != name]
            rest = [layer for layer in _layers(net, name) if not any(_inside(layer, a) for a in attentions)
                    and not any(CONDITIONING.search(part) for part in layer[len(name):].split("."))]
            if not attentions or not rest:
                break
            found.update({f"{a}.heads": _layers(net, a) for a in attentions})
            found[f"{name}.mlp"] = rest
        else:
            if found:
                return found
    return {}


def _discover(net: nn.Module) -> tuple[dict[str, list[str]], set[str]]:
    """Units (name -> layers) of a net and the layers outside every unit that may still follow one (a UNet's
    stem takes the width of the first block); every other layer outside the units keeps its width."""
    for down, mid, up, stem in (("down_blocks", "mid_block", "up_blocks", "conv_in"),  # diffusers UNet
                                ("input_blocks", "middle_block", "output_blocks", None)):  # ADM / IDDPM / LDM
        if _module_list(net, down) and _module_list(net, up):
            middle = [mid] if isinstance(getattr(net, mid, None), nn.Module) else []
            names = _module_list(net, down) + middle + _module_list(net, up)
            follow = _layers(net, stem) if stem and isinstance(getattr(net, stem, None), nn.Module) else []
            return {n: _layers(net, n) for n in names}, set(follow)
    transformer = _transformer_units(net)
    if transformer:
        return transformer, set()
    # Other nets: each top-level child, a ModuleList one unit per entry (pytorch_diffusion's down.0, down.1, ...).
    children = [name for name, _ in net.named_children() if not CONDITIONING.search(name)]
    return {unit: _layers(net, unit) for name in children for unit in _module_list(net, name) or [name]}, set()


def _declared(net: nn.Module, units) -> dict[str, list[str]]:
    declared = units(net) if callable(units) else units
    if not isinstance(declared, dict) or not declared:
        raise ValueError("units= must be a non-empty dict of unit name -> list of module names (or a callable "
                         "returning one), e.g. {'enc': ['blocks.0', 'blocks.1']}")
    out = {}
    for unit, modules in declared.items():
        if isinstance(modules, str) or not modules:
            raise ValueError(f"unit {unit!r}: give a non-empty list of module names, e.g. [{modules!r}]")
        out[unit] = [layer for module in modules for layer in _layers(net, _submodule_name(net, module, unit))]
    return out


def _submodule_name(net: nn.Module, name: str, owner: str) -> str:
    try:
        net.get_submodule(name)
    except AttributeError:
        children = ", ".join(n for n, _ in net.named_children())
        raise ValueError(f"{owner!r} names module {name!r}, which the model does not have; top-level modules: "
                         f"{children} (names are relative to the wrapped network, as in named_modules())") from None
    return name


def ignored_names(net: nn.Module, units: list[Unit], ignored_layers=()) -> list[str]:
    """Layers whose output channels are never pruned: the user's ignored_layers, every layer outside the units
    (time and class embeddings, a transformer's patch embedding and final layers) except a UNet stem that
    follows its first block, and the output layer (taken as the last layer registered; prune/plan.py also
    protects whichever layers really produce the output)."""
    _, follow = _discover(net)
    inside = {layer for u in units for layer in u.modules}
    layers = [name for name, m in net.named_modules() if isinstance(m, LAYERS)]
    user = [layer for i in ignored_layers for layer in _layers(net, _submodule_name(net, i, "ignored_layers"))]
    outside = [layer for layer in layers if layer not in inside and layer not in follow]
    return list(dict.fromkeys(user + outside + layers[-1:]))


def prunable_units(model: nn.Module, *, units=None, ignored_layers=()) -> list[Unit]:
    """The decision space of a model (a diffusers UNet, a Denoiser wrapping one, or any model(x, t) net).

    Found generically: diffusers UNets give "down_blocks.i", "mid_block", "up_blocks.i"; ADM-style UNets
    "input_blocks.i", "middle_block", "output_blocks.i"; transformers (a ModuleList of blocks holding attention
    and an MLP) two units per block, "<attention>.heads" (whole heads) and "<block>.mlp" (everything else in
    the block); other nets each top-level child except conditioning (names such as time_embed, label_emb), a
    ModuleList child one unit per entry ("down.0", "down.1", ...).
    units: declare the units instead: unit name -> list of module names (each contributes its conv/linear
        layers), or a callable net -> such a dict. Names are relative to the wrapped network.
    ignored_layers: module names whose layers are never pruned.
    Layers outside every unit, and the output layer, keep their output channels.
    Raises ValueError naming a module the model does not have.
    """
    net = network(model)
    found = _declared(net, units) if units is not None else _discover(net)[0]
    ignored = set(ignored_names(net, [Unit(n, m) for n, m in found.items()], ignored_layers))
    result = [Unit(name, [layer for layer in layers if layer not in ignored]) for name, layers in found.items()]
    return [u for u in result if u.modules]


def uniform_decision(units: list[Unit], ratio: float) -> Decision:
    """The same pruning ratio for every unit (the Diff-Pruning-style baseline)."""
    if not 0.0 <= ratio <= MAX_RATIO:
        raise ValueError(f"pruning ratio must be in [0, {MAX_RATIO}], got {ratio}")
    return {u.name: float(ratio) for u in units}


def uniform_proposal(model: nn.Module) -> Decision:
    """One global width ratio for every prunable unit of `model`, as a proposal for prune.fit: its repair keeps only
    the proposed ratios' relative sizes, so this scales as one global ratio to whatever budget it is fitted to."""
    return uniform_decision(prunable_units(model), 0.5)


def check_decision(decision: Decision, units: list[Unit], limit: float) -> None:
    """Raise ValueError naming the unit when a decision names an unknown unit or a ratio outside [0, limit]."""
    names = {u.name for u in units}
    unknown = sorted(set(decision) - names)
    if unknown:
        raise ValueError(f"decision names unknown units {unknown}; this model's units are {sorted(names)}")
    for name, ratio in decision.items():
        if not (math.isfinite(ratio) and 0.0 <= ratio <= limit):
            raise ValueError(f"pruning ratio of unit {name!r} must be in [0, {limit}], got {ratio}")

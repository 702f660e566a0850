"""Depth pruning of a diffusers UNet: remove whole ResNet layers and attention blocks.

The depth units of a UNet2DModel, each kept (0.0) or removed (1.0) in a decision:
- "down_blocks.i.resnets.j", j >= 1: removes that down layer and its attention, and
  one ResNet layer (with its attention) of the up block that consumes the block's skips. Down block i with L
  layers emits L skips (+1 from its downsampler, or conv_in before block 0) that up block n-1-i consumes with
  L+1 layers, popping them last-first, so up layer k takes down layer L-1-k's output and the last up layer the
  skip from before the block. Removing down layer j removes the up layer k = L-1-j that took its output, so
  every other up layer keeps its skip; when that is up layer 0 (whose input is the previous up block's width
  plus the skip), the first free up layer in 1..L-1 goes instead and up layer 0 takes the next skip (same
  width), so no kept layer changes its input width and every kept weight stays valid. The result has the
  layout of the same UNet built with fewer layers per block. Down layer 0 always stays: it alone changes the
  width (the previous block's to this block's), so the block keeps at least one layer and every kept layer's
  input width.
- "{down,up}_blocks.i.attentions.j" and "mid_block.attentions.0": an attention block, replaced by a
  parameter-free pass-through (its ResNet layer stays).
- "mid_block.resnets.k": a mid-block ResNet layer (input width = output width), replaced by a pass-through.
The mid block keeps at least one ResNet layer: if a decision removes all, its first is kept (see normalize()).

A removed layer is gone from the module and its state dict; `removed_units(model)` lists what was removed,
which the saved architecture records so that the loader rebuilds the base and calls remove() again.
"""

from __future__ import annotations

import re

from torch import nn

from ..models import network

REMOVED_ATTR = "tdcdiff_removed"
_DOWN = re.compile(r"down_blocks\.(\d+)\.resnets\.(\d+)")


class Removed(nn.Module):
    """What stands in for a removed layer that other code still calls: returns its input unchanged."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


def _is_unet(net: nn.Module) -> bool:
    return all(isinstance(getattr(net, name, None), nn.ModuleList) for name in ("down_blocks", "up_blocks"))


def _attentions(block: nn.Module) -> list:
    found = getattr(block, "attentions", None)
    return list(found) if isinstance(found, nn.ModuleList) else []


def depth_units(net: nn.Module) -> list[str]:
    """Names of the depth units of a (unwrapped) diffusers UNet, in module order; [] for any other network."""
    if not _is_unet(net):
        return []
    names = []
    for i, block in enumerate(net.down_blocks):
        names += [f"down_blocks.{i}.resnets.{j}" for j in range(1, len(block.resnets))]
        names += [f"down_blocks.{i}.attentions.{j}" for j, a in enumerate(_attentions(block)) if a is not None]
    mid = getattr(net, "mid_block", None)
    if mid is not None:
        names += [f"mid_block.attentions.{j}" for j, a in enumerate(_attentions(mid)) if a is not None]
        if len(mid.resnets) >= 2:
            names += [f"mid_block.resnets.{k}" for k in range(len(mid.resnets))]
    for i, block in enumerate(net.up_blocks):
        names += [f"up_blocks.{i}.attentions.{j}" for j, a in enumerate(_attentions(block)) if a is not None]
    return names


def is_depth_unit(name: str) -> bool:
    """Whether a decision key is a depth unit (keep/remove) rather than a width unit (a ratio)."""
    return ".resnets." in name or ".attentions." in name


def normalize(decision: dict[str, float], net: nn.Module | None = None) -> dict[str, float]:
    """The decision with each depth unit's value 0.0 (keep) or 1.0 (remove, for values >= 0.5), and, when it
    removes every mid-block ResNet layer of `net` (a UNet or a Denoiser; None: those the decision lists), the
    first kept. Width units are returned unchanged. (Down blocks cannot lose all their layers: layer 0 is no
    depth unit.)
    """
    out = {k: (float(v >= 0.5) if is_depth_unit(k) else v) for k, v in decision.items()}
    names = depth_units(network(net)) if net is not None else list(out)
    mid = [n for n in names if n.startswith("mid_block.resnets.")]
    if mid and all(out.get(n) for n in mid):
        out[mid[0]] = 0.0
    return out


def split(decision: dict[str, float], net: nn.Module) -> tuple[dict[str, float], list[str]]:
    """A mixed decision as (its width ratios, the depth units it removes, in the decision's order), normalized
    for the network `net` (a UNet or a Denoiser)."""
    decision = normalize(decision, net)
    width = {k: v for k, v in decision.items() if not is_depth_unit(k)}
    return width, [k for k, v in decision.items() if is_depth_unit(k) and v]


def removed_units(model: nn.Module) -> list[str]:
    """The depth units removed from a network (or a Denoiser wrapping one), as remove() recorded them."""
    return list(getattr(network(model), REMOVED_ATTR, []))


def _up_layers_to_remove(net: nn.Module, block: int, down_layers: list[int]) -> list[int]:
    """Which up layers go with the removed layers (all >= 1) of down block `block` (see the module docstring)."""
    layers = len(net.down_blocks[block].resnets)
    mirrors = {layers - 1 - j for j in down_layers}
    if 0 in mirrors:
        mirrors.discard(0)
        mirrors.add(min(set(range(1, layers)) - mirrors))
    return sorted(mirrors)


def remove(model: nn.Module, units: list[str]) -> nn.Module:
    """Remove depth units from a diffusers UNet (or a Denoiser wrapping one) in place; returns the model.

    units: names from depth_units() of the UNREDUCED network (the model's own record of removed units is
        extended; remove() is applied once per model, on the base's numbering).
    Raises ValueError naming a unit that is not a depth unit of this model, when the model was already
    reduced, or when the mid block would lose all its ResNet layers.
    """
    net = network(model)
    if getattr(net, REMOVED_ATTR, None):
        raise ValueError("this model already had layers removed: remove() takes the unreduced base")
    known = set(depth_units(net))
    unknown = sorted(set(units) - known)
    if unknown:
        raise ValueError(f"{unknown} are not depth units of this model; its depth units are {sorted(known)}")
    units = sorted(set(units), key=depth_units(net).index)
    down: dict[int, list[int]] = {}
    for name in units:
        if m := _DOWN.fullmatch(name):
            down.setdefault(int(m[1]), []).append(int(m[2]))
        elif ".attentions." in name:
            owner, _, j = name.rpartition(".")
            net.get_submodule(owner)[int(j)] = Removed()
        else:  # mid_block.resnets.k: input and output widths are equal, so a pass-through fits
            net.mid_block.resnets[int(name.rsplit(".", 1)[1])] = Removed()
    if net.mid_block is not None and all(isinstance(r, Removed) for r in net.mid_block.resnets):
        raise ValueError("the mid block would lose all its ResNet layers: keep at least one")
    for i, layers in down.items():
        block, up = net.down_blocks[i], net.up_blocks[len(net.up_blocks) - 1 - i]
        for owner, drop in ((block, layers), (up, _up_layers_to_remove(net, i, layers))):
            for attr in ("resnets", "attentions"):
                modules = getattr(owner, attr, None)
                if isinstance(modules, nn.ModuleList):
                    setattr(owner, attr, nn.ModuleList([m for k, m in enumerate(modules) if k not in drop]))
    setattr(net, REMOVED_ATTR, list(units))
    return model

"""The router: one denoiser made of per-group experts, each called only for the timesteps of its group."""

from __future__ import annotations

import torch
from torch import nn

from .grouping import Grouping
from .models import as_denoiser
from .prediction import check_prediction_type
from .samplers import SAMPLERS

# Why a fractional timestep is refused rather than mapped: every expert is trained on the integer timesteps of
# its group only, so a t between two groups' edges (249.5 with groups [0, 250) and [250, 1000)) belongs to no
# group's training range, and rounding or truncating it would evaluate the model at another noise level than the
# loop asked for. No map is exact; the loop is told instead.
FRACTIONAL = ("diffusion timesteps here are the integer training timesteps 0..T-1 (a sigma-space loop such as "
              "Euler with Karras sigmas gives fractional ones, between the integers the models were trained at); "
              f"sample with integer timesteps: tdcdiff's samplers ({', '.join(SAMPLERS)}) or your loop's rounded")


def integer_timestep(t) -> int:
    """t as a Python int: an int, an integral float (12.0) or a one-element tensor or numpy value holding one.

    Raises ValueError for a fractional t (see FRACTIONAL), a bool, a tensor of more than one element, or anything
    that is not a number."""
    if hasattr(t, "numel") or (hasattr(t, "size") and hasattr(t, "item")):  # a tensor, a numpy array or scalar
        count = t.numel() if hasattr(t, "numel") else t.size
        if count != 1:
            raise ValueError(f"one timestep is expected here (the whole batch is at one t), got {count} values")
        t = t.item()
    if isinstance(t, bool) or not isinstance(t, (int, float)):
        raise ValueError(f"a timestep must be an integer, got {t!r}")
    if isinstance(t, float) and not t.is_integer():
        raise ValueError(f"timestep {t} is not an integer: {FRACTIONAL}")
    return int(t)


class Router(nn.Module):
    """Calls, for each (x, t), the expert of the group that holds t.

    experts: one denoiser per group, in group (timestep) order.
    grouping: the timestep groups the experts were specialised on.
    expert_flops: FLOPs of one forward pass of each expert (batch 1), for exact trajectory accounting.
    prediction_type: what the experts predict ("epsilon", "v_prediction" or "sample": their training schedule's
        prediction type; a bundle's router records it), so that sampling with a schedule of another type is
        refused; None: unknown (not checked). Raises ValueError for another value (schedule.check_prediction_type).

    A batch whose items have different t is split by group and put back in order. `samples_routed[i]`
    counts the samples expert i has processed since the last `reset_counts()`. The sampling loop, whose
    whole batch shares one t, asks `route(t, n)` for the expert instead (a table lookup, no tensor ops).
    """

    is_denoiser = True

    def __init__(self, experts: list[nn.Module], grouping: Grouping, expert_flops: list[int] | None = None, *,
                 prediction_type: str | None = None):
        super().__init__()
        if prediction_type is not None:  # a value diffusers takes: sampling's check compares it to the scheduler's
            check_prediction_type(prediction_type)
        self.prediction_type = prediction_type
        if len(experts) != len(grouping):
            raise ValueError(f"{len(experts)} experts for {len(grouping)} groups; give one expert per group")
        self.experts = nn.ModuleList(as_denoiser(e) for e in experts)
        self.grouping = grouping
        self.expert_flops = list(expert_flops) if expert_flops is not None else None
        self.register_buffer("_edges", torch.tensor(grouping.boundaries[1:-1], dtype=torch.long), persistent=False)
        self._group_at = [g.index for g in grouping.groups for _ in range(g.start, g.end)]  # t -> group
        self.samples_routed = [0] * len(experts)

    def route(self, t: int, count: int) -> int:
        """The group (= expert index) holding training timestep t, counting `count` samples sent to it.

        t: an integer (or an integral float or one-element tensor, see integer_timestep). Raises ValueError for a
        fractional t and IndexError for t outside 0..T-1."""
        t = integer_timestep(t)
        if not 0 <= t < len(self._group_at):
            raise IndexError(f"timestep {t} is outside the router's 0..{len(self._group_at) - 1}")
        group = self._group_at[t]
        self.samples_routed[group] += count
        return group

    def reset_counts(self) -> None:
        self.samples_routed = [0] * len(self.experts)

    def group_of(self, t: torch.Tensor) -> torch.Tensor:
        return torch.bucketize(t, self._edges.to(t.device), right=True)

    def forward(self, x: torch.Tensor, t: torch.Tensor, condition: torch.Tensor | None = None, *,
                with_variance: bool = False) -> torch.Tensor:
        """The experts' outputs for (x, t), each sample from the expert of its t's group.

        t: (N,) or a scalar tensor of training timesteps, integers in 0..T-1 (integral floats are taken).
        condition: each sample's condition, passed to its expert with it (see models.Denoiser): (N,) class ids for
            class-conditional experts, (N, L, width) text embeddings for text-conditional ones.
        with_variance: return a learned-variance expert's full 2C-channel output (see models.Denoiser).
        Raises ValueError for a fractional t and IndexError for t outside 0..T-1 (each would be sent to an expert
        that was not trained at it).
        """
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        if t.is_floating_point() and not bool((t == t.round()).all()):
            raise ValueError(f"timesteps {t[t != t.round()][:3].tolist()} are not integers: {FRACTIONAL}")
        if t.numel() and not (0 <= int(t.min()) and int(t.max()) < len(self._group_at)):
            raise IndexError(f"timesteps {int(t.min())}..{int(t.max())} are outside the router's "
                             f"0..{len(self._group_at) - 1}")
        groups = self.group_of(t)
        first = int(groups[0])
        if bool((groups == first).all()):  # the sampling loop's case: one t for the whole batch
            self.samples_routed[first] += x.shape[0]
            return self.experts[first](x, t, condition, with_variance=with_variance)
        outputs = {}
        for g in groups.unique().tolist():
            mask = groups == g
            self.samples_routed[g] += int(mask.sum())
            part = None if condition is None else condition[mask]
            outputs[g] = (mask, self.experts[g](x[mask], t[mask], part, with_variance=with_variance))
        some = next(iter(outputs.values()))[1]
        out = x.new_empty((x.shape[0], *some.shape[1:]))
        for mask, value in outputs.values():
            out[mask] = value.to(out.dtype)
        return out

    def trajectory_flops(self, timesteps: list[int]) -> int:
        """FLOPs one image costs along a sampling trajectory: the sum over the steps actually taken.

        timesteps: the training timesteps visited (SampleResult.visited), integers in 0..T-1 (see
        integer_timestep). Raises ValueError for a router without expert_flops, or a fractional or out-of-range t
        (no expert was trained at it, so no step of a real trajectory costs it)."""
        if self.expert_flops is None:
            raise ValueError("this router was built without expert_flops; pass them to count trajectory FLOPs")
        total = 0
        for t in timesteps:
            t = integer_timestep(t)
            if not 0 <= t < len(self._group_at):
                raise ValueError(f"timestep {t} is outside the router's 0..{len(self._group_at) - 1}: give the "
                                 "training timesteps the sampler visits (SampleResult.visited)")
            total += self.expert_flops[self._group_at[t]]
        return int(total)

"""The router: one denoiser made of per-group experts, each called only for the timesteps of its group."""

from __future__ import annotations

import torch
from torch import nn

from .grouping import Grouping
from .models import as_denoiser


class Router(nn.Module):
    """Calls, for each (x, t), the expert of the group that holds t.

    experts: one denoiser per group, in group (timestep) order.
    grouping: the timestep groups the experts were specialised on.
    expert_flops: FLOPs of one forward pass of each expert (batch 1), for exact trajectory accounting.

    A batch whose items have different t is split by group and put back in order. `samples_routed[i]`
    counts the samples expert i has processed since the last `reset_counts()`. The sampling loop, whose
    whole batch shares one t, asks `route(t, n)` for the expert instead (a table lookup, no tensor ops).
    """

    is_denoiser = True

    def __init__(self, experts: list[nn.Module], grouping: Grouping, expert_flops: list[int] | None = None):
        super().__init__()
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

        Raises IndexError for t outside 0..T-1."""
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

        condition: each sample's condition, passed to its expert with it (see models.Denoiser): (N,) class ids for
            class-conditional experts, (N, L, width) text embeddings for text-conditional ones.
        with_variance: return a learned-variance expert's full 2C-channel output (see models.Denoiser).
        """
        if t.ndim == 0:
            t = t.expand(x.shape[0])
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
        """FLOPs one image costs along a sampling trajectory: the sum over the steps actually taken."""
        if self.expert_flops is None:
            raise ValueError("this router was built without expert_flops; pass them to count trajectory FLOPs")
        groups = self.group_of(torch.as_tensor(timesteps, dtype=torch.long))
        return int(sum(self.expert_flops[g] for g in groups.tolist()))

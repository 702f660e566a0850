"""How much each timestep group suffers from pruning: the measured difficulty ordering of budget.difficulty_ranks.

Out of budget.py, which decides budgets from difficulty and never imports the pruning engine.
"""

from __future__ import annotations

import torch

from ..grouping import Grouping
from .engine import prune
from .proxy import Proxy, ProxyBatch
from .units import prunable_units, uniform_decision


@torch.no_grad()
def measure_sensitivity(
    base,
    images: torch.Tensor,
    scheduler,
    grouping: Grouping,
    sample_shape: tuple[int, int, int],
    *,
    trial_ratio: float = 0.3,
    batch_size: int = 128,
    seed: int = 0,
    labels: torch.Tensor | None = None,
    units=None,
    ignored_layers=(),
    num_heads: dict[str, int] | None = None,
) -> list[float]:
    """Relative loss increase (pruned loss / base loss - 1) of each group under one uniform trial pruning.

    Relative, not absolute: the epsilon loss is ~250x larger at small t, so absolute increases rank groups
    by their loss scale instead of by how much pruning hurts them.
    units, ignored_layers, num_heads: the decision space, as for prune.engine.prune (a run's search settings):
    the trial pruning cuts what the search will cut. Raises PruningError as prune does.
    """
    space = {"units": units, "ignored_layers": ignored_layers}
    decision = uniform_decision(prunable_units(base, **space), trial_ratio)
    pruned = prune(base, decision, sample_shape, num_heads=num_heads, **space)
    scores = []
    for i in range(len(grouping)):
        batch = ProxyBatch.make(images, grouping.timesteps(i), scheduler, size=batch_size, seed=seed + i, labels=labels)
        scores.append(Proxy(base, batch, scheduler).score(pruned) - 1.0)
    return scores

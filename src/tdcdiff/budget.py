"""Progressive FLOPs allocation: harder timestep groups get bigger denoisers.

Group of difficulty rank i (1 = easiest .. N = hardest) gets FLOPs_g(i) = (i/N + (N-i)/N * k) * F,
with F the FLOPs of the base model's forward pass and 0 < k <= 1.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .grouping import Grouping

ORDERINGS = ("measured", "snr-high-hard", "snr-low-hard")


def budget_fractions(num_groups: int, k: float) -> list[float]:
    """FLOPs fraction of the base for difficulty ranks 1..N (easiest first): i/N + (N-i)/N * k."""
    if num_groups < 1:
        raise ValueError(f"number of groups N must be >= 1, got {num_groups}")
    if not 0 < k <= 1:
        raise ValueError(f"k must be in (0, 1] (the easiest group's share grows with k), got {k}")
    n = num_groups
    return [i / n + (n - i) / n * k for i in range(1, n + 1)]


def difficulty_ranks(ordering: str, num_groups: int, sensitivity: list[float] | None = None) -> list[int]:
    """Difficulty rank (1 = easiest .. N = hardest) of each group, in group (timestep) order.

    ordering: "snr-high-hard" (small t, clean end is hardest), "snr-low-hard" (large t, noisy end is
        hardest), or "measured" (the group whose relative loss rises most under trial pruning is hardest).
    sensitivity: per-group relative loss increase, required for "measured".
    """
    if ordering not in ORDERINGS:
        raise ValueError(f"unknown difficulty ordering {ordering!r}; choose one of {ORDERINGS}")
    if ordering == "snr-low-hard":
        return list(range(1, num_groups + 1))
    if ordering == "snr-high-hard":
        return list(range(num_groups, 0, -1))
    if sensitivity is None or len(sensitivity) != num_groups:
        raise ValueError("ordering 'measured' needs one sensitivity value per group")
    order = sorted(range(num_groups), key=lambda g: (sensitivity[g], g))
    ranks = [0] * num_groups
    for rank, g in enumerate(order, start=1):
        ranks[g] = rank
    return ranks


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
) -> list[float]:
    """Relative loss increase (pruned loss / base loss - 1) of each group under one uniform trial pruning.

    Relative, not absolute: the epsilon loss is ~250x larger at small t, so absolute increases rank groups
    by their loss scale instead of by how much pruning hurts them.
    """
    from .prune.proxy import Proxy, ProxyBatch
    from .prune.engine import prune
    from .prune.units import prunable_units, uniform_decision

    pruned = prune(base, uniform_decision(prunable_units(base), trial_ratio), sample_shape)
    scores = []
    for i in range(len(grouping)):
        batch = ProxyBatch.make(images, grouping.timesteps(i), scheduler, size=batch_size, seed=seed + i)
        scores.append(Proxy(base, batch, scheduler).score(pruned) - 1.0)
    return scores


@dataclass
class Plan:
    """Groups, their difficulty and FLOPs budgets: the input of the pruning stage."""

    grouping: Grouping
    k: float
    ordering: str
    base_flops: int
    sample_shape: tuple[int, int, int]
    ranks: list[int]
    fractions: list[float]
    sensitivity: list[float] | None = None
    provenance: dict = field(default_factory=dict)

    @property
    def budgets(self) -> list[int]:
        """FLOPs budget of each group's model, in group order."""
        return [int(round(f * self.base_flops)) for f in self.fractions]

    @property
    def mean_fraction(self) -> float:
        """Timestep-weighted mean budget: what sampling costs on average, as a fraction of the base."""
        total = self.grouping.num_train_timesteps
        return sum(f * g.size / total for f, g in zip(self.fractions, self.grouping.groups))

    def to_dict(self) -> dict:
        return {
            "format": "tdcdiff-plan/1",
            "grouping": self.grouping.to_dict(),
            "k": self.k,
            "ordering": self.ordering,
            "base_flops": self.base_flops,
            "flops_convention": "2 x multiply-accumulates, one forward pass, batch 1",
            "sample_shape": list(self.sample_shape),
            "ranks": self.ranks,
            "fractions": self.fractions,
            "budgets": self.budgets,
            "mean_fraction": self.mean_fraction,
            "sensitivity": self.sensitivity,
            "provenance": self.provenance,
        }

    @classmethod
    def from_dict(cls, data: dict) -> Plan:
        if data.get("format") != "tdcdiff-plan/1":
            raise ValueError(f"not a tdcdiff plan (format {data.get('format')!r}, expected 'tdcdiff-plan/1')")
        return cls(
            Grouping.from_dict(data["grouping"]),
            data["k"],
            data["ordering"],
            data["base_flops"],
            tuple(data["sample_shape"]),
            data["ranks"],
            data["fractions"],
            data.get("sensitivity"),
            data.get("provenance", {}),
        )

    def save(self, path: str | Path) -> Path:
        from .serialization import atomic_write_text

        atomic_write_text(Path(path), json.dumps(self.to_dict(), indent=2))
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        path = Path(path)
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except FileNotFoundError:
            raise FileNotFoundError(f"no plan at {path}; run `tdcdiff plan` first") from None
        except (ValueError, KeyError) as err:
            raise ValueError(f"plan file {path} is invalid ({err}); rerun `tdcdiff plan`") from err


def make_plan(
    grouping: Grouping,
    *,
    k: float,
    ordering: str,
    base_flops: int,
    sample_shape: tuple[int, int, int],
    sensitivity: list[float] | None = None,
    provenance: dict | None = None,
) -> Plan:
    """Assign each group its FLOPs fraction from its difficulty rank."""
    fractions_by_rank = budget_fractions(len(grouping), k)
    ranks = difficulty_ranks(ordering, len(grouping), sensitivity)
    fractions = [fractions_by_rank[r - 1] for r in ranks]
    return Plan(grouping, k, ordering, base_flops, tuple(sample_shape), ranks, fractions, sensitivity, provenance or {})

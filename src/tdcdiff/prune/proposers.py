"""Proposers: each round, suggest candidate pruning decisions (unit name -> ratio of channels removed).

Candidates need not meet the FLOPs budget: the search repairs each one by scaling its ratios, so a
proposer chooses the SHAPE of a decision (which units lose more), not its overall size. With depth pruning
the units also include layers (surgery/depth.py: names with ".resnets." or ".attentions."), each 1.0 (remove)
or 0.0 (keep); the repair keeps those as proposed (undoing removals that alone undershoot the budget).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Protocol

from ..surgery.depth import is_depth_unit
from .memory import Entry, MemoryBank

Decision = dict[str, float]


@dataclass
class SearchContext:
    """What a proposer may want to know beyond the unit names (the LLM prompt uses it).

    budget_fraction: the budget as a fraction of the base model's cost (its FLOPs, or its forward time).
    unit_info: unit name -> facts about it (e.g. {"channels": 64, "flops_share": 0.31}).
    budget_unit: what the budget counts: "FLOPs" or "forward time".
    """

    budget_fraction: float
    unit_info: dict[str, dict] = field(default_factory=dict)
    budget_unit: str = "FLOPs"


class Proposer(Protocol):
    """Suggests decisions. `name` labels its entries in the memory bank.

    A proposer may also define `set_context(context: SearchContext)`, which the search calls once
    before the first round, and `last_source`, a label for the last round's entries when it is not `name`
    (the LLM proposer's rounds that fell back to another proposer).
    """

    name: str

    def propose(self, units: list[str], memory_view: list[Entry], n: int, rng: random.Random) -> list[Decision]:
        """Up to n decisions over `units`, given the entries it may see; all randomness from `rng`."""
        ...


def uniform(units: list[str], ratio: float) -> Decision:
    """The same ratio for every width unit; every layer (depth unit) kept."""
    return {u: 0.0 if is_depth_unit(u) else ratio for u in units}


@dataclass
class UniformProposer:
    """The Diff-Pruning-style baseline: one global ratio for every unit.

    After repair every candidate of this shape is the same decision, so it proposes exactly one,
    whatever n, and a search with it evaluates one candidate and stops.

    ratio: the starting ratio (any value in (0, 0.95]; the repair rescales it to the budget).
    """

    ratio: float = 0.3
    name: str = "uniform"

    def propose(self, units: list[str], memory_view: list[Entry], n: int, rng: random.Random) -> list[Decision]:
        return [uniform(units, self.ratio)]


@dataclass
class EvolutionProposer:
    """A small evolutionary local search, the default offline proposer.

    With nothing scored in memory it proposes the uniform shape (so it never does worse than the
    uniform baseline) plus random per-unit ratio vectors. Afterwards it breeds children from the
    top_k best decisions in memory: uniform crossover of two parents (probability crossover_prob)
    or a copy of one, then gaussian mutation of some units' ratios, clamped to [0, max_ratio]; a mutated
    layer (depth unit) flips between kept and removed. Random first-round candidates remove each layer
    with probability init_remove.

    top_k: how many of the best decisions in memory are parents.
    sigma: standard deviation of a mutation.
    mutate_prob: probability that a unit is mutated (at least one unit always is).
    crossover_prob: probability that a child mixes two parents instead of copying one.
    init_ratio: the ratio of the uniform candidate in the first round.
    init_max: random first-round ratios are drawn uniformly from [0, init_max].
    max_ratio: upper clamp of mutated ratios.
    init_remove: probability that a random first-round candidate removes a layer.
    """

    top_k: int = 4
    sigma: float = 0.1
    mutate_prob: float = 0.5
    crossover_prob: float = 0.5
    init_ratio: float = 0.3
    init_max: float = 0.6
    max_ratio: float = 0.9
    init_remove: float = 0.25
    name: str = "evolution"

    def propose(self, units: list[str], memory_view: list[Entry], n: int, rng: random.Random) -> list[Decision]:
        parents = [e.decision for e in MemoryBank(list(memory_view)).best(self.top_k)]
        if not parents:
            randoms = [{u: self._random(u, rng) for u in units} for _ in range(n - 1)]
            return [uniform(units, self.init_ratio)] + randoms
        return [self._child(units, parents, rng) for _ in range(n)]

    def _child(self, units: list[str], parents: list[Decision], rng: random.Random) -> Decision:
        if len(parents) >= 2 and rng.random() < self.crossover_prob:
            a, b = rng.sample(parents, 2)
            child = {u: (a if rng.random() < 0.5 else b).get(u, 0.0) for u in units}
        else:
            parent = rng.choice(parents)
            child = {u: parent.get(u, 0.0) for u in units}
        mutated = [u for u in units if rng.random() < self.mutate_prob] or [rng.choice(units)]
        for u in mutated:
            if is_depth_unit(u):
                child[u] = 1.0 - float(child[u] >= 0.5)
            else:
                child[u] = min(self.max_ratio, max(0.0, child[u] + rng.gauss(0.0, self.sigma)))
        return {u: round(r, 3) for u, r in child.items()}

    def _random(self, unit: str, rng: random.Random) -> float:
        if is_depth_unit(unit):
            return float(rng.random() < self.init_remove)
        return round(rng.uniform(0, self.init_max), 3)

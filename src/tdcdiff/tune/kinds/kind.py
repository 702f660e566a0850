"""The interface of a candidate kind: what the registry (kinds/__init__.py) holds one object of per kind."""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import ClassVar

# Kind.candidates gives each candidate an order key (a tuple); the candidate list is sorted by it, ties kept in
# registry order and then in the order the kind gives them. A candidate's index, and so its directory
# (candidates/NN-name), follows from its place: a kind added later takes a key after every existing one
# (LATER), so that tune directories made before it keep their candidates.
FIRST = (0,)  # kinds of one model each, not crossed with the TDC variants: single, uniform
LATER = (2,)  # kinds added after the TDC family; the TDC family's keys are (1, variant index, part)


class Kind(ABC):
    """One kind of tune candidate: its candidates from the settings, its checks before any work, its training,
    and its style in the frontier plot.

    name: the candidates' "kind" (in candidates.json, result.json, results.json rows and table.csv); the
        registry matches it, nowhere else does.
    style: (matplotlib color, marker) of its candidates in the frontier plot.

    `tune` below is the tune.Tune being run: its base run (tune.base_run), settings (tune.config), directory
    (tune.dir), each candidate's training compute (tune.training_flops_per_candidate()), base FLOPs
    (tune.base_flops()) and progress lines (tune.say).
    """

    name: ClassVar[str]
    style: ClassVar[tuple[str, str]]

    @abstractmethod
    def candidates(self, config) -> list[tuple[tuple, dict]]:
        """This kind's candidates under TuneConfig `config`, each (order key, spec): spec holds its "name"
        (unique across all kinds and not "base", the reference's; its directory's name is made from it) and the
        kind's parameters, which its `train` reads back. The registry adds "index", "kind" and "dir". No
        candidates: []."""

    def check(self, spec: dict, run_config) -> None:
        """Raise ValueError when candidate `spec` cannot be trained on top of the base run's RunConfig
        `run_config`: called for every candidate when a tune is opened, before stage 1 or any candidate runs.
        Nothing to check by default."""

    @abstractmethod
    def train(self, tune, spec: dict, out: Path) -> dict:
        """Train candidate `spec` into `out` (its directory, skipped there when finished: see Tune.run_candidate)
        with tune.training_flops_per_candidate() training FLOPs, and return its record for result.json:
        "bundle" (the bundle's folder under out), "train_flops", "steps" and "phases" ({"search", "stage2",
        ...}: records.since() records, None for a phase it has not). Raises prune.fit.BudgetError when the
        candidate cannot be made within the budget (it is then recorded as failed)."""

    def finished_note(self, tune, spec: dict, record: dict) -> str:
        """What to add, in parentheses, to "finished earlier, skipped" for candidate `spec`'s finished `record`
        under the current settings ("" for nothing)."""
        return ""

"""The memory bank of a pruning search: every evaluated decision with its FLOPs and proxy score."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..files import atomic_write_text


@dataclass
class Entry:
    """One evaluated candidate.

    round: search round it was proposed in (0-based).
    decision: unit name -> ratio of channels removed, or for a layer (depth unit) 1.0 removed / 0.0 kept,
        as repaired to the budget (as proposed when it failed).
    flops: measured FLOPs of the pruned model (0 when it could not be built).
    budget: the budget it was repaired to: FLOPs, or seconds when `seconds` is set.
    score: proxy score (lower is better, 1.0 = the base); None when the candidate could not be built.
    proposer: name of the proposer that suggested it.
    note: free text (e.g. the repair scale, or why it failed).
    seconds: estimated forward seconds (time budgets), else None.
    """

    round: int
    decision: dict[str, float]
    flops: int
    budget: int
    score: float | None
    proposer: str
    note: str = ""
    seconds: float | None = None

    @property
    def cost(self) -> float:
        """What the budget is counted in: estimated seconds for time budgets, else FLOPs."""
        return self.seconds if self.seconds is not None else self.flops

    @property
    def ok(self) -> bool:
        """Whether the candidate was built and scored."""
        return self.score is not None and math.isfinite(self.score)


@dataclass
class MemoryBank:
    """All candidates of a search, in the order they were evaluated.

    entries: the recorded candidates.
    enabled: False is the no-memory ablation: `view()` is empty, so the proposer starts afresh each
        round, but every entry is still recorded for the log.
    """

    entries: list[Entry] = field(default_factory=list)
    enabled: bool = True

    def add(self, entry: Entry) -> None:
        """Record one candidate."""
        self.entries.append(entry)

    def __len__(self) -> int:
        return len(self.entries)

    def view(self) -> list[Entry]:
        """What the proposer may see: every entry, or none when memory is switched off."""
        return list(self.entries) if self.enabled else []

    def best(self, k: int = 1) -> list[Entry]:
        """The k scored entries with the lowest score (earliest first among ties)."""
        return sorted((e for e in self.entries if e.ok), key=lambda e: e.score)[:k]

    def to_json(self) -> str:
        """The bank as a JSON document."""
        return json.dumps({"enabled": self.enabled, "entries": [asdict(e) for e in self.entries]}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> "MemoryBank":
        """Rebuild a bank written by `to_json`."""
        data = json.loads(text)
        return cls([Entry(**e) for e in data["entries"]], enabled=data["enabled"])

    def save(self, path: str | Path) -> Path:
        """Write the bank as JSON atomically (a reader never sees a half-written file)."""
        atomic_write_text(path, self.to_json())
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> "MemoryBank":
        """Read a bank written by `save`."""
        return cls.from_json(Path(path).read_text())

    def summary_for_prompt(self, max_entries: int = 20) -> str:
        """A compact text table for an LLM: the best `max_entries` scored candidates, best first,
        then how many failed. Ratios are rounded to 2 decimals to keep the prompt short."""
        if not self.entries:
            return "(no candidates evaluated yet)"
        lines = [
            "rank | round | proposer | cost/budget | score | decision (unit=ratio removed; layer units: 1=removed)"
        ]
        for rank, e in enumerate(self.best(max_entries), 1):
            ratios = ", ".join(f"{unit}={ratio:.2f}" for unit, ratio in e.decision.items())
            lines.append(f"{rank} | {e.round} | {e.proposer} | {e.cost / e.budget:.3f} | {e.score:.4f} | {ratios}")
        scored = sum(e.ok for e in self.entries)
        if scored > max_entries:
            lines.append(f"({scored - max_entries} worse candidates not shown)")
        if scored < len(self.entries):
            lines.append(f"({len(self.entries) - scored} candidates could not be fitted to the budget)")
        return "\n".join(lines)

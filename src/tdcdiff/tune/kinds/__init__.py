"""The registry of candidate kinds: a candidate's "kind" is looked up here (kind_of) and nowhere else, and the
candidate list is made here from every kind's candidates.

Adding a kind is one new module with one Kind subclass (kind.py) and its entry in KINDS below: see "Adding a
candidate kind" in docs/architecture.md.
"""

from __future__ import annotations

from pathlib import Path

from ...evaluate import slug
from .kind import Kind
from .single import Single
from .tdc import TIME_BUDGET_K, Tdc
from .tdc_curves import TdcCurves
from .uniform import Uniform

KINDS: dict[str, Kind] = {kind.name: kind for kind in (Single(), Uniform(), Tdc(), TdcCurves())}


def kind_of(kind: str) -> Kind:
    """The registered Kind named `kind` (a candidate's "kind"). Raises ValueError naming the known kinds for any
    other name: an unknown kind is never given a default."""
    if kind not in KINDS:
        raise ValueError(f"unknown candidate kind {kind!r}; the known kinds are {', '.join(KINDS)} (a candidate list "
                         "or result written by another version of tdcdiff? tune it in a new --out)")
    return KINDS[kind]


def candidate_list(config) -> list[dict]:
    """The candidates of TuneConfig `config`, in order (see kind.py's order keys): the base fine-tuned
    ("single"), each uniform width (FLOPs, then time), then per TDC variant (with and without depth pruning when
    config.depth) its k grid, the grid's curves twins (config.curves) and its time budgets.

    Returns dicts with index, name, kind (a key of KINDS), the kind's parameters (Kind.candidates) and dir (the
    candidate's directory, relative to the tune directory). Raises ValueError when two candidates share a name
    or one is named "base" (the reference's): measurements are kept by name.
    """
    keyed = [(order, kind.name, spec) for kind in KINDS.values() for order, spec in kind.candidates(config)]
    names = [spec["name"] for _, _, spec in keyed]
    if "base" in names or len(set(names)) < len(names):
        raise ValueError(f"candidate names must be unique and not 'base' (the base's), got {names}")
    keyed.sort(key=lambda item: item[0])  # stable: ties stay in registry order, then in the kind's order
    return [{"index": i, "name": spec["name"], "kind": kind, **spec, "dir": f"candidates/{i:02d}-{slug(spec['name'])}"}
            for i, (_, kind, spec) in enumerate(keyed)]


def check_candidate(index: int, candidates: list[dict], path: Path) -> None:
    """Raise ValueError unless `index` names one of `candidates` (the candidate list of the settings given, saved at
    `path` once a tune has started there; the message names the file only when it exists)."""
    if not 0 <= index < len(candidates):
        where = f"the plan in {path} has" if path.exists() else "the settings given plan"
        raise ValueError(f"--candidate must be between 0 and {len(candidates) - 1} ({where} {len(candidates)}), "
                         f"got {index}")


__all__ = ["KINDS", "TIME_BUDGET_K", "Kind", "candidate_list", "check_candidate", "kind_of"]

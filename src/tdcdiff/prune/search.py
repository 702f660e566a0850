"""Proxy-based pruning as multi-round decision making: propose -> repair to budget -> prune -> score -> remember.

Each round the proposer sees the memory bank of every candidate so far (unless memory is off, the
ablation), proposes decisions, and each is repaired to the budget (FLOPs, or forward time estimated from a
latency table) by real structural pruning, scored by the proxy and recorded. After the last round the
best-scoring pruned model wins. With `depth` the decisions also keep or remove whole layers (surgery/depth.py).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from ..flops import count_flops, flops_by_module
from ..models import as_denoiser, network
from ..progress import progress_bar
from ..settings import SEED, Rule, Settings, at_least, at_most, between, one_of, setting
from ..surgery.depth import depth_units
from .fit import BudgetError, FitResult, fit_to_budget
from .importance import IMPORTANCES, get_importance
from .llm import LLMProposer
from .memory import Entry, MemoryBank
from .proposers import Decision, EvolutionProposer, Proposer, SearchContext, UniformProposer
from .proxy import SPACES, Proxy, Scorer
from .units import prunable_units, uniform_decision

log = logging.getLogger("tdcdiff")


PROPOSERS = {"evolution": EvolutionProposer, "uniform": UniformProposer, "llm": LLMProposer}
# Each candidate is pruned and scored by the proxy (forward passes on a batch, seconds each) and kept in the memory
# bank: 256 rounds of 256 is 65,536 candidates per group, days of search; 10^8 filled memory before the first score.
MAX_ROUNDS = 256
MAX_CANDIDATES_PER_ROUND = 256


@dataclass(frozen=True)
class _Count(Rule):
    """An integer count in [1, maximum], its message saying which bound it misses and, above, why the ceiling."""

    maximum: int = 1
    reason: str = ""

    def message(self, name: str, value, field_name: str) -> str:
        if value >= 1:
            return f"{name} must be at most {self.maximum} ({self.reason}), got {value}"
        return super().message(name, value, field_name)


def _count(maximum: int, reason: str) -> _Count:
    low, high = at_least(1), at_most(maximum)  # numbers only: a value of another type is the type check's
    return _Count(lambda v: low.ok(v) and high.ok(v), low.expectation, maximum=maximum, reason=reason)


def get_proposer(name: str, **kwargs) -> Proposer:
    """A proposer by name.

    name: "evolution" (default offline), "uniform" (baseline) or "llm" (OpenAI-compatible chat API).
    kwargs: passed to the proposer's constructor.
    """
    if name not in PROPOSERS:
        raise ValueError(f"unknown proposer {name!r}; choose one of {tuple(PROPOSERS)}")
    return PROPOSERS[name](**kwargs)


@dataclass
class SearchConfig(Settings):
    """Settings of one pruning search.

    rounds: proposal rounds (R in the paper), 1 to MAX_ROUNDS.
    candidates_per_round: decisions asked of the proposer each round, 1 to MAX_CANDIDATES_PER_ROUND.
    proposer: "evolution" (default, offline), "uniform" (the Diff-Pruning-style baseline) or "llm".
    memory: show the proposer the memory bank of past candidates (False: the no-memory ablation).
    importance: which channels go within a layer: "magnitude" or "taylor" (gradients on the group's timesteps).
    proxy_space, proxy_finetune_steps: what the Proxy passed to `search` must be built with
        (`Proxy(..., space=proxy_space, finetune_steps=proxy_finetune_steps)`); checked, not applied.
    tolerance: the measured FLOPs of every candidate must be within this fraction of the budget.
    seed: seed of the proposer's randomness (and of Taylor calibration).
    units: the decision space declared instead of found: unit name -> list of module names (see
        units.prunable_units; a callable works with prune / fit_to_budget directly).
    ignored_layers: module names whose layers keep their widths.
    num_heads: attention module name -> heads, for attention whose heads the module does not reveal.
    depth: decisions also keep or remove whole ResNet layers and attention blocks (surgery/depth.py).
    """

    rounds: int = setting(4, rule=_count(MAX_ROUNDS, "each round's candidates are pruned and scored, seconds each"))
    candidates_per_round: int = setting(4, rule=_count(
        MAX_CANDIDATES_PER_ROUND, "each candidate is pruned and scored, seconds each, and kept in memory"))
    proposer: str = setting("evolution", rule=one_of(PROPOSERS, what="proposer"))
    memory: bool = True
    importance: str = setting("magnitude", rule=one_of(IMPORTANCES, what="importance"))
    proxy_space: str = setting("relative", rule=one_of(SPACES, what="proxy_space"))
    proxy_finetune_steps: int = setting(0, rule=at_least(0))
    tolerance: float = setting(0.03, rule=between("(0, 1)", typical="typical: 0.03"))
    seed: int = setting(0, rule=SEED)
    units: dict[str, list[str]] | None = setting(None, rule=Rule(
        lambda v: v is None or isinstance(v, dict) and all(isinstance(m, list) and all(isinstance(n, str) for n in m)
                                                           for m in v.values()),
        "must map unit names to lists of module names"))
    ignored_layers: list[str] = setting(factory=list, rule=Rule(
        lambda v: isinstance(v, list) and all(isinstance(m, str) for m in v), "must be a list of module names"))
    num_heads: dict[str, int] | None = setting(None, rule=Rule(
        lambda v: v is None or isinstance(v, dict) and all(isinstance(n, int) and n > 0 for n in v.values()),
        "must map attention module names to positive head counts"))
    depth: bool = False

    def space(self) -> dict:
        """The decision space these settings declare (units, ignored_layers, num_heads), as keyword arguments
        of prune, fit_to_budget, uniform_fit and the latency table."""
        return {"units": self.units, "ignored_layers": tuple(self.ignored_layers), "num_heads": self.num_heads}


@dataclass
class SearchResult:
    """The winner of a search.

    model: the pruned model (a structurally smaller copy of the base); decision: its repaired decision;
    flops: its measured FLOPs; score: its proxy score (1.0 = the base); memory: every candidate evaluated;
    budget: the budget searched for (FLOPs, or seconds with a latency table); seconds: the table's estimate
    of its forward time (None without a table).
    """

    model: nn.Module
    decision: Decision
    flops: int
    score: float
    memory: MemoryBank
    budget: float
    seconds: float | None = None


def _key(decision: Decision) -> tuple:
    return tuple(sorted((unit, round(float(ratio), 3)) for unit, ratio in decision.items()))


def _architecture(model: nn.Module) -> tuple:
    # Pruning keeps whole channels per norm group, so nearby ratios often give the very same model; the
    # same decision (to 3 decimals) always does. Equal layer shapes = equal pruned model = equal score.
    return tuple((name, tuple(p.shape)) for name, p in model.named_parameters())


def _check_proxy(proxy: Scorer, config: SearchConfig) -> None:
    if get_importance(config.importance).needs_calibration and not hasattr(proxy, "calibration"):
        raise ValueError(f"importance={config.importance!r} needs a Proxy: its images and timesteps calibrate the "
                         "importance")
    # The config is what gets logged with the run, so it must describe the proxy actually used.
    settings = (config.proxy_space, config.proxy_finetune_steps)
    if isinstance(proxy, Proxy) and (proxy.space, proxy.finetune_steps) != settings:
        raise ValueError(
            f"the proxy scores in space {proxy.space!r} after {proxy.finetune_steps} fine-tuning steps but the config "
            f"says {config.proxy_space!r} and {config.proxy_finetune_steps}; build the Proxy from the config's settings"
        )


@torch.no_grad()
def describe_units(base: nn.Module, units, sample_shape: tuple[int, ...]) -> dict[str, dict]:
    """Per unit: its widest layer's output channels and its layers' share of the base's FLOPs (for the LLM prompt).

    base: the unpruned model; units: its units.Unit objects; sample_shape: (C, H, W) of one sample.
    """
    denoiser = as_denoiser(base)
    flops = flops_by_module(denoiser, sample_shape)
    total = flops.get("Global", 0) or 1
    info = {}
    for unit in units:  # unit.modules are conv/linear layers, named relative to the wrapped network
        layers = [denoiser.model.get_submodule(name) for name in unit.modules]
        info[unit.name] = {
            "channels": max(getattr(m, "out_channels", getattr(m, "out_features", 0)) for m in layers),
            "flops_share": round(sum(flops.get(f"Denoiser.model.{name}", 0) for name in unit.modules) / total, 3),
        }
    return info


def _context(base: nn.Module, units, layers: list[str], sample_shape: tuple[int, ...], latency,
             share: float) -> SearchContext:
    """What a proposer that takes context is told: each unit's size and share of the cost, and the budget's share."""
    info = describe_units(base, units, sample_shape)
    for name in layers:  # what removing one layer saves, where the latency table says
        saved = -latency.delta(name, 1.0) / latency.base_seconds if latency is not None else None
        info[name] = {"kind": "layer"} | ({"time_share": round(saved, 3)} if saved is not None else {})
    return SearchContext(share, info, "forward time" if latency is not None else "FLOPs")


class _Trials:
    """Repairs, prunes and scores proposals (fit_to_budget, then the proxy), skipping repeats: a decision
    proposed before (to 3 decimals), or one repaired to the layer widths of a model already scored."""

    def __init__(self, base: nn.Module, budget: float, sample_shape: tuple[int, ...], proxy: Scorer,
                 config: SearchConfig, latency):
        self.base, self.budget, self.sample_shape, self.proxy = base, budget, sample_shape, proxy
        self.config, self.latency = config, latency
        needs_calibration = get_importance(config.importance).needs_calibration
        self.calibration = proxy.calibration(config.seed) if needs_calibration else None
        self.proposed, self.evaluated = set(), set()

    def __call__(self, decision: Decision, round_: int, source: str) -> tuple[Entry, FitResult | None] | None:
        """(entry, fit) of one proposal (fit None when it could not be fitted), or None when it is a repeat."""
        if _key(decision) in self.proposed:
            return None
        self.proposed.add(_key(decision))
        config = self.config
        try:
            fit = fit_to_budget(
                self.base, decision, self.budget, self.sample_shape, tolerance=config.tolerance,
                importance=config.importance, calibration=self.calibration, units=config.units,
                ignored_layers=config.ignored_layers, num_heads=config.num_heads, latency=self.latency,
            )
        except BudgetError as err:
            return Entry(round_, dict(decision), 0, self.budget, None, source, f"not fitted: {err}"), None
        if _architecture(fit.model) in self.evaluated:  # another proposal repaired to the same model
            return None
        self.evaluated.add(_architecture(fit.model))
        score = float(self.proxy.score(fit.model))
        note = f"repair scale {fit.scale:.3f}"
        if not math.isfinite(score):
            score, note = None, f"{note}; proxy score was {score}"
        return Entry(round_, dict(fit.decision), fit.flops, self.budget, score, source, note, fit.seconds), fit


def _rounds(proposer: Proposer, names: list[str], trials: _Trials, memory: MemoryBank, config: SearchConfig,
            progress: bool, log_path: str | Path | None) -> tuple[FitResult | None, float]:
    """Propose, evaluate and remember for config.rounds rounds (fewer if a round brings nothing new): the best
    fit and its score, or (None, inf) when no candidate fitted with a finite score."""
    rng = random.Random(config.seed)
    n = config.candidates_per_round
    best, best_score = None, math.inf
    log_file = open(log_path, "w") if log_path else None  # a restarted search starts its log over
    bar = progress_bar(total=config.rounds * n, desc="prune search", enabled=progress)
    try:
        for round_ in range(config.rounds):
            new = 0
            decisions = proposer.propose(names, memory.view(), n, rng)[:n]
            source = getattr(proposer, "last_source", proposer.name)
            for decision in decisions:
                bar.update(1)
                outcome = trials(decision, round_, source)
                if outcome is None:
                    continue
                entry, fit = outcome
                memory.add(entry)
                new += 1
                if log_file:
                    log_file.write(json.dumps(asdict(entry)) + "\n")
                    log_file.flush()
                if entry.ok and entry.score < best_score:
                    best, best_score = fit, entry.score
                    bar.set_postfix(best=f"{best_score:.4f}")
            if not new:
                # Nothing left to try (e.g. the uniform proposer after its one candidate): stop, don't idle.
                log.info("prune search: %s proposed nothing new in round %d; stopping", proposer.name, round_)
                break
    finally:
        bar.close()
        if log_file:
            log_file.close()
    return best, best_score


def search(
    base: nn.Module,
    budget_flops: int,
    sample_shape: tuple[int, ...],
    proxy: Scorer,
    config: SearchConfig,
    *,
    proposer: Proposer | None = None,
    progress: bool = True,
    log_path: str | Path | None = None,
    latency=None,
) -> SearchResult:
    """Find a pruned model of `base` within the budget that the proxy scores best.

    base: the unpruned model (diffusers UNet2DModel); never modified.
    budget_flops: FLOPs (2 x MACs, one sample) the pruned model may use; >= the base's returns an unpruned copy.
    sample_shape: (C, H, W) of one sample, for measuring FLOPs.
    proxy: scores a pruned model (lower is better); a Proxy must match config.proxy_space / proxy_finetune_steps.
    config: SearchConfig.
    proposer: a proposer object to use instead of `config.proposer` (e.g. an LLMProposer with settings).
    progress: show a progress bar over candidates.
    log_path: append one JSON line per evaluated candidate to this file.
    latency: a latency.LatencyTable of base (prune.fit.measure_latency_table): budget_flops is then the
        seconds of one forward at the table's batch, estimated from the table.

    A proposal already tried is skipped, and so is one whose repaired model has the same layer widths as
    a model already scored (always so for the same repaired decision to 3 decimals); a round that brings
    nothing new ends the search early. Same seed, same result.
    Raises ValueError for a bad config, budget or proxy; BudgetError when no candidate fits the budget.
    """
    config.validate()
    _check_proxy(proxy, config)
    if budget_flops <= 0:
        raise ValueError(f"budget_flops must be > 0, got {budget_flops}")
    sample_shape = tuple(sample_shape)
    units = prunable_units(base, units=config.units, ignored_layers=config.ignored_layers)
    if config.depth and config.units is not None:
        raise ValueError("depth pruning renumbers the layers a declared decision space names: use depth=False "
                         "with units, or the found decision space (units=None) with depth")
    layers = depth_units(network(base)) if config.depth else []
    memory = MemoryBank(enabled=config.memory)
    base_flops = count_flops(as_denoiser(base), sample_shape)
    base_cost = latency.base_seconds if latency is not None else base_flops
    if budget_flops >= base_cost:
        return SearchResult(copy.deepcopy(base), uniform_decision(units, 0.0), base_flops, 1.0, memory, budget_flops,
                            base_cost if latency is not None else None)

    proposer = proposer or get_proposer(config.proposer)
    if hasattr(proposer, "set_context"):
        proposer.set_context(_context(base, units, layers, sample_shape, latency, budget_flops / base_cost))
    trials = _Trials(base, budget_flops, sample_shape, proxy, config, latency)
    names = [u.name for u in units] + layers
    best, best_score = _rounds(proposer, names, trials, memory, config, progress, log_path)
    if best is None:
        raise BudgetError(
            f"none of the {len(memory)} candidates could be pruned to the budget of {budget_flops:.4g} "
            f"{'seconds' if latency is not None else 'FLOPs'} ({budget_flops / base_cost:.3f} of the base) with a "
            "finite proxy score; give the group a larger budget (raise --k or --mean-budget)"
        )
    return SearchResult(best.model, best.decision, best.flops, best_score, memory, budget_flops, best.seconds)

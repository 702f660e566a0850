"""Split the T training timesteps into N contiguous groups (adjacent timesteps are the most similar tasks)."""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass

import numpy as np
import torch

from .schedule import snr_db
from .settings import as_integer

STRATEGIES = ("snr", "uniform", "loss")


@dataclass(frozen=True)
class Group:
    """Timesteps [start, end) of one group and the SNR range they span: SNR-dB at start and at end - 1, within
    the schedule's finite levels (see `finite_snr_db`), so a written grouping is valid JSON."""

    index: int
    start: int
    end: int
    snr_db_start: float
    snr_db_end: float

    @property
    def size(self) -> int:
        return self.end - self.start


@dataclass
class Grouping:
    """N contiguous groups covering 0..T-1; `boundaries` are the N+1 edges (0 first, T last)."""

    strategy: str
    num_train_timesteps: int
    boundaries: list[int]
    groups: list[Group]

    def __len__(self) -> int:
        return len(self.groups)

    def group_of(self, t: torch.Tensor) -> torch.Tensor:
        """Index of the group holding each timestep in t."""
        edges = torch.as_tensor(self.boundaries[1:-1], device=t.device)
        return torch.bucketize(t, edges, right=True)

    def timesteps(self, index: int) -> torch.Tensor:
        group = self.groups[index]
        return torch.arange(group.start, group.end)

    def to_dict(self) -> dict:
        return {
            "strategy": self.strategy,
            "num_train_timesteps": self.num_train_timesteps,
            "boundaries": self.boundaries,
            "groups": [asdict(g) | {"size": g.size} for g in self.groups],
        }

    @classmethod
    def from_dict(cls, data: dict) -> Grouping:
        """Inverse of to_dict, for files from outside: raises ValueError naming the key (e.g.
        'grouping.boundaries') unless the data describe N >= 1 contiguous groups, boundaries rising strictly
        from 0 to T, and one group entry per pair of boundaries.
        """
        def is_int(value) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        if not isinstance(data, dict):
            raise ValueError(f"'grouping' must be a mapping, got {type(data).__name__}")
        num_train, edges = data.get("num_train_timesteps"), data.get("boundaries")
        if not is_int(num_train) or num_train < 1:
            raise ValueError(f"'grouping.num_train_timesteps' must be a positive integer T, got {num_train!r}")
        if (not isinstance(edges, list) or len(edges) < 2 or not all(map(is_int, edges)) or edges[0] != 0
                or edges[-1] != num_train or any(a >= b for a, b in zip(edges, edges[1:]))):
            raise ValueError(
                f"'grouping.boundaries' must be integers rising strictly from 0 to T={num_train} (the N+1 edges "
                f"of N groups), got {str(edges)[:200]}"
            )
        if not isinstance(data.get("strategy"), str):
            raise ValueError(f"'grouping.strategy' must be a string, got {data.get('strategy')!r}")
        entries = data.get("groups")
        fields = [f.name for f in dataclasses.fields(Group)]
        expected = [(i, s, e) for i, (s, e) in enumerate(zip(edges, edges[1:]))]
        if (not isinstance(entries, list) or not all(isinstance(g, dict) and set(fields) <= g.keys() for g in entries)
                or [(g["index"], g["start"], g["end"]) for g in entries] != expected
                or not all(is_int(g[k]) for g in entries for k in ("index", "start", "end"))
                or not all(isinstance(g[k], (int, float)) for g in entries for k in ("snr_db_start", "snr_db_end"))):
            raise ValueError(
                f"'grouping.groups' must hold one entry {{{', '.join(fields)}}} per group, with index, start and "
                f"end following 'grouping.boundaries' ({len(expected)} groups)"
            )
        groups = [Group(**{k: g[k] for k in fields}) for g in entries]
        return cls(data["strategy"], num_train, list(edges), groups)


def _enforce_min_size(boundaries: list[int], min_size: int) -> list[int]:
    b = list(boundaries)
    for i in range(1, len(b) - 1):
        b[i] = max(b[i], b[i - 1] + min_size)
    for i in range(len(b) - 2, 0, -1):
        b[i] = min(b[i], b[i + 1] - min_size)
    return b


def finite_snr_db(scheduler) -> np.ndarray:
    """SNR-dB at t = 0..T-1, (T,) float64, with infinite levels clipped to the nearest finite one.

    A zero-terminal-SNR schedule (diffusers' rescale_betas_zero_snr, Lin et al. 2024) has alpha_bar = 0 at
    t=T-1: SNR 0, -inf dB. Equal-width levels down to -inf would be NaN and -inf, putting most timesteps in one
    group; clipped, t=T-1 counts as the last finite level. Raises ValueError if no level is finite.
    """
    levels = snr_db(scheduler, torch.arange(scheduler.config.num_train_timesteps)).numpy()
    finite = levels[np.isfinite(levels)]
    if not len(finite):
        raise ValueError("the noise schedule has no timestep with a finite SNR (alpha_bar strictly between 0 and 1); "
                         "check its betas")
    return np.clip(levels, finite.min(), finite.max())


def _snr_boundaries(levels_db: np.ndarray, num_groups: int) -> list[int]:
    # SNR-dB falls monotonically with t: cut where it crosses equally spaced levels.
    targets = np.linspace(levels_db[0], levels_db[-1], num_groups + 1)[1:-1]
    inner = [int(np.searchsorted(-levels_db, -target)) for target in targets]
    return [0, *inner, len(levels_db)]


def _loss_boundaries(loss_per_t: np.ndarray, num_groups: int, min_size: int) -> list[int]:
    """Optimal contiguous segmentation minimising within-group variance of log-loss (dynamic programming)."""
    values = np.log(np.maximum(loss_per_t, 1e-12))
    size = len(values)
    prefix = np.concatenate([[0.0], np.cumsum(values)])
    prefix_sq = np.concatenate([[0.0], np.cumsum(values**2)])

    def cost(start, end):  # vectorised over `start`
        n = end - start
        s = prefix[end] - prefix[start]
        return prefix_sq[end] - prefix_sq[start] - s * s / n

    best = np.full((num_groups + 1, size + 1), np.inf)
    cut = np.zeros((num_groups + 1, size + 1), dtype=int)
    best[0, 0] = 0.0
    for g in range(1, num_groups + 1):
        for end in range(g * min_size, size + 1):
            starts = np.arange((g - 1) * min_size, end - min_size + 1)
            total = best[g - 1, starts] + cost(starts, end)
            j = int(np.argmin(total))
            best[g, end], cut[g, end] = total[j], starts[j]
    boundaries = [size]
    for g in range(num_groups, 0, -1):
        boundaries.append(int(cut[g, boundaries[-1]]))
    return boundaries[::-1]


def make_groups(
    strategy: str,
    num_groups: int,
    scheduler,
    *,
    min_size: int | None = None,
    loss_per_t: np.ndarray | None = None,
) -> Grouping:
    """Split timesteps 0..T-1 into `num_groups` contiguous groups.

    strategy: "snr" (equal width in SNR-dB), "uniform" (equal counts) or "loss" (dynamic programming on the
        base model's per-timestep loss, so timesteps within a group behave alike; needs loss_per_t).
    num_groups: N, between 1 and T.
    scheduler: the training noise schedule (gives T and the SNR curve).
    min_size: the fewest timesteps a group may have (default T // (4N)), so the cosine schedule's extreme
        tail does not leave near-empty groups.
    loss_per_t: array of T per-timestep losses, for strategy "loss" (see `per_timestep_loss`).
    Raises ValueError for an unknown strategy, an N or min_size that is not an integer (numpy's are taken) or out of
    range, or loss_per_t of another length or holding NaN/inf.
    """
    num_train = scheduler.config.num_train_timesteps
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown grouping strategy {strategy!r}; choose one of {STRATEGIES}")
    num_groups = as_integer("number of groups N", num_groups)
    if not 1 <= num_groups <= num_train:
        raise ValueError(f"number of groups N must be between 1 and T={num_train}, got {num_groups}")
    if min_size is not None:
        min_size = as_integer("min_size", min_size, 1, note="the fewest timesteps a group may have")
    min_size = max(1, num_train // (4 * num_groups)) if min_size is None else min_size
    if min_size * num_groups > num_train:
        raise ValueError(
            f"min_size {min_size} x {num_groups} groups exceeds T={num_train}; lower min_size or the number of groups"
        )
    levels = finite_snr_db(scheduler)
    if strategy == "uniform":
        boundaries = [round(i * num_train / num_groups) for i in range(num_groups + 1)]
    elif strategy == "snr":
        boundaries = _snr_boundaries(levels, num_groups)
    else:
        if loss_per_t is None or len(loss_per_t) != num_train:
            raise ValueError(f"strategy 'loss' needs loss_per_t with one value per timestep (T={num_train})")
        losses = np.asarray(loss_per_t, dtype=np.float64)
        if not np.isfinite(losses).all():
            bad = np.flatnonzero(~np.isfinite(losses))
            raise ValueError(f"loss_per_t holds NaN/inf at {len(bad)} timestep(s) (first: t={bad[0]}); measure the "
                             "base model's per-timestep loss again (per_timestep_loss) with a finite model")
        boundaries = _loss_boundaries(losses, num_groups, min_size)
    return grouping_of(strategy, _enforce_min_size(boundaries, min_size), scheduler)


def grouping_of(strategy: str, boundaries: list[int], scheduler) -> Grouping:
    """The Grouping of `strategy` with these boundaries (N+1 edges from 0 to T, rising) over scheduler's timesteps:
    each group's SNR range from the schedule's finite SNR-dB levels (finite_snr_db)."""
    levels = finite_snr_db(scheduler)
    edges = zip(boundaries, boundaries[1:])
    groups = [Group(i, s, e, float(levels[s]), float(levels[e - 1])) for i, (s, e) in enumerate(edges)]
    return Grouping(strategy, scheduler.config.num_train_timesteps, list(boundaries), groups)

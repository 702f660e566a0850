"""Quality curves: how much of a screening measure each timestep group loses when its model is pruned, measured
at a few sizes per group, and the groups' budgets a "TDC curves" candidate gets from them
(budget.allocate_from_curves).

The functions taking `tune` read its directory, base run and settings (tune.dir, tune.base_run, tune.config,
tune.say, tune.progress, tune.base_flops): see tune.Tune.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from ..budget import allocate_from_curves, curve_loss, make_plan
from ..evaluate import BPD_SAMPLES, HELD_OUT_IMAGES, slug
from ..files import atomic_write_text
from ..flops import count_flops
from ..grouping import Grouping
from ..likelihood import nll_bound
from ..prune.fit import BudgetError, uniform_fit
from ..run import Run, apply_overrides, copy_stages
from ..serialization import load_model, save_model
from ..train import FINAL_DIR, train
from .judge import paired
from .measures import SCREENING_MEASURES, held_out_losses
from .records import clock, is_number, measurement_cache, numbers_problem, since

CURVES_FORMAT = "tdcdiff-tune-curves/2"
# What a quality curve's point is in each measure (measure_curves), by key of SCREENING_MEASURES.
CURVE_MEASURES = {
    "loss": "the group's share of the held-out denoising loss (tune.loss_shares, on the loss screening measure's "
            "images, timesteps and noise) minus the base's, paired per image",
    "bpd": "the group's share of the held-out bits/dim bound (likelihood.nll_bound, on the bits/dim screening "
           "measure's images and noise) minus the base's, paired per image",
}
CURVE_OBJECTIVES = {  # what a curves candidate's allocation minimises, given the curves of one measure
    "share": "sum over groups of {measure}",
    "relative": "sum over groups of the group's share of the timesteps times its share as a multiple of the base's "
                "({measure}, plus the base's share, over the base's share)",
}


def loss_shares(points, losses: torch.Tensor, grouping) -> torch.Tensor:
    """Each timestep group's share of the held-out loss, per image: a float64 tensor [M, N] (M images, N groups)
    from `losses` [P, M] at the measured timesteps `points` [P] (held_out_losses), over grouping.Grouping `grouping`.

    A group's share is the sum of its measured timesteps' losses divided by P: its part of the all-point mean that
    the loss screening measure takes. So one model's shares add up over groups to its per-image screening value,
    and so do the shares of one model per group, as a TDC router runs them (a timestep goes to the group holding
    it): additive across groups, as budget.allocate_from_curves needs. A group holding no measured timestep (one
    narrower than the points' spacing, about T / LOSS_TIMESTEPS) is one the screening value does not see; lest its
    budget count as free, it takes the loss at the measured timestep nearest its middle, weighted by its share of
    the T timesteps (size / T), and the shares then add up to that much more than the screening value.
    """
    points, losses = torch.as_tensor(points), losses.double()
    columns = []
    for group in grouping.groups:
        inside = (points >= group.start) & (points < group.end)
        if inside.any():
            columns.append(losses[inside].sum(0) / len(points))
        else:
            nearest = (points.double() - (group.start + group.end - 1) / 2).abs().argmin()
            columns.append(losses[nearest] * group.size / grouping.num_train_timesteps)
    return torch.stack(columns, 1)



def curve_objective_points(curves: dict, weights: list[float], objective: str) -> list[list[tuple[float, float]]]:
    """Per group, (fraction, value to minimise) at each measured size of curves (measure_curves' dict) under
    `objective` (CURVE_OBJECTIVES): "share", the point's change in the group's share; "relative", the group's
    timestep weight times its share over the base's ((loss + base) / base). weights: each group's share of the T
    timesteps. Raises ValueError for "relative" when a base share is not positive (both measures' shares are:
    loss_shares gives a group between measured timesteps its nearest one's loss)."""
    if objective == "share":
        return [[(p["fraction"], p["loss"]) for p in group] for group in curves["points"]]
    if any(base <= 0 for base in curves["base_shares"]):
        raise ValueError(f"the relative curve objective divides by the base's share per group, got "
                         f"{curves['base_shares']}; use --curve-objective share")
    return [[(p["fraction"], weight * (p["loss"] + base) / base) for p in group]
            for group, base, weight in zip(curves["points"], curves["base_shares"], weights)]


def _upgraded(curves: dict) -> dict:
    """curves.json as the current format holds it: one from before the loss was measured (no "format"; bits/dim in
    "loss", "se", "share" and "base_shares") gets those under the bits/dim names; the loss is then missing."""
    if curves.get("format") == CURVES_FORMAT:
        return curves
    points = [[{**p, "bpd_gap": {"mean": p["loss"], "se": p["se"]}, "bpd_share": p["share"]} for p in group]
              for group in curves["points"]]
    return {**curves, "format": CURVES_FORMAT, "measures": ["bpd"], "points": points,
            "base_bpd_shares": curves["base_shares"]}


def _curves_for(curves: dict, key: str) -> dict:
    """curves (current format) with measure `key` (of SCREENING_MEASURES, measured) in "loss", "se" and "share" of
    every point and in "base_shares", named in "measure" and described in "loss"."""
    points = [[{**p, "loss": p[f"{key}_gap"]["mean"], "se": p[f"{key}_gap"]["se"], "share": p[f"{key}_share"]}
               for p in group] for group in curves["points"]]
    return {**curves, "measure": key, "points": points, "base_shares": curves[f"base_{key}_shares"],
            "loss": f"{CURVE_MEASURES[key]}, after curve_steps stage-2 steps on the group's timesteps"}


def curves_allocation(tune, spec: dict) -> tuple[dict, dict]:
    """The groups' budgets of "tdc-curves" candidate `spec` at the mean budget of the paper's formula for the
    same k, N and grouping (scaled to the variant's mean_budget where it sets one), split by the quality
    curves of the screening measure (TuneConfig.screening; measure_curves, measured when not cached):
    budget.allocate_from_curves.

    Returns (curves, allocations): measure_curves' dict, and {"budget", "paper": {"fractions",
    "mean_fraction", "curve_loss"}, "curves": the same for the curves' split, "measure" (the screening key),
    "loss" (what curve_loss sums)}; each allocation priced on the curves (curve_loss; None with
    "curve_loss_missing" when a paper fraction lies outside the measured sizes).
    """
    c = apply_overrides(tune.base_run.config, spec["settings"])
    curves = measure_curves(tune, c.groups, c.grouping)
    grouping = Grouping.from_dict(curves["grouping"])
    paper = make_plan(grouping, k=c.k, ordering=c.ordering, base_flops=tune.base_flops(),
                      sample_shape=tune.base_run.sample_shape, sensitivity=curves["sensitivity"],
                      mean_budget=c.mean_budget)
    weights = [g.size / grouping.num_train_timesteps for g in grouping.groups]
    objective = spec.get("objective", "share")
    points = curve_objective_points(curves, weights, objective)
    chosen = allocate_from_curves(points, weights, paper.mean_fraction)
    try:
        paper_loss, why = curve_loss(points, paper.fractions), None
    except ValueError as err:  # a paper fraction outside the measured sizes
        paper_loss, why = None, str(err)
    return curves, {
        "budget": paper.mean_fraction,
        "paper": {"fractions": paper.fractions, "mean_fraction": paper.mean_fraction, "curve_loss": paper_loss,
                  **({"curve_loss_missing": why} if why else {})},
        "curves": {"fractions": chosen.fractions, "mean_fraction": chosen.mean_fraction, "curve_loss": chosen.loss},
        "measure": curves["measure"],
        "objective": objective,
        "loss": CURVE_OBJECTIVES[objective].format(measure=CURVE_MEASURES[curves["measure"]])
                + " (interpolated between measured sizes for the paper's fractions)",
    }


def measure_curves(tune, groups: int, grouping: str) -> dict:
    """Quality against size per timestep group, for the `groups` groups of `grouping`, in both screening
    measures; cached in curves/N{groups}-{grouping}/curves.json (the pruned sizes in curves/sizes/, shared).

    For each size in TuneConfig.curve_sizes (fraction of the base's FLOPs; uniform pruning as the uniform
    candidates get, 1.0 = the base) and each group, the model is trained curve_steps stage-2 steps on the
    group's timesteps (the expert: curves/.../train/size-{size}-group-{g}/final). Its quality there is its
    group's share of each screening measure minus the base's share, paired per image (same images,
    timesteps and noise as the screening): "loss" (loss_shares: the group's measured timesteps' part of the
    all-point mean held-out loss) and "bpd" (the group's terms of the bits/dim bound, likelihood.nll_bound).
    Both add up over groups, as budget.allocate_from_curves needs: with one expert per group, as a router runs
    them, the experts' loss shares add up to the router's held-out loss, their bits/dim shares to its bound's
    timestep terms.
    Sizes pruning cannot reach (BudgetError) are left out and named in "skipped".

    A cache lacking a measure (a file from before the loss was measured has bits/dim only) gets it measured
    on the experts' saved weights, without training them again; only when those are gone is everything
    measured (and trained) again.

    Returns {"format", "grouping", "sensitivity", "sizes", "skipped", "steps", "measures" (the keys measured),
    "measure" (TuneConfig.screening: the key "loss", "se", "share" and "base_shares" are of), "points": per
    group [{"fraction", "flops_ratio", "loss", "se", "share", and per measure key "{key}_gap": {"mean", "se"},
    "{key}_share"}], "base_shares", "base_{key}_shares" (per group, the base's mean share), "train_flops",
    "phases"} (and "remeasured": the time a later measure took), as curves.json holds it.
    Raises BudgetError when no curve size can be pruned.
    """
    out = tune.dir / "curves" / f"N{groups}-{slug(grouping)}"
    cached = measurement_cache(out / "curves.json", _curves_problem)
    curves = None if cached is None else _upgraded(cached)
    missing = list(SCREENING_MEASURES) if curves is None else [k for k in SCREENING_MEASURES
                                                                  if k not in curves["measures"]]
    if curves is not None and missing and not all((_expert_dir(out, p["fraction"], g) / FINAL_DIR).exists()
                                                  for g, group in enumerate(curves["points"]) for p in group):
        tune.say(f"curves: N={groups} {grouping}: the curve experts' weights are gone, so their "
                 f"{', '.join(missing)} cannot be measured; measuring the curves again")
        curves, missing = None, list(SCREENING_MEASURES)
    if missing:
        start = clock()
        copy_stages(tune.base_run.dir, out, ("config.json", "base"))
        # ordering "measured" so the plan carries the groups' sensitivity: the paper's fractions for any k follow
        run = Run(out, overrides={"groups": groups, "grouping": grouping, "ordering": "measured"},
                  progress=tune.progress)
        base = run.base_model()
        shares = _Shares(run, base, missing)
        if curves is not None:
            tune.say(f"curves: N={groups} {grouping}: measuring {', '.join(missing)} on the curve experts "
                     "trained earlier")
            curves = _remeasured(curves, shares, out, start)
        else:
            curves = _trained(tune, run, base, shares, out, start, grouping)
    curves = _curves_for(curves, tune.config.screening)  # the screening measure's view, written when it changed
    if curves != cached:
        atomic_write_text(out / "curves.json", json.dumps(curves, indent=2))
    return curves


def _curves_problem(curves: dict) -> str | None:
    """What is wrong with curves.json's values (as measure_curves writes them, or the older bits/dim-only layout
    _upgraded reads: per group a list of points, each a fraction of the base's FLOPs in (0, 1], a finite FLOPs ratio,
    each measured measure's paired gap and share finite, and the base's shares one finite number per group); None
    when sound."""
    points = curves.get("points")
    if not (isinstance(points, list) and points
            and all(isinstance(g, list) and g and all(isinstance(p, dict) for p in g) for g in points)):
        return "'points' must hold, per group, a list of point records"
    current = curves.get("format") == CURVES_FORMAT
    keys = curves.get("measures") if current else ["bpd"]
    if not (isinstance(keys, list) and keys and set(keys) <= set(SCREENING_MEASURES)):
        return f"'measures' must list measured keys of {sorted(SCREENING_MEASURES)}, got {keys!r:.80}"
    for key in keys:
        gap, share, base = ((f"{key}_gap", f"{key}_share", f"base_{key}_shares") if current
                            else ("se", "share", "base_shares"))
        problem = numbers_problem(curves, [base], count=len(points))
        if problem:
            return problem
        for p in (p for group in points for p in group):
            values = p.get(gap) if current else {"mean": p.get("loss"), "se": p.get("se")}
            se = values.get("se") if isinstance(values, dict) else None
            if not (is_number(p.get("fraction"), 0, 1) and p["fraction"] > 0 and is_number(p.get("flops_ratio"), 0)
                    and isinstance(values, dict) and is_number(values.get("mean")) and is_number(p.get(share))
                    and (is_number(se, 0) or (isinstance(se, float) and math.isnan(se)))):
                return f"a point of fraction {p.get('fraction')!r:.20} holds no finite {key} gap, share or size"
    return None


def _expert_dir(out: Path, size: float, group: int) -> Path:
    """Where the curve expert of `group` at `size` (fraction of the base's FLOPs) is trained."""
    return out / "train" / f"size-{size:g}-group-{group}"


class _Shares:
    """Each group's share of the screening measures `keys`, per held-out image, of one model and of the base,
    on the curve run's plan (its grouping) with the screening's images, timesteps and noise (the run's seed)."""

    def __init__(self, run, base, keys: list[str]):
        self.run, self.keys, self.plan = run, keys, run.plan()
        self.held_out = run.split()[1]
        self.labels = run.labels(base)[1]
        self.base = {key: self.of(base, key) for key in keys}

    def of(self, model, key: str) -> torch.Tensor:
        """[M images, N groups]: the model's shares of measure `key`."""
        run, seed = self.run, self.run.config.seed
        if key == "loss":
            points, losses = held_out_losses(model, self.held_out, run.scheduler, seed=seed, labels=self.labels)
            return loss_shares(points, losses, self.plan.grouping)
        n = HELD_OUT_IMAGES
        return nll_bound(model, self.held_out[:n], run.scheduler, grouping=self.plan.grouping, samples=BPD_SAMPLES,
                         seed=seed, labels=None if self.labels is None else self.labels[:n]).groups

    def point(self, expert, group: int) -> dict:
        """The expert's gap to the base in each measure on its group ("{key}_gap": paired {"mean", "se"}) and its
        mean share ("{key}_share")."""
        point = {}
        for key in self.keys:
            share = self.of(expert, key)[:, group]
            point[f"{key}_gap"] = paired(share.tolist(), self.base[key][:, group].tolist())
            point[f"{key}_share"] = float(share.mean())
        return point

    def base_means(self) -> dict:
        """"base_{key}_shares": the base's mean share per group, for each measured key."""
        return {f"base_{key}_shares": [float(v) for v in self.base[key].mean(0)] for key in self.keys}


def _remeasured(curves: dict, shares: _Shares, out: Path, start: dict) -> dict:
    """curves (current format) with shares.keys measured on the curve experts saved in `out`."""
    for g, group in enumerate(curves["points"]):
        for point in group:
            point.update(shares.point(load_model(_expert_dir(out, point["fraction"], g) / FINAL_DIR), g))
    return {**curves, "measures": [k for k in SCREENING_MEASURES if k in curves["measures"] + shares.keys],
            **shares.base_means(), "remeasured": {"measures": shares.keys, **since(start)}}


def _trained(tune, run, base, shares: _Shares, out: Path, start: dict, grouping: str) -> dict:
    """The curves measured from scratch: `base` pruned to each size (uniform_fit, shared in curves/sizes/), trained
    per group of `grouping`, then measured. Raises BudgetError when no size can be pruned."""
    c, plan, groups = run.config, shares.plan, len(shares.plan.grouping)
    train_images, train_labels = run.split()[0], run.labels(base)[0]
    points, skipped, flops = [[] for _ in range(groups)], {}, 0
    for size in tune.config.curve_sizes:
        sized = tune.dir / "curves" / "sizes" / f"{size:g}"
        if size < 1 and not sized.exists():
            tune.say(f"curves: pruning the base to {size:.0%} of its FLOPs")
            try:
                save_model(uniform_fit(base, size, run.sample_shape, **run.config.search.space()).model, sized)
            except BudgetError as err:
                skipped[f"{size:g}"] = str(err)
                continue
        for g in range(groups):
            model = load_model(sized) if size < 1 else run.base_model()
            config = c.finetune.plain(steps=tune.config.curve_steps, checkpoint_every=tune.config.curve_steps,
                                      seed=c.seed * 100 + g + 1,
                                      label_dropout=c.finetune.label_dropout or c.base.label_dropout,
                                      null_class=run.null_class(model))
            tune.say(f"curves: N={groups} {grouping}: group {g} at {size:g} of the base, {config.steps} steps")
            trained = train(model, train_images, run.scheduler, config, _expert_dir(out, size, g), labels=train_labels,
                            timesteps=plan.grouping.timesteps(g), progress=tune.progress,
                            description=f"curve group {g} size {size:g}", data_range=run.data_range)
            flops += trained.train_flops
            expert = load_model(_expert_dir(out, size, g) / FINAL_DIR)
            points[g].append({"fraction": size, "flops_ratio": count_flops(expert, run.sample_shape) / plan.base_flops,
                              **shares.point(expert, g)})
    if not points[0]:
        raise BudgetError(f"no curve size could be pruned ({skipped}); give curve sizes the model can reach, e.g. "
                          "include 1.0")
    return {"format": CURVES_FORMAT, "grouping": plan.grouping.to_dict(), "sensitivity": plan.sensitivity,
            "sizes": list(tune.config.curve_sizes), "skipped": skipped, "steps": tune.config.curve_steps,
            "measures": list(SCREENING_MEASURES), "points": points, **shares.base_means(), "train_flops": flops,
            "phases": since(start, flops)}

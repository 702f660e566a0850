"""Kind "tdc": a TDC run (plan, pruning search, stage 2 per group) sharing the tune's base, over the k grid and
the time budgets, crossed with the TDC variants; its stage 2 is cut to the candidates' compute."""

from __future__ import annotations

from pathlib import Path

from ...prune.fit import BudgetError
from ...run import Run, apply_overrides, copy_stages
from ...serialization import load_model
from ...train import step_flops
from ..records import clock, since
from .kind import Kind

TIME_BUDGET_K = 0.5  # the paper's slope behind the time-budget TDC candidates (mean_budget rescales it)


def tdc_variants(config) -> list[dict]:
    """TuneConfig.tdc_variants, then (with config.depth) each again with depth pruning: the RunConfig settings
    every TDC-family candidate is crossed with. A variant's index is part of its candidates' order keys."""
    variants = list(config.tdc_variants)
    if config.depth:
        variants += [{**v, "search.depth": True} for v in config.tdc_variants]
    return variants


def variant_suffix(variant: dict) -> str:
    """What a variant adds to its candidates' names, e.g. " mix_fraction=0.2 depth=True"."""
    return "".join(f" {key.rpartition('.')[2]}={value}" for key, value in variant.items())


class Tdc(Kind):
    """Parameter "settings": the TDC run's RunConfig overrides (k, groups, grouping, the variant's settings; for
    a time budget budget_unit "time" and mean_budget)."""

    name = "tdc"
    style = ("tab:red", "^")

    def candidates(self, config) -> list[tuple[tuple, dict]]:
        """Per variant (order key (1, variant, 0)): the k grid, then (key (1, variant, 2)) the time budgets, for
        each value F the paper's fractions at k = TIME_BUDGET_K scaled to a timestep-weighted mean of F of the
        base's time ("TDC time F N=n grouping")."""
        specs = []
        for v, variant in enumerate(tdc_variants(config)):
            suffix = variant_suffix(variant)
            specs += [((1, v, 0), {"name": f"TDC k={k:g} N={n} {g}{suffix}",
                                   "settings": {"k": k, "groups": n, "grouping": g, **variant}})
                      for g in config.groupings for n in config.groups for k in config.ks]
            specs += [((1, v, 2), {"name": f"TDC time {f:g} N={n} {g}{suffix}",
                                   "settings": {"budget_unit": "time", "mean_budget": f, "k": TIME_BUDGET_K,
                                                "groups": n, "grouping": g, **variant}})
                      for g in config.groupings for n in config.groups for f in config.time_budgets]
        return specs

    def run_overrides(self, spec: dict, fractions: list[float] | None = None) -> dict:
        """The candidate's TDC run settings on top of the base run's (RunConfig dotted keys). fractions: the
        groups' budgets where the kind takes them from elsewhere (TDC's follow the paper's formula: unused)."""
        return dict(spec["settings"])

    def check(self, spec: dict, run_config) -> None:
        self.run_config(spec, run_config)

    def run_config(self, spec: dict, run_config):
        """The candidate's RunConfig on top of `run_config`, validated (ValueError naming the setting)."""
        settings = apply_overrides(run_config, self.run_overrides(spec))
        settings.validate()
        return settings

    def train(self, tune, spec: dict, out: Path) -> dict:
        return self.train_run(tune, spec, out, self.run_overrides(spec))

    def train_run(self, tune, spec: dict, out: Path, overrides: dict, spent_flops: int = 0) -> dict:
        """A TDC run directory in `out` sharing the base: plan + pruning search with `overrides`, then stage 2
        with what is left of the compute after spent_flops (training the candidate already spent). Raises
        BudgetError when nothing is left for stage 2."""
        i, budget = spec["index"], tune.training_flops_per_candidate()
        copy_stages(tune.base_run.dir, out, ("config.json", "base"))
        run = Run(out, overrides=overrides, progress=tune.progress)
        c = run.config
        tune.say(f"[{i}] {spec['name']}: plan and pruning search")
        start = clock()
        summaries = run.prune()
        search = since(start)
        # What train() will count per step (a teacher's forward and feature projections included), so stage 2's
        # FLOPs stay on budget whatever the distillation settings.
        teacher = run.base_model() if c.finetune.uses_teacher else None
        per_step = sum(step_flops(load_model(out / "prune" / f"group_{s['group']}"), run.sample_shape, c.finetune,
                                  teacher) for s in summaries)
        left = budget - spent_flops
        if left < per_step / 2:
            raise BudgetError(f"the curves cost {spent_flops:.3g} training FLOPs, the whole budget of {budget:.3g}: "
                              "nothing is left for stage 2; raise --tune-steps or lower --curve-steps")
        steps = max(1, round(left / per_step))
        tune.say(f"[{i}] {spec['name']}: stage 2, {steps} steps per group")
        run = Run(out, overrides={"finetune.steps": steps}, progress=tune.progress)
        start = clock()
        run.finetune()
        run.export_bundle()
        flops = sum(run.training_flops()["stage2_per_group"])
        return {"bundle": "bundle", "train_flops": flops + spent_flops, "steps": steps,
                "phases": {"search": search, "stage2": since(start, flops)}}

"""Kind "tdc-curves": a TDC candidate whose groups' budgets are split by measured quality curves (curves.py) at
the mean budget the paper's formula gives for the same k, N and grouping; the curves' training counts in its
compute."""

from __future__ import annotations

from pathlib import Path

from ..curves import curves_allocation
from .tdc import Tdc, tdc_variants, variant_suffix


class TdcCurves(Tdc):
    """Parameters "settings" (as a tdc candidate's) and, for an objective other than "share",
    "objective" (a key of curves.CURVE_OBJECTIVES)."""

    name = "tdc-curves"
    style = ("tab:purple", "v")

    def candidates(self, config) -> list[tuple[tuple, dict]]:
        """With config.curves, per variant (order key (1, variant, 1): after its k grid, before its time
        budgets) and curve objective, the k grid again."""
        if not config.curves:
            return []
        specs = []
        for v, variant in enumerate(tdc_variants(config)):
            # "share" specs carry no objective key: candidate lists from before objectives still match
            specs += [((1, v, 1), {"name": f"TDC curves{'' if o == 'share' else ' ' + o} k={k:g} N={n} {g}"
                                           f"{variant_suffix(variant)}",
                                   **({} if o == "share" else {"objective": o}),
                                   "settings": {"k": k, "groups": n, "grouping": g, **variant}})
                      for o in config.curve_objectives
                      for g in config.groupings for n in config.groups for k in config.ks]
        return specs

    def run_overrides(self, spec: dict, fractions: list[float] | None = None) -> dict:
        """The groups' budgets given explicitly (RunConfig.plan_fractions; None: a stand-in of the right length,
        to check the settings before the curves exist); the mean budget a variant may set is what the curves
        split, so it leaves the run."""
        return {**spec["settings"], "plan_fractions": fractions or [1.0] * spec["settings"]["groups"],
                "mean_budget": None}

    def check(self, spec: dict, run_config) -> None:
        if self.run_config(spec, run_config).budget_unit == "time":
            raise ValueError(f"{spec['name']}: --curves measures group sizes as fractions of the base's FLOPs, but "
                             "its budget unit is time; drop budget_unit=time from the run or --variant, or leave "
                             "out --curves")

    def train(self, tune, spec: dict, out: Path) -> dict:
        """Its record also holds the curves ("curves": their points) and both allocations ("allocations":
        curves.curves_allocation's)."""
        curves, allocations = curves_allocation(tune, spec)
        tune.say(f"[{spec['index']}] {spec['name']}: paper fractions "
                 f"{[round(f, 3) for f in allocations['paper']['fractions']]}, from {curves['measure']} curves "
                 f"({allocations['objective']}) "
                 f"{allocations['curves']['fractions']} (mean budget {allocations['budget']:.3f})")
        record = self.train_run(tune, spec, out, self.run_overrides(spec, allocations["curves"]["fractions"]),
                                spent_flops=curves["train_flops"])
        record["phases"]["curves"] = curves["phases"]
        record["curves"] = curves["points"]
        record["allocations"] = allocations
        return record

    def finished_note(self, tune, spec: dict, record: dict) -> str:
        """Its budgets were allocated by the screening measure of its time; a later --screening does not
        reallocate them (a record from before the loss could screen was allocated by bits/dim)."""
        if "allocations" not in record:  # failed before it was allocated
            return ""
        measure = record["allocations"].get("measure", "bpd")
        if measure == tune.config.screening:
            return ""
        return (f"its groups' budgets were allocated by {measure} curves, not {tune.config.screening}; delete "
                f"{tune.dir / spec['dir']} to allocate them again")

"""Kind "uniform": the base pruned to one global width ratio (prune.fit.uniform_fit), to a fraction of its FLOPs
or of its measured forward time, then trained as a single model is."""

from __future__ import annotations

import json
from pathlib import Path

from ...files import atomic_write_text
from ...prune.fit import uniform_fit
from ...serialization import load_model, save_model
from ..records import clock, read_json, since
from .kind import FIRST, Kind
from .single import train_one_model


class Uniform(Kind):
    name = "uniform"
    style = ("tab:blue", "o")

    def candidates(self, config) -> list[tuple[tuple, dict]]:
        """TuneConfig.widths (fractions of the base's FLOPs), then uniform_time_budgets (of its forward time):
        parameters "fraction" and "budget_unit" ("flops" or "time")."""
        return ([(FIRST, {"name": f"uniform {w:g}", "fraction": w, "budget_unit": "flops"}) for w in config.widths]
                + [(FIRST, {"name": f"uniform time {f:g}", "fraction": f, "budget_unit": "time"})
                   for f in config.uniform_time_budgets])

    def train(self, tune, spec: dict, out: Path) -> dict:
        """Pruned once into out/pruned (kept on a rerun: a time fit is measured, so fitting again could give
        another model); a time fit's measured and estimated time ratios go to out/time.json and the record."""
        start = clock()
        if not (out / "pruned").exists():
            save_model(self._fit(tune, spec, out), out / "pruned")
        return train_one_model(tune, spec, out, load_model(out / "pruned"), search=since(start),
                               extra=read_json(out / "time.json", {}))

    @staticmethod
    def _fit(tune, spec: dict, out: Path):
        run, by_time = tune.base_run, spec["budget_unit"] == "time"
        unit = "measured forward time" if by_time else "FLOPs"
        tune.say(f"[{spec['index']}] {spec['name']}: pruning to {spec['fraction']:.0%} of the base's {unit}")
        base = run.base_model()
        if not by_time:
            return uniform_fit(base, spec["fraction"], run.sample_shape, **run.config.search.space()).model
        # fitted and corrected against measured time, as run.prune does TDC's time budgets
        batch = run.config.latency_batch
        timed = uniform_fit(base, spec["fraction"], run.sample_shape, latency=run.latency_table(base), batch=batch,
                            **run.config.search.space())
        atomic_write_text(out / "time.json", json.dumps({
            "time_ratio": timed.time_ratio, "estimated_time_ratio": timed.trail[0]["estimated_ratio"],
            "time_corrections": timed.trail, "latency_batch": batch}))
        return timed.fit.model

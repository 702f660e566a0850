"""Run: every stage of a run directory in order, then its sample grids and report."""

from __future__ import annotations

from ..bundle import MANIFEST, load_bundle
from ..serialization import ARCHITECTURE_FILE
from ..train import FINAL_DIR
from .reporting import report_for_run
from .rundir import writes
from .stages import Stages


class Run(Stages):
    """One run directory (see Stages for the arguments and each stage), with `run_all`: the whole method."""

    @writes
    def run_all(self) -> dict:
        """Every stage in order, skipping those already done, then the sample grids and the report.

        Returns {"bundle": path, "samples": [base grid, TDC grid], "plan": BudgetPlan, "report": report.html}.
        """
        self.report_follows = True  # stage 1 checks, with its own checks, that the report's FID can run
        self.train_base()
        plan = self.plan()
        self.prune()
        self.finetune()
        bundle_path = self.export_bundle()
        bundle = load_bundle(bundle_path, device=self.device)
        base_grid = self.sample_grid("base", self.base_model(),
                                     source=self.dir / "base" / FINAL_DIR / ARCHITECTURE_FILE)
        tdc_grid = self.sample_grid("tdc", bundle.router, source=bundle_path / MANIFEST)
        c = self.config
        report = report_for_run(self.dir, seeds=tuple(range(c.eval_seeds)), num_samples=c.eval_samples,
                                progress=self.progress)
        return {"bundle": bundle_path, "samples": [base_grid, tdc_grid], "plan": plan, "report": report}

"""The report of one finished run: its stage-1 base against its TDC bundle (report.py draws the page; what
needs a run directory is here)."""

from __future__ import annotations

from pathlib import Path

from ..bundle import MANIFEST, load_bundle
from ..content_hash import sha256_file
from ..evaluate import ModelEntry, evaluate
from ..files import read_json_file
from ..grouping import Grouping
from ..losses import per_timestep_loss
from ..plots import plot_budgets, plot_grouping, plot_loss_per_t
from ..report import expert_rows, write_report
from ..serialization import ARCHITECTURE_FILE
from ..settings import flatten
from ..train import FINAL_DIR
from .config import stage_settings
from .rundir import lock_run_dir, record_inputs, up_to_date
from .stages import Stages


def run_figures(run_dir: str | Path, out_dir: str | Path) -> list[tuple[str, str]]:
    """Draw into out_dir the figures only a finished TDC run directory can give: grouping, budgets and
    per-timestep loss; returns their (file, caption) pairs, for report.write_report."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    plan = read_json_file(run_dir / "plan" / "plan.json", f"delete {run_dir / 'plan'} and run `tdcdiff plan` again")
    run = Stages(run_dir, progress=False)
    bundle = load_bundle(run_dir / "bundle", device=run.device)
    grouping = Grouping.from_dict(plan["grouping"])
    plot_grouping(grouping, run.scheduler, out_dir / "grouping.png", budgets=plan["fractions"])
    plot_budgets(plan, bundle.manifest, out_dir / "budgets.png")
    _, held_out = run.split()
    # 40 timesteps x 32 images: a visual, paired (same images and noise for both models), so a few seconds do.
    curves = {name: per_timestep_loss(model, held_out, run.scheduler, num_points=40, images_per_point=32,
                                      seed=run.config.seed, labels=run.labels(model)[1])
              for name, model in (("base (stage 1)", run.base_model()), ("TDC (routed group models)", bundle.router))}
    plot_loss_per_t(curves, grouping.boundaries, out_dir / "loss_per_t.png")
    return [
        ("grouping.png", f"SNR (dB) over the timesteps t, with the {len(grouping)} group boundaries "
                         f"('{grouping.strategy}' grouping) and each group's FLOPs budget as a fraction of the "
                         "base model's FLOPs F."),
        ("budgets.png", "Each group's planned FLOPs budget and the measured FLOPs of its pruned expert "
                        "(2 x MACs, one forward), as fractions of F; the label is the measured error."),
        ("loss_per_t.png", "Denoising loss at every timestep on the run's held-out images with fixed noise: "
                           "the stage-1 base against the routed group models (each t uses its group's "
                           "expert). Below 1 in the lower panel means the group model is better there."),
    ]


def write_run_report(out_dir: str | Path, results: dict, run_dir: str | Path) -> Path:
    """report.write_report with a finished TDC run directory's figures (run_figures) and pruned-experts table
    (report.expert_rows); returns the path of report.html."""
    return write_report(out_dir, results, figures=run_figures(run_dir, out_dir), experts=expert_rows(run_dir))


def _check_bundle_is_the_runs(run, bundle) -> None:
    """Refuse, before any sampling, a bundle that another run (or other settings) made: its groups, image shape
    or recorded settings differ from the run's."""

    found = []
    plan = run.plan()
    if list(bundle.router.grouping.boundaries) != list(plan.grouping.boundaries):
        found.append(f"group edges {list(bundle.router.grouping.boundaries)} (the run's plan: "
                     f"{plan.grouping.boundaries})")
    if tuple(bundle.sample_shape) != tuple(run.sample_shape):
        found.append(f"image shape {tuple(bundle.sample_shape)} (the run's data: {tuple(run.sample_shape)})")
    provenance = bundle.manifest.get("provenance")
    made_with = provenance.get("config") if isinstance(provenance, dict) else None
    if isinstance(made_with, dict):
        theirs = flatten(made_with)
        ours = flatten({k: v for stage in ("base", "plan", "prune", "finetune")
                     for k, v in stage_settings(run.config, stage).items()})
        found += [f"setting '{k}' {theirs[k]!r} (the run's: {v!r})"
                  for k, v in ours.items() if k in theirs and theirs[k] != v]
    if found:
        path = run.dir / "bundle"
        raise ValueError(
            f"{path} was not made by this run: its {'; '.join(found[:4])}{' ...' if len(found) > 4 else ''}. Delete "
            f"{path} and rerun `tdcdiff bundle --out {run.dir}` to rebuild it from this run, or report on the run "
            "that made it"
        )


def report_for_run(
    run_dir: str | Path,
    *,
    seeds: tuple[int, ...] = (0, 1),
    num_samples: int = 512,
    sampler: str | None = None,
    steps: int | None = None,
    feature_cache_dir: str | Path | None = None,
    timing_batches: tuple[int, ...] = (1, 64),
    timing_repeats: int = 3,
    progress: bool = True,
    base: str | None = None,
) -> Path:
    """The report of one finished TDC run: its stage-1 base against its TDC bundle, in run_dir/report/.

    No controls are trained here (for those, see bench/benchmark.py): the base had less training compute
    than TDC, so this shows what TDC changed, not whether it beats equal-compute alternatives.
    run_dir: the run directory. seeds: sampling seeds; two give the seed spread the verdict needs, at the cost of
        one seed of 1024 (about 25 s for the default digits run on 2 CPU cores). num_samples: images per model
        and seed.
    sampler, steps: default to the run's sampling settings. feature_cache_dir: where the FID feature
    classifier is cached (default: evaluate.default_cache_dir()). timing_batches, timing_repeats: see
    evaluate.evaluate. progress: print one line per measurement. base: the run's `module:function` base, named
    again to trust its code (see Stages). Returns the path of report.html.
    A report made from the same bundle, base weights and settings (report/inputs.json records them) is kept
    as it is; delete report/ to measure again. Holds the run directory's lock (see rundir.lock_run_dir).
    """
    run_dir = Path(run_dir)
    with lock_run_dir(run_dir):  # it writes run_dir/report/
        run = Stages(run_dir, progress=progress, base=base)
        c = run.config
        if not (run_dir / "bundle").exists():  # the stages before it say which command makes what they need too
            raise FileNotFoundError(f"no bundle at {run_dir / 'bundle'}; run `tdcdiff bundle --out {run_dir}` first "
                                    f"(or `tdcdiff run --out {run_dir}`, which makes every missing stage)")
        bundle = load_bundle(run_dir / "bundle", device=run.device)
        _check_bundle_is_the_runs(run, bundle)
        inputs = {
            "bundle_sha256": sha256_file(run_dir / "bundle" / MANIFEST),
            "base_sha256": sha256_file(run_dir / "base" / FINAL_DIR / ARCHITECTURE_FILE),
            "config": {k: v for k, v in c.to_dict().items() if k != "num_samples"},  # the sample grid's size only
            "seeds": list(seeds), "num_samples": num_samples, "sampler": sampler, "steps": steps,
            "timing_batches": list(timing_batches), "timing_repeats": timing_repeats,
        }
        outputs = [run_dir / "report" / name for name in ("report.html", "results.json")]
        if up_to_date(run_dir / "report" / "inputs.json", inputs, outputs):
            return outputs[0]
        compute = run.training_flops()
        entries = [
            ModelEntry("base (stage 1)", run.base_model(), compute["stage1"],
                       notes=f"the run's stage-1 model: {c.base.steps} steps on all timesteps"),
            ModelEntry("TDC", bundle.router, compute["total"],
                       notes=f"{c.groups} group models pruned from the base (k={c.k}, '{c.grouping}' grouping, "
                             f"'{c.ordering}' ordering, proposer '{c.search.proposer}'), each fine-tuned "
                             f"{c.finetune.steps} steps; training compute includes stage 1"),
        ]
        data = run.pixels  # FID compares images, also in latent diffusion (samples are decoded)
        results = evaluate(
            entries, run.scheduler, data.images, data.labels, sample_shape=run.sample_shape, decode=run.decode,
            sampler=sampler or c.sampler, steps=c.sampling_steps if steps is None else steps, num_samples=num_samples,
            seeds=tuple(seeds),
            feature_cache_dir=feature_cache_dir, reference_name=Path(c.data).name,
            timing_batches=tuple(timing_batches), timing_repeats=timing_repeats, grid_dir=run_dir / "report",
            held_out=run.split()[1], loss_grouping=bundle.router.grouping,  # latents in latent diffusion
            num_classes=data.num_classes, held_out_labels=run.labels(bundle.router)[1],
            device=run.device, progress=progress,
        )
        results["context"] = [
            "This compares a run's own stage-1 base with its TDC bundle. The base had less training compute than "
            "TDC (stage 1 only), so a better TDC FID here does not show that TDC beats a model trained with the same "
            "budget; bench/benchmark.py runs those equal-compute controls (single model, uniform pruning).",
        ]
        write_run_report(run_dir / "report", results, run_dir)
        record_inputs(run_dir / "report" / "inputs.json", inputs, outputs)
        return outputs[0]

"""`tdcdiff`: a thin command line over the library (tdcdiff.run.Run, tdcdiff.tune.Tune, tdcdiff.pipeline).

    options.py   the options, and the table mapping each to its RunConfig setting (flags, defaults, error names)
    stages.py    run, train-base, plan, prune, finetune, bundle
    sample.py    sample, report
    tune.py      tune

Heavy libraries (torch, diffusers) are imported inside the commands, so that `tdcdiff --help` stays fast.
"""

import typer

from . import sample, stages, tune

app = typer.Typer(
    help="TDC training with proxy-based pruning: a right-sized diffusion denoiser for each group of timesteps.\n\n"
    "Start with `tdcdiff run` (the whole method on scikit-learn digits, a few minutes on a laptop CPU).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain click help: no type labels on flags, no boxes that break the wraps
)
app.command("run")(stages.run_command)
app.command("train-base")(stages.train_base_command)
app.command("plan")(stages.plan_command)
app.command("prune")(stages.prune_command)
app.command("finetune")(stages.finetune_command)
app.command("bundle")(stages.bundle_command)
app.command("sample")(sample.sample_command)
app.command("report")(sample.report_command)
app.command("tune")(tune.tune_command)


def main() -> None:  # pragma: no cover - console entry
    app(prog_name="tdcdiff")

"""The TDC stages over one run directory: train base -> plan -> prune -> fine-tune -> bundle -> sample -> report.

    run_dir/
      config.json          the RunConfig that made it
      base/                stage 1 (train/ layout: checkpoint/, final/, log.jsonl, train.json); a given
                           pipeline's scheduler_config.json and VAE (vae/: latent diffusion)
      latents/             latent diffusion: the data encoded once by the VAE (every stage trains on these)
      plan/                plan.json, grouping.png
      prune/group_i/       the pruned model of group i; prune/memory_i.json, prune/search_i.jsonl
      finetune/group_i/    stage 2 of group i (train/ layout)
      bundle/              the deliverable (see bundle.py)
      samples/             sample grids, each with NAME.inputs.json: what it was sampled from and how
      report/              report.html (see report.py) and inputs.json
      .tdcdiff.lock        held by the one process writing here; .tdcdiff.lock.owner says which

Each stage skips itself when its output exists, so rerunning after a crash continues where it stopped; sample
grids and the report are redone only when what they were made from (weights, settings) changed.

One process at a time writes a run directory: every stage that writes (`--group` jobs included) and `tdcdiff
report` take the directory's lock, and a second writer is refused at once, naming the holder; stage-2 groups of
one run directory therefore run one after another. Taking the lock also removes the temporaries a killed writer
left behind (see files.remove_stale_temporaries).

A run directory is untrusted input, like a bundle: a `module:function` base that only its config.json names is
never imported or called (see Stages).

    config.py     RunConfig and which stage each setting shapes
    rundir.py     the lock, input records, copying finished stages
    inputs.py     data, split, labels, schedule and saved models, as the stages read them
    stages.py     the stages (Stages)
    reporting.py  the report of a finished run
    all.py        Run: every stage in order (run_all)
"""

from ..settings import apply_overrides, check_seed, load_config_file, parse_settings
from .all import Run
from .config import BUDGET_UNITS, MAX_TIMESTEPS, SCHEDULER_FILE, RunConfig, check_not_a_run, stage_settings
from .inputs import VAE_DIR
from .reporting import report_for_run, run_figures, write_run_report
from .rundir import LOCK_FILE, OWNER_FILE, RunDirectoryBusy, copy_stages, lock_run_dir, record_inputs, up_to_date
from .stages import Stages

__all__ = [
    "BUDGET_UNITS", "LOCK_FILE", "MAX_TIMESTEPS", "OWNER_FILE", "SCHEDULER_FILE", "VAE_DIR", "Run", "RunConfig",
    "RunDirectoryBusy", "Stages", "apply_overrides", "check_not_a_run", "check_seed", "copy_stages",
    "load_config_file", "lock_run_dir", "parse_settings", "record_inputs", "report_for_run", "run_figures",
    "stage_settings", "up_to_date", "write_run_report",
]

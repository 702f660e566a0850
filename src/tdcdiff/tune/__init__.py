"""`tdcdiff tune`: the quality-speed frontier of one base model, the fastest candidate as good as the base,
and what tuning cost against what it returns.

From one stage-1 base, every candidate is fine-tuned with the SAME training compute (FLOPs): the base itself
("single", the equal-compute reference), the base pruned to one uniform width (of its FLOPs or measured time),
and TDC runs over k, N and the grouping strategy, by time budget, with depth pruning, or with the groups'
budgets allocated from measured quality curves (in the screening measure). All are screened with the held-out
denoising loss or, with TuneConfig.screening "bpd", the held-out bits/dim bound (each paired with the base's per
image: same images, timesteps and noise; the other measure beside it); the best few by it get paired-seed FID/KID
and precision/recall against the base, with seeds added until the verdict is decided (verdict.py: better,
non-inferior within a stated margin, inferior, or undecided); the chosen candidate is the fastest one better than
or non-inferior to the base, or, without a FID verdict, within `max_quality_loss`.

    tune_dir/
      tune.json            the settings the candidate list was made with (a rerun must match them)
      candidates.json      the candidate list: index, name, kind, parameters, directory
      base/                the stage-1 run directory (trained here, or config.json + base/ copied from a run)
      phases.json          wall and CPU time (and training FLOPs) of stage 1, screening and finalists
      candidates/NN-name/  one candidate: a TDC run directory, or pruned/ + train/ + bundle/ for single and
                           uniform; result.json when it has finished (its phases' time and FLOPs)
      curves/              quality curves per (N, grouping) for the "TDC curves" candidates, in both screening
                           measures (the screening one allocates); sizes/: pruned sizes
      screening.json       both screening measures per model (per image, for pairing), each with its protocol;
                           fid.json: FID/KID/precision/recall per seed, the judge's real-vs-real FID
      results.json, table.csv, frontier.png    the frontier: quality against sampling time and FLOPs
      cost.json, cost.csv, return.csv    what the chosen bundle cost and returns
      chosen/ + chosen.json    the chosen bundle (a copy) and which rule chose it (its "bundle", as the rows':
                           the source bundle's folder relative to the tune directory)

A rerun skips finished candidates and cached measurements (each record's values checked: an entry the tune would
not write is warned about and measured again); `Tune.run_candidate(i)` (`tdcdiff tune
--candidate i`) runs one candidate alone, e.g. as a separate job.

The modules: config (TuneConfig), kinds/ (the registry of candidate kinds: each kind's candidates, checks,
training and plot style), measures (screening measures, FID and timing, cached), curves (quality curves and the
allocation from them), judge (paired statistics, the choice rule), cost (cost and return), output (rows,
tables, CSV, the frontier plot), records (phase clocks, phases.json), tune (the Tune orchestrating all of it).
"""

from .config import TuneConfig
from .cost import cost_rows
from .judge import choose
from .kinds import KINDS, Kind, candidate_list, check_candidate, kind_of
from .measures import SCREENING_MEASURES
from .output import format_rows, judge_line, table_rows
from .tune import Tune, check_tune

__all__ = ["KINDS", "SCREENING_MEASURES", "Kind", "Tune", "TuneConfig", "candidate_list", "check_candidate",
           "check_tune",
           "choose", "cost_rows", "format_rows", "judge_line", "kind_of", "table_rows"]

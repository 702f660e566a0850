"""How every number of an evaluation was measured (its "protocol" entry), and pooling evaluations of the same models
from independent runs."""

from __future__ import annotations

import platform
import statistics

import torch

from ..metrics import FidResult, summarize_seeds
from ..samplers import TIMESTEP_SPACING
from .timing import TIMING_CLOCK, memory_method

FLOPS_CONVENTION = "FLOPs = 2 x multiply-accumulates"
# /2: the default feature network became features.FEATURES_VERSION 2 (128-d), precision/recall per seed, the
# judge's margin; FID values of /1 were measured in another feature space and are not comparable.
FORMAT = "tdcdiff-evaluation/2"


def protocol(*, sampler: str, steps: int, num_samples: int, seeds, feature_net: str, judge: dict, reference_name: str,
             reference_count: int, sampling_path: str, timing_repeats: int, timing_batches, ratios_to: str,
             device: torch.device) -> dict:
    """The protocol entry of an evaluation without held-out images (evaluate adds held_out.held_out_protocol's).

    feature_net: the network's description; judge: fid.judge_protocol's dict; sampling_path: the runners'
    compile/precision; ratios_to: the first model's name.
    """
    return {
        "sampler": sampler,
        "steps": steps,
        "timestep_spacing": TIMESTEP_SPACING,
        "num_samples": num_samples,
        "seeds": list(seeds),
        "feature_net": feature_net,
        "reference": {"name": reference_name, "count": reference_count},
        "fid": "torchmetrics FrechetInceptionDistance / KernelInceptionDistance and improved precision/recall on the "
               "feature net's features; mean and sample sd over the seeds",
        "judge": judge,
        "flops": f"{FLOPS_CONVENTION}; per image, summed over the sampling steps actually taken "
                 "(a router counts the expert it calls at each step)",
        "sampling_path": sampling_path,
        "time": f"{TIMING_CLOCK}: one full {sampler}-{steps} sampling run at each batch size, median of "
                f"{timing_repeats} runs interleaved across models after one warm-up; ratios are to "
                f"'{ratios_to}' measured in the same process",
        "memory": memory_method(device, max(timing_batches)),
        "train_flops": f"{FLOPS_CONVENTION}; forward + backward = 3 x forward, x batch x steps, from the "
                       "training runs' own records",
        "ratios_to": ratios_to,
        "device": str(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()}, "
                                                           f"{torch.get_num_threads()} threads)",
        "torch": torch.__version__,
    }


def sample_scores(fids: list[FidResult]) -> dict:
    """A model record's "fid" and "kid" entries, and "precision" and "recall" when measured: mean and sd over the
    FidResults (metrics.summarize_seeds), FID with its per-seed results."""
    summary = summarize_seeds(fids)
    scores = {"fid": {"mean": summary["fid_mean"], "sd": summary["fid_sd"], "per_seed": [f.to_dict() for f in fids]},
              "kid": {"mean": summary["kid_mean"], "sd": summary["kid_sd"]}}
    for key in ("precision", "recall"):
        if f"{key}_mean" in summary:
            scores[key] = {"mean": summary[f"{key}_mean"], "sd": summary[f"{key}_sd"]}
    return scores


def pool(evaluations: list[dict], labels: list[str] | None = None) -> dict:
    """Combine evaluations of the same models from independent runs (e.g. one training seed each).

    FID, KID, precision and recall are pooled over every (run, sampling seed) pair, so their sd includes run-to-run
    variation; the other numbers are averaged over runs, and the bits/dim bound's means (total, per group, paired
    differences) also get "sd", their spread over runs. evaluations: `evaluate` results with the same model
    names in the same order, under one protocol. labels: one name per run (e.g. "seed 0"), kept with the per-run data.
    """
    if not evaluations:
        raise ValueError("pool needs at least one evaluation")
    names = [m["name"] for m in evaluations[0]["models"]]
    for other in evaluations[1:]:
        if [m["name"] for m in other["models"]] != names:
            raise ValueError(f"evaluations compare different models: {names} vs {[m['name'] for m in other['models']]}")
    labels = labels or [f"run {i}" for i in range(len(evaluations))]
    models = []
    for i, name in enumerate(names):
        runs = [e["models"][i] for e in evaluations]
        fids = [FidResult(**f) for r in runs for f in r["fid"]["per_seed"]]
        models.append({**_mean_tree(runs), "name": name, "notes": runs[0]["notes"], **sample_scores(fids),
                       "sample_grid": runs[0]["sample_grid"]})
        if "held_out_bpd" in runs[0] and len(runs) > 1:
            _add_run_sd(models[-1]["held_out_bpd"], [r["held_out_bpd"] for r in runs])
    protocol = dict(evaluations[0]["protocol"])
    if len({str(e["protocol"].get("held_out_loss_groups")) for e in evaluations}) > 1:
        protocol["held_out_loss_groups"] = None  # e.g. loss-based grouping: each run cut t differently
    protocol["runs"] = labels
    protocol["seeds"] = [f["seed"] for f in models[0]["fid"]["per_seed"]]
    protocol["fid"] += f"; pooled over {len(evaluations)} independent runs ({', '.join(labels)})"
    return {"format": FORMAT, "protocol": protocol, "models": models,
            "per_run": [{"label": label, **e} for label, e in zip(labels, evaluations)]}


def _add_run_sd(pooled: dict, runs: list[dict]) -> None:
    """Give every {"mean", "se"} entry of a pooled tree the sd of its mean over the runs (seed-to-seed spread)."""
    if "mean" in pooled and "se" in pooled:
        pooled["sd"] = statistics.stdev(r["mean"] for r in runs)
        return
    for key, value in pooled.items():
        if isinstance(value, dict):
            _add_run_sd(value, [r[key] for r in runs])


def _mean_tree(trees: list):
    """Average numeric leaves of same-shaped dicts; equal or non-numeric leaves are kept from the first."""
    first = trees[0]
    if isinstance(first, dict):
        return {k: _mean_tree([t[k] for t in trees]) for k in first}
    numeric = all(isinstance(t, (int, float)) and not isinstance(t, bool) for t in trees)
    return statistics.fmean(trees) if numeric and len(set(trees)) > 1 else first

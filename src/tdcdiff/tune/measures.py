"""What ranks and times the models of a tune directory: the screening measures (cheap, paired per image), the
finalists' FID/KID and sampling time, each cached in the directory with its protocol and the identity of the
weights it was measured on.

The functions taking `tune` read its directory, base run and settings (tune.dir, tune.base_run, tune.config,
tune.candidates, tune.result, tune.say): see tune.Tune.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..bundle import load_bundle
from ..content_hash import sha256_tree
from ..evaluate import BPD_SAMPLES, HELD_OUT_IMAGES, default_feature_net, judge_protocol, score_seeds, time_rounds
from ..features import DEFAULT_FEATURE_NET, FEATURES_VERSION
from ..files import atomic_write_text, read_json_file
from ..grouping import make_groups
from ..likelihood import nll_bound
from ..losses import per_image_loss
from ..pipeline import SamplingModel
from ..router import Router
from ..samplers import visited_timesteps
from ..train import FINAL_DIR
from ..verdict import describe, sequential
from .judge import mean_se, paired
from .records import clock, is_number, measurement_cache, numbers_problem, record_phase, since, sound_entries

SCREENING_FORMAT = "tdcdiff-tune-screening/2"
FID_FORMAT = "tdcdiff-tune-fid/3"  # /3: per point (model, setting); /2: seeds added until decided, the judge
SEED_SCORES = {"fid": "fid", "kid": "kid_mean", "precision": "precision", "recall": "recall"}  # fid.json key: FidResult


@dataclass(frozen=True)
class ScreeningMeasure:
    """A cheap quality measure of a denoiser on held-out images; lower is better.

    name, unit: shown in results and plots; label: the table's column; decimals: digits shown. settings: what
    fixes the measurement besides the images and seed (part of its cache protocol). measure(model, held_out,
    scheduler, seed=..., labels=...) returns {"value": float, "se": float, "per_image": list} (value: the mean of
    per_image; se: its standard error), with the same images, timesteps and noise for every model given the same
    seed, so two models' per-image values are paired. labels: the held-out images' class ids for a
    class-conditional model, else None.
    """

    name: str
    label: str
    unit: str
    decimals: int
    settings: dict
    measure: Callable[..., dict]
    lowest: float = -math.inf  # the smallest value a measurement gives (a loss: 0); a cached one below is damaged


LOSS_TIMESTEPS = 100  # evenly spaced timesteps per image in the held-out loss (as evaluate.held_out_loss)


def held_out_losses(model, held_out: torch.Tensor, scheduler, *, seed: int,
                    labels: torch.Tensor | None = None) -> tuple:
    """The held-out loss screening measure's raw values: (points [P] measured timesteps, losses [P, M] float32, per
    measured timestep and image; grouping.per_image_loss)."""
    return per_image_loss(model, held_out, scheduler, num_points=LOSS_TIMESTEPS, images_per_point=HELD_OUT_IMAGES,
                          seed=seed, labels=labels)


def screen_loss(model, held_out: torch.Tensor, scheduler, *, seed: int, labels: torch.Tensor | None = None) -> dict:
    """The held-out loss screening measure (ScreeningMeasure.measure): each image's loss, mean over the measured
    timesteps."""
    _, losses = held_out_losses(model, held_out, scheduler, seed=seed, labels=labels)
    per_image = losses.double().mean(0).tolist()  # [P, M] -> each image's loss, mean over the measured timesteps
    summary = mean_se(per_image)
    return {"value": summary["mean"], "se": summary["se"], "per_image": per_image}


def screen_bpd(model, held_out: torch.Tensor, scheduler, *, seed: int, labels: torch.Tensor | None = None) -> dict:
    """The held-out bits/dim bound screening measure (ScreeningMeasure.measure), on the first HELD_OUT_IMAGES."""
    n = HELD_OUT_IMAGES
    bound = nll_bound(model, held_out[:n], scheduler, samples=BPD_SAMPLES, seed=seed,
                      labels=None if labels is None else labels[:n])
    total = bound.summary()["total"]
    return {"value": total["mean"], "se": total["se"], "per_image": bound.total.tolist()}


HELD_OUT_LOSS = ScreeningMeasure(
    "held-out denoising loss", "held-out loss", "MSE of the training target per held-out image, mean over "
    f"{LOSS_TIMESTEPS} evenly spaced t (grouping.per_image_loss on evaluate.HELD_OUT_IMAGES images picked by the "
    "seed, fixed noise)", 5, {"timesteps": LOSS_TIMESTEPS}, screen_loss, lowest=0.0)
BITS_PER_DIM = ScreeningMeasure(
    "held-out bits/dim bound", "bits/dim", "bits/dim (variational bound on the NLL of 8-bit images; "
    "likelihood.nll_bound on the first evaluate.HELD_OUT_IMAGES held-out images, evaluate.BPD_SAMPLES log-SNR "
    "strata)", 4, {"strata": BPD_SAMPLES}, screen_bpd)
# TuneConfig.screening (--screening) picks the measure that ranks; the other is measured beside it. The loss is
# the default: its ranking agreed with FID's where the bound's did not (the bound weighs the least noisy t most).
SCREENING_MEASURES = {"loss": HELD_OUT_LOSS, "bpd": BITS_PER_DIM}


def second_measure(screening: str) -> str:
    """The key of the measure recorded beside `screening` (a key of SCREENING_MEASURES)."""
    return next(key for key in SCREENING_MEASURES if key != screening)


# -- the models of a tune directory and their identities ------------------------------------------------------
def load_models(tune) -> dict:
    """name -> (Router, sampling FLOPs per image) for the base and every finished, not failed candidate."""
    run, c = tune.base_run, tune.base_run.config
    visited = visited_timesteps(c.sampling_steps, run.scheduler.config.num_train_timesteps)
    base = Router([run.base_model()], make_groups("uniform", 1, run.scheduler), [tune.base_flops()],
                  prediction_type=run.scheduler.config.prediction_type)
    models = {"base": (base.eval(), base.trajectory_flops(visited))}
    for spec in tune.candidates:
        record = tune.result(spec["index"])
        if record is not None and "failed" not in record:
            router = load_bundle(tune.dir / spec["dir"] / record["bundle"]).router.eval()
            models[spec["name"]] = (router, router.trajectory_flops(visited))
    return models


def model_ids(tune) -> dict:
    """name -> the identity of the weights a cached measurement belongs to: for the base a sha256 over its
    saved files' sha256s, for a candidate the sha256 of its bundle manifest's file list (every file's size and sha256).
    A candidate trained again (its directory deleted, or other settings) gets a new identity, so values
    cached under its name are measured again rather than reused."""
    ids = {"base": sha256_tree(tune.base_run.dir / "base" / FINAL_DIR)}
    for spec in tune.candidates:
        record = tune.result(spec["index"])
        if record is not None and "failed" not in record:
            manifest = read_json_file(tune.dir / spec["dir"] / record["bundle"] / "manifest.json",
                                      f"delete {tune.dir / spec['dir']} to train candidate {spec['name']} again")
            ids[spec["name"]] = hashlib.sha256(json.dumps(manifest["files"], sort_keys=True).encode()).hexdigest()
    return ids


# -- screening ---------------------------------------------------------------------------------------------------
def screen_protocol(run, key: str) -> dict:
    """How measure `key` (of SCREENING_MEASURES) screens with Run `run`'s held-out images: its name and settings
    (timesteps or strata), the number of held-out images it uses and the seed of their noise."""
    measure = SCREENING_MEASURES[key]
    return {"name": measure.name, **measure.settings, "images": min(len(run.split()[1]), HELD_OUT_IMAGES),
            "seed": run.config.seed}


def _screening_cache(directory: Path, run) -> dict:
    """screening.json's measures whose protocol still holds (key -> {"protocol", "unit", "values"}), each model's
    value checked as a cache entry (_value_problem: a damaged one is warned about and measured again); a file of an
    older layout holds no model identities and is measured again."""
    path = directory / "screening.json"
    cache = measurement_cache(path, _screening_problem) or {}
    measures = cache["measures"] if cache.get("format") == SCREENING_FORMAT else {}
    return {key: {**m, "values": sound_entries(path, m["values"], lambda v, key=key: _value_problem(v, key, run),
                                               f"the {key} value of model")}
            for key, m in measures.items() if key in SCREENING_MEASURES and m["protocol"] == screen_protocol(run, key)}


def _screening_problem(data: dict) -> str | None:
    """What is wrong with the layout of screening.json (as screen writes it); None when sound or of another format
    (measured again anyway)."""
    measures = data.get("measures")
    if data.get("format") == SCREENING_FORMAT and not (isinstance(measures, dict) and all(
            isinstance(m, dict) and {"protocol", "unit", "values"} <= set(m) for m in measures.values())):
        return "'measures' must map each measure to {'protocol', 'unit', 'values'}"
    return None


def _value_problem(value: dict, key: str, run) -> str | None:
    """What is wrong with one model's cached value of measure `key` (ScreeningMeasure.measure's dict and the
    weights' "model" identity: a value and a per-image list of the protocol's length, finite and not below what the
    measure gives, an SE >= 0, NaN only for one image); None when sound."""
    images, lowest = screen_protocol(run, key)["images"], SCREENING_MEASURES[key].lowest
    problem = numbers_problem(value, ["per_image"], minimum=lowest, count=images)
    if problem:
        return problem
    if not is_number(value.get("value"), lowest):
        return f"'value' must be a finite number >= {lowest:g}, got {value.get('value')!r}"
    se = value.get("se")
    if not (is_number(se, 0) or (images == 1 and isinstance(se, float) and math.isnan(se))):
        return f"'se' must be a finite number >= 0, got {se!r}"
    return None if isinstance(value.get("model"), str) else "no 'model' (the weights' identity)"


def screen(tune, models: dict) -> dict:
    """Every screening measure (SCREENING_MEASURES) of every model, paired: the same held-out images,
    timesteps and noise for all (the run's seed). Cached in screening.json per measure with its protocol and
    each value with its model's identity (model_ids): a model or measure not measured under the current
    protocol, or measured on other weights, is measured, the rest reused.

    Returns name -> {key: {"value", "se", "per_image", "vs_base": {"mean", "se"} (value - the base's, image by
    image)} for each key of SCREENING_MEASURES}.
    """
    run = tune.base_run
    _, held_out = run.split()
    measures = _screening_cache(tune.dir, run)
    for key, measure in SCREENING_MEASURES.items():
        measures.setdefault(key, {"protocol": screen_protocol(run, key), "unit": measure.unit, "values": {}})
    ids = model_ids(tune)
    missing = [name for name in models
               if any(m["values"].get(name, {}).get("model") != ids[name] for m in measures.values())]
    if missing:
        start = clock()
        for name in missing:
            model = models[name][0]
            labels = run.labels(model)[1]
            said = []
            for key, measure in SCREENING_MEASURES.items():
                values = measures[key]["values"]
                if values.get(name, {}).get("model") != ids[name]:
                    values[name] = {**measure.measure(model, held_out, run.scheduler, seed=run.config.seed,
                                                      labels=labels), "model": ids[name]}
                d = measure.decimals
                said.append(f"{measure.name} {values[name]['value']:.{d}f} ± {values[name]['se']:.{d}f}")
            tune.say(f"screening: {name}: {', '.join(said)}")
        atomic_write_text(tune.dir / "screening.json",
                          json.dumps({"format": SCREENING_FORMAT, "measures": measures}, indent=2))
        record_phase(tune.dir, "screening", since(start))
    return {name: {key: {**m["values"][name], "vs_base": paired(m["values"][name]["per_image"],
                                                                 m["values"]["base"]["per_image"])}
                   for key, m in measures.items()}
            for name in models}


# -- the finalists' FID and sampling time ----------------------------------------------------------------------
def fid_protocol(tune) -> dict:
    """What a cached per-seed FID depends on besides the point (model and setting) and the seed: the reference
    setting, images per seed and the feature network's design and version (its data are the base run's)."""
    return {"reference": str(tune.reference), "samples": tune.config.fid_samples, "feature_net": DEFAULT_FEATURE_NET,
            "features_version": FEATURES_VERSION}


def _fid_cache(tune, net) -> dict:
    """fid.json when its format and protocol still hold (a changed feature network, sampler or sample count
    starts over: its FIDs are in another unit), each point's scores checked as a cache entry (_point_problem: a
    damaged one is warned about and measured again), else a new one with the judge's real-vs-real FID measured."""
    run, protocol, path = tune.base_run, fid_protocol(tune), tune.dir / "fid.json"
    cache = measurement_cache(path, _fid_problem) or {}
    if cache.get("format") == FID_FORMAT and cache.get("protocol") == protocol:
        return {**cache, "models": sound_entries(path, cache.get("models"), _point_problem, "point")}
    return {"format": FID_FORMAT, "protocol": protocol, "models": {},
            "feature_net": getattr(net, "description", type(net).__name__),
            "reference": {"name": Path(run.data.name).name, "count": len(run.data.images)},
            "judge": judge_protocol(run.data.images, net, tune.config.fid_samples)}


def _fid_problem(data: dict) -> str | None:
    """What is wrong with fid.json's judge and reference (as _fid_cache writes them: the margin a finite FID >= 0,
    the real-vs-real record, the reference data's name); None when sound or of another format."""
    if data.get("format") != FID_FORMAT:
        return None
    judge, reference = data.get("judge"), data.get("reference")
    real = judge.get("real_vs_real") if isinstance(judge, dict) else None
    if not (isinstance(real, dict) and is_number(judge.get("margin"), 0) and is_number(judge.get("alpha"), 0, 1)
            and isinstance(judge.get("margin_from"), str) and is_number(real.get("n"), 1)
            and is_number(real.get("fid_mean"), 0) and is_number(real.get("fid_sd"), 0)):
        return "'judge' must hold a margin (a finite FID >= 0), its source, alpha and the real-vs-real FID"
    if not (isinstance(reference, dict) and isinstance(reference.get("name"), str)):
        return "'reference' must name the reference data"
    return None


def _point_problem(entry: dict) -> str | None:
    """What is wrong with one point's cached per-seed scores (_measure_seeds': FID >= 0, KID, precision and recall
    in [0, 1], one of each per seed, finite; the weights' identity and the setting); None when sound."""
    if not (isinstance(entry.get("model"), str) and isinstance(entry.get("setting"), str)):
        return "no 'model' (the weights' identity) or 'setting'"
    seeds = len(entry["fid"]) if isinstance(entry.get("fid"), list) else None
    return (numbers_problem(entry, ["fid"], minimum=0.0, count=seeds) or numbers_problem(entry, ["kid"], count=seeds)
            or numbers_problem(entry, ["precision", "recall"], minimum=0.0, maximum=1.0, count=seeds))


def _measure_seeds(tune, cache: dict, models: dict, names: list[str], seeds: int, net, ids: dict) -> int:
    """Give every point in `names` (tune.point: row name -> (model name, setting)) FID/KID/precision/recall for
    sampling seeds 0 .. seeds - 1 (evaluate.score_seeds), measuring only the seeds not cached for its current
    weights and setting; fid.json is written after each point. Returns the number of (point, seed) pairs sampled."""
    run, t = tune.base_run, tune.config
    sampled = 0
    for name in names:
        model, setting = tune.point(name)
        entry = cache["models"].get(name)
        if entry is None or entry["model"] != ids[model] or entry.get("setting") != str(setting):
            entry = cache["models"][name] = {"model": ids[model], "setting": str(setting),
                                             **{k: [] for k in SEED_SCORES}}
        have = len(entry["fid"])
        if have >= seeds:
            continue
        results, _, _ = score_seeds(name, SamplingModel(models[model][0]), run.scheduler, run.data.images, net,
                                    seeds=range(have, seeds), sample_shape=run.sample_shape, sampler=setting.sampler,
                                    steps=setting.steps, num_samples=t.fid_samples,
                                    reference_name=cache["reference"]["name"], num_classes=run.data.num_classes,
                                    say=tune.say, cache_interval=setting.cache_interval,
                                    cache_depth=setting.cache_depth)
        for result in results:
            for key, field in SEED_SCORES.items():
                entry[key].append(getattr(result, field))
        atomic_write_text(tune.dir / "fid.json", json.dumps(cache, indent=2))
        sampled += len(results)
    return sampled


def fid(tune, models: dict, names: list[str]) -> dict:
    """The reference's ("base") and the finalists' (row names of tune.points) per-seed FID/KID/precision/recall,
    with sampling seeds added one at a time
    until every finalist's verdict against the base is decided or TuneConfig.max_fid_seeds is reached.

    Every finalist starts at TuneConfig.fid_seeds seeds; after each look (verdict.sequential: the error is spent
    over the looks fid_seeds .. max_fid_seeds) each undecided finalist and the base get the next seed. The margin
    is TuneConfig.margin, else the real-vs-real spread (evaluate.judge_protocol). Scores are cached in fid.json per
    model identity (model_ids) and seed: a rerun replays the same looks over them and samples only what is missing.
    Returns fid.json's dict ("judge": the margin in use and where it came from) plus "verdicts" (finalist ->
    verdict.sequential's judgement) and "seeds" (model -> how many seeds its verdict used; the base: the most any
    finalist used).
    """
    run, t = tune.base_run, tune.config
    net = default_feature_net(run.data.images, run.data.labels, name=Path(run.data.name).name)
    cache = _fid_cache(tune, net)
    judge = cache["judge"] if t.margin is None else {**cache["judge"], "margin": t.margin, "margin_from": "--margin"}
    margin = judge["margin"]
    ids, start = model_ids(tune), clock()
    pending, verdicts, seeds, sampled = list(names), {}, t.fid_seeds, 0
    tune.say(f"finalists: FID/KID/precision/recall, {t.fid_samples} images per seed, from {t.fid_seeds} seeds up to "
             f"{t.max_fid_seeds} until decided; margin {margin:.3f} FID")
    while True:
        sampled += _measure_seeds(tune, cache, models, ["base", *pending], seeds, net, ids)
        base = cache["models"]["base"]["fid"][:seeds]
        for name in pending:
            verdicts[name] = sequential(base, cache["models"][name]["fid"][:seeds], margin, start=t.fid_seeds,
                                        cap=t.max_fid_seeds)
            tune.say(f"finalists: {name} after {seeds} seeds: {describe(verdicts[name])}")
        pending = [n for n in pending if not verdicts[n]["done"]]
        if not pending:
            break
        seeds += 1
    if sampled:
        record_phase(tune.dir, "finalists", since(start))
    used = {n: verdicts[n]["pairs"] for n in names}
    return {**cache, "judge": judge, "verdicts": verdicts,
            "seeds": {"base": max(used.values(), default=t.fid_seeds), **used}}


def time_models(tune, models: dict, names: list[str], batch: int) -> dict:
    """name -> the seconds of one full sampling run at `batch` in each timed round (TuneConfig.timing_repeats of
    them) per point (tune.point: row name -> (model name, setting); evaluate.time_rounds: every point measured,
    interleaved, after a warm-up, round r of every point a pair; class-balanced labels for a class-conditional
    base); thread CPU seconds with one thread on a CPU, wall seconds on a GPU."""
    run, points = tune.base_run, [tune.point(n) for n in names]
    runners = {m: SamplingModel(models[m][0]) for m in dict.fromkeys(m for m, _ in points)}
    times = time_rounds([runners[m] for m, _ in points], run.scheduler, sample_shape=run.sample_shape,
                        sampler=None, steps=None, batch=batch, repeats=tune.config.timing_repeats,
                        num_classes=run.data.num_classes, settings=[s for _, s in points])
    return dict(zip(names, times))

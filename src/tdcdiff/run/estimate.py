"""`--dry-run`: the expected compute of each phase of `tdcdiff run` and `tdcdiff tune`, before any of it.

Everything is scaled from three measurements of the given model on this machine (`measure_unit_costs`): one base
forward, one training step (forward and backward, then AdamW's update) and one pruning trial (a uniformly pruned
copy and its FLOPs count). On a CPU they are thread CPU seconds with one thread, at the run's batch sizes, or for
a big model at CPU_BATCH samples scaled linearly (its forward is compute-bound); on a GPU, CUDA-event seconds at
the run's batch sizes. Each phase counts the forwards and steps the stage code takes (proxy batches, timing rounds,
sampling runs), a pruned model's at its FLOPs fraction of the base's. Nothing is written.

Not counted: reading and encoding the data, the search's bookkeeping beyond its trials, the FID feature network's
training (once per data set, then cached), and on a GPU how throughput changes with the batch size.
"""

from __future__ import annotations

import contextlib
import copy
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..base_model import load_base_model
from ..budget import budget_fractions
from ..evaluate import BPD_SAMPLES, HELD_OUT_IMAGES
from ..flops import count_flops
from ..latency import LONG_FORWARD_REPEATS, LONG_FORWARD_SECONDS, one_thread, timing_batch
from ..models import as_denoiser, build_unet, network, preset_for
from ..prune.engine import prune_kept
from ..prune.importance import BY_POSITION
from ..prune.plan import plan_for
from ..prune.units import prunable_units
from ..sampling_setting import SamplingSetting
from ..settings import apply_overrides
from ..train import FINAL_DIR
from .plan_file import check_plan_fits, load_plan
from .stages import Stages

CPU_BATCH = 8  # samples per measured forward and step on a CPU (a big model's per-sample cost is flat above a few)
FULL_BATCH_SECONDS = 2.0  # ... unless the whole batch takes less: then it is measured as it is
PROXY_BATCH = 128  # ProxyBatch.make's default size: the plan's sensitivity and each group's proxy
TRIALS_PER_FIT = 12  # pruned copies a budget fit builds (a bisection of up to 12 steps, then repairs)
SENSITIVITY_RATIO = 0.3  # measure_sensitivity's trial pruning
LOSS_POINTS = 100  # timesteps of the held-out loss (evaluate's, tune's screening, the plan's "loss" grouping)
REPORT_TIMING = ((1, 64), 3)  # the report's timing batches and repeats (report_for_run's defaults)


@dataclass(frozen=True)
class UnitCosts:
    """Measured on this machine for one model: seconds per sample of a forward and of a training step's forward
    and backward, seconds of an optimizer update and of one pruning trial, the FLOPs fraction of the plan's trial
    pruning, the device, and what the seconds are."""

    forward: float
    step: float
    update: float
    trial: float
    trial_fraction: float
    device: str
    clock: str

    def training(self, steps: int, batch: int, fraction: float = 1.0) -> float:
        """Seconds of `steps` training steps at `batch` of a model of `fraction` of the base's FLOPs."""
        return steps * (batch * self.step + self.update) * fraction


@dataclass(frozen=True)
class Phase:
    """One phase of an estimate: its name, the work counted (text) and its expected seconds."""

    name: str
    work: str
    seconds: float


def _seconds(device: torch.device, run) -> float:
    """Seconds of run() after one untimed call: thread CPU time on a CPU, CUDA events on a GPU."""
    run()
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000
    start = time.thread_time()
    run()
    return time.thread_time() - start


def _per_sample(device: torch.device, run, batch: int) -> float:
    """Seconds per sample of run(batch): at the batch itself on a GPU; on a CPU at CPU_BATCH samples, or at the
    batch itself when that takes under FULL_BATCH_SECONDS (a small model's per-sample cost still falls there)."""
    if device.type == "cuda" or batch <= CPU_BATCH:
        return _seconds(device, lambda: run(batch)) / batch
    seconds = _seconds(device, lambda: run(CPU_BATCH))
    if seconds * batch / CPU_BATCH >= FULL_BATCH_SECONDS:
        return seconds / CPU_BATCH
    return _seconds(device, lambda: run(batch)) / batch


def measure_unit_costs(model, sample_shape: tuple[int, int, int], *, forward_batch: int, train_batch: int,
                       device: str | torch.device = "cpu", units=None, ignored_layers=()) -> UnitCosts:
    """One forward at forward_batch and one training step at train_batch (see _per_sample for the batch a CPU
    measures at) of a copy of `model` on `device`, and one pruning trial on the CPU (every unit pruned by
    SENSITIVITY_RATIO, then its FLOPs counted). units, ignored_layers: the decision space (SearchConfig's)."""
    device = torch.device(device)
    net = as_denoiser(copy.deepcopy(model)).to(device)
    inputs = {}

    def batch_of(size):
        if size not in inputs:
            x = torch.randn((size, *sample_shape), generator=torch.Generator().manual_seed(0)).to(device)
            inputs[size] = (x, torch.zeros(size, dtype=torch.long, device=device))
        return inputs[size]

    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-9)

    def backward(size):
        optimizer.zero_grad(set_to_none=True)
        net(*batch_of(size)).float().pow(2).mean().backward()

    with one_thread() if device.type == "cpu" else contextlib.nullcontext():
        with torch.no_grad():
            forward = _per_sample(device, lambda size: net(*batch_of(size)), forward_batch)
        net.train()
        step = _per_sample(device, backward, train_batch)
        update = _seconds(device, optimizer.step)
        plan = plan_for(network(model), sample_shape, units=units, ignored_layers=ignored_layers)
        clock = time.perf_counter if device.type == "cuda" else time.thread_time
        start = clock()  # a budget fit's trial: the pruned copy, then its FLOPs
        pruned = prune_kept(model, plan, plan.kept(dict.fromkeys((u.name for u in plan.units), SENSITIVITY_RATIO)),
                            sample_shape, BY_POSITION, None)
        flops = count_flops(as_denoiser(pruned), sample_shape)
        trial = clock() - start
        fraction = flops / count_flops(as_denoiser(model), sample_shape)
    clock = "GPU-s (CUDA events)" if device.type == "cuda" else "CPU-s (thread CPU time, one thread)"
    return UnitCosts(forward, step, update, trial, fraction, str(device), clock)


def timed_forwards(seconds_per_forward: float, repeats: int = 7, warmup: int = 2) -> int:
    """Forwards latency.compare runs to time one model: its warm-up and rounds (fewer for long forwards), and
    for short ones about one more to calibrate."""
    if seconds_per_forward >= LONG_FORWARD_SECONDS:
        return 1 + min(repeats, LONG_FORWARD_REPEATS)
    return warmup + repeats + 1


def fractions_of(config, run: Stages | None = None) -> list[float]:
    """Each group's budget as a fraction of the base: the plan's when the run `run` (of settings `config`) has a
    plan.json, checked as its plan stage checks it (plan_file.check_plan_fits: an edited plan or one of another run
    raises ValueError), else the settings' (the given fractions, or the paper's formula scaled to the mean budget,
    the groups taken as equally long)."""
    path = None if run is None else run.dir / "plan" / "plan.json"
    if path is not None and path.exists():
        plan = load_plan(path)
        check_plan_fits(plan, path, run)
        return list(plan.fractions)
    if config.plan_fractions is not None:
        return list(config.plan_fractions)
    fractions = budget_fractions(config.groups, config.k)
    if config.mean_budget is not None:
        scale = config.mean_budget / (sum(fractions) / len(fractions))
        fractions = [min(1.0, f * scale) for f in fractions]
    return fractions


def base_for_estimate(stages: Stages):
    """(the run's base: trained, given, or built untrained (time does not depend on the weights), its sample
    shape). A base built here passes stage 1's checks first (Stages.check_new_base): raises ValueError as the
    run would."""
    c = stages.config
    if (stages.dir / "base" / FINAL_DIR).exists():
        return stages.base_model(), stages.sample_shape
    if c.base_model:
        loaded = load_base_model(c.base_model)
        shape = stages.sample_shape
        if loaded.vae is not None:  # latent diffusion: the model denoises the VAE's latents
            factor = 2 ** (len(loaded.vae.config.block_out_channels) - 1)
            shape = (loaded.vae.config.latent_channels, shape[1] // factor, shape[2] // factor)
        return loaded.model, shape
    height, width = stages.data.images.shape[2:]
    preset = c.model or preset_for(stages.data.image_size, stages.data.channels)
    model = build_unet(preset, attention=c.attention, sample_size=height if height == width else (height, width),
                       in_channels=stages.data.channels, num_train_timesteps=c.num_train_timesteps)
    stages.check_new_base(model, f"the UNet preset {preset!r}")  # what the run would refuse, refused here too
    return model, stages.sample_shape


def plan_phase(c, u: UnitCosts) -> Phase:
    """The plan of a run with settings `c`: the reachability check, and the difficulty measured under a trial
    pruning (or the loss)."""
    seconds, work = 2 * u.trial, "the budgets' reachability (a pruning trial)"
    if c.plan_fractions is None and c.ordering == "measured":
        seconds += c.groups * PROXY_BATCH * (1 + u.trial_fraction) * u.forward
        work += (f", {c.groups} groups x {PROXY_BATCH} images through the base and its {SENSITIVITY_RATIO:.0%} "
                 "pruning")
    if c.grouping == "loss":
        seconds += LOSS_POINTS * 64 * u.forward
        work += f", the base's loss at {LOSS_POINTS} timesteps x 64 images"
    return Phase("plan", work, seconds)


def search_phase(c, u: UnitCosts, fractions: list[float], base, sample_shape) -> Phase:
    """Every group's pruning search in settings `c` and the timing of its expert (and of the base, once)."""
    s = c.search
    searched = [f for f in fractions if f < 1]
    candidates = s.rounds * s.candidates_per_round
    fit = TRIALS_PER_FIT * u.trial + (u.training(s.proxy_finetune_steps, 64) if s.proxy_finetune_steps else 0)
    batch = c.latency_batch if c.budget_unit == "time" else timing_batch(base, sample_shape, c.latency_batch)
    batch_forward = batch * u.forward
    timing = sum(timed_forwards(batch_forward * f) * batch_forward * f for f in searched)
    timing += timed_forwards(batch_forward) * batch_forward if searched else 0.0  # the base, once
    seconds = timing + sum(PROXY_BATCH * u.forward + candidates * (fit + PROXY_BATCH * f * u.forward)
                           for f in searched)
    work = (f"{len(searched)} of {len(fractions)} groups ({len(fractions) - len(searched)} keep the whole base), "
            f"{candidates} candidates each: {TRIALS_PER_FIT} pruning trials + a {PROXY_BATCH}-image proxy score; each "
            f"expert and the base timed once at batch {batch} ({timing:.0f} s)")
    if c.budget_unit == "time" and searched:
        units = len(prunable_units(base, units=s.units, ignored_layers=s.ignored_layers))
        table = units * 7 * timed_forwards(batch_forward, 5, 1) * batch_forward * 0.8
        seconds += table
        work += f"; the latency table: {units} units x 6 levels beside the base ({table:.0f} s, then cached)"
    return Phase("prune search", work, seconds)


def sampling_seconds(u: UnitCosts, images: int, steps: int, fraction: float = 1.0) -> float:
    """Seconds of sampling `images` images in `steps` steps with a model of `fraction` of the base's FLOPs."""
    return images * steps * fraction * u.forward


def run_phases(stages: Stages, u: UnitCosts, base, sample_shape, fractions: list[float]) -> list[Phase]:
    """The phases of `tdcdiff run` in these settings, the groups' budgets at `fractions` (fractions_of): stage 1,
    plan, prune search, stage 2, bundle, samples and report (a phase whose output exists costs nothing)."""
    c, out = stages.config, stages.dir
    mean = sum(fractions) / len(fractions)  # sampling: the groups' FLOPs, the steps spread over them
    steps = c.base_model_steps if c.base_model else c.base.steps
    phases = [Phase("stage 1", f"{steps} steps at batch {c.base.batch_size}", u.training(steps, c.base.batch_size)),
              plan_phase(c, u), search_phase(c, u, fractions, base, sample_shape)]
    teacher = c.finetune.batch_size * u.forward if c.finetune.uses_teacher else 0.0
    stage2 = sum(u.training(c.finetune.steps, c.finetune.batch_size, f) + c.finetune.steps * teacher
                 for f in fractions)
    phases.append(Phase("stage 2", f"{len(fractions)} groups x {c.finetune.steps} steps at batch "
                                   f"{c.finetune.batch_size}, each at its budget", stage2))
    phases.append(Phase("bundle", "a probe forward and FLOPs count per expert", 2 * len(fractions) * u.forward))
    grids = sampling_seconds(u, c.num_samples, c.sampling_steps, 1 + mean)
    phases.append(Phase("sample grids", f"{c.num_samples} images x {c.sampling_steps} {c.sampler} steps, base and "
                                        "TDC", grids))
    fid = sampling_seconds(u, c.eval_samples * c.eval_seeds, c.sampling_steps, 1 + mean)
    batches, repeats = REPORT_TIMING
    timing = sum(sampling_seconds(u, b * (repeats + 1), c.sampling_steps, 1 + mean) for b in batches)
    held_out = (LOSS_POINTS + BPD_SAMPLES) * HELD_OUT_IMAGES * (1 + mean) * u.forward
    phases.append(Phase("report", f"FID/KID: {c.eval_seeds} seeds x {c.eval_samples} images per model; timing at "
                                  f"batches {batches}; held-out loss and bits/dim", fid + timing + held_out))
    last = len(fractions) - 1
    done = {"stage 1": out / "base" / FINAL_DIR, "plan": out / "plan" / "plan.json",
            "prune search": out / "prune" / f"summary_{last}.json", "stage 2": out / "finetune" / f"group_{last}" /
            FINAL_DIR, "bundle": out / "bundle", "sample grids": out / "samples" / "tdc.png", "report": out / "report"}
    return [Phase(p.name, "done", 0.0) if p.name in done and done[p.name].exists() else p for p in phases]


def format_phases(title: str, phases: list[Phase], u: UnitCosts) -> str:
    """The estimate as text: one line per phase, the total, and what it was measured from."""
    def shown(seconds: float) -> str:
        return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min" if seconds >= 60 \
            else f"{seconds:.0f} s"

    unit = u.clock.split(" ")[0]
    width = max(len(p.name) for p in phases)
    lines = [title, f"{'phase':<{width}}  {unit:>9}  work"]
    lines += [f"{p.name:<{width}}  {shown(p.seconds):>9}  {p.work}" for p in phases]
    total = sum(p.seconds for p in phases)
    lines.append(f"{'total':<{width}}  {shown(total):>9}  = {total / 3600:.2f} {unit.removesuffix('-s')}-hours here")
    lines.append(f"measured on {u.device}, {u.clock}: a forward {u.forward * 1e3:.2f} ms per sample, a training "
                 f"step {u.step * 1e3:.2f} ms per sample + {u.update * 1e3:.0f} ms per update, a pruning trial "
                 f"{u.trial:.2f} s; pruned models counted at their FLOPs fraction")
    return "\n".join(lines)


def estimate_run(stages: Stages) -> str:
    """`tdcdiff run --dry-run`: the expected compute of each phase of this run (see the module doc). Raises
    ValueError where the run would refuse to start (Stages.check_new_base, the report's data included) or its plan
    stage would refuse its plan.json (plan_file.check_plan_fits), before measuring anything."""
    stages.report_follows = True  # `tdcdiff run` ends with the report
    fractions = fractions_of(stages.config, stages)  # an existing plan checked first, as its stage would
    u, base, shape = unit_costs_for(stages)
    phases = run_phases(stages, u, base, shape, fractions)
    return format_phases(f"expected compute of `tdcdiff run` in {stages.dir}", phases, u)


def unit_costs_for(stages: Stages) -> tuple[UnitCosts, object, tuple[int, int, int]]:
    """(UnitCosts of the run's base on the run's device, the base, its sample shape)."""
    c = stages.config
    model, shape = base_for_estimate(stages)
    model = model.to(c.torch_device)
    costs = measure_unit_costs(model, shape, forward_batch=c.latency_batch, train_batch=c.finetune.batch_size,
                               device=c.torch_device, units=c.search.units, ignored_layers=c.search.ignored_layers)
    return costs, model, shape


def tune_phases(stages: Stages, settings, candidates: list[dict], u: UnitCosts, base, sample_shape) -> list[Phase]:
    """The phases of `tdcdiff tune`: stage 1, each candidate (its search and its training, tune_steps stage-2
    steps of the base in FLOPs), screening, the finalists' FID/KID and the timing. settings: the TuneConfig;
    candidates: its candidate list (tune.candidate_list)."""
    c = stages.config
    steps = c.base_model_steps if c.base_model else c.base.steps
    done = (stages.dir / "base" / FINAL_DIR).exists()
    phases = [Phase("stage 1", "done" if done else f"{steps} steps at batch {c.base.batch_size}",
                    0.0 if done else u.training(steps, c.base.batch_size))]
    training = u.training(settings.tune_steps, c.finetune.batch_size)
    for spec in candidates:
        search, what = 0.0, "training"
        if spec["kind"] in ("tdc", "tdc-curves"):  # curves' budgets taken as the formula's
            candidate = apply_overrides(c, spec.get("settings", {}))
            search = (plan_phase(candidate, u).seconds
                      + search_phase(candidate, u, fractions_of(candidate), base, sample_shape).seconds)
            what = "plan + pruning search + training"
        elif spec["kind"] == "uniform":
            search, what = TRIALS_PER_FIT * u.trial, "a uniform fit + training"
        if spec["kind"] == "tdc-curves":
            search += len(settings.curve_sizes) * u.training(settings.curve_steps, c.finetune.batch_size)
        phases.append(Phase(f"[{spec['index']}] {spec['name']}", what, search + training))
    models = len(candidates) + 1
    screening = models * (LOSS_POINTS + BPD_SAMPLES) * HELD_OUT_IMAGES * u.forward
    phases.append(Phase("screening", f"{models} models: held-out loss and bits/dim on {HELD_OUT_IMAGES} images",
                        screening))
    finalists = min(settings.finalists, len(candidates)) + 1
    fid = sampling_seconds(u, finalists * settings.fid_seeds * settings.fid_samples, c.sampling_steps)
    phases.append(Phase("FID/KID", f"{finalists} models x {settings.fid_seeds} seeds x {settings.fid_samples} "
                                   f"images x {c.sampling_steps} steps (at the base's cost)", fid))
    phases.append(_ladder_phase(settings, finalists, u, c.sampling_steps))
    batches = sorted({1, 64, settings.batch})
    timing = sampling_seconds(u, models * (settings.batch + 1) * (settings.timing_repeats + 1), c.sampling_steps)
    timing += sum(sampling_seconds(u, 2 * b * (settings.timing_repeats + 1), c.sampling_steps) for b in batches)
    phases.append(Phase("timing", f"{models} models at batch {settings.batch} and 1, then base and chosen at batches "
                                  f"{batches} (at the base's cost)", timing))
    return phases


def _ladder_phase(settings, crossed: int, u: UnitCosts, reference_steps: int) -> Phase:
    """The sampling settings' cost (tune/ladder.py): `crossed` models (the base and the finalists) x the ladder's
    settings, each with the sample screen's images, timed at the user's batch and at 1, and up to two settings per
    model at FID's start seeds; at each setting's steps, at the base's cost per forward (feature caching counted as
    full passes: an upper bound)."""
    ladder = [SamplingSetting.parse(t) for t in settings.settings]
    target = max(200, 4 * reference_steps)
    steps = sum(s.steps for s in ladder) + reference_steps
    images = settings.screen_samples + (settings.batch + 1) * (settings.timing_repeats + 1)
    seconds = crossed * sampling_seconds(u, images, steps) if ladder else 0.0
    if ladder:
        seconds += sampling_seconds(u, settings.screen_samples, target)
        seconds += sampling_seconds(u, crossed * 2 * settings.fid_seeds * settings.fid_samples,
                                    max(s.steps for s in ladder))
    return Phase("sampling settings", f"{crossed} models x {len(ladder)} settings: sample screen "
                                      f"({settings.screen_samples} images), timing, FID of the picks", seconds)


def estimate_tune(tune_dir: str | Path, settings, candidates: list[dict], *, overrides: dict | None = None,
                  base_from: str | Path | None = None) -> str:
    """`tdcdiff tune --dry-run`: the expected compute of each phase of tuning (see tune_phases), measured on the
    base of `base_from` (a run directory with a finished stage 1) or of the base run tune would make in tune_dir.
    Nothing is written."""
    stages = Stages(Path(base_from) if base_from is not None else Path(tune_dir) / "base", overrides=overrides,
                    progress=False)
    u, base, shape = unit_costs_for(stages)
    return format_phases(f"expected compute of `tdcdiff tune` in {tune_dir} ({len(candidates)} candidates)",
                         tune_phases(stages, settings, candidates, u, base, shape), u)

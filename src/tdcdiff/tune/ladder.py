"""The joint space `tdcdiff tune` searches: every model (the base and the trained candidates) crossed with a ladder
of sampling settings (sampler, steps, feature caching), judged against the base at a reference setting; which of
them go to FID (by the sample screen, sample_screen.py), and where the speed of the choice comes from.

A point of the space is one row of the frontier: a model sampled with one setting. Its name is the model's at the
reference setting (so "base" is the reference itself) and "<model> @ <setting>" at any other.
"""

from __future__ import annotations

from ..pipeline import SamplingModel
from ..sampling_setting import SamplingSetting
from ..verdict import QUALIFY

# Solver changes first (what a user can do for free), then feature caching (DeepCache, CVPR 2024, interval 3).
DEFAULT_LADDER = ("dpm-solver++:20", "dpm-solver++:10", "unipc:10", "dpm-solver++:6", "ddim:50:c3")
# The sample screen's slack over the model's own distance (to the base's high-step target) at the reference
# setting. It drops broken settings (ddim:2: 2x and more), not merely worse ones: FID decides among the rest. On
# digits, 3 training seeds (tunes of /work/runs/digits-s{0,1,2}, base at DDIM-50 as the reference), the base's
# DPM-Solver++ 10 / UniPC 10 were at 1.30-1.59x and non-inferior by FID in every seed, its DPM-Solver++ 6 at
# 1.42-1.81x and never decided: no slack separates the two, so the slack sits above the largest setting FID passed
# (1.5, calibrated on seed 0 alone, kept seed 2's DPM-Solver++ 10 out).
SCREEN_SLACK = 1.75
SCREEN_PICKS = 2  # settings per model sent to FID: the fastest passing one, and the next in case it loses


def parse_settings(texts, option: str) -> list[SamplingSetting]:
    """The settings written as texts ("sampler:steps[:cN[:dD]]"), each once. Raises ValueError naming `option`."""
    settings = [SamplingSetting.parse(text, option) for text in texts]
    for i, setting in enumerate(settings):
        if setting in settings[:i]:
            raise ValueError(f"{option} {setting} is given twice: each setting is one row per model; give it once")
    return settings


def resolve_ladder(config, run, base=None) -> tuple[SamplingSetting, list[SamplingSetting], list[str]]:
    """(the reference setting, the ladder's settings other than it, notes on default settings left out).

    config: TuneConfig (settings, reference: None takes the run's sampler and steps). run: the base Run (its
    schedule's T). base: the base denoiser when it exists (feature caching is checked on it), else None.
    A setting of the default ladder that this base cannot take (more steps than T, caching a model that is not a
    diffusers UNet2DModel) is left out with a note; one the user gave is refused: ValueError naming the flag.
    """
    c, t = run.config, run.scheduler.config.num_train_timesteps
    if config.reference is None:
        reference = SamplingSetting(c.sampler or "ddim", c.sampling_steps)
    else:
        reference = parse_settings([config.reference], "--reference")[0]
    given = tuple(config.settings) != DEFAULT_LADDER
    checks = [("--reference", reference)] + [("--settings", s) for s in parse_settings(config.settings, "--settings")]
    kept, notes = [], []
    for option, setting in checks:
        try:
            setting.check(t)
            if setting.cache_interval > 1 and base is not None:
                SamplingModel(base).prepare_cache(setting.cache_depth or 1)
        except ValueError as err:
            if given or option == "--reference":
                raise ValueError(f"{option} {setting}: {err}") from None
            notes.append(f"default setting {setting} left out: {err}")
            continue
        if option == "--settings" and setting != reference:
            kept.append(setting)
    return reference, kept, notes


def point_name(model: str, setting: SamplingSetting, reference: SamplingSetting) -> str:
    """The row name of `model` sampled with `setting`: the model's own at the reference setting."""
    return model if setting == reference else f"{model} @ {setting}"


def pick_settings(distances: dict, times: dict, reference: SamplingSetting) -> list:
    """The settings of one model that go to FID, by the sample screen: the SCREEN_PICKS fastest settings (other
    than the reference) whose distance is at most SCREEN_SLACK x the model's own at the reference setting.

    distances: setting -> the screen distance of this model's samples at it (mean over images). times: setting ->
    its sampling time at the user's batch. The screen only drops settings that move the samples much further
    than the user's own setting does (ddim:2 moves them twice as far); FID decides among the rest, and the second
    pick is the rung below the fastest in case the fastest loses. Empty when no other setting passes.
    """
    tolerance = SCREEN_SLACK * distances[reference]
    within = sorted((s for s in distances if s != reference and distances[s] <= tolerance),
                    key=lambda s: (times[s], distances[s]))
    return within[:SCREEN_PICKS]


def fid_points(picks: dict, reference: SamplingSetting) -> list[str]:
    """The points that go to FID, in order: the base at its picked settings and at every other setting a candidate
    is picked at, then each candidate at the reference and at its picks.

    picks: model name -> its settings for FID (pick_settings; "base" first, then the candidates in screening order).
    The base at each candidate's settings is judged too, so that the headline splits the speed into the free
    setting and the model on the same settings: a screen that passes a fine-tuned model at a setting but not the
    base would otherwise credit the model with the free gain of that setting (digits, tune seed 2: the base at
    dpm-solver++:10 screened out at 1.54x the reference's distance, the model's kept, "2.06x from the model").
    """
    base = list(picks.get("base", []))
    for model, settings in picks.items():
        base += [s for s in settings if model != "base" and s not in base]
    points = [point_name("base", s, reference) for s in base]
    for model, settings in picks.items():
        if model != "base":
            points += [point_name(model, s, reference) for s in (reference, *settings)]
    return points


def spearman(xs: list[float], ys: list[float]) -> float | None:
    """Spearman's rank correlation of two equally long lists (ties get their mean rank); None below 3 pairs or
    when one list is constant."""
    if len(xs) < 3:
        return None
    from scipy.stats import spearmanr

    if len(set(xs)) < 2 or len(set(ys)) < 2:
        return None
    return float(spearmanr(xs, ys).statistic)


def within_model_agreement(rows: list[dict]) -> dict:
    """How often the sample screen orders two settings of the same model as FID does (mean FID over seeds): the
    screen picks settings per model (pick_settings), so these are the pairs it decides. rows: tune rows with
    "model", "screen_distance" and "fid" (a list per seed); rows missing either are left out.
    Returns {"agree": pairs ordered alike, "pairs": pairs compared} (ties in either measure count as not alike)."""
    both = [r for r in rows if r["screen_distance"] is not None and r["fid"]]
    agree = pairs = 0
    for i, a in enumerate(both):
        for b in both[i + 1:]:
            if a["model"] == b["model"]:
                pairs += 1
                fid_order = sum(a["fid"]) / len(a["fid"]) - sum(b["fid"]) / len(b["fid"])
                agree += (a["screen_distance"] - b["screen_distance"]) * fid_order > 0
    return {"agree": agree, "pairs": pairs}


def best_free(rows: list[dict]) -> dict:
    """The best free setting: the fastest row of the base (any setting) whose FID is better than or non-inferior
    to the reference's, else the reference row itself ("base")."""
    free = [r for r in rows if r["model"] == "base" and (r["name"] == "base" or (
        r["fid_gap"] is not None and r["fid_gap"]["verdict"] in QUALIFY))]
    return min(free, key=lambda r: (r["time_s"], r["name"] != "base"))


def headline(rows: list[dict], chosen: str | None, batch: int, min_model_speedup: float = 0.0) -> dict:
    """Where the chosen row's speed comes from, at batch 1 and the user's batch: X = the reference's time / the
    chosen's, Y = the reference's / the best free setting's (the sampler and steps alone), Z = the best free
    setting's / the chosen's (what the model adds); X = Y x Z. Without a choice the reference itself is shipped.
    When the base was also timed at the chosen's setting, Z is split further: Z = S x A, S = the free setting's
    time / the base's at the chosen's setting (the steps the model holds quality at and the base does not: a model
    fine-tuned longer can gain here with no pruning at all), A = the base's / the chosen's at that setting (its
    architecture: pruning). min_model_speedup: the choice's bar for another model over the free setting
    (judge.choose), for the text.
    Returns {"chosen", "best_free", "by_batch": {batch: {"total", "free", "model"[, "setting", "architecture"]}},
    "text"}."""
    by_name = {r["name"]: r for r in rows}
    ref, free = by_name["base"], best_free(rows)
    shipped = by_name[chosen] if chosen is not None else ref
    base_there = next((r for r in rows if r["model"] == "base" and r["setting"] == shipped["setting"]), None)
    split = shipped["model"] != "base" and base_there is not None
    out = {}
    for b, key in ((1, "time_1_s"), (batch, "time_s")):
        out[str(b)] = {"total": ref[key] / shipped[key], "free": ref[key] / free[key],
                       "model": free[key] / shipped[key]}
        if split:
            out[str(b)].update(setting=free[key] / base_there[key], architecture=base_there[key] / shipped[key])
    parts = []
    for b, v in out.items():
        part = (f"at batch {b}: {v['total']:.2f}x faster than the reference at equal quality: {v['free']:.2f}x from "
                f"the sampler/steps alone ({free['setting']}), {v['model']:.2f}x more from the model")
        if split:
            flops = shipped["flops_ratio"] / base_there["flops_ratio"]
            part += (f" ({shipped['model']}: {v['architecture']:.2f}x from its architecture, {flops:.0%} of the "
                     f"base's FLOPs, x {v['setting']:.2f}x from sampling at {shipped['setting']}"
                     + (", where the base alone was not judged as good)" if shipped["setting"] != free["setting"]
                        else ")"))
        parts.append(part)
    text = "; ".join(parts)
    if shipped["model"] == "base":
        bar = (f" by a measured {min_model_speedup:g}x (the lower 95% bound over paired timing rounds, "
               "--min-model-speedup)" if min_model_speedup > 0 else "")
        text += (f". No pruned model as good beats the best free setting{bar}: tune ships the free setting (the base "
                 f"at {shipped['setting']})")
    return {"chosen": shipped["name"], "best_free": free["name"], "by_batch": out, "text": text}

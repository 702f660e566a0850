"""A bundle's manifest.json, checked as untrusted input before anything it describes is read or built.

What is checked here, from the manifest alone: its structure; sizes within caps (T, groups, sample shape),
so that nothing is allocated for a claimed size; the noise schedule (an allowlisted DDPMScheduler rebuilt
exactly, every setting within what sampling can use); and each expert's training record against the
schedule, its group's timesteps and the sample shape. bundle.py checks the experts' files against the records.
"""

from __future__ import annotations

import hashlib
import json
import math
import re

from .feature_cache import split_unet
from .files import brief, is_count, is_sha256, json_safe, lists
from .grouping import Grouping
from .models import CLIP_TOKENS, network
from .prediction import PREDICTION_TYPES
from .sampling_setting import SamplingSetting
from .schedule import MAX_TIMESTEPS, VARIANCE_TYPES, check_sampling_schedule
from .serialization import ARCHITECTURE_FILE, allowed_class, check_arguments
from .text import TOKENIZER_FILES

FORMAT = "tdcdiff-bundle/2"
MANIFEST = "manifest.json"
REEXPORT = "re-export the bundle (delete it and run `tdcdiff bundle`, or call save_bundle again)"
MAX_MANIFEST_BYTES = 8 << 20  # kilobytes, or trained_betas for T up to ~350,000; JSON costs ~40x in memory
MAX_EXPERTS = 1000  # groups, one expert each: the paper uses up to 10
MAX_CHANNELS = 64  # sample_shape: images (1, 3) and VAE latents (4, 16)
MAX_SIDE = 1024  # ... and height, width: the load probe and every sampling step allocate per pixel
_REQUIRED = ("files", "grouping", "scheduler", "sample_shape", "expert_flops", "expert_training", "base_flops")
# The settings of the training schedule that define its noise levels and targets: each expert's record names them.
SCHEDULE_KEYS = ("prediction_type", "num_train_timesteps", "beta_schedule", "beta_start", "beta_end",
                 "rescale_betas_zero_snr", "trained_betas_sha256")
_RECORD_KEYS = (*SCHEDULE_KEYS, "timesteps", "sample_shape", "weights_sha256")
# String settings diffusers' schedulers accept without checking (a typo would sample silently wrong).
_SCHEDULER_CHOICES = {
    "prediction_type": PREDICTION_TYPES,
    "timestep_spacing": ("linspace", "leading", "trailing"),
    "variance_type": VARIANCE_TYPES,  # the unusable ones are refused by check_sampling_schedule, with their fix
}
# Number settings every sampler applies to every image: (low, high, inclusive low) and what a bad value does.
_SCHEDULER_RANGES = {
    "clip_sample_range": (1.0, math.inf, True, "images span [-1, 1]: a smaller range greys out every image"),
    "sample_max_value": (1.0, math.inf, True, "thresholding divides by it: below 1 every image is NaN"),
    "dynamic_thresholding_ratio": (0.0, 1.0, False, "a quantile of the image's pixels"),
}


class BundleError(ValueError):
    """A bundle directory is missing, incomplete, corrupted, tampered with or of another format version."""


# Whether a folder is a tdcdiff bundle that a new save_bundle may replace (files.atomic_dir's `ours` test): its
# manifest.json of this version and the files it lists, nothing else; any other folder is the user's.
is_bundle = lists(MANIFEST, FORMAT, MAX_MANIFEST_BYTES)
A_BUNDLE = "a tdcdiff bundle (a folder with a manifest.json of format tdcdiff-bundle/N), nor empty"


def training_records(config: dict, grouping: Grouping, sample_shape: list, weights: list[str],
                     given: list[dict] | None) -> list[dict]:
    """The 'expert_training' save_bundle writes: per expert, the schedule it was trained with (SCHEDULE_KEYS,
    from the scheduler config), its group's timesteps [start, end), the sample shape and the sha256 of its
    weights file, updated by the caller's record (`given`, e.g. a train.json summary; its values are checked)."""
    schedule = {k: config.get(k) for k in SCHEDULE_KEYS if k != "trained_betas_sha256"}
    schedule["trained_betas_sha256"] = _betas_sha256(config.get("trained_betas"))
    given = given if given is not None else [{} for _ in grouping.groups]
    if len(given) != len(grouping) or not all(isinstance(r, dict) for r in given):
        raise BundleError(f"expert_training must hold one record (a dict) per group, {len(grouping)} in all")
    return [{**schedule, "timesteps": [g.start, g.end], "sample_shape": list(sample_shape), "weights_sha256": w, **r}
            for g, w, r in zip(grouping.groups, weights, given)]


def _betas_sha256(betas) -> str | None:
    return None if betas is None else hashlib.sha256(json.dumps(json_safe(betas)).encode()).hexdigest()


def check_manifest(manifest: object, where) -> Grouping:
    """Validate a manifest's structure and sizes (nothing read or built yet); returns its grouping."""

    def fail(message: str):
        raise BundleError(f"{where}: {message}")

    if not isinstance(manifest, dict):
        fail(f"must hold a JSON object, got {type(manifest).__name__}; the bundle is corrupted: {REEXPORT}")
    if manifest.get("format") != FORMAT:
        fail(f"has format {brief(manifest.get('format'))}, this tdcdiff reads {FORMAT!r}; {REEXPORT} with this version")
    for key in _REQUIRED:
        if key not in manifest:
            fail(f"key {key!r} is missing; the bundle is incomplete or was edited: {REEXPORT}")
    files = manifest["files"]
    if not isinstance(files, dict) or not files:
        fail(f"'files' must map each file's path to {{bytes, sha256}}, got {type(files).__name__}; {REEXPORT}")
    for name, entry in files.items():
        if (not isinstance(entry, dict) or set(entry) != {"bytes", "sha256"} or not is_count(entry["bytes"])
                or not is_sha256(entry["sha256"])):
            fail(f"'files' entry {brief(name)} must be {{\"bytes\": <integer>, \"sha256\": <64 lower-case hex "
                 f"digits>}}, got {brief(entry)}; {REEXPORT}")
    grouping = _check_grouping(manifest["grouping"], fail)
    n = len(grouping)
    directories = sorted({name.split("/")[0] for name in files if re.fullmatch(r"expert_\d+/.+", name)})
    wanted = [f"expert_{i}" for i in range(n)]
    if directories != sorted(wanted) or any(f"{d}/{ARCHITECTURE_FILE}" not in files for d in wanted):
        fail(f"'grouping' has {n} groups but 'files' lists the expert directories {brief(directories)}; a bundle "
             f"has exactly one expert directory with an {ARCHITECTURE_FILE} per group (expert_0 to expert_{n - 1}): "
             f"{REEXPORT}")
    flops = manifest["expert_flops"]
    if not isinstance(flops, list) or len(flops) != n or not all(map(is_count, flops)):
        fail(f"'expert_flops' must hold one FLOPs count (an integer >= 0) per group, {n} in all, got "
             f"{brief(flops)}; {REEXPORT}")
    if not is_count(manifest["base_flops"]):
        fail(f"'base_flops' must be an integer >= 0, got {brief(manifest['base_flops'])}; {REEXPORT}")
    budgets = manifest.get("budgets")
    if budgets is not None and (not isinstance(budgets, list) or len(budgets) != n
                                or not all(is_count(b) or (isinstance(b, float) and math.isfinite(b) and b >= 0)
                                           for b in budgets)):  # an int is never NaN; a huge one overflows isfinite
        fail(f"'budgets' must be null or one finite number >= 0 per group, {n} in all, got {brief(budgets)}; "
             f"{REEXPORT}")
    check_sample_shape(manifest["sample_shape"], "'sample_shape'", fail)
    _check_record_structure(manifest["expert_training"], n, fail)
    if not isinstance(manifest["scheduler"], dict):
        fail(f"'scheduler' must be a diffusers scheduler config (a JSON object); {REEXPORT}")
    steps = manifest["scheduler"].get("num_train_timesteps")
    if is_count(steps) and steps > MAX_TIMESTEPS:
        fail(f"'scheduler.num_train_timesteps' is {steps}, more than the {MAX_TIMESTEPS} timesteps tdcdiff "
             f"handles; {REEXPORT}")
    if manifest.get("sampling") is not None:
        try:
            sampling_setting(manifest, grouping.num_train_timesteps)
        except ValueError as err:
            fail(f"{err}; {REEXPORT}")
    return grouping


def sampling_setting(manifest: dict, num_train_timesteps: int) -> SamplingSetting:
    """How the bundle is sampled by default: its 'sampling' (sampler, steps, feature caching: what tune chose, or
    the run's sampler and steps), or DDIM at min(50, T) steps for a bundle without one. Raises ValueError for a
    'sampling' that names no sampler of this tdcdiff or more steps than T."""
    if manifest.get("sampling") is None:
        return SamplingSetting("ddim", min(50, num_train_timesteps))
    return SamplingSetting.from_dict(manifest["sampling"], "sampling").check(num_train_timesteps)


def _check_grouping(data: object, fail) -> Grouping:
    """Grouping.from_dict, after capping T and the number of groups (before anything is allocated per group)."""
    steps = data.get("num_train_timesteps") if isinstance(data, dict) else None
    edges = data.get("boundaries") if isinstance(data, dict) else None
    if is_count(steps) and steps > MAX_TIMESTEPS:
        fail(f"'grouping.num_train_timesteps' is {steps}, more than the {MAX_TIMESTEPS} timesteps tdcdiff handles; "
             f"{REEXPORT}")
    if isinstance(edges, list) and len(edges) - 1 > MAX_EXPERTS:
        fail(f"'grouping.boundaries' gives {len(edges) - 1} groups, more than the {MAX_EXPERTS} experts a bundle "
             f"may have; {REEXPORT}")
    try:
        grouping = Grouping.from_dict(data)
    except ValueError as err:
        fail(f"{err}; {REEXPORT}")
    if not all(math.isfinite(v) for g in grouping.groups for v in (g.snr_db_start, g.snr_db_end)):
        fail(f"'grouping.groups' must hold finite snr_db_start and snr_db_end values; {REEXPORT}")
    return grouping


def check_sample_shape(shape: object, what: str, fail) -> None:
    """shape must be [channels, height, width] of positive integers within MAX_CHANNELS and MAX_SIDE."""
    if not isinstance(shape, list) or len(shape) != 3 or not all(is_count(s, 1) for s in shape):
        fail(f"{what} must be [channels, height, width], 3 positive integers, got {brief(shape)}; {REEXPORT}")
    if shape[0] > MAX_CHANNELS or max(shape[1:]) > MAX_SIDE:
        fail(f"{what} is {shape}, beyond the {MAX_CHANNELS} channels and {MAX_SIDE}x{MAX_SIDE} pixels a bundle "
             f"may have; {REEXPORT}")


def _check_record_structure(training: object, n: int, fail) -> None:
    if not isinstance(training, list) or len(training) != n or not all(isinstance(t, dict) for t in training):
        fail(f"'expert_training' must hold one record per group, {n} in all, each stating the expert's "
             f"'prediction_type' (one of {PREDICTION_TYPES}); {REEXPORT}")
    for i, record in enumerate(training):
        missing = [k for k in _RECORD_KEYS if k not in record]
        if missing:
            fail(f"'expert_training'[{i}] lacks {missing}: the bundle was written by an older tdcdiff or edited; "
                 f"{REEXPORT}")
        if record["prediction_type"] not in PREDICTION_TYPES:
            fail(f"'expert_training' must hold one record per group, {n} in all, each stating the expert's "
                 f"'prediction_type' (one of {PREDICTION_TYPES}); {REEXPORT}")
        span = record["timesteps"]
        if not isinstance(span, list) or len(span) != 2 or not all(map(is_count, span)):
            fail(f"'expert_training'[{i}].timesteps must be [start, end], got {brief(span)}; {REEXPORT}")
        check_sample_shape(record["sample_shape"], f"'expert_training'[{i}].sample_shape", fail)
        if not is_sha256(record["weights_sha256"]):
            fail(f"'expert_training'[{i}].weights_sha256 must be 64 lower-case hex digits, got "
                 f"{brief(record['weights_sha256'])}; {REEXPORT}")


def build_scheduler(config: dict, where):
    """The DDPMScheduler a manifest's config describes, rebuilt exactly: known keys of sane types and values,
    every setting the samplers use within its range, and the same settings after rebuilding (nothing silently
    replaced by a default)."""
    name = config.get("_class_name")
    try:
        cls = allowed_class(f"diffusers.{name}" if isinstance(name, str) else None, "SchedulerMixin",
                            f"{where} 'scheduler._class_name'")
        if cls.__name__ != "DDPMScheduler":  # every sampler is built from its config (pipeline.make_sampler)
            raise BundleError(f"{where}: 'scheduler._class_name' is {name!r}; a bundle's scheduler is the "
                              f"DDPMScheduler its experts were trained with: {REEXPORT}")
        settings = check_arguments(cls, {k: v for k, v in config.items() if not k.startswith("_")},
                                   f"{where} 'scheduler'", check_types=True)
    except ValueError as err:  # serialization's lines: the fix for a bundle is to re-export it
        raise BundleError(str(err) if "re-export" in str(err) else f"{err}; {REEXPORT}") from None
    _check_settings(settings, where)
    try:
        # Without the bookkeeping keys save_bundle adds, the rebuilt config equals the saved one exactly.
        scheduler = cls.from_config({k: v for k, v in config.items() if k not in ("_class_name", "_diffusers_version")})
    except Exception as err:  # any failure of an allowlisted diffusers class on these settings
        raise BundleError(f"{where}: 'scheduler' cannot be built ({type(err).__name__}: "
                          f"{brief(str(err), 200, quote=False)}); {REEXPORT}") from None
    rebuilt = {k: json_safe(v) for k, v in dict(scheduler.config).items() if not k.startswith("_")}
    changed = sorted(k for k in settings.keys() | rebuilt.keys() if settings.get(k) != rebuilt.get(k))
    if changed:
        raise BundleError(f"{where}: 'scheduler' settings {brief(changed)} do not survive rebuilding {name} "
                          f"(overridden by '_use_default_values', or missing from it); {REEXPORT}")
    try:  # what every sampler would refuse (noise levels too), refused when the bundle is written and loaded
        check_sampling_schedule(scheduler)
    except ValueError as err:
        raise BundleError(f"{where}: 'scheduler': {err}, and {REEXPORT}") from None
    return scheduler


def _check_settings(settings: dict, where) -> None:
    """Each setting the samplers read, within what sampling can use (diffusers checks none of them)."""
    for key, choices in _SCHEDULER_CHOICES.items():
        if key in settings and settings[key] not in choices:
            raise BundleError(f"{where}: 'scheduler.{key}' must be one of {choices}, got {brief(settings[key])}; "
                              f"{REEXPORT}")
    steps = settings.get("num_train_timesteps")
    if not is_count(steps, 2) or steps > MAX_TIMESTEPS:
        raise BundleError(f"{where}: 'scheduler.num_train_timesteps' must be an integer T from 2 to {MAX_TIMESTEPS}, "
                          f"got {brief(steps)}; {REEXPORT}")
    for key, (low, high, closed, why) in _SCHEDULER_RANGES.items():
        value = settings.get(key)
        if value is None:
            continue
        if not (math.isfinite(value) and (low <= value if closed else low < value) and value <= high):
            span = f"{'[' if closed else '('}{low:g}, {'inf)' if high == math.inf else f'{high:g}]'}"
            raise BundleError(f"{where}: 'scheduler.{key}' must be in {span} ({why}), got {brief(value)}; {REEXPORT}")
    offset = settings.get("steps_offset")
    if offset is not None and not (is_count(offset) and offset < steps):
        raise BundleError(f"{where}: 'scheduler.steps_offset' must be an integer from 0 to T-1={steps - 1}, got "
                          f"{brief(offset)}; {REEXPORT}")
    for key, value in settings.items():  # any other NaN would fail the rebuild comparison (NaN != NaN) unexplained
        values = value if isinstance(value, list) else [value]
        bad = [v for v in values if isinstance(v, float) and not math.isfinite(v)]
        if bad:
            raise BundleError(f"{where}: 'scheduler.{key}' holds {bad[0]}, which is not a finite number; {REEXPORT}")


def check_records(manifest: dict, scheduler, grouping: Grouping, where) -> None:
    """Each expert's training record against the schedule (SCHEDULE_KEYS) and its group's timesteps; the
    grouping's T against the schedule's."""
    config = {k: json_safe(v) for k, v in dict(scheduler.config).items()}
    config["trained_betas_sha256"] = _betas_sha256(config.get("trained_betas"))
    if config["num_train_timesteps"] != grouping.num_train_timesteps:
        raise BundleError(f"{where}: scheduler T={config['num_train_timesteps']} but groups cover "
                          f"T={grouping.num_train_timesteps} ('scheduler.num_train_timesteps' and 'grouping' must name "
                          f"one T): the bundle was edited; {REEXPORT}")
    for i, (record, group) in enumerate(zip(manifest["expert_training"], grouping.groups)):
        for key in SCHEDULE_KEYS:
            if record[key] != config[key]:
                if key == "trained_betas_sha256":
                    raise BundleError(f"{where}: 'scheduler.trained_betas' are not the betas expert {i} was trained "
                                      f"with ('expert_training', by sha256); {REEXPORT}")
                trained = f"{'to predict' if key == 'prediction_type' else 'with'} {brief(record[key])}"
                raise BundleError(f"{where}: 'scheduler.{key}' is {brief(config[key])} but expert {i} was trained "
                                  f"{trained} ('expert_training'); set 'scheduler.{key}' to {brief(record[key])} or "
                                  f"{REEXPORT}")
        if record["timesteps"] != [group.start, group.end]:
            raise BundleError(f"{where}: 'expert_training'[{i}] says expert {i} was trained on timesteps "
                              f"{brief(record['timesteps'])} but group {i} is [{group.start}, {group.end}]: the "
                              f"experts were swapped or the groups edited; {REEXPORT}")


def check_trained_shape(manifest: dict, where) -> None:
    """The manifest's sample shape is the one every expert was trained on (its record's, written at export):
    a convolutional expert runs at any size, so nothing else would catch samples of another size."""
    shape = manifest["sample_shape"]
    for i, record in enumerate(manifest["expert_training"]):
        if record["sample_shape"] != shape:
            raise BundleError(f"{where}: 'sample_shape' is {shape} but expert {i} was trained on "
                              f"{record['sample_shape']} samples ('expert_training'); set 'sample_shape' to "
                              f"{record['sample_shape']} or {REEXPORT}")


def check_default_caching(manifest: dict, experts: list, where, fix: str | None = REEXPORT) -> None:
    """The bundle's default feature caching ('sampling' with cache_interval >= 2) fits every expert: checked at load,
    naming the manifest's key, rather than at the first sample under a flag the user did not give; and by
    save_bundle on its `sampling` before writing (where: the call, fix None: no re-export to advise)."""
    if manifest.get("sampling") is None:
        return
    setting = SamplingSetting.from_dict(manifest["sampling"], "sampling")
    if setting.cache_interval in (None, 1):
        return
    depth = 1 if setting.cache_depth is None else setting.cache_depth
    for i, expert in enumerate(experts):
        levels = len(getattr(network(expert), "down_blocks", ()))
        if levels and depth > levels:
            tail = f" or {fix}" if fix else ""
            raise BundleError(f"{where}: 'sampling.cache_depth' is {depth} but expert {i} is a UNet of {levels} levels "
                              f"(down blocks); set it to 1..{levels} (1 caches the most){tail}")
        try:
            split_unet(expert, depth, f"expert {i}")
        except ValueError as err:
            raise BundleError(f"{where}: 'sampling' caches features (cache_interval {setting.cache_interval}) but "
                              f"{err}") from None


def check_conditioning(conditioning: object, classes: int | None, where) -> None:
    """'conditioning' must be null for unconditional experts and, for class-conditional ones, null or
    {num_class_embeds: the experts' count, num_classes: null or 1..that, null_class: null or 0..that - 1}."""
    if conditioning is None:
        return
    if classes is None:
        raise BundleError(f"{where}: 'conditioning' is {brief(conditioning, 80)} but the experts have no class "
                          f"embedding; set it to null or {REEXPORT}")
    ok = (isinstance(conditioning, dict) and set(conditioning) <= {"num_class_embeds", "num_classes", "null_class"}
          and conditioning.get("num_class_embeds") == classes
          and (conditioning.get("num_classes") is None or is_count(conditioning["num_classes"], 1)
               and conditioning["num_classes"] <= classes)
          and (conditioning.get("null_class") is None or is_count(conditioning["null_class"])
               and conditioning["null_class"] < classes))
    if not ok:
        raise BundleError(f"{where}: 'conditioning' must be null or {{\"num_class_embeds\": {classes}, "
                          f"\"num_classes\": null or 1..{classes}, \"null_class\": null or 0..{classes - 1}}} "
                          f"(the experts embed {classes} class ids), got {brief(conditioning)}; {REEXPORT}")
    data, null = conditioning.get("num_classes"), conditioning.get("null_class")
    if data is not None and null is not None and null < data:  # guidance would take class `null` for "no label"
        raise BundleError(f"{where}: 'conditioning.null_class' {null} is one of the data's classes 0..{data - 1}; the "
                          f"null class is the id for dropped labels, no class of the data: {REEXPORT}")


def check_text_entry(text: object, files: dict, where) -> None:
    """A text-conditional bundle's 'text': {"text_encoder": "text_encoder", "tokenizer": "tokenizer", "width": the
    text encoder's hidden size, "tokens": CLIP_TOKENS}, with text_encoder/architecture.json and every tokenizer file
    listed in 'files'."""
    listed = [f"text_encoder/{ARCHITECTURE_FILE}", *(f"tokenizer/{name}" for name in TOKENIZER_FILES)]
    if (not isinstance(text, dict) or set(text) != {"text_encoder", "tokenizer", "width", "tokens"}
            or text["text_encoder"] != "text_encoder" or text["tokenizer"] != "tokenizer"
            or not is_count(text["width"], 1) or text["tokens"] != CLIP_TOKENS or any(n not in files for n in listed)):
        raise BundleError(f"{where}: 'text' must be {{\"text_encoder\": \"text_encoder\", \"tokenizer\": "
                          f"\"tokenizer\", \"width\": <its hidden size>, \"tokens\": {CLIP_TOKENS}}} with "
                          f"{', '.join(listed)} listed in 'files', got {brief(text)}; {REEXPORT}")

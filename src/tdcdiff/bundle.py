"""A bundle: the group experts, their timestep groups and the noise schedule, in one copyable directory.

    bundle/
      manifest.json      format, scheduler config, groups, budgets, FLOPs and training record per expert,
                         provenance, and the size and sha256 of every file
      expert_0/          architecture.json (plain data) + model.safetensors, one directory per group
      ...
      vae/               latent diffusion only: the VAE the experts' latents come from (same layout)

A bundle is untrusted input. Loading validates the whole manifest before building anything, reads only files
the manifest lists inside the bundle directory (each once, its size and sha256 checked), rebuilds only
allowlisted classes (diffusers models and schedulers, classes given to tdcdiff.register_model_class), and
unpickles nothing: weights are safetensors, everything else JSON. Every problem is a one-line BundleError.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .files import (
    atomic_dir,
    is_count,
    is_sha256,
    json_safe,
    read_regular_file,
    resolve_inside,
    sha256_file,
)
from .grouping import Grouping
from .latent import VAE_CLASSES
from .models import Denoiser, num_class_embeds
from .router import Router
from .schedule import PREDICTION_TYPES
from .serialization import (
    ARCHITECTURE_FILE,
    allowed_class,
    build_model,
    check_arguments,
    class_path,
    read_architecture,
    save_model,
)

FORMAT = "tdcdiff-bundle/2"
MANIFEST = "manifest.json"
REEXPORT = "re-export the bundle (delete it and run `tdcdiff bundle`, or call save_bundle again)"
_REQUIRED = ("files", "grouping", "scheduler", "sample_shape", "expert_flops", "expert_training", "base_flops")
# String settings diffusers' schedulers accept without checking (a typo would sample silently wrong).
_SCHEDULER_CHOICES = {
    "prediction_type": PREDICTION_TYPES,
    "timestep_spacing": ("linspace", "leading", "trailing"),
    "variance_type": ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range"),
}


_VAE_NAMES = tuple(f"diffusers.{name}" for name in VAE_CLASSES)


class BundleError(ValueError):
    """A bundle directory is missing, incomplete, corrupted, tampered with or of another format version."""


def save_bundle(
    path: str | Path,
    experts: list[nn.Module],
    grouping: Grouping,
    scheduler,
    *,
    sample_shape: tuple[int, int, int],
    expert_flops: list[int],
    base_flops: int,
    budgets: list[int] | None = None,
    provenance: dict | None = None,
    expert_training: list[dict] | None = None,
    conditioning: dict | None = None,
    vae: nn.Module | None = None,
) -> Path:
    """Write a bundle atomically (a temporary directory renamed into place; nothing is left on failure).

    experts: the group models, in group order. grouping: their timestep groups.
    scheduler: the training noise schedule, a diffusers scheduler (its full config is stored, so the same
    scheduler is rebuilt on load). sample_shape: (C, H, W).
    expert_flops: measured FLOPs per expert forward (batch 1); base_flops: the unpruned model's.
    budgets: the planned FLOPs budget per group. provenance: data, steps, seeds... (free-form JSON).
    expert_training: per expert, a JSON record of how it was trained (e.g. its train.json summary); its
    "prediction_type", "beta_schedule" and "num_train_timesteps" default to the scheduler's, and the
    prediction type is checked against the scheduler on load.
    conditioning: for class-conditional experts, {"num_class_embeds", "num_classes" (of the data),
        "null_class" (the id for dropped labels, needed for guidance; None without label dropout)}.
    vae: for latent diffusion, the VAE (a diffusers AutoencoderKL) whose scaled latents the experts denoise
        (sample_shape is the latents' shape); it is stored in the bundle, so the bundle decodes on its own.
    Raises ValueError (BundleError) when the pieces do not fit together (counts, shapes, prediction types).
    """
    path = Path(path)
    if not class_path(type(scheduler)).startswith("diffusers."):
        raise BundleError(f"cannot bundle a {class_path(type(scheduler))}: the scheduler must be a diffusers scheduler")
    config = {k: json_safe(v) for k, v in dict(scheduler.config).items()}
    config = {"_class_name": type(scheduler).__name__, "_diffusers_version": _diffusers_version(), **config}
    trained = {k: config.get(k) for k in ("prediction_type", "beta_schedule", "num_train_timesteps")}
    records = expert_training if expert_training is not None else [{} for _ in grouping.groups]
    if len(records) != len(grouping) or not all(isinstance(r, dict) for r in records):
        raise BundleError(f"expert_training must hold one record (a dict) per group, {len(grouping)} in all")
    expert_training = [{**trained, "timesteps": [g.start, g.end], **r} for g, r in zip(grouping.groups, records)]
    with atomic_dir(path) as tmp:
        files = {}
        for i, expert in enumerate(experts):
            _check_input(expert, i, list(sample_shape), "")
            save_model(expert, tmp / f"expert_{i}")
            for file in sorted((tmp / f"expert_{i}").iterdir()):
                files[f"expert_{i}/{file.name}"] = {"bytes": file.stat().st_size, "sha256": sha256_file(file)}
        latent = None
        if vae is not None:
            if class_path(type(vae)) not in _VAE_NAMES:
                raise BundleError(f"cannot bundle a {class_path(type(vae))} as the VAE; supported: {', '.join(_VAE_NAMES)}")
            save_model(vae, tmp / "vae")
            for file in sorted((tmp / "vae").iterdir()):
                files[f"vae/{file.name}"] = {"bytes": file.stat().st_size, "sha256": sha256_file(file)}
            latent = {"vae": "vae", "scaling_factor": vae.config.get("scaling_factor")}
        manifest = {
            "format": FORMAT,
            "scheduler": config,
            "sample_shape": list(sample_shape),
            "grouping": grouping.to_dict(),
            "budgets": budgets,
            "expert_flops": list(expert_flops),
            "expert_training": json_safe(expert_training),
            "base_flops": base_flops,
            "flops_convention": "2 x multiply-accumulates, one forward pass, batch 1",
            "provenance": provenance or {},
            "conditioning": conditioning,
            "latent": latent,
            "files": files,
        }
        _check_manifest(manifest, path / MANIFEST)  # the checks load_bundle makes, before anything is kept
        _check_prediction_types(manifest, _build_scheduler(config, path / MANIFEST), path / MANIFEST)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return path


def _diffusers_version() -> str:
    import diffusers

    return diffusers.__version__


def _check_manifest(manifest: object, where: Path) -> Grouping:
    """Validate a manifest's structure (nothing read or built yet); returns its grouping."""

    def fail(message: str):
        raise BundleError(f"{where}: {message}")

    if not isinstance(manifest, dict):
        fail(f"must hold a JSON object, got {type(manifest).__name__}; the bundle is corrupted: {REEXPORT}")
    if manifest.get("format") != FORMAT:
        fail(f"has format {manifest.get('format')!r}, this tdcdiff reads {FORMAT!r}; {REEXPORT} with this version")
    for key in _REQUIRED:
        if key not in manifest:
            fail(f"key {key!r} is missing; the bundle is incomplete or was edited: {REEXPORT}")
    files = manifest["files"]
    if not isinstance(files, dict) or not files:
        fail(f"'files' must map each file's path to {{bytes, sha256}}, got {type(files).__name__}; {REEXPORT}")
    for name, entry in files.items():
        if (not isinstance(entry, dict) or set(entry) != {"bytes", "sha256"} or not is_count(entry["bytes"])
                or not is_sha256(entry["sha256"])):
            fail(f"'files' entry {name!r} must be {{\"bytes\": <integer>, \"sha256\": <64 hex digits>}}, "
                 f"got {str(entry)[:120]}; {REEXPORT}")
    try:
        grouping = Grouping.from_dict(manifest["grouping"])
    except ValueError as err:
        fail(f"{err}; {REEXPORT}")
    n = len(grouping)
    directories = sorted({name.split("/")[0] for name in files if re.fullmatch(r"expert_\d+/.+", name)})
    wanted = [f"expert_{i}" for i in range(n)]
    if directories != sorted(wanted) or any(f"{d}/{ARCHITECTURE_FILE}" not in files for d in wanted):
        fail(f"'grouping' has {n} groups but 'files' lists the expert directories {directories}; a bundle has "
             f"exactly one expert directory with an {ARCHITECTURE_FILE} per group (expert_0 to expert_{n - 1}): "
             f"{REEXPORT}")
    flops = manifest["expert_flops"]
    if not isinstance(flops, list) or len(flops) != n or not all(map(is_count, flops)):
        fail(f"'expert_flops' must hold one FLOPs count (an integer >= 0) per group, {n} in all, got "
             f"{str(flops)[:120]}; {REEXPORT}")
    if not is_count(manifest["base_flops"]):
        fail(f"'base_flops' must be an integer >= 0, got {manifest['base_flops']!r}; {REEXPORT}")
    budgets = manifest.get("budgets")
    if budgets is not None and (not isinstance(budgets, list) or len(budgets) != n
                                or not all(isinstance(b, (int, float)) and not isinstance(b, bool)
                                           and math.isfinite(b) and b >= 0 for b in budgets)):
        fail(f"'budgets' must be null or one finite number >= 0 per group, {n} in all, got {str(budgets)[:120]}; "
             f"{REEXPORT}")
    training = manifest["expert_training"]
    if (not isinstance(training, list) or len(training) != n
            or not all(isinstance(t, dict) and t.get("prediction_type") in PREDICTION_TYPES for t in training)):
        fail(f"'expert_training' must hold one record per group, {n} in all, each stating the expert's "
             f"'prediction_type' (one of {PREDICTION_TYPES}); {REEXPORT}")
    shape = manifest["sample_shape"]
    if not isinstance(shape, list) or len(shape) != 3 or not all(is_count(s, 1) for s in shape):
        fail(f"'sample_shape' must be [channels, height, width], 3 positive integers, got {shape!r}; {REEXPORT}")
    if not isinstance(manifest["scheduler"], dict):
        fail(f"'scheduler' must be a diffusers scheduler config (a JSON object); {REEXPORT}")
    return grouping


def _build_scheduler(config: dict, where: Path):
    """The scheduler a manifest's config describes, rebuilt exactly: an allowlisted diffusers class, known
    keys of sane types and values, and the same settings after rebuilding (nothing silently ignored)."""
    name = config.get("_class_name")
    try:
        cls = allowed_class(f"diffusers.{name}" if isinstance(name, str) else None, "SchedulerMixin",
                            f"{where} 'scheduler._class_name'")
        settings = check_arguments(cls, {k: v for k, v in config.items() if not k.startswith("_")},
                                   f"{where} 'scheduler'", check_types=True)
    except ValueError as err:
        raise BundleError(str(err)) from None
    for key, choices in _SCHEDULER_CHOICES.items():
        if key in settings and settings[key] not in choices:
            raise BundleError(f"{where}: 'scheduler.{key}' must be one of {choices}, got {settings[key]!r}; {REEXPORT}")
    try:
        # Without the bookkeeping keys save_bundle adds, the rebuilt config equals the saved one exactly.
        scheduler = cls.from_config({k: v for k, v in config.items() if k not in ("_class_name", "_diffusers_version")})
    except Exception as err:  # any failure of an allowlisted diffusers class on these settings
        raise BundleError(f"{where}: 'scheduler' cannot be built ({type(err).__name__}: {err}); {REEXPORT}") from None
    rebuilt = {k: json_safe(v) for k, v in dict(scheduler.config).items() if not k.startswith("_")}
    changed = sorted(k for k in settings.keys() | rebuilt.keys() if settings.get(k) != rebuilt.get(k))
    if changed:
        raise BundleError(f"{where}: 'scheduler' settings {changed} do not survive rebuilding {name} (overridden "
                          f"by '_use_default_values' or missing); {REEXPORT}")
    alphas = getattr(scheduler, "alphas_cumprod", None)
    if isinstance(alphas, torch.Tensor) and len(alphas) != scheduler.config.num_train_timesteps:
        raise BundleError(f"{where}: 'scheduler' has {len(alphas)} noise levels ('trained_betas') for "
                          f"num_train_timesteps={scheduler.config.num_train_timesteps}; give one beta per timestep "
                          f"or {REEXPORT}")
    if (not isinstance(alphas, torch.Tensor) or not bool(torch.isfinite(alphas).all())
            or not bool(((alphas[:-1] > 0) & (alphas[:-1] <= 1)).all()) or not 0 <= alphas[-1] <= 1
            or bool((alphas[1:] > alphas[:-1]).any())):
        # the last may be 0: a zero-terminal-SNR schedule (rescale_betas_zero_snr)
        raise BundleError(f"{where}: 'scheduler' gives noise levels (alphas_cumprod) that are not finite and "
                          f"falling within (0, 1] (the last within [0, 1]); check its beta settings or {REEXPORT}")
    return scheduler


def _check_prediction_types(manifest: dict, scheduler, where: Path) -> None:
    predicts = scheduler.config.get("prediction_type")
    for i, record in enumerate(manifest["expert_training"]):
        if record["prediction_type"] != predicts:
            raise BundleError(
                f"{where}: 'scheduler.prediction_type' is {predicts!r} but expert {i} was trained to predict "
                f"{record['prediction_type']!r} ('expert_training'); set 'scheduler.prediction_type' to "
                f"{record['prediction_type']!r} or {REEXPORT}"
            )


def _check_input(expert: nn.Module, i: int, shape: list, where: str) -> None:
    """The sample shape must be what the expert takes: its first convolution's channels and, when its config
    states one, its sample_size."""
    model = expert.model if isinstance(expert, Denoiser) else expert
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if conv is not None and conv.in_channels != shape[0]:
        raise BundleError(f"{where}'sample_shape' is {shape} but expert {i} takes {conv.in_channels}-channel input "
                          f"(its first convolution); set 'sample_shape' to [{conv.in_channels}, {shape[1]}, {shape[2]}]")
    config = getattr(model, "config", None)
    size = config.get("sample_size") if isinstance(config, dict) else None
    if size is not None:
        size = [size, size] if is_count(size, 1) else size
        if not isinstance(size, (list, tuple)) or len(size) != 2 or not all(is_count(s, 1) for s in size):
            raise BundleError(f"{where}expert {i}'s config has sample_size {config.get('sample_size')!r}; it must be "
                              f"a positive integer or [height, width]: {REEXPORT}")
        size = list(size)
        if size != shape[1:]:
            raise BundleError(f"{where}'sample_shape' is {shape} but expert {i} was built for {size[0]}x{size[1]} "
                              f"inputs (its config's sample_size); set 'sample_shape' to [{shape[0]}, {size[0]}, {size[1]}]")


def _open_files(path: Path, files: dict, where: Path) -> dict[str, Path]:
    """Where each listed file is, after checking that it stays inside the bundle, is a regular file and has
    the listed size (its content is hashed when it is read)."""
    located = {}
    for name, entry in files.items():
        try:
            file = resolve_inside(path, name, f"{where} 'files'")
        except ValueError as err:
            raise BundleError(str(err)) from None
        shown = path / name
        if not file.exists():
            raise BundleError(f"bundle file {shown} is missing; copy the whole bundle directory")
        if not file.is_file():
            raise BundleError(f"bundle file {shown} is not a regular file; copy the whole bundle directory")
        size = file.stat().st_size
        if size != entry["bytes"]:
            raise BundleError(f"bundle file {shown} is truncated or corrupted: expected {entry['bytes']} bytes, found {size}")
        located[name] = file
    return located


def _read_manifest_json(path: Path) -> object:
    manifest_path = path / MANIFEST
    if not path.is_dir():
        raise BundleError(f"no bundle at {path}: the directory does not exist")
    try:
        return json.loads(manifest_path.read_bytes())
    except FileNotFoundError:
        raise BundleError(f"{manifest_path} is missing: {path} is not a complete tdcdiff bundle") from None
    except (ValueError, RecursionError) as err:
        raise BundleError(f"{manifest_path} is not valid JSON ({type(err).__name__}); the bundle is corrupted") from None


@dataclass
class Bundle:
    """A loaded bundle: the router (a denoiser), the training schedule and the manifest; for latent diffusion
    the VAE whose latents the router denoises (its pipeline decodes them), else None."""

    router: Router
    scheduler: object
    manifest: dict
    vae: nn.Module | None = None

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        return tuple(self.manifest["sample_shape"])

    def pipeline(self):
        from .pipeline import TDCPipeline

        return TDCPipeline(self.router, self.scheduler, self.sample_shape, null_class=self.null_class, vae=self.vae)

    @property
    def null_class(self) -> int | None:
        """The class id the experts were trained with for dropped labels (guidance needs it), or None."""
        return (self.manifest.get("conditioning") or {}).get("null_class")


def load_bundle(path: str | Path, *, device: str | torch.device = "cpu") -> Bundle:
    """Load a bundle: returns Bundle(router, scheduler, manifest); `.pipeline()` gives a sampling pipeline.

    The experts keep the dtype they were saved in. Raises BundleError (a ValueError), one line naming the
    file, key or class and the fix, for a missing, corrupted, inconsistent or tampered bundle.
    """
    path = Path(path)
    where = path / MANIFEST
    manifest = _read_manifest_json(path)
    grouping = _check_manifest(manifest, where)
    files = manifest["files"]
    located = _open_files(path, files, where)
    scheduler = _build_scheduler(manifest["scheduler"], where)
    if scheduler.config.num_train_timesteps != grouping.num_train_timesteps:
        raise BundleError(
            f"{where}: scheduler T={scheduler.config.num_train_timesteps} but groups cover "
            f"T={grouping.num_train_timesteps}"
        )
    _check_prediction_types(manifest, scheduler, where)
    described = []  # (architecture, weights file) per expert: all read and checked before building any
    for i in range(len(grouping)):
        name = f"expert_{i}/{ARCHITECTURE_FILE}"
        try:
            description = read_architecture(_read_checked(located[name], files[name], path / name), path / name)
        except (ValueError, OSError) as err:
            raise BundleError(f"cannot load expert {i} of bundle {path}: {err}") from None
        weights_name = f"expert_{i}/{description['weights']['file']}"
        entry = files.get(weights_name)
        if entry is None or entry["sha256"] != description["weights"]["sha256"]:
            raise BundleError(f"{path / name} names weights {description['weights']['file']!r} that the manifest's "
                              f"'files' does not list with the same sha256; {REEXPORT}")
        described.append((description, weights_name))
    used = {f"expert_{i}/{ARCHITECTURE_FILE}" for i in range(len(grouping))} | {w for _, w in described}
    for name in sorted(files.keys() - used):  # any other listed file is checked too
        if sha256_file(located[name]) != files[name]["sha256"]:
            raise BundleError(f"bundle file {path / name} is corrupted: its sha256 does not match the manifest")
    experts = []
    for i, (description, weights_name) in enumerate(described):
        try:
            data = read_regular_file(located[weights_name], files[weights_name]["bytes"], "copy the whole bundle directory")
            expert = build_model(description, data, path / f"expert_{i}" / ARCHITECTURE_FILE, path / weights_name)
        except (ValueError, RuntimeError, OSError) as err:  # build_model checks the weights' sha256
            raise BundleError(f"cannot load expert {i} of bundle {path}: {err}") from err
        _check_input(expert, i, manifest["sample_shape"], f"{where}: ")
        experts.append(expert)
    router = Router(experts, grouping, manifest["expert_flops"]).to(device).eval()
    _check_conditioning(manifest.get("conditioning"), num_class_embeds(router), where)
    _probe(router, grouping, manifest["sample_shape"], manifest["expert_flops"], path)
    vae = _load_vae(path, manifest, located) if manifest.get("latent") is not None else None
    return Bundle(router, scheduler, manifest, vae.to(device) if vae is not None else None)


def _load_vae(path: Path, manifest: dict, located: dict[str, Path]) -> nn.Module:
    """A latent bundle's VAE (vae/ in the bundle): only an allowlisted diffusers VAE class is rebuilt."""
    files, name = manifest["files"], f"vae/{ARCHITECTURE_FILE}"
    if not isinstance(manifest["latent"], dict) or manifest["latent"].get("vae") != "vae" or name not in files:
        raise BundleError(f"{path / MANIFEST}: 'latent' must be {{\"vae\": \"vae\", ...}} with the files of "
                          f"vae/ listed in 'files'; {REEXPORT}")
    try:
        description = read_architecture(_read_checked(located[name], files[name], path / name), path / name)
        if description.get("class") not in _VAE_NAMES:
            raise ValueError(f"{path / name} names class {description.get('class')!r}; a bundle's VAE must be one of "
                             f"{', '.join(_VAE_NAMES)}")
        weights = f"vae/{description['weights']['file']}"
        if weights not in files:
            raise ValueError(f"{path / name} names weights that the manifest's 'files' does not list")
        data = read_regular_file(located[weights], files[weights]["bytes"], "copy the whole bundle directory")
        return build_model(description, data, path / name, path / weights)
    except (ValueError, RuntimeError, OSError) as err:
        raise BundleError(f"cannot load the VAE of bundle {path}: {err}; {REEXPORT}") from None


def _check_conditioning(conditioning: object, classes: int | None, where: Path) -> None:
    """'conditioning' must be null for unconditional experts and, for class-conditional ones, null or
    {num_class_embeds: the experts' count, num_classes: null or 1..that, null_class: null or 0..that - 1}."""
    if conditioning is None:
        return
    if classes is None:
        raise BundleError(f"{where}: 'conditioning' is {str(conditioning)[:80]} but the experts have no class "
                          f"embedding; set it to null or {REEXPORT}")
    ok = (isinstance(conditioning, dict) and set(conditioning) <= {"num_class_embeds", "num_classes", "null_class"}
          and conditioning.get("num_class_embeds") == classes
          and (conditioning.get("num_classes") is None or is_count(conditioning["num_classes"], 1)
               and conditioning["num_classes"] <= classes)
          and (conditioning.get("null_class") is None or is_count(conditioning["null_class"])
               and conditioning["null_class"] < classes))
    if not ok:
        raise BundleError(f"{where}: 'conditioning' must be null or {{\"num_class_embeds\": {classes}, \"num_classes\": "
                          f"null or 1..{classes}, \"null_class\": null or 0..{classes - 1}}} (the experts embed "
                          f"{classes} class ids), got {str(conditioning)[:120]}; {REEXPORT}")


@torch.no_grad()
def _probe(router: Router, grouping: Grouping, shape: list, expert_flops: list[int], path: Path) -> None:
    """One denoising call per expert, at batch 1 and its group's first timestep: weights and architecture
    that do not fit together (a config the weights were not made for, float64 or non-finite weights, FLOPs
    other than the manifest states) fail here, on load, not in the middle of sampling."""
    from .flops import count_flops

    for i, (expert, group) in enumerate(zip(router.experts, grouping.groups)):
        bad = [name for name, p in expert.named_parameters() if not torch.isfinite(p).all()]
        if bad:
            raise BundleError(f"cannot load expert {i} of bundle {path}: its weights hold NaN/inf (in "
                              f"{', '.join(bad[:3])}); {REEXPORT}")
        wide = [name for name, p in expert.named_parameters() if p.dtype == torch.float64]
        if wide:  # nothing tdcdiff writes is float64, and a float64 tensor in a float32 model fails mid-sampling
            raise BundleError(f"cannot load expert {i} of bundle {path}: its weights hold float64 tensors (in "
                              f"{', '.join(wide[:3])}); bundles hold float32, float16 or bfloat16 weights: {REEXPORT}")
        if len({p.dtype for p in expert.parameters() if p.is_floating_point()}) > 1:
            continue  # mixed precision is kept as saved; such a model runs only under autocast (--precision bf16)
        param = next(expert.parameters(), None)
        x = torch.randn((1, *shape), generator=torch.Generator().manual_seed(0))
        x = x.to(param.device) if param is not None else x
        t = torch.full((1,), group.start, dtype=torch.long, device=x.device)
        try:
            out = expert(x, t, None, with_variance=True)
        except Exception as err:  # whatever the rebuilt model raises on an input of the bundle's own shape
            raise BundleError(f"cannot load expert {i} of bundle {path}: it fails on a {shape} input at t={group.start} "
                              f"({type(err).__name__}: {str(err)[:200]}); its architecture.json and weights do not "
                              f"fit together: {REEXPORT}") from None
        if not bool(torch.isfinite(out).all()):
            raise BundleError(f"cannot load expert {i} of bundle {path}: its output at t={group.start} is not finite; "
                              f"{REEXPORT}")
        counted = count_flops(expert, tuple(shape), group.start)
        if abs(counted - expert_flops[i]) > 0.01 * max(counted, 1):  # the manifest's numbers go into every report
            raise BundleError(f"{path / MANIFEST}: 'expert_flops'[{i}] is {expert_flops[i]} but expert {i} costs "
                              f"{counted} FLOPs per forward pass (counted on load); {REEXPORT}")


def _read_checked(file: Path, entry: dict, shown: Path) -> bytes:
    data = read_regular_file(file, entry["bytes"], "copy the whole bundle directory")
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise BundleError(f"bundle file {shown} is corrupted: its sha256 does not match the manifest")
    return data

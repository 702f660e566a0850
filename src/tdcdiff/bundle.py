"""A bundle: the group experts, their timestep groups and the noise schedule, in one copyable directory.

    bundle/
      manifest.json      format, scheduler config, groups, budgets, FLOPs and training record per expert,
                         provenance, and the size and sha256 of every file
      expert_0/          architecture.json (plain data) + model.safetensors, one directory per group
      ...
      vae/               latent diffusion only: the VAE the experts' latents come from (same layout)
      text_encoder/      text-conditional only: the CLIP text encoder (same layout) and
      tokenizer/         its tokenizer (vocab.json, merges.txt, tokenizer_config.json: plain data)

A bundle is untrusted input. Loading validates the whole manifest before building anything, reads only files
the manifest lists inside the bundle directory (each once, its size and sha256 checked), rebuilds only
allowlisted classes (diffusers models and schedulers, transformers' CLIP text encoder, classes given to
tdcdiff.register_model_class), and unpickles nothing: weights are safetensors, everything else JSON or text (a
tokenizer is built from its vocabulary and merges, text.py). Every problem is a one-line BundleError.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .base_model import diffusers_folder
from .bundle_checks import check_class_ids, check_given, check_input, check_text, probe, probe_vae
from .content_hash import sha256_bytes, sha256_file
from .files import atomic_dir, brief, json_safe, output_path, parse_json, read_untrusted, resolve_inside
from .grouping import Grouping
from .latent import VAE_CLASSES
from .manifest import (
    A_BUNDLE,
    FORMAT,
    MANIFEST,
    MAX_MANIFEST_BYTES,
    REEXPORT,
    BundleError,
    build_scheduler,
    check_conditioning,
    check_default_caching,
    check_manifest,
    check_records,
    check_text_entry,
    check_trained_shape,
    is_bundle,
    sampling_setting,
    training_records,
)
from .models import check_sample_shape, num_class_embeds, torch_device, with_null_text
from .pipeline import TDCPipeline
from .router import Router
from .samplers import check_train_scheduler
from .sampling_setting import SamplingSetting
from .serialization import (
    ARCHITECTURE_FILE,
    MAX_ARCHITECTURE_BYTES,
    TRANSFORMERS_CLASSES,
    build_model,
    class_path,
    read_architecture,
    save_model,
)
from .settings import plain_values
from .text import MAX_TOKENIZER_BYTES, TOKENIZER_FILES, TextEncoder, save_tokenizer, tokenizer_from_files

_VAE_NAMES = tuple(f"diffusers.{name}" for name in VAE_CLASSES)
_TEXT_NAMES = tuple(f"transformers.{name}" for name in TRANSFORMERS_CLASSES)
TEXT_ENCODER_DIR, TOKENIZER_DIR = "text_encoder", "tokenizer"
_COPY = "copy the whole bundle directory"


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
    sampling: SamplingSetting | str | dict | None = None,
    text_encoder: TextEncoder | None = None,
) -> Path:
    """Write a bundle atomically (files.atomic_dir: nothing left on failure; a symlink to a folder: written there).

    experts: the group models, in group order. grouping: their timestep groups. scheduler: the training schedule, a
    diffusers DDPMScheduler (its full config is stored: rebuilt on load). sample_shape: (C, H, W) of the data.
    expert_flops: measured FLOPs per expert forward (batch 1); base_flops: the unpruned model's; budgets: the planned
    FLOPs budget per group (numpy numbers, arrays, 0-d tensors taken). provenance: data, steps... (JSON; NaN/inf
    kept as text such as "-Infinity", which diffusers' configs hold: manifest.json stays valid JSON).
    expert_training: per expert, a JSON record of how it was trained (e.g. its train.json summary). The
    record stored also names the schedule it was trained with (manifest.SCHEDULE_KEYS, from the scheduler),
    its group's timesteps [start, end), sample_shape and its weights' sha256; values the caller's record gives
    for these must agree, and load_bundle checks them all against the bundle.
    conditioning: for class-conditional experts, {"num_class_embeds", "num_classes" (of the data), "null_class"
        (the id for dropped labels, needed for guidance; None without label dropout)}.
    vae: for latent diffusion, the VAE (a diffusers AutoencoderKL) whose scaled latents the experts denoise
        (sample_shape is the latents' shape); stored in the bundle, so the bundle decodes on its own.
    sampling: how `Bundle.pipeline()` and `tdcdiff sample --bundle` sample by default (a SamplingSetting, its text
        "unipc:10" or its manifest dict: SamplingSetting.of); None: DDIM at min(50, T) steps.
    text_encoder: for text-conditional experts (required there), the text.TextEncoder (CLIP tokenizer and text
        encoder) whose embeddings they were trained on; stored in the bundle, so its pipeline takes prompts.
    Raises ValueError (BundleError) when the pieces do not fit together (counts, shapes, class ids, schedule, training
    records, provenance) or the path cannot be written (files.atomic_dir), before or instead of writing anything.
    """
    path = output_path(path, directory=True)  # an empty or unwritable path is refused before any work
    check_train_scheduler(scheduler, "scheduler")  # named as the caller's argument, not as a manifest to re-export
    config, sample_shape = _scheduler_config(scheduler), check_sample_shape(sample_shape)
    rebuilt = build_scheduler(config, path / MANIFEST)  # the schedule load_bundle takes, checked before any write
    if sampling is not None:  # checked as load_bundle would, naming the argument, before any expert is written
        sampling = SamplingSetting.of(sampling, "sampling").check(config["num_train_timesteps"], "sampling")
        check_default_caching({"sampling": sampling.to_dict()}, experts, f"save_bundle(sampling={sampling})", None)
    expert_flops, base_flops, budgets = plain_values((expert_flops, base_flops, budgets))  # as Python numbers
    provenance = _plain_provenance(provenance)
    check_given(experts, list(sample_shape), text_encoder.width if text_encoder is not None else None)
    with atomic_dir(path, is_bundle, A_BUNDLE) as tmp:
        files, weights = {}, []
        for i, expert in enumerate(experts):
            weights.append(save_model(expert, tmp / f"expert_{i}")["weights"]["sha256"])
            files.update(_listing(tmp, f"expert_{i}"))
        latent, text = _save_companions(tmp, files, vae, text_encoder)
        manifest = {
            "format": FORMAT,
            "scheduler": config,
            "sample_shape": list(sample_shape),
            "grouping": grouping.to_dict(),
            "budgets": budgets,
            "expert_flops": list(expert_flops),
            "expert_training": json_safe(training_records(config, grouping, list(sample_shape), weights,
                                                          expert_training)),
            "base_flops": base_flops,
            "flops_convention": "2 x multiply-accumulates, one forward pass, batch 1",
            "provenance": provenance,
            "conditioning": conditioning,
            "latent": latent,
            "text": text,
            "sampling": sampling.to_dict() if sampling is not None else None,
            "files": files,
        }
        where = path / MANIFEST  # the checks load_bundle makes, before anything is kept
        check_records(manifest, rebuilt, check_manifest(manifest, where), where)
        check_trained_shape(manifest, where)
        check_conditioning(conditioning, num_class_embeds(experts[0]) if experts else None, where)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, allow_nan=False))
    return path


def _plain_provenance(provenance: dict | None) -> dict:
    """provenance as plain JSON: NaN and infinities become the text json writes for them ("NaN", "Infinity",
    "-Infinity"). Raises ValueError for an object json cannot write."""
    def plain(value):
        if isinstance(value, float) and not math.isfinite(value):
            return json.dumps(value)
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return [plain(v) for v in value] if isinstance(value, (list, tuple)) else value

    try:
        return json.loads(json.dumps(plain(provenance or {}), allow_nan=False))
    except (TypeError, ValueError) as err:
        raise ValueError(f"provenance must be plain JSON (text, numbers, lists, mappings): {err}; convert or drop "
                         "that value") from None


def _save_companions(tmp: Path, files: dict, vae: nn.Module | None, text_encoder: TextEncoder | None) -> tuple:
    """Write the VAE (vae/) and the text encoder and tokenizer (text_encoder/, tokenizer/) when given, list their
    files in `files`; returns the manifest's 'latent' and 'text' (None for what is not given)."""
    latent = text = None
    if vae is not None:
        if class_path(type(vae)) not in _VAE_NAMES:
            raise BundleError(f"cannot bundle a {class_path(type(vae))} as the VAE; supported: {', '.join(_VAE_NAMES)}")
        save_model(vae, tmp / "vae")
        files.update(_listing(tmp, "vae"))
        latent = {"vae": "vae", "scaling_factor": vae.config.get("scaling_factor")}
    if text_encoder is not None:
        save_model(text_encoder.text_model, tmp / TEXT_ENCODER_DIR)
        save_tokenizer(text_encoder.tokenizer, tmp / TOKENIZER_DIR)
        files.update(_listing(tmp, TEXT_ENCODER_DIR) | _listing(tmp, TOKENIZER_DIR))
        text = {"text_encoder": TEXT_ENCODER_DIR, "tokenizer": TOKENIZER_DIR, "width": text_encoder.width,
                "tokens": text_encoder.tokenizer.model_max_length}
    return latent, text


def _scheduler_config(scheduler) -> dict:
    """The manifest's 'scheduler': the diffusers scheduler's full config, its class and diffusers' version first.
    Raises BundleError for a scheduler that is not diffusers' DDPMScheduler."""
    if not class_path(type(scheduler)).startswith("diffusers."):
        raise BundleError(f"cannot bundle a {class_path(type(scheduler))}: the scheduler must be a diffusers scheduler")
    if type(scheduler).__name__ != "DDPMScheduler":  # the one class a manifest holds (manifest.build_scheduler)
        raise BundleError(f"scheduler must be the training schedule as a diffusers DDPMScheduler (every sampler is "
                          f"built from its config), got a {type(scheduler).__name__}; give "
                          f"DDPMScheduler.from_config(scheduler.config), which keeps its betas and prediction type")
    config = {k: json_safe(v) for k, v in dict(scheduler.config).items()}
    if "_use_default_values" in config:  # a set in diffusers: sorted, the same bundle is the same bytes
        config["_use_default_values"] = sorted(config["_use_default_values"])
    return {"_class_name": type(scheduler).__name__, "_diffusers_version": _diffusers_version(), **config}


def check_bundle_scheduler(scheduler, source: str) -> None:
    """Raise BundleError, before any work, unless a bundle can hold `scheduler` as its training schedule (the
    checks load_bundle makes on the manifest's 'scheduler'). source: what the schedule came from."""
    build_scheduler(_scheduler_config(scheduler), f"the training schedule of {source}")


def _listing(root: Path, directory: str) -> dict[str, dict]:
    """'files' entries {bytes, sha256} of the files save_model wrote into root/directory."""
    return {f"{directory}/{file.name}": {"bytes": file.stat().st_size, "sha256": sha256_file(file)}
            for file in sorted((root / directory).iterdir())}


def _diffusers_version() -> str:
    import diffusers

    return diffusers.__version__


def _check_files(path: Path, files: dict, where: Path) -> None:
    """Every listed file stays inside the bundle, is there, is a regular file of the listed size and is listed
    once (links to one file would have it read once per name), checked before any is read (each is read later
    through files.read_untrusted, which checks again on the open file)."""
    seen: dict[tuple[int, int], str] = {}
    for name, entry in files.items():
        try:
            file = resolve_inside(path, name, f"{where} 'files'")
        except ValueError as err:
            raise BundleError(str(err)) from None
        shown = path / name
        if not file.exists():
            raise BundleError(f"bundle file {shown} is missing; {_COPY}")
        if not file.is_file():
            raise BundleError(f"bundle file {shown} is not a regular file; {_COPY}")
        info = file.stat()
        if info.st_size != entry["bytes"]:
            raise BundleError(f"bundle file {shown} is truncated or corrupted: expected {entry['bytes']} bytes, "
                              f"found {info.st_size}")
        other = seen.setdefault((info.st_dev, info.st_ino), name)
        if other != name:
            raise BundleError(f"bundle files {path / other} and {brief(name)} are one file (links): a bundle lists "
                              f"each of its files once; {_COPY} (without links) or {REEXPORT}")


def _read_listed(path: Path, name: str, entry: dict, *, max_bytes: int | None = None) -> bytes:
    """A listed bundle file's bytes, of its listed size (and at most max_bytes) and sha256."""
    try:
        data = read_untrusted(path, name, f"{path / MANIFEST} 'files'", hint=_COPY, expected_bytes=entry["bytes"],
                              max_bytes=entry["bytes"] if max_bytes is None else max_bytes)
    except (ValueError, OSError) as err:
        raise BundleError(str(err)) from None
    if sha256_bytes(data) != entry["sha256"]:
        raise BundleError(f"bundle file {path / name} is corrupted: its sha256 does not match the manifest")
    return data


def _read_manifest(path: Path) -> object:
    if not path.is_dir():
        raise BundleError(f"no bundle at {path}: " + (f"it is a file, not the bundle's directory (the one holding "
                          f"{MANIFEST})" if path.exists() else "the directory does not exist"))
    try:
        data = read_untrusted(path, MANIFEST, f"bundle {path}", max_bytes=MAX_MANIFEST_BYTES,
                              hint=f"the bundle is corrupted: {REEXPORT}")
        return parse_json(data, path / MANIFEST, f"the bundle is corrupted: {REEXPORT}")
    except FileNotFoundError:
        raise BundleError(f"{path / MANIFEST} is missing: {path} is not a complete tdcdiff bundle"
                          f"{_diffusers_hint(path) or _tdcdiff_folder_hint(path)}") from None
    except ValueError as err:
        raise BundleError(str(err)) from None


def _diffusers_hint(path: Path) -> str:
    """What to do with a diffusers pipeline or model folder given as a bundle (by the files that name one)."""
    what = diffusers_folder(path)
    if what is None:
        return ""
    return (f": it is {what}, which tdcdiff takes as the trained model to prune, `tdcdiff run --base {path}` (or "
            f"Run(..., base=...)); sample the bundle that run makes (its bundle/ folder)")


def _tdcdiff_folder_hint(path: Path) -> str:
    """Where the bundle is, for a tdcdiff run or tune directory, a folder inside one, or a folder holding a bundle/,
    given as a bundle (attack g row 770); known by the files that mark them: a run's config.json beside its base/ or
    bundle/, a tune's tune.json or candidates.json."""
    def is_tune(folder: Path) -> bool:
        return (folder / "tune.json").is_file() or (folder / "candidates.json").is_file()

    def is_run(folder: Path) -> bool:
        return (folder / "config.json").is_file() and ((folder / "base").is_dir() or (folder / "bundle").is_dir())

    def tune_bundle(tune: Path) -> str:
        if (tune / "chosen" / MANIFEST).is_file():
            return f"whose chosen bundle is {tune / 'chosen'}: give that"
        return (f"which has shipped no bundle ({tune / 'chosen'} does not exist: `tdcdiff tune --out {tune}` ships "
                f"one); each candidate's bundle is {tune / 'candidates'}/<name>/bundle")

    def run_bundle(run: Path) -> str:
        if (run / "bundle" / MANIFEST).is_file():
            return f"whose bundle is {run / 'bundle'}: give that"
        return f"which has made no bundle yet ({run / 'bundle'}: `tdcdiff run --out {run}` finishes the run)"

    name, parent = path.resolve().name, path.resolve().parent  # "." inside a run's stage folder has a name too
    if is_tune(path):
        return f": it is a tdcdiff tune directory, {tune_bundle(path)}"
    if is_tune(parent):
        return f": it is the {name}/ folder of the tdcdiff tune directory {parent}, {tune_bundle(parent)}"
    if is_run(path):
        return f": it is a tdcdiff run directory, {run_bundle(path)}"
    if (path / "bundle" / MANIFEST).is_file():  # a tune's candidate (bundle/, result.json)
        return f": the bundle is the folder inside it, {path / 'bundle'}: give that"
    if is_run(parent) and name != "bundle":
        return f": it is the {name}/ folder of the tdcdiff run directory {parent}, {run_bundle(parent)}"
    return ""


@dataclass
class Bundle:
    """A loaded bundle: the router (a denoiser), the training schedule and the manifest; for latent diffusion
    the VAE whose latents the router denoises (its pipeline decodes them), else None."""

    router: Router
    scheduler: object
    manifest: dict
    vae: nn.Module | None = None
    text_encoder: TextEncoder | None = None  # text-conditional experts: what turns prompts into their conditions

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        return tuple(self.manifest["sample_shape"])

    @property
    def sampling(self) -> SamplingSetting:
        """How the bundle is sampled unless told otherwise (see save_bundle's `sampling`)."""
        return sampling_setting(self.manifest, self.scheduler.config.num_train_timesteps)

    def pipeline(self):
        """A TDCPipeline over the router, sampling with the bundle's default setting unless told otherwise."""
        classes = (self.manifest.get("conditioning") or {}).get("num_classes")
        return TDCPipeline(self.router, self.scheduler, self.sample_shape, null_class=self.null_class, vae=self.vae,
                           num_classes=classes, defaults=self.sampling, text_encoder=self.text_encoder)

    @property
    def null_class(self) -> int | None:
        """The class id the experts were trained with for dropped labels (guidance needs it), or None."""
        return (self.manifest.get("conditioning") or {}).get("null_class")


def load_bundle(path: str | Path, *, device: str | torch.device | None = "cpu") -> Bundle:
    """Load a bundle: returns Bundle(router, scheduler, manifest); `.pipeline()` gives a sampling pipeline.

    The experts keep the dtype they were saved in, on `device` (None: 'cpu'). Raises BundleError (a ValueError),
    one line naming the file, key or class and the fix, for a missing, corrupted, inconsistent or tampered bundle;
    ValueError for a device that is not usable here (models.torch_device: unknown, 'meta', CUDA not visible).
    """
    path, device = Path(path), torch_device("cpu" if device is None else device)  # None: the default, as sample's
    where = path / MANIFEST
    manifest = _read_manifest(path)
    grouping = check_manifest(manifest, where)
    files = manifest["files"]
    _check_files(path, files, where)
    scheduler = build_scheduler(manifest["scheduler"], where)
    check_records(manifest, scheduler, grouping, where)
    described = []  # (architecture, weights file) per expert: all read and checked before building any
    for i, record in enumerate(manifest["expert_training"]):
        name = f"expert_{i}/{ARCHITECTURE_FILE}"
        try:
            description = read_architecture(_read_listed(path, name, files[name], max_bytes=MAX_ARCHITECTURE_BYTES),
                                            path / name)
        except ValueError as err:
            raise BundleError(f"cannot load expert {i} of bundle {path}: {err}") from None
        weights_name = f"expert_{i}/{description['weights']['file']}"
        entry = files.get(weights_name)
        if entry is None or entry["sha256"] != description["weights"]["sha256"]:
            raise BundleError(f"{path / name} names weights {brief(description['weights']['file'])} that the "
                              f"manifest's 'files' does not list with the same sha256; {REEXPORT}")
        if entry["sha256"] != record["weights_sha256"]:
            raise BundleError(f"{where}: expert {i}'s weights are not the ones 'expert_training'[{i}] records as "
                              f"trained on group {i} (timesteps {record['timesteps']}, sha256 "
                              f"{record['weights_sha256'][:12]}..., found {entry['sha256'][:12]}...): the experts were "
                              f"swapped or replaced; {REEXPORT}")
        described.append((description, weights_name))
    used = {f"expert_{i}/{ARCHITECTURE_FILE}" for i in range(len(grouping))} | {w for _, w in described}
    for name in sorted(files.keys() - used):  # any other listed file is checked too
        _read_listed(path, name, files[name])
    experts = []
    for i, (description, weights_name) in enumerate(described):
        try:
            data = _read_listed(path, weights_name, files[weights_name])
            expert = build_model(description, data, path / f"expert_{i}" / ARCHITECTURE_FILE, path / weights_name)
        except (ValueError, RuntimeError, OSError) as err:  # build_model checks the weights' sha256
            raise BundleError(f"cannot load expert {i} of bundle {path}: {err}") from err
        check_input(expert, i, manifest["sample_shape"], f"{where}: ")
        experts.append(expert)
    check_trained_shape(manifest, where)
    check_default_caching(manifest, experts, where)
    check_class_ids(experts, f"{where}: ", REEXPORT)
    text = _load_text(path, manifest) if manifest.get("text") is not None else None
    check_text(experts, text.width if text is not None else None, f"{where}: ")
    if text is not None:  # a call without a prompt is the unconditional one: the empty prompt's
        empty = text.empty()
        experts = [with_null_text(e, empty) for e in experts]
    router = Router(experts, grouping, manifest["expert_flops"],
                    prediction_type=scheduler.config.prediction_type).to(device).eval()
    check_conditioning(manifest.get("conditioning"), num_class_embeds(router), where)
    probe(router, grouping, manifest["sample_shape"], manifest["expert_flops"], path)
    vae = _load_vae(path, manifest) if manifest.get("latent") is not None else None
    if text is not None:
        text.text_model.to(device)
    return Bundle(router, scheduler, manifest, vae.to(device) if vae is not None else None, text)


def _component(path: Path, files: dict, directory: str, names: tuple[str, ...], what: str) -> nn.Module:
    """The model saved in `directory`/ of a bundle (its VAE, its text encoder), rebuilt only when its class is one
    of `names`. Raises ValueError (BundleError) naming the file."""
    name = f"{directory}/{ARCHITECTURE_FILE}"
    description = read_architecture(_read_listed(path, name, files[name], max_bytes=MAX_ARCHITECTURE_BYTES),
                                    path / name)
    if description.get("class") not in names:
        raise ValueError(f"{path / name} names class {brief(description.get('class'))}; a bundle's {what} must be one "
                         f"of {', '.join(names)}")
    weights = f"{directory}/{description['weights']['file']}"
    if weights not in files:
        raise ValueError(f"{path / name} names weights that the manifest's 'files' does not list")
    return build_model(description, _read_listed(path, weights, files[weights]), path / name, path / weights)


def _load_vae(path: Path, manifest: dict) -> nn.Module:
    """A latent bundle's VAE (vae/ in the bundle): only an allowlisted diffusers VAE class is rebuilt."""
    files = manifest["files"]
    if (not isinstance(manifest["latent"], dict) or manifest["latent"].get("vae") != "vae"
            or f"vae/{ARCHITECTURE_FILE}" not in files):
        raise BundleError(f"{path / MANIFEST}: 'latent' must be {{\"vae\": \"vae\", ...}} with the files of "
                          f"vae/ listed in 'files'; {REEXPORT}")
    try:
        vae = _component(path, files, "vae", _VAE_NAMES, "VAE")
    except (ValueError, RuntimeError, OSError) as err:
        raise BundleError(f"cannot load the VAE of bundle {path}: {err}; {REEXPORT}") from None
    probe_vae(vae, manifest, path)
    return vae


def _load_text(path: Path, manifest: dict) -> TextEncoder:
    """A text-conditional bundle's text encoder (text_encoder/: only an allowlisted transformers class is rebuilt)
    and tokenizer (tokenizer/: built from its vocabulary, merges and settings, each file checked as every file)."""
    files = manifest["files"]
    check_text_entry(manifest["text"], files, path / MANIFEST)
    try:
        text_model = _component(path, files, TEXT_ENCODER_DIR, _TEXT_NAMES, "text encoder")
        data = {name: _read_listed(path, f"{TOKENIZER_DIR}/{name}", files[f"{TOKENIZER_DIR}/{name}"],
                                   max_bytes=MAX_TOKENIZER_BYTES) for name in TOKENIZER_FILES}
        text = TextEncoder(text_model, tokenizer_from_files(data, str(path / TOKENIZER_DIR)))
    except (ValueError, RuntimeError, OSError) as err:
        raise BundleError(f"cannot load the text encoder of bundle {path}: {err}; {REEXPORT}") from None
    if text.width != manifest["text"]["width"]:
        raise BundleError(f"{path / MANIFEST}: 'text.width' is {manifest['text']['width']} but the text encoder's "
                          f"hidden size is {text.width}; {REEXPORT}")
    return text

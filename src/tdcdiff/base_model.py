"""Start from a trained model: a diffusers model or pipeline directory, a Hub name, or `module:function`.

Directories are untrusted input: only allowlisted diffusers model classes are ever built from them, weights
are read as safetensors only (never pickle), and the scheduler comes from its JSON config. A text-conditional
pipeline (Stable Diffusion's layout: a UNet2DConditionModel with a CLIP text encoder and tokenizer) brings its text
encoder (an allowlisted transformers class, safetensors weights) and its tokenizer (built from plain data, text.py).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .capacity import FLOAT_BYTES, check_memory
from .files import brief, parse_json, read_untrusted
from .latent import VAE_CLASSES
from .models import check_denoiser, num_class_embeds, text_width
from .pipeline_schedule import check_pipeline_schedule, pipeline_scheduler_class
from .serialization import (
    TRANSFORMERS_CLASSES,
    architecture_of,
    build_model,
    check_arguments,
    register_model_class,
)
from .text import TOKENIZER_CLASSES, TextEncoder, TextError, check_widths, read_tokenizer

# The diffusers model classes a directory may name: denoisers called as model(x, t[, class_labels]), or with
# encoder_hidden_states (UNet2DConditionModel, with its pipeline's text encoder).
ALLOWED_MODEL_CLASSES = ("UNet2DModel", "DiTTransformer2DModel", "UNet2DConditionModel")
MAX_TEXT_ENCODER_BYTES = 16 << 30  # Stable Diffusion 2's CLIP text encoder: 1.4 GB in float32
DENOISER_KEYS = ("unet", "transformer")
FUNCTION_SPEC = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
MAX_CONFIG_BYTES = 1 << 20  # a diffusers config.json or model_index.json is a few kilobytes
# A stated maximum for a model built from a config (13x a DiT-XL, 763 modules; a default UNet2DModel has 374): a config
# of a few bytes (layers_per_block: 20000) would otherwise spend minutes building modules before any check.
MAX_MODULES = 10_000
SAVE_HINT = "write the directory with save_pretrained"
# check(model, vae, text_encoder): called with the denoiser (built on the meta device when it comes from a directory:
# its weights not read yet) and the pipeline's VAE (None in pixel space); raises to refuse the model.
Check = Callable[[nn.Module, "nn.Module | None", "TextEncoder | None"], None]


class BaseModelError(ValueError):
    """A --base that cannot be loaded or does not fit the data; the message names both and the fix."""


@dataclass
class BaseModel:
    """A loaded trained denoiser. scheduler_config: the pipeline's noise schedule (plain JSON), or None when
    the run's own schedule settings apply. source: what it was loaded from. scheduler_class: the diffusers
    scheduler class the pipeline samples with (model_index.json's), or None without a pipeline."""

    model: nn.Module
    scheduler_config: dict | None
    source: str
    vae: nn.Module | None = None  # a latent diffusion pipeline's VAE: the model works on its latents
    scheduler_class: str | None = None
    text_encoder: TextEncoder | None = None  # a text-conditional pipeline's tokenizer and text encoder


def diffusers_folder(path: Path) -> str | None:
    """What folder `path` is when it is a diffusers save_pretrained output, by the files that name one, for messages
    that tell it from tdcdiff's own folders: "a diffusers pipeline (model_index.json)", "a diffusers model
    (config.json and diffusion_pytorch_model weights)" or "a diffusers model (its config.json names _class_name
    'X')"; None for anything else (a config.json that cannot be read or names no class included)."""
    if (path / "model_index.json").is_file():
        return "a diffusers pipeline (model_index.json)"
    if not (path / "config.json").is_file():
        return None
    if any(path.glob("diffusion_pytorch_model.*")):
        return "a diffusers model (config.json and diffusion_pytorch_model weights)"
    try:
        name = _read_json(path / "config.json").get("_class_name")
    except ValueError:  # BaseModelError: not a diffusers config
        return None
    return f"a diffusers model (its config.json names _class_name {brief(name, 60)})" if name is not None else None


def _read_json(path: Path) -> dict:
    """A diffusers JSON file, read as untrusted input: a regular file of at most MAX_CONFIG_BYTES (a FIFO, a device
    or a huge file is refused before it is read), holding one JSON object."""
    real = path.resolve()  # a Hub snapshot's files are symlinks into its blob store
    try:
        data = parse_json(read_untrusted(real.parent, real.name, str(path), max_bytes=MAX_CONFIG_BYTES, hint=SAVE_HINT),
                          path, SAVE_HINT)
    except FileNotFoundError:
        raise BaseModelError(f"{path} is missing; a diffusers directory needs it ({SAVE_HINT})") from None
    except ValueError as err:
        raise BaseModelError(str(err).replace(str(real), str(path))) from None
    if not isinstance(data, dict):
        raise BaseModelError(f"{path} must hold a JSON object; {SAVE_HINT}")
    return data


def _load_diffusers_model(directory: Path, class_name, allowed: tuple[str, ...] = ALLOWED_MODEL_CLASSES,
                          alternative: str = " (or pass a module:function returning your nn.Module)",
                          check: Callable[[nn.Module], None] | None = None) -> nn.Module:
    """A diffusers model of one of the `allowed` classes, from a save_pretrained directory (safetensors only).

    It is first built from its config.json on the meta device (no memory): its weights must fit in memory, and
    `check` (if given) sees it, before the weights are read."""
    import diffusers

    if class_name not in allowed:
        raise BaseModelError(f"{directory}: model class {class_name!r} is not one tdcdiff loads; supported: "
                             f"{', '.join(allowed)}{alternative}")
    if not any(directory.glob("*.safetensors")):
        raise BaseModelError(
            f"{directory} has no .safetensors weights; tdcdiff never unpickles weights: save the model with "
            "save_pretrained(..., safe_serialization=True)"
        )
    cls = getattr(diffusers, class_name)
    config = _read_json(directory / "config.json")
    skeleton = _build_on_meta(cls, config, directory / "config.json")
    params = sum(p.numel() for p in skeleton.parameters())
    check_memory(params * FLOAT_BYTES, f"the weights of {directory} ({params:,} parameters as float32)",
                 "use a smaller model", BaseModelError)
    if check is not None:
        check(skeleton)
    verbosity = diffusers.utils.logging.get_verbosity()
    diffusers.utils.logging.set_verbosity_error()  # its warning of missing weights would precede our one line
    try:
        model = cls.from_pretrained(directory, use_safetensors=True, low_cpu_mem_usage=True).eval()
    except (OSError, ValueError, RuntimeError) as err:
        raise BaseModelError(f"cannot load {class_name} from {directory}: {err}") from None
    finally:
        diffusers.utils.logging.set_verbosity(verbosity)
    # diffusers leaves the tensors a weights file lacks on the meta device (with a warning), or initialises them
    missing = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if missing:
        raise BaseModelError(f"{directory}'s weights lack {len(missing)} of the tensors its config.json's model has "
                             f"(e.g. {', '.join(missing[:3])}): they were not saved with that config; {SAVE_HINT}")
    return model


class _TooManyModules(Exception):
    pass


def _build_on_meta(cls, config: dict, source: Path) -> nn.Module:
    """`cls` built from `config` on the meta device (no memory for its weights), stopped once it registers more
    than MAX_MODULES modules. Raises BaseModelError naming `source` for a config no model is built from."""
    from torch.nn.modules import module

    count, thread = 0, threading.get_ident()

    def counted(parent, name, child):
        nonlocal count
        if threading.get_ident() == thread:
            count += 1
            if count > MAX_MODULES:
                raise _TooManyModules

    handle = module.register_module_module_registration_hook(counted)
    try:
        with torch.device("meta"):
            return cls.from_config(config)
    except _TooManyModules:
        raise BaseModelError(f"{source} describes a model of more than {MAX_MODULES:,} modules (a DiT-XL has 763), a "
                             "stated maximum; check its layer counts (e.g. layers_per_block)") from None
    except Exception as err:  # noqa: BLE001 - a config's values reach model code, which raises many types
        raise BaseModelError(f"cannot build {cls.__name__} from {source}: {brief(str(err), 300, quote=False)}; "
                             f"{SAVE_HINT}") from None
    finally:
        handle.remove()




def _named(index: dict, key: str) -> bool:
    """Whether model_index.json names a component under `key` (a [library, class] entry that is not null)."""
    return isinstance(index.get(key), list) and bool(index[key]) and index[key][0] is not None


def _load_pipeline(directory: Path, check: Check | None) -> BaseModel:
    index = _read_json(directory / "model_index.json")
    vae = _load_vae(directory, index["vae"]) if _named(index, "vae") else None
    text = _load_text_encoder(directory, index) if _named(index, "text_encoder") or _named(index, "tokenizer") else None
    key = next((k for k in DENOISER_KEYS if isinstance(index.get(k), list) and len(index[k]) == 2), None)
    if key is None:
        raise BaseModelError(f"{directory / 'model_index.json'} names no denoiser: it needs a 'unet' or "
                             "'transformer' entry")
    library, class_name = index[key]
    if library != "diffusers":
        raise BaseModelError(f"{directory}: the {key} comes from {library!r}; only diffusers model classes are loaded")
    model = _load_diffusers_model(directory / key, class_name,
                                  check=None if check is None else lambda skeleton: check(skeleton, vae, text))
    scheduler = _read_json(directory / "scheduler" / "scheduler_config.json")
    try:
        check_pipeline_schedule(pipeline_scheduler_class(index, scheduler), scheduler, str(directory))
    except ValueError as err:
        raise BaseModelError(str(err)) from None
    if "num_train_timesteps" not in scheduler:
        raise BaseModelError(f"{directory / 'scheduler' / 'scheduler_config.json'} has no num_train_timesteps")
    if text is not None:
        check_text_unet(model, str(directory))
        try:
            check_widths(text_width(model), text, str(directory))
        except TextError as err:
            raise BaseModelError(str(err)) from None
    return BaseModel(model, {k: v for k, v in scheduler.items() if not k.startswith("_")}, str(directory), vae,
                     pipeline_scheduler_class(index, scheduler), text)


def check_text_unet(model: nn.Module, source: str) -> None:
    """A text-conditional denoiser of Stable Diffusion's layout: a UNet2DConditionModel whose only conditions are the
    timestep and the text embedding (no class embedding, no SDXL-style added conditions)."""
    config = getattr(model, "config", None)
    extra = [key for key in ("num_class_embeds", "class_embed_type", "addition_embed_type", "encoder_hid_dim_type")
             if getattr(config, key, None) is not None]
    if text_width(model) is None or extra:
        why = f"it sets {', '.join(extra)}" if extra else "its cross_attention_dim is not one width"
        raise BaseModelError(f"--base {source}: a text-conditional model takes the timestep and one text embedding "
                             f"(Stable Diffusion's UNet2DConditionModel), but {why}; tdcdiff does not pass other "
                             "conditions")


def _load_text_encoder(directory: Path, index: dict) -> TextEncoder:
    """A text-conditional pipeline's tokenizer and text encoder (model_index.json names both): allowlisted
    transformers classes, the encoder's weights read as safetensors only."""
    where = directory / "model_index.json"
    encoder, tokenizer = index.get("text_encoder"), index.get("tokenizer")
    supported = f"supported: transformers {', '.join(TRANSFORMERS_CLASSES)} with transformers {TOKENIZER_CLASSES[0]}"
    if (not isinstance(encoder, list) or list(encoder[:1]) != ["transformers"] or len(encoder) != 2
            or encoder[1] not in TRANSFORMERS_CLASSES or not isinstance(tokenizer, list) or len(tokenizer) != 2
            or list(tokenizer[:1]) != ["transformers"] or tokenizer[1] not in TOKENIZER_CLASSES):
        raise BaseModelError(f"{where}: the text_encoder {encoder!r} and tokenizer {tokenizer!r} are not ones tdcdiff "
                             f"loads; {supported}")
    folder = directory / "text_encoder"
    config = _read_json(folder / "config.json")
    weights = folder / "model.safetensors"
    if not weights.exists():
        raise BaseModelError(f"{folder} has no model.safetensors (one file); tdcdiff never unpickles weights: save "
                             "the text encoder with save_pretrained(..., safe_serialization=True)")
    try:
        data = read_untrusted(folder, weights.name, str(folder), max_bytes=MAX_TEXT_ENCODER_BYTES,
                              hint="save the text encoder again with save_pretrained")
        text_model = build_model(_text_description(config, encoder[1], data), data, folder / "config.json", weights)
        return TextEncoder(text_model, read_tokenizer(directory / "tokenizer"))
    except ValueError as err:  # TextError, or what serialization raises for the config or the weights
        raise BaseModelError(f"cannot load the text encoder of {directory}: {err}") from None


def _text_description(config: dict, class_name: str, weights: bytes) -> dict:
    """serialization's description of a pipeline's text encoder: its class, its config.json, its weights."""
    digest = hashlib.sha256(weights).hexdigest()
    return {"class": f"transformers.{class_name}", "config": config,
            "weights": {"file": "model.safetensors", "bytes": len(weights), "sha256": digest}}


def _load_vae(directory: Path, entry: list) -> nn.Module:
    """A latent diffusion pipeline's VAE: an allowlisted diffusers class with safetensors weights."""
    if len(entry) != 2 or entry[0] != "diffusers":
        raise BaseModelError(f"{directory / 'model_index.json'}: the vae {entry!r} is not one tdcdiff loads; "
                             f"supported: {', '.join(f'diffusers {name}' for name in VAE_CLASSES)}")
    return _load_diffusers_model(directory / "vae", entry[1], VAE_CLASSES, alternative="")


def is_function_spec(spec: str | None) -> bool:
    """Whether spec names code (`module:function`) rather than a directory or a Hub name."""
    return bool(spec) and bool(FUNCTION_SPEC.match(spec)) and not Path(spec).expanduser().is_dir()


# module:function specs the user named in this process -> the model their one call returned (until stage 1
# takes it) and its class. A spec read from a run directory's config.json is never called: it is not the user's.
_CALLED: dict[str, BaseModel] = {}
_TRUSTED: dict[str, type] = {}


def _call_function(spec: str) -> BaseModel:
    module_name, _, function_name = spec.partition(":")
    try:
        function = getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError) as err:
        raise BaseModelError(f"--base {spec}: cannot import {function_name} from {module_name} ({err}); "
                             "make the module importable (e.g. on PYTHONPATH)") from None
    model = function()
    if not isinstance(model, nn.Module):
        raise BaseModelError(f"--base {spec} returned a {type(model).__name__}, not a torch nn.Module")
    return BaseModel(model.eval(), None, spec)


def trust_function(spec: str | None) -> None:
    """The user named `spec` (--base, Run(..., base=...), a setting they passed): allow this process to rebuild
    the class of the model `module:function` returns (register_model_class). The function is called once per
    process; stage 1 takes that very model (load_base_model), so an unseeded model is initialised once. Nothing
    for any other kind of spec.

    A run started from a user's function saves and reloads that model in every stage, possibly in a new process
    (`tdcdiff prune --out DIR --base module:function`): the user trusted the function's code when naming it.
    Loading a bundle elsewhere still needs tdcdiff.register_model_class.
    """
    if not is_function_spec(spec):
        return
    if spec not in _TRUSTED:
        _CALLED[spec] = _call_function(spec)
        _TRUSTED[spec] = type(_CALLED[spec].model)
    register_model_class(_TRUSTED[spec])


def load_base_model(spec: str, check: Check | None = None) -> BaseModel:
    """Load a trained denoiser.

    spec: a diffusers model directory (config.json naming one of ALLOWED_MODEL_CLASSES + safetensors
        weights), a diffusers pipeline directory (model_index.json with a `unet` or `transformer` and a
        `scheduler`, whose config then sets the noise schedule; a `vae` (AutoencoderKL) in it makes it latent
        diffusion: BaseModel.vae), `module:function` (called with no arguments, must return an nn.Module; only
        after trust_function(spec) in this process), or a Hugging Face Hub name "org/name" (downloaded, then read
        as a directory).
    check: called as check(model, vae, text_encoder) before a directory's weights are read, with the model built on the
        meta device from its config (see Check; e.g. check_fits_data): a model that does not fit costs no memory.
        A function's model is checked once it returned it.
    A directory's model (and VAE) whose weights would not fit in memory is refused before they are read.
    Raises BaseModelError naming the problem and the fix.
    """
    path = Path(spec).expanduser()
    if path.is_dir():
        if (path / "model_index.json").exists():
            return _load_pipeline(path, check)
        config = _read_json(path / "config.json")
        model = _load_diffusers_model(path, config.get("_class_name"),
                                      check=None if check is None else lambda skeleton: check(skeleton, None, None))
        return BaseModel(model, None, str(path))
    if FUNCTION_SPEC.match(spec):
        if spec not in _TRUSTED:
            raise BaseModelError(
                f"base_model {spec} is code to run, and it was not named in this process (a run directory's "
                f"config.json is not enough): pass --base {spec} (or Run(..., base=...)) if you trust it")
        loaded = _CALLED.pop(spec, None) or _call_function(spec)
        if check is not None:
            check(loaded.model, None, None)
        return loaded
    if re.fullmatch(r"[\w.-]+/[\w.-]+", spec) and not path.exists():
        from huggingface_hub import snapshot_download

        try:
            local = snapshot_download(spec, allow_patterns=["*.json", "*.safetensors"])
        except Exception as err:  # network, auth and missing-repo errors all mean: not loadable from the Hub
            raise BaseModelError(f"--base {spec}: not a local directory, and the Hub download failed ({err})") from None
        return load_base_model(local, check)
    raise BaseModelError(
        f"--base {spec!r} is neither a diffusers model or pipeline directory, a module:function, nor a Hub name "
        "(org/name); fix the path"
    )


def check_saveable(model: nn.Module, source: str) -> None:
    """Raise BaseModelError (one line naming the fix) unless the model survives what every stage does to it:
    saved (serialization.architecture_of), rebuilt from its class and its saved arguments as they come back from
    JSON (lists for tuples), and saved again with the same arguments and parameter shapes. Rebuilt on the meta
    device (no memory, no weights), or for real if the constructor needs real tensors."""
    try:
        description = architecture_of(model)
    except ValueError as err:
        raise BaseModelError(f"--base {source}: {err}") from None
    if "kwargs" not in description:  # a diffusers model, rebuilt from its config
        return
    cls, kwargs = type(model), json.loads(json.dumps(description["kwargs"]))
    name = cls.__qualname__
    try:
        try:
            with torch.device("meta"):
                rebuilt = cls(**check_arguments(cls, kwargs, "tdcdiff_init_kwargs"))
        except (RuntimeError, NotImplementedError):  # a constructor that reads tensor values
            rebuilt = cls(**kwargs)
    except Exception as err:  # whatever the user's constructor raises on its saved arguments
        raise BaseModelError(
            f"--base {source}: every stage rebuilds the model as {name}(**tdcdiff_init_kwargs) from JSON, and that "
            f"fails ({type(err).__name__}: {err}); record arguments that rebuild it (JSON turns tuples into lists)"
        ) from None
    if not isinstance(getattr(rebuilt, "tdcdiff_init_kwargs", None), dict):
        raise BaseModelError(
            f"--base {source}: a {name} rebuilt from its saved arguments has no tdcdiff_init_kwargs, so a pruned "
            f"model could not be saved; set self.tdcdiff_init_kwargs in {name}.__init__ (a subclass that records "
            "its constructor arguments), not on the instance"
        )
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    again = {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()}
    differ = sorted(set(shapes.items()) ^ set(again.items()))
    if differ or json.loads(json.dumps(rebuilt.tdcdiff_init_kwargs)) != kwargs:
        what = f"tensor {differ[0][0]!r}" if differ else "its tdcdiff_init_kwargs"
        raise BaseModelError(
            f"--base {source}: a {name} rebuilt from its tdcdiff_init_kwargs differs from the model in {what}; "
            "record every constructor argument that shapes the model"
        )


def _config_value(model: nn.Module, key: str):
    config = getattr(model, "config", None)
    return getattr(config, key, None) if config is not None else None


def check_fits_data(model: nn.Module, source: str, *, channels: int, image_size: int, data_name: str,
                    num_classes: int | None, null_class: int | None, num_train_timesteps: int,
                    captioned: bool = False, text_encoder: bool = False) -> None:
    """Raise BaseModelError (one line naming both sides and the fix) unless the model takes the data as it is:
    channel count, image size (diffusers `sample_size`), timesteps, class count vs the data's labels, and for a
    text-conditional model its text encoder (text_encoder: the base came with one) and the data's captions."""
    try:
        check_denoiser(model, (channels, image_size, image_size))
    except ValueError as err:
        raise BaseModelError(f"--base {source}: {err}") from None
    size = _config_value(model, "sample_size")
    if isinstance(size, (list, tuple)):
        size = size[0] if len(set(size)) == 1 else tuple(size)
    if isinstance(size, int) and size != image_size:
        raise BaseModelError(f"--base {source} takes {size}x{size} images but the data {data_name!r} is "
                             f"{image_size}x{image_size}; load it with --image-size {size}")
    trained_t = _config_value(model, "num_train_timesteps")
    if isinstance(trained_t, int) and trained_t != num_train_timesteps:
        raise BaseModelError(f"--base {source} was trained with T={trained_t} timesteps but the run uses "
                             f"T={num_train_timesteps}; set --timesteps {trained_t}")
    if text_width(model) is not None:
        _check_text_inputs(model, source, data_name, captioned, text_encoder)
        return
    classes = num_class_embeds(model)
    if classes is None:
        return
    if not num_classes:
        raise BaseModelError(f"--base {source} is class-conditional ({classes} class ids) but the data {data_name!r} "
                             "has no labels; use labelled data (class subfolders, IDX labels) or an unconditional "
                             "model")
    if null_class is not None and not 0 <= null_class < classes:
        raise BaseModelError(f"null_class {null_class} is not one of the {classes} class ids --base {source} embeds "
                             f"(0..{classes - 1}); leave it unset for the last, {classes - 1}")
    if num_classes > classes - (null_class is not None):
        raise BaseModelError(
            f"the data {data_name!r} has {num_classes} classes but --base {source} embeds {classes} class ids"
            + (f" (id {null_class} is the null class)" if null_class is not None else "")
            + "; use data with fewer classes (or a model with more)"
        )
    if null_class is not None and null_class < num_classes:
        raise BaseModelError(
            f"null_class {null_class} is also class {null_class} of the data {data_name!r} (its classes are "
            f"0..{num_classes - 1}): dropped labels would be read as that class; set null_class (base.null_class, "
            f"finetune.null_class) to an id no image has, e.g. {classes - 1} (the last, used when it is unset)")


def _check_text_inputs(model: nn.Module, source: str, data_name: str, captioned: bool, text_encoder: bool) -> None:
    check_text_unet(model, source)
    if not text_encoder:
        raise BaseModelError(f"--base {source} is text-conditional (cross_attention_dim {text_width(model)}) but comes "
                             "without a text encoder and tokenizer; pass its pipeline directory (model_index.json "
                             "naming the unet, text_encoder and tokenizer)")
    if not captioned:
        raise BaseModelError(f"--base {source} is text-conditional but the data {data_name!r} has no captions; add a "
                             "metadata.jsonl to the image folder, one {\"file_name\": ..., \"text\": ...} per image")

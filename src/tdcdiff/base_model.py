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
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .files import read_untrusted
from .models import check_denoiser, num_class_embeds, text_width
from .serialization import TRANSFORMERS_CLASSES, architecture_of, build_model, check_arguments, register_model_class
from .text import TOKENIZER_CLASSES, TextEncoder, TextError, check_widths, read_tokenizer

# The diffusers model classes a directory may name: denoisers called as model(x, t[, class_labels]), or with
# encoder_hidden_states (UNet2DConditionModel, with its pipeline's text encoder).
ALLOWED_MODEL_CLASSES = ("UNet2DModel", "DiTTransformer2DModel", "UNet2DConditionModel")
MAX_TEXT_ENCODER_BYTES = 16 << 30  # Stable Diffusion 2's CLIP text encoder: 1.4 GB in float32
DENOISER_KEYS = ("unet", "transformer")
FUNCTION_SPEC = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


class BaseModelError(ValueError):
    """A --base that cannot be loaded or does not fit the data; the message names both and the fix."""


@dataclass
class BaseModel:
    """A loaded trained denoiser. scheduler_config: the pipeline's noise schedule (plain JSON), or None when
    the run's own schedule settings apply. source: what it was loaded from."""

    model: nn.Module
    scheduler_config: dict | None
    source: str
    vae: nn.Module | None = None  # a latent diffusion pipeline's VAE: the model works on its latents
    text_encoder: TextEncoder | None = None  # a text-conditional pipeline's tokenizer and text encoder


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise BaseModelError(f"{path} is missing; a diffusers directory needs it (write it with save_pretrained)") from None
    except (ValueError, UnicodeDecodeError) as err:
        raise BaseModelError(f"{path} is not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise BaseModelError(f"{path} must hold a JSON object")
    return data


def _load_diffusers_model(directory: Path, class_name, allowed: tuple[str, ...] = ALLOWED_MODEL_CLASSES,
                          alternative: str = " (or pass a module:function returning your nn.Module)") -> nn.Module:
    """A diffusers model of one of the `allowed` classes, from a save_pretrained directory (safetensors only)."""
    import diffusers

    if class_name not in allowed:
        raise BaseModelError(f"{directory}: model class {class_name!r} is not one tdcdiff loads; supported: "
                             f"{', '.join(allowed)}{alternative}")
    if not any(directory.glob("*.safetensors")):
        raise BaseModelError(
            f"{directory} has no .safetensors weights; tdcdiff never unpickles weights: save the model with "
            "save_pretrained(..., safe_serialization=True)"
        )
    try:
        return getattr(diffusers, class_name).from_pretrained(directory, use_safetensors=True).eval()
    except (OSError, ValueError, RuntimeError) as err:
        raise BaseModelError(f"cannot load {class_name} from {directory}: {err}") from None


def _named(index: dict, key: str) -> bool:
    """Whether model_index.json names a component under `key` (a [library, class] entry that is not null)."""
    return isinstance(index.get(key), list) and bool(index[key]) and index[key][0] is not None


def _load_pipeline(directory: Path) -> BaseModel:
    index = _read_json(directory / "model_index.json")
    vae = _load_vae(directory, index["vae"]) if _named(index, "vae") else None
    text = _load_text_encoder(directory, index) if _named(index, "text_encoder") or _named(index, "tokenizer") else None
    key = next((k for k in DENOISER_KEYS if isinstance(index.get(k), list) and len(index[k]) == 2), None)
    if key is None:
        raise BaseModelError(f"{directory / 'model_index.json'} names no denoiser: it needs a 'unet' or 'transformer' entry")
    library, class_name = index[key]
    if library != "diffusers":
        raise BaseModelError(f"{directory}: the {key} comes from {library!r}; only diffusers model classes are loaded")
    model = _load_diffusers_model(directory / key, class_name)
    scheduler = _read_json(directory / "scheduler" / "scheduler_config.json")
    if "num_train_timesteps" not in scheduler:
        raise BaseModelError(f"{directory / 'scheduler' / 'scheduler_config.json'} has no num_train_timesteps")
    if text is not None:
        check_text_unet(model, str(directory))
        try:
            check_widths(text_width(model), text, str(directory))
        except TextError as err:
            raise BaseModelError(str(err)) from None
    return BaseModel(model, {k: v for k, v in scheduler.items() if not k.startswith("_")}, str(directory), vae, text)


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
    from .latent import VAE_CLASSES

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


def load_base_model(spec: str) -> BaseModel:
    """Load a trained denoiser.

    spec: a diffusers model directory (config.json naming one of ALLOWED_MODEL_CLASSES + safetensors
        weights), a diffusers pipeline directory (model_index.json with a `unet` or `transformer` and a
        `scheduler`, whose config then sets the noise schedule; a `vae` (AutoencoderKL) in it makes it latent
        diffusion: BaseModel.vae), `module:function` (called with no arguments, must return an nn.Module; only
        after trust_function(spec) in this process), or a Hugging Face Hub name "org/name" (downloaded, then read
        as a directory).
    Raises BaseModelError naming the problem and the fix.
    """
    path = Path(spec).expanduser()
    if path.is_dir():
        if (path / "model_index.json").exists():
            return _load_pipeline(path)
        config = _read_json(path / "config.json")
        return BaseModel(_load_diffusers_model(path, config.get("_class_name")), None, str(path))
    if FUNCTION_SPEC.match(spec):
        if spec not in _TRUSTED:
            raise BaseModelError(
                f"base_model {spec} is code to run, and it was not named in this process (a run directory's "
                f"config.json is not enough): pass --base {spec} (or Run(..., base=...)) if you trust it")
        return _CALLED.pop(spec, None) or _call_function(spec)
    if re.fullmatch(r"[\w.-]+/[\w.-]+", spec) and not path.exists():
        from huggingface_hub import snapshot_download

        try:
            local = snapshot_download(spec, allow_patterns=["*.json", "*.safetensors"])
        except Exception as err:  # network, auth and missing-repo errors all mean: not loadable from the Hub
            raise BaseModelError(f"--base {spec}: not a local directory, and the Hub download failed ({err})") from None
        return load_base_model(local)
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
                             "has no labels; use labelled data (class subfolders, IDX labels) or an unconditional model")
    usable = classes - (null_class == classes - 1)
    if num_classes > usable:
        raise BaseModelError(
            f"the data {data_name!r} has {num_classes} classes but --base {source} embeds {classes} class ids"
            + (f" (id {null_class} is the null class)" if null_class is not None else "")
            + "; use data with fewer classes (or a model with more)"
        )


def _check_text_inputs(model: nn.Module, source: str, data_name: str, captioned: bool, text_encoder: bool) -> None:
    check_text_unet(model, source)
    if not text_encoder:
        raise BaseModelError(f"--base {source} is text-conditional (cross_attention_dim {text_width(model)}) but comes "
                             "without a text encoder and tokenizer; pass its pipeline directory (model_index.json "
                             "naming the unet, text_encoder and tokenizer)")
    if not captioned:
        raise BaseModelError(f"--base {source} is text-conditional but the data {data_name!r} has no captions; add a "
                             "metadata.jsonl to the image folder, one {\"file_name\": ..., \"text\": ...} per image")


def scheduler_from_config(config: dict):
    """The training DDPMScheduler of a pipeline's scheduler config (its betas, T, prediction and variance type)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(config)

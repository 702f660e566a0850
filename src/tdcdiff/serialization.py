"""Save and load (pruned) models without pickle.

A saved model is a directory with architecture.json (how to rebuild the UNPRUNED architecture, plus the
weights file's size and sha256) and model.safetensors (the state dict). Loading rebuilds the base
architecture, resizes every parameter and buffer to its saved shape, re-derives size attributes from the
new shapes and loads the weights strictly. This works where diffusers' save_pretrained / from_pretrained
cannot (a pruned UNet's config still states the unpruned widths) and needs neither torch.load nor pickle.

Saved files are untrusted input: loading never imports what a file names. It rebuilds only diffusers' model
classes (exported as `diffusers.<Name>`), the transformers text encoders of TRANSFORMERS_CLASSES (from their config,
as `transformers.<Name>`) and classes registered with `register_model_class`, with constructor arguments checked
against the class's signature, and reads only files inside the saved model's directory.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import sys
import threading
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file
from torch import nn

from .content_hash import sha256_file
from .files import (
    atomic_dir,
    brief,
    is_count,
    is_sha256,
    json_safe,
    output_path,
    parse_json,
    read_untrusted,
)
from .models import Denoiser
from .surgery.attributes import sync_module_attributes
from .surgery.depth import remove

ARCHITECTURE_FILE = "architecture.json"
WEIGHTS_FILE = "model.safetensors"
A_SAVED_MODEL = f"a saved model (with {ARCHITECTURE_FILE} and {WEIGHTS_FILE}), nor empty"


def saved_model_files(directory: Path) -> list[str] | None:
    """The files of an earlier save_model output in directory (an `ours` test for files.atomic_dir, which may
    replace it when it holds nothing else): architecture.json, a JSON object naming a "class", and
    model.safetensors, both regular files. None when it is not one."""
    if not (directory / WEIGHTS_FILE).is_file() or (directory / WEIGHTS_FILE).is_symlink():
        return None
    try:
        data = read_untrusted(directory, ARCHITECTURE_FILE, str(directory), max_bytes=MAX_ARCHITECTURE_BYTES, hint="")
        description = parse_json(data, directory / ARCHITECTURE_FILE, "")
    except (OSError, ValueError):
        return None
    return [ARCHITECTURE_FILE, WEIGHTS_FILE] if isinstance(description, dict) and "class" in description else None
MAX_ARCHITECTURE_BYTES = 4 << 20  # a config, a list of removed layers: kilobytes
# Floating dtypes torch computes with on every device; float8 and complex weights are refused on load.
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


# The transformers model classes a saved file may name: the text encoders of Stable Diffusion's layout (text.py).
TRANSFORMERS_CLASSES = ("CLIPTextModel",)


def _is_diffusers_model(model: nn.Module) -> bool:
    # A diffusers model cannot exist unless diffusers was imported: skip its slow import otherwise.
    return "diffusers" in sys.modules and isinstance(model, sys.modules["diffusers"].ModelMixin)


def _is_transformers_model(model: nn.Module) -> bool:
    return "transformers" in sys.modules and isinstance(model, sys.modules["transformers"].PreTrainedModel)


# Classes a user allowed to be rebuilt from saved files, by the name they are saved under.
_REGISTERED: dict[str, type] = {}


def class_path(cls: type) -> str:
    """The name a class is saved under: `module.QualName` (diffusers' exported classes: `diffusers.Name`)."""
    diffusers = sys.modules.get("diffusers")
    exported = diffusers is not None and getattr(diffusers, cls.__name__, None) is cls
    if exported and cls.__module__.startswith("diffusers."):
        return f"diffusers.{cls.__name__}"
    return f"{cls.__module__}.{cls.__qualname__}"


def register_model_class(cls: type) -> type:
    """Allow load_model and load_bundle to rebuild instances of `cls` (a torch.nn.Module subclass).

    Saved models are untrusted input, so loading rebuilds only diffusers' model classes and the classes
    registered here, matched by the import path they were saved under (`module.QualName`). Call it in your
    own code, before loading, for each of your model classes you trust. Returns cls (usable as a class
    decorator). Raises TypeError when cls is not an nn.Module subclass.
    """
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"register_model_class takes a torch.nn.Module subclass, got {cls!r}")
    _REGISTERED[class_path(cls)] = cls
    return cls


def _importable_name(cls: type) -> str:
    """class_path(cls), after checking that a loader in another process can import the class by it."""
    name = class_path(cls)
    if name.startswith("diffusers."):
        return name
    if cls.__module__ == "__main__":
        raise ValueError(
            f"cannot save a {cls.__qualname__} defined in the script being run (__main__): a saved model names "
            "its class by import path, which __main__ is not in the process that loads it. Move the class into "
            "a module (e.g. my_models.py next to the script), import it from there, and call "
            f"tdcdiff.register_model_class({cls.__qualname__}) before loading"
        )
    if "." in cls.__qualname__ or getattr(sys.modules.get(cls.__module__), cls.__qualname__, None) is not cls:
        raise ValueError(
            f"cannot save a {name}: it cannot be imported by that name; define the class at the top level of "
            f"module {cls.__module__}"
        )
    return name


def architecture_of(model: nn.Module) -> dict:
    """Plain-JSON description from which load_model rebuilds the model's UNPRUNED architecture.

    model: a diffusers model (described by its config), a Denoiser wrapping a model (described as the
    wrapped model plus "wrapped": "Denoiser"), or any module with a `tdcdiff_init_kwargs` dict attribute
    holding its constructor's keyword arguments. The class is named by its import path (class_path).
    Raises ValueError when the class cannot be imported by name (defined in __main__ or inside a function).
    """
    if isinstance(model, Denoiser):
        return {**architecture_of(model.model), "wrapped": "Denoiser"}
    cls = type(model)
    if _is_transformers_model(model):
        if cls.__name__ not in TRANSFORMERS_CLASSES or getattr(sys.modules["transformers"], cls.__name__) is not cls:
            raise ValueError(f"cannot save a {class_path(cls)}: of transformers' models tdcdiff saves only "
                             f"{', '.join(TRANSFORMERS_CLASSES)}")
        return {"class": f"transformers.{cls.__name__}", "config": json_safe(model.config.to_dict())}
    if _is_diffusers_model(model):
        config = {k: json_safe(v) for k, v in dict(model.config).items() if not k.startswith("_")}
        description = {"class": _importable_name(cls), "config": config}
        if getattr(model, "tdcdiff_removed", None):  # depth-pruned layers (surgery.depth): rebuilt, then removed
            description["removed"] = list(model.tdcdiff_removed)
        return description
    name = f"{cls.__module__}.{cls.__qualname__}"
    kwargs = getattr(model, "tdcdiff_init_kwargs", None)
    if not isinstance(kwargs, dict):
        raise ValueError(
            f"cannot save a {name}: tdcdiff rebuilds a model from its class and constructor arguments. Set "
            f"`model.tdcdiff_init_kwargs = {{...}}` (in its __init__, for example) to the keyword arguments "
            f"that rebuild its unpruned architecture as {cls.__qualname__}(**kwargs), with plain JSON values"
        )
    name = _importable_name(cls)
    try:
        json.dumps(kwargs)
    except TypeError as err:
        raise ValueError(f"cannot save a {name}: tdcdiff_init_kwargs must hold plain JSON values ({err})") from None
    return {"class": name, "kwargs": kwargs}


def save_model(model: nn.Module, directory: str | Path, *, extra: dict | None = None) -> dict:
    """Save a (possibly pruned) model as directory/architecture.json + directory/model.safetensors.

    model: anything architecture_of() describes. directory: replaced atomically (never half-written) when absent,
    empty or an earlier save_model output holding nothing else, else ValueError before any write (files.atomic_dir);
    a symlink to a folder is written through, the link kept.
    extra: JSON-able provenance stored under "extra" in architecture.json.
    Returns the content of architecture.json.
    """
    directory = output_path(directory, directory=True)  # an empty or unwritable path is refused before any work
    description = architecture_of(model)
    if extra is not None:
        description["extra"] = extra
    tensors, storages = {}, set()
    for key, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        storage = tensor.untyped_storage().data_ptr()
        # safetensors refuses tensors that share memory (a module registered under two names).
        tensors[key] = tensor.clone() if storage in storages else tensor
        storages.add(storage)
    with atomic_dir(directory, saved_model_files, A_SAVED_MODEL) as tmp:
        weights = tmp / WEIGHTS_FILE
        save_file(tensors, weights)
        size, digest = weights.stat().st_size, sha256_file(weights)
        description["weights"] = {"file": WEIGHTS_FILE, "bytes": size, "sha256": digest}
        (tmp / ARCHITECTURE_FILE).write_text(json.dumps(description, indent=2))
    return description




def _diffusers_export(name: str, base: str) -> type | None:
    """diffusers.<name> when it is a subclass of diffusers.<base>, else None; nothing but diffusers is imported."""
    if not name.isidentifier() or name.startswith("_"):
        return None
    import diffusers

    try:
        cls = getattr(diffusers, name, None)
    except Exception:  # diffusers' lazy import of an export whose optional dependency is missing
        return None
    return cls if isinstance(cls, type) and issubclass(cls, getattr(diffusers, base)) else None


def allowed_class(name: object, base: str, what: str) -> type:
    """The class saved as `name`, when it may be rebuilt: a `diffusers.<Name>` subclass of diffusers.<base>
    ("ModelMixin" or "SchedulerMixin"), also named by its own module path ('diffusers.models.unets.unet_2d.
    UNet2DModel': the same class object, nothing imported), or (for models) a class given to register_model_class.

    Raises ValueError naming the class, `what` (the file and key) and how to allow it.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"{what} must name a class as 'module.Class', got {brief(name)}; the file was edited or "
                         "corrupted")
    if base == "ModelMixin" and name in _REGISTERED:
        return _REGISTERED[name]
    prefix, _, attr = name.partition(".")
    if base == "ModelMixin" and prefix == "transformers" and attr in TRANSFORMERS_CLASSES:
        import transformers

        return getattr(transformers, attr)
    cls = _diffusers_export(attr.rpartition(".")[2], base) if prefix == "diffusers" else None
    if cls is not None and attr in (cls.__name__, f"{cls.__module__}.{cls.__qualname__}".partition(".")[2]):
        return cls  # diffusers.<Name>, or the same class under its full module path (nothing else is imported)
    if base != "ModelMixin":
        raise ValueError(f"{what} names {brief(name)}, which is not a diffusers scheduler class (diffusers.<Name>, or "
                         "the class's own module path); the file was edited or corrupted")
    short = name.rpartition(".")[2]
    raise ValueError(
        f"{what} names class {brief(name)}, which tdcdiff does not rebuild: saved files are untrusted, so only "
        "diffusers model classes (named 'diffusers.<Name>', e.g. 'diffusers.UNet2DModel', or by the class's own "
        f"module path) and registered classes are. If you trust this file and {name} is your model "
        f"class, call `tdcdiff.register_model_class({short})` (after importing it) before loading"
    )


def check_arguments(cls: type, arguments: object, what: str, *, check_types: bool = False) -> dict:
    """Constructor arguments checked against the signature of cls.__init__: a mapping holding every required
    parameter and only known ones (any, when __init__ takes **kwargs). check_types: also require each value
    to be None or of its default's kind (bool, number, string, list), for config classes whose constructors
    accept garbage silently (diffusers schedulers). Returns the arguments; raises ValueError naming `what`.
    """
    name = cls.__name__
    if not isinstance(arguments, dict):
        raise ValueError(f"{what} must be a mapping of {name}'s constructor arguments, got {type(arguments).__name__}")
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]  # without self
    named = {p.name: p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    unknown = sorted(set(arguments) - set(named))
    if unknown and not any(p.kind is p.VAR_KEYWORD for p in params):
        raise ValueError(f"{what}: {name} takes no argument(s) {brief(unknown)}; its arguments are {sorted(named)}. "
                         "The file was edited or written by another version: re-export it")
    missing = sorted(k for k, p in named.items() if p.default is p.empty and k not in arguments)
    if missing:
        raise ValueError(f"{what}: {name} needs the argument(s) {missing}; the file is incomplete: re-export it")
    for key, value in arguments.items() if check_types else ():
        default = named[key].default if key in named else None
        if value is None or default is None or default is inspect.Parameter.empty:
            continue
        kinds = ((bool,) if isinstance(default, bool) else (int,) if isinstance(default, int)
                 else (int, float) if isinstance(default, float) else (str,) if isinstance(default, str)
                 else (list, tuple) if isinstance(default, (list, tuple)) else (object,))
        if not isinstance(value, kinds) or (isinstance(value, bool) and not isinstance(default, bool)):
            kind = "a number" if float in kinds else f"of type {kinds[0].__name__}"  # an int is a float's value too
            raise ValueError(f"{what}: {name} argument {key!r} must be {kind} (its default is "
                             f"{default!r}), got {brief(value)}; the file was edited or corrupted: re-export it")
    return arguments


def _rebuild(description: dict, source: Path) -> nn.Module:
    """A fresh, unpruned model from an architecture description (source: its file, for messages)."""
    cls = allowed_class(description.get("class"), "ModelMixin", f"{source} 'class'")
    wrapped = description.get("wrapped")
    if wrapped not in (None, "Denoiser"):
        raise ValueError(f"{source}: 'wrapped' must be 'Denoiser' or absent, got {brief(wrapped)}; re-save the model")
    diffusers = sys.modules.get("diffusers")
    is_config = diffusers is not None and issubclass(cls, diffusers.ModelMixin)
    text_encoder = f"transformers.{cls.__name__}" == description.get("class") and cls.__name__ in TRANSFORMERS_CLASSES
    key = "config" if is_config or text_encoder else "kwargs"
    if text_encoder:  # a transformers config takes any key; building it is the check
        if not isinstance(description.get(key), dict):
            raise ValueError(f"{source} 'config' must be a mapping of {cls.__name__}'s config, got "
                             f"{type(description.get(key)).__name__}")
        arguments = {k: v for k, v in description[key].items() if k not in ("auto_map", "_name_or_path")}
    else:
        arguments = check_arguments(cls, description.get(key), f"{source} {key!r}")
    try:
        model = (cls.from_config(arguments) if is_config else cls(cls.config_class.from_dict(arguments)) if text_encoder
                 else cls(**arguments))
    except _BuildTooLarge:
        raise
    except Exception as err:  # any failure of an allowlisted constructor on the saved arguments
        raise ValueError(f"{source}: cannot build {cls.__name__} from its saved {key!r} ({type(err).__name__}: "
                         f"{brief(str(err), 300, quote=False)}); re-save the model") from err
    return Denoiser(model) if wrapped == "Denoiser" else model


def _resize_to(model: nn.Module, state: dict[str, torch.Tensor], source: Path, weights_path: Path) -> None:
    """Give every parameter and buffer of the model the shape and dtype it has in a saved state dict (read from
    weights_path; the model was built from source, its architecture.json)."""
    fix = "re-run the stage that wrote it"
    for key, saved in state.items():
        owner_name, _, leaf = key.rpartition(".")
        try:
            owner = model.get_submodule(owner_name)
        except AttributeError:
            owner = None
        current = getattr(owner, leaf, None)
        if not isinstance(current, torch.Tensor):
            raise ValueError(f"{weights_path}: saved tensor {brief(key)} has no counterpart in the model built from "
                             f"{source}; {fix}")
        if current.is_floating_point() != saved.is_floating_point():
            raise ValueError(f"{weights_path} holds tensor {brief(key)} as {saved.dtype}, where the model built from "
                             f"{source} has {current.dtype}: the weights file was edited or corrupted; {fix}")
        if current.shape == saved.shape and current.dtype == saved.dtype:
            continue
        if current.dim() != saved.dim():
            raise ValueError(f"{weights_path}: cannot resize {brief(key)} from {tuple(current.shape)} (as built from "
                             f"{source}) to the saved {tuple(saved.shape)}; {fix}")
        new = torch.empty(saved.shape, dtype=saved.dtype, device=current.device)
        setattr(owner, leaf, nn.Parameter(new, current.requires_grad) if isinstance(current, nn.Parameter) else new)


def read_architecture(data: bytes, source: Path) -> dict:
    """The architecture description in an architecture.json file's bytes, with its "weights" entry checked.

    Raises ValueError naming source for invalid JSON (nested too deep, keys repeated) or a missing or
    malformed weights entry.
    """
    description = parse_json(data, source, "re-run the stage that wrote it")
    weights = description.get("weights") if isinstance(description, dict) else None
    if (not isinstance(weights, dict) or not isinstance(weights.get("file"), str)
            or not is_count(weights.get("bytes")) or not is_sha256(weights.get("sha256"))):
        raise ValueError(f"{source} does not describe a weights file ('weights': {{file, bytes, sha256}}) with the "
                         "sha256 as 64 lower-case hex digits; "
                         "re-run the stage that wrote it")
    return description


def build_model(description: dict, data: bytes, source: Path, weights_path: Path) -> nn.Module:
    """The model (in eval mode, in its saved dtype) from a description (read_architecture) and the bytes of its
    weights file (weights_path, for messages), after checking their sha256 against the description.

    Raises ValueError naming the file for anything that does not match.
    """
    if hashlib.sha256(data).hexdigest() != description["weights"]["sha256"]:
        raise ValueError(f"{weights_path} is corrupted: its sha256 does not match {source}; re-run the stage that "
                         "wrote it")
    try:
        state = load_safetensors(data)
    except Exception as err:  # safetensors' own error type for a malformed header
        raise ValueError(f"{weights_path} is not a valid safetensors file ({brief(str(err), 200, quote=False)}); "
                         "re-run the stage that wrote it") from None
    odd = sorted({str(t.dtype).removeprefix("torch.") for t in state.values()
                  if (t.is_floating_point() or t.is_complex()) and t.dtype not in FLOAT_DTYPES})
    if odd:
        names = [k for k, t in state.items() if str(t.dtype).removeprefix("torch.") in odd]
        raise ValueError(f"{weights_path} holds {', '.join(odd)} tensors (in {', '.join(names[:3])}), which models are "
                         "not computed in; saved weights are float32, float16 or bfloat16: re-run the stage that "
                         "wrote it") from None
    model = _rebuild_empty(description, source, state)
    if str(description.get("class")).startswith("transformers."):  # never pruned: weights of the config's shapes
        state = _text_model_keys(state, model)
        built = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        odd = next((k for k in sorted(state) if k in built and built[k] != tuple(state[k].shape)), None)
        if odd is not None:
            raise ValueError(f"{weights_path} does not fit the architecture in {source}: {brief(odd)} is "
                             f"{tuple(state[odd].shape)}, its config makes it {built[odd]}")
    if description.get("removed"):
        _remove_layers(model, description["removed"], source)
    dtypes = {t.dtype for t in state.values() if t.is_floating_point()}
    if len(dtypes) == 1 and dtypes != {torch.get_default_dtype()}:  # keep the saved precision, buffers included
        model.to(dtypes.pop())
    _resize_to(model, state, source, weights_path)
    sync_module_attributes(model)
    try:
        # assign: the loaded tensors become the parameters (a meta-built model has no storage to copy into)
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as err:
        raise ValueError(f"{weights_path} does not fit the architecture in {source}: "
                         f"{brief(' '.join(str(err).split()), 400, quote=False)}") from None
    return model.eval()


def _text_model_keys(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """A CLIP text encoder's weights under the key names this transformers version gives them: transformers 5
    dropped the `text_model.` prefix that version 4 (and every Stable Diffusion pipeline it saved) used, and before
    4.31 `embeddings.position_ids` was saved too (later versions build it). Other keys are left to the strict load."""
    expected = set(model.state_dict())
    kept = {k: v for k, v in state.items() if not k.endswith("embeddings.position_ids") or k in expected}
    for renamed in (kept, {k.removeprefix("text_model."): v for k, v in kept.items()},
                    {f"text_model.{k}": v for k, v in kept.items()}):
        if set(renamed) == expected:
            return renamed
    return state


def _rebuild_empty(description: dict, source: Path, state: dict[str, torch.Tensor]) -> nn.Module:
    """_rebuild on the meta device, so that the unpruned size a description names costs no memory before the
    saved (pruned) shapes replace it; every tensor then comes from the weights file (load_state_dict assign).
    A model with a tensor the weights file does not hold (a non-persistent buffer) is built for real.
    Either build stops early when it outgrows the saved weights `state` (see _BuildBudget)."""
    with torch.device("meta"), _BuildBudget(state, source):
        model = _rebuild(description, source)
    saved = set(model.state_dict())
    if any(name not in saved for name, _ in model.named_buffers()):
        with _BuildBudget(state, source):
            return _rebuild(description, source)
    return model


class _BuildTooLarge(ValueError):
    pass


class _BuildBudget:
    """While a model is built in this thread, count the modules it registers and the elements of the tensors it
    allocates (not on the meta device), and stop it once they far outgrow the weights it will be given: a
    small architecture.json (layers_per_block=20000) must not cost minutes and gigabytes before its weights
    are compared. Allowed: 16 modules per saved tensor (layers removed by depth pruning are built first) and
    64 elements per saved element (a pruned model's unpruned base is built first), plus a margin."""

    def __init__(self, state: dict[str, torch.Tensor], source: Path):
        self.max_modules = 16 * len(state) + 256
        self.max_elements = 64 * sum(t.numel() for t in state.values()) + (1 << 24)
        self.modules = self.elements = 0
        self.source, self.thread = source, threading.get_ident()

    def _module(self, module, name, submodule):
        if threading.get_ident() == self.thread:
            self.modules += 1
            if self.modules > self.max_modules:
                raise _BuildTooLarge(f"{self.source} describes a model of more than {self.max_modules} modules, far "
                                     "more than its weights file holds tensors for; re-run the stage that wrote it")

    def _tensor(self, module, name, tensor):
        if threading.get_ident() == self.thread and tensor is not None and tensor.device.type != "meta":
            self.elements += tensor.numel()
            if self.elements > self.max_elements:
                raise _BuildTooLarge(f"{self.source} describes a model of more than {self.max_elements} parameter "
                                     "elements, far more than its weights file holds; re-run the stage that wrote it")

    def __enter__(self):
        from torch.nn.modules import module

        self.handles = [module.register_module_module_registration_hook(self._module),
                        module.register_module_parameter_registration_hook(self._tensor),
                        module.register_module_buffer_registration_hook(self._tensor)]

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()


def _remove_layers(model: nn.Module, removed, source: Path) -> None:
    """Remove the depth-pruned layers listed under "removed" from a rebuilt base (see surgery.depth)."""
    if not isinstance(removed, list) or not all(isinstance(name, str) for name in removed):
        raise ValueError(f"{source}: 'removed' must be a list of layer names, got {brief(removed)}")
    try:
        remove(model, removed)
    except ValueError as err:
        raise ValueError(f"{source}: {brief(str(err), 500, quote=False)}; re-run the stage that wrote it") from None


def load_model(directory: str | Path) -> nn.Module:
    """Load a model written by save_model (in eval mode), checking the weights file's size and sha256.

    directory: the saved model's directory; only regular files inside it are read (files.read_untrusted).
    Its class must be allowed (see allowed_class and register_model_class). Raises FileNotFoundError for
    missing files and ValueError for corrupt, mismatching or disallowed ones, naming the file.
    """
    directory = Path(directory)
    source = directory / ARCHITECTURE_FILE
    hint = "re-run the stage that wrote it"
    try:
        text = read_untrusted(directory, ARCHITECTURE_FILE, str(directory), max_bytes=MAX_ARCHITECTURE_BYTES, hint=hint)
    except FileNotFoundError:
        raise FileNotFoundError(f"{source} is missing: {directory} is not a complete saved model; {hint}") from None
    description = read_architecture(text, source)
    weights = description["weights"]
    data = read_untrusted(directory, weights["file"], f"{source} 'weights.file'", max_bytes=weights["bytes"],
                          expected_bytes=weights["bytes"], hint=hint)
    return build_model(description, data, source, directory / weights["file"])

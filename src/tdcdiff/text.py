"""Text conditioning in Stable Diffusion's layout: a CLIP tokenizer and text encoder turn prompts into the
embeddings a UNet2DConditionModel's cross-attention reads.

As diffusers' StableDiffusionPipeline does (`encode_prompt`): each prompt is tokenized, padded and truncated to the
tokenizer's model_max_length (77), and the text encoder's last hidden state, (N, 77, width), is the UNet's
encoder_hidden_states; the empty prompt's embedding is the unconditional one of classifier-free guidance.

Tokenizer files are untrusted input: the tokenizer is built from plain data (its vocabulary, its BPE merges and a
few checked settings), never by a transformers loader that a file could point at other code; the text encoder is an
allowlisted transformers class with safetensors weights (serialization.TRANSFORMERS_CLASSES).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from .files import atomic_dir, brief, holds, read_untrusted
from .models import CLIP_TOKENS

TOKENIZER_CLASSES = ("CLIPTokenizer", "CLIPTokenizerFast")  # as a pipeline's model_index.json may name it
# What tdcdiff writes for a tokenizer (a run's base/tokenizer, a bundle's tokenizer/): plain data only.
VOCAB_FILE, MERGES_FILE, SETTINGS_FILE = "vocab.json", "merges.txt", "tokenizer_config.json"
TOKENIZER_FILES = (VOCAB_FILE, MERGES_FILE, SETTINGS_FILE)
MAX_TOKENIZER_BYTES = 64 << 20  # CLIP's vocab.json is 1.6 MB, merges.txt 0.5 MB, tokenizer.json 3.6 MB
MAX_VOCAB = 1 << 20  # CLIP: 49,408 tokens
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")


class TextError(ValueError):
    """A tokenizer or text encoder that cannot be used; the message names the file and the fix."""


def _special(value: object, key: str, where: str) -> str:
    """A special token as tokenizer_config.json gives it: a string, or (older files) {"content": string, ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    if not isinstance(value, str) or not value:
        raise TextError(f"{where}: {key!r} must be a token (a string), got {brief(value)}")
    return value


def _settings(config: object, where: str) -> dict:
    """The tokenizer settings tdcdiff uses (model_max_length and the special tokens), checked; other keys of a
    pipeline's tokenizer_config.json are not used."""
    if not isinstance(config, dict):
        raise TextError(f"{where} must hold a JSON object, got {type(config).__name__}")
    name = config.get("tokenizer_class", config.get("class", "CLIPTokenizer"))
    if name not in TOKENIZER_CLASSES:
        raise TextError(f"{where} names tokenizer class {brief(name)}; tdcdiff builds only "
                        f"{', '.join(TOKENIZER_CLASSES)}")
    length = config.get("model_max_length")
    if length != CLIP_TOKENS:
        raise TextError(f"{where}: model_max_length is {brief(length)}, but tdcdiff counts, traces and times "
                        f"text-conditional models at CLIP's {CLIP_TOKENS} tokens (Stable Diffusion pads every prompt "
                        f"to 77); use a CLIP tokenizer with model_max_length {CLIP_TOKENS}")
    return {"model_max_length": length, **{k: _special(config[k], k, where) for k in SPECIAL_TOKENS if k in config}}


def _vocab(data: object, where: str) -> dict[str, int]:
    if (not isinstance(data, dict) or not data or len(data) > MAX_VOCAB
            or not all(isinstance(k, str) and type(v) is int and 0 <= v < MAX_VOCAB for k, v in data.items())):
        raise TextError(f"{where} must map each token (a string) to its id (an integer 0..{MAX_VOCAB - 1}), at most "
                        f"{MAX_VOCAB} of them")
    if len(set(data.values())) != len(data):
        raise TextError(f"{where} gives two tokens the same id")
    return data


def _merges(lines: list, where: str) -> list[tuple[str, str]]:
    """BPE merges as (left, right) pairs: from merges.txt lines (a "#version" header skipped) or tokenizer.json's
    list of "left right" strings or [left, right] pairs."""
    merges = []
    for line in lines:
        pair = line.split(" ") if isinstance(line, str) else line
        if isinstance(line, str) and line.startswith("#version") and not merges:
            continue
        if not isinstance(pair, list) or len(pair) != 2 or not all(isinstance(p, str) and p for p in pair):
            raise TextError(f"{where}: merge {brief(line)} is not two tokens separated by one space")
        merges.append(tuple(pair))
    return merges


def build_tokenizer(vocab: dict, merges: list, config: object, where: str):
    """A transformers CLIPTokenizer from its vocabulary (token -> id), BPE merges and settings (model_max_length,
    special tokens), each checked; every special token must be in the vocabulary. Raises TextError naming `where`."""
    from transformers import CLIPTokenizer

    vocab, merges, settings = _vocab(vocab, f"{where} vocabulary"), _merges(merges, f"{where} merges"), \
        _settings(config, f"{where} settings")
    missing = [settings[k] for k in SPECIAL_TOKENS if k in settings and settings[k] not in vocab]
    if missing:
        raise TextError(f"{where}: the special token(s) {brief(missing)} are not in its vocabulary")
    try:
        return CLIPTokenizer(vocab=vocab, merges=merges, **settings)
    except Exception as err:  # the tokenizers library's own checks (e.g. a merge making a token not in the vocab)
        raise TextError(f"{where}: cannot build a CLIPTokenizer from it ({type(err).__name__}: "
                        f"{brief(str(err), 200, quote=False)})") from None


def _json(data: bytes, where: str) -> object:
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError) as err:
        raise TextError(f"{where} is not valid JSON ({brief(str(err), 120, quote=False)})") from None


def tokenizer_from_files(files: dict[str, bytes], where: str):
    """A CLIPTokenizer from the bytes of its files (name -> bytes, read and checked by the caller): vocab.json +
    merges.txt (what tdcdiff writes, and transformers 4 saved), or tokenizer.json's BPE model (what transformers 5
    saves), plus the settings in tokenizer_config.json. Raises TextError naming the file."""
    if SETTINGS_FILE not in files:
        raise TextError(f"{where}/{SETTINGS_FILE} is missing; save the tokenizer with save_pretrained")
    config = _json(files[SETTINGS_FILE], f"{where}/{SETTINGS_FILE}")
    if VOCAB_FILE in files and MERGES_FILE in files:
        try:
            lines = files[MERGES_FILE].decode("utf-8").splitlines()
        except UnicodeDecodeError as err:
            raise TextError(f"{where}/{MERGES_FILE} is not UTF-8 text ({err})") from None
        vocab = _json(files[VOCAB_FILE], f"{where}/{VOCAB_FILE}")
        return build_tokenizer(vocab, [line for line in lines if line], config, where)
    if "tokenizer.json" in files:
        model = _json(files["tokenizer.json"], f"{where}/tokenizer.json")
        model = model.get("model") if isinstance(model, dict) else None
        if not isinstance(model, dict) or model.get("type") != "BPE" or not isinstance(model.get("merges"), list):
            raise TextError(f"{where}/tokenizer.json holds no BPE model with a vocabulary and merges; a CLIP "
                            "tokenizer is one")
        return build_tokenizer(model.get("vocab"), model["merges"], config, where)
    raise TextError(f"{where} has neither vocab.json + merges.txt nor tokenizer.json; save the tokenizer with "
                    "save_pretrained")


def read_tokenizer(directory: Path, names=(*TOKENIZER_FILES, "tokenizer.json")):
    """The CLIPTokenizer of a folder (a pipeline's tokenizer/, a run's base/tokenizer), its files read as untrusted
    input (files.read_untrusted: inside the folder, regular files, at most MAX_TOKENIZER_BYTES each)."""
    files = {}
    for name in names:
        try:
            files[name] = read_untrusted(directory, name, str(directory), max_bytes=MAX_TOKENIZER_BYTES,
                                         hint="save the tokenizer again with save_pretrained")
        except FileNotFoundError:
            continue
        except ValueError as err:
            raise TextError(str(err)) from None
    return tokenizer_from_files(files, str(directory))


def tokenizer_data(tokenizer) -> dict[str, bytes]:
    """What tdcdiff writes for a CLIPTokenizer: vocab.json, merges.txt (its BPE model's) and tokenizer_config.json
    (its class, model_max_length and special tokens), as bytes by file name."""
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    settings = {"class": "CLIPTokenizer", "model_max_length": tokenizer.model_max_length,
                **{k: str(getattr(tokenizer, k)) for k in SPECIAL_TOKENS if getattr(tokenizer, k, None) is not None}}
    return {VOCAB_FILE: json.dumps(model["vocab"], ensure_ascii=False).encode(),
            MERGES_FILE: "\n".join(["#version: 0.2", *merges, ""]).encode(),
            SETTINGS_FILE: json.dumps(settings, indent=2).encode()}


def save_tokenizer(tokenizer, directory: Path) -> None:
    """Write tokenizer_data(tokenizer) into directory, atomically."""
    with atomic_dir(directory, holds(*TOKENIZER_FILES), f"a saved tokenizer (with {', '.join(TOKENIZER_FILES)}), "
                    "nor empty") as tmp:
        for name, data in tokenizer_data(tokenizer).items():
            (tmp / name).write_bytes(data)


class TextEncoder:
    """Prompts -> text embeddings, as Stable Diffusion's pipeline makes them.

    text_model: a transformers CLIPTextModel; tokenizer: its CLIPTokenizer (model_max_length CLIP_TOKENS).
    Raises TextError when the two do not fit each other (vocabulary size, token count).
    """

    def __init__(self, text_model: nn.Module, tokenizer):
        config = text_model.config
        if len(tokenizer) > config.vocab_size:
            raise TextError(f"the tokenizer has {len(tokenizer)} tokens but the text encoder embeds "
                            f"{config.vocab_size}; use the tokenizer saved with this text encoder")
        if tokenizer.model_max_length > config.max_position_embeddings:
            raise TextError(f"the tokenizer pads prompts to {tokenizer.model_max_length} tokens but the text encoder "
                            f"has {config.max_position_embeddings} positions; use the tokenizer saved with it")
        self.text_model, self.tokenizer = text_model.eval(), tokenizer

    @property
    def width(self) -> int:
        """The embedding width (the UNet's cross_attention_dim must equal it)."""
        return int(self.text_model.config.hidden_size)

    @torch.no_grad()
    def __call__(self, prompts: list[str], batch_size: int = 256) -> torch.Tensor:
        """Embeddings (len(prompts), CLIP_TOKENS, width), float32 on the CPU: the text encoder's last hidden state
        of each prompt padded and truncated to model_max_length tokens (diffusers' encode_prompt)."""
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise TypeError(f"prompts must be a list of strings, got {brief(prompts)}")
        device = next(self.text_model.parameters()).device
        parts = []
        for start in range(0, len(prompts), batch_size):
            ids = self.tokenizer(list(prompts[start:start + batch_size]), padding="max_length", truncation=True,
                                 max_length=self.tokenizer.model_max_length, return_tensors="pt").input_ids
            parts.append(self.text_model(ids.to(device))[0].float().cpu())
        return torch.cat(parts) if parts else torch.empty((0, self.tokenizer.model_max_length, self.width))

    def empty(self) -> torch.Tensor:
        """The empty prompt's embedding (CLIP_TOKENS, width): the unconditional one of classifier-free guidance."""
        return self([""])[0]


def check_widths(unet_width: int | None, encoder: TextEncoder, where: str) -> None:
    """The UNet's cross-attention must read what the text encoder writes."""
    if unet_width != encoder.width:
        raise TextError(f"{where}: the UNet's cross_attention_dim is {unet_width} but the text encoder's hidden size "
                        f"is {encoder.width}; use the text encoder the UNet was trained with")

"""What a run's stages read: the data (images, or a VAE's latents), the held-out split, the conditions (class labels,
or the text embeddings of the data's captions), the noise schedule and the saved models. Stages (stages.py) build
on it."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..base_model import FUNCTION_SPEC
from ..content_hash import sha256_file, sha256_tree
from ..data import ImageDataset, load_dataset
from ..evaluate import balanced_labels
from ..files import atomic_write_bytes
from ..latent import Decoder, encode
from ..models import num_class_embeds, text_width, with_null_text
from ..pipeline_schedule import scheduler_from_config
from ..schedule import make_scheduler
from ..serialization import ARCHITECTURE_FILE, load_model
from ..text import TextEncoder, read_tokenizer
from ..train import FINAL_DIR
from .config import SCHEDULER_FILE, RunConfig
from .rundir import record_inputs, up_to_date

VAE_DIR = "vae"  # base/vae: latent diffusion's VAE, saved from the base pipeline
# base/text_encoder and base/tokenizer: a text-conditional pipeline's, saved from it
TEXT_ENCODER_DIR, TOKENIZER_DIR = "text_encoder", "tokenizer"


class RunInputs:
    """The inputs of one run directory's stages. run_dir: the directory; config: its checked RunConfig."""

    def __init__(self, run_dir: Path, config: RunConfig):
        self.dir = run_dir
        self.config = config
        self._data: ImageDataset | None = None
        self._pixels: ImageDataset | None = None
        self._vae = None  # None: not looked up yet; False: pixel space
        self._latent_images: torch.Tensor | None = None
        self._text_encoder = None  # None: not looked up yet; False: no text conditioning
        self._text: dict[str, torch.Tensor] | None = None
        self._text_cached = False  # whether self._text is the one on disk

    @property
    def pixels(self) -> ImageDataset:
        """The data set as images (what FID compares against, also in latent diffusion)."""
        if self._pixels is None:
            c = self.config
            self._pixels = load_dataset(c.data, size=c.image_size, channels=c.channels, limit=c.limit, seed=c.seed)
        return self._pixels

    @property
    def data(self) -> ImageDataset:
        """What every stage trains and measures on: the images, or for latent diffusion their latents."""
        if self._data is None:
            self._data = self.pixels if self.vae is None else self._latents()
        return self._data

    @property
    def data_range(self) -> tuple[float, float] | None:
        """What train() checks the training data against (its data_range): [-1, 1] images, or None for latents."""
        return (-1.0, 1.0) if self.vae is None else None

    @property
    def vae(self):
        """Latent diffusion's VAE (saved as base/vae when the base pipeline has one), or None."""
        if self._vae is None:
            path = self.dir / "base" / VAE_DIR
            self._vae = load_model(path) if (path / ARCHITECTURE_FILE).exists() else False
        return self._vae or None

    @property
    def decode(self):
        """Latents -> images (latent.Decoder) for latent diffusion, else None (samples are images already)."""
        return Decoder(self.vae) if self.vae is not None else None

    def _latents(self) -> ImageDataset:
        """The data's scaled latents, encoded once and cached as latents/latents.safetensors (with the VAE's and
        the data's record beside it) once the VAE is part of the run."""
        from safetensors.torch import load, save

        pixels = self.pixels
        path = self.dir / "latents" / "latents.safetensors"
        vae_file = self.dir / "base" / VAE_DIR / ARCHITECTURE_FILE
        inputs = {"vae_sha256": sha256_file(vae_file) if vae_file.exists() else None, "data": pixels.describe()}
        record = path.with_suffix(".inputs.json")
        cached = inputs["vae_sha256"] is not None and up_to_date(record, inputs, [path])
        if cached and self._latent_images is None:
            self._latent_images = load(path.read_bytes())["latents"]
        if self._latent_images is None:
            self._latent_images = encode(self.vae, pixels.images)
        if inputs["vae_sha256"] is not None and not cached:
            atomic_write_bytes(path, save({"latents": self._latent_images}))
            record_inputs(record, inputs, [path])
        return ImageDataset(self._latent_images, pixels.labels, name=pixels.name, num_classes=pixels.num_classes,
                            classes=pixels.classes)

    @property
    def text_encoder(self) -> TextEncoder | None:
        """A text-conditional base's tokenizer and text encoder (saved as base/text_encoder, base/tokenizer), or
        None."""
        if self._text_encoder is None:
            path = self.dir / "base" / TEXT_ENCODER_DIR
            self._text_encoder = (TextEncoder(load_model(path), read_tokenizer(self.dir / "base" / TOKENIZER_DIR))
                                  if (path / ARCHITECTURE_FILE).exists() else False)
        return self._text_encoder or None

    def _text_embeddings(self) -> dict[str, torch.Tensor]:
        """{"captions": (N, CLIP_TOKENS, width) the data's captions embedded, "empty": (CLIP_TOKENS, width) the empty
        prompt's}, computed once by the text encoder and cached as text/embeddings.safetensors (with the text
        encoder's, the tokenizer's and the data's record beside it) once the text encoder is part of the run."""
        from safetensors.torch import load, save

        if self._text_cached:
            return self._text
        pixels = self.pixels
        if pixels.captions is None:
            raise ValueError(f"the data {self.config.data!r} has no captions but the model is text-conditional; add a "
                             "metadata.jsonl to the image folder, one {\"file_name\": ..., \"text\": ...} per image")
        path, base = self.dir / "text" / "embeddings.safetensors", self.dir / "base"
        saved = (base / TEXT_ENCODER_DIR / ARCHITECTURE_FILE).exists()
        inputs = {"text_encoder_sha256": sha256_file(base / TEXT_ENCODER_DIR / ARCHITECTURE_FILE) if saved else None,
                  "tokenizer_sha256": sha256_tree(base / TOKENIZER_DIR) if saved else None, "data": pixels.describe()}
        record = path.with_suffix(".inputs.json")
        cached = saved and up_to_date(record, inputs, [path])
        if cached and self._text is None:
            self._text = load(path.read_bytes())
        if self._text is None:
            encoder = self.text_encoder
            self._text = {"captions": encoder(pixels.captions), "empty": encoder.empty()}
        if saved and not cached:
            atomic_write_bytes(path, save(self._text))
            record_inputs(record, inputs, [path])
        self._text_cached = saved
        return self._text

    def empty_prompt(self, model) -> torch.Tensor | None:
        """The empty prompt's embedding (CLIP_TOKENS, width) for a text-conditional model: its dropped captions in
        training and its unconditional call; None for other models."""
        return self._text_embeddings()["empty"] if text_width(model) is not None else None

    def _split_indices(self) -> tuple[torch.Tensor, torch.Tensor]:
        count = len(self.data)
        order = torch.randperm(count, generator=torch.Generator().manual_seed(self.config.seed))
        held = max(1, min(512, count // 10))
        return order[held:], order[:held]

    def split(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(train images, held-out images): a fixed seeded 10% (at most 512) is held out for proxies."""
        if len(self.data) < 2:
            raise ValueError(
                f"the data ({self.config.data}) has {len(self.data)} image, too few: 10% (at least 1) is held out for "
                "the pruning proxies and at least 1 is needed for training; give at least 2 images (raise --limit)"
            )
        train, held = self._split_indices()
        return self.data.images[train], self.data.images[held]

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        return tuple(self.data.images.shape[1:])

    @property
    def scheduler(self):
        c = self.config
        copied = self.dir / "base" / SCHEDULER_FILE  # a given pipeline's schedule, kept with the run
        if copied.exists():
            return scheduler_from_config(json.loads(copied.read_text()))
        return make_scheduler(c.num_train_timesteps, c.beta_schedule, c.prediction_type, version=c.schedule_version)

    def labels(self, model) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(train conditions, held-out conditions) in split() order: class labels for a class-conditional model,
        caption embeddings (N, CLIP_TOKENS, width) for a text-conditional one; (None, None) else."""
        if text_width(model) is not None:
            train, held = self._split_indices()
            captions = self._text_embeddings()["captions"]
            return captions[train], captions[held]
        if num_class_embeds(model) is None:
            return None, None
        train, held = self._split_indices()
        return self.data.labels[train], self.data.labels[held]

    def null_class(self, model) -> int | None:
        """The class id that stands for "no label" when the run trains with label dropout, else None."""
        c = self.config
        classes = num_class_embeds(model)
        if classes is None or not (c.base.label_dropout or c.finetune.label_dropout):
            return None
        explicit = c.finetune.null_class if c.finetune.null_class is not None else c.base.null_class
        return classes - 1 if explicit is None else explicit

    def conditioning(self, model) -> dict | None:
        """A bundle's "conditioning" for experts like `model`: class ids of the data and the null class; None for
        an unconditional model."""
        classes = num_class_embeds(model)
        if classes is None:
            return None
        return {"num_class_embeds": classes, "num_classes": self.data.num_classes, "null_class": self.null_class(model)}

    def sample_labels(self, model, num_images: int) -> torch.Tensor | None:
        """Class-balanced labels (i % classes) for a class-conditional model's samples; None otherwise."""
        return balanced_labels(model, num_images, self.data.num_classes)

    def sample_prompts(self, model, num_images: int) -> torch.Tensor | None:
        """For a text-conditional model's samples, the embeddings of the data's captions, image i % N's for sample i
        (num_images, CLIP_TOKENS, width); None otherwise."""
        if text_width(model) is None:
            return None
        captions = self._text_embeddings()["captions"]
        return captions[torch.arange(num_images) % len(captions)]

    def base_model(self):
        """The stage-1 model (base/final). Raises FileNotFoundError before stage 1."""
        path = self.dir / "base" / FINAL_DIR
        if not path.exists():
            raise FileNotFoundError(f"no trained base model at {path}; run `tdcdiff train-base` first")
        return self.load(path)

    @property
    def device(self) -> torch.device:
        """Where every stage runs its models (RunConfig.torch_device)."""
        return torch.device(self.config.torch_device)

    @property
    def sampling_precision(self) -> str:
        """The precision of the run's sample grids: bf16 autocast on a GPU (the schedulers step in fp32; images
        differ by ~1e-2), fp32 on a CPU, where bf16 is slower on most."""
        return "bf16" if self.device.type == "cuda" else "fp32"

    def load(self, path: Path):
        """A model the run saved (serialization.load_model), on the run's device. Its class may be the one a
        `module:function` base returns: tdcdiff rebuilds that only once the user named the function in this
        process (--base, or register_model_class in code), never because a run directory's config.json names it."""
        try:
            model = load_model(path).to(self.device)
            # A text-conditional model's calls without a prompt get the empty prompt's: the unconditional ones.
            return with_null_text(model, self.empty_prompt(model)) if text_width(model) is not None else model
        except ValueError as err:
            spec = self.config.base_model
            if "register_model_class" not in str(err) or not spec or not FUNCTION_SPEC.match(spec):
                raise
            raise ValueError(f"{err}; this run was started from the function {spec}: pass --base {spec} again "
                             "(or Run(..., base=...)) to trust its code") from None

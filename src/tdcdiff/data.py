"""Image data sets as float tensors in [-1, 1], loaded from a built-in name, an IDX file,
an image folder, a zip of one, or a Hugging Face dataset (``hf:<name>[:<split>]``)."""
from __future__ import annotations

import gzip
import io
import os
import zipfile
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

__all__ = ["DataError", "ImageDataset", "load_dataset", "KNOWN_DATASETS", "IMAGE_EXTENSIONS"]

KNOWN_DATASETS = ("digits",)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif")
_GRAY_MODES = {"1", "L", "LA", "I", "I;16", "F"}
_LUMA = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)  # ITU-R 601, as Pillow's "L"

# (where, label index or -1, opener): images are only decoded once chosen, so `limit` stays cheap.
Item = tuple[str, int, Callable[[], Image.Image]]


class DataError(ValueError):
    """A data spec that cannot be loaded; the message names the problem, the file and the fix."""


class ImageDataset(Dataset):
    """Images as a float32 NCHW tensor in [-1, 1] with int64 labels (-1 where unknown).

    images: (N, C, H, W) float tensor; labels: (N,) int64 tensor; name: the spec it came from;
    num_classes: number of classes, or None when the source has no labels; classes: class names or None.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, *, name: str,
                 num_classes: int | None = None, classes: list[str] | None = None):
        self.images = images.float().contiguous()
        self.labels = labels.to(torch.int64)
        self.name, self.num_classes, self.classes = name, num_classes, classes
        self.channels, self.image_size = self.images.shape[1], self.images.shape[2]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[i], self.labels[i]

    def describe(self) -> dict:
        """Short provenance record: spec, count, per-image shape [C, H, W], number of classes."""
        return {"spec": self.name, "count": len(self), "shape": list(self.images.shape[1:]),
                "classes": self.num_classes}


def load_dataset(spec: str = "digits", *, size: int | None = None, channels: int | None = None,
                 limit: int | None = None, seed: int = 0) -> ImageDataset:
    """Load images from `spec` as an :class:`ImageDataset`.

    spec: "digits" (scikit-learn 8x8 digits), a path to an MNIST-style ``*-idx3-ubyte[.gz]`` file
        (labels from its ``*-idx1-ubyte[.gz]`` sibling), an image folder (class subfolders give labels),
        a ``.zip`` of one, or ``hf:<name>[:<split>]`` (needs the ``datasets`` package).
    size: resize every image to size x size; required when the source images differ in size.
    channels: 1 (grayscale) or 3 (RGB); None keeps the source's channels.
    limit: keep at most this many images, a subset chosen by `seed` before decoding.
    seed: seed for the `limit` subset, so the same arguments give the same images.
    """
    for opt, value in (("size", size), ("limit", limit)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise DataError(f"{opt}={value!r} is invalid: {opt} must be an integer >= 1 (or None)")
    if channels not in (None, 1, 3):
        raise DataError(f"channels={channels!r} is invalid: use 1 (grayscale), 3 (RGB) or None (keep)")
    spec = os.fspath(spec)
    opts = dict(size=size, channels=channels, limit=limit, seed=seed, name=spec)
    if spec == "digits":
        from sklearn.datasets import load_digits  # lazy: sklearn is slow to import
        d = load_digits()
        x = torch.from_numpy(d.images).float()[:, None] / 8 - 1  # values are 0..16
        return _from_tensor(x, torch.from_numpy(d.target), num_classes=10, **opts)
    if spec.startswith("hf:"):
        return _load_hf(spec[3:], **opts)
    path = Path(spec).expanduser()
    if not path.exists():
        raise DataError(f"{spec!r} is neither a known dataset name ({', '.join(KNOWN_DATASETS)}, or "
                        "hf:<name>[:<split>]) nor an existing path; fix the path or use one of those names")
    if path.is_dir():
        entries = [(str(p), p.relative_to(path).parts[:-1], lambda p=p: Image.open(p))
                   for p in sorted(path.rglob("*")) if p.is_file() and _is_image(p.relative_to(path).as_posix())]
        return _from_files(*_classify(entries), source=f"folder {path}", **opts)
    if path.name.endswith(("idx3-ubyte", "idx3-ubyte.gz")):
        return _load_idx(path, **opts)
    if path.suffix.lower() == ".zip":
        return _load_zip(path, **opts)
    raise DataError(f"{path} is a file but neither a .zip of images nor an IDX image file "
                    "(*-idx3-ubyte[.gz]); pass a folder, a zip, an IDX file or one of: "
                    + ", ".join(KNOWN_DATASETS))


def _is_image(rel: str) -> bool:
    """Whether `rel` (a "/"-separated path under the root) names an image to load."""
    # Skip hidden files and folders: macOS "._x.jpg" forks and .ipynb_checkpoints copies look like images.
    return not any(part.startswith(".") for part in rel.split("/")) and rel.lower().endswith(IMAGE_EXTENSIONS)


def _subset(n: int, limit: int | None, seed: int) -> np.ndarray:
    """Indices of a seeded random subset of size `limit` (all of range(n) if no limit), in order."""
    if limit is None or limit >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, limit, replace=False))


def _classify(entries: list[tuple[str, tuple[str, ...], Callable]]) -> tuple[list[Item], list[str]]:
    """Label (where, dirs, opener) entries by their last directory; files at the top get -1."""
    classes = sorted({dirs[-1] for _, dirs, _ in entries if dirs})
    index = {c: i for i, c in enumerate(classes)}
    return [(w, index[d[-1]] if d else -1, op) for w, d, op in entries], classes


def _load_zip(path: Path, **opts) -> ImageDataset:
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise DataError(f"cannot open zip {path}: {e}; check that it is a complete .zip file") from e
    with zf:
        names = [n for n in sorted(zf.namelist())
                 if not n.endswith("/") and not n.startswith("__MACOSX/") and _is_image(n)]
        parts = [n.split("/") for n in names]
        # A zipped folder usually has that folder as its single top entry; it is the root, not a class.
        if parts and all(len(p) > 1 and p[0] == parts[0][0] for p in parts):
            parts = [p[1:] for p in parts]
        entries = [(f"{n} in zip {path}", tuple(p[:-1]), lambda n=n: Image.open(io.BytesIO(zf.read(n))))
                   for n, p in zip(names, parts)]
        return _from_files(*_classify(entries), source=f"zip {path}", **opts)


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """Read an unsigned-byte IDX array with `ndim` dimensions (magic 0x000008<ndim>)."""
    try:
        if path.name.endswith(".gz"):
            with gzip.open(path) as f:
                raw = f.read()
        else:
            raw = path.read_bytes()
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
        raise DataError(f"cannot read IDX file {path}: {e}; re-download it") from e
    if raw[:4] != bytes([0, 0, 8, ndim]):
        raise DataError(f"{path} has bad magic number 0x{raw[:4].hex()} (expected 0x000008{ndim:02x} for "
                        f"an idx{ndim}-ubyte file); check that it is an uncorrupted MNIST-style IDX file")
    header = 4 + 4 * ndim
    dims = tuple(int(d) for d in np.frombuffer(raw[4:header], ">u4")) if len(raw) >= header else ()
    need = int(np.prod(dims)) if dims else 0
    if not dims or len(raw) - header < need:
        raise DataError(f"IDX file {path} is truncated: header dims {dims} need {need} data bytes but "
                        f"{max(len(raw) - header, 0)} are present; re-download it")
    return np.frombuffer(raw, np.uint8, need, offset=header).reshape(dims)


def _load_idx(path: Path, **opts) -> ImageDataset:
    x = _read_idx(path, 3)
    if len(x) == 0:
        raise DataError(f"IDX file {path} holds no images; use a file with at least one image")
    stem = path.name.removesuffix(".gz").replace("images", "labels").replace("idx3", "idx1")
    label_path = next((p for p in (path.with_name(stem), path.with_name(stem + ".gz")) if p.exists()), None)
    if label_path is None:
        labels, num_classes = torch.full((len(x),), -1), None
    else:
        y = _read_idx(label_path, 1)
        if len(y) != len(x):
            raise DataError(f"{label_path} has {len(y)} labels but {path} has {len(x)} images; "
                            "use the label file that belongs to these images")
        labels, num_classes = torch.from_numpy(y.astype(np.int64)), int(y.max()) + 1
    images = torch.from_numpy(x.copy())[:, None].float() / 127.5 - 1
    return _from_tensor(images, labels, num_classes=num_classes, **opts)


def _load_hf(ref: str, **opts) -> ImageDataset:
    try:
        import datasets
    except ImportError as e:
        raise DataError(f"hf:{ref} needs the Hugging Face `datasets` package: pip install datasets") from e
    name, _, split = ref.partition(":")
    split = split or "train"
    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # datasets raises many types (network, missing split, ...); keep its message
        raise DataError(f"cannot load Hugging Face dataset {name!r} split {split!r}: {e}; "
                        "check the name, the split and network access") from e
    image_col = next((c for c, f in ds.features.items() if isinstance(f, datasets.Image)), None)
    if image_col is None:
        raise DataError(f"hf:{ref} has no image column (columns: {list(ds.features)}); use an image dataset")
    label_col = next((c for c, f in ds.features.items() if isinstance(f, datasets.ClassLabel)), None)
    labels = ds[label_col] if label_col else [-1] * len(ds)
    classes = ds.features[label_col].names if label_col else []
    items = [(f"hf:{name}:{split} row {i}", lab, lambda i=i: ds[i][image_col]) for i, lab in enumerate(labels)]
    return _from_files(items, classes, source=f"hf:{ref}", **opts)


def _decode(item: Item, size: int | None, channels: int | None) -> Image.Image:
    where, _, opener = item
    try:
        with opener() as img:  # close each file: a 50k-image folder would otherwise exhaust handles
            img.load()  # decode now, so truncated files fail here with their name
            img = img.convert({1: "L", 3: "RGB"}.get(channels) or ("L" if img.mode in _GRAY_MODES else "RGB"))
        return img.resize((size, size), Image.BICUBIC) if size else img
    except Exception as e:  # Pillow and zipfile raise many types for bad data; all mean "bad file"
        raise DataError(f"cannot decode image {where}: {e}; remove or replace that file") from e


def _from_files(items: list[Item], classes: list[str], *, source: str, size, channels, limit, seed,
                name) -> ImageDataset:
    """Decode the seeded `limit` subset of `items` into an ImageDataset."""
    if not items:
        raise DataError(f"no images found in {source} (searched recursively for "
                        f"{', '.join(IMAGE_EXTENSIONS)}); add image files, optionally one subfolder per class")
    items = [items[i] for i in _subset(len(items), limit, seed)]
    arrays, first = [], None
    for item in items:
        img = _decode(item, size, channels)
        if first is None:
            first = (item[0], img.size)
        elif img.size != first[1]:
            (w0, h0), (w1, h1) = first[1], img.size
            raise DataError(f"images differ in size: {first[0]} is {w0}x{h0} but {item[0]} is {w1}x{h1}; "
                            "pass size=... (--image-size) to resize all of them to one square size")
        arrays.append(np.asarray(img))
    if any(a.ndim == 3 for a in arrays):  # gray and colour mixed (channels=None): promote gray to RGB
        arrays = [np.repeat(a[..., None], 3, -1) if a.ndim == 2 else a for a in arrays]
    x = torch.from_numpy(np.stack(arrays))
    x = x[:, None] if x.ndim == 3 else x.permute(0, 3, 1, 2)
    labels = torch.tensor([lab for _, lab, _ in items], dtype=torch.int64)
    return ImageDataset(x.float() / 127.5 - 1, labels, name=name, num_classes=len(classes) or None,
                        classes=classes or None)


def _from_tensor(x: torch.Tensor, labels: torch.Tensor, *, num_classes: int | None, size, channels,
                 limit, seed, name) -> ImageDataset:
    """Subset, convert channels of and resize an NCHW tensor in [-1, 1]."""
    keep = torch.from_numpy(_subset(len(x), limit, seed))
    x, labels = x[keep], labels[keep]
    if channels == 3 and x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    elif channels == 1 and x.shape[1] == 3:
        x = (x * _LUMA).sum(1, keepdim=True)
    if size and (size, size) != tuple(x.shape[-2:]):
        # Antialias only when shrinking, where skipping it would alias; growing is plain bilinear.
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                          antialias=size < min(x.shape[-2:])).clamp(-1, 1)
    return ImageDataset(x, labels, name=name, num_classes=num_classes)

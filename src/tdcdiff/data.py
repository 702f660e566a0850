"""Image data sets as float tensors in [-1, 1], loaded from a built-in name, an IDX file,
an image folder, a zip of one, or a Hugging Face dataset (``hf:<name>[:<split>]``).

An image folder (or zip) may caption its images as diffusers' text-to-image training scripts read them (Hugging
Face's imagefolder layout): a ``metadata.jsonl`` with one ``{"file_name": ..., "text": ...}`` object per line,
file_name relative to the folder holding that metadata.jsonl."""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import posixpath
import zipfile
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

__all__ = ["DataError", "ImageDataset", "load_dataset", "KNOWN_DATASETS", "IMAGE_EXTENSIONS", "METADATA_FILE"]

KNOWN_DATASETS = ("digits",)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif")
_GRAY_MODES = {"1", "L", "LA", "I", "I;16", "F"}
METADATA_FILE = "metadata.jsonl"  # captions, as Hugging Face's imagefolder and diffusers' training scripts read them
CAPTION_KEY = "text"  # diffusers' train_text_to_image.py --caption_column default
MAX_METADATA_BYTES = 256 << 20
_LUMA = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)  # ITU-R 601, as Pillow's "L"

# (where, label index or -1, opener): images are only decoded once chosen, so `limit` stays cheap.
Item = tuple[str, int, Callable[[], Image.Image]]


class DataError(ValueError):
    """A data spec that cannot be loaded; the message names the problem, the file and the fix."""


class ImageDataset(Dataset):
    """Images as a float32 NCHW tensor in [-1, 1] with int64 labels (-1 where unknown).

    images: (N, C, H, W) float tensor; labels: (N,) int64 tensor; name: the spec it came from;
    num_classes: number of classes, or None when the source has no labels; classes: class names or None;
    captions: one caption (str) per image, or None when the source has none (see METADATA_FILE).
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, *, name: str,
                 num_classes: int | None = None, classes: list[str] | None = None, captions: list[str] | None = None):
        self.images = images.float().contiguous()
        self.labels = labels.to(torch.int64)
        self.name, self.num_classes, self.classes = name, num_classes, classes
        if captions is not None and len(captions) != len(self.images):
            raise ValueError(f"{len(captions)} captions for {len(self.images)} images; give one caption per image")
        self.captions = captions
        self.channels, self.image_size = self.images.shape[1], self.images.shape[2]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[i], self.labels[i]

    def describe(self) -> dict:
        """Short provenance record: spec, count, per-image shape [C, H, W], number of classes, and for captioned
        data the sha256 of its captions (in order)."""
        record = {"spec": self.name, "count": len(self), "shape": list(self.images.shape[1:]),
                  "classes": self.num_classes}
        if self.captions is not None:
            record["captions_sha256"] = hashlib.sha256(json.dumps(self.captions).encode()).hexdigest()
        return record


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
        files = {p.relative_to(path).as_posix(): p for p in sorted(path.rglob("*")) if p.is_file()}
        images = [rel for rel in files if _is_image(rel)]
        entries = [(str(files[rel]), files[rel].relative_to(path).parts[:-1], lambda p=files[rel]: Image.open(p))
                   for rel in images]
        source = f"folder {path}"
        metadata = [(rel, lambda p=files[rel]: _read_metadata(p)) for rel in files if _is_metadata(rel)]
        return _from_files(*_classify(entries), source=source, captions=_captions(images, metadata, source), **opts)
    if path.name.endswith(("idx3-ubyte", "idx3-ubyte.gz")):
        return _load_idx(path, **opts)
    if path.suffix.lower() == ".zip":
        return _load_zip(path, **opts)
    raise DataError(f"{path} is a file but neither a .zip of images nor an IDX image file "
                    "(*-idx3-ubyte[.gz]); pass a folder, a zip, an IDX file or one of: "
                    + ", ".join(KNOWN_DATASETS))


def _is_metadata(rel: str) -> bool:
    """Whether `rel` names a captions file (METADATA_FILE) in a folder that is not hidden."""
    return rel.split("/")[-1] == METADATA_FILE and not any(part.startswith(".") for part in rel.split("/")[:-1])


def _read_metadata(path: Path) -> bytes:
    if path.stat().st_size > MAX_METADATA_BYTES:
        raise DataError(f"{path} is {path.stat().st_size} bytes, more than the {MAX_METADATA_BYTES} a captions file "
                        "may have; split the data set")
    return path.read_bytes()


def _caption_entries(meta: str, data: bytes, source: str) -> dict[str, str]:
    """{image path relative to the root: caption} from one metadata.jsonl (meta: its path relative to the root)."""
    where = f"{meta} in {source}"
    folder = posixpath.dirname(meta)
    try:
        lines = data.decode("utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise DataError(f"{where} is not UTF-8 text ({err}); save it as UTF-8") from None
    found = {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            entry = None
        if not (isinstance(entry, dict) and isinstance(entry.get("file_name"), str)
                and isinstance(entry.get(CAPTION_KEY), str)):
            raise DataError(f"{where} line {number} is not a JSON object with a string \"file_name\" and a string "
                            f"\"{CAPTION_KEY}\" (the caption); write one such object per line")
        rel = posixpath.normpath(posixpath.join(folder, entry["file_name"]))
        if entry["file_name"].startswith("/") or rel == ".." or rel.startswith("../"):
            raise DataError(f"{where} line {number} names {entry['file_name']!r}, outside the folder; file_name is a "
                            f"path relative to the folder holding {METADATA_FILE}")
        if rel in found:
            raise DataError(f"{where} captions {rel!r} twice (line {number}); give each image one line")
        found[rel] = entry[CAPTION_KEY]
    return found


def _captions(images: list[str], metadata: list[tuple[str, Callable[[], bytes]]], source: str) -> list[str] | None:
    """One caption per image (images: paths relative to the root, "/"-separated) from the METADATA_FILE files
    (path relative to the root, a reader of its bytes), or None when there are none. Raises DataError naming the
    file and line for a malformed line, a caption of no image, an image captioned twice or an image without one."""
    if not metadata:
        return None
    captions: dict[str, str] = {}
    for meta, read in metadata:
        for rel, text in _caption_entries(meta, read(), source).items():
            if rel in captions:
                raise DataError(f"{rel!r} in {source} is captioned in two {METADATA_FILE} files; keep one line for it")
            captions[rel] = text
    known = set(images)
    unknown = next((rel for rel in captions if rel not in known), None)
    if unknown is not None:
        raise DataError(f"{METADATA_FILE} in {source} captions {unknown!r}, which is not an image there (images: "
                        f"{', '.join(IMAGE_EXTENSIONS)}); fix its file_name or add the image")
    missing = [rel for rel in images if rel not in captions]
    if missing:
        raise DataError(f"{missing[0]!r} in {source} has no caption: {METADATA_FILE} captions {len(captions)} of its "
                        f"{len(images)} images; add a line for every image (or remove {METADATA_FILE})")
    return [captions[rel] for rel in images]


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
        listed = [n for n in sorted(zf.namelist()) if not n.endswith("/") and not n.startswith("__MACOSX/")]
        names = [n for n in listed if _is_image(n)]
        metadata = [n for n in listed if _is_metadata(n)]
        parts = [n.split("/") for n in names]
        # A zipped folder usually has that folder as its single top entry; it is the root, not a class.
        if parts and all(len(p) > 1 and p[0] == parts[0][0] for p in parts):
            parts = [p[1:] for p in parts]
        entries = [(f"{n} in zip {path}", tuple(p[:-1]), lambda n=n: Image.open(io.BytesIO(zf.read(n))))
                   for n, p in zip(names, parts)]
        source = f"zip {path}"
        captions = _captions(names, [(m, lambda m=m: _read_zip_metadata(zf, m, path)) for m in metadata], source)
        return _from_files(*_classify(entries), source=source, captions=captions, **opts)


def _read_zip_metadata(zf: zipfile.ZipFile, name: str, path: Path) -> bytes:
    size = zf.getinfo(name).file_size
    if size > MAX_METADATA_BYTES:
        raise DataError(f"{name} in zip {path} is {size} bytes, more than the {MAX_METADATA_BYTES} a captions file "
                        "may have; split the data set")
    return zf.read(name)


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
                name, captions: list[str] | None = None) -> ImageDataset:
    """Decode the seeded `limit` subset of `items` (captions: one per item, or None) into an ImageDataset."""
    if not items:
        raise DataError(f"no images found in {source} (searched recursively for "
                        f"{', '.join(IMAGE_EXTENSIONS)}); add image files, optionally one subfolder per class")
    keep = _subset(len(items), limit, seed)
    items = [items[i] for i in keep]
    captions = None if captions is None else [captions[i] for i in keep]
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
                        classes=classes or None, captions=captions)


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

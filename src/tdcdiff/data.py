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
import math
import os
import posixpath
import re
import zipfile
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch.utils.data import Dataset

from .capacity import check_memory, tensor_bytes
from .settings import SEED, plain_number

__all__ = ["DataError", "ImageDataset", "load_dataset", "KNOWN_DATASETS", "IMAGE_EXTENSIONS", "METADATA_FILE"]

KNOWN_DATASETS = ("digits",)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif")
_GRAY_MODES = {"1", "L", "LA", "F"}
# 16-bit grayscale (PNG): Pillow reads it as integers 0..65535, which an 8-bit conversion would clip to white
_WIDE_GRAY_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N"}
_WIDE_MAX = 65535
METADATA_FILE = "metadata.jsonl"  # captions, as Hugging Face's imagefolder and diffusers' training scripts read them
CAPTION_KEY = "text"  # diffusers' train_text_to_image.py --caption_column default
MAX_METADATA_BYTES = 256 << 20
FIX_SIZE = "lower --image-size or --limit (image_size, limit)"
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
    Numbers may be numpy ones or 0-d tensors (settings.plain_number).
    """
    size, channels, limit, seed = (plain_number(v) for v in (size, channels, limit, seed))  # numpy ints too
    for opt, value in (("size", size), ("limit", limit)):  # bools are ints to Python, never a size here
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise DataError(f"{opt}={value!r} is invalid: {opt} must be an integer >= 1 (or None)")
    if channels is not None and (isinstance(channels, bool) or channels not in (1, 3)):
        raise DataError(f"channels={channels!r} is invalid: use 1 (grayscale), 3 (RGB) or None (keep)")
    if isinstance(seed, bool) or not SEED.ok(seed):
        raise DataError(SEED.message("seed", seed, "seed") + " (it picks the limit subset)")
    spec = os.fspath(spec)
    if not spec.strip():  # Path("") is the current directory: it would be loaded as an image folder
        raise DataError("the data spec is empty; give a data set name (" + ", ".join(KNOWN_DATASETS) + "), a path "
                        "(an IDX file, an image folder or a .zip) or hf:<name>[:<split>]")
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
    if not path.is_dir() and not path.is_file():
        raise DataError(f"{path} is neither a folder nor a regular file (a FIFO would block the read, a device never "
                        "end it); pass a data set's folder, zip or IDX file")
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
        lines = data.decode("utf-8-sig").splitlines()  # -sig: a BOM (Windows Notepad) is not text
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
        listed = [i for i in sorted(zf.infolist(), key=lambda i: i.filename)
                  if not i.is_dir() and not i.filename.startswith("__MACOSX/")]
        infos = [i for i in listed if _is_image(i.filename)]
        metadata = [i.filename for i in listed if _is_metadata(i.filename)]
        names = [i.filename for i in infos]
        twice = next((a for a, b in zip(names, names[1:]) if a == b), None)
        if twice is not None:  # unzipping keeps one of them; reading both would train on images no folder holds
            raise DataError(f"zip {path} holds two entries named {twice}; remove one of them (as unzipping would)")
        parts = [n.split("/") for n in names]
        # A zipped folder usually has that folder as its single top entry; it is the root, not a class.
        if parts and all(len(p) > 1 and p[0] == parts[0][0] for p in parts):
            parts = [p[1:] for p in parts]
        entries = [(f"{i.filename} in zip {path}", tuple(p[:-1]),
                    lambda i=i: Image.open(io.BytesIO(_read_member(zf, i)))) for i, p in zip(infos, parts)]
        source = f"zip {path}"
        captions = _captions(names, [(m, lambda m=m: _read_zip_metadata(zf, m, path)) for m in metadata], source)
        return _from_files(*_classify(entries), source=source, captions=captions, **opts)


def _read_zip_metadata(zf: zipfile.ZipFile, name: str, path: Path) -> bytes:
    size = zf.getinfo(name).file_size
    if size > MAX_METADATA_BYTES:
        raise DataError(f"{name} in zip {path} is {size} bytes, more than the {MAX_METADATA_BYTES} a captions file "
                        "may have; split the data set")
    return zf.read(name)


def _read_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> bytes:
    """A zip member's bytes, refused before they are inflated when larger than any image Pillow decodes: it refuses
    images over 2 x Image.MAX_IMAGE_PIXELS pixels (decompression bombs), and no file of one is larger than that many
    pixels at 4 bytes each (uncompressed 32-bit BMP), plus headers."""
    if Image.MAX_IMAGE_PIXELS is not None and info.file_size > 8 * Image.MAX_IMAGE_PIXELS + (1 << 20):
        raise ValueError(f"it inflates to {info.file_size:,} bytes, more than any image Pillow decodes (at most "
                         f"{2 * Image.MAX_IMAGE_PIXELS:,} pixels of 4 bytes)")
    return zf.read(info)


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """Read an unsigned-byte IDX array with `ndim` dimensions (magic 0x000008<ndim>): the header first, then only
    the bytes its dimensions need (a gzip stream is never inflated past them), once they fit in memory."""
    try:
        with (gzip.open if path.name.endswith(".gz") else open)(path, "rb") as f:
            magic = f.read(4)
            if magic != bytes([0, 0, 8, ndim]):
                raise DataError(f"{path} has bad magic number 0x{magic.hex()} (expected 0x000008{ndim:02x} for an "
                                f"idx{ndim}-ubyte file); check that it is an uncorrupted MNIST-style IDX file")
            header = f.read(4 * ndim)
            dims = tuple(int(d) for d in np.frombuffer(header, ">u4")) if len(header) == 4 * ndim else ()
            need = math.prod(dims) if dims else 0  # Python ints: a forged header cannot overflow the count
            if dims:
                check_memory(need, f"IDX file {path} (dimensions {dims}, {need:,} bytes)",
                             "use a smaller file, or one whose header is not damaged", DataError)
            raw, got = bytearray(need), 0  # writable: torch takes the array without a copy or a warning
            while got < need and (count := f.readinto(memoryview(raw)[got:])):
                got += count
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
        raise DataError(f"cannot read IDX file {path}: {e}; re-download it") from e
    if not dims or got < need:
        raise DataError(f"IDX file {path} is truncated: header dims {dims} need {need} data bytes but "
                        f"{got if dims else 0} are present; re-download it")
    return np.frombuffer(raw, np.uint8).reshape(dims)


def _load_idx(path: Path, **opts) -> ImageDataset:
    x = _read_idx(path, 3)
    if len(x) == 0:
        raise DataError(f"IDX file {path} holds no images; use a file with at least one image")
    if 0 in x.shape[1:]:
        raise DataError(f"IDX file {path} holds images of {x.shape[1]} rows and {x.shape[2]} columns, which have no "
                        "pixels; use a file of images at least 1x1 (re-download it)")
    stem = path.name.removesuffix(".gz").replace("images", "labels").replace("idx3", "idx1")
    label_path = next((p for p in (path.with_name(stem), path.with_name(stem + ".gz")) if p.is_file()), None)
    if label_path is None:
        labels, num_classes = torch.full((len(x),), -1), None
    else:
        y = _read_idx(label_path, 1)
        if len(y) != len(x):
            raise DataError(f"{label_path} has {len(y)} labels but {path} has {len(x)} images; "
                            "use the label file that belongs to these images")
        labels, num_classes = torch.from_numpy(y.astype(np.int64)), int(y.max()) + 1
    return _from_tensor(torch.from_numpy(x)[:, None], labels, num_classes=num_classes, **opts)  # uint8 until subset


def _load_hf(ref: str, **opts) -> ImageDataset:
    name, split = _hf_parts(ref)
    try:
        import datasets
    except ImportError as e:
        raise DataError(f"hf:{ref} needs the Hugging Face `datasets` package: pip install datasets") from e
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


# datasets' split grammar (arrow_reader.py, _SUB_SPEC_RE joined by "+"): a split name, an optional [from:to] slice
# of rows or percents, an optional (rounding)
_SPLIT = r"\w+(\.\w+)*(\[((-?[\d_]+)%?)?:((-?[\d_]+)%?)?\])?(\([^)]*\))?"
_SPLIT_SPEC = re.compile(rf"{_SPLIT}(\s*\+\s*{_SPLIT})*")
_HF_SPEC = "hf:<name>[:<split>] (e.g. hf:mnist or hf:uoft-cs/cifar10:test)"
_HUB_PAGES = ("tree", "blob", "resolve", "viewer", "discussions", "commits", "edit")  # .../datasets/<id>/<page>


def _hf_parts(ref: str) -> tuple[str, str]:
    """(Hub id, split) of the data spec hf:<ref>, the whole spec checked before `datasets` is needed (it was split at
    its first colon: a web address became the dataset "https"). Raises DataError for a web address (naming the id
    in a huggingface.co one), a local path, more than two ':'-separated parts, a name that is not a Hub id
    (_check_hub_id) or a split that is not one of datasets' split specs (train, test[:10%], train+test, ...)."""
    if "://" in ref or ref.startswith(("www.", "huggingface.co/")):
        page = re.search(r"huggingface\.co/datasets/([\w.-]+)(?:/([\w.-]+))?", ref)
        hub_id = page and page[1] + (f"/{page[2]}" if page[2] and page[2] not in _HUB_PAGES else "")
        raise DataError(f"hf:{ref} is a web address; give the dataset's Hub id " + (
            f"instead: hf:{hub_id}" if hub_id else f"(the <owner>/<name> after huggingface.co/datasets/): {_HF_SPEC}"))
    if re.match(r"[A-Za-z]:[\\/]", ref) or "\\" in ref:
        raise DataError(f"hf:{ref} is a local path, not a Hugging Face Hub id; pass a local data set's path without "
                        "hf: (its folder, zip or IDX file)")
    name, _, split = ref.partition(":")
    _check_hub_id(name)
    if split and not _SPLIT_SPEC.fullmatch(split):
        if ":" in re.sub(r"\[[^\]]*\]", "", split):  # a colon outside a slice: hf:mnist:test:extra
            raise DataError(f"hf:{ref} has more than two ':'-separated parts; give {_HF_SPEC}")
        raise DataError(f"hf:{ref}: {split!r} is not a split of a Hugging Face dataset (a name such as train or "
                        f"test, sliced as train[:10%] or train[10:20], or joined as train+test); give {_HF_SPEC}")
    return name, split or "train"


def _check_hub_id(name: str) -> None:
    """Raise DataError unless `name` is a Hugging Face Hub dataset id (huggingface_hub's validate_repo_id: `name` or
    `owner/name`): checked before `datasets` is needed, and so that no local path (hf:../x) reaches load_dataset."""
    from huggingface_hub.utils import validate_repo_id  # lazy: a dependency of diffusers, slow to import

    if not name.strip():
        raise DataError("hf: names no dataset; give its Hugging Face Hub id, hf:<name>[:<split>] (e.g. hf:mnist or "
                        "hf:uoft-cs/cifar10:test)")
    try:
        validate_repo_id(name)
    except ValueError as err:
        detail = str(err).split(" Use `repo_type`")[0]  # huggingface_hub's hint is about an argument we set
        raise DataError(f"hf:{name} is not a Hugging Face Hub dataset id ({detail}); give hf:<name> or "
                        "hf:<owner>/<name>, or pass a local data set's path without hf:") from None


def _decode(item: Item, size: int | None, channels: int | None) -> np.ndarray:
    """Item `item` as an (H, W) or (H, W, 3) array of values in [0, 255]: uint8, or float32 for 16-bit images."""
    where, _, opener = item
    try:
        with opener() as img:  # close each file: a 50k-image folder would otherwise exhaust handles
            img.load()  # decode now, so truncated files fail here with their name
            img = ImageOps.exif_transpose(img)  # as viewers show it: a camera's rotation is in its EXIF tag
            if _has_transparent_pixels(img):
                raise DataError(f"{where} has transparent pixels, whose colour depends on what they are shown over "
                                "(converting drops the alpha and keeps whatever colour lies under it); flatten the "
                                "images onto a background first, e.g. Image.alpha_composite onto white")
            if img.mode in _WIDE_GRAY_MODES:
                return _decode_wide(img, size, channels)
            img = img.convert({1: "L", 3: "RGB"}.get(channels) or ("L" if img.mode in _GRAY_MODES else "RGB"))
        return np.asarray(img.resize((size, size), Image.BICUBIC) if size else img)
    except DataError:
        raise
    except Exception as e:  # Pillow and zipfile raise many types for bad data; all mean "bad file"
        raise DataError(f"cannot decode image {where}: {e}; remove or replace that file") from e


def _has_transparent_pixels(img: Image.Image) -> bool:
    """Whether an image has an alpha channel (or a transparent palette entry or colour) with a pixel below 255."""
    if img.mode not in ("RGBA", "LA", "PA") and "transparency" not in img.info:
        return False
    return img.convert("RGBA").getchannel("A").getextrema()[0] < 255


def _decode_wide(img: Image.Image, size: int | None, channels: int | None) -> np.ndarray:
    """A 16-bit grayscale image (values 0..65535) as float32 in [0, 255], keeping its precision."""
    img = img.convert("F")
    if size:
        img = img.resize((size, size), Image.BICUBIC)
    values = np.clip(np.asarray(img, dtype=np.float32), 0, _WIDE_MAX) * (255 / _WIDE_MAX)  # bicubic overshoots
    return np.repeat(values[..., None], 3, -1) if channels == 3 else values


def _check_fits(count: int, shape: tuple[int, ...], name: str, extra: int = 0) -> None:
    """Refuse a data set of `count` float32 images of `shape` (C, H, W) that, with `extra` bytes more while it is
    built, does not fit in memory."""
    check_memory(tensor_bytes(count, shape) + extra,
                 f"the data set {name} ({count} images of {'x'.join(map(str, shape))} as float32)", FIX_SIZE, DataError)


def _from_files(items: list[Item], classes: list[str], *, source: str, size, channels, limit, seed,
                name, captions: list[str] | None = None) -> ImageDataset:
    """Decode the seeded `limit` subset of `items` (captions: one per item, or None) into an ImageDataset, once the
    first image shows that all of them fit in memory as float32."""
    if not items:
        raise DataError(f"no images found in {source} (searched recursively for "
                        f"{', '.join(IMAGE_EXTENSIONS)}); add image files, optionally one subfolder per class")
    keep = _subset(len(items), limit, seed)
    items = [items[i] for i in keep]
    captions = None if captions is None else [captions[i] for i in keep]
    if size:  # before the first image is resized to it
        _check_fits(len(items), (channels or 1, size, size), name)
    arrays = []
    for item in items:
        array = _decode(item, size, channels)
        if not arrays:
            first = (item[0], array)
            shape = (array.shape[2] if array.ndim == 3 else 1, *array.shape[:2])
            _check_fits(len(items), shape, name, extra=len(items) * array.nbytes)  # and the decoded pixels
        elif array.shape[:2] != first[1].shape[:2]:
            (h0, w0), (h1, w1) = first[1].shape[:2], array.shape[:2]
            raise DataError(f"images differ in size: {first[0]} is {w0}x{h0} but {item[0]} is {w1}x{h1}; "
                            "pass size=... (--image-size) to resize all of them to one square size")
        arrays.append(array)
    colour = any(a.ndim == 3 for a in arrays)  # gray and colour mixed (channels=None): promote gray to RGB
    x = torch.empty((len(arrays), 3 if colour else 1, *arrays[0].shape[:2]))
    for i, array in enumerate(arrays):  # one image at a time: the float tensor and the pixels, not two tensors
        pixels = torch.from_numpy(np.asarray(array, dtype=np.float32))
        x[i] = pixels.permute(2, 0, 1) if pixels.ndim == 3 else pixels
        arrays[i] = None
    labels = torch.tensor([lab for _, lab, _ in items], dtype=torch.int64)
    return ImageDataset(x.div_(127.5).sub_(1), labels, name=name, num_classes=len(classes) or None,
                        classes=classes or None, captions=captions)


def _from_tensor(x: torch.Tensor, labels: torch.Tensor, *, num_classes: int | None, size, channels,
                 limit, seed, name) -> ImageDataset:
    """Subset, convert channels of and resize an NCHW tensor: uint8 pixels 0..255, or float in [-1, 1]. The
    subset is taken first and converted only once the result fits in memory as float32."""
    keep = torch.from_numpy(_subset(len(x), limit, seed))
    x, labels = x[keep], labels[keep]
    out_channels = channels or x.shape[1]
    out_size = (size, size) if size else tuple(x.shape[-2:])
    _check_fits(len(x), (out_channels, *out_size), name, extra=tensor_bytes(len(x), x.shape[1:]) if size else 0)
    if x.dtype == torch.uint8:
        x = x.float().div_(127.5).sub_(1)
    if channels == 3 and x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    elif channels == 1 and x.shape[1] == 3:
        x = (x * _LUMA).sum(1, keepdim=True)
    if size and (size, size) != tuple(x.shape[-2:]):
        # Antialias only when shrinking, where skipping it would alias; growing is plain bilinear.
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                          antialias=size < min(x.shape[-2:])).clamp_(-1, 1)
    return ImageDataset(x, labels, name=name, num_classes=num_classes)

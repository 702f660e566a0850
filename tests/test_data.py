"""Tests for tdcdiff.data: every spec form, the options, and each error message."""
import gzip
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tdcdiff.data import DataError, ImageDataset, load_dataset

MNIST = Path("/work/shared/data/mnist/t10k-images-idx3-ubyte.gz")
CIFAR_TEST = Path("/work/shared/data/cifar10/cifar10-test-jpeg.zip")


def write_idx(path: Path, array: np.ndarray, magic: bytes | None = None) -> Path:
    """Write a uint8 array as an IDX file (gzipped when the name ends in .gz)."""
    header = (magic or bytes([0, 0, 8, array.ndim])) + np.array(array.shape, ">u4").tobytes()
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)
    return path


def make_folder(root: Path) -> Path:
    """Two class folders ("cat" has 2 colour images, "dog" 1 gray) plus one unlabelled top-level image."""
    rng = np.random.default_rng(0)
    for rel, mode in [("cat/a.png", "RGB"), ("cat/b.jpg", "RGB"), ("dog/c.png", "L"), ("top.bmp", "RGB")]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shape = (12, 12, 3) if mode == "RGB" else (12, 12)
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(root / rel)
    (root / "notes.txt").write_text("not an image")
    return root


def zip_folder(folder: Path, zip_path: Path) -> Path:
    with zipfile.ZipFile(zip_path, "w") as zf:
        for p in sorted(folder.rglob("*")):
            zf.write(p, Path(folder.name) / p.relative_to(folder))  # keep the folder as the top entry
    return zip_path


def test_digits_default():
    ds = load_dataset()
    assert isinstance(ds, ImageDataset)
    assert ds.images.shape == (1797, 1, 8, 8) and ds.images.dtype == torch.float32
    assert ds.images.min() == -1 and ds.images.max() == 1
    assert ds.labels.dtype == torch.int64 and set(ds.labels.tolist()) == set(range(10))
    assert (ds.name, ds.num_classes, ds.image_size, ds.channels) == ("digits", 10, 8, 1)
    image, label = ds[3]
    assert image.shape == (1, 8, 8) and label.item() == 3
    assert ds.describe() == {"spec": "digits", "count": 1797, "shape": [1, 8, 8], "classes": 10}


def test_digits_resize_and_channels():
    ds = load_dataset("digits", size=16, channels=3, limit=10)
    assert ds.images.shape == (10, 3, 16, 16) and ds.image_size == 16
    assert ds.images.min() >= -1 and ds.images.max() <= 1
    assert torch.equal(ds.images[:, 0], ds.images[:, 2])  # gray repeated into RGB


def test_limit_is_seeded_and_deterministic():
    full = load_dataset("digits")
    a, b = load_dataset("digits", limit=50, seed=1), load_dataset("digits", limit=50, seed=1)
    c = load_dataset("digits", limit=50, seed=2)
    assert len(a) == 50 and torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.images, c.images)
    # The subset is made of real rows of the full set, with their labels.
    idx = [next(i for i in range(len(full)) if torch.equal(full.images[i], x)) for x in a.images[:5]]
    assert full.labels[idx].tolist() == a.labels[:5].tolist()
    assert len(load_dataset("digits", limit=10**6)) == 1797  # a limit above the size keeps everything


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_idx_round_trip(tmp_path, suffix):
    x = np.random.default_rng(0).integers(0, 256, (7, 5, 6), dtype=np.uint8)
    x[0, 0, 0], x[0, 0, 1] = 0, 255
    y = np.arange(7, dtype=np.uint8) % 3
    images = write_idx(tmp_path / f"toy-images-idx3-ubyte{suffix}", x)
    write_idx(tmp_path / f"toy-labels-idx1-ubyte{suffix}", y)
    ds = load_dataset(str(images))
    assert ds.images.shape == (7, 1, 5, 6) and ds.num_classes == 3
    assert torch.allclose((ds.images[:, 0] + 1) * 127.5, torch.from_numpy(x).float(), atol=1e-4)
    assert ds.labels.tolist() == y.tolist()


def test_idx_without_labels(tmp_path):
    images = write_idx(tmp_path / "t-images-idx3-ubyte", np.zeros((3, 4, 4), np.uint8))
    ds = load_dataset(str(images))
    assert ds.labels.tolist() == [-1, -1, -1] and ds.num_classes is None


@pytest.mark.skipif(not MNIST.exists(), reason="real MNIST file not present")
def test_real_mnist_with_limit():
    ds = load_dataset(str(MNIST), limit=100, size=16)
    assert ds.images.shape == (100, 1, 16, 16) and ds.num_classes == 10
    assert 0 <= ds.labels.min() and ds.labels.max() <= 9


def test_image_folder(tmp_path):
    root = make_folder(tmp_path / "imgs")
    ds = load_dataset(str(root))
    assert ds.images.shape == (4, 3, 12, 12)  # the gray image is promoted to RGB to match the rest
    assert ds.classes == ["cat", "dog"] and ds.num_classes == 2
    assert ds.labels.tolist() == [0, 0, 1, -1]  # cat/a, cat/b, dog/c, top (sorted paths)
    gray = load_dataset(str(root), channels=1, size=8)
    assert gray.images.shape == (4, 1, 8, 8) and gray.channels == 1
    assert load_dataset(str(root), channels=3).images.shape == (4, 3, 12, 12)


def test_image_folder_zip(tmp_path):
    folder_ds = load_dataset(str(make_folder(tmp_path / "imgs")))
    ds = load_dataset(str(zip_folder(tmp_path / "imgs", tmp_path / "imgs.zip")))
    assert ds.classes == ["cat", "dog"] and ds.labels.tolist() == [0, 0, 1, -1]
    assert torch.equal(ds.images, folder_ds.images)


@pytest.mark.skipif(not CIFAR_TEST.exists(), reason="CIFAR-10 test zip not present")
def test_real_cifar_zip_with_limit():
    ds = load_dataset(str(CIFAR_TEST), limit=64)
    assert ds.images.shape == (64, 3, 32, 32) and ds.num_classes == 10
    assert ds.classes[0] == "airplane" and ds.labels.min() >= 0


# --- errors -------------------------------------------------------------------------------------


def test_error_missing_path():
    with pytest.raises(DataError, match=r"'no/such/dir' is neither a known dataset name \(digits"):
        load_dataset("no/such/dir")


def test_error_unknown_file_type(tmp_path):
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(DataError, match=r"x\.txt is a file but neither a \.zip"):
        load_dataset(str(tmp_path / "x.txt"))


def test_error_empty_folder_and_zip(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    with pytest.raises(DataError, match=r"no images found in folder .*empty .*\.png, \.jpg"):
        load_dataset(str(tmp_path / "empty"))
    with zipfile.ZipFile(tmp_path / "empty.zip", "w") as zf:
        zf.writestr("readme.txt", "no images here")
    with pytest.raises(DataError, match=r"no images found in zip .*empty\.zip .*\.webp"):
        load_dataset(str(tmp_path / "empty.zip"))


def test_error_corrupt_image_in_folder_and_zip(tmp_path):
    root = make_folder(tmp_path / "imgs")
    (root / "cat" / "broken.png").write_bytes(b"not a png at all")
    with pytest.raises(DataError, match=r"cannot decode image .*cat/broken\.png"):
        load_dataset(str(root))
    with pytest.raises(DataError, match=r"cannot decode image imgs/cat/broken\.png in zip .*imgs\.zip"):
        load_dataset(str(zip_folder(root, tmp_path / "imgs.zip")))


def test_error_corrupt_zip(tmp_path):
    (tmp_path / "bad.zip").write_bytes(b"PK but not really")
    with pytest.raises(DataError, match=r"cannot open zip .*bad\.zip"):
        load_dataset(str(tmp_path / "bad.zip"))


def test_error_mixed_sizes(tmp_path):
    Image.new("RGB", (10, 10)).save(tmp_path / "a.png")
    Image.new("RGB", (12, 10)).save(tmp_path / "b.png")
    with pytest.raises(DataError, match=r"a\.png is 10x10 but .*b\.png is 12x10; pass size=\.\.\. \(--image-size\)"):
        load_dataset(str(tmp_path))
    assert load_dataset(str(tmp_path), size=10).images.shape == (2, 3, 10, 10)


def test_error_idx_bad_magic_and_truncated(tmp_path):
    x = np.zeros((4, 3, 3), np.uint8)
    bad = write_idx(tmp_path / "bad-images-idx3-ubyte", x, magic=bytes([0, 0, 8, 9]))
    with pytest.raises(DataError, match=r"bad-images-idx3-ubyte has bad magic number 0x00000809"):
        load_dataset(str(bad))
    short = write_idx(tmp_path / "short-images-idx3-ubyte.gz", x)
    short.write_bytes(gzip.compress(gzip.decompress(short.read_bytes())[:-5]))
    with pytest.raises(DataError, match=r"IDX file .*short-images-idx3-ubyte\.gz is truncated"):
        load_dataset(str(short))
    (tmp_path / "junk-images-idx3-ubyte.gz").write_bytes(b"not gzip")
    with pytest.raises(DataError, match=r"cannot read IDX file .*junk-images-idx3-ubyte\.gz"):
        load_dataset(str(tmp_path / "junk-images-idx3-ubyte.gz"))


def test_error_idx_label_count_mismatch(tmp_path):
    images = write_idx(tmp_path / "m-images-idx3-ubyte", np.zeros((4, 3, 3), np.uint8))
    write_idx(tmp_path / "m-labels-idx1-ubyte", np.zeros(3, np.uint8))
    with pytest.raises(DataError, match=r"m-labels-idx1-ubyte has 3 labels but .* has 4 images"):
        load_dataset(str(images))


@pytest.mark.parametrize("kwargs, message", [
    (dict(channels=2), r"channels=2 is invalid: use 1 \(grayscale\), 3 \(RGB\)"),
    (dict(size=0), r"size=0 is invalid: size must be an integer >= 1"),
    (dict(limit=0), r"limit=0 is invalid: limit must be an integer >= 1"),
    (dict(size=True), r"size=True is invalid: size must be an integer >= 1"),  # bools are never sizes
    (dict(channels=True), r"channels=True is invalid: use 1 \(grayscale\), 3 \(RGB\)"),
    (dict(limit=5, seed=-1), r"seed must be between 0 and 4294967295 \(2\*\*32 - 1\), got -1 \(it picks the limit"),
])
def test_error_bad_options(kwargs, message):
    with pytest.raises(DataError, match=message):
        load_dataset("digits", **kwargs)


def test_error_hf_without_datasets(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` raise ImportError
    with pytest.raises(DataError, match=r"hf:mnist needs .*pip install datasets"):
        load_dataset("hf:mnist")


def test_hf_with_fake_datasets(monkeypatch):
    """The hf: path against a stand-in `datasets` module (the real one needs the network)."""
    import types

    class FakeImage:
        pass

    class FakeClassLabel:
        def __init__(self, names):
            self.names = names

    rows = [{"img": Image.new("L", (6, 6), 40 * i), "label": i % 2} for i in range(5)]

    class FakeSplit:
        features = {"label": FakeClassLabel(["even", "odd"]), "img": FakeImage()}

        def __len__(self):
            return len(rows)

        def __getitem__(self, key):
            return [r[key] for r in rows] if isinstance(key, str) else rows[key]

    calls = []
    fake = types.SimpleNamespace(Image=FakeImage, ClassLabel=FakeClassLabel,
                                 load_dataset=lambda name, split: calls.append((name, split)) or FakeSplit())
    monkeypatch.setitem(sys.modules, "datasets", fake)
    ds = load_dataset("hf:toy:test", channels=3, limit=3)
    assert calls == [("toy", "test")]
    assert ds.images.shape == (3, 3, 6, 6) and ds.classes == ["even", "odd"] and ds.num_classes == 2
    assert ds.name == "hf:toy:test" and set(ds.labels.tolist()) <= {0, 1}
    load_dataset("hf:toy")
    assert calls[-1] == ("toy", "train")  # the default split


# --- what the loaders read: pixel depth, sizes, memory ------------------------------------------------------


def test_16_bit_png_keeps_its_values(tmp_path):
    """A 16-bit grayscale PNG (Pillow mode I;16, values 0..65535) is scaled by its own range, not clipped at 255."""
    ramp = np.linspace(0, 65535, 64).round().reshape(8, 8)
    Image.fromarray(ramp.astype(np.uint16)).save(tmp_path / "a.png")
    Image.new("L", (8, 8), 51).save(tmp_path / "b.png")  # an 8-bit image beside it
    ds = load_dataset(str(tmp_path))
    assert ds.images.shape == (2, 1, 8, 8)
    assert torch.allclose(ds.images[0, 0], torch.from_numpy(ramp / 65535 * 2 - 1).float(), atol=1e-6)
    assert torch.allclose(ds.images[1], torch.full((1, 8, 8), 51 / 127.5 - 1))
    rgb = load_dataset(str(tmp_path), channels=3, size=4)
    assert rgb.images.shape == (2, 3, 4, 4) and rgb.images.min() >= -1 and rgb.images.max() <= 1
    assert torch.equal(rgb.images[:, 0], rgb.images[:, 2]) and abs(rgb.images[0].mean().item()) < 0.05


@pytest.mark.parametrize("shape", [(3, 0, 0), (3, 0, 5)])
def test_idx_images_without_pixels(tmp_path, shape):
    images = write_idx(tmp_path / "e-images-idx3-ubyte", np.zeros(shape, np.uint8))
    with pytest.raises(DataError, match=rf"e-images-idx3-ubyte holds images of {shape[1]} rows and {shape[2]} "
                                        r"columns, which have no pixels; use a file of images at least 1x1"):
        load_dataset(str(images), size=8)


def test_idx_header_claiming_more_than_memory(tmp_path):
    """Dimensions are multiplied as Python ints (numpy's int64 would wrap) and checked before any data is read."""
    path = tmp_path / "f-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(bytes([0, 0, 8, 3]) + np.array([2**32 - 1] * 3, ">u4").tobytes() + bytes(64)))
    with pytest.raises(DataError, match=r"IDX file .*f-images-idx3-ubyte\.gz \(dimensions \(4294967295, 4294967295, "
                                        r"4294967295\), .* bytes\) needs about .* GiB, more than the .* of memory this "
                                        r"machine has available now; use a smaller file"):
        load_dataset(str(path))


def test_data_larger_than_memory_is_refused_before_it_is_built(tmp_path):
    """The float32 data set's size is checked before any image is resized to it (2**16: tens of TiB)."""
    with pytest.raises(DataError, match=r"the data set digits \(1797 images of 1x65536x65536 as float32\) needs about "
                                        r".* GiB, more than the .* of memory this machine has available now; lower "
                                        r"--image-size or --limit"):
        load_dataset("digits", size=2**16)
    make_folder(tmp_path / "imgs")
    with pytest.raises(DataError, match=r"the data set .*imgs \(4 images of 3x1048576x1048576 as float32\) needs"):
        load_dataset(str(tmp_path / "imgs"), size=2**20, channels=3)


def test_zip_member_larger_than_any_decodable_image(tmp_path, monkeypatch):
    """A zip member is refused by its declared size, before it is inflated (a zip bomb named .png)."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow's decompression-bomb limit, lowered
    with zipfile.ZipFile(tmp_path / "bomb.zip", "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("a/big.png", bytes(2 << 20))
    message = (r"cannot decode image a/big\.png in zip .*bomb\.zip: it inflates to 2,097,152 bytes, more than any "
               r"image Pillow decodes \(at most 2,000 pixels of 4 bytes\)")
    with pytest.raises(DataError, match=message):
        load_dataset(str(tmp_path / "bomb.zip"))


def test_empty_spec_is_not_the_current_directory(tmp_path, monkeypatch):
    Image.new("L", (8, 8)).save(tmp_path / "stray.png")
    monkeypatch.chdir(tmp_path)  # Path("") is "." : the stray image would have been the data set
    for spec in ("", "  "):
        with pytest.raises(DataError, match=r"the data spec is empty; give a data set name \(digits\), a path"):
            load_dataset(spec)


def test_transparent_pixels_are_refused_not_dropped(tmp_path):
    """Converting drops the alpha: a digit on a transparent background became whatever colour lay under it."""
    pixels = np.zeros((8, 8, 4), np.uint8)
    pixels[2:6, 3:5] = 255
    Image.fromarray(pixels, "RGBA").save(tmp_path / "a.png")
    with pytest.raises(DataError, match=r"a\.png has transparent pixels, whose colour depends on what they are shown "
                                        r"over .*; flatten the images onto a background first"):
        load_dataset(str(tmp_path))
    pixels[..., 3] = 255  # opaque RGBA (screenshots) loads as RGB
    Image.fromarray(pixels, "RGBA").save(tmp_path / "a.png")
    assert load_dataset(str(tmp_path)).images.shape == (1, 3, 8, 8)
    palette = Image.new("P", (8, 8), 0)
    palette.putpalette([0, 0, 0, 255, 255, 255] + [0] * 762)
    palette.save(tmp_path / "a.png", transparency=0)  # palette entry 0 transparent
    with pytest.raises(DataError, match="has transparent pixels"):
        load_dataset(str(tmp_path))


def test_exif_orientation_is_applied(tmp_path):
    """A camera's JPEG stored 16x8 with 'rotate 90' in its EXIF is the 8x16 image viewers show."""
    stored = np.zeros((8, 16, 3), np.uint8)
    stored[:, :8] = 255  # the left half white
    image = Image.fromarray(stored)
    exif = image.getexif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    image.save(tmp_path / "a.jpg", exif=exif, quality=100)
    ds = load_dataset(str(tmp_path), channels=1)
    assert ds.images.shape == (1, 1, 16, 8)
    assert ds.images[0, 0, :8].mean() > 0.9 and ds.images[0, 0, 8:].mean() < -0.9  # the white half now on top


def test_zip_with_a_repeated_entry_name(tmp_path):
    with zipfile.ZipFile(tmp_path / "dup.zip", "w") as zf, pytest.warns(UserWarning, match="Duplicate name"):
        for value in (0, 255):
            buffer = __import__("io").BytesIO()
            Image.new("L", (4, 4), value).save(buffer, "PNG")
            zf.writestr("c/a.png", buffer.getvalue())
    with pytest.raises(DataError, match=r"zip .*dup\.zip holds two entries named c/a\.png; remove one of them"):
        load_dataset(str(tmp_path / "dup.zip"))


def test_data_path_that_is_not_a_regular_file(tmp_path):
    """A FIFO named like an IDX file blocked the read forever; a device would never end it."""
    import os

    os.mkfifo(tmp_path / "f-images-idx3-ubyte")
    with pytest.raises(DataError, match=r"f-images-idx3-ubyte is neither a folder nor a regular file \(a FIFO would "
                                        r"block the read, a device never end it\)"):
        load_dataset(str(tmp_path / "f-images-idx3-ubyte"))
    images = write_idx(tmp_path / "g-images-idx3-ubyte", np.zeros((2, 3, 3), np.uint8))
    os.mkfifo(tmp_path / "g-labels-idx1-ubyte")  # a label "file" that is a FIFO is not read: no labels
    assert load_dataset(str(images)).num_classes is None


@pytest.mark.parametrize("spec, message", [
    ("hf:", r"^hf: names no dataset; give its Hugging Face Hub id, hf:<name>\[:<split>\] \(e.g. hf:mnist"),
    ("hf: :test", r"^hf: names no dataset"),
    ("hf:../../etc/passwd", r"^hf:../../etc/passwd is not a Hugging Face Hub dataset id \(Repo id must be in the form "
                            r"'repo_name' or 'namespace/repo_name': '../../etc/passwd'.\); give hf:<name> or "
                            r"hf:<owner>/<name>, or pass a local data set's path without hf:$"),
    ("hf:/etc", r"^hf:/etc is not a Hugging Face Hub dataset id \(Repo id must use alphanumeric chars"),
])
def test_an_hf_spec_without_a_hub_id_is_named_before_datasets_is_needed(monkeypatch, spec, message):
    # Attack f row 688: `--data hf:` said "needs the datasets package", which only moved the user to the next error.
    monkeypatch.setitem(sys.modules, "datasets", None)  # the name is checked first, with or without the package
    with pytest.raises(DataError, match=message):
        load_dataset(spec)


SPEC = r"give hf:<name>\[:<split>\] \(e\.g\. hf:mnist or hf:uoft-cs/cifar10:test\)$"
NOT_A_SPLIT = (r"is not a split of a Hugging Face dataset \(a name such as train or test, sliced as train\[:10%\] or "
               r"train\[10:20\], or joined as train\+test\); " + SPEC)


@pytest.mark.parametrize("spec, message", [
    ("hf:https://huggingface.co/datasets/mnist",
     r"^hf:https://huggingface.co/datasets/mnist is a web address; give the dataset's Hub id instead: hf:mnist$"),
    ("hf:https://huggingface.co/datasets/uoft-cs/cifar10/tree/main", r"is a web address; give the dataset's Hub id "
                                                                      r"instead: hf:uoft-cs/cifar10$"),
    ("hf:https://huggingface.co/datasets/mnist/viewer", "instead: hf:mnist$"),
    ("hf:https://example.com/data", r"^hf:https://example.com/data is a web address; give the dataset's Hub id \(the "
                                    r"<owner>/<name> after huggingface.co/datasets/\): hf:<name>"),
    ("hf:C:\\data", r"^hf:C:\\data is a local path, not a Hugging Face Hub id; pass a local data set's path without "
                    r"hf: \(its folder, zip or IDX file\)$"),
    ("hf:C:/data", r"^hf:C:/data is a local path"),
    ("hf:mnist:test:extra", r"^hf:mnist:test:extra has more than two ':'-separated parts; " + SPEC),
    ("hf:mnist:train[:10%]:x", r"^hf:mnist:train\[:10%\]:x has more than two ':'-separated parts"),
    ("hf:mnist:../../x", r"^hf:mnist:../../x: '../../x' " + NOT_A_SPLIT),
    ("hf:mnist:test ", r"^hf:mnist:test : 'test ' " + NOT_A_SPLIT),
    # datasets' own split specs pass the check and reach the package
    ("hf:mnist", r"^hf:mnist needs the Hugging Face `datasets` package"),
    ("hf:mnist:", r"^hf:mnist: needs the Hugging Face `datasets` package"),
    ("hf:mnist:train[:10%]", r"^hf:mnist:train\[:10%\] needs"),
    ("hf:mnist:train[10:20]+test", r"^hf:mnist:train\[10:20\]\+test needs"),
    ("hf:mnist:train[-20%:](closest)", r"^hf:mnist:train\[-20%:\]\(closest\) needs"),
])
def test_the_whole_hf_spec_is_checked_before_the_datasets_package(monkeypatch, spec, message):
    # attack 2026-12-07g row 762: the spec was split at its first colon and "needs the `datasets` package" came first
    # (a web address became the dataset "https", a Windows path the dataset "C", and the split was never checked)
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(DataError, match=message):
        load_dataset(spec)

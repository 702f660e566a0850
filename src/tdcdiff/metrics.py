"""FID (Heusel et al. 2017, arXiv:1706.08500) / KID (Binkowski et al. 2018, arXiv:1801.01401) with a stated
feature network: values are comparable only under the same network, sample counts and reference set.

No Inception weights can be downloaded here, so the default feature network is a small CNN classifier
trained once per data set on its labels and cached (`feature_net_for`). A user holding the standard
TF-2015 Inception weights file gets the usual Inception FID through `inception_feature_extractor`.
Every number comes as a `FidResult` whose `describe()` states the feature net, counts, reference set,
sampler, step count and seed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import statistics
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance


class FeatureNet(nn.Module):
    """Small CNN classifier whose penultimate layer is the FID feature space.

    in_channels / image_size: input images (C x S x S, values in [-1, 1]); num_classes: classifier
    outputs; num_features: width of the penultimate layer that `forward` returns.
    """

    def __init__(self, in_channels: int, image_size: int, num_classes: int, num_features: int = 64):
        super().__init__()
        self.num_features = num_features  # torchmetrics reads this instead of probing with 3x299x299
        self.image_shape = (in_channels, image_size, image_size)
        self.num_classes = num_classes
        self.info: dict = {}

        def block(cin, cout, stride):
            return [nn.Conv2d(cin, cout, 3, stride, 1), nn.GroupNorm(8, cout), nn.ReLU()]

        self.body = nn.Sequential(*block(in_channels, 32, 1), *block(32, 64, 2), *block(64, 128, 2),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(128, num_features), nn.ReLU())
        self.head = nn.Linear(num_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features, shape (N, num_features); works for float32 or float64 weights."""
        return self.body(x.to(self.head.weight.dtype))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward(x))

    @property
    def description(self) -> str:
        acc = self.info.get("accuracy")
        acc = f", held-out accuracy {acc:.2f}" if acc is not None else ""
        return f"{self.info.get('name', '?')} classifier, {self.num_features}-d features{acc}"


def _cache_key(images, labels, seed, epochs, num_features) -> str:
    # Content is hashed too: two data sets with equal shapes must not share a feature net.
    h = hashlib.sha256(repr((tuple(images.shape), seed, epochs, num_features)).encode())
    h.update(images.float().contiguous().numpy().tobytes())
    h.update(labels.long().contiguous().numpy().tobytes())
    return h.hexdigest()[:12]


MIN_LABELLED = 20


def check_reference(images: torch.Tensor, labels: torch.Tensor | None, name: str) -> None:
    """Raise ValueError, naming the fix, unless feature_net_for can train its classifier on this data:
    square NCHW images, one label each (-1 = unlabeled), at least MIN_LABELLED labelled."""
    if images.ndim == 4 and images.shape[2] != images.shape[3]:
        raise ValueError(f"data set {name!r} has {images.shape[3]}x{images.shape[2]} images, but the report's FID "
                         f"feature net takes square ones; resize them with --image-size (image_size), e.g. "
                         f"--image-size {min(images.shape[2:])}")
    if images.ndim != 4 or labels is None or len(labels) != len(images):
        raise ValueError(f"expected square NCHW images with one label each, got images "
                         f"{tuple(images.shape)} and labels {None if labels is None else tuple(labels.shape)}")
    labelled = int((labels >= 0).sum())
    if labelled < MIN_LABELLED:
        raise ValueError(f"data set {name!r} has {labelled} labelled images, but the report's FID feature net is a "
                         f"classifier trained on the data's labels and needs at least {MIN_LABELLED}: give labelled "
                         "data (one subfolder per class, or IDX labels), or stop before the report (tdcdiff "
                         "train-base, plan, prune, finetune, bundle, sample); in Python, "
                         "metrics.inception_feature_extractor(weights file) replaces the classifier")


def feature_net_for(images: torch.Tensor, labels: torch.Tensor, *, cache_dir, name: str, seed: int = 0,
                    epochs: int = 10, num_features: int = 64) -> FeatureNet:
    """Train (or load from cache) the FID feature classifier for one labelled data set.

    images: float (N, C, S, S) in [-1, 1]; labels: int64 (N,), -1 = unlabeled (ignored); cache_dir:
    folder holding `<name>-<hash>/{model.safetensors,info.json}`; name: data set name used in
    descriptions; seed: fixes init, split and shuffling; epochs: passes over the 90% training split;
    num_features: feature width. The returned net has `.info` (the cached dict plus `from_cache`).
    """
    check_reference(images, labels, name)
    keep = labels >= 0
    x, y = images[keep].float(), labels[keep].long()
    entry = Path(cache_dir) / f"{name}-{_cache_key(x, y, seed, epochs, num_features)}"
    if (entry / "info.json").is_file() and (entry / "model.safetensors").is_file():
        info = json.loads((entry / "info.json").read_text())
        net = FeatureNet(info["image_shape"][0], info["image_shape"][1], info["num_classes"], num_features)
        net.load_state_dict(load_file(entry / "model.safetensors"))
        net.info = {**info, "from_cache": True}
        return net.eval()

    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(x), generator=gen)
    n_val = max(1, len(x) // 10)
    val, train = perm[:n_val], perm[n_val:]
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = FeatureNet(x.shape[1], x.shape[2], int(y.max()) + 1, num_features)
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 3e-3, total_steps=epochs * -(-len(train) // 128))
    net.train()
    for _ in range(epochs):
        for idx in train[torch.randperm(len(train), generator=gen)].split(128):
            loss = F.cross_entropy(net.logits(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    net.eval()
    with torch.no_grad():
        acc = float((net.logits(x[val]).argmax(1) == y[val]).float().mean())
    info = {"name": name, "accuracy": round(acc, 4), "num_features": num_features,
            "image_shape": list(x.shape[1:]), "num_classes": net.num_classes, "train_count": len(train),
            "seed": seed, "epochs": epochs, "train_seconds": round(time.perf_counter() - t0, 2)}

    # Build the entry in a temporary folder and rename it into place, so a reader never sees half a cache.
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{entry.name}-", dir=entry.parent))
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, tmp / "model.safetensors")
    (tmp / "info.json").write_text(json.dumps(info, indent=2))
    try:
        os.replace(tmp, entry)
    except OSError:  # another process finished the same entry first; theirs is equivalent
        shutil.rmtree(tmp, ignore_errors=True)
    net.info = {**info, "from_cache": False}
    return net


class InceptionFeatures(nn.Module):
    """torchmetrics' TF-2015 Inception-v3 (2048-d pool features) taking [-1, 1] float images."""

    num_features = 2048
    image_shape = None  # any size: Inception resizes to 299x299 itself

    def __init__(self, weights_path):
        super().__init__()
        from torchmetrics.image.fid import NoTrainInceptionV3

        self.net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                      feature_extractor_weights_path=str(weights_path))
        self.description = f"Inception-v3 (TF 2015, {Path(weights_path).name}), 2048-d features"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        # The TF-2015 network expects uint8 RGB in [0, 255].
        return self.net(((x.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8))


def inception_feature_extractor(weights_path) -> InceptionFeatures:
    """Standard-Inception feature net for `compute_fid`.

    weights_path: the TF-2015 Inception weights file (`pt_inception-2015-12-05-6726825d.pth` or
    torch-fidelity's `weights-inception-2015-12-05-6726825d.pth`). Needs torch-fidelity installed.
    """
    if not Path(weights_path).is_file():
        raise FileNotFoundError(f"Inception weights file not found: {weights_path} (expected the TF-2015 "
                                "file pt_inception-2015-12-05-6726825d.pth or "
                                "weights-inception-2015-12-05-6726825d.pth)")
    from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE

    if not _TORCH_FIDELITY_AVAILABLE:
        raise ModuleNotFoundError("Inception FID needs torch-fidelity: `pip install torch-fidelity` "
                                  "(note: it pulls in torchvision)")
    return InceptionFeatures(weights_path)


@dataclass
class FidResult:
    """One FID/KID measurement and everything needed to state it."""

    fid: float
    kid_mean: float
    kid_std: float
    num_generated: int
    num_reference: int
    feature_net: str
    reference: str
    sampler: str
    steps: int
    seed: int

    def protocol(self) -> str:
        """Everything but the numbers: what must match for two results to be comparable."""
        sampler = f"{self.sampler} {self.steps} steps" if self.sampler else "sampler not stated"
        return (f"features: {self.feature_net}; {self.num_generated} generated vs {self.num_reference} "
                f"reference '{self.reference}'; {sampler}")

    def describe(self) -> str:
        return (f"FID {self.fid:.2f}, KID {self.kid_mean:.4f}±{self.kid_std:.4f} "
                f"({self.protocol()}; seed {self.seed})")

    def to_dict(self) -> dict:
        return asdict(self)


class _Precomputed(nn.Module):
    """Identity 'feature net' so features computed once can feed both FID and KID."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, x):
        return x


RANGE_TOLERANCE = 1e-3  # rounding slack beyond [-1, 1]; 0..255 or 0..1 pixels are far outside it


def _check_images(x, what: str, image_shape) -> None:
    if not torch.is_tensor(x) or x.ndim != 4:
        raise ValueError(f"{what} images must be a float NCHW tensor, got {getattr(x, 'shape', type(x))}")
    if x.shape[0] < 2:
        raise ValueError(f"FID needs at least 2 {what} images, got {x.shape[0]}")
    if image_shape is not None and tuple(x.shape[1:]) != tuple(image_shape):
        raise ValueError(f"{what} images have shape C,H,W={tuple(x.shape[1:])} but the feature net "
                         f"expects {tuple(image_shape)}")
    if image_shape is None and x.shape[1] not in (1, 3):
        raise ValueError(f"{what} images have {x.shape[1]} channels; expected 1 or 3")
    if not x.is_floating_point():
        raise ValueError(f"{what} images have dtype {x.dtype}; expected float images in [-1, 1] "
                         "(convert uint8 pixels with x.float() / 127.5 - 1)")
    if not torch.isfinite(x).all():
        raise ValueError(f"{what} images contain NaN or infinite values")
    low, high = float(x.min()), float(x.max())
    if low < -1 - RANGE_TOLERANCE or high > 1 + RANGE_TOLERANCE:
        raise ValueError(f"{what} images have values in [{low:g}, {high:g}]; expected [-1, 1] "
                         "(0..255 pixels: x / 127.5 - 1; 0..1 pixels: x * 2 - 1)")


def compute_fid(generated: torch.Tensor, reference: torch.Tensor, feature_net: nn.Module, *, sampler: str = "",
                steps: int = 0, seed: int = 0, reference_name: str = "", batch_size: int = 256,
                kid_subset_size: int | None = None) -> FidResult:
    """FID and KID (torchmetrics) between generated and reference images.

    generated / reference: float (N, C, H, W) in [-1, 1] (ValueError for another dtype or range, naming
    what was given); feature_net: a `FeatureNet` or
    `InceptionFeatures`; sampler / steps / seed: how `generated` was sampled (recorded, and seed also
    fixes KID's subset draws); reference_name: name of the reference set; batch_size: feature batch;
    kid_subset_size: KID subset size, default min(n_generated, n_reference, 1000).
    """
    image_shape = getattr(feature_net, "image_shape", None)
    _check_images(generated, "generated", image_shape)
    _check_images(reference, "reference", image_shape)
    if generated.shape[1:] != reference.shape[1:]:
        raise ValueError(f"generated {tuple(generated.shape[1:])} and reference {tuple(reference.shape[1:])} "
                         "image shapes differ")
    feature_net.eval()
    with torch.no_grad():
        gen_f, ref_f = (torch.cat([feature_net(b) for b in x.split(batch_size)]).double()
                        for x in (generated, reference))

    given = _Precomputed(feature_net.num_features)
    fid = FrechetInceptionDistance(feature=given)
    subset = min(len(gen_f), len(ref_f), kid_subset_size or 1000)
    with warnings.catch_warnings():  # its "saves all features in a buffer" warning: we hold them anyway
        warnings.simplefilter("ignore", UserWarning)
        kid = KernelInceptionDistance(feature=given, subset_size=subset)
    for metric in (fid, kid):
        metric.update(ref_f, real=True)
        metric.update(gen_f, real=False)
    with torch.random.fork_rng():
        torch.manual_seed(seed)  # KID draws random subsets from the global generator
        kid_mean, kid_std = kid.compute()
    return FidResult(fid=float(fid.compute()), kid_mean=float(kid_mean), kid_std=float(kid_std),
                     num_generated=len(gen_f), num_reference=len(ref_f),
                     feature_net=getattr(feature_net, "description", type(feature_net).__name__),
                     reference=reference_name or "unnamed", sampler=sampler, steps=steps, seed=seed)


def summarize_seeds(results: list[FidResult]) -> dict:
    """Mean and sample sd (ddof=1; 0 for one seed) of FID and KID over sampling seeds of one protocol."""
    if not results:
        raise ValueError("summarize_seeds needs at least one FidResult")
    protocols = {r.protocol() for r in results}
    if len(protocols) > 1:
        raise ValueError(f"results mix protocols and cannot be averaged: {sorted(protocols)}")

    def stats(values):
        return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)

    fid_mean, fid_sd = stats([r.fid for r in results])
    kid_mean, kid_sd = stats([r.kid_mean for r in results])
    return {"fid_mean": fid_mean, "fid_sd": fid_sd, "kid_mean": kid_mean, "kid_sd": kid_sd,
            "count": len(results), "seeds": [r.seed for r in results], "protocol": protocols.pop()}


def paired_gap(a: list[float], b: list[float], *, confidence: float = 0.95) -> dict:
    """Per-pair differences b - a of scores measured in pairs (same training run and sampling seed).

    Pairing cancels what both members share (the stage-1 base of a benchmark seed, the sampling noise). The
    gap is real only when the paired t-test's two-sided `confidence` interval of the mean difference excludes
    0; otherwise "tie" is True. With 3 pairs at 95% that needs |mean| > 2.48 x sd of the differences, with 2
    pairs 8.98 x: a few seeds rarely settle a gap, and the verdict says so.
    Returns mean, sd (ddof=1), the interval (low, high), the differences, how many pairs have b lower, and tie.
    """
    from scipy.stats import t as student_t

    if len(a) != len(b) or len(a) < 2:
        raise ValueError(f"paired_gap needs two equally long lists of at least 2 scores, got {len(a)} and {len(b)}")
    diffs = [y - x for x, y in zip(a, b)]
    mean, sd = statistics.fmean(diffs), statistics.stdev(diffs)
    half = float(student_t.ppf(0.5 + confidence / 2, len(diffs) - 1)) * sd / len(diffs) ** 0.5
    return {"mean": mean, "sd": sd, "interval": (mean - half, mean + half), "confidence": confidence,
            "diffs": diffs, "b_lower": sum(d < 0 for d in diffs), "tie": mean - half <= 0 <= mean + half}

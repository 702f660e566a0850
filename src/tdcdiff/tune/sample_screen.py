"""The sample screen: how far a (model, setting)'s samples land from the base's at a high-step reference, from the
same noise. The held-out loss cannot see a sampler's error (it never samples); this does, cheaply: one small fixed
batch per point, paired image by image with the target's.

The target is the base sampled with DDIM at max(200, 4 x the reference's steps) steps (at most T): close to the
probability-flow ODE's solution from that noise, so the distance of a deterministic sampler's image to it is its
discretisation error plus the model's own deviation. The distance is the pixel RMSE per image (in [-1, 1] units),
mean over the images; the Euclidean distance in the judge's feature space (features.py's network, the one FID
uses) is recorded beside it. Pixel RMSE ranks: on a weak model the classifier's features saturate and barely move
with a one-step sampler's blur, while the pixels do (the tests' tiny base: a 1-step DDIM doubles the RMSE of the
4-step reference, its feature distance moves 5%). Cached in sample_screen.json (each point
with its model's identity and setting) and the target's images in sample_screen/target.pt, so reruns resume.
"""

from __future__ import annotations

import json
import statistics

import torch

from ..evaluate import balanced_labels
from ..features import DEFAULT_FEATURE_NET, FEATURES_VERSION
from ..files import atomic_dir, atomic_write_text, holds
from ..metrics import features_of
from ..pipeline import SamplingModel, sample
from ..sampling_setting import SamplingSetting
from ..user_warnings import warn
from .judge import mean_se
from .records import clock, is_number, measurement_cache, record_phase, since, sound_entries

SCREEN_FORMAT = "tdcdiff-tune-sample-screen/1"
SCREEN_SEED = 10_000  # the screen's noise: apart from the FID seeds (0, 1, ...)


def target_setting(reference: SamplingSetting, num_train_timesteps: int) -> SamplingSetting:
    """The screen's target: DDIM at max(200, 4 x the reference's steps), at most T."""
    return SamplingSetting("ddim", min(num_train_timesteps, max(200, 4 * reference.steps)))


def screen_protocol(tune, reference: SamplingSetting) -> dict:
    """What a cached screen distance depends on besides the model and the setting."""
    run = tune.base_run
    return {"target": str(target_setting(reference, run.scheduler.config.num_train_timesteps)),
            "images": tune.config.screen_samples, "seed": SCREEN_SEED, "distance": "pixel RMSE per image (features: "
            "Euclidean in the judge's feature space), to the base's target image from the same noise",
            "feature_net": DEFAULT_FEATURE_NET, "features_version": FEATURES_VERSION}


def _sample(tune, model, setting: SamplingSetting) -> torch.Tensor:
    """screen_samples images of `model` at `setting` from the screen's noise (class-balanced labels if needed)."""
    run, n = tune.base_run, tune.config.screen_samples
    out = sample(SamplingModel(model), run.scheduler, sample_shape=run.sample_shape, sampler=setting.sampler,
                 steps=setting.steps, num_images=n, batch_size=n, seed=SCREEN_SEED, progress=False,
                 cache_interval=setting.cache_interval, cache_depth=setting.cache_depth,
                 class_labels=balanced_labels(model, n, run.data.num_classes))
    return out.images


def _target(tune, models: dict, protocol: dict, base_id: str) -> torch.Tensor:
    """The target's images: read from sample_screen/target.pt when made under this protocol from these base
    weights, else sampled and written."""
    folder, record = tune.dir / "sample_screen", measurement_cache(tune.dir / "sample_screen" / "target.json",
                                                                  lambda data: None)
    if record == {"protocol": protocol, "model": base_id}:
        images = _saved_target(tune, folder / "target.pt")
        if images is not None:
            return images
    tune.say(f"sample screen: the base's target images ({protocol['target']}, {protocol['images']} images)")
    images = _sample(tune, models["base"][0], SamplingSetting.parse(protocol["target"]))
    with atomic_dir(folder, holds("target.json", optional=("target.pt",)),
                    "the sample screen's target images, nor empty") as tmp:
        torch.save(images, tmp / "target.pt")
        (tmp / "target.json").write_text(json.dumps({"protocol": protocol, "model": base_id}))
    return images


def _saved_target(tune, path) -> torch.Tensor | None:
    """The target's images saved in `path` (target.pt), or None, after a warning naming it, when they are not what
    _target writes (a float tensor of screen_samples finite images of the run's sample shape): sampled again."""
    shape = (tune.config.screen_samples, *tune.base_run.sample_shape)
    try:
        images = torch.load(path, weights_only=True)
    except Exception as err:  # noqa: BLE001 (torch.load raises many kinds for a damaged file)
        problem = f"not a tensor file torch can load ({type(err).__name__})"
    else:
        ok = isinstance(images, torch.Tensor) and images.is_floating_point() and tuple(images.shape) == shape
        if ok and bool(images.isfinite().all()):
            return images
        problem = (f"not {'x'.join(map(str, shape))} finite float images, got "
                   + (f"{images.dtype} {tuple(images.shape)}" if isinstance(images, torch.Tensor) else
                      type(images).__name__))
    warn(f"{path} is damaged ({problem}); sampling the sample screen's target again and replacing it")
    return None


def _point_problem(point: dict) -> str | None:
    """What is wrong with one cached screen point (as measure_screen writes it: distance, SE and feature distance
    finite numbers >= 0, the setting and the weights' identity); None when sound."""
    for key in ("distance", "se", "features"):
        if not is_number(point.get(key), 0):
            return f"{key!r} must be a finite number >= 0 (a distance), got {point.get(key)!r}"
    if not (isinstance(point.get("setting"), str) and isinstance(point.get("model"), str)):
        return "no 'setting' or 'model' (the weights' identity)"
    return None


def measure_screen(tune, models: dict, points: dict, reference: SamplingSetting, net, ids: dict) -> dict:
    """The screen distance of every point: name -> {"distance" (pixel RMSE, mean over images), "se", "features"
    (feature-space distance, mean over images), "setting", "model" (the weights' identity)}.

    points: row name -> (model name, SamplingSetting). models: name -> (model, FLOPs) (measures.load_models).
    net: the judge's feature network. ids: model name -> weights identity (measures.model_ids). Points cached in
    sample_screen.json under the same protocol, weights and setting are reused; the rest are sampled.
    """
    protocol = screen_protocol(tune, reference)
    path = tune.dir / "sample_screen.json"
    cache = measurement_cache(path, lambda data: None) or {}
    if cache.get("format") != SCREEN_FORMAT or cache.get("protocol") != protocol:
        cache = {"format": SCREEN_FORMAT, "protocol": protocol, "points": {}}
    cache["points"] = sound_entries(path, cache.get("points"), _point_problem, "point")
    missing = [name for name, (model, setting) in points.items()
               if cache["points"].get(name, {}).get("model") != ids[model]
               or cache["points"][name].get("setting") != str(setting)]
    if missing:
        start = clock()
        target = _target(tune, models, protocol, ids["base"])
        target_features = features_of(target, net)
        for name in missing:
            model, setting = points[name]
            images = _sample(tune, models[model][0], setting)
            features = (features_of(images, net) - target_features).norm(dim=1).tolist()
            summary = mean_se((images - target).double().pow(2).flatten(1).mean(1).sqrt().tolist())
            cache["points"][name] = {"distance": summary["mean"], "se": summary["se"],
                                     "features": statistics.fmean(features), "setting": str(setting),
                                     "model": ids[model]}
            tune.say(f"sample screen: {name}: distance {summary['mean']:.3f} ± {summary['se']:.3f}")
            atomic_write_text(tune.dir / "sample_screen.json", json.dumps(cache, indent=2))
        record_phase(tune.dir, "sample screen", since(start))
    return {name: cache["points"][name] for name in points}

import json
import shutil
import time

import pytest
import torch
from sklearn.datasets import load_digits

from tdcdiff import latency
from tdcdiff.evaluate import default_cache_dir, default_feature_net
from tdcdiff.metrics import (
    FeatureNet,
    FidResult,
    compute_fid,
    feature_net_for,
    inception_feature_extractor,
    precision_recall,
    real_vs_real,
    summarize_seeds,
)
from tdcdiff.verdict import ALPHA, describe, judge, look_confidence, paired_gap, sequential, verdict_of


@pytest.fixture(scope="module")
def digits():
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 8 - 1  # pixel values 0..16 -> [-1, 1]
    return x, torch.tensor(d.target)


@pytest.fixture(scope="module")
def trained(digits, tmp_path_factory):
    cache = tmp_path_factory.mktemp("fidcache")
    t0 = time.perf_counter()
    net = feature_net_for(*digits, cache_dir=cache, name="digits")
    return net, cache, time.perf_counter() - t0


def test_feature_net_trains_and_caches(digits, trained):
    net, cache, first_s = trained
    assert isinstance(net, FeatureNet) and net.num_features == 128  # the default since FEATURES_VERSION 2
    assert net.info["from_cache"] is False and net.info["accuracy"] > 0.95  # on 179 held-out digits
    assert net.info["design"] == "classifier-128" and net.info["version"] == 2
    print(f"digits accuracy {net.info['accuracy']}, trained in {first_s:.2f} s")

    files = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in cache.rglob("*")}
    again = feature_net_for(*digits, cache_dir=cache, name="digits")
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in cache.rglob("*")} == files  # read, not retrained
    assert again.info.pop("from_cache") is True
    assert again.info == {k: v for k, v in net.info.items() if k != "from_cache"}
    x = digits[0][:16]
    with torch.no_grad():
        assert torch.equal(again(x), net(x)) and net(x).shape == (16, 128)
        assert net.double()(x).dtype == torch.float64
    net.float()

    entries = list(cache.iterdir())  # written atomically: one finished entry, no temporary leftovers
    assert len(entries) == 1 and entries[0].name.startswith("digits-")
    assert sorted(p.name for p in entries[0].iterdir()) == ["info.json", "model.safetensors"]


@pytest.mark.slow
def test_fid_real_vs_real_small_noise_large(digits, trained):
    net = trained[0]
    x = digits[0]
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    a, b = x[perm[:900]], x[perm[900:]]
    real = compute_fid(a, b, net, reference_name="digits half")
    noise = compute_fid(torch.randn(900, 1, 8, 8, generator=torch.Generator().manual_seed(1)).clamp(-1, 1),
                        b, net, reference_name="digits half")
    print(f"real-vs-real: {real.describe()}\nnoise: {noise.describe()}")
    assert real.fid < 10
    # The FID scale depends on the feature net; what must hold is a wide gap between real and noise.
    assert noise.fid > 20 and noise.fid > 30 * real.fid
    assert noise.kid_mean > real.kid_mean
    assert (real.num_generated, real.num_reference) == (900, 897)


def test_describe_states_protocol(digits, trained):
    net = trained[0]
    x = digits[0]
    r = compute_fid(x[:300], x, net, sampler="DDIM", steps=50, seed=3, reference_name="digits")
    line = r.describe()
    for part in ("digits classifier-128", "128-d", "accuracy", "300 generated", "1797 reference 'digits'",
                 "DDIM 50 steps", "seed 3", f"FID {r.fid:.2f}", f"precision {r.precision:.3f}"):
        assert part in line, (part, line)
    assert r.to_dict()["steps"] == 50
    # the KID subset draw is seeded, so a result is reproducible
    assert compute_fid(x[:300], x, net, seed=3).kid_mean == r.kid_mean


def _result(fid, kid, seed, sampler="DDIM"):
    return FidResult(fid, kid, 0.0, 100, 200, "net", "ref", sampler, 50, seed)


def test_summarize_seeds():
    s = summarize_seeds([_result(3.0, 0.001, 0), _result(5.0, 0.002, 1), _result(7.0, 0.003, 2)])
    assert s["fid_mean"] == pytest.approx(5.0) and s["fid_sd"] == pytest.approx(2.0)  # sqrt((4+0+4)/2)
    assert s["kid_mean"] == pytest.approx(0.002) and s["kid_sd"] == pytest.approx(0.001)
    assert s["count"] == 3 and s["seeds"] == [0, 1, 2] and "DDIM 50 steps" in s["protocol"]
    one = summarize_seeds([_result(4.0, 0.01, 0)])
    assert one["fid_sd"] == 0.0 and one["kid_sd"] == 0.0 and one["fid_mean"] == 4.0
    with pytest.raises(ValueError, match="mix protocols"):
        summarize_seeds([_result(3.0, 0.0, 0), _result(3.0, 0.0, 1, sampler="DDPM")])


def test_paired_gap():
    # b is lower in every pair by about 1: real, although the scores' own spread (base-to-base) is far larger
    gap = paired_gap([5.0, 9.0, 2.0], [4.0, 8.1, 0.9])
    assert gap["mean"] == pytest.approx(-1.0) and gap["b_lower"] == 3 and judge([5.0, 9.0, 2.0], [4.0, 8.1, 0.9],
                                                                                0.0)["verdict"] == "better"
    low, high = gap["interval"]
    assert high < 0 and (high - low) / 2 == pytest.approx(4.303 * gap["sd"] / 3**0.5, rel=1e-3)  # t(0.975, 2 df)
    assert gap["half_width"] == pytest.approx((high - low) / 2)
    assert judge([5.0, 9.0, 2.0], [6.0, 8.0, 2.1], 0.0)["verdict"] == "undecided"  # the gaps disagree in sign
    assert judge([5.0, 9.0, 2.0], [4.0, 8.5, 0.5], 0.0)["verdict"] == "undecided"  # same sign, too spread for 3
    with pytest.raises(ValueError, match="two equally long lists"):
        paired_gap([1.0], [2.0])


def test_bad_inputs(digits, trained, tmp_path):
    net = trained[0]
    x, y = digits
    with pytest.raises(ValueError, match="expects"):
        compute_fid(x[:10].repeat(1, 3, 1, 1), x[:10], net)
    with pytest.raises(ValueError, match="at least 2"):
        compute_fid(x[:1], x[:10], net)
    bad = x[:10].clone()
    bad[3, 0, 2, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        compute_fid(x[:10], bad, net)
    with pytest.raises(ValueError,
                       match="has 0 labelled images, but the report's FID feature net .* needs at least 20"):
        feature_net_for(x, torch.full_like(y, -1), cache_dir=tmp_path, name="unlabeled")

    missing = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    with pytest.raises(FileNotFoundError, match="pt_inception-2015-12-05-6726825d.pth"):
        inception_feature_extractor(missing)
    try:  # without torch-fidelity, an existing weights file must lead to the install hint
        import torch_fidelity  # noqa: F401
    except ImportError:
        missing.write_bytes(b"")
        with pytest.raises(ModuleNotFoundError, match="pip install torch-fidelity"):
            inception_feature_extractor(missing)


# -- the judge: non-inferiority against a margin, sequential looks -----------------------------------------------
REFERENCE = [1.0, 1.2, 1.1]
CLEAR_LOSS = [2.0, 1.4, 2.9]  # worse by 1.0 on average, but the per-seed gaps (1.0, 0.2, 1.8) spread widely


def test_a_clear_loss_with_a_wide_interval_is_never_non_inferior():
    """The old rule called this a tie (its 95% interval contains 0); against a margin below the loss it is
    undecided at 3 seeds, and inferior once more seeds narrow the interval: never non-inferior."""
    gap = paired_gap(REFERENCE, CLEAR_LOSS)
    assert gap["interval"][0] < 0 < gap["interval"][1]  # what the old rule read as a tie
    for margin in (0.0, 0.3, 0.6):
        assert judge(REFERENCE, CLEAR_LOSS, margin)["verdict"] == "undecided"
    more = [2.0, 1.4, 2.9, 2.1, 2.2, 1.9, 2.3, 2.0]
    assert judge([1.0, 1.2, 1.1, 1.0, 1.1, 1.0, 1.2, 1.1], more, 0.3)["verdict"] == "inferior"
    # a margin as large as the loss itself lets it through: the margin is what makes the verdict, so it is stated
    wide = judge(REFERENCE, CLEAR_LOSS, 3.5)
    assert wide["verdict"] == "non-inferior" and "margin 3.50 FID" in describe(wide)


def test_verdicts_read_the_interval_against_the_margin():
    assert [verdict_of(low, high, 0.5) for low, high in [(-0.4, -0.1), (-0.2, 0.3), (0.1, 0.4), (0.2, 0.9),
                                                         (0.6, 1.0), (-0.5, 0.5)]] == [
        "better", "non-inferior", "non-inferior", "undecided", "inferior", "undecided"]
    tight_loss = judge([1.0, 1.1, 1.2], [1.1, 1.21, 1.3], 0.5)  # resolved worse, by far less than the margin
    assert tight_loss["verdict"] == "non-inferior" and tight_loss["interval"][0] > 0
    assert "resolved worse, within the margin" in describe(tight_loss)
    assert "resolves gaps over" in describe(tight_loss) and "(95% interval, 3 pairs)" in describe(tight_loss)
    for bad in (-0.1, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="the margin must be a finite number >= 0"):
            judge(REFERENCE, CLEAR_LOSS, bad)


def test_sequential_looks_spend_the_error_and_stop_when_decided():
    # Every look's one-sided error adds up to ALPHA (the union bound); one look is the plain 95% interval.
    for looks in (1, 2, 6):
        assert sum((1 - look_confidence(k, looks)) / 2 for k in range(1, looks + 1)) == pytest.approx(ALPHA)
    assert look_confidence(1, 1) == pytest.approx(0.95) and look_confidence(6, 6) == pytest.approx(0.975)
    # Decided at the first look: a finalist that is clearly better stops at `start` seeds, even with more cached.
    base = [1.0, 1.3, 0.9, 1.1, 1.2, 1.0, 1.1, 1.2]
    better = [b - 0.5 + 0.01 * i for i, b in enumerate(base)]
    first = sequential(base, better, 0.3, start=3, cap=8)
    assert first["verdict"] == "better" and first["pairs"] == 3 and first["done"] and first["look"] == 1
    assert first["confidence"] == pytest.approx(look_confidence(1, 6))
    # A tie within the margin needs more seeds: undecided (not done) until the looks narrow the interval enough.
    tie = [b + d for b, d in zip(base, [0.2, -0.15, 0.1, -0.1, 0.05, -0.05, 0.1, -0.1])]
    early = sequential(base[:3], tie[:3], 0.3, start=3, cap=8)
    assert early["verdict"] == "undecided" and not early["done"] and early["pairs"] == 3
    later = sequential(base, tie, 0.3, start=3, cap=8)
    assert later["done"] and later["verdict"] == "non-inferior" and 3 < later["pairs"] <= 8
    # Replaying over more cached pairs comes to the same verdict at the same look.
    assert sequential(base + [5.0], tie + [0.0], 0.3, start=3, cap=8) == later
    # The cap ends it: still undecided, but done.
    capped = sequential(REFERENCE, CLEAR_LOSS, 0.3, start=2, cap=3)
    assert capped["verdict"] == "undecided" and capped["done"] and capped["pairs"] == 3
    with pytest.raises(ValueError, match="the first look needs 3 pairs"):
        sequential(base[:2], tie[:2], 0.3, start=3, cap=8)


def test_the_margin_comes_from_the_real_vs_real_spread(digits, trained):
    from tdcdiff.evaluate import judge_protocol

    net = trained[0]
    x = digits[0]
    real = real_vs_real(x, net, 300, splits=12)
    assert real["n"] == 300 and real["splits"] == 12 and 0 < real["fid_sd"] < real["fid_mean"]
    assert real_vs_real(x, net, 300, splits=12) == real  # seeded
    noise = compute_fid(torch.rand(300, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1, x, net).fid
    assert noise > 10 * real["fid_mean"]  # real images are far closer to each other than noise is to them
    assert real_vs_real(x[:100], net, 300, splits=3)["n"] == 50  # a small data set: two halves
    stated = judge_protocol(x, net, 300)
    assert stated["margin"] == stated["real_vs_real"]["fid_sd"] and "real-vs-real spread" in stated["margin_from"]
    assert stated["feature_net_info"]["accuracy"] == net.info["accuracy"]
    assert judge_protocol(x, net, 300, margin=0.25)["margin"] == 0.25


def test_precision_and_recall_on_known_distributions():
    gen = torch.Generator().manual_seed(0)
    real = torch.randn(400, 8, generator=gen, dtype=torch.float64)
    same = torch.randn(400, 8, generator=gen, dtype=torch.float64)
    p, r = precision_recall(real, same)
    assert p > 0.6 and r > 0.6  # one distribution: most points inside the other set's manifold
    far = same + 20
    assert precision_recall(real, far) == (0.0, 0.0)
    collapsed = same * 0.2  # a narrow part of the real distribution: faithful, but covers little of it
    p, r = precision_recall(real, collapsed)
    assert p > 0.9 and r < 0.3
    spread = same * 3  # covers the real distribution, but most samples fall outside it
    p, r = precision_recall(real, spread)
    assert p < 0.3 and r > 0.8
    with pytest.raises(ValueError, match="needs more than 3 points"):
        precision_recall(real[:3], same)


@pytest.mark.slow
def test_the_second_feature_network_is_another_design(digits, trained, tmp_path):
    second = feature_net_for(*digits, cache_dir=tmp_path, name="digits", design="classifier-96-k5")
    assert second.num_features == 96 and second.info["accuracy"] > 0.95 and second.info["kernel_size"] == 5
    assert second.info["seed"] != trained[0].info["seed"]
    with pytest.raises(ValueError, match="unknown feature network 'nope'; choose from classifier-128"):
        feature_net_for(*digits, cache_dir=tmp_path, name="digits", design="nope")


def _damage_truncate(entry):
    (entry / "model.safetensors").write_bytes((entry / "model.safetensors").read_bytes()[:100])


def _damage_cut_info(entry):
    (entry / "info.json").write_text('{"name": ')


def _damage_other_classes(entry):
    info = json.loads((entry / "info.json").read_text())
    (entry / "info.json").write_text(json.dumps({**info, "num_classes": 11}))


def _damage_float_shape(entry):
    info = json.loads((entry / "info.json").read_text())
    (entry / "info.json").write_text(json.dumps({**info, "image_shape": [float(d) for d in info["image_shape"]]}))


def _damage_nan_weights(entry):
    from safetensors.torch import load_file, save_file

    state = load_file(entry / "model.safetensors")
    save_file({k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in state.items()},
              entry / "model.safetensors")


def _damage_to_a_file(entry):
    shutil.rmtree(entry)
    entry.write_text("not a folder")


@pytest.mark.parametrize("damage, problem", [
    (_damage_truncate, r"model.safetensors is damaged \(Error while deserializing"),
    (_damage_cut_info, r"info.json is damaged \(Expecting value"),
    (_damage_other_classes, r"info.json is not this data's classifier \(got \{'num_classes': 11\}, expected "
                            r"\{'num_classes': 10\}\)"),
    (_damage_to_a_file, "info.json is missing"),
    # attack g rows 752 (a float image_shape: TypeError in the report) and 753 (NaN weights: a segmentation fault)
    (_damage_float_shape, r"info.json is not this data's classifier \(got \{'image_shape': \[1.0, 8.0, 8.0\]\}"),
    (_damage_nan_weights, "model.safetensors holds weights that are not finite numbers"),
])
def test_a_damaged_cache_entry_is_named_and_rebuilt(digits, tmp_path, damage, problem):
    # Attack f rows 633-635: a cut or foreign cache entry raised SafetensorError, "Expecting value" or a size mismatch.
    x, y = digits[0][:200], digits[1][:200]  # a small set: trained in well under a second
    first = feature_net_for(x, y, cache_dir=tmp_path, name="small")
    (entry,) = tmp_path.iterdir()
    damage(entry)
    with pytest.warns(UserWarning, match=f"the cached FID feature classifier is damaged or not this data's: "
                                         f"{tmp_path}/small-\\w+/?.*{problem}.*; retraining the classifier and "
                                         f"replacing {entry}$"):
        again = feature_net_for(x, y, cache_dir=tmp_path, name="small")
    assert again.info["from_cache"] is False and [p.name for p in tmp_path.iterdir()] == [entry.name]
    with torch.no_grad():
        assert torch.equal(again(x[:8]), first(x[:8]))  # the same seed and data: the same classifier
    assert feature_net_for(x, y, cache_dir=tmp_path, name="small").info["from_cache"] is True  # replaced, valid


def test_a_cache_folder_that_cannot_be_one_is_named_before_training(digits, tmp_path, monkeypatch):
    # Attack f rows 630/631: TDCDIFF_CACHE a file was found after training the classifier, the variable not named.
    a_file = tmp_path / "cachefile"
    a_file.write_text("x")
    monkeypatch.setenv("TDCDIFF_CACHE", str(a_file))
    message = (f"TDCDIFF_CACHE is {a_file}, which cannot be used as a folder \\(it is a file, not a folder\\); point "
               "TDCDIFF_CACHE at a folder you can write \\(or unset it: the default is ~/.cache/tdcdiff\\)")
    for where in (default_cache_dir, latency.default_cache_dir):
        with pytest.raises(ValueError, match=message):
            where()
    monkeypatch.setenv("TDCDIFF_CACHE", str(a_file / "under"))
    with pytest.raises(ValueError, match=f"TDCDIFF_CACHE is {a_file}/under, .* \\(Not a directory\\); point"):
        default_feature_net(*digits, name="digits")
    with pytest.raises(ValueError, match=f"the feature cache folder \\(cache_dir\\) is {a_file}, which cannot be used "
                                         "as a folder \\(it is a file, not a folder\\); give a folder you can write"):
        feature_net_for(*digits, cache_dir=a_file, name="digits")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cachefile"]

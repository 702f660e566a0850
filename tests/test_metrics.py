import time

import pytest
import torch
from sklearn.datasets import load_digits

from tdcdiff.metrics import (FeatureNet, FidResult, compute_fid, feature_net_for, inception_feature_extractor,
                             paired_gap, summarize_seeds)


@pytest.fixture(scope="module")
def digits():
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 8 - 1  # pixel values 0..16 -> [-1, 1]
    return x, torch.tensor(d.target)


@pytest.fixture(scope="module")
def trained(digits, tmp_path_factory):
    cache = tmp_path_factory.mktemp("fidcache")
    t0 = time.perf_counter()
    net = feature_net_for(*digits, cache_dir=cache, name="digits", epochs=10)
    return net, cache, time.perf_counter() - t0


def test_feature_net_trains_and_caches(digits, trained):
    net, cache, first_s = trained
    assert isinstance(net, FeatureNet) and net.num_features == 64
    assert net.info["from_cache"] is False and net.info["accuracy"] > 0.8
    print(f"digits accuracy {net.info['accuracy']}, trained in {first_s:.2f} s")

    files = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in cache.rglob("*")}
    again = feature_net_for(*digits, cache_dir=cache, name="digits", epochs=10)
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in cache.rglob("*")} == files  # read, not retrained
    assert again.info.pop("from_cache") is True
    assert again.info == {k: v for k, v in net.info.items() if k != "from_cache"}
    x = digits[0][:16]
    with torch.no_grad():
        assert torch.equal(again(x), net(x)) and net(x).shape == (16, 64)
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
    for part in ("digits classifier", "64-d", "accuracy", "300 generated", "1797 reference 'digits'",
                 "DDIM 50 steps", "seed 3", f"FID {r.fid:.2f}"):
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
    assert gap["mean"] == pytest.approx(-1.0) and gap["b_lower"] == 3 and not gap["tie"]
    low, high = gap["interval"]
    assert high < 0 and (high - low) / 2 == pytest.approx(4.303 * gap["sd"] / 3**0.5, rel=1e-3)  # t(0.975, 2 df)
    assert paired_gap([5.0, 9.0, 2.0], [6.0, 8.0, 2.1])["tie"]  # the gaps disagree in sign
    assert paired_gap([5.0, 9.0, 2.0], [4.0, 8.5, 0.5])["tie"]  # same sign, but too spread for 3 pairs
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
    with pytest.raises(ValueError, match="has 0 labelled images, but the report's FID feature net .* needs at least 20"):
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

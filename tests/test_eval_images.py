"""Image metrics: FD / KID against scipy and torchmetrics, k-NN precision/recall, copy check,
and the cached feature classifier."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
import torch

from aigc.errors import AigcError
from aigc.evaluation.images import (
    FeatureTrainConfig,
    as_float_images,
    conditional_accuracy,
    copy_grid,
    extract_features,
    feature_classifier,
    frechet_distance,
    image_metrics,
    kid,
    nearest_neighbour_copy_check,
    precision_recall,
)


def _feats(seed: int, n: int = 300, d: int = 16, shift: float = 0.0) -> np.ndarray:
    """Samples of one correlated Gaussian (the same for every seed), optionally shifted."""
    mix = np.random.default_rng(12345).normal(size=(d, d)) / d**0.5
    return np.random.default_rng(seed).normal(size=(n, d)) @ mix + shift


class _Identity(torch.nn.Module):
    """A "feature network" that passes features through, to feed torchmetrics our own features."""

    def __init__(self, d: int):
        super().__init__()
        self.num_features = d

    def forward(self, x):
        return x


# ----------------------------------------------------------------------------- Frechet distance


def test_frechet_distance_matches_scipy_sqrtm_formula():
    scipy_linalg = pytest.importorskip("scipy.linalg")
    a, b = _feats(0), _feats(1, shift=0.3)
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy_linalg.sqrtm(s1 @ s2).real  # the pytorch-fid formula
    expected = (mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)


def test_frechet_distance_matches_torchmetrics_fid():
    fid_mod = pytest.importorskip("torchmetrics.image.fid")
    a, b = _feats(2, n=400, d=24), _feats(3, n=350, d=24, shift=0.1)
    metric = fid_mod.FrechetInceptionDistance(feature=_Identity(24))
    metric.update(torch.from_numpy(a), real=True)
    metric.update(torch.from_numpy(b), real=False)
    assert frechet_distance(a, b) == pytest.approx(float(metric.compute()), rel=1e-3)


def test_frechet_distance_properties():
    a = _feats(4)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    # same covariance, shifted mean: d^2 = |shift|^2 exactly
    shift = np.full(a.shape[1], 0.5)
    assert frechet_distance(a, a + shift) == pytest.approx(shift @ shift, rel=1e-6)
    # rank-deficient covariances (fewer samples than dimensions) stay finite and >= 0
    low = _feats(5, n=8, d=32)
    assert 0 <= frechet_distance(low, _feats(6, n=8, d=32)) < np.inf
    with pytest.raises(AigcError, match="feature sizes differ"):
        frechet_distance(a, a[:, :3])


# ----------------------------------------------------------------------------- KID


@pytest.mark.filterwarnings("ignore:Metric `Kernel Inception Distance` will save")
def test_kid_matches_torchmetrics_with_the_same_subsets():
    kid_mod = pytest.importorskip("torchmetrics.image.kid")
    a, b = _feats(7, n=120), _feats(8, n=100, shift=0.2)
    metric = kid_mod.KernelInceptionDistance(feature=_Identity(16), subsets=7, subset_size=40)
    metric.update(torch.from_numpy(a), real=True)
    metric.update(torch.from_numpy(b), real=False)
    torch.manual_seed(123)  # torchmetrics draws its subsets from the global generator
    ref_mean, ref_std = metric.compute()
    mean, std = kid(a, b, subsets=7, subset_size=40, seed=123)
    assert mean == pytest.approx(float(ref_mean), rel=1e-9)
    assert std == pytest.approx(float(ref_std), rel=1e-6)


def test_kid_is_unbiased_near_zero_for_one_distribution():
    a, b = _feats(9, n=400), _feats(10, n=400)
    mean, std = kid(a, b, subsets=20, subset_size=200)
    assert abs(mean) < 3 * std + 1e-3
    far, _ = kid(a, _feats(11, n=400, shift=1.0), subsets=20, subset_size=200)
    assert far > 10 * abs(mean)


# ----------------------------------------------------------------------------- precision / recall


def _brute_pr(real: np.ndarray, fake: np.ndarray, k: int) -> tuple[float, float]:
    def radii(x):
        return np.array([np.sort(np.linalg.norm(x - p, axis=1))[k] for p in x])

    def inside(points, centres, r):
        return np.mean([np.any(np.linalg.norm(centres - p, axis=1) <= r) for p in points])

    return inside(fake, real, radii(real)), inside(real, fake, radii(fake))


def test_precision_recall_against_brute_force():
    real = _feats(12, n=60, d=4)
    fake = np.concatenate([_feats(13, n=30, d=4), _feats(14, n=20, d=4, shift=4.0)])  # 20 off-manifold
    p, r = precision_recall(real, fake, k=3)
    bp, br = _brute_pr(real, fake, 3)
    assert (p, r) == pytest.approx((bp, br))
    assert p < 0.75  # the shifted part is outside the real manifold
    assert precision_recall(real, real + 10.0, k=3) == (0.0, 0.0)
    with pytest.raises(AigcError, match="more than 3 samples"):
        precision_recall(real[:3], fake)


# ----------------------------------------------------------------------------- copy check


def test_copy_check_flags_copies_and_draws_the_grid():
    rng = np.random.default_rng(15)
    train = rng.integers(0, 256, (50, 1, 8, 8), dtype=np.uint8)
    held_out = rng.integers(0, 256, (30, 1, 8, 8), dtype=np.uint8)
    samples = np.concatenate([train[[3, 17]], rng.integers(0, 256, (6, 1, 8, 8), dtype=np.uint8)])
    check = nearest_neighbour_copy_check(samples, train, reference=held_out)
    assert check.flags.tolist() == [True, True] + [False] * 6
    assert check.indices[:2].tolist() == [3, 17] and check.distances[:2].tolist() == [0.0, 0.0]
    assert check.summary()["flagged"] == 2
    grid = copy_grid(samples, train, check, rows=3)
    assert grid.shape == (3 * 10 - 2, 2 * 8 + 2, 1) and grid.dtype == np.uint8
    assert np.array_equal(grid[:8, :8, 0], grid[:8, 10:, 0])  # a copy looks like its neighbour
    with pytest.raises(AigcError, match="image shapes differ"):
        nearest_neighbour_copy_check(samples[:, :, :4], train, threshold=0.1)
    with pytest.raises(AigcError, match="threshold or held-out"):
        nearest_neighbour_copy_check(samples, train)


def test_image_input_checks():
    assert as_float_images(np.full((2, 4, 4), 255, np.uint8)).shape == (2, 1, 4, 4)
    assert float(as_float_images(np.zeros((1, 1, 2, 2), np.uint8)).min()) == -1.0
    with pytest.raises(AigcError, match=r"must lie in \[-1, 1\]"):
        as_float_images(np.full((1, 1, 2, 2), 3.0, np.float32))
    with pytest.raises(AigcError, match="must be"):
        as_float_images(np.zeros((4, 4), np.float32))


# ----------------------------------------------------------------------------- feature classifier


def _bars(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Class 0: a horizontal bar, class 1: a vertical bar, at random places, with noise."""
    rng = np.random.default_rng(seed)
    x = rng.normal(-0.8, 0.1, (n, 1, 12, 12)).astype(np.float32)
    y = rng.integers(0, 2, n)
    for i in range(n):
        j = rng.integers(1, 11)
        if y[i] == 0:
            x[i, 0, j, 2:10] = 0.9
        else:
            x[i, 0, 2:10, j] = 0.9
    return x.clip(-1, 1), y


def test_feature_classifier_trains_caches_and_scores(tmp_path):
    x, y = _bars(400, seed=16)
    cfg = FeatureTrainConfig(steps=60, batch_size=32, lr=3e-3)
    model, info = feature_classifier(x, y, cfg)
    assert info["test_accuracy"] >= 0.9 and info["feature_dim"] == 128
    cached = tmp_path / "aigc-home" / "cache" / "feature-classifier" / info["hash"]
    assert (cached / "model.safetensors").is_file() and (cached / "config.json").is_file()
    again, info2 = feature_classifier(x, y, cfg)  # from the cache: same weights, same report
    assert info2 == info
    assert torch.equal(extract_features(model, x[:5]), extract_features(again, x[:5]))
    _, info3 = feature_classifier(x[:-1], y[:-1], cfg)  # other data -> other key
    assert info3["hash"] != info["hash"]
    cond = conditional_accuracy(model, x[:100], y[:100])
    assert cond["accuracy"] >= 0.9 and set(cond["per_label"]) == {0, 1}
    with pytest.raises(AigcError, match="at least 2 classes"):
        feature_classifier(x, np.zeros_like(y), cfg)


@pytest.mark.slow
def test_mnist_real_vs_real_floor_and_speed(data_root, tmp_path):
    import time

    root = data_root / "images" / "mnist"

    def idx(name: str, offset: int) -> np.ndarray:
        with gzip.open(root / name) as f:
            return np.frombuffer(f.read(), np.uint8, offset=offset)

    x, y = idx("train-images-idx3-ubyte.gz", 16), idx("train-labels-idx1-ubyte.gz", 8)
    x_test = idx("t10k-images-idx3-ubyte.gz", 16)
    x, x_test = x.reshape(-1, 1, 28, 28), x_test.reshape(-1, 1, 28, 28)
    model, info = feature_classifier(x[:20000], y[:20000])
    assert info["test_accuracy"] > 0.95
    t0 = time.perf_counter()  # evaluation of 1,000 "samples" (here: real test digits)
    fake = x_test[:1000]
    f_train, f_fake = extract_features(model, x[20000:21000]), extract_features(model, fake)
    m = image_metrics(f_train, f_fake)
    check = nearest_neighbour_copy_check(fake, x[:20000], reference=x_test[5000:6000])
    assert time.perf_counter() - t0 < 120
    # real vs real: the floor a model is compared with
    assert m["precision"] > 0.8 and m["recall"] > 0.8 and m["fd"] < 5
    assert check.summary()["flagged_share"] < 0.05
    # noise is far from digits in this feature space
    noise = np.random.default_rng(0).integers(0, 256, (1000, 1, 28, 28), dtype=np.uint8)
    assert frechet_distance(f_train, extract_features(model, noise)) > 20 * m["fd"]


def test_image_report_floor_copies_and_errors(tmp_path):
    from aigc.evaluation.report import image_report, write_report

    x, y = _bars(500, seed=17)
    train_x, train_y, held = x[:300], y[:300], x[300:]
    rng = np.random.default_rng(0)
    noise = rng.uniform(-1, 1, (40, 1, 12, 12)).astype(np.float32)
    samples = np.concatenate([train_x[:10], noise])  # 10 copies, 40 garbage
    cfg = FeatureTrainConfig(steps=60, batch_size=32)
    report, grid = image_report(
        samples, train_x, train_y, held, requested_labels=np.r_[train_y[:10], [0] * 40], feature_cfg=cfg
    )
    proto, model, real = report["protocol"], report["model"], report["real"]
    assert proto["samples"] == 50 and proto["feature_network_test_accuracy"] >= 0.9
    assert model["copies"]["flagged"] >= 10 and real["copies"]["flagged_share"] <= 0.1
    assert model["fd"] > 5 * real["fd"] and model["precision"] < real["precision"]
    assert model["label_accuracy"]["per_label"][1] == 1.0  # the copied bars keep their labels
    assert grid.dtype == np.uint8 and grid.shape[1] == 2 * 12 + 2
    path = write_report(tmp_path / "report.json", report, images={"copies": grid})
    assert (tmp_path / "report-copies.png").is_file() and "report-copies.png" in (
        tmp_path / "report.md"
    ).read_text()
    with pytest.warns(UserWarning, match="more than the real set"):
        capped, _ = image_report(np.concatenate([samples] * 5), train_x, train_y, held, feature_cfg=cfg)
    assert capped["protocol"]["samples"] == 200
    with pytest.raises(AigcError, match="image shapes differ"):
        image_report(samples[:, :, :8, :8], train_x, train_y, held, feature_cfg=cfg)
    assert path.is_file()

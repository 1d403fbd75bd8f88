"""Image metrics in a feature space: Frechet distance, KID, precision/recall, copy check.

All metrics take feature matrices (N, D). On small data sets (MNIST-like) the feature space is a
small CNN trained on the data set itself (`feature_classifier`), cached by data hash, because
ImageNet-Inception features mean little there; its test accuracy is reported with the scores.

Images accepted by the helpers here (`as_float_images`): uint8 arrays in [0, 255] or float
arrays in [-1, 1], shaped (N, C, H, W), or (N, H, W) for one channel.

References:
- Frechet distance: Heusel et al. 2017 (FID), d^2 = |mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^1/2).
- KID: Binkowski et al. 2018, unbiased MMD^2 with the kernel k(x, y) = (x.y / d + 1)^3 over
  random subsets (mean and std), as in `torchmetrics.image.kid`.
- Precision / recall: Kynkaanniemi et al. 2019, k-NN manifolds (k = 3).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aigc.errors import AigcError
from aigc.utils.paths import aigc_home

# ----------------------------------------------------------------------------- inputs


def as_float_images(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Images as float32 (N, C, H, W) in [-1, 1]: uint8 is rescaled, floats are range-checked."""
    if not isinstance(images, torch.Tensor):
        images = np.require(images, requirements="W")  # read-only (memmap/frombuffer): copy
    x = torch.as_tensor(images)
    if x.dim() == 3:
        x = x.unsqueeze(1)  # (N, H, W) -> (N, 1, H, W)
    if x.dim() != 4:
        raise AigcError(
            f"images must be (N, C, H, W) or (N, H, W), got shape {tuple(x.shape)}; "
            "pass a batch of images, not a single one"
        )
    if x.dtype == torch.uint8:
        return x.float() / 127.5 - 1.0
    if not x.is_floating_point():
        raise AigcError(f"images must be uint8 in [0, 255] or float in [-1, 1], got dtype {x.dtype}")
    x = x.float()
    if x.numel() and (x.min() < -1.001 or x.max() > 1.001):
        raise AigcError(
            f"float images must lie in [-1, 1], got values in [{float(x.min()):.3g}, {float(x.max()):.3g}]; "
            "rescale them (x * 2 - 1 for [0, 1] data) or pass uint8"
        )
    return x


def check_same_shape(a: torch.Tensor, b: torch.Tensor, what_a: str = "samples", what_b: str = "data") -> None:
    """Two image sets must share (C, H, W) to be compared in one feature space."""
    if tuple(a.shape[1:]) != tuple(b.shape[1:]):
        raise AigcError(
            f"image shapes differ: {what_a} are {tuple(a.shape[1:])} (C, H, W) but {what_b} are "
            f"{tuple(b.shape[1:])}; evaluate a model against the data set it was trained on"
        )


def _features64(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    f = torch.as_tensor(np.array(x) if not isinstance(x, torch.Tensor) else x).double()
    if f.dim() != 2:
        raise ValueError(f"features must be (N, D), got shape {tuple(f.shape)}")
    return f


# ----------------------------------------------------------------------------- Frechet distance


def gaussian_stats(feats: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D, D) of features (N, D), in float64."""
    f = _features64(feats).numpy()
    if len(f) < 2:
        raise AigcError("the Frechet distance needs at least 2 samples per set")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_distance_from_stats(mu1: np.ndarray, s1: np.ndarray, mu2: np.ndarray, s2: np.ndarray) -> float:
    """d^2 = |mu1 - mu2|^2 + Tr(S1) + Tr(S2) - 2 Tr((S1 S2)^1/2).

    Tr((S1 S2)^1/2) is computed as Tr((A S2 A)^1/2) with A = S1^1/2: A S2 A is symmetric PSD and has
    the same eigenvalues as S1 S2, so two `eigh` calls replace a general (complex, sometimes
    unstable) matrix square root, and tiny negative eigenvalues from rounding are clipped to 0.
    """
    s1 = np.atleast_2d(s1)
    s2 = np.atleast_2d(s2)
    w1, v1 = np.linalg.eigh(s1)
    a = (v1 * np.sqrt(np.clip(w1, 0, None))) @ v1.T  # 1. A = S1^1/2
    m = a @ s2 @ a  # 2. A S2 A, symmetric PSD
    w = np.linalg.eigvalsh((m + m.T) / 2)  # symmetrize against rounding
    tr_covmean = np.sqrt(np.clip(w, 0, None)).sum()  # 3. Tr((S1 S2)^1/2)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


def frechet_distance(feats_a: np.ndarray | torch.Tensor, feats_b: np.ndarray | torch.Tensor) -> float:
    """Frechet distance between two feature sets (N, D) and (M, D), fitted as Gaussians."""
    mu1, s1 = gaussian_stats(feats_a)
    mu2, s2 = gaussian_stats(feats_b)
    if mu1.shape != mu2.shape:
        raise AigcError(f"feature sizes differ ({mu1.shape[0]} vs {mu2.shape[0]}); use one feature network")
    return frechet_distance_from_stats(mu1, s1, mu2, s2)


# ----------------------------------------------------------------------------- KID


def poly_mmd2(x: torch.Tensor, y: torch.Tensor, degree: int = 3, coef: float = 1.0) -> float:
    """Unbiased MMD^2 between equal-size sets with k(a, b) = (a.b / d + coef)^degree."""
    m, d = x.shape
    k_xx = (x @ x.T / d + coef) ** degree
    k_yy = (y @ y.T / d + coef) ** degree
    k_xy = (x @ y.T / d + coef) ** degree
    # unbiased: drop the diagonals of the within-set kernels (Binkowski et al. 2018, eq. 2)
    xx = (k_xx.sum() - k_xx.diagonal().sum()) / (m * (m - 1))
    yy = (k_yy.sum() - k_yy.diagonal().sum()) / (m * (m - 1))
    return float(xx + yy - 2 * k_xy.sum() / (m * m))


def kid(
    feats_real: np.ndarray | torch.Tensor,
    feats_fake: np.ndarray | torch.Tensor,
    subsets: int = 100,
    subset_size: int = 1000,
    degree: int = 3,
    coef: float = 1.0,
    seed: int = 0,
) -> tuple[float, float]:
    """Kernel Inception Distance: (mean, std) of the unbiased MMD^2 over random subsets.

    The subset size is capped at the smaller set. Subsets are drawn like torchmetrics does
    (a permutation of the real set, then of the fake set, per subset) from a seeded generator,
    so with the same seed the two agree exactly.
    """
    x, y = _features64(feats_real), _features64(feats_fake)
    size = min(subset_size, len(x), len(y))
    if size < 2:
        raise AigcError("KID needs at least 2 samples per set")
    g = torch.Generator().manual_seed(seed)
    scores = []
    for _ in range(subsets):
        xs = x[torch.randperm(len(x), generator=g)[:size]]
        ys = y[torch.randperm(len(y), generator=g)[:size]]
        scores.append(poly_mmd2(xs, ys, degree, coef))
    s = np.asarray(scores)
    return float(s.mean()), float(s.std())  # population std, as torchmetrics


# ----------------------------------------------------------------------------- precision / recall


def _pairwise_dist(a: torch.Tensor, b: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
    """Euclidean distances (len(a), len(b)) in chunks to bound memory."""
    return torch.cat([torch.cdist(a[i : i + chunk], b) for i in range(0, len(a), chunk)])


def knn_radii(feats: torch.Tensor, k: int) -> torch.Tensor:
    """Distance from each point to its k-th nearest neighbour in the same set (itself excluded)."""
    d = _pairwise_dist(feats, feats)  # (N, N)
    return d.kthvalue(k + 1, dim=1).values  # the 1st smallest is the point itself (0)


def precision_recall(
    feats_real: np.ndarray | torch.Tensor, feats_fake: np.ndarray | torch.Tensor, k: int = 3
) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019).

    The real manifold is the union of balls around each real point with radius = distance to its
    k-th nearest real neighbour; precision = share of fake points inside it. Recall swaps roles:
    share of real points inside the fake manifold.
    """
    x, y = _features64(feats_real), _features64(feats_fake)
    if min(len(x), len(y)) <= k:
        raise AigcError(f"precision/recall with k={k} needs more than {k} samples per set")
    r_x, r_y = knn_radii(x, k), knn_radii(y, k)
    d = _pairwise_dist(y, x)  # (M fake, N real)
    precision = (d <= r_x[None, :]).any(dim=1).double().mean()
    recall = (r_y[None, :] >= d.T).any(dim=1).double().mean()
    return float(precision), float(recall)


# ----------------------------------------------------------------------------- copy check


@dataclass
class CopyCheck:
    """Nearest training neighbour of each sample (RMS pixel distance on the [-1, 1] scale)."""

    distances: np.ndarray  # (N,)
    indices: np.ndarray  # (N,) index into the training set
    flags: np.ndarray  # (N,) bool: distance < threshold
    threshold: float

    def summary(self) -> dict[str, Any]:
        return {
            "threshold": self.threshold,
            "flagged": int(self.flags.sum()),
            "flagged_share": float(self.flags.mean()) if len(self.flags) else 0.0,
            "min_distance": float(self.distances.min()) if len(self.distances) else None,
            "median_distance": float(np.median(self.distances)) if len(self.distances) else None,
        }


def nearest_neighbours(
    queries: np.ndarray | torch.Tensor, train: np.ndarray | torch.Tensor, chunk: int = 1024
) -> tuple[np.ndarray, np.ndarray]:
    """(RMS distance, index) of each query's nearest training image, on the [-1, 1] pixel scale."""
    q, t = as_float_images(queries), as_float_images(train)
    check_same_shape(q, t, "samples", "training images")
    qf, tf = q.flatten(1), t.flatten(1)  # (N, D), (M, D)
    dims = qf.shape[1]
    dist, idx = [], []
    for i in range(0, len(qf), chunk):
        q_i = qf[i : i + chunk]
        j = torch.cdist(q_i, tf).argmin(dim=1)  # (n,) fast matmul form, rounding ~1e-4
        v = (q_i - tf[j]).norm(dim=1)  # exact distance to the winner: a copy gives 0.0
        dist.append(v / dims**0.5)
        idx.append(j)
    return torch.cat(dist).numpy().astype(np.float64), torch.cat(idx).numpy()


def nearest_neighbour_copy_check(
    samples: np.ndarray | torch.Tensor,
    train: np.ndarray | torch.Tensor,
    threshold: float | None = None,
    reference: np.ndarray | torch.Tensor | None = None,
    quantile: float = 0.01,
) -> CopyCheck:
    """Flag samples that sit closer to a training image than genuinely new images do.

    Without an explicit `threshold`, it is the `quantile` (1%) of the nearest-training-neighbour
    distances of `reference` (held-out real images): a sample closer than 99% of unseen real
    images are is flagged as a likely copy.
    """
    dist, idx = nearest_neighbours(samples, train)
    if threshold is None:
        if reference is None:
            raise AigcError("copy check needs a threshold or held-out reference images to calibrate one")
        ref_dist, _ = nearest_neighbours(reference, train)
        threshold = float(np.quantile(ref_dist, quantile))
    return CopyCheck(dist, idx, dist < threshold, float(threshold))


def copy_grid(
    samples: np.ndarray | torch.Tensor, train: np.ndarray | torch.Tensor, check: CopyCheck, rows: int = 8
) -> np.ndarray:
    """The `rows` closest (sample, nearest training image) pairs side by side: uint8 (H', W', C).

    Row i is [sample | training neighbour], closest pair first, with a 2-pixel gap.
    """
    s, t = as_float_images(samples), as_float_images(train)
    order = np.argsort(check.distances)[:rows]
    _, c, h, w = s.shape
    gap = 2
    grid = np.zeros((len(order) * (h + gap) - gap, 2 * w + gap, c), dtype=np.uint8)
    to_u8 = lambda x: ((x.permute(1, 2, 0).numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)  # noqa: E731
    for r, i in enumerate(order):
        y0 = r * (h + gap)
        grid[y0 : y0 + h, :w] = to_u8(s[i])
        grid[y0 : y0 + h, w + gap :] = to_u8(t[int(check.indices[i])])
    return grid


# ----------------------------------------------------------------------------- feature network


def data_hash(images: torch.Tensor, labels: np.ndarray | torch.Tensor, extra: dict | None = None) -> str:
    """Short content hash of an image set, its labels and the training settings (the cache key)."""
    h = hashlib.sha256()
    h.update(str(tuple(images.shape)).encode())
    h.update(images.numpy().tobytes())
    h.update(np.asarray(labels, dtype=np.int64).tobytes())
    h.update(json.dumps(extra or {}, sort_keys=True).encode())
    return h.hexdigest()[:16]


@dataclass
class FeatureTrainConfig:
    """How the feature classifier is trained (part of the cache key)."""

    steps: int = 600
    batch_size: int = 128
    lr: float = 3e-3
    test_fraction: float = 0.1
    seed: int = 0


def feature_classifier(
    images: np.ndarray | torch.Tensor,
    labels: np.ndarray | torch.Tensor,
    cfg: FeatureTrainConfig | None = None,
    cache_dir: str | Path | None = None,
    log: Any = None,
) -> tuple[Any, dict[str, Any]]:
    """The data set's own feature network: trained once, then loaded from the cache.

    Trains `ImageClassifier` on a random (1 - test_fraction) part of (images, labels) and measures
    accuracy on the rest. Cached under `$AIGC_HOME/cache/feature-classifier/<data hash>/` as
    model.safetensors + config.json. Returns (model in eval mode, info) where info has `hash`,
    `test_accuracy`, `num_classes`, `image_shape` and `feature_dim` (the protocol to report).
    """
    from safetensors.torch import load_file, save_file

    from aigc.models.image_classifier import ImageClassifier, ImageClassifierConfig
    from aigc.utils.io import atomic_write_json, building_dir

    cfg = cfg or FeatureTrainConfig()
    x = as_float_images(images)
    y = torch.as_tensor(np.array(labels), dtype=torch.long)
    if len(x) != len(y):
        raise AigcError(f"{len(x)} images but {len(y)} labels; give one label per image")
    classes = torch.unique(y)
    if len(classes) < 2:
        raise AigcError("the feature classifier needs at least 2 classes in the labels")
    if y.min() < 0:
        raise AigcError("labels must be integers >= 0")
    key = data_hash(x, y.numpy(), asdict(cfg))
    root = Path(cache_dir) if cache_dir is not None else aigc_home() / "cache" / "feature-classifier"
    final = root / key
    model_cfg = ImageClassifierConfig(
        in_channels=x.shape[1], image_size=x.shape[2], num_classes=int(y.max()) + 1
    )
    if (final / "config.json").is_file() and (final / "model.safetensors").is_file():
        info = json.loads((final / "config.json").read_text(encoding="utf-8"))
        model = ImageClassifier(ImageClassifierConfig(**info["model"]))
        model.load_state_dict(load_file(str(final / "model.safetensors")))
        return model.eval(), info["info"]

    # 1. split, seeded
    g = torch.Generator().manual_seed(cfg.seed)
    perm = torch.randperm(len(x), generator=g)
    n_test = max(1, int(len(x) * cfg.test_fraction))
    test_idx, train_idx = perm[:n_test], perm[n_test:]
    # 2. train: a short Adam loop with cosine decay is enough for a small CNN on small images
    torch.manual_seed(cfg.seed)
    model = ImageClassifier(model_cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.steps)
    model.train()
    for step in range(cfg.steps):
        b = train_idx[torch.randint(len(train_idx), (cfg.batch_size,), generator=g)]
        _, loss = model(x[b], y[b])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if log is not None and (step + 1) % 100 == 0:
            log(f"feature classifier step {step + 1}/{cfg.steps} loss {loss.item():.3f}")
    # 3. held-out accuracy
    model.eval()
    acc = float((predict_labels(model, x[test_idx]) == y[test_idx]).double().mean())
    info = {
        "hash": key,
        "test_accuracy": acc,
        "test_samples": int(n_test),
        "num_classes": model_cfg.num_classes,
        "image_shape": list(x.shape[1:]),
        "feature_dim": model_cfg.feature_dim,
        "network": "aigc.models.image_classifier.ImageClassifier",
        "train": asdict(cfg),
    }
    with building_dir(final) as stage:
        save_file(model.state_dict(), str(stage / "model.safetensors"))
        atomic_write_json(
            stage / "config.json", {"family": "image_classifier", "model": asdict(model_cfg), "info": info}
        )
    return model, info


@torch.no_grad()
def extract_features(model: Any, images: np.ndarray | torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Penultimate-layer features (N, feature_dim) of images under a feature network."""
    x = as_float_images(images)
    return torch.cat([model.features(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])


@torch.no_grad()
def predict_labels(model: Any, images: np.ndarray | torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    x = as_float_images(images)
    return torch.cat([model(x[i : i + batch_size])[0].argmax(-1) for i in range(0, len(x), batch_size)])


def conditional_accuracy(
    model: Any, images: np.ndarray | torch.Tensor, requested: np.ndarray
) -> dict[str, Any]:
    """For a conditional generator: does the classifier see the requested label in each sample?

    Returns overall accuracy and accuracy per requested label.
    """
    pred = predict_labels(model, images).numpy()
    requested = np.asarray(requested)
    per = {int(c): float((pred[requested == c] == c).mean()) for c in np.unique(requested)}
    return {"accuracy": float((pred == requested).mean()), "per_label": per}


def image_metrics(
    feats_real: torch.Tensor, feats_fake: torch.Tensor, k: int = 3, kid_subsets: int = 100, seed: int = 0
) -> dict[str, float]:
    """FD, KID (mean, std) and precision/recall between two feature sets, in one dict.

    KID subsets hold half the smaller set (at most 1000), so the std says something even when
    only a few hundred samples are compared.
    """
    size = min(1000, max(2, min(len(feats_real), len(feats_fake)) // 2))
    kid_mean, kid_std = kid(feats_real, feats_fake, subsets=kid_subsets, subset_size=size, seed=seed)
    precision, recall = precision_recall(feats_real, feats_fake, k=k)
    return {
        "fd": frechet_distance(feats_real, feats_fake),
        "kid": kid_mean,
        "kid_std": kid_std,
        "precision": precision,
        "recall": recall,
    }


__all__ = [
    "CopyCheck",
    "FeatureTrainConfig",
    "as_float_images",
    "check_same_shape",
    "conditional_accuracy",
    "copy_grid",
    "extract_features",
    "feature_classifier",
    "frechet_distance",
    "frechet_distance_from_stats",
    "gaussian_stats",
    "image_metrics",
    "kid",
    "knn_radii",
    "nearest_neighbour_copy_check",
    "nearest_neighbours",
    "poly_mmd2",
    "precision_recall",
]

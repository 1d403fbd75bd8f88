"""Tune an image model on feedback: reward-weighted fine-tuning (RWR) on the liked samples.

The method (`method="rwr"`) is reward-weighted regression (Peters & Schaal 2007) as Lee et al.
2023 ("Aligning Text-to-Image Models using Human Feedback") apply it to diffusion models: the
model's own generations that people liked become training images for the standard denoising
loss, each weighted by its rating, and a share of every batch stays original training data so
the model does not collapse onto the few liked images.

1. Feedback: every rated image generation of the model (any version) in the store; its PNG comes
   from the content-addressed blob folder. Weight = (mean rating on the 1-5 star scale - 3) / 2,
   clipped to [0, 1]: a thumb up (5) = 1, 4 stars = 0.5, a thumb down, 3 stars or less = 0.
   Disliked images get weight 0 rather than a negative one: a negative weight on a likelihood
   loss pushes the model away from *everything* near the image (unbounded, the known failure of
   "unlikelihood" on diffusion); with RWR the dislikes act only by their absence. A rated row
   that another model made (its version dir now holds other weights than its `model_hash`, another
   image size, a label outside the classes) refuses the tuning (`tune.on_mismatch=skip` drops it).
2. Condition: each liked image is trained on the condition it was generated with: the null label
   when it was sampled without a class (guidance 0 or no label: the unconditional model inside a
   class-conditional one), else its label; an unconditional model has none.
3. Batches: `tune.liked_fraction` of each batch are liked images, drawn in proportion to their
   weights (importance sampling of the reward-weighted loss, so the loss itself stays
   `diffusion_loss`); the rest are original training images with their labels and label dropout.
4. The loop is the image Trainer driving `DiffusionTask` (EMA, checkpoints, samples, diffusers
   export): the run starts from the model's weights, and the result is a full run directory that
   `ImageGenerator.load` and the server load, built in a staging dir and moved into place at the
   end (the next version of the model when the CLI picks `DIR/name/N+1`).
5. Report: held-out denoising loss on the original data before/after (publishing is refused when
   it grows by more than `tune.max_loss_increase`), and the preferred property's share before and
   after on `tune.eval_samples` images drawn with the feedback's parameters and the same seeds:
   the scorer `tune.scorer`, by default `digit:K@DATA` where K is the class the feature
   classifier sees most often among the liked images. Written as `tune-report.json|.md` and
   `tune-samples.png` (before | after) in the new run.
"""

from __future__ import annotations

import io
import math
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aigc.data.images import PreparedImages
from aigc.errors import AigcError
from aigc.models.diffusion import DiffusionConfig, diffusion_loss
from aigc.training.config import TrainConfig
from aigc.training.image_tasks import DiffusionTask
from aigc.training.task import Context
from aigc.utils.paths import hide_host_paths

METHODS = ("rwr",)
REFUSED_METHODS = {"dpo", "kto", "sft"}  # text methods: a clear refusal rather than "unknown"
REPORT = "tune-report.json"


# ============================================================================ config


@dataclass
class TuneSettings:
    """The `tune` table of an image tuning run (`--set tune.liked_fraction=0.5`)."""

    liked_fraction: float = 0.5  # share of every batch drawn from the liked images (rest: original data)
    min_liked: int = 16  # fewer liked images than this: refuse (a handful only teaches copies)
    data: str | None = None  # original training data (default: the run's data.dir)
    eval_samples: int = 400  # images generated before and after for the report; 0 = no share figures
    eval_seed: int = 0
    scorer: str | None = None  # scorer spec for the report; None = digit:K@DATA (K from the liked images)
    max_loss_increase: float = 0.5  # held-out loss may grow by this fraction; more: nothing is published
    model_name: str | None = None  # the store's name of the model (default: from the directory)
    on_mismatch: str = "error"  # a rated image another model made: error | skip

    def __post_init__(self) -> None:
        if not 0 < self.liked_fraction <= 1:
            raise ValueError(f"liked_fraction must be in (0, 1], got {self.liked_fraction}")
        if self.min_liked < 1:
            raise ValueError(f"min_liked must be >= 1, got {self.min_liked}")
        if self.eval_samples < 0:
            raise ValueError(f"eval_samples must be >= 0 (0 = skip), got {self.eval_samples}")
        if self.on_mismatch not in ("error", "skip"):
            raise ValueError(f"on_mismatch must be error or skip, got {self.on_mismatch!r}")
        if self.max_loss_increase <= 0:
            raise ValueError(f"max_loss_increase must be > 0, got {self.max_loss_increase}")


@dataclass
class ImageTuneConfig:
    train: TrainConfig = field(default_factory=TrainConfig)
    tune: TuneSettings = field(default_factory=TuneSettings)


# fine-tuning defaults over the base run's own train table (batch size, precision, device, seed stay)
TRAIN_DEFAULTS: dict[str, Any] = {
    "lr": 3e-4,
    "min_lr_ratio": 0.1,
    "warmup_steps": 10,
    "weight_decay": 0.0,
    "max_steps": 300,
    "max_time": None,
    "eval_interval": 100,
    "eval_batches": 4,
    "early_stop_patience": 0,
    "ckpt_interval": 0,
    "log_interval": 10,
}


def resolve_tune_config(
    base_train: dict[str, Any], overrides: list[str] | None, max_steps: int | None, max_time: float | None
) -> ImageTuneConfig:
    """base run's train table -> TRAIN_DEFAULTS -> overrides -> --max-steps/--max-time, strictly."""
    from aigc.config import from_dict, merge, parse_overrides, valid_keys

    known = set(valid_keys(TrainConfig))
    train = {k: v for k, v in base_train.items() if k in known}
    raw: dict[str, Any] = {"train": {**train, **TRAIN_DEFAULTS}}
    raw = merge(raw, parse_overrides(overrides))
    if max_time is not None:
        raw["train"]["max_time"] = max_time
        if max_steps is None and not any(
            o.removeprefix("--").startswith("train.max_steps") for o in overrides or []
        ):
            raw["train"]["max_steps"] = None  # the clock alone ends the run
    if max_steps is not None:
        raw["train"]["max_steps"] = max_steps
    return from_dict(ImageTuneConfig, raw)


# ============================================================================ feedback


@dataclass
class LikedImages:
    """The fine-tuning set: liked images, the condition each was made with, and their weights."""

    images: torch.Tensor  # uint8 (L, C, H, W)
    labels: torch.Tensor  # int64 (L): class, the null label, or 0 for an unconditional model
    weights: torch.Tensor  # float (L) in (0, 1]
    ids: list[int]  # generation ids
    params: list[dict[str, Any]]  # the generation parameters (for the report's sampling)
    counts: dict[str, int]  # rated, liked, disliked, missing blobs, ... (for the report)


def rating_weight(rating: float | None) -> float:
    """Mean rating on the 1-5 star scale (thumb up = 5, down = 1) -> RWR weight in [0, 1]."""
    if rating is None or not math.isfinite(rating):
        return 0.0
    return min(1.0, max(0.0, (float(rating) - 3.0) / 2.0))


class FeedbackMismatch(AigcError):
    """A rated generation that another model made (other weights, size or classes)."""


def _all_image_rows(store: Any) -> list[dict[str, Any]]:
    rows, before = [], None
    while True:
        page = store.list_generations(kind="image", limit=1000, before=before)
        rows.extend(page["data"])
        if not page["has_more"]:
            return rows
        before = page["last_id"]


def _condition(params: dict[str, Any], cfg: DiffusionConfig, name: str, gid: int) -> int:
    """The class index a generation was made with: the null label when it was unguided."""
    label, guidance = params.get("label"), params.get("guidance")
    if cfg.num_classes == 0:
        if label is not None:
            raise FeedbackMismatch(
                f"generation {gid} of {name} was made with label {label!r}, but the model is unconditional: "
                "the feedback comes from a different model under the same name; tune the model that made it"
            )
        return 0
    if label is None or guidance == 0:
        return cfg.null_label
    try:
        k = int(label)
    except (TypeError, ValueError):
        k = -1
    if not 0 <= k < cfg.num_classes:
        raise FeedbackMismatch(
            f"generation {gid} of {name} has label {label!r}, outside the model's classes 0..{cfg.num_classes - 1}: "
            "the feedback comes from a different model under the same name; tune the model that made it"
        )
    return k


def _decode_png(data: bytes, shape: tuple[int, int, int], name: str, gid: int) -> np.ndarray:
    """PNG bytes -> uint8 (C, H, W), refusing a size or channel count the model does not make."""
    from PIL import Image

    c, h, w = shape
    with Image.open(io.BytesIO(data)) as im:
        got = (len(im.getbands()), im.size[1], im.size[0])
        if got[1:] != (h, w) or (got[0] != c and not (c == 1 and im.mode in ("L", "LA", "P"))):
            raise FeedbackMismatch(
                f"generation {gid} of {name} is a {got[0]}x{got[1]}x{got[2]} image but the model makes "
                f"{c}x{h}x{w}: the feedback comes from a different model under the same name; "
                "tune the model that made it (or set tune.model_name)"
            )
        a = np.asarray(im.convert("L" if c == 1 else "RGB"))  # (H, W) or (H, W, 3)
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


def _check_weights(row: dict[str, Any], model_dir: Path | None, hashes: dict[str, str | None]) -> None:
    """Refuse a generation whose `name@version` directory now holds other weights than made it."""
    from aigc.tuning.versions import weights_hash

    if model_dir is None or not row.get("model_hash"):
        return
    _, _, version = row["model"].partition("@")
    source = model_dir.parent / version if version else model_dir
    if not (source / "model.safetensors").is_file():
        return  # an old version no longer on disk: its liked images are still examples of what people like
    key = str(source)
    if key not in hashes:
        hashes[key] = weights_hash(source)
    if hashes[key] != row["model_hash"]:
        raise FeedbackMismatch(
            f"generation {row['id']} of {row['model']} was made by weights {row['model_hash']}, but {source} "
            f"now holds {hashes[key]}: the feedback is for a different model under the same name"
        )


def liked_images(
    store: Any,
    name: str,
    cfg: DiffusionConfig,
    blobs: Any,
    min_liked: int,
    model_dir: Path | None = None,
    on_mismatch: str = "error",
) -> LikedImages:
    """The rated image generations of model `name` (any version) as an RWR fine-tuning set.

    Every rated row is checked against the model (weights hash of its version dir when that is
    on disk beside `model_dir`, image size and channels, labels): `on_mismatch="error"` refuses
    the tuning, `"skip"` drops the row and counts it.
    """
    from aigc.feedback.store import NotFoundError

    if on_mismatch not in ("error", "skip"):
        raise AigcError(f"tune.on_mismatch must be error or skip, got {on_mismatch!r}")
    rows = _all_image_rows(store)
    mine = [r for r in rows if r["model"] == name or r["model"].startswith(name + "@")]
    rated = [r for r in mine if r.get("rating_count") and r.get("output_ref")]
    if not rated:
        others = sorted({r["model"] for r in rows if r.get("rating_count")} - {r["model"] for r in mine})
        where = f"; the store has rated images of: {', '.join(others[:10])}" if others else ""
        raise AigcError(
            f"no rated image generations of model {name!r} in the store{where}. Feedback of another model "
            f"cannot tune this one: rate images that {name} made (studio, POST /v1/ratings, "
            "`aigc simulate-feedback`), or tune the model the feedback is for"
        )
    shape = (cfg.in_channels, cfg.image_size, cfg.image_size)
    images, labels, weights, ids, params = [], [], [], [], []
    missing = disliked = mismatched = 0
    hashes: dict[str, str | None] = {}
    for r in rated:
        w = rating_weight(r.get("rating"))
        try:  # every rated row is checked, liked or not: a foreign one says the store is mixed up
            _check_weights(r, model_dir, hashes)
            cond = _condition(r.get("params") or {}, cfg, name, r["id"])
            if w <= 0:
                disliked += 1
                continue
            try:
                data = blobs.get(r["output_ref"])
            except NotFoundError:
                missing += 1  # the output folder was cleaned: nothing to train on
                continue
            image = _decode_png(data, shape, name, r["id"])
        except FeedbackMismatch as e:
            if on_mismatch == "error":
                raise FeedbackMismatch(
                    f"{e}; tune the model that made it, or --set tune.on_mismatch=skip"
                ) from None
            mismatched += 1
            continue
        images.append(image)
        labels.append(cond)
        weights.append(w)
        ids.append(r["id"])
        params.append(r.get("params") or {})
    counts = {"image_generations": len(mine), "rated": len(rated), "liked": len(images),
              "disliked_or_neutral": disliked, "missing_blobs": missing, "mismatched": mismatched}  # fmt: skip
    if len(images) < min_liked:
        lost = f", {missing} more whose PNGs are gone from {blobs.root}" if missing else ""
        lost += f", {mismatched} of other models skipped" if mismatched else ""
        raise AigcError(
            f"too little feedback to tune {name}: {len(images)} liked images (of {len(rated)} rated{lost}); "
            f"rwr needs at least {min_liked} (tune.min_liked). Rate more of its images with a thumb up "
            "(studio, POST /v1/ratings, `aigc simulate-feedback`) and run aigc tune again"
        )
    return LikedImages(
        torch.from_numpy(np.stack(images)), torch.tensor(labels, dtype=torch.long),
        torch.tensor(weights, dtype=torch.float), ids, params, counts,
    )  # fmt: skip


# ============================================================================ the task


class RWRDiffusionTask(DiffusionTask):
    """DiffusionTask whose batches mix weighted liked images into the original data."""

    def __init__(
        self,
        cfg: DiffusionConfig,
        data: PreparedImages,
        train: TrainConfig,
        liked: LikedImages,
        fraction: float,
    ) -> None:
        super().__init__(cfg, data, train)
        self.liked = liked
        self.fraction = fraction
        self.tune_card = ""

    def next_batch(self, ctx: Context) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's slice of a global batch: k liked rows, then b - k original ones."""
        b = ctx.cfg.batch_size
        k = b if self.train_count == 0 else min(b, max(1, round(b * self.fraction)))
        # 1. liked images, drawn in proportion to their rating weights (RWR by importance sampling)
        li = torch.multinomial(self.liked.weights, k, replacement=True, generator=self.gen)  # (k)
        # 2. original training images (the held-out tail excluded), with their own labels
        di = torch.randint(0, max(1, self.train_count), (b - k,), generator=self.gen)  # (b - k)
        flips = torch.rand(b, generator=self.gen) < 0.5
        x = self._to_float(torch.cat([self.liked.images[li], self.images[di]]))  # (b, C, H, W)
        y = torch.cat([self.liked.labels[li], self.labels[di]])  # (b)
        if self.flip:
            x = torch.where(flips[:, None, None, None], x.flip(-1), x)
        rows = ctx.rank_slice(b)
        x = x[rows].to(ctx.device, non_blocking=True)
        return x, y[rows].to(ctx.device)

    def eval(self, ctx: Context) -> dict[str, float]:
        """Held-out loss on the original data as `data_val_loss`, denoising loss on the liked set.

        Not `val_loss`: the Trainer keeps the weights with the lowest val_loss, but tuning is meant
        to move away from the original data, so every evaluation's weights are kept (the last wins).
        """
        out = {}
        base = super().eval(ctx)
        if "val_loss" in base:
            out["data_val_loss"] = base["val_loss"]
        unet = self._ema_model(ctx.device)
        g = torch.Generator(device=ctx.device).manual_seed(0)
        n = min(len(self.liked.images), ctx.cfg.batch_size)
        x = self._to_float(self.liked.images[:n]).to(ctx.device)
        with ctx.autocast():
            loss = diffusion_loss(unet, self.noise, x, self._labels(self.liked.labels[:n].to(ctx.device)),
                                  self.cfg, generator=g)  # fmt: skip
        out["liked_loss"] = ctx.mean(float(loss))
        return out

    def card(self) -> dict[str, str]:
        return {**super().card(), "Tuning": self.tune_card}


# ============================================================================ report


def _as_uint8(images: list) -> np.ndarray:
    a = np.stack([np.asarray(im) for im in images])
    return a[:, None] if a.ndim == 3 else a.transpose(0, 3, 1, 2)  # (N, C, H, W)


def _sampling_params(liked: LikedImages, cfg: DiffusionConfig) -> dict[str, Any]:
    """The generate() arguments most of the liked images were made with (label/guidance/sampler/steps)."""
    keys = []
    for p in liked.params:
        unguided = cfg.num_classes and (p.get("label") is None or p.get("guidance") == 0)
        label = None if (unguided or not cfg.num_classes) else p.get("label")
        guidance = (0.0 if unguided else p.get("guidance")) if cfg.num_classes else None
        keys.append((label, guidance, p.get("sampler"), p.get("steps")))
    label, guidance, sampler, steps = Counter(keys).most_common(1)[0][0]
    return {"label": label, "guidance": guidance, "sampler": sampler, "steps": steps}


def _class_histogram(images: np.ndarray, data: PreparedImages) -> tuple[list[int], dict[str, Any]]:
    """Predicted class per image under the data set's (cached) feature classifier."""
    from aigc.evaluation.images import feature_classifier, predict_labels

    model, info = feature_classifier(data.images, data.labels)
    return predict_labels(model, images).tolist(), info


def _share(scores: list[float]) -> float:
    return float(np.mean([s >= 0.5 for s in scores])) if scores else float("nan")


def _grid_png(before: list, after: list, path: Path, n: int = 64) -> Path:
    """before | after sample grids side by side (x2 nearest), one PNG."""
    from PIL import Image

    from aigc.generation.image_io import make_grid, upscale
    from aigc.utils.io import atomic_write

    a, b = (upscale(make_grid(imgs[:n], nrow=8), 2).convert("RGB") for imgs in (before, after))
    canvas = Image.new("RGB", (a.width + b.width + 16, max(a.height, b.height)), (255, 255, 255))
    canvas.paste(a, (0, 0))
    canvas.paste(b, (a.width + 16, 0))
    return atomic_write(path, lambda p: canvas.save(p, format="PNG"))


def share_report(
    base_dir: Path,
    tuned_dir: Path,
    liked: LikedImages,
    data: PreparedImages,
    data_dir: Path,
    settings: TuneSettings,
) -> dict[str, Any]:
    """Preferred-property share before/after on the same seeds, and the sample grid."""
    from aigc.evaluation.scorers import load_scorer
    from aigc.generation.image import ImageGenerator

    base, tuned = ImageGenerator.load(base_dir), ImageGenerator.load(tuned_dir)
    kwargs = _sampling_params(liked, base.config)
    n, seed = settings.eval_samples, settings.eval_seed
    before = base.generate(n=n, seed=seed, **kwargs).images
    after = tuned.generate(n=n, seed=seed, **kwargs).images
    out: dict[str, Any] = {"samples": n, "seed": seed, "sampling": kwargs}
    spec = settings.scorer
    if data.meta.get("num_classes", 0) >= 2:
        liked_cls, info = _class_histogram(liked.images.numpy(), data)
        k = Counter(liked_cls).most_common(1)[0][0]
        classes = data.meta.get("classes") or []
        cls_before, _ = _class_histogram(_as_uint8(before), data)
        cls_after, _ = _class_histogram(_as_uint8(after), data)
        nk = data.meta["num_classes"]
        out["classes"] = {
            "preferred": classes[k] if k < len(classes) else str(k),
            "liked_histogram": [liked_cls.count(c) for c in range(nk)],
            "before_histogram": [cls_before.count(c) for c in range(nk)],
            "after_histogram": [cls_after.count(c) for c in range(nk)],
            "classifier_test_accuracy": info["test_accuracy"],
        }
        spec = spec or f"digit:{k}@{data_dir}"
    if spec:
        scorer = load_scorer(spec)
        if scorer.kind != "image":
            raise AigcError(
                f"tune.scorer {spec!r} scores {scorer.kind}; an image model needs an image scorer"
            )
        sb, sa = scorer.score(before), scorer.score(after)
        out.update(scorer=spec, score_before=float(np.mean(sb)), score_after=float(np.mean(sa)),
                   share_before=_share(sb), share_after=_share(sa))  # fmt: skip
        out["share_gain_points"] = 100 * (out["share_after"] - out["share_before"])
    _grid_png(before, after, tuned_dir / "tune-samples.png")
    return out


def _num(v: float | None) -> str:
    return "n/a (data too small to hold images out)" if v is None else f"{v:.4f}"


def write_report(run_dir: Path, report: dict[str, Any]) -> None:
    """tune-report.json + a short tune-report.md beside the tuned weights."""
    from aigc.utils.io import atomic_write_json, atomic_write_text

    atomic_write_json(run_dir / REPORT, report)
    c, ev = report["feedback"], report.get("eval", {})
    lines = [
        f"# Tuning report: {report['model']} -> {Path(report['run']).name}",
        "",
        f"Method: {report['method']} (reward-weighted fine-tuning on liked samples), {report['steps']} steps, "
        f"{report['elapsed_s']:.0f} s.",
        f"Feedback: {c['liked']} liked of {c['rated']} rated image generations "
        f"({c['disliked_or_neutral']} disliked/neutral, weight 0; {c['missing_blobs']} missing PNGs; "
        f"{c['mismatched']} of other models skipped).",
        f"Held-out denoising loss on the original data: {_num(report['heldout_loss_before'])} -> "
        f"{_num(report['heldout_loss_after'])}.",
    ]
    if "share_before" in ev:
        lines.append(
            f"Preferred share ({ev['scorer']}, {ev['samples']} samples, same seeds): "
            f"{100 * ev['share_before']:.1f}% -> {100 * ev['share_after']:.1f}% "
            f"({ev['share_gain_points']:+.1f} points); mean score {ev['score_before']:.3f} -> {ev['score_after']:.3f}."
        )
    if "classes" in ev:
        h = ev["classes"]
        lines += ["", "| class | liked | before | after |", "|---|---|---|---|"]
        lines += [f"| {i} | {a} | {b} | {d} |" for i, (a, b, d) in
                  enumerate(zip(h["liked_histogram"], h["before_histogram"], h["after_histogram"], strict=True))]  # fmt: skip
    if (run_dir / "tune-samples.png").is_file():
        lines += ["", "Samples before (left) and after (right): ![samples](tune-samples.png)"]
    atomic_write_text(run_dir / "tune-report.md", "\n".join(lines) + "\n")


# ============================================================================ entry point


def _heldout_loss(task: DiffusionTask, cfg: TrainConfig) -> float | None:
    """The task's fixed-noise held-out loss in fp32 on the CPU (comparable before and after)."""
    ctx = Context(cfg, torch.device("cpu"), {}, {})
    with torch.no_grad():
        return DiffusionTask.eval(task, ctx).get("val_loss")


def _open_store(store: Any) -> Any:
    if store is None or isinstance(store, (str, Path)):
        from aigc.feedback.store import Store

        return Store.open(None if store is None else str(store))
    return store


def tune_images(
    model_dir: Path,
    out_dir: Path,
    *,
    store: Any,
    method: str | None = "rwr",
    overrides: list[str] | None = None,
    max_steps: int | None = None,
    max_time: float | None = None,
    overwrite: bool = False,
    progress: bool = True,
    blobs_dir: str | Path | None = None,
    log: Any = None,
) -> dict[str, Any]:
    """Fine-tune a diffusion run on its liked generations; write the new run to `out_dir`.

    `store`: a `Store` (or a URL / None for the default one); `blobs_dir`: the output folder the
    images live in (default `$AIGC_HOME/outputs`, as the server's). Returns the report dict (also
    written as `out_dir/tune-report.json`).
    """
    from safetensors.torch import load_file

    from aigc.config import from_dict
    from aigc.data.images import load_prepared_images
    from aigc.feedback.blobs import Blobs
    from aigc.training.trainer import Trainer, seed_everything
    from aigc.tuning.versions import model_id
    from aigc.utils.io import prepare_out_dir, read_json, staging_dir

    log = log or (lambda msg: None)
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    method = method or "rwr"
    if method in REFUSED_METHODS:
        raise AigcError(
            f"method {method!r} is not supported for images; use rwr (reward-weighted fine-tuning)"
        )
    if method not in METHODS:
        raise AigcError(f"unknown method {method!r} for images; allowed: {', '.join(METHODS)}")
    if not (model_dir / "config.json").is_file():
        raise AigcError(f"{model_dir} is not a model directory (no config.json); pass a diffusion run")
    run_cfg = read_json(model_dir / "config.json")
    family = run_cfg.get("family")
    if family in ("vae", "gan"):
        raise AigcError(
            f"{model_dir} is a {family} run: tuning on feedback is not supported for {family} models; "
            "use a diffusion run (aigc train diffusion)"
        )
    if family != "diffusion":
        raise AigcError(f"{model_dir} holds a {family!r} model; tune_images takes diffusion runs")
    if out_dir.resolve() == model_dir.resolve():
        raise AigcError(
            f"--out {out_dir} is the model being tuned; choose a new directory (the next version)"
        )
    prepare_out_dir(out_dir, overwrite=overwrite)
    if not (model_dir / "model.safetensors").is_file():
        raise AigcError(f"{model_dir} has no model.safetensors; the run did not finish a checkpoint")

    tcfg = resolve_tune_config(run_cfg.get("train") or {}, overrides, max_steps, max_time)
    settings = tcfg.tune
    mcfg = from_dict(DiffusionConfig, run_cfg["model"], prefix="model.")
    name = settings.model_name or model_id(model_dir)[0]  # outputs are recorded as name@version

    # 1. the fine-tuning set, from the store and the blob folder
    own_store = not hasattr(store, "list_generations")
    store = _open_store(store)
    try:
        liked = liked_images(
            store, name, mcfg, Blobs(blobs_dir), settings.min_liked, model_dir, settings.on_mismatch
        )
    finally:
        if own_store:
            store.close()
    log(f"tune: {liked.counts['liked']} liked of {liked.counts['rated']} rated images of {name}")

    # 2. the original data it is mixed with
    data_dir = Path(settings.data or (run_cfg.get("data") or {}).get("dir") or "")
    if not (data_dir / "images.safetensors").is_file():
        raise AigcError(
            f"the run's training data {str(data_dir) or '(not recorded)'} is not a prepared image directory; "
            "rwr mixes it into every batch to avoid collapse: pass --set tune.data=DIR (the data it was trained on)"
        )
    data = load_prepared_images(data_dir)
    if list(data.meta["shape"]) != [mcfg.in_channels, mcfg.image_size, mcfg.image_size]:
        raise AigcError(
            f"tune.data {data_dir} holds {data.meta['shape']} images but the model makes "
            f"{[mcfg.in_channels, mcfg.image_size, mcfg.image_size]}; pass the data it was trained on"
        )

    # 3. the task, starting from the model's (EMA) weights with a fresh EMA
    seed_everything(tcfg.train.seed)
    task = RWRDiffusionTask(mcfg, data, tcfg.train, liked, settings.liked_fraction)
    weights = load_file(str(model_dir / "model.safetensors"))
    task.unet.load_state_dict(weights)
    task.ema.shadow = {k: v.detach().clone().float() for k, v in task.unet.state_dict().items()}
    before_loss = _heldout_loss(task, tcfg.train)
    base_where = hide_host_paths(str(model_dir))  # its folder's name only: a card is shown and shared
    task.tune_card = (
        f"Tuned from `{base_where}` on {liked.counts['liked']} liked generations of `{name}` "
        f"(method rwr, liked_fraction {settings.liked_fraction}); see [tune-report.md](tune-report.md)."
    )
    # the base run's config with the tuning's train table; data stays the original (eval, next tuning)
    config = {
        **run_cfg,
        "train": _plain(tcfg.train),
        "data": {**(run_cfg.get("data") or {}), "dir": str(data_dir)},
        "tuned_from": {"path": str(model_dir), "model": name, "method": method,
                       "tune": _plain(settings), "feedback": liked.counts},
    }  # fmt: skip

    # 4. train in a staging dir beside out_dir; publish only a finished, checked run
    stage = staging_dir(out_dir)
    try:
        result = Trainer(task, tcfg.train, stage, config, progress=progress, log=log).fit()
        shutil.rmtree(stage / "checkpoints", ignore_errors=True)  # a tuned version is not resumable
        after_loss = _heldout_loss(task, tcfg.train)
        if before_loss and after_loss and after_loss > before_loss * (1 + settings.max_loss_increase):
            raise AigcError(
                f"tuning raised the held-out denoising loss from {before_loss:.4f} to {after_loss:.4f} "
                f"(+{100 * (after_loss / before_loss - 1):.0f}%, limit +{100 * settings.max_loss_increase:.0f}%): "
                f"nothing was published and {model_dir} stays current; lower train.lr or tune.liked_fraction, "
                "or raise tune.max_loss_increase"
            )
        report: dict[str, Any] = {
            "kind": "images", "method": method, "model": name, "base": str(model_dir), "run": str(out_dir),
            "steps": result.steps, "elapsed_s": round(result.elapsed, 2), "stopped": result.stopped,
            "feedback": liked.counts, "liked_ids": liked.ids,
            "heldout_loss_before": before_loss, "heldout_loss_after": after_loss,
            "config": {"train": _plain(tcfg.train), "tune": _plain(settings)},
        }  # fmt: skip
        if settings.eval_samples:
            log(f"tune: generating {settings.eval_samples} images before/after for the report")
            report["eval"] = share_report(model_dir, stage, liked, data, data_dir, settings)
        write_report(stage, report)
        _publish(stage, out_dir)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return report


def _plain(cfg: Any) -> dict[str, Any]:
    from aigc.config import to_dict

    return to_dict(cfg)


def _publish(stage: Path, out_dir: Path) -> None:
    """Move the finished run into place: a new directory in one rename (`versions.publish_version`),
    an existing one (empty, or --overwrite) replaced only now."""
    from aigc.utils.io import commit_dir

    if out_dir.exists():
        commit_dir(stage, out_dir)
        return
    from aigc.tuning.versions import publish_version

    publish_version(stage, out_dir)


__all__ = [
    "METHODS",
    "ImageTuneConfig",
    "FeedbackMismatch",
    "LikedImages",
    "RWRDiffusionTask",
    "TuneSettings",
    "liked_images",
    "rating_weight",
    "resolve_tune_config",
    "tune_images",
]

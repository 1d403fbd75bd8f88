"""Tuning an image model on feedback (aigc.tuning.images): RWR on liked generations -> a new version."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from aigc.data.images import prepare_images
from aigc.errors import AigcError
from aigc.feedback.blobs import Blobs
from aigc.feedback.store import Store
from aigc.generation.image import ImageGenerator
from aigc.training.image_tasks import train_image
from aigc.tuning.images import RWRDiffusionTask, liked_images, rating_weight, resolve_tune_config, tune_images

TINY = [
    "model.block_out_channels=[8,16]",
    "model.attention_levels=[1]",
    "model.norm_num_groups=4",
    "model.steps=2",
]
FAST = ["train.batch_size=8", "train.eval_batches=1", "tune.eval_samples=0", "tune.min_liked=6"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """Prepared 8x8 digits and a tiny class-conditional diffusion run at models/digits/1."""
    root = tmp_path_factory.mktemp("tune-images")
    prepare_images("digits", root / "data", overrides=["size=8", "limit=120"])
    run = root / "models" / "digits" / "1"
    train_image("diffusion", root / "data", run, preset="tiny", progress=False,
                overrides=[*TINY, "conditional=true", "train.batch_size=8", "train.eval_batches=1",
                           "train.max_steps=2", "train.warmup_steps=1"])  # fmt: skip
    return root, run


def _png(image, params) -> bytes:
    from aigc.generation.image_io import png_info

    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=png_info(params))
    return buf.getvalue()


def _fill(store, blobs, run, model="digits@1", likes=8, dislikes=4, guidance=0.0, seed=0, model_hash=None):
    """Record generations as the server does (PNG blob + row + weights hash), thumbs up on the first `likes`."""
    from aigc.tuning.versions import weights_hash

    out = ImageGenerator.load(run).generate(n=likes + dislikes, seed=seed, guidance=guidance, steps=2)
    model_hash = model_hash or weights_hash(run)
    ids = []
    for i, (img, p) in enumerate(zip(out.images, out.params, strict=True)):
        ref = blobs.put(_png(img, p), "png")
        gid = store.add_generation(kind="image", model=model, prompt="", params=p, seed=seed, output_ref=ref,
                                   model_hash=model_hash)  # fmt: skip
        store.add_rating(gid, 1 if i < likes else -1)
        ids.append(gid)
    return ids


@pytest.fixture
def feedback(tmp_path):
    store = Store.open(str(tmp_path / "aigc.db"))
    yield store, Blobs(tmp_path / "outputs")
    store.close()


def test_rating_weights():
    assert rating_weight(5.0) == 1.0  # thumb up
    assert rating_weight(4.0) == 0.5  # 4 stars
    assert rating_weight(1.0) == 0.0 and rating_weight(3.0) == 0.0  # thumb down, neutral: not trained on
    assert rating_weight(None) == 0.0


def test_tune_publishes_a_loadable_version(base, feedback, tmp_path):
    root, run = base
    store, blobs = feedback
    _fill(store, blobs, run)
    out = run.parent / "2"
    report = tune_images(run, out, store=store, method="rwr", overrides=FAST, max_steps=3, max_time=None,
                         overwrite=False, progress=False, blobs_dir=blobs.root)  # fmt: skip
    assert report["steps"] == 3 and report["model"] == "digits"
    assert report["feedback"]["liked"] == 8 and report["feedback"]["disliked_or_neutral"] == 4
    assert report["heldout_loss_before"] > 0 and report["heldout_loss_after"] > 0
    # a full run directory: the generator and the diffusers export load it
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["family"] == "diffusion" and cfg["tuned_from"]["path"] == str(run)
    assert cfg["data"]["dir"] == str(root / "data") and cfg["model"]["num_classes"] == 10
    assert (out / "tune-report.json").is_file() and (out / "tune-report.md").is_file()
    assert (out / "diffusers" / "model_index.json").is_file() and not (out / "checkpoints").exists()
    gen = ImageGenerator.load(out)
    assert gen.generate(n=2, seed=0, guidance=0.0, steps=2).images[0].size == (8, 8)
    # the weights moved away from the base run's
    a, b = load_file(str(run / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert a.keys() == b.keys() and any(not torch.equal(a[k], b[k]) for k in a)
    # no staging leftovers beside the new version
    assert sorted(p.name for p in run.parent.iterdir()) == ["1", "2"]
    # a second tune into the same directory is refused without --overwrite
    with pytest.raises(AigcError, match="not empty"):
        tune_images(run, out, store=store, overrides=FAST, max_steps=1, progress=False, blobs_dir=blobs.root)


def test_batches_mix_liked_images_with_their_condition(base, feedback):
    root, run = base
    store, blobs = feedback
    _fill(store, blobs, run, likes=6, dislikes=2)
    _fill(store, blobs, run, likes=2, dislikes=0, guidance=3.0, seed=1)  # guided: trained on its label
    gen = ImageGenerator.load(run)
    liked = liked_images(store, "digits", gen.config, blobs, min_liked=1, model_dir=run)
    assert len(liked.ids) == 8 and liked.weights.tolist() == [1.0] * 8
    null = gen.config.null_label
    assert sorted(liked.labels.tolist()).count(null) == 6  # unguided -> the null label
    guided = [lab for lab in liked.labels.tolist() if lab != null]
    assert sorted(guided) == [0, 1]  # labels cycle 0, 1 in that request
    from aigc.data.images import load_prepared_images
    from aigc.training.task import Context

    cfg = resolve_tune_config({}, ["train.batch_size=8", "train.device=cpu"], None, None)
    task = RWRDiffusionTask(gen.config, load_prepared_images(root / "data"), cfg.train, liked, 0.5)
    ctx = Context(cfg.train, torch.device("cpu"), {}, {})
    x, y = task.next_batch(ctx)
    assert x.shape == (8, 1, 8, 8) and y.shape == (8,)
    liked_f = task._to_float(liked.images)  # (L, 1, 8, 8)
    for i in range(4):  # first half: liked images, with the condition they were made with
        j = next(j for j in range(len(liked_f)) if torch.equal(liked_f[j], x[i]))
        assert y[i] == liked.labels[j]
    assert all(int(v) < null for v in y[4:])  # second half: original data with its class labels


def test_too_little_feedback(base, feedback, tmp_path):
    _, run = base
    store, blobs = feedback
    _fill(store, blobs, run, likes=3, dislikes=5)
    with pytest.raises(AigcError, match=r"too little feedback.*3 liked images \(of 8 rated\).*at least 16"):
        tune_images(run, tmp_path / "out", store=store, overrides=[], progress=False, blobs_dir=blobs.root)
    assert not (tmp_path / "out").exists()


def test_refuses_feedback_of_another_model(base, feedback, tmp_path):
    _, run = base
    store, blobs = feedback
    _fill(store, blobs, run, model="faces@3")
    with pytest.raises(AigcError, match=r"no rated image generations of model 'digits'.*faces@3"):
        tune_images(run, tmp_path / "out", store=store, overrides=FAST, progress=False, blobs_dir=blobs.root)
    # same name, different model: a 16x16 RGB image recorded under digits@1
    from PIL import Image

    ref = blobs.put(_png(Image.new("RGB", (16, 16)), {}), "png")
    gid = store.add_generation(kind="image", model="digits@1", prompt="", params={}, output_ref=ref)
    store.add_rating(gid, 1)
    with pytest.raises(AigcError, match=r"3x16x16 image but the model makes 1x8x8.*tune.on_mismatch=skip"):
        tune_images(run, tmp_path / "out", store=store, overrides=FAST, progress=False, blobs_dir=blobs.root)
    # same name and version, other weights (the run was replaced in place after these were rated)
    _fill(store, blobs, run, likes=2, dislikes=1, seed=5, model_hash="0123456789abcdef")
    cfg = ImageGenerator.load(run).config
    with pytest.raises(AigcError, match=r"made by weights 0123456789abcdef, but .*digits/1 now holds"):
        liked_images(store, "digits", cfg, blobs, min_liked=1, model_dir=run)
    # skip instead: the 8 liked images of digits@1 remain, the 1 + 3 foreign rows are counted
    _fill(store, blobs, run, likes=8, dislikes=0, seed=9)
    liked = liked_images(store, "digits", cfg, blobs, min_liked=1, model_dir=run, on_mismatch="skip")
    assert liked.counts["liked"] == 8 and liked.counts["mismatched"] == 4


def test_refuses_methods_and_families(base, feedback, tmp_path):
    _, run = base
    store, _ = feedback
    with pytest.raises(AigcError, match="not supported for images; use rwr"):
        tune_images(run, tmp_path / "o", store=store, method="dpo", overrides=[], progress=False)
    vae = tmp_path / "vae"
    vae.mkdir()
    (vae / "config.json").write_text(json.dumps({"family": "vae", "model": {}}))
    with pytest.raises(AigcError, match="not supported for vae models; use a diffusion run"):
        tune_images(vae, tmp_path / "o", store=store, overrides=[], progress=False)
    with pytest.raises(AigcError, match="liked_fraction must be in"):
        tune_images(run, tmp_path / "o", store=store, overrides=["tune.liked_fraction=0"], progress=False)


def test_loss_blow_up_publishes_nothing(base, feedback, tmp_path):
    _, run = base
    store, blobs = feedback
    _fill(store, blobs, run)
    out = tmp_path / "models" / "digits" / "2"
    with pytest.raises(AigcError, match="held-out denoising loss .* nothing was published"):
        tune_images(run, out, store=store, overrides=[*FAST, "tune.max_loss_increase=1e-9", "train.lr=0.5"],
                    max_steps=3, progress=False, blobs_dir=blobs.root)  # fmt: skip
    assert not out.parent.exists() or not any(out.parent.iterdir())


@pytest.mark.slow
def test_report_shares_and_grid(base, feedback):
    """The report's figures: class histograms and the digit scorer's share before/after, the grid PNG."""
    root, run = base
    store, blobs = feedback
    _fill(store, blobs, run)
    out = run.parent / "3"
    report = tune_images(run, out, store=store, overrides=[*FAST, "tune.eval_samples=16"], max_steps=2,
                         progress=False, blobs_dir=blobs.root)  # fmt: skip
    ev = report["eval"]
    assert ev["samples"] == 16 and ev["sampling"]["guidance"] == 0.0 and ev["sampling"]["label"] is None
    k = ev["classes"]["preferred"]
    assert ev["scorer"] == f"digit:{k}@{root / 'data'}"
    assert sum(ev["classes"]["before_histogram"]) == 16 and sum(ev["classes"]["liked_histogram"]) == 8
    assert 0 <= ev["share_before"] <= 1 and 0 <= ev["share_after"] <= 1
    assert ev["share_gain_points"] == pytest.approx(100 * (ev["share_after"] - ev["share_before"]))
    from PIL import Image

    with Image.open(out / "tune-samples.png") as im:
        assert im.width > 2 * im.height * 0.9  # before | after side by side
    assert "Preferred share" in (out / "tune-report.md").read_text()
    assert np.isfinite(report["heldout_loss_after"])


def test_cli_tune_image_run_publishes_next_version(base, tmp_path, run_cli):
    """`aigc tune --model DIR/digits/1 --from-feedback` -> DIR/digits/2; images come from $AIGC_HOME/outputs."""
    import shutil

    _, run = base
    models = tmp_path / "models"
    shutil.copytree(run, models / "digits" / "1")
    db = tmp_path / "cli.db"
    with Store.open(str(db)) as store:
        _fill(store, Blobs(), run)  # Blobs(): the server's default folder under $AIGC_HOME
    args = ["tune", "--model", models / "digits" / "1", "--from-feedback", "--db", db]
    sets = [x for s in FAST for x in ("--set", s)]
    code, _, err = run_cli(*args, "--method", "dpo", *sets)
    assert code == 1 and "not supported for images; use rwr" in err
    code, out, err = run_cli(*args, *sets, "--max-steps", "2")
    assert code == 0, err
    assert "digits" in out and (models / "digits" / "2" / "model.safetensors").is_file()
    report = json.loads((models / "digits" / "2" / "tune-report.json").read_text())
    assert report["steps"] == 2 and report["feedback"]["liked"] == 8
    assert "with RWR" in out and "held-out loss" in out  # the figures are printed, not only the path
    code, _, err = run_cli(*args, *sets, "--preset", "loop")
    assert code == 1 and "image tuning has no presets" in err
    # the server serves it as the newest version, next to the old one
    from aigc.serve.registry import ModelRegistry
    from aigc.serve.settings import Settings

    registry = ModelRegistry(Settings(models_dirs=[models]))
    assert registry.resolve("digits").version == "2" and registry.resolve("digits@1").kind == "image"

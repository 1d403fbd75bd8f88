"""The shared Trainer and the text Task: schedule, accumulation, budgets, best weights, early stop,
NaN stop, disk-full checkpoints, a two-optimizer (GAN-shaped) task, and a smoke run per recipe."""

from __future__ import annotations

import errno
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from aigc.errors import AigcError, ConfigError
from aigc.training import Context, Task, TaskState, TrainConfig, Trainer, adamw
from aigc.training import checkpoint as ckpt
from aigc.training.metrics import read_metrics
from aigc.training.trainer import lr_factor
from aigc.utils.io import read_json
from serve_helpers import TEXT, TINY_GPT

TINY_LSTM = ["model.n_layer=1", "model.n_embd=16", "model.n_hidden=24", "model.block_size=16", *TINY_GPT[4:]]


def make_prepared(tmp_path: Path, text: str = TEXT, name: str = "data") -> Path:
    from aigc.data import prepare_text

    src = tmp_path / f"{name}.txt"
    src.write_text(text, encoding="utf-8")
    prepare_text(str(src), tmp_path / name)
    return tmp_path / name


def train(tmp_path: Path, out: str = "run", family: str = "gpt", steps: int = 4, extra=(), **kw):
    from aigc.training.text import train_text

    data = kw.pop("data", None) or make_prepared(tmp_path)
    over = [*(TINY_GPT if family == "gpt" else TINY_LSTM), *extra]
    return train_text(family, data, tmp_path / out, overrides=over, max_steps=steps, progress=False, **kw)


# ----------------------------------------------------------------------------- schedule + config


def test_lr_schedule_warmup_cosine_and_time():
    cfg = TrainConfig(lr=1.0, warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
    assert lr_factor(cfg, 1, 0) == pytest.approx(0.1)
    assert lr_factor(cfg, 10, 0) == pytest.approx(1.0)
    assert lr_factor(cfg, 60, 0) == pytest.approx(0.55)  # half-way down the cosine
    assert lr_factor(cfg, 110, 0) == pytest.approx(0.1)
    timed = TrainConfig(lr=1.0, warmup_steps=10, max_steps=None, max_time=100.0, min_lr_ratio=0.0)
    assert lr_factor(timed, 50, 50.0) == pytest.approx(0.5)  # decays by the clock
    assert lr_factor(timed, 50, 200.0) == pytest.approx(0.0)
    assert lr_factor(TrainConfig(schedule="constant"), 500, 0) == 1.0


def test_train_config_needs_a_budget():
    from aigc.config import from_dict

    with pytest.raises(ConfigError, match="set a budget"):
        from_dict(TrainConfig, {"max_steps": None})
    with pytest.raises(ConfigError, match="batch_size must be >= 1"):
        from_dict(TrainConfig, {"batch_size": 0})


def test_auto_preset_follows_the_time_budget(monkeypatch):
    from aigc.training.text import auto_preset
    from aigc.utils.compile import can_compile

    short, long = auto_preset("gpt", 90), auto_preset("gpt", 600)
    assert (short["model"]["n_embd"], short["model"]["block_size"], short["train"]["lr"]) == (128, 64, 5e-3)
    assert (long["model"]["n_embd"], long["model"]["block_size"], long["train"]["lr"]) == (192, 128, 3e-3)
    assert auto_preset("gpt", None)["train"]["max_steps"] == 3000
    # torch.compile pays only once its ~17 s first compile is small next to the budget (and needs
    # a C++ compiler on CPU: without one it stays off)
    assert long["train"].get("compile", False) is can_compile() and "compile" not in short["train"]
    assert (
        "compile" not in auto_preset("gpt", None)["train"]
        and "compile" not in auto_preset("lstm", 600)["train"]
    )
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setenv("CXX", "no-such-compiler")
    assert not can_compile() and "compile" not in auto_preset("gpt", 600)["train"]


# ----------------------------------------------------------------------------- a toy task


class Regression(Task):
    """y = 3x - 1 with a Linear; eval returns a scripted val_loss sequence when given one."""

    family = "toy"

    def __init__(self, cfg: TrainConfig, val_losses: list[float] | None = None, nan_at: int | None = None):
        torch.manual_seed(0)
        self.net = nn.Linear(1, 1)
        self.cfg, self.val_losses, self.nan_at = cfg, list(val_losses or []), nan_at
        self.gen = torch.Generator().manual_seed(cfg.seed)

    def modules(self):
        return {"model": self.net}

    def training_step(self, ctx: Context):
        x = torch.randn(self.cfg.batch_size, 1, generator=self.gen)
        loss = ((self.net(x) - (3 * x - 1)) ** 2).mean()
        if self.nan_at is not None and ctx.step_num >= self.nan_at:
            loss = loss * float("nan")
        ctx.backward(loss)
        ctx.step("model")
        return {"loss": ctx.mean(loss)}

    def eval(self, ctx):
        return {"val_loss": self.val_losses.pop(0)} if self.val_losses else {}

    def state_dict(self):
        return TaskState({"gen": self.gen.get_state()})

    def load_state_dict(self, state):
        self.gen.set_state(state.tensors["gen"])

    def artifact_tensors(self):
        return dict(self.net.state_dict())


def toy_cfg(**kw) -> TrainConfig:
    base = dict(lr=0.05, warmup_steps=0, max_steps=200, batch_size=16, eval_interval=0, ckpt_interval=0,
                log_interval=1, precision="fp32", schedule="constant")  # fmt: skip
    return TrainConfig(**{**base, **kw})


def test_trainer_fits_a_line_and_writes_the_run(tmp_path):
    cfg = toy_cfg()
    result = Trainer(Regression(cfg), cfg, tmp_path / "r", {"family": "toy"}, progress=False).fit()
    assert result.steps == 200 and result.stopped == "max_steps"
    w = load_file(tmp_path / "r" / "model.safetensors")
    assert w["weight"].item() == pytest.approx(3.0, abs=1e-2) and w["bias"].item() == pytest.approx(
        -1.0, abs=1e-2
    )
    losses = [r["loss"] for r in read_metrics(tmp_path / "r" / "metrics.jsonl") if r["kind"] == "train"]
    assert len(losses) == 200 and losses[-1] < losses[0] / 100
    assert read_json(tmp_path / "r" / "config.json") == {"family": "toy"}
    assert (tmp_path / "r" / "card.md").is_file() and (tmp_path / "r" / "loss.png").is_file()
    assert ckpt.latest_checkpoint(tmp_path / "r" / "checkpoints").name == "step-00000200"


def test_best_weights_kept_and_early_stopping(tmp_path):
    cfg = toy_cfg(eval_interval=10, early_stop_patience=2)
    task = Regression(cfg, val_losses=[5.0, 4.0, 4.5, 4.2, 1.0])
    result = Trainer(task, cfg, tmp_path / "r", {}, progress=False).fit()
    # evals at 10, 20 (best), 30 (worse), 40 (worse) -> stop after 2 evals without improvement
    assert result.stopped == "early_stop" and result.steps == 40 and result.best_val_loss == 4.0
    ck = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / "r" / "checkpoints"))[0]
    best = load_file(tmp_path / "r" / "model.safetensors")
    assert not torch.equal(best["weight"], ck["module.model.weight"])  # artifact = step-20 weights, not final


def test_max_time_budget_stops(tmp_path):
    cfg = toy_cfg(max_steps=None, max_time=0.5)
    result = Trainer(Regression(cfg), cfg, tmp_path / "r", {}, progress=False).fit()
    assert result.stopped == "max_time" and 0.5 <= result.elapsed < 5 and result.steps > 1


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_checkpoint(tmp_path):
    cfg = toy_cfg(ckpt_interval=5, max_steps=20)
    with pytest.raises(AigcError, match=r"loss became nan at step 7; last good checkpoint: .*step-00000005"):
        Trainer(Regression(cfg, nan_at=7), cfg, tmp_path / "r", {}, progress=False).fit()
    tensors, state = ckpt.load_checkpoint(tmp_path / "r" / "checkpoints" / "step-00000005")
    assert state["step"] == 5 and torch.isfinite(tensors["module.model.weight"]).all()
    # the advice works: a lower lr, then --resume, continues from step 5 with the new lr
    lower = toy_cfg(ckpt_interval=5, max_steps=20, lr=0.01)
    result = Trainer(Regression(lower), lower, tmp_path / "r", {}, resume=True, progress=False).fit()
    assert result.steps == 20
    _, state = ckpt.load_checkpoint(tmp_path / "r" / "checkpoints" / "step-00000020")
    assert state["optimizers"]["model"]["param_groups"][0]["lr"] == pytest.approx(0.01)
    steps = [r["step"] for r in read_metrics(tmp_path / "r" / "metrics.jsonl") if r["kind"] == "train"]
    assert steps == list(range(1, 21))  # the NaN steps 6-7 were cut from the log


def test_disk_full_while_saving_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    cfg = toy_cfg(ckpt_interval=5, max_steps=20)
    real_save, calls = ckpt.save_file, []

    def failing_save(tensors, path):
        calls.append(path)
        if len(calls) >= 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(tensors, path)

    monkeypatch.setattr(ckpt, "save_file", failing_save)
    with pytest.raises(
        AigcError, match=r"could not write checkpoint at step 10 \(No space left on device\).*step-00000005"
    ):
        Trainer(Regression(cfg), cfg, tmp_path / "r", {}, progress=False).fit()
    root = tmp_path / "r" / "checkpoints"
    assert ckpt.latest_checkpoint(root).name == "step-00000005"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-00000005"]  # no half-written dir
    assert ckpt.load_checkpoint(root / "step-00000005")[1]["step"] == 5


def test_keep_last_prunes_old_checkpoints(tmp_path):
    cfg = toy_cfg(ckpt_interval=3, max_steps=12, keep_last=2)
    Trainer(Regression(cfg), cfg, tmp_path / "r", {}, progress=False).fit()
    names = [p.name for p in ckpt.list_checkpoints(tmp_path / "r" / "checkpoints")]
    assert names == ["step-00000009", "step-00000012"]


class TwoPlayer(Task):
    """GAN-shaped: two modules, two optimizers stepped alternately in one training_step."""

    def __init__(self, cfg):
        torch.manual_seed(0)
        self.g, self.d = nn.Linear(2, 2), nn.Linear(2, 1)
        self.cfg = cfg

    def modules(self):
        return {"G": self.g, "D": self.d}

    def optimizers(self, cfg):
        return {"G": adamw(self.g, cfg, lr=cfg.lr), "D": adamw(self.d, cfg, lr=cfg.lr * 2)}

    def training_step(self, ctx):
        z = torch.randn(8, 2)
        d_loss = self.d(self.g(z).detach()).pow(2).mean()
        ctx.backward(d_loss)
        ctx.step("D")
        g_loss = (self.d(self.g(z)) - 1).pow(2).mean()
        ctx.backward(g_loss)
        ctx.step("G")
        return {"loss": ctx.mean(d_loss + g_loss), "d_loss": d_loss.item(), "g_loss": g_loss.item()}

    def artifact_tensors(self):
        return dict(self.g.state_dict())


def test_two_optimizer_task_checkpoints_both(tmp_path):
    cfg = toy_cfg(max_steps=6, ckpt_interval=3, schedule="cosine", warmup_steps=2)
    Trainer(TwoPlayer(cfg), cfg, tmp_path / "r", {}, progress=False).fit()
    tensors, state = ckpt.load_checkpoint(tmp_path / "r" / "checkpoints" / "step-00000006")
    assert {"module.G.weight", "module.D.weight", "optim.G.0.exp_avg", "optim.D.0.exp_avg"} <= set(tensors)
    lrs = {name: meta["param_groups"][0]["lr"] for name, meta in state["optimizers"].items()}
    assert lrs["D"] == pytest.approx(2 * lrs["G"])  # the schedule scales each optimizer's own peak
    rec = [r for r in read_metrics(tmp_path / "r" / "metrics.jsonl") if r["kind"] == "train"][-1]
    assert {"d_loss", "g_loss", "loss", "lr"} <= set(rec)


# ----------------------------------------------------------------------------- the text task


def test_grad_accumulation_matches_one_big_batch(tmp_path):
    """batch 8 x 1 micro-step == batch 4 x 2 micro-steps (same windows, same update)."""
    data = make_prepared(tmp_path)
    common = ["train.warmup_steps=0", "train.eval_interval=0", "train.ckpt_interval=0", "sample.num=0"]
    train(tmp_path, "a", steps=1, data=data, extra=[*common, "train.batch_size=8"])
    train(tmp_path, "b", steps=1, data=data, extra=[*common, "train.batch_size=4", "train.grad_accum=2"])
    a = load_file(tmp_path / "a" / "model.safetensors")
    b = load_file(tmp_path / "b" / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    la = read_metrics(tmp_path / "a" / "metrics.jsonl")[0]["loss"]
    lb = read_metrics(tmp_path / "b" / "metrics.jsonl")[0]["loss"]
    assert la == pytest.approx(lb, rel=1e-5)


@pytest.mark.parametrize("family", ["gpt", "lstm"])
def test_smoke_recipe_two_steps_then_load(tmp_path, family):
    result = train(tmp_path, family=family, steps=2)
    run = tmp_path / "run"
    assert result.steps == 2
    for name in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "metrics.jsonl",
        "card.md",
        "loss.png",
    ):
        assert (run / name).is_file(), name
    assert (run / "samples" / "sample-0.txt").is_file()
    cfg = read_json(run / "config.json")
    assert cfg["family"] == family and {"model", "train", "data"} <= set(cfg)
    import aigc
    from aigc.registry import load_artifact

    art = load_artifact(run)  # rebuilt from the directory alone
    ids = torch.tensor([art.tokenizer.encode("the fox")])
    logits, _ = art.model(ids)
    assert logits.shape == (1, ids.shape[1], cfg["model"]["vocab_size"]) and torch.isfinite(logits).all()
    # the artifact holds the trained weights: those of the final checkpoint (the only eval is the best)
    tensors, _ = ckpt.load_checkpoint(ckpt.latest_checkpoint(run / "checkpoints"))
    for k, v in art.model.state_dict().items():
        torch.testing.assert_close(v, tensors[f"module.model.{k}"])
    ev = [r for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "eval"][-1]
    meta = read_json(Path(cfg["data"]["path"]) / "meta.json")
    assert ev["val_bpb"] == pytest.approx(
        ev["val_loss"] * meta["val_tokens"] / (meta["val_bytes"] * math.log(2))
    )
    tr = [r for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "train"][-1]
    assert tr["tokens_per_s"] > 0 and tr["mfu"] > 0
    gen = aigc.load(run)  # the public API: a generator over the same artifact
    [result] = gen.generate("the", max_new_tokens=5, seed=0)
    assert len(result.tokens) == 5 and result.seed == 0


def test_context_longer_than_the_data(tmp_path):
    data = make_prepared(tmp_path, text="abcdefghij" * 5)
    with pytest.raises(
        AigcError, match=r"context longer than the data: model.block_size=16 .* split has \d+"
    ):
        train(tmp_path, data=data)


def test_missing_prepared_dir(tmp_path):
    with pytest.raises(
        AigcError, match="prepared data directory .* not found; create it with `aigc data prepare"
    ):
        train(tmp_path, data=tmp_path / "nope")


def test_init_from_needs_the_same_tokenizer(tmp_path):
    train(tmp_path, "base", steps=2)
    other = make_prepared(tmp_path, text=TEXT.upper(), name="other")
    with pytest.raises(AigcError, match="--init-from .* uses tokenizer .* prepared with tokenizer"):
        train(tmp_path, "ft", data=other, init_from=tmp_path / "base")
    # same data -> fine-tuning starts from the base weights
    same = Path(read_json(tmp_path / "base" / "config.json")["data"]["path"])
    train(tmp_path, "ft", data=same, steps=1, init_from=tmp_path / "base")
    assert read_json(tmp_path / "ft" / "config.json")["init_from"] == str((tmp_path / "base").resolve())
    # the preset's [model] table does not apply: the shape is the source's; asking to change it is an error
    from aigc.training.text import train_text

    quick = ["train.batch_size=4", "train.eval_batches=1", "sample.num=0", "model.dropout=0.1"]
    train_text(
        "gpt", same, tmp_path / "ft2", "auto", quick, max_steps=1, init_from=tmp_path / "base", progress=False
    )
    ft2, base = (
        read_json(tmp_path / "ft2" / "config.json")["model"],
        read_json(tmp_path / "base" / "config.json")["model"],
    )
    assert ft2 == {**base, "dropout": 0.1}
    # resuming a fine-tune needs no --init-from again
    again = train_text("gpt", same, tmp_path / "ft2", "auto", quick, max_steps=2, resume=True, progress=False)
    assert again.steps == 2
    with pytest.raises(ConfigError, match="--init-from fixes the model shape; cannot change model.n_layer"):
        train_text(
            "gpt",
            same,
            tmp_path / "ft3",
            "auto",
            ["model.n_layer=3"],
            max_steps=1,
            init_from=tmp_path / "base",
        )


def test_resume_refuses_a_changed_model_config(tmp_path):
    data = make_prepared(tmp_path)
    train(tmp_path, data=data, steps=2)
    with pytest.raises(AigcError, match=r"cannot resume: .*model.n_embd: 16 -> 32"):
        train(tmp_path, data=data, steps=4, resume=True, extra=["model.n_embd=32"])
    # a bigger budget is fine: training continues from step 2
    result = train(
        tmp_path, data=data, steps=4, resume=True, extra=["sample.tokens=5"]
    )  # sampling may change
    assert result.steps == 4


@pytest.mark.parametrize("family", ["gpt", "lstm"])
@pytest.mark.parametrize("preset", ["tiny", "small", "base", "auto"])
def test_every_preset_resolves(tmp_path, family, preset):
    from aigc.data import load_prepared
    from aigc.training.text import resolve_text_config

    cfg = resolve_text_config(family, load_prepared(make_prepared(tmp_path)), preset, ["train.lr=1e-3"])
    assert cfg["train"]["lr"] == 1e-3 and cfg["model"]["vocab_size"] > 0 and cfg["train"]["max_steps"] > 0


def test_init_from_a_transformers_llama_folder(tmp_path):
    """A run exported to transformers format fine-tunes from exactly its weights."""
    pytest.importorskip("transformers")
    from aigc.export import export_artifact

    data = make_prepared(tmp_path)
    train(tmp_path, "base", data=data, steps=2)
    export_artifact(tmp_path / "base", tmp_path / "hf")
    train(tmp_path, "ft", data=data, steps=1, init_from=tmp_path / "hf", extra=["train.lr=1e-12"])
    base = load_file(tmp_path / "base" / "model.safetensors")
    ft = load_file(tmp_path / "ft" / "model.safetensors")
    assert base.keys() == ft.keys()
    for k in base:
        torch.testing.assert_close(ft[k], base[k], rtol=0, atol=1e-6)


@pytest.mark.slow
def test_music_event_data_trains_like_text(tmp_path):
    pytest.importorskip("music21")
    import aigc
    from aigc.data.music import prepare_music
    from aigc.training.text import train_text

    prepare_music("music21:bach", tmp_path / "music", overrides=["limit=4"])
    over = [*TINY_GPT, "model.block_size=32"]
    result = train_text(
        "gpt", tmp_path / "music", tmp_path / "run", overrides=over, max_steps=2, progress=False
    )
    assert result.steps == 2 and math.isfinite(result.best_val_loss)
    art = aigc.load(tmp_path / "run")
    assert art.tokenizer.kind == "music"


def test_tensorboard_is_optional(tmp_path):
    cfg = toy_cfg(max_steps=3, tensorboard=True)
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        with pytest.warns(UserWarning, match="tensorboard is not installed"):
            Trainer(Regression(cfg), cfg, tmp_path / "r", {}, progress=False).fit()
        assert not (tmp_path / "r" / "tensorboard").exists()
    else:
        Trainer(Regression(cfg), cfg, tmp_path / "r", {}, progress=False).fit()
        assert any((tmp_path / "r" / "tensorboard").iterdir())
    assert (tmp_path / "r" / "metrics.jsonl").is_file()


def test_init_from_a_non_llama_transformers_folder_is_refused(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=40, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(AigcError, match="is a gpt2 transformers model; only Llama-shaped models"):
        train(tmp_path, "ft", steps=1, init_from=tmp_path / "gpt2")


@pytest.mark.parametrize("speedup", [0.0, 0.6, 4.5])
def test_auto_precision_takes_bf16_only_where_it_is_faster(monkeypatch, tmp_path, speedup):
    """ "auto" = bf16 autocast on a CPU only where its bf16 matmul beats fp32 (some CPUs report bf16
    kernels that run slower than fp32); training and diffusion sampling follow the same rule, and
    the training log says what was chosen and why."""
    from aigc.generation.image import _autocast_dtype
    from aigc.training import trainer as T

    monkeypatch.setattr(T, "cpu_bf16_speedup", lambda: speedup)
    want = torch.bfloat16 if speedup >= T.AUTO_BF16_MIN_SPEEDUP else None
    cpu = torch.device("cpu")
    assert T.autocast_dtype("auto", cpu) == want and _autocast_dtype("auto") == want
    assert T.autocast_dtype("fp32", cpu) is None and _autocast_dtype("fp32") is None
    lines = []
    cfg = toy_cfg(precision="auto", max_steps=2)
    trainer = Trainer(
        Regression(cfg), cfg, tmp_path / "r", {"family": "toy"}, progress=False, log=lines.append
    )
    trainer.fit()
    assert trainer.amp_dtype == want
    [note] = [m for m in lines if m.startswith("precision auto:")]
    assert ("no bf16 kernels" in note) if speedup == 0 else (f"{speedup:.1f}x fp32" in note)
    assert note.split(": ", 1)[1].startswith("bf16" if want else "fp32")


def test_cpu_bf16_speedup_is_measured_once():
    from aigc.training import trainer as T

    x = T.cpu_bf16_speedup()
    assert x == T.cpu_bf16_speedup() and (x > 0) == T.bf16_supported(torch.device("cpu"))


def test_card_shows_no_host_paths(tmp_path):
    """card.md is shown and shared: its config and data lines name the data, not where it lay."""
    from aigc.utils.paths import hide_host_paths, public_config

    train(tmp_path, steps=2)
    run = tmp_path / "run"
    card = (run / "card.md").read_text(encoding="utf-8")
    assert read_json(run / "config.json")["data"]["path"] == str(tmp_path / "data")  # the artifact keeps it
    assert str(tmp_path) not in card and '"path": "data"' in card and "prepared data: `data`" in card
    # the rules: absolute paths shrink to their last part; relative paths, URLs and names stay
    cfg = {"data": {"dir": "/srv/x/digits", "source": "digits"}, "out": ["/a/b"], "prompt": "/etc/x/y"}
    assert public_config(cfg) == {
        "data": {"dir": "digits", "source": "digits"},
        "out": ["b"],
        "prompt": "/etc/x/y",
    }
    text = 'from `/home/u/runs/base` (C:\\runs\\x) see https://h.io/a/b, data/digits, 3/4 "/tmp/q/r",'
    assert hide_host_paths(text) == 'from `base` (x) see https://h.io/a/b, data/digits, 3/4 "r",'


# ----------------------------------------------------------------------------- the run directory


def test_out_under_a_file_is_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(
        AigcError, match=r"cannot write .*file/run \(.*file is a file, not a directory\); pick another --out"
    ):
        train(tmp_path, out="file/run")


def test_trainer_run_dir_that_cannot_be_made_is_one_line(tmp_path, monkeypatch):
    cfg = toy_cfg(max_steps=2)

    def denied(self, *a, **k):  # as root chmod stops nothing: fail the way a read-only parent does
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(Path, "mkdir", denied)
    with pytest.raises(AigcError, match=r"cannot write .*/r \(permission denied\); pick another --out"):
        Trainer(Regression(cfg), cfg, tmp_path / "r", {}, progress=False).fit()


def test_batch_larger_than_the_training_set_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(
        AigcError, match=r"train.batch_size=100000 is larger than the training set: .* windows"
    ):
        train(tmp_path, extra=["train.batch_size=100000"])
    assert not (tmp_path / "run").exists()


def test_a_locked_run_dir_is_refused_and_released_after(tmp_path):
    import os

    from aigc.utils.io import LOCK_FILE, DirLock

    data = make_prepared(tmp_path)
    with DirLock(tmp_path / "run", "trained"):  # another training holds it
        with pytest.raises(
            AigcError, match=rf"run is being trained by another process \(pid {os.getpid()}\)"
        ):
            train(tmp_path, data=data)
        with pytest.raises(AigcError, match="being trained by another process"):
            train(tmp_path, data=data, resume=True)
    train(tmp_path, data=data)
    assert not (tmp_path / "run" / LOCK_FILE).exists()  # released (and removed) at the end
    DirLock(tmp_path / "run").acquire().release()


def test_a_run_killed_before_its_first_checkpoint(tmp_path):
    from aigc.utils.io import atomic_write_json

    data = make_prepared(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    atomic_write_json(run / "config.json", {"family": "gpt", "model": {"n_layer": 9}})  # what it left
    (run / "metrics.jsonl").write_text('{"kind": "train", "step": 1, "loss": 3.0}\n')
    with pytest.raises(
        AigcError, match=r"no checkpoint in .*run yet \(the run stopped before its first save\)"
    ):
        train(tmp_path, data=data, resume=True)
    notes = []
    result = train(tmp_path, data=data, log=notes.append)  # nothing of value there: no --overwrite needed
    assert result.steps == 4 and any("stopped before its first checkpoint" in n for n in notes)
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "train"][0] == 1
    assert read_json(run / "config.json")["model"]["n_layer"] == 1
    with pytest.raises(AigcError, match="already holds a training run"):  # now it has a checkpoint
        train(tmp_path, data=data)


def test_an_empty_val_split_says_to_prepare_with_a_val_fraction():
    from types import SimpleNamespace

    import numpy as np

    from aigc.training.text import check_context_fits

    prepared = SimpleNamespace(train=np.zeros(1000, np.uint16), val=np.zeros(0, np.uint16))
    with pytest.raises(AigcError, match="val split is empty .*--val-fraction 0.1"):
        check_context_fits(64, prepared)
    check_context_fits(64, SimpleNamespace(train=prepared.train, val=np.zeros(100, np.uint16)))

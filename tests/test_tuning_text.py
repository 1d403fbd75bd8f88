"""Tuning text models on feedback (aigc.tuning.text, report, `aigc tune`): loss oracles, the
end-to-end loop on a tiny GPT (publish a version the server serves), the held-out guard, LSTM and
transformers models."""

from __future__ import annotations

import json
import math
import random
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from aigc.errors import AigcError
from aigc.feedback.store import Store
from aigc.tuning.losses import Seq, batch_tensors, dpo_loss, kto_loss, make_seq, sequence_logps
from aigc.tuning.text import resolve_tune_config

GOOD = ["i love it", "great fun", "so good", "a nice day", "really great"]
BAD = ["i hate it", "awful mess", "so bad", "a sad day", "really awful"]
LIKED = ("love", "great", "good", "nice")
SCORER = f"def score(items):\n    return [1.0 if any(w in t for w in {LIKED!r}) else 0.0 for t in items]\n"
FAST = ["tune.min_pairs=8", "tune.min_unpaired=8", "tune.max_steps=40", "tune.lr=1e-3", "tune.samples=32",
        "tune.sample_tokens=16", "tune.eval_interval=20"]  # fmt: skip


# ----------------------------------------------------------------------------- losses (oracles)


def _sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_dpo_loss_matches_hand_computation():
    pc, pr = torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -2.0])
    rc, rr = torch.tensor([-3.5, -4.0]), torch.tensor([-3.5, -3.0])
    beta, eps = 0.2, 0.1
    losses, chosen, rejected = dpo_loss(pc, pr, rc, rr, beta, eps)
    for i in range(2):
        z = beta * ((pc[i] - pr[i]) - (rc[i] - rr[i])).item()
        want = -(1 - eps) * math.log(_sig(z)) - eps * math.log(_sig(-z))  # cDPO, TRL's "sigmoid" loss
        assert losses[i].item() == pytest.approx(want, rel=1e-6)
        assert chosen[i].item() == pytest.approx(beta * (pc[i] - rc[i]).item())
        assert rejected[i].item() == pytest.approx(beta * (pr[i] - rr[i]).item())
    # policy == reference: every pair costs log 2, whatever beta
    same, *_ = dpo_loss(rc, rr, rc, rr, 0.5)
    assert torch.allclose(same, torch.full((2,), math.log(2.0)))


def test_kto_loss_matches_hand_computation():
    p, ref = torch.tensor([-2.0, -6.0, -3.0]), torch.tensor([-3.0, -5.0, -3.5])
    labels = torch.tensor([True, False, True])
    p_kl, ref_kl = torch.tensor([-4.0, -4.0, -5.0]), torch.tensor([-4.5, -4.2, -5.0])
    beta, wd, wu = 0.5, 1.0, 1.5
    losses, rewards, kl = kto_loss(p, ref, labels, p_kl, ref_kl, beta, wd, wu)
    kl_want = max(0.0, ((0.5 + 0.2 + 0.0) / 3))
    assert kl.item() == pytest.approx(kl_want)
    for i in range(3):
        r = (p[i] - ref[i]).item()
        want = wd * (1 - _sig(beta * (r - kl_want))) if labels[i] else wu * (1 - _sig(beta * (kl_want - r)))
        assert losses[i].item() == pytest.approx(want, rel=1e-6)
        assert rewards[i].item() == pytest.approx(beta * r)
    # the KL reference point is clamped at 0 and carries no gradient
    p_kl2 = torch.tensor([-9.0, -9.0, -9.0], requires_grad=True)
    _, _, kl2 = kto_loss(p, ref, labels, p_kl2, ref_kl, beta)
    assert kl2.item() == 0.0 and not kl2.requires_grad


def test_sequence_logps_sums_completion_tokens_only():
    torch.manual_seed(0)
    vocab = 7
    emb = torch.nn.Embedding(vocab, vocab)

    class LM(torch.nn.Module):
        def forward(self, idx, targets=None):
            return emb(idx) * 3, None

    seqs = [Seq([1, 2, 3, 4], 2), Seq([5, 6], 1)]
    got = sequence_logps(LM(), seqs)
    for k, s in enumerate(seqs):
        logp = F.log_softmax(emb(torch.tensor(s.ids[:-1])) * 3, -1)
        want = sum(logp[t, s.ids[t + 1]].item() for t in range(s.start - 1, len(s.ids) - 1))
        assert got[k].item() == pytest.approx(want, rel=1e-5)
    x, y, mask = batch_tensors(seqs)
    assert x.shape == (2, 3) and y[1].tolist() == [6, -1, -1] and mask.sum().item() == 3


def test_make_seq_keeps_the_prompt_tail_and_cuts_the_completion():
    s = make_seq(list(range(10)), [100, 101, 102], max_len=8)
    assert s.ids == [6, 7, 8, 9, 100, 101, 102] and s.start == 4
    s = make_seq([1], list(range(20)), max_len=5)
    assert len(s.ids) == 6 and s.start == 1


def test_tune_config_overrides_and_errors():
    cfg = resolve_tune_config("kto", None, ["tune.beta=0.2"], max_steps=7)
    assert (cfg.method, cfg.beta, cfg.max_steps) == ("kto", 0.2, 7)
    assert resolve_tune_config(None, "default", None).method == "dpo"  # the shipped presets parse
    assert resolve_tune_config(None, "loop", None).mix_weight == 2.0
    with pytest.raises(AigcError, match="valid keys"):
        resolve_tune_config(None, None, ["tune.betta=1"])
    with pytest.raises(AigcError, match="method must be one of"):
        resolve_tune_config("ppo")
    with pytest.raises(AigcError, match="tuning settings are tune"):
        resolve_tune_config(None, None, ["train.lr=1"])


# ----------------------------------------------------------------------------- a tiny GPT + its feedback


@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> Path:
    """A tiny GPT trained on short liked/disliked sentences (prepared data kept for the guard)."""
    from aigc.data import prepare_text
    from aigc.training.text import train_text

    root = tmp_path_factory.mktemp("tune-base")
    rng = random.Random(0)
    (root / "corpus.txt").write_text("\n\n".join(rng.choice(GOOD + BAD) for _ in range(400)) + "\n")
    prepare_text(str(root / "corpus.txt"), root / "data", overrides={"blocks": True})
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    # fp32, not precision=auto: the same base model on every CPU
    train_text("gpt", root / "data", root / "run", preset="tiny", max_steps=300, progress=False,
               overrides=["model.n_layer=1", "model.n_embd=32", "model.block_size=32",
                          "train.eval_interval=0", "train.ckpt_interval=0", "train.precision=fp32"])  # fmt: skip
    torch.set_num_threads(n)
    return root / "run"


def fill_store(store, run: Path, model: str, n: int = 120, seed: int = 0) -> int:
    """Generate from `run` and thumb each output by the LIKED words, as a rater would."""
    from aigc.generation.text import TextGenerator
    from aigc.tuning.versions import weights_hash

    gen = TextGenerator.from_artifact(run)
    digest, liked = weights_hash(run), 0
    for r in gen.generate([""], n=n, seed=seed, max_new_tokens=16):
        gid = store.add_generation(kind="text", model=model, prompt="", output_text=r.text, model_hash=digest)
        up = any(w in r.text for w in LIKED)
        liked += up
        store.add_rating(gid, 1 if up else -1, user="sim")
    return liked


@pytest.fixture
def versioned(tmp_path, base_run) -> tuple[Path, Path, Path]:
    """(models dir holding story/1, store path, scorer file)."""
    from aigc.feedback.store import Store

    models = tmp_path / "models"
    shutil.copytree(base_run, models / "story" / "1")
    db = tmp_path / "aigc.db"
    with Store.open(str(db)) as store:
        liked = fill_store(store, models / "story" / "1", "story@1")
    assert 10 < liked < 110  # a mixed start, so there are pairs to learn from
    scorer = tmp_path / "score.py"
    scorer.write_text(SCORER)
    return models, db, scorer


@pytest.mark.slow
def test_aigc_tune_dpo_publishes_the_next_version_the_server_serves(versioned, run_cli):
    from aigc.registry import load_artifact
    from aigc.serve.registry import ModelRegistry
    from aigc.serve.settings import Settings

    models, db, scorer = versioned
    code, out, err = run_cli("tune", "--model", "story", "--models", models, "--from-feedback", "--db", db,
                             "--scorer", f"python:{scorer}:score", *sum((["--set", s] for s in FAST), []))  # fmt: skip
    assert code == 0, err
    new = models / "story" / "2"
    assert f"-> {new}" in out and "win rate" in out
    for f in ("config.json", "model.safetensors", "tokenizer.json", "metrics.jsonl", "card.md", "report.json",
              "report.md", "report.png", "loss.png"):  # fmt: skip
        assert (new / f).is_file(), f
    assert not (new / "checkpoints").exists()
    cfg = json.loads((new / "config.json").read_text())
    assert cfg["tuned_from"]["model"] == "story@1" and cfg["init_from"] == str(
        (models / "story" / "1").resolve()
    )
    assert cfg["tune"]["method"] == "dpo" and cfg["tune"]["feedback"]["train"] >= 8
    assert cfg["tune"]["result"]["published"] is True
    load_artifact(new)  # the artifact loader (and so the server) rebuilds it unchanged
    reg = ModelRegistry(Settings(models_dirs=[models]))
    assert reg.resolve("story").version == "2" and reg.resolve("story@1").version == "1"
    gen = reg.get("story", "text").generator
    assert isinstance(gen.generate("", max_new_tokens=4, seed=1)[0].text, str)
    rep = json.loads((new / "report.json").read_text())
    # the tuned model says the liked words more often than its previous version, same prompts and seeds
    assert rep["preferred"]["after"] > rep["preferred"]["before"]
    assert rep["win_rate"] > 0.5
    assert rep["heldout_loss"]["change"] <= 0.10
    assert "reward_margin" in rep["curves"] and rep["curves"]["reward_margin"][-1][1] > 0
    # and the old version is untouched: tuning twice makes version 3
    code, out, err = run_cli("tune", "--model", str(models / "story" / "1"), "--from-feedback", "--db", db,
                             "--method", "sft", "--set", "tune.min_corrections=1")  # fmt: skip
    assert code == 1 and "0 usable corrections" in err and "tune.min_corrections" in err


@pytest.mark.slow
def test_blow_up_is_not_published_and_the_old_version_stays_current(versioned, run_cli):
    from aigc.serve.registry import ModelRegistry
    from aigc.serve.settings import Settings

    models, db, _ = versioned
    code, out, err = run_cli("tune", "--model", "story", "--models", models, "--from-feedback", "--db", db,
                             *sum((["--set", s] for s in FAST), []), "--set", "tune.lr=10",
                             "--set", "tune.warmup_steps=0")  # fmt: skip
    assert code == 1
    assert "nothing published" in err and "story still resolves to 1" in err
    assert not (models / "story" / "2").exists()
    rejected = models / "story" / "_rejected-2"
    rep = json.loads((rejected / "report.json").read_text())
    assert rep["published"] is False and rep["reason"]
    assert not (rejected / "model.safetensors").exists()
    assert ModelRegistry(Settings(models_dirs=[models])).resolve("story").version == "1"
    assert not [p for p in (models / "story").iterdir() if p.name.startswith(".")]  # no staging left


@pytest.mark.slow
def test_kto_and_mix_on_an_unversioned_run_need_out(tmp_path, base_run):
    from aigc.feedback.store import Store
    from aigc.registry import load_artifact
    from aigc.tuning.text import tune_text

    run = tmp_path / "story"
    shutil.copytree(base_run, run)
    with Store.open(str(tmp_path / "db.sqlite")) as store:
        fill_store(store, run, "story")
        with pytest.raises(AigcError, match="pass --out"):
            tune_text(run, store=store, method="kto", overrides=FAST, progress=False)
        rep = tune_text(run, tmp_path / "story-kto", store=store, method="kto", progress=False,
                        overrides=[*FAST, "tune.lr=3e-4", "tune.mix_weight=0.5", "tune.samples=0"])  # fmt: skip
    assert rep["published"] and rep["feedback"]["desirable"] > 0 and rep["feedback"]["undesirable"] > 0
    metrics = [
        json.loads(line) for line in (tmp_path / "story-kto" / "metrics.jsonl").read_text().splitlines()
    ]
    assert any("mix_loss" in m and "kl" in m for m in metrics)
    load_artifact(tmp_path / "story-kto")
    # a chain of tunings is held to the first version's held-out loss, not only the last one's
    cfg_path = tmp_path / "story-kto" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    root = cfg["tune"]["result"]["guard_root"]
    assert root["model"] == "story" and root["loss"] == pytest.approx(rep["heldout_loss"]["before"])
    root["loss"] /= 2  # pretend the lineage started far better than this version
    cfg_path.write_text(json.dumps(cfg))
    with (
        Store.open(str(tmp_path / "db.sqlite")) as store,
        pytest.raises(AigcError, match="above the first version"),
    ):
        fill_store(store, tmp_path / "story-kto", "story-kto")
        # (the same gentle settings as the first tuning: its own +10 % guard must pass, so the lineage's fires)
        tune_text(tmp_path / "story-kto", tmp_path / "again", store=store, method="kto", progress=False,
                  overrides=[*FAST, "tune.lr=3e-4", "tune.mix_weight=0.5", "tune.samples=0"])  # fmt: skip
    assert not (tmp_path / "again").exists()


def test_lstm_sft_on_corrections(tmp_path):
    from tests.serve_helpers import write_text_run

    import aigc
    from aigc.feedback.store import Store
    from aigc.generation.text import TextGenerator
    from aigc.tuning.versions import weights_hash

    run = write_text_run(tmp_path / "models" / "rnn" / "1", family="lstm")
    with Store.open(str(tmp_path / "db.sqlite")) as store:
        for i, prompt in enumerate(["ROMEO", "ROMEO:", "System:", "User:", "Assistant:", "what light"]):
            gid = store.add_generation(kind="text", model="rnn@1", prompt=prompt, output_text="x",
                                       model_hash=weights_hash(run))  # fmt: skip
            store.add_rating(gid, 2, "stars", correction="But soft, what light", user=f"u{i}")
    # the Python API: aigc.tune opens the store itself
    rep = aigc.tune(run, method="sft", db=str(tmp_path / "db.sqlite"),
                    overrides=["tune.min_corrections=4", "tune.max_steps=30", "tune.lr=1e-2",
                               "tune.samples=0", "tune.heldout_fraction=0"])  # fmt: skip
    new = tmp_path / "models" / "rnn" / "2"
    assert rep["published"] and rep["heldout_loss"]["source"].startswith("liked held-out feedback")
    # it learned the correction: the corrected text became likelier after the prompt
    before, after = (TextGenerator.from_artifact(d) for d in (run, new))
    ids = before.encode("ROMEO")
    comp = before.encode("But soft, what light")
    lp = [sequence_logps(g.model, [Seq(ids + comp, len(ids))]).item() for g in (before, after)]
    assert lp[1] > lp[0] + 1.0


@pytest.mark.slow
def test_hf_causal_lm_dpo(tmp_path):
    transformers = pytest.importorskip("transformers")
    from aigc.feedback.store import Store
    from aigc.generation import load_generator
    from aigc.tokenizers import train_tokenizer
    from aigc.tuning.text import tune_text

    hf_dir = tmp_path / "hf" / "tinygpt2"
    tok = train_tokenizer("char", [" ".join(GOOD + BAD)])
    tok.save_pretrained(hf_dir)
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=tok.vocab_size, n_positions=64, n_embd=16, n_layer=1, n_head=2)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(hf_dir, safe_serialization=True)
    with Store.open(str(tmp_path / "db.sqlite")) as store:
        prompts = ["so", "a", "i", "really", "it", "day", "fun", "mess", "nice", "sad"]
        for p, g, b in zip(prompts, GOOD * 2, BAD * 2, strict=True):
            ga = store.add_generation(kind="text", model="tinygpt2", prompt=p, output_text=g)
            gb = store.add_generation(kind="text", model="tinygpt2", prompt=p, output_text=b)
            store.add_comparison(ga, gb, ga, user="u")
        rep = tune_text(f"hf:{hf_dir}", tmp_path / "tuned", store=store, progress=False,
                        overrides=["tune.min_pairs=4", "tune.max_steps=20", "tune.lr=1e-2", "tune.samples=4",
                                   "tune.sample_tokens=4"])  # fmt: skip
    assert rep["published"] and rep["curves"]["reward_margin"][-1][1] > 0
    out = tmp_path / "tuned"
    assert (out / "aigc_tune.json").is_file() and (out / "report.md").is_file()
    gen = load_generator(f"hf:{out}")  # a transformers folder again
    assert isinstance(gen.generate("so", max_new_tokens=3, seed=0)[0].text, str)


def test_tune_cli_help_and_bad_input(tmp_path, run_cli):
    from tests.serve_helpers import write_image_run

    code, out, _ = run_cli("tune", "--help")
    assert code == 0 and "--from-feedback" in out and "--method" in out
    code, _, err = run_cli("tune", "--model", str(tmp_path), "--db", tmp_path / "x.db")
    assert code == 1 and "--from-feedback" in err
    code, _, err = run_cli("tune", "--model", "nosuch", "--from-feedback", "--db", tmp_path / "x.db")
    assert code == 1 and "not found" in err and not (tmp_path / "x.db").exists()  # the model before the store
    Store.open(str(tmp_path / "x.db")).close()  # an empty store: the model is looked up next
    code, _, err = run_cli(
        "tune", "--model", "nosuch", "--models", tmp_path, "--from-feedback", "--db", tmp_path / "x.db"
    )
    assert code == 1 and "not found" in err
    # an image model goes to the image tuner (which refuses a store without feedback)
    pix = write_image_run(tmp_path / "m" / "pix" / "1")
    code, _, err = run_cli("tune", "--model", pix, "--from-feedback", "--db", tmp_path / "x.db")
    assert code == 1 and "error" in err


def test_tune_checks_its_arguments_before_the_store(tmp_path, run_cli):
    """No store yet: a missing model or a wrong --method is named, not "no database at"."""
    from tests.serve_helpers import write_image_run, write_text_run

    run, pix, db = (
        write_text_run(tmp_path / "runs" / "t"),
        write_image_run(tmp_path / "pix"),
        tmp_path / "no.db",
    )
    for model, method, says in (
        (tmp_path / "runs" / "nope", "dpo", "not found"),
        (run, "ppo", "--method 'ppo' is not a tuning method for text models ("),
        (pix, "dpo", "not supported for images; use rwr"),
        (pix, "ppo", "allowed: rwr"),
    ):
        code, _, err = run_cli("tune", "--model", model, "--from-feedback", "--method", method, "--db", db)
        assert code == 1 and says in err and "no database" not in err and "Traceback" not in err, err
    code, _, err = run_cli("tune", "--model", run, "--from-feedback", "--method", "kto", "--db", db)
    assert code == 1 and "no database at" in err  # good arguments: now the store


def test_generate_record_names_the_model_as_the_server_does_and_tune_finds_it(tmp_path, run_cli, monkeypatch):
    """`generate text -m runs/ref400 --record` stores `ref400` (a versioned DIR/story/2: `story@2`),
    the name `aigc tune --model runs/ref400` looks up; a mismatch names both sides."""
    from tests.serve_helpers import write_text_run

    monkeypatch.chdir(tmp_path)
    write_text_run(tmp_path / "runs" / "ref400")
    write_text_run(tmp_path / "models" / "story" / "2")
    db = tmp_path / "aigc.db"
    for model, name in (("runs/ref400", "ref400"), ("models/story/2", "story@2")):
        code, _, err = run_cli("generate", "text", "-m", model, "-p", "ROMEO:", "--max-new-tokens", "3",
                               "--record", "--db", db)  # fmt: skip
        assert code == 0 and f"(model {name})" in err, err
    with Store.open(str(db)) as store:
        rows = store.list_generations(limit=10)["data"]
        assert sorted(r["model"] for r in rows) == ["ref400", "story@2"]
        assert all(r["model_hash"] for r in rows)  # as the server records them: the weights' hash
        for _ in range(3):  # ratings recorded under another name (a path, as older versions did)
            store.add_rating(
                store.add_generation(kind="text", model="runs/old", prompt="", output_text="x"), 1
            )
    code, _, err = run_cli("tune", "--model", "runs/ref400", "--from-feedback", "--method", "kto", "--db", db,
                           "--out", "runs/ref400-kto")  # fmt: skip
    assert code == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "0 usable rated outputs" in err and "of model 'ref400'" in err and "'runs/old' (3)" in err, err
    assert "--set tune.model_name=NAME" in err

"""Preference data from the store (aigc.tuning.preference) and model versions (aigc.tuning.versions)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from aigc.errors import AigcError
from aigc.feedback.store import Store
from aigc.tuning.preference import (
    PreferenceSettings,
    build_preferences,
    cap_per_user,
    feedback_rows,
    is_heldout,
)
from aigc.tuning.versions import model_id, next_version_dir, publish_version, resolve_model, weights_hash

LOOSE = PreferenceSettings(min_pairs=1, min_unpaired=1, min_corrections=1, heldout_fraction=0.0)


def fake_run(path: Path, weights: bytes = b"w1", tokenizer: str = "tok1") -> Path:
    """Just enough of a run directory for the source checks (config with a tokenizer id, weights)."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(
        json.dumps({"family": "gpt", "model": {}, "data": {"tokenizer": {"id": tokenizer}}})
    )
    (path / "model.safetensors").write_bytes(weights)
    return path


@pytest.fixture
def store(tmp_path):
    with Store.open(str(tmp_path / "aigc.db")) as s:
        yield s


def gen(
    store: Store, model: str, prompt: str, text: str, model_hash: str | None = None, kind: str = "text"
) -> int:
    return store.add_generation(
        kind=kind, model=model, prompt=prompt, output_text=text, model_hash=model_hash
    )


def test_feedback_rows_takes_every_version_of_one_name_only(store):
    a = gen(store, "story@1", "p", "one")
    b = gen(store, "story@2", "p", "two")
    gen(store, "story@2", "p", "never rated")
    c = gen(store, "storyX@1", "p", "other model")  # `_`-free lookalike names must not match
    d = gen(store, "story_1", "p", "wildcard lookalike")
    e = gen(store, "story@1", "p", "an image", kind="image")
    for g in (a, b, c, d, e):
        store.add_rating(g, 1, user="u")
    store.add_comparison(a, b, b, user="v")
    rows = feedback_rows(store, "story", "text")
    assert [r["output_text"] for r in rows] == ["one", "two"]
    assert rows[0]["ratings"][0]["user"] == "u" and rows[0]["comparisons"][0]["winner"] == b
    assert feedback_rows(store, "story_", "text") == []  # LIKE wildcards are escaped


def test_rows_per_method_dedupe_and_majority(store):
    g1, g2, g3 = gen(store, "m", "p", "good"), gen(store, "m", "p", "bad"), gen(store, "m", "p", "good")
    store.add_rating(g1, 1, user="a")
    store.add_rating(g1, 1, user="b")
    store.add_rating(g1, -1, user="c")  # majority: liked
    store.add_rating(g2, -1, user="a")
    store.add_rating(g3, 1, user="a")  # the same text again: one KTO row
    store.add_rating(g2, 1, "stars", correction="better", user="d")
    gens = feedback_rows(store, "m", "text")
    kto = build_preferences(gens, "kto", None, None, LOOSE)
    assert kto.train == [{"prompt": "p", "completion": "good", "label": True},
                         {"prompt": "p", "completion": "bad", "label": False}]  # fmt: skip
    dpo = build_preferences(gens, "dpo", None, None, LOOSE)
    assert dpo.train == [{"prompt": "p", "chosen": "good", "rejected": "bad"}]  # g1/g3 vs g2, deduplicated
    sft = build_preferences(gens, "sft", None, None, LOOSE)
    assert sft.train == [{"prompt": "p", "completion": "better"}]
    assert kto.stats["users"] == 4 and kto.stats["desirable"] == 1 and kto.stats["undesirable"] == 1


def test_per_user_cap_keeps_each_users_oldest(store):
    ids = [gen(store, "m", f"p{i}", f"out{i}") for i in range(6)]
    for g in ids:
        store.add_rating(g, 1, user="loud")
    store.add_rating(ids[5], -1, user="quiet")
    gens = feedback_rows(store, "m", "text")
    capped, dropped = cap_per_user(gens, 2)
    assert dropped == 4
    kept = {(r["user"], g["output_text"]) for g in capped for r in g["ratings"]}
    assert kept == {("loud", "out0"), ("loud", "out1"), ("quiet", "out5")}
    data = build_preferences(
        gens, "kto", None, None, PreferenceSettings(min_unpaired=1, max_per_user=2, heldout_fraction=0)
    )
    # out5's up vote is past the loud user's cap: the quiet user's down vote decides
    assert [(r["completion"], r["label"]) for r in data.train] == [
        ("out0", True),
        ("out1", True),
        ("out5", False),
    ]
    assert data.stats["capped"] == 4


def test_heldout_split_is_stable_and_by_prompt(store):
    assert is_heldout("a prompt", 0.5) == is_heldout("a prompt", 0.5)
    assert not is_heldout("anything", 0.0)
    for i in range(40):
        g = gen(store, "m", f"prompt {i}", f"out {i}")
        store.add_rating(g, 1 if i % 2 else -1, user="u")
    settings = PreferenceSettings(min_unpaired=1, heldout_fraction=0.25)
    first = build_preferences(feedback_rows(store, "m", "text"), "kto", None, None, settings)
    assert 0 < len(first.heldout) < 40 and first.stats["heldout_by"] == "prompt"
    assert {r["prompt"] for r in first.heldout}.isdisjoint({r["prompt"] for r in first.train})
    # more feedback later: the rows held out before stay held out
    for i in range(40, 60):
        store.add_rating(gen(store, "m", f"prompt {i}", f"out {i}"), 1, user="u")
    again = build_preferences(feedback_rows(store, "m", "text"), "kto", None, None, settings)
    assert all(r in again.heldout for r in first.heldout)
    # few distinct prompts (e.g. all empty): split by prompt + completion so both sides get rows
    for i in range(40):
        store.add_rating(gen(store, "e", "", f"text {i}"), 1, user="u")
    few = build_preferences(feedback_rows(store, "e", "text"), "kto", None, None, settings)
    assert few.stats["heldout_by"] == "prompt+completion" and few.heldout and few.train


def test_too_little_feedback_says_how_much_is_needed(store):
    for i in range(12):
        a, b = gen(store, "m", f"p{i}", "yes"), gen(store, "m", f"p{i}", "no")
        store.add_comparison(a, b, a)
    gens = feedback_rows(store, "m", "text")
    with pytest.raises(AigcError, match=r"12 usable pairs .*DPO needs at least 32 \(config tune.min_pairs\)"):
        build_preferences(gens, "dpo", None, None, PreferenceSettings(heldout_fraction=0))
    with pytest.raises(AigcError, match=r"0 usable corrections .*tune.min_corrections"):
        build_preferences(gens, "sft", None, None, PreferenceSettings())
    with pytest.raises(AigcError, match="unknown tuning method"):
        build_preferences(gens, "ppo", None, None, PreferenceSettings())


def test_feedback_on_a_different_model_or_tokenizer_is_refused(tmp_path, store):
    v1 = fake_run(tmp_path / "models" / "story" / "1", b"weights-1")
    v2 = fake_run(tmp_path / "models" / "story" / "2", b"weights-2")
    fake_run(tmp_path / "models" / "story" / "3", b"weights-3", tokenizer="tok2")
    ok = gen(store, "story@1", "p", "fine", weights_hash(v1))
    replaced = gen(store, "story@2", "p", "made by weights no longer there", "0123456789abcdef")
    other_tok = gen(store, "story@3", "p", "other tokenizer")
    gone = gen(store, "story@9", "p", "deleted version")
    for g in (ok, replaced, other_tok, gone):
        store.add_rating(g, 1, user="u")
    gens = feedback_rows(store, "story", "text")
    with pytest.raises(AigcError, match="refusing feedback") as e:
        build_preferences(gens, "kto", v2, "tok1", LOOSE)
    msg = str(e.value)
    assert "story@2 (made by other weights" in msg and "story@3 (tokenizer tok2 != tok1)" in msg
    assert "story@9 (no such version" in msg and "tune.on_mismatch=skip" in msg
    skipped = build_preferences(
        gens, "kto", v2, "tok1", PreferenceSettings(min_unpaired=1, heldout_fraction=0, on_mismatch="skip")
    )
    assert [r["completion"] for r in skipped.train] == ["fine"] and len(skipped.stats["mismatched"]) == 3


# ----------------------------------------------------------------------------- versions


def test_versions_next_publish_and_resolve(tmp_path):
    models = tmp_path / "models"
    v1 = fake_run(models / "story" / "1")
    fake_run(models / "story" / "v2")
    fake_run(models / "story" / "10")
    plain = fake_run(models / "plain")
    assert model_id(v1) == ("story", "1") and model_id(plain) == ("plain", None)
    assert next_version_dir(v1) == (models / "story" / "11").resolve()
    assert next_version_dir(models / "story" / "v2") == (models / "story" / "v11").resolve()
    with pytest.raises(AigcError, match="pass --out"):
        next_version_dir(plain)
    # by name, as the server resolves it (numeric order: 10 is the newest)
    assert resolve_model("story", [models]) == (models / "story" / "10").resolve()
    assert resolve_model("story@1", [models]) == v1.resolve()
    assert resolve_model(str(plain)) == plain.resolve()
    with pytest.raises(AigcError, match="not found"):
        resolve_model("nosuch", [models])
    # publishing is one rename and never overwrites
    stage = fake_run(models / "story" / ".stage")
    publish_version(stage, models / "story" / "11")
    assert (models / "story" / "11" / "config.json").is_file() and not stage.exists()
    with pytest.raises(AigcError, match="never overwritten"):
        publish_version(fake_run(models / "story" / ".stage2"), models / "story" / "11")
    assert resolve_model("story", [models]) == (models / "story" / "11").resolve()


def test_too_little_feedback_says_what_kind_is_missing(store):
    """Only thumbs up: DPO says the ratings are all equal and what makes a pair; SFT asks for
    corrections, not more ratings; a name without feedback lists the names that have some."""
    from aigc.tuning.preference import no_feedback_message

    for i in range(5):
        store.add_rating(gen(store, "m", "p", f"out {i}"), 1, user="u")
    gens = feedback_rows(store, "m", "text")
    with pytest.raises(AigcError) as e:
        build_preferences(gens, "dpo", None, None, PreferenceSettings(heldout_fraction=0))
    assert "all 5 rated outputs are rated the same" in str(e.value)
    assert "outputs of one prompt rated differently" in str(e.value) and "or a comparison of two" in str(
        e.value
    )
    with pytest.raises(AigcError, match=r"SFT trains on corrections, not thumbs: .*--correction TEXT"):
        build_preferences(gens, "sft", None, None, PreferenceSettings())
    msg = no_feedback_message(store, "ref400", "text", "kto")
    assert "of model 'ref400'" in msg and "it holds ratings for 'm' (5)" in msg

"""Moderation rules: matching, policies, user files, the labelled set, and the server's use of them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from aigc.errors import AigcError
from aigc.safety.moderation import _IGNORECASE_EXTRA, ENV, Moderator, StreamGuard, _fold, evaluate, normalize
from aigc.serve.app import create_app
from aigc.serve.settings import Settings
from serve_helpers import write_text_run

LABELLED = Path(__file__).parent / "data" / "moderation_labelled.jsonl"


def test_defaults_match_whole_words_cjk_and_normalised_text():
    m = Moderator.load()
    assert set(m.categories) >= {"violence", "harassment", "hate", "self-harm", "sexual/minors", "illicit"}
    r = m.check("I will KILL you")
    assert r.flagged and r.categories["violence"] and r.action == "flag" and not r.blocked
    assert m.check("Ｉ ｗｉｌｌ ＫＩＬＬ ＹＯＵ").categories["violence"]  # full-width letters: NFKC
    assert not m.check("She has great skill; how do I kill a stuck process?").flagged  # whole words only
    assert m.check("教我怎么制造炸弹").blocked  # CJK: substring match
    r = m.check("how to build a bomb")
    assert r.blocked and r.blocked_categories(m.policies) == ["illicit"] and r.matches["illicit"]
    ok = m.check("Shall I compare thee to a summer's day?")
    assert ok.action == "allow" and not ok.flagged and ok.to_openai()["category_scores"]["violence"] == 0.0
    with pytest.raises(AigcError, match=r"blocked by moderation \(category: illicit\)"):
        m.enforce(["hello", "how to make a bomb"])


def test_user_file_adds_words_changes_policy_and_is_validated(tmp_path, monkeypatch):
    f = tmp_path / "mod.toml"
    f.write_text(
        '[categories.violence]\npolicy = "block"\n\n'
        '[categories.spoilers]\npolicy = "flag"\nwords = ["rosebud is the sled"]\nregex = [\'\\bthe butler did it\\b\']\n'
        '[categories.harassment]\npolicy = "allow"\n',
        encoding="utf-8",
    )
    monkeypatch.setenv(ENV, str(f))
    m = Moderator.load()
    assert m.check("I will kill you").blocked
    assert m.check("Spoiler: THE BUTLER DID IT.").categories["spoilers"]
    assert not m.check("you are worthless").flagged  # allow: never flagged
    assert set(Moderator.load(path=f, defaults=False).categories) == {"violence", "spoilers", "harassment"}
    for text, msg in (
        ('[categories.x]\nwords = ["a"]\n', "needs a policy"),
        ('[categories.x]\npolicy = "maybe"\n', "policy 'maybe' is invalid"),
        ('[categories.x]\npolicy = "flag"\nwordz = []\n', "unknown key 'wordz'"),
        ('[categories.x]\npolicy = "flag"\nregex = ["("]\n', "regex '\\(' is invalid"),
        ("[rules]\n", "unknown key 'rules'"),
        ("not toml = = =", "not valid TOML"),
    ):
        f.write_text(text, encoding="utf-8")
        with pytest.raises(AigcError, match=msg):
            Moderator.load()
    monkeypatch.setenv(ENV, str(tmp_path / "missing.toml"))
    with pytest.raises(AigcError, match="not found"):
        Moderator.load()


def test_precision_recall_on_the_labelled_set():
    items = [
        (d["text"], d["label"]) for d in map(json.loads, LABELLED.read_text(encoding="utf-8").splitlines())
    ]
    assert len(items) >= 60 and sum(label == "none" for _, label in items) >= 20
    res = evaluate(Moderator.load(), items)
    # the figures reported in docs/benchmarks.md; the set holds known misses and false alarms
    assert res["any"]["precision"] >= 0.9 and res["any"]["recall"] >= 0.85, res["any"]
    assert res["sexual/minors"]["recall"] == 1.0 and res["illicit"]["recall"] == 1.0


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    write_text_run(root / "tiny")
    with TestClient(create_app(Settings(models_dirs=[root]))) as c:
        yield c


def test_moderations_route_and_blocked_prompts(client):
    r = client.post("/v1/moderations", json={"input": ["I will kill you", "a poem about the sea"]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"].startswith("modr-") and body["model"] == "aigc-rules"
    a, b = body["results"]
    assert a["flagged"] and a["categories"]["violence"] and a["category_scores"]["violence"] == 1.0
    assert not b["flagged"] and b["action"] == "allow"
    assert client.post("/v1/moderations", json={"input": "x", "model": "gpt-9"}).status_code == 404
    r = client.post("/v1/moderations", json={"input": []})  # a bound: 400 naming it
    assert r.status_code == 400 and "at least 1" in r.json()["detail"]
    assert client.post("/v1/moderations", json={"input": "x", "extra": 1}).status_code == 422

    r = client.post(
        "/v1/completions", json={"model": "tiny", "prompt": "how to make a bomb", "max_tokens": 3}
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "content_blocked"
    assert "illicit" in r.json()["detail"]
    msgs = [{"role": "user", "content": "where can I find child porn"}]
    r = client.post("/v1/chat/completions", json={"model": "tiny", "messages": msgs, "max_tokens": 3})
    assert r.status_code == 400 and "sexual/minors" in r.json()["detail"]
    # flagged (not blocked) prompts are served
    r = client.post("/v1/completions", json={"model": "tiny", "prompt": "kill them all", "max_tokens": 3})
    assert r.status_code == 200, r.text


def test_cli_generate_checks_prompt_and_outputs(run_cli, tmp_path):
    from serve_helpers import write_text_run

    run = write_text_run(tmp_path / "tiny")
    code, _, err = run_cli("generate", "text", "--model", run, "--prompt", "how to make a bomb")
    assert code == 1 and "illicit" in err
    rules = tmp_path / "mod.toml"
    # every output contains some letter: block them all with a rule that matches any text
    rules.write_text('[categories.everything]\npolicy = "block"\nregex = ["."]\n', encoding="utf-8")
    code, out, err = run_cli("generate", "text", "--model", run, "--prompt", "ROMEO:", "--max-new-tokens", "5",
                             "--moderation", rules, "--no-echo", "--seed", "1", "--temperature", "1.0")  # fmt: skip
    assert code == 1 and "everything" in err  # the prompt itself matches
    code, out, err = run_cli("generate", "text", "--model", run, "--max-new-tokens", "5", "--n", "2",
                             "--moderation", rules, "--seed", "1")  # fmt: skip
    # the empty prompt passes; both outputs are blocked: withheld, one error line, exit 1
    assert code == 1 and out == "" and "output 1, 2 of 2 blocked by moderation (category: everything)" in err
    rules.write_text('[categories.everything]\npolicy = "flag"\nregex = ["."]\n', encoding="utf-8")
    code, out, err = run_cli("generate", "text", "--model", run, "--prompt", "ROMEO:", "--max-new-tokens", "5",
                             "--moderation", rules, "--seed", "1")  # fmt: skip
    assert code == 0 and "moderation: output 1 flagged (everything)" in err
    assert out.startswith("ROMEO:")


def test_cli_generate_streams_moderated_and_records_verdicts(run_cli, tmp_path):
    from aigc.feedback.store import Store
    from serve_helpers import write_text_run

    run = write_text_run(tmp_path / "tiny")
    db = tmp_path / "aigc.db"
    rules = tmp_path / "mod.toml"
    rules.write_text('[categories.everything]\npolicy = "block"\nregex = ["[^?\\\\s]"]\n', encoding="utf-8")
    args = ("generate", "text", "--model", run, "--max-new-tokens", "8", "--seed", "2", "--moderation", rules)
    # streamed: the held-back tail never reaches stdout once the text is blocked
    code, out, err = run_cli(*args, "--prompt", "?", "--stream", "--no-echo", "--record", "--db", db)
    assert (
        code == 1
        and out.strip() == ""
        and "output 1 of 1 blocked by moderation (category: everything)" in err
    )
    # a blocked prompt is refused and, with --record, stored with its verdict and no output
    code, _, err = run_cli(*args, "--prompt", "how to make a bomb", "--record", "--db", db)
    assert code == 1 and "illicit" in err
    rules.write_text('[categories.everything]\npolicy = "flag"\nregex = ["[^?\\\\s]"]\n', encoding="utf-8")
    code, out, err = run_cli(*args, "--prompt", "?", "--stream", "--no-echo", "--record", "--db", db)
    assert code == 0 and out.strip() and "moderation: output 1 flagged" in err
    with Store.open(str(db)) as store:
        rows = store.list_generations(limit=10)["data"]
        flagged, prompt, blocked = rows
        assert blocked["moderation"] == "blocked:everything" and blocked["output_text"] is None
        assert (
            prompt["moderation"] == "blocked:everything,illicit" and prompt["prompt"] == "how to make a bomb"
        )
        assert flagged["moderation"] == "flagged:everything" and flagged["output_text"] == out[:-1]
        assert [g["id"] for g in store.list_generations(moderation="blocked")["data"]] == [
            prompt["id"],
            blocked["id"],
        ]
        assert store.list_generations(moderation="none")["data"] == []


# ---------------------------------------------------------------- the quick screen (oracle tests)


def _normalised_alphabet() -> set[str]:
    """Every character `normalize` can give (~1.1 M; ~0.5 s)."""
    out: set[str] = set()
    for y in range(0x110000):
        if not 0xD800 <= y < 0xE000:  # (surrogates)
            out.update(normalize(chr(y)))
    return out


def test_ignorecase_extra_is_what_re_matches_in_normalised_text():
    """The screen's case-sensitive Latin words stand for re.IGNORECASE ones: in normalised text, a
    lowercase ASCII pattern character must match, with re.IGNORECASE, exactly itself and its
    `_IGNORECASE_EXTRA` characters (the dotless i: 'kıll' is 'kill' to re)."""
    import re

    alphabet = _normalised_alphabet()
    near_ascii = re.compile(r"[\x00-\x7f]", re.IGNORECASE)
    candidates = [x for x in alphabet if near_ascii.fullmatch(x)]  # what any ASCII character could match
    assert "ı" in candidates
    for c in sorted({normalize(chr(i)) for i in range(128)}):  # the ASCII characters of normalised words
        got = {x for x in candidates if re.fullmatch(re.escape(c), x, re.IGNORECASE)}
        assert got == set(c + _IGNORECASE_EXTRA.get(c, "")), c


def _texts(m: Moderator, n: int, seed: int) -> list[str]:
    """Texts around the rules' own words and regex matches: case changes, dotless i / long s /
    Kelvin sign / full-width letters, word characters or not at either side, cut words."""
    import random

    rng = random.Random(seed)
    words = [w for c in m.categories.values() for w in c.words]
    phrases = words + ["kill them", "gas all the immigrants", "how do i kill myself", "kids nude",
                       "porn with minors", "how to synthesize sarin", "naked preteen", "murder everyone"]  # fmt: skip
    edges = ["", " ", "a", "_", "1", "é", "ı", "你", ".", "\n", "-"]
    swaps = {"i": ["I", "ı", "İ"], "s": ["S", "ſ"], "k": ["K", "\u212a"], "a": ["A", "ａ"], " ": ["  ", "\t"]}
    out = []
    for _ in range(n):
        p = rng.choice(phrases)
        p = "".join(rng.choice(swaps[ch]) if ch in swaps and rng.random() < 0.3 else ch for ch in p)
        if rng.random() < 0.3:  # cut: a partial phrase at the end
            p = p[: rng.randrange(1, len(p) + 1)]
        out.append(rng.choice(edges) + p + (rng.choice(edges) if rng.random() < 0.7 else ""))
    return out


def test_check_screen_agrees_with_the_category_patterns():
    """`check` runs its category patterns only when the split screen finds something; its verdicts
    must be those of the category patterns (re.IGNORECASE) on every text."""
    m = Moderator.load()
    texts = _texts(m, 3000, 0) + [
        "kıll them",
        "chıld porn",
        "skill them all",
        "KILL_them",
        "ｋｉｌｌ ｔｈｅｍ",
    ]
    hit = 0
    for text in texts:
        t = normalize(text)
        want = {
            n: p is not None and m.policies[n] != "allow" and p.search(t) is not None
            for n, p in m._patterns.items()
        }
        assert m.check(text).categories == want, text
        folded = _fold(t)
        assert any(p.search(folded) for p in m._screen) == any(want.values()), text
        hit += any(want.values())
    assert 0.2 * len(texts) < hit < 0.9 * len(texts)  # both sides exercised
    assert m.check("kıll them").categories["violence"]  # re.IGNORECASE's dotless i, kept


def test_hold_from_agrees_with_partial_matching_of_the_category_patterns():
    """hold_from searches split patterns; the earliest partial match must be the one of the blocking
    categories' whole patterns (the regex module, IGNORECASE) in the text with the dotless i read as
    i, as `check` (re.IGNORECASE) reads it: the regex module's IGNORECASE does not equate them."""
    import regex

    m = Moderator.load()
    whole = [regex.compile(p.pattern, regex.IGNORECASE | regex.DOTALL) for n, p in m._patterns.items()
             if p is not None and m.policies[n] == "block"]  # fmt: skip
    for text in _texts(m, 3000, 1):
        t = normalize(text)
        starts = [x.start() for p in whole if (x := p.search(t.replace("ı", "i"), partial=True)) is not None]
        assert m.hold_from(t) == min(starts, default=len(t)), text
    assert m.hold_from("then buı") == len("then ")  # 'buı' could still become 'buıld a bomb'
    assert m.hold_from("ask the chıl") == len("ask the ")
    # the regexes too: check() blocks their dotless-i spellings, so a stream sends none of them
    assert m.check("how to synthesıze sarin").blocked and m.hold_from("how to synthesı") == 0
    assert m.check("kıds nude").blocked and m.hold_from("kıds ") == 0
    g = StreamGuard(m)
    assert g.feed("how to synthesı") + g.feed("ze sarin now") + g.finish() == "" and g.blocked

"""`aigc history` and `aigc feedback export|rate` against a store in tmp_path ($AIGC_HOME / --db)."""

from __future__ import annotations

import json

import pytest

from aigc.feedback.store import Store


@pytest.mark.parametrize("args", [["history"], ["feedback"], ["feedback", "export"], ["feedback", "rate"]])
def test_help(run_cli, args):
    code, out, _ = run_cli(*args, "--help")
    assert code == 0 and "Usage" in out


@pytest.fixture
def filled(tmp_path):
    """Two text generations on one prompt and an image, in the default store ($AIGC_HOME/aigc.db)."""
    with Store.open() as s:
        a = s.add_generation(kind="text", model="gpt@1", prompt="Say hi", output_text="Hello there!", seed=1)
        b = s.add_generation(kind="text", model="gpt@1", prompt="Say hi", output_text="go away", seed=2)
        c = s.add_generation(kind="image", model="ddpm@1", prompt="a cat", output_ref="a" * 64 + ".png")
    return a, b, c


def test_history_lists_filters_and_pages(run_cli, filled):
    a, b, c = filled
    code, out, _ = run_cli("history", "--json")
    assert code == 0
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["id"] for r in rows] == [c, b, a] and rows[2]["output_text"] == "Hello there!"
    code, out, _ = run_cli("history", "--json", "--kind", "image")
    assert [json.loads(line)["id"] for line in out.splitlines()] == [c]
    code, out, _ = run_cli("history", "--json", "--q", "AWAY")
    assert [json.loads(line)["id"] for line in out.splitlines()] == [b]
    code, out, err = run_cli("history", "--limit", "1")
    assert code == 0 and "ddpm@1" in out and f"--before {c}" in err
    code, out, _ = run_cli("history", "--json", "--limit", "1", "--before", str(c))
    assert [json.loads(line)["id"] for line in out.splitlines()] == [b]


def test_history_moderation_filter(run_cli, filled):
    with Store.open() as s:
        flagged = s.add_generation(
            kind="text", model="gpt@1", prompt="p", output_text="x", moderation="flagged:violence"
        )
        blocked = s.add_generation(kind="text", model="gpt@1", prompt="bad", moderation="blocked:illicit")
    ids = lambda out: [json.loads(line)["id"] for line in out.splitlines()]  # noqa: E731
    assert ids(run_cli("history", "--json", "--moderation", "flagged")[1]) == [flagged]
    assert ids(run_cli("history", "--json", "--moderation", "any")[1]) == [blocked, flagged]
    assert blocked not in ids(run_cli("history", "--json", "--moderation", "none")[1])
    code, out, _ = run_cli("history", "--moderation", "blocked")
    assert code == 0 and "moderation" in out and "blocked" in out  # the column (narrow terminals wrap it)
    code, _, err = run_cli("history", "--moderation", "red")
    assert code == 1 and "flagged, blocked, any, none" in err


def test_history_on_an_empty_or_explicit_db(run_cli, tmp_path):
    db = tmp_path / "other.db"
    Store.open(str(db)).close()  # an empty store
    code, out, err = run_cli("history", "--db", str(db))
    assert code == 0 and out == "" and "no generations" in err
    code, _, err = run_cli("history", "--db", str(db), "--limit", "0")
    assert code == 1 and "limit must be an integer from 1 to 1000" in err


@pytest.mark.parametrize(
    "args",
    [
        ["history"],
        ["feedback", "export", "--format", "dpo", "--out", "x.jsonl"],
        ["feedback", "rate", "1", "1"],
        ["tune", "--model", "m", "--from-feedback"],
    ],  # fmt: skip
    ids=lambda a: " ".join(a[:2]),
)
def test_reading_a_store_that_does_not_exist_is_one_line(run_cli, tmp_path, monkeypatch, args):
    """A typo in --db (or no store yet) is an error, not a new empty database and its folders."""
    monkeypatch.chdir(tmp_path)
    if args[0] == "tune":  # tune checks its model first: one that exists, so the store is next
        from serve_helpers import write_text_run

        write_text_run(tmp_path / "m")
    db = tmp_path / "typo" / "dir" / "x.db"
    code, out, err = run_cli(*args, "--db", str(db))
    assert code == 1 and out == "" and len(err.strip().splitlines()) == 1, err
    assert f"no database at {db}; generate something first" in err and "--db" in err
    assert not (tmp_path / "typo").exists() and not (tmp_path / "x.jsonl").exists()
    code, _, err = run_cli(*args)  # the default store ($AIGC_HOME/aigc.db), before anything was recorded
    assert code == 1 and f"no database at {tmp_path / 'aigc-home' / 'aigc.db'}" in err
    assert not (tmp_path / "aigc-home").exists()


def test_rate_then_export(run_cli, filled, tmp_path):
    a, b, _ = filled
    assert run_cli("feedback", "rate", str(a), "1")[0] == 0
    assert run_cli("feedback", "rate", str(b), "-1", "--comment", "rude", "--user", "ann")[0] == 0
    code, out, _ = run_cli("feedback", "rate", str(b), "2", "--kind", "stars", "--correction", "Hi!")
    assert code == 0 and f"on generation {b}" in out
    code, out, _ = run_cli("history", "--json", "--min-rating", "4")
    assert [json.loads(line)["id"] for line in out.splitlines()] == [a]

    expected = {
        "dpo": [{"prompt": "Say hi", "chosen": "Hello there!", "rejected": "go away"}],
        "kto": [
            {"prompt": "Say hi", "completion": "Hello there!", "label": True},
            {"prompt": "Say hi", "completion": "go away", "label": False},
        ],
        "sft": [{"prompt": "Say hi", "completion": "Hi!"}],
    }
    for fmt, rows in expected.items():
        path = tmp_path / "exports" / f"{fmt}.jsonl"
        code, out, err = run_cli("feedback", "export", "--format", fmt, "--out", str(path))
        assert code == 0, err
        assert [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] == rows
        assert f"wrote {len(rows)} {fmt} rows" in err
    with Store.open() as s:
        assert s.list_ratings()["data"][1]["user"] == "ann"


def test_bad_input_is_one_line_and_exit_1(run_cli, filled, tmp_path):
    a, _, _ = filled
    code, _, err = run_cli("feedback", "rate", "999", "1")
    assert code == 1 and "no such generation" in err
    code, _, err = run_cli("feedback", "rate", str(a), "7", "--kind", "stars")
    assert code == 1 and "from 1 to 5" in err
    code, _, err = run_cli("feedback", "rate", str(a), "0")
    assert code == 1 and "-1 or 1" in err
    out_file = tmp_path / "x.jsonl"
    code, _, err = run_cli("feedback", "export", "--format", "ppo", "--out", str(out_file))
    assert code == 1 and "dpo, kto, sft" in err and not out_file.exists()
    blocker = tmp_path / "f"
    blocker.write_text("")
    code, _, err = run_cli("history", "--db", str(blocker / "x.db"))
    assert code == 1 and "no database at" in err


def test_rating_again_replaces_your_rating(run_cli, filled, monkeypatch):
    """The CLI's rater is --user, else the login name ($LOGNAME / $USER, the password database):
    rating the same generation again replaces that rating."""
    import getpass

    a, _, _ = filled
    monkeypatch.delenv("USER", raising=False)  # no $USER: still a rater, not one anonymous vote a click
    me = getpass.getuser()
    code, out, _ = run_cli("feedback", "rate", str(a), "1")
    assert code == 0 and "replaces" not in out
    code, out, _ = run_cli("feedback", "rate", str(a), "-1", "--comment", "on second thought")
    assert code == 0 and f"replaces {me}'s earlier thumb rating" in out
    run_cli("feedback", "rate", str(a), "5", "--kind", "stars", "--user", "ann")
    with Store.open() as s:
        rows = s.list_ratings()["data"]
        assert sorted((r["user"], r["kind"], r["value"]) for r in rows) == [
            ("ann", "stars", 5),
            (me, "thumb", -1),
        ]
        assert s.get_generation(a)["rating_count"] == 2

"""Simulated raters (aigc.feedback.simulate): thumbs from a scorer, and `simulate_feedback` /
`aigc simulate-feedback` filling the store through the HTTP API (in process, or a live server)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from aigc.errors import AigcError
from aigc.evaluation.scorers import load_scorer
from aigc.feedback.simulate import Rater, read_prompts, simulate_feedback
from aigc.feedback.store import Store
from aigc.serve.app import create_app
from aigc.serve.auth import hash_key
from aigc.serve.settings import Settings
from serve_helpers import LiveServer, write_image_run, write_text_run

SCORER_PY = """
def variety(items):
    return [len(set(t)) / 4 for t in items]

def bright(images):
    import numpy as np
    return [float(np.asarray(im, dtype=float).mean()) / 255 for im in images]
bright.kind = 'image'
"""


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    write_text_run(root / "tiny")
    write_image_run(root / "pix")
    write_image_run(root / "cond", classes=["a", "b"])
    return root


@pytest.fixture
def scorer_file(tmp_path) -> Path:
    f = tmp_path / "rate.py"
    f.write_text(SCORER_PY)
    return f


def ratings_of(db: Path) -> list[tuple[dict, dict]]:
    """(generation, its rating) pairs, as another process reads them back."""
    with Store.open(str(db)) as s:
        gens = s.list_generations(limit=1000)["data"]
        return [(g, s.list_ratings(generation_id=g["id"])["data"][0]) for g in gens]


def test_rater_thresholds_and_noise(scorer_file):
    scorer = load_scorer(f"python:{scorer_file}:variety")
    rater = Rater(scorer, threshold=0.5)
    assert rater.rate("abcd") == 1 and rater.rate("aaaa") == -1 and rater.rate("ab") == 1  # 0.5 >= 0.5
    assert rater.kind == "text"
    items = ["abcd", "aaaa"] * 100
    noisy = Rater(scorer, threshold=0.5, noise=0.25, seed=3)
    thumbs = [t for t, _ in noisy.rate_many(items)]
    flipped = np.mean([t != (1 if i % 2 == 0 else -1) for i, t in enumerate(thumbs)])
    assert 0.15 < flipped < 0.35
    again = [t for t, _ in Rater(scorer, threshold=0.5, noise=0.25, seed=3).rate_many(items)]
    assert again == thumbs  # seeded
    assert Rater(f"python:{scorer_file}:variety").rate("abc") == 1  # a spec works as well
    with pytest.raises(AigcError, match=r"noise 2.0 is out of range; allowed: a probability in \[0, 1\]"):
        Rater(scorer, noise=2.0)


def test_simulate_text_in_process(root, scorer_file, tmp_path):
    db = tmp_path / "store.db"
    rater = Rater(load_scorer(f"python:{scorer_file}:variety"), threshold=0.3)
    settings = Settings(models_dirs=[root], db=str(db), outputs_dir=tmp_path / "out")
    with TestClient(create_app(settings)) as client:
        counts = simulate_feedback(client, "tiny", rater, n=11, prompts=["ROMEO:", "User:"], seed=5,
                                   params={"max_tokens": 12})  # fmt: skip
    assert counts["generated"] == 11 and counts["liked"] + counts["disliked"] == 11
    rows = ratings_of(db)
    assert len(rows) == 11
    # the stored thumbs are the rater's verdicts on the stored texts (an oracle recomputation)
    liked = 0
    for gen, rating in rows:
        score = rater.scorer.score([gen["output_text"]])[0]
        assert rating["value"] == (1 if score >= 0.3 else -1)
        assert rating["kind"] == "thumb" and f"score {score:.3f}" in rating["comment"]
        assert rating["comment"].startswith("simulated rater sim: python:")
        assert gen["model"].startswith("tiny") and gen["prompt"] in ("ROMEO:", "User:")
        liked += rating["value"] == 1
    assert liked == counts["liked"]
    assert sorted(g["seed"] for g, _ in rows) == list(range(5, 16))  # output i: seed + i
    assert sorted(counts["generation_ids"]) == sorted(g["id"] for g, _ in rows)


def test_simulate_images_with_an_app(root, scorer_file, tmp_path):
    db = tmp_path / "store.db"
    app = create_app(Settings(models_dirs=[root], db=str(db), outputs_dir=tmp_path / "out"))
    rater = Rater(load_scorer(f"python:{scorer_file}:bright"), threshold=0.5)
    counts = simulate_feedback(app, "pix", rater, n=3, params={"steps": 2})  # a FastAPI app in process
    assert counts["kind"] == "image" and counts["generated"] == 3
    rows = ratings_of(db)
    assert len(rows) == 3 and all(g["kind"] == "image" and g["output_ref"] for g, _ in rows)
    assert sum(r["value"] == 1 for _, r in rows) == counts["liked"]


def test_simulate_against_a_live_server_with_a_key(root, scorer_file, tmp_path):
    keys = tmp_path / "keys.txt"
    keys.write_text(hash_key("sim-key") + "\n")
    db = tmp_path / "store.db"
    settings = Settings(models_dirs=[root], api_keys_file=keys, db=str(db), outputs_dir=tmp_path / "out")
    rater = Rater(load_scorer(f"python:{scorer_file}:variety"), threshold=0.3)
    with LiveServer(create_app(settings)) as server:
        with pytest.raises(AigcError, match="401"):
            simulate_feedback(server.url, "tiny", rater, n=1)
        counts = simulate_feedback(
            server.url, "tiny", rater, n=3, api_key="sim-key", params={"max_tokens": 6}
        )
    assert counts["generated"] == 3 and len(ratings_of(db)) == 3
    assert all(r["user"] == hash_key("sim-key") for _, r in ratings_of(db))  # the caller's identity


def test_simulate_bad_input(root, scorer_file, tmp_path):
    app = create_app(Settings(models_dirs=[root], db=str(tmp_path / "s.db"), outputs_dir=tmp_path / "o"))
    text_rater = Rater(load_scorer(f"python:{scorer_file}:variety"))
    with pytest.raises(AigcError, match="scores text, but the generations are image"):
        simulate_feedback(app, "pix", text_rater, n=1, kind="image")
    with pytest.raises(AigcError, match="n 0 is out of range"):
        simulate_feedback(app, "tiny", text_rater, n=0)
    with pytest.raises(AigcError, match="404: .*nope"):
        simulate_feedback(app, "nope", text_rater, n=1)
    with pytest.raises(AigcError, match="is not a URL"):
        simulate_feedback("localhost:1", "tiny", text_rater, n=1)
    with pytest.raises(AigcError, match="not both"):
        read_prompts(["a"], tmp_path / "p.txt")
    (tmp_path / "p.txt").write_text("one\n\n two \n")
    assert read_prompts(None, tmp_path / "p.txt") == ["one", "two"]


def test_simulate_feedback_cli(root, scorer_file, tmp_path, run_cli):
    db = tmp_path / "cli.db"
    code, out, err = run_cli(
        "simulate-feedback", "--model", "tiny", "--rater", f"python:{scorer_file}:variety",
        "--threshold", "0.3", "--n", "4", "--prompt", "ROMEO:", "--models", root, "--db", db,
        "--max-tokens", "8", "--seed", "2",
    )  # fmt: skip
    assert code == 0, err
    rows = ratings_of(db)
    liked = sum(r["value"] == 1 for _, r in rows)
    assert out.strip() == f"generated 4, liked {liked}, disliked {4 - liked}"
    assert sorted(g["seed"] for g, _ in rows) == [2, 3, 4, 5]
    code, _, err = run_cli("simulate-feedback", "--model", "tiny", "--rater", "sentiment", "--models", root,
                           "--server", "http://127.0.0.1:1")  # fmt: skip
    assert code == 1 and "one of the two" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli("simulate-feedback", "--model", "tiny", "--rater", "bogus", "--models", root)
    assert code == 1 and "unknown scorer spec 'bogus'" in err
    code, out, _ = run_cli("simulate-feedback", "--help")
    assert code == 0 and "--rater" in out


def test_simulate_feedback_cli_server_unreachable(scorer_file, tmp_path, run_cli):
    import socket

    with socket.socket() as s:  # a port nothing listens on (bound, then freed)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    code, out, err = run_cli("simulate-feedback", "--model", "tiny", "--rater", f"python:{scorer_file}:variety",
                             "--n", "1", "--server", url)  # fmt: skip
    assert code == 1 and out == "" and len(err.strip().splitlines()) == 1, err
    assert (
        f"cannot reach the server at {url} (" in err and "start it with `aigc serve` or check --server" in err
    )


def test_simulate_feedback_cli_images_with_guidance(root, scorer_file, tmp_path, run_cli):
    db = tmp_path / "img.db"
    args = ("simulate-feedback", "--model", "cond", "--rater", f"python:{scorer_file}:bright", "--n", "2",
            "--models", root, "--db", db, "--seed", "4")  # fmt: skip
    code, out, err = run_cli(*args, "--guidance", "0")
    assert code == 0, err
    rows = ratings_of(db)
    assert len(rows) == 2 and all(g["kind"] == "image" for g, _ in rows)
    assert all(g["params"].get("guidance") == 0 for g, _ in rows)
    # guidance on an unconditional model is refused by the server with its one-line reason
    code, _, err = run_cli(*[a if a != "cond" else "pix" for a in args], "--guidance", "3")
    assert code == 1 and "unconditional" in err and len(err.strip().splitlines()) == 1

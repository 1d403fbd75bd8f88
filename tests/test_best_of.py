"""best_of=N at generation time: the Python API (aigc.generation.best_of), `aigc generate text|image
--best-of N --scorer SPEC`, and `/v1/completions` `best_of` + `aigc_scorer` (allowed scorers only;
python: scorers refused from HTTP)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from aigc.errors import AigcError
from aigc.generation.best_of import BestOfResult, generate_best_of, mean_logprob
from aigc.generation.text import TextGenerator
from aigc.serve.app import create_app
from aigc.serve.settings import Settings
from serve_helpers import write_image_run, write_text_run

SCORER_PY = """
def variety(items):
    return [len(set(t)) / 4 for t in items]

def bright(images):
    import numpy as np
    return [float(np.asarray(im, dtype=float).mean()) for im in images]
bright.kind = 'image'
"""


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("models")
    write_text_run(root / "tiny")
    write_image_run(root / "pix")
    return root


@pytest.fixture
def gen(root) -> TextGenerator:
    return TextGenerator.from_artifact(root / "tiny")


@pytest.fixture
def variety_spec(tmp_path) -> str:
    f = tmp_path / "rate.py"
    f.write_text(SCORER_PY)
    return f"python:{f}:variety"


def variety(t: str) -> float:
    return len(set(t)) / 4


# ----------------------------------------------------------------------------- Python API


def test_best_of_picks_the_best_candidate_of_one_batch(gen, variety_spec):
    [best] = generate_best_of(gen, "ROMEO:", best_of=5, scorer=variety_spec, seed=11, max_new_tokens=16)
    # oracle: the candidates are exactly generate(n=5) with seeds 11..15; the winner is the argmax
    cands = gen.generate("ROMEO:", n=5, seed=11, max_new_tokens=16)
    scores = [variety(c.text) for c in cands]
    assert len(set(scores)) > 1  # a real choice
    assert (
        isinstance(best, BestOfResult) and best.best_of == 5 and best.candidate_seeds == list(range(11, 16))
    )
    np.testing.assert_allclose(best.scores, scores)
    assert best.score == max(scores) and best.text == cands[int(np.argmax(scores))].text
    # the winner is reproducible alone from its own seed
    [alone] = gen.generate("ROMEO:", seed=best.seed, max_new_tokens=16)
    assert alone.text == best.text
    assert best.params["best_of"] == 5 and best.params["scorer"] == variety_spec and best.logprobs is None
    d = best.to_dict()
    assert d["scores"] == best.scores and d["best_of"] == 5


def test_n_best_of_several_prompts(gen, variety_spec):
    out = generate_best_of(
        gen, ["ROMEO:", "User:"], best_of=4, scorer=variety_spec, n=2, seed=3, max_new_tokens=10
    )
    assert len(out) == 4 and [r.index for r in out] == [0, 1, 2, 3]
    assert [r.prompt for r in out] == ["ROMEO:", "ROMEO:", "User:", "User:"]
    for a, b in (out[0:2], out[2:4]):
        top2 = sorted(a.scores, reverse=True)[:2]
        assert [a.score, b.score] == top2 and a.scores == b.scores


def test_default_scorer_is_mean_logprob_oracle(gen):
    """Without a scorer, OpenAI's rule: the highest mean token log-probability. The log-probs are
    checked against a plain forward pass of the model (teacher forcing, no cache)."""
    [best] = generate_best_of(gen, "ROMEO:", best_of=4, seed=7, max_new_tokens=12)
    assert best.scorer == "logprob" and best.logprobs is None  # asked for only to rank
    cands = gen.generate("ROMEO:", n=4, seed=7, max_new_tokens=12, logprobs=True)
    prompt_ids = gen.encode("ROMEO:")
    oracle = []
    for c in cands:
        ids = torch.tensor([prompt_ids + c.tokens])
        with torch.no_grad():
            logits, _ = gen.model(ids)
        logp = torch.log_softmax(logits[0, len(prompt_ids) - 1 : -1].float(), -1)  # (T, V)
        oracle.append(float(logp.gather(1, torch.tensor(c.tokens)[:, None]).mean()))
    np.testing.assert_allclose(best.scores, oracle, rtol=1e-4, atol=1e-4)
    assert best.score == max(best.scores) == pytest.approx(mean_logprob(cands[int(np.argmax(oracle))]))
    [kept] = generate_best_of(gen, "ROMEO:", best_of=2, seed=7, max_new_tokens=4, logprobs=True)
    assert kept.logprobs is not None and len(kept.logprobs) == 4  # the caller asked for them


def test_best_of_bad_input(gen, tmp_path):
    (tmp_path / "img.py").write_text(SCORER_PY)
    with pytest.raises(AigcError, match="n 3 is larger than best_of 2"):
        generate_best_of(gen, "a", best_of=2, n=3)
    with pytest.raises(AigcError, match=r"best_of 0 is out of range; allowed: an integer in 1..64"):
        generate_best_of(gen, "a", best_of=0)
    with pytest.raises(AigcError, match="num_beams=1"):
        generate_best_of(gen, "a", best_of=2, num_beams=2)
    with pytest.raises(AigcError, match="scores image, not text"):
        generate_best_of(gen, "a", best_of=2, scorer=f"python:{tmp_path / 'img.py'}:bright")
    with pytest.raises(AigcError, match="unknown scorer spec 'nope'"):
        generate_best_of(gen, "a", best_of=2, scorer="nope")


# ----------------------------------------------------------------------------- CLI


def test_cli_generate_text_best_of(root, variety_spec, run_cli):
    code, out, err = run_cli("generate", "text", "--model", root / "tiny", "--prompt", "ROMEO:", "--best-of", "4",
                             "--scorer", variety_spec, "--seed", "2", "--max-new-tokens", "12", "--json")  # fmt: skip
    assert code == 0, err
    [row] = [json.loads(line) for line in out.strip().splitlines()]
    assert row["best_of"] == 4 and len(row["scores"]) == 4 and row["score"] == max(row["scores"])
    assert row["seed"] in range(2, 6) and "best of 4 by" in err
    code, _, err = run_cli("generate", "text", "--model", root / "tiny", "--best-of", "2", "--stream")
    assert code == 1 and "--best-of 1" in err
    code, _, err = run_cli(
        "generate", "text", "--model", root / "tiny", "--best-of", "2", "--scorer", "digit:7"
    )
    assert code == 1 and "digit:K@DATA_DIR" in err and len(err.strip().splitlines()) == 1


def test_cli_generate_image_best_of(root, tmp_path, run_cli):
    from PIL import Image

    from aigc.generation.image_io import read_png_params

    f = tmp_path / "img.py"
    f.write_text(SCORER_PY)
    out_dir = tmp_path / "imgs"
    code, _, err = run_cli("generate", "image", "--model", root / "pix", "--out", out_dir, "--n", "2",
                           "--best-of", "3", "--scorer", f"python:{f}:bright", "--steps", "2")  # fmt: skip
    assert code == 0, err
    pngs = sorted(out_dir.glob("image-*.png"))
    assert len(pngs) == 2 and "kept 2 of 6" in err
    params = [read_png_params(p) for p in pngs]
    assert params[0]["best_of"] == 6 and params[0]["score"] >= params[1]["score"]
    # oracle: the scores recorded are the scorer's on the saved pixels
    assert params[0]["score"] == pytest.approx(
        float(np.asarray(Image.open(pngs[0]), dtype=float).mean()), abs=1e-6
    )
    code, _, err = run_cli(
        "generate", "image", "--model", root / "pix", "--out", tmp_path / "x", "--best-of", "3"
    )
    assert code == 1 and "with --scorer" in err and not (tmp_path / "x").exists()


def test_cli_serve_refuses_python_scorers(run_cli, tmp_path):
    code, _, err = run_cli("serve", "--models", tmp_path, "--scorer", "python:x.py:f")
    assert code == 1 and "python: scorers run code" in err


# ----------------------------------------------------------------------------- server


def train_sentiment(home: Path) -> Path:
    from aigc.evaluation.sentiment import train_classifier

    pos, neg = ["great", "love", "wonderful"], ["awful", "hate", "boring"]
    lines = [f"the {w} thing {i}\t{int(w in pos)}" for i in range(30) for w in pos + neg]
    f = home.parent / "sent.tsv"
    f.write_text("\n".join(lines) + "\n")
    return train_classifier(f, home / "models" / "sent")


@pytest.fixture
def client(root, tmp_path):
    settings = Settings(models_dirs=[root], db=str(tmp_path / "s.db"), outputs_dir=tmp_path / "out")
    with TestClient(create_app(settings)) as c:
        yield c


def test_server_best_of_default_rank(client, gen):
    body = {"model": "tiny", "prompt": "ROMEO:", "max_tokens": 10, "seed": 4, "best_of": 3, "n": 2}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    choices = out["choices"]
    assert len(choices) == 2 and len(out["generation_ids"]) == 2
    assert choices[0]["score"] >= choices[1]["score"] and len(choices[0]["scores"]) == 3
    assert choices[0]["logprobs"] is None  # not asked for
    # the same texts as the Python API for the same seed (server == library)
    lib = generate_best_of(gen, "ROMEO:", best_of=3, n=2, seed=4, max_new_tokens=10)
    assert [c["text"] for c in choices] == [x.text for x in lib]
    np.testing.assert_allclose(choices[0]["scores"], lib[0].scores, rtol=1e-5)
    # each chosen text is what a plain request with its seed gives
    plain = client.post("/v1/completions", json={"model": "tiny", "prompt": "ROMEO:", "max_tokens": 10,
                                                  "seed": choices[0]["seed"]}).json()  # fmt: skip
    assert plain["choices"][0]["text"] == choices[0]["text"]
    row = client.get(f"/v1/generations/{out['generation_ids'][0]}").json()
    assert row["params"]["best_of"] == 3 and row["params"]["scorer"] == "logprob"


def test_server_best_of_with_allowed_scorer(root, tmp_path):
    from aigc.evaluation.sentiment import load_classifier

    clf = train_sentiment(tmp_path / "aigc-home")
    settings = Settings(models_dirs=[root], db=str(tmp_path / "s.db"), outputs_dir=tmp_path / "out")
    with TestClient(create_app(settings)) as c:
        body = {"model": "tiny", "prompt": "", "max_tokens": 12, "seed": 1, "best_of": 4}
        a = c.post("/v1/completions", json={**body, "aigc_scorer": "sentiment"})
        b = c.post("/v1/completions", json={**body, "aigc_scorer": "default"})  # the first allowed
        assert a.status_code == 200 and b.status_code == 200, a.text
        ca, cb = a.json()["choices"][0], b.json()["choices"][0]
        assert ca == cb
        p = load_classifier(clf).predict_proba([ca["text"]])[0, 1]  # oracle: the classifier itself
        assert ca["score"] == pytest.approx(float(p), rel=1e-5) and ca["score"] == max(ca["scores"])
        row = c.get(f"/v1/generations/{a.json()['generation_ids'][0]}").json()
        assert row["params"]["scorer"] == "sentiment"


@pytest.mark.parametrize(
    "extra, status, match",
    [
        ({"best_of": 2, "aigc_scorer": "python:/tmp/evil.py:f"}, 400, "python: scorers run code"),
        ({"best_of": 2, "aigc_scorer": "python:os:system"}, 400, "never accepted from a request"),
        (
            {"best_of": 2, "aigc_scorer": "label:x@/etc"},
            400,
            "not allowed on this server; allowed: logprob, default, sentiment",
        ),
        (
            {"best_of": 2, "aigc_scorer": "sentiment"},
            400,
            "scorer sentiment is not available: no trained classifier",
        ),
        ({"aigc_scorer": "sentiment"}, 400, "give best_of too"),
        ({"best_of": 2, "n": 3}, 400, "n 3 is larger than best_of 2"),
        ({"best_of": 2, "stream": True}, 400, "cannot be streamed"),
        ({"best_of": 17}, 400, "best_of: Input should be less than or equal to 16"),
        ({"best_of": 0}, 400, "best_of: Input should be greater than or equal to 1"),
    ],
)
def test_server_best_of_bad_requests(client, extra, status, match):
    r = client.post("/v1/completions", json={"model": "tiny", "prompt": "a", "max_tokens": 2, **extra})
    assert r.status_code == status, r.text
    assert match in r.json()["detail"]
    assert len(r.json()["detail"].splitlines()) == 1


def test_server_without_scorers(root, tmp_path):
    settings = Settings(models_dirs=[root], db=str(tmp_path / "s.db"), outputs_dir=tmp_path / "o", scorers=[])
    with TestClient(create_app(settings)) as c:
        r = c.post("/v1/completions", json={"model": "tiny", "best_of": 2, "aigc_scorer": "default"})
        assert r.status_code == 400 and "allows no scorers" in r.json()["detail"]
        r = c.post("/v1/completions", json={"model": "tiny", "best_of": 2, "max_tokens": 3})
        assert r.status_code == 200 and math.isfinite(r.json()["choices"][0]["score"])


@pytest.mark.slow
def test_cli_generate_image_best_of_digit_scorer(root, tmp_path, run_cli):
    """The documented command: `--scorer digit:K@DATA_DIR` trains (then caches) the data set's
    classifier; the kept images are the top scores of the n * best_of candidates."""
    from aigc.data.images import prepare_images
    from aigc.evaluation.scorers import load_scorer
    from aigc.generation.image_io import read_png_params

    data = tmp_path / "d8"
    prepare_images("digits", data, overrides=["size=8", "limit=600"])
    code, _, err = run_cli("generate", "image", "--model", root / "pix", "--out", tmp_path / "imgs", "--n", "3",
                           "--best-of", "4", "--scorer", f"digit:3@{data}", "--steps", "2", "--seed", "1")  # fmt: skip
    assert code == 0, err
    params = [read_png_params(p) for p in sorted((tmp_path / "imgs").glob("image-*.png"))]
    assert len(params) == 3 and "kept 3 of 12" in err
    kept = [p["score"] for p in params]
    assert kept == sorted(kept, reverse=True)
    # oracle: the same 12 candidates scored directly; the kept ones are the top 3
    from aigc.generation.image import ImageGenerator

    cands = ImageGenerator.load(root / "pix").generate(n=12, seed=1, steps=2)
    scores = load_scorer(f"digit:3@{data}").score(cands.images)
    np.testing.assert_allclose(kept, sorted(scores, reverse=True)[:3], rtol=1e-5)

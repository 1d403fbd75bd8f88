"""Registry errors through the HTTP app: a version that cannot be loaded, retrieve ids, messages."""

from __future__ import annotations

import logging
import time

import pytest
from fastapi.testclient import TestClient

from aigc.serve import settings as S
from aigc.serve.app import create_app
from aigc.serve.settings import Settings
from serve_helpers import models_dir, write_text_run


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    with TestClient(create_app(Settings(models_dirs=[models_dir(tmp_path_factory.mktemp("models"))]))) as c:
        yield c


def _complete(client, model, stream=False):
    return client.post(
        "/v1/completions", json={"model": model, "prompt": "A", "max_tokens": 3, "stream": stream}
    )


def _truncate_weights(run):
    """A copy in progress: the weights' first 1000 bytes. Returns the repair."""
    weights = run / "model.safetensors"
    whole = weights.read_bytes()
    weights.write_bytes(whole[:1000])
    return lambda: weights.write_bytes(whole)


def _drop_tokenizer(run):
    tok = run / "tokenizer.json"
    text = tok.read_text(encoding="utf-8")
    tok.unlink()
    return lambda: tok.write_text(text, encoding="utf-8")


@pytest.mark.parametrize(
    ("breakage", "problem"),
    [
        (_truncate_weights, "its weights could not be read: "),
        (_drop_tokenizer, "its tokenizer.json is missing"),
    ],
)
def test_a_broken_version_is_a_json_503_the_plain_name_falls_back_and_a_repair_is_picked_up(
    tmp_path, caplog, breakage, problem
):
    root = tmp_path / "models"
    write_text_run(root / "poet" / "1", seed=1)
    repair = breakage(write_text_run(root / "poet" / "3", seed=3))
    with (
        TestClient(create_app(Settings(models_dirs=[root]))) as c,
        caplog.at_level(logging.INFO, "aigc.serve"),
    ):
        # the plain name goes to the newest version that loads: a half-copied one does not take it down
        r = _complete(c, "poet")
        assert r.status_code == 200 and r.json()["model"] == "poet@1"
        # the version asked for by name stays strict: one JSON line naming it, what is wrong, what to do
        for stream in (False, True):  # (streamed requests take the lane first)
            r = _complete(c, "poet@3", stream)
            assert r.status_code == 503 and r.headers["content-type"].startswith("application/json")
            err = r.json()
            assert err["detail"] == err["error"]["message"] and err["error"]["code"] == "model_unavailable"
            assert err["detail"].startswith(f"model 'poet@3' cannot be loaded: {problem}")
            assert err["detail"].endswith(
                "; fix or remove the folder poet/3 in the models dir, or ask for poet@1"
            )
            assert str(tmp_path) not in err["detail"] and "Traceback" not in r.text
        assert _complete(c, "poet").json()["model"] == "poet@1"
        card = c.get("/v1/models/poet").json()
        assert (card["id"], card["root"], card["versions"]) == ("poet", "poet@1", ["poet@1", "poet@3"])
        assert problem in c.get("/v1/models/poet@3/details").json()["load_error"]
        # the log: one warning line for the failure, however many requests, and no traceback
        warnings = [rec for rec in caplog.records if rec.levelno >= logging.WARNING]
        assert len(warnings) == 1 and "poet@3" in warnings[0].getMessage() and not warnings[0].exc_info
        # the repaired files are loaded without a restart, under both ids
        repair()
        time.sleep(S.RESCAN_INTERVAL_S + 0.1)
        assert _complete(c, "poet@3").status_code == 200
        assert _complete(c, "poet").json()["model"] == "poet@3"
        assert c.get("/v1/models/poet").json()["root"] == "poet@3"
        assert c.get("/v1/models/poet@3/details").json()["load_error"] is None


def test_a_model_with_no_version_that_loads_is_a_503_naming_its_folder(tmp_path):
    root = tmp_path / "models"
    _truncate_weights(write_text_run(root / "solo"))
    _truncate_weights(write_text_run(root / "poet" / "1"))
    _drop_tokenizer(write_text_run(root / "poet" / "2"))
    with TestClient(create_app(Settings(models_dirs=[root]))) as c:
        r = _complete(c, "solo")
        assert r.status_code == 503
        assert r.json()["detail"].endswith("; fix or remove the folder solo in the models dir")
        r = _complete(c, "poet")  # every version fails: no other to suggest
        assert r.status_code == 503 and "poet@" in r.json()["detail"] and "ask for" not in r.json()["detail"]
        assert _complete(c, "poet@1").json()["detail"].endswith("the folder poet/1 in the models dir")


def test_retrieve_answers_the_id_asked_for_as_the_list_does(client):
    import openai

    listed = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    assert client.get("/v1/models/story").json() == listed["story"]
    assert listed["story"]["root"] == "story@2" and listed["tiny"]["root"] == "tiny"
    one = client.get("/v1/models/story@1").json()
    assert (one["id"], one["root"], one["versions"]) == ("story@1", "story@1", ["story@1", "story@2"])
    oai = openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=client, max_retries=0)
    for model_id in ("story", "story@1", "story@2", "tiny"):
        assert oai.models.retrieve(model_id).id == model_id


@pytest.mark.parametrize(
    ("path", "body", "words"),
    [
        ("/v1/completions", {"model": "pix", "prompt": "a"}, "model 'pix' is an image model; this route needs a text model"),
        ("/v1/images/generations", {"model": "tiny", "prompt": "a"}, "model 'tiny' is a text model; this route needs an image model"),
    ],
)  # fmt: skip
def test_a_model_of_another_kind_is_named_with_its_article(client, path, body, words):
    r = client.post(path, json=body)
    assert r.status_code == 400 and r.json()["detail"] == words

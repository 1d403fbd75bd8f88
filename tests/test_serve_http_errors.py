"""HTTP-level refusals: bodies not sent as JSON, unparseable JSON, counted 413s; the key tool."""

from __future__ import annotations

import json
import re

import pytest
from fastapi.testclient import TestClient

from aigc.serve import settings as S
from aigc.serve.app import create_app
from aigc.serve.auth import MIN_KEY_CHARS, hash_key, main
from aigc.serve.settings import Settings
from serve_helpers import write_text_run


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    write_text_run(root / "tiny")
    with TestClient(create_app(Settings(models_dirs=[root]))) as c:
        yield c


@pytest.mark.parametrize("stream", [False, True])  # (streamed requests go through the lane first)
@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded"])
def test_a_json_body_not_sent_as_json_is_415_naming_the_content_type(client, content_type, stream):
    body = json.dumps({"model": "tiny", "prompt": "a", "max_tokens": 2, "stream": stream})
    r = client.post("/v1/completions", content=body, headers={"content-type": content_type})
    assert r.status_code == 415
    detail = r.json()["detail"]
    assert "Content-Type: application/json" in detail and content_type in detail
    assert "b'" not in detail  # not the raw bytes' repr
    ok = client.post("/v1/completions", content=body, headers={"content-type": "application/json"})
    assert ok.status_code == 200


def test_json_nested_too_deeply_is_422_malformed_json(client):
    r = client.post("/v1/completions", content=b"[" * 50_000 + b"]" * 50_000,
                    headers={"content-type": "application/json"})  # fmt: skip
    assert r.status_code == 422
    assert r.json()["error"]["code"] == "invalid_json" and "nested" in r.json()["detail"]


def test_a_413_is_counted_in_metrics(client):
    def count() -> int:
        line = 'aigc_requests_total{method="POST",route="unmatched",status="413"} '
        m = re.search(re.escape(line) + r"(\d+)", client.get("/metrics").text)
        return int(m.group(1)) if m else 0

    before = count()
    r = client.post("/v1/completions", content=b"x" * (S.MAX_BODY_BYTES + 1),
                    headers={"content-type": "application/json"})  # fmt: skip
    assert r.status_code == 413
    assert count() == before + 1


def test_key_tool_help_new_and_refusals(capsys):
    assert main(["--help"]) == 0 and "usage" in capsys.readouterr().out
    for argv in ([], ["-x"], ["a", "b"]):
        assert main(argv) == 1 and "usage" in capsys.readouterr().err
    for short in ("", "abc", "k" * (MIN_KEY_CHARS - 1)):
        assert main([short]) == 1
        assert f"at least {MIN_KEY_CHARS} characters" in capsys.readouterr().err
    key = "k" * MIN_KEY_CHARS
    assert main([key]) == 0 and capsys.readouterr().out.strip() == hash_key(key)
    assert main(["--new"]) == 0
    out = dict(line.split(":  ", 1) if line.startswith("key") else line.split(": ", 1)
               for line in capsys.readouterr().out.splitlines())  # fmt: skip
    assert len(out["key"]) >= MIN_KEY_CHARS and out["line"] == hash_key(out["key"])


def test_watermark_detect_takes_json_only_as_json(client):
    body = json.dumps({"text": "hello there", "model": "tiny"})
    r = client.post(
        "/v1/watermark/detect", content=body, headers={"content-type": "application/x-www-form-urlencoded"}
    )
    assert r.status_code == 415 and "Content-Type: application/json" in r.json()["detail"]
    r = client.post("/v1/watermark/detect", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 200, r.text

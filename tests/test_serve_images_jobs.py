"""POST /v1/images/generations and /v1/jobs: a prompt naming a class (the official `openai` client),
per-image seeds that replay alone, jobs admitted as the direct route admits a request, a job's
result shaped like the direct response, and the status a cancel answers."""

from __future__ import annotations

import base64
import io
import json
import time

import httpx
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from aigc.serve.app import create_app
from aigc.serve.settings import Settings
from serve_helpers import LiveServer, write_image_run

DIGITS = [str(i) for i in range(10)]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    write_image_run(root / "digits", classes=DIGITS)  # class-conditional, classes "0".."9"
    write_image_run(root / "pets", classes=["cat", "dog", "Owl"])
    write_image_run(root / "pix")  # unconditional
    return root


@pytest.fixture(scope="module")
def client(root):
    with TestClient(create_app(Settings(models_dirs=[root]))) as c:
        yield c


def pixels(item: dict) -> bytes:
    b64 = item["b64_json"] if item.get("b64_json") else item["url"].split(",", 1)[1]
    return Image.open(io.BytesIO(base64.b64decode(b64))).tobytes()


def assert_same_image(a: bytes, b: bytes, what: str) -> None:
    """Equal up to the rounding of a batched pass against a single one (see images.BATCH): a few
    8-bit levels at most, well under one level on average."""
    import numpy as np

    d = np.abs(np.frombuffer(a, np.uint8).astype(int) - np.frombuffer(b, np.uint8).astype(int))
    assert len(a) == len(b) and d.max() <= 4 and d.mean() < 0.5, f"{what}: max {d.max()}, mean {d.mean():.3f}"


def images(client, **body) -> dict:
    r = client.post("/v1/images/generations", json={"steps": 2, **body})
    assert r.status_code == 200, r.text
    return r.json()


# ---------------------------------------------------------------------------- a prompt names a class


def test_openai_client_prompt_names_a_class(root):
    import openai

    with LiveServer(create_app(Settings(models_dirs=[root]))) as live:
        oa = openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0)
        body = {"seed": 1, "steps": 2}
        img = oa.images.generate(model="digits", prompt="3", n=1, size="8x8", extra_body=body)
        assert (
            img.model_extra["parameters"]["label"] == 3
            and img.data[0].model_extra["parameters"]["label"] == 3
        )
        by_label = httpx.post(
            live.url + "/v1/images/generations", json={"model": "digits", "label": "3", **body}
        )
        assert pixels({"b64_json": img.data[0].b64_json}) == pixels(by_label.json()["data"][0])
        # "" is no prompt: the label given in extra_body stands (or none: the classes cycle)
        img = oa.images.generate(model="digits", prompt="", n=2, extra_body={**body, "label": 5})
        assert [d.model_extra["parameters"]["label"] for d in img.data] == [5, 5]
        img = oa.images.generate(model="pix", prompt="", extra_body=body)
        assert img.model_extra["parameters"]["label"] is None
        # case and surrounding spaces are ignored; a label that agrees is fine
        img = oa.images.generate(model="pets", prompt=" owl ", extra_body={**body, "label": 2})
        assert img.model_extra["parameters"]["label"] == 2
        with pytest.raises(openai.BadRequestError) as e:  # prompt and label disagree: both named
            oa.images.generate(model="digits", prompt="7", extra_body={**body, "label": 3})
        assert "'7'" in str(e.value) and "label 3" in str(e.value)
        with pytest.raises(openai.BadRequestError) as e:  # not a class: the classes are listed
            oa.images.generate(model="pets", prompt="a cat on a mat", extra_body=body)
        assert "'cat', 'dog', 'Owl'" in str(e.value)
        with pytest.raises(openai.BadRequestError, match="takes no prompt"):
            oa.images.generate(model="pix", prompt="3", extra_body=body)


# ---------------------------------------------------------------------------- per-image seeds


@pytest.mark.parametrize(
    "body",
    [
        {"model": "digits", "label": 3, "sampler": "ddpm"},
        {"model": "digits", "sampler": "dpm", "guidance": 2.0},  # no label: classes cycle 0, 1, 2
        {"model": "pix", "sampler": "dpm-sde"},  # fresh noise at every step, from the image's own seed
    ],
)
def test_each_image_replays_alone_with_its_seed(client, body):
    out = images(client, **body, n=3, seed=7)
    assert out["seed"] == 7 and [d["seed"] for d in out["data"]] == [7, 8, 9]
    assert out["parameters"] == out["data"][0]["parameters"]
    for i, item in enumerate(out["data"]):
        p = item["parameters"]
        png = Image.open(io.BytesIO(base64.b64decode(item["b64_json"])))
        assert p["seed"] == 7 + i and json.loads(png.text["parameters"])["seed"] == 7 + i  # the PNG too
        row = client.get(f"/v1/generations/{out['generation_ids'][i]}").json()
        assert row["seed"] == 7 + i and item["generation_id"] == out["generation_ids"][i]
        label = {"label": p["label"]} if p["label"] is not None else {}
        [alone] = images(client, **{**body, **label}, n=1, seed=item["seed"])["data"]
        assert_same_image(pixels(alone), pixels(item), f"image {i} against n=1 with seed {item['seed']}")
    assert len({pixels(d) for d in out["data"]}) == 3


# ---------------------------------------------------------------------------- jobs


def job_post(client, **input_) -> object:
    return client.post("/v1/jobs", json={"type": "images.generations", "input": input_})


def wait(client, job_id: str, until=("succeeded", "failed", "cancelled")) -> dict:
    deadline = time.monotonic() + 60
    while (view := client.get(f"/v1/jobs/{job_id}").json())["status"] not in until:
        assert time.monotonic() < deadline, view
        time.sleep(0.02)
    return view


@pytest.mark.parametrize(
    "input_",
    [
        {"model": "digits", "label": "55"},
        {"model": "digits", "prompt": "seven"},
        {"model": "digits", "prompt": "7", "label": 3},
        {"model": "pix", "prompt": "3"},
        {"model": "pix", "label": 1},
        {"model": "pix", "size": "16x16"},
        {"model": "nope"},
    ],
)
def test_job_input_is_checked_at_submit_as_the_direct_route_checks_it(client, input_):
    direct = client.post("/v1/images/generations", json=input_)
    job = job_post(client, **input_)
    assert direct.status_code in (400, 404) and job.status_code == direct.status_code, job.text
    assert job.json()["detail"] == direct.json()["detail"]


def test_job_result_has_the_direct_response_fields_and_images(client):
    body = {"model": "digits", "n": 3, "seed": 5, "steps": 2}
    r = job_post(client, **body)
    assert r.status_code == 202, r.text
    done = wait(client, r.json()["id"])
    assert done["status"] == "succeeded", done
    result, direct = done["result"], images(client, **body)
    assert set(direct) <= set(result) and result["seed"] == 5
    assert result["parameters"] == result["data"][0]["parameters"]
    assert result["generation_ids"] == [d["generation_id"] for d in result["data"]]
    assert all(gid is not None for gid in result["generation_ids"])
    for mine, theirs in zip(result["data"], direct["data"], strict=True):  # image i: seed 5 + i either way
        assert set(theirs) <= set(mine) and mine["seed"] == theirs["seed"]
        assert mine["parameters"]["label"] == theirs["parameters"]["label"]
        assert pixels(mine) == pixels(theirs)


def test_cancel_answers_the_status_the_events_end_with(client):
    r = job_post(client, model="pix", n=8, steps=40)
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    wait(client, job_id, until=("running",))
    cancelled = client.post(f"/v1/jobs/{job_id}/cancel").json()
    assert cancelled["status"] == "cancelled" and cancelled["eta_s"] is None
    with client.stream("GET", f"/v1/jobs/{job_id}/events") as s:
        lines = [ln for ln in s.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]" and json.loads(lines[-2][6:])["status"] == "cancelled"
    step = cancelled["progress"]["step"]
    images(client, model="pix", n=1, seed=1)  # waits for the model: the image being made has ended
    after = client.get(f"/v1/jobs/{job_id}").json()
    assert after["status"] == "cancelled" and after["progress"]["step"] == step < 8  # it was dropped
    if step:  # the images made before the cancel are kept
        assert len(after["result"]["data"]) == step == len(after["result"]["generation_ids"])
    assert client.post(f"/v1/jobs/{job_id}/cancel").json()["status"] == "cancelled"  # idempotent


def test_pipeline_images_replay_alone_as_the_server_makes_them(tmp_path):
    """A text-to-image pipeline under the server's settings (its own generator per image, BATCH at a
    time): image i of n is the single image of seed + i."""
    import numpy as np

    from aigc.generation.image import ImageGenerator
    from aigc.serve.routes.images import BATCH
    from test_images_generation import _tiny_sd_pipeline

    gen = ImageGenerator.load(f"hf:{_tiny_sd_pipeline(tmp_path)}")
    kw = dict(prompt="a cat", steps=2, size=32, guidance=2.0, seed_per_image=True, batch_size=BATCH)
    out = gen.generate(n=3, seed=4, **kw)
    assert [p["seed"] for p in out.params] == [4, 5, 6]
    for i in range(3):
        [alone] = gen.generate(n=1, seed=4 + i, **kw).images
        assert_same_image(np.asarray(out.images[i]).tobytes(), np.asarray(alone).tobytes(), f"image {i}")


# ---------------------------------------------------------------------------- coalescing


def test_requests_waiting_for_a_running_call_are_made_together(root):
    """Requests that arrive while a call runs and share sampler, steps, guidance and size run next as
    one call; each keeps its own seeds, labels, indices and images (those it gets alone)."""
    import asyncio

    from aigc.serve.registry import ModelRegistry
    from aigc.serve.routes.images import ImageQueue, run_images
    from aigc.serve.schemas import ImageRequest

    reg = ModelRegistry(Settings(models_dirs=[root]))
    lm = reg.get("digits", "image")
    calls, generate = [], lm.generator.generate

    def counting(**kw):
        calls.append(kw["n"])
        return generate(**kw)

    def body(**kw) -> ImageRequest:
        return ImageRequest(**{"model": "digits", "steps": 2, "sampler": "ddpm", **kw})

    requests = [
        (body(n=2, label=3), 7),
        (body(n=1), 20),
        (body(n=3, label="1"), 30),
        (body(n=1, steps=3), 40),
    ]

    async def main():
        queue = ImageQueue(lm)
        lm.lock.acquire()  # the first call waits in its thread until the others are queued
        first = asyncio.ensure_future(queue.generate(*requests[0]))
        await asyncio.sleep(0)
        rest = [asyncio.ensure_future(queue.generate(*r)) for r in requests[1:]]
        await asyncio.sleep(0.05)
        assert queue.running and len(queue.waiting) == 3
        lm.lock.release()
        return await asyncio.gather(first, *rest), queue

    lm.generator.generate = counting
    try:
        outs, queue = asyncio.run(main())
    finally:
        lm.generator.generate = generate
    assert calls == [2, 1 + 3, 1] and (queue.calls, queue.merged) == (3, 2)  # steps=3: a call of its own
    for (b, seed), (pngs, params) in zip(requests, outs, strict=True):
        alone_pngs, alone_params = run_images(lm, b, seed)
        assert [p["seed"] for p in params] == [seed + i for i in range(b.n)]
        assert [(p["index"], p["n"], p["label"]) for p in params] == [
            (p["index"], p["n"], p["label"]) for p in alone_params
        ]
        for i, (x, y) in enumerate(zip(pngs, alone_pngs, strict=True)):
            assert_same_image(pixels({"b64_json": base64.b64encode(x)}), pixels({"b64_json": base64.b64encode(y)}),
                              f"request seed {seed}, image {i}")  # fmt: skip
    assert [p["label"] for p in outs[1][1]] == [0] and [p["label"] for p in outs[2][1]] == [1, 1, 1]
    reg.close()


def test_a_request_that_gives_up_while_waiting_leaves_the_queue(root):
    import asyncio

    from aigc.serve.registry import ModelRegistry
    from aigc.serve.routes.images import ImageQueue
    from aigc.serve.schemas import ImageRequest

    reg = ModelRegistry(Settings(models_dirs=[root]))
    lm = reg.get("pix", "image")
    body = ImageRequest(model="pix", steps=2, sampler="ddpm")

    async def main():
        queue = ImageQueue(lm)
        lm.lock.acquire()
        first = asyncio.ensure_future(queue.generate(body, 1))
        await asyncio.sleep(0)
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(queue.generate(body, 2), 0.05)
        assert queue.waiting == []
        lm.lock.release()
        await first
        return queue

    queue = asyncio.run(main())
    assert (queue.calls, queue.merged, queue.running) == (1, 0, False)
    reg.close()

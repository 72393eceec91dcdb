"""The HTTP server on 127.0.0.1: endpoints, clear 4xx errors, and a bounded mixed-task load test."""

import asyncio
import time

import httpx
import pytest
import torch

from adamix_zoo.serving import ServingEngine
from adamix_zoo.serving.server import ServerSettings, create_app, latency_summary
from tests.test_serving_utils import (
    RunningServer,
    make_task,
    reference,
    sentence,
    standard_tasks,
    tiny_tokenizer,
)
from tests.tiny import tiny_model


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    return standard_tasks(tmp_path_factory.mktemp("tasks"))


@pytest.fixture(scope="module")
def server(tasks, tmp_path_factory):
    engine = ServingEngine(
        tiny_model("bert", head="base"), tiny_tokenizer(), capacity=8, max_chars=500
    )
    for name in ("lora4", "lora8", "adapter"):
        engine.attach(tasks[name])
    settings = ServerSettings(
        max_batch_size=16,
        max_wait_ms=20,
        max_inputs=8,
        allow_load=True,
        load_dirs=[tmp_path_factory.getbasetemp()],
    )
    with RunningServer(create_app(engine, settings)) as running:
        yield running


@torch.no_grad()
def offline(folder, text) -> torch.Tensor:
    """Probabilities (or the regression value) of the task served alone on this one input."""
    batch = dict(tiny_tokenizer()([text], return_tensors="pt"))
    logits = reference(folder)(**batch)[0]
    return logits if logits.numel() == 1 else torch.softmax(logits, -1)


def check_answer(folder, text, prediction) -> None:
    expected = offline(folder, tuple(text) if isinstance(text, list) else text)
    if expected.numel() == 1:
        assert prediction["label"] is None and prediction["score"] == pytest.approx(
            expected.item(), abs=1e-5
        )
        return
    torch.testing.assert_close(torch.tensor(list(prediction["scores"].values())), expected)
    assert prediction["label"] == list(prediction["scores"])[int(expected.argmax())]


def test_predict_one_and_many_inputs_with_pairs(server, tasks):
    one = httpx.post(f"{server.url}/v1/predict", json={"task": "lora4", "inputs": "w5 w6 w7"})
    assert one.status_code == 200, one.text
    body = one.json()
    assert (
        body["task"] == "lora4" and body["version"] == "lora4-v1" and len(body["predictions"]) == 1
    )
    check_answer(tasks["lora4"], "w5 w6 w7", body["predictions"][0])
    inputs = ["w8 w9", ["w10 w11", "w12"], sentence(3, 20)]
    many = httpx.post(f"{server.url}/v1/predict", json={"task": "adapter", "inputs": inputs}).json()
    assert [list(p["scores"]) for p in many["predictions"]] == [["adapter_0", "adapter_1"]] * 3
    for text, prediction in zip(inputs, many["predictions"]):
        check_answer(tasks["adapter"], text, prediction)


def test_bad_requests_get_clear_4xx_and_the_server_keeps_serving(server):
    url = f"{server.url}/v1/predict"
    cases = [
        (
            dict(
                content=b'{"task": "lora4", "inputs": [',
                headers={"content-type": "application/json"},
            ),
            400,
            "malformed JSON",
        ),
        (
            dict(json={"task": "nope", "inputs": "w5"}),
            404,
            "unknown task 'nope'; attached: ['adapter', 'lora4', 'lora8']",
        ),
        (
            dict(json={"task": "lora4", "inputs": " ".join(["w5"] * 70)}),
            400,
            "input 0 has 72 tokens; the limit is 64",
        ),
        (
            dict(json={"task": "lora4", "inputs": "x" * 501}),
            400,
            "input 0 has 501 characters; the limit is 500",
        ),
        (
            dict(json={"task": "lora4", "inputs": ["w5"] * 9}),
            400,
            "9 inputs in one request; the limit is 8",
        ),
        (dict(json={"task": "lora4", "inputs": []}), 400, "inputs is empty"),
        (
            dict(json={"task": "lora4", "inputs": [["w5", "w6", "w7"]]}),
            400,
            "input 0 must be a string or a [text_a, text_b] pair",
        ),
        (dict(json={"inputs": "w5"}), 422, "invalid request: body.task: Field required"),
        (dict(json={"task": "lora4", "inputs": 5}), 422, "invalid request: body.inputs"),
    ]
    for kwargs, status, message in cases:
        response = httpx.post(url, **kwargs)
        assert response.status_code == status, (kwargs, response.text)
        assert message in response.json()["detail"], response.json()
    good = httpx.post(url, json={"task": "lora8", "inputs": ["w5 w6"]})
    assert good.status_code == 200 and good.json()["predictions"][0]["label"] in (
        "lora8_0",
        "lora8_1",
    )


def test_tasks_health_docs_and_stats(server):
    tasks = httpx.get(f"{server.url}/v1/tasks").json()["tasks"]
    assert [(t["task"], t["kind"], t["num_labels"]) for t in tasks] == [
        ("adapter", "adapter", 2),
        ("lora4", "lora", 3),
        ("lora8", "lora", 2),
    ]
    health = httpx.get(f"{server.url}/healthz").json()
    assert health["status"] == "ok" and len(health["fingerprint"]) == 64
    assert httpx.get(f"{server.url}/docs").status_code == 200
    paths = httpx.get(f"{server.url}/openapi.json").json()["paths"]
    assert {
        "/v1/predict",
        "/v1/tasks",
        "/v1/tasks/load",
        "/v1/tasks/{task}/unload",
        "/healthz",
    } <= set(paths)
    # one request of its own, so the stats count something however the tests are selected
    assert httpx.post(f"{server.url}/v1/predict", json={"task": "lora8", "inputs": "w5 w6"}).status_code == 200
    stats = httpx.get(f"{server.url}/v1/stats").json()
    assert stats["batches"]["batches"] >= 1 and stats["latency_ms"]["count"] >= 1


def test_load_and_unload_over_http(server, tasks, tmp_path):
    url = server.url
    loaded = httpx.post(f"{url}/v1/tasks/load", json={"path": str(tasks["regress"]), "task": "sts"})
    assert loaded.status_code == 200, loaded.text
    assert loaded.json()["tasks"][0]["task"] == "sts"
    answer = httpx.post(
        f"{url}/v1/predict", json={"task": "sts", "inputs": [["w5 w6", "w7"]]}
    ).json()
    check_answer(tasks["regress"], ["w5 w6", "w7"], answer["predictions"][0])
    assert httpx.post(f"{url}/v1/tasks/sts/unload").json() == {"task": "sts", "unloaded": True}
    assert httpx.post(f"{url}/v1/predict", json={"task": "sts", "inputs": "w5"}).status_code == 404
    assert httpx.post(f"{url}/v1/tasks/sts/unload").status_code == 404
    missing = httpx.post(f"{url}/v1/tasks/load", json={"path": str(tmp_path / "none")})
    assert missing.status_code == 400 and "does not exist" in missing.json()["detail"]
    foreign = make_task(
        tmp_path, "foreign", metadata={"base_model": {"id": "x", "fingerprint": "0" * 64}}
    )
    refused = httpx.post(f"{url}/v1/tasks/load", json={"path": str(foreign)})
    assert refused.status_code == 409 and "0" * 64 in refused.json()["detail"]
    neither = httpx.post(f"{url}/v1/tasks/load", json={})
    assert neither.status_code == 400 and "exactly one of 'path'" in neither.json()["detail"]


def test_load_test_mixed_tasks_concurrent_clients(server, tasks):
    """16 clients x 10 requests over loopback, tasks mixed: no errors, answers equal offline ones."""
    names = ["lora4", "lora8", "adapter"]
    texts = [sentence(100 + i, 2 + i % 12) for i in range(12)]
    expected = {(n, t): offline(tasks[n], t) for n in names for t in texts}
    before = httpx.get(f"{server.url}/v1/stats").json()["batches"]

    async def client(c: int, http: httpx.AsyncClient) -> list:
        results = []
        for r in range(10):
            task, chosen = (
                names[(c + r) % 3],
                [texts[(c * 7 + r + k) % len(texts)] for k in range(1 + r % 3)],
            )
            response = await http.post("/v1/predict", json={"task": task, "inputs": chosen})
            results.append((task, chosen, response.status_code, response.json()))
        return results

    async def run_all() -> list:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
            return [
                x
                for chunk in await asyncio.gather(*(client(c, http) for c in range(16)))
                for x in chunk
            ]

    start = time.monotonic()
    results = asyncio.run(run_all())
    assert time.monotonic() - start < 30
    assert len(results) == 160 and [r[2] for r in results] == [200] * 160
    for task, chosen, _, body in results:
        for text, prediction in zip(chosen, body["predictions"]):
            probs = expected[(task, text)]
            torch.testing.assert_close(torch.tensor(list(prediction["scores"].values())), probs)
    after = httpx.get(f"{server.url}/v1/stats").json()["batches"]
    # Requests were batched together (more requests than forward passes).
    assert after["requests"] - before["requests"] == 160
    assert after["batches"] - before["batches"] < 160


def test_latency_summary_percentiles():
    assert latency_summary([]) == {"count": 0}
    summary = latency_summary([float(v) for v in range(1, 101)])
    assert (summary["p50"], summary["p90"], summary["p99"], summary["max"]) == (
        50.0,
        90.0,
        99.0,
        100.0,
    )

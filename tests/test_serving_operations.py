"""Operating the server: loading only under --load-dir (one refusal for every other path), replace
with a version bump, Prometheus /metrics, 400s that name the problem (a lone sentence for a pair
task, lone surrogates), a 503 for a server-side reload fault, vLLM's /v1/classify, and bf16."""

import os
import shutil

import httpx
import pytest
import torch

from adamix_zoo.runtime import cpu_has_fast_bf16
from adamix_zoo.serving import ServingEngine
from adamix_zoo.serving.decoding import resolve_dtype
from adamix_zoo.serving.server import ServerSettings, create_app
from tests.test_serving_utils import RunningServer, make_task, sentence, standard_tasks, tiny_tokenizer
from tests.tiny import tiny_model


def engine(capacity: int = 8, dtype: str = "float32") -> ServingEngine:
    return ServingEngine(tiny_model("bert", head="base"), tiny_tokenizer(), capacity=capacity, dtype=dtype)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    allowed = tmp_path_factory.mktemp("allowed")
    outside = tmp_path_factory.mktemp("outside")
    return {
        "allowed": allowed,
        "sst2": make_task(allowed, "sst2", seed=1),
        "rte": make_task(allowed, "rte", seed=2),
        "outside": make_task(outside, "other", seed=3),
    }


def test_load_reads_only_under_load_dirs_and_refuses_the_rest_alike(folders, tmp_path):
    os.symlink(folders["outside"], folders["allowed"] / "link-out")
    settings = ServerSettings(allow_load=True, load_dirs=[folders["allowed"]])
    with RunningServer(create_app(engine(), settings)) as server:
        load = f"{server.url}/v1/tasks/load"
        refused = [
            str(folders["outside"]),  # exists, outside
            str(tmp_path / "missing"),  # does not exist, outside
            str(folders["allowed"] / ".." / folders["outside"].name),
            str(folders["allowed"] / "link-out"),  # a symlink inside that points outside
            "/proc/self/environ",
            "/etc/passwd",
            str(folders["allowed"]),  # the allowed folder itself is no task folder to load
        ]
        messages = set()
        for path in refused:
            reply = httpx.post(load, json={"path": path})
            assert reply.status_code == 400, (path, reply.text)
            messages.add(reply.json()["detail"].replace(repr(path), "PATH"))
        assert len(messages) == 1 and "--load-dir" in messages.pop()
        ok = httpx.post(load, json={"path": str(folders["sst2"])})
        assert ok.status_code == 200 and ok.json()["tasks"][0]["version"] == "sst2-v1"
        again = httpx.post(load, json={"path": str(folders["sst2"])})
        assert again.status_code == 409 and "replace" in again.json()["detail"]
        replaced = httpx.post(load, json={"path": str(folders["rte"]), "task": "sst2", "replace": True})
        assert replaced.status_code == 200 and replaced.json()["tasks"][0]["version"] == "rte-v2+r1"
        answer = httpx.post(f"{server.url}/v1/predict", json={"task": "sst2", "inputs": [["w1", "w2"]]}).json()
        assert answer["version"] == "rte-v2+r1"
        listed = {t["task"]: t["version"] for t in httpx.get(f"{server.url}/v1/tasks").json()["tasks"]}
        assert listed == {"sst2": "rte-v2+r1"}


def test_loading_is_off_by_default(folders):
    with RunningServer(create_app(engine())) as server:
        reply = httpx.post(f"{server.url}/v1/tasks/load", json={"path": str(folders["sst2"])})
        assert reply.status_code == 403 and "--allow-load" in reply.json()["detail"]
        assert httpx.post(f"{server.url}/v1/tasks/x/unload").status_code == 403


def test_bad_inputs_are_400s_that_name_the_problem(folders):
    served = engine()
    served.attach(folders["sst2"])
    served.attach(folders["rte"])
    with RunningServer(create_app(served)) as server:
        url = f"{server.url}/v1/predict"
        lone = httpx.post(url, json={"task": "rte", "inputs": [["one sentence"]]})
        assert lone.status_code == 400 and "pair" in lone.json()["detail"] and "'rte'" in lone.json()["detail"]
        bare = httpx.post(url, json={"task": "rte", "inputs": "one sentence"})
        assert bare.status_code == 400 and "pair" in bare.json()["detail"]
        pair_to_single = httpx.post(url, json={"task": "sst2", "inputs": [["a", "b"]]})
        assert pair_to_single.status_code == 400 and "single sentence" in pair_to_single.json()["detail"]
        surrogate = httpx.post(
            url, content=b'{"task": "sst2", "inputs": ["w1 \\ud800"]}', headers={"content-type": "application/json"}
        )
        assert surrogate.status_code == 400 and "Unicode" in surrogate.json()["detail"], surrogate.text
        assert httpx.post(url, json={"task": "rte", "inputs": [["w1", "w2"]]}).status_code == 200


def test_a_reload_fault_is_a_503_and_metrics_count_requests_rows_and_evictions(tmp_path):
    tasks = standard_tasks(tmp_path)
    served = engine(capacity=1)
    for name in ("lora4", "lora8"):
        served.attach(tasks[name])
    with RunningServer(create_app(served)) as server:
        url = f"{server.url}/v1/predict"
        for task in ("lora4", "lora8", "lora4"):  # capacity 1: each switch evicts the other
            assert httpx.post(url, json={"task": task, "inputs": [sentence(1, 3), "w2"]}).status_code == 200
        text = httpx.get(f"{server.url}/metrics").text
        assert 'adamix_requests_total{route="/v1/predict",status="200"} 3.0' in text
        assert 'adamix_rows_total{kind="predict"} 6.0' in text
        assert 'adamix_batch_rows_bucket{kind="predict",le="2.0"} 3.0' in text
        assert "adamix_evictions_total 3.0" in text and "adamix_resident_adapters 1.0" in text
        assert 'adamix_request_latency_seconds_count{route="/v1/predict"} 3.0' in text
        shutil.rmtree(tasks["lora8"])  # evicted, and its folder is gone: the server's fault
        fault = httpx.post(url, json={"task": "lora8", "inputs": "w1"})
        assert fault.status_code == 503 and "server fault" in fault.json()["detail"], fault.text
        assert httpx.post(url, json={"task": "lora4", "inputs": "w1"}).status_code == 200


def test_vllm_classify_shape(folders):
    served = engine()
    served.attach(folders["sst2"])
    with RunningServer(create_app(served)) as server:
        reply = httpx.post(f"{server.url}/v1/classify", json={"model": "sst2", "input": ["w1", "w2 w3"]})
        assert reply.status_code == 200, reply.text
        data = reply.json()["data"]
        assert [d["index"] for d in data] == [0, 1] and all(len(d["probs"]) == 2 for d in data)
        assert all(d["label"].startswith("sst2_") and d["num_classes"] == 2 for d in data)
        missing = httpx.post(f"{server.url}/v1/classify", json={"model": "nope", "input": "w1"})
        assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found_error"


def test_bf16_answers_agree_with_float32(tmp_path):
    tasks = standard_tasks(tmp_path)
    fp32, bf16 = engine(), engine(dtype="bfloat16")
    for name in ("lora4", "lora8", "adapter"):
        fp32.attach(tasks[name])
        bf16.attach(tasks[name])
    assert next(bf16.backbone.parameters()).dtype == torch.bfloat16
    rows = [(("lora4", "lora8", "adapter")[i % 3], sentence(50 + i, 3 + i % 9)) for i in range(60)]
    names, texts = [r[0] for r in rows], [r[1] for r in rows]
    a, b = fp32.predict(names, texts), bf16.predict(names, texts)
    agree = sum(x.label == y.label for x, y in zip(a, b)) / len(rows)
    assert agree >= 0.9, agree
    assert all(isinstance(y.score, float) for y in b)
    gap = max(abs(x.scores[k] - y.scores[k]) for x, y in zip(a, b) for k in x.scores)
    assert gap < 0.05, gap
    expected = torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
    assert resolve_dtype("auto", "cpu") == expected
    with pytest.raises(ValueError, match="float32, bfloat16, auto"):
        resolve_dtype("fp8", "cpu")

"""Registry entries serve like any folder: by reference over HTTP, cross-task merged ones per head."""

import httpx
import pytest
import torch
from torch.testing import assert_close

from adamix_zoo.serving import ServingEngine
from adamix_zoo.serving.commands import registry_resolver
from adamix_zoo.serving.server import ServerSettings, create_app
from tests.test_serving_utils import RunningServer, sentence, tiny_tokenizer
from tests.tiny import tiny_model

registry = pytest.importorskip("registry")
registry_runs = pytest.importorskip("tests.registry_runs")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from registry.merging import merge_entries

    tmp = tmp_path_factory.mktemp("zoo")
    zoo = registry.Store(tmp / "store")
    zoo.publish(
        registry_runs.make_run(tmp / "sst2", task="sst2", seed=1, sharing="none", rank=4, alpha=8)
    )
    zoo.publish(
        registry_runs.make_run(tmp / "rte", task="rte", seed=2, sharing="none", rank=2, alpha=8)
    )
    zoo.publish(
        registry_runs.make_run(tmp / "stsb", task="stsb", kind="adapter", seed=3, bottleneck=8)
    )
    merge_entries(zoo, ["sst2", "rte"], [0.6, 0.4], "cat", task="pair")  # rank 6: padding
    return zoo


@torch.no_grad()
def test_entries_and_merged_entry_in_one_mixed_batch(store):
    engine = ServingEngine(tiny_model("bert", head="base"), tiny_tokenizer())
    for ref in ("sst2", "stsb", "pair"):
        engine.attach_all(store.get(ref))
    assert engine.task_names() == ["pair.rte", "pair.sst2", "sst2", "stsb"]
    tasks = {
        "sst2": ("sst2", None),
        "stsb": ("stsb", None),
        "pair.sst2": ("pair", "sst2"),
        "pair.rte": ("pair", "rte"),
    }
    row_tasks = list(tasks) * 2
    batch = dict(
        tiny_tokenizer()([sentence(i, 3 + i) for i in range(8)], padding=True, return_tensors="pt")
    )
    logits, _, used = engine.forward(row_tasks, batch)
    for name, (ref, head) in tasks.items():
        expected = store.attach(ref, tiny_model("bert", head="base"), task=head)(
            **batch
        )  # the registry's own
        rows = [i for i, t in enumerate(row_tasks) if t == name]
        assert_close(torch.stack([logits[i] for i in rows]), expected[rows])
        assert used[rows[0]].version == "1"
    assert used[0].label_names == ["negative", "positive"]


def test_load_by_reference_over_http(store):
    engine = ServingEngine(tiny_model("bert", head="base"), tiny_tokenizer())
    settings = ServerSettings(allow_load=True, resolve_reference=registry_resolver(str(store.root)))
    with RunningServer(create_app(engine, settings)) as server:
        loaded = httpx.post(f"{server.url}/v1/tasks/load", json={"reference": "local/pair@1"})
        assert loaded.status_code == 200, loaded.text
        assert sorted(t["task"] for t in loaded.json()["tasks"]) == ["pair.rte", "pair.sst2"]
        one = httpx.post(
            f"{server.url}/v1/tasks/load", json={"reference": "sst2@latest", "task": "sentiment"}
        )
        assert one.json()["tasks"][0]["task"] == "sentiment"
        answer = httpx.post(
            f"{server.url}/v1/predict", json={"task": "pair.rte", "inputs": [["w5 w6", "w7"]]}
        )
        assert answer.status_code == 200 and answer.json()["version"] == "1"
        missing = httpx.post(f"{server.url}/v1/tasks/load", json={"reference": "local/nope@1"})
        assert missing.status_code == 404 and "nope" in missing.json()["detail"]


def test_load_from_the_hub_pulls_through_the_registry(store, tmp_path, monkeypatch):
    """``{"ref": "hf://user/repo@revision"}`` pulls the entry (sha256 checked) into the server's
    store, then attaches it; a Hub that cannot be reached is a clear 4xx."""
    import huggingface_hub.constants as constants

    from registry.remote import push_hub
    from tests.hub_standin import HubStandIn, ServerThread

    standin = HubStandIn("hf_test")
    with ServerThread(standin.app) as hub:
        for name, value in (("HF_ENDPOINT", hub.url), ("HF_TOKEN", "hf_test"), ("HF_HUB_DISABLE_XET", "1")):
            monkeypatch.setenv(name, value)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
        sha = push_hub(store, "sst2@1", "alice/sst2-adamix")
        served = registry.Store(tmp_path / "served")
        settings = ServerSettings(allow_load=True, resolve_reference=registry_resolver(str(served.root)))
        engine = ServingEngine(tiny_model("bert", head="base"), tiny_tokenizer())
        with RunningServer(create_app(engine, settings)) as server:
            loaded = httpx.post(f"{server.url}/v1/tasks/load",
                                json={"ref": f"hf://alice/sst2-adamix@{sha}", "task": "hub-sst2"})
            assert loaded.status_code == 200, loaded.text
            assert [e.ref for e in served.list()] == ["local/sst2@1"]
            answer = httpx.post(f"{server.url}/v1/predict", json={"task": "hub-sst2", "inputs": [sentence(1, 4)]})
            assert answer.status_code == 200, answer.text
            monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
            offline = httpx.post(f"{server.url}/v1/tasks/load", json={"ref": "hf://alice/other", "task": "x"})
            assert offline.status_code == 400 and "cannot pull hf://alice/other" in offline.text

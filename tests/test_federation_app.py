"""The real ClientApp and server loop on a tiny model, messages delivered in process (no runtime):
what travels, the aggregate's numbers, faulty clients, multi-task heads, the output folder."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from flwr.app import Array, MessageType
from transformers import AutoModel

from adamix_zoo.backbones import fingerprint
from adamix_zoo.formats.files import EXPERTS_FILE, read_safetensors
from federation.client_app import LOCAL_HEAD, app
from federation.config import FederationConfig
from federation.head_init import STATISTICS_KEY, asks_for_statistics
from federation.records import HEAD_PREFIX, travelling_name
from federation.server_app import FederationError, run_federation
from registry import Store
from tests.test_federation_support import InProcessGrid, tiny_run_config

pytestmark = pytest.mark.usefixtures("server_identity", "one_thread")

pytest_plugins = ["tests.test_federation_support"]


def train_replies(grid: InProcessGrid, server_round: int) -> list:
    return [r for r in grid.train_round(server_round)[1] if not r.has_error()]


def weighted_mean(replies: list) -> dict[str, np.ndarray]:
    """The example-weighted mean of the replies' tensors, computed here in float64."""
    weights = np.array([r.content["metrics"]["num-examples"] for r in replies], dtype=np.float64)
    names = replies[0].content["arrays"].keys()
    return {
        k: sum(
            w * r.content["arrays"][k].numpy().astype(np.float64) for w, r in zip(weights, replies)
        )
        / weights.sum()
        for k in names
    }


def nan_update(reply):
    name = next(iter(reply.content["arrays"]))
    value = reply.content["arrays"][name].numpy().copy()
    value.flat[0] = np.nan
    reply.content["arrays"][name] = Array(value)
    return reply


def misshaped_update(reply):
    name = next(iter(reply.content["arrays"]))
    reply.content["arrays"][name] = Array(np.zeros((3, 3), dtype=np.float32))
    return reply


def test_single_task_federation(tiny_env):
    rc = tiny_run_config(tiny_env, **{"num-rounds": 2})
    grid = InProcessGrid(app, rc, num_nodes=3)
    outcome = run_federation(grid, FederationConfig.from_run_config(rc))

    # Only adapter experts (and the federated head) travel, both ways; eval replies carry none, the
    # partition queries (federation.sampling) nothing but each client's partition id, and the head's
    # statistics query (head-init=auto: lda) the initial experts down and feature sums up.
    queries = [(m, r) for m, r in zip(grid.sent, grid.replies) if m.metadata.message_type == MessageType.QUERY]
    partition = [(m, r) for m, r in queries if not asks_for_statistics(m.content)]
    statistics = [(m, r) for m, r in queries if asks_for_statistics(m.content)]
    assert len(partition) == len(statistics) == 3
    assert all(not m.content and not r.content.array_records for m, r in partition)
    assert all(set(r.content.array_records) == {STATISTICS_KEY} for _, r in statistics)
    records = [m.content["arrays"] for m in grid.sent if "arrays" in m.content] + [
        r.content["arrays"] for r in grid.replies if "arrays" in r.content
    ]
    names = set(records[0].keys())
    assert all(set(r.keys()) == names for r in records)
    assert all(travelling_name(n) for n in names)
    assert {n for n in names if n.startswith(HEAD_PREFIX)} == {
        "head.classifier.weight",
        "head.classifier.bias",
    }
    assert not any("embeddings" in n or n.endswith("base_layer.weight") for n in names)
    assert all(
        not r.content.array_records
        for r in grid.replies
        if r.metadata.message_type == MessageType.EVALUATE
    )

    # Round 2 starts from the example-weighted mean of round 1's updates; round 2's mean is saved.
    expected = weighted_mean(train_replies(grid, 1))
    sent2 = grid.train_round(2)[0][0]
    for name, value in expected.items():
        np.testing.assert_allclose(
            sent2.content["arrays"][name].numpy(), value, rtol=1e-5, atol=1e-7
        )
    saved = read_safetensors(outcome.folder / EXPERTS_FILE)
    for name, value in weighted_mean(train_replies(grid, 2)).items():
        if not name.startswith(HEAD_PREFIX):
            np.testing.assert_allclose(saved[name].numpy(), value, rtol=1e-5, atol=1e-7)

    # The run folder follows the training contract; published with the federation's provenance.
    run = json.loads((outcome.folder / "run_config.json").read_text())
    assert run["task"] == "sst2" and run["method"] == "adamix-lora"
    bare = AutoModel.from_pretrained(tiny_env / "backbone")  # what serving and attach compare with
    assert run["backbone_fingerprint"] == fingerprint(bare)
    assert run["federation"] | {} == run["federation"] and run["federation"]["rounds"] == 2
    assert run["federation"]["clients"] == 3 and run["federation"]["strategy"] == "fedavg"
    metrics = json.loads((outcome.folder / "final_metrics.json").read_text())
    assert metrics["main_metric"] == "accuracy" and 0.0 <= metrics["accuracy"] <= 1.0
    assert metrics["federation"]["aggregated_rounds"] == [1, 2]
    assert {p.name for p in (outcome.folder / "merged").iterdir()} >= {
        "adapter_model.safetensors",
        "adapter_config.json",
        "head.safetensors",
    }
    assert outcome.published == ["federated/sst2@1"]
    entry = Store(rc["registry-dir"]).show("federated/sst2@1")
    assert entry["provenance"]["federation"]["clients"] == 3


def test_tail_averaging_saves_the_mean_of_the_last_rounds_and_reports_the_last_round(tiny_env):
    rc = tiny_run_config(tiny_env, **{"num-rounds": 3, "average-last-rounds": 2})
    grid = InProcessGrid(app, rc, num_nodes=3)
    outcome = run_federation(grid, FederationConfig.from_run_config(rc))

    # FedAvg: each round's global experts are the weighted mean of its replies; the saved ones are
    # the mean of rounds 2 and 3's, not round 3's.
    rounds = {r: weighted_mean(train_replies(grid, r)) for r in (2, 3)}
    saved = read_safetensors(outcome.folder / EXPERTS_FILE)
    for name, value in saved.items():
        np.testing.assert_allclose(value.numpy(), (rounds[2][name] + rounds[3][name]) / 2, rtol=1e-5, atol=1e-7)
        assert not np.allclose(value.numpy(), rounds[3][name], rtol=1e-5, atol=1e-7)
    metrics = json.loads((outcome.folder / "final_metrics.json").read_text())
    last = metrics["federation"]["last_round_metrics"]
    assert last["main_metric"] == "accuracy" and 0.0 <= last["accuracy"] <= 1.0
    run = json.loads((outcome.folder / "run_config.json").read_text())
    assert run["federation"]["average_last_rounds"] == 2


def test_faulty_clients_are_rejected_and_the_round_completes(tiny_env, caplog):
    rc = tiny_run_config(tiny_env, **{"num-clients": 5, "num-rounds": 1})
    grid = InProcessGrid(
        app, rc, num_nodes=5, raising={100}, faults={101: nan_update, 102: misshaped_update}
    )
    with caplog.at_level(logging.WARNING):
        outcome = run_federation(grid, FederationConfig.from_run_config(rc))
    rejected = dict(
        outcome.metrics["federation"]["rejected_updates"][1]
        and [(r["node"], r["reason"]) for r in outcome.metrics["federation"]["rejected_updates"][1]]
    )
    assert set(rejected) == {100, 101, 102}
    assert (
        "crashed" in rejected[100]
        and "non-finite" in rejected[101]
        and "shape (3, 3)" in rejected[102]
    )
    assert caplog.text.count("rejected the update of node") == 3
    good = [r for r in train_replies(grid, 1) if r.metadata.src_node_id in (103, 104)]
    saved = read_safetensors(outcome.folder / EXPERTS_FILE)
    for name, value in weighted_mean(good).items():
        if not name.startswith(HEAD_PREFIX):
            np.testing.assert_allclose(saved[name].numpy(), value, rtol=1e-5, atol=1e-7)
    assert outcome.published == ["federated/sst2@1"]


def test_too_few_valid_updates_publish_nothing(tiny_env, caplog):
    rc = tiny_run_config(tiny_env, **{"num-clients": 3, "num-rounds": 1})
    grid = InProcessGrid(app, rc, num_nodes=3, faults={100: nan_update, 101: misshaped_update})
    with (
        caplog.at_level(logging.WARNING),
        pytest.raises(FederationError, match="no round produced a valid aggregate"),
    ):
        run_federation(grid, FederationConfig.from_run_config(rc))
    assert "keeping the previous global experts (1 valid updates < min-clients=2)" in caplog.text
    assert not (tiny_env / "out" / "final_metrics.json").exists()
    assert Store(rc["registry-dir"]).list() == []


def test_multi_task_heads_stay_on_the_clients(tiny_env):
    rc = tiny_run_config(tiny_env, **{"tasks": "sst2,rte", "num-clients": 2, "num-rounds": 1})
    grid = InProcessGrid(app, rc, num_nodes=2)
    outcome = run_federation(grid, FederationConfig.from_run_config(rc))
    for record in [m.content["arrays"] for m in grid.sent if m.metadata.message_type != MessageType.QUERY] + [
        r.content["arrays"] for r in train_replies(grid, 1)
    ]:
        assert record and all(travelling_name(n) and not n.startswith(HEAD_PREFIX) for n in record)
    assert all(LOCAL_HEAD in ctx.state.array_records for ctx in grid.contexts.values())
    assert (outcome.folder / "client_heads" / "rte" / "partition-1.safetensors").exists()
    assert not (outcome.folder / "head.safetensors").exists()  # the shared experts have no head
    assert sorted(outcome.task_folders) == ["rte", "sst2"]
    assert sorted(outcome.published) == ["federated/rte@1", "federated/sst2@1"]
    run = json.loads((outcome.folder / "tasks" / "rte" / "run_config.json").read_text())
    assert run["task"] == "rte" and run["federation"]["head_federated"] is False


@pytest.mark.parametrize("dp", ["client-fixed", "server-adaptive"])
def test_differential_privacy_wrappers_run_end_to_end(tiny_env, dp):
    rc = tiny_run_config(
        tiny_env,
        **{"num-clients": 2, "num-rounds": 1, "dp": dp, "dp-noise-multiplier": 0.0,
           "dp-clipping-norm": 1e-3, "publish": False},
    )
    grid = InProcessGrid(app, rc, num_nodes=2)
    outcome = run_federation(grid, FederationConfig.from_run_config(rc))
    assert outcome.metrics["federation"]["aggregated_rounds"] == [1]
    sent, replies = grid.train_round(1)
    start = {k: v.numpy() for k, v in sent[0].content["arrays"].items()}
    saved = read_safetensors(outcome.folder / EXPERTS_FILE)
    # Updates are clipped to norm 1e-3 (client-side by Flower's mod, or server-side), so the
    # global experts moved at most that far from where the round started.
    delta = np.sqrt(sum(((saved[k].numpy() - start[k]) ** 2).sum() for k in saved))
    assert 0 < delta <= 1e-3 * 1.0001


def test_models_are_built_from_one_cached_backbone_without_touching_it(tiny_env):
    """Each client message builds its model from a per-process copy of the backbone: loaded once,
    never modified by AdaMix injection or training, and equal to a fresh load."""
    from federation.task import family_of, pretrained_backbone

    cfg = FederationConfig.from_run_config(tiny_run_config(tiny_env))
    pretrained_backbone.cache_clear()
    first, second = family_of(cfg).build_model(cfg, "sst2"), family_of(cfg).build_model(cfg, "sst2")
    assert pretrained_backbone.cache_info().misses == 1
    cached = pretrained_backbone(cfg.backbone)
    assert not any("adamix" in name for name, _ in cached.named_parameters())
    with torch.no_grad():
        for p in first.backbone.parameters():
            p.add_(1.0)  # even a (frozen) weight changed in one model stays out of the others
    assert fingerprint(second.backbone) == fingerprint(cached)
    assert fingerprint(cached) == fingerprint(AutoModel.from_pretrained(cfg.backbone))

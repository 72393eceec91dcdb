"""Clients of different LoRA ranks and the SVD re-factoring of the mean update (federation.ranks):
the factorisation against an explicit SVD, truncation and padding, a federation whose clients train
ranks 4, 2 and 1, and the combinations the configuration refuses."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from adamix_zoo.formats.files import EXPERTS_FILE, read_safetensors
from federation import ranks
from federation.client_app import app
from federation.config import FederationConfig
from federation.server_app import run_federation
from federation.strategies import build_strategy
from tests.test_federation_exactness import D_IN, D_OUT, EXPERTS, A, B, K, R, arrays_of, factors
from tests.test_federation_support import InProcessGrid, tiny_run_config

pytest_plugins = ["tests.test_federation_support"]


def joint_mean_update(updates: list[dict], weights: list[float], module: str = "m") -> torch.Tensor:
    """The weighted mean update of every expert pair, formed explicitly (float64) and laid side by
    side along the shared projection: [dW_1 | ... | dW_K] (one B) or [dW_1; ...; dW_K] (one A)."""
    w = torch.tensor(weights, dtype=torch.float64) / sum(weights)
    a = [torch.from_numpy(u[f"{module}.{A}"]).double() for u in updates]
    b = [torch.from_numpy(u[f"{module}.{B}"]).double() for u in updates]
    blocks = [[sum(wi * bi[j] @ ai[k] for wi, ai, bi in zip(w, a, b)) for k in range(len(a[0]))]
              for j in range(len(b[0]))]
    return torch.cat(blocks[0], dim=1) if len(b[0]) == 1 else torch.cat([row[0] for row in blocks], dim=0)


def joint_of(a: np.ndarray, b: np.ndarray) -> torch.Tensor:
    """The same joint matrix for one set of factors."""
    return joint_mean_update([{f"m.{A}": a, f"m.{B}": b}], [1.0])


@pytest.mark.parametrize("sharing", ["up", "down"])
@pytest.mark.parametrize("rank", [1, 2, 6])
def test_refactor_is_the_truncated_svd_of_the_clients_mean_update(sharing, rank):
    updates, weights = [factors(sharing, s) for s in range(3)], [10.0, 30.0, 60.0]  # stacked rank 6
    a, b, error = ranks.refactor([u[f"m.{A}"] for u in updates], [u[f"m.{B}"] for u in updates], weights, rank)
    k_a, k_b = EXPERTS[sharing]
    assert a.shape == (k_a, rank, D_IN) and b.shape == (k_b, D_OUT, rank)
    mean = joint_mean_update(updates, weights)
    u, s, vh = torch.linalg.svd(mean, full_matrices=False)
    best = (u[:, :rank] * s[:rank]) @ vh[:rank]  # Eckart-Young: the best rank-r approximation
    torch.testing.assert_close(joint_of(a, b), best, rtol=1e-9, atol=1e-9)
    assert error == pytest.approx(float((mean - best).norm() / mean.norm()), rel=1e-9, abs=1e-12)
    if rank >= 6:
        assert error < 1e-12  # the clients' stacked ranks fit: exact
    else:
        assert error > 1e-3


def test_refactor_pads_when_the_mean_has_a_smaller_rank():
    one = factors("up", 0)
    a, b, error = ranks.refactor([one[f"m.{A}"]], [one[f"m.{B}"]], [1.0], rank=4)  # rank 2 into 4
    assert a.shape[1] == 4 and error < 1e-12
    torch.testing.assert_close(joint_of(a, b), joint_of(one[f"m.{A}"], one[f"m.{B}"]))


def test_refactor_needs_a_shared_projection():
    updates = [factors("none", s) for s in range(2)]
    with pytest.raises(ValueError, match="one shared projection"):
        ranks.refactor([u[f"m.{A}"] for u in updates], [u[f"m.{B}"] for u in updates], [1, 1], 2)


def test_truncate_pad_and_zero_beyond():
    sent = factors("up", 0) | {"head.w": np.ones(3, np.float32)}
    shapes = {k: v.shape for k, v in sent.items()}
    small = ranks.truncate(sent, 1)
    assert small[f"m.{A}"].shape == (K, 1, D_IN) and small[f"m.{B}"].shape == (1, D_OUT, 1)
    assert small["head.w"] is sent["head.w"] and ranks.reply_rank(small) == 1
    trained = {k: v + 1.0 for k, v in small.items()}
    full = ranks.pad(trained, sent, shapes)
    assert {k: v.shape for k, v in full.items()} == shapes
    assert ranks.truncate(full, 1)[f"m.{A}"].tolist() == trained[f"m.{A}"].tolist()
    assert ranks.truncate(full, 1)[f"m.{B}"].tolist() == trained[f"m.{B}"].tolist()
    # the components it does not hold are as sent: its update is 0 there
    np.testing.assert_array_equal(full[f"m.{A}"][:, 1:], sent[f"m.{A}"][:, 1:])
    np.testing.assert_array_equal(full[f"m.{B}"][..., 1:], sent[f"m.{B}"][..., 1:])
    own = ranks.zero_beyond(full, 1)  # the factors of the client's own update, at the global shapes
    assert not own[f"m.{A}"][:, 1:].any() and not own[f"m.{B}"][..., 1:].any()
    torch.testing.assert_close(joint_of(own[f"m.{A}"], own[f"m.{B}"]), joint_of(trained[f"m.{A}"], trained[f"m.{B}"]))
    assert all(ranks.zero_beyond(sent, R)[k] is v for k, v in sent.items())  # at full rank: as is
    # what is not a rank truncation is left for the validation to name
    wrong = {f"m.{A}": np.zeros((K, 1, D_IN + 1), np.float32), f"m.{B}": np.zeros((1, D_OUT, 3), np.float32)}
    assert all(ranks.pad(wrong, sent, shapes)[k] is v for k, v in wrong.items())


def test_a_client_trains_its_rank_at_the_global_scale():
    cfg = FederationConfig.from_run_config({"rank": 8, "lora-alpha": 16.0, "client-ranks": "8,4,2"})
    assert [cfg.client_rank(i) for i in range(5)] == [8, 4, 2, 8, 4]
    assert ranks.client_config(cfg, 0) is cfg and cfg.heterogeneous_ranks
    small = ranks.client_config(cfg, 2)
    assert small.adamix.rank == 2 and small.adamix.scale == cfg.adamix.scale == 2.0
    assert small.learning_rate == cfg.learning_rate and small.seed == cfg.seed
    assert not FederationConfig.from_run_config({"rank": 8, "client-ranks": "8"}).heterogeneous_ranks


@pytest.mark.parametrize("options, message", [
    ({"client-ranks": "4,x"}, "client-ranks: 'x' is not a positive integer"),
    ({"client-ranks": "4,0"}, "client-ranks: '0' is not a positive integer"),
    ({"client-ranks": "16"}, "every rank must be <= rank=8"),
    ({"client-ranks": "4", "kind": "adapter"}, "need kind='lora'"),
    ({"aggregation": "mean"}, "aggregation='mean' is not supported"),
    ({"aggregation": "svd", "sharing": "none"}, "needs sharing 'up' or 'down'"),
    ({"aggregation": "svd", "sharing": "down", "freeze-shared": True}, "cannot keep freeze-shared"),
    ({"aggregation": "svd", "strategy": "fedavgm"}, "needs strategy=fedavg"),
    ({"aggregation": "svd", "dp": "server-fixed"}, "without server-side DP"),
])
def test_the_configuration_refuses_what_cannot_work(options, message):
    with pytest.raises(ValueError, match=message):
        FederationConfig.from_run_config({"rank": 8} | options)


def test_build_strategy_pads_only_when_ranks_differ():
    spec = {k: (v.shape, "float32") for k, v in factors("up", 0).items()}
    same = build_strategy(FederationConfig(), spec)
    assert not same.heterogeneous and same.svd_rank is None
    het = build_strategy(FederationConfig.from_run_config({"client-ranks": "8,4"}), spec)
    assert het.heterogeneous and het.svd_rank is None
    svd_cfg = {"client-ranks": "8,4", "aggregation": "svd", "strategy": "fedavg"}
    svd = build_strategy(FederationConfig.from_run_config(svd_cfg), spec)
    assert svd.heterogeneous and svd.svd_rank == 8


CLIENT_RANKS = {100: 4, 101: 2, 102: 1}  # node id -> rank


def federate(tiny_env, **overrides):
    """Three clients of ranks 4, 2, 1; returns what each uploaded, per round, as it left the client."""
    rc = tiny_run_config(tiny_env, **{"num-rounds": 2, "local-steps": 3, "learning-rate": 1e-2,
                                      "rank": 4, "client-ranks": "4,2,1"} | overrides)
    uploads: dict[int, list[dict[str, np.ndarray]]] = {node: [] for node in CLIENT_RANKS}

    def recorder(node: int):
        def record(reply):
            uploads[node].append({k: v.copy() for k, v in arrays_of(reply).items()})
            return reply
        return record

    grid = InProcessGrid(app, rc, num_nodes=3, faults={node: recorder(node) for node in CLIENT_RANKS})
    cfg = FederationConfig.from_run_config(rc)
    return cfg, grid, run_federation(grid, cfg), uploads


def zero_padded(tensors: dict[str, np.ndarray], rank: int) -> dict[str, np.ndarray]:
    """A client's factors with zero components up to ``rank``: its own update at the global shapes."""
    out = {}
    for name, value in tensors.items():
        if name.endswith(A) or name.endswith(B):
            axis = 1 if name.endswith(A) else 2
            width = [(0, 0)] * value.ndim
            width[axis] = (0, rank - value.shape[axis])
            value = np.pad(value, width)
        out[name] = value
    return out


def weights_of(replies) -> dict[int, float]:
    return {r.metadata.src_node_id: float(r.content["metrics"]["num-examples"]) for r in replies}


@pytest.mark.usefixtures("server_identity", "one_thread")
def test_clients_of_three_ranks_federate_and_the_svd_aggregate_is_the_best_rank_r_mean(tiny_env):
    cfg, grid, outcome, uploads = federate(tiny_env, aggregation="svd")
    for node, rank in CLIENT_RANKS.items():  # each uploads its own rank, every round
        assert len(uploads[node]) == 2
        for sent in uploads[node]:
            assert {v.shape[1] for n, v in sent.items() if n.endswith(A)} == {rank}
            assert {v.shape[2] for n, v in sent.items() if n.endswith(B)} == {rank}
    replies = {r: grid.train_round(r)[1] for r in (1, 2)}
    aggregates = {1: arrays_of(grid.train_round(2)[0][0]),
                  2: {k: v.numpy() for k, v in read_safetensors(outcome.folder / EXPERTS_FILE).items()}}
    report = json.loads((outcome.folder / "final_metrics.json").read_text())["federation"]
    for rnd, aggregate in aggregates.items():
        weights = weights_of(replies[rnd])
        updates = [zero_padded(uploads[node][rnd - 1], 4) for node in weights]
        modules = sorted({n.removesuffix("." + A) for n in aggregate if n.endswith(A)})
        errors = []
        for module in modules:
            mean = joint_mean_update(updates, list(weights.values()), module)
            u, s, vh = torch.linalg.svd(mean, full_matrices=False)
            best = (u[:, :4] * s[:4]) @ vh[:4]
            got = joint_mean_update([aggregate], [1.0], module)
            torch.testing.assert_close(got, best, rtol=1e-4, atol=1e-6)
            errors.append(float((mean - best).norm() / mean.norm()))
        assert max(errors) > 1e-4  # stacked rank 4 + 2 + 1 > 4: the truncation loses something
        logged = report["aggregation_relative_error"][str(rnd)]
        assert logged == {"mean": pytest.approx(np.mean(errors), rel=1e-3), "max": pytest.approx(max(errors), rel=1e-3)}
    assert report["aggregated_rounds"] == [1, 2]


@pytest.mark.usefixtures("server_identity", "one_thread")
def test_with_factor_averaging_a_component_moves_only_by_the_clients_that_hold_it(tiny_env):
    cfg, grid, outcome, uploads = federate(tiny_env)
    sent = arrays_of(grid.train_round(1)[0][0])
    weights = weights_of(grid.train_round(1)[1])
    total = sum(weights.values())
    aggregate = arrays_of(grid.train_round(2)[0][0])
    name = next(n for n in aggregate if n.endswith(B))
    for component in range(4):  # FedAvg of each reply, its missing components as sent
        expected = sum(
            w * (uploads[node][0][name][..., component] if component < CLIENT_RANKS[node] else sent[name][..., component])
            for node, w in weights.items()) / total
        np.testing.assert_allclose(aggregate[name][..., component], expected, rtol=1e-5, atol=1e-7)
    assert not np.allclose(aggregate[name][..., 3], sent[name][..., 3])  # the rank-4 client moved it
    summary = json.loads((outcome.folder / "run_config.json").read_text())["federation"]
    assert summary["client_ranks"] == [4, 2, 1] and summary["aggregation"] == "factors"

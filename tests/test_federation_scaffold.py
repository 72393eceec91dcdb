"""SCAFFOLD drift control: the client's gradient correction and control update, the server's
control variate and its checks, and a federation that carries both (in process, tiny model)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MessageType
from flwr.serverapp.strategy import FedAvg

from federation.client_app import app
from federation.config import FederationConfig
from federation.scaffold import CLIENT_STATE_KEY, CONTROL_KEY, DELTA_KEY, DriftCorrection, ServerControl
from federation.server_app import run_federation
from federation.strategies import ValidatingStrategy, build_strategy
from tests.test_federation_strategy import SPEC, TwoNodes, arrays, as_record, reply
from tests.test_federation_support import InProcessGrid, tiny_run_config

pytest_plugins = ["tests.test_federation_support"]

A, B = sorted(SPEC)  # the LoRA A (2, 3, 4) and B (1, 4, 3) tensors of the strategy tests


def with_delta(msg, delta: dict[str, np.ndarray]):
    msg.content[DELTA_KEY] = as_record(delta)
    return msg


def test_drift_correction_shifts_each_gradient_and_returns_the_mean_raw_gradient():
    torch.manual_seed(0)
    layer = torch.nn.Linear(3, 2)
    params = dict(layer.named_parameters())
    server = {k: torch.randn_like(p) for k, p in params.items()}
    own = {k: torch.randn_like(p) for k, p in params.items()}
    correction = DriftCorrection(params, ArrayRecord({k: Array(v.numpy()) for k, v in server.items()}),
                                 ArrayRecord({k: Array(v.numpy()) for k, v in own.items()}))
    raw = []
    for step in range(3):
        layer.zero_grad()
        layer(torch.randn(4, 3)).pow(2).sum().backward()
        raw.append({k: p.grad.clone() for k, p in params.items()})
        correction()
        for name, param in params.items():
            torch.testing.assert_close(param.grad, raw[-1][name] + server[name] - own[name])
    new_state, delta = correction.finish()
    for name in params:
        mean = sum(r[name] for r in raw) / 3
        torch.testing.assert_close(torch.from_numpy(new_state[name].numpy()), mean)
        torch.testing.assert_close(torch.from_numpy(delta[name].numpy()), mean - own[name])


def test_drift_correction_starts_from_zero_and_refuses_what_does_not_fit():
    layer = torch.nn.Linear(3, 2)
    params = dict(layer.named_parameters())
    zeros = ArrayRecord({k: Array(np.zeros(tuple(p.shape), np.float32)) for k, p in params.items()})
    layer(torch.ones(1, 3)).sum().backward()
    grads = {k: p.grad.clone() for k, p in params.items()}
    correction = DriftCorrection(params, zeros, None)  # a client's first round: c_i = 0
    correction()
    assert all(torch.equal(p.grad, grads[k]) for k, p in params.items())  # c = c_i = 0: unchanged
    with pytest.raises(ValueError, match="no training step"):
        DriftCorrection(params, zeros, None).finish()
    with pytest.raises(ValueError, match="server's control variate does not fit.*missing"):
        DriftCorrection(params, ArrayRecord({"weight": zeros["weight"]}), None)
    misshaped = ArrayRecord({"weight": zeros["weight"], "bias": Array(np.zeros(5, np.float32))})
    with pytest.raises(ValueError, match="this client's control variate: bias has shape"):
        DriftCorrection(params, zeros, misshaped)


@pytest.mark.usefixtures("server_identity")
def test_server_control_moves_by_the_deltas_over_all_clients_and_skips_frozen_tensors():
    control = ServerControl(SPEC, frozen=[A], num_clients=4)
    strategy = ValidatingStrategy(FedAvg(), SPEC, 2, ["sst2"], frozen=[A], control=control)
    sent = arrays(0)
    messages = strategy.configure_train(1, as_record(sent), ConfigRecord(), TwoNodes())
    assert all(set(m.content[CONTROL_KEY]) == {B} for m in messages)
    assert all(not m.content[CONTROL_KEY][B].numpy().any() for m in messages)  # c starts at 0
    deltas = [{B: arrays(s)[B]} for s in (1, 2)]
    ups = [arrays(10 + i) | {A: sent[A]} for i in (1, 2)]
    agg, _ = strategy.aggregate_train(1, [with_delta(reply(i + 1, u), d) for i, (u, d) in enumerate(zip(ups, deltas))])
    assert agg is not None and set(agg) == set(SPEC)  # Flower's strategy saw the experts alone
    # SCAFFOLD: c += |S| / N * mean(delta) = (delta_1 + delta_2) / 4
    np.testing.assert_allclose(control.control[B], (deltas[0][B].astype(np.float64) + deltas[1][B]) / 4, rtol=1e-6)
    following = strategy.configure_train(2, agg, ConfigRecord(), TwoNodes())
    np.testing.assert_allclose(following[0].content[CONTROL_KEY][B].numpy(), control.control[B], rtol=1e-6)


@pytest.mark.usefixtures("server_identity")
def test_replies_without_a_usable_delta_are_rejected_and_a_refused_round_leaves_c():
    control = ServerControl(SPEC, frozen=[], num_clients=3)
    strategy = ValidatingStrategy(FedAvg(), SPEC, 2, ["sst2"], control=control)
    bad = arrays(3)
    bad[B][0, 0, 0] = np.nan
    replies = [with_delta(reply(1, arrays(1)), arrays(4)), reply(2, arrays(2)),  # no delta
               with_delta(reply(3, arrays(3)), bad), with_delta(reply(4, arrays(4)), {A: arrays(5)[A]})]
    assert strategy.aggregate_train(1, replies) == (None, None)  # one valid reply < min-clients 2
    reasons = [why for _, why in strategy.log.rejected[1]]
    assert reasons[0] == f"expected the ArrayRecords ['arrays', '{DELTA_KEY}'], got ['arrays']"
    assert "non-finite" in reasons[1] and "missing 1 tensors" in reasons[2]
    assert not any(v.any() for v in control.control.values())


def test_server_control_caps_an_outlying_delta_against_the_others():
    control = ServerControl(SPEC, frozen=[], num_clients=3, max_norm_ratio=2.0)
    ones = {k: np.ones(shape, np.float32) for k, (shape, _) in SPEC.items()}
    control.update([as_record(ones), as_record(ones), as_record({k: 1000 * v for k, v in ones.items()})])
    # the third delta is scaled to twice the others' median norm: c = (1 + 1 + 2) / 3
    for name in SPEC:
        np.testing.assert_allclose(control.control[name], 4 / 3, rtol=1e-6)


def test_scaffold_is_a_choice_that_refuses_dp_and_mixed_ranks():
    assert FederationConfig().drift_control == "none"
    assert build_strategy(FederationConfig(), SPEC).control is None
    assert isinstance(build_strategy(FederationConfig(drift_control="scaffold"), SPEC).control, ServerControl)
    with pytest.raises(ValueError, match="drift-control"):
        FederationConfig(drift_control="fedprox")
    with pytest.raises(ValueError, match="drift-control=scaffold.*dp='client-fixed'"):
        FederationConfig(drift_control="scaffold", dp="client-fixed")
    with pytest.raises(ValueError, match="drift-control=scaffold.*client-ranks"):
        FederationConfig(drift_control="scaffold", client_ranks="8,4")


@pytest.mark.usefixtures("server_identity", "one_thread")
def test_a_scaffold_federation_keeps_c_the_mean_of_the_clients_control_variates(tiny_env):
    rc = tiny_run_config(tiny_env, **{"num-rounds": 2, "drift-control": "scaffold"})
    deltas: dict[int, list[dict[str, np.ndarray]]] = {}

    def record_delta(node: int):
        def fault(msg):  # an identity "fault": it only notes the reply's delta before the server
            deltas.setdefault(node, []).append({k: v.numpy().copy() for k, v in msg.content[DELTA_KEY].items()})
            return msg
        return fault

    grid = InProcessGrid(app, rc, num_nodes=3, faults={n: record_delta(n) for n in (100, 101, 102)})
    outcome = run_federation(grid, FederationConfig.from_run_config(rc))
    assert outcome.metrics["federation"]["aggregated_rounds"] == [1, 2]

    train = [m for m in grid.sent if m.metadata.message_type == MessageType.TRAIN]
    first, second = train[:3], train[3:]
    names = set(first[0].content[CONTROL_KEY])
    assert names and names <= set(first[0].content["arrays"])
    assert all(not v.numpy().any() for v in first[0].content[CONTROL_KEY].values())
    # every client trained in round 1 from c_i = 0: c = the sum of their deltas / num-clients ...
    for name in names:
        expected = sum(d[0][name].astype(np.float64) for d in deltas.values()) / 3
        np.testing.assert_allclose(second[0].content[CONTROL_KEY][name].numpy(), expected, rtol=1e-5, atol=1e-8)
        assert np.abs(expected).max() > 0
    # ... and each client keeps c_i = its round-1 delta + its round-2 delta
    for node, context in grid.contexts.items():
        state = context.state[CLIENT_STATE_KEY]
        for name in names:
            np.testing.assert_allclose(state[name].numpy(), deltas[node][0][name] + deltas[node][1][name],
                                       rtol=1e-5, atol=1e-8)
    # the control variates travel both ways beside the experts
    arrays_bytes = sum(v.numpy().nbytes for v in first[0].content["arrays"].values())
    control_bytes = sum(v.numpy().nbytes for v in first[0].content[CONTROL_KEY].values())
    assert outcome.metrics["federation"]["bytes_per_client_round"] == 2 * (arrays_bytes + control_bytes)

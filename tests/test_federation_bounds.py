"""One client's contribution is bounded (update norm, num-examples), and no client-supplied value
ends the run: the strategy objects directly, no Flower runtime."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg, FedMedian

from federation.bounds import capped
from federation.strategies import ValidatingStrategy
from tests.test_federation_strategy import SPEC, arrays, reply

pytest_plugins = ["tests.test_federation_support"]


def eval_reply(node: int, **metrics) -> Message:
    instruction = Message(RecordDict(), dst_node_id=node, message_type=MessageType.EVALUATE)
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=instruction)


def _mean(updates):
    return {k: np.mean([u[k] for u in updates], axis=0) for k in SPEC}


@pytest.mark.usefixtures("server_identity")
@pytest.mark.parametrize("scale", [1e30, 1e6, -1e20])
def test_a_huge_finite_update_is_clipped_not_adopted(scale):
    honest = [arrays(i) for i in range(3)]
    hostile = {k: v * scale for k, v in arrays(9).items()}
    strategy = ValidatingStrategy(FedAvg(), SPEC, 2, ["sst2"])
    agg, _ = strategy.aggregate_train(1, [reply(i + 1, t) for i, t in enumerate(honest + [hostile])])
    honest_norm = max(math.sqrt(sum(float(np.sum(t[k] ** 2)) for k in SPEC)) for t in honest)
    agg_norm = math.sqrt(sum(float(np.sum(agg[k].numpy().astype(np.float64) ** 2)) for k in SPEC))
    assert agg_norm < 10 * honest_norm  # bounded by the others, whatever the scale
    assert strategy.log.clipped[1][0][0] == 4 and "clipped" in strategy.log.clipped[1][0][1]


@pytest.mark.usefixtures("server_identity")
def test_update_norms_are_measured_from_the_experts_sent():
    sent = arrays(0)
    strategy = ValidatingStrategy(FedAvg(), SPEC, 2, ["sst2"])
    strategy._sent = {1: ArrayRecord({k: Array(v) for k, v in sent.items()})}
    near = [{k: sent[k] + 0.01 * arrays(i)[k] for k in SPEC} for i in (1, 2, 3)]
    agg, _ = strategy.aggregate_train(1, [reply(i, t) for i, t in enumerate(near, 1)])
    for k in SPEC:  # small honest steps are untouched: the plain mean
        np.testing.assert_allclose(agg[k].numpy(), _mean(near)[k], rtol=1e-5, atol=1e-6)
    assert not strategy.log.clipped


@pytest.mark.usefixtures("server_identity")
def test_one_client_cannot_decide_the_aggregate_with_num_examples():
    updates = [arrays(i) for i in range(3)]
    strategy = ValidatingStrategy(FedAvg(), SPEC, 2, ["sst2"])
    agg, _ = strategy.aggregate_train(1, [reply(1, updates[0], 1e15), reply(2, updates[1], 10),
                                          reply(3, updates[2], 10)])
    # capped at 10x the others' median: weights 100, 10, 10
    for k in SPEC:
        expected = (100 * updates[0][k] + 10 * updates[1][k] + 10 * updates[2][k]) / 120
        np.testing.assert_allclose(agg[k].numpy(), expected, rtol=1e-5, atol=1e-6)


def test_capped_is_leave_one_out_for_random_values():
    rng = random.Random(0)
    for _ in range(300):
        values = [rng.choice([0.0, 1.0, rng.uniform(0, 10), 10 ** rng.uniform(0, 30)])
                  for _ in range(rng.randint(1, 6))]
        out = capped(values, 10.0)
        for i, (v, c) in enumerate(zip(values, out)):
            others = values[:i] + values[i + 1:]
            assert c <= v and (not others or np.median(others) == 0 or c <= 10 * np.median(others) + 1e-9)


HOSTILE_VALUES = [math.nan, math.inf, -math.inf, -1, 0, 1e300, [1.0, 2.0], 2.5, 99, -3]  # what a MetricRecord holds


@pytest.mark.usefixtures("server_identity")
def test_no_client_supplied_evaluation_value_ends_the_run():
    strategy = ValidatingStrategy(FedAvg(), SPEC, 1, ["sst2", "rte"])
    rng = random.Random(1)
    for round_ in range(50):
        replies = [eval_reply(1, **{"num-examples": 10, "task-index": 0, "accuracy": 0.5})]
        for node in range(2, 6):
            metrics = {"num-examples": rng.choice(HOSTILE_VALUES), "task-index": rng.choice(HOSTILE_VALUES),
                       "accuracy": rng.choice(HOSTILE_VALUES)}
            replies.append(eval_reply(node, **metrics))
        result = strategy.aggregate_evaluate(round_, replies)
        assert result is not None and all(math.isfinite(v) for v in result.values())


@pytest.mark.usefixtures("server_identity")
def test_nan_task_index_is_dropped():
    strategy = ValidatingStrategy(FedAvg(), SPEC, 1, ["sst2"])
    result = strategy.aggregate_evaluate(1, [eval_reply(1, **{"num-examples": 10, "task-index": math.nan,
                                                               "accuracy": 0.1}),
                                             eval_reply(2, **{"num-examples": 10, "task-index": 0,
                                                              "accuracy": 0.9})])
    assert result["sst2-accuracy"] == pytest.approx(0.9)


@pytest.mark.usefixtures("server_identity")
@pytest.mark.parametrize("inner", [FedAvg, FedMedian])
def test_no_client_supplied_training_value_ends_the_run(inner):
    strategy = ValidatingStrategy(inner(), SPEC, 1, ["sst2"])
    rng = random.Random(2)
    for round_ in range(20):
        replies = [reply(1, arrays(round_))]
        for node in range(2, 5):
            extra = {"train-seconds": rng.choice(HOSTILE_VALUES), "train-loss": rng.choice(HOSTILE_VALUES)}
            tensors = {k: v * rng.choice([1.0, 1e30, 0.0]) for k, v in arrays(node).items()}
            replies.append(reply(node, tensors, rng.choice(HOSTILE_VALUES), **extra))
        agg, _ = strategy.aggregate_train(round_, replies)  # never raises
        assert agg is None or all(np.isfinite(a.numpy()).all() for a in agg.values())

"""The server side without a model: update checks, aggregation numbers, strategy choice, config."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedTrimmedAvg,
    FedYogi,
    Krum,
)

from federation.config import FAMILY_DEFAULT_VALUES, FederationConfig
from federation.records import check_record, travelling_name
from federation.strategies import ValidatingStrategy, build_strategy, flower_strategy, reply_problem

pytest_plugins = ["tests.test_federation_support"]

SPEC = {
    "encoder.layer.0.intermediate.dense.adamix_lora_A": ((2, 3, 4), "float32"),
    "encoder.layer.0.intermediate.dense.adamix_lora_B": ((1, 4, 3), "float32"),
}


def arrays(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(shape).astype(np.float32) for k, (shape, _) in SPEC.items()}


def reply(node: int, tensors: dict[str, np.ndarray], n: float = 10, **metrics) -> Message:
    instruction = Message(RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN)
    record = ArrayRecord({k: Array(v) for k, v in tensors.items()})
    content = RecordDict(
        {"arrays": record, "metrics": MetricRecord({"num-examples": n, **metrics})}
    )
    return Message(content, reply_to=instruction)


def error_reply(node: int) -> Message:
    instruction = Message(RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN)
    return Message(Error(code=1, reason="ClientAppException: boom"), reply_to=instruction)


def fedavg_wrapper(min_valid: int = 2) -> ValidatingStrategy:
    return ValidatingStrategy(FedAvg(), SPEC, min_valid, ["sst2"])


@pytest.mark.usefixtures("server_identity")
def test_fedavg_aggregate_is_the_example_weighted_mean():
    updates = {1: (arrays(1), 10), 2: (arrays(2), 30), 3: (arrays(3), 60)}
    agg, metrics = fedavg_wrapper().aggregate_train(
        1, [reply(n, t, w, **{"train-loss": float(n)}) for n, (t, w) in updates.items()]
    )
    for name in SPEC:
        expected = sum(w * t[name].astype(np.float64) for t, w in updates.values()) / 100.0
        np.testing.assert_allclose(agg[name].numpy(), expected, rtol=1e-6, atol=1e-7)
    assert metrics["train-loss"] == pytest.approx((10 * 1 + 30 * 2 + 60 * 3) / 100)


@pytest.mark.usefixtures("server_identity")
@pytest.mark.parametrize(
    "corrupt, reason",
    [
        (
            lambda t: (
                t
                | {
                    "encoder.layer.0.intermediate.dense.adamix_lora_A": np.full(
                        (2, 3, 4), np.nan, np.float32
                    )
                }
            ),
            "non-finite",
        ),
        (
            lambda t: (
                t
                | {
                    "encoder.layer.0.intermediate.dense.adamix_lora_B": np.full(
                        (1, 4, 3), np.inf, np.float32
                    )
                }
            ),
            "non-finite",
        ),
        (
            lambda t: (
                t
                | {
                    "encoder.layer.0.intermediate.dense.adamix_lora_A": np.zeros(
                        (2, 3, 5), np.float32
                    )
                }
            ),
            "shape",
        ),
        (
            lambda t: (
                t | {"encoder.layer.0.intermediate.dense.weight": np.zeros((4, 4), np.float32)}
            ),
            "unexpected",
        ),
        (lambda t: {k: v for k, v in t.items() if k.endswith("lora_A")}, "missing"),
        (lambda t: {k: v.astype(np.float64) for k, v in t.items()}, "dtype"),
    ],
)
def test_a_bad_update_is_rejected_logged_and_the_rest_aggregated(corrupt, reason, caplog):
    strategy = fedavg_wrapper()
    good = {1: arrays(1), 2: arrays(2)}
    replies = [reply(1, good[1], 10), reply(2, good[2], 30), reply(3, corrupt(arrays(3)), 1000)]
    with caplog.at_level(logging.WARNING):
        agg, _ = strategy.aggregate_train(1, replies)
    ((node, why),) = strategy.log.rejected[1]
    assert node == 3 and reason in why
    assert "rejected the update of node 3" in caplog.text
    for name in SPEC:  # the bad client's 1000 examples carry no weight at all
        np.testing.assert_allclose(
            agg[name].numpy(), (10 * good[1][name] + 30 * good[2][name]) / 40, rtol=1e-6
        )
    assert strategy.log.aggregated_rounds == [1]


@pytest.mark.usefixtures("server_identity")
def test_error_replies_and_bad_weights_are_rejected():
    strategy = fedavg_wrapper()
    replies = [
        reply(1, arrays(1)),
        error_reply(2),
        reply(3, arrays(3), n=0),
        reply(4, arrays(4), n=float("nan")),
    ]
    agg, _ = strategy.aggregate_train(1, replies)
    assert agg is None  # one valid update < min 2
    reasons = dict(strategy.log.rejected[1])
    assert "boom" in reasons[2] and "num-examples" in reasons[3] and "num-examples" in reasons[4]
    assert strategy.log.skipped == [1] and strategy.log.aggregated_rounds == []


@pytest.mark.usefixtures("server_identity")
def test_a_corrupted_aggregate_is_never_adopted(caplog):
    class Overflowing(FedAvg):  # an aggregate that overflows float32 although every input is finite
        def aggregate_train(self, server_round, replies):
            agg, metrics = super().aggregate_train(server_round, replies)
            return ArrayRecord(
                {k: Array(v.numpy() * np.float32(1e38) * 10) for k, v in agg.items()}
            ), metrics

    strategy = ValidatingStrategy(Overflowing(), SPEC, 2, ["sst2"])
    with caplog.at_level(logging.WARNING), np.errstate(over="ignore"):
        agg, metrics = strategy.aggregate_train(1, [reply(1, arrays(1)), reply(2, arrays(2))])
    assert agg is None and metrics is None
    assert "corrupted aggregate" in caplog.text and strategy.log.skipped == [1]


@pytest.mark.usefixtures("server_identity")
def test_fedmedian_is_the_elementwise_median_of_the_valid_updates():
    strategy = ValidatingStrategy(FedMedian(), SPEC, 2, ["sst2"])
    ups = [arrays(s) for s in (1, 2, 3)]
    agg, _ = strategy.aggregate_train(
        1,
        [reply(i, u) for i, u in enumerate(ups)]
        + [
            reply(
                9,
                arrays(9)
                | {
                    "encoder.layer.0.intermediate.dense.adamix_lora_A": np.full(
                        (2, 3, 4), np.nan, np.float32
                    )
                },
            )
        ],
    )
    for name in SPEC:
        np.testing.assert_allclose(
            agg[name].numpy(), np.median(np.stack([u[name] for u in ups]), axis=0), rtol=1e-6
        )


@pytest.mark.usefixtures("server_identity")
def test_evaluation_metrics_are_weighted_per_task():
    strategy = ValidatingStrategy(FedAvg(), SPEC, 1, ["sst2", "stsb"])

    def ev(node, n, task, **m):
        instruction = Message(RecordDict(), dst_node_id=node, message_type=MessageType.EVALUATE)
        return Message(
            RecordDict({"metrics": MetricRecord({"num-examples": n, "task-index": task, **m})}),
            reply_to=instruction,
        )

    out = strategy.aggregate_evaluate(
        1,
        [
            ev(1, 10, 0, accuracy=0.5),
            ev(2, 30, 0, accuracy=0.9),
            ev(3, 5, 1, pearson=0.7),
            error_reply(4),
        ],
    )
    assert out["sst2-accuracy"] == pytest.approx(0.8) and out["stsb-pearson"] == pytest.approx(0.7)
    assert "stsb-accuracy" not in out


@pytest.mark.parametrize(
    "name, dp, inner, outer",
    [
        ("fedavg", "none", FedAvg, FedAvg),
        ("fedmedian", "none", FedMedian, FedMedian),
        ("fedtrimmedavg", "none", FedTrimmedAvg, FedTrimmedAvg),
        ("krum", "none", Krum, Krum),
        ("fedavgm", "none", FedAvgM, FedAvgM),
        ("fedadam", "none", FedAdam, FedAdam),
        ("fedyogi", "none", FedYogi, FedYogi),
        ("fedadagrad", "server-fixed", FedAdagrad, DifferentialPrivacyServerSideFixedClipping),
        ("fedavg", "server-fixed", FedAvg, DifferentialPrivacyServerSideFixedClipping),
        ("fedavg", "client-fixed", FedAvg, DifferentialPrivacyClientSideFixedClipping),
        ("fedmedian", "server-adaptive", FedMedian, DifferentialPrivacyServerSideAdaptiveClipping),
    ],
)
def test_strategy_selection(name, dp, inner, outer):
    cfg = FederationConfig(strategy=name, dp=dp, num_clients=4, min_clients=3)
    strategy = flower_strategy(cfg)
    assert type(strategy) is outer
    base = getattr(strategy, "strategy", strategy)
    assert type(base) is inner and base.min_train_nodes == 3 and base.fraction_train == 1.0
    assert isinstance(build_strategy(cfg, SPEC), ValidatingStrategy)


class TwoNodes:
    """The part of a Flower Grid that ``configure_train`` uses; no node answers the partition query."""

    def get_node_ids(self) -> list[int]:
        return [1, 2]

    def send_and_receive(self, messages, *, timeout=None) -> list:
        return []


def as_record(tensors: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(v) for k, v in tensors.items()})


@pytest.mark.usefixtures("server_identity")
def test_fedavgm_steps_the_server_with_momentum_from_what_was_sent():
    cfg = FederationConfig(
        strategy="fedavgm", server_learning_rate=2.0, server_momentum=0.9, min_clients=2
    )
    strategy = build_strategy(cfg, SPEC)
    sent, momentum = arrays(0), None
    for rnd in (1, 2, 3):
        if rnd == 3:  # as after a refused round 2: the server re-sends other arrays than its last
            sent = arrays(99)
        strategy.configure_train(rnd, as_record(sent), ConfigRecord(), TwoNodes())
        ups = [arrays(10 * rnd + 1), arrays(10 * rnd + 2)]
        agg, _ = strategy.aggregate_train(rnd, [reply(1, ups[0], 10), reply(2, ups[1], 30)])
        new = {}
        for k in SPEC:
            pseudo_gradient = sent[k] - (10 * ups[0][k] + 30 * ups[1][k]) / 40
            momentum_k = pseudo_gradient if momentum is None else 0.9 * momentum[k] + pseudo_gradient
            new[k] = sent[k] - 2.0 * momentum_k
            np.testing.assert_allclose(agg[k].numpy(), new[k], rtol=1e-4, atol=1e-5)
        momentum = {k: (sent[k] - new[k]) / 2.0 for k in SPEC}
        sent = new


@pytest.mark.usefixtures("server_identity")
def test_server_side_dp_noise_is_applied_to_the_valid_updates_only():
    cfg = FederationConfig(
        strategy="fedavg",
        dp="server-fixed",
        num_clients=2,
        min_clients=2,
        dp_noise_multiplier=0.0,
        dp_clipping_norm=1e6,
    )
    strategy = build_strategy(cfg, SPEC)
    strategy.inner.current_arrays = ArrayRecord(
        {k: Array(np.zeros(s, np.float32)) for k, (s, _) in SPEC.items()}
    )
    ups = [arrays(1), arrays(2)]
    agg, _ = strategy.aggregate_train(1, [reply(1, ups[0]), reply(2, ups[1]), error_reply(3)])
    for name in SPEC:  # zero noise and a huge clip: exactly FedAvg of the two valid updates
        np.testing.assert_allclose(agg[name].numpy(), (ups[0][name] + ups[1][name]) / 2, rtol=1e-5)


def test_reply_problem_accepts_a_clean_update(server_identity):
    assert reply_problem(reply(1, arrays(1)), SPEC) is None


def test_only_adapter_and_head_names_may_travel():
    assert travelling_name("encoder.layer.0.attention.self.query.adamix_lora_A")
    assert travelling_name("head.classifier.weight")
    assert not travelling_name("encoder.layer.0.attention.self.query.base_layer.weight")
    assert not travelling_name("embeddings.word_embeddings.weight")
    record = ArrayRecord({k: Array(v) for k, v in arrays(1).items()})
    assert check_record(record, SPEC) == []


def test_config_from_run_config_and_validation():
    cfg = FederationConfig.from_run_config(
        {
            "tasks": "sst2,rte",
            "num-clients": "5",
            "publish": "false",
            "learning-rate": 3e-4,
            "flower-own-key": 1,
        }
    )
    assert (
        cfg.num_clients == 5 and cfg.publish is False and cfg.multi_task and not cfg.head_federated
    )
    assert [cfg.client_task(i) for i in range(5)] == [
        ("sst2", 0, 3),
        ("rte", 0, 2),
        ("sst2", 1, 3),
        ("rte", 1, 2),
        ("sst2", 2, 3),
    ]
    assert FederationConfig(tasks="sst2").head_federated
    assert FederationConfig(tasks="sst2", federate_head="false").head_federated is False
    assert FederationConfig.from_run_config(cfg.to_run_config()) == cfg
    with pytest.raises(
        ValueError, match="strategy='fedprox' is not supported; choose one of fedavg"
    ):
        FederationConfig(strategy="fedprox")
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        FederationConfig(tasks="nope")
    with pytest.raises(ValueError, match="min-clients=5 exceeds num-clients=4"):
        FederationConfig(num_clients=4, min_clients=5)
    with pytest.raises(ValueError, match="num-rounds must be int"):
        FederationConfig.from_run_config({"num-rounds": "three"})


@pytest.mark.usefixtures("server_identity")
@pytest.mark.parametrize("name", ["fedtrimmedavg", "krum"])
def test_robust_strategies_aggregate_valid_updates_in_the_model_dtype(name):
    cfg = FederationConfig(strategy=name, num_clients=5, min_clients=2, trimmed_beta=0.2)
    strategy = build_strategy(cfg, SPEC)
    ups = [arrays(s) for s in range(5)]
    agg, _ = strategy.aggregate_train(1, [reply(i, u) for i, u in enumerate(ups)])
    stack = {k: np.stack([u[k] for u in ups]) for k in SPEC}
    for k in SPEC:
        assert agg[k].dtype == "float32" and np.isfinite(agg[k].numpy()).all()
        if name == "krum":  # Krum picks one of the client updates
            assert any(np.allclose(agg[k].numpy(), u[k]) for u in ups)
        else:  # trimming one of five at each end: mean of the middle three, per element
            middle = np.sort(stack[k], axis=0)[1:4].mean(axis=0)
            np.testing.assert_allclose(agg[k].numpy(), middle, rtol=1e-5)


def test_pyproject_run_config_matches_the_dataclass():
    import tomllib
    from pathlib import Path

    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    app = project["tool"]["flwr"]["app"]
    assert app["components"] == {
        "serverapp": "federation.server_app:app",
        "clientapp": "federation.client_app:app",
    }
    # pyproject leaves the family-dependent keys to the task family ("auto", 0)
    assert app["config"] == FederationConfig().to_run_config() | FAMILY_DEFAULT_VALUES


@pytest.mark.usefixtures("server_identity")
def test_tail_average_is_the_mean_of_the_last_aggregated_rounds():
    strategy = ValidatingStrategy(FedAvg(), SPEC, 2, ["sst2"], average_last=2)
    assert strategy.tail_average() is None  # nothing aggregated yet
    aggregates = []
    for server_round in (1, 2, 3):
        agg, _ = strategy.aggregate_train(
            server_round, [reply(1, arrays(10 * server_round)), reply(2, arrays(10 * server_round + 1))])
        aggregates.append({k: v.numpy() for k, v in agg.items()})
    # a round that keeps the previous experts adds nothing to the window
    assert strategy.aggregate_train(4, [reply(1, arrays(99))]) == (None, None)
    tail = strategy.tail_average()
    for name, (_, dtype) in SPEC.items():
        expected = (aggregates[1][name].astype(np.float64) + aggregates[2][name]) / 2
        assert tail[name].numpy().dtype == np.dtype(dtype)
        np.testing.assert_allclose(tail[name].numpy(), expected, rtol=1e-6)
        assert not np.allclose(tail[name].numpy(), aggregates[2][name])  # not just the last round's


@pytest.mark.usefixtures("server_identity")
def test_tail_average_keeps_frozen_tensors_bitwise_and_one_round_is_the_last_aggregate():
    frozen = "encoder.layer.0.intermediate.dense.adamix_lora_A"
    sent = arrays(0)
    strategy = ValidatingStrategy(FedAvg(), SPEC, 2, ["sst2"], frozen=[frozen], average_last=3)
    for server_round in (1, 2):
        strategy.configure_train(server_round, as_record(sent), ConfigRecord(), TwoNodes())
        ups = [arrays(server_round * 10 + i) | {frozen: sent[frozen]} for i in (1, 2)]
        strategy.aggregate_train(server_round, [reply(1, ups[0]), reply(2, ups[1])])
    assert np.array_equal(strategy.tail_average()[frozen].numpy(), sent[frozen])

    single = ValidatingStrategy(FedAvg(), SPEC, 2, ["sst2"])
    agg, _ = single.aggregate_train(1, [reply(1, arrays(1)), reply(2, arrays(2))])
    assert all(np.array_equal(single.tail_average()[k].numpy(), agg[k].numpy()) for k in SPEC)
    with pytest.raises(ValueError, match="average_last"):
        ValidatingStrategy(FedAvg(), SPEC, 2, ["sst2"], average_last=0)
    with pytest.raises(ValueError, match="average-last-rounds"):
        FederationConfig(average_last_rounds=-1)
    # 0: a quarter of the rounds, at least the last one
    assert [FederationConfig(num_rounds=r).tail_rounds for r in (1, 3, 8, 20)] == [1, 1, 2, 5]
    assert FederationConfig(num_rounds=20, average_last_rounds=3).tail_rounds == 3

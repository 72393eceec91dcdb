"""Label-balanced client weighting: the weights (the federation's label mix, as close to uniform as
that allows), the server's pooled counts, the checks on a reply's counts, and a federation that
averages its replies with those weights."""

from __future__ import annotations

import numpy as np
import pytest

from adamix_zoo.formats.files import EXPERTS_FILE, read_safetensors
from federation.client_app import app, train_weight
from federation.config import FederationConfig
from federation.label_balance import LABEL_COUNTS, LabelMix, balanced_weights, counts_problem
from federation.server_app import run_federation
from federation.task import family_of
from tests.test_federation_app import train_replies
from tests.test_federation_support import InProcessGrid, tiny_run_config

pytest_plugins = ["tests.test_federation_support"]


def test_the_weights_closest_to_uniform_that_reach_the_mix():
    mixes = np.array([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    weights = balanced_weights(mixes, np.array([0.6, 0.4]))
    # the projection of uniform onto {a - b = 0.2, a + b + c = 1}: uniform + 0.1 * (1, -1, 0)
    np.testing.assert_allclose(weights, [1 / 3 + 0.1, 1 / 3 - 0.1, 1 / 3], atol=1e-5)
    np.testing.assert_allclose(weights @ mixes, [0.6, 0.4], atol=1e-6)


def test_uniform_weights_stay_when_they_already_reach_the_mix():
    mixes = np.array([[0.9, 0.1], [0.1, 0.9], [0.5, 0.5]])
    np.testing.assert_array_equal(balanced_weights(mixes, np.array([0.5, 0.5])), np.full(3, 1 / 3))


def test_an_unreachable_mix_takes_the_closest_client():
    mixes = np.array([[0.9, 0.1], [0.7, 0.3]])  # both lean to label 0 more than the federation
    np.testing.assert_allclose(balanced_weights(mixes, np.array([0.5, 0.5])), [0.0, 1.0], atol=1e-6)


def test_the_weights_reach_a_three_label_mix_and_stay_a_distribution():
    mixes = np.random.default_rng(0).dirichlet([0.5] * 3, size=6)
    target = np.array([0.3, 0.3, 0.4])
    weights = balanced_weights(mixes, target)
    assert weights.min() >= 0 and weights.sum() == pytest.approx(1.0)
    np.testing.assert_allclose(weights @ mixes, target, atol=1e-5)


def test_the_federation_mix_pools_each_clients_latest_counts():
    mix = LabelMix(num_labels=2)
    mix.record(1, [10, 0])
    mix.record(2, [0, 30])
    mix.record(1, [10, 10])  # a client's newer counts replace its older ones
    np.testing.assert_allclose(mix.federation_mix(), [10 / 50, 40 / 50])
    weights = mix.weights([(3, [5, 5]), (4, [0, 10])])
    assert weights.sum() == pytest.approx(2.0)
    # pooled with the two new clients: [15, 55] of 70; the replies' mix reaches it
    replies_mix = (weights / 2) @ np.array([[0.5, 0.5], [0.0, 1.0]])
    np.testing.assert_allclose(replies_mix, [15 / 70, 55 / 70], atol=1e-6)


@pytest.mark.parametrize("value", [None, [1], [1, 2, 3], [1, -1], [0, 0], [True, 2], [1.0, float("nan")], "12"])
def test_unusable_label_counts_are_named(value):
    assert LABEL_COUNTS in counts_problem(value, num_labels=2)


def test_usable_label_counts_pass():
    assert counts_problem([0, 7], num_labels=2) is None


@pytest.mark.parametrize("tasks", ["sst2,rte", "stsb", "e2e"])
def test_label_balanced_needs_one_classification_task(tasks):
    with pytest.raises(ValueError, match="label-balanced needs one classification task"):
        FederationConfig.from_run_config({"client-weighting": "label-balanced", "tasks": tasks})


def test_a_label_balanced_reply_weighs_one_until_the_server_reweighs_it():
    cfg = FederationConfig.from_run_config({"client-weighting": "label-balanced"})
    assert train_weight(cfg, 1032) == 1


def wrong_counts(reply):
    reply.content["metrics"][LABEL_COUNTS] = [1, 2, 3]
    return reply


@pytest.mark.usefixtures("server_identity", "one_thread")
def test_the_round_averages_replies_with_the_label_balanced_weights(tiny_env):
    rc = tiny_run_config(tiny_env, **{"num-clients": 4, "num-rounds": 1, "partitioner": "dirichlet",
                                      "dirichlet-alpha": 0.3, "client-weighting": "label-balanced"})
    cfg = FederationConfig.from_run_config(rc)
    grid = InProcessGrid(app, rc, num_nodes=4, faults={103: wrong_counts})
    outcome = run_federation(grid, cfg)
    log = outcome.metrics["federation"]
    assert [r["node"] for r in log["rejected_updates"][1]] == [103]
    assert LABEL_COUNTS in log["rejected_updates"][1][0]["reason"]
    good = [r for r in train_replies(grid, 1) if r.metadata.src_node_id != 103]
    counts = [family_of(cfg).client_data(cfg, pid, "train")[1] for pid in range(3)]
    counts = np.array([family_of(cfg).label_counts("sst2", examples) for examples in counts], dtype=np.float64)
    assert [r.content["metrics"][LABEL_COUNTS] for r in good] == counts.tolist()  # each its partition's
    mixes = counts / counts.sum(axis=1, keepdims=True)
    assert np.ptp(mixes[:, 0]) > 0.2  # skewed enough that uniform weights miss the pooled mix
    expected = 3 * balanced_weights(mixes, counts.sum(axis=0) / counts.sum())
    np.testing.assert_allclose(log["label_balanced_weights"][1], expected, atol=1e-5)
    saved = {k: v.numpy() for k, v in read_safetensors(outcome.folder / EXPERTS_FILE).items()}
    assert saved
    for name, value in saved.items():
        mean = sum(w * r.content["arrays"][name].numpy().astype(np.float64) for w, r in zip(expected, good)) / 3
        np.testing.assert_allclose(value, mean, rtol=1e-4, atol=1e-6)

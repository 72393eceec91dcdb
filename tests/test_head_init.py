"""The closed-form head (``head-init=lda``): the statistics add up over any split of the rows, the
LDA separates what is separable, bad statistics are named, and a federation starts round 1 from
exactly the LDA head of the pooled partitions, leaving out a client whose reply is unusable."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, MessageType

from adamix_zoo.head_init import FeatureStatistics, check_head_init, lda_head
from federation.client_app import app
from federation.config import FederationConfig
from federation.head_init import STATISTICS_KEY, WEIGHT, asks_for_statistics, statistics_rows
from federation.server_app import FederationError, run_federation
from federation.task import family_of
from tests.test_federation_support import InProcessGrid, tiny_run_config

pytest_plugins = ["tests.test_federation_support"]


def gaussian_rows(n: int = 400, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two classes of 8-dimensional Gaussians, means 1.5 apart along a correlated direction."""
    mix = torch.randn(8, 8, generator=torch.Generator().manual_seed(99))  # one distribution for every seed
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    x = torch.randn(n, 8, generator=g) @ mix * 0.3 + y[:, None] * torch.linspace(0.5, 1.5, 8)
    return x, y


def test_statistics_of_any_split_sum_to_those_of_the_pooled_rows():
    x, y = gaussian_rows()
    whole = FeatureStatistics.of(x, y, 2)
    parts = FeatureStatistics.of(x[:50], y[:50], 2) + FeatureStatistics.of(x[50:], y[50:], 2)
    for name, value in whole.tensors().items():
        torch.testing.assert_close(parts.tensors()[name], value)
    assert whole.counts.tolist() == [float((y == 0).sum()), float((y == 1).sum())]


def test_the_lda_head_separates_separable_classes_and_matches_sklearn():
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

    x, y = gaussian_rows()
    weight, bias = lda_head(FeatureStatistics.of(x, y, 2), shrinkage=0.0)
    xt, yt = gaussian_rows(seed=1)
    predicted = (xt.double() @ weight.T + bias).argmax(1)
    assert (predicted == yt).double().mean() > 0.95
    reference = LinearDiscriminantAnalysis(solver="lsqr").fit(x.numpy(), y.numpy())
    np.testing.assert_array_equal(predicted.numpy(), reference.predict(xt.numpy()))


def test_a_class_without_rows_is_named():
    x, y = gaussian_rows()
    with pytest.raises(ValueError, match=r"label\(s\) \[2\]"):
        lda_head(FeatureStatistics.of(x, y, 3))


@pytest.mark.parametrize("change, problem", [
    (lambda t: t.pop("scatter"), "lack 'scatter'"),
    (lambda t: t.update(sums=torch.zeros(2, 5)), r"'sums' has shape \(2, 5\)"),
    (lambda t: t["scatter"].fill_(float("nan")), "'scatter' holds non-finite"),
    (lambda t: t["counts"].fill_(-1.0), "negative class count"),
])
def test_malformed_statistics_are_named(change, problem):
    x, y = gaussian_rows()
    tensors = FeatureStatistics.of(x, y, 2).tensors()
    change(tensors)
    with pytest.raises(ValueError, match=problem):
        FeatureStatistics.from_tensors(tensors, 2, 8)


def test_head_init_names_unknown_modes_and_regression():
    with pytest.raises(ValueError, match="choose one of random, lda"):
        check_head_init("ncm", 2)
    with pytest.raises(ValueError, match="regression"):
        check_head_init("lda", 1)


@pytest.mark.parametrize("overrides", [{"tasks": "stsb"}, {"tasks": "sst2,rte"}, {"dp": "client-fixed"},
                                       {"federate-head": "false"}, {"tasks": "e2e"}])
def test_head_init_lda_needs_one_classification_task_a_federated_head_and_no_dp(overrides):
    with pytest.raises(ValueError, match="head-init=lda needs one classification task"):
        FederationConfig.from_run_config({"tasks": "sst2", "head-init": "lda"} | overrides)


def pooled_lda(cfg: FederationConfig, partitions: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The LDA head of the partitions' training rows (at most head-init-rows each, drawn as the clients
    draw them) under the initial model, computed here."""
    family = family_of(cfg)
    model = family.build_model(cfg, "sst2")
    parts = [family.feature_statistics(cfg, "sst2", model, statistics_rows(
        family.client_data(cfg, pid, "train")[1], cfg.head_init_rows, cfg.seed * 1_000_003 + pid))
             for pid in partitions]
    return lda_head(sum(parts[1:], parts[0]))


def first_round_head(grid: InProcessGrid) -> torch.Tensor:
    sent = next(m for m in grid.sent if m.metadata.message_type == MessageType.TRAIN)
    return torch.from_numpy(sent.content["arrays"][WEIGHT].numpy())


@pytest.mark.usefixtures("server_identity", "one_thread")
@pytest.mark.parametrize("rows", [0, 5])
def test_round_one_starts_from_the_lda_head_of_the_pooled_partitions(tiny_env, rows):
    rc = tiny_run_config(tiny_env, **{"num-rounds": 1, "head-init": "lda", "partitioner": "dirichlet",
                                      "dirichlet-alpha": 0.3, "head-init-rows": rows})
    cfg = FederationConfig.from_run_config(rc)
    grid = InProcessGrid(app, rc, num_nodes=3)
    run_federation(grid, cfg)
    asked = [m for m in grid.sent if m.metadata.message_type == MessageType.QUERY and asks_for_statistics(m.content)]
    assert sorted(m.metadata.dst_node_id for m in asked) == [100, 101, 102]
    weight, _ = pooled_lda(cfg, [0, 1, 2])
    torch.testing.assert_close(first_round_head(grid), weight.float(), rtol=1e-5, atol=1e-6)
    counts = [r.content[STATISTICS_KEY]["counts"].numpy().sum() for r in grid.replies if STATISTICS_KEY in r.content]
    assert counts == [5.0] * 3 if rows else sum(counts) == 48  # the cap, or every one of the 48 rows


class CorruptStatisticsGrid(InProcessGrid):
    """Node 101's statistics reply carries a misshaped scatter."""

    def send_and_receive(self, messages, *, timeout=None):
        replies = super().send_and_receive(messages, timeout=timeout)
        for reply in replies:
            if reply.metadata.src_node_id == 101 and STATISTICS_KEY in reply.content.array_records:
                reply.content[STATISTICS_KEY]["scatter"] = Array(np.zeros((3, 3)))
        return replies


@pytest.mark.usefixtures("server_identity", "one_thread")
def test_an_unusable_statistics_reply_is_left_out(tiny_env, caplog):
    rc = tiny_run_config(tiny_env, **{"num-rounds": 1, "head-init": "lda"})
    cfg = FederationConfig.from_run_config(rc)
    grid = CorruptStatisticsGrid(app, rc, num_nodes=3)
    run_federation(grid, cfg)
    assert "node 101's statistics are left out" in caplog.text and "'scatter' has shape (3, 3)" in caplog.text
    weight, _ = pooled_lda(cfg, [0, 2])
    torch.testing.assert_close(first_round_head(grid), weight.float(), rtol=1e-5, atol=1e-6)


@pytest.mark.usefixtures("server_identity", "one_thread")
def test_too_few_usable_statistics_stop_the_run_before_any_round(tiny_env):
    rc = tiny_run_config(tiny_env, **{"num-rounds": 1, "head-init": "lda", "min-clients": 3})
    grid = CorruptStatisticsGrid(app, rc, num_nodes=3)
    with pytest.raises(FederationError, match="2 of 3 clients sent usable feature statistics, min-clients=3"):
        run_federation(grid, FederationConfig.from_run_config(rc))
    assert not any(m.metadata.message_type == MessageType.TRAIN for m in grid.sent)


def test_the_recipe_starts_from_the_lda_head_of_its_training_rows(tmp_path):
    from adamix_zoo.head_init import feature_statistics
    from adamix_zoo.recipes.glue import prepare, train_args
    from tests.tiny_glue import tiny_backbone_dir, write_glue

    env = {"backbone": str(tiny_backbone_dir(tmp_path / "bert")), "data_dir": str(write_glue(tmp_path / "glue")),
           "task": "sst2", "method": "adamix-lora", "progress": False, "save": False, "seed": 0}
    random_head = prepare(train_args(**env)).model
    setup = prepare(train_args(**env, head_init="lda"))
    weight, bias = lda_head(feature_statistics(random_head, setup.loaders.train))
    torch.testing.assert_close(setup.model.head.classifier.weight, weight.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(setup.model.head.classifier.bias, bias.float(), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(random_head.head.classifier.weight, setup.model.head.classifier.weight)


def test_a_client_sends_statistics_of_at_most_head_init_rows_rows():
    from federation.head_init import statistics_rows

    rows = list(range(10))
    assert statistics_rows(rows, 0, 1) == rows and statistics_rows(rows, 10, 1) == rows
    drawn = statistics_rows(rows, 4, 1)
    assert len(drawn) == 4 and drawn == sorted(set(drawn)) and drawn == statistics_rows(rows, 4, 1)
    with pytest.raises(ValueError, match="head-init-rows must be >= 0"):
        FederationConfig.from_run_config({"head-init-rows": -1})

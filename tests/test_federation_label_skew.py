"""Label-skewed clients: logit adjustment (the task loss on logits + tau * log(label prior), the
prior of a partition, a federation that trains with it) and the weight of each training reply."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from adamix_zoo.formats.files import EXPERTS_FILE, read_safetensors
from adamix_zoo.glue_tasks import get_task
from adamix_zoo.losses import compute_loss
from federation.client_app import app, train_weight
from federation.config import FederationConfig
from federation.glue_client import label_log_prior
from federation.server_app import run_federation
from federation.task import family_of
from tests.test_federation_app import train_replies, weighted_mean
from tests.test_federation_exactness import arrays_of
from tests.test_federation_support import InProcessGrid, tiny_run_config

pytest_plugins = ["tests.test_federation_support"]


class FixedLogits(torch.nn.Module):
    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = torch.nn.Parameter(logits)

    def forward(self, **_) -> torch.Tensor:
        return self.logits


def test_the_offset_shifts_the_task_loss_only():
    logits, labels = torch.tensor([[2.0, 0.0], [0.5, 1.0], [1.0, 1.0]]), torch.tensor([0, 1, 0])
    offset = torch.log(torch.tensor([0.9, 0.1]))
    loss, _ = compute_loss(FixedLogits(logits), {"labels": labels}, get_task("sst2"), 0.0, logit_offset=offset)
    assert loss.item() == pytest.approx(F.cross_entropy(logits + offset, labels).item())
    plain, _ = compute_loss(FixedLogits(logits), {"labels": labels}, get_task("sst2"), 0.0)
    assert plain.item() == pytest.approx(F.cross_entropy(logits, labels).item())
    # a client whose data are 90% label 0 pays more for predicting 0 than its prior explains
    assert loss.item() > plain.item()


def test_a_partitions_prior_is_smoothed():
    prior = label_log_prior([{"labels": 0}] * 7 + [{"labels": 1}], num_labels=3)
    assert prior.exp().tolist() == pytest.approx([8 / 11, 2 / 11, 1 / 11])
    assert math.isfinite(prior[2].item())


def test_logit_adjustment_must_not_be_negative():
    with pytest.raises(ValueError, match="logit-adjustment must be >= 0"):
        FederationConfig.from_run_config({"logit-adjustment": -1.0})


@pytest.mark.usefixtures("server_identity", "one_thread")
def test_a_federation_trains_with_logit_adjustment(tiny_env):
    aggregates = {}
    for tau in (0.0, 1.0):
        rc = tiny_run_config(tiny_env, **{"num-rounds": 1, "local-steps": 3, "learning-rate": 1e-2,
                                          "partitioner": "dirichlet", "dirichlet-alpha": 0.3,
                                          "logit-adjustment": tau, "output-dir": str(tiny_env / f"out{tau}")})
        grid = InProcessGrid(app, rc, num_nodes=3)
        outcome = run_federation(grid, FederationConfig.from_run_config(rc))
        assert outcome.metrics["accuracy"] is not None
        aggregates[tau] = [arrays_of(r) for r in grid.train_round(1)[1]]
    # same data, seeds and initial experts: only the loss differs, so the clients' heads do
    for plain, adjusted in zip(aggregates[0.0], aggregates[1.0]):
        assert not np.allclose(plain["head.classifier.weight"], adjusted["head.classifier.weight"])


@pytest.mark.parametrize("weighting, weights", [
    ("partition", [5, 96, 1032]), ("trained", [5, 96, 96]), ("uniform", [1, 1, 1])])
def test_a_training_reply_weighs_its_partition_what_it_trained_on_or_one(weighting, weights):
    cfg = FederationConfig.from_run_config({"client-weighting": weighting, "local-steps": 6, "batch-size": 16})
    assert [train_weight(cfg, n) for n in (5, 96, 1032)] == weights


def test_an_unknown_client_weighting_is_refused_by_name():
    with pytest.raises(ValueError, match="client-weighting"):
        FederationConfig.from_run_config({"client-weighting": "size"})


@pytest.mark.usefixtures("server_identity", "one_thread")
def test_the_round_averages_replies_by_the_examples_they_trained_on(tiny_env):
    rc = tiny_run_config(tiny_env, **{"num-rounds": 1, "local-steps": 2, "batch-size": 8, "partitioner": "dirichlet",
                                      "dirichlet-alpha": 0.3, "client-weighting": "trained"})
    cfg = FederationConfig.from_run_config(rc)
    grid = InProcessGrid(app, rc, num_nodes=3)
    outcome = run_federation(grid, cfg)
    replies = train_replies(grid, 1)
    sizes = [len(family_of(cfg).client_data(cfg, pid, "train")[1]) for pid in range(3)]
    weights = sorted(r.content["metrics"]["num-examples"] for r in replies)
    assert len(replies) == 3 and weights == sorted(min(n, 2 * 8) for n in sizes)
    assert max(sizes) > 16  # a partition larger than what its client trained on weighs 16, not its size
    saved = {k: v.numpy() for k, v in read_safetensors(outcome.folder / EXPERTS_FILE).items()}
    expected = weighted_mean(replies)
    assert saved and set(saved) <= set(expected)
    for name, value in saved.items():
        np.testing.assert_allclose(value, expected[name], rtol=1e-5, atol=1e-7)

"""Logit adjustment for label-skewed clients: the task loss on logits + tau * log(label prior), the
prior of a partition, and a federation that trains with it."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from adamix_zoo.glue_tasks import get_task
from adamix_zoo.losses import compute_loss
from federation.client_app import app
from federation.config import FederationConfig
from federation.glue_client import label_log_prior
from federation.server_app import run_federation
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

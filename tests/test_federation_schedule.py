"""The clients' learning rates: each round runs its slice of the run's warmup + linear decay schedule
(as a centralized run of rounds x local steps has it), and a task head may get its own peak rate."""

from __future__ import annotations

import pytest
import torch

from adamix_zoo.optim import make_optimizer, make_scheduler
from federation.config import FederationConfig
from federation.task import round_scheduler


def rates(scheduler, optimizer, steps: int) -> list[list[float]]:
    """The learning rate of every parameter group at each of ``steps`` steps."""
    out = []
    for _ in range(steps):
        out.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    return out


def two_groups() -> torch.optim.AdamW:
    model = torch.nn.ModuleDict({"adapter": torch.nn.Linear(2, 2), "head": torch.nn.Linear(2, 1)})
    return make_optimizer(model, lr=1e-3, head_lr=1e-2)


def test_the_rounds_run_the_centralized_schedule_in_slices():
    cfg = FederationConfig(num_rounds=5, local_steps=4, warmup_ratio=0.15, learning_rate=1e-3)
    optimizer = two_groups()
    central = rates(make_scheduler(optimizer, 20, 3), optimizer, 20)
    rounds = []
    for server_round in range(1, 6):
        optimizer = two_groups()  # a fresh AdamW every round
        rounds += rates(round_scheduler(cfg, optimizer, server_round), optimizer, 4)
    torch.testing.assert_close(torch.tensor(rounds), torch.tensor(central))
    assert rounds[0] == pytest.approx([1e-3 / 3, 1e-3 / 3, 1e-2 / 3, 1e-2 / 3])  # warmup, head at its own peak
    assert max(r[0] for r in rounds) == pytest.approx(1e-3) and rounds[-1][0] == pytest.approx(1e-3 / 17)


def test_a_constant_schedule_keeps_the_peak_rate():
    assert round_scheduler(FederationConfig(lr_schedule="constant"), two_groups(), 3) is None


@pytest.mark.parametrize("options, message", [
    ({"lr-schedule": "cosine"}, "lr-schedule='cosine' is not supported"),
    ({"warmup-ratio": 1.0}, "warmup-ratio in \\[0, 1\\)"),
    ({"head-learning-rate": -0.5}, "head-learning-rate >= 0 \\(0: learning-rate\\) or -1 \\(auto\\)"),
])
def test_bad_schedules_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        FederationConfig.from_run_config(options)


def test_defaults_are_the_federation_benchmarks_choice():
    """Defaults are the product: server optimizer, head rate and label-skew correction are what
    bench/federation.py chose on held-out training rows (bench/results/federation.json)."""
    import json
    from pathlib import Path

    from bench.federation import PROTOCOL

    results = json.loads((Path(__file__).resolve().parents[1] / "bench/results/federation.json").read_text())
    chosen = results["selection"]["federated_chosen"]
    cfg = FederationConfig()
    assert (cfg.strategy, cfg.server_learning_rate) == (PROTOCOL["strategy"], PROTOCOL["server_learning_rate"])
    assert (cfg.lr_schedule, cfg.warmup_ratio) == (PROTOCOL["lr_schedule"], PROTOCOL["warmup_ratio"])
    assert cfg.server_momentum == chosen["server_momentum"]
    assert cfg.head_learning_rate == chosen["head_learning_rate"]
    assert cfg.head_init == chosen.get("head_init", "random")
    assert cfg.logit_adjustment == chosen["logit_adjustment"]
    # the reply weighting the report ran at, adopted from the diagnoses
    from bench.federation import FEDERATED_REPORT_SETTINGS

    assert results["federated_report_settings"]["client-weighting"] == cfg.client_weighting
    assert FEDERATED_REPORT_SETTINGS["client-weighting"] == cfg.client_weighting
    # GLUE's rate: a finalist level with the chosen one (two-seed means less than one binomial standard
    # error of such a mean apart: the selection rows cannot rank them)
    finalists = results["selection"]["federated_finalists"]
    best = max(f["mean"] for f in finalists)
    standard_error = (best * (1 - best) / (2 * PROTOCOL["selection_rows"])) ** 0.5
    level = {f["hp"]["learning_rate"] for f in finalists
             if f["mean"] > best - standard_error
             and f["hp"] | {"learning_rate": chosen["learning_rate"]} == chosen}
    assert cfg.family == "glue" and cfg.learning_rate in level
    # data-to-text's: the rate the benchmark's generation case ran at
    from bench.federation_generation import FULL

    assert FederationConfig(tasks="e2e").learning_rate == FULL["learning_rate"]

"""Client optimizer state kept between rounds (``client-optimizer-state=keep``): a restored AdamW
continues exactly where the captured one stopped, bad state is refused by name, and a federation
keeps each client's state in its Context (in process, tiny model)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from federation.client_app import app
from federation.config import FederationConfig
from federation.optimizer_state import STATE_KEY, KeptOptimizerState
from federation.records import from_record
from federation.server_app import run_federation
from tests.test_federation_support import InProcessGrid, tiny_run_config

pytest_plugins = ["tests.test_federation_support"]


def steps(model: torch.nn.Module, optimizer: torch.optim.Optimizer, inputs: list[torch.Tensor]) -> None:
    for x in inputs:
        optimizer.zero_grad()
        model(x).pow(2).sum().backward()
        optimizer.step()


def test_a_restored_adamw_continues_exactly_where_the_captured_one_stopped():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    twin, restarted = copy.deepcopy(model), copy.deepcopy(model)
    inputs = [torch.randn(5, 4) for _ in range(6)]
    steps(twin, torch.optim.AdamW(twin.parameters(), lr=1e-2), inputs)

    kept = KeptOptimizerState()
    first = torch.optim.AdamW(model.parameters(), lr=1e-2)
    steps(model, first, inputs[:3])
    kept.capture(first, dict(model.named_parameters()))
    assert kept.tensors["weight/step"].item() == 3
    restarted.load_state_dict(model.state_dict())
    second = torch.optim.AdamW(model.parameters(), lr=1e-2)  # the next round's new optimizer
    KeptOptimizerState(kept.tensors).restore(second, dict(model.named_parameters()))
    steps(model, second, inputs[3:])
    for (name, param), twin_param in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(param, twin_param, rtol=0, atol=1e-7, msg=name)

    # a fresh AdamW for the second half (the default) is another optimizer: another model
    steps(restarted, torch.optim.AdamW(restarted.parameters(), lr=1e-2), inputs[3:])
    assert (restarted.weight - twin.weight).abs().max() > 1e-3


def test_kept_state_that_does_not_fit_is_refused_by_name():
    model = torch.nn.Linear(4, 3)
    params = dict(model.named_parameters())
    optimizer = torch.optim.AdamW(model.parameters())
    steps(model, optimizer, [torch.randn(2, 4)])
    kept = KeptOptimizerState()
    kept.capture(optimizer, params)
    with pytest.raises(ValueError, match="names 1 tensors this client does not train.*'weight'"):
        KeptOptimizerState(kept.tensors).restore(optimizer, {"bias": params["bias"]})
    misshaped = kept.tensors | {"bias/exp_avg": torch.zeros(5)}
    with pytest.raises(ValueError, match=r"bias/exp_avg has shape \(5,\), expected \(3,\)"):
        KeptOptimizerState(misshaped).restore(optimizer, params)
    incomplete = {k: v for k, v in kept.tensors.items() if k != "weight/step"}
    with pytest.raises(ValueError, match=r"state of weight lacks \['step'\]"):
        KeptOptimizerState(incomplete).restore(optimizer, params)
    with pytest.raises(ValueError, match="client-optimizer-state='sometimes'.*fresh, keep"):
        FederationConfig(client_optimizer_state="sometimes")


@pytest.mark.usefixtures("server_identity", "one_thread")
@pytest.mark.parametrize("mode", ["fresh", "keep"])
def test_a_federation_keeps_each_clients_adamw_state_only_when_asked(tiny_env, mode):
    rc = tiny_run_config(tiny_env, **{"num-rounds": 2, "client-optimizer-state": mode, "publish": False})
    grid = InProcessGrid(app, rc, num_nodes=3)
    outcome = run_federation(grid, FederationConfig.from_run_config(rc))
    assert outcome.metrics["federation"]["aggregated_rounds"] == [1, 2]
    assert outcome.metrics["federation"]["bytes_per_client_round"] > 0
    for context in grid.contexts.values():
        if mode == "fresh":
            assert STATE_KEY not in context.state.array_records
            continue
        state = from_record(context.state[STATE_KEY])
        counts = {k: v.item() for k, v in state.items() if k.endswith("/step")}
        # every trainable tensor (experts and the head) took both rounds' 2 local steps in one AdamW
        assert counts and set(counts.values()) == {4.0}
        assert any(k.startswith("head.") for k in counts) and any("adamix_" in k for k in counts)
        assert all(np.isfinite(v.numpy()).all() and v.abs().sum() > 0 for k, v in state.items()
                   if k.endswith("exp_avg_sq"))
    # what travels is the same in both modes: the experts and the head, nothing of the optimizer
    sent = [m for m in grid.sent if m.metadata.message_type == "train"]
    assert set(sent[0].content.array_records) == {"arrays"}

"""Exact aggregation of LoRA experts: the measured factor-averaging error against explicit products,
FFA-LoRA's frozen shared A (central and federated), and the combinations that make no sense."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, FedAvg
from typer.testing import CliRunner

from adamix_zoo import AdaMixConfig, AdaMixModel
from adamix_zoo.formats.files import ADAPTER_WEIGHTS_FILE, EXPERTS_FILE, read_safetensors
from adamix_zoo.formats.merged import PEFT_PREFIX, merged_tensors
from adamix_zoo.optim import make_optimizer
from federation import exactness
from federation.client_app import app
from federation.config import FederationConfig
from federation.server_app import run_federation
from federation.strategies import ValidatingStrategy, build_strategy
from tests.test_federation_strategy import TwoNodes, reply
from tests.test_federation_support import InProcessGrid, make_glue, tiny_run_config
from tests.tiny import tiny_batch, tiny_model

pytest_plugins = ["tests.test_federation_support"]

A, B = "adamix_lora_A", "adamix_lora_B"
K, R, D_IN, D_OUT = 3, 2, 5, 4
EXPERTS = {"up": (K, 1), "down": (1, K), "none": (K, K)}  # sharing -> (K_a, K_b)


def factors(sharing: str, seed: int, module: str = "m") -> dict[str, np.ndarray]:
    k_a, k_b = EXPERTS[sharing]
    rng = np.random.default_rng(seed)
    return {f"{module}.{A}": rng.standard_normal((k_a, R, D_IN)).astype(np.float32),
            f"{module}.{B}": rng.standard_normal((k_b, D_OUT, R)).astype(np.float32)}


def hand_relative_error(updates: list[dict], weights: list[float], module: str = "m") -> float:
    """Every expert pair's dW formed explicitly (float64): factors averaged vs updates averaged."""
    w = torch.tensor(weights, dtype=torch.float64) / sum(weights)
    a = [torch.from_numpy(u[f"{module}.{A}"]).double() for u in updates]
    b = [torch.from_numpy(u[f"{module}.{B}"]).double() for u in updates]
    mean_a, mean_b = sum(wi * x for wi, x in zip(w, a)), sum(wi * x for wi, x in zip(w, b))
    err = ref = 0.0
    for j in range(len(b[0])):
        for k in range(len(a[0])):
            mean_update = sum(wi * bi[j] @ ai[k] for wi, ai, bi in zip(w, a, b))
            err += float(((mean_b[j] @ mean_a[k] - mean_update) ** 2).sum())
            ref += float((mean_update ** 2).sum())
    return (err / ref) ** 0.5


# -- the measurement ------------------------------------------------------------------------------
@pytest.mark.parametrize("sharing", ["up", "down", "none"])
def test_relative_error_equals_a_hand_computation(sharing):
    updates, weights = [factors(sharing, s) for s in range(3)], [10.0, 30.0, 60.0]
    measured = exactness.relative_errors(updates, weights, exactness.lora_projections(updates[0]))
    expected = hand_relative_error(updates, weights)
    assert expected > 0.1  # independent random factors: far from their mean's product
    assert measured == {"m": pytest.approx(expected, rel=1e-9)}


def test_projection_error_with_wide_stacks_and_pairs():
    """More stacked rank than dimensions (no QR shortcut) gives the same numbers."""
    updates = [factors("none", s) for s in range(4)]  # stacked rank 5 * 2 = 10 > d_in, d_out
    error, reference = exactness.projection_error(
        [u[f"m.{A}"] for u in updates], [u[f"m.{B}"] for u in updates], [1, 2, 3, 4])
    assert error / reference == pytest.approx(hand_relative_error(updates, [1, 2, 3, 4]), rel=1e-9)


def test_a_common_down_projection_makes_averaging_exact():
    shared = factors("down", 0)[f"m.{A}"]
    updates = [factors("down", s) | {f"m.{A}": shared} for s in range(3)]
    errors = exactness.relative_errors(updates, [1.0, 2.0, 3.0], exactness.lora_projections(updates[0]))
    assert errors["m"] < 1e-12


def test_projections_pair_names_and_skip_heads_and_adapters():
    names = [f"l0.q.{A}", f"l0.q.{B}", f"l1.v.{A}", f"l1.v.{B}", "head.classifier.weight",
             "l0.ffn.adamix_down_weight", "l0.ffn.adamix_up_weight"]
    assert exactness.lora_projections(names) == [
        exactness.Projection("l0.q", f"l0.q.{A}", f"l0.q.{B}"),
        exactness.Projection("l1.v", f"l1.v.{A}", f"l1.v.{B}"),
    ]
    assert exactness.summary({}) is None
    assert exactness.frozen_names(names, AdaMixConfig(sharing="down", freeze_shared=True)) == {
        f"l0.q.{A}", f"l1.v.{A}"}
    assert exactness.frozen_names(names, AdaMixConfig()) == set()


@pytest.mark.usefixtures("server_identity")
def test_the_round_log_records_mean_and_max_over_projections(caplog):
    updates = [factors("up", s, "p") | factors("up", 10 + s, "q") for s in range(3)]
    spec = {k: (v.shape, "float32") for k, v in updates[0].items()} | {"head.w": ((2,), "float32")}
    weights = [10.0, 20.0, 30.0]
    strategy = ValidatingStrategy(FedAvg(), spec, 2, ["sst2"])
    with caplog.at_level("INFO"):
        agg, _ = strategy.aggregate_train(1, [
            reply(i, u | {"head.w": np.ones(2, np.float32)}, w) for i, (u, w) in enumerate(zip(updates, weights))])
    assert agg is not None
    errors = [hand_relative_error(updates, weights, m) for m in ("p", "q")]
    logged = strategy.log.to_dict()["aggregation_relative_error"]
    assert logged[1] == {"mean": pytest.approx(np.mean(errors), rel=1e-9), "max": pytest.approx(max(errors), rel=1e-9)}
    assert "dW relative error of factor averaging: mean" in caplog.text


# -- the exact mode ---------------------------------------------------------------------------------
def exact_config(**options) -> AdaMixConfig:
    return AdaMixConfig(num_experts=K, rank=R, sharing="down", freeze_shared=True, **options)


def test_central_training_leaves_the_frozen_a_bitwise_unchanged_and_merges_exactly():
    torch.manual_seed(0)
    model = AdaMixModel(tiny_model("bert", head="cls", num_labels=2), exact_config())
    before = {k: v.clone() for k, v in model.adapter_state_dict().items()}
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad and n.endswith(A)}
    assert frozen and frozen == {"model." + n for n in exactness.frozen_names(before, model.config)}
    optimizer = make_optimizer(model, lr=1e-2)
    optimised = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert all(id(p) not in optimised for n, p in model.named_parameters() if n in frozen)
    model.train()
    for step in range(3):
        loss = model(**tiny_batch(seed=step), labels=torch.tensor([0, 1, 1, 0])).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = model.adapter_state_dict()
    for name, value in after.items():
        if name.endswith(A):
            assert torch.equal(value, before[name]), name
        else:
            assert not torch.equal(value, before[name]) and len(value) == K, name
    s = model.config.scale
    expected = {n.removesuffix("." + B): s * (after[n] @ after[n.removesuffix(B) + A]).mean(0)
                for n in after if n.endswith(B)}  # mean_k s B_k A
    exported = merged_tensors(model)  # the registry's merged file, before the model is merged
    model.merge()
    for module, layer in model.mixtures().items():
        torch.testing.assert_close(layer.delta_weight(), expected[module])
        key = f"{PEFT_PREFIX}{module}.lora_"
        torch.testing.assert_close(s * exported[key + "B.weight"] @ exported[key + "A.weight"], expected[module])


def weighted_mean_update(replies: list, scale: float) -> dict[str, torch.Tensor]:
    """sum_i w_i s B_ik A_ik / sum_i w_i per projection: (K, d_out, d_in), computed in float64."""
    weights = [float(r.content["metrics"]["num-examples"]) for r in replies]
    out = {}
    for name in replies[0].content["arrays"]:
        if name.endswith(B):
            a_name = name.removesuffix(B) + A
            deltas = [scale * torch.from_numpy(r.content["arrays"][name].numpy()).double()
                      @ torch.from_numpy(r.content["arrays"][a_name].numpy()).double() for r in replies]
            out[name.removesuffix("." + B)] = sum(w * d for w, d in zip(weights, deltas)) / sum(weights)
    return out


def update_of(tensors: dict, scale: float) -> dict[str, torch.Tensor]:
    """s B_k A_k per projection of a set of global experts: (K, d_out, d_in)."""
    t = {k: torch.as_tensor(np.asarray(v)).double() for k, v in tensors.items()}
    return {n.removesuffix("." + B): scale * t[n] @ t[n.removesuffix(B) + A] for n in t if n.endswith(B)}


def federate(tiny_env, **overrides):
    rc = tiny_run_config(tiny_env, **{"num-rounds": 2, "local-steps": 3, "learning-rate": 1e-2} | overrides)
    grid = InProcessGrid(app, rc, num_nodes=3)
    cfg = FederationConfig.from_run_config(rc)
    return cfg, grid, run_federation(grid, cfg)


def arrays_of(message) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in message.content["arrays"].items()}


@pytest.mark.usefixtures("server_identity", "one_thread")
def test_the_exact_mode_aggregate_is_the_weighted_mean_of_the_clients_updates(tiny_env):
    cfg, grid, outcome = federate(tiny_env, **{"sharing": "down", "freeze-shared": True, "num-experts": K})
    s = cfg.adamix.scale
    initial = arrays_of(grid.train_round(1)[0][0])
    replies = {r: grid.train_round(r)[1] for r in (1, 2)}
    # Clients trained on their own data and seeds: their B experts differ; their A is the one sent.
    for rnd, got in replies.items():
        assert len(got) == 3 and not any(r.has_error() for r in got)
        b_name = next(n for n in initial if n.endswith(B))
        assert not np.array_equal(arrays_of(got[0])[b_name], arrays_of(got[1])[b_name])
        for r in got:
            for name, value in arrays_of(r).items():
                if name.endswith(A):
                    assert np.array_equal(value, initial[name]), (rnd, name)
    # The aggregate's update (round 1's: what round 2 was sent; round 2's: the saved experts)
    # is the clients' mean update, per projection and per expert.
    aggregates = {1: arrays_of(grid.train_round(2)[0][0]),
                  2: {k: v.numpy() for k, v in read_safetensors(outcome.folder / EXPERTS_FILE).items()}}
    for rnd, aggregate in aggregates.items():
        mean_update, got = weighted_mean_update(replies[rnd], s), update_of(aggregate, s)
        assert set(got) == set(mean_update) and len(got) > 0
        for module, value in mean_update.items():
            assert value.abs().max() > 1e-4  # a real update
            torch.testing.assert_close(got[module], value, rtol=1e-5, atol=1e-7)
    report = json.loads((outcome.folder / "final_metrics.json").read_text())["federation"]
    assert set(report["aggregation_relative_error"]) == {"1", "2"}
    assert all(e["max"] < 1e-9 for e in report["aggregation_relative_error"].values())
    # The published merged adapter: lora_B = mean_k B_k, lora_A = A, so its update is mean_k s B_k A.
    merged = {k: v.double() for k, v in read_safetensors(outcome.folder / "merged" / ADAPTER_WEIGHTS_FILE).items()}
    for module, value in update_of(aggregates[2], s).items():
        key = f"{PEFT_PREFIX}{module}.lora_"
        torch.testing.assert_close(s * merged[key + "B.weight"] @ merged[key + "A.weight"], value.mean(0))


@pytest.mark.usefixtures("server_identity", "one_thread")
def test_the_default_mode_reports_the_error_of_averaging_drifted_factors(tiny_env):
    cfg, grid, outcome = federate(tiny_env)
    report = json.loads((outcome.folder / "final_metrics.json").read_text())["federation"]
    replies = grid.train_round(2)[1]
    updates = [arrays_of(r) for r in replies]
    weights = [float(r.content["metrics"]["num-examples"]) for r in replies]
    modules = [n.removesuffix("." + A) for n in updates[0] if n.endswith(A)]
    errors = [hand_relative_error(updates, weights, m) for m in modules]
    assert min(errors) > 1e-4  # the clients drifted apart: cross terms
    logged = report["aggregation_relative_error"]["2"]
    assert logged == {"mean": pytest.approx(np.mean(errors), rel=1e-6), "max": pytest.approx(max(errors), rel=1e-6)}


# -- what the server checks ---------------------------------------------------------------------------
@pytest.mark.usefixtures("server_identity")
def test_a_changed_frozen_tensor_is_rejected_and_the_aggregate_keeps_it_as_sent():
    sent = factors("down", 0)
    spec = {k: (v.shape, "float32") for k, v in sent.items()}
    inner = DifferentialPrivacyServerSideFixedClipping(FedAvg(), 0.5, 1e6, 3)  # noise on every tensor
    strategy = ValidatingStrategy(inner, spec, 2, ["sst2"], frozen=[f"m.{A}"])
    strategy.configure_train(1, ArrayRecord({k: Array(v) for k, v in sent.items()}), ConfigRecord(), TwoNodes())
    ups = [sent | {f"m.{B}": factors("down", s)[f"m.{B}"]} for s in (1, 2, 3)]
    nudged = ups[2][f"m.{A}"].copy()
    nudged.flat[0] = np.nextafter(nudged.flat[0], np.inf)  # one ulp
    ups[2] = ups[2] | {f"m.{A}": nudged}
    agg, _ = strategy.aggregate_train(1, [reply(i + 1, u) for i, u in enumerate(ups)])
    assert strategy.log.rejected[1] == [(3, f"changed 1 frozen tensors (first: ['m.{A}'])")]
    assert np.array_equal(agg[f"m.{A}"].numpy(), sent[f"m.{A}"])  # DP noise did not move it
    assert not np.allclose(agg[f"m.{B}"].numpy(), (ups[0][f"m.{B}"] + ups[1][f"m.{B}"]) / 2)  # noise did land


def test_build_strategy_freezes_the_shared_a_only_in_the_exact_mode():
    spec = {k: (v.shape, "float32") for k, v in factors("down", 0).items()}
    exact = FederationConfig.from_run_config({"sharing": "down", "freeze-shared": "true"})
    assert exact.adamix.freeze_shared and build_strategy(exact, spec).frozen == [f"m.{A}"]
    assert build_strategy(FederationConfig(), spec).frozen == []
    with pytest.raises(ValueError, match="frozen tensors not in the spec"):
        ValidatingStrategy(FedAvg(), spec, 2, ["sst2"], frozen=["nope"])


# -- bad combinations ---------------------------------------------------------------------------------
@pytest.mark.parametrize("options, hint", [
    ({}, "sharing='up' \\(the shared B starts at 0"),
    ({"sharing": "none"}, "sharing='none'"),
    ({"kind": "adapter", "sharing": "down"}, "kind='adapter'"),
])
def test_freeze_shared_needs_lora_with_a_shared_down_projection(options, hint):
    with pytest.raises(ValueError, match="needs kind='lora' and sharing='down'.*" + hint):
        AdaMixConfig(freeze_shared=True, **options)
    with pytest.raises(ValueError, match="needs kind='lora' and sharing='down'"):
        FederationConfig.from_run_config({"freeze-shared": True, **options})


def test_the_federate_command_selects_the_exact_mode(tmp_path, monkeypatch):
    from adamix_zoo.cli import _register_commands, app as cli
    from federation import runtime

    seen = {}

    class Recorder:  # stands in for the SuperLink: records the run config, runs nothing
        def __init__(self, simulation: bool) -> None:
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc) -> None:
            pass

        def run(self, run_config, timeout, echo):
            seen.update(run_config)

    monkeypatch.setattr(runtime, "LocalFederation", Recorder)
    make_glue(tmp_path / "data")
    common = ["federate", "--data-dir", str(tmp_path / "data"), "--output-dir", str(tmp_path / "out"),
              "--store", str(tmp_path / "zoo")]
    _register_commands()
    runner = CliRunner()
    done = runner.invoke(cli, common + ["--aggregation", "frozen-down"])
    assert seen["sharing"] == "down" and seen["freeze-shared"] is True, done.output
    done = runner.invoke(cli, common + ["--aggregation", "svd", "--run-config", "client-ranks='8,4,2'"])
    assert seen["aggregation"] == "svd" and seen["client-ranks"] == "8,4,2", done.output
    for bad, says in ((["--aggregation", "frozen-down", "--run-config", "sharing='up'"], "sharing='down'"),
                      (["--aggregation", "svd", "--strategy", "fedavgm"], "needs strategy=fedavg"),
                      (["--tasks", "sst2,mrpc"], "task 'mrpc'"),  # the data are read before any process starts
                      (["--tasks", "e2e"], "no train split for e2e"),
                      (["--aggregation", "exact"], "choose one of factors, frozen-down, svd")):
        done = runner.invoke(cli, common + bad)
        text = " ".join(done.output.replace("│", " ").split())  # rich wraps the message in a box
        assert done.exit_code == 2 and says in text, done.output

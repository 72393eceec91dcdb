"""The method's options: expert init, adapter init, per-row routing, per-problem consistency weights."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from adamix_zoo import AdaMixConfig, AdaMixModel
from adamix_zoo.config import DEFAULT_CONSISTENCY
from adamix_zoo.mixtures import MixtureOfLoRA
from adamix_zoo.routing import Router, routed_linear
from tests.tiny import tiny_batch, tiny_model

K = 4


def _wrapped(kind: str, **options) -> AdaMixModel:
    torch.manual_seed(0)
    return AdaMixModel(tiny_model("bert", head="base"), AdaMixConfig(kind=kind, num_experts=K, **options))


@pytest.mark.parametrize("kind", ["lora", "adapter"])
@pytest.mark.parametrize("sharing", ["up", "down", "none"])
def test_identical_experts_are_bitwise_equal_and_equal_their_merge(kind, sharing):
    model = _wrapped(kind, sharing=sharing, expert_init="identical")
    for name, tensor in model.adapter_state_dict().items():
        for expert in tensor[1:]:
            assert torch.equal(expert, tensor[0]), name
    batch = tiny_batch()
    model.eval()
    with torch.no_grad():
        singles = []
        for k in range(K):
            model.set_eval_routing("fixed", k)
            singles.append(model(**batch).last_hidden_state)
        model.set_eval_routing("merged")
        model.merge()
        merged = model(**batch).last_hidden_state
    for single in singles:
        torch.testing.assert_close(merged, single, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", ["lora", "adapter"])
def test_independent_experts_differ(kind):
    model = _wrapped(kind, sharing="up", expert_init="independent")
    mixed = [t for t in model.adapter_state_dict().values() if len(t) == K and t.abs().sum() > 0]
    assert mixed and all(not torch.equal(t[0], t[1]) for t in mixed)


def test_adapter_init_normal_draws_the_up_projection_and_zero_up_does_not():
    normal = _wrapped("adapter", adapter_init="normal").adapter_state_dict()
    zero = _wrapped("adapter", adapter_init="zero-up").adapter_state_dict()
    ups = [n for n in normal if n.endswith("adamix_up_weight")]
    assert ups
    for name in ups:
        assert 0.015 < normal[name].std().item() < 0.025  # N(0, 0.02), the transformers init
        assert not zero[name].any()


def test_routed_linear_per_row_equals_a_loop_over_rows():
    torch.manual_seed(0)
    x, weight, bias = torch.randn(5, 3, 6), torch.randn(K, 4, 6), torch.randn(K, 4)
    rows = torch.tensor([0, 3, 3, 1, 2])
    expected = torch.stack([F.linear(x[i], weight[k], bias[k]) for i, k in enumerate(rows.tolist())])
    torch.testing.assert_close(routed_linear(x, weight, bias, rows), expected)
    torch.testing.assert_close(routed_linear(x, weight, None, 2), F.linear(x, weight[2]))


def _expert_gradients(routing: str, rows: int) -> torch.Tensor:
    """Per-expert gradient norm of A after one backward of a LoRA mixture layer in training."""
    torch.manual_seed(0)
    layer = MixtureOfLoRA(nn.Linear(8, 8), rank=2, alpha=2, num_experts=K, sharing="none", dropout=0,
                          router=Router(seed=0, routing=routing))
    with torch.no_grad():
        layer.adamix_lora_B.normal_()  # B = 0 would give A no gradient at all
    layer.train()
    layer(torch.randn(rows, 3, 8)).square().sum().backward()
    return layer.adamix_lora_A.grad.flatten(1).norm(dim=1)


def test_row_routing_trains_every_expert_each_step_and_batch_routing_one():
    assert (_expert_gradients("row", rows=64) > 0).all()
    assert (_expert_gradients("batch", rows=64) > 0).sum() == 1


def test_row_routing_draws_per_row_in_training_and_merges_in_eval():
    router = Router(seed=0, routing="row")
    drawn = router.choose(K, training=True, rows=256)
    assert drawn.shape == (256,) and set(drawn.tolist()) == set(range(K))
    assert router.choose(K, training=False, rows=256) == -1  # MERGED
    assert router.choose(1, training=True, rows=256) == 0


@pytest.mark.parametrize("kind", ["lora", "adapter"])
def test_row_routing_model_trains_and_rows_see_different_experts(kind):
    model = _wrapped(kind, routing="row", expert_init="independent", adapter_init="normal")
    batch = {k: v[:1].repeat(8, 1) for k, v in tiny_batch().items()}  # identical rows
    with torch.no_grad():
        model.train()
        routed = model(**batch).last_hidden_state
        model.eval()
        merged = model(**batch).last_hidden_state
    assert any(not torch.allclose(routed[0], row) for row in routed[1:])
    assert all(torch.allclose(merged[0], row) for row in merged[1:])


def test_consistency_weight_per_problem():
    config = AdaMixConfig(num_experts=K)
    for problem, weight in DEFAULT_CONSISTENCY.items():
        assert config.consistency_weight_for(problem) == weight
    assert AdaMixConfig(num_experts=K, consistency_weight=3.0).consistency_weight_for("lm") == 3.0
    assert AdaMixConfig(num_experts=1).consistency_weight_for("classification") == 0.0
    with pytest.raises(ValueError, match="problem"):
        config.consistency_weight_for("ranking")


@pytest.mark.parametrize(("field", "value"), [
    ("routing", "token"), ("expert_init", "orthogonal"), ("adapter_init", "xavier"),
    ("task_loss_passes", "second"), ("consistency_weight", float("nan")),
])
def test_bad_options_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        AdaMixConfig(**{field: value})


@pytest.mark.parametrize("second_pass", ["train", "target"])
def test_second_pass_target_runs_without_gradient(second_pass):
    from adamix_zoo.consistency import two_routed_passes

    model = _wrapped("lora", routing="row", second_pass=second_pass)
    model.train()
    grad_modes: list[bool] = []

    def forward(batch):
        grad_modes.append(torch.is_grad_enabled())
        return model(**batch).last_hidden_state

    first, second = two_routed_passes(model, forward, tiny_batch(), second_pass)
    assert first.shape == second.shape and first.requires_grad
    assert grad_modes == ([True] if second_pass == "train" else [True, False])
    assert second.requires_grad == (second_pass == "train")
    assert not torch.allclose(first, second)  # independently routed


def test_cli_method_options_reach_the_mixture(monkeypatch):
    from typer.testing import CliRunner

    import adamix_zoo.recipes.glue as glue
    from adamix_zoo.cli import _register_commands, app

    seen = {}

    def fake_train(args):
        seen["args"] = args
        raise ValueError("stop here")

    monkeypatch.setattr(glue, "train", fake_train)
    _register_commands()
    result = CliRunner().invoke(app, [
        "train", "--task", "sst2", "--routing", "batch", "--expert-init", "independent",
        "--adapter-init", "zero-up", "--task-loss-passes", "first", "--second-pass", "target",
        "--consistency-weight", "0.5", "--precision", "fp32"])
    assert "stop here" in result.output
    mix = seen["args"].adamix
    assert (mix.routing, mix.expert_init, mix.adapter_init, mix.task_loss_passes, mix.second_pass,
            mix.consistency_weight) == ("batch", "independent", "zero-up", "first", "target", 0.5)
    assert seen["args"].precision == "fp32"
    bad = CliRunner().invoke(app, ["train", "--task", "sst2", "--routing", "token"])
    assert bad.exit_code != 0 and "routing" in bad.output

"""Merging experts and folding LoRA into the frozen weights."""

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from adamix_zoo import AdaMixConfig, AdaMixModel
from tests.tiny import tiny_batch, tiny_model


def _randomize(model: AdaMixModel, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.adapter_state_dict().items():
            param.copy_(torch.randn(param.shape, generator=g) * 0.1)


@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama"])
def test_fold_equals_unfolded(arch):
    model = AdaMixModel(tiny_model(arch), AdaMixConfig(num_experts=4, rank=4)).eval()
    _randomize(model)
    batch = tiny_batch()
    with torch.no_grad():
        unfolded = model(**batch).logits
        model.fold()
        assert all(m.folded for m in model.mixtures().values())
        assert_close(model(**batch).logits, unfolded, rtol=1e-5, atol=1e-5)


def test_fold_changes_weights_and_adapter_is_bypassed():
    model = AdaMixModel(tiny_model("bert"), AdaMixConfig(num_experts=2, rank=4)).eval()
    _randomize(model)
    layer = next(iter(model.mixtures().values()))
    before = layer.base_layer.weight.detach().clone()
    expected_delta = layer.delta_weight().detach().clone()
    model.fold()
    assert_close(layer.base_layer.weight - before, expected_delta)
    x = torch.randn(3, before.shape[1])
    assert_close(layer(x), layer.base_layer(x))


def test_adapters_refuse_to_fold():
    model = AdaMixModel(tiny_model("bert"), AdaMixConfig(kind="adapter"))
    with pytest.raises(ValueError, match="only LoRA mixtures fold"):
        model.fold()


def test_shared_up_merge_is_mean_of_expert_delta_weights():
    model = AdaMixModel(tiny_model("bert"), AdaMixConfig(num_experts=4, rank=4, sharing="up"))
    _randomize(model)
    layer = next(iter(model.mixtures().values()))
    a, b = layer.adamix_lora_A.detach(), layer.adamix_lora_B.detach()[0]
    mean_delta = torch.stack([layer.scale * b @ a[k] for k in range(4)]).mean(0)
    assert_close(layer.delta_weight(), mean_delta)


@pytest.mark.parametrize("sharing", ["up", "down", "none"])
def test_merged_adapter_equals_reference_with_averaged_weights(sharing):
    config = AdaMixConfig(kind="adapter", num_experts=3, bottleneck=8, sharing=sharing, placement="houlsby")
    model = AdaMixModel(tiny_model("bert"), config).eval()
    _randomize(model, seed=5)
    layer = next(iter(model.mixtures().values()))
    # independent reference: h + U act(D h + b_d) + b_u with each tensor averaged over its experts
    d_w, d_b = layer.adamix_down_weight.mean(0), layer.adamix_down_bias.mean(0)
    u_w, u_b = layer.adamix_up_weight.mean(0), layer.adamix_up_bias.mean(0)
    x = torch.randn(2, 5, layer.base_layer.in_features)
    h = layer.base_layer(x)
    expected = h + F.gelu(h @ d_w.T + d_b) @ u_w.T + u_b
    batch = tiny_batch()
    with torch.no_grad():
        assert_close(layer(x), expected)
        whole = model(**batch).logits
        model.merge()
        assert model.is_merged
        assert_close(layer(x), expected)
        assert_close(model(**batch).logits, whole)

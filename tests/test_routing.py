"""Stochastic routing: uniform, independent for A and B, seedable; deterministic in eval."""

from collections import Counter

import pytest
import torch
from torch import nn

from adamix_zoo import AdaMixConfig, AdaMixModel
from adamix_zoo.consistency import two_routed_passes
from adamix_zoo.mixtures import MixtureOfLoRA
from adamix_zoo.routing import Router, routed_groups
from tests.tiny import tiny_batch, tiny_model

K = 4


def _tagged_layer(router: Router) -> MixtureOfLoRA:
    """A 1->1 LoRA mixture whose output encodes the experts used: A_i = i + 1, B_j = 10 ** j."""
    base = nn.Linear(1, 1, bias=False)
    nn.init.zeros_(base.weight)
    layer = MixtureOfLoRA(base, rank=1, alpha=1, num_experts=K, sharing="none", dropout=0, router=router)
    with torch.no_grad():
        layer.adamix_lora_A.copy_(torch.arange(1.0, K + 1).view(K, 1, 1))
        layer.adamix_lora_B.copy_((10.0 ** torch.arange(K)).view(K, 1, 1))
    return layer


def _decode(value: float) -> tuple[int, int]:
    j = len(str(int(round(value)))) - 1
    return int(round(value / 10**j)) - 1, j


def _draw_pairs(layer: MixtureOfLoRA, n: int) -> list[tuple[int, int]]:
    x = torch.ones(1, 1)
    with torch.no_grad():
        return [_decode(layer(x).item()) for _ in range(n)]


def test_every_expert_chosen_near_uniformly_and_independently():
    layer = _tagged_layer(Router(seed=0)).train()
    n = 4000
    pairs = _draw_pairs(layer, n)
    a_counts, b_counts, joint = Counter(p[0] for p in pairs), Counter(p[1] for p in pairs), Counter(pairs)
    assert set(a_counts) == set(b_counts) == set(range(K))
    for counts in (a_counts, b_counts):
        for k in range(K):
            assert abs(counts[k] / n - 1 / K) < 0.03  # ~5 standard deviations
    # independence: every (A, B) pair occurs about (1/K)^2 of the time
    assert len(joint) == K * K
    chi2 = sum((joint[(i, j)] - n / K**2) ** 2 / (n / K**2) for i in range(K) for j in range(K))
    assert chi2 < 37.7  # chi-square, 15 degrees of freedom, p = 0.001


def test_routing_is_seedable():
    first = _draw_pairs(_tagged_layer(Router(seed=7)).train(), 50)
    again = _draw_pairs(_tagged_layer(Router(seed=7)).train(), 50)
    other = _draw_pairs(_tagged_layer(Router(seed=8)).train(), 50)
    assert first == again and first != other


def test_eval_routing_modes():
    layer = _tagged_layer(Router(seed=0, eval_routing="merged")).eval()
    x = torch.ones(1, 1)
    with torch.no_grad():
        assert layer(x).item() == pytest.approx(2.5 * 1111 / 4)  # mean(A) * mean(B)
        layer.router.eval_routing, layer.router.eval_expert = "fixed", 2
        assert _draw_pairs(layer, 5) == [(2, 2)] * 5
        layer.router.eval_routing = "random"
        assert len(set(_draw_pairs(layer, 200))) > 8


def test_training_passes_vary_and_eval_is_deterministic():
    model = AdaMixModel(tiny_model("bert"), AdaMixConfig(num_experts=4, sharing="none"))
    with torch.no_grad():
        for mixture in model.mixtures().values():
            mixture.adamix_lora_B.normal_()
    batch = tiny_batch()
    model.train()
    outs = [model(**batch).logits for _ in range(3)]
    assert not torch.allclose(outs[0], outs[1]) or not torch.allclose(outs[1], outs[2])
    model.eval()
    assert torch.equal(model(**batch).logits, model(**batch).logits)


def test_routed_groups_route_each_half_independently():
    layer = _tagged_layer(Router(seed=3)).train()
    x = torch.ones(2, 1)  # the same input twice: one row per routing group
    n = 2000
    with routed_groups(layer, 2), torch.no_grad():
        rows = [[_decode(v) for v in layer(x).flatten().tolist()] for _ in range(n)]
    for g in range(2):
        counts = Counter(r[g][0] for r in rows)
        assert all(abs(counts[k] / n - 1 / K) < 0.04 for k in range(K))
    same = sum(r[0] == r[1] for r in rows) / n
    assert abs(same - 1 / K**2) < 0.03  # independent draws coincide 1 time in 16
    assert layer.router.groups == 1  # restored on exit
    with routed_groups(layer, 2), pytest.raises(ValueError, match="3 rows cannot be split into 2"):
        layer(torch.ones(3, 1))


@pytest.mark.parametrize("kind", ["lora", "adapter"])
def test_doubled_batch_equals_two_separate_passes(kind):
    """With one expert (no randomness) the grouped doubled batch is exactly two plain passes."""
    model = AdaMixModel(tiny_model("bert"), AdaMixConfig(kind=kind, num_experts=1))
    with torch.no_grad():
        for p in model.adapter_state_dict().values():
            p.normal_(0, 0.1)
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    model.train()
    batch = tiny_batch()
    first, second = two_routed_passes(model, lambda b: model(**b), batch)
    single = model(**batch).logits
    torch.testing.assert_close(first, single)
    torch.testing.assert_close(second, single)


def test_groups_are_ignored_outside_training():
    layer = _tagged_layer(Router(seed=0)).eval()
    with routed_groups(layer, 2), torch.no_grad():
        out = layer(torch.ones(3, 1))  # eval: merged routing, no split needed
    assert torch.allclose(out, torch.full((3, 1), 2.5 * 1111 / 4))

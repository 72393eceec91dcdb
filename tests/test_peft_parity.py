"""K=1 mixture of LoRA is exactly PEFT's LoRA, and a merged mixture is PEFT LoRA on averaged weights."""

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch.testing import assert_close

from adamix_zoo import AdaMixConfig, AdaMixModel
from tests.tiny import tiny_batch, tiny_model

PEFT_TARGETS = {"bert": ["query", "value"], "llama": ["q_proj", "v_proj"], "gpt2": ["c_attn"]}


def _peft_twin(base: torch.nn.Module, arch: str, rank: int, alpha: float):
    cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=PEFT_TARGETS[arch],
                     fan_in_fan_out=arch == "gpt2", lora_dropout=0.0)
    return get_peft_model(copy.deepcopy(base), cfg).eval()


def _peft_layers(peft_model) -> dict[str, torch.nn.Module]:
    prefix = "base_model.model."
    return {n.removeprefix(prefix): m for n, m in peft_model.named_modules() if hasattr(m, "lora_A")
            and "default" in getattr(m, "lora_A", {})}


@pytest.mark.parametrize("arch", ["bert", "llama", "gpt2"])
def test_single_expert_equals_peft_lora(arch):
    base = tiny_model(arch)
    peft_model = _peft_twin(base, arch, rank=4, alpha=8)
    ours = AdaMixModel(base, AdaMixConfig(num_experts=1, rank=4, alpha=8)).eval()
    layers = _peft_layers(peft_model)
    assert sorted(layers) == sorted(ours.target_names)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, mixture in ours.mixtures().items():
            a, b = layers[name].lora_A["default"].weight, layers[name].lora_B["default"].weight
            b.copy_(torch.randn(b.shape, generator=g))  # PEFT starts B at 0: make the delta non-zero
            mixture.adamix_lora_A.copy_(a.unsqueeze(0))
            mixture.adamix_lora_B.copy_(b.unsqueeze(0))
    batch = tiny_batch()
    with torch.no_grad():
        expected = peft_model(**batch).logits
        assert_close(ours(**batch).logits, expected)
        for module in ours.modules():  # the backbone's own dropout is not what this compares
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        ours.train()  # one expert: training routing is the same computation
        assert_close(ours(**batch).logits, expected)
        assert not torch.allclose(expected, tiny_model(arch)(**batch).logits)


@pytest.mark.parametrize("sharing", ["up", "down", "none"])
def test_merged_mixture_equals_peft_on_independently_averaged_weights(sharing):
    base = tiny_model("bert")
    peft_model = _peft_twin(base, "bert", rank=4, alpha=16)
    ours = AdaMixModel(base, AdaMixConfig(num_experts=4, rank=4, alpha=16, sharing=sharing)).eval()
    layers = _peft_layers(peft_model)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, mixture in ours.mixtures().items():
            mixture.adamix_lora_B.copy_(torch.randn(mixture.adamix_lora_B.shape, generator=g))
            # the reference averages expert by expert, independently of the library's merge
            a = sum(mixture.adamix_lora_A[k] for k in range(len(mixture.adamix_lora_A)))
            b = sum(mixture.adamix_lora_B[k] for k in range(len(mixture.adamix_lora_B)))
            layers[name].lora_A["default"].weight.copy_(a / len(mixture.adamix_lora_A))
            layers[name].lora_B["default"].weight.copy_(b / len(mixture.adamix_lora_B))
    batch = tiny_batch()
    with torch.no_grad():
        expected = peft_model(**batch).logits
        assert_close(ours(**batch).logits, expected)  # eval routing 'merged', experts kept
        ours.merge()
        assert ours.is_merged
        assert_close(ours(**batch).logits, expected)

"""Injection on every supported architecture, freezing, parameter counts."""

import pytest
import torch

from adamix_zoo import AdaMixConfig, AdaMixModel
from adamix_zoo.mixtures import MixtureOfAdapters, MixtureOfLoRA
from tests.tiny import TINY_CONFIGS, tiny_batch, tiny_model

EXPECTED_LORA_TARGETS = {
    "bert": "bert.encoder.layer.0.attention.self.query",
    "roberta": "roberta.encoder.layer.0.attention.self.value",
    "distilbert": "distilbert.transformer.layer.0.attention.q_lin",
    "deberta-v2": "deberta.encoder.layer.0.attention.self.query_proj",
    "gpt2": "transformer.h.0.attn.c_attn",
    "llama": "model.layers.0.self_attn.v_proj",
}


@pytest.mark.parametrize("arch", sorted(TINY_CONFIGS))
@pytest.mark.parametrize("kind", ["lora", "adapter"])
def test_one_step_changes_only_adapters_and_head(arch, kind):
    model = AdaMixModel(tiny_model(arch), AdaMixConfig(kind=kind, num_experts=3, sharing="none"))
    n_layers = 2
    per_layer = 2 if kind == "lora" and arch != "gpt2" else 1
    assert len(model.target_names) == n_layers * per_layer
    if kind == "lora":
        assert EXPECTED_LORA_TARGETS[arch] in model.target_names
    before = {n: p.detach().clone() for n, p in model.model.named_parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=0.5)
    model.train()
    for _ in range(2):  # the first step moves B / U away from zero, the second moves A / D too
        out = model(**tiny_batch(), labels=torch.tensor([0, 1, 2, 1]))
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    changed = {n for n, p in model.model.named_parameters() if not torch.equal(p, before[n])}
    heads = tuple(h + "." for h in model.head_modules)
    assert changed, "nothing trained"
    assert all(n.rsplit(".", 1)[-1].startswith("adamix_") or n.startswith(heads) for n in changed)
    assert any(n.startswith(heads) for n in changed)
    frozen = [n for n, p in model.model.named_parameters() if not p.requires_grad]
    assert frozen and all(torch.equal(dict(model.model.named_parameters())[n], before[n]) for n in frozen)


def test_houlsby_placement_adds_attention_adapters():
    ffn = AdaMixModel(tiny_model("bert"), AdaMixConfig(kind="adapter"))
    both = AdaMixModel(tiny_model("bert"), AdaMixConfig(kind="adapter", placement="houlsby"))
    assert ffn.target_names == ["bert.encoder.layer.0.output.dense", "bert.encoder.layer.1.output.dense"]
    assert set(both.target_names) == set(ffn.target_names) | {
        "bert.encoder.layer.0.attention.output.dense", "bert.encoder.layer.1.attention.output.dense"}
    assert all(isinstance(m, MixtureOfAdapters) for m in both.mixtures().values())


@pytest.mark.parametrize("sharing, k_a, k_b", [("up", 4, 1), ("down", 1, 4), ("none", 4, 4)])
def test_lora_sharing_and_parameter_counts(sharing, k_a, k_b):
    k, r, d = 4, 8, 32  # tiny BERT: hidden 32, q and v in 2 layers
    model = AdaMixModel(tiny_model("bert"), AdaMixConfig(num_experts=k, rank=r, sharing=sharing))
    for layer in model.mixtures().values():
        assert isinstance(layer, MixtureOfLoRA)
        assert layer.adamix_lora_A.shape == (k_a, r, d) and layer.adamix_lora_B.shape == (k_b, d, r)
    counts = model.parameter_counts()
    assert counts.adapter == 4 * (k_a * r * d + k_b * d * r)
    assert counts.head == 32 * 3 + 3  # classifier: hidden -> 3 labels
    backbone = sum(p.numel() for p in tiny_model("bert").parameters()) - counts.head
    assert counts.backbone == backbone
    assert counts.percent_of_backbone == pytest.approx(100 * (counts.adapter + counts.head) / backbone)


@pytest.mark.parametrize("sharing, k_down, k_up", [("up", 4, 1), ("down", 1, 4), ("none", 4, 4)])
def test_adapter_sharing_and_parameter_counts(sharing, k_down, k_up):
    k, m, d = 4, 16, 32
    model = AdaMixModel(tiny_model("bert"), AdaMixConfig(kind="adapter", num_experts=k, bottleneck=m,
                                                          sharing=sharing))
    per_place = k_down * (m * d + m) + k_up * (d * m + d)
    assert model.parameter_counts().adapter == 2 * per_place


def test_single_expert_matches_plain_baseline_size():
    plain = AdaMixModel(tiny_model("bert"), AdaMixConfig(num_experts=1, rank=8)).parameter_counts()
    mixture = AdaMixModel(tiny_model("bert"), AdaMixConfig(num_experts=4, rank=8))
    mixture.merge()
    assert mixture.parameter_counts() == plain  # merged AdaMix has the inference size of its baseline


def test_clear_errors_for_bad_targets_and_heads():
    with pytest.raises(ValueError, match="no module of the model matches"):
        AdaMixModel(tiny_model("bert"), AdaMixConfig(target_modules=["nonexistent"]))
    with pytest.raises(ValueError, match="head modules not found.*nothead"):
        AdaMixModel(tiny_model("bert"), AdaMixConfig(), head_modules=["nothead"])
    with pytest.raises(TypeError, match="cannot adapt LayerNorm"):
        AdaMixModel(tiny_model("bert"), AdaMixConfig(target_modules=["LayerNorm"]))
    model = tiny_model("bert")
    model.config.model_type = "mystery"
    with pytest.raises(ValueError, match="no default target modules for model_type='mystery'"):
        AdaMixModel(model, AdaMixConfig())


def test_fingerprint_ignores_injection_but_not_weights():
    from adamix_zoo.backbones import fingerprint

    bare = tiny_model("bert", head="base")
    before = fingerprint(bare)
    wrapped = AdaMixModel(bare, AdaMixConfig())
    assert fingerprint(wrapped.model) == before
    assert fingerprint(wrapped) == before  # the wrapper itself, as federation passes it
    assert fingerprint(tiny_model("bert", head="base", seed=1)) != before
    with torch.no_grad():
        for m in wrapped.mixtures().values():
            m.adamix_lora_B.normal_()
    wrapped.fold()
    assert fingerprint(wrapped.model) != before

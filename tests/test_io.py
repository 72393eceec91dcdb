"""Experts and merged adapters on disk: safetensors round trips, PEFT loads merged LoRA, clear errors."""

import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from torch.testing import assert_close

from adamix_zoo import AdaMixConfig, AdaMixModel, load_experts, load_merged, save_experts, save_merged
from adamix_zoo.formats.experts import read_experts_config
from adamix_zoo.formats.files import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE
from tests.tiny import tiny_batch, tiny_model


def _trained(kind: str = "lora", arch: str = "bert", seed: int = 0, **cfg) -> AdaMixModel:
    model = AdaMixModel(tiny_model(arch), AdaMixConfig(kind=kind, num_experts=3, **cfg))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


@pytest.mark.parametrize("kind", ["lora", "adapter"])
def test_experts_round_trip_bitwise(tmp_path, kind):
    source = _trained(kind, sharing="none")
    path = save_experts(source, tmp_path / "experts.safetensors")
    assert read_experts_config(path) == source.config
    target = AdaMixModel(tiny_model("bert"), AdaMixConfig(kind=kind, num_experts=3, sharing="none", seed=9))
    load_experts(target, path)
    for name, tensor in (source.adapter_state_dict() | source.head_state_dict()).items():
        assert torch.equal(dict(target.model.named_parameters())[name], tensor)
    batch = tiny_batch()
    assert torch.equal(target.eval()(**batch).logits, source(**batch).logits)


def test_loading_into_other_shapes_fails_clearly_and_changes_nothing(tmp_path):
    path = save_experts(_trained(rank=8), tmp_path / "experts.safetensors")
    target = AdaMixModel(tiny_model("bert"), AdaMixConfig(num_experts=3, rank=4))
    before = {n: t.clone() for n, t in target.adapter_state_dict().items()}
    with pytest.raises(ValueError, match=r"shape mismatches.*expected \(3, 4, 32\), got \(3, 8, 32\)"):
        load_experts(target, path)
    assert all(torch.equal(before[n], t) for n, t in target.adapter_state_dict().items())
    other = AdaMixModel(tiny_model("bert"), AdaMixConfig(kind="adapter", num_experts=3))
    with pytest.raises(ValueError, match="missing .* unexpected"):
        load_experts(other, path)


def test_corrupt_or_foreign_files_give_clear_errors(tmp_path):
    path = save_experts(_trained(), tmp_path / "experts.safetensors")
    data = path.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cannot read safetensors file .*truncated"):
        load_experts(_trained(), truncated)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00not a safetensors file")
    with pytest.raises(ValueError, match="cannot read safetensors file"):
        read_experts_config(garbage)
    with pytest.raises(ValueError, match="cannot read safetensors file"):
        load_experts(_trained(), tmp_path / "missing.safetensors")


@pytest.mark.parametrize("kind", ["lora", "adapter"])
def test_merged_round_trip(tmp_path, kind):
    source = _trained(kind, sharing="up")
    save_merged(source, tmp_path / "merged", base_model="tiny-bert")
    config = json.loads((tmp_path / "merged" / ADAPTER_CONFIG_FILE).read_text())
    assert config["base_model_name_or_path"] == "tiny-bert" and config["modules_to_save"] == ["classifier"]
    assert source.adapter_state_dict()[next(iter(source.adapter_state_dict()))].shape[0] == 3  # untouched
    loaded = load_merged(tiny_model("bert"), tmp_path / "merged")
    assert loaded.is_merged
    batch = tiny_batch()
    with torch.no_grad():
        assert_close(loaded(**batch).logits, source(**batch).logits)


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_peft_loads_merged_lora_unchanged(tmp_path, arch):
    source = _trained("lora", arch=arch, sharing="none")
    save_merged(source, tmp_path / "merged", base_model=f"tiny-{arch}")
    keys = load_file(str(tmp_path / "merged" / ADAPTER_WEIGHTS_FILE))
    assert all(k.startswith("base_model.model.") for k in keys)
    peft_model = PeftModel.from_pretrained(tiny_model(arch), tmp_path / "merged").eval()
    batch = tiny_batch()
    with torch.no_grad():
        assert_close(peft_model(**batch).logits, source(**batch).logits)


def test_merged_adapter_refuses_a_different_backbone(tmp_path):
    save_merged(_trained("lora"), tmp_path / "merged")
    with pytest.raises(ValueError, match="head modules not found in the model: classifier"):
        load_merged(tiny_model("llama"), tmp_path / "merged")
    backbone_only = AdaMixModel(tiny_model("bert", head="base"), AdaMixConfig())
    save_merged(backbone_only, tmp_path / "backbone")
    with pytest.raises(ValueError, match="no module of the model matches"):
        load_merged(tiny_model("llama", head="base"), tmp_path / "backbone")
    (tmp_path / "merged" / ADAPTER_CONFIG_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="cannot read adapter config"):
        load_merged(tiny_model("bert"), tmp_path / "merged")

"""On-disk formats: unmerged experts and merged adapters, safetensors only (never pickle).

- Experts: one safetensors file of the ``adamix_*`` tensors (K experts stacked on dim 0), its
  AdaMix config in the safetensors metadata. To continue training or to federate.
- Merged adapter: a folder ``adapter_model.safetensors`` + ``adapter_config.json``. A merged
  mixture of LoRA uses PEFT's LoRA layout exactly, so ``peft.PeftModel.from_pretrained`` loads it;
  a merged mixture of adapters uses the layout documented in the README (``ADAMIX_ADAPTER``).
  Task heads travel in the same file under PEFT's ``modules_to_save`` names.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformers.pytorch_utils import Conv1D

from adamix_zoo.config import AdaMixConfig
from adamix_zoo.model import AdaMixModel, check_compatible

# Every file name of the on-disk formats, in one place (the registry uses the same names).
EXPERTS_FILE = "adamix_experts.safetensors"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
ADAPTER_CONFIG_FILE = "adapter_config.json"
HEAD_FILE = "head.safetensors"
METADATA_FILE = "adamix.json"
MODEL_CARD_FILE = "README.md"
# A run folder (training, federation): what the registry publishes from.
RUN_CONFIG_FILE = "run_config.json"
METRICS_FILE = "metrics.jsonl"
FINAL_METRICS_FILE = "final_metrics.json"
FULL_MODEL_FILE = "full_model.safetensors"
MERGED_DIR = "merged"
CURVE_FILE = "curve.png"
SPREAD_FILE = "experts_spread.png"
ANALYSIS_FILE = "experts_analysis.json"
FORMAT_VERSION = "1"
PEFT_PREFIX = "base_model.model."
ADAPTER_PEFT_TYPE = "ADAMIX_ADAPTER"

# adamix parameter suffix -> key suffix in the merged file, per adapter kind
MERGED_KEYS: dict[str, dict[str, str]] = {
    "lora": {"adamix_lora_A": "lora_A.weight", "adamix_lora_B": "lora_B.weight"},
    "adapter": {
        "adamix_down_weight": "adapter_down.weight",
        "adamix_down_bias": "adapter_down.bias",
        "adamix_up_weight": "adapter_up.weight",
        "adamix_up_bias": "adapter_up.bias",
    },
}


def read_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a safetensors file, turning a corrupt or truncated file into a clear ValueError."""
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"cannot read safetensors file {path}: {err}") from err


def _save_atomic(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


# -- experts --------------------------------------------------------------------------------------
def save_experts(model: AdaMixModel, path: str | os.PathLike) -> Path:
    """Write the unmerged experts (and heads) to one safetensors file; returns its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = model.adapter_state_dict() | model.head_state_dict()
    metadata = {
        "format": "pt",
        "adamix_format_version": FORMAT_VERSION,
        "adamix_config": json.dumps(model.config.to_dict()),
        "head_modules": json.dumps(model.head_modules),
    }
    _save_atomic(tensors, path, metadata)
    return path


def read_experts_config(path: str | os.PathLike) -> AdaMixConfig:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError) as err:
        raise ValueError(f"cannot read safetensors file {path}: {err}") from err
    if "adamix_config" not in meta:
        raise ValueError(f"{path} is not an adamix experts file (no adamix_config metadata)")
    return AdaMixConfig.from_dict(json.loads(meta["adamix_config"]))


def load_experts(model: AdaMixModel, path: str | os.PathLike) -> None:
    """Load experts (and heads) saved by ``save_experts``; names and shapes must match exactly."""
    model.load_adapter_state_dict(read_safetensors(path), heads=True)


# -- merged adapters --------------------------------------------------------------------------------
def merged_tensors(model: AdaMixModel) -> dict[str, torch.Tensor]:
    """The merged adapter and heads under their file keys; does not modify the model."""
    renames = MERGED_KEYS[model.config.kind]
    out: dict[str, torch.Tensor] = {}
    for name, tensor in model.adapter_state_dict().items():
        module, _, param = name.rpartition(".")
        out[f"{PEFT_PREFIX}{module}.{renames[param]}"] = tensor.mean(dim=0).clone()
    for name, tensor in model.head_state_dict().items():
        out[PEFT_PREFIX + name] = tensor.clone()
    return out


def adapter_config(model: AdaMixModel, base_model: str) -> dict[str, Any]:
    cfg = model.config
    common = {
        "base_model_name_or_path": base_model,
        "target_modules": sorted(model.target_names),
        "modules_to_save": model.head_modules or None,
        "task_type": None,
        "inference_mode": True,
    }
    if cfg.kind == "lora":
        conv1d = any(isinstance(m.base_layer, Conv1D) for m in model.mixtures().values())
        return common | {
            "peft_type": "LORA",
            "r": cfg.rank,
            "lora_alpha": cfg.alpha,
            "lora_dropout": cfg.dropout,
            "fan_in_fan_out": conv1d,
            "bias": "none",
            "use_rslora": False,
            "init_lora_weights": True,
        }
    return common | {
        "peft_type": ADAPTER_PEFT_TYPE,
        "bottleneck": cfg.bottleneck,
        "activation": cfg.activation,
        "placement": cfg.placement,
    }


def save_merged(model: AdaMixModel, directory: str | os.PathLike, base_model: str = "") -> Path:
    """Write the merged adapter folder (PEFT layout for LoRA). The model itself is left as is."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _save_atomic(merged_tensors(model), directory / ADAPTER_WEIGHTS_FILE, {"format": "pt"})
    config = adapter_config(model, base_model)
    (directory / ADAPTER_CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True))
    return directory


def read_adapter_config(directory: str | os.PathLike) -> dict[str, Any]:
    path = Path(directory) / ADAPTER_CONFIG_FILE
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read adapter config {path}: {err}") from err
    if config.get("peft_type") not in ("LORA", ADAPTER_PEFT_TYPE):
        raise ValueError(f"{path}: peft_type {config.get('peft_type')!r} is not LORA or {ADAPTER_PEFT_TYPE}")
    return config


def config_from_adapter_config(config: dict[str, Any]) -> AdaMixConfig:
    """The single-expert AdaMixConfig that rebuilds a merged adapter's structure."""
    targets = ["^" + re.escape(t) + "$" for t in config["target_modules"]]
    if config["peft_type"] == "LORA":
        return AdaMixConfig(
            kind="lora", num_experts=1, rank=config["r"], alpha=config["lora_alpha"], target_modules=targets
        )
    return AdaMixConfig(
        kind="adapter",
        num_experts=1,
        bottleneck=config["bottleneck"],
        activation=config["activation"],
        placement=config.get("placement", "ffn"),
        target_modules=targets,
    )


def load_merged(model: torch.nn.Module, directory: str | os.PathLike) -> AdaMixModel:
    """Wrap a fresh backbone with the merged adapter stored in ``directory`` (K=1 everywhere).

    Raises:
        ValueError: unreadable files, or tensors whose names or shapes do not fit the backbone.
    """
    config = read_adapter_config(directory)
    heads = config.get("modules_to_save") or []
    wrapped = AdaMixModel(model, config_from_adapter_config(config), head_modules=heads)
    renames = MERGED_KEYS["lora" if config["peft_type"] == "LORA" else "adapter"]
    stored = read_safetensors(Path(directory) / ADAPTER_WEIGHTS_FILE)
    own = merged_tensors(wrapped)
    check_compatible(own, stored)
    back = {f"{PEFT_PREFIX}{m}.{renames[p]}": f"{m}.{p}" for m, _, p in
            (n.rpartition(".") for n in wrapped.adapter_state_dict())}
    state = {}
    for key, tensor in stored.items():
        name = back.get(key, key.removeprefix(PEFT_PREFIX))
        state[name] = tensor.unsqueeze(0) if name in back.values() else tensor
    wrapped.load_adapter_state_dict(state, heads=True)
    return wrapped

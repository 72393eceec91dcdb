"""The merged adapter folder: ``adapter_model.safetensors`` + ``adapter_config.json``.

A merged mixture of LoRA uses PEFT's LoRA layout exactly, so ``peft.PeftModel.from_pretrained``
loads it; a merged mixture of adapters uses the layout documented in the README
(``ADAMIX_ADAPTER``). Task heads travel in the same file under PEFT's ``modules_to_save`` names.
``read_merged`` is the one reader: plain tensors grouped per adapted module, no backbone needed.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers.pytorch_utils import Conv1D

from adamix_zoo.config import AdaMixConfig
from adamix_zoo.formats.experts import read_experts_config
from adamix_zoo.formats.files import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_WEIGHTS_FILE,
    read_safetensors,
    save_atomic,
)
from adamix_zoo.model import AdaMixModel, check_compatible

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
LORA_SUFFIXES = tuple(MERGED_KEYS["lora"].values())
ADAPTER_SUFFIXES = tuple(MERGED_KEYS["adapter"].values())
# Other PEFT writers: no prefix, or the adapter's name before ".weight" ("lora_A.default.weight").
_LENIENT_LORA = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.(?P<part>lora_[AB])(?:\.[^.]+)?\.weight$")
_LENIENT_ADAPTER = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.(?P<part>adapter_(?:down|up)\.(?:weight|bias))$")


# -- writing ------------------------------------------------------------------------------------------
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
    save_atomic(merged_tensors(model), directory / ADAPTER_WEIGHTS_FILE, {"format": "pt"})
    config = adapter_config(model, base_model)
    (directory / ADAPTER_CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True))
    return directory


# -- reading ------------------------------------------------------------------------------------------
def read_adapter_config(directory: str | os.PathLike) -> dict[str, Any]:
    path = Path(directory) / ADAPTER_CONFIG_FILE
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read adapter config {path}: {err}") from err
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object (PEFT adapter_config), got {type(config).__name__}")
    if config.get("peft_type") not in ("LORA", ADAPTER_PEFT_TYPE):
        raise ValueError(f"{path}: peft_type {config.get('peft_type')!r} is not LORA or {ADAPTER_PEFT_TYPE}")
    return config


@dataclass
class LoRATensors:
    """One adapted projection: A (r, d_in), B (d_out, r), the rank r and the scale alpha / r."""

    a: torch.Tensor
    b: torch.Tensor
    rank: int
    scale: float


@dataclass
class AdapterTensors:
    """One bottleneck adapter on a projection's output h (size d): h + up(act(down(h)))."""

    down_weight: torch.Tensor  # (m, d)
    down_bias: torch.Tensor  # (m,)
    up_weight: torch.Tensor  # (d, m)
    up_bias: torch.Tensor  # (d,)
    activation: str = "gelu"


@dataclass
class MergedAdapter:
    """A merged adapter folder as plain tensors: its config and the file's tensors by key."""

    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    where: Path

    @property
    def kind(self) -> str:
        return "lora" if self.config["peft_type"] == "LORA" else "adapter"

    @property
    def suffixes(self) -> tuple[str, ...]:
        return LORA_SUFFIXES if self.kind == "lora" else ADAPTER_SUFFIXES

    @property
    def head_modules(self) -> list[str]:
        return self.config.get("modules_to_save") or []

    def head_tensors(self) -> dict[str, torch.Tensor]:
        """Tensors of ``modules_to_save`` (heads saved inside the adapter file), without the prefix."""
        names = {k.removeprefix(PEFT_PREFIX): v for k, v in self.tensors.items()}
        return {k: v for k, v in names.items() if any(k.startswith(h + ".") for h in self.head_modules)}

    def modules(self, strict: bool = True) -> dict[str, dict[str, torch.Tensor]]:
        """{module: {suffix: tensor}} of the adapter tensors; head tensors are skipped.

        Args:
            strict: keys exactly as ``save_merged`` and PEFT write them; False also accepts keys
                without the prefix and an adapter name before ``.weight`` (other PEFT writers).

        Raises:
            ValueError: a key outside the prefix, an unknown key, or a module missing a tensor.
        """
        return group_modules(self.tensors, self.suffixes, self.head_modules, strict)

    def lora(self, strict: bool = True) -> dict[str, LoRATensors]:
        """Per module LoRA A/B with rank and scale (alpha / r, or alpha / sqrt(r) with rsLoRA)."""
        alpha, out = float(self.config["lora_alpha"]), {}
        for module, p in self.modules(strict).items():
            a, b = p["lora_A.weight"], p["lora_B.weight"]
            if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
                raise ValueError(f"{self.where}: module {module} needs lora_A (r, d_in) and lora_B (d_out, r)")
            rank = a.shape[0]
            scale = alpha / math.sqrt(rank) if self.config.get("use_rslora") else alpha / rank
            out[module] = LoRATensors(a, b, rank, scale)
        return out

    def adapters(self, strict: bool = True) -> dict[str, AdapterTensors]:
        """Per module the bottleneck's down / up weights and biases, and the config's activation."""
        activation = self.config.get("activation", "gelu")
        return {module: AdapterTensors(p["adapter_down.weight"], p["adapter_down.bias"],
                                       p["adapter_up.weight"], p["adapter_up.bias"], activation)
                for module, p in self.modules(strict).items()}

    def check_shapes(self) -> None:
        """Check the tensors against the config (no backbone needed).

        Raises:
            ValueError: wrong rank / bottleneck, inconsistent dimensions, or modules that differ from
                ``target_modules``; the message names the tensor.
        """
        check_merged_shapes(self.config, self.tensors)


def read_merged(directory: str | os.PathLike) -> MergedAdapter:
    """The merged adapter of ``directory``: its adapter_config and tensors (no backbone needed).

    Raises:
        ValueError: an unreadable config or weights file.
    """
    directory = Path(directory)
    config = read_adapter_config(directory)
    return MergedAdapter(config, read_safetensors(directory / ADAPTER_WEIGHTS_FILE), directory)


def _split_key(key: str, suffixes: tuple[str, ...], strict: bool) -> tuple[str, str] | None:
    if strict:
        suffix = next((s for s in suffixes if key.endswith("." + s)), None)
        return None if suffix is None else (key[len(PEFT_PREFIX): -len(suffix) - 1], suffix)
    pattern = _LENIENT_LORA if suffixes == LORA_SUFFIXES else _LENIENT_ADAPTER
    match = pattern.match(key)
    if match is None:
        return None
    part = match["part"]
    return match["module"], part + ".weight" if part.startswith("lora_") else part


def group_modules(
    tensors: dict[str, Any], suffixes: tuple[str, ...], heads: list[str], strict: bool = True
) -> dict[str, dict]:
    """Merged-file tensors -> {module: {suffix: tensor}}; head tensors (modules_to_save) are skipped.

    Raises:
        ValueError: a key outside the PEFT prefix, an unknown key, or a module missing a tensor.
    """
    modules: dict[str, dict] = {}
    for key, tensor in tensors.items():
        if strict and not key.startswith(PEFT_PREFIX):
            raise ValueError(f"tensor {key!r} lacks the prefix {PEFT_PREFIX!r}")
        name = key.removeprefix(PEFT_PREFIX)
        split = _split_key(key, suffixes, strict)
        if split is None:
            if any(name.startswith(h + ".") for h in heads):
                continue
            what = "a LoRA A/B" if suffixes == LORA_SUFFIXES else "an adapter"
            raise ValueError(
                f"unexpected tensor {key!r} in the merged adapter: {key!r} is not {what} weight "
                "nor a head of modules_to_save"
            )
        module, suffix = split
        modules.setdefault(module, {})[suffix] = tensor
    for module, parts in modules.items():
        absent = [s for s in suffixes if s not in parts]
        if absent:
            raise ValueError(f"module {module!r} lacks {', '.join(absent)}")
    return modules


def check_merged_shapes(config: dict[str, Any], tensors: dict[str, Any]) -> None:
    """Check the merged adapter's tensors against its adapter_config (no backbone needed).

    Raises:
        ValueError: wrong rank / bottleneck, inconsistent dimensions, or modules that differ from
            ``target_modules``; the message names the tensor.
    """
    lora = config["peft_type"] == "LORA"
    heads = config.get("modules_to_save") or []
    modules = group_modules(tensors, LORA_SUFFIXES if lora else ADAPTER_SUFFIXES, heads)
    if sorted(modules) != sorted(config["target_modules"]):
        raise ValueError(
            f"merged adapter modules {sorted(modules)[:3]}... differ from target_modules "
            f"{sorted(config['target_modules'])[:3]}..."
        )
    for module, p in modules.items():
        shapes = {k: tuple(v.shape) for k, v in p.items()}
        if lora:
            (r, _), (_, r_b) = shapes["lora_A.weight"], shapes["lora_B.weight"]
            ok = len(shapes["lora_A.weight"]) == 2 and len(shapes["lora_B.weight"]) == 2
            ok = ok and r == r_b == config["r"]
        else:
            m, d = shapes["adapter_down.weight"]
            ok = shapes == {"adapter_down.weight": (m, d), "adapter_down.bias": (m,),
                            "adapter_up.weight": (d, m), "adapter_up.bias": (d,)}
            ok = ok and m == config["bottleneck"]
        if not ok:
            raise ValueError(f"tensors of the wrong shape for module {module!r}: {shapes} (config {config})")


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
    wrapped = AdaMixModel(model, config_from_adapter_config(config), head_modules=config.get("modules_to_save") or [])
    stored = read_merged(directory)
    check_compatible(merged_tensors(wrapped), stored.tensors)
    renames = MERGED_KEYS[stored.kind]
    back = {f"{PEFT_PREFIX}{m}.{renames[p]}": f"{m}.{p}" for m, _, p in
            (n.rpartition(".") for n in wrapped.adapter_state_dict())}
    state = {}
    for key, tensor in stored.tensors.items():
        name = back.get(key, key.removeprefix(PEFT_PREFIX))
        state[name] = tensor.unsqueeze(0) if name in back.values() else tensor
    wrapped.load_adapter_state_dict(state, heads=True)
    return wrapped


def check_experts(path: Path, merged: dict[str, Any], kind: str) -> None:
    """Unmerged experts must be of the same kind and average to the merged tensors' shapes."""
    config = read_experts_config(path)
    if config.kind != kind:
        raise ValueError(f"{path}: experts of kind {config.kind!r} next to a merged {kind!r} adapter")
    renames = MERGED_KEYS[kind]
    for name, tensor in read_safetensors(path).items():
        module, _, param = name.rpartition(".")
        if param not in renames:
            continue  # heads saved with the experts
        key = f"{PEFT_PREFIX}{module}.{renames[param]}"
        if key not in merged or tuple(tensor.shape[1:]) != tuple(merged[key].shape):
            raise ValueError(
                f"{path}: expert tensor {name} {tuple(tensor.shape)} does not fit the merged adapter"
            )

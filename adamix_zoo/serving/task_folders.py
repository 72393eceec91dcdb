"""Read one task's merged adapter folder into plain tensors the multi-task engine can stack.

A task folder is what ``adamix_zoo.io.save_merged`` writes (``adapter_model.safetensors`` +
``adapter_config.json``, PEFT LoRA layout or ``ADAMIX_ADAPTER``), plus ``head.safetensors``
(``adamix_zoo.heads.save_head``) and optionally ``adamix.json`` (label names, base model
fingerprint, task, version). A generation task (``"problem": "lm"`` in ``adamix.json``) has no
head: the causal LM's own output layer answers, and its ``prompt_template`` says how to build the
prompt. Nothing here touches the backbone: ``compatibility`` checks shapes and fingerprints when
the engine attaches the adapter. The task-name rule is serving's own copy, isolated in one block.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from adamix_zoo.heads import ClassificationHead, load_head
from adamix_zoo.io import (
    ADAPTER_PEFT_TYPE,
    ADAPTER_WEIGHTS_FILE,
    HEAD_FILE,
    METADATA_FILE,
    read_adapter_config,
    read_safetensors,
)

# -- serving's copy of the registry's naming rule (to be replaced by the shared formats module) ------
# '+' names cross-task merged entries such as sst2+rte.
TASK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$")


def check_task_name(name: str) -> str:
    """Task names become URL parts and registry keys: no separators, no '..', at most 64 chars.

    Raises:
        ValueError: the name does not match ``[A-Za-z0-9][A-Za-z0-9._+-]{0,63}``.
    """
    if not isinstance(name, str) or not TASK_NAME.match(name) or ".." in name:
        raise ValueError(
            f"invalid task name {name!r}: use 1-64 letters, digits, '.', '_', '+' or '-', "
            "starting with a letter or digit, without '..'"
        )
    return name


# -- merged adapter tensors ----------------------------------------------------------------------------
# PEFT saves "<prefix><module>.lora_A.weight"; some tools keep the adapter name before ".weight".
_LORA_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<part>[AB])(?:\.[^.]+)?\.weight$"
)
_ADAPTER_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+)\.adapter_(?P<part>(?:down|up)\.(?:weight|bias))$"
)


@dataclass
class LoRAWeights:
    """One adapted projection: A (r, d_in), B (d_out, r) and the scale alpha / r."""

    a: torch.Tensor
    b: torch.Tensor
    scale: float


@dataclass
class AdapterWeights:
    """One Houlsby (bottleneck) adapter on a projection's output: h + up(act(down(h)))."""

    down_weight: torch.Tensor  # (m, d)
    down_bias: torch.Tensor  # (m,)
    up_weight: torch.Tensor  # (d, m)
    up_bias: torch.Tensor  # (d,)
    activation: str


@dataclass
class TaskAdapter:
    """Everything the engine needs to serve one task, read from its folder."""

    task: str
    kind: str  # "lora" or "adapter"
    source: Path
    head: ClassificationHead | None  # None: a generation task (the LM head answers)
    lora: dict[str, LoRAWeights] = field(default_factory=dict)
    adapters: dict[str, AdapterWeights] = field(default_factory=dict)  # kind "adapter"
    label_names: list[str] | None = None
    version: str = ""
    base_fingerprint: str | None = None
    base_model_id: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    prompt_template: str | None = None  # generation tasks: "...{source}..."

    @property
    def modules(self) -> list[str]:
        return sorted(self.lora) + sorted(self.adapters)

    @property
    def generates(self) -> bool:
        return self.head is None

    @property
    def num_labels(self) -> int:
        return 0 if self.head is None else self.head.num_labels

    @property
    def is_regression(self) -> bool:
        return self.num_labels == 1

    @property
    def problem(self) -> str:
        return "lm" if self.generates else "regression" if self.is_regression else "classification"


def read_metadata(directory: Path) -> dict[str, Any]:
    """``adamix.json`` as a dict; {} when absent. Written by the registry, so read defensively.

    Raises:
        ValueError: the file exists but is not a JSON object.
    """
    path = directory / METADATA_FILE
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read task metadata {path}: {err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"task metadata {path} must be a JSON object, got {type(data).__name__}")
    return data


def _base_model(metadata: dict[str, Any]) -> tuple[str | None, str | None]:
    """(id, fingerprint) of the base model from ``adamix.json``; tolerates a string or missing entry."""
    base = metadata.get("base_model")
    if isinstance(base, dict):
        fp = base.get("fingerprint")
        return (str(base["id"]) if base.get("id") else None), (str(fp) if fp else None)
    if isinstance(base, str):
        return base, None
    return None, None


def task_heads(metadata: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The registry's per-task entries (``"tasks": {name: {"head", "label_names", ...}}``), or {}.

    A cross-task merged entry has one adapter and one head per task it was merged from.
    """
    tasks = metadata.get("tasks")
    if not isinstance(tasks, dict):
        return {}
    return {str(k): (v if isinstance(v, dict) else {}) for k, v in tasks.items()}


def _pick_head(
    directory: Path, metadata: dict[str, Any], head: str | None
) -> tuple[str | None, Path, dict[str, Any]]:
    """(head name, head file, its metadata) for the requested head of a (possibly multi-task) folder."""
    heads = task_heads(metadata)
    if head is None and len(heads) > 1:
        raise ValueError(
            f"{directory} holds heads for several tasks {sorted(heads)}: choose one with head="
        )
    if head is not None and heads and head not in heads:
        raise ValueError(f"{directory} has no head {head!r}; it has {sorted(heads)}")
    name = head if head is not None else next(iter(heads), None)
    info = heads.get(name, {}) if name is not None else {}
    relative = info.get("head") or HEAD_FILE
    path = (directory / str(relative)).resolve()
    if directory.resolve() not in path.parents:
        raise ValueError(f"{directory}: head path {relative!r} leaves the task folder")
    return name, path, info


def _default_task(directory: Path, metadata: dict[str, Any], head: str | None) -> str:
    """adamix.json's task (or registry entry name), else the folder name; '<entry>.<head>' for merged."""
    name = metadata.get("name")
    entry = (
        metadata.get("task")
        or (name.get("task") if isinstance(name, dict) else None)
        or directory.name
    )
    if head is not None and len(task_heads(metadata)) > 1:
        return f"{entry}.{head}"
    return str(entry)


def _label_names(
    explicit: list[str] | None,
    metadata: dict[str, Any],
    head_info: dict[str, Any],
    head: ClassificationHead,
) -> list[str] | None:
    names = (
        explicit
        if explicit is not None
        else head_info.get("label_names", metadata.get("label_names"))
    )
    if head.num_labels == 1:
        return None  # regression: one value, no classes
    if not names:
        return [f"LABEL_{i}" for i in range(head.num_labels)]
    if (
        not isinstance(names, list)
        or len(names) != head.num_labels
        or not all(isinstance(n, str) for n in names)
    ):
        raise ValueError(
            f"label names {names!r} do not fit the head: expected {head.num_labels} strings"
        )
    return list(names)


def _prompt_template(template: Any, where: Path) -> str:
    """A generation task's prompt, e.g. ``"Data: {source}\\nText:"``; checked once when read."""
    if template is None:
        return "{source}"  # no recorded format: the input is the prompt
    try:
        if not isinstance(template, str) or "{source}" not in template:
            raise ValueError("it must be a string containing {source}")
        template.format(source="")
    except (ValueError, KeyError, IndexError) as err:
        raise ValueError(f"{where}: unusable prompt_template {template!r}: {err}") from None
    return template


def _version(metadata: dict[str, Any], weights: Path) -> str:
    """The registry's version, else a content hash of the weights (so answers name exact weights)."""
    name = metadata.get("name")
    version = metadata.get("version") or (name.get("version") if isinstance(name, dict) else None)
    if version not in (None, ""):
        return str(version)
    return "sha256:" + hashlib.sha256(weights.read_bytes()).hexdigest()[:12]


def _by_module(
    tensors: dict[str, torch.Tensor], key: re.Pattern[str], what: str, where: Path
) -> dict[str, dict[str, torch.Tensor]]:
    """Tensors grouped by the module their key names, each under its ``part`` (e.g. "A", "up_bias").

    Raises:
        ValueError: a key that ``key`` does not match (only adapter tensors can be served).
    """
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        match = key.match(name)
        if match is None:
            raise ValueError(
                f"{where}: tensor {name!r} is not {what} weight; only adapter tensors can be served"
            )
        parts.setdefault(match["module"], {})[match["part"].replace(".", "_")] = tensor
    return parts


def _lora_tensors(
    tensors: dict[str, torch.Tensor], config: dict[str, Any], where: Path
) -> dict[str, LoRAWeights]:
    for option in ("rank_pattern", "alpha_pattern"):
        if config.get(option):
            raise ValueError(f"{where}: LoRA {option} is not supported by the serving engine")
    if config.get("use_dora"):
        raise ValueError(f"{where}: DoRA adapters are not supported by the serving engine")
    parts = _by_module(tensors, _LORA_KEY, "a LoRA A/B", where)
    alpha = float(config["lora_alpha"])
    out = {}
    for module, ab in parts.items():
        if set(ab) != {"A", "B"} or ab["A"].shape[0] != ab["B"].shape[1]:
            raise ValueError(
                f"{where}: module {module} needs lora_A (r, d_in) and lora_B (d_out, r) of one rank"
            )
        rank = ab["A"].shape[0]
        scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        out[module] = LoRAWeights(ab["A"].float(), ab["B"].float(), scale)
    return out


def _adapter_tensors(
    tensors: dict[str, torch.Tensor], config: dict[str, Any], where: Path
) -> dict[str, AdapterWeights]:
    parts = {
        module: {name: t.float() for name, t in p.items()}
        for module, p in _by_module(tensors, _ADAPTER_KEY, "an adapter", where).items()
    }
    needed = {"down_weight", "down_bias", "up_weight", "up_bias"}
    out = {}
    for module, p in parts.items():
        if set(p) != needed:
            raise ValueError(f"{where}: module {module} misses {sorted(needed - set(p))}")
        out[module] = AdapterWeights(**p, activation=config.get("activation", "gelu"))
    return out


def read_task_adapter(
    directory: str | Path,
    task: str | None = None,
    label_names: list[str] | None = None,
    head: str | None = None,
) -> TaskAdapter:
    """Read a merged task folder (adapter, head or prompt format, metadata) into a ``TaskAdapter``.

    Args:
        directory: the folder written by ``save_merged`` + ``save_head`` (+ the registry's ``adamix.json``).
        task: the task name; default: ``adamix.json``'s task (or registry entry name), else the
            folder's name; ``<entry>.<head>`` for one head of a cross-task merged entry.
        label_names: class names in head order; default: ``adamix.json``'s, else LABEL_i.
        head: which head of a registry entry with several (cross-task merged); optional with one.

    Raises:
        ValueError: missing or unreadable files, tensors of an unknown layout, a bad task name, or
            label names that do not fit the head.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise ValueError(f"task folder {directory} does not exist")
    config = read_adapter_config(directory)
    metadata = read_metadata(directory)
    head_name, head_path, head_info = _pick_head(directory, metadata, head)
    generates = head_info.get("problem", metadata.get("problem")) == "lm"
    task_head = None
    if not generates:
        if not head_path.exists():
            raise ValueError(
                f"task folder {directory} has no head file {head_path.name}: a served "
                "classification task needs its head (generation tasks say \"problem\": \"lm\")"
            )
        task_head = load_head(head_path).eval()
    weights = directory / ADAPTER_WEIGHTS_FILE
    tensors = read_safetensors(weights)
    kind = "lora" if config["peft_type"] == "LORA" else "adapter"
    base_id, base_fp = _base_model(metadata)
    adapter = TaskAdapter(
        task=check_task_name(task or _default_task(directory, metadata, head_name)),
        kind=kind,
        source=directory.resolve(),
        head=task_head,
        label_names=(
            None if task_head is None else _label_names(label_names, metadata, head_info, task_head)
        ),
        version=_version(metadata, weights),
        base_fingerprint=base_fp,
        base_model_id=base_id or config.get("base_model_name_or_path") or None,
        metadata=metadata,
        prompt_template=(
            _prompt_template(
                head_info.get("prompt_template", metadata.get("prompt_template")), directory
            )
            if generates
            else None
        ),
    )
    if config["peft_type"] == ADAPTER_PEFT_TYPE:
        adapter.adapters = _adapter_tensors(tensors, config, weights)
    else:
        adapter.lora = _lora_tensors(tensors, config, weights)
    if not adapter.lora and not adapter.adapters:
        raise ValueError(f"{weights} holds no adapter tensors")
    return adapter

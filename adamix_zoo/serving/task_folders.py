"""Read one task's merged adapter folder into plain tensors the multi-task engine can stack.

A task folder is what ``adamix_zoo.formats.merged.save_merged`` writes (``adapter_model.safetensors`` +
``adapter_config.json``, PEFT LoRA layout or ``ADAMIX_ADAPTER``), plus ``head.safetensors``
(``adamix_zoo.heads.save_head``) and optionally ``adamix.json`` (label names, base model
fingerprint, task, version). A generation task (``"problem": "lm"`` in ``adamix.json``) has no
head: the causal LM's own output layer answers, and its ``prompt_template`` says how to build the
prompt. Nothing here touches the backbone: ``compatibility`` checks shapes and fingerprints when
the engine attaches the adapter.
Tensors are read by the one merged reader (``formats.merged.read_merged``); task names follow
the registry's rule (``formats.names``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adamix_zoo.formats.files import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_WEIGHTS_FILE,
    HEAD_FILE,
    MERGED_DIR,
    METADATA_FILE,
    RUN_CONFIG_FILE,
    read_json,
)
from adamix_zoo.formats.merged import ADAPTER_PEFT_TYPE, AdapterTensors, LoRATensors, MergedAdapter, read_merged
from adamix_zoo.formats.metadata import read_task_metadata, sha256_file, verify_files
from adamix_zoo.formats.names import validate_part
from adamix_zoo.heads import ClassificationHead, load_head


def check_task_name(name: str) -> str:
    """Task names become URL parts and registry keys: the registry's name rule (``formats.names``).

    Raises:
        ValueError: ``invalid task name ...`` with the rule broken.
    """
    try:
        return validate_part("task", name)
    except ValueError as err:
        raise ValueError(f"invalid task name {name!r}: {err}") from None


@dataclass
class TaskAdapter:
    """Everything the engine needs to serve one task, read from its folder."""

    task: str
    kind: str  # "lora" or "adapter"
    source: Path
    head: ClassificationHead | None  # None: a generation task (the LM head answers)
    lora: dict[str, LoRATensors] = field(default_factory=dict)
    adapters: dict[str, AdapterTensors] = field(default_factory=dict)  # kind "adapter"
    label_names: list[str] | None = None
    version: str = ""
    base_fingerprint: str | None = None
    base_model_id: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    prompt_template: str | None = None  # generation tasks: "...{source}..."
    digest: str = ""  # sha256 over every file read (see ``folder_digest``); a reload must match it

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
    """``adamix.json`` as a dict; {} when absent (``formats.metadata.read_task_metadata``)."""
    return read_task_metadata(directory)


def _base_model(metadata: dict[str, Any]) -> tuple[str | None, str | None]:
    """(id, fingerprint) of the base model from ``adamix.json``; tolerates a string or missing entry."""
    base = metadata.get("base_model")
    if isinstance(base, dict):
        fp = base.get("fingerprint")
        return (str(base["id"]) if base.get("id") else None), (str(fp) if fp else None)
    if isinstance(base, str):
        return base, None
    return None, None


def _run_defaults(directory: Path) -> dict[str, Any]:
    """For a run's ``merged/``: what its ``run_config.json`` says (task, labels, base model and its
    fingerprint, prompt), so a load by path is checked against the served backbone too; else {}."""
    run = _run_config(directory)
    if run is None:
        return {}
    out = {k: run[k] for k in ("task", "label_names", "problem", "prompt_template") if run.get(k) is not None}
    if run.get("backbone_fingerprint"):
        out["base_model"] = {"id": run.get("backbone"), "fingerprint": run["backbone_fingerprint"]}
    return out


def _run_config(directory: Path) -> dict[str, Any] | None:
    """The enclosing run's run_config.json for a run's ``merged/`` folder, else None."""
    path = directory.parent / RUN_CONFIG_FILE
    if directory.name != MERGED_DIR or not path.is_file():
        return None
    run = read_json(path)
    return run if isinstance(run, dict) else None


def folder_digest(directory: Path, head_path: Path | None) -> str:
    """sha256 over the files a task is read from (adapter, config, adamix.json, head, run config).

    Recorded when a task is attached and compared when an evicted task is reloaded, so a file
    swapped meanwhile is refused instead of served.
    """
    directory = Path(directory)
    files = [ADAPTER_WEIGHTS_FILE, ADAPTER_CONFIG_FILE, METADATA_FILE]
    paths = [directory / f for f in files] + ([head_path] if head_path is not None else [])
    if directory.name == MERGED_DIR:
        paths.append(directory.parent / RUN_CONFIG_FILE)
    digest = hashlib.sha256()
    for path in paths:
        digest.update(f"{path.name}\0{sha256_file(path) if path.is_file() else '-'}\n".encode())
    return digest.hexdigest()


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


def _lora_tensors(merged: MergedAdapter) -> dict[str, LoRATensors]:
    config, where = merged.config, merged.where / ADAPTER_WEIGHTS_FILE
    for option in ("rank_pattern", "alpha_pattern"):
        if config.get(option):
            raise ValueError(f"{where}: LoRA {option} is not supported by the serving engine")
    if config.get("use_dora"):
        raise ValueError(f"{where}: DoRA adapters are not supported by the serving engine")
    return {module: LoRATensors(t.a.float(), t.b.float(), t.rank, t.scale)
            for module, t in _grouped(merged.lora, where).items()}


def _adapter_tensors(merged: MergedAdapter) -> dict[str, AdapterTensors]:
    where = merged.where / ADAPTER_WEIGHTS_FILE
    return {
        module: AdapterTensors(t.down_weight.float(), t.down_bias.float(), t.up_weight.float(),
                               t.up_bias.float(), t.activation)
        for module, t in _grouped(merged.adapters, where).items()
    }


def _grouped(read: Any, where: Path) -> dict[str, Any]:
    """``read(strict=False)`` (other PEFT writers' keys accepted), errors prefixed with the file."""
    try:
        return read(strict=False)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None


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
    metadata = _run_defaults(directory) | read_metadata(directory)
    if isinstance(metadata.get("files"), dict) and metadata["files"]:  # a registry entry: check it
        verify_files(directory, metadata)
    head_name, head_path, head_info = _pick_head(directory, metadata, head)
    digest = folder_digest(directory, head_path)  # before reading: what was checked is what is read
    merged = read_merged(directory)
    config = merged.config
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
    kind = merged.kind
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
        digest=digest,
    )
    if config["peft_type"] == ADAPTER_PEFT_TYPE:
        adapter.adapters = _adapter_tensors(merged)
    else:
        adapter.lora = _lora_tensors(merged)
    if not adapter.lora and not adapter.adapters:
        raise ValueError(f"{weights} holds no adapter tensors")
    return adapter

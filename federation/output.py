"""The federation's output folder (laid out like a training run) and publishing it to the registry.

Layout (the contract of ``adamix_zoo.training.RunWriter``, which the registry reads)::

    run_config.json        task, method, backbone(+path, fingerprint), problem, label_names, adamix,
                           train, seed, data, federation {rounds, clients, strategy, ...}
    final_metrics.json     {"main_metric": name, <metric>: value, ..., "federation": round log}
    adamix_experts.safetensors, head.safetensors, merged/ (adapter files + head.safetensors)

Multi-task runs write the shared experts at the top level (no head: heads stayed on the clients)
and one such run folder per task under ``tasks/<task>/`` when a client's head of that task is on
this machine (local simulation and local SuperNodes save them under ``client_heads/``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from adamix_zoo.backbones import fingerprint, resolve_backbone
from adamix_zoo.heads import TaskModel, load_head, save_head
from adamix_zoo.io import (
    EXPERTS_FILE,
    FINAL_METRICS_FILE,
    HEAD_FILE,
    MERGED_DIR,
    RUN_CONFIG_FILE,
    save_experts,
    save_merged,
)
from adamix_zoo.tasks import TaskSpec
from federation.config import FederationConfig

CLIENT_HEADS_DIR = "client_heads"
TASKS_DIR = "tasks"


def method_name(cfg: FederationConfig) -> str:
    return f"adamix-{cfg.kind}" if cfg.num_experts > 1 else cfg.kind


def run_config(cfg: FederationConfig, spec: TaskSpec | None, model: TaskModel) -> dict[str, Any]:
    """run_config.json; ``spec`` None describes the shared experts of a multi-task run."""
    return {
        "task": spec.name if spec else "+".join(cfg.task_list),
        "method": method_name(cfg),
        "backbone": cfg.backbone,
        "backbone_path": resolve_backbone(cfg.backbone),
        "backbone_fingerprint": fingerprint(model.backbone),
        "problem": spec.problem if spec else None,
        "label_names": list(spec.label_names) if spec else None,
        "adamix": cfg.adamix_config().to_dict(),
        "train": {
            "local_steps": cfg.local_steps,
            "batch_size": cfg.batch_size,
            "learning_rate": cfg.learning_rate,
            "max_length": cfg.max_length,
            "consistency_weight": cfg.consistency_weight,
            "pooling": cfg.pooling,
        },
        "seed": cfg.seed,
        "data": {
            "source": str(cfg.data_root() / "glue"),
            "tasks": cfg.task_list,
            "train_limit": cfg.train_limit,
            "eval_limit": cfg.eval_limit,
            "partitioner": cfg.partitioner,
            "dirichlet_alpha": cfg.dirichlet_alpha,
        },
        "federation": cfg.summary(),
    }


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def write_run(
    folder: Path,
    cfg: FederationConfig,
    spec: TaskSpec | None,
    model: TaskModel,
    metrics: dict[str, Any],
) -> Path:
    """Write one run folder: experts, merged adapter, (head), run_config and final metrics."""
    folder.mkdir(parents=True, exist_ok=True)
    save_experts(model.backbone, folder / EXPERTS_FILE)
    save_merged(model.backbone, folder / MERGED_DIR, base_model=cfg.backbone)
    if spec is not None:
        save_head(model.head, folder / HEAD_FILE)
        save_head(model.head, folder / MERGED_DIR / HEAD_FILE)
    _write_json(folder / RUN_CONFIG_FILE, run_config(cfg, spec, model))
    _write_json(folder / FINAL_METRICS_FILE, metrics)
    return folder


def client_head(folder: Path, task: str) -> Path | None:
    """The head a local client of ``task`` saved (lowest partition id), if any."""
    heads = sorted(
        (folder / CLIENT_HEADS_DIR / task).glob("partition-*.safetensors"),
        key=lambda p: int(p.stem.split("-")[-1]),
    )
    return heads[0] if heads else None


def attach_head(model: TaskModel, path: Path) -> None:
    """Put a saved client head onto the model (the experts stay the global ones)."""
    head = load_head(path)
    model.head.load_state_dict(head.state_dict())


def publish(folder: Path, cfg: FederationConfig, task: str) -> str | None:
    """Publish a run folder into the registry; returns the entry reference, or None when off.

    The registry is imported lazily (``federation`` works without it); its ``Store.publish``
    validates every file again before anything becomes visible.
    """
    if not cfg.publish:
        return None
    from registry import Store
    from registry.names import DEFAULT_NAMESPACE

    store = Store(cfg.registry_dir or None)
    info = store.publish(folder, task=task, namespace=cfg.publish_namespace or DEFAULT_NAMESPACE)
    return info.ref

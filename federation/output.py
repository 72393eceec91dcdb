"""The federation's output folder (a run folder, ``adamix_zoo.formats.run_folder``) and publishing it.

Its ``run_config.json`` adds a ``federation`` block (rounds, clients, strategy, ...) and its
``final_metrics.json`` the round log. Multi-task runs write the shared experts at the top level (no
head: heads stayed on the clients) and one such run folder per task under ``tasks/<task>/`` when a
client's head of that task is on this machine (local simulation and local SuperNodes save them
under ``client_heads/``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from adamix_zoo.backbones import fingerprint, resolve_backbone
from adamix_zoo.config import method_name
from adamix_zoo.formats.files import RUN_CONFIG_FILE
from adamix_zoo.formats.run_folder import RunFolder, run_config
from adamix_zoo.glue_tasks import TaskSpec
from adamix_zoo.heads import TaskModel, load_head
from federation.config import FederationConfig

CLIENT_HEADS_DIR = "client_heads"
TASKS_DIR = "tasks"


def federation_run_config(cfg: FederationConfig, spec: TaskSpec | None, model: TaskModel) -> dict[str, Any]:
    """run_config.json; ``spec`` None describes the shared experts of a multi-task run."""
    adamix = cfg.adamix_config()
    return run_config(
        task=spec.name if spec else "+".join(cfg.task_list),
        method=method_name(adamix.kind, adamix.num_experts),
        backbone=cfg.backbone,
        backbone_path=resolve_backbone(cfg.backbone),
        backbone_fingerprint=fingerprint(model.backbone),
        problem=spec.problem if spec else None,
        label_names=list(spec.label_names) if spec else None,
        adamix=adamix.to_dict(),
        train={
            "local_steps": cfg.local_steps,
            "batch_size": cfg.batch_size,
            "learning_rate": cfg.learning_rate,
            "max_length": cfg.max_length,
            "consistency_weight": adamix.consistency_weight,
            "pooling": cfg.pooling,
        },
        seed=cfg.seed,
        data={
            "source": str(cfg.data_root() / "glue"),
            "tasks": cfg.task_list,
            "train_limit": cfg.train_limit,
            "eval_limit": cfg.eval_limit,
            "partitioner": cfg.partitioner,
            "dirichlet_alpha": cfg.dirichlet_alpha,
        },
        federation=cfg.summary(),
    )


def write_run(
    folder: Path,
    cfg: FederationConfig,
    spec: TaskSpec | None,
    model: TaskModel,
    metrics: dict[str, Any],
) -> Path:
    """Write one run folder: experts, merged adapter, (head), run_config and final metrics."""
    run = RunFolder(folder)
    run.save_adapter(model.backbone, cfg.backbone, model.head if spec is not None else None)
    run.write_json(RUN_CONFIG_FILE, federation_run_config(cfg, spec, model))
    run.write_final(metrics)
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
    from adamix_zoo.formats.names import DEFAULT_NAMESPACE
    from registry import Store

    store = Store(cfg.registry_dir or None)
    info = store.publish(folder, task=task, namespace=cfg.publish_namespace or DEFAULT_NAMESPACE)
    return info.ref

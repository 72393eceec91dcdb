"""The federation's output folder (a run folder, ``adamix_zoo.formats.run_folder``) and publishing it.

Its ``run_config.json`` adds a ``federation`` block (rounds, clients, strategy, ...) and its
``final_metrics.json`` the round log. A data-to-text run's folder is the one the data-to-text recipe
writes (no head; ``merged/adamix.json`` and ``run_config.json`` record the prompt template;
``generations.jsonl``), so the registry and ``serve --lm`` take it as they take a central one.
Multi-task runs write the shared experts at the top level (no head: heads stayed on the clients) and
one such run folder per task under ``tasks/<task>/``: for GLUE when a client's head of that task is
on this machine (local simulation and local SuperNodes save them under ``client_heads/``), for
data-to-text always (the experts are the whole adapter).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from adamix_zoo.backbones import fingerprint, resolve_backbone
from adamix_zoo.config import method_name
from adamix_zoo.formats.files import RUN_CONFIG_FILE
from adamix_zoo.formats.run_folder import RunFolder, run_config
from federation.config import FederationConfig

if TYPE_CHECKING:
    from federation.task import GlobalEvaluation, TaskFamily, TaskInfo

CLIENT_HEADS_DIR = "client_heads"
TASKS_DIR = "tasks"


def federation_run_config(
    cfg: FederationConfig, task: str | None, info: TaskInfo, base_fingerprint: str, source: Path
) -> dict[str, Any]:
    """run_config.json; ``task`` None describes the shared experts of a multi-task run."""
    adamix = cfg.adamix_config()
    extra = {"prompt_template": info.prompt_template} if info.prompt_template is not None else {}
    return run_config(
        task=task or "+".join(cfg.task_list),
        method=method_name(adamix.kind, adamix.num_experts),
        backbone=cfg.backbone,
        backbone_path=resolve_backbone(cfg.backbone),
        backbone_fingerprint=base_fingerprint,
        problem=info.problem,
        label_names=info.label_names,
        adamix=adamix.to_dict(),
        train={
            "local_steps": cfg.local_steps,
            "batch_size": cfg.batch_size,
            "learning_rate": cfg.learning_rate,
            "head_learning_rate": cfg.head_learning_rate or cfg.learning_rate,
            "lr_schedule": cfg.lr_schedule,
            "logit_adjustment": cfg.logit_adjustment,
            "warmup_ratio": cfg.warmup_ratio,
            "max_length": cfg.max_length,
            "consistency_weight": adamix.consistency_weight,
            "pooling": cfg.pooling,
        },
        seed=cfg.seed,
        data={
            "source": str(source),
            "tasks": cfg.task_list,
            "train_limit": cfg.train_limit,
            "eval_limit": cfg.eval_limit,
            "partitioner": cfg.partitioner,
            "dirichlet_alpha": cfg.dirichlet_alpha,
        },
        federation=cfg.summary(),
        **extra,
    )


def write_run(
    folder: Path,
    cfg: FederationConfig,
    family: TaskFamily,
    task: str | None,
    model: nn.Module,
    metrics: dict[str, Any],
    evaluation: GlobalEvaluation | None = None,
) -> Path:
    """Write one run folder: experts, merged adapter, the head or (generation) the prompt metadata,
    run_config, final metrics and (generation) the scored outputs."""
    run = RunFolder(folder)
    info, adapter = family.describe(cfg, task), family.adamix_model(model)
    base_fingerprint = fingerprint(adapter)
    if info.prompt_template is not None and task is not None:
        run.save_lm_adapter(adapter, cfg.backbone, task, base_fingerprint, info.prompt_template)
    else:
        run.save_adapter(adapter, cfg.backbone, family.head(model) if task is not None else None)
    config = federation_run_config(cfg, task, info, base_fingerprint, family.data_source(cfg))
    run.write_json(RUN_CONFIG_FILE, config)
    if evaluation is not None and evaluation.outputs is not None:
        run.write_generations(evaluation.examples, evaluation.outputs)
    run.write_final(metrics)
    return folder


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

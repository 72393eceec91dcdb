"""Building the task model of the classification recipes: a bare backbone, AdaMix, a task head."""

from __future__ import annotations

from torch import nn

from adamix_zoo.config import AdaMixConfig
from adamix_zoo.glue_tasks import TaskSpec
from adamix_zoo.heads import ClassificationHead, TaskModel
from adamix_zoo.model import AdaMixModel


def build_task_model(
    backbone: nn.Module | str,
    task: TaskSpec,
    adamix: AdaMixConfig | None = None,
    pooling: str = "mean",
    head_dropout: float = 0.1,
) -> TaskModel:
    """A bare backbone (``AutoModel``), AdaMix injected when ``adamix`` is given, plus a task head.

    Args:
        backbone: a loaded bare transformers model, or a local folder / hub id to load one from.
        task: the task; sets the head's width (num_labels, 1 for regression).
        adamix: the mixture config; None leaves the backbone fully trainable (full fine-tuning).
    """
    if isinstance(backbone, str):
        from transformers import AutoModel

        backbone = AutoModel.from_pretrained(backbone)
    hidden = backbone.config.hidden_size
    if adamix is not None:
        backbone = AdaMixModel(backbone, adamix, head_modules=[])
    head = ClassificationHead(hidden, task.num_labels, pooling=pooling, dropout=head_dropout)
    return TaskModel(backbone, head)


def bare_backbone(model: TaskModel) -> nn.Module:
    """The transformers backbone inside a TaskModel, with or without its AdaMix wrapper."""
    return model.backbone.model if isinstance(model.backbone, AdaMixModel) else model.backbone


def model_adamix_config(model: nn.Module) -> AdaMixConfig | None:
    """The AdaMix config of a TaskModel's backbone, or None without AdaMix."""
    backbone = getattr(model, "backbone", None)
    return backbone.config if isinstance(backbone, AdaMixModel) else None


def model_consistency_weight(model: nn.Module, problem: str) -> float:
    """The consistency weight configured on a TaskModel's AdaMix backbone (0 without AdaMix)."""
    config = model_adamix_config(model)
    return config.consistency_weight_for(problem) if config is not None else 0.0

"""Training losses of the classification and regression tasks, with AdaMix's consistency term."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from adamix_zoo.consistency import consistency_loss, two_routed_passes
from adamix_zoo.glue_tasks import TaskSpec


def task_loss(logits: torch.Tensor, labels: torch.Tensor, problem: str) -> torch.Tensor:
    """Cross-entropy for classification, mean squared error for regression. logits: (batch, labels)."""
    if problem == "regression":
        return F.mse_loss(logits.squeeze(-1).float(), labels.float())
    return F.cross_entropy(logits.float(), labels)


def _forward(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    return model(**inputs)


def compute_loss(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    task: TaskSpec,
    consistency_weight: float,
    task_loss_passes: str = "both",
    second_pass: str = "train",
    logit_offset: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The training loss of one batch: task loss, plus AdaMix's consistency term when weighted.

    With consistency, two passes route independently (and draw independent dropout), run as one
    doubled batch; the task loss is the mean over both passes (as in R-Drop) or, with
    ``task_loss_passes="first"``, the first pass's, and ``w * consistency(pass1, pass2)`` is added.
    ``second_pass="target"`` runs the second pass without gradient (task loss on the first only).
    ``logit_offset`` (classification, one value per label) is added to the logits of the task loss
    only (logit adjustment); the consistency term compares the model's own logits.
    """
    def supervised(logits: torch.Tensor) -> torch.Tensor:
        return task_loss(logits if logit_offset is None else logits + logit_offset, batch["labels"], task.problem)

    if consistency_weight <= 0:
        loss = supervised(_forward(model, batch))
        return loss, {"task_loss": loss.item(), "consistency": 0.0}
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits, logits2 = two_routed_passes(model, lambda b: model(**b), inputs, second_pass)
    loss = supervised(logits)
    if task_loss_passes == "both" and second_pass == "train":
        loss = 0.5 * (loss + supervised(logits2))
    squeeze = task.problem == "regression"
    reg = consistency_loss(
        logits.squeeze(-1) if squeeze else logits, logits2.squeeze(-1) if squeeze else logits2, task.problem
    )
    return loss + consistency_weight * reg, {"task_loss": loss.item(), "consistency": reg.item()}

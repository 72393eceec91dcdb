"""The language-modelling objective: target-token cross-entropy + token-masked consistency, and the
official NLG mixture it trains (shared by the data-to-text recipe and the federated clients)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from adamix_zoo.config import AdaMixConfig
from adamix_zoo.consistency import token_masked_kl, two_routed_passes
from adamix_zoo.generation.data import IGNORE


def generation_adamix() -> AdaMixConfig:
    """The official NLG setup: LoRA rank 4, alpha 32, task loss on the first pass (GPT-2 AdaMix)."""
    return AdaMixConfig(rank=4, alpha=32.0, task_loss_passes="first")


def lm_loss_terms(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    consistency_weight: float = 0.0,
    task_loss_passes: str = "first",
    second_pass: str = "train",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(cross-entropy on target tokens, token-masked KL between two routed passes); see ``lm_loss``.

    With a weight <= 0 there is one pass and the KL term is a zero tensor.
    """
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if consistency_weight <= 0:
        ce = model(**inputs, labels=batch["labels"]).loss
        return ce, torch.zeros((), device=ce.device)
    first, second = two_routed_passes(model, lambda b: model(**b), inputs, second_pass)  # (batch, seq, vocab)
    # logits at position t predict token t + 1: the loss and the KL count target positions only
    labels = batch["labels"][:, 1:]
    mask = labels != IGNORE
    passes = (first, second) if task_loss_passes == "both" and second_pass == "train" else (first,)
    ce = sum(F.cross_entropy(lg[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE)
             for lg in passes) / len(passes)
    return ce, token_masked_kl(first[:, :-1], second[:, :-1], mask)


def lm_loss(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    consistency_weight: float = 0.0,
    task_loss_passes: str = "first",
    second_pass: str = "train",
) -> torch.Tensor:
    """Cross-entropy on target tokens; with a weight > 0, a second stochastically routed pass and
    ``w * token_masked_kl`` between the two passes' next-token distributions on target positions.
    The cross-entropy is the first pass's (official GPT-2 AdaMix) or, with ``"both"``, their mean;
    ``second_pass="target"`` runs the second pass without gradient.

    batch: input_ids, attention_mask, labels (batch, seq), labels IGNORE on prompt and padding.
    """
    ce, consistency = lm_loss_terms(model, batch, consistency_weight, task_loss_passes, second_pass)
    return ce + consistency_weight * consistency if consistency_weight > 0 else ce


def lm_loss_fn(config: AdaMixConfig):
    """The ``adamix_zoo.loop`` loss hook of a mixture: its lm consistency weight, task-loss passes and
    second pass; reports ``task_loss`` and ``consistency`` per step."""
    weight = config.consistency_weight_for("lm")

    def loss_fn(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        ce, consistency = lm_loss_terms(model, batch, weight, config.task_loss_passes, config.second_pass)
        loss = ce + weight * consistency if weight > 0 else ce
        return loss, {"task_loss": ce.item(), "consistency": consistency.item()}

    return loss_fn

"""The language-modelling objective: target-token cross-entropy + token-masked consistency."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from adamix_zoo.consistency import token_masked_kl, two_routed_passes
from adamix_zoo.generation.data import IGNORE


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
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if consistency_weight <= 0:
        return model(**inputs, labels=batch["labels"]).loss
    first, second = two_routed_passes(model, lambda b: model(**b), inputs, second_pass)  # (batch, seq, vocab)
    # logits at position t predict token t + 1: the loss and the KL count target positions only
    labels = batch["labels"][:, 1:]
    mask = labels != IGNORE
    passes = (first, second) if task_loss_passes == "both" and second_pass == "train" else (first,)
    ce = sum(F.cross_entropy(lg[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE)
             for lg in passes) / len(passes)
    consistency = token_masked_kl(first[:, :-1], second[:, :-1], mask)
    return ce + consistency_weight * consistency

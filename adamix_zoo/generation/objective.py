"""The language-modelling objective: target-token cross-entropy + token-masked consistency."""

from __future__ import annotations

import torch
from torch import nn

from adamix_zoo.consistency import token_masked_kl
from adamix_zoo.generation.data import IGNORE


def lm_loss(model: nn.Module, batch: dict[str, torch.Tensor], consistency_weight: float = 0.0) -> torch.Tensor:
    """Cross-entropy on target tokens; with a weight > 0, a second stochastically routed pass and
    ``w * token_masked_kl`` between the two passes' next-token distributions on target positions.

    batch: input_ids, attention_mask, labels (batch, seq), labels IGNORE on prompt and padding.
    """
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    first = model(**inputs, labels=batch["labels"])
    if consistency_weight <= 0:
        return first.loss
    second = model(**inputs, labels=batch["labels"])
    # logits at position t predict token t + 1: compare them where token t + 1 is a target
    mask = batch["labels"][:, 1:] != IGNORE
    consistency = token_masked_kl(first.logits[:, :-1], second.logits[:, :-1], mask)
    return 0.5 * (first.loss + second.loss) + consistency_weight * consistency

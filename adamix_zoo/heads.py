"""Task heads on token states, and the task model = (AdaMix-wrapped) backbone + head.

The adapters are injected into the bare backbone (``AutoModel``), so a merged LoRA's names are the
backbone's own and any PEFT-compatible server can load it onto the same ``AutoModel``; the head is
a separate small file. Mean pooling is the default because sentence encoders such as
all-MiniLM-L6-v2 were trained with it (their [CLS] pooler never was).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from adamix_zoo.formats.head import read_head, write_head

POOLINGS = ("mean", "cls")


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Masked mean of token states. hidden: (batch, seq, d), attention_mask: (batch, seq) -> (batch, d)."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)


class ClassificationHead(nn.Module):
    """Pooled token states -> dropout -> linear. ``num_labels=1`` is regression.

    Args:
        hidden_size: width of the backbone's token states.
        num_labels: classes, or 1 for a regression score.
        pooling: 'mean' (masked mean of token states) or 'cls' (the first token).
        dropout: dropout before the linear layer.
    """

    def __init__(self, hidden_size: int, num_labels: int, pooling: str = "mean", dropout: float = 0.1):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling={pooling!r} is not supported; choose one of {', '.join(POOLINGS)}")
        if num_labels < 1:
            raise ValueError(f"num_labels must be >= 1, got {num_labels}")
        self.hidden_size, self.num_labels, self.pooling = hidden_size, num_labels, pooling
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden_size, num_labels)

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """hidden: (batch, seq, d), attention_mask: (batch, seq) -> (batch, d)."""
        return hidden[:, 0] if self.pooling == "cls" else mean_pool(hidden, attention_mask)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.pool(hidden, attention_mask)))  # (batch, labels)

    def spec(self) -> dict[str, int | str]:
        return {"hidden_size": self.hidden_size, "num_labels": self.num_labels, "pooling": self.pooling}


class TaskModel(nn.Module):
    """Backbone (returns ``last_hidden_state``) + head; returns logits (batch, num_labels)."""

    def __init__(self, backbone: nn.Module, head: ClassificationHead):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        kwargs = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        return self.head(hidden.last_hidden_state, attention_mask)


def save_head(head: ClassificationHead, path: str | os.PathLike) -> Path:
    return write_head(head.state_dict(), head.spec(), path)


def load_head(path: str | os.PathLike) -> ClassificationHead:
    """Rebuild a head saved by ``save_head``.

    Raises:
        ValueError: unreadable file, missing spec, or tensors that do not fit the spec.
    """
    spec, state = read_head(path)
    head = ClassificationHead(**spec)
    try:
        head.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(f"head file {path} does not fit its own spec: {err}") from err
    return head

"""A classification head initialised in closed form from the frozen backbone's features.

A linear discriminant (LDA: class means, one within-class covariance, the class priors) fitted to
the pooled features of the training rows *before* any adapter trains: linear probing then
fine-tuning (LP-FT, Kumar et al., ICLR 2022). Its statistics (class counts, class feature sums and
the feature scatter, the sum of x x^T) add up across any split of the rows, so a federation gets the
head that the pooled rows give, exactly, from one round of sums (FedNCM, Legate et al. 2023; Fed3R,
Fanì et al., ICML 2024). Under label skew a random head is what the clients pull apart first: on
all-MiniLM-L6-v2 / SST-2 the LDA head alone scores 0.79 on the dev set, what 20 rounds of federated
fine-tuning from a random head reached (docs/BENCHMARKS.md, "Federation").
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from adamix_zoo.heads import ClassificationHead, TaskModel

HEAD_INITS = ("random", "lda")
LDA_SHRINKAGE = 0.1  # of the within-class covariance's mean diagonal, added to it: a well-posed solve


@dataclass
class FeatureStatistics:
    """Sums over rows of pooled features x (float64): per-class counts (K,), per-class feature sums
    (K, d) and the scatter sum of x x^T (d, d)."""

    counts: torch.Tensor
    sums: torch.Tensor
    scatter: torch.Tensor

    @classmethod
    def of(cls, x: torch.Tensor, y: torch.Tensor, num_labels: int) -> "FeatureStatistics":
        x = x.double()
        counts = torch.bincount(y, minlength=num_labels).double()
        sums = torch.zeros(num_labels, x.shape[1], dtype=torch.float64).index_add_(0, y, x)
        return cls(counts, sums, x.T @ x)

    def __add__(self, other: "FeatureStatistics") -> "FeatureStatistics":
        return FeatureStatistics(self.counts + other.counts, self.sums + other.sums, self.scatter + other.scatter)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"counts": self.counts, "sums": self.sums, "scatter": self.scatter}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], num_labels: int, hidden: int) -> "FeatureStatistics":
        """Statistics as another process sent them.

        Raises:
            ValueError: a tensor missing, of another shape, negative counts or not finite.
        """
        shapes = {"counts": (num_labels,), "sums": (num_labels, hidden), "scatter": (hidden, hidden)}
        for name, shape in shapes.items():
            if name not in tensors:
                raise ValueError(f"feature statistics lack {name!r}")
            if tuple(tensors[name].shape) != shape:
                raise ValueError(f"feature statistics {name!r} has shape {tuple(tensors[name].shape)}, expected {shape}")
            if not torch.isfinite(tensors[name]).all():
                raise ValueError(f"feature statistics {name!r} holds non-finite values")
        if (tensors["counts"] < 0).any():
            raise ValueError("feature statistics hold a negative class count")
        return cls(*(tensors[name].double() for name in shapes))


@torch.no_grad()
def feature_statistics(model: TaskModel, batches: Iterable[dict[str, torch.Tensor]]) -> FeatureStatistics:
    """The head's input features (pooled, before dropout) of every row in ``batches``, summed."""
    was_training = model.training
    model.eval()
    total = None
    try:
        for batch in batches:
            kwargs = {"token_type_ids": batch["token_type_ids"]} if "token_type_ids" in batch else {}
            hidden = model.backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                    **kwargs).last_hidden_state
            pooled = model.head.pool(hidden, batch["attention_mask"]).float().cpu()
            part = FeatureStatistics.of(pooled, batch["labels"].long().cpu(), model.head.num_labels)
            total = part if total is None else total + part
    finally:
        model.train(was_training)
    if total is None:
        raise ValueError("no rows to compute feature statistics on")
    return total


def lda_head(stats: FeatureStatistics, shrinkage: float = LDA_SHRINKAGE) -> tuple[torch.Tensor, torch.Tensor]:
    """The linear discriminant: weight (K, d) and bias (K,), float64.

    Raises:
        ValueError: a class without rows (its mean is undefined).
    """
    missing = [k for k, c in enumerate(stats.counts.tolist()) if c <= 0]
    if missing:
        raise ValueError(f"no training rows of label(s) {missing}: an LDA head needs every class")
    counts = stats.counts
    means = stats.sums / counts[:, None]
    within = (stats.scatter - means.T @ (means * counts[:, None])) / counts.sum()
    scale = float(within.diagonal().mean())
    scale = scale if scale > 0 else 1.0  # every class's rows alike: nearest class mean, unit covariance
    ridge = max(shrinkage, 1e-12) * scale * torch.eye(len(within), dtype=within.dtype)
    weight = torch.linalg.solve(within + ridge, means.T).T
    return weight, -0.5 * (weight * means).sum(1) + torch.log(counts / counts.sum())


def check_head_init(head_init: str, num_labels: int) -> None:
    """Raises ValueError: an unknown ``head_init``, or 'lda' for a regression head."""
    if head_init not in HEAD_INITS:
        raise ValueError(f"head-init={head_init!r} is not supported; choose one of {', '.join(HEAD_INITS)}")
    if head_init == "lda" and num_labels < 2:
        raise ValueError("head-init=lda needs class labels: a regression head starts at random")


def set_head(head: ClassificationHead, weight: torch.Tensor, bias: torch.Tensor) -> None:
    """Copy a closed-form ``weight`` and ``bias`` into ``head``'s linear layer."""
    with torch.no_grad():
        head.classifier.weight.copy_(weight.to(head.classifier.weight.dtype))
        head.classifier.bias.copy_(bias.to(head.classifier.bias.dtype))

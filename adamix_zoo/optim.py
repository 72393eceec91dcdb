"""The optimizer and the learning-rate schedule every recipe uses: AdamW, linear warmup and decay."""

from __future__ import annotations

import torch
from torch import nn

EXPERT_LR_SCALE_HELP = (
    "Learning-rate factor of the routed experts' tensors (those with K copies; the shared projection "
    "and the head keep their rates). Each expert learns from 1/K of the routed rows (per-row routing) or "
    "steps (per-batch), so under Adam it moves about lr/sqrt(K) a step; sqrt(K) is the correction. "
    "Default 1: at 600 steps sqrt(K) measured level (STS-B + SST-2 83.46 against 83.49), though it "
    "learned faster early (79.85 against 78.53 after 150 steps; docs/BENCHMARKS.md, fidelity ablations).")


def is_routed_expert(name: str, param: nn.Parameter) -> bool:
    """A mixture tensor that holds K > 1 experts (its first dimension), not a shared projection."""
    return "adamix_" in name.rsplit(".", 1)[-1] and param.dim() >= 2 and param.shape[0] > 1


def make_optimizer(
    model: nn.Module, lr: float, weight_decay: float = 0.01, head_lr: float | None = None,
    expert_lr_scale: float = 1.0,
) -> torch.optim.AdamW:
    """AdamW on the trainable parameters; no weight decay on biases and normalisation weights.

    Args:
        head_lr: learning rate of the task head (``head.*``); None uses ``lr``. A freshly drawn
            head on a frozen encoder often wants a higher rate than the adapters or the backbone.
        expert_lr_scale: factor on ``lr`` for the routed experts' tensors (``is_routed_expert``).
    """
    groups: dict[tuple[bool, bool, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            no_decay = name.endswith("bias") or "norm" in name.lower()
            expert = expert_lr_scale != 1.0 and is_routed_expert(name, param)
            groups.setdefault((name.startswith("head."), no_decay, expert), []).append(param)
    return torch.optim.AdamW(
        [{"params": params, "weight_decay": 0.0 if no_decay else weight_decay,
          "lr": head_lr if is_head and head_lr is not None else lr * (expert_lr_scale if expert else 1.0)}
         for (is_head, no_decay, expert), params in groups.items()],
        lr=lr,
    )


def make_scheduler(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int, warmup_offset: int = 1,
    first_step: int = 0,
):
    """Linear warmup to the peak learning rate, then linear decay to 0 at ``total_steps``.

    Args:
        warmup_offset: the factor of warmup step s is ``(s + warmup_offset) / warmup_steps``: 1
            reaches the peak on the last warmup step (the GLUE recipe); 0 starts from 0, exactly
            ``transformers.get_linear_schedule_with_warmup`` (the data-to-text recipe).
        first_step: where in the schedule this optimizer starts (a federated client's round runs
            its slice of the whole run's schedule).
    """

    def factor(local_step: int) -> float:
        step = local_step + first_step
        if step < warmup_steps:
            return float(step + warmup_offset) / float(warmup_steps)
        return max(0.0, float(total_steps - step) / float(max(1, total_steps - warmup_steps)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

"""The reusable step loop: forward under autocast, backward, all-reduce, clip, step, schedule.

Every recipe and the federated clients run their optimizer steps here; what differs between them
is the loss, passed as a hook (the default is the classification / regression loss of a task).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn

from adamix_zoo.glue_tasks import TaskSpec
from adamix_zoo.losses import compute_loss
from adamix_zoo.runtime import autocast, sync_gradients
from adamix_zoo.task_model import model_adamix_config, model_consistency_weight

Batch = dict[str, torch.Tensor]
# (model, batch on its device) -> (loss, {"task_loss": float, "consistency": float}; either optional)
LossFn = Callable[[nn.Module, Batch], tuple[torch.Tensor, dict[str, float]]]


def cycle_batches(loader: Iterable) -> Iterator:
    """Endless batches over epochs, reshuffling each epoch (DistributedSampler included)."""
    epoch = 0
    while True:
        sampler = getattr(loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def task_loss_fn(model: nn.Module, task: TaskSpec, consistency_weight: float | None = None,
                 logit_offset: torch.Tensor | None = None) -> LossFn:
    """The loss of a classification / regression task; None takes the weight of the model's config.
    ``logit_offset``: added to the task loss's logits (``losses.compute_loss``)."""
    if consistency_weight is None:
        consistency_weight = model_consistency_weight(model, task.problem)
    config = model_adamix_config(model)
    passes = config.task_loss_passes if config is not None else "both"
    second = config.second_pass if config is not None else "train"
    return lambda m, batch: compute_loss(m, batch, task, consistency_weight, passes, second, logit_offset)


def train_steps(
    model: nn.Module,
    loader: Iterable | Iterator,
    task: TaskSpec | None,
    num_steps: int,
    optimizer: torch.optim.Optimizer,
    scheduler: Any = None,
    consistency_weight: float | None = None,
    max_grad_norm: float = 1.0,
    device: torch.device | str | None = None,
    progress: Any = None,
    precision: str = "fp32",
    loss_fn: LossFn | None = None,
    on_step: Callable[[int, float], None] | None = None,
    after_backward: Callable[[], None] | None = None,
) -> dict[str, float]:
    """Run ``num_steps`` optimizer steps on ``model`` (in place) and return the mean losses.

    Args:
        loader: a DataLoader (cycled over epochs when it runs out) or an iterator of batches
            (continued where the previous call stopped, as ``fit`` does between evaluations).
        task: the task of the default loss; may be None when ``loss_fn`` is given.
        consistency_weight: None takes the weight of the model's AdaMix config for the task's
            problem (0 without AdaMix).
        precision: "bf16" runs forward and backward under bfloat16 autocast (weights stay fp32).
        device: where batches go; None uses the device of the model's parameters.
        progress: an optional tqdm bar, advanced once per step with the current loss.
        loss_fn: the loss hook; None is the task's loss (``task_loss_fn``).
        on_step: called after each step with (step number in this call, from 1; the step's loss).
        after_backward: called after each backward pass, before clipping and the optimizer step
            (federated drift control corrects the gradients there).

    Returns:
        {"loss", "task_loss", "consistency"} averaged over the steps, "steps" and "examples"
        (examples seen by this process).
    """
    if loss_fn is None:
        loss_fn = task_loss_fn(model, task, consistency_weight)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    batches = loader if isinstance(loader, Iterator) else cycle_batches(loader)
    trainable = [p for p in model.parameters() if p.requires_grad]
    totals = {"loss": 0.0, "task_loss": 0.0, "consistency": 0.0}
    examples = 0
    model.train()
    for step in range(1, num_steps + 1):
        batch = {k: v.to(device) for k, v in next(batches).items()}
        with autocast(device, precision):
            loss, parts = loss_fn(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        sync_gradients(model)
        if after_backward is not None:
            after_backward()
        if max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(trainable, max_grad_norm)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        value = loss.item()
        totals["loss"] += value
        totals["task_loss"] += parts.get("task_loss", value)
        totals["consistency"] += parts.get("consistency", 0.0)
        examples += len(batch["labels"])
        if on_step is not None:
            on_step(step, value)
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{value:.4f}", refresh=False)
    steps = max(num_steps, 1)
    return {k: v / steps for k, v in totals.items()} | {"steps": num_steps, "examples": examples}


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of every trainable tensor (the best-checkpoint snapshot)."""
    return {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}


@torch.no_grad()
def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    for name, tensor in state.items():
        params[name].copy_(tensor)

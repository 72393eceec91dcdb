"""Whether a task adapter fits a backbone: its kind of model, base weights and projection shapes."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from adamix_zoo.mixtures.adapter import ACTIVATIONS
from adamix_zoo.mixtures.lora import linear_dims
from adamix_zoo.serving.errors import FingerprintMismatchError, InputError
from adamix_zoo.serving.task_folders import TaskAdapter


def can_generate(backbone: nn.Module) -> bool:
    """Whether ``backbone`` is a causal LM with an output layer (needed by generation tasks)."""
    can = getattr(backbone, "can_generate", None)
    return bool(can and can())


def check_adapter(
    adapter: TaskAdapter,
    backbone: nn.Module,
    fingerprint: str,
    projection: Callable[[str], nn.Module],
) -> None:
    """Refuse adapters trained on another backbone or shaped for other projections.

    Args:
        adapter: the task read from its folder.
        backbone: the frozen model that would serve it.
        fingerprint: the backbone's base-weights fingerprint.
        projection: the frozen projection of a module name (AttributeError if there is none).

    Raises:
        FingerprintMismatchError: the adapter was trained on other base weights.
        ValueError: a generation task on an encoder, or tensors that do not fit the projections.
    """
    where = f"task {adapter.task!r} ({adapter.source})"
    if adapter.generates and not can_generate(backbone):
        raise ValueError(
            f"{where} is a generation task, but this backbone has no language-model head: "
            "load the backbone as a causal LM (serve --lm)"
        )
    if adapter.base_fingerprint and adapter.base_fingerprint != fingerprint:
        raise FingerprintMismatchError(
            f"{where} was trained on a base model with fingerprint {adapter.base_fingerprint}, "
            f"but this backbone's fingerprint is {fingerprint}"
        )
    if adapter.head is not None:
        hidden = getattr(getattr(backbone, "config", None), "hidden_size", adapter.head.hidden_size)
        if adapter.head.hidden_size != hidden:
            raise ValueError(
                f"{where}: head expects hidden size {adapter.head.hidden_size}, "
                f"backbone has {hidden}"
            )
    for name, lora in adapter.lora.items():
        d_in, d_out = _dims(projection, name, where)
        if lora.a.shape[1] != d_in or lora.b.shape[0] != d_out:
            raise ValueError(
                f"{where}: LoRA on {name} has A {tuple(lora.a.shape)} / B {tuple(lora.b.shape)}, "
                f"but the projection is {d_in} -> {d_out}"
            )
    for name, adp in adapter.adapters.items():
        _, d_out = _dims(projection, name, where)
        if adp.activation not in ACTIVATIONS:
            raise ValueError(
                f"{where}: activation {adp.activation!r} is not one of {', '.join(ACTIVATIONS)}"
            )
        if adp.down_weight.shape[1] != d_out or adp.up_weight.shape[0] != d_out:
            raise ValueError(
                f"{where}: adapter on {name} has down {tuple(adp.down_weight.shape)} / up "
                f"{tuple(adp.up_weight.shape)}, but the projection's output has {d_out} features"
            )


def _dims(projection: Callable[[str], nn.Module], name: str, where: str) -> tuple[int, int]:
    """(d_in, d_out) of the projection ``name``; ValueError if it is none."""
    try:
        d_in, d_out, _ = linear_dims(projection(name))
    except AttributeError:
        raise ValueError(f"{where}: the backbone has no module {name!r}") from None
    except TypeError as err:
        raise ValueError(f"{where}: module {name!r} cannot hold an adapter: {err}") from None
    return d_in, d_out


def input_columns(adapter: TaskAdapter) -> int | None:
    """How many texts one input of ``adapter``'s task has (1: a sentence, 2: a pair), when its
    task is a GLUE task (by adamix.json's task or the served name); None when unknown."""
    from adamix_zoo.glue_tasks import TASKS

    name = adapter.metadata.get("name")
    candidates = [
        adapter.metadata.get("task"),
        name.get("task") if isinstance(name, dict) else None,
        adapter.task,
        adapter.task.rsplit(".", 1)[-1],
    ]
    known = [c for c in candidates if isinstance(c, str) and c.lower() in TASKS]
    return len(TASKS[known[0].lower()].text_columns) if known else None


def check_columns(task: str, columns: int | None, inputs: list) -> None:
    """Refuse inputs that are not the task's shape (a lone sentence for a pair task, and back).

    Raises:
        InputError: naming the input, the task and the shape it takes.
    """
    if columns is None:
        return
    for i, item in enumerate(inputs):
        parts = 1 if isinstance(item, str) else len(item) if isinstance(item, (list, tuple)) else 0
        if parts and parts != columns:
            shape = "a [text_a, text_b] pair" if columns == 2 else "a single sentence"
            raise InputError(f"input {i} has {parts} text(s), but task {task!r} takes {shape}")

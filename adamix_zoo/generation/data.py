"""Loading, grouping references, and tokenising prompts + targets for a causal LM."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from datasets import Dataset, load_dataset

from adamix_zoo.formats.files import check_json_lines
from adamix_zoo.generation.nlg_tasks import NLGTask

IGNORE = -100  # label of tokens the loss skips (prompt and padding)


@dataclass(frozen=True)
class Example:
    source: str
    references: tuple[str, ...]


def load_split(task: NLGTask, split: str, data_dir: str | os.PathLike | None = None) -> Dataset:
    """A split from ``data_dir/<task>/<split>.jsonl`` (hub schema), else from the hub.

    Raises:
        ValueError: the local file is missing, empty, or lacks the task's columns.
    """
    if data_dir is None:
        return load_dataset(task.hub_id, split=split)
    path = Path(data_dir) / task.name / f"{split}.jsonl"
    if not path.is_file():
        raise ValueError(f"no {split} split for {task.name}: {path} does not exist")
    if not check_json_lines(path):
        raise ValueError(f"{path} is empty")
    data = load_dataset("json", data_files=str(path), split="train")
    missing = [c for c in task.columns if c not in data.column_names]
    if missing:
        raise ValueError(f"{path} lacks the columns {missing} that {task.name} needs")
    if len(data) == 0:
        raise ValueError(f"{path} is empty")
    return data


def grouped_examples(task: NLGTask, rows: Dataset, limit: int | None = None) -> list[Example]:
    """One example per distinct source with all its references, in first-seen order."""
    groups: dict[str, list[str]] = {}
    for row in rows:
        groups.setdefault(task.source(row), []).extend(task.references(row))
    examples = [Example(src, tuple(refs)) for src, refs in groups.items()]
    return examples[:limit] if limit is not None else examples


def training_pairs(task: NLGTask, rows: Dataset, limit: int | None = None) -> list[tuple[str, str]]:
    """(source, reference) pairs, one per reference, the first ``limit`` of them."""
    pairs = [(task.source(row), ref) for row in rows for ref in task.references(row)]
    return pairs[:limit] if limit is not None else pairs


def encode_pair(tokenizer, task: NLGTask, source: str, target: str, max_length: int) -> dict[str, list[int]]:
    """Prompt + " target" + eos; labels are IGNORE on the prompt so the loss is on the target only."""
    prompt = tokenizer(task.prompt(source), add_special_tokens=False)["input_ids"]
    answer = tokenizer(" " + target, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = (prompt + answer)[:max_length]
    labels = ([IGNORE] * len(prompt) + answer)[:max_length]
    return {"input_ids": ids, "labels": labels}


def collate_lm(features: list[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a training batch: input_ids, attention_mask, labels (batch, seq)."""
    length = max(len(f["input_ids"]) for f in features)
    ids = torch.full((len(features), length), pad_id, dtype=torch.long)
    labels = torch.full((len(features), length), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(features), length), dtype=torch.long)
    for i, f in enumerate(features):
        n = len(f["input_ids"])
        ids[i, :n] = torch.tensor(f["input_ids"])
        labels[i, :n] = torch.tensor(f["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}

"""GLUE data: load (local hub-schema JSON lines or the hub), validate, subsample, tokenize, batch.

A local folder holds ``<task>/train.jsonl`` and ``<task>/validation.jsonl`` (``--data-dir`` may name
the folder of tasks, e.g. ``../shared/data/glue``, or one task's folder). Without a folder the data
comes from the hub dataset ``nyu-mll/glue``. Every split is checked before any training starts.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from adamix_zoo.formats.files import check_json_lines
from adamix_zoo.glue_tasks import TaskSpec

HUB_DATASET = "nyu-mll/glue"
SPLITS = ("train", "validation")


# -- loading --------------------------------------------------------------------------------------
def _split_file(folder: Path, split: str) -> Path | None:
    for suffix in (".jsonl", ".json"):
        if (folder / f"{split}{suffix}").is_file():
            return folder / f"{split}{suffix}"
    return None


def task_folder(data_dir: str | os.PathLike, task: TaskSpec) -> Path:
    """The folder of ``task`` under ``data_dir``: ``data_dir/<task>``, ``data_dir/glue/<task>``
    (so the shared data root works as is) or ``data_dir`` itself (one task's folder).

    Raises:
        FileNotFoundError: none of them holds split files.
    """
    root = Path(data_dir)
    for folder in (root / task.name, root / "glue" / task.name, root):
        if folder.is_dir() and any(_split_file(folder, s) for s in (*SPLITS, task.validation_split)):
            return folder
    raise FileNotFoundError(
        f"no data for task {task.name!r} in {root}: expected {root / task.name}/train.jsonl "
        f"and validation.jsonl (JSON lines in the hub schema)"
    )


def load_split(task: TaskSpec, split: str, data_dir: str | os.PathLike | None = None):
    """One split as a ``datasets.Dataset``: ``split`` is 'train' or 'validation'.

    Raises:
        FileNotFoundError: the local folder has no file for this split.
    """
    import datasets

    if data_dir is None:
        hub_split = task.validation_split if split == "validation" else split
        try:
            return datasets.load_dataset(HUB_DATASET, task.name, split=hub_split)
        except (ConnectionError, OSError) as err:  # offline, or no access to the hub
            raise FileNotFoundError(
                f"cannot load {HUB_DATASET}/{task.name} from the hub ({err}); pass a local folder "
                f"in the hub schema with --data-dir (e.g. ../shared/data/glue)"
            ) from err
    folder = task_folder(data_dir, task)
    path = _split_file(folder, split) or (
        _split_file(folder, task.validation_split) if split == "validation" else None
    )
    if path is None:
        raise FileNotFoundError(f"task {task.name!r}: no {split}.jsonl in {folder}")
    if not path.read_text().strip():  # datasets cannot infer a schema from an empty file
        raise ValueError(f"task {task.name!r}: the {split} split is empty ({path})")
    if path.suffix == ".jsonl":
        check_json_lines(path)  # a bad row is named (file, row) instead of a datasets traceback
    return datasets.load_dataset("json", data_files={split: str(path)}, split=split)


# -- validation -----------------------------------------------------------------------------------
def validate_split(dataset, task: TaskSpec, split: str) -> None:
    """Fail early, naming the problem: an empty split, missing columns, labels out of range.

    Raises:
        ValueError: the split cannot be trained or evaluated on.
    """
    if len(dataset) == 0:
        raise ValueError(f"task {task.name!r}: the {split} split is empty")
    missing = [c for c in task.columns if c not in dataset.column_names]
    if missing:
        raise ValueError(
            f"task {task.name!r}: the {split} split lacks column(s) {', '.join(missing)} "
            f"(has {', '.join(dataset.column_names)})"
        )
    labels = list(dataset["label"])
    if task.problem == "regression":
        bad = [x for x in labels if x is None or not math.isfinite(float(x))]
        if bad:
            raise ValueError(f"task {task.name!r}: {len(bad)} non-finite labels in the {split} split")
        return
    bad = [x for x in labels if x is None or float(x) != int(x) or not 0 <= int(x) < task.num_labels]
    if bad:
        raise ValueError(
            f"task {task.name!r}: {len(bad)} labels in the {split} split are outside "
            f"0..{task.num_labels - 1} (first: {bad[:3]}); labels: {', '.join(task.label_names)}"
        )


# -- subsets --------------------------------------------------------------------------------------
def subset(dataset, size: int, seed: int):
    """A fixed random subset of ``size`` rows (all rows when size is 0 or larger than the split)."""
    if size <= 0 or size >= len(dataset):
        return dataset
    return dataset.shuffle(seed=seed).select(range(size))


def few_shot(dataset, task: TaskSpec, k: int, seed: int):
    """k examples per class, seeded (the paper's few-shot setting); k in total for regression.

    Raises:
        ValueError: a class has fewer than k examples.
    """
    if task.problem == "regression":
        return subset(dataset, k, seed)
    shuffled = dataset.shuffle(seed=seed)
    labels = [int(x) for x in shuffled["label"]]
    picked: list[int] = []
    for label in range(task.num_labels):
        rows = [i for i, y in enumerate(labels) if y == label][:k]
        if len(rows) < k:
            raise ValueError(
                f"few-shot k={k}: class {task.label_names[label]!r} has only {len(rows)} examples"
            )
        picked += rows
    return shuffled.select(sorted(picked))


# -- tokenization and batching ----------------------------------------------------------------------
class EncodedDataset(Dataset):
    """Tokenized examples: dicts of input_ids, attention_mask, (token_type_ids), labels."""

    def __init__(self, features: list[dict[str, Any]]):
        self.features = features

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.features[index]


def encode(dataset, task: TaskSpec, tokenizer, max_length: int) -> EncodedDataset:
    """Tokenize the task's text column(s), truncated to ``max_length`` tokens, without padding."""
    texts = [list(dataset[c]) for c in task.text_columns]
    enc = tokenizer(*texts, truncation=True, max_length=max_length)
    cast = float if task.problem == "regression" else int
    labels = [cast(y) for y in list(dataset["label"])]
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
    return EncodedDataset(
        [{**{k: enc[k][i] for k in keys}, "labels": labels[i]} for i in range(len(labels))]
    )


@dataclass
class Collator:
    """Dynamic padding: pads each batch (on the right) to its longest sequence.

    Args:
        pad_token_id: id written into padded input positions.
        regression: float labels when true, else int64 class ids.
    """

    pad_token_id: int = 0
    regression: bool = False

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        length = max(len(f["input_ids"]) for f in features)
        batch: dict[str, torch.Tensor] = {}
        pads = {"input_ids": self.pad_token_id, "attention_mask": 0, "token_type_ids": 0}
        for key, pad in pads.items():
            if key in features[0]:
                rows = [list(f[key]) + [pad] * (length - len(f[key])) for f in features]
                batch[key] = torch.tensor(rows, dtype=torch.long)
        dtype = torch.float32 if self.regression else torch.long
        batch["labels"] = torch.tensor([f["labels"] for f in features], dtype=dtype)
        return batch


@dataclass
class DataInfo:
    """Where the data came from and how much of it is used (recorded in run_config.json)."""

    source: str
    train_size: int
    validation_size: int
    few_shot: int


@dataclass
class Loaders:
    train: DataLoader
    validation: DataLoader
    info: DataInfo


def load_task_data(
    task: TaskSpec,
    data_dir: str | os.PathLike | None = None,
    train_subset: int = 0,
    validation_subset: int = 0,
    few_shot_k: int = 0,
    data_seed: int = 0,
):
    """Load, validate and subsample the train and validation splits: (train, validation, info)."""
    splits = {s: load_split(task, s, data_dir) for s in SPLITS}
    for name, split in splits.items():
        validate_split(split, task, name)
    train = few_shot(splits["train"], task, few_shot_k, data_seed) if few_shot_k else subset(
        splits["train"], train_subset, data_seed
    )
    validation = subset(splits["validation"], validation_subset, data_seed)
    source = str(task_folder(data_dir, task)) if data_dir is not None else f"{HUB_DATASET}/{task.name}"
    return train, validation, DataInfo(source, len(train), len(validation), few_shot_k)


def make_loaders(
    task: TaskSpec,
    tokenizer,
    data_dir: str | os.PathLike | None = None,
    *,
    batch_size: int = 32,
    eval_batch_size: int = 64,
    max_length: int = 128,
    train_subset: int = 0,
    validation_subset: int = 0,
    few_shot_k: int = 0,
    data_seed: int = 0,
    seed: int = 0,
    world_size: int = 1,
    rank: int = 0,
) -> Loaders:
    """Train and validation loaders with dynamic padding.

    With ``world_size > 1`` the train loader shards the data with a ``DistributedSampler`` (each
    rank sees ``batch_size`` rows per step); every rank evaluates the whole validation split.
    """
    train, validation, info = load_task_data(
        task, data_dir, train_subset, validation_subset, few_shot_k, data_seed
    )
    collate = Collator(tokenizer.pad_token_id or 0, task.problem == "regression")
    train_set = encode(train, task, tokenizer, max_length)
    # Full batches only (equal work per step on every rank), unless the data is smaller than one.
    drop_last = len(train_set) >= batch_size * world_size
    if world_size > 1:
        sampler = DistributedSampler(train_set, world_size, rank, shuffle=True, seed=seed, drop_last=True)
    else:
        sampler = torch.utils.data.RandomSampler(train_set, generator=torch.Generator().manual_seed(seed))
    train_loader = DataLoader(train_set, batch_size, sampler=sampler, collate_fn=collate, drop_last=drop_last)
    val_loader = eval_loader(validation, task, tokenizer, max_length, eval_batch_size)
    return Loaders(train_loader, val_loader, info)


def eval_loader(dataset, task: TaskSpec, tokenizer, max_length: int = 128, batch_size: int = 64) -> DataLoader:
    """A loader over a (validated) split in its stored order, with dynamic padding."""
    collate = Collator(tokenizer.pad_token_id or 0, task.problem == "regression")
    return DataLoader(encode(dataset, task, tokenizer, max_length), batch_size, collate_fn=collate)


def load_validation(task: TaskSpec, data_dir: str | os.PathLike | None = None, size: int = 0, data_seed: int = 0):
    """The validated validation split, or its fixed random subset of ``size`` rows."""
    validation = load_split(task, "validation", data_dir)
    validate_split(validation, task, "validation")
    return subset(validation, size, data_seed)

"""The multi-task engine: one frozen backbone, many attached task adapters, mixed-task batches.

Attached tasks (read by ``task_folders``, checked by ``compatibility``) stay in an LRU of at most
``capacity`` (``residency``). A batch whose rows belong to different tasks is one forward pass: the
``banks`` hold every resident task in a slot and ``with banks.routing(slots)`` routes each row.
Generation tasks decode mixed-task batches the same way, every step of ``generate`` a routed pass
(``decoding``). Requests are encoded and answers formatted by ``codec``.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adamix_zoo.backbones import fingerprint as backbone_fingerprint
from adamix_zoo.serving.banks import TaskBanks
from adamix_zoo.serving.codec import (
    Generated,
    GenerationRow,
    Prediction,
    RequestCodec,
    TextInput,
    answer,
    position_limit,
)
from adamix_zoo.serving.compatibility import can_generate, check_adapter, check_columns, input_columns
from adamix_zoo.serving.decoding import decode_group, group_by_settings, resolve_dtype
from adamix_zoo.serving.errors import (
    FingerprintMismatchError,
    InputError,
    ServerFaultError,
    TaskExistsError,
    UnknownTaskError,
)
from adamix_zoo.serving.residency import TaskCache, TaskInfo, capacity_groups
from adamix_zoo.serving.task_folders import TaskAdapter, read_metadata, read_task_adapter, task_heads


class ServingEngine:
    """Serve many tasks' merged adapters from one frozen backbone.

    Args:
        backbone: a bare transformers encoder (``AutoModel``) for classification tasks, or a causal
            LM (``AutoModelForCausalLM``) for generation tasks; frozen and shared by all tasks.
        tokenizer: its tokenizer (needed by ``encode`` / ``predict`` / ``generate``).
        capacity: the most adapters kept in memory; others reload from their folder on demand.
        max_length: the most tokens an input may have (default: the model's position limit).
        max_chars: the most characters an input may have (checked before tokenizing).
        backbone_id: a name reported by the server (alias, path or hub id).
        dtype: what the backbone and the adapter banks compute in (``float32``, ``bfloat16`` or
            ``auto``, see ``decoding.resolve_dtype``); answers are float32 either way.
    """

    def __init__(
        self,
        backbone: nn.Module,
        tokenizer: Any = None,
        capacity: int = 8,
        max_length: int | None = None,
        max_chars: int = 20_000,
        backbone_id: str = "",
        dtype: str = "float32",
    ) -> None:
        self.backbone = backbone.eval().requires_grad_(False)
        self.backbone_id = backbone_id
        self.fingerprint = backbone_fingerprint(backbone)  # of the weights as trained (float32)
        self.dtype = resolve_dtype(dtype, next(backbone.parameters()).device)
        self.backbone.to(self.dtype)  # the banks are stacked in the backbone's dtype
        self.codec = RequestCodec(tokenizer, max_length or position_limit(backbone, tokenizer), max_chars)
        self._banks = TaskBanks(self.backbone)
        self._cache = TaskCache(capacity, self._check, self._banks.restack)
        self._lock = threading.RLock()
        self._columns: dict[str, int | None] = {}  # texts per input of a task, when known

    @classmethod
    def from_pretrained(
        cls, name: str, device: str | None = None, lm: bool = False, **kwargs: Any
    ) -> ServingEngine:
        """Load a backbone (an alias such as ``minilm-l6``, a folder or a hub id) and its tokenizer.

        ``lm=True`` loads it as a causal LM (with its output layer) to serve generation tasks.
        """
        from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

        from adamix_zoo.backbones import resolve_backbone

        path = resolve_backbone(name)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        model = (AutoModelForCausalLM if lm else AutoModel).from_pretrained(path).to(device)
        tokenizer = AutoTokenizer.from_pretrained(path)
        if tokenizer.pad_token is None:  # decoder tokenizers often have none; generation pads left
            tokenizer.pad_token = tokenizer.eos_token
        return cls(model, tokenizer, backbone_id=name, **kwargs)

    @property
    def tokenizer(self) -> Any:
        return self.codec.tokenizer

    @property
    def max_length(self) -> int:
        return self.codec.max_length

    @property
    def capacity(self) -> int:
        return self._cache.capacity

    @property
    def can_generate(self) -> bool:
        """Whether the backbone is a causal LM with an output layer (needed by ``generate``)."""
        return can_generate(self.backbone)

    # -- attaching -----------------------------------------------------------------------------------
    def attach(
        self,
        folder: str | Path,
        task: str | None = None,
        label_names: list[str] | None = None,
        head: str | None = None,
        replace: bool = True,
    ) -> TaskInfo:
        """Attach (or replace) a task from its merged folder; it becomes the most recently used.

        Args:
            folder: a merged task folder or registry entry folder (see ``read_task_adapter``).
            task: the name to serve it under (default from its metadata, else the folder name).
            label_names: class names in head order (default from its metadata).
            head: which head of a cross-task merged entry with several.

        Raises:
            ValueError: unreadable folder, a base-model fingerprint that is not this backbone's, or
                tensors that do not fit the backbone's projections.
            TaskExistsError: ``replace=False`` and a task of that name is already attached.
        """
        adapter = read_task_adapter(folder, task, label_names, head)
        if not replace and adapter.task in self._cache:
            raise TaskExistsError(f"task {adapter.task!r} is already served; send replace=true to replace it")
        self._check(adapter)
        with self._lock:
            self._cache.add(adapter, Path(folder), label_names, head)
            self._columns[adapter.task] = input_columns(adapter)
            return self._cache.info(adapter.task)

    def attach_all(
        self,
        folder: str | Path,
        task: str | None = None,
        label_names: list[str] | None = None,
        head: str | None = None,
        replace: bool = True,
    ) -> list[TaskInfo]:
        """Attach a folder; a cross-task merged entry without ``head`` attaches one task per head.

        Raises:
            ValueError: as ``attach``; or ``task``/``label_names`` given for several heads at once.
        """
        heads = task_heads(read_metadata(Path(folder)))
        if head is not None or len(heads) <= 1:
            return [self.attach(folder, task, label_names, head, replace)]
        if task is not None or label_names is not None:
            raise ValueError(
                f"{folder} has several heads {sorted(heads)}: choose one with head= to name it"
            )
        return [self.attach(folder, head=name, replace=replace) for name in heads]

    def detach(self, task: str) -> None:
        """Forget a task (its folder is left alone). Raises UnknownTaskError if it is not attached."""
        with self._lock:
            self._cache.remove(task)

    def tasks(self) -> list[TaskInfo]:
        with self._lock:
            return [self._cache.info(t) for t in self._cache.names()]

    def task_names(self) -> list[str]:
        return self._cache.names()

    def has_task(self, task: str) -> bool:
        return task in self._cache

    def resident_tasks(self) -> list[str]:
        """Tasks in memory, least recently used first."""
        return self._cache.resident()

    def generates(self, task: str) -> bool:
        """Whether ``task`` is a generation task. Raises UnknownTaskError if it is not attached."""
        return self._cache.prompt_template(task) is not None

    def _check(self, adapter: TaskAdapter) -> None:
        check_adapter(adapter, self.backbone, self.fingerprint, self._banks.projection)

    # -- classification and regression ---------------------------------------------------------------
    @torch.inference_mode()
    def forward(
        self, tasks: Sequence[str | None], batch: dict[str, torch.Tensor]
    ) -> tuple[list[torch.Tensor | None], torch.Tensor, list[TaskAdapter | None]]:
        """One mixed-task pass per group of at most ``capacity`` distinct tasks (normally one).

        Args:
            tasks: the task of each row; None runs the backbone alone for that row.
            batch: tokenized tensors (input_ids, attention_mask, optional token_type_ids), (B, T).

        Returns:
            per-row logits ((num_labels,) tensors; None for backbone-only rows), the mean-pooled
            token states (B, d), and the adapter each row used (its version and label names).
        """
        if len(tasks) != batch["input_ids"].shape[0]:
            raise InputError(f"{len(tasks)} tasks for {batch['input_ids'].shape[0]} rows")
        with self._lock:
            for task in {t for t in tasks if t is not None}:
                if self.generates(task):
                    raise InputError(f"task {task!r} generates text: use generate (POST /v1/generate)")
            logits: list[torch.Tensor | None] = [None] * len(tasks)
            used: list[TaskAdapter | None] = [None] * len(tasks)
            pooled = torch.empty(len(tasks), 0)
            for rows in capacity_groups(tasks, self.capacity):
                sub = batch if len(rows) == len(tasks) else {k: v[rows] for k, v in batch.items()}
                group_logits, group_pooled = self._forward_group([tasks[i] for i in rows], sub)
                if pooled.shape[1] == 0:
                    pooled = group_pooled.new_empty(len(tasks), group_pooled.shape[1])
                pooled[rows] = group_pooled
                for j, i in enumerate(rows):
                    task = tasks[i]
                    if task is not None:
                        used[i] = self._cache.adapter(task)
                        logits[i] = group_logits[j, : used[i].num_labels]
            return logits, pooled, used

    def _forward_group(
        self, tasks: list[str | None], batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        slots = self._resident(tasks)
        batch = {k: v.to(self._banks.device) for k, v in batch.items()}
        with self._banks.routing(slots):  # base_model: the encoder, or a causal LM's body
            hidden = getattr(self.backbone, "base_model", self.backbone)(**batch).last_hidden_state
        return self._banks.apply_heads(hidden, batch["attention_mask"], slots)

    def encode(self, inputs: Sequence[TextInput], task: str | None = None) -> list[dict[str, list[int]]]:
        """Tokenize inputs (see ``RequestCodec.encode``; InputError names a refused input, e.g. a
        lone sentence for a pair ``task``)."""
        check_columns(task, self._columns.get(task), list(inputs))
        return self.codec.encode(inputs)

    def collate(self, rows: Sequence[dict[str, list[int]]], left: bool | None = None) -> dict[str, torch.Tensor]:
        """Pad encoded rows into one batch of tensors (see ``RequestCodec.collate``)."""
        return self.codec.collate(rows, left)

    def predict_encoded(
        self, tasks: Sequence[str | None], rows: Sequence[dict[str, list[int]]]
    ) -> list[Prediction]:
        """Answer already-encoded rows (what the server's batch worker calls)."""
        logits, pooled, used = self.forward(tasks, self.collate(rows))
        return [answer(lg, emb, a) for lg, emb, a in zip(logits, pooled, used)]

    def predict(
        self, tasks: Sequence[str | None] | str | None, inputs: Sequence[TextInput]
    ) -> list[Prediction]:
        """Answer inputs; ``tasks`` is one task for all inputs or one per input (None: backbone alone)."""
        if tasks is None or isinstance(tasks, str):
            tasks = [tasks] * len(inputs)
        return self.predict_encoded(tasks, self.encode(inputs))

    # -- generation ----------------------------------------------------------------------------------
    def encode_prompts(
        self,
        tasks: Sequence[str | None],
        inputs: Sequence[str],
        max_new_tokens: int = 64,
        num_beams: int = 1,
    ) -> list[GenerationRow]:
        """Build each input's prompt (its task's ``prompt_template``; the raw text for None) and
        tokenize it.

        Raises:
            InputError: a backbone that cannot generate, a classification task, settings out of
                range, an input that is not a non-empty string, or a prompt plus ``max_new_tokens``
                longer than ``max_length``.
            UnknownTaskError: a task that is not attached.
        """
        if not self.can_generate:
            raise InputError(
                "this backbone has no language-model head, so it cannot generate (serve --lm)"
            )
        template_of = self._cache.prompt_template
        return self.codec.encode_prompts(tasks, inputs, template_of, max_new_tokens, num_beams)

    @torch.inference_mode()
    def generate_encoded(
        self, tasks: Sequence[str | None], rows: Sequence[GenerationRow]
    ) -> list[Generated]:
        """New tokens per row (what the server's generation batch worker calls).

        Rows with the same settings decode together, whatever their tasks: one ``generate`` per
        group of settings (and of at most ``capacity`` distinct tasks).
        """
        if len(tasks) != len(rows):
            raise InputError(f"{len(tasks)} tasks for {len(rows)} rows")
        out: list[Generated | None] = [None] * len(rows)
        with self._lock:
            for members in group_by_settings(rows).values():
                for group in capacity_groups([tasks[i] for i in members], self.capacity):
                    picked = [members[j] for j in group]
                    ids = self._generate_group([tasks[i] for i in picked], [rows[i] for i in picked])
                    for i, new in zip(picked, ids):
                        version = None if tasks[i] is None else self._cache.adapter(tasks[i]).version
                        out[i] = Generated(tasks[i], version, new)
        return out

    def _generate_group(self, tasks: list[str | None], rows: list[GenerationRow]) -> list[list[int]]:
        slots = self._resident(tasks)
        encoded = [{"input_ids": r.input_ids, "attention_mask": [1] * len(r.input_ids)} for r in rows]
        batch = {k: v.to(self._banks.device) for k, v in self.collate(encoded, left=True).items()}
        # generate() repeats every row num_beams times in place (row i -> rows i*n .. i*n+n-1) and
        # keeps beams within their row's block, so the routing repeats each slot the same way.
        with self._banks.routing([s for s in slots for _ in range(rows[0].num_beams)]):
            return decode_group(self.backbone, batch, self.tokenizer, rows)

    def _resident(self, tasks: list[str | None]) -> list[int]:
        """Bank slots of ``tasks``, reloading evicted adapters; a reload failure is the server's."""
        try:
            return self._cache.make_resident(tasks)
        except UnknownTaskError:
            raise
        except Exception as err:  # noqa: BLE001 - a folder changed or broke under a served task
            raise ServerFaultError(f"an attached adapter could not be reloaded: {err}") from err

    def decode(self, generated: Sequence[Generated]) -> list[str]:
        """Token ids -> text; a task's output is its first line (data-to-text targets are one line)."""
        return self.codec.decode(generated)

    def generate(
        self,
        tasks: Sequence[str | None] | str | None,
        inputs: Sequence[str],
        max_new_tokens: int = 64,
        num_beams: int = 1,
    ) -> list[str]:
        """Generate for inputs; ``tasks`` is one task for all or one per input (None: backbone)."""
        if tasks is None or isinstance(tasks, str):
            tasks = [tasks] * len(inputs)
        rows = self.encode_prompts(tasks, inputs, max_new_tokens, num_beams)
        return self.decode(self.generate_encoded(tasks, rows))


__all__ = ["FingerprintMismatchError", "Generated", "GenerationRow", "InputError", "Prediction", "ServingEngine",
           "TaskInfo", "UnknownTaskError"]  # fmt: skip

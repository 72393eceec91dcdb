"""The multi-task engine: one frozen backbone, many attached task adapters, mixed-task batches.

Tasks are attached from their merged folders; at most ``capacity`` stay in memory (least recently
used first out) and evicted ones reload from their folder on demand. A batch whose rows belong to
different tasks runs as one forward pass: the projections hold every resident task's adapter in a
slot (see ``layers``), the engine tells them each row's slot, and the heads are gathered per row.
On a causal LM backbone, generation tasks (adapters without a head) decode mixed-task batches the
same way: every step of ``generate`` is a forward pass whose rows keep their task's slot.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adamix_zoo.backbones import fingerprint as backbone_fingerprint
from adamix_zoo.generation.generate import first_line, generate_ids
from adamix_zoo.methods.adapter import ACTIVATIONS
from adamix_zoo.methods.lora import linear_dims
from adamix_zoo.serving.adapters import (
    TaskAdapter,
    check_task_name,
    read_metadata,
    read_task_adapter,
    task_heads,
)
from adamix_zoo.serving.layers import (
    BottleneckBank,
    HeadBank,
    LoRABank,
    MultiTaskLayer,
    RoutingHolder,
    RowRouting,
)

TextInput = str | tuple[str, str]
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


class UnknownTaskError(KeyError):
    """A request names a task that is not attached."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0])


class FingerprintMismatchError(ValueError):
    """An adapter was trained on other base weights than this backbone's."""


class InputError(ValueError):
    """A request input the engine refuses (too long, empty, wrong shape, wrong kind of task)."""


MAX_BEAMS = 8  # beams per generation request: each multiplies the rows of every decoding step


@dataclass(frozen=True)
class TaskInfo:
    """What ``tasks()`` reports about an attached task."""

    task: str
    kind: str
    problem: str  # classification, regression or lm (generation)
    version: str
    num_labels: int
    label_names: list[str] | None
    source: str
    resident: bool
    base_model: str | None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class Prediction:
    """One row's answer: a label and its probability (classification) or a value (regression).

    Backbone-only rows (task None) carry the mean-pooled sentence embedding instead.
    """

    task: str | None
    version: str | None
    label: str | None = None
    score: float | None = None
    scores: dict[str, float] | None = None
    embedding: list[float] | None = None


@dataclass
class Generated:
    """One row's generation: the new token ids and the adapter version that produced them."""

    task: str | None
    version: str | None
    token_ids: list[int]


@dataclass(frozen=True)
class GenerationRow:
    """One encoded prompt and how to continue it (rows with equal settings share a ``generate``)."""

    input_ids: list[int]
    max_new_tokens: int
    num_beams: int


@dataclass
class _Source:
    """Where an attached task reloads from after eviction, and what requests need before that."""

    folder: Path
    label_names: list[str] | None
    head: str | None
    prompt_template: str | None  # None: a classification or regression task

    def read(self, task: str) -> TaskAdapter:
        return read_task_adapter(self.folder, task, self.label_names, self.head)


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
    """

    def __init__(
        self,
        backbone: nn.Module,
        tokenizer: Any = None,
        capacity: int = 8,
        max_length: int | None = None,
        max_chars: int = 20_000,
        backbone_id: str = "",
    ) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.backbone = backbone.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.capacity = capacity
        self.max_chars = max_chars
        self.max_length = max_length or _position_limit(backbone, tokenizer)
        self.backbone_id = backbone_id
        self.fingerprint = backbone_fingerprint(backbone)
        self._param = next(backbone.parameters())
        self._holder = RoutingHolder()
        self._layers: dict[str, MultiTaskLayer] = {}
        self._sources: dict[str, _Source] = {}
        self._resident: OrderedDict[str, TaskAdapter] = OrderedDict()
        self._slots: dict[str, int] = {}
        self._heads: HeadBank | None = None
        self._lock = threading.RLock()

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
    def can_generate(self) -> bool:
        """Whether the backbone is a causal LM with an output layer (needed by ``generate``)."""
        can = getattr(self.backbone, "can_generate", None)
        return bool(can and can())

    # -- attaching -----------------------------------------------------------------------------------
    def attach(
        self,
        folder: str | Path,
        task: str | None = None,
        label_names: list[str] | None = None,
        head: str | None = None,
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
        """
        adapter = read_task_adapter(folder, task, label_names, head)
        self._check(adapter)
        with self._lock:
            self._sources[adapter.task] = _Source(
                Path(folder), label_names, head, adapter.prompt_template
            )
            self._resident[adapter.task] = adapter
            self._resident.move_to_end(adapter.task)
            self._evict(keep={adapter.task})
            self._rebuild()
            return self._info(adapter.task)

    def attach_all(
        self,
        folder: str | Path,
        task: str | None = None,
        label_names: list[str] | None = None,
        head: str | None = None,
    ) -> list[TaskInfo]:
        """Attach a folder; a cross-task merged entry without ``head`` attaches one task per head.

        Raises:
            ValueError: as ``attach``; or ``task``/``label_names`` given for several heads at once.
        """
        heads = task_heads(read_metadata(Path(folder)))
        if head is not None or len(heads) <= 1:
            return [self.attach(folder, task, label_names, head)]
        if task is not None or label_names is not None:
            raise ValueError(
                f"{folder} has several heads {sorted(heads)}: choose one with head= to name it"
            )
        return [self.attach(folder, head=name) for name in heads]

    def detach(self, task: str) -> None:
        """Forget a task (its folder is left alone). Raises UnknownTaskError if it is not attached."""
        with self._lock:
            if task not in self._sources:
                raise UnknownTaskError(f"task {task!r} is not attached")
            del self._sources[task]
            if self._resident.pop(task, None) is not None:
                self._rebuild()

    def tasks(self) -> list[TaskInfo]:
        with self._lock:
            return [self._info(t) for t in sorted(self._sources)]

    def task_names(self) -> list[str]:
        return sorted(self._sources)

    def has_task(self, task: str) -> bool:
        return task in self._sources

    def resident_tasks(self) -> list[str]:
        """Tasks in memory, least recently used first."""
        return list(self._resident)

    def _info(self, task: str) -> TaskInfo:
        adapter = self._resident.get(task)
        if adapter is None:  # evicted: describe it from its folder without keeping it
            adapter = self._sources[task].read(task)
        return TaskInfo(
            task=task,
            kind=adapter.kind,
            problem=adapter.problem,
            version=adapter.version,
            num_labels=adapter.num_labels,
            label_names=adapter.label_names,
            source=str(adapter.source),
            resident=task in self._resident,
            base_model=adapter.base_model_id,
        )

    def _check(self, adapter: TaskAdapter) -> None:
        """Refuse adapters trained on another backbone or shaped for other projections."""
        where = f"task {adapter.task!r} ({adapter.source})"
        if adapter.generates and not self.can_generate:
            raise ValueError(
                f"{where} is a generation task, but this backbone has no language-model head: "
                "load the backbone as a causal LM (serve --lm)"
            )
        if adapter.base_fingerprint and adapter.base_fingerprint != self.fingerprint:
            raise FingerprintMismatchError(
                f"{where} was trained on a base model with fingerprint {adapter.base_fingerprint}, "
                f"but this backbone's fingerprint is {self.fingerprint}"
            )
        if adapter.head is not None:
            hidden = getattr(
                getattr(self.backbone, "config", None), "hidden_size", adapter.head.hidden_size
            )
            if adapter.head.hidden_size != hidden:
                raise ValueError(
                    f"{where}: head expects hidden size {adapter.head.hidden_size}, "
                    f"backbone has {hidden}"
                )
        for name, lora in adapter.lora.items():
            d_in, d_out = self._dims(name, where)
            if lora.a.shape[1] != d_in or lora.b.shape[0] != d_out:
                raise ValueError(
                    f"{where}: LoRA on {name} has A {tuple(lora.a.shape)} / B {tuple(lora.b.shape)}, "
                    f"but the projection is {d_in} -> {d_out}"
                )
        for name, adp in adapter.bottleneck.items():
            _, d_out = self._dims(name, where)
            if adp.activation not in ACTIVATIONS:
                raise ValueError(
                    f"{where}: activation {adp.activation!r} is not one of {', '.join(ACTIVATIONS)}"
                )
            if adp.down_weight.shape[1] != d_out or adp.up_weight.shape[0] != d_out:
                raise ValueError(
                    f"{where}: adapter on {name} has down {tuple(adp.down_weight.shape)} / up "
                    f"{tuple(adp.up_weight.shape)}, but the projection's output has {d_out} features"
                )

    def _dims(self, name: str, where: str) -> tuple[int, int]:
        """(d_in, d_out) of the backbone projection ``name``; ValueError if it is none."""
        try:
            module = (
                self._layers[name].base_layer
                if name in self._layers
                else self.backbone.get_submodule(name)
            )
            d_in, d_out, _ = linear_dims(module)
        except AttributeError:
            raise ValueError(f"{where}: the backbone has no module {name!r}") from None
        except TypeError as err:
            raise ValueError(f"{where}: module {name!r} cannot hold an adapter: {err}") from None
        return d_in, d_out

    # -- residency and slots ---------------------------------------------------------------------
    def _evict(self, keep: set[str]) -> None:
        for task in list(self._resident):
            if len(self._resident) <= self.capacity:
                break
            if task not in keep:
                del self._resident[task]

    def _ensure_resident(self, tasks: set[str]) -> None:
        """Reload evicted tasks from their folders (evicting others); rebuild banks when it changes."""
        unknown = sorted(t for t in tasks if t not in self._sources)
        if unknown:
            raise UnknownTaskError(f"task {unknown[0]!r} is not attached")
        changed = False
        try:
            for task in tasks:
                if task not in self._resident:
                    adapter = self._sources[task].read(task)
                    self._check(adapter)
                    self._resident[task] = adapter
                    changed = True
                self._resident.move_to_end(task)
        finally:  # keep slots and banks consistent with what is resident, even after a failed reload
            if changed:
                self._evict(keep=tasks)
                self._rebuild()

    def _wrap(self, name: str) -> MultiTaskLayer:
        if name not in self._layers:
            parent_name, _, child = name.rpartition(".")
            parent = self.backbone.get_submodule(parent_name) if parent_name else self.backbone
            layer = MultiTaskLayer(getattr(parent, child), self._holder)
            setattr(parent, child, layer)
            self._layers[name] = layer
        return self._layers[name]

    def _rebuild(self) -> None:
        """Restack every projection's and head's tensors for the resident tasks (slot = order + 1)."""
        adapters = list(self._resident.values())
        self._slots = {a.task: i + 1 for i, a in enumerate(adapters)}
        for name in {n for a in adapters for n in a.modules}:
            self._wrap(name)
        like = self._param
        for name, layer in self._layers.items():
            layer.lora = _lora_bank(name, adapters, like)
            layer.bottlenecks = _bottleneck_banks(name, adapters, like)
        self._heads = _head_bank(adapters, like)

    # -- running -----------------------------------------------------------------------------------
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
            for rows in _groups(tasks, self.capacity):
                sub = batch if len(rows) == len(tasks) else {k: v[rows] for k, v in batch.items()}
                group_logits, group_pooled = self._forward_group([tasks[i] for i in rows], sub)
                if pooled.shape[1] == 0:
                    pooled = group_pooled.new_empty(len(tasks), group_pooled.shape[1])
                pooled[rows] = group_pooled
                for j, i in enumerate(rows):
                    task = tasks[i]
                    if task is not None:
                        used[i] = self._resident[task]
                        logits[i] = group_logits[j, : used[i].num_labels]
            return logits, pooled, used

    def _forward_group(
        self, tasks: list[str | None], batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self._ensure_resident({t for t in tasks if t is not None})
        slots = [0 if t is None else self._slots[t] for t in tasks]
        device = self._param.device
        batch = {k: v.to(device) for k, v in batch.items()}
        self._holder.current = RowRouting(slots, device)
        try:  # base_model: the encoder itself, or a causal LM's body without its output layer
            hidden = getattr(self.backbone, "base_model", self.backbone)(**batch).last_hidden_state
        finally:
            self._holder.current = None
        if self._heads is None:  # only backbone rows and nothing attached
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            return hidden.new_zeros(len(tasks), 1), (hidden * mask).sum(1) / mask.sum(1).clamp_min(
                1.0
            )
        uniform = slots[0] if all(s == slots[0] for s in slots) else None
        slot_tensor = torch.tensor(slots, device=device)
        return self._heads.apply(hidden, batch["attention_mask"], slot_tensor, uniform)

    # -- text in, answers out ------------------------------------------------------------------------
    def encode(self, inputs: Sequence[TextInput]) -> list[dict[str, list[int]]]:
        """Tokenize inputs (sentences or (text_a, text_b) pairs) without truncating.

        Raises:
            InputError: an input that is not a string or a pair of strings, is empty, has more than
                ``max_chars`` characters or more than ``max_length`` tokens (the message names it).
        """
        if self.tokenizer is None:
            raise RuntimeError("this engine has no tokenizer: pass one to tokenize text")
        for i, item in enumerate(inputs):
            parts = (item,) if isinstance(item, str) else tuple(item)
            if not 1 <= len(parts) <= 2 or not all(isinstance(p, str) for p in parts):
                raise InputError(
                    f"input {i} must be a string or a [text_a, text_b] pair of strings"
                )
            if not any(p.strip() for p in parts):
                raise InputError(f"input {i} is empty")
            chars = sum(len(p) for p in parts)
            if chars > self.max_chars:
                raise InputError(f"input {i} has {chars} characters; the limit is {self.max_chars}")
        texts = [item if isinstance(item, str) else tuple(item) for item in inputs]
        encoded = self.tokenizer(texts, truncation=False, padding=False)
        rows = [{k: encoded[k][i] for k in encoded} for i in range(len(texts))]
        for i, row in enumerate(rows):
            if len(row["input_ids"]) > self.max_length:
                raise InputError(
                    f"input {i} has {len(row['input_ids'])} tokens; the limit is {self.max_length}"
                )
        return rows

    def collate(
        self, rows: Sequence[dict[str, list[int]]], left: bool | None = None
    ) -> dict[str, torch.Tensor]:
        """Pad encoded rows into one batch of tensors (B, T), on the tokenizer's padding side
        unless ``left`` says which (generation pads left: decoders continue from the right end).

        Done here rather than with ``tokenizer.pad`` so that the batch thread never touches the
        (not thread-safe) Rust tokenizer that request handlers use to encode.
        """
        width = max(len(r["input_ids"]) for r in rows)
        pad_id = getattr(self.tokenizer, "pad_token_id", None) or 0
        if left is None:
            left = getattr(self.tokenizer, "padding_side", "right") == "left"
        out: dict[str, torch.Tensor] = {}
        for key in (k for k in MODEL_INPUTS if k in rows[0]):
            fill = pad_id if key == "input_ids" else 0
            padded = [
                ([fill] * (width - len(r[key])) + list(r[key]))
                if left
                else (list(r[key]) + [fill] * (width - len(r[key])))
                for r in rows
            ]
            out[key] = torch.tensor(padded, dtype=torch.long)
        return out

    def predict_encoded(
        self, tasks: Sequence[str | None], rows: Sequence[dict[str, list[int]]]
    ) -> list[Prediction]:
        """Answer already-encoded rows (what the server's batch worker calls)."""
        logits, pooled, used = self.forward(tasks, self.collate(rows))
        return [_answer(lg, emb, a) for lg, emb, a in zip(logits, pooled, used)]

    def predict(
        self, tasks: Sequence[str | None] | str | None, inputs: Sequence[TextInput]
    ) -> list[Prediction]:
        """Answer inputs; ``tasks`` is one task for all inputs or one per input (None: backbone alone)."""
        if tasks is None or isinstance(tasks, str):
            tasks = [tasks] * len(inputs)
        return self.predict_encoded(tasks, self.encode(inputs))

    # -- generation ----------------------------------------------------------------------------------
    def generates(self, task: str) -> bool:
        """Whether ``task`` is a generation task. Raises UnknownTaskError if it is not attached."""
        return self._source(task).prompt_template is not None

    def _source(self, task: str) -> _Source:
        try:
            return self._sources[task]
        except KeyError:
            raise UnknownTaskError(f"task {task!r} is not attached") from None

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
        if self.tokenizer is None:
            raise RuntimeError("this engine has no tokenizer: pass one to tokenize text")
        if not 1 <= max_new_tokens < self.max_length:
            raise InputError(f"max_new_tokens must be in 1..{self.max_length - 1}, got {max_new_tokens}")
        if not 1 <= num_beams <= MAX_BEAMS:
            raise InputError(f"num_beams must be in 1..{MAX_BEAMS}, got {num_beams}")
        if len(tasks) != len(inputs):
            raise InputError(f"{len(tasks)} tasks for {len(inputs)} inputs")
        prompts = []
        for i, (task, text) in enumerate(zip(tasks, inputs)):
            template = "{source}" if task is None else self._source(task).prompt_template
            if template is None:
                raise InputError(f"task {task!r} is a classification task: use predict")
            if not isinstance(text, str) or not text.strip():
                raise InputError(f"input {i} must be a non-empty string")
            if len(text) > self.max_chars:
                raise InputError(f"input {i} has {len(text)} characters; the limit is {self.max_chars}")
            prompts.append(template.format(source=text))
        encoded = self.tokenizer(prompts, add_special_tokens=False)["input_ids"]
        for i, ids in enumerate(encoded):
            if len(ids) + max_new_tokens > self.max_length:
                raise InputError(
                    f"input {i} has {len(ids)} prompt tokens; with max_new_tokens={max_new_tokens} "
                    f"that exceeds the limit of {self.max_length}"
                )
        return [GenerationRow(list(ids), max_new_tokens, num_beams) for ids in encoded]

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
        by_settings: dict[tuple[int, int], list[int]] = {}
        for i, row in enumerate(rows):
            by_settings.setdefault((row.max_new_tokens, row.num_beams), []).append(i)
        with self._lock:
            for (max_new_tokens, num_beams), members in by_settings.items():
                for group in _groups([tasks[i] for i in members], self.capacity):
                    picked = [members[j] for j in group]
                    ids = self._generate_group(
                        [tasks[i] for i in picked],
                        [rows[i].input_ids for i in picked],
                        max_new_tokens,
                        num_beams,
                    )
                    for i, new in zip(picked, ids):
                        version = None if tasks[i] is None else self._resident[tasks[i]].version
                        out[i] = Generated(tasks[i], version, new)
        return out

    def _generate_group(
        self, tasks: list[str | None], prompts: list[list[int]], max_new_tokens: int, num_beams: int
    ) -> list[list[int]]:
        self._ensure_resident({t for t in tasks if t is not None})
        slots = [0 if t is None else self._slots[t] for t in tasks]
        device = self._param.device
        rows = [{"input_ids": p, "attention_mask": [1] * len(p)} for p in prompts]
        batch = {k: v.to(device) for k, v in self.collate(rows, left=True).items()}
        # generate() repeats every row num_beams times in place (row i -> rows i*n .. i*n+n-1) and
        # keeps beams within their row's block, so the routing repeats each slot the same way.
        self._holder.current = RowRouting([s for s in slots for _ in range(num_beams)], device)
        try:
            return generate_ids(
                self.backbone,
                batch,
                self.tokenizer.pad_token_id,
                self.tokenizer.eos_token_id,
                max_new_tokens,
                num_beams,
            )
        finally:
            self._holder.current = None

    def decode(self, generated: Sequence[Generated]) -> list[str]:
        """Token ids -> text; a task's output is its first line (data-to-text targets are one line)."""
        texts = self.tokenizer.batch_decode([g.token_ids for g in generated], skip_special_tokens=True)
        return [t.strip() if g.task is None else first_line(t) for g, t in zip(generated, texts)]

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


def _answer(
    logits: torch.Tensor | None, pooled: torch.Tensor, adapter: TaskAdapter | None
) -> Prediction:
    """Logits -> label + probabilities (classification) or value (regression); embedding if no task."""
    if adapter is None or logits is None:
        return Prediction(task=None, version=None, embedding=pooled.float().cpu().tolist())
    if adapter.is_regression:
        return Prediction(task=adapter.task, version=adapter.version, score=float(logits[0]))
    probs = torch.softmax(logits.float(), dim=-1).cpu().tolist()
    names = adapter.label_names or [f"LABEL_{i}" for i in range(len(probs))]
    best = max(range(len(probs)), key=probs.__getitem__)
    return Prediction(
        task=adapter.task,
        version=adapter.version,
        label=names[best],
        score=probs[best],
        scores=dict(zip(names, probs)),
    )


# -- stacking helpers ---------------------------------------------------------------------------------
def _position_limit(backbone: nn.Module, tokenizer: Any) -> int:
    limit = getattr(getattr(backbone, "config", None), "max_position_embeddings", None) or 512
    model_max = getattr(tokenizer, "model_max_length", None)
    return min(limit, model_max) if isinstance(model_max, int) and model_max > 0 else limit


def _groups(tasks: Sequence[str | None], capacity: int) -> list[list[int]]:
    """Row indices split so each group names at most ``capacity`` distinct tasks (normally one group)."""
    distinct = list(dict.fromkeys(t for t in tasks if t is not None))
    if len(distinct) <= capacity:
        return [list(range(len(tasks)))]
    chunk_of = {t: i // capacity for i, t in enumerate(distinct)}
    groups: list[list[int]] = [[] for _ in range(max(chunk_of.values()) + 1)]
    for i, task in enumerate(tasks):
        groups[chunk_of[task] if task is not None else 0].append(i)
    return groups


def _zeros(n: int, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    return torch.zeros((n, *shape), dtype=like.dtype, device=like.device)


def _lora_bank(name: str, adapters: list[TaskAdapter], like: torch.Tensor) -> LoRABank | None:
    users = [(i + 1, a.lora[name]) for i, a in enumerate(adapters) if name in a.lora]
    if not users:
        return None
    rank = max(w.a.shape[0] for _, w in users)
    d_in, d_out = users[0][1].a.shape[1], users[0][1].b.shape[0]
    a, b = (
        _zeros(len(adapters) + 1, (rank, d_in), like),
        _zeros(len(adapters) + 1, (d_out, rank), like),
    )
    for slot, w in users:  # zero-padded to the largest rank; the scale is folded into B
        a[slot, : w.a.shape[0]] = w.a
        b[slot, :, : w.b.shape[1]] = w.b * w.scale
    return LoRABank(a, b, frozenset(slot for slot, _ in users))


def _bottleneck_banks(
    name: str, adapters: list[TaskAdapter], like: torch.Tensor
) -> list[BottleneckBank]:
    by_act: dict[str, list] = {}
    for i, a in enumerate(adapters):
        if name in a.bottleneck:
            by_act.setdefault(a.bottleneck[name].activation, []).append((i + 1, a.bottleneck[name]))
    banks = []
    n = len(adapters) + 1
    for activation, users in by_act.items():
        m = max(w.down_weight.shape[0] for _, w in users)
        d = users[0][1].down_weight.shape[1]
        dw, db, uw, ub = (
            _zeros(n, (m, d), like),
            _zeros(n, (m,), like),
            _zeros(n, (d, m), like),
            _zeros(n, (d,), like),
        )
        for slot, w in users:  # zero-padded bottleneck: act(0) = 0 for every supported activation
            k = w.down_weight.shape[0]
            dw[slot, :k], db[slot, :k] = w.down_weight, w.down_bias
            uw[slot, :, :k], ub[slot] = w.up_weight, w.up_bias
        banks.append(BottleneckBank(dw, db, uw, ub, activation, frozenset(s for s, _ in users)))
    return banks


def _head_bank(adapters: list[TaskAdapter], like: torch.Tensor) -> HeadBank | None:
    """Every resident classification task's head by slot (generation tasks' slots stay zero)."""
    with_head = [a for a in adapters if a.head is not None]
    if not with_head:
        return None
    labels = max(a.num_labels for a in with_head)
    d = with_head[0].head.hidden_size
    n = len(adapters) + 1
    weight, bias = _zeros(n, (labels, d), like), _zeros(n, (labels,), like)
    cls = torch.zeros(n, dtype=torch.bool, device=like.device)
    for slot, a in enumerate(adapters, start=1):
        if a.head is None:
            continue
        linear = a.head.classifier
        weight[slot, : a.head.num_labels] = linear.weight.detach()
        bias[slot, : a.head.num_labels] = linear.bias.detach()
        cls[slot] = a.head.pooling == "cls"
    return HeadBank(weight, bias, cls, [0] + [a.num_labels for a in adapters])


__all__ = [
    "FingerprintMismatchError",
    "Generated",
    "GenerationRow",
    "InputError",
    "Prediction",
    "ServingEngine",
    "TaskInfo",
    "UnknownTaskError",
    "check_task_name",
]

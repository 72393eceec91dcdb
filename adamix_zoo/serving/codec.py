"""Requests in, answers out: validate and tokenize inputs, pad rows into batches, format answers.

``RequestCodec`` runs in request handlers (``encode`` / ``encode_prompts``: a bad input is refused
before it joins a batch) and in the batch thread (``collate``, which never touches the tokenizer).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from adamix_zoo.generation.generate import first_line
from adamix_zoo.serving.errors import InputError
from adamix_zoo.serving.task_folders import TaskAdapter

TextInput = str | tuple[str, str]
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
MAX_BEAMS = 8  # beams per generation request: each multiplies the rows of every decoding step


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
    temperature: float = 0.0  # 0: greedy (or beam search); > 0: sampling
    top_p: float = 1.0
    seed: int | None = None
    # Called from the batch thread with each new token id as it is decoded (streaming); not a setting.
    on_token: Callable[[int], None] | None = field(default=None, compare=False, repr=False)

    @property
    def settings(self) -> tuple:
        """What rows must share to decode in one ``generate`` call."""
        return (self.max_new_tokens, self.num_beams, self.temperature, self.top_p, self.seed)


def position_limit(backbone: nn.Module, tokenizer: Any) -> int:
    """The most tokens the backbone (and the tokenizer, when it says) takes; 512 if neither says."""
    limit = getattr(getattr(backbone, "config", None), "max_position_embeddings", None) or 512
    model_max = getattr(tokenizer, "model_max_length", None)
    return min(limit, model_max) if isinstance(model_max, int) and model_max > 0 else limit


class RequestCodec:
    """Encode requests and decode answers under the engine's input limits.

    Args:
        tokenizer: the backbone's tokenizer (None: only pre-encoded rows can be served).
        max_length: the most tokens an input (a prompt plus its new tokens) may have.
        max_chars: the most characters an input may have (checked before tokenizing).
    """

    def __init__(self, tokenizer: Any, max_length: int, max_chars: int) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.max_chars = max_chars

    def encode(self, inputs: Sequence[TextInput]) -> list[dict[str, list[int]]]:
        """Tokenize inputs (sentences or (text_a, text_b) pairs) without truncating.

        Raises:
            InputError: an input that is not a string or a pair of strings, is empty, has more than
                ``max_chars`` characters or more than ``max_length`` tokens (the message names it).
        """
        tokenizer = self._tokenizer()
        for i, item in enumerate(inputs):
            parts = (item,) if isinstance(item, str) else tuple(item)
            if not 1 <= len(parts) <= 2 or not all(isinstance(p, str) for p in parts):
                raise InputError(
                    f"input {i} must be a string or a [text_a, text_b] pair of strings"
                )
            if not any(p.strip() for p in parts):
                raise InputError(f"input {i} is empty")
            self._check_chars(i, sum(len(p) for p in parts))
            _check_unicode(i, parts)
        texts = [item if isinstance(item, str) else tuple(item) for item in inputs]
        encoded = tokenizer(texts, truncation=False, padding=False)
        rows = [{k: encoded[k][i] for k in encoded} for i in range(len(texts))]
        for i, row in enumerate(rows):
            if len(row["input_ids"]) > self.max_length:
                raise InputError(
                    f"input {i} has {len(row['input_ids'])} tokens; the limit is {self.max_length}"
                )
        return rows

    def encode_prompts(
        self,
        tasks: Sequence[str | None],
        inputs: Sequence[str],
        template_of: Callable[[str], str | None],
        max_new_tokens: int,
        num_beams: int,
    ) -> list[GenerationRow]:
        """Build each input's prompt (``template_of(task)``; the raw text for None) and tokenize it.

        Raises:
            InputError: a classification task (template None), settings out of range, an input that
                is not a non-empty string, or a prompt plus ``max_new_tokens`` longer than
                ``max_length``.
        """
        tokenizer = self._tokenizer()
        if not 1 <= max_new_tokens < self.max_length:
            raise InputError(f"max_new_tokens must be in 1..{self.max_length - 1}, got {max_new_tokens}")
        if not 1 <= num_beams <= MAX_BEAMS:
            raise InputError(f"num_beams must be in 1..{MAX_BEAMS}, got {num_beams}")
        if len(tasks) != len(inputs):
            raise InputError(f"{len(tasks)} tasks for {len(inputs)} inputs")
        prompts = []
        for i, (task, text) in enumerate(zip(tasks, inputs)):
            template = "{source}" if task is None else template_of(task)
            if template is None:
                raise InputError(f"task {task!r} is a classification task: use predict")
            if not isinstance(text, str) or not text.strip():
                raise InputError(f"input {i} must be a non-empty string")
            self._check_chars(i, len(text))
            _check_unicode(i, (text,))
            prompts.append(template.format(source=text))
        encoded = tokenizer(prompts, add_special_tokens=False)["input_ids"]
        for i, ids in enumerate(encoded):
            if len(ids) + max_new_tokens > self.max_length:
                raise InputError(
                    f"input {i} has {len(ids)} prompt tokens; with max_new_tokens={max_new_tokens} "
                    f"that exceeds the limit of {self.max_length}"
                )
        return [GenerationRow(list(ids), max_new_tokens, num_beams) for ids in encoded]

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

    def decode(self, generated: Sequence[Generated]) -> list[str]:
        """Token ids -> text; a task's output is its first line (data-to-text targets are one line)."""
        texts = self._tokenizer().batch_decode(
            [g.token_ids for g in generated], skip_special_tokens=True
        )
        return [t.strip() if g.task is None else first_line(t) for g, t in zip(generated, texts)]

    def _tokenizer(self) -> Any:
        if self.tokenizer is None:
            raise RuntimeError("this engine has no tokenizer: pass one to tokenize text")
        return self.tokenizer

    def _check_chars(self, i: int, chars: int) -> None:
        """Refuse input ``i`` when it has more than ``max_chars`` characters (before tokenizing)."""
        if chars > self.max_chars:
            raise InputError(f"input {i} has {chars} characters; the limit is {self.max_chars}")


def _check_unicode(i: int, parts: Sequence[str]) -> None:
    """Refuse text the tokenizer cannot take: JSON may carry lone surrogates (``"\\ud800"``)."""
    for part in parts:
        try:
            part.encode("utf-8")
        except UnicodeEncodeError as err:
            raise InputError(f"input {i} is not valid Unicode text ({err.reason} at {err.start})") from None


def answer(logits: torch.Tensor | None, pooled: torch.Tensor, adapter: TaskAdapter | None) -> Prediction:
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

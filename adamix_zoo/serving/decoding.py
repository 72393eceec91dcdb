"""Decoding settings of generation rows, and one ``generate`` call for a group of rows sharing them.

Rows of any tasks decode together when their settings are equal (the engine groups them by
``GenerationRow.settings``); sampling (temperature > 0) draws per row, seeded per group.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from transformers import LogitsProcessor, LogitsProcessorList

from adamix_zoo.serving.codec import GenerationRow

DTYPES = ("float32", "bfloat16", "auto")


def resolve_dtype(dtype: str, device: torch.device | str) -> torch.dtype:
    """``float32`` / ``bfloat16``, or ``auto``: bf16 on CUDA with bf16 support and on CPUs with AMX
    or AVX-512 bf16 (``runtime.resolve_precision``), float32 elsewhere.

    Raises:
        ValueError: a name not in ``DTYPES``.
    """
    from adamix_zoo.runtime import resolve_precision

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if dtype == "auto":
        dtype = "bfloat16" if resolve_precision("auto", torch.device(device)) == "bf16" else "float32"
    return torch.bfloat16 if dtype == "bfloat16" else torch.float32


def group_by_settings(rows: Sequence[GenerationRow]) -> dict[tuple, list[int]]:
    """Row indices per decoding settings, in first-seen order."""
    groups: dict[tuple, list[int]] = {}
    for i, row in enumerate(rows):
        groups.setdefault(row.settings, []).append(i)
    return groups


def decode_group(
    lm: nn.Module, batch: dict[str, torch.Tensor], tokenizer, rows: Sequence[GenerationRow]
) -> list[list[int]]:
    """The new tokens of each left-padded row of ``batch``, decoded with the rows' shared settings
    (greedy, beam search, or sampling with temperature / top_p from ``seed``); cut at eos.

    Rows with an ``on_token`` hear each token as soon as the step after it starts (greedy and
    sampling; beam search only knows its tokens at the end).
    """
    row = rows[0]
    sample = row.temperature > 0
    kwargs = dict(do_sample=sample, num_beams=row.num_beams)
    if sample:
        kwargs.update(temperature=row.temperature, top_p=row.top_p, top_k=0)
        if row.seed is not None:
            torch.manual_seed(row.seed)  # the batch thread is the only one that samples
    if row.num_beams == 1 and any(r.on_token for r in rows):
        kwargs["logits_processor"] = LogitsProcessorList([_TokenTap(rows, batch["input_ids"].shape[1])])
    eos = tokenizer.eos_token_id
    generated = lm.generate(
        **batch, max_new_tokens=row.max_new_tokens, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=eos, **kwargs,
    )
    rows = generated[:, batch["input_ids"].shape[1] :].tolist()
    return [r[: r.index(eos)] if eos in r else r for r in rows]


class _TokenTap(LogitsProcessor):
    """Hands each row's newest token to its ``on_token`` at every decoding step.

    A logits processor runs before each step's choice, so at step k it sees token k-1; the last
    token of a row reaches its listener through the finished answer instead.
    """

    def __init__(self, rows: Sequence[GenerationRow], prompt_width: int) -> None:
        self.rows = rows
        self.prompt_width = prompt_width

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if input_ids.shape[1] > self.prompt_width:  # input_ids: (B, prompt + generated so far)
            for row, token in zip(self.rows, input_ids[:, -1].tolist()):
                if row.on_token is not None:
                    row.on_token(token)
        return scores

"""Batched greedy and beam-search generation from prompts (left padding, KV cache)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from adamix_zoo.model import AdaMixModel

if TYPE_CHECKING:  # the serving engine imports this module; keep `datasets` out of its imports
    from adamix_zoo.generation.data import Example
    from adamix_zoo.generation.nlg_tasks import NLGTask


def generate_ids(
    lm: nn.Module,
    batch: dict[str, torch.Tensor],
    pad_token_id: int,
    eos_token_id: int,
    max_new_tokens: int = 64,
    num_beams: int = 1,
) -> list[list[int]]:
    """The new tokens of each left-padded prompt row: greedy (``num_beams == 1``) or beam search.

    Generation stops at the eos token; what follows it is cut off here.
    """
    generated = lm.generate(
        **batch,
        max_new_tokens=max_new_tokens,
        num_beams=num_beams,
        do_sample=False,
        pad_token_id=pad_token_id,
        eos_token_id=eos_token_id,
    )
    rows = generated[:, batch["input_ids"].shape[1] :].tolist()
    return [row[: row.index(eos_token_id)] if eos_token_id in row else row for row in rows]


def first_line(text: str) -> str:
    """A data-to-text output is one line: anything after a newline is the model rambling on."""
    return text.strip().split("\n")[0].strip()


@torch.no_grad()
def generate(
    model: nn.Module,
    tokenizer,
    task: NLGTask,
    sources: list[str],
    batch_size: int = 16,
    max_new_tokens: int = 64,
    num_beams: int = 1,
) -> list[str]:
    """Generate one text per source; ``model`` is a transformers causal LM (AdaMix-wrapped or not)."""
    lm = model.model if isinstance(model, AdaMixModel) else model  # the transformers causal LM
    lm.eval()
    device = next(lm.parameters()).device
    tokenizer.padding_side = "left"  # decoder-only models continue from the right end
    outputs: list[str] = []
    for start in range(0, len(sources), batch_size):
        prompts = [task.prompt(s) for s in sources[start : start + batch_size]]
        batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        ids = generate_ids(lm, dict(batch), tokenizer.pad_token_id, tokenizer.eos_token_id,
                           max_new_tokens, num_beams)
        outputs.extend(first_line(t) for t in tokenizer.batch_decode(ids, skip_special_tokens=True))
    return outputs


def generate_examples(model: nn.Module, tokenizer, task: NLGTask, examples: list[Example], **kwargs) -> list[str]:
    return generate(model, tokenizer, task, [e.source for e in examples], **kwargs)

"""Batched greedy and beam-search generation from prompts (left padding, KV cache)."""

from __future__ import annotations

import torch
from torch import nn

from adamix_zoo.generation.data import Example
from adamix_zoo.generation.tasks import NLGTask


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
    """Generate one text per source; ``model`` is a transformers causal LM (AdaMix-wrapped or not).

    Greedy when ``num_beams == 1``, beam search otherwise; generation stops at the eos token.
    """
    lm = getattr(model, "model", model)  # AdaMixModel keeps the transformers model in .model
    lm.eval()
    device = next(lm.parameters()).device
    tokenizer.padding_side = "left"  # decoder-only models continue from the right end
    outputs: list[str] = []
    for start in range(0, len(sources), batch_size):
        prompts = [task.prompt(s) for s in sources[start : start + batch_size]]
        batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        generated = lm.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            num_beams=num_beams,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        new_tokens = generated[:, batch["input_ids"].shape[1] :]
        texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        outputs.extend(t.strip().split("\n")[0].strip() for t in texts)
    return outputs


def generate_examples(model: nn.Module, tokenizer, task: NLGTask, examples: list[Example], **kwargs) -> list[str]:
    return generate(model, tokenizer, task, [e.source for e in examples], **kwargs)

"""Where the experts go, per architecture (transformers ``config.model_type``).

LoRA targets follow the paper (attention query and value). Adapters go on the feed-forward output
projection (official AdaMix placement) and, for ``placement='houlsby'``, on the attention output
projection as well. Patterns are regular expressions matched against full module names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class ArchTargets:
    lora: tuple[str, ...]  # module-name suffixes (after the last '.')
    ffn_output: str  # regex of the feed-forward output projection
    attention_output: str  # regex of the attention output projection


_BERT = ArchTargets(("query", "value"), r"layer\.\d+\.output\.dense$", r"attention\.output\.dense$")
ARCHITECTURES: dict[str, ArchTargets] = {
    "bert": _BERT,
    "roberta": _BERT,
    "xlm-roberta": _BERT,
    "electra": _BERT,
    "deberta-v2": ArchTargets(
        ("query_proj", "value_proj"), r"layer\.\d+\.output\.dense$", r"attention\.output\.dense$"
    ),
    "distilbert": ArchTargets(("q_lin", "v_lin"), r"ffn\.lin2$", r"attention\.out_lin$"),
    # GPT-2 fuses q, k and v in one Conv1D, c_attn (PEFT's default target for GPT-2 as well).
    "gpt2": ArchTargets(("c_attn",), r"mlp\.c_proj$", r"attn\.c_proj$"),
    "llama": ArchTargets(("q_proj", "v_proj"), r"mlp\.down_proj$", r"self_attn\.o_proj$"),
    "mistral": ArchTargets(("q_proj", "v_proj"), r"mlp\.down_proj$", r"self_attn\.o_proj$"),
    "qwen2": ArchTargets(("q_proj", "v_proj"), r"mlp\.down_proj$", r"self_attn\.o_proj$"),
}


def arch_targets(model_type: str) -> ArchTargets:
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        raise ValueError(
            f"no default target modules for model_type={model_type!r}; pass target_modules "
            f"explicitly or use one of {', '.join(sorted(ARCHITECTURES))}"
        ) from None


def default_patterns(model_type: str, kind: str, placement: str) -> list[str]:
    targets = arch_targets(model_type)
    if kind == "lora":
        return [rf"(^|\.){re.escape(name)}$" for name in targets.lora]
    patterns = [targets.ffn_output]
    if placement == "houlsby":
        patterns.append(targets.attention_output)
    return patterns


def find_targets(model: nn.Module, patterns: list[str]) -> list[str]:
    """Names of the modules whose full name matches any pattern, in model order."""
    compiled = [re.compile(p) for p in patterns]
    return [name for name, _ in model.named_modules() if any(p.search(name) for p in compiled)]


def user_patterns(target_modules: list[str]) -> list[str]:
    """User targets are name suffixes ('query', 'attention.output.dense') unless they look like regex."""
    return [t if t.endswith("$") else rf"(^|\.){re.escape(t)}$" for t in target_modules]

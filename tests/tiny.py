"""Tiny, seeded, random transformers built from configs: no downloads, milliseconds per forward."""

from __future__ import annotations

import torch
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    BertConfig,
    DebertaV2Config,
    DistilBertConfig,
    GPT2Config,
    LlamaConfig,
    RobertaConfig,
)

TINY_CONFIGS = {
    "bert": lambda: BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64,
    ),
    "roberta": lambda: RobertaConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=70, pad_token_id=1,
    ),
    "distilbert": lambda: DistilBertConfig(
        vocab_size=100, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=64,
    ),
    "deberta-v2": lambda: DebertaV2Config(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64,
    ),
    "gpt2": lambda: GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=64),
    "llama": lambda: LlamaConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64,
    ),
}
ENCODERS = ("bert", "roberta", "distilbert", "deberta-v2")
DECODERS = ("gpt2", "llama")


def tiny_model(
    arch: str, head: str = "cls", num_labels: int = 3, seed: int = 0, init: float = 0.02
) -> torch.nn.Module:
    """A seeded random model; head is 'cls' (sequence classification), 'lm' or 'base'.

    ``init`` is the weights' initializer range: language-model tests raise it so that a frozen,
    tied output head can express confident predictions at all.
    """
    torch.manual_seed(seed)
    config = TINY_CONFIGS[arch]()
    config.initializer_range = init
    if head == "cls":
        config.num_labels = num_labels
        if arch in DECODERS:
            config.pad_token_id = 0
        model = AutoModelForSequenceClassification.from_config(config)
    elif head == "lm":
        model = AutoModelForCausalLM.from_config(config)
    else:
        model = AutoModel.from_config(config)
    return model.eval()


def tiny_batch(batch: int = 4, seq: int = 10, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 100, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[0, -3:] = 0  # one padded row
    return {"input_ids": ids, "attention_mask": mask}


def tiny_tokenizer(words: list[str]):
    """A word-level fast tokenizer over ``words`` (+ <pad>, <unk>, <eos>), built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<eos>"]
    vocab = {w: i for i, w in enumerate(specials + sorted(set(words) - set(specials)))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>"
    )

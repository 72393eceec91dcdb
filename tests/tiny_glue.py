"""Tiny GLUE-style fixtures: a word-level tokenizer, a random tiny BERT folder and generated data.

No downloads: the tokenizer is built from a fixed vocabulary with the ``tokenizers`` library, the
model from a config; the data are sentences whose label is a simple function of their words.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
POSITIVE = ["good", "great", "fine", "nice", "superb"]
NEGATIVE = ["bad", "awful", "poor", "dull", "weak"]
NEUTRAL = ["the", "a", "film", "plot", "actor", "story", "was", "is", "and", "very", "quite", "scene"]
VOCAB = SPECIAL + POSITIVE + NEGATIVE + NEUTRAL


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A BERT-style word-level tokenizer: [CLS] a [SEP] (b [SEP]) with token type ids."""
    vocab = {w: i for i, w in enumerate(VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
        sep_token="[SEP]", model_max_length=64,
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],
    )


def tiny_backbone_dir(path: Path, seed: int = 0, dropout: float = 0.1) -> Path:
    """Save a seeded random 2-layer BERT (hidden 32) and its tokenizer to ``path``."""
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64,
        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
    )
    BertModel(config).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def _sentence(rng: random.Random, words: list[str], n_signal: int) -> list[str]:
    tokens = rng.choices(NEUTRAL, k=rng.randint(2, 4)) + rng.choices(words, k=n_signal)
    rng.shuffle(tokens)
    return tokens


def sst2_rows(n: int, seed: int) -> list[dict]:
    """Single sentences; label 1 when its sentiment words are positive."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = i % 2
        words = _sentence(rng, POSITIVE if label else NEGATIVE, rng.randint(2, 3))
        rows.append({"sentence": " ".join(words), "label": label, "idx": i})
    return rows


def stsb_rows(n: int, seed: int) -> list[dict]:
    """Sentence pairs of 8 words in all; the score 0..5 is the number of positive words."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        score = rng.randint(0, 5)
        words = rng.choices(POSITIVE, k=score) + rng.choices(NEUTRAL, k=8 - score)
        rng.shuffle(words)
        rows.append({"sentence1": " ".join(words[:4]), "sentence2": " ".join(words[4:]),
                     "label": float(score), "idx": i})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_glue(root: Path, n_train: int = 256, n_val: int = 64) -> Path:
    """``root/sst2`` and ``root/stsb`` with train.jsonl and validation.jsonl; returns ``root``."""
    for task, make in (("sst2", sst2_rows), ("stsb", stsb_rows)):
        write_jsonl(root / task / "train.jsonl", make(n_train, seed=1))
        write_jsonl(root / task / "validation.jsonl", make(n_val, seed=2))
    return root

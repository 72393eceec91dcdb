"""Shared helpers of the serving tests (no tests here): tiny tokenizer, task folders, references."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from adamix_zoo import AdaMixConfig, AdaMixModel, load_merged, save_merged
from adamix_zoo.backbones import fingerprint
from adamix_zoo.formats.files import HEAD_FILE, METADATA_FILE
from adamix_zoo.heads import ClassificationHead, TaskModel, load_head, save_head
from tests.tiny import tiny_model

WORDS = [f"w{i}" for i in range(4, 100)]


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level BERT-style tokenizer over the tiny models' 100 ids: 'w4'..'w99' are words."""
    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3} | {w: int(w[1:]) for w in WORDS}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", 2), ("[SEP]", 3)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],
        model_max_length=64,
    )


def sentence(seed: int, words: int) -> str:
    g = torch.Generator().manual_seed(seed)
    return " ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (words,), generator=g).tolist())


def make_task(
    root: Path,
    name: str,
    kind: str = "lora",
    seed: int = 0,
    num_labels: int = 2,
    pooling: str = "mean",
    metadata: dict | None = None,
    **cfg,
) -> Path:
    """A merged task folder (random non-zero adapter + head + adamix.json) for the tiny BERT."""
    torch.manual_seed(1000 + seed)
    backbone = tiny_model("bert", head="base")
    model = AdaMixModel(backbone, AdaMixConfig(kind=kind, num_experts=2, seed=seed, **cfg))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn_like(p) * 0.3)
    model.merge()
    folder = save_merged(model, root / name, base_model="tiny-bert")
    head = ClassificationHead(32, num_labels, pooling=pooling)
    save_head(head, folder / HEAD_FILE)
    labels = None if num_labels == 1 else [f"{name}_{i}" for i in range(num_labels)]
    meta = {
        "task": name,
        "version": f"{name}-v{seed}",
        "label_names": labels,
        "base_model": {
            "id": "tiny-bert",
            "fingerprint": fingerprint(tiny_model("bert", head="base")),
        },
    }
    (folder / METADATA_FILE).write_text(json.dumps(meta if metadata is None else metadata))
    return folder


def reference(folder: Path) -> TaskModel:
    """The task served alone: its merged adapter on a fresh backbone + its head (the io loaders)."""
    return TaskModel(
        load_merged(tiny_model("bert", head="base"), folder), load_head(folder / HEAD_FILE)
    ).eval()


def standard_tasks(root: Path) -> dict[str, Path]:
    """Four tasks: LoRA rank 4 and rank 8 (different alpha), a bottleneck adapter, a regression."""
    return {
        "lora4": make_task(root, "lora4", "lora", seed=1, rank=4, alpha=8.0, num_labels=3),
        "lora8": make_task(
            root,
            "lora8",
            "lora",
            seed=2,
            rank=8,
            alpha=32.0,
            pooling="cls",
            target_modules=["query", "value", "key"],
        ),
        "adapter": make_task(
            root, "adapter", "adapter", seed=3, bottleneck=8, activation="relu", placement="houlsby"
        ),
        "regress": make_task(root, "regress", "adapter", seed=4, bottleneck=16, num_labels=1),
    }


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RunningServer:
    """uvicorn serving ``app`` on 127.0.0.1 in a thread; a context manager that stops it on exit."""

    def __init__(self, app) -> None:
        import threading

        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> RunningServer:
        import time

        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=20)

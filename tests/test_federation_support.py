"""Shared helpers of the federation tests (no tests here): a tiny model folder, tiny GLUE data, and
an in-process Grid that delivers each message to the real ClientApp and records what travelled."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Callable

import pytest
from flwr.app import Context, Error, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from tests.tiny import tiny_model

WORDS = (
    "good bad great awful fine dull fun boring film movie plot acting story cast very not a the"
).split()
POSITIVE = {"good", "great", "fine", "fun"}


def make_backbone(folder: Path) -> Path:
    """A seeded tiny BERT (vocab 100, hidden 32) and a word-level tokenizer, saved to ``folder``."""
    from transformers import BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = specials + WORDS + [f"w{i}" for i in range(100 - len(specials) - len(WORDS))]
    # the vocabulary as a mapping: transformers 5 ignores a vocab_file here (every word would be [UNK])
    BertTokenizerFast(vocab={word: i for i, word in enumerate(vocab)}).save_pretrained(folder)
    tiny_model("bert", head="base").save_pretrained(folder)
    return folder


def make_glue(root: Path, rows: int = 48) -> Path:
    """Tiny sst2 (sentiment from a word) and rte (pairs) in the hub schema under root/glue."""
    rng = random.Random(0)
    for task in ("sst2", "rte"):
        for split, n in (("train", rows), ("validation", rows // 2)):
            lines = []
            for i in range(n):
                words = rng.sample(WORDS, 5)
                label = int(not POSITIVE & set(words))  # 0 = has a positive word
                row = (
                    {"sentence": " ".join(words)}
                    if task == "sst2"
                    else {"sentence1": " ".join(words), "sentence2": " ".join(rng.sample(WORDS, 3))}
                )
                lines.append(json.dumps(row | {"label": label, "idx": i}))
            folder = root / "glue" / task
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return root


def tiny_run_config(tmp: Path, **overrides) -> dict:
    """A run config for a fast federation on the tiny model and data (each key as in pyproject)."""
    base = {
        "tasks": "sst2",
        "backbone": str(tmp / "backbone"),
        "data-dir": str(tmp / "data"),
        "num-clients": 3,
        "min-clients": 2,
        "num-rounds": 2,
        "local-steps": 2,
        "batch-size": 8,
        "max-length": 16,
        "num-experts": 2,
        "rank": 2,
        "output-dir": str(tmp / "out"),
        "registry-dir": str(tmp / "zoo"),
        "round-timeout": 60.0,
        # the tests check aggregates against the clients' plain weighted mean
        "strategy": "fedavg",
    }
    return base | overrides


@pytest.fixture
def tiny_env(tmp_path: Path) -> Path:
    make_backbone(tmp_path / "backbone")
    make_glue(tmp_path / "data")
    return tmp_path


@pytest.fixture
def one_thread():
    """Tiny models lose most time to thread hand-offs on a busy CPU: one thread, restored after."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def server_identity():
    """Messages created outside Flower's runtime need the creating task's identity."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity.run_id = TaskIdentity.node_id = TaskIdentity.task_id = None


Fault = Callable[[Message], Message]


class InProcessGrid:
    """A Grid for ``Strategy.start``: each message goes to the ClientApp of its node, in process.

    Args:
        app: the ClientApp.
        run_config: the run's config (as Flower would pass it to every Context).
        num_nodes: clients, with node ids 100, 101, ... and partition ids 0, 1, ...
        faults: node id -> function that corrupts that node's train replies.
        raising: node ids whose ClientApp raises (Flower turns that into an error reply).
    """

    def __init__(
        self,
        app,
        run_config: dict,
        num_nodes: int,
        faults: dict[int, Fault] | None = None,
        raising: set[int] | None = None,
    ) -> None:
        self.app, self.faults, self.raising = app, faults or {}, raising or set()
        self.contexts = {
            100 + i: Context(
                run_id=1,
                node_id=100 + i,
                node_config={"partition-id": i, "num-partitions": num_nodes},
                state=RecordDict(),
                run_config=dict(run_config),
            )
            for i in range(num_nodes)
        }
        self.sent: list[Message] = []
        self.replies: list[Message] = []
        self.exchanges: list[tuple[str, list[Message], list[Message]]] = []  # (type, sent, replies)

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def send_and_receive(self, messages, *, timeout=None) -> list[Message]:
        messages, out = list(messages), []
        for msg in messages:
            self.sent.append(msg)
            node = msg.metadata.dst_node_id
            try:
                if node in self.raising and msg.metadata.message_type == "train":
                    raise RuntimeError(f"client {node} crashed")
                reply = self.app(msg, self.contexts[node])
            except Exception as err:  # what Flower's runtime does with a raising ClientApp
                reply = Message(Error(code=1, reason=repr(err)), reply_to=msg)
            if (
                node in self.faults
                and msg.metadata.message_type == "train"
                and not reply.has_error()
            ):
                reply = self.faults[node](reply)
            self.replies.append(reply)
            out.append(reply)
        kind = messages[0].metadata.message_type if messages else ""
        self.exchanges.append((kind, messages, out))
        return out

    def train_round(self, server_round: int) -> tuple[list[Message], list[Message]]:
        """(messages sent, replies) of training round ``server_round`` (1-based)."""
        rounds = [(sent, replies) for kind, sent, replies in self.exchanges if kind == "train"]
        return rounds[server_round - 1]

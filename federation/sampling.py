"""Reproducible client sampling: one seed samples the same partitions in every run.

Flower's strategies draw each round's clients with ``random.sample`` over ``grid.get_node_ids()``:
Python's unseeded global generator, over node ids that the SuperLink draws at random. So two runs
of one seed trained different clients each round, and their results differed by up to 0.03 in
accuracy (docs/FEDERATION.md). ``ClientOrder`` asks each new node for its partition id once (a
``query`` message), lists the nodes in partition order and seeds the generator, per round and phase,
around Flower's sampling call. It also puts the replies in partition order before aggregation, so
the float sums come out the same too. Nodes that do not answer come after the others, in node-id
order.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from logging import INFO, WARNING
from typing import Any

from flwr.app import Message, MessageType, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

PARTITION_KEY = "partition-id"
REPLY_KEY = "identity"  # the query reply's MetricRecord
QUERY_TIMEOUT = 60.0  # seconds; a node that has not answered by then is ordered by its node id


class OrderedGrid:
    """A view of a Grid whose ``get_node_ids`` lists the nodes in a given order."""

    def __init__(self, grid: Grid, key: Any) -> None:
        self._grid, self._key = grid, key

    def get_node_ids(self) -> list[int]:
        return sorted(self._grid.get_node_ids(), key=self._key)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


class ClientOrder:
    """The nodes' partition ids, and seeded sampling in partition order.

    Args:
        seed: the run's seed; round r's phase p samples with ``random.seed(f"{seed}-{r}-{p}")``.
        timeout: seconds to wait for the nodes' answers to the partition query.
    """

    def __init__(self, seed: int, timeout: float = QUERY_TIMEOUT) -> None:
        self.seed, self.timeout = seed, timeout
        self.partitions: dict[int, int] = {}  # node id -> partition id
        self._asked: set[int] = set()

    def key(self, node: int) -> tuple[int, int, int]:
        """Known partitions first, by partition id; then the other nodes; ties by node id."""
        return (0, self.partitions[node], node) if node in self.partitions else (1, 0, node)

    def identify(self, grid: Grid) -> None:
        """Ask every node not asked before for its partition id (late joiners too)."""
        new = [n for n in grid.get_node_ids() if n not in self._asked]
        if not new:
            return
        self._asked.update(new)
        queries = [Message(RecordDict(), dst_node_id=n, message_type=MessageType.QUERY) for n in new]
        for reply in grid.send_and_receive(queries, timeout=self.timeout):
            node = reply.metadata.src_node_id
            value = None if reply.has_error() else _partition(reply.content)
            if value is None:
                log(WARNING, "node %d gave no partition id; it is sampled in node-id order", node)
            else:
                self.partitions[node] = value
        log(INFO, "client sampling in partition order: %d of %d nodes gave their partition id",
            len(self.partitions), len(self._asked))

    @contextmanager
    def sampling(self, grid: Grid, server_round: int, phase: str) -> Iterator[OrderedGrid]:
        """``grid`` in partition order, with Python's generator seeded for this round and phase
        (and restored after)."""
        self.identify(grid)
        state = random.getstate()
        random.seed(f"{self.seed}-{server_round}-{phase}")
        try:
            yield OrderedGrid(grid, self.key)
        finally:
            random.setstate(state)

    def sort(self, replies: Iterable[Message]) -> list[Message]:
        """The replies in partition order."""
        return sorted(replies, key=lambda m: self.key(m.metadata.src_node_id))


def _partition(content: RecordDict) -> int | None:
    """The partition id a query reply carries, or None when it carries none that makes sense."""
    if REPLY_KEY not in content.metric_records:
        return None
    value = content.metric_records[REPLY_KEY].get(PARTITION_KEY)
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None

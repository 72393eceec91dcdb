"""Reproducible client sampling: one seed samples the same partitions in every run.

Flower's strategies draw each round's clients with ``random.sample`` over ``grid.get_node_ids()``:
Python's unseeded global generator, over node ids that the SuperLink draws at random. So two runs
of one seed trained different clients each round, and their results differed by up to 0.03 in
accuracy (docs/FEDERATION.md). ``ClientOrder`` asks each new node for its partition id once (a
``query`` message), lists the nodes in partition order and seeds the generator, per round and phase,
around Flower's sampling call. It also puts the replies in partition order before aggregation, so
the float sums come out the same too. Nodes that do not answer come after the others, in node-id
order.

``client-sampling=cyclic`` (``ClientCycle``) draws the training clients without replacement across
rounds: every connected client once per cycle of ``num-clients / sampled`` rounds, in a seeded
random order per cycle (cyclic participation, Cho et al. 2023). With label-skewed partitions each
cycle then covers every client's labels exactly once, where uniform draws leave about a third of
the clients out of any four rounds (docs/FEDERATION.md, "Sampling and stragglers").
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator, Sequence
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
        cyclic: draw the training clients from a ``ClientCycle`` (evaluation stays uniform).
    """

    def __init__(self, seed: int, timeout: float = QUERY_TIMEOUT, cyclic: bool = False) -> None:
        self.seed, self.timeout = seed, timeout
        self.cycle = ClientCycle(seed) if cyclic else None
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
        state, draw = random.getstate(), random.sample
        random.seed(f"{self.seed}-{server_round}-{phase}")
        if self.cycle is not None and phase == "train":
            random.sample = self.cycle.take  # Flower's sample_nodes draws with random.sample
        try:
            yield OrderedGrid(grid, self.key)
        finally:
            random.setstate(state)
            random.sample = draw

    def sort(self, replies: Iterable[Message]) -> list[Message]:
        """The replies in partition order."""
        return sorted(replies, key=lambda m: self.key(m.metadata.src_node_id))


class ClientCycle:
    """Sampling without replacement across rounds: each cycle is a seeded permutation of the
    connected clients, taken a round's sample at a time.

    A client that has gone away is skipped; one that joined mid-cycle waits for the next cycle. A
    round that needs more clients than its cycle has left takes the rest and starts the next
    cycle, without repeating a client within the round.
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.cycles = 0
        self.pending: list[int] = []  # the current cycle's clients not yet drawn, in draw order

    def take(self, population: Sequence[int], k: int) -> list[int]:
        """``k`` distinct clients of ``population`` (listed in partition order), as ``random.sample``."""
        if not 0 <= k <= len(population):
            raise ValueError(f"cannot sample {k} clients of {len(population)} connected")
        live, picked = set(population), []
        while len(picked) < k:
            candidates = [n for n in self.pending if n in live and n not in picked]
            if not candidates:
                self.pending = list(population)
                random.Random(f"{self.seed}-cycle-{self.cycles}").shuffle(self.pending)
                self.cycles += 1
                continue
            picked.append(candidates[0])
            self.pending.remove(candidates[0])
        return picked


def _partition(content: RecordDict) -> int | None:
    """The partition id a query reply carries, or None when it carries none that makes sense."""
    if REPLY_KEY not in content.metric_records:
        return None
    value = content.metric_records[REPLY_KEY].get(PARTITION_KEY)
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None

"""``head-init=lda``: the global head set, before round 1, to the LDA of the clients' features.

The server sends every connected client the initial global tensors in a ``query`` message that
asks for ``STATISTICS_QUERY``; each client loads them, pools its training partition's features
through the frozen backbone (the experts are still at their initial values; at most ``head-init-rows``
of them, a seeded draw) and replies with its
class counts, class feature sums and feature scatter (``adamix_zoo.head_init``). Their sum is the
pooled rows' statistics whatever the partition, so the head is the LDA that centralized rows would
give. Replies that are errors or malformed are left out (logged); fewer than ``min-clients`` valid
ones, or a class no client holds, stop the run before any round. A client's statistics say more
about its rows than one update does, so the mode refuses DP runs (``FederationConfig``).
"""

from __future__ import annotations

import functools
import operator
import random
import time
from logging import INFO, WARNING

import torch
from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from adamix_zoo.head_init import FeatureStatistics, lda_head
from federation.records import HEAD_PREFIX, from_record, to_record
from federation.sampling import PARTITION_KEY, REPLY_KEY
from federation.strategies import ARRAYS_KEY, CONFIG_KEY

QUERY_KEY = "query"  # the query config's key naming what the server asks for
STATISTICS_QUERY = "head-statistics"
STATISTICS_KEY = "head-statistics"  # the reply's ArrayRecord
WEIGHT, BIAS = HEAD_PREFIX + "classifier.weight", HEAD_PREFIX + "classifier.bias"


class HeadInitError(RuntimeError):
    """Too few clients sent usable statistics, or they lack a class: no LDA head."""


def statistics_query(initial: dict[str, torch.Tensor], node: int) -> Message:
    content = RecordDict({ARRAYS_KEY: to_record(initial), CONFIG_KEY: ConfigRecord({QUERY_KEY: STATISTICS_QUERY})})
    return Message(content, dst_node_id=node, message_type=MessageType.QUERY)


def asks_for_statistics(content: RecordDict) -> bool:
    """Whether a query message asks for feature statistics (else: for the partition id)."""
    return CONFIG_KEY in content.config_records and content[CONFIG_KEY].get(QUERY_KEY) == STATISTICS_QUERY


def statistics_rows(examples: list, limit: int, seed: int) -> list:
    """At most ``limit`` of ``examples`` (all when 0 or when they are fewer), a seeded draw in their order."""
    if not limit or len(examples) <= limit:
        return examples
    keep = sorted(random.Random(seed).sample(range(len(examples)), limit))
    return [examples[i] for i in keep]


def statistics_reply(stats: FeatureStatistics, partition_id: int, msg: Message) -> Message:
    """The statistics, and the partition id that orders the server's sum (the same floats every run)."""
    return Message(RecordDict({STATISTICS_KEY: to_record(stats.tensors()),
                               REPLY_KEY: MetricRecord({PARTITION_KEY: partition_id})}), reply_to=msg)


def reply_statistics(reply: Message, num_labels: int, hidden: int) -> tuple[int, FeatureStatistics]:
    """The reply's partition id and statistics.

    Raises:
        ValueError: an error reply, or statistics (or a partition id) missing or malformed.
    """
    if reply.has_error():
        raise ValueError(f"error reply: {reply.error.reason}")
    if STATISTICS_KEY not in reply.content.array_records or REPLY_KEY not in reply.content.metric_records:
        raise ValueError("no feature statistics, or no partition id, in the reply")
    partition = reply.content[REPLY_KEY].get(PARTITION_KEY)
    if not isinstance(partition, int):
        raise ValueError(f"partition id {partition!r} is not an integer")
    return partition, FeatureStatistics.from_tensors(from_record(reply.content[STATISTICS_KEY]), num_labels, hidden)


def lda_initial_state(grid: Grid, initial: dict[str, torch.Tensor], min_clients: int,
                      timeout: float) -> dict[str, torch.Tensor]:
    """``initial`` with its head replaced by the LDA of the connected clients' summed statistics.

    Raises:
        HeadInitError: fewer than ``min_clients`` usable replies, or a class that none holds.
    """
    num_labels, hidden = initial[WEIGHT].shape
    nodes, start = sorted(grid.get_node_ids()), time.perf_counter()
    parts: dict[int, FeatureStatistics] = {}
    for reply in grid.send_and_receive([statistics_query(initial, n) for n in nodes], timeout=timeout):
        try:
            partition, stats = reply_statistics(reply, num_labels, hidden)
        except ValueError as err:
            log(WARNING, "head-init=lda: node %d's statistics are left out: %s", reply.metadata.src_node_id, err)
            continue
        parts[partition] = stats
    if len(parts) < min_clients:
        raise HeadInitError(f"head-init=lda: {len(parts)} of {len(nodes)} clients sent usable feature "
                            f"statistics, min-clients={min_clients}")
    total = functools.reduce(operator.add, (parts[p] for p in sorted(parts)))
    try:
        weight, bias = lda_head(total)
    except ValueError as err:
        raise HeadInitError(f"head-init=lda: {err}") from err
    log(INFO, "head-init=lda: the head is the LDA of %d clients' %d rows (%.1f s)", len(parts),
        int(total.counts.sum()), time.perf_counter() - start)
    return initial | {WEIGHT: weight.to(initial[WEIGHT].dtype), BIAS: bias.to(initial[BIAS].dtype)}

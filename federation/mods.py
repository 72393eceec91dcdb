"""ClientApp mods around the training handler: the client's own timing, and fault injection.

``timing_mod`` adds ``client-seconds`` (the whole handler: settings, data, model, training,
packing the reply) to a training reply's metrics, so the server can tell the time clients spend
outside their training loop from the time the runtime spends between clients.

``fault_mod`` is a test and benchmark knob, off by default: with ``drop-rate`` a training message
makes its client crash (Flower turns the exception into an error reply); with ``straggler-rate``
it first sleeps ``straggler-seconds`` (longer than ``round-timeout``: a client that never answers
in time). Which messages fail is drawn from (seed, round, partition id), so a run is repeatable
and a test can predict it with ``injected_fault``.
"""

from __future__ import annotations

import time

import numpy as np
from flwr.app import Context, Message, MessageType

from federation.config import FederationConfig
from federation.strategies import CONFIG_KEY, METRICS_KEY

CLIENT_SECONDS = "client-seconds"


class InjectedFault(RuntimeError):
    """The crash ``drop-rate`` asks for (never raised unless fault injection is on)."""


def injected_fault(cfg: FederationConfig, server_round: int, partition_id: int) -> str | None:
    """'drop', 'straggle' or None for this client in this round (one draw each, independent)."""
    drop, straggle = np.random.default_rng([cfg.seed, server_round, partition_id, 0xFA]).random(2)
    if drop < cfg.drop_rate:
        return "drop"
    if straggle < cfg.straggler_rate:
        return "straggle"
    return None


def fault_mod(msg: Message, context: Context, call_next) -> Message:
    if msg.metadata.message_type != MessageType.TRAIN:
        return call_next(msg, context)
    cfg = FederationConfig.from_run_config(context.run_config)
    if cfg.drop_rate or cfg.straggler_rate:
        pid = int(context.node_config.get("partition-id", -1))
        server_round = int(msg.content[CONFIG_KEY]["server-round"])
        fault = injected_fault(cfg, server_round, pid)
        if fault == "drop":
            raise InjectedFault(f"fault injection: partition {pid} dropped in round {server_round}")
        if fault == "straggle":
            time.sleep(cfg.straggler_seconds)
    return call_next(msg, context)


def timing_mod(msg: Message, context: Context, call_next) -> Message:
    start = time.perf_counter()
    reply = call_next(msg, context)
    if (
        msg.metadata.message_type == MessageType.TRAIN
        and not reply.has_error()
        and METRICS_KEY in reply.content.metric_records
    ):
        reply.content[METRICS_KEY][CLIENT_SECONDS] = time.perf_counter() - start
    return reply

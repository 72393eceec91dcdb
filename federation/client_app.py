"""The ClientApp: train the AdaMix mixture on this client's partition; reply with the experts only.

A train message carries the global experts (``arrays``: only ``adamix_*`` tensors, plus ``head.*``
when the head is federated) and ``config`` (``server-round``). The client loads them into its own
model on the frozen backbone, trains ``local-steps`` steps with stochastic routing and the
consistency loss, and replies with the same tensor names, ``num-examples`` and metrics.
A head that is not federated (multi-task runs) stays on the client, in the run's ``Context.state``.
"""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import adaptiveclipping_mod, fixedclipping_mod

from adamix_zoo.heads import save_head
from federation.config import FederationConfig
from federation.mods import fault_mod, timing_mod
from federation.records import from_record, to_record
from federation.strategies import ARRAYS_KEY, CONFIG_KEY, METRICS_KEY, NUM_EXAMPLES, TASK_KEY
from federation.task import (
    batches,
    client_data,
    client_model,
    evaluate_examples,
    head_of,
    load_head_state,
    load_shared_state,
    shared_state,
    train_round,
)

LOCAL_HEAD = "local-head"  # Context.state key of a head that never leaves the client
HEAD_DIR = "head-dir"  # evaluate config: where a local head is saved after the last round


def dp_mod(msg: Message, context: Context, call_next):
    """Flower's client-side clipping mods, on training messages, when the run asks for them."""
    mode = str(context.run_config.get("dp", "none"))
    if msg.metadata.message_type == MessageType.TRAIN and mode == "client-fixed":
        return fixedclipping_mod(msg, context, call_next)
    if msg.metadata.message_type == MessageType.TRAIN and mode == "client-adaptive":
        return adaptiveclipping_mod(msg, context, call_next)
    return call_next(msg, context)


# Outermost first: injected faults, then the timing of the client's own work, then DP clipping.
app = ClientApp(mods=[fault_mod, timing_mod, dp_mod])


def settings(context: Context) -> tuple[FederationConfig, int]:
    """The run's settings and this client's partition id (from the node config).

    Raises:
        ValueError: no ``partition-id`` in the node config, or one beyond ``num-clients``.
    """
    cfg = FederationConfig.from_run_config(context.run_config)
    if "partition-id" not in context.node_config:
        raise ValueError(
            "this SuperNode has no partition-id: start it with --node-config 'partition-id=N'"
        )
    pid = int(context.node_config["partition-id"])
    if not 0 <= pid < cfg.num_clients:
        raise ValueError(f"partition-id={pid} is out of range for num-clients={cfg.num_clients}")
    return cfg, pid


def _model(cfg: FederationConfig, pid: int, task: str, context: Context, arrays: ArrayRecord):
    """This client's model: received experts (and head), or its own head from the run's state."""
    model = client_model(cfg, task, head_seed=None if cfg.head_federated else cfg.seed + 1 + pid)
    if not cfg.head_federated and LOCAL_HEAD in context.state.array_records:
        load_head_state(model, from_record(context.state[LOCAL_HEAD]))
    load_shared_state(model, from_record(arrays))
    return model


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg, pid = settings(context)
    spec, examples = client_data(cfg, pid, "train")
    model = _model(cfg, pid, spec.name, context, msg.content[ARRAYS_KEY])
    server_round = int(msg.content[CONFIG_KEY]["server-round"])
    seed = cfg.seed * 1_000_003 + server_round * 1_009 + pid  # distinct per client and round
    model.backbone.seed_routing(seed)
    torch.manual_seed(seed)  # dropout
    stats = train_round(model, cfg, spec, batches(cfg, spec, examples, seed))
    if not cfg.head_federated:
        context.state[LOCAL_HEAD] = to_record(head_of(model))
    metrics = MetricRecord({NUM_EXAMPLES: len(examples), **stats})
    content = RecordDict(
        {ARRAYS_KEY: to_record(shared_state(model, cfg.head_federated)), METRICS_KEY: metrics}
    )
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    cfg, pid = settings(context)
    spec, examples = client_data(cfg, pid, "validation")
    model = _model(cfg, pid, spec.name, context, msg.content[ARRAYS_KEY])
    scores = evaluate_examples(cfg, spec, model, examples)
    config = msg.content[CONFIG_KEY]
    if (
        not cfg.head_federated
        and HEAD_DIR in config
        and int(config["server-round"]) == cfg.num_rounds
    ):
        save_head(model.head, f"{config[HEAD_DIR]}/{spec.name}/partition-{pid}.safetensors")
    metrics = MetricRecord(
        {NUM_EXAMPLES: len(examples), TASK_KEY: cfg.task_list.index(spec.name), **scores}
    )
    return Message(RecordDict({METRICS_KEY: metrics}), reply_to=msg)

"""The ClientApp: train the AdaMix mixture on this client's partition; reply with the experts only.

A train message carries the global experts (``arrays``: only ``adamix_*`` tensors, plus ``head.*``
when the head is federated) and ``config`` (``server-round``). The client loads them into its own
model on the frozen backbone, trains ``local-steps`` steps with stochastic routing and the
consistency loss, and replies with the same tensor names, ``num-examples`` and metrics. A client
of a smaller LoRA rank (``client-ranks``) trains and replies at its rank (``federation.ranks``).
A head that is not federated (multi-task GLUE runs) stays on the client, in the run's
``Context.state``, as do its SCAFFOLD control variate when the server sends one
(``federation.scaffold``) and, with ``client-optimizer-state=keep``, its AdamW state
(``federation.optimizer_state``). What a model, its data and its training are depends on the run's
task family (``federation.task.family_of``: GLUE classification or data-to-text generation).
"""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import adaptiveclipping_mod, fixedclipping_mod

from federation import head_init, ranks
from federation.config import FederationConfig
from federation.label_balance import LABEL_COUNTS
from federation.mods import fault_mod, timing_mod
from federation.optimizer_state import STATE_KEY as OPTIMIZER_STATE_KEY, KeptOptimizerState
from federation.records import from_record, to_record
from federation.sampling import PARTITION_KEY, REPLY_KEY
from federation.scaffold import CLIENT_STATE_KEY, CONTROL_KEY, DELTA_KEY, DriftCorrection
from federation.strategies import ARRAYS_KEY, CONFIG_KEY, METRICS_KEY, NUM_EXAMPLES, TASK_KEY
from federation.task import TaskFamily, family_of

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


def _model(
    family: TaskFamily, cfg: FederationConfig, pid: int, task: str, context: Context, arrays: ArrayRecord
) -> torch.nn.Module:
    """This client's model (at its own rank, ``cfg`` being ``ranks.client_config``): the received
    experts truncated to that rank (and head), or its own head from the run's state."""
    model = family.client_model(cfg, task, head_seed=cfg.seed + 1 + pid if cfg.local_head else None)
    if cfg.local_head and LOCAL_HEAD in context.state.array_records:
        family.load_head_state(model, from_record(context.state[LOCAL_HEAD]))
    family.load_shared_state(model, ranks.truncate(from_record(arrays), cfg.adamix.rank))
    return model


def train_weight(cfg: FederationConfig, partition_size: int) -> int:
    """A training reply's ``num-examples``, its weight in the average (``client-weighting``).

    Every client runs the same local steps, however large its partition: 'uniform' (the default)
    weighs them alike and 'trained' by the examples each trained on, so that one large (under label
    skew, often one-label) partition does not set most of a round's update as 'partition' lets it."""
    if cfg.client_weighting in ("uniform", "label-balanced"):  # label-balanced: the server reweighs
        return 1
    if cfg.client_weighting == "trained":
        return min(partition_size, cfg.local_steps * cfg.batch_size)
    return partition_size


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg, pid = settings(context)
    family = family_of(cfg)
    task, examples = family.client_data(cfg, pid, "train")
    cfg = ranks.client_config(cfg, pid)
    model = _model(family, cfg, pid, task, context, msg.content[ARRAYS_KEY])
    server_round = int(msg.content[CONFIG_KEY]["server-round"])
    seed = cfg.seed * 1_000_003 + server_round * 1_009 + pid  # distinct per client and round
    correction = None
    if CONTROL_KEY in msg.content.array_records:  # the server runs SCAFFOLD
        own = context.state[CLIENT_STATE_KEY] if CLIENT_STATE_KEY in context.state.array_records else None
        correction = DriftCorrection(family.trainable_shared(model, cfg.head_federated),
                                     msg.content[CONTROL_KEY], own)
    kept = None
    if cfg.client_optimizer_state == "keep":
        saved = context.state.array_records.get(OPTIMIZER_STATE_KEY)
        kept = KeptOptimizerState(from_record(saved) if saved is not None else None)
    stats = family.train_round(model, cfg, task, examples, seed, server_round, after_backward=correction,
                               kept=kept)
    if kept is not None:
        context.state[OPTIMIZER_STATE_KEY] = to_record(kept.tensors)
    if cfg.local_head:
        context.state[LOCAL_HEAD] = to_record(family.head_of(model))
    metrics = MetricRecord({NUM_EXAMPLES: train_weight(cfg, len(examples)), **stats})
    if cfg.client_weighting == "label-balanced":
        metrics[LABEL_COUNTS] = family.label_counts(task, examples)
    shared = family.shared_state(model, cfg.head_federated)
    content = RecordDict({ARRAYS_KEY: to_record(shared), METRICS_KEY: metrics})
    if correction is not None:
        context.state[CLIENT_STATE_KEY], content[DELTA_KEY] = correction.finish()
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    cfg, pid = settings(context)
    family = family_of(cfg)
    task, examples = family.client_data(cfg, pid, "validation")
    model = _model(family, ranks.client_config(cfg, pid), pid, task, context, msg.content[ARRAYS_KEY])
    scores = family.evaluate(cfg, task, model, examples)
    config = msg.content[CONFIG_KEY]
    if cfg.local_head and HEAD_DIR in config and int(config["server-round"]) == cfg.num_rounds:
        family.save_client_head(model, f"{config[HEAD_DIR]}/{task}/partition-{pid}.safetensors")
    metrics = MetricRecord({NUM_EXAMPLES: len(examples), TASK_KEY: cfg.task_list.index(task), **scores})
    return Message(RecordDict({METRICS_KEY: metrics}), reply_to=msg)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """This client's partition id: the server samples clients in partition order
    (``federation.sampling``), so a seed trains the same partitions in every run. Or, asked for them
    (``head-init=lda``), its training rows' feature statistics under the sent initial model."""
    cfg, pid = settings(context)
    if not head_init.asks_for_statistics(msg.content):
        return Message(RecordDict({REPLY_KEY: MetricRecord({PARTITION_KEY: pid})}), reply_to=msg)
    family = family_of(cfg)
    task, examples = family.client_data(cfg, pid, "train")
    model = _model(family, ranks.client_config(cfg, pid), pid, task, context, msg.content[ARRAYS_KEY])
    rows = head_init.statistics_rows(examples, cfg.head_init_rows, cfg.seed * 1_000_003 + pid)
    return head_init.statistics_reply(family.feature_statistics(cfg, task, model, rows), pid, msg)

"""The ServerApp: federate the adapter experts, then save and publish the merged global adapter.

The server builds the same model as the clients (same backbone, same AdaMix seed) only to own the
initial experts, to know what a valid update looks like (names, shapes, dtypes), and to evaluate
and save the final global adapter. Rounds run through Flower's ``Strategy.start`` with the
configured strategy behind ``ValidatingStrategy``: each round samples ``fraction-train`` of the
connected clients (at least ``min-clients``), waits ``round-timeout`` for their replies, and
aggregates when ``min-clients`` valid ones came in; federated evaluation runs every
``evaluate-every`` rounds and at the last. The saved global adapter is the mean of the last
``average-last-rounds`` rounds' (default: a quarter of them; ``ValidatingStrategy.tail_average``).
The model, its evaluation and its run folder come from the run's task family
(``federation.task.family_of``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from logging import INFO
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from federation.client_app import HEAD_DIR
from federation.config import FederationConfig
from federation.head_init import HeadInitError, lda_initial_state
from federation.output import CLIENT_HEADS_DIR, TASKS_DIR, publish, write_run
from federation.records import HEAD_PREFIX, Spec, check_record, from_record, record_bytes, spec_of, to_record
from federation.strategies import ValidatingStrategy, build_strategy, connected_nodes
from federation.task import GlobalEvaluation, TaskFamily, family_of

app = ServerApp()
RESULT_FILE = "federation_result.json"


class FederationError(RuntimeError):
    """The federation produced nothing that may be saved or published."""


@dataclass
class Outcome:
    """What a finished federation wrote: run folders, published entries, per-round log."""

    folder: Path
    metrics: dict[str, Any]
    published: list[str] = field(default_factory=list)
    task_folders: dict[str, Path] = field(default_factory=dict)


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_federation(grid, FederationConfig.from_run_config(context.run_config))


def wait_for_clients(grid: Grid, count: int, timeout: float) -> None:
    """Block until ``count`` clients (``min-available-clients``, default all) are connected, so
    round 1 samples from all of them.

    Raises:
        FederationError: fewer connected clients after ``timeout`` seconds.
    """
    connected = connected_nodes(grid, count, timeout)
    if connected < count:
        raise FederationError(f"only {connected} of {count} clients connected within {timeout:.0f}s")


def final_arrays(strategy: ValidatingStrategy, arrays: ArrayRecord, spec: Spec) -> ArrayRecord:
    """The global experts to save: from an aggregated round, and checked once more.

    Raises:
        FederationError: no round aggregated, or the final experts fail validation.
    """
    if not strategy.log.aggregated_rounds:
        raise FederationError("no round produced a valid aggregate: nothing is saved or published")
    problems = check_record(arrays, spec)
    if problems:
        raise FederationError("the final global experts are invalid: " + "; ".join(problems))
    return arrays


def run_federation(grid: Grid, cfg: FederationConfig) -> Outcome:
    """Run every round, then write (and publish) the output folder(s).

    Raises:
        FederationError: not enough clients, or no valid aggregate to save.
    """
    out = cfg.output_path()
    family = family_of(cfg)
    model = family.build_model(cfg, cfg.task_list[0])
    initial = family.shared_state(model, cfg.head_federated)
    spec = spec_of(initial)
    strategy = build_strategy(cfg, spec)
    wait_for_clients(grid, cfg.clients_before_start, cfg.round_timeout)
    if cfg.head_init == "lda":
        try:
            initial = lda_initial_state(grid, initial, cfg.min_clients, cfg.round_timeout)
        except HeadInitError as err:
            raise FederationError(str(err)) from err
    result = strategy.start(
        grid=grid,
        initial_arrays=to_record(initial),
        num_rounds=cfg.num_rounds,
        timeout=cfg.round_timeout,
        evaluate_config=ConfigRecord({HEAD_DIR: str(out / CLIENT_HEADS_DIR)}),
    )
    arrays = final_arrays(strategy, result.arrays, spec)
    last_round = None
    if cfg.tail_rounds > 1:
        last_round, arrays = arrays, final_arrays(strategy, strategy.tail_average(), spec)
    report = strategy.log.to_dict() | {
        # global experts (and SCAFFOLD's control variate) down, update (and control delta) up
        "bytes_per_client_round": 2 * (record_bytes(arrays) + (record_bytes(strategy.control.record())
                                                               if strategy.control else 0)),
        "train_metrics": {r: dict(m) for r, m in result.train_metrics_clientapp.items()},
        "client_eval_metrics": {r: dict(m) for r, m in result.evaluate_metrics_clientapp.items()},
    }
    if last_round is not None and not cfg.multi_task:
        report["last_round_metrics"] = _evaluate_state(cfg, family, model, from_record(last_round),
                                                       "last round's global model").metrics
    global_state = from_record(arrays)
    finish = _finish_multi if cfg.multi_task else _finish_single
    outcome = finish(cfg, family, model, global_state, out, report)
    write_result(outcome)
    return outcome


def write_result(outcome: Outcome) -> Path:
    """``federation_result.json``, written last: its presence means the whole run succeeded."""
    path = outcome.folder / RESULT_FILE
    result = {
        "published": outcome.published,
        "task_folders": {k: str(v) for k, v in outcome.task_folders.items()},
    }
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path


def _evaluate(cfg: FederationConfig, family: TaskFamily, model, task: str,
              what: str = "global model") -> GlobalEvaluation:
    """The global model's final evaluation on the task's validation rows (logged)."""
    evaluation = family.evaluate_global(cfg, model, task)
    log(INFO, "%s on %s validation: %s", what, task, evaluation.metrics)
    return evaluation


def _evaluate_state(cfg: FederationConfig, family: TaskFamily, model, state, what: str) -> GlobalEvaluation:
    """A single-task run's evaluation of other global experts than those it saves (the model is
    loaded with the saved ones afterwards)."""
    family.load_shared_state(model, state)
    return _evaluate(cfg, family, model, cfg.task_list[0], what)


def _finish_single(
    cfg: FederationConfig, family: TaskFamily, model, state, out: Path, report: dict[str, Any]
) -> Outcome:
    family.load_shared_state(model, state)
    task = cfg.task_list[0]
    evaluation = _evaluate(cfg, family, model, task)
    metrics = evaluation.metrics | {"federation": report}
    write_run(out, cfg, family, task, model, metrics, evaluation)
    ref = publish(out, cfg, task)
    return Outcome(out, metrics, [ref] if ref else [], {task: out})


def _finish_multi(
    cfg: FederationConfig, family: TaskFamily, shared_model, state, out: Path, report: dict[str, Any]
) -> Outcome:
    """Shared experts at the top; a run folder per task the family can build here (GLUE: a task
    whose client head is on this machine)."""
    experts = {k: v for k, v in state.items() if not k.startswith(HEAD_PREFIX)}
    family.adamix_model(shared_model).load_adapter_state_dict(experts)
    outcome = Outcome(out, {"main_metric": None, "federation": report})
    for task in cfg.task_list:
        model = family.task_model(cfg, task, experts, out)
        if model is None:
            log(INFO, "no local head for %s (its clients keep it): only the shared experts are saved", task)
            continue
        evaluation = _evaluate(cfg, family, model, task)
        outcome.metrics[task] = evaluation.metrics
        outcome.task_folders[task] = write_run(
            out / TASKS_DIR / task, cfg, family, task, model, evaluation.metrics | {"federation": report},
            evaluation,
        )
    write_run(out, cfg, family, None, shared_model, outcome.metrics)
    for task, folder in outcome.task_folders.items():
        ref = publish(folder, cfg, task)
        outcome.published += [ref] if ref else []
    return outcome

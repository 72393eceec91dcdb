"""``adamix-zoo federate``: a whole Flower federation on this machine, no Flower setup needed."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer

# --aggregation -> the run-config keys it sets (an explicit --run-config value still wins).
AGGREGATION: dict[str, dict[str, object]] = {
    "factors": {},
    "frozen-down": {"sharing": "down", "freeze-shared": True},
    "svd": {"aggregation": "svd", "strategy": "fedavg"},  # it replaces the (momentum) average
}


def register(app: typer.Typer) -> None:
    """Add ``federate`` to the main CLI."""
    app.command()(federate)


def federate(
    tasks: str = typer.Option(
        "sst2",
        help="A GLUE task (sst2, rte, ...) or a data-to-text task (e2e, webnlg, dart), or "
        "comma-separated tasks of one family (one per client, round robin).",
    ),
    clients: int = typer.Option(4, min=1, help="Clients (SuperNodes)."),
    rounds: int = typer.Option(3, min=1, help="Federated rounds."),
    fraction_train: float = typer.Option(
        1.0, min=0.0, max=1.0,
        help="Share of the connected clients sampled to train each round (at least --min-clients).",
    ),
    min_clients: Optional[int] = typer.Option(
        None, min=1,
        help="Valid updates a round needs to aggregate (default 2; fewer keep the previous "
        "experts), and the fewest clients a round samples. Replies later than round-timeout "
        "do not count. Before round 1 the server waits for all --clients (run-config "
        "min-available-clients lowers that).",
    ),
    evaluate_every: int = typer.Option(
        1, min=1, help="Federated client evaluation every N rounds and at the last round."
    ),
    local_steps: int = typer.Option(20, min=1, help="Local optimizer steps per client per round."),
    strategy: Optional[str] = typer.Option(
        None,
        help="fedavg, fedmedian, fedtrimmedavg, krum, or a server optimizer: fedavgm, fedadam, "
        "fedyogi, fedadagrad (see --run-config server-learning-rate, server-momentum). Default: "
        "fedavgm with momentum 0.6 (fedavg with --aggregation svd).",
    ),
    dp: str = typer.Option(
        "none", help="none, server-fixed, server-adaptive, client-fixed, client-adaptive."
    ),
    aggregation: str = typer.Option(
        "factors",
        help="factors (average the LoRA factors A and B, AdaMix's shared B; not the mean update) or "
        "frozen-down (exact: the shared A frozen at its common initialisation, only the B experts "
        "train, FFA-LoRA; = --run-config \"sharing=down freeze-shared=true\") or svd (the clients' "
        "mean update re-factored by a truncated SVD, FlexLoRA; also for clients of different ranks, "
        "--run-config \"client-ranks='8,4,2'\").",
    ),
    partitioner: str = typer.Option("iid", help="iid or dirichlet (GLUE only: it skews labels)."),
    alpha: float = typer.Option(
        0.5, help="Dirichlet concentration (with --partitioner dirichlet)."
    ),
    backbone: str = typer.Option(
        "auto",
        help="Backbone alias or local model folder; auto: minilm-l6 for GLUE tasks, smollm2-135m "
        "(a causal LM) for data-to-text tasks.",
    ),
    data_dir: Optional[Path] = typer.Option(
        None, help="Data root holding glue/<task>/ and <data-to-text task>/ (default $ADAMIX_DATA_DIR)."
    ),
    output_dir: Path = typer.Option(Path("outputs/federation"), help="Run folder to write."),
    publish: bool = typer.Option(True, help="Publish the merged global adapter into the registry."),
    registry_dir: Optional[Path] = typer.Option(
        None, "--store", help="Registry root (default: $ADAMIX_ZOO_HOME or the user cache folder)."
    ),
    deployment: bool = typer.Option(
        False, help="Real SuperNode processes instead of the simulation engine."
    ),
    run_config: str = typer.Option(
        "", help='More run-config overrides, e.g. "batch-size=32 train-limit=2000".'
    ),
    timeout: float = typer.Option(3600.0, help="Seconds before the run is abandoned."),
) -> None:
    """Run a federated AdaMix training with Flower on this machine and publish the global adapter.

    Starts its own SuperLink (and, with --deployment, one SuperNode per client) on 127.0.0.1 with
    Flower's state in a temporary FLWR_HOME, runs the app with `flwr run`, stops every process
    (also on Ctrl-C or SIGTERM).

    Faults can be injected for tests and benchmarks with the run-config keys drop-rate,
    straggler-rate and straggler-seconds (see federation/config.py).

    Examples:

        adamix-zoo federate --tasks sst2 --clients 4 --rounds 3 --partitioner dirichlet --alpha 0.5

        adamix-zoo federate --tasks sst2,rte --clients 4 --run-config "train-limit=2000"

        adamix-zoo federate --tasks e2e --clients 4 --run-config "train-limit=4000 eval-limit=200"

        adamix-zoo federate --tasks sst2 --aggregation frozen-down

        adamix-zoo federate --tasks sst2 --aggregation svd --run-config "client-ranks='8,4,2,2'"

        adamix-zoo federate --clients 20 --fraction-train 0.25 --min-clients 3 --evaluate-every 5

    Data-to-text runs train AdaMix-LoRA (rank 4, alpha 32, as the data-to-text recipe) on SmolLM2;
    the published entry has no head and serves with `adamix-zoo serve --lm`.
    """
    import json

    from flwr.common.config import parse_config_args

    from adamix_zoo.formats.files import FINAL_METRICS_FILE
    from federation.config import FederationConfig
    from federation.runtime import LocalFederation, RuntimeFailure
    from federation.task import family_of
    from registry import default_home

    data = data_dir or os.environ.get("ADAMIX_DATA_DIR")
    if not data:
        raise typer.BadParameter(
            "set --data-dir or $ADAMIX_DATA_DIR (the folder holding glue/<task>/ or <task>/)"
        )
    if aggregation not in AGGREGATION:
        raise typer.BadParameter(f"--aggregation={aggregation!r}: choose one of {', '.join(AGGREGATION)}")
    overrides = AGGREGATION[aggregation] | {
        "tasks": tasks,
        "num-clients": clients,
        "num-rounds": rounds,
        "fraction-train": fraction_train,
        "evaluate-every": evaluate_every,
        "local-steps": local_steps,
        "dp": dp,
        "partitioner": partitioner,
        "dirichlet-alpha": alpha,
        "backbone": backbone,
        "data-dir": str(Path(data).resolve()),
        "output-dir": str(output_dir.resolve()),
        # resolved here: the ServerApp runs under the SuperLink, whose environment may differ
        "registry-dir": str((registry_dir or default_home()).resolve()),
        "publish": publish,
    } | ({"min-clients": min_clients} if min_clients else {}) | (
        {"strategy": strategy} if strategy else {}
    ) | parse_config_args(
        [run_config] if run_config else None
    )
    try:
        cfg = FederationConfig.from_run_config(overrides)  # fail here, not inside the SuperLink
        family_of(cfg).check_splits(cfg)
    except (FileNotFoundError, ValueError) as err:
        raise typer.BadParameter(str(err)) from err
    from federation.server_app import RESULT_FILE

    result = cfg.output_path() / RESULT_FILE
    if result.exists():
        result.unlink()  # a leftover of an earlier run must not pass for this one

    with LocalFederation(simulation=not deployment) as fed:
        if deployment:
            for pid in range(cfg.num_clients):
                fed.add_supernode(pid, cfg.num_clients)
        try:
            fed.run(cfg.to_run_config(), timeout=timeout, echo=True)
        except RuntimeFailure as err:
            typer.secho(str(err)[-2000:], fg=typer.colors.RED, err=True)
            raise typer.Exit(1) from err
    if not result.exists():
        typer.secho(
            "the federation did not complete: the ServerApp failed (see the log above)",
            fg=typer.colors.RED,
            err=True,
        )
        raise typer.Exit(1)
    done = json.loads(result.read_text())
    typer.secho(f"global adapter written to {cfg.output_path()}", fg=typer.colors.GREEN)
    for task, folder in done["task_folders"].items():
        metrics = json.loads((Path(folder) / FINAL_METRICS_FILE).read_text())
        shown = {k: round(v, 4) for k, v in metrics.items() if isinstance(v, float)}
        typer.echo(f"{task} dev metrics (global model): {shown}")
    for ref in done["published"]:
        typer.secho(f"published {ref}", fg=typer.colors.GREEN)

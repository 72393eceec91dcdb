"""Federated AdaMix vs centralized AdaMix on all-MiniLM-L6-v2 / SST-2, in one run.

    .venv/bin/python bench/federation.py            # the protocol (FULL below)
    .venv/bin/python bench/federation.py --quick    # a smoke run (tiny subsets, 2 rounds)
    .venv/bin/python bench/federation.py --rounds 3 --local-steps 20 --strategy fedavg  # a variant

Every run is appended to bench/results/federation_runs.jsonl (what was tried, and how it did); the
run of the protocol itself also writes bench/results/federation.json and the docs section.

Federated: Flower's runtime (a local SuperLink in simulation mode, Ray backend, no dependency
installation), 4 clients holding Dirichlet(alpha) label-skewed partitions of the same training
subset, a Flower strategy over the adapter experts (and the head, single-task). Centralized: the
project's training recipe (``adamix_zoo.recipes.glue``) on the union of the partitions, with the same
total number of optimizer steps (rounds x local steps x clients) and batch size. Both report the dev
accuracy of the merged model on the same validation subset.

- ``bytes_per_client_round``: the float32 tensor payload one client receives and sends per round.
- ``bytes_ratio_vs_full_model``: that over the same for FedAvg of the whole model (backbone + head).
- ``round_overhead_fraction``: 1 - (clients' time inside the training loop) / (round wall time,
  training and evaluation phases), summed over rounds. Clients run one at a time (each simulated
  client asks for both cores), so the loop times add up. The rest is Flower messaging, process and
  model set-up, data loading, (de)serialization and the per-round evaluation.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from adamix_zoo.formats.files import FINAL_METRICS_FILE  # noqa: E402
from bench.report import RESULTS, machine, markdown_table, write_json, write_section  # noqa: E402

COMMAND = ".venv/bin/python bench/federation.py"
TARGET_RATIO = 0.95
# Sized so that the whole comparison takes about 6 minutes of a 2-core CPU. Many short rounds keep
# label-skewed clients from drifting apart; server momentum (FedAvgM, Hsu et al. 2019) makes up for
# FedAvg averaging four clients' steps into one step per round. federation_runs.jsonl has the
# variants tried (e.g. 3 x 20 steps of plain FedAvg).
FULL = {
    "clients": 4,
    "alpha": 0.5,
    "rounds": 10,
    "local_steps": 6,
    "batch_size": 16,
    "train_limit": 4000,
    "eval_limit": 872,
    "max_length": 64,
    "learning_rate": 1e-3,  # clients' AdamW, as the centralized recipe's default
    "strategy": "fedavgm",
    "server_learning_rate": 1.0,
    "server_momentum": 0.6,  # 0.9 overshoots within 10 rounds (see the runs table)
}
QUICK = FULL | {
    "rounds": 2,
    "local_steps": 3,
    "batch_size": 8,
    "train_limit": 400,
    "eval_limit": 64,
    "max_length": 32,
}
VARIANT_KEYS = ("rounds", "local_steps", "learning_rate", "strategy", "server_learning_rate",
                "server_momentum")


def data_dir() -> Path:
    root = os.environ.get("ADAMIX_DATA_DIR") or str(
        Path(__file__).resolve().parents[2] / "shared" / "data"
    )
    if not (Path(root) / "glue" / "sst2").is_dir():
        raise SystemExit(f"no GLUE data under {root}: set ADAMIX_DATA_DIR")
    return Path(root)


def federated(s: dict, out: Path, seed: int) -> tuple[dict, float]:
    from federation.runtime import LocalFederation

    run_config = {
        "tasks": "sst2",
        "backbone": "minilm-l6",
        "data-dir": str(data_dir()),
        "num-clients": s["clients"],
        "min-clients": s["clients"],
        "num-rounds": s["rounds"],
        "local-steps": s["local_steps"],
        "batch-size": s["batch_size"],
        "max-length": s["max_length"],
        "partitioner": "dirichlet",
        "dirichlet-alpha": s["alpha"],
        "train-limit": s["train_limit"],
        "eval-limit": s["eval_limit"],
        "seed": seed,
        "output-dir": str(out),
        "publish": False,
        "round-timeout": 1800.0,
        "learning-rate": s["learning_rate"],
        "strategy": s["strategy"],
        "server-learning-rate": s["server_learning_rate"],
        "server-momentum": s["server_momentum"],
    }
    start = time.perf_counter()
    with LocalFederation(simulation=True, log_dir=out.parent / "flower-logs") as fed:
        fed.run(run_config, timeout=3600)
    return json.loads((out / FINAL_METRICS_FILE).read_text()), time.perf_counter() - start


def centralized(s: dict, out: Path, seed: int) -> tuple[dict, float]:
    from adamix_zoo.recipes.glue import TrainArgs, train

    steps = s["rounds"] * s["local_steps"] * s["clients"]
    args = TrainArgs(
        task="sst2",
        method="adamix-lora",
        backbone="minilm-l6",
        data_dir=str(data_dir() / "glue"),
        output_dir=str(out),
        seed=seed,
        data_seed=seed,
        max_steps=steps,
        batch_size=s["batch_size"],
        max_length=s["max_length"],
        train_subset=s["train_limit"],
        validation_subset=s["eval_limit"],
        eval_every=steps,
        progress=False,
    )
    start = time.perf_counter()
    result = train(args)
    return {"main_metric": result.main_metric, **result.best_metrics}, time.perf_counter() - start


def full_model_bytes() -> int:
    """FedAvg of the whole model moves every backbone and head tensor (float32) down and up."""
    from transformers import AutoModel

    from adamix_zoo.backbones import resolve_backbone

    backbone = AutoModel.from_pretrained(resolve_backbone("minilm-l6"))
    params = sum(p.numel() for p in backbone.parameters()) + backbone.config.hidden_size * 2 + 2
    return 2 * 4 * params


def overhead(log: dict) -> tuple[float, float]:
    """(whole round, training phase only): share of wall time outside clients' training loops."""
    train = sum(sum(v) for v in log["client_train_seconds"].values())
    phase = sum(log["round_train_phase_seconds"].values())
    rounds = phase + sum(log["round_eval_phase_seconds"].values())
    return 1 - train / rounds, 1 - train / phase


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="tiny subsets, 2 rounds: checks the script works"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--report", action="store_true",
        help="only rewrite the docs section from federation.json and the runs file",
    )
    for key in VARIANT_KEYS:  # a variant of the protocol: appended to the runs file only
        parser.add_argument("--" + key.replace("_", "-"), type=type(FULL[key]), default=None)
    args = parser.parse_args()
    if args.report:
        write_section("federation", report(json.loads((RESULTS / "federation.json").read_text())))
        return
    changes = {k: getattr(args, k) for k in VARIANT_KEYS if getattr(args, k) is not None}
    s = (QUICK if args.quick else FULL) | changes
    with tempfile.TemporaryDirectory(prefix="bench-fed-") as tmp:
        fed, fed_seconds = federated(s, Path(tmp) / "federated", args.seed)
        central, central_seconds = centralized(s, Path(tmp) / "central", args.seed)
    log = fed["federation"]
    round_overhead, train_overhead = overhead(log)
    bytes_round = log["bytes_per_client_round"]
    results = {
        "settings": s
        | {
            "seed": args.seed,
            "task": "sst2",
            "backbone": "all-MiniLM-L6-v2",
            "method": "adamix-lora K=4 r=8",
            "total_steps": s["rounds"] * s["local_steps"] * s["clients"],
        },
        "quick": args.quick,
        "federated_accuracy": fed["accuracy"],
        "centralized_accuracy": central["accuracy"],
        "fed_vs_central_metric_ratio": fed["accuracy"] / central["accuracy"],
        "target_fed_vs_central_metric_ratio": TARGET_RATIO,
        "bytes_per_client_round": bytes_round,
        "bytes_ratio_vs_full_model": bytes_round / full_model_bytes(),
        "round_overhead_fraction": round_overhead,
        "train_phase_overhead_fraction": train_overhead,
        "federated_wall_seconds": fed_seconds,
        "centralized_wall_seconds": central_seconds,
        "rounds_aggregated": log["aggregated_rounds"],
        "machine": machine(),
        "command": " ".join([COMMAND] + sys.argv[1:]),
    }
    with (RESULTS / "federation_runs.jsonl").open("a") as runs:
        runs.write(json.dumps(results) + "\n")
    if not changes and args.seed == 0:  # the protocol itself; anything else is a variant
        write_json("federation", results)
        write_section("federation", report(results))
    print(json.dumps({k: v for k, v in results.items() if k != "machine"}, indent=2))


def strategy_text(s: dict) -> str:
    if s["strategy"] == "fedavgm":
        return f"FedAvgM, server lr {s['server_learning_rate']:g}, momentum {s['server_momentum']:g}"
    if s["strategy"] in ("fedadam", "fedyogi", "fedadagrad"):
        return f"{s['strategy']}, server lr {s['server_learning_rate']:g}"
    return s["strategy"]


def report(r: dict) -> str:
    s, m = r["settings"], r["machine"]
    rows = [
        [
            "dev accuracy, federated / centralized",
            f"{r['federated_accuracy']:.4f} / {r['centralized_accuracy']:.4f}",
        ],
        ["fed_vs_central_metric_ratio (target >= 0.95)", f"{r['fed_vs_central_metric_ratio']:.4f}"],
        ["bytes_per_client_round", f"{r['bytes_per_client_round']:,}"],
        ["bytes_ratio_vs_full_model", f"{r['bytes_ratio_vs_full_model']:.5f}"],
        [
            "round_overhead_fraction (train phase only)",
            f"{r['round_overhead_fraction']:.3f} ({r['train_phase_overhead_fraction']:.3f})",
        ],
        [
            "wall seconds, federated / centralized",
            f"{r['federated_wall_seconds']:.0f} / {r['centralized_wall_seconds']:.0f}",
        ],
    ]
    quick = " **(--quick smoke run: numbers are not meaningful)**" if r["quick"] else ""
    tried = [
        [
            f"{v['settings']['rounds']} x {v['settings']['local_steps']}",
            strategy_text(v["settings"]),
            f"{v['settings']['learning_rate']:g}",
            v["settings"].get("seed", 0),
            f"{v['federated_accuracy']:.4f} / {v['centralized_accuracy']:.4f}",
            f"{v['fed_vs_central_metric_ratio']:.4f}",
            f"{v['round_overhead_fraction']:.3f}",
            f"`{v['command']}`",
        ]
        for v in variants()
    ]
    return (
        f"## Federation{quick}\n\n"
        f"AdaMix-LoRA (K=4, r=8) on all-MiniLM-L6-v2, SST-2 ({s['train_limit']} train rows, "
        f"{s['eval_limit']} dev rows): {s['clients']} Flower clients with "
        f"Dirichlet(alpha={s['alpha']}) label-skewed partitions, {s['rounds']} rounds x "
        f"{s['local_steps']} local steps ({strategy_text(s)} over "
        f"the adapter experts and the head; client learning rate {s['learning_rate']:g}), against "
        f"centralized training with the same "
        f"{s['total_steps']} steps of batch {s['batch_size']}.\n\n"
        + markdown_table(["metric", "value"], rows)
        + f"\n\nCommand: `{r['command']}` ({m['cpu']}, {m['threads']} threads, {m['date']})."
        + "\n\nEvery run of this benchmark (bench/results/federation_runs.jsonl), each against the "
        "centralized run of its seed:\n\n"
        + markdown_table(
            ["rounds x local steps", "strategy", "client lr", "seed", "accuracy fed / central",
             "ratio", "round overhead", "command"],
            tried,
        )
    )


def variants() -> list[dict]:
    """Every full-size run logged so far (quick runs left out)."""
    path = RESULTS / "federation_runs.jsonl"
    runs = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return [v for v in runs if not v["quick"]]


if __name__ == "__main__":
    main()

"""Federated vs centralized AdaMix-LoRA on SmolLM2-135M / E2E: BLEU at equal total steps.

    .venv/bin/python bench/federation_generation.py            # the protocol (FULL below; long on 2 cores)
    .venv/bin/python bench/federation_generation.py --quick    # a smoke run (numbers not meaningful)

Federated: Flower's runtime (a local SuperLink in simulation mode), ``clients`` data-to-text clients
holding IID partitions of the same first ``train_limit`` E2E training pairs, FedAvg over the adapter
experts (the LM head is the backbone's own: nothing else trains or travels). Each client runs
``local_steps`` steps per round with a fresh AdamW at a constant learning rate. Centralized: the
data-to-text recipe (``adamix_zoo.recipes.generation``) on the same pairs with the same total number
of optimizer steps (rounds x local steps x clients) and batch size (its schedule: linear warmup and
decay). Both use the recipe's mixture (K=4, rank 4, alpha 32, task loss on the first pass, token-masked
consistency weight 1) with bf16 autocast (the default on this CPU and on CUDA), and both score greedy outputs of their merged model on the same
first ``eval_limit`` distinct dev MRs against all their references.

``run_generation_case(seed, quick)`` returns the result dict (``bench/federation.py`` calls it);
running this file prints it.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.report import data_root, machine, simulate  # noqa: E402

COMMAND = ".venv/bin/python bench/federation_generation.py"
TARGET_RATIO = 0.9
FULL: dict[str, Any] = {
    "clients": 4,
    "rounds": 10,
    "local_steps": 5,
    "batch_size": 8,
    "train_limit": 4000,  # (MR, reference) pairs; 200 total steps of 8 see 1,600 of them
    "eval_limit": 200,  # distinct dev MRs, every reference of each
    "max_length": 64,
    "max_new_tokens": 40,
    "learning_rate": 2e-3,  # the data-to-text recipe's
    "strategy": "fedavg",
}
QUICK = FULL | {
    "clients": 2,
    "rounds": 1,
    "local_steps": 2,
    "batch_size": 4,
    "train_limit": 64,
    "eval_limit": 4,
    "max_length": 48,
    "max_new_tokens": 16,
}
MIXTURE = {"num_experts": 4, "rank": 4, "alpha": 32.0, "consistency_weight": 1.0}
PRECISION = "bf16"  # both sides: the product's default where bf16 is fast


def data_dir() -> Path:
    return data_root("e2e/train.jsonl")


def total_steps(s: dict[str, Any]) -> int:
    return s["rounds"] * s["local_steps"] * s["clients"]


def federated(s: dict[str, Any], out: Path, seed: int) -> tuple[dict[str, Any], float]:
    run_config = {
        "tasks": "e2e",
        "backbone": "smollm2-135m",
        "data-dir": str(data_dir()),
        "num-clients": s["clients"],
        "min-clients": s["clients"],
        "num-rounds": s["rounds"],
        "local-steps": s["local_steps"],
        "batch-size": s["batch_size"],
        "max-length": s["max_length"],
        "train-limit": s["train_limit"],
        "eval-limit": s["eval_limit"],
        "max-new-tokens": s["max_new_tokens"],
        "learning-rate": s["learning_rate"],
        "strategy": s["strategy"],
        "num-experts": MIXTURE["num_experts"],
        "rank": MIXTURE["rank"],
        "lora-alpha": MIXTURE["alpha"],
        "consistency-weight": MIXTURE["consistency_weight"],
        "seed": seed,
        "output-dir": str(out),
        "publish": False,
        "round-timeout": 3600.0,
        "precision": PRECISION,
        "average-last-rounds": 1,  # the last round's model, as the recorded runs saved it
        "client-weighting": "partition",  # as the recorded runs weighed replies (IID: equal partitions)
    }
    return simulate(run_config, timeout=4 * 3600)


def centralized(s: dict[str, Any], out: Path, seed: int) -> tuple[dict[str, Any], float]:
    from adamix_zoo.recipes.generation import GenerationArgs, run_generation

    args = GenerationArgs.from_options(
        task="e2e", method="adamix-lora", backbone="smollm2-135m", output_dir=str(out),
        data_dir=str(data_dir()), train_size=s["train_limit"], eval_size=s["eval_limit"],
        max_length=s["max_length"], batch_size=s["batch_size"], steps=total_steps(s),
        lr=s["learning_rate"], max_new_tokens=s["max_new_tokens"], precision=PRECISION, seed=seed, **MIXTURE,
    )
    start = time.perf_counter()
    final = run_generation(args)
    return final, time.perf_counter() - start


def run_generation_case(seed: int, quick: bool) -> dict[str, Any]:
    """Federated and centralized E2E runs of one seed; the ``generation_*`` results."""
    s = QUICK if quick else FULL
    with tempfile.TemporaryDirectory(prefix="bench-fed-gen-") as tmp:
        fed, fed_seconds = federated(s, Path(tmp) / "federated", seed)
        central, central_seconds = centralized(s, Path(tmp) / "central", seed)
    return {
        "generation_fed_vs_central_bleu_ratio": fed["bleu"] / central["bleu"] if central["bleu"] else 0.0,
        "generation_target_fed_vs_central_bleu_ratio": TARGET_RATIO,
        "generation_federated_bleu": fed["bleu"],
        "generation_centralized_bleu": central["bleu"],
        "generation_federated_metrics": {k: fed[k] for k in ("bleu", "rouge_l", "nist")},
        "generation_centralized_metrics": {k: central[k] for k in ("bleu", "rouge_l", "nist")},
        "generation_eval_mrs": fed["eval_sources"],
        "generation_settings": s | {
            "seed": seed, "task": "e2e", "backbone": "SmolLM2-135M-Instruct", "method": "adamix-lora",
            **MIXTURE, "total_steps": total_steps(s), "precision": PRECISION,
        },
        "generation_quick": quick,
        "generation_rounds_aggregated": fed["federation"]["aggregated_rounds"],
        "generation_federated_wall_seconds": fed_seconds,
        "generation_centralized_wall_seconds": central_seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny subsets, 1 round: checks the script works")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    results = run_generation_case(args.seed, args.quick)
    results |= {"machine": machine(), "command": " ".join([COMMAND] + sys.argv[1:])}
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

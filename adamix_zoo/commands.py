"""CLI verbs of the core package: ``train`` and ``eval``. Each is registered onto the main app.

Option help and defaults come from ``TrainArgs`` and ``AdaMixConfig`` (one source of truth); an
option whose default differs between the GLUE and the data-to-text recipe defaults to None, which
each recipe reads as its own default. Heavy imports stay inside the command functions so
``adamix-zoo --help`` is fast.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import typer

from adamix_zoo.config import AdaMixConfig
from adamix_zoo.recipes.glue import TrainArgs

_FIELDS = {f.name: f for f in dataclasses.fields(TrainArgs)}
_MIXTURE = {f.name: f for f in dataclasses.fields(AdaMixConfig)}
_GLUE_ADAMIX = _FIELDS["adamix"].default_factory()
# Options whose default differs between the recipes: None on the command line, each recipe's own.
_RECIPE_DEFAULT = ("batch_size", "max_length", "weight_decay", "num_experts", "rank", "alpha", "bottleneck",
                   "sharing", "task_loss_passes")


def _opt(name: str, *flags: str, **kw: Any) -> Any:
    """A typer option whose default and help are TrainArgs' (or AdaMixConfig's) own."""
    f = _FIELDS.get(name) or _MIXTURE[name]
    default = f.default if name in _FIELDS else getattr(_GLUE_ADAMIX, name)
    if name in _RECIPE_DEFAULT:
        text = f"{f.metadata['help']} Default: {default} for GLUE; the data-to-text recipe's own (GenerationArgs)."
        return typer.Option(None, *flags, help=text, **kw)
    return typer.Option(default, *flags, help=f.metadata["help"], **kw)


TRAIN_HELP = """Train one method on one task (GLUE or data-to-text) and write the output folder.

Writes run_config.json, metrics.jsonl, final_metrics.json, the experts, the head, the merged
adapter (merged/), curve.png, and with --analyze-experts the single-vs-merged analysis.

Examples:

    adamix-zoo train --task sst2 --method adamix-lora --data-dir ../shared/data/glue --train-subset 2000 --max-steps 300

    adamix-zoo train --task stsb --method lora --lr 2e-3 --output-dir runs/stsb-lora

    adamix-zoo train --task rte --method adamix-adapter --few-shot 16 --analyze-experts

    torchrun --nproc_per_node 2 -m adamix_zoo train --task mrpc --method adamix-lora

    adamix-zoo train --task e2e --method adamix-lora --data-dir ../shared/data --train-subset 2000 --max-steps 300

Data-to-text tasks (e2e, webnlg, dart) run the generation recipe on a causal LM (default backbone
smollm2-135m, LoRA on q and v) and score greedy outputs with BLEU, ROUGE-L and NIST.
"""

EVAL_HELP = """Evaluate a training output folder on its task's validation split.

Examples:

    adamix-zoo eval runs/sst2-adamix-lora-s42 --data-dir ../shared/data/glue

    adamix-zoo eval runs/sst2-adamix-lora-s42 --merged          # the merged adapter folder

    adamix-zoo eval runs/sst2-adamix-lora-s42 --routing fixed --expert 2

    adamix-zoo eval runs/sst2-adamix-lora-s42 --analyze-experts --samples 16
"""


def train_command(
    task: str = _opt("task"),
    method: str = _opt("method"),
    backbone: str = _opt("backbone"),
    data_dir: str | None = _opt("data_dir", envvar="ADAMIX_DATA_DIR"),
    output_dir: str | None = _opt("output_dir"),
    seed: int = _opt("seed"),
    data_seed: int = _opt("data_seed"),
    max_steps: int = _opt("max_steps"),
    epochs: float = _opt("epochs"),
    batch_size: int | None = _opt("batch_size"),
    eval_batch_size: int = _opt("eval_batch_size"),
    lr: float | None = _opt("lr"),
    head_lr: float | None = _opt("head_lr"),
    weight_decay: float | None = _opt("weight_decay"),
    expert_lr_scale: float = _opt("expert_lr_scale"),
    warmup_ratio: float = _opt("warmup_ratio"),
    max_grad_norm: float = _opt("max_grad_norm"),
    max_length: int | None = _opt("max_length"),
    train_subset: int = _opt("train_subset"),
    validation_subset: int = _opt("validation_subset"),
    few_shot: int = _opt("few_shot"),
    eval_every: int = _opt("eval_every"),
    num_experts: int | None = _opt("num_experts"),
    rank: int | None = _opt("rank"),
    alpha: float | None = _opt("alpha"),
    bottleneck: int | None = _opt("bottleneck"),
    sharing: str | None = _opt("sharing"),
    freeze_shared: bool = _opt("freeze_shared"),
    consistency_weight: float | None = _opt("consistency_weight"),
    routing: str = _opt("routing"),
    expert_init: str = _opt("expert_init"),
    adapter_init: str = _opt("adapter_init"),
    task_loss_passes: str | None = _opt("task_loss_passes"),
    second_pass: str = _opt("second_pass"),
    precision: str = _opt("precision"),
    pooling: str = _opt("pooling"),
    head_init: str = _opt("head_init"),
    head_dropout: float = _opt("head_dropout"),
    device: str = _opt("device"),
    analyze_experts: bool = _opt("analyze_experts"),
    analysis_samples: int = _opt("analysis_samples"),
    progress: bool = _opt("progress"),
) -> None:
    from adamix_zoo.generation.nlg_tasks import NLG_TASKS
    from adamix_zoo.recipes.glue import train

    values = {k: v for k, v in locals().items() if (k in _FIELDS or k in _MIXTURE) and v is not None}
    if task in NLG_TASKS:
        _train_generation(values)
        return
    try:
        args = TrainArgs.from_options(**values)
    except ValueError as err:
        raise typer.BadParameter(str(err)) from err
    try:
        result = train(args)
    except (ValueError, OSError) as err:  # bad data, task or backbone: found before training
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from err
    summary = {"output_dir": str(result.output_dir), "best_step": result.best_step, **result.best_metrics}
    if result.analysis:
        summary["merged_minus_median_expert"] = result.analysis["merged_minus_median"]
    typer.echo(json.dumps(summary, indent=2))


def _train_generation(values: dict[str, Any]) -> None:
    """``train --task e2e|webnlg|dart``: the data-to-text recipe, with the shared options mapped;
    options left unset keep the recipe's own defaults."""
    from adamix_zoo.recipes.generation import GenerationArgs, run_generation

    v = dict(values)
    renamed = {"train_size": v.pop("train_subset", 0), "eval_size": v.pop("validation_subset", 0),
               "steps": v.pop("max_steps", 0), "lr": v.pop("lr", None)}
    shared = ("task", "method", "seed", "data_dir", "max_length", "batch_size", "warmup_ratio", "weight_decay",
              "expert_lr_scale", "max_grad_norm", "precision", *_MIXTURE)
    options = {k: x for k, x in v.items() if k in shared} | {k: x for k, x in renamed.items() if x}
    options["backbone"] = "smollm2-135m" if v["backbone"] == _FIELDS["backbone"].default else v["backbone"]
    options["output_dir"] = v.get("output_dir") or f"runs/{v['task']}-{v['method']}-s{v['seed']}"
    try:
        args = GenerationArgs.from_options(**options)
    except ValueError as err:
        raise typer.BadParameter(str(err)) from err
    try:
        final = run_generation(args)
    except (ValueError, OSError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from err
    typer.echo(json.dumps({"output_dir": args.output_dir, **final}, indent=2))


_RUN_DIR = typer.Argument(..., help="A folder written by `adamix-zoo train`.")


def eval_command(
    run_dir: Path = _RUN_DIR,
    data_dir: str | None = typer.Option(
        None, envvar="ADAMIX_DATA_DIR",
        help="Local folder of tasks; default: the folder the run trained on, else nyu-mll/glue.",
    ),
    merged: bool = typer.Option(False, help="Evaluate merged/ (the single merged adapter)."),
    routing: str = typer.Option("merged", help="Expert routing: merged, fixed or random."),
    expert: int = typer.Option(0, help="The expert used with --routing fixed."),
    validation_subset: int = typer.Option(0, help="Fixed random subset of the validation split."),
    analyze_experts: bool = typer.Option(False, help="Single adapters vs merged; writes a plot."),
    samples: int = typer.Option(8, help="Random single adapters for --analyze-experts."),
    device: str = typer.Option("auto", help="auto (cuda when present), cpu, cuda or cuda:N."),
) -> None:
    from adamix_zoo.evaluation import analyze_run, evaluate_run

    try:
        if analyze_experts:
            result = analyze_run(run_dir, data_dir, samples, validation_subset, device)
        else:
            result = evaluate_run(run_dir, data_dir, merged, routing, expert, validation_subset,
                                  device=device)
    except (ValueError, OSError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from err
    typer.echo(json.dumps(result, indent=2))


def register(app: typer.Typer) -> None:
    """Add this module's verbs to ``app``."""
    app.command("train", help=TRAIN_HELP)(train_command)
    app.command("eval", help=EVAL_HELP)(eval_command)

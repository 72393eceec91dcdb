"""Fidelity benchmark: does AdaMix beat its base method (the paper's claim), at 1x and 2x budget?

all-MiniLM-L6-v2 on rte, mrpc, stsb, sst2 (full train splits, full dev sets); methods full, lora,
adapter, adamix-lora, adamix-adapter. Stages, run in this order and each resumable (every finished
run is one line of bench/results/fidelity_runs.jsonl, keyed by its settings and the protocol hash):

1. ``grid``: learning rates per method from LR_GRID (widened past an edge while the best rate sits
   on it), seed GRID_SEED, 1x budget; the rate with the
   best task average is chosen for that method (and its AdaMix variant shares the grid, not the pick).
2. ``report``: REPORT_SEEDS at the chosen rates, every method at 1x (BASE_STEPS) and the AdaMix
   methods plus lora / adapter (the control for "more steps") at 2x.
3. ``curve``: lora and adamix-lora on stsb and sst2 at CURVE_STEPS, for the budget curve PNG.
4. ``merge``: the best 1x AdaMix-LoRA run folder of each task (runs/fidelity/, any seed at the chosen
   rate) merged across all four tasks by ``bench/registry.py`` (bench/results/registry.json).

``--ablation`` runs ABLATIONS instead: one choice changed at a time, seed GRID_SEED, on ABLATION_TASKS.

    .venv/bin/python bench/fidelity.py                 # all stages (hours on 2 CPU cores; resumable)
    .venv/bin/python bench/fidelity.py --stage grid    # one stage
    .venv/bin/python bench/fidelity.py --ablation      # the one-change ablations
    .venv/bin/python bench/fidelity.py --report-only   # rewrite json, docs and PNG from finished runs
    .venv/bin/python bench/fidelity.py --quick         # a tiny end-to-end check (~1 minute)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import resource
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import RESULTS, ROOT, machine, markdown_table, require_fast_bf16, write_json, write_section

TASKS = ("rte", "mrpc", "stsb", "sst2")
METHODS = ("full", "lora", "adapter", "adamix-lora", "adamix-adapter")
BASE_OF = {"adamix-lora": "lora", "adamix-adapter": "adapter"}
GRID_SEED = 0
REPORT_SEEDS = (1, 2, 3)
BASE_STEPS = 600
CURVE_STEPS = (150, 300)
CURVE_TASKS = ("stsb", "sst2")
# One protocol for every method: full train split, full dev set, batch 16, max length 128 (dynamic
# padding), AdamW with 6% warmup and linear decay, 4 dev evaluations per run keeping the best (GLUE
# dev-set practice), the library's defaults for everything else (AdaMixConfig, TrainArgs).
PROTOCOL: dict[str, Any] = {
    "backbone": "minilm-l6",
    "train_subset": 0,
    "validation_subset": 0,
    "data_seed": 0,
    "max_length": 128,
    "batch_size": 16,
    "warmup_ratio": 0.06,
    "head_lr": 1e-2,
    "analysis_samples": 4,
    "precision": "bf16",
}
EVALS_PER_RUN = 4
LR_GRID = {
    "full": (2e-5, 5e-5, 1e-4),
    "lora": (5e-4, 1e-3, 2e-3),
    "adamix-lora": (5e-4, 1e-3, 2e-3),
    "adapter": (5e-4, 1e-3, 2e-3),
    "adamix-adapter": (5e-4, 1e-3, 2e-3),
}
MAX_GRID_WIDENING = 2  # extra rates past the grid's edges, in all, per method
QUICK = {"train_subset": 200, "validation_subset": 64, "max_length": 64}
# One choice changed at a time against the library default (lr 1e-3): name -> (method, changes).
ABLATION_TASKS = ("stsb", "sst2")
ABLATION_LR = 1e-3
# Each variant names its settings in full, so a later change of the library's defaults cannot
# change what a stored run means.
ROW = {"routing": "row", "expert_init": "identical"}
ABLATIONS: dict[str, tuple[str, dict[str, Any]]] = {
    "lora": ("lora", {}),
    "adamix-lora: row routing, identical init": ("adamix-lora", ROW),
    "routing=batch": ("adamix-lora", ROW | {"routing": "batch"}),
    "expert_init=independent": ("adamix-lora", ROW | {"expert_init": "independent"}),
    "routing=batch, expert_init=independent (before)": ("adamix-lora", {"routing": "batch", "expert_init": "independent"}),
    "consistency_weight=0": ("adamix-lora", ROW | {"consistency_weight": 0.0}),
    "task_loss_passes=first": ("adamix-lora", ROW | {"task_loss_passes": "first"}),
    "num_experts=2": ("adamix-lora", ROW | {"num_experts": 2}),
    "sharing=down": ("adamix-lora", ROW | {"sharing": "down"}),
    "second_pass=target": ("adamix-lora", ROW | {"second_pass": "target"}),
    # the 1/K correction: each expert's rate times sqrt(K) = 2, with either routing
    "expert_lr_scale=2": ("adamix-lora", ROW | {"expert_lr_scale": 2.0}),
    "routing=batch, expert_lr_scale=2": ("adamix-lora", ROW | {"routing": "batch", "expert_lr_scale": 2.0}),
    "adapter": ("adapter", {"adapter_init": "normal"}),
    "adamix-adapter: row routing, identical init": ("adamix-adapter", ROW | {"adapter_init": "normal"}),
    "adamix-adapter routing=batch, expert_init=independent": (
        "adamix-adapter", {"routing": "batch", "expert_init": "independent", "adapter_init": "normal"}),
    "adamix-adapter adapter_init=zero-up": ("adamix-adapter", ROW | {"adapter_init": "zero-up"}),
}
PAPER = "BERT-base GLUE average: AdaMix 84.5, Houlsby 83.0, full fine-tuning 82.7, LoRA 82.2 (Wang et al., 2022)"
LOG = RESULTS / "fidelity_runs.jsonl"
# The 1x AdaMix-LoRA runs keep their run folders: the best of each task feeds the cross-task merge.
SAVED_METHOD = "adamix-lora"
RUNS_DIR = ROOT / "runs" / "fidelity"
CURVE_PNG = ROOT / "docs" / "fidelity_budget_curve.png"


def protocol_id(protocol: dict[str, Any]) -> str:
    """A short hash of the shared protocol: runs of another protocol are never reused."""
    return hashlib.sha256(json.dumps(protocol, sort_keys=True).encode()).hexdigest()[:12]


def run_key(run: dict[str, Any]) -> str:
    fields = ("task", "method", "seed", "lr", "max_steps", "variant")
    return json.dumps([run.get(f) for f in fields])


def load_runs(pid: str, log: Path = LOG) -> dict[str, dict[str, Any]]:
    runs: dict[str, dict[str, Any]] = {}
    if log.exists():
        for line in log.read_text().splitlines():
            run = json.loads(line)
            if run.get("protocol_id") == pid:
                runs[run_key(run)] = run
                if run.get("variant") and _is_default(run["changes"]):
                    # An ablation row that spells out the defaults is also the plain run.
                    runs.setdefault(run_key(run | {"variant": None}), run | {"variant": None})
    return runs


def _is_default(changes: dict[str, Any]) -> bool:
    """Whether every change is the library default (the mixture's, or else the recipe's)."""
    from adamix_zoo.config import AdaMixConfig
    from adamix_zoo.recipes.glue import TrainArgs

    mixture, recipe = AdaMixConfig(), TrainArgs()
    return all(getattr(mixture if hasattr(mixture, k) else recipe, k) == v for k, v in changes.items())


def spec(task: str, method: str, seed: int, lr: float, steps: int, variant: str | None = None,
         changes: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"task": task, "method": method, "seed": seed, "lr": lr, "max_steps": steps,
            "variant": variant, "changes": changes or {}}


def run_one(job: dict[str, Any], protocol: dict[str, Any], data_dir: str) -> dict[str, Any]:
    """Train one job; returns its best dev score x100, the merged-vs-single analysis and timings."""
    from adamix_zoo.recipes.glue import train, train_args

    steps = job["max_steps"]
    folder = saved_folder(job)
    args = train_args(
        task=job["task"], method=job["method"], seed=job["seed"], data_dir=data_dir, lr=job["lr"],
        max_steps=steps, eval_every=max(1, steps // EVALS_PER_RUN), save=folder is not None,
        output_dir=str(folder or RUNS_DIR / "unsaved"), progress=False,
        analyze_experts=job["method"].startswith("adamix-"), **(protocol | job["changes"]),
    )
    wall, cpu = time.perf_counter(), _cpu_seconds()
    result = train(args)
    run = {k: job[k] for k in ("task", "method", "seed", "lr", "max_steps", "variant")}
    run |= {"changes": job["changes"], "metric": result.main_metric, "score": 100 * result.best,
            "best_step": result.best_step, "metrics": result.best_metrics,
            "curve": [[h["step"], 100 * h["metrics"][result.main_metric]] for h in result.history],
            "wall_s": time.perf_counter() - wall, "cpu_s": _cpu_seconds() - cpu}
    if folder is not None:
        run["folder"] = str(folder.relative_to(ROOT))
    if result.analysis:
        a = result.analysis
        run["analysis"] = {k: a[k] for k in ("merged", "fixed", "random", "median_single")}
        run["merged_minus_median"] = 100 * a["merged_minus_median"]
    return run


def saved_folder(job: dict[str, Any]) -> Path | None:
    """Where a 1x AdaMix-LoRA run of the protocol writes its run folder (None: not saved)."""
    if job["method"] != SAVED_METHOD or job["max_steps"] != BASE_STEPS or job["variant"]:
        return None
    return RUNS_DIR / f"{job['task']}-seed{job['seed']}-lr{job['lr']:g}"


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)  # one core per worker: better throughput than two threads per run


def execute(jobs: list[dict[str, Any]], protocol: dict[str, Any], data_dir: str, workers: int,
            done: dict[str, dict[str, Any]], log: Path = LOG) -> None:
    """Run the jobs not yet in ``done``, appending each finished run to ``log`` as it lands."""
    pid = protocol_id(protocol)
    cost = {run_key(j): estimated_cpu_s(j, done) for j in jobs if run_key(j) not in done}
    # Longest first, so that the last runs of a batch, which leave a worker idle, are short ones.
    todo = sorted((j for j in jobs if run_key(j) in cost), key=lambda j: -cost[run_key(j)])
    if not todo:
        return
    print(f"{len(todo)} runs to do, about {sum(cost.values()) / 3600:.1f} CPU hours", flush=True)

    def record(run: dict[str, Any]) -> None:
        run["protocol_id"] = pid
        with open(log, "a") as f:
            f.write(json.dumps(run) + "\n")
        done[run_key(run)] = run
        print(f"{run['task']:5s} {run['method']:15s} seed {run['seed']} lr {run['lr']:g} "
              f"{run['max_steps']} steps {run['variant'] or ''}: {run['score']:.2f} "
              f"({run['cpu_s']:.0f} s cpu)", flush=True)

    if workers <= 1:
        for job in todo:
            record(run_one(job, protocol, data_dir))
        return
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker) as pool:
        futures = [pool.submit(run_one, j, protocol, data_dir) for j in todo]
        for future in as_completed(futures):
            record(future.result())


def estimated_cpu_s(job: dict[str, Any], done: dict[str, dict[str, Any]]) -> float:
    """The CPU seconds a job should take: its steps at the per-step cost of the finished runs of its
    method and task (of all finished runs while it has none; 1 s a step before any)."""
    def per_step(runs: list[dict[str, Any]]) -> float | None:
        return _mean([r["cpu_s"] / r["max_steps"] for r in runs])

    runs = list(done.values())
    same = [r for r in runs if r["method"] == job["method"] and r["task"] == job["task"]]
    return (per_step(same) or per_step(runs) or 1.0) * job["max_steps"]


def pending_jobs(done: dict[str, dict[str, Any]], tasks: tuple[str, ...], seeds: tuple[int, ...],
                 steps: int) -> list[dict[str, Any]]:
    """The grid, report and curve runs not done yet, as far as they are known: a method whose grid
    is not complete stands in at its first rate (the cost does not depend on it), and a grid
    that widens adds runs."""
    lrs = {m: LR_GRID[m][0] for m in METHODS} | chosen_lr(done, tasks, steps)
    jobs = grid_jobs(done, tasks, steps) + report_jobs(tasks, seeds, lrs, steps) + curve_jobs(tasks, seeds, lrs)
    return [j for j in jobs if run_key(j) not in done]


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def _find(done: dict[str, dict[str, Any]], *args: Any) -> dict[str, Any] | None:
    return done.get(run_key(spec(*args)))


# -- stages ----------------------------------------------------------------------------------------
def _grid_averages(done, method: str, lrs: list[float], tasks: tuple[str, ...], steps: int) -> dict[float, float]:
    """Task averages on GRID_SEED of the rates whose runs on every task are done."""
    averages = {}
    for lr in lrs:
        scores = [r["score"] for t in tasks if (r := _find(done, t, method, GRID_SEED, lr, steps))]
        if len(scores) == len(tasks):
            averages[lr] = _mean(scores)
    return averages


def lr_grid(done, method: str, tasks: tuple[str, ...], steps: int) -> list[float]:
    """LR_GRID[method], widened by a factor 2 past an edge while the best rate sits on it (at most
    MAX_GRID_WIDENING times a side): a choice at the grid's edge may not be the best rate."""
    grid = list(LR_GRID[method])
    for _ in range(2 * MAX_GRID_WIDENING):
        averages = _grid_averages(done, method, grid, tasks, steps)
        if len(averages) < len(grid):
            break
        best = max(averages, key=averages.get)
        widened = sum(lr not in LR_GRID[method] for lr in grid)
        if best == grid[-1] and widened < MAX_GRID_WIDENING:
            grid.append(grid[-1] * 2)
        elif best == grid[0] and widened < MAX_GRID_WIDENING:
            grid.insert(0, grid[0] / 2)
        else:
            break
    return grid


def grid_jobs(done, tasks: tuple[str, ...], steps: int) -> list[dict[str, Any]]:
    return [spec(t, m, GRID_SEED, lr, steps) for m in METHODS for lr in lr_grid(done, m, tasks, steps) for t in tasks]


def chosen_lr(done: dict[str, dict[str, Any]], tasks: tuple[str, ...], steps: int) -> dict[str, float]:
    """Per method, the grid rate with the best task average on GRID_SEED (complete grids only)."""
    chosen = {}
    for method in METHODS:
        grid = lr_grid(done, method, tasks, steps)
        averages = _grid_averages(done, method, grid, tasks, steps)
        if len(averages) == len(grid):
            chosen[method] = max(averages, key=averages.get)
    return chosen


def report_jobs(tasks, seeds, lrs: dict[str, float], steps: int) -> list[dict[str, Any]]:
    jobs = []
    for seed in seeds:
        for task in tasks:
            jobs += [spec(task, m, seed, lrs[m], steps) for m in METHODS if m in lrs]
            jobs += [spec(task, m, seed, lrs[m], 2 * steps) for m in METHODS if m != "full" and m in lrs]
    return jobs


def curve_jobs(tasks, seeds, lrs: dict[str, float]) -> list[dict[str, Any]]:
    return [spec(t, m, s, lrs[m], n) for s in seeds for t in tasks if t in CURVE_TASKS
            for m in ("lora", "adamix-lora") if m in lrs for n in CURVE_STEPS]


def ablation_jobs(tasks: tuple[str, ...], steps: int) -> list[dict[str, Any]]:
    return [spec(t, method, GRID_SEED, ABLATION_LR, steps, variant, changes)
            for variant, (method, changes) in ABLATIONS.items() for t in tasks]


def best_saved_runs(done: dict[str, dict[str, Any]], tasks: tuple[str, ...], lrs: dict[str, float]) -> list[dict[str, Any]]:
    """Per task, the best-scoring 1x AdaMix-LoRA run at the chosen rate, over all seeds ([] until every
    task has one)."""
    best = []
    for task in tasks:
        runs = [r for r in done.values() if r["task"] == task and r["method"] == SAVED_METHOD
                and r["max_steps"] == BASE_STEPS and not r["variant"] and r["lr"] == lrs.get(SAVED_METHOD)
                and r.get("folder")]
        if not runs:
            return []
        best.append(max(runs, key=lambda r: r["score"]))
    return best


def rebuild_folders(runs: list[dict[str, Any]], protocol: dict[str, Any], data_dir: str, workers: int) -> None:
    """Train again the runs whose folder is not on this machine (runs/ is not committed: a fresh
    checkout has none): the same job and seed on the same single-threaded workers rebuilds the
    adapter that was scored. The rebuilt score is printed beside the recorded one, not logged again."""
    missing = [r for r in runs if not (ROOT / r["folder"]).is_dir()]
    if not missing:
        return
    print(f"rebuilding {len(missing)} run folders for the cross-task merge", flush=True)
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker) as pool:
        jobs = [spec(r["task"], r["method"], r["seed"], r["lr"], r["max_steps"]) for r in missing]
        rebuilt = pool.map(run_one, jobs, [protocol] * len(jobs), [data_dir] * len(jobs))
        for recorded, run in zip(missing, rebuilt):
            print(f"{run['folder']}: {run['score']:.2f} (recorded {recorded['score']:.2f})", flush=True)


def cross_task_merge(done: dict[str, dict[str, Any]], tasks: tuple[str, ...], lrs: dict[str, float],
                     protocol: dict[str, Any], data_dir: str, workers: int) -> None:
    """``bench/registry.py`` over the best 1x AdaMix-LoRA adapter of every task at once."""
    from bench import registry

    runs = best_saved_runs(done, tasks, lrs)
    if not runs:
        print("cross-task merge: waiting for a saved AdaMix-LoRA run of every task", flush=True)
        return
    rebuild_folders(runs, protocol, data_dir, workers)
    folders = [os.path.relpath(ROOT / r["folder"]) for r in runs]
    registry.main(["--runs", *folders, "--data-dir", data_dir])


# -- summary -----------------------------------------------------------------------------------------
def summarize(done, tasks, seeds, lrs: dict[str, float], steps: int) -> dict[str, Any]:
    """Task averages per method and budget (mean over seeds per task, then over tasks)."""

    def scores(task: str, method: str, n: int) -> list[float]:
        return [r["score"] for s in seeds if method in lrs and (r := _find(done, task, method, s, lrs[method], n))]

    summary: dict[str, Any] = {}
    per_task: dict[str, dict[str, float | None]] = {}
    for method in METHODS:
        for factor, suffix in ((1, ""), (2, "_2x")):
            if method == "full" and factor == 2:
                continue
            key = f"{method.replace('-', '_')}_avg{suffix}"
            means = {t: _mean(v) if len(v := scores(t, method, factor * steps)) == len(seeds) else None
                     for t in tasks}
            per_task[key] = means
            summary[key] = _mean(list(means.values())) if None not in means.values() else None
    stsb = {n: _min(scores("stsb", "adamix-lora", n)) for n in (steps, 2 * steps)}
    best = max((n for n in stsb if stsb[n] is not None), key=lambda n: _mean(scores("stsb", "adamix-lora", n)),
               default=None)
    summary["stsb_adamix_lora_min_seed"] = stsb[best] if best else None
    summary["stsb_adamix_lora_best_budget"] = best
    gaps = [r for r in done.values() if "merged_minus_median" in r and r["seed"] in seeds
            and r["variant"] is None and r["task"] in tasks and lrs.get(r["method"]) == r["lr"]]
    task_gaps = [_mean([r["merged_minus_median"] for r in gaps if r["task"] == t]) for t in tasks]
    summary["merged_minus_median_expert"] = _mean([g for g in task_gaps if g is not None])
    summary["merged_beats_median_share"] = _mean([float(r["merged_minus_median"] > 0) for r in gaps])
    summary["per_task"] = per_task
    summary["targets"] = targets(summary)
    return summary


def _min(values: list[float]) -> float | None:
    return min(values) if values else None


def targets(s: dict[str, Any]) -> dict[str, bool | None]:
    def ge(a: str, b: str, margin: float = 0.0) -> bool | None:
        return None if s.get(a) is None or s.get(b) is None else s[a] >= s[b] + margin

    mm, stsb = s["merged_minus_median_expert"], s["stsb_adamix_lora_min_seed"]
    return {
        "adamix_lora_avg_2x >= lora_avg + 0.5": ge("adamix_lora_avg_2x", "lora_avg", 0.5),
        "adamix_lora_avg_2x >= lora_avg_2x": ge("adamix_lora_avg_2x", "lora_avg_2x"),
        "adamix_adapter_avg_2x >= adapter_avg + 0.5": ge("adamix_adapter_avg_2x", "adapter_avg", 0.5),
        "adamix_adapter_avg_2x >= adapter_avg_2x": ge("adamix_adapter_avg_2x", "adapter_avg_2x"),
        "merged_minus_median_expert > 0": None if mm is None else mm > 0,
        "stsb_adamix_lora_min_seed >= 85": None if stsb is None else stsb >= 85,
    }


def fmt(v: float | None) -> str:
    return "–" if v is None else f"{v:.2f}"


def grid_table(done, tasks, steps: int) -> str:
    rows = []
    for method in METHODS:
        for lr in lr_grid(done, method, tasks, steps):
            vals = [(r["score"] if (r := _find(done, t, method, GRID_SEED, lr, steps)) else None) for t in tasks]
            rows.append([method, f"{lr:g}", *map(fmt, vals),
                         fmt(_mean(vals) if None not in vals else None)])
    return markdown_table(["method", "lr", *tasks, "average"], rows)


def seeds_table(done, tasks, seeds, lrs, steps: int) -> str:
    rows = []
    for task in tasks:
        for method in METHODS:
            for n in (steps, 2 * steps):
                if method not in lrs or (method == "full" and n != steps):
                    continue
                vals = [(r["score"] if (r := _find(done, task, method, s, lrs[method], n)) else None) for s in seeds]
                got = [v for v in vals if v is not None]
                rows.append([task, method, n, *map(fmt, vals), fmt(_mean(got)),
                             fmt(statistics.stdev(got) if len(got) > 1 else None)])
    return markdown_table(["task", "method", "steps", *[f"seed {s}" for s in seeds], "mean", "sd"], rows)


def ablation_table(done, tasks, steps: int) -> str:
    rows = []
    for variant, (method, changes) in ABLATIONS.items():
        vals = [(r["score"] if (r := _find(done, t, method, GRID_SEED, ABLATION_LR, steps, variant)) else None)
                for t in tasks]
        runs = [r for t in tasks if (r := _find(done, t, method, GRID_SEED, ABLATION_LR, steps, variant))]
        early = _mean([r["curve"][0][1] for r in runs]) if len(runs) == len(tasks) else None
        rows.append([variant, *map(fmt, vals), fmt(_mean(vals) if None not in vals else None), fmt(early),
                     fmt(_mean([r["cpu_s"] for r in runs]))])
    return markdown_table(["variant (one change)", *tasks, "average", f"average at {steps // EVALS_PER_RUN} steps",
                           "CPU s per run"], rows)


def plot_curve(done, seeds, lrs, steps: int) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = sorted(set(CURVE_STEPS) | {steps, 2 * steps})
    fig, axes = plt.subplots(1, len(CURVE_TASKS), figsize=(5 * len(CURVE_TASKS), 3.6))
    drew = False
    for ax, task in zip(axes, CURVE_TASKS):
        for method in ("lora", "adamix-lora"):
            if method not in lrs:
                continue
            xs, ys = [], []
            for n in budgets:
                vals = [r["score"] for s in seeds if (r := _find(done, task, method, s, lrs[method], n))]
                if len(vals) == len(seeds):
                    xs.append(n)
                    ys.append(_mean(vals))
            if xs:
                ax.plot(xs, ys, marker="o", label=f"{method} (lr {lrs[method]:g})")
                drew = True
        ax.set(title=task, xlabel="training steps (batch 16)", ylabel="best dev score x100", xscale="log")
        ax.set_xticks(budgets, [str(b) for b in budgets])
        ax.legend()
    if not drew:
        plt.close(fig)
        return None
    fig.suptitle(f"AdaMix-LoRA vs LoRA by budget, all-MiniLM-L6-v2, mean of seeds {', '.join(map(str, seeds))}")
    fig.tight_layout()
    fig.savefig(CURVE_PNG, dpi=110)
    plt.close(fig)
    return CURVE_PNG


def markdown(done, summary, protocol, tasks, seeds, lrs, steps: int, cpu_total: float) -> str:
    avg_rows = []
    for method in METHODS:
        key = method.replace("-", "_")
        avg_rows.append([method, fmt(summary.get(f"{key}_avg")), fmt(summary.get(f"{key}_avg_2x"))])
    target_lines = "\n".join(f"- `{k}`: {'met' if v else ('not met' if v is False else 'pending')}"
                             for k, v in summary["targets"].items())
    chosen = ", ".join(f"{m} {v:g}" for m, v in lrs.items()) or "pending (grid not complete)"
    return f"""## Fidelity: AdaMix against its base methods at 1x and 2x budget

Claim under test: {PAPER}; AdaMix needs 1-2x its base method's steps (paper, limitations).
Backbone all-MiniLM-L6-v2, mean-pooling head. Protocol (`bench/fidelity.py`, protocol
`{protocol_id(protocol)}`): full train split, full dev set (rte 277, mrpc 408, stsb 1500, sst2 872 rows),
batch {protocol['batch_size']}, max length {protocol['max_length']}, 1x = {steps} AdamW steps, 2x = {2 * steps}
(6% warmup, linear decay), {EVALS_PER_RUN} dev evaluations per run keeping the best, head lr
{protocol['head_lr']:g}, bf16 autocast. Library defaults otherwise: AdaMix K=4, per-row routing,
identical expert init, consistency weight 1, LoRA r=8 alpha 16 on query/value, adapters bottleneck 16
after each FFN. Learning rates: grid {json.dumps({m: lr_grid(done, m, tasks, steps) for m in METHODS})} (widened
by 2x past an edge while the best rate sits on it) on seed
{GRID_SEED} at 1x; chosen (best task average): {chosen}; reported on seeds {', '.join(map(str, seeds))}.
Scores x100: accuracy (rte, sst2), F1 (mrpc), Pearson (stsb).

Command: `python bench/fidelity.py` ({fmt(cpu_total / 3600)} CPU hours so far, run as 2 single-threaded
workers; this report written on: {json.dumps(machine())}). {_left(done, tasks, seeds, steps)}
The runs need fast bf16 matmuls (a CPU with AMX or AVX-512 bf16, or a CUDA GPU): elsewhere bf16 is
emulated, tens of times slower than fp32, and the script exits before it starts a run.

### Task averages (seeds {', '.join(map(str, seeds))})
{markdown_table(["method", "1x", "2x"], avg_rows)}

Targets:
{target_lines}

Merged minus median single adapter (x100, over tasks): {fmt(summary['merged_minus_median_expert'])};
share of runs where the merged adapter beats the median single adapter: {fmt(summary['merged_beats_median_share'])}.
STS-B adamix-lora worst seed at its best budget ({summary['stsb_adamix_lora_best_budget']} steps): {fmt(summary['stsb_adamix_lora_min_seed'])}.

![budget curve](fidelity_budget_curve.png)

### Learning-rate grid (seed {GRID_SEED}, 1x)
{grid_table(done, tasks, steps)}

### Per seed
{seeds_table(done, tasks, seeds, lrs, steps)}
"""


def _left(done, tasks, seeds, steps: int) -> str:
    pending = pending_jobs(done, tasks, seeds, steps)
    if not pending:
        return "Every run is done."
    hours = sum(estimated_cpu_s(j, done) for j in pending) / 3600
    return (f"Left: {len(pending)} runs, about {hours:.1f} CPU hours (from the finished runs' cost per "
            "step; more if a grid widens).")


def write_report(done, protocol, tasks, seeds, steps: int, quick: bool) -> dict[str, Any]:
    lrs = chosen_lr(done, tasks, steps)
    summary = summarize(done, tasks, seeds, lrs, steps)
    cpu_total = sum(r["cpu_s"] for r in done.values() if r["variant"] is None)
    results = summary | {"protocol": protocol, "protocol_id": protocol_id(protocol), "lr_grid": {m: lr_grid(done, m, tasks, steps) for m in METHODS},
                         "lr": lrs, "tasks": list(tasks), "seeds": list(seeds), "grid_seed": GRID_SEED,
                         "steps_1x": steps, "runs": sum(r["variant"] is None for r in done.values()),
                         "cpu_hours": cpu_total / 3600, "machine": machine(),
                         "command": "python bench/fidelity.py"}
    if quick:
        print(json.dumps(summary, indent=2))
        return results
    write_json("fidelity", results)
    plot_curve(done, seeds, lrs, steps)
    write_section("fidelity", markdown(done, summary, protocol, tasks, seeds, lrs, steps, cpu_total))
    ablation_runs = [r for r in done.values() if r["variant"] is not None]
    if ablation_runs:
        write_section("fidelity-ablation", f"""### Fidelity ablations (seed {GRID_SEED}, lr {ABLATION_LR:g}, {steps} steps)

Each row changes one choice against the second row (row routing, identical init, consistency
weight 1, task loss on both passes, K=4, B shared); command `python bench/fidelity.py --ablation`.

{ablation_table(done, ABLATION_TASKS, steps)}
""")
    return results


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default=os.environ.get("ADAMIX_DATA_DIR", "../shared/data"))
    parser.add_argument("--stage", choices=("grid", "report", "curve", "merge", "all"), default="all")
    parser.add_argument("--ablation", action="store_true", help="the one-change ablations only")
    parser.add_argument("--report-only", action="store_true", help="rewrite the results from finished runs")
    parser.add_argument("--quick", action="store_true", help="tiny data and budget, one task, nothing written")
    parser.add_argument("--workers", type=int, default=2, help="single-threaded runs in parallel")
    opts = parser.parse_args(argv)
    protocol = PROTOCOL | (QUICK if opts.quick else {})
    tasks, seeds, steps = (("sst2",), (1,), 8) if opts.quick else (TASKS, REPORT_SEEDS, BASE_STEPS)
    log = Path(tempfile.mkdtemp()) / "quick_runs.jsonl" if opts.quick else LOG
    RESULTS.mkdir(parents=True, exist_ok=True)
    done = load_runs(protocol_id(protocol), log)
    if not opts.report_only:
        if not opts.quick:
            require_fast_bf16(protocol["precision"], "bench/fidelity.py")
        if opts.ablation:
            execute(ablation_jobs(ABLATION_TASKS, steps), protocol, opts.data_dir, opts.workers, done, log)
        else:
            if opts.stage in ("grid", "all"):
                while jobs := [j for j in grid_jobs(done, tasks, steps) if run_key(j) not in done]:
                    execute(jobs, protocol, opts.data_dir, opts.workers, done, log)  # may widen the grid
            lrs = chosen_lr(done, tasks, steps)
            # one batch for both stages: no worker waits for the other's last run in between
            jobs = report_jobs(tasks, seeds, lrs, steps) if opts.stage in ("report", "all") else []
            jobs += curve_jobs(tasks, seeds, lrs) if opts.stage in ("curve", "all") else []
            execute(jobs, protocol, opts.data_dir, opts.workers, done, log)
            if opts.stage in ("merge", "all") and not opts.quick:
                cross_task_merge(done, tasks, lrs, protocol, opts.data_dir, opts.workers)
    results = write_report(done, protocol, tasks, seeds, steps, opts.quick)
    print(json.dumps(results["targets"], indent=2))
    return results


if __name__ == "__main__":
    main()

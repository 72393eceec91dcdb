"""Cross-task merging retention: merge the adapters of GLUE tasks trained on all-MiniLM-L6-v2 and
report, per task and merge method, the merged adapter's main metric as a fraction of the
single-task adapter's (both evaluated here, in the same run, on the same validation rows).

    .venv/bin/python bench/registry.py --runs runs/sst2 runs/rte runs/mrpc   # trained run folders
    .venv/bin/python bench/registry.py --entries glue/sst2 glue/rte --store ~/zoo   # or zoo entries
    .venv/bin/python bench/registry.py --quick     # smoke: trains two tiny runs itself (minutes)

Inputs are training output folders (``adamix-zoo train`` / ``adamix_zoo.recipes.glue``) or registry
entries; runs are published into a temporary store first, so the benchmark exercises publish,
merge and attach exactly as users do. The merged entry keeps each task's head; only the adapter
is shared. ``cross_task_retention_min`` / ``_mean`` (top level) are those of the first method in
``--methods``; every method's numbers are under ``methods``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from adamix_zoo.backbones import resolve_backbone  # noqa: E402
from adamix_zoo.data import eval_loader, load_validation  # noqa: E402
from adamix_zoo.evaluation import evaluate_model  # noqa: E402
from adamix_zoo.glue_tasks import get_task  # noqa: E402
from bench.report import machine, markdown_table, write_json, write_section  # noqa: E402
from registry import Store  # noqa: E402
from registry.merging import merge_entries  # noqa: E402

DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "glue"
DEFAULT_METHODS = "linear,cat,svd,ties,dare_ties"
NEEDS_DENSITY = ("ties", "dare_linear", "dare_ties", "magnitude_prune")


def evaluate_entry(store: Store, ref: str, task: str, data_dir: Path, subset: int, batch_size: int) -> float:
    """The task's main metric of entry ``ref`` (with that task's head) on the validation split."""
    from transformers import AutoModel, AutoTokenizer

    meta = store.show(ref)
    backbone_id = meta["base_model"]["id"]
    path = resolve_backbone(backbone_id)
    model = store.attach(ref, AutoModel.from_pretrained(path), task=task)
    train_args = meta["provenance"].get("train") or {}
    if meta["method"] == "cross-task-merge":  # the source entry's training settings
        source = next(m for m in meta["provenance"]["merged_from"] if m["ref"] == meta["tasks"][task]["source"])
        train_args = source["provenance"].get("train") or {}
    spec = get_task(task)
    validation = load_validation(spec, data_dir, subset, train_args.get("data_seed", 0))
    loader = eval_loader(validation, spec, AutoTokenizer.from_pretrained(path),
                         train_args.get("max_length", 128), batch_size)
    return float(evaluate_model(model, loader, spec, "cpu")[spec.main_metric])


def quick_runs(out: Path, data_dir: Path) -> list[Path]:
    """Two tiny adamix-lora runs (sst2, rte) for a smoke test of the whole pipeline."""
    from adamix_zoo.recipes.glue import train, train_args

    runs = []
    for task in ("sst2", "rte"):
        args = train_args(task=task, data_dir=str(data_dir), output_dir=str(out / task), max_steps=30,
                         batch_size=16, train_subset=256, validation_subset=64, num_experts=2, rank=4,
                         progress=False, device="cpu")
        train(args)
        runs.append(out / task)
    return runs


def publish_inputs(store: Store, runs: list[Path], entries: list[str], source: Store | None) -> list[str]:
    refs = [store.publish(run, namespace="bench").ref for run in runs]
    for ref in entries:
        refs.append(store.import_entry(source.get(ref), namespace="bench").ref)
    return refs


def measure(store: Store, refs: list[str], methods: list[str], args: argparse.Namespace) -> dict[str, Any]:
    tasks = {ref: next(iter(store.show(ref)["tasks"])) for ref in refs}
    single = {t: evaluate_entry(store, r, t, args.data_dir, args.validation_subset, args.batch_size)
              for r, t in tasks.items()}
    results: dict[str, Any] = {}
    for method in methods:
        density = args.density if method.removesuffix("_svd") in NEEDS_DENSITY else None
        svd_rank = sum(store.show(r)["rank"] or 0 for r in refs) if method == "svd" else None
        start = time.perf_counter()
        merged = merge_entries(store, refs, None, method, density, svd_rank or None, seed=args.seed,
                               task=f"merged-{method}", namespace="bench")
        seconds = time.perf_counter() - start
        per_task = {}
        for task in tasks.values():
            value = evaluate_entry(store, merged.ref, task, args.data_dir, args.validation_subset, args.batch_size)
            per_task[task] = {"single": single[task], "merged": value,
                              "retention": value / single[task] if single[task] else float("nan")}
        retentions = [v["retention"] for v in per_task.values()]
        results[method] = {"per_task": per_task, "retention_min": min(retentions),
                           "retention_mean": statistics.fmean(retentions), "density": density,
                           "svd_rank": svd_rank, "exact_delta_w": store.show(merged.ref)["merge"]["exact"],
                           "merge_seconds": seconds}
    return {"single": single, "methods": results}


def report(results: dict[str, Any], methods: list[str], command: str, quick: bool) -> None:
    primary = results["methods"][methods[0]]
    payload = {
        "cross_task_retention_min": primary["retention_min"],
        "cross_task_retention_mean": primary["retention_mean"],
        "tasks_merged": list(results["single"]),
        "primary_method": methods[0],
        "weights": "1/n each (an average)",
        "quick": quick,
        "command": command,
        "machine": machine(),
        **results,
    }
    write_json("registry", payload)
    rows = [[m, t, v["single"], v["merged"], v["retention"]]
            for m, r in results["methods"].items() for t, v in r["per_task"].items()]
    summary = [[m, r["retention_min"], r["retention_mean"], r["exact_delta_w"]] for m, r in results["methods"].items()]
    write_section("registry", "\n\n".join([
        "## Registry: cross-task merging retention" + (" (quick smoke run, not a result)" if quick else ""),
        f"Command: `{command}`. Adapters of {', '.join(results['single'])} trained on all-MiniLM-L6-v2, merged "
        "with equal weights; each task keeps its own head. Retention = merged adapter's main metric / the "
        "single-task adapter's, on the same validation rows.",
        markdown_table(["method", "retention min", "retention mean", "exact in delta-W"], summary),
        markdown_table(["method", "task", "single", "merged", "retention"], rows),
    ]))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="*", type=Path, default=[], help="Training output folders.")
    parser.add_argument("--entries", nargs="*", default=[], help="Registry entries (with --store).")
    parser.add_argument("--store", type=Path, default=None, help="Store holding --entries.")
    parser.add_argument("--methods", default=DEFAULT_METHODS, help="Comma-separated merge methods.")
    parser.add_argument("--density", type=float, default=0.5, help="Density for TIES / DARE.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of DARE's masks.")
    parser.add_argument("--data-dir", type=Path, default=DATA_DIR, help="GLUE folder (hub schema).")
    parser.add_argument("--validation-subset", type=int, default=0, help="Rows per task; 0 = all.")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--quick", action="store_true", help="Train two tiny runs and merge them (smoke).")
    args = parser.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    with tempfile.TemporaryDirectory() as tmp:
        runs = list(args.runs)
        if args.quick:
            runs, methods = quick_runs(Path(tmp) / "runs", args.data_dir), methods[:2]
            args.validation_subset = args.validation_subset or 64
        if len(runs) + len(args.entries) < 2:
            parser.error("give at least two --runs / --entries (or --quick)")
        store = Store(Path(tmp) / "store")
        refs = publish_inputs(store, runs, args.entries, Store(args.store) if args.entries else None)
        results = measure(store, refs, methods, args)
    command = "python bench/registry.py " + " ".join(sys.argv[1:] if argv is None else argv)
    report(results, methods, command, args.quick)
    print(f"retention ({methods[0]}): min {results['methods'][methods[0]]['retention_min']:.3f}, "
          f"mean {results['methods'][methods[0]]['retention_mean']:.3f}")


if __name__ == "__main__":
    torch.manual_seed(0)
    main()

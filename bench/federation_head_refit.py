"""Is the federated model's gap to centralized training in its head? A closed-form head refit.

    .venv/bin/python bench/federation_head_refit.py                 # about 25 min on 2 CPU cores
    .venv/bin/python bench/federation_head_refit.py --work DIR      # keep (and reuse) the run folders

Label skew can leave a federated head biased even where the experts learned well, and CCVR (Luo et
al., NeurIPS 2021) or Fed3R (Fanì et al., ICML 2024) refit it at the end from statistics the clients
can send: class counts, class feature sums and the feature scatter (sum of x x^T). These determine a
linear discriminant (LDA: shared covariance, the federation's class priors) or a ridge regression on
one-hot targets exactly, whatever the partition, so a federation could run them as one extra round.

This script trains the report's federated setting (bench/federation.py's report settings at the
hyperparameters chosen on the selection set its diagnoses ran on, DIAGNOSIS_SELECTION) on that
selection set for seeds SELECT_SEED and CONFIRM_SEED, and on the dev set
for REPORT_SEEDS[0] (the seed whose ratio missed the target), then scores, on the rows each run
reports on: the federated head as trained, LDA and ridge refits from the pooled statistics of the
training rows, and a logistic regression on those features (what a centralized refit could reach;
no federated closed form). A refit that does not lead the trained head on both selection seeds is
not one the federation should run. Writes bench/results/federation_head_refit.json and its section
of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import bench.federation as fed  # noqa: E402
from adamix_zoo.head_init import FeatureStatistics, lda_head  # noqa: E402
from bench.report import markdown_table, write_json, write_section  # noqa: E402

COMMAND = ".venv/bin/python bench/federation_head_refit.py"
RUNS = (("select", fed.SELECT_SEED), ("select", fed.CONFIRM_SEED), ("report", fed.REPORT_SEEDS[0]))
LDA_SHRINKAGE = (1e-3, 1e-1)  # of the scatter's mean diagonal, added to the within-class covariance
RIDGE_PENALTY = (1e-2, 10.0)
LOGISTIC_C = (0.1, 1.0)


def features(folder: Path, run_config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The saved global model's pooled features (the head's input, float64) and labels, on the
    training rows the clients held and on the validation rows the run reported."""
    from adamix_zoo.evaluation import load_run
    from federation.config import FederationConfig
    from federation.glue_client import GLUE

    cfg = FederationConfig.from_run_config(run_config)
    model, _ = load_run(folder)
    task = cfg.task_list[0]
    out = {"weight": model.head.classifier.weight.detach().double(),
           "bias": model.head.classifier.bias.detach().double()}
    for split in ("train", "validation"):
        examples = GLUE.encode(cfg, task, GLUE.load_rows(cfg, task, split))
        pooled, labels = [], []
        with torch.no_grad():
            for start in range(0, len(examples), 64):
                batch = GLUE.collate(cfg, task, examples[start : start + 64])
                hidden = model.backbone(input_ids=batch["input_ids"],
                                        attention_mask=batch["attention_mask"]).last_hidden_state
                pooled.append(model.head.pool(hidden, batch["attention_mask"]).double())
                labels.append(batch["labels"])
        out[f"{split}_x"], out[f"{split}_y"] = torch.cat(pooled), torch.cat(labels)
    return out


def ridge_head(stats: FeatureStatistics, penalty: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Ridge regression of one-hot targets on [x, 1] (the bias column penalised alike): weight
    (K, d), bias (K,). [x 1]^T [x 1] and [x 1]^T onehot(y) are sums of the same statistics."""
    counts, sums, scatter = stats.counts, stats.sums, stats.scatter
    total = sums.sum(0)
    gram = torch.cat([torch.cat([scatter, total[:, None]], 1), torch.cat([total, counts.sum()[None]])[None]], 0)
    solved = torch.linalg.solve(gram + penalty * torch.eye(len(gram), dtype=gram.dtype),
                                torch.cat([sums.T, counts[None]], 0))
    return solved[:-1].T, solved[-1]


def refits(f: dict[str, torch.Tensor]) -> dict[str, float]:
    """Validation accuracy of the trained head and of each refit from the training features."""
    from sklearn.linear_model import LogisticRegression

    x, y, xv, yv = f["train_x"], f["train_y"], f["validation_x"], f["validation_y"]

    def accuracy(head: tuple[torch.Tensor, torch.Tensor]) -> float:
        return float(((xv @ head[0].T + head[1]).argmax(1) == yv).double().mean())

    scores = {"trained head": accuracy((f["weight"], f["bias"]))}
    stats = FeatureStatistics.of(x, y, len(f["bias"]))
    for shrinkage in LDA_SHRINKAGE:
        scores[f"LDA, shrinkage {shrinkage:g}"] = accuracy(lda_head(stats, shrinkage))
    for penalty in RIDGE_PENALTY:
        scores[f"ridge, penalty {penalty:g}"] = accuracy(ridge_head(stats, penalty))
    for c in LOGISTIC_C:
        fit = LogisticRegression(C=c, max_iter=2000).fit(x.numpy(), y.numpy())
        scores[f"logistic regression, C {c:g} (centralized refit)"] = float((fit.predict(xv.numpy()) == yv.numpy()).mean())
    return scores


def chosen_hp() -> dict[str, Any]:
    """The federated choice of the selection set the diagnoses ran on (fed.DIAGNOSIS_SELECTION)."""
    done = fed.load_runs(fed.protocol_id(fed.PROTOCOL), fed.LOG)
    hp = fed.chosen(done, "federated", fed.grid("federated", fed.DIAGNOSIS_SELECTION), fed.DIAGNOSIS_SELECTION)
    if hp is None:
        raise SystemExit("bench/federation.py's select stage has not finished on the "
                         f"{fed.DIAGNOSIS_SELECTION} set")
    return hp


def train(stage: str, seed: int, hp: dict[str, Any], work: Path) -> tuple[Path, dict[str, Any]]:
    """The report's federated setting on ``stage``'s data: its run folder and run config; a finished
    run in ``work`` is reused."""
    p, folder = fed.PROTOCOL, work / f"{stage}-{seed}" / "federated"
    root = (fed.data_dir() if stage == "report"
            else fed.selection_data(p, work / "selection-data", fed.DIAGNOSIS_SELECTION))
    args = (p, hp, seed, root, folder, fed.REPORT_SETTINGS | fed.FEDERATED_REPORT_SETTINGS)
    if not (folder / "federation_result.json").exists():
        fed.federated(*args)
    return folder, fed.federated_run_config(*args)


def report(rows: list[dict[str, Any]]) -> str:
    names = list(rows[0]["scores"])
    header = ["head"] + [f"{r['data']} seed {r['seed']}" for r in rows]
    table = [[n] + [f"{r['scores'][n]:.4f}" for r in rows] for n in names]
    selection = [r for r in rows if r["data"] == "selection"]
    led = [n for n in names[1:] if all(r["scores"][n] > r["scores"]["trained head"] for r in selection)]
    dev = [r for r in rows if r["data"] == "dev"]
    best_dev = max((r["scores"][n], n, r["seed"]) for r in dev for n in names[1:]) if dev else None
    verdict = ("Led the trained head on both selection seeds: " + "; ".join(led) + "." if led else
               "None led the trained head on both selection seeds (the refits move accuracy by up to two points "
               "either way from seed to seed), so the federation keeps the head it trained.")
    if best_dev and not led:
        verdict += (f" The dev column decides nothing: its best refit ({best_dev[1]}, {best_dev[0]:.4f} on seed "
                    f"{best_dev[2]}) would be a choice made on the rows the benchmark reports.")
    return ("## Federation: a closed-form head refit\n\nWhether a closed-form head refit from federated statistics (class counts, class feature sums, the "
            "feature scatter: LDA or ridge, as in CCVR and Fed3R) lifts the report's federated model, on the rows "
            "each run reports (selection: the held-out training rows; dev: the GLUE validation set). The logistic "
            "regression rows refit on the pooled training features, which no federation holds.\n\n"
            + markdown_table(header, table) + f"\n\n{verdict}\n\nCommand: `{COMMAND}`")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, help="folder for the run folders (default: a temporary one)")
    opts = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = opts.work or Path(tmp)
        hp, rows = chosen_hp(), []
        for stage, seed in RUNS:
            folder, run_config = train(stage, seed, hp, work)
            rows.append({"data": "selection" if stage == "select" else "dev", "seed": seed,
                         "scores": refits(features(folder, run_config))})
            print(json.dumps(rows[-1]), flush=True)
    results = {"command": COMMAND, "hp": hp, "settings": fed.REPORT_SETTINGS | fed.FEDERATED_REPORT_SETTINGS,
               "runs": rows}
    write_json("federation_head_refit", results)
    write_section("federation_head_refit", report(rows))
    return results


if __name__ == "__main__":
    main()

"""Federated AdaMix vs centralized AdaMix on all-MiniLM-L6-v2 / SST-2: the protocol, resumable.

    .venv/bin/python bench/federation.py                # every stage (about 2 h on 2 CPU cores)
    .venv/bin/python bench/federation.py --stage select # one stage
    .venv/bin/python bench/federation.py --report-only  # rewrite federation.json and the docs section
    .venv/bin/python bench/federation.py --quick        # tiny end-to-end check, nothing written
    .venv/bin/python bench/federation.py --stage diagnose --worker 0/2 &  # two workers, one per core
    .venv/bin/python bench/federation.py --stage diagnose --worker 1/2

Stages, each resumable (every finished run is one line of bench/results/federation_runs.jsonl, keyed
by its stage, side, seed, hyperparameters and the protocol hash; finished runs are skipped):

1. ``select``: the federated hyperparameters (FED_GRID: server momentum, client learning rate) and
   the centralized learning rate (CENTRAL_GRID) are chosen on a selection set that is disjoint from
   the dev rows reported: SELECTION_ROWS whole sentences held out of SST-2's *training* split (the
   runs train on the rest, less those sentences' phrases; SELECTION, ``selection_data``). Every grid
   point runs on seed SELECT_SEED (in PRECISION, the last round's model saved); the FINALISTS best
   of them run again at the report's settings (FINALIST_SETTINGS) on
   SELECT_SEED and CONFIRM_SEED, and the best mean of those two wins, per side (one seed's best of
   24 noisy runs is partly luck: the winner's curse). The finalists' first confirmation, on
   CONFIRM_SEED at the grid's settings, stays in the report as history.
   ``head-init``: each side's choice with the closed-form head (HEAD_INIT, HEAD_INIT_CHOICES) on both
   selection seeds; a side whose runs with it lead its choice's on both reports with it.
2. ``report``: REPORT_SEEDS at the chosen settings, trained on the training split and measured on
   the dev set (GLUE validation); plus the exact-aggregation mode (EXACT_MODE, when the federation
   has it), clients of different ranks (RANKS_MODE, on RANKS_SEEDS) and the generation case
   (bench/federation_generation.py, when present).
3. ``diagnose``: DIAGNOSES, the chosen federated setting with one thing changed, on the selection
   data (the first selection set, DIAGNOSIS_SELECTION, at its choice): what the gap to centralized
   training is made of.

Federated: Flower's runtime (a local SuperLink in simulation mode, Ray backend), PROTOCOL["clients"]
clients holding Dirichlet(alpha) label-skewed partitions of the training subset, a fraction of them
sampled per round, FedAvgM over the adapter experts and the head; federated client evaluation only
at the last round (the reported accuracy is the server's, on the whole dev set). Client sampling is
seeded (``federation/sampling.py``); the runs recorded before it was drew each round's clients with
Flower's unseeded sampling: an equally random draw, but one that a rerun does not repeat. Centralized: the
project's recipe (``adamix_zoo.recipes.glue``) on the union of the partitions with the same total
number of optimizer steps (rounds x local steps x clients sampled per round) and batch size.

- ``round_overhead_fraction``: 1 - (clients' time inside the training loop) / (round wall time,
  training and evaluation phases), summed over rounds. Simulated clients run one at a time (each
  asks for both cores), so the loop times add up. Split into client set-up (the ClientApp's own
  time outside its loop: model, data, packing; ``client-seconds`` of ``federation.mods``), the
  runtime between clients (Ray, messages, aggregation) and the evaluation phase.
- ``bytes_per_client_round``: the float32 payload one client receives and sends per round.
- ``aggregation_relative_error``: the round log's ``aggregation_relative_error`` of the last round
  (mean over projections), when the federation logs it; None otherwise.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.report import (  # noqa: E402
    RESULTS,
    data_root,
    machine,
    markdown_table,
    require_fast_bf16,
    simulate,
    write_json,
    write_section,
)

COMMAND = ".venv/bin/python bench/federation.py"
TARGET_RATIO = 0.95
TARGET_OVERHEAD = 0.2
TARGET_BLEU_RATIO = 0.9
LOG = RESULTS / "federation_runs.jsonl"
# 20 clients, 5 sampled per round: 20 rounds x 6 local steps x 5 clients = 600 steps, about 7 minutes
# per federated run and 5 per centralized run on 2 cores. Short rounds keep label-skewed clients
# from drifting apart; server momentum (FedAvgM, Hsu et al. 2019) makes up for averaging five
# clients' steps into one step per round.
PROTOCOL: dict[str, Any] = {
    "task": "sst2",
    "backbone": "minilm-l6",
    "clients": 20,
    "fraction_train": 0.25,
    "fraction_evaluate": 0.25,
    "alpha": 0.5,
    "rounds": 20,
    "local_steps": 6,
    "batch_size": 16,
    "train_limit": 4000,
    "eval_limit": 872,
    "max_length": 64,
    "strategy": "fedavgm",
    "server_learning_rate": 1.0,
    # both sides: warmup over the first 6% of the 600 steps, then linear decay to 0 (the federated
    # clients run their round's slice of it, ``lr-schedule=linear``)
    "lr_schedule": "linear",
    "warmup_ratio": 0.06,
    "selection_rows": 872,
    "selection_split_seed": 1234,
}
# Both sides' precision: what every run recorded before it was pinned ran as ('auto' on CPUs with AMX);
# pinned, outside PROTOCOL's hash so those runs still count, so that a run means the same on any
# machine. A diagnosis may override it ("precision" in its run-config overrides).
PRECISION = "bf16"
# The report's run-config settings, on both sides (centralized: the precision): the runs before them
# (bf16, the last round's model saved) stay in the runs file under their own keys. fp32 runs alike on
# any CPU; the selection above ran in bf16, and its choice is kept. Tail averaging over the last 5 of
# 20 rounds is the library default (a quarter of the rounds), pinned here so that the runs keep their
# meaning; the federated runs also record their last round's model (``last_round_metric``).
REPORT_SETTINGS: dict[str, Any] = {"average-last-rounds": 5, "precision": "fp32"}
# The federated sides' report settings beyond REPORT_SETTINGS (the centralized runs, which have no
# clients, keep their keys): every training reply weighted alike, the library default since the
# diagnosis "client weighting: uniform" led the partition-size weighting on both selection seeds.
FEDERATED_REPORT_SETTINGS: dict[str, Any] = {"client-weighting": "uniform"}
QUICK = {"rounds": 2, "local_steps": 3, "batch_size": 8, "train_limit": 2000, "eval_limit": 200,
         "max_length": 32, "selection_rows": 200}  # 20 Dirichlet partitions need ~100 rows each
# head_learning_rate 0: the head at the adapters' rate; 1e-2: the GLUE recipe's head rate. Server
# momentum 0 (plain FedAvg) is left out: at 20 x 6 steps it trailed 0.6 and 0.9 by 0.12-0.17 in
# selection accuracy (constant-rate protocol 6a7772000981, bench/results/federation_runs.jsonl).
# logit_adjustment: the clients' label-skew correction (tau; 0 = off). Learning rate 4e-3 was added
# to both grids once both sides' choice sat at 2e-3, the grid's edge.
LEARNING_RATES = (1e-3, 2e-3, 4e-3)
FED_GRID = [{"server_momentum": m, "learning_rate": lr, "head_learning_rate": h, "logit_adjustment": t}
            for m in (0.6, 0.9) for lr in LEARNING_RATES for h in (0.0, 1e-2) for t in (0.0, 1.0)]
# Where a side's choice on a selection set sat on an edge rate of the grid, that grid widens past it,
# the federated one at momentum 0.6 only (``widening_paragraph`` reports what the 0.9 points of the edge
# rate reached). On the phrase set the federated choice sat on the top rate (4e-3, chosen at tail
# averaging, which lets a higher rate's noisier iterates average out): 8e-3. The sentence set's grid ran
# with that widening, and both sides' choices sat on the bottom rate (1e-3; the centralized one by a tie
# with 2e-3, broken by grid order): 5e-4. The federated choice then sat on 5e-4 (head 1e-2, logit
# adjustment 1; two-seed mean 0.7753 at the report's settings): 2.5e-4.
WIDENED_RATES = {("federated", "phrases"): (8e-3,), ("federated", "sentences"): (8e-3, 5e-4, 2.5e-4),
                 ("centralized", "sentences"): (5e-4,)}
# FedAvgM's steady-state step is server_learning_rate / (1 - momentum) times the replies' mean update:
# 2.5 at the grid's momentum 0.6 and 10 at its 0.9, so the grid's momentum axis changed the step size
# and the span of rounds averaged together at once (many 0.9 points collapsed to one class). The
# sentence set's grid adds momenta at the 0.6 points' step of 2.5 (``equal_step_point``): a longer
# average over rounds (0.8, 0.9) at the same step, at the rates around its choice, with its head rate
# and logit adjustment. Added after that choice's report runs missed the target; like every grid
# point they are scored on the selection set only, but in fp32 (FP32_SCREEN: they first ran on
# a CPU without fast bf16). An edge rate of theirs, if chosen, widens as above.
EQUAL_STEP, EQUAL_STEP_MOMENTA = 2.5, (0.8, 0.9)
FP32_SCREEN: dict[str, Any] = {"precision": "fp32"}
COLLAPSED = 0.6  # a selection accuracy below it: the run predicts (nearly) one class (the majority is 0.5344)
EQUAL_STEP_GRID = {("federated", "sentences"): [
    {"learning_rate": lr, "head_learning_rate": 1e-2, "logit_adjustment": 1.0} for lr in (5e-4, 1e-3, 2e-3)]}
# The head before training (adamix_zoo.head_init): the linear discriminant (LDA) of the frozen backbone's
# features of the training rows, in the federation from the clients' summed statistics (the same head).
# Declared after the sentence set's choice missed the target, before any run of it, on the finding that
# this closed-form head alone scores 0.79 on the dev set, what the federated runs reached from a random
# head: each side's choice at FINALIST_SETTINGS with HEAD_INIT on both selection seeds, against that
# choice's finalist runs. A side whose runs with it lead those on both seeds reports with it
# (``head_init_adopted``).
HEAD_INIT: dict[str, Any] = {"head-init": "lda"}
HEAD_INIT_CHOICES: dict[str, dict[str, Any]] = {  # the sentence set's choices it ran at (before LDA_HEAD_GRID)
    "federated": {"server_momentum": 0.6, "learning_rate": 5e-4, "head_learning_rate": 1e-2, "logit_adjustment": 1.0},
    "centralized": {"learning_rate": 1e-3, "head_learning_rate": 0.0}}
# The closed-form head left the choice where it was. Started from it, though, the head no longer needs a
# rate of its own, and at the experts' rate it moves little under a larger server step, where a head at
# 1e-2 could flip to one class (the collapses that kept the grid's steps small). With AdamW clients a round moves the experts by about
# local steps x client lr x the server step, however many clients it averages: at the choice 6 x 5e-4 x 2.5,
# a quarter of what the centralized run's 30 steps at 1e-3 move in the same share of its steps. So the
# sentence set's grid adds the LDA head at the experts' rate (head lr 0) with logit adjustment 1, at
# FedAvgM steps 2.5 (momentum 0.6) and 10 (momentum 0.9) and client rates 5e-4, 1e-3, 2e-3: declared
# before any of them ran, scored like every grid point on the selection set, screened in fp32 like the
# equal-step points. An edge rate of theirs, if chosen, widens as above.
LDA_HEAD_GRID = {("federated", "sentences"): [
    {"server_momentum": m, "learning_rate": lr, "head_learning_rate": 0.0, "logit_adjustment": 1.0,
     "head_init": "lda"} for m in (0.6, 0.9) for lr in (5e-4, 1e-3, 2e-3)]}
# Settings added to the grid after runs were recorded, at the value those runs had.
HP_DEFAULTS = {side: {"logit_adjustment": 0.0} for side in ("federated", "exact", "ranks")}
CENTRAL_GRID = [{"learning_rate": lr, "head_learning_rate": h} for lr in LEARNING_RATES for h in (0.0, 1e-2)]
SELECT_SEED, CONFIRM_SEED, FINALISTS = 0, 1, 3
# The selection sets (``selection_data``). The select stage first ran on "phrases", rows held out of
# the training split at random, which are mostly phrases and partly seen in training; it runs on
# "sentences", whole training sentences none of whose phrases are trained on, like the dev rows. The
# diagnoses (and bench/federation_head_refit.py) ran on the phrase set at its choice, and stay there.
SELECTION, DIAGNOSIS_SELECTION = "sentences", "phrases"
# The finalists are compared at the settings the report runs at: the grid ran in bf16 and saved the
# last round's model, and tail averaging (a mean of the late rounds) may favour other learning rates.
FINALIST_SETTINGS = REPORT_SETTINGS
REPORT_SEEDS, GENERATION_SEEDS = (0, 1, 2), (0,)
# Run-config overrides of the exact-aggregation mode: FFA-LoRA's frozen shared down-projection
# (``adamix-zoo federate --aggregation frozen-down``); while empty, or naming keys FederationConfig
# lacks, the exact runs are skipped and their keys are None.
EXACT_MODE: dict[str, Any] = {"sharing": "down", "freeze-shared": True}
# Clients of different LoRA ranks (HetLoRA-style: missing components as sent, FedAvgM unchanged), on
# RANKS_SEEDS: what a federation of small and large clients costs against every client at rank 8.
RANKS_MODE: dict[str, Any] = {"client-ranks": "8,4,2,2"}
RANKS_SEEDS = (0,)
# One client holding every training row, 100 rounds x 6 steps (600, the centralized budget) at the
# centralized choice: a centralized run in 6-step pieces, for the fresh-AdamW diagnosis below.
ONE_CLIENT: dict[str, Any] = {
    "num-clients": 1, "min-clients": 1, "fraction-train": 1.0, "fraction-evaluate": 1.0, "num-rounds": 100,
    "evaluate-every": 100, "partitioner": "iid", "server-momentum": 0.0, "learning-rate": 2e-3,
    "logit-adjustment": 0.0, "average-last-rounds": 1, "client-weighting": "uniform", "precision": "fp32"}
# ``diagnose``: where the gap to centralized training comes from. The chosen federated setting with
# one thing changed, on the selection data (seed SELECT_SEED), against its selection accuracy.
DIAGNOSES: dict[str, dict[str, Any]] = {
    "IID partitions (no label skew)": {"partitioner": "iid"},
    "server learning rate 2 (larger server steps)": {"server-learning-rate": 2.0},
    "2 clients a round x 50 rounds (more sequential steps)": {
        "fraction-train": 0.1, "num-rounds": 50, "evaluate-every": 50},
    # an adaptive server optimizer (Reddi et al., 2021) in place of FedAvgM, at three server rates
    "FedAdam, server lr 3e-3": {"strategy": "fedadam", "server-learning-rate": 3e-3},
    "FedAdam, server lr 1e-2": {"strategy": "fedadam", "server-learning-rate": 1e-2},
    "FedAdam, server lr 3e-2": {"strategy": "fedadam", "server-learning-rate": 3e-2},
    "logit adjustment tau 2 (stronger label-skew correction)": {"logit-adjustment": 2.0},
    "frozen shared down-projection (exact aggregation)": EXACT_MODE,
    # not at equal steps: whether the federation catches up when it may train longer
    "40 rounds (twice the clients' steps)": {"num-rounds": 40, "evaluate-every": 40},
    # The rows below ran on a CPU without fast bf16 (AVX2 only), where the clients' 'auto' precision is
    # fp32; the rows above ran in bf16 autocast. "chosen setting in fp32" is their reference.
    "chosen setting in fp32": {"precision": "fp32"},
    # equal steps, split differently: more clients a round, or more rounds of fewer local steps
    "10 clients a round x 3 local steps": {"fraction-train": 0.5, "local-steps": 3, "precision": "fp32"},
    "40 rounds x 3 local steps": {"num-rounds": 40, "local-steps": 3, "evaluate-every": 40, "precision": "fp32"},
    "server momentum 0.8": {"server-momentum": 0.8, "precision": "fp32"},
    # the same training, but the saved model is the mean of the last 5 rounds' global models: its
    # row's reference is the run's own last-round model (last_round_metric), a paired comparison
    "tail average of the last 5 rounds": {"average-last-rounds": 5, "precision": "fp32"},
    "tail average of the last 10 rounds": {"average-last-rounds": 10, "precision": "fp32"},
    # SCAFFOLD's control variates (federation.scaffold) at the default tail averaging; its
    # reference is the tail-average row above
    "SCAFFOLD drift control": {"drift-control": "scaffold", "average-last-rounds": 5, "precision": "fp32"},
    # every client once per 4 rounds (federation.sampling.ClientCycle), also at tail averaging
    "cyclic client sampling": {"client-sampling": "cyclic", "average-last-rounds": 5, "precision": "fp32"},
    # each client's AdamW kept between its rounds (federation.optimizer_state), at tail averaging
    "client AdamW state kept between rounds": {
        "client-optimizer-state": "keep", "average-last-rounds": 5, "precision": "fp32"},
    # server momentum 0.8 led its fp32 reference by 3 points on the last-round model; again at the
    # default tail averaging, which may let a larger server step's noisier iterates average out
    "server momentum 0.8, tail averaging": {"server-momentum": 0.8, "average-last-rounds": 5, "precision": "fp32"},
    # each reply weighted by the examples it trained on this round (at most 6 x 16 = 96) rather than
    # its partition size (Dirichlet partitions differ widely in size, the largest often of one label), or alike
    "client weighting: examples trained on": {
        "client-weighting": "trained", "average-last-rounds": 5, "precision": "fp32"},
    "client weighting: uniform": {"client-weighting": "uniform", "average-last-rounds": 5, "precision": "fp32"},
    # the server weighs each round's replies so that their label mix is the federation's (from the
    # label counts clients send, federation.label_balance), as close to uniform as that allows
    "client weighting: label-balanced": {
        "client-weighting": "label-balanced", "average-last-rounds": 5, "precision": "fp32"},
    # the rows below are against the uniform-weighting row above (the report's federated settings)
    # FedBABU (Oh et al., ICLR 2022): every client keeps the random head as sent (a rate of 1e-12 moves
    # it by nothing), so label-skewed clients cannot pull it apart and only the experts learn
    "head frozen at its random init (FedBABU)": {
        "head-learning-rate": 1e-12, "client-weighting": "uniform", "average-last-rounds": 5, "precision": "fp32"},
    # whether a fresh AdamW every round costs anything by itself: one client holding all the rows, 100
    # rounds x 6 steps at the centralized choice (lr 2e-3), is a centralized run in 6-step pieces; the
    # pair differs only in whether its AdamW restarts each round
    "one client with all rows, 100 rounds x 6 steps, fresh AdamW each round": {
        **ONE_CLIENT, "client-optimizer-state": "fresh"},
    "one client with all rows, 100 rounds x 6 steps, AdamW kept across rounds": {
        **ONE_CLIENT, "client-optimizer-state": "keep"},
    # the same 600 client steps in more, shorter rounds (more averaging steps of the global experts) or
    # in rounds of more, shorter client moves, at the report's settings; 40 rounds average their last
    # 10, the same quarter of the training as 5 of 20
    "40 rounds x 3 local steps, report settings": {
        "num-rounds": 40, "local-steps": 3, "evaluate-every": 40, "average-last-rounds": 10,
        "client-weighting": "uniform", "precision": "fp32"},
    "10 clients a round x 3 local steps, report settings": {
        "fraction-train": 0.5, "local-steps": 3, "average-last-rounds": 5, "client-weighting": "uniform",
        "precision": "fp32"},
    # 40 x 3 trailed 20 x 6: the other way, fewer and longer client moves (the last 3 of 10 rounds
    # averaged, the share nearest a quarter that still averages more than two models)
    "10 rounds x 12 local steps, report settings": {
        "num-rounds": 10, "local-steps": 12, "average-last-rounds": 3, "client-weighting": "uniform",
        "precision": "fp32"},
    # the clients' rates (experts and head) divided by 2 or 4 and the server's step multiplied back:
    # the same nominal global step, from shorter client moves that drift less under label skew
    "client rates / 2, server learning rate 2, report settings": {
        "learning-rate": 2e-3, "head-learning-rate": 5e-3, "server-learning-rate": 2.0, "average-last-rounds": 5,
        "client-weighting": "uniform", "precision": "fp32"},
    "client rates / 4, server learning rate 4, report settings": {
        "learning-rate": 1e-3, "head-learning-rate": 2.5e-3, "server-learning-rate": 4.0, "average-last-rounds": 5,
        "client-weighting": "uniform", "precision": "fp32"},
}
# Diagnoses that led their reference by more than one run's noise, run again on CONFIRM_SEED (with
# their reference) before anything is concluded from them.
CONFIRM_DIAGNOSES = ("chosen setting in fp32", "10 clients a round x 3 local steps",
                     "tail average of the last 5 rounds", "tail average of the last 10 rounds",
                     "SCAFFOLD drift control", "cyclic client sampling", "client AdamW state kept between rounds",
                     "server momentum 0.8, tail averaging", "client weighting: examples trained on",
                     "client weighting: uniform", "head frozen at its random init (FedBABU)",
                     "client weighting: label-balanced", "10 rounds x 12 local steps, report settings",
                     "client rates / 2, server learning rate 2, report settings",
                     "client rates / 4, server learning rate 4, report settings")


def grid(side: str, selection: str = SELECTION, quick: bool = False) -> list[dict[str, Any]]:
    """The select stage's grid of one side on one selection set (a smaller one for --quick)."""
    if quick:
        return FED_GRID[::3][:2] if side == "federated" else CENTRAL_GRID[:1]
    widened = WIDENED_RATES.get((side, selection), ())
    if side == "centralized":
        return CENTRAL_GRID + [{"learning_rate": rate, "head_learning_rate": h} for rate in widened for h in (0.0, 1e-2)]
    return (FED_GRID + [{"server_momentum": 0.6, "learning_rate": rate, "head_learning_rate": h, "logit_adjustment": t}
                        for rate in widened for h in (0.0, 1e-2) for t in (0.0, 1.0)]
            + [equal_step_point(m, hp) for m in EQUAL_STEP_MOMENTA for hp in EQUAL_STEP_GRID.get((side, selection), [])]
            + LDA_HEAD_GRID.get((side, selection), []))


def equal_step_point(momentum: float, hp: dict[str, Any]) -> dict[str, Any]:
    """``hp`` at server ``momentum`` with the server learning rate that keeps FedAvgM's step at EQUAL_STEP."""
    return {"server_momentum": momentum, "server_learning_rate": round(EQUAL_STEP * (1 - momentum), 6)} | hp


def is_equal_step(hp: dict[str, Any]) -> bool:
    """Whether ``hp`` is one of the equal-step points (the only grid points that set a server rate)."""
    return "server_learning_rate" in hp


def is_lda_head(hp: dict[str, Any]) -> bool:
    """Whether ``hp`` is one of LDA_HEAD_GRID's points."""
    return hp.get("head_init") == "lda"


def server_step(hp: dict[str, Any], p: dict[str, Any] = PROTOCOL) -> float:
    """FedAvgM's steady-state step, in units of the replies' mean update."""
    return hp.get("server_learning_rate", p["server_learning_rate"]) / (1 - hp["server_momentum"])


# -- runs --------------------------------------------------------------------------------------
def protocol_id(protocol: dict[str, Any]) -> str:
    """A short hash of the protocol: runs of another protocol are never reused."""
    return hashlib.sha256(json.dumps(protocol, sort_keys=True).encode()).hexdigest()[:12]


def job(stage: str, side: str, seed: int, hp: dict[str, Any], settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """One run: its stage, side (or diagnosis), seed, hyperparameters and run-config settings."""
    return {"stage": stage, "side": side, "seed": seed, "hp": hp} | ({"settings": settings} if settings else {})


def selection_job(stage: str, side: str, seed: int, hp: dict[str, Any], selection: str,
                  settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """A run of ``stage`` (select, diagnose) on the ``selection`` set; runs on the phrase set, the
    first, name none, so that their keys are those they were recorded under."""
    return job(stage, side, seed, hp, settings) | ({} if selection == "phrases" else {"selection": selection})


def select_job(side: str, seed: int, hp: dict[str, Any], settings: dict[str, Any] | None = None,
               selection: str = SELECTION) -> dict[str, Any]:
    return selection_job("select", side, seed, hp, selection, settings)


def screen_job(side: str, seed: int, hp: dict[str, Any], selection: str = SELECTION) -> dict[str, Any]:
    """A grid point's run at the grid's settings (the equal-step and LDA-head points' at FP32_SCREEN)."""
    return select_job(side, seed, hp, FP32_SCREEN if is_equal_step(hp) or is_lda_head(hp) else None, selection)


def report_job(side: str, seed: int, hp: dict[str, Any], head_init: bool = False) -> dict[str, Any]:
    """A report run at REPORT_SETTINGS (the federated sides also at FEDERATED_REPORT_SETTINGS; the
    generation case keeps its own, bench/federation_generation), with HEAD_INIT where adopted."""
    if side == "generation":
        return job("report", side, seed, hp)
    settings = REPORT_SETTINGS | ({} if side == "centralized" else FEDERATED_REPORT_SETTINGS)
    return job("report", side, seed, hp, settings | (HEAD_INIT if head_init else {}))


def head_init_job(side: str, seed: int, hp: dict[str, Any]) -> dict[str, Any]:
    """A side's choice on the selection set at FINALIST_SETTINGS, with HEAD_INIT."""
    return select_job(side, seed, hp, FINALIST_SETTINGS | HEAD_INIT)


def head_init_pairs(done: dict, side: str) -> list[tuple[float | None, float | None]]:
    """(with HEAD_INIT, the finalist run without it) of ``side``'s HEAD_INIT_CHOICES, on SELECT_SEED and
    CONFIRM_SEED."""
    hp, pairs = HEAD_INIT_CHOICES[side], []
    for seed in (SELECT_SEED, CONFIRM_SEED):
        run = done.get(run_key(head_init_job(side, seed, hp)))
        pairs.append((run["result"]["metric"] if run else None, finalist_metric(done, side, seed, hp)))
    return pairs


def head_init_adopted(done: dict, side: str) -> bool:
    """Whether ``side`` reports with HEAD_INIT: its runs with it led its choice's on both seeds."""
    return side in HEAD_INIT_CHOICES and all(
        a is not None and b is not None and a > b for a, b in head_init_pairs(done, side))


def run_key(run: dict[str, Any]) -> str:
    hp = HP_DEFAULTS.get(run["side"], {}) | run["hp"]
    key = [run["stage"], run["side"], run["seed"], hp] + ([run["settings"]] if run.get("settings") else [])
    key += [run["selection"]] if run.get("selection") else []
    return json.dumps(key, sort_keys=True)


def load_runs(pid: str, log: Path) -> dict[str, dict[str, Any]]:
    """Finished runs of this protocol (lines of earlier protocols stay in the file, unread here)."""
    runs = {}
    if log.exists():
        for line in log.read_text().splitlines():
            run = json.loads(line)
            if run.get("protocol_id") == pid:
                runs[run_key(run)] = run
    return runs


def data_dir() -> Path:
    return data_root("glue/sst2")


def selection_data(p: dict[str, Any], folder: Path, kind: str = SELECTION) -> Path:
    """A data root whose sst2 'validation' is ``selection_rows`` rows held out of the training split
    and whose 'train' is the rest: hyperparameters chosen on it never see the dev rows.

    ``kind`` "phrases" (the first selection set): rows drawn at random. SST-2's training split holds
    every phrase of its sentences' parse trees, so these are mostly phrases, many of them inside a row of
    a run's training subset (``selection_set_stats`` measures both). "sentences": held-out rows that are
    whole sentences (no other training row contains them), and every training row that is a phrase of one
    of them left out of 'train'."""
    lines = (data_dir() / "glue" / "sst2" / "train.jsonl").read_text().splitlines()
    random.Random(p["selection_split_seed"]).shuffle(lines)
    if kind == "phrases":
        held, rest = lines[:p["selection_rows"]], lines[p["selection_rows"]:]
    elif kind == "sentences":
        held, rest = held_out_sentences(lines, p["selection_rows"])
    else:
        raise ValueError(f"unknown selection set {kind!r}: expected 'phrases' or 'sentences'")
    task = folder / "glue" / "sst2"
    task.mkdir(parents=True, exist_ok=True)
    (task / "validation.jsonl").write_text("\n".join(held) + "\n")
    (task / "train.jsonl").write_text("\n".join(rest) + "\n")
    return folder


def held_out_sentences(lines: list[str], count: int) -> tuple[list[str], list[str]]:
    """The first ``count`` rows (in ``lines``' order) that no other row contains, word for word, and
    the other rows less those contained in a held-out one (its phrases): no held-out text is seen in
    training."""
    texts = [" " + " ".join(json.loads(line)["sentence"].split()) + " " for line in lines]
    every_row = "\n".join(texts)
    held = list(itertools.islice((i for i, text in enumerate(texts) if every_row.count(text) == 1), count))
    if len(held) < count:
        raise ValueError(f"only {len(held)} whole-sentence rows to hold out, {count} asked for")
    held_text, held_set = "\n".join(texts[i] for i in held), set(held)
    rest = [line for i, line in enumerate(lines) if i not in held_set and texts[i] not in held_text]
    return [lines[i] for i in held], rest


def lda_probe(p: dict[str, Any]) -> dict[str, list[float]]:
    """The LDA head alone (``head-init=lda`` before any training: the frozen backbone, the experts at
    their initial values): its accuracy on the selection set (SELECT_SEED, CONFIRM_SEED) and on the
    dev set (REPORT_SEEDS), each seed fitted on the training subset a run of it draws."""
    from adamix_zoo.head_init import lda_head, set_head
    from federation.config import FederationConfig
    from federation.glue_client import GLUE

    def accuracy(root: Path, seed: int) -> float:
        cfg = FederationConfig.from_run_config({"tasks": p["task"], "backbone": p["backbone"], "data-dir": str(root),
                                                "train-limit": p["train_limit"], "max-length": p["max_length"],
                                                "seed": seed})
        model = GLUE.build_model(cfg, p["task"])
        train = GLUE.encode(cfg, p["task"], GLUE.load_rows(cfg, p["task"], "train"))
        set_head(model.head, *lda_head(GLUE.feature_statistics(cfg, p["task"], model, train)))
        model.eval()
        return GLUE.evaluate_global(cfg, model, p["task"]).metrics["accuracy"]

    with tempfile.TemporaryDirectory() as tmp:
        root = selection_data(p, Path(tmp), SELECTION)
        selection = [accuracy(root, seed) for seed in (SELECT_SEED, CONFIRM_SEED)]
    return {"selection": selection, "dev": [accuracy(data_dir(), seed) for seed in REPORT_SEEDS]}


def selection_set_stats(p: dict[str, Any]) -> dict[str, Any]:
    """How like the dev rows each selection set is: mean words per row, and the share of rows found word
    for word inside a row of the training subset a run on seed SELECT_SEED / CONFIRM_SEED draws (for
    the dev rows, out of the whole training split, as the report runs draw)."""
    from adamix_zoo import data
    from adamix_zoo.glue_tasks import get_task

    task = get_task(p["task"])

    def padded(rows) -> list[str]:
        return [" " + " ".join(text.split()) + " " for text in rows["sentence"]]

    def measure(held: list[str], train) -> dict[str, Any]:
        subsets = ("\n".join(padded(data.subset(train, p["train_limit"], seed))) for seed in (SELECT_SEED, CONFIRM_SEED))
        return {"rows": len(held), "mean_words": statistics.fmean(len(text.split()) for text in held),
                "contained": [sum(text in every for text in held) / len(held) for every in subsets]}

    stats = {"dev": measure(padded(data.load_split(task, "validation", data_dir())),
                            data.load_split(task, "train", data_dir()))}
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("phrases", "sentences"):
            root = selection_data(p, Path(tmp) / kind, kind)
            stats[kind] = measure(padded(data.load_split(task, "validation", root)),
                                  data.load_split(task, "train", root))
    return stats


def federated_run_config(p: dict, hp: dict, seed: int, root: Path, out: Path, extra: dict | None = None) -> dict:
    """The Flower run config of one federated run of the protocol."""
    return {
        "tasks": p["task"],
        "backbone": p["backbone"],
        "data-dir": str(root),
        "num-clients": p["clients"],
        "min-clients": 2,
        "fraction-train": p["fraction_train"],
        "fraction-evaluate": p["fraction_evaluate"],
        "evaluate-every": p["rounds"],  # client evaluation at the last round only
        "num-rounds": p["rounds"],
        "local-steps": p["local_steps"],
        "batch-size": p["batch_size"],
        "max-length": p["max_length"],
        "partitioner": "dirichlet",
        "dirichlet-alpha": p["alpha"],
        "train-limit": p["train_limit"],
        "eval-limit": p["eval_limit"],
        "seed": seed,
        "output-dir": str(out),
        "publish": False,
        "round-timeout": 1800.0,
        "learning-rate": hp["learning_rate"],
        "head-learning-rate": hp["head_learning_rate"],
        "logit-adjustment": hp["logit_adjustment"],
        "lr-schedule": p["lr_schedule"],
        "warmup-ratio": p["warmup_ratio"],
        "strategy": p["strategy"],
        "server-learning-rate": hp.get("server_learning_rate", p["server_learning_rate"]),
        "server-momentum": hp["server_momentum"],
        "precision": PRECISION,
        "average-last-rounds": 1,  # the last round's model, as every run before REPORT_SETTINGS saved it
        "client-weighting": "partition",  # every run before FEDERATED_REPORT_SETTINGS weighed replies so
        "head-init": hp.get("head_init", "random"),  # a drawn head, as every run before LDA_HEAD_GRID started from
    } | (extra or {})


def federated(p: dict, hp: dict, seed: int, root: Path, out: Path, extra: dict | None = None) -> dict:
    metrics, wall = simulate(federated_run_config(p, hp, seed, root, out, extra), timeout=3600)
    log = metrics["federation"]
    return {
        "metric": metrics["accuracy"],
        "wall_seconds": wall,
        "overhead": overhead(log),
        "bytes_per_client_round": log["bytes_per_client_round"],
        "rounds_aggregated": log["aggregated_rounds"],
        "updates_per_round": log["accepted_updates"],
        "aggregation_relative_error": last_round_error(log),
        # with average-last-rounds > 1: the last round's model, of the same run
        "last_round_metric": log.get("last_round_metrics", {}).get("accuracy"),
    }


def centralized(p: dict, hp: dict, seed: int, root: Path, out: Path, precision: str,
                head_init: str = "random") -> dict:
    from adamix_zoo.recipes.glue import TrainArgs, train

    steps = total_steps(p)
    args = TrainArgs(
        task=p["task"],
        method="adamix-lora",
        backbone=p["backbone"],
        data_dir=str(root / "glue"),
        output_dir=str(out),
        seed=seed,
        data_seed=seed,
        lr=hp["learning_rate"],
        head_lr=hp["head_learning_rate"] or None,
        warmup_ratio=p["warmup_ratio"],
        max_steps=steps,
        batch_size=p["batch_size"],
        max_length=p["max_length"],
        train_subset=p["train_limit"],
        validation_subset=p["eval_limit"],
        eval_every=steps,
        precision=precision,
        head_init=head_init,
        progress=False,
    )
    start = time.perf_counter()
    result = train(args)
    return {"metric": result.best_metrics["accuracy"], "wall_seconds": time.perf_counter() - start}


def clients_per_round(p: dict) -> int:
    return max(2, int(p["clients"] * p["fraction_train"]))  # Flower's sampling, min-clients 2


def total_steps(p: dict) -> int:
    return p["rounds"] * p["local_steps"] * clients_per_round(p)


def overhead(log: dict) -> dict[str, float]:
    """Shares of the rounds' wall time (training + evaluation phases): outside the clients' training
    loops in all, and split into client set-up, runtime between clients, and evaluation phase."""
    loop = sum(sum(v) for v in log["client_train_seconds"].values())
    handler = sum(sum(v) for v in log.get("client_handler_seconds", {}).values())
    phase = sum(log["round_train_phase_seconds"].values())
    evaluation = sum(log["round_eval_phase_seconds"].values())
    total = phase + evaluation
    return {
        "round_overhead_fraction": 1 - loop / total,
        "train_phase_overhead_fraction": 1 - loop / phase,
        "client_setup_fraction": (handler - loop) / total if handler else None,
        "runtime_fraction": (phase - handler) / total if handler else None,
        "eval_phase_fraction": evaluation / total,
        "round_seconds": total / len(log["round_train_phase_seconds"]),
    }


def last_round_error(log: dict) -> float | None:
    """``aggregation_relative_error`` of the last aggregated round: its mean over LoRA projections
    (the round log keeps {"mean", "max"} per round); None when the log has none."""
    errors = log.get("aggregation_relative_error")
    if not errors:
        return None
    return float(errors[max(errors, key=int)]["mean"])


def exact_mode() -> dict[str, Any] | None:
    """EXACT_MODE when the federation knows its keys, else None (with the reason printed)."""
    from federation.config import FederationConfig

    known = FederationConfig().to_run_config()
    if not EXACT_MODE or not set(EXACT_MODE) <= set(known):
        print(f"exact aggregation: skipped (EXACT_MODE={EXACT_MODE} names no run-config keys of this "
              "federation): exact_* keys stay None")
        return None
    return EXACT_MODE


def generation_case():
    """``run_generation_case(seed, quick) -> dict`` of bench/federation_generation.py, or None."""
    if not (Path(__file__).with_name("federation_generation.py")).exists():
        print("generation case: skipped (bench/federation_generation.py does not exist yet): "
              "generation_fed_vs_central_bleu_ratio stays None")
        return None
    from bench.federation_generation import run_generation_case

    return run_generation_case


def job_precision(spec: dict) -> str:
    """The precision a job trains in: the pinned one, a diagnosis's override, the generation case's."""
    if spec["side"] == "generation":
        from bench.federation_generation import PRECISION as generation_precision

        return generation_precision
    settings = spec.get("settings") or DIAGNOSES.get(spec["side"], {})
    return settings.get("precision", PRECISION)


def execute(jobs: list[dict], p: dict, done: dict, log: Path, quick: bool, tmp: Path,
            worker: tuple[int, int] = (0, 1)) -> None:
    """Run every job not finished yet, appending each result to ``log`` as it completes.

    ``worker`` (i, n): only every n-th unfinished job from the i-th, so that n processes started
    together (``--worker i/n``) share the jobs."""
    roots: dict[str, Path] = {"report": data_dir()}
    index, count = worker
    for spec in [j for j in jobs if run_key(j) not in done][index::count]:
        data = "report" if spec["stage"] == "report" else spec.get("selection", "phrases")
        if data not in roots:
            roots[data] = selection_data(p, tmp / f"selection-data-{data}", data)
        root, out = roots[data], tmp / f"run-{len(done)}"
        if not quick:
            require_fast_bf16(job_precision(spec), f"bench/federation.py ({spec['stage']}, {spec['side']})")
        print(f"running {run_key(spec)}", flush=True)
        if spec["side"] == "centralized":
            result = centralized(p, spec["hp"], spec["seed"], root, out / "central", job_precision(spec),
                                 spec.get("settings", {}).get("head-init", "random"))
        elif spec["side"] == "generation":
            result = generation_case()(spec["seed"], quick)
        else:
            extra = ({"exact": EXACT_MODE, "ranks": RANKS_MODE} | DIAGNOSES).get(spec["side"], {})
            result = federated(p, spec["hp"], spec["seed"], root, out / "federated",
                               extra | spec.get("settings", {}))
        run = spec | {"protocol_id": protocol_id(p), "quick": quick, "result": result, "machine": machine(),
                      "command": " ".join([COMMAND] + sys.argv[1:])}
        done[run_key(spec)] = run
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("a") as runs:
            runs.write(json.dumps(run) + "\n")


def selection_metric(done: dict, side: str, seed: int, hp: dict, selection: str = SELECTION) -> float | None:
    run = done.get(run_key(screen_job(side, seed, hp, selection)))
    return run["result"]["metric"] if run else None


def finalists(done: dict, side: str, grid: list[dict], selection: str = SELECTION) -> list[dict] | None:
    """The FINALISTS grid points with the best SELECT_SEED accuracy (None before the grid ran)."""
    scored = [(m, hp) for hp in grid
              if (m := selection_metric(done, side, SELECT_SEED, hp, selection)) is not None]
    if len(scored) < len(grid):
        return None
    return [hp for _, hp in sorted(scored, key=lambda s: -s[0])[:FINALISTS]]


def finalist_job(side: str, seed: int, hp: dict, selection: str = SELECTION) -> dict[str, Any]:
    """A finalist's selection run at FINALIST_SETTINGS."""
    return select_job(side, seed, hp, FINALIST_SETTINGS, selection)


def finalist_metric(done: dict, side: str, seed: int, hp: dict, selection: str = SELECTION) -> float | None:
    run = done.get(run_key(finalist_job(side, seed, hp, selection)))
    return run["result"]["metric"] if run else None


def finalist_means(done: dict, side: str, grid: list[dict], selection: str = SELECTION) -> list[dict] | None:
    """Each finalist with its mean accuracy at FINALIST_SETTINGS over both selection seeds (None
    before they all ran)."""
    means = []
    for hp in finalists(done, side, grid, selection) or []:
        metrics = [finalist_metric(done, side, seed, hp, selection) for seed in (SELECT_SEED, CONFIRM_SEED)]
        if None in metrics:
            return None
        means.append({"hp": hp, "metrics": metrics, "mean": statistics.fmean(metrics)})
    return means or None


def chosen(done: dict, side: str, grid: list[dict], selection: str = SELECTION) -> dict | None:
    """The finalist with the best two-seed mean (None before the selection ran)."""
    means = finalist_means(done, side, grid, selection)
    return max(means, key=lambda f: f["mean"])["hp"] if means else None


# -- results -----------------------------------------------------------------------------------
def summarize(done: dict, p: dict, seeds: tuple, quick: bool) -> dict:
    fed_grid, central_grid = grid("federated", quick=quick), grid("centralized", quick=quick)
    fed_hp, central_hp = chosen(done, "federated", fed_grid), chosen(done, "centralized", central_grid)
    phrase_grid, phrase_central_grid = grid("federated", "phrases", quick), grid("centralized", "phrases", quick)
    per_seed = []
    for seed in seeds:
        fed = done.get(run_key(report_job("federated", seed, fed_hp or {}, head_init_adopted(done, "federated"))))
        central = done.get(run_key(report_job("centralized", seed, central_hp or {},
                                              head_init_adopted(done, "centralized"))))
        if fed and central:
            exact = done.get(run_key(report_job("exact", seed, fed_hp)))
            last = fed["result"].get("last_round_metric")
            per_seed.append({"seed": seed, "federated": fed["result"], "centralized": central["result"],
                             "exact": exact["result"] if exact else None,
                             "ratio": fed["result"]["metric"] / central["result"]["metric"],
                             "ratio_last_round": None if last is None else last / central["result"]["metric"]})
    generation = [done[k]["result"] for s in GENERATION_SEEDS
                  if (k := run_key(report_job("generation", s, {}))) in done]

    def mean(values: list) -> float | None:
        values = [v for v in values if v is not None]
        return statistics.fmean(values) if values else None

    exact = [s for s in per_seed if s["exact"]]
    ranks = [(done[k]["result"]["metric"], s["federated"]["metric"]) for s in per_seed if s["seed"] in RANKS_SEEDS
             and (k := run_key(report_job("ranks", s["seed"], fed_hp))) in done]
    bleu = [g.get("generation_fed_vs_central_bleu_ratio", g.get("fed_vs_central_bleu_ratio")) for g in generation]
    fed_runs = [s["federated"] for s in per_seed]
    return {
        "quick": quick,
        "protocol": p,
        "protocol_id": protocol_id(p),
        "clients": p["clients"],
        "clients_per_round": clients_per_round(p),
        "total_steps": total_steps(p),
        "selection": {"federated_grid": fed_grid, "centralized_grid": central_grid,
                      "federated_chosen": fed_hp, "centralized_chosen": central_hp,
                      "seeds": [SELECT_SEED, CONFIRM_SEED], "finalists": FINALISTS,
                      "federated_finalists": finalist_means(done, "federated", fed_grid),
                      "centralized_finalists": finalist_means(done, "centralized", central_grid),
                      "rows": p["selection_rows"], "set": SELECTION},
        "seeds": per_seed,
        # the first selection set's choice, on which the diagnoses ran
        "phrase_selection": {"federated_chosen": chosen(done, "federated", phrase_grid, "phrases"),
                             "centralized_chosen": chosen(done, "centralized", phrase_central_grid, "phrases"),
                             "federated_finalists": finalist_means(done, "federated", phrase_grid, "phrases"),
                             "centralized_finalists": finalist_means(done, "centralized", phrase_central_grid,
                                                                     "phrases")},
        # rebuilds both selection sets (~30 s): only for the report prose, so only once it has seeds to report
        "selection_sets": selection_set_stats(p) if per_seed else None,
        "lda_probe": lda_probe(p) if per_seed and not quick else None,  # ~2 min, likewise
        "diagnoses": diagnoses(done, quick),
        "federated_accuracy": mean([r["metric"] for r in fed_runs]),
        "centralized_accuracy": mean([s["centralized"]["metric"] for s in per_seed]),
        "fed_vs_central_metric_ratio": mean([s["ratio"] for s in per_seed]),
        "fed_vs_central_metric_ratio_min_seed": min((s["ratio"] for s in per_seed), default=None),
        # the same runs' last-round models: what tail averaging changed
        "fed_vs_central_metric_ratio_last_round": mean([s["ratio_last_round"] for s in per_seed]),
        "report_settings": REPORT_SETTINGS,
        "federated_report_settings": FEDERATED_REPORT_SETTINGS,
        "target_fed_vs_central_metric_ratio": TARGET_RATIO,
        "round_overhead_fraction": mean([r["overhead"]["round_overhead_fraction"] for r in fed_runs]),
        "overhead_breakdown": {k: mean([r["overhead"][k] for r in fed_runs])
                               for k in (fed_runs[0]["overhead"] if fed_runs else {})},
        "target_round_overhead_fraction": TARGET_OVERHEAD,
        "bytes_per_client_round": fed_runs[0]["bytes_per_client_round"] if fed_runs else None,
        "bytes_ratio_vs_full_model": fed_runs[0]["bytes_per_client_round"] / full_model_bytes() if fed_runs else None,
        "aggregation_relative_error": mean([r["aggregation_relative_error"] for r in fed_runs]),
        "exact_aggregation_relative_error": mean([s["exact"]["aggregation_relative_error"] for s in exact]),
        "exact_vs_default_metric_ratio": mean([s["exact"]["metric"] / s["federated"]["metric"] for s in exact]),
        "heterogeneous_ranks": RANKS_MODE["client-ranks"],
        "heterogeneous_ranks_vs_default_metric_ratio": mean([r / d for r, d in ranks]),
        "generation_fed_vs_central_bleu_ratio": min((b for b in bleu if b is not None), default=None),
        "target_generation_fed_vs_central_bleu_ratio": TARGET_BLEU_RATIO,
        "generation": generation,
        "federated_wall_seconds": mean([r["wall_seconds"] for r in fed_runs]),
        "centralized_wall_seconds": mean([s["centralized"]["wall_seconds"] for s in per_seed]),
        "machine": machine(),
        "command": COMMAND,
    }


def diagnoses(done: dict, quick: bool = False) -> list[dict]:
    """The diagnose runs beside their baselines: accuracy on the DIAGNOSIS_SELECTION set on seed
    SELECT_SEED and, where it ran, CONFIRM_SEED."""
    at = DIAGNOSIS_SELECTION
    fed_hp = chosen(done, "federated", grid("federated", at, quick), at)
    central_hp = chosen(done, "centralized", grid("centralized", at, quick), at)
    if fed_hp is None or central_hp is None:
        return []

    def diagnosed(name: str, seed: int, key: str = "metric") -> float | None:
        run = done.get(run_key(selection_job("diagnose", name, seed, fed_hp, at)))
        return run["result"].get(key) if run else None

    rows = [{"name": f"{side} (chosen)", "overrides": {},
             "metric": selection_metric(done, side, SELECT_SEED, hp, at),
             "confirm_metric": selection_metric(done, side, CONFIRM_SEED, hp, at)}
            for side, hp in (("centralized", central_hp), ("federated", fed_hp))]
    rows += [{"name": name, "overrides": overrides, "metric": metric,
              "confirm_metric": diagnosed(name, CONFIRM_SEED),
              "last_round": [diagnosed(name, seed, "last_round_metric") for seed in (SELECT_SEED, CONFIRM_SEED)]}
             for name, overrides in DIAGNOSES.items() if (metric := diagnosed(name, SELECT_SEED)) is not None]
    return rows if len(rows) > 2 else []


def full_model_bytes() -> int:
    """FedAvg of the whole model moves every backbone and head tensor (float32) down and up."""
    from transformers import AutoModel

    from adamix_zoo.backbones import resolve_backbone

    backbone = AutoModel.from_pretrained(resolve_backbone("minilm-l6"))
    params = sum(p.numel() for p in backbone.parameters()) + backbone.config.hidden_size * 2 + 2
    return 2 * 4 * params


def fmt(value: Any, spec: str = ".4f") -> str:
    return "not measured" if value is None else format(value, spec)


def report(r: dict, done: dict) -> str:
    p, m, sel = r["protocol"], r["machine"], r["selection"]
    quick = " **(--quick smoke run: numbers are not meaningful)**" if r["quick"] else ""
    seeds = [[s["seed"], f"{s['federated']['metric']:.4f} / {s['centralized']['metric']:.4f}",
              f"{s['ratio']:.4f}", fmt(s.get("ratio_last_round")),
              f"{s['federated']['overhead']['round_overhead_fraction']:.3f}",
              f"{s['federated']['wall_seconds']:.0f} / {s['centralized']['wall_seconds']:.0f}"]
             for s in r["seeds"]]
    grid = [[side, json.dumps(hp), fmt(first),
             "" if (confirm := selection_metric(done, side, CONFIRM_SEED, hp)) is None else fmt(confirm),
             " / ".join(fmt(finalist_metric(done, side, seed, hp)) for seed in sel["seeds"])
             if hp in (finalists(done, side, sel[f"{side}_grid"]) or []) else "",
             "yes" if hp == sel[f"{side}_chosen"] else ""]
            for side, points in (("federated", sel["federated_grid"]), ("centralized", sel["centralized_grid"]))
            for hp in points if (first := selection_metric(done, side, SELECT_SEED, hp)) is not None]
    b = r["overhead_breakdown"]
    rows = [
        ["fed_vs_central_metric_ratio_min_seed (target >= 0.95)", fmt(r["fed_vs_central_metric_ratio_min_seed"])],
        ["fed_vs_central_metric_ratio (mean over seeds)", fmt(r["fed_vs_central_metric_ratio"])],
        ["  the same runs' last-round models (no tail averaging)", fmt(r.get("fed_vs_central_metric_ratio_last_round"))],
        ["round_overhead_fraction (target <= 0.2)", fmt(r["round_overhead_fraction"], ".3f")],
        ["  of which client set-up / runtime between clients / evaluation phase",
         " / ".join(fmt(b.get(k), ".3f") for k in ("client_setup_fraction", "runtime_fraction", "eval_phase_fraction"))],
        ["clients (sampled per round)", f"{r['clients']} ({r['clients_per_round']})"],
        ["bytes_per_client_round", fmt(r["bytes_per_client_round"], ",")],
        ["bytes_ratio_vs_full_model", fmt(r["bytes_ratio_vs_full_model"], ".5f")],
        ["aggregation_relative_error (default mode, last round)", fmt(r["aggregation_relative_error"], ".3g")],
        ["exact_aggregation_relative_error", fmt(r["exact_aggregation_relative_error"], ".3g")],
        ["exact_vs_default_metric_ratio", fmt(r["exact_vs_default_metric_ratio"])],
        [f"heterogeneous_ranks_vs_default_metric_ratio (client ranks {r['heterogeneous_ranks']}, seeds "
         f"{', '.join(map(str, RANKS_SEEDS))})", fmt(r["heterogeneous_ranks_vs_default_metric_ratio"])],
        ["generation_fed_vs_central_bleu_ratio (target >= 0.9)", fmt(r["generation_fed_vs_central_bleu_ratio"])],
    ]
    legacy = [[f"{v['settings']['rounds']} x {v['settings']['local_steps']}", v["settings"]["clients"],
               f"{v['settings']['strategy']} m={v['settings'].get('server_momentum', 0):g}",
               v["settings"].get("seed", 0), f"{v['fed_vs_central_metric_ratio']:.4f}",
               f"{v['round_overhead_fraction']:.3f}", f"`{v['command']}`"] for v in legacy_runs()]
    return (
        f"## Federation{quick}\n\n"
        f"AdaMix-LoRA (K=4, r=8) on all-MiniLM-L6-v2, SST-2 ({p['train_limit']} train rows, "
        f"{p['eval_limit']} dev rows): {p['clients']} Flower clients (simulation) with "
        f"Dirichlet(alpha={p['alpha']}) label-skewed partitions, {r['clients_per_round']} sampled per round "
        f"(fraction-train {p['fraction_train']:g}), {p['rounds']} rounds x {p['local_steps']} local steps of "
        f"FedAvgM over the adapter experts and the head, client evaluation at the last round only; against "
        f"centralized training with the same {r['total_steps']} steps of batch {p['batch_size']}. Both sides "
        f"follow one {p['lr_schedule']} schedule (warmup over the first {p['warmup_ratio']:.0%} of the steps, "
        "then linear decay to 0; each federated client runs its round's slice of it with a fresh AdamW). "
        f"Hyperparameters were chosen on {sel['rows']} whole sentences held out of the *training* split, "
        "none of whose phrases are trained on (`selection_data`), disjoint from the dev rows below: every "
        f"grid point on seed {sel['seeds'][0]} (in bf16 autocast, the equal-step and LDA-head points below in fp32; the "
        "last round's model saved), its "
        f"{sel['finalists']} best again on seeds {sel['seeds'][0]} and {sel['seeds'][1]} at "
        "the report's settings, the best mean of those two chosen. The report's runs use the run-config "
        f"settings {json.dumps(r.get('report_settings', {}))} on both sides: the saved federated model is "
        "the mean of the last 5 rounds' global models (tail averaging, the library default of a quarter of "
        "the rounds), and the runs record their last round's model too.\n\n"
        + markdown_table(["metric", "value"], rows)
        + "\n\nPer seed (dev set), at the chosen settings:\n\n"
        + markdown_table(["seed", "accuracy fed / central", "ratio", "ratio of its last-round model",
                          "round overhead", "wall s fed / central"], seeds)
        + "\n\nSelection (held-out training sentences, never the dev set):\n\n"
        + markdown_table(["side", "hyperparameters", f"selection accuracy seed {sel['seeds'][0]}",
                          f"seed {sel['seeds'][1]} (finalists)",
                          "finalists at the report's settings, seeds " + " / ".join(map(str, sel["seeds"])),
                          "chosen"], grid)
        + (("\n\nWhere the gap comes from: the chosen federated setting with one thing changed (`--stage "
            f"diagnose`), accuracy on the first selection set (training rows held out at random, "
            f"mostly phrases) at the setting it chose, seed {SELECT_SEED} (and seed {CONFIRM_SEED} where it "
            "ran):\n\n"
            + markdown_table(["run", "run-config overrides", f"seed {SELECT_SEED}", f"seed {CONFIRM_SEED}",
                              "its last-round model, seed " + " / ".join(map(str, (SELECT_SEED, CONFIRM_SEED)))],
                             [[d["name"], json.dumps(d["overrides"]) if d["overrides"] else "",
                               fmt(d["metric"]), "–" if d["confirm_metric"] is None else fmt(d["confirm_metric"]),
                               " / ".join("–" if v is None else fmt(v) for v in d.get("last_round", []))
                               if any(v is not None for v in d.get("last_round", [])) else ""]
                              for d in r["diagnoses"]]))
           if r["diagnoses"] else "")
        + ("\n\nThe rows whose overrides say `\"precision\": \"fp32\"` ran in fp32 (a CPU without fast bf16), "
           "the others in bf16 autocast. The "
           "chosen setting itself fell from 0.8532 to 0.8005 in fp32: the numerics alone move one run by 5 "
           "points. Against that fp32 reference, 10 clients a round x 3 local steps (0.8544) and 40 rounds "
           "x 3 steps (0.8498) led by 5 points and momentum 0.8 by 3; on seed 1 the order flipped (0.7993 "
           "for 10 x 3 against the reference's 0.8498), so over both seeds 10 x 3 and the chosen split are "
           "level (0.827 and 0.825). At this noise one seed ranks nothing.\n\nTail averaging trains exactly "
           "as the chosen setting and saves the mean of the last 5 rounds' global models; the same run's "
           "last-round model is its paired reference (last column, within one dev row of the fp32 "
           "reference run: the client arithmetic is nearly deterministic). It lifted seed 0 by 6.4 points "
           "(0.8016 to 0.8658), where the last round had landed badly, and seed 1 by 0.1: it removes the "
           "last round's luck of the draw (which 5 label-skewed clients it sampled) rather than adding "
           "accuracy where the last round was fine. That is the spread the per-seed ratio target is "
           "sensitive to, so it became the default.\n\nAgainst that default (tail averaging of the last 5 "
           "rounds, 0.8658 / 0.8498 on seeds 0 / 1), five changes fell short on both seeds. Averaging the "
           "last 10 rounds reached 0.8440 / 0.8463: the earlier rounds' models, at higher learning rates, "
           "are farther from the end. SCAFFOLD's drift control (`drift-control=scaffold`) reached 0.8567 "
           "and diverged on seed 1 (0.5849, its last round 0.4151): its correction assumes SGD, and the "
           "clients' AdamW turns a correction that outweighs a coordinate's own gradient into a full-size "
           "step. Cyclic client sampling (`client-sampling=cyclic`, every client once per 4 rounds) made "
           "the last-round models better (0.8314 / 0.8440 against 0.8016 / 0.8486) but the tail averages "
           "slightly worse (0.8521 / 0.8463), a difference within one run's noise: tail averaging had "
           "already removed most of the last round's luck of the draw. Keeping each client's AdamW state between "
           "its rounds (`client-optimizer-state=keep`, as DiLoCo's workers keep their inner optimizer) reached "
           "0.8486 / 0.8062: a client's kept moments date from its last round, on average 4 rounds back, and "
           "its first steps follow them rather than the new global experts, the staleness that also undid "
           "SCAFFOLD. Server momentum 0.8, which had led its fp32 reference by 3 points on a last-round model, "
           "fell to 0.7844 / 0.7030 at tail averaging (its last-round models 0.8337 / 0.5883): the larger "
           "server steps swing the late global models too far for their average. None became a default."
           if r["diagnoses"] else "")
        + weighting_paragraph(r)
        + head_and_optimizer_paragraph(r)
        + split_and_rates_paragraph(r)
        + report_paragraph(r)
        + finalists_paragraph(sel)
        + widening_paragraph(done, SELECTION)
        + equal_step_paragraph(done)
        + head_init_paragraph(done, r.get("lda_probe"))
        + phrase_selection_paragraph(r, done)
        + widening_paragraph(done, "phrases")
        + "\n\nOn the first selection set, chosen on seed 0 alone, the federated side took momentum 0.6, lr "
        "2e-3, head 1e-2, no logit adjustment (0.8589), which fell to 0.7844 on seed 1; on the dev set it "
        "reached ratios 0.9466, 0.9438 "
        "and 0.9793 on seeds 0, 1 and 2 (its runs are in the runs file). Per-seed dev ratios swing by about "
        "0.03: 872 dev rows alone give an accuracy a standard error of 0.014."
        "\n\nAn earlier protocol of the same shape, the clients at a constant rate and the federated head at the "
        "adapters' rate (the centralized head at the recipe's 1e-2; 6a7772000981, in the runs file) reached "
        "ratios 0.955 and 0.907 on seeds "
        "0 and 1.\n\nRound overhead before this protocol: 0.42 at 10 rounds x 6 steps on 4 clients (rows below), "
        "where a 3-round profile of it (`bench/federation.py` settings, commit 67a4a7f) spent 36% of the round "
        "in per-round client evaluation (76 s of 211 s) and 0.33 s per message deep-copying the backbone. "
        "Client evaluation now runs at the last round only (`evaluate-every`), and each client process "
        "builds its model once (`federation.task.client_model`).\n\n"
        f"Command: `{r['command']}` ({m['cpu']}, {m['date']}); every run is a line "
        "of bench/results/federation_runs.jsonl.\n\n"
        "Earlier single-seed runs (4 clients, every client each round, momentum picked on the dev set):\n\n"
        + markdown_table(["rounds x local steps", "clients", "strategy", "seed", "ratio", "round overhead",
                          "command"], legacy)
    )


WIDENING_LABELS = {"head_learning_rate": "head", "logit_adjustment": "logit adjustment"}


def widening_paragraph(done: dict, selection: str) -> str:
    """What each side's widening past an edge rate of ``selection``'s grid (WIDENED_RATES) scored; for the
    federated side against the momentum-0.9 points of that edge rate, which kept its widening at 0.6."""
    def scored(side: str, rate: float, momentum: float = 0.6) -> list[tuple[dict, float]]:
        return [(hp, m) for hp in grid(side, selection)
                if hp["learning_rate"] == rate and hp.get("server_momentum", momentum) == momentum
                and not is_equal_step(hp) and not is_lda_head(hp)  # these points report apart
                and (m := selection_metric(done, side, SELECT_SEED, hp, selection)) is not None]

    sentences = []
    for side in ("federated", "centralized"):
        side_grid = grid(side, selection)
        finalist_points = finalists(done, side, side_grid, selection)  # None: grid unfinished
        rates = sorted({hp["learning_rate"] for hp in side_grid})
        for rate in WIDENED_RATES.get((side, selection), ()):
            if not (widened := scored(side, rate)):
                continue
            index = rates.index(rate)
            edge = rates[index + 1] if rate < min(LEARNING_RATES) else rates[index - 1]  # the rate widened from
            among = sum(hp in (finalist_points or []) for hp, _ in widened)
            verdict = ("the finalists not drawn yet (the grid has not finished)" if finalist_points is None
                       else f"{among} of them among the finalists" if among
                       else "none among the finalists, so the rate stays inside the grid")
            scores = ", ".join(f"{m:.4f} ({', '.join(f'{WIDENING_LABELS[k]} {v:g}' for k, v in hp.items() if k in WIDENING_LABELS)})"
                               for hp, m in widened)
            high_momentum = scored(side, edge, 0.9) if side == "federated" else []
            below = (f" (at momentum 0.9 the {edge:g} points had reached at most "
                     f"{max(m for _, m in high_momentum):.3f})" if high_momentum else "")
            at = " at momentum 0.6" if side == "federated" else ""
            sentences.append(f"the {side} grid widened from {edge:g} to {rate:g}{at}{below}: {scores} on seed "
                             f"{SELECT_SEED}, {verdict}")
    if not sentences:
        return ""
    return (f"\n\nWhere a choice on the {selection} set sat on an edge rate of its grid, "
            + "; ".join(sentences) + ".")


def equal_step_paragraph(done: dict) -> str:
    """What the equal-step points (EQUAL_STEP_GRID) scored, and whether any became a finalist."""
    def label(hp: dict) -> str:
        return f"momentum {hp['server_momentum']:g}, lr {hp['learning_rate']:g}"

    side_grid = grid("federated")
    points = [(hp, m) for hp in side_grid if is_equal_step(hp)
              and (m := selection_metric(done, "federated", SELECT_SEED, hp)) is not None]
    if not points:
        return ""
    finalist_points = finalists(done, "federated", side_grid)
    among = sum(hp in (finalist_points or []) for hp, _ in points)
    verdict = ("the finalists not drawn yet (the grid has not finished)" if finalist_points is None
               else f"{among} of them among the finalists" if among else "none among the finalists")
    last = selection_metric(done, "federated", SELECT_SEED, finalist_points[-1]) if finalist_points else None
    if last is not None and not among and (tied := [hp for hp, m in points if m == last]):
        verdict += (f" ({' and '.join(map(label, tied))} tied the last finalist's {last:.4f}; the tie is broken "
                    "by grid order, which puts the points added later last)")
    scores = ", ".join(f"{m:.4f} ({label(hp)})" for hp, m in points)
    old_09 = [m for hp in FED_GRID if hp["server_momentum"] == 0.9
              and (m := selection_metric(done, "federated", SELECT_SEED, hp)) is not None]
    new_09 = [m for hp, m in points if hp["server_momentum"] == 0.9]
    collapses = (f" At server learning rate 1, {sum(m < COLLAPSED for m in old_09)} of the {len(old_09)} momentum-0.9 "
                 f"points scored below {COLLAPSED:g} (one class or near it); at the step of {EQUAL_STEP:g}, "
                 f"{sum(m < COLLAPSED for m in new_09)} of {len(new_09)}: the collapses came with the larger step."
                 if old_09 and new_09 else "")
    best = max(m for _, m in points)
    error = (best * (1 - best) / PROTOCOL["selection_rows"]) ** 0.5
    level = sum(best - m <= error for _, m in points)
    finalist = "" if last is None else f"; the last finalist scored {last:.4f}"
    plateau = (f" {level} of the {len(points)} lie within one binomial standard error ({error:.3f}) of their best, "
               f"{best:.4f}{finalist}." if len(points) > 1 else "")
    return (f"\n\nFedAvgM's step is the server learning rate / (1 - momentum) times the replies' mean update: "
            f"{server_step(FED_GRID[0]):g} at the grid's momentum 0.6 and {server_step(FED_GRID[-1]):g} at its 0.9, "
            "so the grid's momentum axis changed the step and the span of rounds averaged together at once. "
            f"After the first choice's report runs missed the target, the {SELECTION} set's grid added momenta "
            f"{' and '.join(f'{m:g}' for m in EQUAL_STEP_MOMENTA)} at the step of {EQUAL_STEP:g} (server learning "
            f"rates {' and '.join(f'{EQUAL_STEP * (1 - m):g}' for m in EQUAL_STEP_MOMENTA)}), head 1e-2 and logit "
            f"adjustment 1, screened in fp32 (a CPU without fast bf16): {scores} on seed {SELECT_SEED}, {verdict}."
            + collapses + plateau)


def head_init_paragraph(done: dict, probe: dict[str, list[float]] | None = None) -> str:
    """The LDA head alone (``lda_probe``), the choices with it (HEAD_INIT) against their finalist runs,
    what LDA_HEAD_GRID's points scored, and the earlier choice's dev ratios."""
    pairs = []
    for side in ("federated", "centralized"):
        scored = head_init_pairs(done, side)
        if all(a is not None and b is not None for a, b in scored):
            verdict = ("it led on both: its report runs use it" if head_init_adopted(done, side)
                       else "not on both: its report settings do not add it")
            pairs.append(f"{side} {' / '.join(f'{a:.4f}' for a, _ in scored)} against "
                         f"{' / '.join(f'{b:.4f}' for _, b in scored)} ({verdict})")
    if not pairs:
        return ""
    text = ("\n\nThe closed-form head (`head-init=lda`, `adamix_zoo.head_init`): the linear discriminant of the "
            "frozen backbone's features of the training rows, in the federation from one round of the clients' "
            "summed class counts, feature sums and scatter, which give the pooled rows' LDA exactly. "
            + (f"Alone, before any training, it scores {' / '.join(f'{a:.4f}' for a in probe['selection'])} on the "
               f"selection set (seeds {SELECT_SEED} / {CONFIRM_SEED}) and {' / '.join(f'{a:.4f}' for a in probe['dev'])} "
               f"on the dev set (seeds {', '.join(map(str, REPORT_SEEDS))}; `lda_probe`), about what the federated "
               "runs from a drawn head reached. " if probe else "")
            + "Each side's choice "
            "before the grid points below, with it (the federated head still at 1e-2), at the finalists' "
            f"settings, on selection seeds {SELECT_SEED} / {CONFIRM_SEED}: "
            + "; ".join(pairs) + ".")
    side_grid = grid("federated")
    points = [(hp, m) for hp in side_grid if is_lda_head(hp)
              and (m := selection_metric(done, "federated", SELECT_SEED, hp)) is not None]
    if points:
        finalist_points = finalists(done, "federated", side_grid)
        among = sum(hp in (finalist_points or []) for hp, _ in points)
        verdict = ("the finalists not drawn yet (the grid has not finished)" if finalist_points is None
                   else f"{among} of them among the finalists" if among else "none among the finalists")
        choice = chosen(done, "federated", side_grid)
        if choice is not None and is_lda_head(choice):
            verdict += (f", and the choice (step {server_step(choice):g}, lr {choice['learning_rate']:g}): the "
                        "federated report runs start from the LDA head")
        scores = ", ".join(f"{m:.4f} (step {server_step(hp):g}, lr {hp['learning_rate']:g})" for hp, m in points)
        text += (" Started from it, though, the head needs no rate of its own, and at the experts' rate it moves "
                 "little under a larger server step, where a head at 1e-2 could flip to one class (the collapses "
                 "that kept the grid's steps small). The grid's points with the LDA head at the experts' "
                 f"rate and logit adjustment 1, screened in fp32: {scores} on seed {SELECT_SEED}, {verdict}.")
    central = chosen(done, "centralized", grid("centralized"))
    earlier = [(f["result"]["metric"], c["result"]["metric"]) for seed in REPORT_SEEDS
               if (f := done.get(run_key(report_job("federated", seed, HEAD_INIT_CHOICES["federated"]))))
               and (c := done.get(run_key(report_job("centralized", seed, central or {}))))]
    if len(earlier) == len(REPORT_SEEDS):
        text += (" The earlier choice, from a drawn head, had reached dev ratios "
                 f"{' / '.join(f'{a / b:.4f}' for a, b in earlier)} (seeds {', '.join(map(str, REPORT_SEEDS))}).")
    return text


def phrase_selection_paragraph(r: dict, done: dict) -> str:
    """What the first selection set chose, and the dev ratios its choice reached."""
    first = r.get("phrase_selection") or {}
    fed_hp, central_hp = first.get("federated_chosen"), first.get("centralized_chosen")
    if fed_hp is None or central_hp is None:
        return ""
    ratios = []
    for seed in REPORT_SEEDS:
        fed = done.get(run_key(report_job("federated", seed, fed_hp)))
        central = done.get(run_key(report_job("centralized", seed, central_hp)))
        if fed and central:
            ratios.append(f"{fed['result']['metric'] / central['result']['metric']:.4f} (seed {seed})")
    reached = f"; at the report's settings its choice reached dev ratios {', '.join(ratios)}" if ratios else ""
    sets, train_rows = r["selection_sets"], r["protocol"]["train_limit"]

    def contained(kind: str) -> str:
        return " / ".join(f"{share:.1%}" for share in sets[kind]["contained"])

    return ("\n\nThe first selection set held out training rows at random. SST-2's training split holds every "
            "phrase of its sentences' parse trees, so those rows were mostly phrases "
            f"({sets['phrases']['mean_words']:.1f} words on average, the dev rows {sets['dev']['mean_words']:.1f}), "
            f"and {contained('phrases')} of them (seeds {SELECT_SEED} / {CONFIRM_SEED}) appeared verbatim inside a "
            f"row of a run's {train_rows}-row training subset (the dev rows: {contained('dev')}; the whole-sentence "
            f"set's: {contained('sentences')}, {sets['sentences']['mean_words']:.1f} words on average): "
            "a selection set easier than the dev set and unlike it, on which the chosen federated / "
            f"centralized ratio was {selection_ratio(first):.4f}. It chose federated "
            f"{json.dumps(fed_hp)} and centralized {json.dumps(central_hp)}{reached}. The diagnoses above and "
            "bench/federation_head_refit.py ran on it, at its choice.")


def finalists_paragraph(sel: dict) -> str:
    """How the finalists ranked at the report's settings (the choice), and the selection set's ratio."""
    sides = []
    for side in ("federated", "centralized"):
        ranked = sorted(sel.get(f"{side}_finalists") or [], key=lambda f: -f["mean"])  # stable: grid order
        if ranked:
            tie = " (a tie, broken by grid order)" if len(ranked) > 1 and ranked[1]["mean"] == ranked[0]["mean"] else ""
            sides.append(f"{side} {ranked[0]['mean']:.4f} for {json.dumps(ranked[0]['hp'])}{tie} against "
                         + " and ".join(f"{f['mean']:.4f}" for f in ranked[1:]))
    if not sides:
        return ""
    ratio = f"; on the selection set the choices' ratio is {selection_ratio(sel):.4f}" if len(sides) == 2 else ""
    return "\n\nThe finalists' two-seed means at the report's settings: " + "; ".join(sides) + ratio + "."


def selection_ratio(sel: dict) -> float:
    """The chosen federated finalist's two-seed mean over the chosen centralized one's."""
    fed, central = (max(f["mean"] for f in sel[f"{side}_finalists"]) for side in ("federated", "centralized"))
    return fed / central


def weighting_paragraph(r: dict) -> str:
    """How the training replies' weighting compared, from the diagnoses against the tail-averaged default."""
    rows = {d["name"]: d for d in r["diagnoses"]}
    names = ("tail average of the last 5 rounds", "client weighting: examples trained on", "client weighting: uniform")
    if not all(n in rows and rows[n]["confirm_metric"] is not None for n in names):
        return ""
    reference, trained, uniform = ((rows[n]["metric"], rows[n]["confirm_metric"]) for n in names)
    pair = " / ".join
    return ("\n\nEach round's average weighs the training replies. Flower's convention, a client's partition size "
            "(`client-weighting=partition`), lets one large partition set most of a round's update: at "
            f"alpha {r['protocol']['alpha']} the Dirichlet partitions differ widely in size, and the largest are "
            "often of one label. Every client runs the same local steps, so weighting them alike (`uniform`) reached "
            f"{pair(map(fmt, uniform))} on seeds {SELECT_SEED} / {CONFIRM_SEED} against the partition "
            f"weighting's {pair(map(fmt, reference))}, and weighting by the examples trained on this round (at "
            f"most local steps x batch size, `trained`) {pair(map(fmt, trained))}. Uniform led on both seeds, "
            "by less than one run's noise, and at no cost; it became the default and the report's setting "
            "(`federated_report_settings`). With IID partitions of equal size the three coincide."
            + label_balanced_sentence(rows))


def leads(diagnosis: dict, reference: dict) -> bool:
    """Whether a diagnosis beat its reference on every seed it ran (selection and confirmation)."""
    pairs = [(diagnosis["metric"], reference["metric"]), (diagnosis["confirm_metric"], reference["confirm_metric"])]
    return all(m > ref for m, ref in pairs if m is not None)


def label_balanced_sentence(rows: dict[str, dict]) -> str:
    """How the server's label-balancing weights compared with uniform ones, where both ran twice."""
    balanced = rows.get("client weighting: label-balanced")
    if not balanced or balanced["confirm_metric"] is None:
        return ""
    verdict = ("led uniform on both seeds" if leads(balanced, rows["client weighting: uniform"])
               else "did not lead uniform on both seeds")
    return (" Weighing each round's replies so that their label mix is the federation's (from label counts "
            f"the clients send, `label-balanced`) reached {fmt(balanced['metric'])} / "
            f"{fmt(balanced['confirm_metric'])}: it {verdict}.")


def head_and_optimizer_paragraph(r: dict) -> str:
    """Whether the gap is in the head (frozen, FedBABU) or in the clients' fresh AdamW (the one-client pair)."""
    rows = {d["name"]: d for d in r["diagnoses"]}
    reference, frozen = rows.get("client weighting: uniform"), rows.get("head frozen at its random init (FedBABU)")
    fresh = rows.get("one client with all rows, 100 rounds x 6 steps, fresh AdamW each round")
    kept = rows.get("one client with all rows, 100 rounds x 6 steps, AdamW kept across rounds")
    chosen = sorted((r.get("phrase_selection") or {}).get("centralized_finalists") or [], key=lambda f: -f["mean"])
    if not (reference and frozen and fresh and kept and chosen) or frozen["confirm_metric"] is None:
        return ""
    central = chosen[0]["metrics"][0]  # SELECT_SEED, at the report's settings
    pair = " / ".join
    return ("\n\nAgainst the report's federated settings (the uniform row, "
            f"{pair(map(fmt, (reference['metric'], reference['confirm_metric'])))}), two more causes were ruled "
            "out. Freezing the head at its random initialisation, as FedBABU (Oh et al., ICLR 2022) does so that "
            "label-skewed clients cannot pull it apart, reached "
            f"{pair(map(fmt, (frozen['metric'], frozen['confirm_metric'])))}: the head trained at 1e-2 is "
            "better. A client's fresh AdamW each round (sign-like first steps, no long second-moment history) "
            "costs nothing by itself: one client holding every row, run as 100 rounds of 6 steps at the "
            f"centralized choice, reached {fmt(fresh['metric'])} with a fresh AdamW each round and "
            f"{fmt(kept['metric'])} with one AdamW kept across them, level with each other and within "
            f"{central - min(fresh['metric'], kept['metric']):.3f} of the centralized choice's {fmt(central)} on "
            f"seed {SELECT_SEED}. What is left points at the averaging itself: 5 label-skewed "
            "clients' 6-step moves become one step of the global experts, 120 sequential steps against the "
            "centralized run's 600.")


SPLIT_AND_RATES = ("40 rounds x 3 local steps, report settings", "10 clients a round x 3 local steps, report settings",
                   "10 rounds x 12 local steps, report settings",
                   "client rates / 2, server learning rate 2, report settings",
                   "client rates / 4, server learning rate 4, report settings")


def split_and_rates_paragraph(r: dict) -> str:
    """Whether the 600 client steps split otherwise, or shorter client moves scaled up by the server,
    beat the report's federated settings (the uniform-weighting row)."""
    rows = {d["name"]: d for d in r["diagnoses"]}
    reference = rows.get("client weighting: uniform")
    ran = [rows[n] for n in SPLIT_AND_RATES if n in rows]
    if not reference or not ran:
        return ""

    def scores(d: dict) -> str:
        return " / ".join(fmt(m) for m in (d["metric"], d["confirm_metric"]) if m is not None)

    led = [d["name"] for d in ran if leads(d, reference)]
    verdict = ("Led the reference on every seed it ran: " + "; ".join(led) + "." if led
               else "None led the reference on every seed it ran, so the report keeps 20 rounds x 6 steps at the "
               "chosen rates.")
    return ("\n\nAt the report's federated settings (reference "
            f"{scores(reference)}), the same 600 client steps split otherwise, or the clients' rates (experts and "
            "head) divided and the server's step multiplied back, the same nominal global step from shorter client "
            "moves: " + "; ".join(f"{d['name'].removesuffix(', report settings')} {scores(d)}" for d in ran)
            + f". {verdict}")


def report_paragraph(r: dict) -> str:
    """What tail averaging did to the report's per-seed ratios, and how to read its timings."""
    pairs = [(s["seed"], s["ratio_last_round"], s["ratio"]) for s in r["seeds"] if s.get("ratio_last_round")]
    if not pairs:
        return ""
    lifted = ", ".join(f"{last:.4f} to {tail:.4f} (seed {seed})" for seed, last, tail in pairs)
    rows = r["protocol"]["eval_limit"]
    return (f"\n\nOn the dev set, tail averaging moved the ratios from the same runs' last-round models' to "
            f"its own: {lifted}; one dev row is {1 / rows:.4f} of accuracy. The report's runs train in fp32, "
            "whose client loops are slower than bf16's on CPUs with AMX, so their round overhead fraction (the "
            "share of a round outside those loops) is smaller for that reason; it was 0.115 in the bf16 report "
            "runs before them. Wall seconds are the runs' own, beside whatever else ran on the machine (two "
            "runs at a time, one per core, with `--worker`).")


def legacy_runs() -> list[dict]:
    """Runs of the earlier, unresumable script (one line per comparison; quick runs left out)."""
    runs = [json.loads(line) for line in LOG.read_text().splitlines()] if LOG.exists() else []
    return [v for v in runs if "protocol_id" not in v and not v.get("quick")]


def parse_worker(text: str) -> tuple[int, int]:
    """``"1/2"`` -> ``(1, 2)``.

    Raises:
        argparse.ArgumentTypeError: not I/N with 0 <= I < N.
    """
    try:
        index, count = (int(t) for t in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--worker takes I/N (e.g. 0/2), got {text!r}") from None
    if not 0 <= index < count:
        raise argparse.ArgumentTypeError(f"--worker {text}: I must be in 0..N-1")
    return index, count


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", choices=("select", "head-init", "report", "diagnose", "all"), default="all")
    parser.add_argument("--report-only", action="store_true", help="rewrite the results from finished runs")
    parser.add_argument("--quick", action="store_true", help="tiny data and budget, one seed, nothing written")
    parser.add_argument("--worker", type=parse_worker, default=(0, 1), metavar="I/N",
                        help="run every N-th unfinished job from the I-th (0-based), single-threaded: start "
                        "N such processes at once, one per core; the last to finish writes the complete report")
    opts = parser.parse_args(argv)
    worker = opts.worker
    if worker[1] > 1:  # one core per worker; the Flower processes inherit the environment
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)
    p = PROTOCOL | (QUICK if opts.quick else {})
    fed_grid, central_grid = grid("federated", quick=opts.quick), grid("centralized", quick=opts.quick)
    seeds = (SELECT_SEED,) if opts.quick else REPORT_SEEDS
    with tempfile.TemporaryDirectory(prefix="bench-fed-") as tmp:
        log = Path(tmp) / "quick_runs.jsonl" if opts.quick else LOG
        done = load_runs(protocol_id(p), log)
        if not opts.report_only:
            if opts.stage in ("select", "all"):
                grids = {"federated": fed_grid, "centralized": central_grid}
                jobs = [screen_job(side, SELECT_SEED, hp) for side, grid in grids.items() for hp in grid]
                execute(jobs, p, done, log, opts.quick, Path(tmp), worker)
                done |= load_runs(protocol_id(p), log)  # the grid runs of other workers
                # (a worker that finds the grid unfinished leaves the finalists to a later call)
                jobs = [screen_job(side, CONFIRM_SEED, hp) for side, grid in grids.items()
                        for hp in finalists(done, side, grid) or []]
                jobs += [finalist_job(side, seed, hp) for seed in (SELECT_SEED, CONFIRM_SEED)
                         for side, grid in grids.items() for hp in finalists(done, side, grid) or []]
                execute(jobs, p, done, log, opts.quick, Path(tmp), worker)
            fed_hp, central_hp = chosen(done, "federated", fed_grid), chosen(done, "centralized", central_grid)
            if opts.stage in ("head-init", "all"):
                jobs = [head_init_job(side, seed, hp) for side, hp in HEAD_INIT_CHOICES.items()
                        for seed in (SELECT_SEED, CONFIRM_SEED)]
                execute(jobs, p, done, log, opts.quick, Path(tmp), worker)
                done |= load_runs(protocol_id(p), log)
            if opts.stage in ("report", "all"):
                if fed_hp is None or central_hp is None:
                    raise SystemExit("the select stage has not finished: run --stage select first")
                # the ratio's pairs first, then each seed's comparisons with them in turn
                jobs = [report_job(side, s, hp, head_init_adopted(done, side)) for s in seeds
                        for side, hp in (("federated", fed_hp), ("centralized", central_hp))]
                for s in seeds:
                    jobs += [report_job("exact", s, fed_hp)] if exact_mode() else []
                    jobs += [report_job("ranks", s, fed_hp)] if s in RANKS_SEEDS else []
                jobs += [report_job("generation", s, {}) for s in GENERATION_SEEDS] if generation_case() else []
                execute(jobs, p, done, log, opts.quick, Path(tmp), worker)
            if opts.stage in ("diagnose", "all") and not opts.quick:  # 50 rounds are no smoke test
                diagnosed_hp = chosen(done, "federated", grid("federated", DIAGNOSIS_SELECTION, opts.quick),
                                      DIAGNOSIS_SELECTION)
                if diagnosed_hp is None:
                    raise SystemExit(f"the select stage has not finished on the {DIAGNOSIS_SELECTION} set")
                jobs = [selection_job("diagnose", name, seed, diagnosed_hp, DIAGNOSIS_SELECTION)
                        for seed, names in ((SELECT_SEED, DIAGNOSES), (CONFIRM_SEED, CONFIRM_DIAGNOSES))
                        for name in names]
                execute(jobs, p, done, log, opts.quick, Path(tmp), worker)
        done = load_runs(protocol_id(p), log)  # with the runs other workers finished meanwhile
        results = summarize(done, p, seeds, opts.quick)
        text = report(results, done) if results["seeds"] else None
    if opts.quick:
        print(text or "")
    elif text:
        write_json("federation", results)
        write_section("federation", text)
    print(json.dumps({k: v for k, v in results.items() if k not in ("machine", "seeds", "generation")}, indent=2))
    return results


if __name__ == "__main__":
    main()

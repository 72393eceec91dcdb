"""Data-to-text clients: a tiny random Llama federated on a toy E2E set (hub schema), messages
delivered in process. The client's loss is the recipe's (target tokens only, plus the consistency
term), partitions are disjoint and cover the data, the run folder is a generation run folder, and
the published entry serves with ``serve --lm``'s engine next to another generation task."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from adamix_zoo.backbones import fingerprint
from adamix_zoo.formats.files import EXPERTS_FILE, GENERATIONS_FILE, HEAD_FILE, METADATA_FILE, read_safetensors
from adamix_zoo.formats.merged import load_merged
from adamix_zoo.generation.data import IGNORE
from adamix_zoo.generation.generate import generate
from adamix_zoo.generation.nlg_tasks import PROMPT_TEMPLATE
from adamix_zoo.generation.objective import generation_adamix, lm_loss
from federation.client_app import app
from federation.config import FAMILY_DEFAULT_VALUES, FederationConfig
from federation.records import HEAD_PREFIX, travelling_name
from federation.server_app import run_federation
from federation.task import family_of, partition, pretrained_backbone
from registry import Store
from tests.test_federation_app import train_replies, weighted_mean
from tests.test_federation_support import InProcessGrid, tiny_run_config
from tests.test_serving_generation import ANY_TASK, WORDS, lm_backbone, make_lm_task
from tests.tiny import tiny_tokenizer

pytestmark = pytest.mark.usefixtures("server_identity", "one_thread")
pytest_plugins = ["tests.test_federation_support"]

# A toy E2E: the MR "w<n> w<10+f>" reads "w<n> w50 w<10+f>" or "w<n> w51 w<10+f>" (two references).
TRAIN_MRS = [(n, f) for n in range(6) for f in range(5)]
DEV_MRS = [(n, f) for n in range(6, 9) for f in range(5, 9)]


def mr(n: int, f: int) -> str:
    return f"w{n} w{10 + f}"


def e2e_rows(mrs) -> list[dict]:
    return [{"meaning_representation": mr(n, f), "human_reference": f"w{n} w{v} w{10 + f}"}
            for n, f in mrs for v in (50, 51)]


def webnlg_rows(mrs) -> list[dict]:
    return [{"triples": [f"w{n} | w60 | w{10 + f}"], "texts": [f"w{n} w60 w{10 + f}"]} for n, f in mrs]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture
def lm_env(tmp_path: Path) -> Path:
    """A tiny Llama causal LM folder (the serving tests' backbone) and toy e2e / webnlg data."""
    lm_backbone("llama").save_pretrained(tmp_path / "backbone")
    tiny_tokenizer(WORDS).save_pretrained(tmp_path / "backbone")
    for split, mrs in (("train", TRAIN_MRS), ("validation", DEV_MRS)):
        write_jsonl(tmp_path / "data" / "e2e" / f"{split}.jsonl", e2e_rows(mrs))
        write_jsonl(tmp_path / "data" / "webnlg" / f"{split}.jsonl", webnlg_rows(mrs))
    pretrained_backbone.cache_clear()  # a fresh folder each test, maybe at a path used before
    return tmp_path


def lm_run_config(tmp: Path, **overrides) -> dict:
    """The tiny GLUE run config on the data-to-text task: 2 clients, the family's rank, short outputs."""
    base = tiny_run_config(tmp, tasks="e2e", **{"num-clients": 2, "eval-limit": 6, "max-new-tokens": 6})
    del base["rank"]  # the data-to-text family's default
    return base | overrides


# -- settings -------------------------------------------------------------------------------------
def test_the_task_family_sets_backbone_and_mixture_defaults():
    nlg, glue = FederationConfig(tasks="e2e"), FederationConfig(tasks="sst2")
    assert nlg.family == "generation" and nlg.backbone == "smollm2-135m"
    assert glue.family == "glue" and glue.backbone == "minilm-l6" and glue.adamix.rank == 8
    recipe = generation_adamix()
    assert (nlg.adamix.rank, nlg.adamix.alpha, nlg.adamix.task_loss_passes) == (4, 32.0, "first")
    assert (recipe.rank, recipe.alpha, recipe.task_loss_passes) == (4, 32.0, "first")
    assert nlg.adamix.consistency_weight == recipe.consistency_weight_for("lm") == 1.0
    assert not nlg.head_federated and not nlg.local_head  # nothing but experts to federate

    # what `flwr run .` passes: pyproject's table, whose family-dependent keys say "the default"
    table = FederationConfig().to_run_config() | FAMILY_DEFAULT_VALUES
    from_table = FederationConfig.from_run_config(table | {"tasks": "e2e,webnlg", "num-clients": 3})
    assert from_table.backbone == "smollm2-135m" and from_table.adamix.rank == 4
    assert from_table.adamix.alpha == 32.0 and from_table.adamix.task_loss_passes == "first"
    assert [from_table.client_task(i) for i in range(3)] == [("e2e", 0, 2), ("webnlg", 0, 1), ("e2e", 1, 2)]
    assert FederationConfig.from_run_config(table).backbone == "minilm-l6"
    explicit = FederationConfig.from_run_config({"tasks": "e2e", "rank": 8, "backbone": "my/lm"})
    assert explicit.adamix.rank == 8 and explicit.adamix.alpha == 32.0 and explicit.backbone == "my/lm"
    assert FederationConfig.from_run_config(from_table.to_run_config()) == from_table


@pytest.mark.parametrize("settings, message", [
    ({"tasks": "sst2,e2e"}, r"tasks mix GLUE \(sst2\) and data-to-text \(e2e\) tasks"),
    ({"tasks": "e2e", "partitioner": "dirichlet"}, "needs class labels; data-to-text clients use 'iid'"),
    ({"tasks": "e2e", "federate_head": "true"}, "data-to-text tasks have no head"),
    ({"tasks": "e2e,nope"}, "unknown task 'nope'; GLUE tasks: sst2.*; data-to-text tasks: e2e, webnlg, dart"),
    ({"tasks": "e2e", "max_new_tokens": 0}, "max-new-tokens must be >= 1, got 0"),
])
def test_settings_that_cannot_run_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        FederationConfig(**settings)


# -- the client's work ----------------------------------------------------------------------------
def test_partitions_are_iid_disjoint_and_cover_the_training_pairs(lm_env):
    cfg = FederationConfig.from_run_config(lm_run_config(lm_env, **{"num-clients": 3}))
    family = family_of(cfg)
    rows = family.load_rows(cfg, "e2e", "train")
    pairs = Counter(zip(rows["source"], rows["target"]))
    assert len(rows) == 2 * len(TRAIN_MRS) and max(pairs.values()) == 1
    parts = [partition(cfg, rows, i, 3) for i in range(3)]
    assert [len(p) for p in parts] == [20, 20, 20]
    assert sum((Counter(zip(p["source"], p["target"])) for p in parts), Counter()) == pairs
    # shuffled before sharding: a client holds pairs from all over the file, not its first third
    first_third = {mr(n, f) for n, f in TRAIN_MRS[:10]}
    assert not set(parts[0]["source"]) <= first_third
    # client 1's encoded partition is its shard; validation: one pair per dev source, partitioned
    task, examples = family.client_data(cfg, 1, "train")
    assert task == "e2e" and len(examples) == 20
    assert sum(len(family.client_data(cfg, i, "validation")[1]) for i in range(3)) == cfg.eval_limit


def test_the_loss_is_on_target_tokens_with_the_consistency_term(lm_env):
    cfg = FederationConfig.from_run_config(lm_run_config(lm_env))
    family = family_of(cfg)
    _, examples = family.client_data(cfg, 0, "train")
    batch = family.collate(cfg, "e2e", examples[:4])
    prompt = len(PROMPT_TEMPLATE.format(source="w1 w11").split())  # 4 word tokens
    assert (batch["labels"][:, :prompt] == IGNORE).all()
    assert (batch["labels"][:, prompt:prompt + 4] == batch["input_ids"][:, prompt:prompt + 4]).all()

    model = family.build_model(cfg, "e2e")
    loss_fn = family.loss_fn(model, cfg, "e2e", examples)
    # identical experts with B = 0 at init: any routing is the bare LM, and the passes agree
    loss, parts = loss_fn(model, batch)
    bare = AutoModelForCausalLM.from_pretrained(lm_env / "backbone").eval()
    with torch.no_grad():
        logits = bare(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels, mask = batch["labels"][:, 1:], batch["labels"][:, 1:] != IGNORE
    on_targets = F.cross_entropy(logits[:, :-1][mask], labels[mask])
    torch.testing.assert_close(torch.tensor(parts["task_loss"]), on_targets, rtol=1e-5, atol=1e-6)
    assert parts["consistency"] == pytest.approx(0.0, abs=1e-7)
    everywhere = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["input_ids"][:, 1:].flatten())
    assert abs(everywhere.item() - on_targets.item()) > 0.05  # the prompt really is left out

    with torch.no_grad():  # experts that differ: the two routed passes disagree
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn_like(p) * 0.5)
    model.seed_routing(3)
    loss, parts = loss_fn(model, batch)
    assert parts["consistency"] > 1e-4
    assert loss.item() == pytest.approx(parts["task_loss"] + 1.0 * parts["consistency"], rel=1e-5)
    model.seed_routing(3)  # the recipe's objective, with the same routing draws
    assert lm_loss(model, batch, 1.0, "first").item() == pytest.approx(loss.item(), rel=1e-5)


def test_a_round_of_local_steps_lowers_the_eval_loss(lm_env):
    cfg = FederationConfig.from_run_config(lm_run_config(lm_env, **{"local-steps": 30, "learning-rate": 1e-2}))
    family = family_of(cfg)
    _, train = family.client_data(cfg, 0, "train")
    _, dev = family.client_data(cfg, 0, "validation")
    model = family.build_model(cfg, "e2e")
    before = family.evaluate(cfg, "e2e", model, dev), family.evaluate(cfg, "e2e", model, train)
    stats = family.train_round(model, cfg, "e2e", train, seed=1)
    after = family.evaluate(cfg, "e2e", model, dev), family.evaluate(cfg, "e2e", model, train)
    assert after[1]["eval-loss"] < 0.6 * before[1]["eval-loss"]
    assert after[0]["eval-loss"] < 0.9 * before[0]["eval-loss"]  # unseen words: "w50" and copying
    before, after = before[0], after[0]
    assert after["eval-tokens"] == before["eval-tokens"] == 4 * len(dev)  # 3 words + eos per target
    assert stats["train-consistency"] > 0 and stats["train-loss"] > 0


# -- a whole federation, in process ---------------------------------------------------------------
def test_data_to_text_federation_publishes_an_entry_that_serves(lm_env):
    rc = lm_run_config(lm_env)
    grid = InProcessGrid(app, rc, num_nodes=2)
    outcome = run_federation(grid, FederationConfig.from_run_config(rc))

    # only experts travel (no head: the LM answers); the round log has the losses
    records = [m.content["arrays"] for m in grid.sent if "arrays" in m.content]
    records += [r.content["arrays"] for r in train_replies(grid, 1) + train_replies(grid, 2)]
    assert records and all(all(travelling_name(n) and not n.startswith(HEAD_PREFIX) for n in r) for r in records)
    train = outcome.metrics["federation"]["train_metrics"]
    # identical experts and B = 0: the routed passes agree until A gets gradients (after step 1)
    assert train[1]["train-consistency"] == 0.0 < train[2]["train-consistency"]
    evals = outcome.metrics["federation"]["client_eval_metrics"]
    assert evals[2]["e2e-eval-loss"] < evals[1]["e2e-eval-loss"] and evals[2]["e2e-eval-tokens"] == 4 * 3  # per client
    saved = read_safetensors(outcome.folder / EXPERTS_FILE)
    for name, value in weighted_mean(train_replies(grid, 2)).items():
        np.testing.assert_allclose(saved[name].numpy(), value, rtol=1e-5, atol=1e-7)

    # the run folder is the data-to-text recipe's
    out = outcome.folder
    metrics = json.loads((out / "final_metrics.json").read_text())
    assert metrics["main_metric"] == "bleu" and 0.0 <= metrics["bleu"] <= 100.0
    assert {"rouge_l", "nist"} <= set(metrics) and metrics["eval_sources"] == 6
    generations = [json.loads(line) for line in (out / GENERATIONS_FILE).read_text().splitlines()]
    assert [g["source"] for g in generations] == [mr(n, f) for n, f in DEV_MRS[:6]]
    assert all(len(g["references"]) == 2 for g in generations)
    run = json.loads((out / "run_config.json").read_text())
    assert (run["problem"], run["label_names"], run["prompt_template"]) == ("lm", [], PROMPT_TEMPLATE)
    assert run["backbone_fingerprint"] == fingerprint(AutoModelForCausalLM.from_pretrained(lm_env / "backbone"))
    assert run["adamix"]["rank"] == 4 and run["adamix"]["task_loss_passes"] == "first"
    meta = json.loads((out / "merged" / METADATA_FILE).read_text())
    assert meta["problem"] == "lm" and meta["prompt_template"] == PROMPT_TEMPLATE
    assert not list(out.rglob(HEAD_FILE))

    # published as a generation entry; `adamix-zoo generate` (serve --lm's engine) serves it
    assert outcome.published == ["federated/e2e@1"]
    store = Store(rc["registry-dir"])
    task = store.show("federated/e2e@1")["tasks"]["e2e"]
    assert task["head"] is None and task["prompt_template"] == PROMPT_TEMPLATE
    assert task["metrics"]["bleu"] == metrics["bleu"]
    check_served(lm_env, store, "federated/e2e@1")


def check_served(env: Path, store: Store, ref: str) -> None:
    """``adamix-zoo generate`` with the entry next to another generation task: each row gets what
    its task's merged adapter generates alone."""
    from adamix_zoo.cli import _register_commands, app as cli

    other = make_lm_task(env, "dart", "llama", "lora", seed=2, rank=8, alpha=32.0)
    _register_commands()
    args = ["generate", "--backbone", str(env / "backbone"), "--store", str(store.root), "--entry", ref,
            "-t", str(other), "--max-new-tokens", "6", "--json", "e2e=w7 w16", "dart=w7 w16", "e2e=w2 w13"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    served = [json.loads(x)["output"] for x in result.stdout.splitlines() if x.startswith("{")]
    tokenizer = tiny_tokenizer(WORDS)
    entry = store.resolve(ref).path
    alone = [generate(load_merged(lm_backbone("llama"), folder), tokenizer, ANY_TASK, [src], max_new_tokens=6)[0]
             for folder, src in ((entry, "w7 w16"), (other, "w7 w16"), (entry, "w2 w13"))]
    assert served == alone
    assert served[0] != served[1]  # two different adapters answered


def test_multi_task_data_to_text_publishes_one_entry_per_task(lm_env):
    rc = lm_run_config(lm_env, **{"tasks": "e2e,webnlg", "num-rounds": 1, "eval-limit": 3})
    grid = InProcessGrid(app, rc, num_nodes=2)
    outcome = run_federation(grid, FederationConfig.from_run_config(rc))
    assert sorted(outcome.published) == ["federated/e2e@1", "federated/webnlg@1"]
    assert sorted(outcome.task_folders) == ["e2e", "webnlg"]
    shared = read_safetensors(outcome.folder / EXPERTS_FILE)
    for task in ("e2e", "webnlg"):
        folder = outcome.task_folders[task]
        assert json.loads((folder / "merged" / METADATA_FILE).read_text())["task"] == task
        assert outcome.metrics[task]["eval_sources"] == 3
        experts = read_safetensors(folder / EXPERTS_FILE)  # every task has the whole shared adapter
        assert all(torch.equal(experts[k], shared[k]) for k in shared)
    sources = [json.loads(x)["source"] for x in (outcome.task_folders["webnlg"] / GENERATIONS_FILE).open()]
    assert sources == [f"w{n} | w60 | w{10 + f}" for n, f in DEV_MRS[:3]]


# -- through Flower's runtime ---------------------------------------------------------------------
@pytest.mark.integration
def test_federate_e2e_in_a_flower_simulation_then_serve(lm_env):
    env = os.environ | {"ADAMIX_ZOO_HOME": str(lm_env / "zoo"), "HF_HUB_OFFLINE": "1"}
    cmd = [str(Path(sys.executable).parent / "adamix-zoo"), "federate", "--tasks", "e2e", "--clients", "2",
           "--rounds", "2", "--local-steps", "2", "--backbone", str(lm_env / "backbone"),
           "--data-dir", str(lm_env / "data"), "--output-dir", str(lm_env / "out"),
           "--run-config", "batch-size=8 max-length=16 num-experts=2 eval-limit=4 max-new-tokens=6"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "round 2: aggregated 2 valid updates" in done.stdout
    assert "e2e dev metrics (global model): {'bleu'" in done.stdout
    metrics = json.loads((lm_env / "out" / "final_metrics.json").read_text())
    assert metrics["federation"]["aggregated_rounds"] == [1, 2] and metrics["eval_sources"] == 4
    store = Store(lm_env / "zoo")
    assert [e.ref for e in store.list()] == ["federated/e2e@1"]
    check_served(lm_env, store, "federated/e2e@1")


def test_the_learning_rate_is_the_task_familys_unless_set():
    assert FederationConfig(tasks="sst2").learning_rate == 1e-3
    assert FederationConfig(tasks="e2e").learning_rate == 2e-3
    assert FederationConfig(tasks="e2e", learning_rate=1e-3).learning_rate == 1e-3
    table = FederationConfig().to_run_config() | FAMILY_DEFAULT_VALUES
    assert FederationConfig.from_run_config(table | {"tasks": "webnlg"}).learning_rate == 2e-3
    assert FederationConfig.from_run_config(table | {"learning-rate": 3e-3}).learning_rate == 3e-3
    with pytest.raises(ValueError, match="learning-rate must be >= 0"):
        FederationConfig(tasks="sst2", learning_rate=-1e-3)

"""The training recipe on a tiny random BERT and generated data: every method learns in seconds,
the output folder follows its contract, runs reload to the same numbers, and the CLI drives it."""

import json

import pytest
import torch
from typer.testing import CliRunner

from adamix_zoo.cli import _register_commands, app
from adamix_zoo.evaluation import analyze_experts, evaluate_model, load_run, single_adapter_state
from adamix_zoo.formats.files import EXPERTS_FILE, HEAD_FILE
from adamix_zoo.glue_tasks import get_task
from adamix_zoo.loop import train_steps
from adamix_zoo.optim import make_optimizer, make_scheduler
from adamix_zoo.recipes.glue import METHODS, TrainArgs, adamix_config, prepare, train, train_args
from adamix_zoo.task_model import build_task_model
from tests.tiny_glue import tiny_backbone_dir, write_glue

LR = {"full": 1e-3}  # tiny random backbone: higher rates than the real-model defaults


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one thread avoids oversubscribing a shared 2-core machine (restored after)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {"backbone": str(tiny_backbone_dir(root / "bert")), "data_dir": str(write_glue(root / "glue"))}


def args_for(env, method, task="sst2", steps=60, **kw) -> TrainArgs:
    base = {"task": task, "method": method, "max_steps": steps, "eval_every": steps // 3,
            "batch_size": 16, "lr": LR.get(method, 3e-2), "progress": False, "save": False, "seed": 0}
    return train_args(**env, **(base | kw))


@pytest.mark.parametrize("method", METHODS)
def test_every_method_learns_classification(env, method):
    result = train(args_for(env, method))
    losses = [r["loss"] for r in result.history]
    assert losses[-1] < losses[0] - 0.03
    assert result.best_metrics["accuracy"] > 0.8  # balanced validation: chance is 0.5


@pytest.mark.parametrize("method", ["full", "adamix-lora", "adamix-adapter"])
def test_regression_learns_with_squared_difference_consistency(env, method):
    result = train(args_for(env, method, task="stsb"))
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    assert result.best_metrics["pearson"] > 0.5


def test_output_folder_contract_and_reload(env, tmp_path):
    out = tmp_path / "run"
    train(args_for(env, "adamix-lora", save=True, output_dir=str(out), analyze_experts=True,
                   analysis_samples=3))
    names = {p.name for p in out.iterdir()}
    assert {"run_config.json", "metrics.jsonl", "final_metrics.json", EXPERTS_FILE, HEAD_FILE,
            "merged", "curve.png", "experts_spread.png", "experts_analysis.json"} <= names
    assert {"adapter_model.safetensors", "adapter_config.json", HEAD_FILE} <= {
        p.name for p in (out / "merged").iterdir()}
    config = json.loads((out / "run_config.json").read_text())
    assert config["method"] == "adamix-lora" and config["problem"] == "classification"
    assert config["adamix"]["num_experts"] == 4 and config["label_names"] == ["negative", "positive"]
    assert config["data"] == {"source": env["data_dir"] + "/sst2", "train_size": 256,
                              "validation_size": 64, "few_shot": 0}
    assert len(config["backbone_fingerprint"]) == 64 and config["train"]["max_steps"] == 60
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [20, 40, 60]
    final = json.loads((out / "final_metrics.json").read_text())
    assert final["main_metric"] == "accuracy"
    assert final["accuracy"] == max(x["metrics"]["accuracy"] for x in lines)
    assert lines[[x["step"] for x in lines].index(final["best_step"])]["metrics"] == {
        k: v for k, v in final.items() if k not in ("main_metric", "best_step")}
    analysis = json.loads((out / "experts_analysis.json").read_text())
    assert len(analysis["fixed"]) == 4 and len(analysis["random"]) == 3
    assert analysis["merged"] == pytest.approx(final["accuracy"])
    # The saved experts and the merged folder reproduce the best checkpoint's numbers.
    loader = prepare(args_for(env, "adamix-lora")).loaders.validation
    for merged in (False, True):
        model, _ = load_run(out, merged=merged)
        assert evaluate_model(model, loader, get_task("sst2"))["accuracy"] == pytest.approx(final["accuracy"])


def test_full_method_saves_the_whole_model(env, tmp_path):
    out = tmp_path / "full"
    train(args_for(env, "full", steps=10, save=True, output_dir=str(out)))
    names = {p.name for p in out.iterdir()}
    assert "full_model.safetensors" in names and "merged" not in names and EXPERTS_FILE not in names
    assert json.loads((out / "run_config.json").read_text())["adamix"] is None
    model, _ = load_run(out)
    loader = prepare(args_for(env, "full")).loaders.validation
    final = json.loads((out / "final_metrics.json").read_text())
    assert evaluate_model(model, loader, get_task("sst2"))["accuracy"] == pytest.approx(final["accuracy"])


@pytest.mark.parametrize("kind", ["lora", "adapter"])
def test_adamix_and_its_base_method_have_equal_inference_parameters(env, kind):
    task = get_task("sst2")
    counts = {}
    for method in (kind, f"adamix-{kind}"):
        model = build_task_model(env["backbone"], task, adamix_config(args_for(env, method)))
        if method.startswith("adamix"):
            assert model.backbone.parameter_counts().adapter > counts[kind]  # K experts in training
            model.backbone.merge()
        counts[method] = model.backbone.parameter_counts().adapter
        assert sum(p.numel() for p in model.head.parameters()) == 2 * 32 + 2
    assert counts[kind] == counts[f"adamix-{kind}"]


def test_method_configs():
    assert adamix_config(TrainArgs(method="full")) is None
    lora = adamix_config(TrainArgs(method="lora"))
    assert (lora.kind, lora.num_experts, lora.consistency_weight) == ("lora", 1, 0.0)
    mix = adamix_config(train_args(method="adamix-adapter", num_experts=3, seed=7))
    assert (mix.kind, mix.num_experts, mix.consistency_weight, mix.seed) == ("adapter", 3, None, 7)
    assert mix.consistency_weight_for("classification") == 1.0 and mix.consistency_weight_for("lm") == 1.0


@pytest.mark.parametrize(
    ("kw", "message"),
    [({"method": "prefix"}, "method='prefix'.*adamix-lora"), ({"task": "imdb"}, "unknown task"),
     ({"sharing": "both"}, "sharing"), ({"max_steps": -1}, "max_steps"), ({"lr": 0.0}, "lr"),
     ({"epochs": -1}, "epochs"), ({"warmup_ratio": 1.0}, "warmup_ratio")],
)
def test_train_args_are_validated(kw, message):
    with pytest.raises(ValueError, match=message):
        train_args(**kw)


def test_warmup_then_linear_decay():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = make_scheduler(opt, total_steps=10, warmup_steps=2)
    lrs = []
    for _ in range(10):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.5, 1.0, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125])


def test_expert_lr_scale_multiplies_the_routed_experts_rate_alone(env):
    setup = prepare(args_for(env, "adamix-lora", head_lr=1e-2, expert_lr_scale=2.0))
    model = setup.model
    opt = make_optimizer(model, 1e-3, head_lr=1e-2, expert_lr_scale=2.0)
    rate = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    seen = set()
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        leaf = name.rsplit(".", 1)[-1]
        seen.add(leaf if not name.startswith("head.") else "head")
        if name.startswith("head."):
            assert rate[id(param)] == 1e-2, name
        elif leaf == "adamix_lora_A":  # K=4 experts (B is shared by default)
            assert param.shape[0] == 4 and rate[id(param)] == 2e-3, name
        else:
            assert param.shape[0] == 1 and rate[id(param)] == 1e-3, name
    assert {"adamix_lora_A", "adamix_lora_B", "head"} <= seen
    with pytest.raises(ValueError, match="expert_lr_scale"):
        args_for(env, "adamix-lora", expert_lr_scale=0.0)


def test_train_steps_reuses_a_model_and_loader(env):
    """The federation entry point: N steps on an existing model, consistency from its config."""
    setup = prepare(args_for(env, "adamix-lora"))
    model, task = setup.model, setup.task
    before = {k: v.clone() for k, v in model.backbone.adapter_state_dict().items()}
    opt = make_optimizer(model, 1e-2)
    stats = train_steps(model, setup.loaders.train, task, 5, opt)
    assert stats["steps"] == 5 and stats["examples"] == 5 * 16 and stats["consistency"] > 0
    assert any(not torch.equal(before[k], v) for k, v in model.backbone.adapter_state_dict().items())
    plain = prepare(args_for(env, "lora"))
    stats = train_steps(plain.model, plain.loaders.train, task, 2, make_optimizer(plain.model, 1e-2))
    assert stats["consistency"] == 0.0


def test_best_checkpoint_is_restored(env):
    result = train(args_for(env, "adamix-adapter", lr=0.2))  # a rate high enough to be unstable
    setup = prepare(args_for(env, "adamix-adapter"))
    again = evaluate_model(result.model, setup.loaders.validation, setup.task)
    assert again["accuracy"] == pytest.approx(result.best)
    assert result.best == max(r["metrics"]["accuracy"] for r in result.history)


def test_single_adapters_and_restoring_after_analysis(env):
    setup = prepare(args_for(env, "adamix-adapter", sharing="none"))
    backbone = setup.model.backbone
    state = {k: v.clone() for k, v in backbone.adapter_state_dict().items()}
    for v in state.values():
        v.normal_()
    backbone.load_adapter_state_dict(state)
    fixed = single_adapter_state(state, 2)
    name = next(n for n in state if n.endswith("adamix_down_weight"))
    assert all(torch.equal(fixed[name][k], state[name][2]) for k in range(4))
    drawn = single_adapter_state(state, torch.Generator().manual_seed(0))
    bias = name.replace("weight", "bias")
    pick = next(k for k in range(4) if torch.equal(drawn[name][0], state[name][k]))
    assert torch.equal(drawn[bias][0], state[bias][pick])  # weight and bias: the same expert
    analysis = analyze_experts(setup.model, setup.loaders.validation, setup.task, num_random=2)
    assert len(analysis["fixed"]) == 4 and len(analysis["random"]) == 2
    assert analysis["merged_minus_median"] == pytest.approx(analysis["merged"] - analysis["median_single"])
    for k, v in backbone.adapter_state_dict().items():
        assert torch.equal(v, state[k])
    with pytest.raises(ValueError, match="num_experts >= 2"):
        analyze_experts(prepare(args_for(env, "lora")).model, setup.loaders.validation, setup.task)


def test_cli_train_then_eval(env, tmp_path):
    _register_commands()
    runner = CliRunner()
    out = tmp_path / "cli"
    res = runner.invoke(app, ["train", "--task", "sst2", "--method", "adapter", "--backbone",
                              env["backbone"], "--data-dir", env["data_dir"], "--max-steps", "6",
                              "--batch-size", "16", "--output-dir", str(out), "--no-progress"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.output[res.output.index("{"):])
    assert 1 <= summary["best_step"] <= 6 and "accuracy" in summary
    res = runner.invoke(app, ["eval", str(out), "--data-dir", env["data_dir"]])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output[res.output.index("{"):])["accuracy"] == pytest.approx(summary["accuracy"])
    # without --data-dir: the data the run trained on (its run_config.json), not the hub
    res = runner.invoke(app, ["eval", str(out)], env={"ADAMIX_DATA_DIR": ""})
    assert res.exit_code == 0, res.output
    assert json.loads(res.output[res.output.index("{"):])["accuracy"] == pytest.approx(summary["accuracy"])
    bad = runner.invoke(app, ["train", "--method", "nope", "--backbone", env["backbone"]])
    assert bad.exit_code != 0 and "method='nope'" in bad.output
    no_data = runner.invoke(app, ["train", "--backbone", env["backbone"], "--data-dir", str(tmp_path)])
    assert no_data.exit_code == 2 and "no data for task 'sst2'" in no_data.output
    missing = runner.invoke(app, ["eval", str(tmp_path / "nothing")])
    assert missing.exit_code == 2 and "not a training run folder" in missing.output
    assert "adamix-zoo train --task" in runner.invoke(app, ["train", "--help"]).output


def test_optimizer_groups_head_rate_and_no_decay(env):
    model = build_task_model(env["backbone"], get_task("sst2"), adamix_config(args_for(env, "adamix-lora")))
    opt = make_optimizer(model, 1e-3, weight_decay=0.1, head_lr=1e-2)
    ids = {id(p): g for g in opt.param_groups for p in g["params"]}
    head_w, head_b = model.head.classifier.weight, model.head.classifier.bias
    assert (ids[id(head_w)]["lr"], ids[id(head_w)]["weight_decay"]) == (1e-2, 0.1)
    assert ids[id(head_b)]["weight_decay"] == 0.0
    lora_a = next(p for n, p in model.named_parameters() if n.endswith("adamix_lora_A"))
    assert (ids[id(lora_a)]["lr"], ids[id(lora_a)]["weight_decay"]) == (1e-3, 0.1)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == trainable


def test_default_budget_is_the_fidelity_protocol():
    from adamix_zoo.recipes.glue import _schedule

    assert _schedule(TrainArgs(method="lora"), steps_per_epoch=100) == (600, 36, 150)
    assert _schedule(TrainArgs(method="adamix-lora"), steps_per_epoch=100) == (1200, 72, 300)
    assert _schedule(TrainArgs(method="lora", epochs=2), steps_per_epoch=100)[0] == 200
    assert _schedule(TrainArgs(method="lora", epochs=2, max_steps=7), steps_per_epoch=100)[0] == 7
    defaults = TrainArgs()
    assert (defaults.batch_size, defaults.head_lr) == (16, 1e-2)


def test_default_learning_rates_are_the_fidelity_benchmarks_choice():
    """Defaults are the product: each method's rate is the one bench/fidelity.py's grid chose
    (bench/results/fidelity.json "lr", written from its runs), once that method's grid is complete."""
    from pathlib import Path

    from adamix_zoo.recipes.glue import DEFAULT_HEAD_LR, DEFAULT_LR
    from bench.fidelity import PROTOCOL

    results = json.loads((Path(__file__).resolve().parents[1] / "bench/results/fidelity.json").read_text())
    assert results["lr"], "the fidelity grid has chosen no rate yet"
    for method, lr in results["lr"].items():
        assert TrainArgs(method=method).learning_rate == DEFAULT_LR[method] == lr, method
    assert DEFAULT_HEAD_LR == PROTOCOL["head_lr"] == results["protocol"]["head_lr"]

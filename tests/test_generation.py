"""Generation: a tiny random Llama and GPT-2 learn a toy data-to-text mapping with every method;
metric functions agree with known values; data grouping and prompt masking are right."""

import itertools
import json

import pytest
import sacrebleu
import torch

from adamix_zoo import AdaMixModel
from adamix_zoo.generation.data import IGNORE, collate_lm, encode_pair, grouped_examples, training_pairs
from adamix_zoo.generation.generate import generate
from adamix_zoo.generation.metrics import bleu, nist, nlg_metrics, rouge_l
from adamix_zoo.generation.nlg_tasks import PROMPT_TEMPLATE, NLGTask, get_nlg_task
from adamix_zoo.generation.objective import lm_loss
from adamix_zoo.recipes.generation import METHODS, GenerationArgs
from tests.tiny import tiny_model, tiny_tokenizer

NAMES, FOODS = [f"n{i}" for i in range(6)], [f"f{i}" for i in range(5)]
TOY = NLGTask("toy", "", lambda r: r["src"], lambda r: [r["tgt"]], ("src", "tgt"))
PAIRS = [(f"name {n} food {f}", f"{n} serves {f}") for n, f in itertools.product(NAMES, FOODS)]


def _toy_setup(arch: str, method: str):
    tokenizer = tiny_tokenizer(["Data:", "Text:", "name", "food", "serves"] + NAMES + FOODS)
    config = GenerationArgs.from_options(method=method, rank=8, alpha=16, num_experts=4).adamix_config()
    # a larger init lets the frozen, tied output head express confident predictions
    model = AdaMixModel(tiny_model(arch, head="lm", init=0.2), config, head_modules=[])
    features = [encode_pair(tokenizer, TOY, s, t, 32) for s, t in PAIRS]
    return model, tokenizer, features


@torch.no_grad()
def _eval(model: AdaMixModel, batch: dict) -> tuple[float, float]:
    """(loss, teacher-forced accuracy on target tokens) in eval mode (merged routing)."""
    model.eval()
    out = model(**batch)
    predicted, labels = out.logits[:, :-1].argmax(-1), batch["labels"][:, 1:]
    mask = labels != IGNORE
    return out.loss.item(), (predicted[mask] == labels[mask]).float().mean().item()


def _train_toy(arch: str, method: str, steps: int = 150):
    torch.manual_seed(0)
    model, tokenizer, features = _toy_setup(arch, method)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        batch = collate_lm([features[i] for i in torch.randint(len(features), (16,), generator=g)],
                           tokenizer.pad_token_id)
        model.train()
        lm_loss(model, batch, model.config.consistency_weight_for("lm")).backward()
        optimizer.step()
        optimizer.zero_grad()
    return model, tokenizer, features


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_tiny_lm_learns_toy_data_to_text(arch, method):
    untrained, tokenizer, features = _toy_setup(arch, method)
    everything = collate_lm(features, tokenizer.pad_token_id)
    loss0, accuracy0 = _eval(untrained, everything)
    model, _, _ = _train_toy(arch, method)
    loss1, accuracy1 = _eval(model, everything)
    assert loss1 < 0.5 * loss0
    assert accuracy1 > 0.5 > accuracy0  # chance is about 1 / 16


def test_batched_greedy_and_beam_generation_match_single_inputs():
    model, tokenizer, _ = _train_toy("llama", "lora")
    sources = [s for s, _ in PAIRS[::5]]
    sources[0] = "name n0 food f0 name n1"  # a longer prompt: the others are left-padded
    batched = generate(model, tokenizer, TOY, sources, batch_size=len(sources), max_new_tokens=4)
    single = [generate(model, tokenizer, TOY, [s], max_new_tokens=4)[0] for s in sources]
    assert batched == single
    targets = dict(PAIRS)
    assert sum(batched[i] == targets[s] for i, s in enumerate(sources) if s in targets) >= 3
    beams = generate(model, tokenizer, TOY, sources, num_beams=3, max_new_tokens=4)
    assert len(beams) == len(sources) and all(isinstance(b, str) for b in beams)


def test_prompt_tokens_are_masked_and_batches_padded():
    tokenizer = tiny_tokenizer(["Data:", "Text:", "a", "b", "c"])
    feature = encode_pair(tokenizer, TOY, "a b", "c", 32)
    prompt_len = len(tokenizer("Data: a b\nText:", add_special_tokens=False)["input_ids"])
    assert feature["labels"][:prompt_len] == [IGNORE] * prompt_len
    assert feature["labels"][prompt_len:] == feature["input_ids"][prompt_len:]
    assert feature["input_ids"][-1] == tokenizer.eos_token_id
    short = encode_pair(tokenizer, TOY, "a", "c", 32)
    batch = collate_lm([feature, short], tokenizer.pad_token_id)
    assert batch["attention_mask"][1].sum() == len(short["input_ids"])
    assert (batch["labels"][1][len(short["input_ids"]):] == IGNORE).all()


def test_lm_consistency_adds_a_masked_kl_term():
    torch.manual_seed(0)
    model, tokenizer, features = _toy_setup("llama", "adamix-lora")
    with torch.no_grad():  # distinct A experts (they start identical) and a non-zero shared B
        for m in model.mixtures().values():
            m.adamix_lora_A.normal_()
            m.adamix_lora_B.normal_()
    batch = collate_lm(features[:4], tokenizer.pad_token_id)
    model.train()
    model.seed_routing(1)
    plain = lm_loss(model, batch, 0.0)
    model.seed_routing(1)
    with_kl = lm_loss(model, batch, 10.0)
    # the two passes route through different experts, so the KL term is clearly positive
    assert with_kl.item() > plain.item() + 1e-3


def test_metrics_agree_with_known_values():
    hyps = ["the cat sat on the mat", "a dog ran"]
    refs = [["the cat sat on the mat", "a cat on a mat"], ["the dog ran fast"]]
    expected = sacrebleu.corpus_bleu(hyps, [["the cat sat on the mat", "the dog ran fast"],
                                            ["a cat on a mat", None]]).score
    assert bleu(hyps, refs) == pytest.approx(expected)
    assert bleu(["a b c d"], [["a b c d"]]) == pytest.approx(100.0)
    assert rouge_l(["a b c d"], [["x y", "a b c d"]]) == pytest.approx(100.0)  # best reference
    assert rouge_l(["a b"], [["a c"]]) == pytest.approx(50.0)  # LCS 1 of 2 both ways
    assert nist(["x y z"], [["q r s"]]) == 0.0
    assert nist(hyps, refs) > nist(["a dog ran", "the cat sat on the mat"], refs)
    assert set(nlg_metrics(hyps, refs)) == {"bleu", "rouge_l", "nist"}
    with pytest.raises(ValueError, match="2 hypotheses but 1 reference lists"):
        bleu(hyps, refs[:1])


def test_tasks_linearise_and_group_references():
    e2e, webnlg, dart = get_nlg_task("e2e"), get_nlg_task("webnlg"), get_nlg_task("dart")
    rows = [{"meaning_representation": "name[A]", "human_reference": "A one."},
            {"meaning_representation": "name[A]", "human_reference": "A two."},
            {"meaning_representation": "name[B]", "human_reference": "B."}]
    examples = grouped_examples(e2e, rows)
    assert [(e.source, e.references) for e in examples] == [("name[A]", ("A one.", "A two.")), ("name[B]", ("B.",))]
    assert len(training_pairs(e2e, rows)) == 3
    assert webnlg.source({"triples": ["Aarhus_Airport | cityServed | Aarhus"]}) == "Aarhus Airport | cityServed | Aarhus"
    assert dart.source({"tripleset": [["a", "B", "c"], ["d", "E", "f"]]}) == "a | B | c ; d | E | f"
    assert dart.references({"annotations": [{"source": "s", "text": "t1"}, {"source": "s", "text": "t2"}]}) == ["t1", "t2"]
    with pytest.raises(ValueError, match="unknown generation task 'xsum'"):
        get_nlg_task("xsum")
    with pytest.raises(ValueError, match="method='prefix'"):
        GenerationArgs(method="prefix")


def test_cli_train_dispatches_data_to_text_tasks(tmp_path, monkeypatch):
    """`adamix-zoo train --task e2e` runs the generation recipe with the shared options mapped."""
    from typer.testing import CliRunner

    import adamix_zoo.recipes.generation as recipe
    from adamix_zoo.cli import _register_commands, app

    seen = {}
    monkeypatch.setattr(recipe, "run_generation", lambda args: seen.setdefault("args", args) and {"bleu": 1.0})
    _register_commands()
    result = CliRunner().invoke(app, ["train", "--task", "e2e", "--method", "lora", "--max-steps", "7",
                                      "--train-subset", "50", "--output-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    args = seen["args"]
    assert (args.task, args.method, args.steps, args.train_size, args.backbone) == ("e2e", "lora", 7, 50, "smollm2-135m")
    bad = CliRunner().invoke(app, ["train", "--task", "e2e", "--method", "full"])
    assert bad.exit_code != 0 and "method='full'" in bad.output


def _recipe_run(tmp_path):
    """The data-to-text recipe end to end on a tiny saved Llama and two tiny E2E splits; checks the
    run folder and returns it with the tokenizer and the generations."""
    from adamix_zoo.recipes.generation import run_generation

    rows = [{"meaning_representation": f"name[{n}], food[{f}]", "human_reference": f"{n} serves {f}"}
            for n in NAMES for f in FOODS]
    for split in ("train", "validation"):
        (tmp_path / "data" / "e2e").mkdir(parents=True, exist_ok=True)
        (tmp_path / "data" / "e2e" / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    source_words = [w for r in rows for w in r["meaning_representation"].split()]
    tokenizer = tiny_tokenizer(["Data:", "Text:", "serves"] + NAMES + FOODS + source_words)
    model = tiny_model("llama", head="lm")
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    out = tmp_path / "run"
    final = run_generation(GenerationArgs(
        task="e2e", method="adamix-lora", backbone=str(tmp_path / "model"), data_dir=str(tmp_path / "data"),
        output_dir=str(out), train_size=16, eval_size=4, steps=3, batch_size=4, max_new_tokens=4))
    assert final["main_metric"] == "bleu" and 0.0 <= final["bleu"] <= 100.0
    assert {"run_config.json", "metrics.jsonl", "final_metrics.json", "adamix_experts.safetensors",
            "generations.jsonl", "curve.png"} <= {p.name for p in out.iterdir()}
    assert (out / "merged" / "adapter_model.safetensors").exists()
    run = json.loads((out / "run_config.json").read_text())
    assert run["problem"] == "lm" and run["adamix"]["num_experts"] == 4
    generations = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert len(generations) == 4
    return out, tokenizer, generations


def test_recipe_writes_the_run_folder(tmp_path):
    _, _, generations = _recipe_run(tmp_path)
    assert all(set(g) == {"source", "output", "references"} for g in generations)


def test_a_published_generation_run_serves_what_the_recipe_generated(tmp_path):
    """Run -> registry entry (no head; prompt template recorded) -> serving engine on the causal LM:
    the engine's greedy outputs are the recipe's own."""
    from transformers import AutoModelForCausalLM

    from adamix_zoo.serving import ServingEngine
    from registry import Store

    out, tokenizer, generations = _recipe_run(tmp_path)
    store = Store(tmp_path / "zoo")
    info = store.publish(out)
    meta = store.show(info.ref)
    assert meta["tasks"]["e2e"]["head"] is None
    assert meta["tasks"]["e2e"]["prompt_template"] == PROMPT_TEMPLATE
    engine = ServingEngine(AutoModelForCausalLM.from_pretrained(tmp_path / "model"), tokenizer)
    for folder in (store.get(info.ref), out / "merged"):  # the entry, and the run's merged folder
        (attached,) = engine.attach_all(folder, task="e2e")
        assert attached.problem == "lm"
        served = engine.generate("e2e", [g["source"] for g in generations], max_new_tokens=4)
        assert served == [g["output"] for g in generations]
    lm = store.attach(info.ref, AutoModelForCausalLM.from_pretrained(tmp_path / "model"))
    assert generate(lm, tokenizer, TOY, [generations[0]["source"]], max_new_tokens=4) == [
        generations[0]["output"]
    ]


def test_cli_train_e2e_without_options_uses_the_generation_defaults(tmp_path, monkeypatch):
    """No GLUE default (rank 8, alpha 16, batch 32, length 128, decay 0.01) leaks into the NLG recipe."""
    from typer.testing import CliRunner

    import adamix_zoo.recipes.generation as recipe
    from adamix_zoo.cli import _register_commands, app

    seen = {}
    monkeypatch.setattr(recipe, "run_generation", lambda args: seen.setdefault("args", args) and {"bleu": 1.0})
    monkeypatch.chdir(tmp_path)
    _register_commands()
    result = CliRunner().invoke(app, ["train", "--task", "e2e"])
    assert result.exit_code == 0, result.output
    args, defaults = seen["args"], GenerationArgs()
    config = args.adamix_config()
    assert (config.rank, config.alpha, config.num_experts, config.task_loss_passes) == (4, 32.0, 4, "first")
    assert (args.batch_size, args.max_length, args.weight_decay) == (8, 96, 0.0)
    assert args.adamix == defaults.adamix
    assert (args.steps, args.train_size, args.eval_size, args.lr) == (
        defaults.steps, defaults.train_size, defaults.eval_size, defaults.lr)


@pytest.mark.parametrize(("steps", "ratio"), [(300, 0.06), (80, 0.06), (7, 0.5), (10, 0.0)])
def test_the_recipe_schedule_is_transformers_linear_warmup(steps, ratio):
    """``make_scheduler(warmup_offset=0)`` gives exactly get_linear_schedule_with_warmup's rates."""
    import math

    from transformers import get_linear_schedule_with_warmup

    from adamix_zoo.optim import make_scheduler

    def rates(make):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2e-3)
        scheduler, out = make(opt), []
        for _ in range(steps):
            opt.step()
            scheduler.step()
            out.append(scheduler.get_last_lr()[0])
        return out

    warmup = math.ceil(ratio * steps)
    assert rates(lambda o: make_scheduler(o, steps, warmup, warmup_offset=0)) == rates(
        lambda o: get_linear_schedule_with_warmup(o, warmup, steps))

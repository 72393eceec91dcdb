"""The multi-task engine: a mixed-task batch in one pass equals each task served alone."""

import json
import shutil

import pytest
import torch
from torch.testing import assert_close

from adamix_zoo.formats.files import HEAD_FILE, METADATA_FILE
from adamix_zoo.heads import ClassificationHead, TaskModel, load_head, save_head
from adamix_zoo.serving import InputError, ServingEngine, UnknownTaskError
from adamix_zoo.serving.engine import FingerprintMismatchError
from tests.test_serving_utils import make_task, reference, sentence, standard_tasks, tiny_tokenizer
from tests.tiny import tiny_model


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    return standard_tasks(tmp_path_factory.mktemp("tasks"))


def _engine(tasks, capacity: int = 8) -> ServingEngine:
    engine = ServingEngine(tiny_model("bert", head="base"), tiny_tokenizer(), capacity=capacity)
    for folder in tasks.values():
        engine.attach(folder)
    return engine


def _inputs(n: int) -> list:
    """Sentences of varied lengths and sentence pairs (so rows pad differently)."""
    return [
        sentence(i, 2 + i % 9) if i % 3 else (sentence(i, 3), sentence(i + 50, 2 + i % 4))
        for i in range(n)
    ]


def _batch(inputs):
    return dict(tiny_tokenizer()(inputs, padding=True, return_tensors="pt"))


@torch.no_grad()
def test_mixed_batch_equals_each_task_served_alone(tasks):
    engine = _engine(tasks)
    names = [*tasks, None]
    row_tasks = [names[i % len(names)] for i in range(15)]
    batch = _batch(_inputs(15))
    logits, pooled, used = engine.forward(row_tasks, batch)
    plain = tiny_model("bert", head="base")(**batch).last_hidden_state
    for name, folder in tasks.items():
        expected = reference(folder)(**batch)
        without_adapter = load_head(folder / HEAD_FILE).eval()(plain, batch["attention_mask"])
        rows = [i for i, t in enumerate(row_tasks) if t == name]
        got = torch.stack([logits[i] for i in rows])
        assert_close(got, expected[rows])
        assert (got - without_adapter[rows]).abs().max() > 1e-2  # the adapter really acts
        assert {used[i].version for i in rows} == {f"{name}-v{list(tasks).index(name) + 1}"}
    # Backbone-only rows: no adapter, no head; their mean-pooled states are the plain backbone's.
    mask = batch["attention_mask"].unsqueeze(-1).float()
    mean = (plain * mask).sum(1) / mask.sum(1)
    alone = [i for i, t in enumerate(row_tasks) if t is None]
    assert all(logits[i] is None and used[i] is None for i in alone)
    assert_close(pooled[alone], mean[alone])


@torch.no_grad()
@pytest.mark.parametrize("name", ["lora4", "lora8", "adapter", "regress"])
def test_single_task_batch_equals_merged_model(tasks, name):
    engine = _engine(tasks)
    batch = _batch(_inputs(6))
    logits, _, _ = engine.forward([name] * 6, batch)
    assert_close(torch.stack(logits), reference(tasks[name])(**batch))
    engine.forward([None] * 6, batch)  # and the shared backbone is left as it was
    assert_close(
        engine.backbone(**batch).last_hidden_state,
        tiny_model("bert", head="base")(**batch).last_hidden_state,
    )


@torch.no_grad()
def test_predict_text_matches_offline_per_task_with_own_padding(tasks):
    engine = _engine(tasks)
    inputs = _inputs(8)
    row_tasks = ["lora4", "regress", "adapter", "lora8", "lora4", "adapter", "regress", "lora8"]
    answers = engine.predict(row_tasks, inputs)
    for i, (task, answer) in enumerate(zip(row_tasks, answers)):
        expected = reference(tasks[task])(**_batch([inputs[i]]))[0]  # the row alone, no padding
        assert answer.task == task and answer.version == f"{task}-v{list(tasks).index(task) + 1}"
        if task == "regress":
            assert answer.label is None and answer.scores is None
            assert answer.score == pytest.approx(expected.item(), abs=1e-5)
        else:
            probs = torch.softmax(expected, -1)
            assert list(answer.scores) == [f"{task}_{k}" for k in range(len(probs))]
            assert_close(torch.tensor(list(answer.scores.values())), probs)
            assert answer.label == f"{task}_{int(probs.argmax())}"
            assert answer.score == pytest.approx(probs.max().item(), abs=1e-6)


@torch.no_grad()
def test_lru_capacity_evicts_and_reloads_on_demand(tasks):
    engine = _engine(tasks, capacity=2)
    assert engine.resident_tasks() == ["adapter", "regress"]
    assert [t.resident for t in engine.tasks()] == [True, False, False, True]  # sorted by name
    batch = _batch(_inputs(8))
    row_tasks = ["lora4", "lora8", "adapter", "regress"] * 2  # 4 distinct tasks > capacity 2
    logits, _, _ = engine.forward(row_tasks, batch)
    for name, folder in tasks.items():
        rows = [i for i, t in enumerate(row_tasks) if t == name]
        assert_close(torch.stack([logits[i] for i in rows]), reference(folder)(**batch)[rows])
    assert len(engine.resident_tasks()) == 2
    logits, _, _ = engine.forward(["lora4"] * 8, batch)  # evicted again, reloaded again
    assert engine.resident_tasks()[-1] == "lora4"
    assert_close(torch.stack(logits), reference(tasks["lora4"])(**batch))


def test_detach_forgets_the_task(tasks):
    engine = _engine(tasks)
    engine.detach("lora8")
    assert engine.task_names() == ["adapter", "lora4", "regress"]
    with pytest.raises(UnknownTaskError, match="task 'lora8' is not attached"):
        engine.predict("lora8", ["w5 w6"])
    with pytest.raises(UnknownTaskError, match="not attached"):
        engine.detach("lora8")
    assert engine.predict("lora4", ["w5 w6"])[0].task == "lora4"


def test_refuses_other_base_weights_naming_both_fingerprints(tmp_path):
    meta = {"task": "other", "base_model": {"id": "x", "fingerprint": "f" * 64}}
    folder = make_task(tmp_path, "other", metadata=meta)
    engine = ServingEngine(tiny_model("bert", head="base"), tiny_tokenizer())
    with pytest.raises(
        FingerprintMismatchError,
        match=f"fingerprint {'f' * 64}, but this backbone's fingerprint is {engine.fingerprint}",
    ):
        engine.attach(folder)
    assert engine.task_names() == []
    other_backbone = ServingEngine(tiny_model("bert", head="base", seed=5), tiny_tokenizer())
    with pytest.raises(FingerprintMismatchError):
        other_backbone.attach(make_task(tmp_path, "fine"))


def test_refuses_adapters_that_do_not_fit(tmp_path):
    folder = make_task(tmp_path, "t", metadata={})
    engine = ServingEngine(tiny_model("distilbert", head="base"), tiny_tokenizer())
    with pytest.raises(
        ValueError, match="the backbone has no module 'encoder.layer.0.attention.self.query'"
    ):
        engine.attach(folder)
    (folder / HEAD_FILE).unlink()
    with pytest.raises(ValueError, match="has no head file head.safetensors"):
        ServingEngine(tiny_model("bert", head="base")).attach(folder)
    save_head(ClassificationHead(16, 2), folder / HEAD_FILE)
    with pytest.raises(ValueError, match="head expects hidden size 16, backbone has 32"):
        ServingEngine(tiny_model("bert", head="base")).attach(folder)
    with pytest.raises(ValueError, match="invalid task name '../x'"):
        ServingEngine(tiny_model("bert", head="base")).attach(folder, task="../x")
    with pytest.raises(ValueError, match="task folder .*missing does not exist"):
        ServingEngine(tiny_model("bert", head="base")).attach(tmp_path / "missing")


def test_label_names_explicit_metadata_or_default(tmp_path):
    engine = ServingEngine(tiny_model("bert", head="base"), tiny_tokenizer())
    info = engine.attach(
        make_task(tmp_path, "a", num_labels=3, metadata={}), label_names=["x", "y", "z"]
    )
    assert info.label_names == ["x", "y", "z"] and info.version.startswith("sha256:")
    assert engine.attach(make_task(tmp_path, "b", metadata={})).label_names == [
        "LABEL_0",
        "LABEL_1",
    ]
    with pytest.raises(
        ValueError, match="label names \\['x'\\] do not fit the head: expected 2 strings"
    ):
        engine.attach(tmp_path / "b", label_names=["x"])


@torch.no_grad()
def test_cross_task_merged_entry_serves_each_head(tmp_path, tasks):
    """A registry-style entry: one (merged) adapter, one head per task, label names per task."""
    entry = tmp_path / "sst2+rte"
    shutil.copytree(tasks["lora4"], entry)
    (entry / "heads").mkdir()
    for i, name in enumerate(["sst2", "rte"]):
        torch.manual_seed(i)
        save_head(
            ClassificationHead(32, 2, pooling="cls" if i else "mean"),
            entry / "heads" / f"{name}.safetensors",
        )
    meta = json.loads((entry / METADATA_FILE).read_text())
    meta.update(
        name={"namespace": "local", "task": "sst2+rte", "version": "3"},
        tasks={
            n: {"head": f"heads/{n}.safetensors", "label_names": [f"{n}-no", f"{n}-yes"]}
            for n in ["sst2", "rte"]
        },
    )
    del meta["task"], meta["version"]
    (entry / METADATA_FILE).write_text(json.dumps(meta))
    engine = ServingEngine(tiny_model("bert", head="base"), tiny_tokenizer())
    engine.attach(tasks["adapter"])
    infos = engine.attach_all(entry)
    assert [(i.task, i.version, i.label_names) for i in infos] == [
        ("sst2+rte.sst2", "3", ["sst2-no", "sst2-yes"]),
        ("sst2+rte.rte", "3", ["rte-no", "rte-yes"]),
    ]
    with pytest.raises(
        ValueError, match="several tasks \\['rte', 'sst2'\\]: choose one with head="
    ):
        engine.attach(entry)
    batch = _batch(_inputs(6))
    row_tasks = ["sst2+rte.sst2", "sst2+rte.rte", "adapter"] * 2
    logits, _, _ = engine.forward(row_tasks, batch)
    base = reference(tasks["lora4"]).backbone
    for task, head in [("sst2+rte.sst2", "sst2"), ("sst2+rte.rte", "rte"), ("adapter", None)]:
        model = (
            reference(tasks["adapter"])
            if head is None
            else TaskModel(base, load_head(entry / "heads" / f"{head}.safetensors")).eval()
        )
        rows = [i for i, t in enumerate(row_tasks) if t == task]
        assert_close(torch.stack([logits[i] for i in rows]), model(**batch)[rows])


def test_encode_refuses_bad_inputs_clearly(tasks):
    engine = ServingEngine(tiny_model("bert", head="base"), tiny_tokenizer(), max_chars=300)
    assert engine.max_length == 64
    with pytest.raises(InputError, match="input 1 has 70 tokens; the limit is 64"):
        engine.encode(["w5", " ".join(["w6"] * 68)])
    with pytest.raises(InputError, match="input 0 has 301 characters; the limit is 300"):
        engine.encode(["x" * 301])
    with pytest.raises(InputError, match="input 0 is empty"):
        engine.encode(["  "])
    with pytest.raises(InputError, match="input 2 must be a string or a \\[text_a, text_b\\] pair"):
        engine.encode(["w5", ("w5", "w6"), ("a", "b", "c")])
    assert [len(r["input_ids"]) for r in engine.encode(["w5 w6", ("w5", "w6 w7")])] == [4, 6]


def test_refuses_foreign_tensor_names_clearly(tmp_path):
    from safetensors.torch import load_file, save_file

    from adamix_zoo.formats.files import ADAPTER_WEIGHTS_FILE

    folder = make_task(tmp_path, "t", metadata={})
    weights = folder / ADAPTER_WEIGHTS_FILE
    tensors = load_file(str(weights))
    moved = {k.replace("attention.self.query", "attention"): v for k, v in tensors.items()}
    save_file(moved, str(weights))
    engine = ServingEngine(tiny_model("bert", head="base"))
    with pytest.raises(
        ValueError, match="module 'encoder.layer.0.attention' cannot hold an adapter"
    ):
        engine.attach(folder)
    save_file(tensors | {"base_model.model.pooler.dense.weight": torch.zeros(32, 32)}, str(weights))
    with pytest.raises(
        ValueError, match="'base_model.model.pooler.dense.weight' is not a LoRA A/B weight"
    ):
        engine.attach(folder)
    assert engine.task_names() == []

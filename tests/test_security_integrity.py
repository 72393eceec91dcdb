"""Everything that changes an answer is covered by a hash that is re-checked: the store's manifest
(adamix.json in canonical form + every file) on get / attach / check / pull, the serving digest on
every reload of an evicted task, and the base-model fingerprint for loads by path."""

import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

from adamix_zoo.formats.files import HEAD_FILE, METADATA_FILE
from adamix_zoo.formats.metadata import manifest_hash
from adamix_zoo.serving import ServingEngine
from adamix_zoo.serving.errors import ServerFaultError
from registry import Store
from registry.remote import pull_folder
from tests.registry_runs import make_run
from tests.test_serving_utils import make_task, tiny_tokenizer
from tests.tiny import tiny_model


def _edit_meta(folder, **changes):
    meta = json.loads((folder / METADATA_FILE).read_text())
    for key, edit in changes.items():
        edit(meta) if callable(edit) else meta.__setitem__(key, edit)
    (folder / METADATA_FILE).write_text(json.dumps(meta, indent=2))


def _swap_head_rows(path):
    tensors = load_file(str(path))
    key = next(k for k, v in tensors.items() if v.dim() == 2 and v.shape[0] == 2)
    tensors[key] = tensors[key].flip(0).contiguous()
    save_file(tensors, str(path), metadata={"format": "pt", "head": _head_spec(path)})


def _head_spec(path):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata()["head"]


EDITS = {
    "label names": lambda m: m["tasks"]["sst2"].__setitem__("label_names", ["positive", "negative"]),
    "prompt template": lambda m: m["tasks"]["sst2"].__setitem__("prompt_template", "{source} lol"),
    "config": lambda m: m.__setitem__("adamix_config", dict(m["adamix_config"], alpha=99)),
    "base model": lambda m: m["base_model"].__setitem__("id", "other"),
}


@pytest.mark.parametrize("what", sorted(EDITS))
def test_editing_adamix_json_is_caught_everywhere(tmp_path, what):
    store = Store(tmp_path / "store")
    info = store.publish(make_run(tmp_path / "run"))
    before = manifest_hash(json.loads((info.path / METADATA_FILE).read_text()))
    _edit_meta(info.path, edit=EDITS[what])
    assert manifest_hash(json.loads((info.path / METADATA_FILE).read_text())) != before
    with pytest.raises(ValueError, match="differs from what was published"):
        store.get(info.ref)
    with pytest.raises(ValueError, match="differs from what was published"):
        store.attach(info.ref, tiny_model("bert", head="base"))
    with pytest.raises(ValueError):
        pull_folder(Store(tmp_path / "other"), info.ref, store.root)
    assert any("differs from what was published" in p for p in store.check())


def test_a_swapped_head_is_caught_by_the_store(tmp_path):
    store = Store(tmp_path / "store")
    info = store.publish(make_run(tmp_path / "run"))
    _swap_head_rows(info.path / HEAD_FILE)
    with pytest.raises(ValueError, match="hash mismatch for head.safetensors"):
        store.get(info.ref)
    assert store.check()


@pytest.mark.parametrize("tamper", ["head rows", "label names", "adapter weights"])
def test_an_evicted_task_is_not_reloaded_from_changed_files(tmp_path, tamper):
    a, b = make_task(tmp_path, "a", seed=1), make_task(tmp_path, "b", seed=2)
    engine = ServingEngine(tiny_model("bert", head="base"), tiny_tokenizer(), capacity=1)
    engine.attach(a)
    engine.attach(b)  # evicts a
    before = engine.predict("b", ["w5 w6"])
    if tamper == "head rows":
        _swap_head_rows(a / HEAD_FILE)
    elif tamper == "label names":
        _edit_meta(a, label_names=["a_1", "a_0"])
    else:
        weights = a / "adapter_model.safetensors"
        tensors = load_file(str(weights))
        save_file({k: v * 2 for k, v in tensors.items()}, str(weights))
    with pytest.raises(ServerFaultError, match="changed since it was attached"):
        engine.predict("a", ["w5 w6"])
    assert [p.label for p in engine.predict("b", ["w5 w6"])] == [p.label for p in before]  # others serve


def test_a_registry_entry_loaded_by_path_is_verified(tmp_path):
    store = Store(tmp_path / "store")
    info = store.publish(make_run(tmp_path / "run"))
    copy = shutil.copytree(info.path, tmp_path / "copy")
    engine = ServingEngine(tiny_model("bert", head="base"), tiny_tokenizer())
    _swap_head_rows(copy / HEAD_FILE)
    with pytest.raises(ValueError, match="hash mismatch"):
        engine.attach(copy)


def test_a_run_folder_of_another_backbone_is_refused_by_path(tmp_path):
    run = make_run(tmp_path / "run")
    run_config = json.loads((run / "run_config.json").read_text())
    run_config["backbone_fingerprint"] = "0" * 64  # trained on other weights
    (run / "run_config.json").write_text(json.dumps(run_config))
    engine = ServingEngine(tiny_model("bert", head="base"), tiny_tokenizer())
    with pytest.raises(ValueError, match="fingerprint"):
        engine.attach(run / "merged", task="sst2")
    # the run's own backbone is accepted
    run_config["backbone_fingerprint"] = engine.fingerprint
    (run / "run_config.json").write_text(json.dumps(run_config))
    assert engine.attach(run / "merged", task="sst2").task == "sst2"
    assert engine.predict("sst2", ["w5"])[0].label in ("negative", "positive")

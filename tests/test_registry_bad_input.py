"""Bad input: each case fails with a clear error, loses nothing, and leaves the store consistent.

(The two process-level cases, SIGKILL mid-publish and two concurrent publishers, are in
test_registry_atomic.py, marked integration.)
"""

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from adamix_zoo.formats.files import ADAPTER_WEIGHTS_FILE, EXPERTS_FILE, HEAD_FILE, METADATA_FILE
from registry import Store, parse_ref
from registry.merging import merge_entries
from tests.registry_runs import make_run, trained_task_model, write_run
from tests.tiny import tiny_model


@pytest.fixture
def store(tmp_path):
    zoo = Store(tmp_path / "store")
    zoo.publish(make_run(tmp_path / "good", task="rte", seed=9))
    return zoo


def _unchanged(store: Store) -> None:
    """Only the fixture's entry exists, intact, and nothing was left behind."""
    assert [i.ref for i in store.list()] == ["local/rte@1"]
    assert store.check() == [] and store.garbage() == []


@pytest.mark.parametrize("name", [ADAPTER_WEIGHTS_FILE, HEAD_FILE, EXPERTS_FILE])
@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_or_truncated_safetensors(store, tmp_path, name, damage):
    run = make_run(tmp_path / "run")
    path = run / "merged" / name if name != EXPERTS_FILE else run / name
    if name == HEAD_FILE:
        (run / HEAD_FILE).unlink()  # the merged/ copy is the one published
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x07" * 64)
    with pytest.raises(ValueError, match=f"cannot read .*{name}"):
        store.publish(run)
    _unchanged(store)


def test_hash_mismatch_is_caught_on_get_attach_and_import(store, tmp_path):
    info = store.resolve("rte")
    head = info.path / HEAD_FILE
    original = head.read_bytes()
    tampered = bytearray(original)
    tampered[-1] ^= 0x01
    head.write_bytes(bytes(tampered))
    with pytest.raises(ValueError, match="hash mismatch for head.safetensors"):
        store.get("rte")
    with pytest.raises(ValueError, match="hash mismatch"):
        store.attach("rte", tiny_model("bert", head="base"))
    assert len(store.check()) == 1 and "hash mismatch" in store.check()[0]
    with pytest.raises(ValueError, match="hash mismatch"):
        Store(tmp_path / "other").import_entry(info.path)
    assert Store(tmp_path / "other").list() == []
    head.write_bytes(original)  # nothing was lost: restoring the byte makes it whole again
    _unchanged(store)


def test_tensors_of_the_wrong_shape(store, tmp_path):
    run = make_run(tmp_path / "run")
    weights = run / "merged" / ADAPTER_WEIGHTS_FILE
    tensors = load_file(str(weights))
    key = next(k for k in tensors if k.endswith("lora_A.weight"))
    tensors[key] = torch.zeros(4, tensors[key].shape[1])  # rank 4 in an r=8 adapter
    save_file(tensors, str(weights))
    with pytest.raises(ValueError, match="tensors of the wrong shape for module"):
        store.publish(run)
    _unchanged(store)

    run2 = make_run(tmp_path / "run2")
    experts = load_file(str(run2 / EXPERTS_FILE))
    key = next(k for k in experts if k.endswith("adamix_lora_A"))
    experts[key] = torch.zeros(3, 8, 16)
    save_file(experts, str(run2 / EXPERTS_FILE), metadata=_experts_metadata(run2))
    with pytest.raises(ValueError, match="does not fit the merged adapter"):
        store.publish(run2)
    _unchanged(store)


def _experts_metadata(run):
    with safe_open(str(run / EXPERTS_FILE), framework="pt") as f:
        return f.metadata()


def test_a_different_base_model_is_refused(store, tmp_path):
    other = store.publish(write_run(tmp_path / "run", trained_task_model(backbone_seed=1), backbone_seed=1))
    with pytest.raises(ValueError, match=r"trained on base model 'tiny-bert' \(fingerprint [0-9a-f]{64}\), but "
                                         r"the given backbone .* has fingerprint [0-9a-f]{64}"):
        store.attach("rte", tiny_model("bert", head="base", seed=1))
    with pytest.raises(ValueError, match="cannot merge entries of different base models: local/rte@1 .* local/sst2@1"):
        merge_entries(store, ["rte", other.ref])
    store.attach(other.ref, tiny_model("bert", head="base", seed=1))  # its own base works
    store.delete(other.ref)
    _unchanged(store)


@pytest.mark.parametrize("bad, message", [
    ("a/b", "path separator"), ("..", "contains '..'"), ("x..y", "contains '..'"), ("a\\b", "path separator"),
    ("x" * 65, "65 characters; the limit is 64"), ("-rf", "not a valid name"), ("", "non-empty"),
    ("sp ace", "not a valid name"),
])
def test_bad_names_are_refused(store, tmp_path, bad, message):
    run = make_run(tmp_path / "run")
    for kwargs in ({"task": bad}, {"namespace": bad}, {"version": bad}):
        with pytest.raises(ValueError, match=message):
            store.publish(run, **kwargs)
    _unchanged(store)


def test_bad_references_are_refused():
    with pytest.raises(ValueError, match="more than one '/'"):
        parse_ref("a/b/c@1")
    with pytest.raises(ValueError, match="contains '..'"):
        parse_ref("../rte")


def test_missing_run_field_or_metadata_field_or_unknown_format_version(store, tmp_path):
    run = make_run(tmp_path / "run")
    config = json.loads((run / "run_config.json").read_text())
    del config["backbone_fingerprint"]
    (run / "run_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="missing field\\(s\\) backbone_fingerprint"):
        store.publish(run)
    _unchanged(store)

    entry = tmp_path / "copy"
    shutil.copytree(store.resolve("rte").path, entry)
    meta = json.loads((entry / METADATA_FILE).read_text())
    (entry / METADATA_FILE).write_text(json.dumps({k: v for k, v in meta.items() if k != "base_model"}))
    with pytest.raises(ValueError, match="missing metadata field\\(s\\): base_model"):
        Store(tmp_path / "other").import_entry(entry)
    (entry / METADATA_FILE).write_text(json.dumps(dict(meta, format_version="2")))
    with pytest.raises(ValueError, match="format_version '2' is not supported by this adamix-zoo \\(reads 1\\)"):
        Store(tmp_path / "other").import_entry(entry)
    assert Store(tmp_path / "other").list() == []
    _unchanged(store)


def test_full_fine_tuning_runs_have_nothing_to_publish(store, tmp_path):
    run = make_run(tmp_path / "run")
    config = json.loads((run / "run_config.json").read_text())
    (run / "run_config.json").write_text(json.dumps(dict(config, adamix=None)))
    with pytest.raises(ValueError, match="full fine-tuning run: it has no adapter to publish"):
        store.publish(run)
    _unchanged(store)

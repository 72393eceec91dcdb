"""The local store: publish / list / show / get / delete / attach, names, versions, card, PEFT interop."""

import json

import pytest
import torch
from peft import PeftModel
from torch.testing import assert_close

from adamix_zoo.formats.experts import load_experts
from adamix_zoo.formats.files import ADAPTER_CONFIG_FILE, EXPERTS_FILE, METADATA_FILE, MODEL_CARD_FILE
from adamix_zoo.formats.metadata import sha256_file
from registry import EntryExistsError, EntryNotFoundError, Store, default_home, parse_ref
from registry.export import export_peft
from tests.registry_runs import make_run, trained_task_model, write_run
from tests.tiny import tiny_batch, tiny_model


@pytest.fixture
def store(tmp_path):
    return Store(tmp_path / "store")


def test_home_comes_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("ADAMIX_ZOO_HOME", str(tmp_path / "zoo"))
    assert default_home() == tmp_path / "zoo" and Store().root == tmp_path / "zoo"
    monkeypatch.delenv("ADAMIX_ZOO_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert default_home() == tmp_path / "cache" / "adamix-zoo"


def test_publish_writes_a_complete_entry(store, tmp_path):
    info = store.publish(make_run(tmp_path / "run"), namespace="glue")
    assert info.ref == "glue/sst2@1" and info.path == store.root / "entries" / "glue" / "sst2" / "1"
    files = sorted(p.relative_to(info.path).as_posix() for p in info.path.rglob("*"))
    assert files == sorted(["adapter_model.safetensors", ADAPTER_CONFIG_FILE, "head.safetensors", EXPERTS_FILE,
                            METADATA_FILE, MODEL_CARD_FILE])
    meta = json.loads((info.path / METADATA_FILE).read_text())
    assert meta["format_version"] == "1" and meta["name"] == {"namespace": "glue", "task": "sst2", "version": "1"}
    assert (meta["method"], meta["kind"], meta["num_experts"], meta["rank"], meta["sharing"]) == (
        "adamix-lora", "lora", 3, 8, "up")
    assert meta["routing"]["eval"] == "merged" and meta["consistency_weight"] == 1.0
    assert meta["tasks"]["sst2"]["label_names"] == ["negative", "positive"]
    assert meta["tasks"]["sst2"]["metrics"]["accuracy"] == 0.75
    assert meta["provenance"]["seed"] == 0 and meta["provenance"]["data"]["source"] == "tiny"
    assert meta["files"] == {n: sha256_file(info.path / n) for n in files if n != METADATA_FILE}
    card = (info.path / MODEL_CARD_FILE).read_text()
    assert card.startswith("---\nbase_model: tiny-bert\nbase_model_relation: adapter\nlibrary_name: peft") and "# glue/sst2@1" in card
    assert "| sst2 | classification | negative, positive | `head.safetensors` |" in card


def test_versions_latest_immutability_and_delete(store, tmp_path):
    first = store.publish(make_run(tmp_path / "a", seed=1))
    second = store.publish(make_run(tmp_path / "b", seed=2))
    assert (first.version, second.version) == ("1", "2")
    assert store.resolve("sst2").ref == store.resolve("local/sst2@latest").ref == "local/sst2@2"
    with pytest.raises(EntryExistsError, match="local/sst2@1 already exists; entries are immutable"):
        store.publish(tmp_path / "b", version="1")
    named = store.publish(tmp_path / "b", version="2025.1-rc")
    assert store.resolve("sst2").version == "2025.1-rc"  # latest = most recently published
    store.delete("sst2@2")
    assert [i.version for i in store.list()] == ["1", "2025.1-rc"] and not second.path.exists()
    with pytest.raises(EntryNotFoundError, match="no entry local/sst2@2"):
        store.get("sst2@2")
    with pytest.raises(EntryExistsError, match="was deleted \\(versions are never reused\\)"):
        store.publish(tmp_path / "a", version="2")
    assert store.publish(tmp_path / "a").version == "3"
    assert [i.ref for i in store.list(task="sst2")][-1] == "local/sst2@3" and named.path.exists()
    assert store.check() == [] and store.garbage() == []


@pytest.mark.parametrize("kind", ["lora", "adapter"])
def test_attach_returns_the_trained_task_model(store, tmp_path, kind):
    tm = trained_task_model(kind, seed=4, sharing="none")
    info = store.publish(write_run(tmp_path / "run", tm))
    attached = store.attach(info.ref, tiny_model("bert", head="base"))
    batch = tiny_batch()
    with torch.no_grad():
        assert_close(attached(**batch), tm(**batch))
    assert attached.backbone.is_merged and not attached.training
    experts = trained_task_model(kind, seed=0, sharing="none").backbone
    load_experts(experts, info.path / EXPERTS_FILE)  # the unmerged experts travel with the entry
    assert torch.equal(next(iter(experts.adapter_state_dict().values())),
                       next(iter(tm.backbone.adapter_state_dict().values())))


def test_merged_lora_entry_loads_in_peft_with_the_same_outputs(store, tmp_path):
    tm = trained_task_model("lora", seed=6, sharing="none", rank=4, alpha=8)
    info = store.publish(write_run(tmp_path / "run", tm))
    peft_model = PeftModel.from_pretrained(tiny_model("bert", head="base"), store.get(info.ref)).eval()
    ours = store.attach(info.ref, tiny_model("bert", head="base"))
    batch = tiny_batch()
    with torch.no_grad():
        expected = ours.backbone(**batch).last_hidden_state
        assert_close(peft_model(**batch).last_hidden_state, expected)
        assert not torch.allclose(tiny_model("bert", head="base")(**batch).last_hidden_state, expected)
    out = export_peft(store, info.ref, tmp_path / "export")
    assert sorted(p.name for p in out.iterdir()) == sorted(["adapter_model.safetensors", ADAPTER_CONFIG_FILE,
                                                            MODEL_CARD_FILE, "head.safetensors"])
    exported = PeftModel.from_pretrained(tiny_model("bert", head="base"), out).eval()
    with torch.no_grad():
        assert_close(exported(**batch).last_hidden_state, expected)


def test_adapter_entries_document_their_format_and_refuse_peft_export(store, tmp_path):
    info = store.publish(make_run(tmp_path / "run", kind="adapter"))
    card = (info.path / MODEL_CARD_FILE).read_text()
    assert "ADAMIX_ADAPTER" in card and "adapter_down.weight` (m, d)" in card
    with pytest.raises(ValueError, match="mixture of adapters .*PEFT has no such layer"):
        export_peft(store, info.ref, tmp_path / "export")
    assert not (tmp_path / "export").exists()


def test_parse_ref():
    assert parse_ref("glue/sst2@3") == parse_ref("glue/sst2@3")
    ref = parse_ref("sst2")
    assert (ref.namespace, ref.task, ref.is_latest) == ("local", "sst2", True)
    assert str(parse_ref("a/b@latest")) == "a/b@latest"


def test_garbage_is_invisible_and_collected_but_live_staging_is_kept(store, tmp_path):
    orphan = store.root / "entries" / "local" / "sst2" / "1"  # as a publish killed before its commit
    orphan.mkdir(parents=True)
    (orphan / "adapter_model.safetensors").write_bytes(b"half")
    assert store.list() == [] and store.check() == [] and store.garbage() == [orphan]
    info = store.publish(make_run(tmp_path / "run"))
    assert info.path == orphan and store.get(info.ref) == orphan  # replaced by the complete entry
    with store.staging() as live:
        assert store.gc(min_age_s=0) == [] and live.exists()  # a publisher holds it
    stale = store.root / "staging" / "dead"
    stale.mkdir()
    assert store.gc(min_age_s=3600) == [] and store.gc(min_age_s=0) == [stale] and not stale.exists()
    assert [i.ref for i in store.list()] == [info.ref] and store.check() == []

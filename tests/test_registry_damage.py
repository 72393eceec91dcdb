"""Data loss and corruption: the reserved version, merge parameters, non-finite tensors, a damaged
store (corrupt index, entry folder removed by hand) and pulls from folders that are not stores."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from adamix_zoo.cli import _register_commands, app
from adamix_zoo.formats.files import METADATA_FILE
from registry import Store
from registry.merging import merge_entries, merge_tensors
from registry.remote import pull_folder
from tests.registry_runs import make_run


@pytest.fixture
def store(tmp_path):
    return Store(tmp_path / "store")


def _cli(*args):
    _register_commands()
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.mark.parametrize("version", ["latest", "LATEST", "Latest"])
def test_latest_is_reserved_for_every_publish_path(store, tmp_path, version):
    run = make_run(tmp_path / "run")
    with pytest.raises(ValueError, match="reserved"):
        store.publish(run, version=version)
    first = store.publish(run)
    with pytest.raises(ValueError, match="reserved"):
        merge_entries(store, [first.ref], version=version)
    remote = Store(tmp_path / "remote")  # an entry whose adamix.json says version "latest"
    with pytest.raises(ValueError, match="reserved"):
        remote.import_entry(first.path, version=version)
    assert [i.version for i in store.list()] == ["1"] and remote.list() == []
    result = _cli("publish", run, "--version", version, "--store", store.root)
    assert result.exit_code == 1 and "reserved" in result.output


BAD_MERGES = [
    ("dare_linear", {"density": 0.0}, "density must be in"),
    ("dare_ties", {"density": -0.5}, "density must be in"),
    ("ties", {"density": 7.0}, "density must be in"),
    ("ties", {"density": math.nan}, "density must be in"),
    ("linear", {"weights": [math.nan, 1.0]}, "finite"),
    ("linear", {"weights": [math.inf, 1.0]}, "finite"),
    ("linear", {"weights": [1.0]}, "one weight per entry"),
    ("svd", {"svd_rank": -3}, "positive integer"),
    ("svd", {"svd_rank": 0}, "positive integer"),
    ("linear", {"svd_rank": 4}, "only applies"),
    ("linear", {"density": 0.5}, "takes no density"),
    ("ties", {"density": 0.5, "majority_sign_method": "most"}, "majority_sign_method"),
]


@pytest.mark.parametrize("method, kwargs, message", BAD_MERGES)
def test_merge_parameters_are_validated_before_anything_is_published(store, tmp_path, method, kwargs, message):
    refs = [store.publish(make_run(tmp_path / t, task=t, seed=i)).ref for i, t in enumerate(["sst2", "rte"])]
    with pytest.raises(ValueError, match=message):
        merge_entries(store, refs, method=method, **kwargs)
    assert len(store.list()) == 2


def test_merge_cli_reports_bad_weights_in_one_line(store, tmp_path):
    refs = [store.publish(make_run(tmp_path / t, task=t, seed=i)).ref for i, t in enumerate(["sst2", "rte"])]
    for extra in (["--weights", "nan,1"], ["--weights", "a,b"], ["--method", "dare_linear", "--density", "0"],
                  ["--method", "svd", "--svd-rank", "-3"]):
        result = _cli("merge", *refs, *extra, "--store", store.root)
        assert result.exit_code == 1 and result.output.startswith("error: "), (extra, result.output)
    assert len(store.list()) == 2


def test_non_finite_tensors_are_never_published(store, tmp_path):
    # the class: every publish path goes through commit, which checks every tensor file
    run = make_run(tmp_path / "run")
    weights = run / "merged" / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    key = next(iter(tensors))
    tensors[key][0, 0] = math.nan
    save_file(tensors, str(weights))
    with pytest.raises(ValueError, match="non-finite"):
        store.publish(run)
    with pytest.raises(ValueError, match="non-finite"):  # merge_tensors output goes through commit too
        with store.staging() as stage:
            save_file({"x": torch.tensor([math.inf])}, str(stage / "adapter_model.safetensors"))
            store.commit(stage, {}, "local", "x")
    assert store.list() == []


def test_a_corrupt_index_is_reported_and_rebuilt(store, tmp_path):
    info = store.publish(make_run(tmp_path / "run"))
    store.index_path.write_bytes(b"this is not sqlite" * 100)
    result = _cli("list", "--store", store.root)
    assert result.exit_code == 1 and "check --repair" in str(result.exception or result.output)
    damaged = Store(store.root)
    assert damaged.check() and "unreadable" in damaged.check()[0]
    result = _cli("check", "--repair", "--store", store.root)
    assert "rebuilt" in result.output and result.exit_code == 0, result.output
    repaired = Store(store.root)
    assert [i.ref for i in repaired.list()] == [info.ref] and repaired.check() == []
    repaired.get(info.ref)


def test_an_entry_folder_removed_by_hand_is_listed_as_damaged_and_repaired(store, tmp_path):
    kept = store.publish(make_run(tmp_path / "a"))
    gone = store.publish(make_run(tmp_path / "b", seed=1))
    import shutil

    shutil.rmtree(gone.path)
    result = _cli("list", "--store", store.root)
    assert result.exit_code == 0 and "DAMAGED" in result.output and kept.ref in result.output
    result = _cli("check", "--store", store.root)
    assert result.exit_code == 1 and f"damaged: {gone.ref}" in result.output
    result = _cli("check", "--repair", "--store", store.root)
    assert result.exit_code == 0 and "forgotten" in result.output
    assert [i.ref for i in store.list()] == [kept.ref]
    assert store.publish(make_run(tmp_path / "c")).version == "3"  # the lost version is not reused


def test_an_altered_entry_is_quarantined_not_deleted(store, tmp_path):
    info = store.publish(make_run(tmp_path / "run"))
    meta = json.loads((info.path / METADATA_FILE).read_text())
    meta["tasks"]["sst2"]["label_names"] = ["positive", "negative"]
    (info.path / METADATA_FILE).write_text(json.dumps(meta))
    lines = store.repair()
    assert len(lines) == 1 and "quarantine" in lines[0]
    assert store.list() == [] and list((store.root / "quarantine").iterdir())


def test_gc_verb_removes_orphans(store, tmp_path):
    info = store.publish(make_run(tmp_path / "run"))
    orphan = info.path.parent / "99"
    orphan.mkdir()
    result = _cli("gc", "--store", store.root)
    assert result.exit_code == 0 and "1 folder(s) removed" in result.output and not orphan.exists()


def test_pull_from_a_folder_that_is_not_a_store_writes_nothing(store, tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="not an adamix-zoo store"):
        pull_folder(store, "local/sst2", plain)
    assert sorted(p.name for p in plain.iterdir()) == ["notes.txt"]
    missing = tmp_path / "missing"
    result = _cli("pull", missing, "local/sst2", "--store", store.root)
    assert result.exit_code == 1 and not missing.exists()


def test_merge_tensors_refuses_bad_parameters_as_a_library_call_too():
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 2, "target_modules": ["m"]}
    tensors = {"base_model.model.m.lora_A.weight": torch.ones(2, 3),
               "base_model.model.m.lora_B.weight": torch.ones(4, 2)}
    with pytest.raises(ValueError, match="density"):
        merge_tensors([(config, tensors)] * 2, [0.5, 0.5], "dare_linear", density=0.0)

"""Every name read from disk or a remote goes through the rule for user input (fuzzed), and a
pulled entry whose adamix.json names an absolute or escaping path is refused before anything is
written."""

import json
import random
import string
from pathlib import Path, PurePosixPath

import pytest

from adamix_zoo.formats.files import METADATA_FILE
from adamix_zoo.formats.metadata import validate_metadata
from adamix_zoo.formats.names import validate_part, validate_relative_path, validate_version
from adamix_zoo.serving.task_folders import check_task_name
from registry import Store
from registry.merging import merge_entries
from registry.remote import pull_folder
from tests.registry_runs import make_run

HOSTILE = ["/some/dir/PWNED", "../../x", "..", ".", "a/../../b", "C:\\x", "\\\\server\\share", "x\x00y",
           "~root", "-rf", "", " ", "a" * 65, "sst2\n", "é", "a//b", "/", "latest/.."]
ALPHABET = string.ascii_letters + string.digits + "._+-/\\~: \x00\n\t%$*?'\"é"


def _random_strings(n: int = 3000, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        k = rng.choice([0, 1, 2, 3, 8, 30, 64, 65, 200])
        out.append("".join(rng.choice(ALPHABET) for _ in range(k)))
    return out + HOSTILE


def _stays_inside(value: str) -> bool:
    root = Path("/store/entries")
    return (root / value).resolve().is_relative_to(root) and (root / value).resolve() != root


def test_the_name_rule_never_lets_a_name_leave_its_folder():
    # the class: any string the rule accepts is one plain path part, whatever its origin
    for value in _random_strings():
        for validate in (lambda v: validate_part("task", v), check_task_name):
            try:
                validate(value)
            except ValueError:
                continue
            assert "/" not in value and "\\" not in value and ".." not in value and "\x00" not in value
            assert len(value) <= 64 and value[0].isalnum() and _stays_inside(value)


def test_relative_paths_from_disk_stay_inside_the_entry():
    for value in _random_strings(seed=1) + ["heads/sst2.safetensors", "a/b/c"]:
        try:
            validate_relative_path("file", value)
        except ValueError:
            continue
        assert not PurePosixPath(value).is_absolute() and _stays_inside(value), value


def _entry_meta() -> dict:
    return {"format_version": "1", "name": {"namespace": "local", "task": "sst2", "version": "1"},
            "method": "adamix", "kind": "lora", "num_experts": 3, "base_model": {"id": "x", "fingerprint": "f"},
            "tasks": {"sst2": {"head": "head.safetensors", "label_names": ["a", "b"]}}, "merge": {},
            "provenance": {}, "files": {"head.safetensors": "0" * 64}}


@pytest.mark.parametrize("where", ["namespace", "task", "version", "task key", "head", "file"])
def test_every_name_in_adamix_json_is_checked_like_user_input(where):
    for value in _random_strings(400, seed=2):
        meta = _entry_meta()
        if where in ("namespace", "task", "version"):
            meta["name"][where] = value
        elif where == "task key":
            meta["tasks"] = {value: meta["tasks"]["sst2"]}
        elif where == "head":
            meta["tasks"]["sst2"]["head"] = value
        else:
            meta["files"] = {value: "0" * 64}
        try:
            validate_metadata(meta)
        except ValueError:
            continue
        assert _stays_inside(value), (where, value)  # accepted only if it is a path inside the entry


def test_latest_is_reserved_as_a_version_in_any_case():
    for value in ("latest", "LATEST", "Latest"):
        with pytest.raises(ValueError, match="reserved"):
            validate_version(value)
    assert validate_version("2") == "2"


def _hostile_remote(tmp_path: Path, task: str) -> Path:
    """A registry folder whose entry's adamix.json names ``task`` (hashes left consistent)."""
    remote = Store(tmp_path / "remote")
    info = remote.publish(make_run(tmp_path / "run"))
    meta = json.loads((info.path / METADATA_FILE).read_text())
    meta["tasks"] = {task: meta["tasks"]["sst2"]}
    (info.path / METADATA_FILE).write_text(json.dumps(meta))
    return remote.root


def test_a_pulled_entry_naming_an_absolute_task_is_refused(tmp_path):
    target = tmp_path / "some" / "dir"
    remote = _hostile_remote(tmp_path, str(target / "PWNED"))
    local = Store(tmp_path / "local")
    with pytest.raises(ValueError):
        pull_folder(local, "local/sst2@1", remote)
    assert local.list() == [] and not target.exists()


def test_merge_never_writes_outside_the_store_even_from_a_tampered_entry(tmp_path):
    store = Store(tmp_path / "store")
    a = store.publish(make_run(tmp_path / "a", task="sst2"))
    b = store.publish(make_run(tmp_path / "b", task="rte", seed=1))
    meta = json.loads((b.path / METADATA_FILE).read_text())
    meta["tasks"] = {str(tmp_path / "PWNED"): meta["tasks"]["rte"]}
    (b.path / METADATA_FILE).write_text(json.dumps(meta))
    with pytest.raises(ValueError):
        merge_entries(store, [a.ref, b.ref])
    assert not list(tmp_path.glob("PWNED*"))

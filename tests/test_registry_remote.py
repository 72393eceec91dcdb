"""Push / pull: to another registry folder, and to a Hub over loopback HTTP.

The Hub tests use the real ``huggingface_hub`` client over real HTTP against the in-memory
stand-in server of ``tests/hub_standin.py`` (its docstring says exactly what is real and what is
not); ``HF_ENDPOINT`` points at 127.0.0.1 and nothing reaches the internet.
"""

import pytest
import torch
from huggingface_hub.errors import HfHubHTTPError
from torch.testing import assert_close

from registry import EntryExistsError, Store
from registry.remote import pull_folder, pull_hub, push_folder, push_hub
from tests.hub_standin import HubStandIn, ServerThread
from tests.registry_runs import make_run, trained_task_model, write_run
from tests.tiny import tiny_batch, tiny_model

TOKEN = "hf_test_token"


def _payload(store: Store, ref: str) -> dict[str, str]:
    return {k: v for k, v in store.show(ref)["files"].items() if k != "README.md"}


@pytest.fixture
def hub(monkeypatch):
    import huggingface_hub.constants as constants

    standin = HubStandIn(TOKEN)
    with ServerThread(standin.app) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
        yield standin


def test_folder_push_pull_round_trip_is_idempotent(tmp_path):
    local = Store(tmp_path / "a")
    info = local.publish(make_run(tmp_path / "run"))
    pushed = push_folder(local, info.ref, tmp_path / "b")
    remote = Store(tmp_path / "b")
    assert pushed.ref == "local/sst2@1" and _payload(remote, pushed.ref) == _payload(local, info.ref)
    assert remote.show(pushed.ref)["provenance"]["imported_from"]["store"] == f"<local>/{local.root.name}"  # no local paths published
    assert push_folder(local, info.ref, tmp_path / "b") == pushed  # same content: nothing new
    third = Store(tmp_path / "c")
    pulled = pull_folder(third, "sst2@1", tmp_path / "b", namespace="team")
    assert pulled.ref == "team/sst2@1" and third.check() == []
    other = Store(tmp_path / "d")
    other.publish(make_run(tmp_path / "run2", seed=5))  # a different local/sst2@1
    with pytest.raises(EntryExistsError, match="already exists here with different content"):
        pull_folder(other, "sst2@1", tmp_path / "b")
    assert len(other.list()) == 1 and other.check() == []


def test_hub_push_then_pull_pinned_revision(tmp_path, hub):
    store = Store(tmp_path / "store")
    tm1 = trained_task_model(seed=1)
    v1 = store.publish(write_run(tmp_path / "run1", tm1))
    v2 = store.publish(make_run(tmp_path / "run2", seed=2))
    sha1 = push_hub(store, v1.ref, "alice/sst2-adamix")
    sha2 = push_hub(store, v2.ref, "alice/sst2-adamix")
    assert len(sha1) == 40 and sha1 != sha2
    assert ("POST", "/api/models/alice/sst2-adamix/commit/main") in hub.requests

    fresh = Store(tmp_path / "fresh")
    pinned = pull_hub(fresh, "alice/sst2-adamix", revision=sha1)
    assert pinned.ref == "local/sst2@1" and _payload(fresh, pinned.ref) == _payload(store, v1.ref)
    origin = fresh.show(pinned.ref)["provenance"]["imported_from"]
    assert origin["revision"] == sha1 and origin["hub_repo"] == "alice/sst2-adamix"
    newest = pull_hub(fresh, "alice/sst2-adamix")  # main = the second push
    assert newest.ref == "local/sst2@2" and _payload(fresh, newest.ref) == _payload(store, v2.ref)
    assert any(m == "HEAD" and "/resolve/" in p for m, p in hub.requests)
    model = fresh.attach(pinned.ref, tiny_model("bert", head="base"))
    batch = tiny_batch()
    with torch.no_grad():
        assert_close(model(**batch), tm1(**batch))
    assert fresh.check() == []


def test_hub_pull_with_tampered_file_is_refused(tmp_path, hub):
    store = Store(tmp_path / "store")
    info = store.publish(make_run(tmp_path / "run"))
    push_hub(store, info.ref, "alice/sst2")
    data = bytearray((info.path / "adapter_model.safetensors").read_bytes())
    data[-1] ^= 0xFF  # same size, one flipped bit in the last tensor
    hub.corrupt["adapter_model.safetensors"] = bytes(data)
    fresh = Store(tmp_path / "fresh")
    with pytest.raises(ValueError, match="hash mismatch for adapter_model.safetensors"):
        pull_hub(fresh, "alice/sst2")
    assert fresh.list() == [] and fresh.check() == []


def test_hub_push_needs_a_valid_token(tmp_path, hub, monkeypatch):
    store = Store(tmp_path / "store")
    info = store.publish(make_run(tmp_path / "run"))
    with pytest.raises(HfHubHTTPError, match="401"):
        push_hub(store, info.ref, "alice/x", token="hf_wrong")
    assert "alice/x" not in hub.repos

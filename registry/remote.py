"""Remotes: another registry folder, or a Hugging Face Hub model repository.

A Hub repository holds one entry at its root (so ``PeftModel.from_pretrained("<repo>")`` works on a
merged LoRA); each push is one commit, and a commit sha pins an exact entry version on pull.
The token comes from ``HF_TOKEN`` (huggingface_hub reads it) unless given; the endpoint from
``HF_ENDPOINT``. Downloads go through huggingface_hub's cache under the store
(``<store>/hub-cache``), which resumes interrupted downloads. Every pulled file's sha256 is checked
against the entry's adamix.json before anything enters the store.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from adamix_zoo.formats.metadata import read_metadata, verify_files
from registry.store import EntryInfo, Store

HUB_PREFIX = "hf://"


def push_folder(store: Store, ref: str, destination: str | os.PathLike) -> EntryInfo:
    """Copy an entry into the registry at ``destination`` under the same name (idempotent)."""
    return Store(destination).import_entry(store.get(ref), origin={"store": str(store.root)})


def pull_folder(store: Store, ref: str, source: str | os.PathLike, namespace: str | None = None) -> EntryInfo:
    """Copy an entry from the registry at ``source`` into ``store`` (hashes verified on both sides)."""
    remote = Store(source, create=False)  # a folder that is not a store is refused, not created
    return store.import_entry(remote.get(ref), namespace=namespace, origin={"store": str(remote.root)})


def _api(token: str | None, endpoint: str | None):
    from huggingface_hub import HfApi

    return HfApi(endpoint=_endpoint(endpoint), token=token)


def _endpoint(endpoint: str | None) -> str | None:
    """Read HF_ENDPOINT at call time (huggingface_hub reads it once, at import)."""
    return endpoint or os.environ.get("HF_ENDPOINT") or None


def push_hub(
    store: Store,
    ref: str,
    repo_id: str,
    token: str | None = None,
    revision: str | None = None,
    private: bool = False,
    endpoint: str | None = None,
) -> str:
    """Upload an entry to a Hub model repository as one commit; returns the commit sha.

    Args:
        repo_id: ``user/name`` of the model repository (created if absent).
        token: default ``HF_TOKEN`` from the environment.
        revision: branch to commit to (default the repository's default branch).
    """
    from huggingface_hub import CommitOperationAdd

    folder = store.get(ref)  # verified before upload
    info = store.resolve(ref)
    api = _api(token, endpoint)
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    operations = [CommitOperationAdd(path_in_repo=p.relative_to(folder).as_posix(), path_or_fileobj=str(p))
                  for p in sorted(folder.rglob("*")) if p.is_file()]
    commit = api.create_commit(repo_id, operations, commit_message=f"adamix-zoo: {info.ref}",
                               revision=revision, repo_type="model")
    return commit.oid


def download_hub(store: Store, repo_id: str, revision: str | None = None, token: str | None = None,
                 endpoint: str | None = None) -> tuple[Path, str]:
    """Download (resumably) a Hub entry into the store's hub cache; returns (folder, commit sha)."""
    from huggingface_hub import snapshot_download

    folder = Path(snapshot_download(repo_id, repo_type="model", revision=revision, token=token,
                                    cache_dir=store.root / "hub-cache", endpoint=_endpoint(endpoint)))
    return folder, folder.name  # snapshots/<commit sha>


def pull_hub(
    store: Store,
    repo_id: str,
    revision: str | None = None,
    token: str | None = None,
    namespace: str | None = None,
    endpoint: str | None = None,
) -> EntryInfo:
    """Download an entry from a Hub repository, verify every sha256, and import it into ``store``.

    Args:
        revision: a branch, tag or commit sha; a commit sha pins the exact entry.

    Raises:
        ValueError: the download is not an entry, or a file's sha256 differs from adamix.json.
    """
    folder, commit = download_hub(store, repo_id, revision, token, endpoint)
    verify_files(folder, read_metadata(folder))
    origin: dict[str, Any] = {"hub_repo": repo_id, "revision": commit, "endpoint": _endpoint(endpoint) or
                              "https://huggingface.co"}
    return store.import_entry(folder, namespace=namespace, origin=origin)

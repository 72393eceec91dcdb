"""``adamix.json``: an entry's metadata, its schema, its format version and its file hashes.

``adamix.json`` holds everything needed to trust and use an entry without loading it: the method
and its AdaMix settings, the base model id and fingerprint, per-task label names, metrics and head
file, provenance, and the sha256 of every other file in the entry. ``format_version`` is checked
on every read: an entry written by a newer adamix-zoo is refused rather than misread. Every name
and path it holds is checked with the rule for user input (``formats.names``), because it may come
from a remote. ``manifest_hash`` covers everything that changes an answer: every file's sha256 and
a canonical form of adamix.json itself (its ``files`` table aside, which the hashes already cover).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

from adamix_zoo.formats.files import METADATA_FILE, SUPPORTED_FORMAT_VERSIONS, read_json
from adamix_zoo.formats.names import validate_part, validate_relative_path

REQUIRED_FIELDS = (
    "format_version", "name", "method", "kind", "num_experts", "base_model", "tasks", "merge",
    "provenance", "files",
)
_HASH_CHUNK = 1 << 20
_SHA256_HEX = frozenset("0123456789abcdef")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def payload_files(folder: Path) -> list[str]:
    """Every file of an entry folder except adamix.json, as sorted posix paths relative to it."""
    names = (p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    return sorted(n for n in names if n != METADATA_FILE)


def hash_files(folder: Path) -> dict[str, str]:
    return {name: sha256_file(folder / name) for name in payload_files(folder)}


def validate_metadata(meta: Any, where: str = "adamix.json") -> dict[str, Any]:
    """Check the required fields and the format version.

    Raises:
        ValueError: not an object, a missing field, or an unsupported ``format_version``.
    """
    if not isinstance(meta, dict):
        raise ValueError(f"{where}: expected a JSON object")
    missing = [f for f in REQUIRED_FIELDS if f not in meta]
    if missing:
        raise ValueError(f"{where}: missing metadata field(s): {', '.join(missing)}")
    version = str(meta["format_version"])
    if version not in SUPPORTED_FORMAT_VERSIONS:
        raise ValueError(
            f"{where}: format_version {version!r} is not supported by this adamix-zoo "
            f"(reads {', '.join(SUPPORTED_FORMAT_VERSIONS)}); upgrade adamix-zoo to read it"
        )
    base = meta["base_model"]
    if not isinstance(base, dict) or not base.get("fingerprint"):
        raise ValueError(f"{where}: base_model must give an id and a fingerprint")
    if not isinstance(meta["files"], dict) or not isinstance(meta["tasks"], dict) or not meta["tasks"]:
        raise ValueError(f"{where}: 'files' and 'tasks' must be non-empty objects")
    try:
        validate_names(meta)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None
    return meta


def validate_names(meta: dict[str, Any]) -> None:
    """Every name and path of adamix.json by the rule for user input: the entry's name parts, task
    names, head files and the ``files`` table (relative paths inside the entry, sha256 values).

    Raises:
        ValueError: the first offending value, named.
    """
    name = meta.get("name", {})
    if not isinstance(name, dict):
        raise ValueError(f"'name' must be an object, got {type(name).__name__}")
    for part in ("namespace", "task", "version"):
        if part in name:
            validate_part(part, name[part])
    for task, info in meta.get("tasks", {}).items():
        validate_part("task", task)
        if not isinstance(info, dict):
            raise ValueError(f"task {task!r}: expected an object")
        if info.get("head") is not None:
            validate_relative_path(f"head of task {task!r}", info["head"])
        labels = info.get("label_names")
        if labels is not None and not (isinstance(labels, list) and all(isinstance(x, str) for x in labels)):
            raise ValueError(f"task {task!r}: label_names must be a list of strings")
        if info.get("prompt_template") is not None and not isinstance(info["prompt_template"], str):
            raise ValueError(f"task {task!r}: prompt_template must be a string")
    for file, digest in meta.get("files", {}).items():
        validate_relative_path("file", file)
        if file == METADATA_FILE:
            raise ValueError(f"the files table cannot list {METADATA_FILE} itself")
        if not (isinstance(digest, str) and len(digest) == 64 and set(digest) <= _SHA256_HEX):
            raise ValueError(f"file {file!r}: {digest!r} is not a sha256 hex digest")


def canonical_metadata(meta: dict[str, Any]) -> bytes:
    """adamix.json without its ``files`` table, as canonical JSON (sorted keys, no spaces)."""
    body = {k: v for k, v in meta.items() if k != "files"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def manifest_hash(meta: dict[str, Any]) -> str:
    """sha256 over the canonical adamix.json and every file's sha256: an entry's whole content.

    Two entries with the same manifest give the same answers (same weights, heads, label names,
    prompt templates and settings); the store keeps it in its index and re-checks it on reads.
    """
    digest = hashlib.sha256(b"adamix-manifest-1\n" + canonical_metadata(meta) + b"\n")
    for name, file_hash in sorted(meta.get("files", {}).items()):
        digest.update(f"{name}\0{file_hash}\n".encode())
    return digest.hexdigest()


def metadata_differences(ours: dict[str, Any], theirs: dict[str, Any]) -> list[str]:
    """The top-level fields that differ between two adamix.json (for error messages)."""
    return sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))


def read_metadata(folder: Path) -> dict[str, Any]:
    path = Path(folder) / METADATA_FILE
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read entry metadata {path}: {err}") from err
    return validate_metadata(meta, str(path))


def verify_files(folder: Path, meta: dict[str, Any]) -> None:
    """Check that the folder holds exactly the files ``meta['files']`` lists, with those sha256.

    Raises:
        ValueError: a missing or extra file, or a hash mismatch (the message names the file).
    """
    folder = Path(folder)
    expected = meta["files"]
    for name in expected:  # names from disk or a remote: never a path outside the folder
        validate_relative_path("file", name)
    present = set(payload_files(folder))
    missing = sorted(set(expected) - present)
    extra = sorted(present - set(expected))
    if missing or extra:
        raise ValueError(f"entry {folder}: missing files {missing}, unlisted files {extra}")
    for name, digest in expected.items():
        actual = sha256_file(folder / name)
        if actual != digest:
            raise ValueError(
                f"hash mismatch for {name} in {folder}: adamix.json says {digest}, file has {actual}"
            )


def read_task_metadata(folder: Path) -> dict[str, Any]:
    """A task folder's ``adamix.json`` read leniently: {} when absent, any JSON object accepted (a
    run's ``merged/`` holds a short one; a registry entry the full schema, see ``read_metadata``).

    Raises:
        ValueError: the file exists but is not a JSON object.
    """
    path = Path(folder) / METADATA_FILE
    if not path.exists():
        return {}
    data = read_json(path)
    if not isinstance(data, dict):
        raise ValueError(f"task metadata {path} must be a JSON object, got {type(data).__name__}")
    return data


_ABSOLUTE = re.compile(r"^(?:/|~|[A-Za-z]:[\\/]|\\\\)")


def scrub_local_paths(value: Any) -> Any:
    """``value`` with every absolute local path (``/home/...``, ``~/...``, ``C:\\...``) replaced by
    ``<local>/<last part>``: what is published names no folder of the publisher's machine."""
    if isinstance(value, dict):
        return {k: scrub_local_paths(v) for k, v in value.items()}
    if isinstance(value, list):
        return [scrub_local_paths(v) for v in value]
    if isinstance(value, str) and _ABSOLUTE.match(value):
        name = re.split(r"[\\/]", value.rstrip("/\\"))[-1]
        return f"<local>/{name}" if name else "<local>"
    return value

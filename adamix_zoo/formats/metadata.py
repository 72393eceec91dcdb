"""``adamix.json``: an entry's metadata, its schema, its format version and its file hashes.

``adamix.json`` holds everything needed to trust and use an entry without loading it: the method
and its AdaMix settings, the base model id and fingerprint, per-task label names, metrics and head
file, provenance, and the sha256 of every other file in the entry. ``format_version`` is checked
on every read: an entry written by a newer adamix-zoo is refused rather than misread.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from adamix_zoo.formats.files import METADATA_FILE, SUPPORTED_FORMAT_VERSIONS, read_json

REQUIRED_FIELDS = (
    "format_version", "name", "method", "kind", "num_experts", "base_model", "tasks", "merge",
    "provenance", "files",
)
_HASH_CHUNK = 1 << 20


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
    return meta


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

"""Entry names: ``namespace/task@version``, validated so that a name can never escape the store.

Each part matches ``NAME_PATTERN``: 1 to 64 characters from letters, digits, ``.``, ``_``, ``-`` and
``+`` (merged entries are called ``sst2+rte``), starting with a letter or digit. So a part can hold
no path separator, cannot be ``.`` or ``..`` and cannot start with ``-`` (no option injection in the
CLI). ``latest`` (any case) is reserved as a version: it resolves to the newest published version,
so no entry can be published under it. Every name read from disk or from a remote (``adamix.json``,
a pulled entry) goes through the same rule as user input (``formats.metadata.validate_metadata``);
paths inside an entry go through ``validate_relative_path``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MAX_PART_LENGTH = 64
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,63}")
LATEST = "latest"
DEFAULT_NAMESPACE = "local"


def validate_part(kind: str, value: str) -> str:
    """Return ``value`` if it is a valid name part, else raise a ValueError naming the rule broken.

    Args:
        kind: what the part is ('namespace', 'task' or 'version'), for the message.
        value: the candidate.
    """
    if not isinstance(value, str) or not value:
        raise ValueError(f"{kind} must be a non-empty string, got {value!r}")
    if len(value) > MAX_PART_LENGTH:
        raise ValueError(
            f"{kind} {value[:20]!r}... is {len(value)} characters; the limit is {MAX_PART_LENGTH}"
        )
    if "/" in value or "\\" in value:
        raise ValueError(f"{kind} {value!r} contains a path separator")
    if ".." in value:
        raise ValueError(f"{kind} {value!r} contains '..'")
    if not NAME_PATTERN.fullmatch(value):
        raise ValueError(
            f"{kind} {value!r} is not a valid name: use 1-{MAX_PART_LENGTH} letters, digits, '.', '_', "
            "'-' or '+', starting with a letter or digit"
        )
    return value


def validate_version(value: str) -> str:
    """A version an entry can be published under: a valid part that is not the reserved ``latest``.

    Raises:
        ValueError: an invalid part, or ``latest`` in any case.
    """
    validate_part("version", value)
    if value.lower() == LATEST:
        raise ValueError(f"version {value!r} is reserved: '{LATEST}' always means the newest version")
    return value


def validate_relative_path(kind: str, value: str) -> str:
    """A file path inside an entry (``heads/sst2.safetensors``): '/'-separated valid name parts.

    So it is relative, has no '..', no empty or '.' part and no backslash: ``folder / value`` stays
    inside the folder.

    Raises:
        ValueError: naming the offending part.
    """
    if not isinstance(value, str) or not value:
        raise ValueError(f"{kind} must be a non-empty relative path, got {value!r}")
    if value.startswith("/") or len(value) > 4 * MAX_PART_LENGTH:
        raise ValueError(f"{kind} {value[:80]!r} must be a short relative path inside the entry")
    for part in value.split("/"):
        try:
            validate_part(kind, part)
        except ValueError as err:
            raise ValueError(f"{kind} {value[:80]!r} is not a path inside the entry: {err}") from None
    return value


@dataclass(frozen=True)
class EntryRef:
    """A parsed reference ``[namespace/]task[@version]``; version None or 'latest' means newest."""

    namespace: str
    task: str
    version: str | None = None

    def __post_init__(self) -> None:
        validate_part("namespace", self.namespace)
        validate_part("task", self.task)
        if self.version is not None:
            validate_part("version", self.version)

    @property
    def is_latest(self) -> bool:
        return self.version in (None, LATEST)

    def __str__(self) -> str:
        return f"{self.namespace}/{self.task}@{self.version or LATEST}"


def parse_ref(text: str, default_namespace: str = DEFAULT_NAMESPACE) -> EntryRef:
    """Parse ``namespace/task@version`` (namespace and version optional).

    Raises:
        ValueError: more than one '/', or a part that breaks the naming rules.
    """
    name, _, version = text.partition("@")
    if name.count("/") > 1:
        raise ValueError(f"reference {text!r} has more than one '/': use namespace/task@version")
    namespace, _, task = name.rpartition("/")
    return EntryRef(namespace or default_namespace, task, version or None)

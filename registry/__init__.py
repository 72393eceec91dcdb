"""The adapter zoo: a local store of merged per-task AdaMix adapters, remotes, cross-task merging.

``registry`` imports ``adamix_zoo``; ``adamix_zoo`` never imports ``registry`` (only its CLI does,
lazily).
"""

from adamix_zoo.formats.names import EntryRef, parse_ref
from registry.export import export_peft
from registry.merging import merge_entries
from registry.remote import pull_folder, pull_hub, push_folder, push_hub
from registry.store import EntryExistsError, EntryInfo, EntryNotFoundError, Store, default_home

__all__ = [
    "EntryExistsError",
    "EntryInfo",
    "EntryNotFoundError",
    "EntryRef",
    "Store",
    "default_home",
    "export_peft",
    "merge_entries",
    "parse_ref",
    "pull_folder",
    "pull_hub",
    "push_folder",
    "push_hub",
]

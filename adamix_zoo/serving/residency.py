"""Which tasks are attached, which stay in memory (least recently used first out), and their slots.

Every attached task keeps its folder (``TaskSource``) so that an evicted one reloads on demand,
and the digest of the files it was first read from: a reload whose files changed is refused
(``ServerFaultError``) rather than served with other weights or labels. At most ``capacity`` are
resident, and resident task i (in LRU order) owns slot i + 1 of the banks.
Not thread-safe by itself: the engine holds its lock around every call.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from adamix_zoo.serving.errors import ServerFaultError, UnknownTaskError
from adamix_zoo.serving.task_folders import TaskAdapter, read_task_adapter


@dataclass(frozen=True)
class TaskInfo:
    """What ``ServingEngine.tasks()`` reports about an attached task."""

    task: str
    kind: str
    problem: str  # classification, regression or lm (generation)
    version: str
    num_labels: int
    label_names: list[str] | None
    source: str
    resident: bool
    base_model: str | None


@dataclass
class TaskSource:
    """Where an attached task reloads from after eviction, and what requests need before that."""

    folder: Path
    label_names: list[str] | None
    head: str | None
    prompt_template: str | None  # None: a classification or regression task
    digest: str = ""  # of the files as first attached (``task_folders.folder_digest``)

    def read(self, task: str) -> TaskAdapter:
        """Re-read the task's folder.

        Raises:
            ServerFaultError: the folder no longer reads, or its files differ from those attached.
        """
        try:
            adapter = read_task_adapter(self.folder, task, self.label_names, self.head)
        except (ValueError, OSError) as err:
            raise ServerFaultError(f"task {task!r} could not be reloaded from {self.folder}: {err}") from err
        if self.digest and adapter.digest != self.digest:
            raise ServerFaultError(
                f"task {task!r}: the files in {self.folder} changed since it was attached; refusing "
                "to serve them (attach it again to accept the new files)"
            )
        return adapter


class TaskCache:
    """The attached tasks and the LRU of resident ones.

    Args:
        capacity: the most tasks resident at once.
        check: refuses an adapter the backbone cannot serve (run again on every reload).
        restack: called with the resident adapters in slot order whenever they change.
    """

    def __init__(
        self,
        capacity: int,
        check: Callable[[TaskAdapter], None],
        restack: Callable[[list[TaskAdapter]], None],
    ) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._check = check
        self._restack = restack
        self._sources: dict[str, TaskSource] = {}
        self._resident: OrderedDict[str, TaskAdapter] = OrderedDict()
        self._slots: dict[str, int] = {}

    def __contains__(self, task: object) -> bool:
        return task in self._sources

    def names(self) -> list[str]:
        return sorted(self._sources)

    def resident(self) -> list[str]:
        """Tasks in memory, least recently used first."""
        return list(self._resident)

    def source(self, task: str) -> TaskSource:
        try:
            return self._sources[task]
        except KeyError:
            raise UnknownTaskError(f"task {task!r} is not attached") from None

    def prompt_template(self, task: str) -> str | None:
        """A generation task's prompt template; None for a classification or regression task."""
        return self.source(task).prompt_template

    def adapter(self, task: str) -> TaskAdapter:
        """A resident task's adapter (after ``make_resident``)."""
        return self._resident[task]

    def add(
        self, adapter: TaskAdapter, folder: Path, label_names: list[str] | None, head: str | None
    ) -> None:
        """Attach (or replace) a checked adapter read with these arguments; it becomes the most
        recently used."""
        self._sources[adapter.task] = TaskSource(
            folder, label_names, head, adapter.prompt_template, adapter.digest
        )
        self._resident[adapter.task] = adapter
        self._resident.move_to_end(adapter.task)
        self._changed(keep={adapter.task})

    def remove(self, task: str) -> None:
        """Forget a task. Raises UnknownTaskError if it is not attached."""
        self.source(task)
        del self._sources[task]
        if self._resident.pop(task, None) is not None:
            self._changed(keep=set())

    def info(self, task: str) -> TaskInfo:
        adapter = self._resident.get(task)
        if adapter is None:  # evicted: describe it from its folder without keeping it
            adapter = self._sources[task].read(task)
        return TaskInfo(
            task=task,
            kind=adapter.kind,
            problem=adapter.problem,
            version=adapter.version,
            num_labels=adapter.num_labels,
            label_names=adapter.label_names,
            source=str(adapter.source),
            resident=task in self._resident,
            base_model=adapter.base_model_id,
        )

    def make_resident(self, tasks: Sequence[str | None]) -> list[int]:
        """Reload evicted tasks (evicting others) and return each row's slot (0 for None).

        Raises:
            UnknownTaskError: a task that is not attached.
        """
        wanted = {t for t in tasks if t is not None}
        unknown = sorted(t for t in wanted if t not in self._sources)
        if unknown:
            raise UnknownTaskError(f"task {unknown[0]!r} is not attached")
        changed = False
        try:
            for task in wanted:
                if task not in self._resident:
                    adapter = self._sources[task].read(task)
                    self._check(adapter)
                    self._resident[task] = adapter
                    changed = True
                self._resident.move_to_end(task)
        finally:  # keep slots and banks consistent with what is resident, even after a failed reload
            if changed:
                self._changed(keep=wanted)
        return [0 if t is None else self._slots[t] for t in tasks]

    def _changed(self, keep: set[str]) -> None:
        """Evict the least recently used beyond capacity (never ``keep``), then restack."""
        for task in list(self._resident):
            if len(self._resident) <= self.capacity:
                break
            if task not in keep:
                del self._resident[task]
        adapters = list(self._resident.values())
        self._slots = {a.task: i + 1 for i, a in enumerate(adapters)}
        self._restack(adapters)


def capacity_groups(tasks: Sequence[str | None], capacity: int) -> list[list[int]]:
    """Row indices split so each group names at most ``capacity`` distinct tasks (normally one group)."""
    distinct = list(dict.fromkeys(t for t in tasks if t is not None))
    if len(distinct) <= capacity:
        return [list(range(len(tasks)))]
    chunk_of = {t: i // capacity for i, t in enumerate(distinct)}
    groups: list[list[int]] = [[] for _ in range(max(chunk_of.values()) + 1)]
    for i, task in enumerate(tasks):
        groups[chunk_of[task] if task is not None else 0].append(i)
    return groups

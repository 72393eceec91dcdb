"""The local store: entry folders plus a SQLite index, with atomic, concurrency-safe publishing.

Layout under the root (``$ADAMIX_ZOO_HOME`` or the user cache folder, e.g. ``~/.cache/adamix-zoo``)::

    index.sqlite                       the index: the only source of truth for what exists
    entries/<namespace>/<task>/<version>/   one immutable folder per published entry
    staging/<random>/                  entries being assembled (invisible, same filesystem)

Publishing: assemble and validate the entry in ``staging/`` (fsync every file); then, inside one
SQLite ``BEGIN IMMEDIATE`` transaction (which serialises writers across processes), choose the
version, write ``adamix.json`` and the card, ``rename`` the folder into ``entries/`` and insert the
index row; commit. A process killed at any point leaves either no row (the entry is invisible and
its leftover folder is garbage that ``gc`` removes) or a complete entry.

Versions: without an explicit version, the store assigns the next integer (1, 2, ...) inside the
transaction, so concurrent publishers of one name get distinct versions. An explicit version that
exists (or existed: deleted versions are never reused) is refused with ``EntryExistsError``.
``latest`` is the most recently published live version.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import sqlite3
import sys
import time
import uuid
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from adamix_zoo.formats.files import METADATA_FILE, MODEL_CARD_FILE
from adamix_zoo.formats.metadata import hash_files, read_metadata, verify_files
from adamix_zoo.formats.names import DEFAULT_NAMESPACE, EntryRef, parse_ref, validate_part
from registry.model_card import model_card

try:  # POSIX advisory locks mark staging folders in use; elsewhere gc relies on their age alone
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

HOME_ENV = "ADAMIX_ZOO_HOME"
PAUSE_ENV = "ADAMIX_ZOO_TEST_PAUSE"  # "<step>:<seconds>": sleep at a publish step (crash tests)
SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    namespace TEXT NOT NULL, task TEXT NOT NULL, version TEXT NOT NULL,
    created TEXT NOT NULL, deleted TEXT,
    kind TEXT NOT NULL, method TEXT NOT NULL, base_model TEXT, fingerprint TEXT NOT NULL,
    metadata TEXT NOT NULL,
    UNIQUE (namespace, task, version)
);
"""


class EntryExistsError(ValueError):
    """The name is taken: entries are immutable and versions are never reused."""


class EntryNotFoundError(KeyError):
    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


def default_home() -> Path:
    """``$ADAMIX_ZOO_HOME``, else the platform's user cache folder + ``adamix-zoo``."""
    if os.environ.get(HOME_ENV):
        return Path(os.environ[HOME_ENV]).expanduser()
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA", Path.home() / "AppData" / "Local"))
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Caches"
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "adamix-zoo"


@dataclass(frozen=True)
class EntryInfo:
    """One row of the index."""

    namespace: str
    task: str
    version: str
    created: str
    kind: str
    method: str
    base_model: str | None
    fingerprint: str
    path: Path

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.task}@{self.version}"


def _pause(step: str) -> None:
    """Test hook: with ADAMIX_ZOO_TEST_PAUSE='<step>:<seconds>', announce the step and sleep."""
    spec = os.environ.get(PAUSE_ENV, "")
    name, _, seconds = spec.partition(":")
    if name == step:
        print(f"adamix-zoo-pause {step}", file=sys.stderr, flush=True)
        time.sleep(float(seconds or 60))


def _fsync_tree(folder: Path) -> None:
    for path in sorted(folder.rglob("*"), reverse=True):
        _fsync_path(path)
    _fsync_path(folder)


def _fsync_path(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - directories cannot be opened on Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some filesystems refuse fsync on directories
        pass
    finally:
        os.close(fd)


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


class Store:
    """A local adapter zoo.

    Args:
        root: the store folder; default ``default_home()``. Created if absent.
    """

    def __init__(self, root: str | os.PathLike | None = None) -> None:
        self.root = Path(root).expanduser() if root is not None else default_home()
        self.entries_dir = self.root / "entries"
        self.staging_dir = self.root / "staging"
        self.entries_dir.mkdir(parents=True, exist_ok=True)
        self.staging_dir.mkdir(parents=True, exist_ok=True)
        with closing(self._connect()) as con:
            con.executescript(SCHEMA)

    # -- index -------------------------------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE below)
        con = sqlite3.connect(self.root / "index.sqlite", timeout=60, isolation_level=None)
        con.row_factory = sqlite3.Row
        return con

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; BEGIN IMMEDIATE takes SQLite's write lock up front (cross-process)."""
        con = self._connect()
        try:
            con.execute("BEGIN IMMEDIATE")
            try:
                yield con
            except BaseException:
                con.execute("ROLLBACK")
                raise
            con.execute("COMMIT")
        finally:
            con.close()

    def _info(self, row: sqlite3.Row) -> EntryInfo:
        path = self.entry_path(row["namespace"], row["task"], row["version"])
        return EntryInfo(row["namespace"], row["task"], row["version"], row["created"], row["kind"],
                         row["method"], row["base_model"], row["fingerprint"], path)

    def entry_path(self, namespace: str, task: str, version: str) -> Path:
        return self.entries_dir / validate_part("namespace", namespace) / validate_part("task", task) / \
            validate_part("version", version)

    def list(self, namespace: str | None = None, task: str | None = None) -> list[EntryInfo]:
        """Live entries, oldest first, optionally filtered by namespace and task."""
        query, args = "SELECT * FROM entries WHERE deleted IS NULL", []
        for column, value in (("namespace", namespace), ("task", task)):
            if value is not None:
                query += f" AND {column} = ?"
                args.append(value)
        with closing(self._connect()) as con:
            rows = con.execute(query + " ORDER BY seq", args).fetchall()
        return [self._info(r) for r in rows]

    def resolve(self, ref: str | EntryRef) -> EntryInfo:
        """``namespace/task@version`` (or ``@latest`` / no version) -> its index row.

        Raises:
            EntryNotFoundError: no such live entry.
        """
        ref = parse_ref(ref) if isinstance(ref, str) else ref
        with closing(self._connect()) as con:
            if ref.is_latest:
                row = con.execute(
                    "SELECT * FROM entries WHERE namespace=? AND task=? AND deleted IS NULL "
                    "ORDER BY seq DESC LIMIT 1", (ref.namespace, ref.task)).fetchone()
            else:
                row = con.execute(
                    "SELECT * FROM entries WHERE namespace=? AND task=? AND version=? AND deleted IS NULL",
                    (ref.namespace, ref.task, ref.version)).fetchone()
        if row is None:
            raise EntryNotFoundError(f"no entry {ref} in the store at {self.root}")
        return self._info(row)

    # -- reading -----------------------------------------------------------------------------------
    def get(self, ref: str | EntryRef, verify: bool = True) -> Path:
        """The entry's folder (read-only by convention); with ``verify``, every sha256 is checked.

        Raises:
            EntryNotFoundError, ValueError: unknown entry, or files that do not match adamix.json.
        """
        info = self.resolve(ref)
        if verify:
            verify_files(info.path, read_metadata(info.path))
        return info.path

    def show(self, ref: str | EntryRef) -> dict[str, Any]:
        """The entry's adamix.json."""
        return read_metadata(self.resolve(ref).path)

    def attach(self, ref: str | EntryRef, backbone: Any, task: str | None = None) -> Any:
        """Inject the entry's merged adapter into ``backbone`` (in place) and add its task head.

        Args:
            ref: the entry.
            backbone: the bare pre-trained model (``AutoModel``) the entry was trained on.
            task: which head of a multi-task (cross-task merged) entry; optional with one task.

        Returns:
            A ready ``adamix_zoo.heads.TaskModel`` in eval mode; for a generation entry (no head;
            ``backbone`` is then the causal LM) the adapted ``AdaMixModel``.

        Raises:
            ValueError: the backbone's fingerprint differs from the entry's base model (the message
                names both), an unknown task, or files that fail verification.
        """
        from adamix_zoo.backbones import fingerprint
        from adamix_zoo.formats.merged import load_merged
        from adamix_zoo.heads import TaskModel, load_head

        folder = self.get(ref)
        meta = read_metadata(folder)
        expected, actual = meta["base_model"]["fingerprint"], fingerprint(backbone)
        if expected != actual:
            config = getattr(backbone, "config", None)
            given = getattr(config, "_name_or_path", None) or type(backbone).__name__
            raise ValueError(
                f"entry {self.resolve(ref).ref} was trained on base model {meta['base_model'].get('id')!r} "
                f"(fingerprint {expected}), but the given backbone {given!r} has fingerprint {actual}: "
                "refusing to attach an adapter to different weights"
            )
        tasks = meta["tasks"]
        if task is None and len(tasks) > 1:
            raise ValueError(
                f"entry {self.resolve(ref).ref} serves several tasks {sorted(tasks)}: pass task="
            )
        task = task or next(iter(tasks))
        if task not in tasks:
            raise ValueError(f"entry {self.resolve(ref).ref} has no task {task!r}; it has {sorted(tasks)}")
        adapted = load_merged(backbone, folder)
        if not tasks[task].get("head"):  # a generation task: the causal LM's output layer answers
            return adapted.eval()
        return TaskModel(adapted, load_head(folder / tasks[task]["head"])).eval()

    # -- writing -----------------------------------------------------------------------------------
    @contextmanager
    def staging(self) -> Iterator[Path]:
        """A fresh folder in ``staging/`` (same filesystem as ``entries/``), locked while in use."""
        path = self.staging_dir / uuid.uuid4().hex
        path.mkdir()
        fd = os.open(path, os.O_RDONLY) if fcntl is not None else None
        try:
            if fd is not None:
                fcntl.flock(fd, fcntl.LOCK_EX)  # released by the kernel even on SIGKILL
            yield path
        finally:
            if fd is not None:
                os.close(fd)
            shutil.rmtree(path, ignore_errors=True)

    def publish(
        self,
        run_dir: str | os.PathLike,
        task: str | None = None,
        namespace: str = DEFAULT_NAMESPACE,
        version: str | None = None,
        experts: bool = True,
    ) -> EntryInfo:
        """Publish a training output folder as ``namespace/task@version``.

        Args:
            run_dir: the training output (run_config.json, final_metrics.json, head, merged/...).
            task: the entry's task name; default the run's task.
            namespace: the entry's namespace.
            version: an explicit version; default the next integer.
            experts: also keep the unmerged experts (to continue training or federate).

        Raises:
            ValueError: invalid names, missing/corrupt/mis-shaped files; EntryExistsError.
        """
        from registry.entry import read_run, run_metadata, stage_run

        run = read_run(Path(run_dir))
        task = run["task"] if task is None else task
        EntryRef(namespace, task, version)
        with self.staging() as stage:
            stage_run(Path(run_dir), stage, run, task, experts)
            return self.commit(stage, run_metadata(run, task, Path(run_dir)), namespace, task, version)

    def commit(
        self, stage: Path, meta: dict[str, Any], namespace: str, task: str, version: str | None = None
    ) -> EntryInfo:
        """Make a validated staging folder a published entry (see the module docstring)."""
        EntryRef(namespace, task, version)
        _fsync_tree(stage)
        _pause("staged")
        with self._write() as con:
            version = version or self._next_version(con, namespace, task)
            taken = con.execute("SELECT deleted FROM entries WHERE namespace=? AND task=? AND version=?",
                                (namespace, task, version)).fetchone()
            if taken is not None:
                state = "was deleted (versions are never reused)" if taken["deleted"] else "already exists"
                raise EntryExistsError(f"entry {namespace}/{task}@{version} {state}; entries are immutable")
            meta = self._finalize(stage, meta, namespace, task, version)
            target = self.entry_path(namespace, task, version)
            self._discard(target)  # an orphan of a publish killed before its commit
            target.parent.mkdir(parents=True, exist_ok=True)
            os.rename(stage, target)
            _fsync_path(target.parent)  # the rename is durable before the row that points to it
            try:
                _pause("renamed")
                con.execute(
                    "INSERT INTO entries (namespace, task, version, created, kind, method, base_model, "
                    "fingerprint, metadata) VALUES (?,?,?,?,?,?,?,?,?)",
                    (namespace, task, version, meta["created"], meta["kind"], meta["method"],
                     meta["base_model"].get("id"), meta["base_model"]["fingerprint"], json.dumps(meta)),
                )
            except BaseException:
                shutil.rmtree(target, ignore_errors=True)
                raise
        return self.resolve(EntryRef(namespace, task, version))

    @staticmethod
    def _next_version(con: sqlite3.Connection, namespace: str, task: str) -> str:
        rows = con.execute("SELECT version FROM entries WHERE namespace=? AND task=?", (namespace, task))
        numbers = [int(r["version"]) for r in rows if r["version"].isdigit()]
        return str(max(numbers, default=0) + 1)

    @staticmethod
    def _finalize(
        stage: Path, meta: dict[str, Any], namespace: str, task: str, version: str
    ) -> dict[str, Any]:
        """Name the entry, write its card and adamix.json (with the sha256 of every file), fsync."""
        meta = dict(meta, name={"namespace": namespace, "task": task, "version": version}, created=_now())
        meta["files"] = {n: "" for n in hash_files(stage)} | {MODEL_CARD_FILE: ""}
        (stage / MODEL_CARD_FILE).write_text(model_card(meta))
        meta["files"] = hash_files(stage)
        (stage / METADATA_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        _fsync_tree(stage)
        return meta

    def _discard(self, path: Path) -> None:
        """Remove a folder that no index row points to (moved aside first, so removal is atomic)."""
        if path.exists():
            trash = self.staging_dir / f"discard-{uuid.uuid4().hex}"
            os.rename(path, trash)
            shutil.rmtree(trash, ignore_errors=True)

    def delete(self, ref: str | EntryRef) -> EntryInfo:
        """Delete an entry: the row is marked deleted (its version is never reused), then its folder goes."""
        info = self.resolve(ref)
        with self._write() as con:
            con.execute("UPDATE entries SET deleted=? WHERE namespace=? AND task=? AND version=?",
                        (_now(), info.namespace, info.task, info.version))
        self._discard(info.path)  # after the commit: a crash here only leaves invisible garbage
        return info

    # -- maintenance -------------------------------------------------------------------------------
    def check(self, verify_hashes: bool = True) -> list[str]:
        """Problems that make the store inconsistent (empty list: consistent).

        Every live row must have its folder with valid metadata naming it and, with
        ``verify_hashes``, files matching their sha256. Leftovers that no row points to are garbage,
        not inconsistencies: see ``garbage()`` and ``gc()``.
        """
        problems = []
        for info in self.list():
            try:
                meta = read_metadata(info.path)
                if meta["name"] != {"namespace": info.namespace, "task": info.task, "version": info.version}:
                    problems.append(f"{info.ref}: adamix.json names {meta['name']}")
                if verify_hashes:
                    verify_files(info.path, meta)
            except ValueError as err:
                problems.append(f"{info.ref}: {err}")
        return problems

    def garbage(self) -> list[Path]:
        """Folders no live row points to: stale staging folders and orphaned or deleted entries."""
        live = {info.path for info in self.list()}
        orphans = [p for p in self.entries_dir.glob("*/*/*") if p.is_dir() and p not in live]
        return sorted(list(self.staging_dir.iterdir()) + orphans)

    def gc(self, min_age_s: float = 60.0) -> list[Path]:
        """Remove garbage; a staging folder only if no publisher holds it and it is older than min_age_s."""
        removed = []
        with self._write():  # no publisher is between its rename and its commit meanwhile
            for path in self.garbage():
                if path.parent == self.staging_dir and not self._stale(path, min_age_s):
                    continue
                if path.parent == self.staging_dir:
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    self._discard(path)
                removed.append(path)
        return removed

    @staticmethod
    def _stale(path: Path, min_age_s: float) -> bool:
        try:
            if time.time() - path.stat().st_mtime < min_age_s:
                return False
            if fcntl is None or not path.is_dir():
                return True
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError:
            return False  # a live publisher holds it
        finally:
            os.close(fd)

    def import_entry(
        self,
        folder: str | os.PathLike,
        namespace: str | None = None,
        task: str | None = None,
        version: str | None = None,
        origin: dict[str, Any] | None = None,
    ) -> EntryInfo:
        """Copy an entry folder (another store's, or a Hub download) into this store.

        The source's sha256 are verified first and every tensor file is re-validated. The name
        defaults to the source's; if that version exists here with the same payload, it is returned
        unchanged (push and pull are idempotent), otherwise ``EntryExistsError``.

        Args:
            origin: where it came from (recorded in provenance.imported_from).
        """
        from registry.entry import head_files, validate_payload

        folder = Path(folder)
        meta = read_metadata(folder)
        verify_files(folder, meta)
        name = meta["name"]
        namespace, task = namespace or name["namespace"], task or name["task"]
        version = version or name["version"]
        existing = self._same_payload(EntryRef(namespace, task, version), meta)
        if existing is not None:
            return existing
        with self.staging() as stage:
            for rel in meta["files"]:
                if rel != MODEL_CARD_FILE:
                    (stage / rel).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(folder / rel, stage / rel)
            payload = {k: v for k, v in meta["files"].items() if k != MODEL_CARD_FILE}
            verify_files(stage, dict(meta, files=payload))  # the copies are what was verified
            validate_payload(stage, head_files(meta["tasks"]))
            provenance = dict(meta["provenance"], imported_from=dict(origin or {}, name=name))
            return self.commit(stage, dict(meta, provenance=provenance), namespace, task, version)

    def _same_payload(self, ref: EntryRef, meta: dict[str, Any]) -> EntryInfo | None:
        try:
            info = self.resolve(ref)
        except EntryNotFoundError:
            return None
        ours = {k: v for k, v in read_metadata(info.path)["files"].items() if k != MODEL_CARD_FILE}
        theirs = {k: v for k, v in meta["files"].items() if k != MODEL_CARD_FILE}
        if ours != theirs:
            raise EntryExistsError(f"entry {info.ref} already exists here with different content")
        return info

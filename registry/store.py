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
``latest`` is the most recently published live version and is reserved: no entry is published
under it (any case).

Integrity: the index keeps each entry's adamix.json as committed; every verified read (``get``,
``attach``, ``check``, a push or pull) compares the folder's ``manifest_hash`` (adamix.json in
canonical form + every file's sha256) with the index's copy, so an edited label name, prompt
template or head is refused. Before commit every tensor file is checked finite.

Damage: ``check()`` reports missing or altered entries and an unreadable index; ``repair()``
quarantines altered entry folders, forgets rows whose folder is gone and rebuilds a corrupt index
from the entry folders; ``gc()`` removes garbage. ``Store(path, create=False)`` opens only an
existing store (a pull source), writing nothing.
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

from adamix_zoo.formats.files import METADATA_FILE, MODEL_CARD_FILE, read_safetensors
from adamix_zoo.formats.metadata import (
    hash_files,
    manifest_hash,
    metadata_differences,
    read_metadata,
    scrub_local_paths,
    verify_files,
)
from adamix_zoo.formats.names import DEFAULT_NAMESPACE, EntryRef, parse_ref, validate_part, validate_version
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


class StoreCorruptError(ValueError):
    """The index cannot be read; ``adamix-zoo check --repair`` rebuilds it from the entry folders."""


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
    manifest: str = ""  # manifest_hash of the adamix.json the index recorded at commit

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

    def __init__(self, root: str | os.PathLike | None = None, create: bool = True) -> None:
        self.root = Path(root).expanduser() if root is not None else default_home()
        self.entries_dir = self.root / "entries"
        self.staging_dir = self.root / "staging"
        self.index_path = self.root / "index.sqlite"
        if not create and not self.index_path.is_file():
            raise ValueError(f"{self.root} is not an adamix-zoo store (it has no index.sqlite)")
        if create:
            self.entries_dir.mkdir(parents=True, exist_ok=True)
            self.staging_dir.mkdir(parents=True, exist_ok=True)
            try:
                with closing(self._connect()) as con:
                    con.executescript(SCHEMA)
            except sqlite3.DatabaseError as err:
                self.index_error: str | None = str(err)
                return
        self.index_error = None

    def _require_index(self) -> None:
        if self.index_error is not None:
            raise StoreCorruptError(
                f"the store index {self.index_path} is unreadable ({self.index_error}): run "
                "`adamix-zoo check --repair` to rebuild it from the entry folders"
            )

    # -- index -------------------------------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE below)
        con = sqlite3.connect(self.index_path, timeout=60, isolation_level=None)
        con.row_factory = sqlite3.Row
        return con

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; BEGIN IMMEDIATE takes SQLite's write lock up front (cross-process)."""
        self._require_index()
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
        try:
            manifest = manifest_hash(json.loads(row["metadata"]))
        except (ValueError, TypeError, AttributeError):
            manifest = "unreadable"
        return EntryInfo(row["namespace"], row["task"], row["version"], row["created"], row["kind"],
                         row["method"], row["base_model"], row["fingerprint"], path, manifest)

    def _rows(self, query: str, args: Any = ()) -> list[sqlite3.Row]:
        self._require_index()
        try:
            with closing(self._connect()) as con:
                return con.execute(query, args).fetchall()
        except sqlite3.DatabaseError as err:
            self.index_error = str(err)
            self._require_index()
            raise

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
        return [self._info(r) for r in self._rows(query + " ORDER BY seq", args)]

    def resolve(self, ref: str | EntryRef) -> EntryInfo:
        """``namespace/task@version`` (or ``@latest`` / no version) -> its index row.

        Raises:
            EntryNotFoundError: no such live entry.
        """
        ref = parse_ref(ref) if isinstance(ref, str) else ref
        if ref.is_latest:
            rows = self._rows("SELECT * FROM entries WHERE namespace=? AND task=? AND deleted IS NULL "
                              "ORDER BY seq DESC LIMIT 1", (ref.namespace, ref.task))
        else:
            rows = self._rows("SELECT * FROM entries WHERE namespace=? AND task=? AND version=? "
                              "AND deleted IS NULL", (ref.namespace, ref.task, ref.version))
        if not rows:
            raise EntryNotFoundError(f"no entry {ref} in the store at {self.root}")
        return self._info(rows[0])

    # -- reading -----------------------------------------------------------------------------------
    def get(self, ref: str | EntryRef, verify: bool = True) -> Path:
        """The entry's folder (read-only by convention); with ``verify``, every sha256 is checked.

        Raises:
            EntryNotFoundError, ValueError: unknown entry, or files that do not match adamix.json.
        """
        info = self.resolve(ref)
        if verify:
            self.verify(info)
        return info.path

    def verify(self, info: EntryInfo) -> dict[str, Any]:
        """The entry's adamix.json, after checking it against the index and every file's sha256.

        Raises:
            ValueError: a missing folder, an adamix.json that differs from the one committed (the
                message names the fields), or a file that does not match its sha256.
        """
        if not info.path.is_dir():
            raise ValueError(f"entry {info.ref}: its folder {info.path} is missing")
        meta = read_metadata(info.path)
        if manifest_hash(meta) != info.manifest:
            recorded = self._recorded_metadata(info)
            fields = metadata_differences(meta, recorded) if recorded else ["(index copy unreadable)"]
            raise ValueError(
                f"entry {info.ref}: adamix.json differs from what was published (fields "
                f"{', '.join(fields)}); refusing it: run `adamix-zoo check`"
            )
        verify_files(info.path, meta)
        return meta

    def _recorded_metadata(self, info: EntryInfo) -> dict[str, Any] | None:
        rows = self._rows("SELECT metadata FROM entries WHERE namespace=? AND task=? AND version=?",
                          (info.namespace, info.task, info.version))
        try:
            return json.loads(rows[0]["metadata"]) if rows else None
        except ValueError:
            return None

    def show(self, ref: str | EntryRef) -> dict[str, Any]:
        """The entry's adamix.json (checked against the index; file hashes are not re-read)."""
        info = self.resolve(ref)
        if not info.path.is_dir():
            raise ValueError(f"entry {info.ref}: its folder {info.path} is missing")
        meta = read_metadata(info.path)
        if manifest_hash(meta) != info.manifest:
            raise ValueError(f"entry {info.ref}: adamix.json differs from what was published")
        return meta

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

        info = self.resolve(ref)
        meta, folder = self.verify(info), info.path
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
        if version is not None:
            validate_version(version)
        with self.staging() as stage:
            stage_run(Path(run_dir), stage, run, task, experts)
            return self.commit(stage, run_metadata(run, task, Path(run_dir)), namespace, task, version)

    def commit(
        self, stage: Path, meta: dict[str, Any], namespace: str, task: str, version: str | None = None
    ) -> EntryInfo:
        """Make a validated staging folder a published entry (see the module docstring)."""
        EntryRef(namespace, task, version)
        if version is not None:
            validate_version(version)
        check_finite(stage)
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
                self._insert(con, meta)
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
        # nothing published names a folder of this machine (run dir, data dir, site-packages)
        meta["provenance"] = scrub_local_paths(meta.get("provenance", {}))
        meta["base_model"] = {k: v for k, v in scrub_local_paths(meta["base_model"]).items() if k != "path"}
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
        if self.index_error is not None:
            return [f"index {self.index_path}: unreadable ({self.index_error})"]
        return [f"{info.ref}: {problem}" for info, problem in self._damaged(verify_hashes)]

    def _damaged(self, verify_hashes: bool = True) -> list[tuple[EntryInfo, str]]:
        """(entry, what is wrong) for every live entry that fails verification."""
        damaged = []
        for info in self.list():
            try:
                meta = self.verify(info) if verify_hashes else read_metadata(info.path)
                if meta["name"] != {"namespace": info.namespace, "task": info.task, "version": info.version}:
                    damaged.append((info, f"adamix.json names {meta['name']}"))
            except ValueError as err:
                damaged.append((info, str(err)))
        return damaged

    def repair(self) -> list[str]:
        """Make the store consistent again; returns what was done, one line each.

        A corrupt index is moved aside and rebuilt from the entry folders whose files match their
        adamix.json (the record of deleted versions is lost with it). An entry whose folder is gone
        is forgotten (its version stays used); one whose files fail verification is moved to
        ``quarantine/`` and forgotten, never deleted.
        """
        if self.index_error is not None:
            return self._rebuild_index()
        done = []
        for info, problem in self._damaged():
            if info.path.exists():
                target = self.root / "quarantine" / f"{info.namespace}+{info.task}+{info.version}-{uuid.uuid4().hex[:8]}"
                target.parent.mkdir(parents=True, exist_ok=True)
                os.rename(info.path, target)
                done.append(f"{info.ref}: moved to {target} ({problem})")
            else:
                done.append(f"{info.ref}: forgotten ({problem})")
            with self._write() as con:
                con.execute("UPDATE entries SET deleted=? WHERE namespace=? AND task=? AND version=?",
                            (_now(), info.namespace, info.task, info.version))
        return done

    def _rebuild_index(self) -> list[str]:
        aside = self.index_path.with_name(f"index.sqlite.corrupt-{uuid.uuid4().hex[:8]}")
        os.replace(self.index_path, aside)
        for suffix in ("-journal", "-wal", "-shm"):
            Path(str(self.index_path) + suffix).unlink(missing_ok=True)
        with closing(self._connect()) as con:
            con.executescript(SCHEMA)
        self.index_error = None
        done = [f"index: moved the unreadable index to {aside} and rebuilt it from the entry folders"]
        folders = sorted(p for p in self.entries_dir.glob("*/*/*") if p.is_dir())
        with self._write() as con:
            for folder in sorted(folders, key=lambda p: p.stat().st_mtime):
                try:
                    meta = read_metadata(folder)
                    verify_files(folder, meta)
                    name = meta["name"]
                    if self.entry_path(name["namespace"], name["task"], name["version"]) != folder:
                        raise ValueError(f"adamix.json names {name}")
                except (ValueError, KeyError, TypeError) as err:
                    done.append(f"{folder}: not restored ({err}); `adamix-zoo gc` removes it")
                    continue
                self._insert(con, meta)
                done.append(f"{name['namespace']}/{name['task']}@{name['version']}: restored")
        return done

    @staticmethod
    def _insert(con: sqlite3.Connection, meta: dict[str, Any]) -> None:
        name = meta["name"]
        con.execute(
            "INSERT INTO entries (namespace, task, version, created, kind, method, base_model, "
            "fingerprint, metadata) VALUES (?,?,?,?,?,?,?,?,?)",
            (name["namespace"], name["task"], name["version"], meta.get("created") or _now(), meta["kind"],
             meta["method"], meta["base_model"].get("id"), meta["base_model"]["fingerprint"], json.dumps(meta)),
        )

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
        meta = read_metadata(folder)  # every name and path in it checked like user input
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
        mine = self.verify(info)
        ours = {k: v for k, v in mine["files"].items() if k != MODEL_CARD_FILE}
        theirs = {k: v for k, v in meta["files"].items() if k != MODEL_CARD_FILE}
        local = {"files", "created", "provenance", "name"}  # what a copy may change
        if ours != theirs or metadata_differences(
                {k: v for k, v in mine.items() if k not in local}, {k: v for k, v in meta.items() if k not in local}):
            raise EntryExistsError(f"entry {info.ref} already exists here with different content")
        return info


def check_finite(folder: Path) -> None:
    """Refuse to publish a tensor with NaN or infinite values (a broken merge or training run).

    Raises:
        ValueError: naming the file and the tensor.
    """
    import torch

    for path in sorted(Path(folder).rglob("*.safetensors")):
        for key, tensor in read_safetensors(path).items():
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                bad = int((~torch.isfinite(tensor)).sum())
                raise ValueError(
                    f"refusing to publish {path.name}: tensor {key!r} has {bad} non-finite value(s)"
                )

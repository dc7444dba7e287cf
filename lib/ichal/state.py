"""Durable state shared by the server and its training/scoring subprocesses.

`StateDB` keeps annotator events, measured labeling times, check-outs, training runs, calibration
records, the learning curves' points and the audit stacks in one SQLite file (WAL, one transaction per event); `JsonStore` keeps small JSON documents
(the PACS mirror's bookkeeping). A crash or a concurrent writer never leaves a half-written or lost record.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from filelock import FileLock

from ichal.io import atomic_write_bytes
from ichal.labeling_time import LabelEvent, measured_times

logger = logging.getLogger(__name__)

STATE_DB_NAME = "state.sqlite3"
SCHEMA_VERSION = 3
# The JSON files of earlier versions, imported once into a new state.sqlite3 and then renamed `<name>.migrated`.
LEGACY_JSON_FILES = ("label_events.json", "label_times.json", "checkouts.json", "train_status.json")
# Another process holding the write lock (a save, a training-progress update) is waited for, not failed on.
BUSY_TIMEOUT_SECONDS = 10.0

_SCHEMA = """
CREATE TABLE events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ts REAL NOT NULL,
    client TEXT NOT NULL,
    image TEXT NOT NULL,
    kind TEXT NOT NULL
);
CREATE INDEX events_by_client_image ON events (client, image);
CREATE TABLE serves (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ts REAL NOT NULL,
    client TEXT NOT NULL,
    image TEXT NOT NULL,
    snapshot TEXT NOT NULL
);
CREATE INDEX serves_by_client_image ON serves (client, image);
CREATE TABLE label_times (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    image TEXT NOT NULL,
    client TEXT NOT NULL,
    started REAL NOT NULL,
    saved REAL NOT NULL,
    seconds REAL NOT NULL,
    boundary_mm REAL NOT NULL,
    n_components INTEGER NOT NULL,
    extra TEXT NOT NULL DEFAULT '{}',
    UNIQUE (image, client, started)
);
CREATE TABLE checkouts (
    image TEXT PRIMARY KEY,
    client TEXT NOT NULL,
    ts REAL NOT NULL
);
CREATE TABLE train_runs (
    run_id TEXT PRIMARY KEY,
    state TEXT,
    pid INTEGER,
    started REAL,
    ended REAL,
    document TEXT NOT NULL DEFAULT '{}'
);
CREATE TABLE calibration (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ts REAL NOT NULL,
    document TEXT NOT NULL
);
"""

# Version 2 (issue 20): the prequential learning curve and the review times of accepted machine labels.
_SCHEMA_V2 = """
CREATE TABLE curve_points (
    model_version TEXT PRIMARY KEY,
    ts REAL NOT NULL,
    hours REAL NOT NULL,
    stacks INTEGER NOT NULL,
    document TEXT NOT NULL
);
CREATE TABLE review_times (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    image TEXT NOT NULL,
    client TEXT NOT NULL,
    started REAL NOT NULL,
    saved REAL NOT NULL,
    seconds REAL NOT NULL,
    UNIQUE (image, client, started)
);
"""
# Version 3 (issue 20): audit stacks, random stacks served in worklists and withheld from training until a
# committee trained after them has scored them, and the paired points they give.
_SCHEMA_V3 = """
CREATE TABLE audits (
    image TEXT PRIMARY KEY,
    served_ts REAL NOT NULL,
    served_by_version TEXT,
    client TEXT NOT NULL,
    worklist_id TEXT NOT NULL,
    status TEXT NOT NULL,
    released_by_version TEXT
);
CREATE TABLE audit_points (
    new_version TEXT PRIMARY KEY,
    ts REAL NOT NULL,
    old_version TEXT NOT NULL,
    old_hours REAL NOT NULL,
    new_hours REAL NOT NULL,
    stacks INTEGER NOT NULL,
    document TEXT NOT NULL
);
"""
_UPGRADES = {1: _SCHEMA_V2, 2: _SCHEMA_V3}  # from version k to k + 1

_LABEL_TIME_COLUMNS = ("image", "client", "started", "saved", "seconds", "boundary_mm", "n_components")
_TRAIN_RUN_COLUMNS = ("state", "pid", "started", "ended")
_AUDIT_COLUMNS = ("image", "served_ts", "served_by_version", "client", "worklist_id", "status", "released_by_version")
_AUDIT_POINT_COLUMNS = ("new_version", "ts", "old_version", "old_hours", "new_hours", "stacks")
# An audit stack is withheld from training until a committee trained after its label scored it, then released.
AUDIT_STATUSES = ("withheld", "released")


class StateError(ValueError):
    """A state file exists but cannot be read; it is left untouched for inspection."""


@dataclass(frozen=True)
class TrainRun:
    """One training run: its indexed fields and the rest of its status document."""

    run_id: str
    state: str | None
    pid: int | None
    started: float | None
    ended: float | None
    document: dict[str, Any]

    def status(self) -> dict[str, Any]:
        """The run as one flat dict (the document plus the fields that are set)."""
        fields = {"state": self.state, "pid": self.pid, "started": self.started, "ended": self.ended}
        return {**self.document, **{key: value for key, value in fields.items() if value is not None}}


@dataclass(frozen=True)
class CalibrationRecord:
    id: int
    ts: float
    document: dict[str, Any]


@dataclass(frozen=True)
class _LegacyRows:
    """The legacy JSON files as rows, read in full before the database is touched."""

    events: list[LabelEvent]
    label_times: list[dict[str, Any]]
    checkouts: list[tuple[str, str, float]]
    train_status: dict[str, Any]
    paths: list[Path]


def _beyond_columns(record: dict[str, Any], columns: tuple[str, ...], what: str) -> dict[str, Any]:
    """The keys of `record` that have no column of their own (kept as JSON); ValueError naming any missing column."""
    missing = [key for key in columns if key not in record]
    if missing:
        raise ValueError(f"{what} {record} lacks {missing}")
    return {key: value for key, value in record.items() if key not in columns}


class StateDB:
    """The app's durable state in one SQLite file, safe for several threads and processes at once.

    Each thread of each process has its own connection; every write is one `BEGIN IMMEDIATE`
    transaction, so a read-then-write (claiming a check-out, merging a train status) sees no
    concurrent writer between its read and its write.
    """

    def __init__(self, path: str | Path):
        """A handle on the database at `path` (each thread connects on first use); `StateDB.open(state_dir)`
        also creates the schema and imports legacy JSON files."""
        self.path = Path(path)
        self._local = threading.local()

    @classmethod
    def open(cls, state_dir: str | Path) -> "StateDB":
        """`state_dir/state.sqlite3`, created on first use with the legacy JSON files of `state_dir` imported.

        The import is one transaction; afterwards each imported file is renamed `<name>.migrated`.
        An unreadable legacy file raises `StateError` naming it, before the database is created.
        """
        state_dir = Path(state_dir)
        state_dir.mkdir(parents=True, exist_ok=True)
        db = cls(state_dir / STATE_DB_NAME)
        legacy_paths = [state_dir / name for name in LEGACY_JSON_FILES if (state_dir / name).exists()]
        if db.path.exists() and db.schema_version() > 0:
            db._upgrade()
            db._check_version()
            if legacy_paths:
                logger.warning(f"not imported, {db.path} already holds the state: {[str(p) for p in legacy_paths]}")
            return db
        legacy = _read_legacy(legacy_paths)
        if db._create(legacy):
            for path in legacy.paths:
                path.rename(path.with_name(path.name + ".migrated"))
            if legacy.paths:
                logger.info(f"imported {[p.name for p in legacy.paths]} into {db.path}")
        db._check_version()
        return db

    # -- connections and transactions ----------------------------------------------------------
    def _connection(self) -> sqlite3.Connection:
        connection = getattr(self._local, "connection", None)
        # A connection must not cross a fork: a forked child opens its own.
        if connection is None or self._local.pid != os.getpid():
            connection = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_SECONDS, isolation_level=None)
            connection.execute("PRAGMA journal_mode=WAL")
            # FULL, not NORMAL: in WAL mode NORMAL survives a killed process but may lose the last
            # commits on power loss; FULL syncs the WAL at every commit, so an acknowledged save stays
            # saved. Its cost (one fsync per event) is small next to an annotator's minutes per stack.
            connection.execute("PRAGMA synchronous=FULL")
            self._local.connection = connection
            self._local.pid = os.getpid()
        return connection

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, committed at the end or rolled back on error; nested calls join the outer one.

        `BEGIN IMMEDIATE` takes the write lock up front, so two processes that read and then write
        wait for each other instead of one failing with "database is locked".
        """
        connection = self._connection()
        if connection.in_transaction:
            yield connection
            return
        connection.execute("BEGIN IMMEDIATE")
        try:
            yield connection
            connection.execute("COMMIT")
        except BaseException:
            if connection.in_transaction:
                connection.execute("ROLLBACK")
            raise

    def schema_version(self) -> int:
        return int(self._connection().execute("PRAGMA user_version").fetchone()[0])

    def _check_version(self) -> None:
        version = self.schema_version()
        if version != SCHEMA_VERSION:
            raise StateError(f"{self.path} has schema version {version}, this ichal reads version {SCHEMA_VERSION}: "
                             "run the ichal version that wrote it, or move the file aside to start afresh")

    def _upgrade(self) -> None:
        """Bring an older schema to `SCHEMA_VERSION` by adding what later versions added, in one transaction;
        rows already stored are left as they are."""
        with self.transaction() as connection:
            version = int(connection.execute("PRAGMA user_version").fetchone()[0])
            while version in _UPGRADES:
                _execute_script(connection, _UPGRADES[version])
                version += 1
                connection.execute(f"PRAGMA user_version = {version}")

    def _create(self, legacy: _LegacyRows) -> bool:
        """Create the schema and import `legacy`, unless another process did so first; True if this call did."""
        with self.transaction() as connection:
            if int(connection.execute("PRAGMA user_version").fetchone()[0]) > 0:
                return False
            _execute_script(connection, _SCHEMA + _SCHEMA_V2 + _SCHEMA_V3)
            for event in legacy.events:
                self.record_event(event)
            for record in legacy.label_times:
                self.upsert_label_time(record)
            connection.executemany("INSERT OR REPLACE INTO checkouts (image, client, ts) VALUES (?, ?, ?)", legacy.checkouts)
            if legacy.train_status:
                self.save_train_run("migrated", legacy.train_status)
            connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            return True

    # -- annotator events ----------------------------------------------------------------------
    def record_event(self, event: LabelEvent) -> None:
        with self.transaction() as connection:
            connection.execute("INSERT INTO events (ts, client, image, kind) VALUES (?, ?, ?, ?)",
                               (event.ts, event.client, event.image, event.kind))

    def events(self, client: str | None = None, image: str | None = None) -> list[LabelEvent]:
        """Every event in the order it was recorded; with `client` and `image`, only that pair's (indexed:
        a save measures its session from these alone, however long the history grows)."""
        query, args = "SELECT ts, client, image, kind FROM events", ()
        if client is not None and image is not None:
            query, args = query + " WHERE client = ? AND image = ?", (client, image)
        elif client is not None or image is not None:
            raise ValueError("filter events by both client and image, or by neither")
        rows = self._connection().execute(query + " ORDER BY id", args).fetchall()
        return [LabelEvent(*row) for row in rows]

    # -- what the app knew when it served a stack ---------------------------------------------
    def record_serve(self, ts: float, client: str, image: str, snapshot: dict[str, Any]) -> None:
        """Keep `snapshot` (the committee version, predicted-mask features, predicted seconds, strategy)
        of serving `image` to `client` at `ts`: the time model's training data is what the app saw at
        pick time, joined to the seconds measured at save."""
        with self.transaction() as connection:
            connection.execute("INSERT INTO serves (ts, client, image, snapshot) VALUES (?, ?, ?, ?)",
                               (ts, client, image, json.dumps(snapshot, sort_keys=True)))

    def serve_snapshot(self, client: str, image: str, at_or_before: float) -> dict[str, Any] | None:
        """The snapshot of the last serve of `image` to `client` at or before `at_or_before`; None if never served."""
        row = self._connection().execute(
            "SELECT snapshot FROM serves WHERE client = ? AND image = ? AND ts <= ? ORDER BY ts DESC, id DESC LIMIT 1",
            (client, image, at_or_before)).fetchone()
        return json.loads(row[0]) if row else None

    def latest_serve(self, client: str) -> dict[str, Any] | None:
        """The snapshot of the last serve to `client`; None if nothing was ever served to it."""
        row = self._connection().execute(
            "SELECT snapshot FROM serves WHERE client = ? ORDER BY ts DESC, id DESC LIMIT 1", (client,)).fetchone()
        return json.loads(row[0]) if row else None

    def serves_recorded(self) -> int:
        """How many serves were ever recorded: a counter that only grows (it numbers the audit draws)."""
        return int(self._connection().execute("SELECT COALESCE(MAX(id), 0) FROM serves").fetchone()[0])

    def latest_serves(self) -> dict[str, dict[str, Any]]:
        """client -> the snapshot of the last serve to that client, for every client ever served."""
        rows = self._connection().execute(
            "SELECT client, snapshot FROM serves WHERE id IN (SELECT MAX(id) FROM serves GROUP BY client) ORDER BY client")
        return {client: json.loads(snapshot) for client, snapshot in rows.fetchall()}

    # -- measured labeling times ---------------------------------------------------------------
    def upsert_label_time(self, record: dict[str, Any]) -> None:
        """Store one measured time; a record with the same image, client and `started` is replaced, not duplicated.

        `record` needs the keys image, client, started, saved, seconds, boundary_mm, n_components;
        any other keys are kept in `extra`.
        """
        extra = _beyond_columns(record, _LABEL_TIME_COLUMNS, "label time record")
        with self.transaction() as connection:
            connection.execute(
                "INSERT INTO label_times (image, client, started, saved, seconds, boundary_mm, n_components, extra) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (image, client, started) DO UPDATE SET "
                "saved = excluded.saved, seconds = excluded.seconds, boundary_mm = excluded.boundary_mm, "
                "n_components = excluded.n_components, extra = excluded.extra",
                (*(record[key] for key in _LABEL_TIME_COLUMNS), json.dumps(extra, sort_keys=True)),
            )

    def label_times(self) -> list[dict[str, Any]]:
        """Every measured time as a dict (the columns plus `extra`'s keys), in the order first saved."""
        rows = self._connection().execute(
            f"SELECT {', '.join(_LABEL_TIME_COLUMNS)}, extra FROM label_times ORDER BY id").fetchall()
        return [{**json.loads(row[-1]), **dict(zip(_LABEL_TIME_COLUMNS, row[:-1]))} for row in rows]

    # -- check-outs ----------------------------------------------------------------------------
    def live_checkouts(self, now: float, expiry_seconds: float) -> dict[str, str]:
        """image -> client of every check-out younger than `expiry_seconds` at `now`."""
        rows = self._connection().execute("SELECT image, client FROM checkouts WHERE ? - ts < ?", (now, expiry_seconds))
        return dict(rows.fetchall())

    def claim_first_free(self, client: str, candidates: list[str], now: float, expiry_seconds: float) -> str | None:
        """In one transaction: drop expired check-outs and check out to `client` the first candidate
        nobody else holds (or `client` already holds); None if all are held by others. An annotator has one
        stack in hand: the stack served before, if still held, is released (asking for another worklist
        would otherwise keep it from everyone until the check-out expires)."""
        with self.transaction() as connection:
            connection.execute("DELETE FROM checkouts WHERE ? - ts >= ?", (now, expiry_seconds))
            for image in candidates:
                row = connection.execute("SELECT client FROM checkouts WHERE image = ?", (image,)).fetchone()
                if row is None or row[0] == client:
                    connection.execute("DELETE FROM checkouts WHERE client = ? AND image != ?", (client, image))
                    connection.execute("INSERT OR REPLACE INTO checkouts (image, client, ts) VALUES (?, ?, ?)",
                                       (image, client, now))
                    return image
        return None

    def release_checkout(self, image: str) -> None:
        with self.transaction() as connection:
            connection.execute("DELETE FROM checkouts WHERE image = ?", (image,))

    # -- training runs -------------------------------------------------------------------------
    def save_train_run(self, run_id: str, status: dict[str, Any]) -> None:
        """Create or replace run `run_id`: state, pid, started and ended go to columns, the rest to `document`."""
        document = {key: value for key, value in status.items() if key not in _TRAIN_RUN_COLUMNS}
        with self.transaction() as connection:
            connection.execute(
                "INSERT INTO train_runs (run_id, state, pid, started, ended, document) VALUES (?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (run_id) DO UPDATE SET state = excluded.state, pid = excluded.pid, "
                "started = excluded.started, ended = excluded.ended, document = excluded.document",
                (run_id, *(status.get(key) for key in _TRAIN_RUN_COLUMNS), json.dumps(document, sort_keys=True)),
            )

    def train_run(self, run_id: str) -> TrainRun | None:
        row = self._connection().execute(
            "SELECT run_id, state, pid, started, ended, document FROM train_runs WHERE run_id = ?", (run_id,)).fetchone()
        return None if row is None else TrainRun(*row[:-1], json.loads(row[-1]))

    def train_runs(self, limit: int = 20) -> list[TrainRun]:
        """The last `limit` runs, newest first."""
        rows = self._connection().execute(
            "SELECT run_id, state, pid, started, ended, document FROM train_runs ORDER BY rowid DESC LIMIT ?", (limit,))
        return [TrainRun(*row[:-1], json.loads(row[-1])) for row in rows.fetchall()]

    def latest_train_run(self) -> TrainRun | None:
        """The run created last (an update keeps a run's place: it never deletes the row)."""
        row = self._connection().execute(
            "SELECT run_id, state, pid, started, ended, document FROM train_runs ORDER BY rowid DESC LIMIT 1").fetchone()
        return None if row is None else TrainRun(*row[:-1], json.loads(row[-1]))

    # -- the prequential learning curve ----------------------------------------------------------
    def save_curve_point(self, model_version: str, hours: float, stacks: int, document: dict[str, Any],
                         ts: float | None = None) -> None:
        """Store committee `model_version`'s score on the batch it picked (`document`: metrics, image ids),
        trained on `hours` labeled hours; a second score of the same committee (a training retried) replaces it."""
        with self.transaction() as connection:
            connection.execute(
                "INSERT OR REPLACE INTO curve_points (model_version, ts, hours, stacks, document) VALUES (?, ?, ?, ?, ?)",
                (model_version, time.time() if ts is None else ts, hours, stacks, json.dumps(document, sort_keys=True)))

    def curve_points(self) -> list[dict[str, Any]]:
        """Every stored curve point as a dict (model_version, ts, hours, stacks and the document's keys), oldest first."""
        rows = self._connection().execute(
            "SELECT model_version, ts, hours, stacks, document FROM curve_points ORDER BY ts, rowid").fetchall()
        return [{**json.loads(row[4]), "model_version": row[0], "ts": row[1], "hours": row[2], "stacks": row[3]}
                for row in rows]

    # -- audit stacks and their points ------------------------------------------------------------
    def record_audit_serve(self, image: str, served_ts: float, served_by_version: str | None, client: str,
                           worklist_id: str) -> None:
        """`image` was served as an audit stack (drawn at random) by committee `served_by_version` (None before
        the first training): withheld from training once labeled. Serving it again as an audit renews the row."""
        with self.transaction() as connection:
            connection.execute(
                "INSERT OR REPLACE INTO audits (image, served_ts, served_by_version, client, worklist_id, status, "
                "released_by_version) VALUES (?, ?, ?, ?, ?, 'withheld', NULL)",
                (image, served_ts, served_by_version, client, worklist_id))

    def forget_withheld_audit(self, image: str) -> None:
        """`image`, served as an audit but never labeled, was served again as a strategy's pick: no longer a
        random stack, so no longer an audit."""
        with self.transaction() as connection:
            connection.execute("DELETE FROM audits WHERE image = ? AND status = 'withheld'", (image,))

    def audits(self, status: str | None = None) -> list[dict[str, Any]]:
        """Every audit stack as a dict of its columns, in the order served; with `status`, only those."""
        if status is not None and status not in AUDIT_STATUSES:
            raise ValueError(f"audit status must be one of {AUDIT_STATUSES}, got {status!r}")
        query = f"SELECT {', '.join(_AUDIT_COLUMNS)} FROM audits"
        rows = self._connection().execute(
            query + (" WHERE status = ?" if status else "") + " ORDER BY served_ts, rowid", (status,) if status else ()).fetchall()
        return [dict(zip(_AUDIT_COLUMNS, row)) for row in rows]

    def release_audits(self, images: list[str], released_by_version: str) -> None:
        """Committee `released_by_version` was trained without `images` and they were scored (or there was no
        committee to score): the next training trains on them."""
        with self.transaction() as connection:
            connection.executemany("UPDATE audits SET status = 'released', released_by_version = ? WHERE image = ?",
                                   [(released_by_version, image) for image in images])

    def save_audit_point(self, record: dict[str, Any], ts: float | None = None) -> None:
        """Store one training's paired test (keys new_version, old_version, old_hours, new_hours, stacks; any
        others, e.g. metrics and image ids, in `document`); a second one of the same new committee replaces it."""
        document = _beyond_columns(record, tuple(key for key in _AUDIT_POINT_COLUMNS if key != "ts"), "audit point")
        with self.transaction() as connection:
            connection.execute(
                "INSERT OR REPLACE INTO audit_points (new_version, ts, old_version, old_hours, new_hours, stacks, document) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (record["new_version"], time.time() if ts is None else ts, record["old_version"], record["old_hours"],
                 record["new_hours"], record["stacks"], json.dumps(document, sort_keys=True)))

    def audit_points(self) -> list[dict[str, Any]]:
        """Every stored audit point as a dict (its columns and the document's keys), in training order."""
        rows = self._connection().execute(
            f"SELECT {', '.join(_AUDIT_POINT_COLUMNS)}, document FROM audit_points ORDER BY ts, rowid").fetchall()
        return [{**json.loads(row[-1]), **dict(zip(_AUDIT_POINT_COLUMNS, row[:-1]))} for row in rows]

    # -- review times of accepted machine labels ---------------------------------------------
    def upsert_review_time(self, image: str, client: str, started: float, saved: float, seconds: float) -> None:
        """One review (a machine label accepted or corrected) measured; kept apart from the labeling times."""
        with self.transaction() as connection:
            connection.execute(
                "INSERT INTO review_times (image, client, started, saved, seconds) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (image, client, started) DO UPDATE SET saved = excluded.saved, seconds = excluded.seconds",
                (image, client, started, saved, seconds))

    def review_times(self) -> list[dict[str, Any]]:
        rows = self._connection().execute(
            "SELECT image, client, started, saved, seconds FROM review_times ORDER BY id").fetchall()
        return [dict(zip(("image", "client", "started", "saved", "seconds"), row)) for row in rows]

    # -- calibration ---------------------------------------------------------------------------
    def append_calibration(self, document: dict[str, Any], ts: float | None = None) -> int:
        """Store one calibration record; returns its id."""
        with self.transaction() as connection:
            cursor = connection.execute("INSERT INTO calibration (ts, document) VALUES (?, ?)",
                                        (time.time() if ts is None else ts, json.dumps(document, sort_keys=True)))
            return int(cursor.lastrowid)

    def calibrations(self) -> list[CalibrationRecord]:
        rows = self._connection().execute("SELECT id, ts, document FROM calibration ORDER BY id").fetchall()
        return [CalibrationRecord(row[0], row[1], json.loads(row[2])) for row in rows]


def _execute_script(connection: sqlite3.Connection, script: str) -> None:
    """Each statement of `script` inside the caller's transaction (`executescript` would commit it)."""
    for statement in script.split(";"):
        if statement.strip():
            connection.execute(statement)


def _read_legacy(paths: list[Path]) -> _LegacyRows:
    """Parse the legacy JSON files into rows; `StateError` names the first file that cannot be read."""
    by_name = {path.name: path for path in paths}
    documents: dict[str, Any] = {}
    for path in paths:
        try:
            documents[path.name] = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise StateError(f"state file {path} is unreadable ({error}); fix it or move it aside, then start again") from error

    def convert(name: str, default: Any, rows: Callable[[Any], Any]) -> Any:
        if name not in documents:
            return default
        try:
            return rows(documents[name])
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise StateError(f"state file {by_name[name]} has an unexpected layout ({error!r}); "
                             "fix it or move it aside, then start again") from error

    events = convert("label_events.json", [], lambda document: [
        LabelEvent(float(e["ts"]), str(e["client"]), str(e["image"]), str(e["kind"])) for e in document])
    # label_times.json had no `started`: recover it from the session that each save ended.
    starts = {(m.image, m.client, m.saved): m.started for m in measured_times(events, idle_limit_seconds=1.0)}
    label_times = convert("label_times.json", [], lambda document: [_legacy_label_time(r, starts) for r in document])
    checkouts = convert("checkouts.json", [], lambda document: [
        (str(image), str(c["client"]), float(c["ts"])) for image, c in document.items()])
    train_status = convert("train_status.json", {}, dict)
    return _LegacyRows(events, label_times, checkouts, train_status, paths)


def _legacy_label_time(record: dict[str, Any], starts: dict[tuple[str, str, float], float]) -> dict[str, Any]:
    """A label_times.json record with typed fields and a `started` (from `starts`, keyed by image, client, saved).

    Repeated saves of one session wrote identical records (same image, client, saved, seconds); they
    get the same `started` and so collapse into one row.
    """
    image, client, saved, seconds = str(record["image"]), str(record["client"]), float(record["saved"]), float(record["seconds"])
    # Without the session's events, saved - seconds is the latest the session can have started.
    started = starts.get((image, client, saved), saved - seconds)
    return {**record, "image": image, "client": client, "started": started, "saved": saved, "seconds": seconds,
            "boundary_mm": float(record["boundary_mm"]), "n_components": int(record["n_components"])}


class JsonStore:
    """One JSON document on disk, read and updated under a lock.

    `update(fn)` reads the current document, applies `fn` to it (in place or returning a new one)
    and writes it back atomically, all while holding the lock: read-modify-write with no lost updates.
    """

    def __init__(self, path: str | Path, default: Callable[[], Any]):
        self.path = Path(path)
        self._default = default
        self._thread_lock = threading.RLock()
        self._file_lock = FileLock(str(self.path) + ".lock")

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._thread_lock, self._file_lock:
            yield

    def _read_unlocked(self) -> Any:
        if not self.path.exists():
            return self._default()
        try:
            return json.loads(self.path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise StateError(f"state file {self.path} is unreadable ({error}); move it aside to start afresh") from error

    def read(self) -> Any:
        with self._locked():
            return self._read_unlocked()

    def update(self, fn: Callable[[Any], Any]) -> Any:
        with self._locked():
            document = self._read_unlocked()
            result = fn(document)
            document = document if result is None else result
            atomic_write_bytes(self.path, json.dumps(document, indent=1, sort_keys=True).encode())
            return document

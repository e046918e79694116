"""The state of files and fine-tuning jobs: one SQLite file (WAL, so the server reads while a worker writes)
under the server's data folder, next to the uploaded files and the jobs' run folders.

    DATA_DIR/jobs.db   DATA_DIR/files/file-....jsonl   DATA_DIR/runs/ftjob-.../ (an `ownllm finetune` run folder)
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    id TEXT PRIMARY KEY, filename TEXT NOT NULL, purpose TEXT NOT NULL, bytes INTEGER NOT NULL,
    created_at INTEGER NOT NULL, seq INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, seq INTEGER NOT NULL, created_at INTEGER NOT NULL, model TEXT NOT NULL,
    training_file TEXT NOT NULL, validation_file TEXT, hyperparameters TEXT NOT NULL, method TEXT NOT NULL,
    suffix TEXT, seed INTEGER NOT NULL, status TEXT NOT NULL, started_at INTEGER, finished_at INTEGER,
    fine_tuned_model TEXT, trained_tokens INTEGER, error TEXT, result_files TEXT NOT NULL DEFAULT '[]',
    worker_pid INTEGER, attempts INTEGER NOT NULL DEFAULT 0, cancel_requested INTEGER NOT NULL DEFAULT 0,
    model_deleted INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL, job_id TEXT NOT NULL, created_at INTEGER NOT NULL,
    level TEXT NOT NULL, message TEXT NOT NULL, data TEXT, type TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS events_by_job ON events (job_id, seq);
CREATE TABLE IF NOT EXISTS checkpoints (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL, job_id TEXT NOT NULL, created_at INTEGER NOT NULL,
    step INTEGER NOT NULL, metrics TEXT NOT NULL, path TEXT NOT NULL, UNIQUE (job_id, step));
"""

ACTIVE = ("validating_files", "queued", "running")
FINAL = ("succeeded", "failed", "cancelled")


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def fine_tuned_name(job: dict[str, Any]) -> str:
    """The model id a job's result is served under: ft:BASE:SUFFIX:ID."""
    return f"ft:{job['model']}:{job['suffix'] or 'ownllm'}:{job['id'].removeprefix('ftjob-')[:8]}"


@dataclass(frozen=True)
class Page:
    rows: list[dict[str, Any]]
    has_more: bool


class JobStore:
    """Thread-safe access to jobs.db; each process opens its own (server, workers)."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir)
        self.files_dir = self.data_dir / "files"
        self.runs_dir = self.data_dir / "runs"
        for folder in (self.files_dir, self.runs_dir):
            folder.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.data_dir / "jobs.db", isolation_level=None, check_same_thread=False,
                                   timeout=30)
        self._db.row_factory = sqlite3.Row
        self._lock = threading.RLock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(SCHEMA)

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _all(self, sql: str, *args: Any) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(row) for row in self._db.execute(sql, args).fetchall()]

    def _one(self, sql: str, *args: Any) -> dict[str, Any] | None:
        rows = self._all(sql, *args)
        return rows[0] if rows else None

    def _next_seq(self, db: sqlite3.Connection, table: str) -> int:
        return int(db.execute(f"SELECT COALESCE(MAX(seq), 0) + 1 FROM {table}").fetchone()[0])

    # --- files ---------------------------------------------------------------------------------
    def file_path(self, file_id: str) -> Path:
        return self.files_dir / file_id

    def add_file(self, filename: str, purpose: str, staged: Path) -> dict[str, Any]:
        """Register an upload already written to `staged` (a temp file in files/), renaming it into place."""
        file_id = new_id("file")
        size = staged.stat().st_size
        staged.replace(self.file_path(file_id))
        with self.transaction() as db:
            db.execute("INSERT INTO files VALUES (?, ?, ?, ?, ?, ?)",
                       (file_id, filename, purpose, size, int(time.time()), self._next_seq(db, "files")))
        return self.get_file(file_id) or {}

    def get_file(self, file_id: str) -> dict[str, Any] | None:
        return self._one("SELECT * FROM files WHERE id = ?", file_id)

    def list_files(self, *, purpose: str | None = None, after: str | None = None, limit: int = 10000,
                   newest_first: bool = True) -> Page:
        return self._page("files", after, limit, newest_first, "purpose = ?" if purpose else None,
                          (purpose,) if purpose else ())

    def delete_file(self, file_id: str) -> bool:
        with self.transaction() as db:
            deleted = db.execute("DELETE FROM files WHERE id = ?", (file_id,)).rowcount > 0
        self.file_path(file_id).unlink(missing_ok=True)
        return deleted

    def _page(self, table: str, after: str | None, limit: int, newest_first: bool, where: str | None = None,
              args: tuple[Any, ...] = ()) -> Page:
        """Cursor pagination by the `after` id, in creation order (newest first by default, like OpenAI)."""
        clauses, values = ([where], list(args)) if where else ([], [])
        if after is not None:
            anchor = self._one(f"SELECT seq FROM {table} WHERE id = ?", after)
            if anchor is not None:
                clauses.append("seq < ?" if newest_first else "seq > ?")
                values.append(anchor["seq"])
        sql = f"SELECT * FROM {table}" + (" WHERE " + " AND ".join(clauses) if clauses else "")
        sql += f" ORDER BY seq {'DESC' if newest_first else 'ASC'} LIMIT ?"
        rows = self._all(sql, *values, limit + 1)
        return Page(rows[:limit], len(rows) > limit)

    # --- jobs ----------------------------------------------------------------------------------
    def add_job(self, *, model: str, training_file: str, validation_file: str | None,
                hyperparameters: dict[str, Any], method: dict[str, Any], suffix: str | None, seed: int
                ) -> dict[str, Any]:
        job_id = new_id("ftjob")
        with self.transaction() as db:
            db.execute("INSERT INTO jobs (id, seq, created_at, model, training_file, validation_file, "
                       "hyperparameters, method, suffix, seed, status) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       (job_id, self._next_seq(db, "jobs"), int(time.time()), model, training_file, validation_file,
                        json.dumps(hyperparameters), json.dumps(method), suffix, seed, "validating_files"))
        self.add_event(job_id, f"Validating training file: {training_file}")
        return self.get_job(job_id) or {}

    def get_job(self, job_id: str) -> dict[str, Any] | None:
        return self._one("SELECT * FROM jobs WHERE id = ?", job_id)

    def list_jobs(self, *, after: str | None = None, limit: int = 20) -> Page:
        return self._page("jobs", after, limit, True)

    def jobs_with_status(self, *statuses: str) -> list[dict[str, Any]]:
        marks = ", ".join("?" for _ in statuses)
        return self._all(f"SELECT * FROM jobs WHERE status IN ({marks}) ORDER BY seq", *statuses)

    def update_job(self, job_id: str, **values: Any) -> None:
        with self.transaction() as db:
            _update_job(db, job_id, values)

    def set_status(self, job_id: str, status: str, message: str | None = None, **values: Any) -> None:
        """Move a job on (never out of a final status) and say so in its events. One transaction, so a cancel
        and a worker's own last word cannot both land: whichever comes first is final."""
        with self.transaction() as db:
            row = db.execute("SELECT status, started_at FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None or row[0] in FINAL:
                return
            if status in FINAL:
                values["finished_at"] = int(time.time())
            if status == "running" and not row[1]:
                values["started_at"] = int(time.time())
            _update_job(db, job_id, {**values, "status": status})
            if message:
                _insert_event(db, job_id, message, "error" if status == "failed" else "info", None, "message")

    # --- events and checkpoints ----------------------------------------------------------------
    def add_event(self, job_id: str, message: str, *, level: str = "info", data: dict[str, Any] | None = None,
                  kind: str = "message") -> None:
        with self.transaction() as db:
            _insert_event(db, job_id, message, level, data, kind)

    def list_events(self, job_id: str, *, after: str | None = None, limit: int = 20) -> Page:
        return self._page("events", after, limit, True, "job_id = ?", (job_id,))

    def add_checkpoint(self, job_id: str, step: int, metrics: dict[str, Any], path: str) -> None:
        with self.transaction() as db:
            db.execute("INSERT OR IGNORE INTO checkpoints (id, job_id, created_at, step, metrics, path) "
                       "VALUES (?, ?, ?, ?, ?, ?)", (new_id("ftckpt"), job_id, int(time.time()), step,
                                                     json.dumps(metrics), path))

    def list_checkpoints(self, job_id: str, *, after: str | None = None, limit: int = 10) -> Page:
        return self._page("checkpoints", after, limit, True, "job_id = ?", (job_id,))

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _update_job(db: sqlite3.Connection, job_id: str, values: dict[str, Any]) -> None:
    """Inside a transaction: set a job's columns (`error` and `result_files` stored as JSON)."""
    values = {name: json.dumps(value) if name in ("error", "result_files") and not isinstance(value, str | None)
              else value for name, value in values.items()}
    columns = ", ".join(f"{name} = ?" for name in values)
    db.execute(f"UPDATE jobs SET {columns} WHERE id = ?", (*values.values(), job_id))


def _insert_event(db: sqlite3.Connection, job_id: str, message: str, level: str, data: dict[str, Any] | None,
                  kind: str) -> None:
    db.execute("INSERT INTO events (id, job_id, created_at, level, message, data, type) VALUES (?, ?, ?, ?, ?, ?, ?)",
               (new_id("ftevent"), job_id, int(time.time()), level, message,
                json.dumps(data) if data is not None else None, kind))

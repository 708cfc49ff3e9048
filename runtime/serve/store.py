"""The service's durable job table: SQLite (the standard library's sqlite3) in WAL mode, one row per job.

One process owns a database: the store takes SQLite's exclusive lock when it opens (locking_mode EXCLUSIVE) and
holds it until it closes, so a second service on the same file stops at start ("locked") instead of running the
same jobs twice. Every commit is synchronous (fsync of the WAL), so a row written before a reply survives a crash of
the process or of the machine. ":memory:" is a database that lives and dies with the process.

A schema version table says which schema a file has: an older one is brought up to date by MIGRATIONS, in order, in
one transaction; a newer one (written by a later vidrd) is refused, never rewritten.
"""
from __future__ import annotations

import json
import sqlite3

SCHEMA = 1
# MIGRATIONS[v] brings a database from schema version v to v + 1 (version 0: an empty file)
MIGRATIONS = (
    """CREATE TABLE jobs (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,  -- submission order: the order open jobs run in after a restart
        id TEXT UNIQUE NOT NULL,
        spec TEXT NOT NULL,  -- the validated request, JSON (api.to_spec)
        state TEXT NOT NULL,
        created REAL NOT NULL, started REAL, finished REAL, first_clip REAL,  -- unix times
        clips_done INTEGER NOT NULL, steps_done INTEGER NOT NULL,
        cancel INTEGER NOT NULL, error TEXT, worker TEXT, attempts INTEGER NOT NULL,
        files TEXT NOT NULL  -- JSON list of the published files, relative to the job's folder
    )""",
)
COLUMNS = ("id", "spec", "state", "created", "started", "finished", "first_clip", "clips_done", "steps_done",
           "cancel", "error", "worker", "attempts", "files")
JSON_COLUMNS = ("spec", "files")


class StoreError(ValueError):
    """The jobs database cannot be used: corrupt, locked by another process, or of a newer schema."""


class Store:
    """The job table of one SQLite file; not thread-safe (the Registry calls it under its lock)."""

    def __init__(self, path: str):
        self.path = path
        try:
            self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=1.0)
        except sqlite3.Error as e:
            raise StoreError(f"jobs database {path}: cannot open it: {e}") from None
        try:
            self.db.execute("PRAGMA locking_mode=EXCLUSIVE")
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self._migrate()
            self.db.execute("PRAGMA quick_check").fetchone()
        except StoreError:
            self.db.close()
            raise
        except sqlite3.Error as e:
            self.db.close()
            why = "another process holds it (one service per database)" if "locked" in str(e) else str(e)
            raise StoreError(f"jobs database {path} is unusable: {why}; pass --jobs-db for another file") from None

    def _migrate(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")  # takes the lock now: a locked database fails here, at start
        try:
            self.db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = self.db.execute("SELECT version FROM schema_version").fetchone()
            version = 0 if row is None else row[0]
            if version > SCHEMA:
                raise StoreError(f"jobs database {self.path} has schema version {version}, newer than this vidrd's "
                                 f"{SCHEMA}: run a newer vidrd on it, or pass --jobs-db for another file")
            for v in range(version, SCHEMA):
                self.db.execute(MIGRATIONS[v])
            if row is None:
                self.db.execute("INSERT INTO schema_version VALUES (?)", (SCHEMA,))
            elif version < SCHEMA:
                self.db.execute("UPDATE schema_version SET version = ?", (SCHEMA,))
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise

    def load(self) -> list[dict]:
        """Every job, in submission order."""
        rows = self.db.execute(f"SELECT {', '.join(COLUMNS)} FROM jobs ORDER BY seq").fetchall()
        out = []
        for row in rows:
            job = dict(zip(COLUMNS, row))
            for name in JSON_COLUMNS:
                job[name] = json.loads(job[name])
            job["cancel"] = bool(job["cancel"])
            out.append(job)
        return out

    def insert(self, job: dict) -> None:
        self.db.execute(f"INSERT INTO jobs ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})",
                        self._values(job))

    def update(self, job: dict) -> None:
        values = self._values(job)
        self.db.execute(f"UPDATE jobs SET {', '.join(f'{c} = ?' for c in COLUMNS[1:])} WHERE id = ?",
                        values[1:] + values[:1])

    def delete(self, ids: list[str]) -> None:
        if ids:
            self.db.execute("BEGIN")  # one transaction, one fsync
            try:
                self.db.executemany("DELETE FROM jobs WHERE id = ?", [(i,) for i in ids])
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")

    def close(self) -> None:
        self.db.close()

    @staticmethod
    def _values(job: dict) -> tuple:
        return tuple(json.dumps(job[c]) if c in JSON_COLUMNS else job[c] for c in COLUMNS)

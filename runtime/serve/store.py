"""The service's durable job table, one row per job: SQLite (the standard library's sqlite3, WAL mode) embedded in
the results folder by default, or PostgreSQL (psycopg 3) for replicas on several hosts (`--jobs-db postgresql://...`).
Both have the same schema, migrations and methods; `open_store` picks one from the path.

SQLite: one process owns a database: the store takes SQLite's exclusive lock when it opens (locking_mode EXCLUSIVE)
and holds it until it closes, so a second service on the same file stops at start ("locked") instead of running the
same jobs twice. Every commit is synchronous (fsync of the WAL), so a row written before a reply survives a crash of
the process or of the machine. ":memory:" is a database that lives and dies with the process.

PostgreSQL: one connection, in autocommit mode (each write is its own durable transaction), guarded by a lock. A
service's Registry opens it `exclusive` (a session advisory lock: one Registry per database, as with SQLite); workers
that share the table through leases open it without.

A schema version table says which schema a database has: an older one is brought up to date by MIGRATIONS, in order,
in one transaction; a newer one (written by a later vidrd) is refused, never rewritten.

Leases let several workers share one table: `claim` takes the oldest job that is queued, or running under a lease that
expired (its worker died), in one statement, and gives it a lease until now + lease_s; the worker `renew`s it while it
runs. A job taken over resumes from its last clip (worker.py: the resume files live in the shared results folder).
"""
from __future__ import annotations

import json
import re
import sqlite3
import threading
import time

SCHEMA = 2
# MIGRATIONS[v] brings a database from schema version v to v + 1 (version 0: an empty one); {serial} and {float} are
# the dialect's auto-increment key and 8-byte float (SQLite's REAL; PostgreSQL's REAL has 4 bytes)
MIGRATIONS = (
    """CREATE TABLE jobs (
        seq {serial},  -- submission order: the order open jobs run in after a restart
        id TEXT UNIQUE NOT NULL,
        spec TEXT NOT NULL,  -- the validated request, JSON (api.to_spec)
        state TEXT NOT NULL,
        created {float} NOT NULL, started {float}, finished {float}, first_clip {float},  -- unix times
        clips_done INTEGER NOT NULL, steps_done INTEGER NOT NULL,
        cancel INTEGER NOT NULL, error TEXT, worker TEXT, attempts INTEGER NOT NULL,
        files TEXT NOT NULL  -- JSON list of the published files, relative to the job's folder
    )""",
    "ALTER TABLE jobs ADD lease_expires {float}",  # unix time a running job's worker must renew its lease by
)
COLUMNS = ("id", "spec", "state", "created", "started", "finished", "first_clip", "clips_done", "steps_done",
           "cancel", "error", "worker", "attempts", "files")
JSON_COLUMNS = ("spec", "files")
# a job a worker may claim: queued, or running under a lease that expired (NULL: taken by a vidrd before leases)
CLAIMABLE = "state = 'queued' OR (state = 'running' AND lease_expires < ?)"


class StoreError(ValueError):
    """The jobs database cannot be used: corrupt, locked by another process, unreachable, or of a newer schema."""


def shared(path: str | None) -> bool:
    """Whether `path` names a database that workers on several hosts can share: a postgresql:// (postgres://) URL."""
    return path is not None and path.startswith(("postgresql://", "postgres://"))


def open_store(path: str, exclusive: bool = True) -> "Store":
    """The store of `path`: PostgreSQL for a postgresql:// (or postgres://) URL, else an SQLite file."""
    if shared(path):
        return PgStore(path, exclusive)
    return Store(path)


class Store:
    """The job table of one SQLite file; its methods are serialized by a lock (worker threads may share it)."""

    errors: tuple = (sqlite3.Error,)  # what a failing read or write raises (a full disk, a lost server)
    serial, float_type = "INTEGER PRIMARY KEY AUTOINCREMENT", "REAL"
    skip_locked = ""  # one writer at a time: the claim's subquery needs no row lock

    def __init__(self, path: str):
        self.path, self.lock = path, threading.Lock()
        try:
            self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=1.0)
        except sqlite3.Error as e:
            raise StoreError(f"jobs database {path}: cannot open it: {e}") from None
        try:
            self.db.execute("PRAGMA locking_mode=EXCLUSIVE")
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.execute("BEGIN IMMEDIATE")  # takes the lock now: a locked database fails here, at start
            self._migrate()
            self.db.execute("PRAGMA quick_check").fetchone()
        except StoreError:
            self.db.close()
            raise
        except sqlite3.Error as e:
            self.db.close()
            why = "another process holds it (one service per database)" if "locked" in str(e) else str(e)
            raise StoreError(f"jobs database {path} is unusable: {why}; pass --jobs-db for another file") from None

    def _sql(self, sql: str) -> str:
        return sql

    def _run(self, sql: str, params=()):
        """The cursor of one statement (its own transaction unless one is open)."""
        return self.db.execute(self._sql(sql), params)

    def _migrate(self) -> None:
        """Inside the open transaction: create or upgrade the schema, then commit (roll back on any error)."""
        try:
            self._run("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = self._run("SELECT version FROM schema_version").fetchone()
            version = 0 if row is None else row[0]
            if version > SCHEMA:
                raise StoreError(f"jobs database {self.path} has schema version {version}, newer than this vidrd's "
                                 f"{SCHEMA}: run a newer vidrd on it, or pass --jobs-db for another database")
            for v in range(version, SCHEMA):
                self._run(MIGRATIONS[v].format(serial=self.serial, float=self.float_type))
            if row is None:
                self._run("INSERT INTO schema_version VALUES (?)", (SCHEMA,))
            elif version < SCHEMA:
                self._run("UPDATE schema_version SET version = ?", (SCHEMA,))
            self._run("COMMIT")
        except BaseException:
            self._run("ROLLBACK")
            raise

    def load(self) -> list[dict]:
        """Every job, in submission order."""
        with self.lock:
            rows = self._run(f"SELECT {', '.join(COLUMNS)} FROM jobs ORDER BY seq").fetchall()
        return [self._job(row) for row in rows]

    def insert(self, job: dict) -> None:
        with self.lock:
            self._run(f"INSERT INTO jobs ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})",
                      self._values(job))

    def update(self, job: dict, holder: str | None = None) -> bool:
        """Write a job's record. With `holder`, a leased worker's write: only while that worker holds the running
        job (False, nothing written, once its lease was lost or the job ended), and never the cancel flag, which
        belongs to the clients."""
        values = dict(zip(COLUMNS, self._values(job)))
        names = [c for c in COLUMNS[1:] if holder is None or c != "cancel"]
        where, params = "id = ?", [values["id"]]
        if holder is not None:
            where, params = where + " AND worker = ? AND state = 'running'", params + [holder]
        with self.lock:
            cur = self._run(f"UPDATE jobs SET {', '.join(f'{c} = ?' for c in names)} WHERE {where}",
                            [values[c] for c in names] + params)
        return cur.rowcount == 1

    def get(self, job_id: str) -> dict | None:
        with self.lock:
            row = self._run(f"SELECT {', '.join(COLUMNS)} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return None if row is None else self._job(row)

    def counts(self) -> dict[str, int]:
        """Jobs per state."""
        with self.lock:
            return dict(self._run("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall())

    def cancel(self, job_id: str, now: float | None = None) -> dict | None:
        """In one statement: a queued job ends cancelled, a running one gets its cancel flag (its worker reads it at
        the next renew); its record, or None when there is no such job."""
        now = time.time() if now is None else now
        with self.lock:
            row = self._run(
                "UPDATE jobs SET cancel = CASE WHEN state = 'running' THEN 1 ELSE cancel END, "
                "finished = CASE WHEN state = 'queued' THEN ? ELSE finished END, "
                "state = CASE WHEN state = 'queued' THEN 'cancelled' ELSE state END "
                f"WHERE id = ? RETURNING {', '.join(COLUMNS)}", (now, job_id)).fetchall()
        return self._job(row[0]) if row else None

    def delete(self, ids: list[str]) -> None:
        if not ids:
            return
        with self.lock:
            self._run("BEGIN")  # one transaction, one fsync
            try:
                for i in ids:
                    self._run("DELETE FROM jobs WHERE id = ?", (i,))
            except BaseException:
                self._run("ROLLBACK")
                raise
            self._run("COMMIT")

    def claim(self, worker: str, lease_s: float, now: float | None = None) -> dict | None:
        """Atomically take the oldest claimable job for `worker` (running, attempts + 1, a lease until now +
        lease_s): its record, or None when there is none."""
        now = time.time() if now is None else now
        with self.lock:
            row = self._run(
                "UPDATE jobs SET state = 'running', worker = ?, attempts = attempts + 1, "
                "started = COALESCE(started, ?), lease_expires = ? "
                f"WHERE seq = (SELECT seq FROM jobs WHERE {CLAIMABLE} ORDER BY seq LIMIT 1{self.skip_locked}) "
                f"RETURNING {', '.join(COLUMNS)}", (worker, now, now + lease_s, now)).fetchall()
        return self._job(row[0]) if row else None

    def renew(self, job_id: str, worker: str, lease_s: float, now: float | None = None,
              steps_done: int | None = None) -> bool | None:
        """Extend `worker`'s lease on a running job to now + lease_s (and record its progress, `steps_done`): its
        cancel flag, or None when the lease is lost (the job ended, or another worker took it over after the lease
        expired): the worker must stop."""
        now = time.time() if now is None else now
        with self.lock:
            row = self._run("UPDATE jobs SET lease_expires = ?, steps_done = COALESCE(?, steps_done) "
                            "WHERE id = ? AND worker = ? AND state = 'running' RETURNING cancel",
                            (now + lease_s, steps_done, job_id, worker)).fetchall()
        return bool(row[0][0]) if row else None

    def close(self) -> None:
        with self.lock:
            self.db.close()

    @staticmethod
    def _values(job: dict) -> tuple:
        return tuple(json.dumps(job[c]) if c in JSON_COLUMNS else int(job[c]) if c == "cancel" else job[c]
                     for c in COLUMNS)

    @staticmethod
    def _job(row) -> dict:
        job = dict(zip(COLUMNS, row))
        for name in JSON_COLUMNS:
            job[name] = json.loads(job[name])
        job["cancel"] = bool(job["cancel"])
        return job


class PgStore(Store):
    """The job table in a PostgreSQL database (psycopg 3): one autocommit connection, serialized by a lock."""

    serial, float_type = "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY", "DOUBLE PRECISION"
    skip_locked = " FOR UPDATE SKIP LOCKED"  # racing workers each take another row, none waits for another's
    LOCK_KEY = 0x76696472  # "vidr": the advisory lock of migrations and of an exclusive (Registry) store

    def __init__(self, url: str, exclusive: bool = True):
        import psycopg  # the serve extra's; imported here so SQLite users never load it
        self.errors = (psycopg.Error,)
        self.path, self.lock = re.sub(r"://([^:/@]*):[^@]*@", r"://\1:***@", url), threading.Lock()
        try:
            self.db = psycopg.connect(url, autocommit=True, connect_timeout=10)
        except psycopg.Error as e:
            why = " ".join(line.strip() for line in str(e).splitlines()) or type(e).__name__  # one line
            raise StoreError(f"jobs database {self.path}: cannot connect: {why}") from None
        try:
            if exclusive and not self._run("SELECT pg_try_advisory_lock(?)", (self.LOCK_KEY,)).fetchone()[0]:
                raise StoreError(f"jobs database {self.path} is unusable: another service holds it (one service per "
                                 "database; workers share it through leases); pass --jobs-db for another database")
            self._run("BEGIN")
            self._run("SELECT pg_advisory_xact_lock(?)", (self.LOCK_KEY + 1,))  # one migration at a time
            self._migrate()
        except StoreError:
            self.db.close()
            raise
        except psycopg.Error as e:
            self.db.close()
            raise StoreError(f"jobs database {self.path} is unusable: {str(e).strip().splitlines()[0]}; pass "
                             "--jobs-db for another database") from None

    def _sql(self, sql: str) -> str:
        return sql.replace("?", "%s")

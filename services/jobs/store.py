"""The job store: one SQLite table of job records (WAL mode) and one directory of files per job.

    DATA_DIR/jobs.db                 the records (jobs.db-wal and jobs.db-shm beside it)
    DATA_DIR/jobs/JOB_ID/request.pb  the SynthesizeRequest, voices included, to run or resume the job from
    DATA_DIR/jobs/JOB_ID/frames      the audio, frame by frame (services/jobs/frame_log.py)
    DATA_DIR/jobs/JOB_ID/state       each frame's state, what a resume rebuilds from (services/jobs/state_log.py)

A record's `frames_done` is its durable checkpoint: it is written only after the frames file has been
fsynced that far, so after any crash the file holds at least the frames the record counts. States move only
along TRANSITIONS; anything else is a bug and raises.

The files count against an optional quota (`max_bytes`), kept in memory: what the job directories hold at
start-up plus what has been written since. A write past it, or a disk that is really full (ENOSPC, EDQUOT),
raises StoreFull for the job that wrote, and leaves every other job's files as they were.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import sqlite3
import time
from dataclasses import dataclass, fields
from pathlib import Path

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "queued", "running", "succeeded", "failed", "cancelled"
TRANSITIONS: dict[str, set[str]] = {
    QUEUED: {RUNNING, CANCELLED, FAILED},
    # Back to QUEUED: interrupted (the jobs service restarted, a worker went away) or paused for live calls,
    # and to be resumed.
    RUNNING: {SUCCEEDED, FAILED, CANCELLED, QUEUED},
    SUCCEEDED: set(),
    FAILED: set(),
    CANCELLED: set(),
}
ACTIVE = (QUEUED, RUNNING)
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL UNIQUE,
    owner TEXT NOT NULL,
    state TEXT NOT NULL,
    request_hash TEXT NOT NULL,
    request_id TEXT NOT NULL,
    format INTEGER NOT NULL,
    seed TEXT NOT NULL,
    estimated_frames INTEGER NOT NULL,
    frames_done INTEGER NOT NULL DEFAULT 0,
    header BLOB NOT NULL,
    error BLOB,
    checks BLOB,
    finish_reason TEXT NOT NULL DEFAULT '',
    resumes INTEGER NOT NULL DEFAULT 0,
    pauses INTEGER NOT NULL DEFAULT 0,
    create_time REAL NOT NULL,
    start_time REAL,
    end_time REAL
);
CREATE INDEX IF NOT EXISTS jobs_by_owner ON jobs (owner, seq);
"""
# Columns added since the first schema, for stores made before them.
_ADDED_COLUMNS = {
    "pauses": "INTEGER NOT NULL DEFAULT 0",
    "rebuilds": "INTEGER NOT NULL DEFAULT 0",
    "frames_regenerated": "INTEGER NOT NULL DEFAULT 0",
}


class TransitionError(RuntimeError):
    """A state change the state machine does not allow."""


class StoreFull(Exception):
    """A job's files would not fit: the quota, or the disk itself."""


@dataclass(frozen=True)
class JobRecord:
    seq: int
    job_id: str
    owner: str
    state: str
    request_hash: str
    request_id: str
    format: int
    seed: int  # uint64: kept as text, as SQLite's integers are signed 64-bit
    estimated_frames: int
    frames_done: int
    header: bytes  # a serialized StreamHeader
    error: bytes | None  # a serialized google.rpc.Status
    checks: bytes | None  # a serialized AudioChecks
    finish_reason: str
    resumes: int
    pauses: int
    rebuilds: int  # resumes that rebuilt the stream's state from the stored frames
    frames_regenerated: int  # frames made again by resumes that could not
    create_time: float
    start_time: float | None
    end_time: float | None

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> JobRecord:
        values = {f.name: row[f.name] for f in fields(cls)}
        values["seed"] = int(values["seed"])
        return cls(**values)


def request_hash(serialized_request: bytes) -> str:
    return hashlib.sha256(serialized_request).hexdigest()


def is_disk_full(e: OSError) -> bool:
    return e.errno in DISK_FULL


class Store:
    def __init__(self, data_dir: Path, max_bytes: int = 0) -> None:
        self.data_dir = Path(data_dir)
        self.jobs_dir = self.data_dir / "jobs"
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes  # 0: no quota but the disk's
        self.db = sqlite3.connect(self.data_dir / "jobs.db", isolation_level=None, check_same_thread=False)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        # FULL: a commit is on disk when it returns, so a checkpoint survives a power cut, not only a kill.
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(_SCHEMA)
        present = {row["name"] for row in self.db.execute("PRAGMA table_info(jobs)")}
        for name, definition in _ADDED_COLUMNS.items():
            if name not in present:
                self.db.execute(f"ALTER TABLE jobs ADD COLUMN {name} {definition}")  # our own names
        self.used_bytes = sum(p.stat().st_size for p in self.jobs_dir.rglob("*") if p.is_file())

    def close(self) -> None:
        self.db.close()

    # ---- files

    def job_dir(self, job_id: str) -> Path:
        return self.jobs_dir / job_id

    def request_path(self, job_id: str) -> Path:
        return self.job_dir(job_id) / "request.pb"

    def frames_path(self, job_id: str) -> Path:
        return self.job_dir(job_id) / "frames"

    def state_path(self, job_id: str) -> Path:
        return self.job_dir(job_id) / "state"

    def reserve(self, nbytes: int) -> None:
        """Count nbytes about to be written; StoreFull (nothing counted) if they would pass the quota."""
        if self.max_bytes and self.used_bytes + nbytes > self.max_bytes:
            raise StoreFull(
                f"the job store is full: {self.used_bytes} of {self.max_bytes} bytes used (--max-data-bytes)"
            )
        self.used_bytes += nbytes

    def release(self, nbytes: int) -> None:
        self.used_bytes = max(0, self.used_bytes - nbytes)

    def write_request(self, job_id: str, serialized_request: bytes) -> None:
        """The request file, whole (written aside, fsynced, renamed) or not at all."""
        self.reserve(len(serialized_request))
        directory = self.job_dir(job_id)
        try:
            directory.mkdir(parents=True, exist_ok=True)
            partial = directory / "request.pb.part"
            with open(partial, "wb") as f:
                f.write(serialized_request)
                f.flush()
                os.fsync(f.fileno())
            partial.replace(self.request_path(job_id))
        except OSError as e:
            self.release(len(serialized_request))
            shutil.rmtree(directory, ignore_errors=True)
            if is_disk_full(e):
                raise StoreFull(f"the disk under the job store is full ({e.strerror})") from e
            raise

    def read_request(self, job_id: str) -> bytes:
        return self.request_path(job_id).read_bytes()

    def remove_files(self, job_id: str) -> None:
        directory = self.job_dir(job_id)
        if directory.exists():
            size = sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())
            shutil.rmtree(directory)
            self.release(size)

    # ---- records

    def insert(
        self,
        *,
        job_id: str,
        owner: str,
        request_hash: str,
        request_id: str,
        format: int,
        seed: int,
        estimated_frames: int,
        header: bytes,
    ) -> JobRecord:
        self.db.execute(
            "INSERT INTO jobs (job_id, owner, state, request_hash, request_id, format, seed, estimated_frames,"
            " header, create_time) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (job_id, owner, QUEUED, request_hash, request_id, format, str(seed), estimated_frames, header, time.time()),
        )
        return self.get(job_id)

    def get(self, job_id: str) -> JobRecord | None:
        row = self.db.execute("SELECT * FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
        return JobRecord.from_row(row) if row else None

    def page(self, owner: str, limit: int, before_seq: int | None) -> list[JobRecord]:
        """An owner's jobs, newest first, those older than `before_seq` (a previous page's last)."""
        rows = self.db.execute(
            "SELECT * FROM jobs WHERE owner = ? AND seq < ? ORDER BY seq DESC LIMIT ?",
            (owner, before_seq if before_seq is not None else 2**63 - 1, limit),
        ).fetchall()
        return [JobRecord.from_row(r) for r in rows]

    def in_state(self, state: str) -> list[JobRecord]:
        rows = self.db.execute("SELECT * FROM jobs WHERE state = ? ORDER BY seq", (state,)).fetchall()
        return [JobRecord.from_row(r) for r in rows]

    def transition(self, job_id: str, new: str, **values) -> JobRecord:
        """Move a job to `new` (TransitionError if its state machine does not allow it), setting `values`."""
        current = self.get(job_id)
        if current is None:
            raise KeyError(job_id)
        if new not in TRANSITIONS[current.state]:
            raise TransitionError(f"job {job_id}: {current.state} -> {new} is not a transition")
        now = time.time()
        if new == RUNNING and current.start_time is None:
            values.setdefault("start_time", now)
        if new in (SUCCEEDED, FAILED, CANCELLED):
            values.setdefault("end_time", now)
        self._update(job_id, current.state, state=new, **values)
        return self.get(job_id)

    def checkpoint(self, job_id: str, frames_done: int) -> None:
        """Record frames made durable (call after the frames file has been fsynced that far)."""
        self.db.execute("UPDATE jobs SET frames_done = ? WHERE job_id = ?", (frames_done, job_id))

    def count_resume(self, job_id: str, rebuilt: bool, frames_regenerated: int = 0) -> None:
        """A resume that rebuilt the stream, or the frames one made again."""
        self.db.execute(
            "UPDATE jobs SET rebuilds = rebuilds + ?, frames_regenerated = frames_regenerated + ? WHERE job_id = ?",
            (int(rebuilt), frames_regenerated, job_id),
        )

    def set_checks(self, job_id: str, checks: bytes) -> None:
        self.db.execute("UPDATE jobs SET checks = ? WHERE job_id = ?", (checks, job_id))

    def _update(self, job_id: str, expected_state: str, **values) -> None:
        columns = ", ".join(f"{k} = ?" for k in values)
        cursor = self.db.execute(
            f"UPDATE jobs SET {columns} WHERE job_id = ? AND state = ?",  # the column names are ours
            (*values.values(), job_id, expected_state),
        )
        if cursor.rowcount != 1:
            raise TransitionError(f"job {job_id} left state {expected_state} meanwhile")

    def delete(self, job_id: str) -> None:
        """Removes the record, then the files (a crash in between leaves files no record names: removed at open)."""
        self.db.execute("DELETE FROM jobs WHERE job_id = ?", (job_id,))
        self.remove_files(job_id)

    def remove_orphans(self) -> list[str]:
        """Directories without a record (a crash between CreateJob's file and its record, or mid-delete)."""
        known = {r[0] for r in self.db.execute("SELECT job_id FROM jobs")}
        orphans = [p.name for p in self.jobs_dir.iterdir() if p.is_dir() and p.name not in known]
        for job_id in orphans:
            self.remove_files(job_id)
        return orphans

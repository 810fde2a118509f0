"""A job's segments (services/synthesis/segments.py): the plan made when the job was created and the frame each
started at, in a table beside the job records. GetJob lists them, and a job that resumes starts again at the
last segment its checkpoint reached rather than at the first.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

from vibevoice.mesh.v1 import mesh_pb2
from vibevoice.tts.v1 import jobs_pb2

from services.synthesis.segments import SegmentStart

_SCHEMA = """
CREATE TABLE IF NOT EXISTS job_segments (
    job_id TEXT NOT NULL REFERENCES jobs (job_id) ON DELETE CASCADE,
    idx INTEGER NOT NULL,
    first_turn INTEGER NOT NULL,
    turns INTEGER NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    first_frame INTEGER,
    first_speech INTEGER,
    PRIMARY KEY (job_id, idx)
);
"""


class JobSegments:
    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db
        # A deleted job's rows go with its record.
        db.execute("PRAGMA foreign_keys=ON")
        db.executescript(_SCHEMA)

    def plan(self, job_id: str, segments: Sequence[mesh_pb2.ScriptSegment]) -> None:
        """The job's segments as planned, none started (replacing an earlier plan)."""
        self.db.execute("DELETE FROM job_segments WHERE job_id = ?", (job_id,))
        self.db.executemany(
            "INSERT INTO job_segments (job_id, idx, first_turn, turns, prompt_tokens) VALUES (?, ?, ?, ?, ?)",
            [(job_id, i, s.first_turn, s.turns, len(s.prompt_ids)) for i, s in enumerate(segments)],
        )

    def matches(self, job_id: str, segments: Sequence[mesh_pb2.ScriptSegment]) -> bool:
        rows = self.db.execute(
            "SELECT first_turn, turns, prompt_tokens FROM job_segments WHERE job_id = ? ORDER BY idx", (job_id,)
        ).fetchall()
        return [tuple(r) for r in rows] == [(s.first_turn, s.turns, len(s.prompt_ids)) for s in segments]

    def started(self, job_id: str, start: SegmentStart) -> None:
        """Segment `start.index` started; the ones after it have not (a resumed job makes them again)."""
        self.db.execute(
            "UPDATE job_segments SET first_frame = CASE WHEN idx = ? THEN ? END,"
            " first_speech = CASE WHEN idx = ? THEN ? END WHERE job_id = ? AND idx >= ?",
            (start.index, start.first_frame, start.index, start.first_speech, job_id, start.index),
        )

    def resume_at(self, job_id: str, checkpoint: int) -> SegmentStart | None:
        """The last segment that started at or before the checkpoint's frame: every one before it has ended."""
        row = self.db.execute(
            "SELECT idx, first_frame, first_speech FROM job_segments"
            " WHERE job_id = ? AND first_frame IS NOT NULL AND first_frame <= ? ORDER BY idx DESC LIMIT 1",
            (job_id, checkpoint),
        ).fetchone()
        return SegmentStart(*row) if row else None

    def listed(self, job_id: str, frames: int) -> list[jobs_pb2.JobSegment]:
        """The segments as GetJob shows them; `frames`: the job's frames now (the last started one's end)."""
        rows = self.db.execute(
            "SELECT idx, first_turn, turns, prompt_tokens, first_frame FROM job_segments WHERE job_id = ? ORDER BY idx",
            (job_id,),
        ).fetchall()
        starts = [r[4] for r in rows if r[4] is not None]
        ends = [*starts[1:], frames]
        out = []
        for idx, first_turn, turns, prompt_tokens, first_frame in rows:
            segment = jobs_pb2.JobSegment(index=idx, first_turn=first_turn, turns=turns, prompt_tokens=prompt_tokens)
            if first_frame is not None:
                segment.first_frame = first_frame
                segment.frames = max(ends[idx] - first_frame, 0)
            out.append(segment)
        return out

"""A job's segments in the store: as planned, where each started, where a resumed job starts again."""

from __future__ import annotations

from vibevoice.mesh.v1 import mesh_pb2

from services.jobs.segments import JobSegments
from services.jobs.store import Store
from services.synthesis.segments import SegmentStart
from tests.test_job_store import new_job

PLAN = [mesh_pb2.ScriptSegment(first_turn=t, turns=2, prompt_ids=[1] * (5 + t)) for t in (0, 2, 4)]


def test_segments_are_listed_resumed_at_the_checkpoint_and_deleted_with_their_job(tmp_path):
    store = Store(tmp_path)
    segments = JobSegments(store.db)
    new_job(store, "a")
    segments.plan("a", PLAN)
    assert segments.matches("a", PLAN) and not segments.matches("a", PLAN[:2])
    assert [(s.first_turn, s.turns, s.prompt_tokens, s.frames) for s in segments.listed("a", 0)] == [
        (0, 2, 5, 0), (2, 2, 7, 0), (4, 2, 9, 0)
    ]  # fmt: skip
    assert segments.resume_at("a", 0) is None

    segments.started("a", SegmentStart(0, 0, 0))
    segments.started("a", SegmentStart(1, 40, 3))
    assert [(s.first_frame, s.frames) for s in segments.listed("a", 55)] == [(0, 40), (40, 15), (0, 0)]
    # A checkpoint before segment 1's first frame: segment 0 was not all durable, so it is made again.
    assert segments.resume_at("a", 39) == SegmentStart(0, 0, 0)
    assert segments.resume_at("a", 45) == SegmentStart(1, 40, 3)
    # Starting an earlier segment again forgets where the later ones started.
    segments.started("a", SegmentStart(0, 0, 0))
    assert [s.frames for s in segments.listed("a", 10)] == [10, 0, 0]

    store.delete("a")
    assert segments.listed("a", 0) == []

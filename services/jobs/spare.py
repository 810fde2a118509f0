"""When a job may start: live Synthesize calls come first, jobs take what they leave.

The llm reports its room (`LLM.Capacity`). A job starts when
  - the llm is not draining and no live stream is waiting in its queue (a waiting stream means no room), and
  - it is idle (nothing admitted): a job then starts whatever its size, as the gateway admits a live call; or
  - a `reserve` share of its batch rows stays free after the job's row, and the same share of its KV pool
    stays free after the positions the job is expected to need (services/synthesis/estimates.py).
Streams of jobs that have been started but that the llm does not count yet (`starting`) count as admitted.
The other way round, live streams waiting in the llm's queue (`waiting_live`) make running jobs give their
streams up (services/jobs/runner.py, "pausing").
"""

from __future__ import annotations

import math

from vibevoice.mesh.v1 import mesh_pb2


def has_room(capacity: mesh_pb2.CapacityResponse, positions: int, reserve: float, starting: int = 0) -> bool:
    if capacity.draining or capacity.waiting:
        return False
    active = capacity.active + starting
    if active == 0:
        return True
    if active + 1 > capacity.slots - math.ceil(capacity.slots * reserve):
        return False
    pool = capacity.kv_pages * capacity.page_size
    free = capacity.kv_pages_available * capacity.page_size
    return positions <= free - reserve * pool

"""Giving freed memory back to the system after a request that carried a lot of it.

glibc keeps freed heap memory in its arenas for reuse, so a burst of large requests (voice prompts of up to
40 MB each) would raise a process's resident memory to its high-water mark and keep it there. malloc_trim
returns the free pages of every arena to the system. Elsewhere (musl, macOS) this is a no-op.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import functools

LARGE_REQUEST_BYTES = 1 << 20  # requests this big are followed by a trim


@functools.cache
def _malloc_trim():
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    return getattr(ctypes.CDLL(name), "malloc_trim", None)


def release_free_memory() -> None:
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


class Trimmer:
    """Trims shortly after large requests end (once gRPC has let go of them too), not at the next request."""

    def __init__(self) -> None:
        self.due = False

    async def loop(self, every_s: float = 2.0) -> None:
        while True:
            await asyncio.sleep(every_s)
            if self.due:
                self.due = False
                await asyncio.to_thread(release_free_memory)


# glibc settings for every Python service (the local mesh sets them; the k8s manifests carry the same, a test
# keeps them equal). Large requests and tensors pass through gRPC's and asyncio's worker threads: with one
# arena per thread each keeps its own high-water mark, so two arenas bound what bursts leave behind; and with
# a fixed mmap threshold every allocation of 1 MiB or more is mapped and unmapped on its own, instead of glibc
# raising the threshold after the first large free and carving later large buffers out of the heap, where
# they fragment it.
MALLOC_ENV = {"MALLOC_ARENA_MAX": "2", "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}

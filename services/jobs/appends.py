"""Writes into a job's files that count against the store's quota and fail as a full store, never half-done."""

from __future__ import annotations

import os

from services.jobs.store import Store, StoreFull, is_disk_full


def write_at(store: Store, fd: int, offset: int, data: bytes) -> None:
    """`data` at `offset`, whole, counted against the quota; on failure the file is cut back to `offset`."""
    store.reserve(len(data))
    try:
        written = 0
        while written < len(data):
            written += os.pwrite(fd, data[written:], offset + written)
    except OSError as e:
        store.release(len(data))
        os.ftruncate(fd, offset)  # no partial record left behind
        if is_disk_full(e):
            raise StoreFull(f"the disk under the job store is full ({e.strerror})") from e
        raise


def sync(fd: int) -> None:
    """fsync; a file system that allocates late reports a full disk here."""
    try:
        os.fsync(fd)
    except OSError as e:
        if is_disk_full(e):
            raise StoreFull(f"the disk under the job store is full ({e.strerror})") from e
        raise

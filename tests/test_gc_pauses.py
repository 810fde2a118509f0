"""A service's start-up objects leave the collector's generations, and a slow collection is logged."""

from __future__ import annotations

import gc
import logging

import pytest

from services.common import gc_pauses


@pytest.fixture
def restore_gc():
    callbacks = list(gc.callbacks)
    yield
    gc.callbacks[:] = callbacks
    gc.unfreeze()


def test_settle_freezes_what_exists_and_installs_one_watcher(restore_gc):
    kept = [object() for _ in range(1000)]
    gc_pauses.settle()
    gc_pauses.settle()
    assert gc.get_freeze_count() >= len(kept)
    assert sum(isinstance(c, gc_pauses._SlowCollections) for c in gc.callbacks) == 1
    gc_pauses.release()  # the service stopped serving: collections while it tears down are not logged
    assert not any(isinstance(c, gc_pauses._SlowCollections) for c in gc.callbacks)


def test_a_collection_slower_than_the_limit_is_logged(restore_gc, monkeypatch, caplog):
    watch = gc_pauses._SlowCollections()
    clock = iter([10.0, 10.0 + gc_pauses.SLOW_MS / 1000 * 3, 20.0, 20.001])
    monkeypatch.setattr(gc_pauses.time, "perf_counter", lambda: next(clock))
    with caplog.at_level(logging.WARNING, logger=gc_pauses.__name__):
        watch("start", {"generation": 2, "collected": 0})
        watch("stop", {"generation": 2, "collected": 7})
        watch("start", {"generation": 0, "collected": 0})
        watch("stop", {"generation": 0, "collected": 1})
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["garbage collection of generation 2 took 60 ms (7 objects freed)"]

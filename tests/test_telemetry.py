"""The tracing setup's log filter: a cancelled stream's context-detach error is dropped, other errors are not."""

from __future__ import annotations

import asyncio
import logging

import pytest
from opentelemetry import context

from services.common import telemetry

OTEL_CONTEXT = "opentelemetry.context"


async def close_in_another_task() -> None:
    """What grpc does when a client cancels a stream: the handler's generator, which attached a context while
    it ran in the call's task, is closed from another task."""

    async def handler():
        token = context.attach(context.set_value("call", 1))
        try:
            yield 1
            yield 2
        finally:
            context.detach(token)

    stream = handler()
    await stream.__anext__()
    await asyncio.get_running_loop().create_task(stream.aclose())


def detach_errors(records: list[logging.LogRecord]) -> list[logging.LogRecord]:
    return [r for r in records if r.name == OTEL_CONTEXT and r.levelno >= logging.ERROR]


@pytest.fixture
def otel_logger():
    logger = logging.getLogger(OTEL_CONTEXT)
    filters = list(logger.filters)
    yield logger
    logger.filters[:] = filters


def test_without_the_filter_a_stream_closed_elsewhere_logs_an_error(otel_logger, caplog):
    otel_logger.filters[:] = []
    with caplog.at_level(logging.INFO):
        asyncio.run(close_in_another_task())
    assert len(detach_errors(caplog.records)) == 1


def test_the_filter_drops_that_error_only(otel_logger, caplog):
    otel_logger.filters[:] = []
    telemetry.quiet_closed_stream_detach()
    telemetry.quiet_closed_stream_detach()  # idempotent: one filter
    assert len(otel_logger.filters) == 1
    with caplog.at_level(logging.INFO):
        asyncio.run(close_in_another_task())
        otel_logger.error("Failed to detach context")  # no exception attached: kept
        try:
            raise ValueError("some other failure")
        except ValueError:
            otel_logger.exception("Failed to detach context")  # another ValueError: kept
    kept = detach_errors(caplog.records)
    assert [r.exc_info is not None for r in kept] == [False, True]
    assert "some other failure" in str(kept[1].exc_info[1])

"""Tracing: a cancelled stream's context-detach error is dropped from the logs, other errors are not; a call's span
marks the moment its first audio leaves."""

from __future__ import annotations

import asyncio
import logging

import numpy as np
import pytest
from opentelemetry import context
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from vibevoice.tts.v1 import tts_pb2

from services.common import telemetry
from services.common.frames import SAMPLES_PER_FRAME
from services.synthesis.responses import Responses

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


def test_the_first_audio_is_marked_on_the_call_span_once():
    """The gateway's Synthesize span gets a "first audio" event when the first chunk is made, and only then: a
    trace shows time to first audio beside the calls that made it."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    responses = Responses(tts_pb2.StreamHeader(max_frames=3), "pcm16")
    frame = np.zeros(SAMPLES_PER_FRAME, dtype=np.float32)
    with provider.get_tracer("test").start_as_current_span("Synthesize"):
        assert responses.frame(0, 0, frame, send=False) == []  # a frame not sent is no audio for the client
        for i in (1, 2):
            assert responses.frame(i, 0, frame)
    (span,) = exporter.get_finished_spans()
    assert [e.name for e in span.events] == ["first audio"]
    assert responses.first_audio is not None

"""OpenTelemetry tracing across every hop: gRPC server and client interceptors carry the trace context."""

from __future__ import annotations

import logging
import os

from opentelemetry import trace
from opentelemetry.instrumentation.grpc import aio_client_interceptors, aio_server_interceptor
from opentelemetry.instrumentation.grpc.filters import any_of, health_check, method_name, negate
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter


class _ClosedStreamDetach(logging.Filter):
    """Drops one known, harmless error: when a client cancels a streaming call, grpc closes the handler's
    generator from another asyncio context, and the tracing interceptor's context token cannot be reset there
    (open-telemetry/opentelemetry-python-contrib#2357). The span still ends; without this every cancelled
    stream logs an ERROR with a traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.getMessage() != "Failed to detach context" or not record.exc_info:
            return True
        error = record.exc_info[1]
        return not (isinstance(error, ValueError) and "was created in a different Context" in str(error))


def quiet_closed_stream_detach() -> None:
    logger = logging.getLogger("opentelemetry.context")
    if not any(isinstance(f, _ClosedStreamDetach) for f in logger.filters):
        logger.addFilter(_ClosedStreamDetach())


def setup_tracing(service: str) -> None:
    """One tracer provider per process; spans go to stdout when VVMESH_TRACE_CONSOLE=1."""
    quiet_closed_stream_detach()
    provider = TracerProvider(resource=Resource.create({"service.name": f"vvmesh-{service}"}))
    if os.environ.get("VVMESH_TRACE_CONSOLE") == "1":
        provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
    trace.set_tracer_provider(provider)


def mark(event: str) -> None:
    """An event at this moment on the current call's span (first audio, prompt prefilled): a trace then shows
    where inside a call its time went."""
    trace.get_current_span().add_event(event)


# The llm <-> acoustic Render stream carries one message per generation step for the lifetime of the process:
# it is not a request to trace, and an interceptor on it costs time on every step. Health checks are noise.
UNTRACED = negate(any_of(method_name("Render"), health_check()))


def server_interceptors() -> list:
    return [aio_server_interceptor(filter_=UNTRACED)]


def client_interceptors() -> list:
    return list(aio_client_interceptors(filter_=UNTRACED))

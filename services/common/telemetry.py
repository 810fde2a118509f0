"""OpenTelemetry tracing across every hop: gRPC server and client interceptors carry the trace context."""

from __future__ import annotations

import os

from opentelemetry import trace
from opentelemetry.instrumentation.grpc import aio_client_interceptors, aio_server_interceptor
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter


def setup_tracing(service: str) -> None:
    """One tracer provider per process; spans go to stdout when VVMESH_TRACE_CONSOLE=1."""
    provider = TracerProvider(resource=Resource.create({"service.name": f"vvmesh-{service}"}))
    if os.environ.get("VVMESH_TRACE_CONSOLE") == "1":
        provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
    trace.set_tracer_provider(provider)


def server_interceptors() -> list:
    return [aio_server_interceptor()]


def client_interceptors() -> list:
    return list(aio_client_interceptors())

"""Serving one service: grpc.aio with health, reflection, tracing, and a drain on SIGTERM."""

from __future__ import annotations

import asyncio
import inspect
import logging
import signal
from collections.abc import AsyncIterator, Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.common import gc_pauses, loop_stalls
from services.common.errors import abort, invalid_argument
from services.common.telemetry import client_interceptors, server_interceptors

log = logging.getLogger(__name__)

# Voice prompts ride in the public request (up to 4 x 10 MB); tensors between services can be large too.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    # A restarted service is found again within two seconds (gRPC's default backoff grows to two minutes).
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
]


def insecure_channel(address: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS, interceptors=client_interceptors())


Parse = Callable[[bytes, grpc.aio.ServicerContext], object]


def _request_parser(deserializer: Callable[[bytes], object]) -> Parse:
    """Raw bytes -> the request message, or INVALID_ARGUMENT naming the message type."""
    message_type = getattr(deserializer, "__self__", None)  # FromString is a classmethod of the message
    name = getattr(getattr(message_type, "DESCRIPTOR", None), "full_name", "request")

    async def parse(raw: bytes, context: grpc.aio.ServicerContext) -> object:
        try:
            return deserializer(raw)
        except Exception as e:  # noqa: BLE001 (whatever the parser raises, the bytes are the client's fault)
            reason = f"the bytes are not a valid {name} message ({type(e).__name__}: {str(e)[:200]})"
            await abort(context, invalid_argument("request", reason))

    return parse


async def _parsed(raw_messages: AsyncIterator[bytes], parse: Parse, context) -> AsyncIterator[object]:
    async for raw in raw_messages:
        yield await parse(raw, context)


def _wrap_unary_request(behavior, parse: Parse):
    if inspect.isasyncgenfunction(behavior):

        async def unary_stream(raw: bytes, context):
            request = await parse(raw, context)
            async for response in behavior(request, context):
                yield response

        return unary_stream

    async def unary(raw: bytes, context):  # unary responses, or a stream written with context.write
        return await behavior(await parse(raw, context), context)

    return unary


def _wrap_stream_request(behavior, parse: Parse):
    if inspect.isasyncgenfunction(behavior):

        async def stream_stream(raw_messages, context):
            async for response in behavior(_parsed(raw_messages, parse, context), context):
                yield response

        return stream_stream

    async def stream(raw_messages, context):
        return await behavior(_parsed(raw_messages, parse, context), context)

    return stream


_FACTORIES = {
    (False, False): ("unary_unary", grpc.unary_unary_rpc_method_handler),
    (False, True): ("unary_stream", grpc.unary_stream_rpc_method_handler),
    (True, False): ("stream_unary", grpc.stream_unary_rpc_method_handler),
    (True, True): ("stream_stream", grpc.stream_stream_rpc_method_handler),
}


def safe_request_handler(handler: grpc.RpcMethodHandler | None) -> grpc.RpcMethodHandler | None:
    """The same handler, with requests parsed inside it instead of by gRPC's deserializer.

    gRPC answers a request its deserializer cannot parse with UNKNOWN ("Unexpected DecodeError") and logs a
    traceback; parsed here, bad bytes (corrupt protobuf, invalid UTF-8 in a string) get INVALID_ARGUMENT.
    Handlers must read requests from their argument (or request iterator), not with context.read().
    """
    if handler is None or handler.request_deserializer is None:
        return handler
    attr, factory = _FACTORIES[(handler.request_streaming, handler.response_streaming)]
    behavior = getattr(handler, attr)
    if not (inspect.iscoroutinefunction(behavior) or inspect.isasyncgenfunction(behavior)):
        return handler  # a synchronous handler runs in a thread pool, which these services do not use
    parse = _request_parser(handler.request_deserializer)
    wrap = _wrap_stream_request if handler.request_streaming else _wrap_unary_request
    return factory(wrap(behavior, parse), request_deserializer=None, response_serializer=handler.response_serializer)


class SafeRequests(grpc.aio.ServerInterceptor):
    """Applies safe_request_handler to every method of a server (ours, health and reflection alike)."""

    async def intercept_service(self, continuation, handler_call_details):
        return safe_request_handler(await continuation(handler_call_details))


class Service:
    """A grpc.aio server for one service's servicers, with the standard health and reflection services."""

    def __init__(
        self, name: str, host: str, port: int, service_names: list[str], also_reflected: list[str] | None = None
    ) -> None:
        """`also_reflected`: services served elsewhere behind the same public address, described here so that
        reflection through that address (grpcurl) knows them too."""
        self.name = name
        # SafeRequests comes last, nearest the handlers, so tracing still sees (and records) refused requests.
        # No SO_REUSEPORT (gRPC's default): a second server on a taken port must fail, not share its traffic.
        self.server = grpc.aio.server(
            options=[*CHANNEL_OPTIONS, ("grpc.so_reuseport", 0)],
            interceptors=[*server_interceptors(), SafeRequests()],
        )
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.service_names = service_names
        reflection.enable_server_reflection(
            [
                *service_names,
                *(also_reflected or []),
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ],
            self.server,
        )
        self.port = self.server.add_insecure_port(f"{host}:{port}")
        self.draining = False

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ["", *self.service_names]:
            await self.health.set(name, status)

    async def run(self, grace_s: float = 30.0, on_drain: Callable[[], None] | None = None) -> None:
        """Serve until SIGTERM/SIGINT, then drain: NOT_SERVING, refuse new calls, let running ones finish."""
        await self.server.start()
        gc_pauses.settle()  # what start-up made stays out of every later collection
        stalls = asyncio.create_task(loop_stalls.watch(), name="loop-stalls")
        await self.set_serving(True)
        log.info("%s serving on port %d", self.name, self.port)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("%s draining (grace %.0f s)", self.name, grace_s)
        self.draining = True
        await self.set_serving(False)
        if on_drain:
            on_drain()
        await self.server.stop(grace_s)
        stalls.cancel()
        gc_pauses.release()
        log.info("%s stopped", self.name)
